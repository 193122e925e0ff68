"""cancel(job.id) of a job whose id was first read after enqueue (issue #13).

A job's id is made on first use. A job enqueued without one used to get an id
its queue never heard of, so a cancel by that id found the job only where it
rested, and returned False for a job between two places (taken by a worker, not
yet started; a retry being placed; a due job leaving the delayed heap), which
then ran: "False when no unfinished job has that id" was not true. Now the core
puts its ``Unnamed`` in such a job's ``_id`` when it accepts it, and ``job.id``
makes the id and registers it with the core in one step; the job is then found
wherever it is, like one given its id. The windows themselves are held open in
test_cancel_in_transit.py (id_source "read_after_enqueue"); these tests check the
core's side on both cores, and what a user sees around it.
"""
import copy
import gc
import pickle
import random
import threading

import pytest

from tinymq import DuplicateJob, Job, PermanentFailure

from _helpers import WAIT, Recorder, make_queue, record_failures

from test_core_run_worker import configure


# --- the core's part, on both cores ----------------------------------------------------------

def test_an_id_made_after_enqueue_is_registered_and_found_by_a_cancel(core):
    ready = core.ReadyQueue(10)
    configure(ready, "t", lambda job: None)
    waiting, elsewhere, batched = Job("t"), Job("t"), Job("t")
    assert ready.push(waiting)
    ready.accept([elsewhere])  # placed by its caller: delayed, say
    assert ready.push_many([batched])
    for job in (waiting, elsewhere, batched):
        job_id = job.id
        assert ready.has_id(job_id) and ready.registered(job) and job.id == job_id
    assert ready.mark_cancel(waiting.id) == (core.CANCEL_REMOVED, waiting)
    assert ready.mark_cancel(elsewhere.id) == (core.CANCEL_MARKED, elsewhere)
    assert ready.cancel_requested(elsewhere)
    for job in (waiting, elsewhere, batched):
        ready.task_done(job)
        assert not ready.has_id(job.id)
    assert ready.unfinished == 0 and not ready.cancel_marks


def test_a_job_never_named_while_queued_leaves_without_an_id(core):
    ready = core.ReadyQueue(10)
    configure(ready, "t", lambda job: None)
    job = Job("t")
    assert ready.push(job)
    taken, state = ready.pop_with_type(0.0)
    assert taken is job
    ready.release_state(state)
    ready.task_done(job)
    assert job._id is None  # nothing of its queue is left in it
    job_id = job.id
    assert not ready.has_id(job_id)  # made as for a job never queued
    assert ready.push(job) and job.id == job_id and ready.has_id(job_id)  # enqueued again: its id is known


def test_an_id_set_on_a_queued_job_is_registered_and_one_taken_is_refused(core):
    ready = core.ReadyQueue(10)
    configure(ready, "t", lambda job: None)
    taken, job = Job("t", id="taken"), Job("t")
    ready.accept([taken, job])
    with pytest.raises(DuplicateJob, match="'taken'"):
        job.id = "taken"
    job.id = "mine"
    assert ready.has_id("mine") and ready.registered(job)
    job.id = "mine"  # the same id again: nothing changes
    with pytest.raises(ValueError, match="cannot change"):
        job.id = "other"


def test_a_copy_or_a_pickle_of_a_queued_job_is_a_new_job_without_an_id(core):
    ready = core.ReadyQueue(10)
    configure(ready, "t", lambda job: None)
    job = Job("t", {"n": 1})
    assert ready.push(job)
    for clone in (copy.copy(job), copy.deepcopy(job), pickle.loads(pickle.dumps(job))):
        assert clone._id is None and clone.payload == {"n": 1}
        assert not ready.has_id(clone.id)  # its own id, not registered for the queued job
    job_id = job.id
    assert ready.registered(job) and ready.has_id(job_id)  # the queued job itself is found by its id
    assert ready.mark_cancel(job_id) == (core.CANCEL_REMOVED, job)


def test_a_job_kept_after_its_queue_is_gone_still_gets_an_id(core):
    ready = core.ReadyQueue(10)
    configure(ready, "t", lambda job: None)
    job = Job("t")
    assert ready.push(job)
    del ready
    gc.collect()  # the job does not keep its queue alive
    assert isinstance(job.id, str) and job.id == job.id


def test_naming_jobs_while_workers_finish_them_leaves_no_id_behind(core):
    """Stress: ids made from one thread while another finishes the same jobs. Each id is
    registered exactly while its job is unfinished: none is left when all are done."""
    ready = core.ReadyQueue(100_000)
    configure(ready, "t", lambda job: None, limit=10**6)
    jobs = [Job("t") for _ in range(20_000)]
    assert ready.push_many(jobs)
    named = []
    barrier = threading.Barrier(2)

    def finish():
        barrier.wait()
        for _ in jobs:
            job, state = ready.pop_with_type(WAIT)
            ready.release_state(state)
            ready.task_done(job)

    def name():
        barrier.wait()
        for job in random.sample(jobs, len(jobs)):
            named.append(job.id)

    threads = [threading.Thread(target=finish), threading.Thread(target=name)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT * 6)
    assert ready.unfinished == 0
    assert len(set(named)) == len(jobs)
    assert not any(ready.has_id(job_id) for job_id in named)
    assert [job.id for job in jobs] == [job.id for job in jobs]  # each id fixed once made


# --- the Queue ---------------------------------------------------------------------------------
# (Each in-transit window, held open with the id read after enqueue: test_cancel_in_transit.py,
# id_source "read_after_enqueue".)

@pytest.mark.parametrize("kind", ["thread", "async"])
def test_a_cancel_returns_false_only_for_a_job_that_has_started(kind):
    """Stress: jobs enqueued without ids, each cancelled by the id read after enqueue while
    workers take them. A False must mean the job started already (its executor ran), never
    that it was on its way to a worker; every job ends once: succeeded or cancelled."""
    started = set()

    def run(job):
        started.add(job)  # (a set's add is atomic)

    async def run_async(job):
        run(job)

    with make_queue(buffer_size=100_000) as q:
        failures = record_failures(q)
        q.register_executor("t", run if kind == "thread" else run_async)
        q.start_dispatcher(workers=4)
        outcomes = []
        for _ in range(3_000):
            job = q.enqueue(Job("t"))
            cancelled = q.cancel(job.id)
            outcomes.append((job, cancelled))
            if not cancelled:
                assert job in started, "cancel() returned False for an unfinished job that had not started"
        assert q.join(WAIT * 3)
        reported = {id(job) for job, reason, _ in failures.snapshot() if reason == "cancelled"}
        assert len(failures.snapshot()) == len(reported)  # each reported once
        assert reported == {id(job) for job, cancelled in outcomes if cancelled}
        stats = q.get_stats()
        assert stats.jobs_cancelled == len(reported)
        assert stats.jobs_succeeded + stats.jobs_cancelled == len(outcomes)


def test_a_job_enqueued_again_from_its_failure_callback_is_refused_and_once_finished_is_cancelled_by_its_id():
    """Its failure callbacks run while it is unfinished: named as its end was decided, it is held
    under that id until they return, as one enqueued with an id is, so enqueuing it again from one
    of them raises DuplicateJob; enqueued again once finished, a cancel by that id finds it."""
    refused = []
    attempts = Recorder()

    def fail(job):
        attempts.add(job)
        raise PermanentFailure("not now")

    with make_queue() as q:
        failures = record_failures(q)

        def enqueue_again(job, reason, exc):
            if not refused:
                with pytest.raises(DuplicateJob):
                    q.enqueue_delayed(job, 60.0)
                refused.append(job.id)

        q.on_failure(enqueue_again)
        q.register_executor("t", fail)
        job = q.enqueue(Job("t"))
        q.start_dispatcher(1)
        assert q.join(WAIT)
        assert refused == [job.id]
        q.enqueue_delayed(job, 60.0)
        assert q.cancel(job.id) is True
        assert q.join(WAIT)
        assert failures.snapshot() == [(job, "permanent_failure", failures.snapshot()[0][2]),
                                       (job, "cancelled", None)]
        assert attempts.snapshot() == [job]
        assert q.cancel(job.id) is False
