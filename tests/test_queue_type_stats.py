"""Per-type counters in ExecutorStats (#14), against a model.

``ExecutorStats`` has lifetime counters per job type: ``succeeded``, ``failed``
(for good), ``retried``, ``timed_out`` and ``cancelled``; ``QueueStats`` has
``jobs_cancelled``. A job whose type has no executor (``no_executor``) counts
only queue-wide. Every counter is updated before the callbacks for its event
run, and before ``join()`` sees the job finished.
"""
import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tinymq import Config, ExecutorConfig, ExecutorStats, Job, Queue, QueueStats, RetryConfig

from _helpers import WAIT, FailureLog, examples

MAX_RETRIES = 2
TIMEOUT = 0.05
TYPES = ("a", "b", "slow")  # "slow" has a timeout; "ghost" has no executor

# A plan per job: (type, how many attempts fail before one succeeds; > MAX_RETRIES: never).
plans = st.lists(st.tuples(st.sampled_from(TYPES + ("ghost",)), st.integers(0, MAX_RETRIES + 1)),
                 max_size=25)


def run_plans(job_plans, workers=3):
    """Run every planned job to its end; return the stats, the failure log and the jobs."""
    def fn(job, ctx):
        if job.retries < job.payload:
            if job.type == "slow":
                ctx.wait(WAIT)  # cooperative: returns at the deadline, timed out
                return
            raise ValueError(f"attempt {job.retries + 1} fails")

    q = Queue(config=Config(buffer_size=100))
    log = FailureLog(q)
    q.on_failure(log.callback)
    q.register_executor("a", fn)
    q.register_executor("b", fn, ExecutorConfig(max_concurrent_jobs=1))
    q.register_executor("slow", fn, ExecutorConfig(timeout=TIMEOUT))
    q.start_dispatcher(workers)
    retry = RetryConfig(max_retries=MAX_RETRIES, initial_delay=0)
    jobs = [Job(job_type, failures, retry_config=retry) for job_type, failures in job_plans]
    try:
        for job in jobs:
            q.enqueue(job)
        assert q.join(WAIT)
        return q.get_stats(), log, jobs
    finally:
        q.stop()


def model(job_plans):
    """The expected per-type counters and queue-wide failures."""
    expected = {t: dict(succeeded=0, failed=0, retried=0, timed_out=0, cancelled=0) for t in TYPES}
    no_executor = 0
    for job_type, failures in job_plans:
        if job_type == "ghost":
            no_executor += 1
            continue
        counts = expected[job_type]
        failed_attempts = min(failures, MAX_RETRIES + 1)
        if job_type == "slow":
            counts["timed_out"] += failed_attempts
        if failures > MAX_RETRIES:
            counts["retried"] += MAX_RETRIES
            counts["failed"] += 1
        else:
            counts["retried"] += failures
            counts["succeeded"] += 1
    return expected, no_executor


@settings(max_examples=examples(12), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(job_plans=plans)
def test_per_type_counters_match_the_model(job_plans):
    stats, log, jobs = run_plans(job_plans)
    expected, no_executor = model(job_plans)
    for job_type in TYPES:
        counts = stats.executor_stats[job_type]  # a timed-out attempt may still be active: no check
        got = dict(succeeded=counts.succeeded, failed=counts.failed, retried=counts.retried,
                   timed_out=counts.timed_out, cancelled=counts.cancelled)
        assert got == expected[job_type], job_type
    assert "ghost" not in stats.executor_stats  # no executor: no per-type entry
    # The queue-wide counters are the per-type sums, plus the jobs no executor could run.
    for field in ("succeeded", "retried", "timed_out", "cancelled"):
        assert getattr(stats, f"jobs_{field}") == sum(getattr(stats.executor_stats[t], field) for t in TYPES)
    assert stats.jobs_failed == sum(stats.executor_stats[t].failed for t in TYPES) + no_executor
    assert stats.jobs_cancelled == 0  # nothing cancels until q.cancel() (#13)
    assert sorted(log.reasons()) == sorted(
        ["no_executor"] * no_executor + ["retries_exhausted"] * sum(e["failed"] for e in expected.values()))


def test_counters_are_updated_before_the_failure_callback_runs():
    with Queue(10) as q:
        seen = []
        q.on_failure(lambda job, reason, exc: seen.append(q.get_stats().executor_stats["a"]))
        q.register_executor("a", lambda job: 1 / 0)
        q.start_dispatcher(1)
        q.enqueue(Job("a", retry_config=RetryConfig(max_retries=1, initial_delay=0)))
        assert q.join(WAIT)
    assert seen == [ExecutorStats(active_jobs=0, max_jobs=10, succeeded=0, failed=1, retried=1)]


def test_registering_again_keeps_the_counters():
    with Queue(10) as q:
        q.register_executor("a", lambda job: None)
        q.start_dispatcher(1)
        q.enqueue(Job("a"))
        assert q.join(WAIT)
        q.register_executor("a", lambda job: None, ExecutorConfig(max_concurrent_jobs=2))
        q.enqueue(Job("a"))
        assert q.join(WAIT)
        assert q.get_stats().executor_stats["a"] == ExecutorStats(0, 2, succeeded=2)


def test_a_type_registered_late_does_not_inherit_no_executor_failures():
    with Queue(10) as q:
        q.register_executor("a", lambda job: None)
        q.start_dispatcher(1)
        q.enqueue(Job("late"))
        assert q.join(WAIT)
        q.register_executor("late", lambda job: None)
        stats = q.get_stats()
    assert stats.jobs_failed == 1
    assert stats.executor_stats["late"] == ExecutorStats(0, 10)


def test_evicted_jobs_count_queue_wide_only():
    with Queue(config=Config(buffer_size=10, max_delayed_jobs=1)) as q:
        q.register_executor("a", lambda job: None)
        q.enqueue_delayed(Job("a"), 60)
        q.enqueue_delayed(Job("a"), 60)  # evicts the first
        stats = q.get_stats()
        q.stop(wait=False)
    assert stats.jobs_evicted == 1 and stats.jobs_failed == 0
    assert stats.executor_stats["a"] == ExecutorStats(0, 10)


def test_new_stats_fields_default_to_zero():
    assert ExecutorStats(1, 2) == ExecutorStats(1, 2, 0, 0, 0, 0, 0)
    stats = QueueStats(0, 0, 0, 0, 0, 0)
    assert stats.jobs_cancelled == 0


def test_a_timed_out_attempt_counts_once_and_its_duration_at_the_deadline():
    def stuck(job, ctx):
        ctx.wait(WAIT)

    with Queue(10) as q:
        q.register_executor("slow", stuck, ExecutorConfig(timeout=TIMEOUT))
        q.start_dispatcher(1)
        q.enqueue(Job("slow", retry_config=RetryConfig(max_retries=0)))
        assert q.join(WAIT)
        stats = q.get_stats().executor_stats["slow"]
        counts, total = q._attempt_durations()["slow"]
    assert (stats.timed_out, stats.failed, stats.retried) == (1, 1, 0)
    assert sum(counts) == 1  # decided once, at the deadline; the late return adds nothing
    assert TIMEOUT * 0.9 <= total < TIMEOUT + 5.0


def test_attempt_durations_land_in_their_buckets():
    from tinymq._pick_core import core

    def sleeper(job):
        time.sleep(job.payload)

    with Queue(10) as q:
        q.register_executor("s", sleeper)
        q.start_dispatcher(1)
        for seconds in (0.0, 0.03, 0.3):
            q.enqueue(Job("s", seconds))
        assert q.join(WAIT)
        counts, total = q._attempt_durations()["s"]
    bounds = core.ATTEMPT_DURATION_BUCKETS
    assert len(counts) == len(bounds) + 1 and sum(counts) == 3
    first_at_least = [next(i for i, bound in enumerate(bounds) if bound >= s) for s in (0.0, 0.03, 0.3)]
    # Each sleep lands at or above its own bucket (sleeps may run long, never short).
    filled = [i for i, count in enumerate(counts) for _ in range(count)]
    assert all(got >= low for got, low in zip(sorted(filled), first_at_least))
    assert 0.33 <= total < 0.33 + 5.0
