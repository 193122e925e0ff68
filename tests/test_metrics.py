"""tinymq.metrics.PrometheusCollector (#14), scraped through prometheus_client's own
exposition (``generate_latest``) and parsed back with its parser, then compared
with ``get_stats()``.
"""
import os
import subprocess
import sys

import pytest

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client import CollectorRegistry, generate_latest  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from tinymq import Config, ExecutorConfig, Job, Priority, Queue, RetryConfig  # noqa: E402
from tinymq.metrics import ATTEMPT_DURATION_BUCKETS, PrometheusCollector  # noqa: E402

from _helpers import WAIT, Blocker, wait_until  # noqa: E402

OUTCOMES = ("succeeded", "failed", "retried", "timed_out", "cancelled")


def scrape(queue):
    """{(sample name, frozenset(labels)): value} and {family name: type}, as a server would see them."""
    registry = CollectorRegistry()
    registry.register(PrometheusCollector(queue))
    text = generate_latest(registry).decode("utf-8")
    samples, types = {}, {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for sample in family.samples:
            key = (sample.name, frozenset(sample.labels.items()))
            assert key not in samples, f"{key} exposed twice"
            samples[key] = sample.value
    return samples, types


def value(samples, name, **labels):
    return samples[(name, frozenset(labels.items()))]


def test_the_scrape_matches_get_stats():
    def fn(job, ctx):
        if job.payload == "fail":
            raise ValueError("no")
        if job.payload == "slow" and job.retries == 0:
            ctx.wait(WAIT)  # times out

    with Blocker() as blocker:
        q = Queue(config=Config(buffer_size=50, max_delayed_jobs=1))
        try:
            q.register_executor("work", fn, ExecutorConfig(timeout=0.05))
            q.register_executor("held", blocker.fn, ExecutorConfig(max_concurrent_jobs=2))
            q.register_executor("idle", fn)
            q.start_dispatcher(4)
            retry = RetryConfig(max_retries=1, initial_delay=0)
            for payload in ("ok", "ok", "fail", "slow"):
                q.enqueue(Job("work", payload, retry_config=retry))
            q.enqueue(Job("ghost"))  # no executor
            for _ in range(2):
                q.enqueue_delayed(Job("work", "ok"), 3600)  # the second evicts the first
            for priority in (Priority.HIGH, Priority.LOW, Priority.LOW, Priority.MEDIUM):
                q.enqueue(Job("held", priority=priority))
            assert blocker.wait_started(2)
            # Everything but the held jobs finishes: 4 work jobs, the ghost, the evicted job,
            # and the timed-out attempt's function has returned (its slot is free).
            def settled():
                stats = q.get_stats()
                return (stats.jobs_succeeded, stats.jobs_failed,
                        stats.executor_stats["work"].active_jobs) == (3, 2, 0)

            assert wait_until(settled)
            stats = q.get_stats()
            samples, types = scrape(q)
        finally:
            blocker.release()
            q.stop()

    assert types["tinymq_jobs"] == "counter"
    assert types["tinymq_attempt_duration_seconds"] == "histogram"
    assert types["tinymq_queue_size"] == "gauge"
    assert (stats.jobs_succeeded, stats.jobs_failed, stats.jobs_retried, stats.jobs_timed_out,
            stats.jobs_evicted) == (3, 2, 2, 1, 1)
    for job_type, executor in stats.executor_stats.items():
        for outcome in OUTCOMES:
            assert value(samples, "tinymq_jobs_total", type=job_type, outcome=outcome) == getattr(executor, outcome)
        assert value(samples, "tinymq_active_jobs", type=job_type) == executor.active_jobs
        assert value(samples, "tinymq_max_concurrent_jobs", type=job_type) == executor.max_jobs
    assert value(samples, "tinymq_active_jobs", type="held") == 2
    assert value(samples, "tinymq_max_concurrent_jobs", type="held") == 2
    assert not any(dict(labels).get("type") == "ghost" for _, labels in samples)
    for field, event in (("jobs_enqueued", "enqueued"), ("jobs_succeeded", "succeeded"),
                         ("jobs_failed", "failed"), ("jobs_retried", "retried"),
                         ("jobs_timed_out", "timed_out"), ("jobs_evicted", "evicted"),
                         ("jobs_cancelled", "cancelled")):
        assert value(samples, "tinymq_queue_events_total", event=event) == getattr(stats, field)
    assert value(samples, "tinymq_queue_size", priority="high") == stats.high_queue_size
    assert value(samples, "tinymq_queue_size", priority="medium") == stats.medium_queue_size
    assert value(samples, "tinymq_queue_size", priority="low") == stats.low_queue_size == 2  # HIGH, MEDIUM run
    assert value(samples, "tinymq_delayed_jobs") == stats.delayed_jobs_count == 1

    # The histogram: cumulative buckets, +Inf == _count == every decided attempt.
    work = stats.executor_stats["work"]
    attempts = work.succeeded + work.retried + work.failed  # each attempt ends one of these ways
    buckets = [value(samples, "tinymq_attempt_duration_seconds_bucket", type="work",
                     le=prometheus_client.utils.floatToGoString(bound)) for bound in ATTEMPT_DURATION_BUCKETS]
    infinite = value(samples, "tinymq_attempt_duration_seconds_bucket", type="work", le="+Inf")
    assert buckets == sorted(buckets) and buckets[-1] <= infinite
    assert infinite == value(samples, "tinymq_attempt_duration_seconds_count", type="work") == attempts == 6
    # The timed-out attempt ran at least its 0.05 s timeout: it is above the 0.025 bucket.
    assert value(samples, "tinymq_attempt_duration_seconds_bucket", type="work", le="0.025") <= attempts - 1
    assert value(samples, "tinymq_attempt_duration_seconds_sum", type="work") >= 0.05
    assert value(samples, "tinymq_attempt_duration_seconds_count", type="idle") == 0


# Fixed (duecount): the jobs owed a place in a full ready buffer (QueueStats.waiting_for_room: due
# jobs, retries, recovered jobs) were in no gauge, so a scrape lost them: a full buffer with a
# backlog of due jobs showed queue_size at buffer_size and delayed_jobs at 0.
def test_jobs_waiting_for_room_are_in_a_gauge():
    with Queue(config=Config(buffer_size=1)) as q:  # no dispatcher: nothing runs
        q.enqueue(Job("t"))
        q.enqueue_delayed(Job("t", priority=Priority.HIGH), 0.01)
        q.enqueue_delayed(Job("t"), 3600)
        assert wait_until(lambda: q.get_stats().waiting_for_room == 1)  # once it is due
        stats = q.get_stats()
        samples, types = scrape(q)
    assert types["tinymq_waiting_for_room_jobs"] == "gauge"
    assert value(samples, "tinymq_waiting_for_room_jobs") == stats.waiting_for_room == 1
    assert sum(value(samples, "tinymq_queue_size", priority=priority) for priority in ("high", "medium", "low")) \
        + value(samples, "tinymq_delayed_jobs") + value(samples, "tinymq_waiting_for_room_jobs") == 3


def test_registering_reads_nothing_and_the_collector_follows_the_queue():
    with Queue(10) as q:
        collector = PrometheusCollector(q)
        names = sorted(family.name for family in collector.describe())
        assert names == sorted(["tinymq_jobs", "tinymq_queue_events", "tinymq_queue_size",
                                "tinymq_delayed_jobs", "tinymq_waiting_for_room_jobs", "tinymq_active_jobs",
                                "tinymq_max_concurrent_jobs", "tinymq_attempt_duration_seconds"])
        assert all(not family.samples for family in collector.describe())
        samples, _ = scrape(q)
        assert value(samples, "tinymq_queue_events_total", event="enqueued") == 0
        q.register_executor("a", lambda job: None)
        q.start_dispatcher(1)
        q.enqueue(Job("a"))
        assert q.join(WAIT)
        samples, _ = scrape(q)
        assert value(samples, "tinymq_jobs_total", type="a", outcome="succeeded") == 1


def test_the_collector_needs_a_queue():
    with pytest.raises(TypeError, match="tinymq.Queue, or a mapping of names to queues, got 'not a queue'"):
        PrometheusCollector("not a queue")
    with Queue(10) as q:
        with pytest.raises(ValueError, match="empty mapping"):
            PrometheusCollector({})
        with pytest.raises(TypeError, match="non-empty str, got 3"):
            PrometheusCollector({3: q})
        with pytest.raises(TypeError, match="non-empty str, got ''"):
            PrometheusCollector({"": q})
        with pytest.raises(TypeError, match="Queue values, got 'x' for 'b'"):
            PrometheusCollector({"a": q, "b": "x"})


def test_one_collector_of_several_queues_labels_every_sample_with_its_queue():
    """Each queue's samples, under its name, equal what that queue's own collector shows."""
    with Queue(10) as mail, Queue(10) as thumbnails:
        for q, jobs in ((mail, 1), (thumbnails, 3)):
            q.register_executor("work", lambda job: None, ExecutorConfig(max_concurrent_jobs=2))
            q.start_dispatcher(1)
            for _ in range(jobs):
                q.enqueue(Job("work"))
            assert q.join(WAIT)
        mail.enqueue_delayed(Job("work"), 3600)
        registry = prometheus_client.CollectorRegistry()
        registry.register(PrometheusCollector({"mail": mail, "thumbnails": thumbnails}))
        text = prometheus_client.generate_latest(registry).decode("utf-8")
        both = [(sample.name, tuple(sorted(sample.labels.items())), sample.value)
                for family in text_string_to_metric_families(text) for sample in family.samples]
        for name, q in (("mail", mail), ("thumbnails", thumbnails)):
            alone, _ = scrape(q)
            mine = [(sample, tuple(label for label in labels if label != ("queue", name)), number)
                    for sample, labels, number in both if ("queue", name) in labels]
            assert sorted(mine) == sorted((sample, tuple(sorted(labels)), number)
                                          for (sample, labels), number in alone.items())
        assert all(any(label[0] == "queue" for label in labels) for _, labels, _ in both)
        assert value_of(both, "tinymq_jobs_total", queue="thumbnails", type="work", outcome="succeeded") == 3
        assert value_of(both, "tinymq_delayed_jobs", queue="mail") == 1


def value_of(samples, name, **labels):
    wanted = tuple(sorted(labels.items()))
    return next(number for sample, have, number in samples if sample == name and have == wanted)


def test_importing_without_prometheus_client_names_the_extra():
    code = ("import sys; sys.modules['prometheus_client'] = None\n"
            "try:\n    import tinymq.metrics\nexcept ImportError as exc:\n    print(exc)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ), timeout=60)
    assert "pip install 'tinymq[prometheus]'" in out.stdout, out.stdout + out.stderr


@pytest.mark.parametrize("kind", ["thread", "async"])
def test_the_histogram_counts_the_attempts_counted_in_the_stats_not_those_stop_gives_up(kind):
    """Every attempt whose outcome is counted (succeeded, failed, timed out, cancelled while it ran)
    is in tinymq_attempt_duration_seconds; one that stop() cancels (counted nowhere) is not,
    whether it returns early (cooperative) or fails as it unwinds; one cancelled before its
    function was called has no duration."""
    import asyncio

    q = Queue(10)
    entered = []

    if kind == "thread":
        def executor(job, ctx):
            if job.payload == "fail":
                raise ValueError("no")
            if job.payload in ("cancel me", "stop me"):
                entered.append(job.payload)
                ctx.wait(WAIT)
            if job.payload == "stop me and fail":
                entered.append(job.payload)
                ctx.wait(WAIT)
                ctx.check()  # raises JobTimeout: cancelled by stop()
    else:
        async def executor(job, ctx):
            if job.payload == "fail":
                raise ValueError("no")
            if job.payload in ("cancel me", "stop me", "stop me and fail"):
                entered.append(job.payload)
                await asyncio.sleep(WAIT)

    q.register_executor("t", executor, ExecutorConfig(timeout=None))
    q.start_dispatcher(2)
    try:
        q.enqueue(Job("t", "ok"))
        q.enqueue(Job("t", "fail", retry_config=RetryConfig(max_retries=0)))
        q.enqueue(Job("t", "cancel me", id="victim"))
        assert wait_until(lambda: entered == ["cancel me"])
        assert q.cancel("victim")
        assert q.join(WAIT)
        q.enqueue_delayed(Job("t", "never", id="queued"), 3600.0)
        assert q.cancel("queued")  # not run: no duration
        stats = q.get_stats().executor_stats["t"]
        assert (stats.succeeded, stats.failed, stats.cancelled) == (1, 1, 2)
        assert sum(q._attempt_durations()["t"][0]) == 3
        q.enqueue(Job("t", "stop me"))
        q.enqueue(Job("t", "stop me and fail"))
        assert wait_until(lambda: len(entered) == 3)  # both functions called
        q.stop(timeout=0.05)
        assert wait_until(lambda: q._dispatcher.gave_up_attempts() == 0)  # both have returned
        assert sum(q._attempt_durations()["t"][0]) == 3
    finally:
        q.stop(wait=False)
