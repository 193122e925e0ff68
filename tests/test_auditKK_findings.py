"""auditKK: statements of /work/shared/API.md (and the user docs) that the code does not keep.

Each test quotes the sentence it checks and what was observed. Queue-level tests run on
the core in use: the suite runs once on the compiled core and once with
TINYMQ_NO_EXTENSIONS=1 on the pure twin (.ci/run); every finding here failed on both before
its fix.
Redis tests use the session's redis-server (marked ``redis`` by conftest).
"""
import asyncio
import threading
import time

import pytest

from tinymq import ExecutorConfig, Job, Queue, RetryConfig

from _backends import InProcess, Redis
from _helpers import QUIET, WAIT, wait_until


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

def test_a_callable_returning_an_awaitable_never_occupies_a_worker_thread(backend):
    """API.md "Async executors and cancellation": "register_executor ... accepts async def
    functions, and callables that return an awaitable. They run on an event loop that the
    queue owns ...; they do not occupy worker threads, so ``workers`` bounds only thread
    executors." (docs/api.md: "They never occupy a worker thread".)

    Observed (both cores, in-process and over Redis): ``lambda job: coro(job)`` is taken for a
    thread executor at
    registration (tinymq/_event_loop.py:618 is_async_executor looks for coroutine functions
    only); its first attempt runs on a worker thread, and that worker then blocks on the
    awaitable until it has finished (tinymq/_dispatch.py:693 returned(): future.result()).
    With ``workers=1`` a thread executor's job waits for the whole coroutine."""
    q = backend.queue(buffer_size=10)
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
        assert thread_job_ran.wait(2.0), (
            "the only worker thread is held while the awaitable-returning job awaits")
    finally:
        gate.set()
    assert q.join(WAIT)


@pytest.mark.parametrize("how", ["timeout", "cancel"])
def test_an_awaitable_returned_by_a_callable_keeps_its_slot_until_it_has_unwound(how, backend):
    """API.md "Async executors and cancellation": callables that return an awaitable are
    accepted, and "max_concurrent_jobs, retries and every other rule apply unchanged"; "At an
    async executor's timeout its task is cancelled ...; the slot is freed when the coroutine
    has finished unwinding." "Concurrency limits": "the limit is never exceeded".

    Observed (both cores, in-process and over Redis, at a timeout and at q.cancel): for ``lambda
    job: body(job)`` with
    ``max_concurrent_jobs=1`` the type's slot is freed as soon as the awaitable is cancelled,
    while its coroutine is still unwinding: the next job of the type starts and two of its
    coroutines run at once. (An ``async def`` registered directly keeps the slot: correct.)
    Likely cause: tinymq/_dispatch.py:735 returned(): ``future.result()`` of
    run_coroutine_threadsafe raises CancelledError at once when _cancel_awaiting cancels the
    concurrent future, not when the task has unwound; the worker then frees the slot."""
    q = backend.queue(buffer_size=10)
    unwinding = threading.Event()
    release = threading.Event()
    started = {1: threading.Event(), 2: threading.Event()}

    async def body(job):
        started[job.payload].set()
        if job.payload == 2:
            return
        try:
            await asyncio.sleep(WAIT)
        except asyncio.CancelledError:
            unwinding.set()
            await asyncio.get_running_loop().run_in_executor(None, release.wait, WAIT)
            raise

    config = ExecutorConfig(max_concurrent_jobs=1, timeout=0.1 if how == "timeout" else None)
    q.register_executor("x", lambda job: body(job), config)
    q.start_dispatcher(workers=2)
    once = RetryConfig(max_retries=0)
    try:
        first = q.enqueue(Job("x", 1, retry_config=once))
        assert started[1].wait(WAIT)
        if how == "cancel":
            assert q.cancel(first.id)
        assert unwinding.wait(WAIT)
        q.enqueue(Job("x", 2, retry_config=once))
        assert not started[2].wait(QUIET), (
            "a second coroutine of a max_concurrent_jobs=1 type started while the first unwinds")
    finally:
        release.set()
    assert q.join(WAIT)


# --- Queue: join() ----------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["thread", "async"])
def test_join_during_stop_waits_for_the_attempt_that_stop_lets_finish(kind, backend):
    """API.md "Queue": "join(timeout=None) -> bool: block until every job enqueued so far ...
    has finished (succeeded or failed permanently); False on timeout." and "stop(wait=True,
    ...): ... let running attempts finish (when wait)".

    Observed (both cores, thread and async executors, in-process and over Redis, where
    API.md has join() wait "until the shared queue has no unfinished job"): while another thread's
    ``stop(wait=True)`` waits for a running attempt, ``join(WAIT)`` returns False at once,
    although that attempt then succeeds (jobs_succeeded == 1) and no job is left unfinished
    (over Redis it returns False as the attempt ends).
    docs/api.md says "False ... at once when the queue was stopped with jobs left"; here no
    job is left: the only one is running and stop() is waiting for it to finish.
    Likely cause: the ready structure's join() returns False as soon as it is closed while
    anything is unfinished, running attempts included (tinymq/_core_py.py:1327,
    tinymq/_core.pyx:1943); stop() closes it first (_dispatch.py:413) and only then waits."""
    q = backend.queue(buffer_size=10)
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

    try:
        # stop(wait=True) is under way, waiting for the attempt. (Not probed with an enqueue: a probe
        # accepted just before stop() closed the queue is a job stop() leaves, and join() says False.)
        assert wait_until(lambda: q._dispatcher.stopping)
        timer = threading.Timer(QUIET, release.set)  # the attempt ends a moment later
        timer.start()
        began = time.monotonic()
        finished = q.join(WAIT)
        waited = time.monotonic() - began
    finally:
        release.set()
        stopper.join(WAIT)
    assert q.get_stats().jobs_succeeded == 1  # the attempt did finish, successfully
    assert finished, f"join() returned False after {waited:.3f}s; its only job succeeded"


# --- Clocks and validation: join() that would wait for itself ---------------------------------

@pytest.mark.parametrize("where", ["executor", "failure callback"])
def test_ajoin_that_would_wait_for_itself_raises_instead_of_waiting(where, backend):
    """API.md "Clocks and validation": "Calling join() where it would wait for itself (inside
    an executor or a failure callback) raises RuntimeError instead of deadlocking."; "Async
    executors": ``await q.ajoin(timeout=None)`` is join() for async code.

    Observed (both cores, in-process and over Redis): a thread executor (or a failure callback)
    of the queue that runs
    async code (``asyncio.run(q.ajoin(...))``, e.g. through an async client library) waits
    for its own job: with a timeout it returns False when that runs out, with
    ``timeout=None`` it never returns (the worker deadlocks). Likely cause:
    tinymq/queue.py:762 ajoin() only refuses the queue's own event loop; the join() it runs
    in the loop's default executor (queue.py:769) is in a thread that is not the queue's, so
    join()'s check (_dispatch.py:347 waits_for_itself) does not see the executor behind it."""
    q = backend.queue(buffer_size=10)
    outcome = []

    def call_ajoin():
        try:
            outcome.append(asyncio.run(q.ajoin(timeout=1.0)))
        except RuntimeError as exc:
            outcome.append(exc)

    if where == "executor":
        q.register_executor("job", lambda job: call_ajoin())
        q.enqueue(Job("job"))
    else:
        q.on_failure(lambda job, reason, exc: call_ajoin())
        q.enqueue(Job("no-such-executor"))
    q.start_dispatcher()
    assert q.join(WAIT)
    assert len(outcome) == 1
    assert isinstance(outcome[0], RuntimeError), (
        f"ajoin() in the queue's own {where} returned {outcome[0]!r} after waiting for itself")


def test_astop_in_a_thread_executor_does_not_wait_for_its_own_attempt(backend):
    """API.md "Queue": "Every method is safe to call from any thread, executors included.";
    "Async executors": ``await q.astop(...)`` is stop() for async code. docs/api.md: "Called
    from an executor or a failure callback, ``stop()`` waits for neither the others nor another
    ``stop()`` (it would wait for itself)" (and ``astop`` in the queue's own coroutines "does
    not wait for the running attempts").

    Observed (both cores, in-process and over Redis): ``stop(wait=True)`` in a thread executor
    returns at once, but
    ``asyncio.run(q.astop(wait=True, timeout=2.0))`` there waits the whole 2 s for the very
    attempt that calls it (with ``timeout=None`` it never returns: the worker deadlocks).
    Likely cause: tinymq/queue.py:784 astop() runs _stop in the loop's default executor with
    on_own_loop False; that thread is not the queue's, so _dispatch.py:399 own_thread is False
    and stop() waits for every running attempt, its caller's included."""
    q = backend.queue(buffer_size=10)
    took = []

    def executor(job):
        began = time.monotonic()
        asyncio.run(q.astop(wait=True, timeout=2.0))
        took.append(time.monotonic() - began)

    q.register_executor("job", executor)
    q.start_dispatcher()
    q.enqueue(Job("job"))
    assert wait_until(lambda: took)
    assert took[0] < 1.0, f"astop() in the queue's own executor waited {took[0]:.2f}s for itself"


# --- Scale-out: buffer_size over a broker -------------------------------------------------------

def test_a_due_delayed_job_never_takes_a_full_buffer_past_buffer_size_over_redis(redis_url):
    """API.md "Queue": "``buffer_size`` caps the number of **ready** jobs of all priorities
    together."; "Delayed jobs": "A due job that finds the ready buffer full waits for room";
    "Scale-out": "Everything above holds across processes and hosts: ... ``buffer_size`` and
    ``max_delayed_jobs``".

    Observed (both cores): on a RedisBroker queue with ``buffer_size=1`` holding one ready
    job, a delayed job that comes due is counted ready too: ``medium_queue_size == 2`` (and
    ``waiting_for_room`` stays 0), where the in-process queue shows 1 ready and 1 waiting for
    room. docs/redis.md:53-56 describes this as intended ("Due delayed jobs, retries, and
    jobs given back ... always go in, even past the cap"), which API.md does not allow.
    Likely cause: promote_due (tinymq/redis/lib.lua:283) moves every due job to the ready
    lists whatever their length; stats.lua counts them there.

    Fixed: every script that moves a job into the ready lists keeps the cap; a due job
    without room waits in `delayed` and counts in ``waiting_for_room``; the fetch that takes
    the ready job moves it in (tests/test_redis_buffer_cap.py checks each path)."""
    backend = Redis(redis_url)
    try:
        q = backend.queue(buffer_size=1)
        ran = []
        q.register_executor("job", lambda job: ran.append(job.payload))
        q.enqueue(Job("job", "ready"))
        q.enqueue_delayed(Job("job", "due"), 0.05)
        assert wait_until(lambda: q.get_stats().delayed_jobs_count == 0)  # it is due now
        stats = q.get_stats()
        ready = stats.high_queue_size + stats.medium_queue_size + stats.low_queue_size
        assert ready <= 1, (f"{ready} ready jobs with buffer_size=1 "
                            f"(waiting_for_room={stats.waiting_for_room})")
        assert stats.waiting_for_room == 1, stats
        q.start_dispatcher()
        assert q.join(WAIT)  # the due job waited for room, and ran once there was some
        assert ran == ["ready", "due"]
    finally:
        backend.close()


# --- Clocks and validation: leaving `with Queue()` with a timed-out coroutine -----------------

def test_leaving_the_queue_never_waits_for_a_timed_out_coroutine():
    """API.md "Clocks and validation": "Attempts that already timed out are never waited
    for: leaving ``with Queue() as q:`` never hangs on a timed-out attempt." "Async
    executors": "max_concurrent_jobs, retries and every other rule apply unchanged".

    Observed (both cores): a thread attempt that timed out and runs on is not waited for
    (leaving takes ~0 s), but a coroutine that timed out and does not unwind (it keeps
    awaiting after the CancelledError; docs/api.md allows this: it "keeps its slot until it
    returns") makes the exit wait ~3 s: stop() waits _UNWIND_WAIT (1 s) for every attempt,
    decided ones included (tinymq/_dispatch.py:438 runner.wait_finished(...,
    undecided_only=False)), then up to 2 s for the loop thread
    (tinymq/_event_loop.py:603 self._thread_done.wait(_UNWIND_WAIT * 2))."""
    gate = threading.Event()
    timed_out = threading.Event()

    async def stubborn(job):
        while not gate.is_set():
            try:
                await asyncio.get_running_loop().run_in_executor(None, gate.wait, WAIT)
            except asyncio.CancelledError:
                continue  # keeps its slot until it returns

    try:
        with Queue(10) as q:
            q.register_executor("stubborn", stubborn, ExecutorConfig(timeout=0.1))
            q.on_failure(lambda job, reason, exc: timed_out.set())
            q.start_dispatcher()
            q.enqueue(Job("stubborn", retry_config=RetryConfig(max_retries=0)))
            assert timed_out.wait(WAIT)  # decided: retries_exhausted with JobTimeout
            began = time.monotonic()
        took = time.monotonic() - began
    finally:
        gate.set()
    assert took < 1.0, (
        f"leaving `with Queue()` waited {took:.2f}s for an attempt that had timed out")


# --- Clocks and validation: interpreter exit with async executors and a store -----------------

_EXIT_SCRIPT = r'''
import asyncio, sys, threading
from tinymq import ExecutorConfig, Job, PermanentFailure, Queue, SQLitePersistence
q = Queue(50)
q.set_persistence(SQLitePersistence(sys.argv[1]))
started = threading.Semaphore(0)
async def work(job):
    started.release()
    await asyncio.sleep(0.3)
    print(f"finished {job.payload}", flush=True)  # one write: the callback prints from another thread
    if sys.argv[2] == "fails":
        raise PermanentFailure("late")
q.register_executor("work", work, ExecutorConfig(max_concurrent_jobs=2, timeout=10))
q.on_failure(lambda job, reason, exc: print(f"reported {job.payload} {reason}", flush=True))
q.start_dispatcher()
for i in range(4):
    q.enqueue(Job("work", i))
assert started.acquire(timeout=10) and started.acquire(timeout=10)  # both running (2 at a time)
print("exiting", flush=True)
'''


@pytest.mark.parametrize("outcome", ["succeeds", "fails"])
def test_async_attempts_that_finish_at_interpreter_exit_are_recorded(tmp_path, outcome):
    """API.md "Clocks and validation": "A queue still running at interpreter exit is stopped
    like ``stop(wait=True)``: running attempts within their deadline finish."; "Persistence":
    "``delete`` is called when a job has finished"; "Failures are never silent" (logged on
    the ``tinymq`` logger).

    Observed (both cores): with a SQLite store and an async executor, the two coroutines
    running at exit finish (they print), but their success is never written: both rows stay
    "running" in the store (so the next start runs them again, as crashed attempts), and the
    loop's runner tasks die with ``RuntimeError('cannot schedule new futures after
    shutdown')``, reported only by asyncio ("Task exception was never retrieved" on stderr).
    The same script with a thread executor, or with an explicit ``q.stop()`` before the end,
    leaves only the 2 unrun jobs, "ready". When the attempts fail (PermanentFailure) instead,
    the failure is neither reported to ``on_failure`` nor logged, and the rows stay "running"
    too (not deleted or kept dead). Likely cause: concurrent.futures.thread is first
    imported when the loop runner builds its ``tinymq-io`` pool (tinymq/_event_loop.py:159),
    after tinymq registered its exit hook (tinymq/_dispatch.py:133), so its own
    ``_python_exit`` runs first (threading runs those hooks last-registered first) and shuts
    every pool before tinymq's stop(wait=True) writes the outcomes through it (confirmed: the
    same script with ``import concurrent.futures.thread`` first leaves 0 "running")."""
    import os
    import subprocess
    import sys

    from tinymq import SQLitePersistence

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=path)
    db = str(tmp_path / "jobs.db")
    result = subprocess.run([sys.executable, "-c", _EXIT_SCRIPT, db, outcome], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "finished 0" in result.stdout and "finished 1" in result.stdout, result.stdout
    with SQLitePersistence(db, read_only=True) as view:
        counts = view.counts()
        left = sorted(job.payload for job in view.jobs())
    if outcome == "fails":
        assert "reported 0 permanent_failure" in result.stdout, (
            f"a failure at exit was never reported:\n{result.stdout}\n{result.stderr[-1500:]}")
    assert "Task exception was never retrieved" not in result.stderr, result.stderr[-2000:]
    assert (counts["running"], left) == (0, [2, 3]), (
        f"after exit the store holds {counts} with payloads {left}: the attempts that "
        "finished at exit were not recorded")


@pytest.mark.parametrize("outcome", ["succeeds", "fails"])
def test_an_async_outcome_is_recorded_when_no_io_thread_can_be_started(tmp_path, outcome):
    """The cause of the exit test above failing about 1 run in 7 on Python 3.12.1: at
    interpreter exit that Python refuses new threads ("can't create new thread at interpreter
    shutdown"), and an async attempt's outcome, written off the loop through the tinymq-io pool,
    died with the loop's runner task when the pool needed a thread: its store row stayed
    "running" and a failure went unreported. Here the pool refuses as 3.12.1 does, from the
    moment the attempt runs. Fix: the outcome is then written on the loop's own thread."""
    from tinymq import PermanentFailure, SQLitePersistence

    db = str(tmp_path / "jobs.db")
    q = Queue()
    q.set_persistence(SQLitePersistence(db))
    running, release, reported = threading.Event(), threading.Event(), []
    q.on_failure(lambda job, reason, error: reported.append(reason))

    async def work(job):
        running.set()
        await asyncio.get_running_loop().run_in_executor(None, release.wait)
        if outcome == "fails":
            raise PermanentFailure("no")

    q.register_executor("work", work)
    q.start_dispatcher()
    try:
        q.enqueue(Job("work", 1))
        assert running.wait(WAIT)

        def refuse(*args, **kwargs):
            raise RuntimeError("can't create new thread at interpreter shutdown")

        q._dispatcher.loop_runner._io.submit = refuse
        release.set()
        assert q.join(WAIT)
        assert reported == ([] if outcome == "succeeds" else ["permanent_failure"])
    finally:
        q.stop()
    with SQLitePersistence(db, read_only=True) as view:
        assert view.counts()["running"] == 0
