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


def no_retries(job):
    job.retry_config = RetryConfig(max_retries=0)
    return job


def run_one(q, job):
    payload = Payload()
    ref = weakref.ref(payload)
    job.payload = payload
    del payload
    return ref


@pytest.fixture
def q():
    made = tinymq.Queue(10)
    yield made
    made.stop(wait=False)


def test_a_worker_waiting_keeps_no_job_it_ran(q):
    q.register_executor("t", lambda job: job.payload)  # its result is the payload too
    q.start_dispatcher(2)
    job = Job("t", None)
    ref = run_one(q, job)
    q.enqueue(job)
    del job
    assert q.join(WAIT)
    freed_while_the_queue_runs(ref)


def test_a_worker_waiting_keeps_no_job_that_failed_with_a_traceback(q):
    def fail(job):
        payload = job.payload  # the traceback's frame holds it
        raise ValueError(f"cannot {payload!r}")

    q.register_executor("t", fail)
    q.start_dispatcher(2)
    job = no_retries(Job("t", None))
    ref = run_one(q, job)
    q.enqueue(job)
    del job
    assert q.join(WAIT)
    freed_while_the_queue_runs(ref)


def test_a_worker_waiting_keeps_no_job_it_ran_with_a_context(q):
    q.register_executor("t", lambda job, ctx: ctx.cancelled)
    q.start_dispatcher(2)
    job = Job("t", None)
    ref = run_one(q, job)
    q.enqueue(job)
    del job
    assert q.join(WAIT)
    freed_while_the_queue_runs(ref)


def test_the_scheduler_waiting_keeps_no_delayed_job_it_moved(q):
    q.register_executor("t", lambda job: None)
    q.start_dispatcher(2)
    job = Job("t", None)
    ref = run_one(q, job)
    q.enqueue_delayed(job, 0.02)
    del job
    assert q.join(WAIT)
    freed_while_the_queue_runs(ref)


def test_the_watchdog_waiting_keeps_no_job_it_timed_out(q):
    def slow(job, ctx):
        ctx.wait(WAIT)  # returns when the watchdog cancels it at its deadline

    q.register_executor("t", slow, ExecutorConfig(timeout=0.05))
    q.start_dispatcher(2)
    job = no_retries(Job("t", None))
    ref = run_one(q, job)
    q.enqueue(job)
    del job
    assert q.join(WAIT)
    freed_while_the_queue_runs(ref)
