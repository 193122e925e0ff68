"""A callable that returns an awaitable: API.md "Async executors and cancellation".

``register_executor`` accepts async def functions and callables that return an awaitable;
"they run on an event loop that the queue owns ...; they do not occupy worker threads, so
``workers`` bounds only thread executors", and timeouts, cancel(), stop(), retries,
JobContext and stats apply as to an async def. A plain callable (``lambda job: work(job)``)
is known to return an awaitable only once called: its first call is made on a worker thread,
which hands the rest of the attempt (the awaitable, its deadline and context, the type's slot)
over to the loop and goes on at once (docs/api.md "Executors"). These tests check that such an
attempt behaves as an async def's in every respect, in memory, with a SQLite store and over a
RedisBroker (the suite runs them on both cores).
"""
import asyncio
import functools
import inspect
import sys
import threading

import pytest

from tinymq import Config, ExecutorConfig, Job, JobTimeout, Queue, RetryConfig, SQLitePersistence

from _backends import Redis
from _helpers import QUIET, WAIT, Recorder, record_failures, stored_payloads, wait_until

ONCE = RetryConfig(max_retries=0)


@pytest.fixture(params=["memory", "sqlite", "redis"])
def make(request, tmp_path):
    """``make(**config)``: a Queue in memory, with a SQLite store (``q.path``), or on a RedisBroker."""
    made = []
    redis = Redis(request.getfixturevalue("redis_url")) if request.param == "redis" else None

    def make_queue(**config):
        if redis is not None:
            q = redis.queue(**config)
        else:
            q = Queue(config=Config(**config))
        q.path = None
        if request.param == "sqlite":
            q.path = str(tmp_path / f"jobs{len(made)}.db")
            q.store = SQLitePersistence(q.path)
            q.set_persistence(q.store)
        made.append(q)
        return q

    make_queue.kind = request.param
    yield make_queue
    for q in made:
        q.stop(wait=False)
        if q.path is not None:
            q.store.close()
    if redis is not None:
        redis.close()


def type_counts(q, **expected):
    """Assert the counters of type "t" reach ``expected`` (they may be counted just after join()
    returns: over a broker, the shared counters; a slot, as the coroutine unwinds)."""
    def counts():
        stats = q.get_stats().executor_stats["t"]
        return {name: getattr(stats, name) for name in expected}
    wait_until(lambda: counts() == expected)
    assert counts() == expected


async def until(event, seconds=WAIT):
    """Wait on the loop, without blocking it, for a threading.Event set by the test."""
    for _ in range(int(seconds / 0.005)):
        if event.is_set():
            return True
        await asyncio.sleep(0.005)
    return event.is_set()


def test_a_plain_callable_is_called_on_a_worker_once_then_on_the_loop(make):
    """The first call, on a worker thread, finds the callable returns an awaitable; from then on
    its type's attempts are called on the loop, as an async def's (docs/api.md "Executors")."""
    q = make(buffer_size=10)
    callers = Recorder()

    async def body(job):
        callers.add(("body", threading.current_thread().name))

    def plain(job):
        callers.add(("call", threading.current_thread().name))
        return body(job)

    q.register_executor("t", plain)
    q.start_dispatcher(workers=1)
    for i in range(3):
        q.enqueue(Job("t", i))
        assert callers.wait_for(2 * (i + 1))
    assert q.join(WAIT)
    calls = [name for what, name in callers.snapshot() if what == "call"]
    bodies = [name for what, name in callers.snapshot() if what == "body"]
    assert calls[0].startswith("tinymq-worker") and calls[1:] == ["tinymq-loop"] * 2
    assert bodies == ["tinymq-loop"] * 3
    type_counts(q, succeeded=3, active_jobs=0)


async def _async_fn(job):
    job.payload.set()


class _AsyncCall:
    async def __call__(self, job):
        job.payload.set()


class _Worker:
    async def run(self, job):
        job.payload.set()


def _wrapped(fn):
    @functools.wraps(fn)
    def wrapper(job):
        return fn(job)
    return wrapper


@pytest.mark.parametrize("form", ["partial", "partial of a partial", "instance", "partial of an instance",
                                  "bound method", "wraps", pytest.param("marked", marks=pytest.mark.skipif(
                                      sys.version_info < (3, 12), reason="inspect.markcoroutinefunction: 3.12+"))])
def test_callables_known_to_be_async_at_registration_never_touch_a_worker(form):
    """What registration can tell (a partial, an object whose __call__ is an async def, a bound
    async method, a functools.wraps wrapper, a callable marked with inspect.markcoroutinefunction)
    runs on the loop from its first attempt: with the only worker thread busy until it has run,
    it runs."""
    if form == "marked":
        fn = inspect.markcoroutinefunction(lambda job: _async_fn(job))
    else:
        fn = {"partial": functools.partial(_async_fn),
              "partial of a partial": functools.partial(functools.partial(_async_fn)),
              "instance": _AsyncCall(),
              "partial of an instance": functools.partial(_AsyncCall()),
              "bound method": _Worker().run,
              "wraps": _wrapped(_async_fn)}[form]
    q = Queue(10)
    ran = threading.Event()
    q.register_executor("busy", lambda job: ran.wait(WAIT))
    q.register_executor("async", fn)
    q.start_dispatcher(workers=1)
    try:
        q.enqueue(Job("busy"))
        assert wait_until(lambda: q.get_stats().executor_stats["busy"].active_jobs == 1)
        q.enqueue(Job("async", ran))
        assert ran.wait(WAIT), f"{form}: called on the only worker thread, which is busy"
        assert q.join(WAIT)
    finally:
        q.stop(wait=False)


def test_workers_1_never_serialises_the_awaiting_jobs(make):
    """Many jobs of a callable returning an awaitable wait at once with one worker thread, and a
    thread executor's job runs meanwhile: none of them holds that thread while it awaits."""
    count = 6
    q = make(buffer_size=20)
    inside = Recorder()
    all_in, go, plain_ran = threading.Event(), threading.Event(), threading.Event()

    async def body(job):
        inside.add(job.payload)
        if len(inside) == count:
            all_in.set()
        assert await until(go)

    q.register_executor("t", lambda job: body(job), ExecutorConfig(max_concurrent_jobs=count))
    q.register_executor("plain", lambda job: plain_ran.set())
    q.start_dispatcher(workers=1)
    try:
        for i in range(count):
            q.enqueue(Job("t", i))
        assert all_in.wait(WAIT), f"only {inside.snapshot()} of {count} awaiting at once"
        q.enqueue(Job("plain"))
        assert plain_ran.wait(WAIT), "the only worker thread is held by an awaiting job"
        assert q.get_stats().executor_stats["t"].active_jobs == count
    finally:
        go.set()
    assert q.join(WAIT)
    type_counts(q, succeeded=count, active_jobs=0)


def test_its_timeout_cancels_the_task_and_the_slot_waits_for_the_unwinding(make):
    """At the timeout the task is cancelled (CancelledError inside, ctx.cancelled), the attempt
    fails with JobTimeout (counted timed out), and its slot is held until it has unwound."""
    q = make(buffer_size=10)
    failures = record_failures(q, key=lambda job: job.id)
    unwinding, release = threading.Event(), threading.Event()
    seen = Recorder()

    async def body(job, ctx):
        seen.add(("deadline", ctx.deadline is not None and 0.0 < ctx.remaining() <= 2.0))
        try:
            await asyncio.sleep(WAIT)
        except asyncio.CancelledError:
            seen.add(("cancelled", ctx.cancelled))
            unwinding.set()
            await until(release)
            raise

    q.register_executor("t", lambda job, ctx: body(job, ctx), ExecutorConfig(timeout=0.3, max_concurrent_jobs=1))
    q.start_dispatcher(workers=1)
    try:
        q.enqueue(Job("t", id="a", retry_config=ONCE))
        assert unwinding.wait(WAIT)
        assert failures.wait_for(1)  # failed at once, at its deadline ...
        assert q.get_stats().executor_stats["t"].active_jobs == 1  # ... its slot held while it unwinds
    finally:
        release.set()
    assert q.join(WAIT)
    type_counts(q, timed_out=1, failed=1, succeeded=0, active_jobs=0)
    assert seen.snapshot() == [("deadline", True), ("cancelled", True)]
    [(job_id, reason, exc)] = failures.snapshot()
    assert (job_id, reason) == ("a", "retries_exhausted") and isinstance(exc, JobTimeout)


def test_cancel_cancels_its_task_and_it_is_not_retried(make):
    """q.cancel(job_id) of a running handed-over attempt cancels its task; the job ends as
    "cancelled", counted, and is not retried."""
    q = make(buffer_size=10)
    failures = record_failures(q, key=lambda job: job.id)
    calls = Recorder()
    running, cancelled = threading.Event(), threading.Event()

    async def body(job):
        running.set()
        try:
            await asyncio.sleep(WAIT)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    def plain(job):
        calls.add(job.id)
        return body(job)

    q.register_executor("t", plain, ExecutorConfig(timeout=None))
    q.start_dispatcher(workers=1)
    q.enqueue(Job("t", id="c", retry_config=RetryConfig(max_retries=3)))
    assert running.wait(WAIT)
    assert q.cancel("c")
    assert cancelled.wait(WAIT)
    assert q.join(WAIT)
    assert failures.snapshot() == [("c", "cancelled", None)]
    assert calls.snapshot() == ["c"]
    assert q.get_stats().jobs_cancelled == 1
    # The job ended at its cancel; its slot is freed once the task has unwound, a moment later.
    type_counts(q, cancelled=1, retried=0, active_jobs=0)


def test_stop_waits_for_it_as_for_an_async_def(make):
    """stop(wait=True) waits for a running handed-over attempt, which succeeds."""
    q = make(buffer_size=10)
    running, go, stopped = threading.Event(), threading.Event(), threading.Event()

    async def body(job):
        running.set()
        assert await until(go)

    q.register_executor("t", lambda job: body(job))
    q.start_dispatcher(workers=1)
    q.enqueue(Job("t", id="s"))
    assert running.wait(WAIT)
    stopper = threading.Thread(target=lambda: (q.stop(wait=True), stopped.set()))
    stopper.start()
    try:
        assert wait_until(lambda: q._dispatcher.stopping)
        assert not stopped.wait(QUIET), "stop() did not wait for the running attempt"
    finally:
        go.set()
        stopper.join(WAIT)
    assert stopped.is_set()
    assert q.get_stats().jobs_succeeded == 1


def test_stop_with_a_timeout_cancels_it_and_it_is_no_failure(make):
    """stop(timeout=...) cancels a handed-over attempt still running: CancelledError inside, no
    failure counted or reported; a store keeps the job for the next start."""
    q = make(buffer_size=10)
    failures = record_failures(q, key=lambda job: job.id)
    running, cancelled = threading.Event(), threading.Event()

    async def body(job):
        running.set()
        try:
            await asyncio.sleep(WAIT)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    q.register_executor("t", lambda job: body(job), ExecutorConfig(timeout=None))
    q.start_dispatcher(workers=1)
    q.enqueue(Job("t", "kept", id="k"))
    assert running.wait(WAIT)
    q.stop(wait=True, timeout=0.2)
    assert cancelled.is_set()
    assert failures.snapshot() == []
    stats = q.get_stats()
    assert (stats.jobs_failed, stats.jobs_succeeded) == (0, 0)
    if q.path is not None:
        path, q.path = q.path, None
        q.store.close()
        assert stored_payloads(path) == ["kept"]


class _Later:
    """Not a coroutine: an object with ``__await__``, as a class called with the job returns it."""

    calls = None  # a Recorder of (payload, thread name) per call

    def __init__(self, job):
        self.job = job
        self.calls.add((job.payload, threading.current_thread().name))

    def __await__(self):
        return self._run().__await__()

    async def _run(self):
        if self.job.payload == "slow":
            await asyncio.sleep(WAIT)
        if self.job.payload == "fails":
            raise ValueError("fails")


def test_an_awaitable_that_is_not_a_coroutine(make):
    """A class whose instances have ``__await__`` (not coroutines) is such a callable: its first
    attempt is handed over from a worker, the later ones are called on the loop; its timeout
    cancels it, and its failure is retried."""
    q = make(buffer_size=10)
    failures = record_failures(q, key=lambda job: job.payload)
    _Later.calls = calls = Recorder()
    q.register_executor("t", _Later, ExecutorConfig(timeout=0.5))
    q.start_dispatcher(workers=1)
    q.enqueue(Job("t", "first"))
    assert calls.wait_for(1)
    assert q.join(WAIT)
    q.enqueue(Job("t", "slow", retry_config=ONCE))
    q.enqueue(Job("t", "fails", retry_config=RetryConfig(max_retries=1, initial_delay=0.01)))
    assert q.join(WAIT)
    threads = [name for _, name in calls.snapshot()]
    assert threads[0].startswith("tinymq-worker") and set(threads[1:]) == {"tinymq-loop"}
    assert sorted((payload, reason, type(exc)) for payload, reason, exc in failures.snapshot()) == [
        ("fails", "retries_exhausted", ValueError), ("slow", "retries_exhausted", JobTimeout)]
    type_counts(q, succeeded=1, timed_out=1, retried=1, failed=2, active_jobs=0)


def test_a_future_returned_on_the_loop_is_awaited_and_cancelled_at_its_timeout(make):
    """A callable that returns an asyncio future (on the loop: it was found to return awaitables
    on its first, handed-over, attempt) is awaited; at its timeout the future is cancelled."""
    q = make(buffer_size=10)
    failures = record_failures(q, key=lambda job: job.payload)
    futures = Recorder()

    async def first(job):
        pass

    def fn(job):
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # its first call, on a worker thread
            return first(job)
        future = loop.create_future()
        futures.add((job.payload, future))
        if job.payload == "done":
            loop.call_soon(future.set_result, None)
        return future

    q.register_executor("t", fn, ExecutorConfig(timeout=0.3))
    q.start_dispatcher(workers=1)
    q.enqueue(Job("t", "first"))
    assert q.join(WAIT)
    q.enqueue(Job("t", "done"))
    q.enqueue(Job("t", "never", retry_config=ONCE))
    assert q.join(WAIT)
    assert [(payload, reason, type(exc)) for payload, reason, exc in failures.snapshot()] == [
        ("never", "retries_exhausted", JobTimeout)]
    assert wait_until(lambda: all(future.done() for _, future in futures.snapshot()))
    assert sorted((payload, future.cancelled()) for payload, future in futures.snapshot()) == [
        ("done", False), ("never", True)]
    type_counts(q, succeeded=2, active_jobs=0)


def test_a_failed_handed_over_attempt_is_retried_on_the_loop(make):
    """Retries apply unchanged: the handed-over attempt fails, its retry (called on the loop)
    succeeds; stats count one retry and one success, and the context is the attempt's."""
    q = make(buffer_size=10)
    attempts = Recorder()

    async def body(job, ctx):
        attempts.add((threading.current_thread().name, ctx.job is job, ctx.deadline is not None))
        if len(attempts) == 1:
            raise ConnectionError("first attempt fails")

    q.register_executor("t", lambda job, ctx: body(job, ctx), ExecutorConfig(timeout=5.0))
    q.start_dispatcher(workers=1)
    q.enqueue(Job("t", retry_config=RetryConfig(max_retries=2, initial_delay=0.01)))
    assert q.join(WAIT)
    assert attempts.snapshot() == [("tinymq-loop", True, True)] * 2
    type_counts(q, retried=1, succeeded=1, failed=0, active_jobs=0)
