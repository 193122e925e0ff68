"""Findings of attackPP: tinymq's own code around an attempt must not end a worker thread or leave a job stuck.

API.md "Failures are never silent" and "Scale-out": every accepted job runs or is reported to
the failure callbacks, join() returns, and an exception in tinymq's own code (not the user's
executor) never ends the thread that hit it with a job unfinished.
"""
import threading

import pytest

from tinymq import ExecutorConfig, Job, RetryConfig

from _helpers import WAIT, Recorder, record_failures, wait_until, worker_threads as _worker_threads


def _fails_bad(ran):
    """An executor that records (payload, its thread) in ``ran`` and raises for the payload "bad"."""
    def run(job):
        ran.add((job.payload, threading.current_thread()))
        if job.payload == "bad":
            raise ValueError("boom")
    return run


def _one_worker_ran_both(q, ran):
    """The failing job and the next one ran on the same worker, which lives on; one failed, one
    succeeded, and the type's slot is free."""
    (_, first), (_, second) = ran.snapshot()
    assert first is second and first.is_alive()  # the same worker ran on
    stats = q.get_stats()
    assert (stats.jobs_failed, stats.jobs_succeeded) == (1, 1)
    assert stats.executor_stats["t"].active_jobs == 0


def test_redis_a_job_whose_executor_set_retries_to_none_fails_and_the_queue_goes_on(redis_backend):
    """An executor that sets ``job.retries = None`` and raises: in-process the job fails for good
    (its retry cannot be counted); over Redis the dead op carried the None, which the client cannot
    send, so the worker thread died with it, and the pump after it (the process let its id go:
    the job came back only after the lease, as a crash). Now it is reported as in-process, by the
    worker that ran it, which goes on to run the next job."""
    q = redis_backend.queue()
    failures = record_failures(q, key=lambda job: job.payload)
    ran = Recorder()

    def run(job):
        ran.add((job.payload, threading.current_thread()))
        if job.payload == "odd":
            job.retries = None
            raise ValueError("boom")

    q.register_executor("t", run)
    q.start_dispatcher(1)
    q.enqueue(Job("t", "odd", retry_config=RetryConfig(max_retries=5, initial_delay=0.0)))
    assert failures.wait_for(1)
    q.enqueue(Job("t", "next"))
    assert q.join(WAIT)
    [(payload, reason, exc)] = failures.snapshot()
    assert (payload, reason) == ("odd", "retries_exhausted")
    assert isinstance(exc, TypeError)  # (its retry could not be counted)
    _one_worker_ran_both(q, ran)
    [dead] = q.broker.dead_jobs()
    assert (dead.job.payload, dead.reason) == ("odd", "retries_exhausted")


def test_redis_cancel_of_a_running_job_whose_executor_set_last_error_to_a_number(redis_backend):
    """An executor sets ``job.last_error = 42`` (not text) and runs on; q.cancel() of it raised
    AttributeError (the cancel's dead op took the number for text), and the attempt was never
    settled: join() waited for ever. Now the number is sent as its text, as at enqueue.

    join() returns once the job has ended (cancelled), not when the function returns: the
    attempt keeps its slot in ``active_jobs`` until then (docs/api.md), so that is waited for."""
    q = redis_backend.queue()
    failures = record_failures(q, key=lambda job: job.id)
    started, release, returned = threading.Event(), threading.Event(), threading.Event()

    def run(job, ctx):
        try:
            job.last_error = 42
            started.set()
            release.wait(WAIT)
        finally:
            returned.set()

    q.register_executor("t", run)
    q.start_dispatcher(1)
    job = q.enqueue(Job("t"))
    assert started.wait(WAIT)
    try:
        assert q.cancel(job.id)
    finally:
        release.set()
    assert q.join(WAIT)
    assert [(job_id, reason) for job_id, reason, _ in failures.snapshot()] == [(job.id, "cancelled")]
    stats = q.get_stats()
    assert stats.jobs_cancelled == 1
    assert returned.wait(WAIT)
    assert wait_until(lambda: q.get_stats().executor_stats["t"].active_jobs == 0), q.get_stats()


def test_redis_a_round_that_fails_on_a_worker_thread_neither_ends_it_nor_loses_the_failure(redis_url):
    """A round (a settle and fetch call) that fails on anything but Redis (a bug: here tinymq's own
    _take raises once) on a worker thread, which sends a failure for good before its callbacks run.
    The pump, timer and heartbeat survive such a fault (_crashed: the process lets its id go); the
    worker did not: it died, its failure callbacks never ran, and Redis kept the job unfinished,
    waiting for their acknowledgement under an id still renewed: join() waited for ever. Now the
    worker lets the id go as they do, reports the job, and runs the next one."""
    from _backends import Redis

    shared = Redis(redis_url, lease=1.0)
    try:
        q = shared.queue()
        failures = record_failures(q, key=lambda job: job.payload)
        ran = Recorder()
        link = q._link
        take = link._take
        faulted = []

        def faulty_take(fetched):
            if not faulted and threading.current_thread().name.startswith("tinymq-worker"):
                faulted.append(threading.current_thread())
                raise RuntimeError("a bug in a round")
            return take(fetched)

        link._take = faulty_take

        q.register_executor("t", _fails_bad(ran))
        q.start_dispatcher(1)
        q.enqueue(Job("t", "bad", retry_config=RetryConfig(max_retries=0)))
        assert failures.wait_for(1)
        q.enqueue(Job("t", "next"))
        assert q.join(WAIT)
        assert faulted  # (the fault did come, on the worker)
        reported = failures.snapshot()
        assert {(payload, reason) for payload, reason, _ in reported} == {("bad", "retries_exhausted")}
        _one_worker_ran_both(q, ran)
    finally:
        shared.close()


class _ExitingRetryConfig(RetryConfig):
    """A RetryConfig subclass whose retry_delay raises SystemExit (as sys.exit() in it would)."""

    def retry_delay(self, k):
        raise SystemExit(f"no delay for retry {k}")


def test_a_retry_config_whose_retry_delay_raises_system_exit_fails_the_job_and_frees_its_slot():
    """The retry's delay is the user's code: an Exception it raises fails the job for good, but a
    SystemExit went past that, out of the worker thread, with the attempt's slot still taken: the
    job was never reported, get_stats() showed it active for ever, and join() waited for ever.
    Now it fails the job as an Exception does (as the executor's own SystemExit fails its attempt)."""
    from _helpers import make_queue

    q = make_queue()
    failures = record_failures(q, key=lambda job: job.payload)
    ran = Recorder()

    q.register_executor("t", _fails_bad(ran))
    q.start_dispatcher(1)
    try:
        q.enqueue(Job("t", "bad", retry_config=_ExitingRetryConfig()))
        assert failures.wait_for(1)
        q.enqueue(Job("t", "next"))
        assert q.join(WAIT)
        [(payload, reason, exc)] = failures.snapshot()
        assert (payload, reason) == ("bad", "retries_exhausted")
        assert isinstance(exc, SystemExit)
        _one_worker_ran_both(q, ran)
    finally:
        q.stop(wait=False)


@pytest.mark.parametrize("decided_by", ["timeout", "cancel"])
def test_a_retired_worker_that_cannot_be_replaced_still_has_its_job_ended(decided_by):
    """A timed-out or cancelled attempt retires its worker, which is replaced by a new thread.
    When the system has no thread to give (RuntimeError from Thread.start, here made to happen in
    tinymq's own _start_thread), the timed-out job was never handled (the watchdog logged an
    error; no retry, no report: join() waited for ever) and q.cancel() raised with the attempt
    decided but its job never ended. Now the job ends all the same (the pool is one short)."""
    from _helpers import make_queue

    q = make_queue()
    failures = record_failures(q, key=lambda job: job.payload)
    started, release = threading.Event(), threading.Event()
    dispatcher = q._dispatcher
    start_thread = dispatcher._start_thread

    def no_new_worker(target, name, *args):
        if name.startswith("tinymq-worker"):
            raise RuntimeError("can't start new thread")
        start_thread(target, name, *args)

    def run(job):
        if job.payload == "stuck":
            started.set()
            release.wait(WAIT)

    timeout = 0.2 if decided_by == "timeout" else None
    q.register_executor("t", run, ExecutorConfig(timeout=timeout))
    q.start_dispatcher(2)
    dispatcher._start_thread = no_new_worker
    try:
        job = q.enqueue(Job("t", "stuck", retry_config=RetryConfig(max_retries=0)))
        assert started.wait(WAIT)
        if decided_by == "cancel":
            assert q.cancel(job.id)
        assert failures.wait_for(1)
        q.enqueue(Job("t", "next"))  # the other worker runs it
        assert q.join(WAIT)
        [(payload, reason, exc)] = failures.snapshot()
        expected = "retries_exhausted" if decided_by == "timeout" else "cancelled"
        assert (payload, reason) == ("stuck", expected)
        stats = q.get_stats()
        assert (stats.jobs_failed + stats.jobs_cancelled, stats.jobs_succeeded) == (1, 1)
    finally:
        release.set()
        q.stop(wait=False)
