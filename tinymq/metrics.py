"""Prometheus metrics for a Queue: ``tinymq.metrics.PrometheusCollector``.

Needs the optional extra ``pip install 'tinymq[prometheus]'`` (``prometheus_client``).
The collector reads the queue when it is scraped, so nothing is counted twice and the
per-job path pays nothing for it::

    from prometheus_client import REGISTRY
    from tinymq.metrics import PrometheusCollector

    REGISTRY.register(PrometheusCollector(q))

A process with several queues gives one collector all of them, by name; every sample
then has a ``queue`` label (``prometheus_client`` refuses two collectors of the same
metric names in one registry, whatever their labels)::

    REGISTRY.register(PrometheusCollector({"mail": mail_queue, "thumbnails": thumbnail_queue}))

Metrics (``type`` is a job type with a registered executor; a type or queue name is its own
label, unless it holds a lone surrogate, as ``os.fsdecode`` makes of bytes that are not UTF-8,
or the two characters ``\\u``: then each backslash is written ``\\\\`` and each lone surrogate
``\\udcff``, so no two names share a label; see ``_label``):

- ``tinymq_jobs_total{type, outcome}`` (counter): ``outcome`` is ``succeeded``,
  ``failed`` (for good), ``retried``, ``timed_out`` or ``cancelled``: the per-type
  counters of ``ExecutorStats``, which never go down (an outcome is counted once it is
  decided, and stays counted: over Redis, one that the process counted before it heard
  that Redis ended the job otherwise, cancelled by another process or handed to another
  after a reap, stays counted as it was decided; docs/redis.md, ``get_stats()``);
- ``tinymq_queue_events_total{event}`` (counter): the queue-wide counters of
  ``QueueStats`` (``enqueued``, ``succeeded``, ``failed``, ``retried``, ``timed_out``,
  ``evicted``, ``cancelled``); jobs whose type has no executor count only here;
- ``tinymq_queue_size{priority}`` (gauge): ready jobs, ``priority`` is ``high``,
  ``medium`` or ``low``; ``tinymq_delayed_jobs`` (gauge): jobs waiting for their ``run_at``;
  ``tinymq_waiting_for_room_jobs`` (gauge): due jobs, retries and recovered jobs owed a
  place in the full ready buffer (``QueueStats.waiting_for_room``);
- ``tinymq_active_jobs{type}`` and ``tinymq_max_concurrent_jobs{type}`` (gauges);
- ``tinymq_attempt_duration_seconds{type}`` (histogram): how long attempts ran, measured
  when each attempt's outcome is decided (a timed-out attempt at its deadline; over Redis,
  as its retry or failure is decided, not if stop() handed it back first), with the
  fixed buckets ``ATTEMPT_DURATION_BUCKETS`` (1 ms to 300 s) and +Inf;
- ``tinymq_broker_up`` (gauge, queues with a broker only): 1 when the scrape read the shared
  queue's figures from Redis, 0 when it could not.

A scrape waits for Redis ``_SCRAPE_WAIT`` in all, not redis-py's socket timeout (10 s) per
queue: a queue whose shared figures are not read by then (a frozen server), or cannot be
(``TinyMQError``: its Redis unreachable), has them left out of that scrape, its
``tinymq_broker_up`` 0 and a WARNING logged, and its process's own figures (per type, and the
durations) still in it: an exception would fail the whole exposition, the other queues'
samples and the registry's other collectors with it, and a scrape held past Prometheus's
scrape timeout is lost whole.
"""
import logging
import time
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple, Union

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
from .errors import TinyMQError
from .job import _is_utf8
from .queue import Queue
from .stats import QueueStats

__all__ = ["PrometheusCollector", "ATTEMPT_DURATION_BUCKETS"]

logger = logging.getLogger("tinymq")

# Upper bounds, in seconds, of the attempt-duration histogram's buckets (then +Inf).
ATTEMPT_DURATION_BUCKETS: Tuple[float, ...] = tuple(core.ATTEMPT_DURATION_BUCKETS)

# ExecutorStats field -> the outcome label of tinymq_jobs_total
_OUTCOMES = ("succeeded", "failed", "retried", "timed_out", "cancelled")
# QueueStats field -> the event label of tinymq_queue_events_total
_QUEUE_EVENTS = (("jobs_enqueued", "enqueued"), ("jobs_succeeded", "succeeded"),
                 ("jobs_failed", "failed"), ("jobs_retried", "retried"),
                 ("jobs_timed_out", "timed_out"), ("jobs_evicted", "evicted"),
                 ("jobs_cancelled", "cancelled"))
_go_text: Callable[[float], str] = floatToGoString  # (prometheus_client leaves it untyped)
# Seconds a scrape waits in all for the shared figures of its queues on a broker (each read gets half
# a second at least): well within Prometheus's default scrape timeout (10 s).
_SCRAPE_WAIT = 2.0
_BUCKET_LABELS = [_go_text(bound) for bound in ATTEMPT_DURATION_BUCKETS] + ["+Inf"]


class PrometheusCollector(Collector):  # type: ignore[misc, unused-ignore]  # Collector is Any without prometheus_client
    """A ``prometheus_client`` collector of one Queue's stats, or of several queues' by
    name (a ``queue`` label); register it yourself.

    A registered collector keeps its queues alive: unregister it when they are done.
    """

    def __init__(self, queue: Union[Queue, Mapping[str, Queue]]) -> None:
        if isinstance(queue, Queue):
            self._queues: Dict[Optional[str], Queue] = {None: queue}
            return
        if not isinstance(queue, Mapping):
            raise TypeError(f"PrometheusCollector needs a tinymq.Queue, or a mapping of names to "
                            f"queues, got {queue!r}")
        if not queue:
            raise ValueError("PrometheusCollector needs at least one queue, got an empty mapping")
        for name, each in queue.items():
            if not isinstance(name, str) or not name:
                raise TypeError(f"a queue's name (its label) must be a non-empty str, got {name!r}")
            if not isinstance(each, Queue):
                raise TypeError(f"PrometheusCollector needs tinymq.Queue values, got {each!r} for {name!r}")
        self._queues = {name: each for name, each in queue.items()}

    def describe(self) -> Iterator[Any]:
        """The metric families without samples: registering reads nothing from the queues."""
        return iter(self._families())

    def collect(self) -> Iterator[Any]:
        families = self._families()
        (jobs, events, sizes, delayed, waiting, active, limits, histogram) = families[:8]
        broker_up = families[8] if len(families) > 8 else None  # (there when a queue has a broker)
        read_by = time.monotonic() + _SCRAPE_WAIT
        for name, queue in self._queues.items():
            at = [] if name is None else [_label(name)]  # the queue label's value, first of each sample's
            stats: Optional[QueueStats] = None
            try:
                stats = queue._stats_by(read_by)
            except TinyMQError as exc:  # (its Redis unreachable or silent) an exception would fail the whole scrape
                logger.warning("tinymq metrics: the shared figures of %s are left out of this scrape: %s",
                               "the queue" if name is None else f"queue {name!r}", exc)
            if broker_up is not None and queue.broker is not None:
                broker_up.add_metric(at, 0 if stats is None else 1)
            durations = queue._attempt_durations()
            executors = queue._executor_stats() if stats is None else stats.executor_stats
            for job_type, executor in sorted(executors.items()):
                label = _label(job_type)
                for outcome in _OUTCOMES:
                    jobs.add_metric(at + [label, outcome], getattr(executor, outcome))
                active.add_metric(at + [label], executor.active_jobs)
                limits.add_metric(at + [label], executor.max_jobs)
                counts, total_seconds = durations.get(job_type, ((0,) * len(_BUCKET_LABELS), 0.0))
                histogram.add_metric(at + [label], _cumulative(counts), total_seconds)
            if stats is None:
                continue
            for field, event in _QUEUE_EVENTS:
                events.add_metric(at + [event], getattr(stats, field))
            sizes.add_metric(at + ["high"], stats.high_queue_size)
            sizes.add_metric(at + ["medium"], stats.medium_queue_size)
            sizes.add_metric(at + ["low"], stats.low_queue_size)
            delayed.add_metric(at, stats.delayed_jobs_count)
            waiting.add_metric(at, stats.waiting_for_room)
        return iter(families)

    def _families(self) -> List[Any]:
        by = [] if None in self._queues else ["queue"]
        families = [
            CounterMetricFamily("tinymq_jobs", "Jobs by type and outcome (attempts for "
                                "retried and timed_out).", labels=by + ["type", "outcome"]),
            CounterMetricFamily("tinymq_queue_events", "Queue-wide lifetime event counters.",
                                labels=by + ["event"]),
            GaugeMetricFamily("tinymq_queue_size", "Ready jobs by priority.", labels=by + ["priority"]),
            GaugeMetricFamily("tinymq_delayed_jobs", "Jobs waiting for their run_at or a retry.", labels=by),
            GaugeMetricFamily("tinymq_waiting_for_room_jobs", "Due jobs, retries and recovered jobs owed a "
                              "place in the full ready buffer.", labels=by),
            GaugeMetricFamily("tinymq_active_jobs", "Attempts running now, by type.", labels=by + ["type"]),
            GaugeMetricFamily("tinymq_max_concurrent_jobs", "The concurrency limit of each type.",
                              labels=by + ["type"]),
            HistogramMetricFamily("tinymq_attempt_duration_seconds",
                                  "How long attempts ran until their outcome was decided.",
                                  labels=by + ["type"]),
        ]
        if any(queue.broker is not None for queue in self._queues.values()):
            families.append(GaugeMetricFamily(
                "tinymq_broker_up", "1 when this scrape read the shared queue's figures from its broker, 0 "
                "when it could not (they are left out of the scrape).", labels=by))
        return families


def _label(text: str) -> str:
    """A job type or queue name as a label value, which goes out as UTF-8 (a lone surrogate, as in a
    type from os.fsdecode, would fail the scrape): as is, unless it holds a lone surrogate or the
    two characters ``\\u``; then each backslash is doubled and each lone surrogate written
    ``\\udcff``. One to one: every label so escaped holds ``\\u`` (an escaped surrogate, or a
    doubled backslash before ``u``) and no label left as is does, and the escape is undone
    left to right: the text ``\\udcff`` is labelled ``\\\\udcff``, the lone surrogate U+DCFF ``\\udcff``."""
    if "\\u" not in text and _is_utf8(text):
        return text
    return text.replace("\\", "\\\\").encode("utf-8", "backslashreplace").decode("utf-8")


def _cumulative(counts: Tuple[int, ...]) -> List[Tuple[str, float]]:
    """Per-bucket counts -> Prometheus' cumulative ``(le, count)`` pairs, +Inf last."""
    buckets: List[Tuple[str, float]] = []
    running = 0
    for label, count in zip(_BUCKET_LABELS, counts):
        running += count
        buckets.append((label, running))
    return buckets
