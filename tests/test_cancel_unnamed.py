"""cancel(job.id) of a job whose id was first read after enqueue (issue #13).

A job's id is made on first use. A job enqueued without one used to get an id
its queue never heard of, so a cancel by that id found the job only where it
rested, and returned False for a job between two places (taken by a worker, not
yet started; a retry being placed; a due job leaving the delayed heap), which
then ran: "False when no unfinished job has that id" was not true. Now the core
puts its ``Unnamed`` in such a job's ``_id`` when it accepts it, and ``job.id``
makes the id and registers it with the core in one step; the job is then found
wherever it is, like one given its id. These tests hold each window open (as
test_cancel_in_transit.py does for given ids) and check the core's side on both cores.
"""
import copy
import gc
import pickle
import random
import threading

import pytest

from tinymq import DuplicateJob, Job, PermanentFailure, Priority, RetryConfig

from _helpers import WAIT, Recorder, make_queue, record_failures, wait_until

from test_cancel_in_transit import hold_at_retry  # noqa: F401 (a fixture)
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


# --- the Queue: each window held open, the id read after enqueue ------------------------------

def test_a_job_cancelled_between_the_ready_buffer_and_its_worker_never_runs():
    ran = Recorder()
    with make_queue() as q:
        failures = record_failures(q)
        q.register_executor("t", lambda job, ctx: ran.add(job))
        dispatcher = q._dispatcher
        new_context = dispatcher.new_context
        popped, go_on = threading.Event(), threading.Event()

        def held_new_context(job, deadline):  # called by the worker after the pop, before the start
            popped.set()
            assert go_on.wait(WAIT)
            return new_context(job, deadline)

        dispatcher.new_context = held_new_context
        job = q.enqueue(Job("t"))
        q.start_dispatcher(workers=1)
        assert popped.wait(WAIT)
        assert q.cancel(job.id) is True
        assert q.cancel(job.id) is False
        go_on.set()
        assert q.join(WAIT)
        assert ran.snapshot() == []
        assert failures.snapshot() == [(job, "cancelled", None)]
        assert q.get_stats().jobs_cancelled == 1


@pytest.mark.parametrize("kind", ["thread", "async"])
def test_a_job_cancelled_while_its_failed_attempt_becomes_a_retry_is_never_run_again(kind, hold_at_retry):  # noqa: F811
    attempts = Recorder()

    def fail(job):
        attempts.add(job)
        raise RuntimeError("again")

    async def fail_async(job):
        fail(job)

    with make_queue() as q:
        failures = record_failures(q)
        q.register_executor("t", fail if kind == "thread" else fail_async)
        q.start_dispatcher(workers=2)
        job = q.enqueue(Job("t", retry_config=RetryConfig(max_retries=5, initial_delay=60.0)))
        assert hold_at_retry.reached.wait(WAIT), "the retry was never scheduled"
        assert q.cancel(job.id) is True  # in no place: counted as retried, not yet placed
        hold_at_retry.go_on.set()
        assert q.join(WAIT), "the cancelled retry was not ended (a 60 s backoff must not delay it)"
        assert failures.snapshot() == [(job, "cancelled", None)]
        assert attempts.snapshot() == [job]
        assert q.get_stats().delayed_jobs_count == 0


def test_a_delayed_job_cancelled_between_its_heap_and_the_ready_buffer_never_runs():
    ran = Recorder()
    with make_queue() as q:
        failures = record_failures(q)
        q.register_executor("t", lambda job: ran.add(job))
        dispatcher = q._dispatcher
        make_ready = dispatcher.make_ready
        due, go_on = threading.Event(), threading.Event()

        def held_make_ready(job):  # the scheduler took it out of the heap: on its way to the buffer
            due.set()
            assert go_on.wait(WAIT)
            make_ready(job)

        dispatcher.make_ready = held_make_ready
        q.start_dispatcher(workers=1)
        job = q.enqueue_delayed(Job("t"), 0.05)
        assert due.wait(WAIT)
        assert q.get_stats().delayed_jobs_count == 0
        assert q.cancel(job.id) is True
        go_on.set()
        assert q.join(WAIT)
        assert ran.snapshot() == [] and failures.snapshot() == [(job, "cancelled", None)]


def test_an_async_job_cancelled_in_the_loops_hand_over_never_runs():
    started, release = threading.Event(), threading.Event()
    ran = Recorder()

    async def blocking(job):
        started.set()
        release.wait(WAIT)  # blocks the loop thread on purpose: nothing else runs on it

    async def second(job):
        ran.add(job)

    with make_queue() as q:
        failures = record_failures(q)
        q.register_executor("block", blocking)
        q.register_executor("a", second)
        q.enqueue(Job("block", priority=Priority.HIGH))
        job = q.enqueue(Job("a", priority=Priority.LOW))
        q.start_dispatcher(workers=1)  # the loop takes both at once
        try:
            assert started.wait(WAIT)
            assert q.get_stats().low_queue_size == 0  # out of the core: in the loop's hand
            assert q.cancel(job.id) is True
        finally:
            release.set()
        assert q.join(WAIT)
        assert ran.snapshot() == []
        assert failures.snapshot() == [(job, "cancelled", None)]


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


def test_a_job_enqueued_again_from_its_failure_callback_is_cancelled_by_the_id_read_later():
    """Its first end was decided before the callback (no id registered for it then), and done after
    it: the job waiting again has no id its queue knows, and is found where it rests."""
    again = []
    attempts = Recorder()

    def fail(job):
        attempts.add(job)
        raise PermanentFailure("not now")

    with make_queue() as q:
        failures = record_failures(q)

        def enqueue_again(job, reason, exc):
            if not again:
                again.append(q.enqueue_delayed(job, 60.0))

        q.on_failure(enqueue_again)
        q.register_executor("t", fail)
        job = q.enqueue(Job("t"))
        q.start_dispatcher(1)
        # (its first end done: the callback returned, the job waits again)
        assert wait_until(lambda: q.get_stats().delayed_jobs_count == 1 and q._ready.unfinished == 1)
        assert again == [job]
        assert q.cancel(job.id) is True
        assert q.join(WAIT)
        assert failures.snapshot() == [(job, "permanent_failure", failures.snapshot()[0][2]),
                                       (job, "cancelled", None)]
        assert attempts.snapshot() == [job]
        assert q.cancel(job.id) is False
