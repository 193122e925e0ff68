"""QueueStats and ExecutorStats: fields, exact active_jobs, lifetime counters.

API.md "Stats".
"""
import dataclasses
import threading
import time

import pytest

from tinymq import ExecutorConfig, ExecutorStats, Job, Priority, Queue, QueueStats, RetryConfig

from _helpers import QUIET, WAIT, Blocker, FailureLog, Recorder, make_queue, wait_until

COUNTERS = ["jobs_enqueued", "jobs_succeeded", "jobs_failed", "jobs_retried", "jobs_timed_out", "jobs_evicted"]


def counters(stats):
    return {name: getattr(stats, name) for name in COUNTERS}


def test_stats_is_a_frozen_dataclass_with_the_contract_fields():
    assert dataclasses.is_dataclass(QueueStats)
    assert dataclasses.is_dataclass(ExecutorStats)
    with Queue(10) as q:
        stats = q.get_stats()
    assert isinstance(stats, QueueStats)
    for name in ["high_queue_size", "medium_queue_size", "low_queue_size", "delayed_jobs_count",
                 "max_delayed_jobs", "worker_count", "executor_stats"] + COUNTERS:
        assert hasattr(stats, name), name
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.jobs_enqueued = 5
    assert ExecutorStats(active_jobs=1, max_jobs=2) == ExecutorStats(1, 2)


def test_fresh_queue_stats():
    with make_queue(max_delayed_jobs=123) as q:
        stats = q.get_stats()
    assert (stats.high_queue_size, stats.medium_queue_size, stats.low_queue_size) == (0, 0, 0)
    assert stats.delayed_jobs_count == 0
    assert stats.max_delayed_jobs == 123
    assert stats.executor_stats == {}
    assert set(counters(stats).values()) == {0}


def test_queue_sizes_per_priority_and_delayed_count():
    with Queue(100) as q:
        for p, n in [(Priority.HIGH, 3), (Priority.MEDIUM, 2), (Priority.LOW, 1)]:
            for _ in range(n):
                q.enqueue(Job("t", priority=p))
        q.enqueue_delayed(Job("t", priority=Priority.HIGH), 3600)
        stats = q.get_stats()
    assert (stats.high_queue_size, stats.medium_queue_size, stats.low_queue_size) == (3, 2, 1)
    assert stats.delayed_jobs_count == 1
    assert stats.jobs_enqueued == 7


def test_worker_count():
    with Queue(10) as q:
        q.start_dispatcher(3)
        assert q.get_stats().worker_count == 3


def test_executor_stats_per_registered_type():
    with Queue(10) as q:
        q.register_executor("a", lambda job: None, ExecutorConfig(max_concurrent_jobs=4))
        q.register_executor("b", lambda job: None)
        stats = q.get_stats().executor_stats
    assert set(stats) == {"a", "b"}
    assert stats["a"] == ExecutorStats(active_jobs=0, max_jobs=4)
    assert stats["b"] == ExecutorStats(active_jobs=0, max_jobs=10)


def test_active_jobs_equals_attempts_running_now():
    a, b = Blocker(name="a"), Blocker(name="b")
    with Queue(100) as q, a, b:
        q.register_executor("a", a.fn, ExecutorConfig(max_concurrent_jobs=3))
        q.register_executor("b", b.fn, ExecutorConfig(max_concurrent_jobs=5))
        q.start_dispatcher(4)
        for _ in range(5):
            q.enqueue(Job("a"))
        assert a.wait_started(3)
        q.enqueue(Job("b"))
        assert b.wait_started(1)
        stats = q.get_stats()
        assert stats.executor_stats["a"] == ExecutorStats(active_jobs=3, max_jobs=3)
        assert stats.executor_stats["b"] == ExecutorStats(active_jobs=1, max_jobs=5)
        assert stats.medium_queue_size == 2  # the two "a" jobs waiting for a slot
        a.release()
        assert a.wait_finished(5)
        assert wait_until(lambda: q.get_stats().executor_stats["a"].active_jobs == 0)
        assert q.get_stats().executor_stats["b"].active_jobs == 1
        b.release()
        assert q.join(WAIT)
        stats = q.get_stats()
    assert stats.executor_stats["a"].active_jobs == 0
    assert stats.executor_stats["b"].active_jobs == 0
    assert stats.jobs_succeeded == 6


def test_active_jobs_seen_from_inside_the_executor():
    seen = []
    barrier = threading.Barrier(2, timeout=WAIT)

    with Queue(10) as q:
        def fn(job):
            barrier.wait()  # both attempts are running now
            seen.append(q.get_stats().executor_stats["t"].active_jobs)
            barrier.wait()

        q.register_executor("t", fn)
        q.start_dispatcher(2)
        q.enqueue(Job("t"))
        q.enqueue(Job("t"))
        assert q.join(WAIT)
    assert seen == [2, 2]


def test_counters_after_a_mixed_workload():
    def fn(job):
        if job.payload == "fail":
            raise ValueError("no")
        if job.payload == "flaky" and job.retries == 0:
            raise ValueError("once")

    with make_queue(max_delayed_jobs=1) as q:
        q.register_executor("t", fn)
        q.start_dispatcher(2)
        # phase 1: one eviction
        q.enqueue(Job("t", "evicted", run_at=time.time() + 3600))
        q.enqueue_delayed(Job("t", "ok-later"), 0.05)  # evicts the one above
        assert q.join(WAIT)
        # phase 2: successes, a retry that succeeds, a permanent failure, no executor
        # (initial_delay=0: the retries do not pass through the size-1 delayed set)
        quick = RetryConfig(max_retries=1, initial_delay=0.0)
        q.enqueue(Job("t", "ok"))
        q.enqueue(Job("t", "flaky", retry_config=quick))
        q.enqueue(Job("t", "fail", retry_config=quick))
        q.enqueue(Job("nobody"))
        assert q.join(WAIT)
        stats = q.get_stats()
    assert counters(stats) == {
        "jobs_enqueued": 6,
        "jobs_succeeded": 3,   # ok, flaky, ok-later
        "jobs_failed": 2,      # fail, nobody (an eviction counts in jobs_evicted)
        "jobs_retried": 2,     # flaky once, fail once
        "jobs_timed_out": 0,
        "jobs_evicted": 1,
    }
    assert stats.delayed_jobs_count == 0


def test_counters_are_updated_before_the_callback_for_the_same_event():
    def fails(job):
        raise ValueError("no")

    with make_queue(max_delayed_jobs=1) as q:
        failures = FailureLog(q)
        q.on_failure(failures.callback)
        q.register_executor("t", fails)
        q.start_dispatcher(1)
        q.enqueue(Job("t", retry_config=RetryConfig(max_retries=1, initial_delay=0.01)))
        assert q.join(WAIT)
        q.enqueue(Job("nobody"))
        assert q.join(WAIT)
        q.enqueue(Job("t", run_at=time.time() + 3600))
        q.enqueue(Job("t", run_at=time.time() + 7200))
    reasons_and_stats = [(e[1], e[4]) for e in failures.entries]
    assert [r for r, _ in reasons_and_stats] == ["retries_exhausted", "no_executor", "evicted"]
    exhausted, no_executor, evicted = (s for _, s in reasons_and_stats)
    assert (exhausted.jobs_failed, exhausted.jobs_retried) == (1, 1)
    assert no_executor.jobs_failed == 2
    assert evicted.jobs_evicted == 1
    assert evicted.jobs_enqueued == 4  # the evicting job was accepted


def test_jobs_enqueued_does_not_count_rejected_jobs():
    from tinymq import QueueFull
    with Queue(1) as q:
        q.enqueue(Job("t"))
        for _ in range(3):
            with pytest.raises(QueueFull):
                q.enqueue(Job("t"))
        assert q.get_stats().jobs_enqueued == 1


def test_stats_snapshot_does_not_change_afterwards():
    with Queue(10) as q:
        before = q.get_stats()
        q.enqueue(Job("t"))
        assert before.medium_queue_size == 0
        assert before.jobs_enqueued == 0
        assert q.get_stats().jobs_enqueued == 1


def _wait_for_the_clock(past):
    """Until the monotonic clock (the one delayed jobs are due on) has passed ``past``."""
    while time.monotonic() <= past:
        time.sleep(max(past - time.monotonic(), 0.001))


# Fixed (duecount): a due delayed job counted nowhere until the scheduler moved it (before
# start_dispatcher: until then), so the sizes and delayed_jobs_count summed to fewer jobs than the
# queue held. It counts where moving it would put it: ready at its priority while the buffer has
# room, then waiting_for_room, in the order the scheduler moves them (earliest due first).
def test_a_due_job_not_yet_moved_counts_where_moving_it_would_put_it():
    with make_queue(buffer_size=2) as q:  # no dispatcher: no scheduler moves anything
        q.enqueue(Job("t", priority=Priority.LOW))
        q.enqueue_delayed(Job("t", priority=Priority.MEDIUM), 0.05)
        q.enqueue_delayed(Job("t", priority=Priority.HIGH), 0.1)  # due later: no room left for it
        q.enqueue_delayed(Job("t"), 3600)
        _wait_for_the_clock(time.monotonic() + 0.1)
        stats = q.get_stats()
    assert (stats.high_queue_size, stats.medium_queue_size, stats.low_queue_size) == (0, 1, 1)
    assert (stats.waiting_for_room, stats.delayed_jobs_count) == (1, 1)
    assert stats.jobs_enqueued == 4
