"""PermanentFailure, RetryAfter and ExecutorConfig(retry_on=...), for thread and async executors."""
import asyncio
import time
from datetime import timedelta

import pytest

import tinymq
from tinymq import ExecutorConfig, Job, PermanentFailure, RetryAfter, RetryConfig

from _helpers import STORES, WAIT, Recorder, queue_with_store, record_failures


@pytest.fixture(params=["thread", "async"])
def kind(request):
    return request.param


@pytest.fixture(params=STORES)
def queue(request, tmp_path):
    with queue_with_store(request.param, tmp_path, buffer_size=100) as q:
        yield q


def register(q, kind, fn, **config):
    """Register ``fn(job)`` as a thread executor or wrapped in an ``async def``."""
    if kind == "thread":
        q.register_executor("job", fn, ExecutorConfig(**config))
    else:
        async def run(job):
            await asyncio.sleep(0)
            fn(job)
        q.register_executor("job", run, ExecutorConfig(**config))


def test_exported():
    assert tinymq.PermanentFailure is PermanentFailure and tinymq.RetryAfter is RetryAfter
    assert issubclass(PermanentFailure, tinymq.TinyMQError) and issubclass(RetryAfter, tinymq.TinyMQError)


def test_permanent_failure_is_not_retried_and_keeps_its_cause(queue, kind):
    failed = record_failures(queue)
    attempts = Recorder()

    def fn(job):
        attempts.add(job.retries)
        try:
            raise LookupError("HTTP 404")
        except LookupError as exc:
            raise PermanentFailure("not found") from exc

    register(queue, kind, fn)
    queue.start_dispatcher()
    queue.enqueue(Job("job", retry_config=RetryConfig(max_retries=5, initial_delay=0.001)))
    assert queue.join(WAIT)
    (job, reason, exc), = failed.items
    assert reason == "permanent_failure" and isinstance(exc, PermanentFailure)
    assert isinstance(exc.__cause__, LookupError)
    assert attempts.items == [0]
    stats = queue.get_stats()
    assert (stats.jobs_failed, stats.jobs_retried) == (1, 0)
    if queue.store is not None:
        assert [(d.job.id, d.reason) for d in queue.store.dead_jobs()] == [(job.id, "permanent_failure")]


def test_retry_after_replaces_the_backoff_and_counts_as_a_retry(queue, kind):
    failed = record_failures(queue)
    starts = Recorder()

    def fn(job):
        starts.add(time.monotonic())
        raise RetryAfter(0.2)

    register(queue, kind, fn)
    queue.start_dispatcher()
    # a backoff of an hour: only RetryAfter's delay lets the retries run within the test
    queue.enqueue(Job("job", retry_config=RetryConfig(max_retries=2, initial_delay=3600.0)))
    assert queue.join(WAIT)
    assert len(starts.items) == 3
    gaps = [b - a for a, b in zip(starts.items, starts.items[1:])]
    assert all(0.19 <= gap < 3.0 for gap in gaps), gaps
    (job, reason, exc), = failed.items
    assert reason == "retries_exhausted" and isinstance(exc, RetryAfter) and exc.seconds == 0.2
    assert queue.get_stats().jobs_retried == 2


def test_retry_on_retries_only_the_listed_exceptions(queue, kind):
    failed = record_failures(queue)
    attempts = Recorder()

    def fn(job):
        attempts.add(job.payload)
        if job.payload == "flaky" and job.retries == 0:
            raise ConnectionError("reset")
        if job.payload == "bug":
            raise KeyError("missing")

    register(queue, kind, fn, retry_on=(ConnectionError, TimeoutError))
    queue.start_dispatcher()
    for payload in ("flaky", "bug"):
        queue.enqueue(Job("job", payload, retry_config=RetryConfig(max_retries=3, initial_delay=0.001)))
    assert queue.join(WAIT)
    assert sorted(attempts.items) == ["bug", "flaky", "flaky"]
    (job, reason, exc), = failed.items
    assert job.payload == "bug" and reason == "permanent_failure" and isinstance(exc, KeyError)
    stats = queue.get_stats()
    assert (stats.jobs_succeeded, stats.jobs_failed, stats.jobs_retried) == (1, 1, 1)


def test_retry_after_is_retried_whatever_retry_on_says(queue, kind):
    attempts = Recorder()

    def fn(job):
        attempts.add(job.retries)
        if job.retries == 0:
            raise RetryAfter(timedelta(milliseconds=1))

    register(queue, kind, fn, retry_on=(ConnectionError,))
    queue.start_dispatcher()
    queue.enqueue(Job("job"))
    assert queue.join(WAIT)
    assert attempts.items == [0, 1]


def test_retry_after_validates_its_delay():
    assert RetryAfter(1).seconds == 1.0 and RetryAfter(timedelta(seconds=2)).seconds == 2.0
    assert "3" in str(RetryAfter(3))
    assert str(RetryAfter(3, "HTTP 429")) == "HTTP 429"
    for bad in (-1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="RetryAfter"):
            RetryAfter(bad)
    for bad in ("5", None, True):
        with pytest.raises(TypeError, match="RetryAfter"):
            RetryAfter(bad)


def test_retry_on_is_validated():
    assert ExecutorConfig().retry_on == (Exception,)
    assert ExecutorConfig(retry_on=()).retry_on == ()
    for bad in (ConnectionError, [ConnectionError], (ConnectionError, "x"), (int,)):
        with pytest.raises(TypeError, match="retry_on"):
            ExecutorConfig(retry_on=bad)
