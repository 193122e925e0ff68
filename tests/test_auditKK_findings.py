"""auditKK: statements of /work/shared/API.md (and the user docs) that the code does not keep.

Each test quotes the sentence it checks and what was observed. Queue-level tests run on
the core in use: the suite runs once on the compiled core and once with
TINYMQ_NO_EXTENSIONS=1 on the pure twin (.ci/run); every finding here fails on both.
Redis tests use the session's redis-server (marked ``redis`` by conftest).
"""
import asyncio
import threading
import time

import pytest

from tinymq import Job, QueueStopped, RetryConfig

from _backends import InProcess, Redis
from _helpers import QUIET, WAIT, make_queue, wait_until


@pytest.fixture(params=["inprocess", "redis"])
def backend(request):
    """The in-process queue, and (API.md "Scale-out": everything above holds across
    processes) a queue on a RedisBroker."""
    if request.param == "inprocess":
        made = InProcess()
    else:
        made = Redis(request.getfixturevalue("redis_url"))
    yield made
    made.close()


# --- Async executors and cancellation -------------------------------------------------------

def test_a_callable_returning_an_awaitable_never_occupies_a_worker_thread():
    """API.md "Async executors and cancellation": "register_executor ... accepts async def
    functions, and callables that return an awaitable. They run on an event loop that the
    queue owns ...; they do not occupy worker threads, so ``workers`` bounds only thread
    executors." (docs/api.md: "They never occupy a worker thread".)

    Observed (both cores): ``lambda job: coro(job)`` is taken for a thread executor at
    registration (tinymq/_event_loop.py:618 is_async_executor looks for coroutine functions
    only); its first attempt runs on a worker thread, and that worker then blocks on the
    awaitable until it has finished (tinymq/_dispatch.py:693 returned(): future.result()).
    With ``workers=1`` a thread executor's job waits for the whole coroutine."""
    with make_queue(buffer_size=10) as q:
        gate = threading.Event()
        awaiting = threading.Event()
        thread_job_ran = threading.Event()

        async def body(job):
            awaiting.set()
            await asyncio.get_running_loop().run_in_executor(None, gate.wait, WAIT)

        q.register_executor("awaitable", lambda job: body(job))
        q.register_executor("plain", lambda job: thread_job_ran.set())
        q.start_dispatcher(workers=1)
        try:
            q.enqueue(Job("awaitable"))
            assert awaiting.wait(WAIT)
            q.enqueue(Job("plain"))
            assert thread_job_ran.wait(WAIT / 2), (
                "the only worker thread is held while the awaitable-returning job awaits")
        finally:
            gate.set()
        assert q.join(WAIT)


# --- Queue: join() ----------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["thread", "async"])
def test_join_during_stop_waits_for_the_attempt_that_stop_lets_finish(kind):
    """API.md "Queue": "join(timeout=None) -> bool: block until every job enqueued so far ...
    has finished (succeeded or failed permanently); False on timeout." and "stop(wait=True,
    ...): ... let running attempts finish (when wait)".

    Observed (both cores, thread and async executors): while another thread's
    ``stop(wait=True)`` waits for a running attempt, ``join(WAIT)`` returns False at once,
    although that attempt then succeeds (jobs_succeeded == 1) and no job is left unfinished.
    docs/api.md says "False ... at once when the queue was stopped with jobs left"; here no
    job is left: the only one is running and stop() is waiting for it to finish."""
    with make_queue(buffer_size=10) as q:
        started = threading.Event()
        release = threading.Event()

        def thread_fn(job):
            started.set()
            release.wait(WAIT)

        async def async_fn(job):
            started.set()
            await asyncio.get_running_loop().run_in_executor(None, release.wait, WAIT)

        q.register_executor("job", thread_fn if kind == "thread" else async_fn)
        q.start_dispatcher()
        q.enqueue(Job("job"))
        assert started.wait(WAIT)
        stopper = threading.Thread(target=q.stop, kwargs={"wait": True})
        stopper.start()

        def refused():
            try:
                q.enqueue(Job("probe"))
            except QueueStopped:
                return True
            return False

        try:
            assert wait_until(refused)  # stop(wait=True) is under way, waiting for the attempt
            timer = threading.Timer(QUIET, release.set)  # the attempt ends a moment later
            timer.start()
            began = time.monotonic()
            finished = q.join(WAIT)
            waited = time.monotonic() - began
        finally:
            release.set()
            stopper.join(WAIT)
        assert q.get_stats().jobs_succeeded == 1  # the attempt did finish, successfully
        assert finished, f"join() returned False after {waited:.3f}s, before the attempt ended"
