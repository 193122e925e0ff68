"""``Job.id`` is writable (API.md "Job"): a job that no queue holds takes a new id; one that is
queued, delayed or running (in-process, or in Redis) refuses, saying why and what to do instead.

Runs on whichever core the session uses (the suite runs once per core); the ``core`` tests
build each twin's ReadyQueue themselves.
"""
import copy
import os
import pickle
import threading

import pytest

from tinymq import DuplicateJob, ExecutorConfig, Job, PermanentFailure, Queue, RetryConfig, SQLitePersistence

from _helpers import WAIT, Blocker, Recorder, record_failures

from test_core_run_worker import configure

REFUSED = "cannot change to"


# --- a job no queue holds ----------------------------------------------------------------

def test_a_fresh_job_takes_a_new_id_however_it_got_its_first():
    generated = Job("t")
    first = generated.id  # made on first read
    generated.id = "renamed"
    assert generated.id == "renamed" and first != "renamed"
    given = Job("t", id="given")
    given.id = "other"
    given.id = "again"
    assert given.id == "again"
    unread = Job("t")
    unread.id = "set-first"
    unread.id = "set-second"
    assert unread.id == "set-second"


@pytest.mark.parametrize("bad", ["", 5, None, b"bytes", type("Text", (str,), {})("subclass")])
def test_a_new_id_is_checked_as_one_given_to_the_constructor(bad):
    job = Job("t", id="kept")
    with pytest.raises(ValueError, match="id must be a non-empty str") as refused:
        job.id = bad
    assert repr(bad) in str(refused.value)
    if bad is not None:  # (None: no id given, one is made)
        with pytest.raises(ValueError, match="id must be a non-empty str"):
            Job("t", id=bad)
    assert job.id == "kept"


def test_a_job_enqueued_after_its_id_changed_runs_and_is_cancelled_under_the_new_one():
    q = Queue(10)
    failed = record_failures(q, key=lambda job: job.id)
    ran = Recorder()
    q.register_executor("t", lambda job: ran.add(job.id))
    runs, cancelled = Job("t", id="old-a"), Job("t")
    runs.id = "new-a"
    cancelled.id = cancelled.id + "-renamed"
    try:
        q.enqueue(runs)
        q.enqueue(cancelled)
        assert not q.cancel("old-a") and q.cancel(cancelled.id)
        q.start_dispatcher(1)
        assert q.join(WAIT)
        assert ran.snapshot() == ["new-a"]
        assert [(job_id, reason) for job_id, reason, _ in failed.snapshot()] == [(cancelled.id, "cancelled")]
    finally:
        q.stop()


def test_changing_to_an_unfinished_jobs_id_makes_the_enqueue_a_duplicate():
    q = Queue(10)
    try:
        q.enqueue(Job("t", id="taken"))
        job = Job("t", id="free")
        job.id = "taken"  # not queued: nothing to check against yet
        with pytest.raises(DuplicateJob, match="'taken'"):
            q.enqueue(job)
        with pytest.raises(DuplicateJob, match="'taken'"):
            q.enqueue_many([Job("t"), job])
        job.id = "free"  # refused, so no queue holds it: its id may change again
        assert q.enqueue(job) is job and q.get_stats().medium_queue_size == 2
    finally:
        q.stop(wait=False)


# --- a job a queue holds -----------------------------------------------------------------

def test_a_queued_or_delayed_job_refuses_a_new_id_and_says_what_to_do():
    q = Queue(10)
    try:
        ready, delayed, batch = Job("t", id="ready"), Job("t"), [Job("t"), Job("t", id="in-batch")]
        q.enqueue(ready)
        q.enqueue_delayed(delayed, 60.0)
        delayed_id = delayed.id  # named in its queue when read
        q.enqueue_many(batch)
        for job, job_id in ((ready, "ready"), (delayed, delayed_id), (batch[0], batch[0].id), (batch[1], "in-batch")):
            with pytest.raises(ValueError, match=REFUSED) as refused:
                job.id = "elsewhere"
            message = str(refused.value)
            assert repr(job_id) in message and "'elsewhere'" in message
            assert "unfinished" in message and "new Job(..., id='elsewhere')" in message
            assert job.id == job_id
            job.id = job_id  # the id it has: nothing changes
            assert q.cancel(job_id)  # still found by it
    finally:
        q.stop(wait=False)


def test_a_running_job_refuses_and_a_finished_one_takes_a_new_id_and_runs_again():
    q = Queue(10)
    answers = Recorder()

    def fn(job):
        try:
            job.id = f"{job.id}-from-inside"
        except ValueError as exc:
            answers.add(str(exc))
        else:
            answers.add("changed")

    q.register_executor("t", fn)
    job = Job("t", id="first")
    try:
        q.start_dispatcher(1)
        q.enqueue(job)
        assert q.join(WAIT)
        assert len(answers) == 1 and REFUSED in answers.snapshot()[0]
        job.id = "second"  # finished: free
        q.enqueue(job)
        assert q.join(WAIT)
        assert job.id == "second" and len(answers) == 2 and REFUSED in answers.snapshot()[1]
    finally:
        q.stop()


def test_a_running_job_refuses_while_it_runs_in_another_thread():
    q = Queue(10)
    job = Job("t", id="running")
    with Blocker() as blocker:
        q.register_executor("t", blocker.fn)
        q.start_dispatcher(1)
        try:
            q.enqueue(job)
            assert blocker.wait_started(1)
            with pytest.raises(ValueError, match=REFUSED):
                job.id = "elsewhere"
            assert q.cancel("running")  # still found by its id
            blocker.release()
            assert q.join(WAIT)
            job.id = "elsewhere"
        finally:
            q.stop()


def test_a_job_that_failed_for_good_takes_a_new_id():
    q = Queue(10)
    ended = threading.Event()
    answers = Recorder()

    def report(job, reason, exc):
        try:
            job.id = "from-callback"  # its failure callbacks run before it counts as finished
        except ValueError:
            answers.add("refused")
        ended.set()

    q.on_failure(report)
    q.register_executor("t", lambda job: (_ for _ in ()).throw(PermanentFailure("no")))
    job = Job("t", id="fails", retry_config=RetryConfig(max_retries=0))
    try:
        q.start_dispatcher(1)
        q.enqueue(job)
        assert q.join(WAIT) and ended.is_set()
        assert answers.snapshot() == ["refused"]
        job.id = "retried-by-hand"
        assert q.enqueue(job).id == "retried-by-hand"
    finally:
        q.stop(wait=False)


def test_a_job_of_a_garbage_collected_queue_takes_a_new_id():
    q = Queue(10)
    job = q.enqueue(Job("t", id="kept"))
    with pytest.raises(ValueError, match=REFUSED):
        job.id = "elsewhere"
    q.stop(wait=False)
    del q
    import gc

    gc.collect()
    job.id = "elsewhere"


def test_each_twin_core_is_asked(core):
    ready = core.ReadyQueue(10)
    configure(ready, "t", lambda job: None)
    job = Job("t", id="in-core")
    assert ready.push(job)
    with pytest.raises(ValueError, match=REFUSED):
        job.id = "elsewhere"
    taken, state = ready.pop_with_type(0.0)
    assert taken is job
    with pytest.raises(ValueError, match=REFUSED):  # running: still unfinished
        job.id = "elsewhere"
    ready.release_state(state)
    ready.task_done(job)
    job.id = "elsewhere"
    assert ready.push(job) and ready.has_id("elsewhere") and not ready.has_id("in-core")


# --- with a store ------------------------------------------------------------------------

def test_a_stored_job_is_saved_under_its_new_id(tmp_path):
    path = os.path.join(str(tmp_path), "jobs.db")
    store = SQLitePersistence(path)
    q = Queue(10)
    q.set_persistence(store)
    ran = Recorder()
    q.register_executor("t", lambda job: ran.add(job.id))
    job = Job("t", id="report-1")
    try:
        q.enqueue(job)
        with pytest.raises(ValueError, match=REFUSED):
            job.id = "report-2"  # it would strand the row of report-1
        q.start_dispatcher(1)
        assert q.join(WAIT) and ran.snapshot() == ["report-1"]
        assert store.jobs() == []
        job.id = "report-2"
        q.stop()
        later = Queue(10)
        later.set_persistence(store)
        later.enqueue(job)
        assert [row.id for row in store.jobs()] == ["report-2"]
        later.stop(wait=False)
    finally:
        q.stop(wait=False)
        store.close()
    reopened, again = SQLitePersistence(path), Queue(10)
    try:
        again.set_persistence(reopened)  # the row under the new id comes back
        assert again.cancel("report-2") and not again.cancel("report-1")
    finally:
        again.stop(wait=False)
        reopened.close()


# --- copies ------------------------------------------------------------------------------

def test_a_copy_of_a_renamed_job_keeps_the_id_and_can_be_renamed():
    job = Job("t", {"n": 1}, id="a")
    job.id = "b"
    for clone in (copy.copy(job), copy.deepcopy(job), pickle.loads(pickle.dumps(job))):
        assert clone.id == "b" and clone.payload == {"n": 1}
        clone.id = "c"
    assert job.id == "b"


# --- over Redis --------------------------------------------------------------------------

@pytest.mark.redis
def test_over_redis_a_running_job_refuses_and_the_producers_object_is_its_own(redis_backend):
    producer, worker = redis_backend.pair()
    failed = Recorder()  # a cancelled job is reported by the process that holds it
    for queue in (producer, worker):
        queue.on_failure(lambda job, reason, exc: failed.add((job.id, reason)))
    ran = Recorder()
    gate = threading.Event()

    def run(job):
        gate.wait(WAIT)
        try:
            job.id = "from-inside"  # running: its worker's queue holds it
        except ValueError:
            ran.add(job.id)

    worker.register_executor("t", run, ExecutorConfig())
    job = Job("t", id="r-1")
    producer.enqueue(job)
    # Redis holds the job's copy: renaming the producer's object renames no job there.
    job.id = "r-2"
    assert not producer.cancel("r-2")
    worker.start_dispatcher(1)
    gate.set()
    assert producer.join(WAIT) and ran.wait_for(1) and ran.snapshot() == ["r-1"]
    taken = Job("t", id="r-taken")
    gate.clear()
    producer.enqueue(taken)
    renamed = Job("t", id="r-free")
    renamed.id = "r-taken"
    with pytest.raises(DuplicateJob, match="'r-taken'"):
        producer.enqueue(renamed)
    producer.enqueue(job)
    assert producer.cancel("r-2") and not producer.cancel("r-1")
    gate.set()
    assert producer.join(WAIT)
    assert failed.snapshot() == [("r-2", "cancelled")]
