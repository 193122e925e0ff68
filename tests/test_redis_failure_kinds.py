"""Async executors, PermanentFailure, RetryAfter and retry_on over a Redis broker.

API.md "Async executors and cancellation", "Telling the queue how a job failed"
and "Scale-out": every rule holds unchanged when producer and worker are separate
Queue objects sharing one broker name (each with its own RedisBroker, as separate
processes). Each test is run with a thread executor and an async one where the
rule applies to both.
"""
import asyncio
import threading
import time

import pytest

from tinymq import ExecutorConfig, Job, JobTimeout, PermanentFailure, RetryAfter, RetryConfig

from _backends import Redis
from _helpers import WAIT, Recorder, record_failures

LONG_BACKOFF = 60.0  # a backoff no test waits for: a retry sooner than it came from elsewhere


@pytest.fixture
def redis(redis_url):
    made = Redis(redis_url)
    yield made
    made.close()


def executor(kind, body):
    """``body(job)`` (which may raise) as a thread executor, or inside an ``async def`` one."""
    if kind == "thread":
        return body

    async def run(job):
        await asyncio.sleep(0)
        body(job)
    return run


def test_an_async_executor_runs_jobs_enqueued_by_another_queue(redis):
    producer, worker = redis.pair()
    seen = Recorder()
    loop_threads = set()

    async def run(job):
        await asyncio.sleep(0.001)
        loop_threads.add(threading.current_thread().name)
        seen.add(job.payload)

    worker.register_executor("t", run)
    worker.start_dispatcher(1)
    producer.enqueue_many([Job("t", i) for i in range(20)])
    assert producer.join(WAIT)
    assert sorted(seen.snapshot()) == list(range(20))
    assert loop_threads == {"tinymq-loop"}  # on the queue's loop, not a worker thread
    stats = producer.get_stats()
    assert (stats.jobs_succeeded, stats.jobs_failed) == (20, 0)


def test_an_async_timeout_cancels_the_task_and_retries_per_config(redis):
    producer, worker = redis.pair()
    failures = record_failures(worker, key=lambda job: job.id)
    cancelled = Recorder()

    async def slow(job):
        try:
            await asyncio.sleep(WAIT * 10)
        except asyncio.CancelledError:
            cancelled.add(job.id)  # (job.retries may already count this attempt: decided at the deadline)
            raise

    worker.register_executor("slow", slow, ExecutorConfig(timeout=0.2))
    job = producer.enqueue(Job("slow", retry_config=RetryConfig(max_retries=1, initial_delay=0.0)))
    worker.start_dispatcher(1)
    assert producer.join(WAIT)
    assert cancelled.snapshot() == [job.id, job.id]  # each attempt's task was cancelled at its deadline
    [(job_id, reason, exc)] = failures.snapshot()
    assert (job_id, reason) == (job.id, "retries_exhausted") and isinstance(exc, JobTimeout)
    stats = producer.get_stats()
    assert (stats.jobs_timed_out, stats.jobs_retried, stats.jobs_failed) == (2, 1, 1)
    [dead] = producer.broker.dead_jobs()
    assert (dead.job.id, dead.reason, dead.job.retries) == (job.id, "retries_exhausted", 2)
    assert "JobTimeout" in dead.error


def test_max_concurrent_jobs_is_global_for_async_executors(redis):
    producer = redis.queue()
    workers = [redis.queue(), redis.queue()]
    lock = threading.Lock()
    running = [0]
    peak = [0]

    async def run(job):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        await asyncio.sleep(0.02)
        with lock:
            running[0] -= 1

    for worker in workers:
        worker.register_executor("t", run, ExecutorConfig(max_concurrent_jobs=2))
        worker.start_dispatcher(4)
    producer.enqueue_many([Job("t", i) for i in range(40)])
    assert producer.join(WAIT)
    assert peak[0] == 2  # reached, never exceeded, across both Queues
    assert producer.get_stats().jobs_succeeded == 40


@pytest.mark.parametrize("kind", ["thread", "async"])
def test_permanent_failure_is_dead_at_once(redis, kind):
    producer, worker = redis.pair()
    failures = record_failures(worker, key=lambda job: job.id)
    attempts = Recorder()

    def body(job):
        attempts.add(job.id)
        raise PermanentFailure("HTTP 404")

    worker.register_executor("t", executor(kind, body))
    job = producer.enqueue(Job("t", retry_config=RetryConfig(max_retries=5, initial_delay=0.0)))
    worker.start_dispatcher(1)
    assert producer.join(WAIT)
    assert attempts.snapshot() == [job.id]
    [(job_id, reason, exc)] = failures.snapshot()
    assert (job_id, reason, type(exc), str(exc)) == (job.id, "permanent_failure", PermanentFailure, "HTTP 404")
    stats = producer.get_stats()
    assert (stats.jobs_failed, stats.jobs_retried) == (1, 0)
    [dead] = producer.broker.dead_jobs()
    assert (dead.job.id, dead.reason) == (job.id, "permanent_failure") and "HTTP 404" in dead.error


@pytest.mark.parametrize("kind", ["thread", "async"])
def test_retry_after_retries_after_its_delay_not_the_backoff(redis, kind):
    producer, worker = redis.pair()
    delay = 0.4
    ended = {}
    started = Recorder()

    def body(job):
        started.add((job.retries, time.monotonic()))
        if job.retries < 2:
            ended[job.retries] = time.monotonic()
            raise RetryAfter(delay)

    worker.register_executor("t", executor(kind, body))
    producer.enqueue(Job("t", retry_config=RetryConfig(max_retries=3, initial_delay=LONG_BACKOFF)))
    worker.start_dispatcher(1)
    assert producer.join(WAIT)  # long before the backoff: the retries came after RetryAfter's delay
    runs = started.snapshot()
    assert [retries for retries, _ in runs] == [0, 1, 2]
    for retries, at in runs[1:]:
        assert at - ended[retries - 1] >= delay * 0.95  # (the server and local clocks tick apart)
    stats = producer.get_stats()
    assert (stats.jobs_retried, stats.jobs_succeeded, stats.jobs_failed) == (2, 1, 0)


def test_retry_after_still_counts_against_max_retries(redis):
    producer, worker = redis.pair()
    failures = record_failures(worker, key=lambda job: job.id)

    def body(job):
        raise RetryAfter(0.01)

    worker.register_executor("t", body)
    job = producer.enqueue(Job("t", retry_config=RetryConfig(max_retries=2)))
    worker.start_dispatcher(1)
    assert producer.join(WAIT)
    [(job_id, reason, exc)] = failures.snapshot()
    assert (job_id, reason) == (job.id, "retries_exhausted") and isinstance(exc, RetryAfter)
    assert producer.get_stats().jobs_retried == 2


@pytest.mark.parametrize("kind", ["thread", "async"])
def test_retry_on_retries_only_the_listed_exceptions(redis, kind):
    producer, worker = redis.pair()
    failures = record_failures(worker, key=lambda job: job.payload)
    attempts = Recorder()

    def body(job):
        attempts.add((job.payload, job.retries))
        if job.payload == "flaky" and job.retries == 0:
            raise ConnectionError("reset")
        if job.payload == "broken":
            raise ValueError("bad input")

    worker.register_executor("t", executor(kind, body), ExecutorConfig(retry_on=(ConnectionError, TimeoutError)))
    retry = RetryConfig(max_retries=3, initial_delay=0.0)
    producer.enqueue(Job("t", "flaky", retry_config=retry))
    producer.enqueue(Job("t", "broken", retry_config=retry))
    worker.start_dispatcher(1)
    assert producer.join(WAIT)
    assert sorted(attempts.snapshot()) == [("broken", 0), ("flaky", 0), ("flaky", 1)]
    [(payload, reason, exc)] = failures.snapshot()
    assert (payload, reason, type(exc)) == ("broken", "permanent_failure", ValueError)
    stats = producer.get_stats()
    assert (stats.jobs_succeeded, stats.jobs_failed, stats.jobs_retried) == (1, 1, 1)
