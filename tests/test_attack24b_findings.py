"""Attack of session 24 (attack24b): async executors, cancellation and how a job failed, as an
outsider would attack them; each finding with its test.
"""
import asyncio
import math
import threading
import time
from datetime import timedelta

import pytest

from tinymq import ExecutorConfig, Job, RetryAfter, RetryConfig

from _helpers import STORES, WAIT, queue_with_store, record_failures, wait_until


def _succeeded_and_ready(q):
    stats = q.get_stats()
    return stats.jobs_succeeded, stats.high_queue_size + stats.medium_queue_size + stats.low_queue_size


@pytest.mark.redis
@pytest.mark.parametrize("kind", ["thread", "async"])
def test_over_a_broker_attempts_that_outlive_a_stop_called_in_an_executor_settle_before_the_release(
        redis_backend, kind):
    """docs/api.md, "Waiting and stopping": called from an executor, ``stop()`` waits for
    neither the others nor another ``stop()``; it does not cancel them either: in-process
    (with or without a store) the attempts it lets run, its caller's own included, end as
    they end (a success counts and deletes the job). Over a broker they were given back to
    Redis at once by the release that stop() ran in the executor's own thread: their
    successes, counted in the process's per-type ``succeeded``, were stale there, the two
    jobs stayed ready (``jobs_succeeded`` 0) and ran again in the next process, so a job
    that stops its queue stopped every queue that started after it too."""
    q = redis_backend.queue()
    ran = []
    both_running = threading.Barrier(2, timeout=WAIT)

    def body(job):
        ran.append(job.payload)

    if kind == "thread":
        def executor(job):
            both_running.wait()
            if job.payload == "stop":
                q.stop(wait=True, timeout=WAIT)
            else:
                time.sleep(0.2)
            body(job)
        workers = 2
    else:
        async def executor(job):
            await asyncio.get_running_loop().run_in_executor(None, both_running.wait)
            if job.payload == "stop":
                await q.astop(wait=True, timeout=WAIT)
            else:
                await asyncio.sleep(0.2)
            body(job)
        workers = 1

    q.register_executor("t", executor, ExecutorConfig(timeout=None))
    q.start_dispatcher(workers)
    q.enqueue(Job("t", "other"))
    q.enqueue(Job("t", "stop"))
    assert wait_until(lambda: len(ran) == 2)
    q.stop()  # (returns once the first stop() has given back what this process held)
    assert q.get_stats().executor_stats["t"].succeeded == 2
    observer = redis_backend.queue()
    assert wait_until(lambda: _succeeded_and_ready(observer) == (2, 0)), _succeeded_and_ready(observer)
    assert sorted(ran) == ["other", "stop"]


def _retry_after_changed_to(seconds):
    """A RetryAfter whose ``seconds`` its executor set after construction (attributes are writable)."""
    exc = RetryAfter(0.01)
    exc.seconds = seconds
    return exc


def failed_once_by_its_retry_after(q, executor):
    """Run one job of type "t" on ``q`` with ``executor``, which raises a spoiled RetryAfter: it
    fails once, "retries_exhausted", with nothing retried. Its exception, and the stats then."""
    failures = record_failures(q, key=lambda job: job.id)
    q.register_executor("t", executor, ExecutorConfig(timeout=None))
    q.start_dispatcher(1)
    job = q.enqueue(Job("t", retry_config=RetryConfig(max_retries=3, initial_delay=0.01)))
    assert q.join(WAIT), q.get_stats()
    [(job_id, reason, exc)] = failures.items
    assert (job_id, reason) == (job.id, "retries_exhausted")
    assert "RetryAfter seconds" in str(exc), exc
    stats = q.get_stats()
    assert (stats.jobs_failed, stats.jobs_retried, stats.delayed_jobs_count) == (1, 0, 0)
    return exc, stats


@pytest.mark.parametrize("backend", STORES)
@pytest.mark.parametrize("kind", ["thread", "async"])
@pytest.mark.parametrize("seconds", [math.nan, math.inf, -5.0, "5", timedelta(days=-1)],
                         ids=["nan", "inf", "negative", "str", "negative-timedelta"])
def test_a_retry_after_whose_seconds_were_made_invalid_fails_the_job_instead_of_losing_it(
        backend, kind, seconds, tmp_path):
    """docs/api.md, "Telling the queue how a job failed": ``RetryAfter(seconds)`` takes a float or
    a ``timedelta``, finite, >= 0; its constructor refuses anything else, but ``seconds`` is a plain
    attribute. Set to NaN after construction, the retry was placed with a NaN delay: the job counted
    as ready for ever and never ran again (``join()`` never returned, nor did the job end); set to
    inf it waited in the delayed set for ever. Now the value is checked again when the retry is
    scheduled, as a ``RetryConfig`` subclass's ``retry_delay`` is: a bad one fails the job
    (``"retries_exhausted"``, the error naming it), as an unusable retry does, once, in every counter."""
    with queue_with_store(backend, tmp_path) as q:
        if kind == "thread":
            def executor(job):
                raise _retry_after_changed_to(seconds)
        else:
            async def executor(job):
                raise _retry_after_changed_to(seconds)
        exc, stats = failed_once_by_its_retry_after(q, executor)
        assert isinstance(exc, (TypeError, ValueError)), exc
        assert (stats.executor_stats["t"].failed, stats.executor_stats["t"].retried) == (1, 0)
        if q.store is not None:
            assert list(q.store.load_all()) == []
            assert [dead.reason for dead in q.store.dead_jobs()] == ["retries_exhausted"]


@pytest.mark.redis
@pytest.mark.parametrize("seconds", [math.nan, math.inf], ids=["nan", "inf"])
def test_over_a_broker_a_retry_after_whose_seconds_were_made_invalid_fails_the_job(redis_backend, seconds):
    """The finding above over a broker: with NaN the retry ran at once (Redis read the delay as 0),
    with inf the job waited in the delayed set for ever; now it fails as in-process."""
    def executor(job):
        raise _retry_after_changed_to(seconds)

    exc, _ = failed_once_by_its_retry_after(redis_backend.queue(), executor)
    assert isinstance(exc, ValueError), exc


@pytest.mark.parametrize("backend", STORES)
def test_jobs_the_event_loop_took_before_stop_never_start_after_it(backend, tmp_path):
    """API.md "Queue": ``stop()`` stops accepting jobs and lets running attempts finish; "Jobs still
    queued are not run; with a persistence store they stay stored for the next start". A thread
    worker never starts a job once stop() has closed the queue. The event loop took its jobs in
    batches, though: when one coroutine held the loop (here until stop() cancelled its context),
    the jobs taken with it were started one after another once it returned, after stop() (without
    a store; a store's start write let the loop see the stop first). Now a job the loop holds
    unstarted when the queue stops is given back, as a worker's is: not run, and stored with a store."""
    with queue_with_store(backend, tmp_path) as q:
        ran = []
        holding = threading.Event()

        async def executor(job, ctx):
            ran.append(job.payload)
            if job.payload == 0:
                holding.set()
                while not ctx.cancelled:  # holds the loop: the jobs taken with this one wait in its hands
                    time.sleep(0.001)

        q.register_executor("t", executor, ExecutorConfig(timeout=None))
        for payload in range(3):
            q.enqueue(Job("t", payload))
        q.start_dispatcher()
        assert holding.wait(WAIT)
        q.stop(wait=True, timeout=0.1)
        assert ran == [0]
        stats = q.get_stats()
        assert (stats.jobs_succeeded, stats.jobs_failed, stats.executor_stats["t"].active_jobs) == (0, 0, 0)
        if q.store is not None:
            assert sorted(job.payload for job in q.store.load_all()) == [0, 1, 2]
