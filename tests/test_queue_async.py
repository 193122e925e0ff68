"""Async executors: the queue's event loop, under the whole Queue contract.

Run on the compiled core by default and on the pure one with
TINYMQ_NO_EXTENSIONS=1; every test runs with and without a SQLite store.
"""
import asyncio
import functools
import inspect
import logging
import threading
import time
import weakref

import pytest
from hypothesis import given, settings, strategies as st

import tinymq
from tinymq import Config, ExecutorConfig, Job, JobTimeout, Priority, Queue, RetryConfig, SQLitePersistence

from _helpers import QUIET, STORES, WAIT, GatedStore, Recorder, examples, record_failures, wait_until

NO_RETRY = RetryConfig(max_retries=0)


@pytest.fixture(params=STORES)
def make(request, tmp_path):
    """Build a Queue (with a SQLite store for the "sqlite" param); every queue is stopped at the end."""
    queues, stores = [], []

    def build(buffer_size=1000, **config):
        q = Queue(config=Config(buffer_size=buffer_size, **config))
        if request.param == "sqlite":
            store = SQLitePersistence(str(tmp_path / f"jobs-{len(stores)}.db"))
            stores.append(store)
            q.set_persistence(store)
        queues.append(q)
        return q

    build.stores = stores
    yield build
    for q in queues:
        q.stop(wait=False)
    for store in stores:
        store.close()


def failures(q):
    return record_failures(q, key=lambda job: job.payload)


def test_async_def_runs_on_the_loop_thread_not_a_worker(make):
    q = make()
    seen = Recorder()

    @q.executor("a")
    async def run(job):
        await asyncio.sleep(0)
        seen.add((job.payload, threading.current_thread().name, asyncio.get_running_loop()))

    q.start_dispatcher(workers=1)
    for i in range(3):
        q.enqueue(Job("a", i))
    assert q.join(WAIT)
    names = {name for _, name, _ in seen.items}
    loops = {loop for _, _, loop in seen.items}
    assert names == {"tinymq-loop"} and len(loops) == 1
    assert sorted(p for p, _, _ in seen.items) == [0, 1, 2]
    assert q.get_stats().jobs_succeeded == 3


def test_callables_returning_awaitables_are_async_executors(make):
    q = make()
    seen = Recorder()

    async def handler(tag, job):
        seen.add((tag, job.payload))

    class Handler:
        async def __call__(self, job, ctx):
            seen.add(("call", ctx.job.payload))

    def wrapping(fn):
        @functools.wraps(fn)
        async def wrapper(job):
            await fn(job)
        return wrapper

    q.register_executor("partial", functools.partial(handler, "partial"))
    q.register_executor("object", Handler())
    q.register_executor("wrapped", wrapping(functools.partial(handler, "wrapped")))
    q.start_dispatcher()
    for job_type in ("partial", "object", "wrapped"):
        q.enqueue(Job(job_type, job_type))
    assert q.join(WAIT)
    assert sorted(seen.items) == [("call", "object"), ("partial", "partial"), ("wrapped", "wrapped")]


def test_plain_functions_that_say_they_are_coroutine_functions_run_on_the_loop(make):
    """A sync def made by functools.wraps around an async def, or marked with
    inspect.markcoroutinefunction (3.12+), runs on the loop; a plain def on a worker thread
    (the registration's quick look at a plain function's code must not miss the first two)."""
    q = make()
    seen = Recorder()

    async def handler(job):
        seen.add((job.type, threading.current_thread().name))

    @functools.wraps(handler)
    def wrapped(job):
        return handler(job)

    def plain(job):
        seen.add((job.type, threading.current_thread().name))

    q.register_executor("wrapped", wrapped)
    q.register_executor("plain", plain)
    types_ = ["wrapped", "plain"]
    if hasattr(inspect, "markcoroutinefunction"):
        def marked(job):
            return handler(job)
        q.register_executor("marked", inspect.markcoroutinefunction(marked))
        types_.append("marked")
    q.start_dispatcher(workers=1)
    for job_type in types_:
        q.enqueue(Job(job_type))
    assert q.join(WAIT)
    threads = dict(seen.items)
    assert threads.pop("plain") != "tinymq-loop"
    assert threads == {job_type: "tinymq-loop" for job_type in types_ if job_type != "plain"}


def test_async_jobs_never_wait_for_a_worker_thread_nor_threads_for_the_loop(make):
    q = make()
    thread_started, release_thread = threading.Event(), threading.Event()
    async_done = Recorder()
    release_async = threading.Event()

    @q.executor("blocking")
    def blocking(job):
        thread_started.set()
        release_thread.wait(WAIT)

    @q.executor("a", max_concurrent_jobs=100)
    async def run(job):
        if job.payload == "hold":
            while not release_async.is_set():
                await asyncio.sleep(0.001)
        async_done.add(job.payload)

    q.start_dispatcher(workers=1)
    q.enqueue(Job("blocking"))
    assert thread_started.wait(WAIT)  # the only worker thread is busy
    q.enqueue(Job("a", "hold"))
    for i in range(20):
        q.enqueue(Job("a", i))
    assert async_done.wait_for(20)  # ran while the worker thread was held
    release_thread.set()
    q.enqueue(Job("blocking"))
    assert wait_until(lambda: q.get_stats().jobs_succeeded == 22)  # the loop holds "hold" meanwhile
    release_async.set()
    assert q.join(WAIT)


def test_max_concurrent_jobs_bounds_coroutines(make):
    q = make()
    running = [0]
    peak = [0]

    @q.executor("a", max_concurrent_jobs=3)
    async def run(job):
        running[0] += 1  # one loop thread: no lock needed
        peak[0] = max(peak[0], running[0])
        await asyncio.sleep(0.002)
        running[0] -= 1

    q.start_dispatcher()
    for i in range(60):
        q.enqueue(Job("a", i))
    assert q.join(WAIT)
    assert peak[0] == 3
    assert q.get_stats().executor_stats["a"].active_jobs == 0


@settings(max_examples=examples(15), deadline=None)
@given(st.lists(st.sampled_from([Priority.LOW, Priority.MEDIUM, Priority.HIGH]), min_size=1, max_size=25))
def test_strict_priority_and_fifo_when_a_slot_frees(priorities):
    order = []
    with Queue(100) as q:
        @q.executor("a", max_concurrent_jobs=1)
        async def run(job):
            order.append(job.payload)
            await asyncio.sleep(0)

        for i, priority in enumerate(priorities):
            q.enqueue(Job("a", i, priority=priority))
        q.start_dispatcher()
        assert q.join(WAIT)
    expected = sorted(range(len(priorities)), key=lambda i: (-priorities[i], i))
    assert order == expected


def test_retries_then_success(make):
    q = make()
    attempts = Recorder()

    @q.executor("a")
    async def run(job):
        attempts.add(job.retries)
        if job.retries < 2:
            raise ConnectionError("flaky")

    q.start_dispatcher()
    q.enqueue(Job("a", retry_config=RetryConfig(max_retries=3, initial_delay=0.001)))
    assert q.join(WAIT)
    assert attempts.items == [0, 1, 2]
    stats = q.get_stats()
    assert (stats.jobs_retried, stats.jobs_succeeded, stats.jobs_failed) == (2, 1, 0)


def test_timeout_cancels_the_task_and_frees_the_slot_after_unwinding(make):
    q = make()
    failed = failures(q)
    cancelled, unwinding, finish_unwinding = threading.Event(), threading.Event(), threading.Event()

    @q.executor("a", timeout=0.05, max_concurrent_jobs=1)
    async def run(job):
        try:
            await asyncio.sleep(WAIT)
        except asyncio.CancelledError:
            cancelled.set()
            unwinding.set()
            while not finish_unwinding.is_set():  # cleanup that takes a while, still cancellable
                await asyncio.sleep(0.001)
            raise

    q.start_dispatcher()
    q.enqueue(Job("a", "slow", retry_config=NO_RETRY))
    assert failed.wait_for(1)
    assert failed.items[0][1] == "retries_exhausted" and isinstance(failed.items[0][2], JobTimeout)
    assert cancelled.wait(WAIT) and unwinding.is_set()
    assert q.get_stats().executor_stats["a"].active_jobs == 1  # still unwinding: the slot is held
    finish_unwinding.set()
    assert wait_until(lambda: q.get_stats().executor_stats["a"].active_jobs == 0)
    assert q.get_stats().jobs_timed_out == 1


def test_a_coroutine_that_swallows_cancellation_keeps_its_slot_and_is_logged(make, caplog):
    q = make()
    failed = failures(q)
    returned = threading.Event()
    go_on = threading.Event()

    @q.executor("a", timeout=0.05, max_concurrent_jobs=1)
    async def run(job):
        if job.payload == "stubborn":
            try:
                await asyncio.sleep(WAIT)
            except asyncio.CancelledError:
                pass  # swallowed
            while not go_on.is_set():
                await asyncio.sleep(0.001)
            returned.set()

    q.start_dispatcher()
    with caplog.at_level(logging.WARNING, logger="tinymq"):
        q.enqueue(Job("a", "stubborn", retry_config=NO_RETRY))
        assert failed.wait_for(1)
        q.enqueue(Job("a", "next"))
        assert not wait_until(lambda: q.get_stats().jobs_succeeded, timeout=QUIET)  # slot held
        go_on.set()
        assert returned.wait(WAIT)
        assert q.join(WAIT)
    assert q.get_stats().jobs_succeeded == 1 and q.get_stats().jobs_failed == 1
    assert any("ignored its cancellation" in r.getMessage() and r.levelno == logging.WARNING
               for r in caplog.records)


def test_context_in_a_coroutine(make):
    q = make()
    seen = {}
    done = threading.Event()

    @q.executor("a", timeout=5.0)
    async def run(job, ctx):
        seen["deadline"] = ctx.deadline
        seen["remaining"] = ctx.remaining()
        seen["cancelled"] = ctx.cancelled
        ctx.check()
        seen["slept"] = await ctx.sleep(0.001)
        done.set()

    q.start_dispatcher()
    q.enqueue(Job("a"))
    assert done.wait(WAIT) and q.join(WAIT)
    assert seen["deadline"] is not None and 0.0 < seen["remaining"] <= 5.0
    assert seen["cancelled"] is False and seen["slept"] is False


def test_ctx_sleep_returns_true_after_cancellation(make):
    q = make()
    seen = Recorder()

    @q.executor("a", timeout=0.05)
    async def run(job, ctx):
        try:
            await ctx.sleep(WAIT)
        except asyncio.CancelledError:
            seen.add((ctx.cancelled, await asyncio.shield(ctx.sleep(WAIT))))
            raise

    q.start_dispatcher()
    q.enqueue(Job("a", retry_config=NO_RETRY))
    assert seen.wait_for(1)
    assert seen.items == [(True, True)]
    with pytest.raises(JobTimeout):
        ctx = tinymq.JobContext(Job("x"), None)
        ctx._cancel("test")
        ctx.check()


def test_stop_cancels_running_coroutines_after_the_grace_without_failures(make):
    q = make()
    failed = failures(q)
    started, cancelled = threading.Event(), threading.Event()

    @q.executor("a", timeout=None)
    async def run(job):
        started.set()
        try:
            await asyncio.sleep(WAIT * 10)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    q.start_dispatcher()
    job = q.enqueue(Job("a", "long"))
    assert started.wait(WAIT)
    q.stop(wait=True, timeout=0.1)
    assert cancelled.is_set()  # unwound before stop() returned
    stats = q.get_stats()
    assert (stats.jobs_failed, stats.jobs_retried, stats.jobs_succeeded) == (0, 0, 0)
    assert failed.items == []
    assert not any(t.name == "tinymq-loop" and t.is_alive() for t in threading.enumerate())
    if make.stores:  # saved back as ready for the next start
        assert [j.id for j in make.stores[0].load_all()] == [job.id]


def test_stop_waits_for_running_coroutines_within_the_grace(make):
    q = make()
    done = threading.Event()
    started = threading.Event()

    @q.executor("a")
    async def run(job):
        started.set()
        await asyncio.sleep(0.1)
        done.set()

    q.start_dispatcher()
    q.enqueue(Job("a"))
    assert started.wait(WAIT)
    q.stop(wait=True)
    assert done.is_set() and q.get_stats().jobs_succeeded == 1


def test_aenqueue_makes_no_closure_cells_on_its_path_into_the_core():
    """The per-job cost of ``await q.aenqueue(job)`` with no store: the closures of its path
    through the loop's default executor live in a coroutine of their own, so their cells
    (made at every call of the function that holds them) cost this path nothing."""
    assert Queue.aenqueue.__code__.co_cellvars == ()
    assert Queue.aenqueue.__code__.co_freevars == ()


def test_aenqueue_ajoin_astop_from_another_event_loop(make):
    q = make(buffer_size=2)
    ran = Recorder()
    gate = threading.Event()

    @q.executor("a", max_concurrent_jobs=1)
    async def run(job):
        while not gate.is_set():
            await asyncio.sleep(0.001)
        ran.add(job.payload)

    q.start_dispatcher()

    async def producer():
        ticks = 0

        async def ticker():  # runs while the producer waits for room: the loop is not blocked
            nonlocal ticks
            while True:
                ticks += 1
                if ticks == 5:
                    gate.set()  # only this lets the jobs, then the producer, go on
                await asyncio.sleep(0.001)

        tick_task = asyncio.ensure_future(ticker())
        for i in range(6):  # one running, two buffered: block=True waits for room off the loop
            await q.aenqueue(Job("a", i), block=True, timeout=WAIT)
        ticks_before_join = ticks
        assert await q.ajoin(WAIT)
        await q.astop()
        tick_task.cancel()
        return ticks_before_join

    assert asyncio.run(producer()) > 0
    assert sorted(ran.items) == list(range(6))
    with pytest.raises(tinymq.QueueStopped):
        asyncio.run(q.aenqueue(Job("a")))


def test_ajoin_and_stop_inside_an_async_executor(make):
    q = make()
    seen = Recorder()

    @q.executor("a")
    async def run(job):
        with pytest.raises(RuntimeError, match="wait for itself"):
            await q.ajoin()
        with pytest.raises(RuntimeError, match="wait for itself"):
            q.join(0.01)
        await q.astop()  # does not wait for itself
        seen.add("stopped")

    q.start_dispatcher()
    q.enqueue(Job("a"))
    assert seen.wait_for(1)
    assert wait_until(lambda: not any(t.name == "tinymq-loop" and t.is_alive() for t in threading.enumerate()))


def test_an_executor_returning_no_awaitable_fails_the_attempt(make):
    q = make()
    failed = failures(q)

    class Odd:
        async def __call__(self, job):
            return None

    odd = Odd()
    q.register_executor("a", odd)
    odd.__class__ = type("Sync", (), {"__call__": lambda self, job: 42})  # no awaitable any more
    q.start_dispatcher()
    q.enqueue(Job("a", "x", retry_config=NO_RETRY))
    assert failed.wait_for(1)
    assert failed.items[0][1] == "retries_exhausted" and isinstance(failed.items[0][2], TypeError)


def test_async_executors_with_the_thread_kind_share_buffer_and_stats(make):
    q = make(buffer_size=50)

    @q.executor("a", max_concurrent_jobs=4)
    async def run_async(job):
        await asyncio.sleep(0.001)

    @q.executor("t", max_concurrent_jobs=2)
    def run_thread(job):
        pass

    q.start_dispatcher(workers=2)
    for i in range(200):
        q.enqueue(Job("a" if i % 2 else "t", i), block=True, timeout=WAIT)
    assert q.join(WAIT)
    stats = q.get_stats()
    assert stats.jobs_succeeded == 200 and stats.jobs_enqueued == 200
    assert set(stats.executor_stats) == {"a", "t"}


def test_queued_jobs_move_to_the_loop_when_their_type_gets_an_async_executor(make):
    q = make()
    ran = Recorder()
    for i in range(3):
        q.enqueue(Job("late", i, priority=Priority(i % 3)))  # no executor yet: a worker's type
    q.register_executor("swapped", lambda job: ran.add(("thread", job.payload)))
    for i in range(3, 6):
        q.enqueue(Job("swapped", i))

    async def run(job):
        ran.add((threading.current_thread().name, job.payload))

    q.register_executor("late", run)
    q.register_executor("swapped", run)  # replaced before it ran: the queued jobs follow
    q.start_dispatcher()
    assert q.join(WAIT)
    assert sorted(ran.items, key=lambda item: item[1]) == [("tinymq-loop", i) for i in range(6)]


def test_every_attempt_times_out_at_its_own_deadline(make):
    q = make()
    failed = failures(q)
    ends = Recorder()

    async def stuck(job):
        try:
            await asyncio.sleep(WAIT)
        finally:
            ends.add(job.payload)

    q.register_executor("a", stuck, ExecutorConfig(max_concurrent_jobs=5, timeout=0.05))
    q.start_dispatcher()
    for i in range(5):
        q.enqueue(Job("a", i, retry_config=NO_RETRY))
    assert failed.wait_for(5)
    q.register_executor("a", stuck, ExecutorConfig(max_concurrent_jobs=5, timeout=0.3))
    q.register_executor("b", stuck, ExecutorConfig(timeout=0.05))
    q.enqueue(Job("a", "longer", retry_config=NO_RETRY))
    q.enqueue(Job("b", "other", retry_config=NO_RETRY))
    assert failed.wait_for(7) and q.join(WAIT) and ends.wait_for(7)  # cancelled, then unwound
    assert sorted(map(str, ends.items)) == sorted(map(str, [0, 1, 2, 3, 4, "longer", "other"]))
    assert [p for p, _, _ in failed.items][-2:] == ["other", "longer"]  # each by its own timeout
    assert all(isinstance(exc, JobTimeout) for _, _, exc in failed.items)
    assert q.get_stats().jobs_timed_out == 7


def test_a_short_timeout_started_after_a_long_one_is_not_kept_waiting_for_it(make):
    """The loop's one deadline timer: armed for a long timeout, it is re-armed for an earlier
    deadline; fired for an attempt that ended meanwhile, it is re-armed for the next one due."""
    q = make()
    failed = failures(q)
    ran = Recorder()
    started = threading.Event()

    async def stuck(job):
        ran.add(job.payload)
        if job.payload == "long":
            started.set()
        await asyncio.sleep(WAIT * 10)

    async def quick(job):
        ran.add(job.payload)

    q.register_executor("long", stuck, ExecutorConfig(timeout=WAIT * 10))
    q.register_executor("short", stuck, ExecutorConfig(timeout=0.2))
    q.register_executor("quick", quick, ExecutorConfig(timeout=0.2))
    q.start_dispatcher()
    long_job = q.enqueue(Job("long", "long", retry_config=NO_RETRY))
    assert started.wait(WAIT)
    q.enqueue(Job("quick", "quick", retry_config=NO_RETRY))  # arms the timer for itself, then ends
    assert ran.wait_for(2)
    begun = time.monotonic()
    q.enqueue(Job("short", "short", retry_config=NO_RETRY))
    assert failed.wait_for(1)
    assert time.monotonic() - begun < WAIT / 2  # not at the long job's deadline
    assert [(payload, reason) for payload, reason, _ in failed.items] == [("short", "retries_exhausted")]
    assert isinstance(failed.items[0][2], JobTimeout)
    assert q.cancel(long_job.id) and q.join(WAIT)
    assert q.get_stats().jobs_timed_out == 1


def test_an_attempt_started_on_an_idle_loop_runs_inside_a_task(make):
    """The idle loop's wake-up starts the attempt in the same pass, still inside the runner's
    task: current_task() is set, and what needs a task (wait_for, timeouts) works."""
    q = make()
    seen = Recorder()

    async def run(job):
        seen.add((job.payload, asyncio.current_task() is not None))
        await asyncio.wait_for(asyncio.sleep(0), WAIT)

    q.register_executor("a", run, ExecutorConfig(max_concurrent_jobs=2))
    q.start_dispatcher()
    for i in range(3):  # each one on an idle loop
        q.enqueue(Job("a", i, retry_config=NO_RETRY))
        assert q.join(WAIT)
    assert sorted(seen.items) == [(0, True), (1, True), (2, True)]
    stats = q.get_stats()
    assert (stats.jobs_succeeded, stats.jobs_failed) == (3, 0)


@pytest.mark.parametrize("kept", ["a bound method", "a weak reference"])
def test_a_cancel_of_the_task_an_attempt_ran_on_never_reaches_a_later_attempt(make, kept):
    """Runner tasks run attempt after attempt. An attempt that keeps a way to cancel "its task" (what
    a timer armed with ``loop.call_later(t, asyncio.current_task().cancel)`` holds), used once a later
    job runs: that job ran on the same task, and was cancelled (a failure, CancelledError)."""
    q = make()
    failed = failures(q)
    ran = Recorder()
    kept_by_the_first = []

    async def run(job):
        if job.payload == "first":
            task = asyncio.current_task()
            kept_by_the_first.append(task.cancel if kept == "a bound method" else weakref.ref(task))
            return
        released = asyncio.Event()

        def fire():  # the first attempt's timer, firing while this one runs
            way = kept_by_the_first[0]
            if kept == "a bound method":
                way()
            elif way() is not None:
                way().cancel()
            released.set()

        asyncio.get_running_loop().call_soon(fire)
        await released.wait()
        ran.add(job.payload)

    q.register_executor("a", run, ExecutorConfig(max_concurrent_jobs=1))  # one runner: the second job
    q.enqueue(Job("a", "first", retry_config=NO_RETRY))                    # comes to the first's
    q.enqueue(Job("a", "second", retry_config=NO_RETRY))
    q.start_dispatcher()
    assert q.join(WAIT)
    assert failed.items == []
    assert ran.items == ["second"]


def test_a_timer_an_attempt_armed_to_cancel_its_own_task_fires_into_no_later_attempt():
    """``loop.call_later(t, asyncio.current_task().cancel)``, the attempt returning before it fires:
    the next job, which its runner took at once, was cancelled by it."""
    q = Queue(10)
    failed = failures(q)
    ran = Recorder()
    released = []

    async def run(job):
        loop = asyncio.get_running_loop()
        if job.payload == "first":
            task = asyncio.current_task()
            released.append(asyncio.Event())

            def fire():  # a watchdog of the first attempt, left armed: it fires as the second runs
                task.cancel()
                released[0].set()

            loop.call_later(0, fire)
            return
        await released[0].wait()
        ran.add(job.payload)

    q.register_executor("a", run, ExecutorConfig(max_concurrent_jobs=1))
    q.enqueue(Job("a", "first", retry_config=NO_RETRY))
    q.enqueue(Job("a", "second", retry_config=NO_RETRY))
    q.start_dispatcher()
    try:
        assert q.join(WAIT)
    finally:
        q.stop()
    assert failed.items == []
    assert ran.items == ["second"]


def test_a_task_whose_attempt_asked_it_to_cancel_ends_cancelled_as_it_returns(make):
    """In asyncio, a cancel that a task's coroutine asks of that task and that has not come when it
    returns ends the task, cancelled. The attempt's runner task went on instead, running other jobs
    (and the cancel was taken from it by reading asyncio's private ``Task._must_cancel``)."""
    q = make()
    failed = failures(q)
    ended = Recorder()

    async def run(job):
        if job.payload == "first":
            task = asyncio.current_task()
            task.add_done_callback(lambda done: ended.add(done.cancelled()))
            task.cancel()  # and returns before the cancel comes
            return
        await asyncio.sleep(0)

    q.register_executor("a", run, ExecutorConfig(max_concurrent_jobs=1))
    q.enqueue(Job("a", "first", retry_config=NO_RETRY))
    q.enqueue(Job("a", "second", retry_config=NO_RETRY))
    q.start_dispatcher()
    assert q.join(WAIT)
    assert ended.wait_for(1)
    assert ended.items == [True]
    assert failed.items == []
    assert q.get_stats().jobs_succeeded == 2


class _AsyncioErrors(logging.Handler):
    """The records asyncio logs (a task destroyed pending, an exception never retrieved)."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_stop_without_waiting_leaves_no_task_pending_when_the_loop_closes():
    """stop(wait=False) with attempts in flight, one of whose coroutines ignores its cancellation
    until after stop() returned: the loop runs until every task it has ended, then closes, so
    asyncio never destroys a task pending (its "Task was destroyed but it is pending!")."""
    import gc

    started, released = threading.Event(), threading.Event()
    unwound = Recorder()

    async def quick(job):
        try:
            await asyncio.sleep(WAIT)
        finally:
            unwound.add(job.id)

    async def stubborn(job):
        started.set()
        while not released.is_set():
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                pass  # ignores its cancellation until released
        unwound.add(job.id)

    errors = _AsyncioErrors()
    asyncio_logger = logging.getLogger("asyncio")
    asyncio_logger.addHandler(errors)
    try:
        q = Queue(config=Config(buffer_size=100))
        q.register_executor("quick", quick)
        q.register_executor("stubborn", stubborn)
        q.start_dispatcher(workers=1)
        for i in range(3):
            q.enqueue(Job("quick", id=f"quick-{i}"))
        q.enqueue(Job("stubborn", id="stubborn"))
        assert started.wait(WAIT) and wait_until(lambda: q.get_stats().executor_stats["quick"].active_jobs == 3)
        runner = q._dispatcher.loop_runner
        try:
            q.stop(wait=False)
        finally:
            released.set()
        assert runner._thread_done.wait(WAIT), "the loop thread did not end after its last task"
        assert runner.loop.is_closed()
        del q, runner
        gc.collect()
        assert sorted(unwound.snapshot()) == ["quick-0", "quick-1", "quick-2", "stubborn"]
        assert not [m for m in errors.messages if "destroyed" in m], errors.messages
    finally:
        asyncio_logger.removeHandler(errors)


def test_an_aenqueue_cancelled_as_its_job_got_in_keeps_the_dead_job_of_that_id(tmp_path):
    """A job enqueued with a dead job's id replaces the dead row once it is accepted. An aenqueue
    cancelled while its save ran is taken back (the caller was told it enqueued nothing): the dead
    job it would have replaced stays, as when the buffer refuses a job (QueueFull)."""
    path = str(tmp_path / "jobs.db")
    with SQLitePersistence(path) as store:
        first = Queue(10)
        first.set_persistence(store)

        @first.executor("report")
        def fail(job):
            raise tinymq.PermanentFailure("the first try")

        first.start_dispatcher(1)
        first.enqueue(Job("report", id="report-12"))
        assert first.join(WAIT)
        first.stop()
        [dead] = store.dead_jobs()
        assert (dead.job.id, dead.reason) == ("report-12", "permanent_failure")

    store = GatedStore(path)
    q = Queue(10)
    q.set_persistence(store)
    ended = Recorder()
    q.on_failure(lambda job, reason, exc: ended.add((job.id, reason)))
    store.armed = True

    async def scenario():
        putter = asyncio.ensure_future(q.aenqueue(Job("report", id="report-12")))
        while not store.saving.is_set():
            await asyncio.sleep(0.001)
        putter.cancel()
        await asyncio.sleep(0)
        store.release.set()  # the save ends after the caller gave up: the job gets in, then is taken back
        with pytest.raises(asyncio.CancelledError):
            await putter

    try:
        asyncio.run(scenario())
        assert ended.snapshot() == [("report-12", "cancelled")]
        assert q.join(WAIT)
        [kept] = store.dead_jobs()
        assert (kept.job.id, kept.reason, kept.error) == ("report-12", "permanent_failure", dead.error)
        assert store.jobs() == []
    finally:
        q.stop()
        store.close()
