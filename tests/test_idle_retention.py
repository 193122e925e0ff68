"""A running queue keeps no finished job alive (found by a CI failure of attackG's cycle test
on Python 3.13: the scheduler thread, sleeping, still held the last delayed job it had moved).

A worker waiting for the next job held the last one it ran (its payload, its result, its
exception and traceback) in the loop's locals until another job came; the scheduler held
the last delayed job it made ready, the watchdog the last one it timed out. A job with a
large payload stayed in memory for as long as the queue was idle. Both cores.
"""
import gc
import time
import weakref

import pytest

import tinymq
from tinymq import ExecutorConfig, Job, RetryConfig

from _helpers import WAIT


class Payload:
    """Stands for a big payload: what the test watches being freed."""


def freed_while_the_queue_runs(ref):
    deadline = time.monotonic() + WAIT
    while True:
        gc.collect()
        if ref() is None:
            return
        assert time.monotonic() < deadline, "a finished job's payload is still alive in an idle queue"
        time.sleep(0.01)


def run_and_forget(q, executor, config=None, max_retries=3, delay=None):
    """Run one job whose payload is watched through ``executor`` to its end, keeping nothing
    of it here; the weak reference to its payload."""
    q.register_executor("t", executor, config or ExecutorConfig())
    q.start_dispatcher(2)
    payload = Payload()
    ref = weakref.ref(payload)
    job = Job("t", payload, retry_config=RetryConfig(max_retries=max_retries))
    del payload
    if delay is None:
        q.enqueue(job)
    else:
        q.enqueue_delayed(job, delay)
    del job
    assert q.join(WAIT)
    return ref


@pytest.fixture
def q():
    made = tinymq.Queue(10)
    yield made
    made.stop(wait=False)


def test_a_worker_waiting_keeps_no_job_it_ran(q):
    freed_while_the_queue_runs(run_and_forget(q, lambda job: job.payload))  # its result is the payload too


def test_a_worker_waiting_keeps_no_job_that_failed_with_a_traceback(q):
    def fail(job):
        payload = job.payload  # the traceback's frame holds it
        raise ValueError(f"cannot {payload!r}")

    freed_while_the_queue_runs(run_and_forget(q, fail, max_retries=0))


def test_a_worker_waiting_keeps_no_job_it_ran_with_a_context(q):
    freed_while_the_queue_runs(run_and_forget(q, lambda job, ctx: ctx.cancelled))


def test_the_scheduler_waiting_keeps_no_delayed_job_it_moved(q):
    freed_while_the_queue_runs(run_and_forget(q, lambda job: None, delay=0.02))


def test_the_watchdog_waiting_keeps_no_job_it_timed_out(q):
    def slow(job, ctx):
        ctx.wait(WAIT)  # returns when the watchdog cancels it at its deadline

    freed_while_the_queue_runs(run_and_forget(q, slow, ExecutorConfig(timeout=0.05), max_retries=0))
