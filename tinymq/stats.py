"""Snapshots of a queue's state: QueueStats and ExecutorStats."""
from dataclasses import dataclass, field
from typing import Dict

__all__ = ["QueueStats", "ExecutorStats"]


@dataclass(frozen=True)
class ExecutorStats:
    """One job type: ``active_jobs`` attempts are running now, ``max_jobs`` its ``max_concurrent_jobs``.

    ``active_jobs`` stays at most ``max_jobs``, except after the type was registered again
    with a lower limit: the attempts already running keep their slots until they end. An
    attempt counts from the moment a worker takes its job (before a store writes its start and
    its function is called); a job handed to a worker thread that has not taken it yet as
    ``stop()`` closes the queue is taken back then, and counts as ready, never as running, as
    is a job the event loop took for an async executor and has not started.

    Lifetime event counters of the type, like QueueStats' ``jobs_*``:
    ``succeeded``, ``failed`` (for good), ``retried``, ``timed_out``, ``cancelled``.
    A job whose type has no executor (reason ``no_executor``) is counted in
    ``QueueStats.jobs_failed`` only.
    """

    active_jobs: int
    max_jobs: int
    succeeded: int = 0
    failed: int = 0
    retried: int = 0
    timed_out: int = 0
    cancelled: int = 0


@dataclass(frozen=True)
class QueueStats:
    """A consistent snapshot of the queue, taken by ``Queue.get_stats()``.

    Sizes are ready jobs per priority; ``delayed_jobs_count`` the jobs not due yet
    (a due one counts as ready from its due time on, moved or not); the ``jobs_*`` fields
    are lifetime event counters. ``waiting_for_room`` counts due jobs, retries and
    recovered jobs that are owed a place in a full ready buffer (they are never dropped).
    """

    high_queue_size: int
    medium_queue_size: int
    low_queue_size: int
    delayed_jobs_count: int
    max_delayed_jobs: int
    worker_count: int
    executor_stats: Dict[str, ExecutorStats] = field(default_factory=dict)
    jobs_enqueued: int = 0
    jobs_succeeded: int = 0
    jobs_failed: int = 0
    jobs_retried: int = 0
    jobs_timed_out: int = 0
    jobs_evicted: int = 0
    jobs_cancelled: int = 0
    waiting_for_room: int = 0
