"""Defects found by an outside attack (session 31) on the in-process queue: the hand-over of a
plain callable's awaitable to the loop, and a process forked from one that runs a queue."""
import os
import subprocess
import types
import sys
from pathlib import Path

import pytest

import tinymq
from tinymq import ExecutorConfig, Job, Queue, RetryConfig

from _helpers import WAIT, record_failures

ROOT = Path(tinymq.__file__).resolve().parent.parent
TIMEOUT = 60  # seconds for a script whose work takes about one


def run_python(script):
    """``python -c script`` with this checkout's tinymq; the finished process (text output)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-c", script], env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=TIMEOUT)


# --- 1. A job accepted by a forked child's copy of a started queue ---------------------------------

# In a process fork()ed from one whose started queue runs, enqueue() returned and the job never ran:
# none of the queue's threads is in the child, and stop() there (or its exit) waits for nothing and
# writes nothing, so the job was dropped without a word, and a join() there waited for it for ever.
# The copy of a started queue now refuses jobs from the fork on (QueueStopped), as a stopped queue does.
ENQUEUE_IN_A_FORKED_CHILD = r"""
import os, sys, time
from tinymq import Job, Queue, QueueStopped
q = Queue(100)
q.register_executor("t", lambda job: None)
q.start_dispatcher(workers=1)
q.enqueue(Job("t"))
assert q.join(30)
pid = os.fork()
if pid == 0:
    for enqueue in (lambda: q.enqueue(Job("t")), lambda: q.enqueue_delayed(Job("t"), 0.01),
                    lambda: q.enqueue_many([Job("t")])):
        try:
            enqueue()
        except QueueStopped:
            pass
        else:
            print("accepted in the child", flush=True)
            os._exit(3)
    started = time.monotonic()
    q.join(10)
    os._exit(0 if time.monotonic() - started < 5 else 4)
_, status = os.waitpid(pid, 0)
q.enqueue(Job("t"))  # the parent's queue goes on
assert q.join(30)
q.stop()
print("child exit", os.waitstatus_to_exitcode(status))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork")
def test_a_forked_childs_copy_of_a_started_queue_refuses_jobs():
    done = run_python(ENQUEUE_IN_A_FORKED_CHILD)
    assert done.returncode == 0, done.stderr
    assert "child exit 0" in done.stdout, done.stdout + done.stderr


# --- 2. A plain callable's return that is no awaitable, once its attempts run on the loop -----------

# A plain function's return value means nothing: returning is success. Once it had returned an
# awaitable (its type's attempts then called on the loop), a return of anything but None or an
# awaitable failed the attempt with TypeError ("returned 42, not an awaitable"), retried and reported
# as retries_exhausted: the same function and the same return value succeeded in a worker thread
# (its first call) and failed on the loop (every later one). It succeeds there too now; a generator
# still fails (its body would never run).
async def _awaited(job):
    pass


def _sometimes_awaitable(job):
    """A plain function (lambda job: client.send(job) if ... else cache.setdefault(...)) that returns
    an awaitable for some jobs and a plain value for others."""
    if job.payload == "awaitable":
        return _awaited(job)
    if job.payload == "generator":
        return (x for x in ())
    return 42


def test_a_plain_callables_plain_return_is_a_success_on_the_loop_too():
    q = Queue(10)
    failures = record_failures(q)
    q.register_executor("t", _sometimes_awaitable, ExecutorConfig(timeout=WAIT))
    q.start_dispatcher(workers=1)
    try:
        for payload in ("value", "awaitable", "value", "awaitable"):  # the first two in a worker thread
            q.enqueue(Job("t", payload, retry_config=RetryConfig(max_retries=0)))
            assert q.join(WAIT)
        stats = q.get_stats()
        assert (stats.jobs_succeeded, stats.jobs_failed) == (4, 0), failures.snapshot()
        q.enqueue(Job("t", "generator", retry_config=RetryConfig(max_retries=0)))  # on the loop
        assert q.join(WAIT)
        assert q.get_stats().jobs_failed == 1
        assert [(job.payload, reason, type(exc)) for job, reason, exc in failures.snapshot()] == [
            ("generator", "retries_exhausted", TypeError)]
    finally:
        q.stop()


# --- 3. A generator-based coroutine returned by a plain callable -----------------------------------

# A generator made by a @types.coroutine function is an awaitable (inspect.isawaitable, ``await``
# takes it), and on the loop it was awaited; returned by a plain callable's first call, in a worker
# thread, it failed the attempt with TypeError ("returned a generator ... or return an awaitable").
@types.coroutine
def _legacy_coroutine():
    yield  # (a bare yield inside a coroutine: one pass of the loop)
    return "done"


def test_a_generator_based_coroutine_returned_by_a_plain_callable_is_awaited():
    q = Queue(10)
    failures = record_failures(q)
    q.register_executor("t", lambda job: _legacy_coroutine())
    q.start_dispatcher(workers=1)
    try:
        for _ in range(2):  # in a worker thread, then on the loop
            q.enqueue(Job("t", retry_config=RetryConfig(max_retries=0)))
            assert q.join(WAIT)
        assert q.get_stats().jobs_succeeded == 2, failures.snapshot()
    finally:
        q.stop()


@types.coroutine
def _legacy_executor(job):
    yield
    job.payload.append("ran")


def test_a_types_coroutine_function_is_accepted_as_an_executor():
    """Registering a @types.coroutine function was refused as "a generator function (calling it
    would only create a generator, never run its body)": what it makes is an awaitable."""
    q = Queue(10)
    q.register_executor("t", _legacy_executor)
    q.start_dispatcher(workers=1)
    try:
        ran = []
        for _ in range(2):
            q.enqueue(Job("t", ran, retry_config=RetryConfig(max_retries=0)))
            assert q.join(WAIT)
        assert ran == ["ran", "ran"] and q.get_stats().jobs_succeeded == 2
    finally:
        q.stop()


# --- 4. A process forked while the queue's threads are inside its locks --------------------------

# A lock that a thread of the parent held at the fork (the pure core's, taken by a worker for each
# job; the dispatcher's) is never released in the child, where that thread does not exist. A child
# fork()ed from a busy queue then hung, at its interpreter exit (the queue's exit hook: stop(), the
# pure core's close()), in get_stats(), in join() (after a stop() there: waiting for a stop() that
# ends only in the parent), or in enqueue(): about one fork in ten with the pure core. The fork
# hook makes those locks free again in the child; its queue's copy refuses jobs and waits for nothing.
FORK_A_BUSY_QUEUE = r"""
import asyncio, faulthandler, os, sys, threading
from tinymq import Job, Queue, QueueStopped
q = Queue(1000)
q.register_executor("t", lambda job: None)
async def run_async(job):
    pass
q.register_executor("a", run_async)
q.start_dispatcher(workers=3)
producing = True
def produce():
    while producing:
        q.enqueue(Job("t"), block=True)
        q.enqueue(Job("a"), block=True)
        q.enqueue_delayed(Job("t"), 0.001)
producer = threading.Thread(target=produce)
producer.start()
codes = {}
for _ in range(int(sys.argv[1])):
    pid = os.fork()
    if pid == 0:
        faulthandler.dump_traceback_later(10, exit=True)  # a hung child: exit code 1
        try:
            q.enqueue(Job("t"))
            os._exit(3)
        except QueueStopped:
            pass
        q.get_stats()
        q.cancel("no such job")
        q.stop()
        q.join()
        sys.exit(0)  # the interpreter's exit (the queue's exit hook)
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    codes[code] = codes.get(code, 0) + 1
producing = False
producer.join()
assert q.join(60)
q.stop()
print("child exit codes", codes)
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork")
def test_a_child_forked_from_a_busy_queue_ends():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-c", FORK_A_BUSY_QUEUE, "60"], env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "child exit codes {0: 60}" in done.stdout, done.stdout + done.stderr[-3000:]
