"""A defect another helper found in session 33 (fixed by fix33t): after an interrupted attempt,
every traced call in the process hung on CPython 3.11.

``ExecutorConfig(interrupt_on_timeout=True)`` raises JobTimeout into a worker thread
(``PyThreadState_SetAsyncExc``); as the attempt ended, tinymq cleared one still pending with
``PyThreadState_SetAsyncExc(thread_id, NULL)``. On CPython 3.11 that clear signals the
interpreter's eval breaker, and only a thread handling an async exception unsignals it: it
stayed set, and from then on any function called under ``sys.settrace`` (a debugger, coverage)
spun forever at its first line. The worker now drops its own interruption by raising a private
exception into itself and handling it at once (``drop_own_interruption``, in both cores).

The hang takes the whole interpreter, so each case runs in a child process, on this
interpreter and the core under test; the parent bounds it with a generous timeout.
"""
import os
import subprocess
import sys
import threading

import pytest

import tinymq

from _helpers import WAIT

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(tinymq.__file__)))
CHILD_TIMEOUT = 60.0  # seconds: a child that hangs is killed and the test fails
MARKER = "traced call returned"

# The child: an executor with interrupt_on_timeout=True times out and is interrupted, in the way
# its argv names; once the attempt has returned and the queue stopped, a traced call must return.
CHILD = r"""
import queue, sys, threading, time
import tinymq
from tinymq import ExecutorConfig, Job, JobTimeout, Queue, RetryConfig

expect_extension, how = sys.argv[1] == "compiled", sys.argv[2]
assert tinymq.HAS_EXTENSION == expect_extension, (tinymq.HAS_EXTENSION, tinymq.__file__)
WAIT = float(sys.argv[3])

thread_errors = []
threading.excepthook = lambda args: thread_errors.append(repr(args.exc_value))  # a JobTimeout landing late
handed = queue.SimpleQueue()
ran_out = threading.Event()
if how == "lands_inside":  # Python bytecode: JobTimeout lands inside the executor
    def executor(job):
        give_up = time.monotonic() + WAIT
        while time.monotonic() < give_up:
            pass
        ran_out.set()  # never interrupted
else:  # "pending_at_return": a C call, returning straight to the worker with JobTimeout still pending
    executor = handed.get  # (called as handed.get(job), block=job: it waits for an item)

failed = threading.Event()
errors = []
q = Queue(10)
q.on_failure(lambda job, reason, exc: (errors.append(exc), failed.set()))
q.register_executor("t", executor, ExecutorConfig(timeout=0.2, interrupt_on_timeout=True))
q.start_dispatcher(1)
q.enqueue(Job("t", retry_config=RetryConfig(max_retries=0)))
assert failed.wait(WAIT) and isinstance(errors[0], JobTimeout), errors  # decided, JobTimeout raised into it
handed.put("go")  # (pending_at_return: its function returns now, past its deadline)
give_up = time.monotonic() + 2 * WAIT
while q.get_stats().executor_stats["t"].active_jobs:  # its slot is freed once the attempt returned
    assert time.monotonic() < give_up, "the interrupted attempt never returned"
    time.sleep(0.01)
assert not ran_out.is_set(), "the executor was never interrupted"
q.stop()

def traced():
    return 1

sys.settrace(lambda *args: None)  # as a debugger or coverage does
traced()
sys.settrace(None)
print("traced call returned", flush=True)
assert thread_errors == [], thread_errors
"""


def _run_child(core, how):
    compiled = core.__name__ == "tinymq._core"
    env = dict(os.environ, PYTHONPATH=ROOT, TINYMQ_NO_EXTENSIONS="0" if compiled else "1",
               TINYMQ_REQUIRE_EXTENSIONS="1" if compiled else "0")
    try:
        child = subprocess.run(
            [sys.executable, "-c", CHILD, "compiled" if compiled else "pure", how, str(WAIT)],
            env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=CHILD_TIMEOUT)
    except subprocess.TimeoutExpired as hung:
        pytest.fail(f"the child hung: a traced call after an interrupted attempt never returned "
                    f"(stdout {hung.stdout!r}, stderr {hung.stderr!r})")
    assert child.returncode == 0, child.stderr
    assert MARKER in child.stdout, (child.stdout, child.stderr)


def test_a_traced_call_returns_after_job_timeout_landed_inside_the_executor(core):
    _run_child(core, "lands_inside")


def test_a_traced_call_returns_after_an_attempt_returned_with_its_interruption_pending(core):
    _run_child(core, "pending_at_return")


CHILD_DROP = r"""
import importlib, sys, threading
core = importlib.import_module(sys.argv[1])
thread = threading.Thread(target=core.drop_own_interruption)  # nothing pending: a no-op
thread.start()
thread.join()

def traced():
    return 1

sys.settrace(lambda *args: None)
traced()
sys.settrace(None)
print("traced call returned", flush=True)
"""


def test_drop_own_interruption_with_nothing_pending_leaves_traced_calls_alone(core):
    """What the cores' old clear did (SetAsyncExc with NULL, nothing pending) hung 3.11 here."""
    compiled = core.__name__ == "tinymq._core"
    env = dict(os.environ, PYTHONPATH=ROOT, TINYMQ_NO_EXTENSIONS="0" if compiled else "1")
    try:
        child = subprocess.run([sys.executable, "-c", CHILD_DROP, core.__name__], env=env,
                               stdin=subprocess.DEVNULL, capture_output=True, text=True,
                               timeout=CHILD_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail("a traced call hung after drop_own_interruption()")
    assert child.returncode == 0, child.stderr
    assert MARKER in child.stdout


def test_drop_own_interruption_raises_nothing_now_or_later(core):
    """Its own exception is handled inside it: nothing reaches the caller, nothing lands later."""
    outcome = []

    def worker():
        try:
            for _ in range(200):
                core.drop_own_interruption()
                for _ in range(1000):  # bytecode where anything still pending would land
                    pass
            outcome.append("clean")
        except BaseException as exc:  # pragma: no cover - the defect
            outcome.append(exc)

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    thread.join(WAIT)
    assert outcome == ["clean"]
