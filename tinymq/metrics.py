"""Prometheus metrics for a Queue: ``tinymq.metrics.PrometheusCollector``.

Needs the optional extra ``pip install 'tinymq[prometheus]'`` (``prometheus_client``).
The collector reads the queue when it is scraped, so nothing is counted twice and the
per-job path pays nothing for it::

    from prometheus_client import REGISTRY
    from tinymq.metrics import PrometheusCollector

    REGISTRY.register(PrometheusCollector(q))

Metrics (``type`` is a job type with a registered executor):

- ``tinymq_jobs_total{type, outcome}`` (counter): ``outcome`` is ``succeeded``,
  ``failed`` (for good), ``retried``, ``timed_out`` or ``cancelled``: the per-type
  counters of ``ExecutorStats``;
- ``tinymq_queue_events_total{event}`` (counter): the queue-wide counters of
  ``QueueStats`` (``enqueued``, ``succeeded``, ``failed``, ``retried``, ``timed_out``,
  ``evicted``, ``cancelled``); jobs whose type has no executor count only here;
- ``tinymq_queue_size{priority}`` (gauge): ready jobs, ``priority`` is ``high``,
  ``medium`` or ``low``; ``tinymq_delayed_jobs`` (gauge): jobs waiting for their ``run_at``;
- ``tinymq_active_jobs{type}`` and ``tinymq_max_concurrent_jobs{type}`` (gauges);
- ``tinymq_attempt_duration_seconds{type}`` (histogram): how long attempts ran, measured
  when each attempt's outcome is decided (a timed-out attempt at its deadline), with the
  fixed buckets ``ATTEMPT_DURATION_BUCKETS`` (1 ms to 300 s) and +Inf.
"""
from typing import Any, Iterator, List, Tuple

try:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
    from prometheus_client.registry import Collector
    from prometheus_client.utils import floatToGoString
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        "tinymq.metrics needs prometheus_client: install the extra with "
        "pip install 'tinymq[prometheus]'"
    ) from exc

from ._pick_core import core
from .queue import Queue

__all__ = ["PrometheusCollector", "ATTEMPT_DURATION_BUCKETS"]

# Upper bounds, in seconds, of the attempt-duration histogram's buckets (then +Inf).
ATTEMPT_DURATION_BUCKETS: Tuple[float, ...] = tuple(core.ATTEMPT_DURATION_BUCKETS)

# ExecutorStats field -> the outcome label of tinymq_jobs_total
_OUTCOMES = ("succeeded", "failed", "retried", "timed_out", "cancelled")
# QueueStats field -> the event label of tinymq_queue_events_total
_QUEUE_EVENTS = (("jobs_enqueued", "enqueued"), ("jobs_succeeded", "succeeded"),
                 ("jobs_failed", "failed"), ("jobs_retried", "retried"),
                 ("jobs_timed_out", "timed_out"), ("jobs_evicted", "evicted"),
                 ("jobs_cancelled", "cancelled"))
_BUCKET_LABELS = [floatToGoString(bound) for bound in ATTEMPT_DURATION_BUCKETS] + ["+Inf"]


class PrometheusCollector(Collector):
    """A ``prometheus_client`` collector of one Queue's stats; register it yourself.

    A registered collector keeps its queue alive: unregister it when the queue is done.
    """

    def __init__(self, queue: Queue) -> None:
        if not isinstance(queue, Queue):
            raise TypeError(f"PrometheusCollector needs a tinymq.Queue, got {queue!r}")
        self._queue = queue

    def describe(self) -> Iterator[Any]:
        """The metric families without samples: registering reads nothing from the queue."""
        return iter(self._families())

    def collect(self) -> Iterator[Any]:
        queue = self._queue
        stats = queue.get_stats()
        durations = queue._attempt_durations()
        (jobs, events, sizes, delayed, active, limits, histogram) = families = self._families()
        for job_type, executor in sorted(stats.executor_stats.items()):
            for outcome in _OUTCOMES:
                jobs.add_metric([job_type, outcome], getattr(executor, outcome))
            active.add_metric([job_type], executor.active_jobs)
            limits.add_metric([job_type], executor.max_jobs)
            counts, total_seconds = durations.get(job_type, ((0,) * len(_BUCKET_LABELS), 0.0))
            histogram.add_metric([job_type], _cumulative(counts), total_seconds)
        for field, event in _QUEUE_EVENTS:
            events.add_metric([event], getattr(stats, field))
        sizes.add_metric(["high"], stats.high_queue_size)
        sizes.add_metric(["medium"], stats.medium_queue_size)
        sizes.add_metric(["low"], stats.low_queue_size)
        delayed.add_metric([], stats.delayed_jobs_count)
        return iter(families)

    @staticmethod
    def _families() -> List[Any]:
        return [
            CounterMetricFamily("tinymq_jobs", "Jobs by type and outcome (attempts for "
                                "retried and timed_out).", labels=["type", "outcome"]),
            CounterMetricFamily("tinymq_queue_events", "Queue-wide lifetime event counters.",
                                labels=["event"]),
            GaugeMetricFamily("tinymq_queue_size", "Ready jobs by priority.", labels=["priority"]),
            GaugeMetricFamily("tinymq_delayed_jobs", "Jobs waiting for their run_at or a retry."),
            GaugeMetricFamily("tinymq_active_jobs", "Attempts running now, by type.", labels=["type"]),
            GaugeMetricFamily("tinymq_max_concurrent_jobs", "The concurrency limit of each type.",
                              labels=["type"]),
            HistogramMetricFamily("tinymq_attempt_duration_seconds",
                                  "How long attempts ran until their outcome was decided.",
                                  labels=["type"]),
        ]


def _cumulative(counts: Tuple[int, ...]) -> List[Tuple[str, float]]:
    """Per-bucket counts -> Prometheus' cumulative ``(le, count)`` pairs, +Inf last."""
    buckets: List[Tuple[str, float]] = []
    running = 0
    for label, count in zip(_BUCKET_LABELS, counts):
        running += count
        buckets.append((label, running))
    return buckets
