"""cancel() of a job between two places (issue #13): each window held open, deterministically.

A cancel that finds the job outside the ready buffer marks it in the core
(``ReadyQueue.mark_cancel``) and returns True; whoever takes the job next ends
it as cancelled, before it rests or runs again. Each Queue-level test below
holds a job in one such window (a hook that blocks on an event), cancels it
there, lets it go on, and checks that the job is reported "cancelled" once,
counted once, never run again, and that join() returns. The core-level tests
check the protocol itself on both cores.
"""
import asyncio
import threading
from collections import deque

import pytest

from tinymq import ExecutorConfig, Job, Priority, RetryConfig

from _helpers import STORES, WAIT, Recorder, loop_takes, make_queue, queue_with_store, record_failures

from test_core_run_worker import FakeDispatcher, Worker, configure, ready  # noqa: F401 (a fixture)


# --- the core's part, on both cores ----------------------------------------------------------

def test_mark_cancel_takes_a_ready_job_marks_one_elsewhere_and_a_second_cancel_loses(core):
    ready = core.ReadyQueue(10)
    configure(ready, "t", lambda job: None)
    waiting, elsewhere = Job("t", id="waiting"), Job("t", id="elsewhere")
    assert ready.push(waiting)
    ready.accept([elsewhere])  # counted, placed by its caller (a delayed job, say)
    assert ready.mark_cancel("nobody") == (core.CANCEL_UNKNOWN, None)
    assert ready.mark_cancel("waiting") == (core.CANCEL_REMOVED, waiting)
    assert len(ready) == 0
    assert ready.mark_cancel("elsewhere") == (core.CANCEL_MARKED, elsewhere)
    assert ready.cancel_requested(elsewhere) and ready.cancel_marks
    assert ready.mark_cancel("elsewhere") == (core.CANCEL_LOST, None)  # the first cancel owns it
    assert ready.mark_cancel("waiting") == (core.CANCEL_LOST, None)
    with pytest.raises(TypeError, match="job id must be a str"):
        ready.mark_cancel(7)


def test_a_marked_job_is_taken_once_by_its_next_holder_and_its_id_is_free_when_it_ends(core):
    ready = core.ReadyQueue(10)
    configure(ready, "t", lambda job: None)
    job = Job("t", id="moving")
    ready.accept([job])
    assert not ready.take_cancel(job)  # nothing requested
    assert ready.mark_cancel("moving")[0] == core.CANCEL_MARKED
    assert ready.requeue(job) is False  # arriving in the ready buffer: taken, placed nowhere
    assert len(ready) == 0 and ready.overflow_size == 0
    assert not ready.take_cancel(job) and not ready.cancel_requested(job)  # taken once
    assert ready.has_id("moving") and ready.unfinished == 1  # until its holder ends it
    ready.task_done(job)
    assert not ready.has_id("moving") and not ready.cancel_marks
    again = Job("t", id="moving")
    assert ready.push(again) and ready.mark_cancel("moving") == (core.CANCEL_REMOVED, again)


def test_an_end_decided_first_makes_a_later_cancel_lose_and_a_cancel_first_wins(core):
    ready = core.ReadyQueue(10)
    configure(ready, "t", lambda job: None)
    failing, cancelled = Job("t", id="failing"), Job("t", id="cancelled")
    ready.accept([failing, cancelled])
    assert ready.decide_end(failing) is False  # e.g. its failure for good: its callbacks run now
    assert ready.mark_cancel("failing") == (core.CANCEL_LOST, None)
    assert ready.mark_cancel("cancelled")[0] == core.CANCEL_MARKED
    assert ready.decide_end(cancelled) is True  # it ends as cancelled instead
    assert ready.requeue(Job("t")) is True  # an unmarked job is placed as always


@pytest.mark.parametrize("finish", [True, False], ids=["no_hooks", "hooks"])
def test_a_success_after_a_cancel_was_requested_counts_nothing(core, finish):
    ready = core.ReadyQueue(10)
    configure(ready, "t", lambda job: None)
    job = Job("t", id="ending")
    assert ready.push(job)
    taken, state = ready.pop_with_type(0.0)
    assert ready.mark_cancel("ending") == (core.CANCEL_MARKED, job)
    ready.release_state(state)
    assert ready.attempt_succeeded(state, 0.001, job, finish) is False
    assert ready.counters()[core.SUCCEEDED] == 0 and ready.unfinished == 1
    assert not ready.cancel_requested(job)  # taken: the caller ends it as cancelled
    ready.task_done(job)
    assert ready.unfinished == 0


def test_a_loop_success_after_a_cancel_was_requested_only_frees_the_slot(core):
    ready = core.ReadyQueue(10)
    ready.configure("a", lambda job: None, 1, None, False, False, core.LOOP)
    handed = deque()
    ready.set_loop_waker(None, handed)
    job = Job("a", id="ending")
    assert ready.push(job)
    [(taken, state)] = loop_takes(ready, 8, handed)
    assert ready.mark_cancel("ending")[0] == core.CANCEL_MARKED
    assert ready.loop_attempt_succeeded(state, 0.001, job) is False
    assert ready.executor_stats()["a"] == (0, 1)
    assert ready.counters()[core.SUCCEEDED] == 0 and ready.unfinished == 1


class CancellingDispatcher(FakeDispatcher):
    """Records ``end_cancelled``; its ``new_context`` (called between the pop and the attempt's
    start) can cancel the job right there, as a cancel() from another thread would."""

    def __init__(self, ready, cancel_in_new_context=False):
        super().__init__(ready)
        self.cancel_in_new_context = cancel_in_new_context
        self.ended = threading.Event()

    def new_context(self, job):
        if self.cancel_in_new_context:
            self.log.add(("mark", self.ready.mark_cancel(job._id)[0]))
        return super().new_context(job)

    def end_cancelled(self, job):
        self.log.add(("end_cancelled", job))
        self.ready.task_done(job)
        self.ended.set()


def test_a_job_cancelled_between_the_pop_and_its_start_never_runs(core, ready):
    dispatcher = CancellingDispatcher(ready, cancel_in_new_context=True)
    ran = Recorder()
    configure(ready, "t", lambda job, ctx: ran.add(job), takes_context=True)
    job = Job("t", id="handed-over")
    assert ready.push(job)
    worker = Worker(core, ready, dispatcher)
    assert dispatcher.ended.wait(WAIT)
    ready.close()
    worker.join()
    assert len(ran) == 0
    assert dispatcher.calls("end_cancelled") == [("end_cancelled", job)]
    assert dispatcher.calls("mark") == [("mark", core.CANCEL_MARKED)]
    assert ready.unfinished == 0 and ready.executor_stats()["t"] == (0, 1)
    assert ready.counters()[core.SUCCEEDED] == 0


def test_a_job_cancelled_between_its_return_and_its_success_ends_cancelled(core, ready):
    dispatcher = CancellingDispatcher(ready)

    def fn(job):  # a cancel() whose look at the worker slots came just after this returned
        dispatcher.log.add(("mark", ready.mark_cancel(job._id)[0]))

    configure(ready, "t", fn)
    job = Job("t", id="succeeding")
    assert ready.push(job)
    worker = Worker(core, ready, dispatcher)
    assert dispatcher.ended.wait(WAIT)
    ready.close()
    worker.join()
    assert dispatcher.calls("end_cancelled") == [("end_cancelled", job)]
    assert ready.counters()[core.SUCCEEDED] == 0 and ready.unfinished == 0


# --- the Queue: each window held open ---------------------------------------------------------

# A job given its id, or one enqueued without an id whose id is first read after enqueue (by the
# cancel, in the window): its queue registers it as it is made (see test_cancel_unnamed.py).
ID_SOURCES = ["given", "read_after_enqueue"]


def new_job(id_source, job_type, job_id, **fields):
    return Job(job_type, id=job_id if id_source == "given" else None, **fields)


class HoldAtRetry:
    """Blocks the thread that places a retry (``install``: of ``q``'s dispatcher) until released:
    after it counted the retry, before the move that places it (its log, which says whether a
    cancel overtook it, comes after)."""

    def __init__(self):
        self.reached = threading.Event()
        self.go_on = threading.Event()

    def install(self, q):
        dispatcher = q._dispatcher
        for name in ("make_ready", "push_delayed"):
            dispatcher.__dict__[name] = self._held(getattr(dispatcher, name))

    def _held(self, place):
        def held(job, *args, **kwargs):
            if job.retries and not self.reached.is_set():
                self.reached.set()
                self.go_on.wait(WAIT)
            return place(job, *args, **kwargs)

        return held


@pytest.fixture
def hold_at_retry():
    """The thread turning a failed attempt into its retry stops after counting it, before placing it."""
    hold = HoldAtRetry()
    try:
        yield hold
    finally:
        hold.go_on.set()


@pytest.mark.parametrize("id_source", ID_SOURCES)
@pytest.mark.parametrize("backend", STORES)
@pytest.mark.parametrize("kind", ["thread", "async"])
@pytest.mark.parametrize("backoff", [0.0, 60.0], ids=["retry_now", "retry_later"])
def test_a_job_cancelled_while_its_failed_attempt_becomes_a_retry_is_never_run_again(
        backend, kind, backoff, id_source, tmp_path, hold_at_retry):
    attempts = Recorder()

    def fail(job):
        attempts.add(job)
        raise RuntimeError("again")

    async def fail_async(job):
        fail(job)

    with queue_with_store(backend, tmp_path) as q:
        failures = record_failures(q, key=lambda job: job.id)
        q.register_executor("t", fail if kind == "thread" else fail_async)
        hold_at_retry.install(q)
        q.start_dispatcher(workers=2)
        job = q.enqueue(new_job(id_source, "t", "retried",
                                retry_config=RetryConfig(max_retries=5, initial_delay=backoff)))
        assert hold_at_retry.reached.wait(WAIT), "the retry was never scheduled"
        assert q.cancel(job.id) is True  # in no place: counted as retried, not yet placed
        assert q.cancel(job.id) is False
        hold_at_retry.go_on.set()
        assert q.join(WAIT), "the cancelled retry was not ended (a 60 s backoff must not delay it)"
        assert failures.snapshot() == [(job.id, "cancelled", None)]
        assert attempts.snapshot() == [job]
        stats = q.get_stats()
        assert (stats.jobs_cancelled, stats.jobs_failed, stats.jobs_retried) == (1, 0, 1)
        assert stats.delayed_jobs_count == 0
        if q.store is not None:
            assert [job.id for job in q.store.jobs()] == []


@pytest.mark.parametrize("id_source", ID_SOURCES)
@pytest.mark.parametrize("backend", STORES)
def test_a_job_cancelled_between_the_ready_buffer_and_its_worker_never_runs(backend, id_source, tmp_path):
    ran = Recorder()
    with queue_with_store(backend, tmp_path) as q:
        failures = record_failures(q, key=lambda job: job.id)
        q.register_executor("t", lambda job, ctx: ran.add(job))
        dispatcher = q._dispatcher
        new_context = dispatcher.new_context
        popped, go_on = threading.Event(), threading.Event()

        def held_new_context(job):  # called by the worker after the pop, before the start
            popped.set()
            assert go_on.wait(WAIT)
            return new_context(job)

        dispatcher.new_context = held_new_context
        job = q.enqueue(new_job(id_source, "t", "handed-over"))
        q.start_dispatcher(workers=1)
        assert popped.wait(WAIT)
        assert q.cancel(job.id) is True
        assert q.cancel(job.id) is False
        go_on.set()
        assert q.join(WAIT)
        assert ran.snapshot() == []
        assert failures.snapshot() == [(job.id, "cancelled", None)]
        assert q.get_stats().jobs_cancelled == 1


@pytest.mark.parametrize("id_source", ID_SOURCES)
def test_an_async_job_cancelled_in_the_loops_hand_over_never_runs(id_source):
    """Two jobs taken by the loop in one batch: while the first blocks the loop, the second
    waits in the loop's hand-over line (no attempt of it is registered yet)."""
    started, release = threading.Event(), threading.Event()
    ran = Recorder()

    async def blocking(job):
        started.set()
        release.wait(WAIT)  # blocks the loop thread on purpose: nothing else runs on it

    async def second(job):
        ran.add(job)

    with make_queue() as q:
        failures = record_failures(q, key=lambda job: job.id)
        q.register_executor("block", blocking)
        q.register_executor("a", second)
        q.enqueue(Job("block", priority=Priority.HIGH))
        job = q.enqueue(new_job(id_source, "a", "in-hand-over", priority=Priority.LOW))
        q.start_dispatcher(workers=1)  # the loop takes both at once
        try:
            assert started.wait(WAIT)
            assert q.get_stats().low_queue_size == 0  # out of the core: in the loop's hand
            assert q.cancel(job.id) is True
        finally:
            release.set()
        assert q.join(WAIT)
        assert ran.snapshot() == []
        assert failures.snapshot() == [(job.id, "cancelled", None)]


@pytest.mark.parametrize("id_source", ID_SOURCES)
@pytest.mark.parametrize("backend", STORES)
def test_a_delayed_job_cancelled_when_due_before_the_scheduler_moves_it_never_runs(backend, id_source, tmp_path):
    # (The move itself is one step of the core: a cancel finds the job in the heap or in the buffer.
    # A cancel marking it between the two steps of cancel() is taken by the move: test_core_move_due.)
    ran = Recorder()
    with queue_with_store(backend, tmp_path) as q:
        failures = record_failures(q, key=lambda job: job.id)
        q.register_executor("t", lambda job: ran.add(job))
        dispatcher = q._dispatcher
        move_due = dispatcher.move_due
        due, go_on = threading.Event(), threading.Event()

        def held_move_due(heap, now):  # the scheduler found it due: about to move it to the buffer
            if heap.next_run_at() is not None and heap.next_run_at() <= now:
                due.set()
                assert go_on.wait(WAIT)
            move_due(heap, now)

        dispatcher.move_due = held_move_due
        q.start_dispatcher(workers=1)
        job = q.enqueue_delayed(new_job(id_source, "t", "due"), 0.3)  # not due yet when enqueue (a store save) is done
        assert due.wait(WAIT)
        assert q.get_stats().delayed_jobs_count == 0
        assert q.cancel(job.id) is True
        go_on.set()
        assert q.join(WAIT)
        assert ran.snapshot() == [] and failures.snapshot() == [(job.id, "cancelled", None)]


class HeldDeletes:
    """A store wrapper whose ``delete`` blocks (once) until released: a success being written."""

    def __init__(self, store):
        self.store = store
        self.deleting, self.go_on = threading.Event(), threading.Event()

    def __getattr__(self, name):
        return getattr(self.store, name)

    def delete(self, job_id):
        if not self.deleting.is_set():
            self.deleting.set()
            self.go_on.wait(WAIT)
        self.store.delete(job_id)


@pytest.mark.parametrize("kind", ["thread", "async"])
def test_a_cancel_after_the_success_was_decided_loses_and_the_success_stands(kind, tmp_path):
    from tinymq import SQLitePersistence

    async def succeed_async(job):
        pass

    with SQLitePersistence(str(tmp_path / "jobs.db")) as sqlite, make_queue() as q:
        store = HeldDeletes(sqlite)
        failures = record_failures(q)
        q.set_persistence(store)
        q.register_executor("t", (lambda job: None) if kind == "thread" else succeed_async)
        q.start_dispatcher(workers=1)
        q.enqueue(Job("t", id="succeeded"))
        try:
            assert store.deleting.wait(WAIT)
            assert q.cancel("succeeded") is False  # its success is decided: only the delete is left
        finally:
            store.go_on.set()
        assert q.join(WAIT)
        assert failures.snapshot() == []
        assert q.get_stats().jobs_succeeded == 1 and q.get_stats().jobs_cancelled == 0
        q.stop()


def test_a_cancel_from_the_jobs_own_failure_callback_loses_without_waiting():
    answers = []
    with make_queue() as q:
        @q.on_failure
        def cancel_it(job, reason, exc):
            answers.append((reason, q.cancel(job.id)))

        q.register_executor("t", lambda job: 1 / 0)
        q.start_dispatcher(workers=1)
        q.enqueue(Job("t", id="failing", retry_config=RetryConfig(max_retries=0)))
        assert q.join(WAIT)
        assert answers == [("retries_exhausted", False)]
        assert q.get_stats().jobs_cancelled == 0 and q.get_stats().jobs_failed == 1
