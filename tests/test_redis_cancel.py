"""q.cancel over a Redis broker, from a Queue other than the one that holds the job.

API.md "Async executors and cancellation" and "Scale-out": a waiting job is
removed in Redis and reported to the cancelling Queue; a leased one (buffered
or running in another Queue) is cancelled there within ``lease`` and reported
by that Queue; every race ends the job exactly once, counted in jobs_cancelled.
Producer and worker are separate Queue objects with their own RedisBroker, as
separate processes would be (the scripts see only process ids).
"""
import asyncio
import threading
import time

import pytest

from tinymq import ExecutorConfig, Job, JobTimeout, Priority, RetryConfig

from _backends import Redis
from _helpers import QUIET, WAIT, record_failures, wait_until

LEASE = 2.0  # seconds; a cancel reaches a busy owner within a quarter of it (its heartbeat)


@pytest.fixture
def redis(redis_url):
    made = Redis(redis_url, lease=LEASE)
    yield made
    made.close()


def failures_of(q):
    """A Recorder of (job id, reason, exc) for every on_failure call of ``q``."""
    return record_failures(q, key=lambda job: job.id)


def counters(q):
    s = q.get_stats()
    return {"succeeded": s.jobs_succeeded, "failed": s.jobs_failed, "retried": s.jobs_retried,
            "cancelled": s.jobs_cancelled, "timed_out": s.jobs_timed_out}


def leftover_keys(broker):
    """The job hashes and cancel marks still in Redis for this queue."""
    prefix = broker._scripts.prefix
    return sorted(k for k in broker.client.keys(prefix + "*")
                  if k.startswith((prefix + "job:", prefix + "cancels:")))


def test_cancel_a_ready_job_from_a_producer_reports_it_there(redis):
    producer = redis.queue()
    failures = failures_of(producer)
    job = producer.enqueue(Job("t", {"n": 1}))
    assert producer.cancel(job.id) is True
    assert failures.snapshot() == [(job.id, "cancelled", None)]
    assert producer.cancel(job.id) is False  # finished now
    assert producer.join(WAIT)
    stats = producer.get_stats()
    assert (stats.jobs_cancelled, stats.medium_queue_size, stats.jobs_failed) == (1, 0, 0)
    # a worker started later never runs it
    worker = redis.queue()
    ran = []
    worker.register_executor("t", lambda j: ran.append(j.id))
    after = producer.enqueue(Job("t", 2))
    worker.start_dispatcher(1)
    assert producer.join(WAIT)
    assert ran == [after.id]


def test_cancel_unknown_finished_and_dead_ids_returns_false(redis):
    producer, worker = redis.pair()
    worker.register_executor("ok", lambda j: None)
    worker.register_executor("bad", lambda j: 1 / 0)
    ok = producer.enqueue(Job("ok"))
    bad = producer.enqueue(Job("bad", retry_config=RetryConfig(max_retries=0)))
    worker.start_dispatcher(1)
    assert producer.join(WAIT)
    assert producer.cancel("no-such-job") is False
    assert producer.cancel(ok.id) is False
    assert producer.cancel(bad.id) is False  # dead: not unfinished
    assert producer.get_stats().jobs_cancelled == 0
    with pytest.raises(TypeError):
        producer.cancel(123)


def test_cancel_delayed_and_backing_off_jobs(redis):
    producer, worker = redis.pair()
    failures = failures_of(producer)
    attempts = []

    def flaky(job):
        attempts.append(job.id)
        raise ConnectionError("down")

    worker.register_executor("flaky", flaky)
    worker.register_executor("later", lambda j: None)
    delayed = producer.enqueue_delayed(Job("later"), 60.0)
    backing_off = producer.enqueue(Job("flaky", retry_config=RetryConfig(max_retries=5, initial_delay=60.0)))
    worker.start_dispatcher(1)
    assert wait_until(lambda: producer.get_stats().jobs_retried == 1)
    assert producer.get_stats().delayed_jobs_count == 2
    assert producer.cancel(delayed.id) and producer.cancel(backing_off.id)
    assert producer.join(WAIT)
    assert sorted((i, reason) for i, reason, _ in failures.snapshot()) == sorted(
        [(delayed.id, "cancelled"), (backing_off.id, "cancelled")])
    assert counters(producer)["cancelled"] == 2 and producer.get_stats().delayed_jobs_count == 0
    assert attempts == [backing_off.id]
    assert leftover_keys(producer.broker) == []


def test_cancel_a_job_parked_behind_a_saturated_type_keeps_the_others_in_order(redis):
    producer, worker = redis.pair()
    started = threading.Event()
    release = threading.Event()
    order = []

    def one(job):
        order.append(job.payload)
        if job.payload == "first":
            started.set()
            release.wait(WAIT)

    worker.register_executor("one", one, ExecutorConfig(max_concurrent_jobs=1))
    worker.register_executor("other", lambda j: order.append(j.payload))
    producer.enqueue(Job("one", "first"))
    worker.start_dispatcher(2)
    assert started.wait(WAIT)
    parked = [producer.enqueue(Job("one", f"p{i}")) for i in range(3)]
    producer.enqueue(Job("other", "x"))
    assert wait_until(lambda: "x" in order)  # the other type passes the parked ones
    assert producer.cancel(parked[1].id)
    release.set()
    assert producer.join(WAIT)
    assert order == ["first", "x", "p0", "p2"]
    assert counters(producer) == {"succeeded": 4, "failed": 0, "retried": 0, "cancelled": 1, "timed_out": 0}
    assert producer.get_stats().medium_queue_size == 0


@pytest.mark.parametrize("kind", ["thread", "thread-interrupt", "async"])
def test_cancel_a_running_attempt_in_another_queue(redis, kind):
    producer, worker = redis.pair()
    producer_failures, worker_failures = failures_of(producer), failures_of(worker)
    started, saw_cancel, finished = threading.Event(), threading.Event(), threading.Event()
    if kind == "async":
        async def run(job, ctx):
            started.set()
            try:
                await asyncio.sleep(WAIT * 10)
            except asyncio.CancelledError:
                if ctx.cancelled:
                    saw_cancel.set()
                finished.set()
                raise
        config = ExecutorConfig(timeout=None)
    elif kind == "thread":
        def run(job, ctx):
            started.set()
            if ctx.wait(WAIT * 10):  # True when cancelled
                saw_cancel.set()
            finished.set()
        config = ExecutorConfig(timeout=None)
    else:
        def run(job):
            started.set()
            try:
                deadline = time.monotonic() + WAIT * 10
                while time.monotonic() < deadline:
                    time.sleep(0.001)
            except BaseException:
                saw_cancel.set()
                finished.set()
                raise
        config = ExecutorConfig(timeout=WAIT * 10, interrupt_on_timeout=True)
    worker.register_executor("t", run, config)
    job = producer.enqueue(Job("t", retry_config=RetryConfig(max_retries=3, initial_delay=0.0)))
    worker.start_dispatcher(1)
    assert started.wait(WAIT)
    began = time.monotonic()
    assert producer.cancel(job.id) is True
    assert saw_cancel.wait(LEASE + WAIT / 2)  # (within lease; the generous bound is the noisy machine)
    assert finished.wait(WAIT)
    assert producer.join(WAIT)
    assert time.monotonic() - began < LEASE + WAIT
    assert [(i, reason) for i, reason, _ in worker_failures.snapshot()] == [(job.id, "cancelled")]
    assert producer_failures.snapshot() == []
    assert counters(producer) == {"succeeded": 0, "failed": 0, "retried": 0, "cancelled": 1, "timed_out": 0}
    assert producer.cancel(job.id) is False
    assert wait_until(lambda: worker.broker.shared_executors()[0]["t"][0] == 0)  # its slot is free again
    assert leftover_keys(producer.broker) == []


def test_a_running_cancelled_attempt_holds_its_global_slot_until_it_returns(redis):
    producer, worker = redis.pair()
    started = threading.Event()
    let_go = threading.Event()
    ran = []

    def stubborn(job):  # ignores its cancellation
        ran.append(job.payload)
        if job.payload == 0:
            started.set()
            let_go.wait(WAIT)

    worker.register_executor("t", stubborn, ExecutorConfig(max_concurrent_jobs=1, timeout=None))
    first = producer.enqueue(Job("t", 0))
    worker.start_dispatcher(2)
    assert started.wait(WAIT)
    producer.enqueue(Job("t", 1))
    assert producer.cancel(first.id)
    assert wait_until(lambda: producer.get_stats().jobs_cancelled == 1)
    time.sleep(QUIET)
    assert ran == [0]  # the limit of one holds while the cancelled attempt still runs
    let_go.set()
    assert producer.join(WAIT)
    assert ran == [0, 1]


def test_cancel_a_job_buffered_in_another_queue(redis):
    producer, worker = redis.pair()
    started = threading.Event()
    release = threading.Event()
    ran = []

    def run(job):
        ran.append(job.payload)
        started.set()
        release.wait(WAIT)

    worker.register_executor("t", run)
    producer.enqueue(Job("t", "running", priority=Priority.HIGH))
    buffered = producer.enqueue(Job("t", "buffered"))
    worker.start_dispatcher(1)  # one worker, one job prefetched into its buffer
    assert started.wait(WAIT)
    assert wait_until(lambda: producer.get_stats().medium_queue_size == 0)  # fetched: leased
    worker_failures = failures_of(worker)
    assert producer.cancel(buffered.id)
    assert worker_failures.wait_for(1, LEASE + WAIT / 2)
    release.set()
    assert producer.join(WAIT)
    assert ran == ["running"]
    assert [(i, reason) for i, reason, _ in worker_failures.snapshot()] == [(buffered.id, "cancelled")]
    assert counters(producer)["cancelled"] == 1 and counters(producer)["succeeded"] == 1
