"""Rate limits through the Queue (#14): ``ExecutorConfig(rate_limit=RateLimit(n, per=s))``.

At most ``max_starts`` attempts of a type start in any window of ``per`` seconds;
jobs waiting for the limit keep their place and hold up no other type; the
scheduler wakes when a window opens (nothing polls); retries and timeouts are
attempts like any other; registering the type again changes the limit for later starts.

Start times are recorded by the executors, a little after the core recorded
each start: ``SLACK`` allows for a worker's wake-up between the two (the core
tests check the rule exactly). Every other wait is on events and joins.
"""
import dataclasses
import sys
import threading
import time
from datetime import timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tinymq
from tinymq import Config, ExecutorConfig, Job, Queue, RateLimit, RetryConfig

from _helpers import WAIT, Blocker, FailureLog, Recorder, examples

# Seconds an executor may read the clock after the core recorded its start: a worker's wake-up
# on a loaded 2-core machine, and more with ten threads contending for the GIL (stress). Under
# a load of 15 and more a worker woke over 0.1 s late now and then, so the windows these tests
# check are 0.5 s or longer and the slack half of one: a limiter that let max_starts + 1 starts
# into half a window still fails. The exact bound is assert_no_start_ahead_of_its_window's.
SLACK = 0.25
STRESS_SLACK = 0.25
# The core adds per to a start's time: a sum of floats, a rounding below the clock's own steps.
CLOCK_ROUNDING = 1e-6


def starts_recorder():
    """An executor recording ``(job type, monotonic start)``, and its Recorder."""
    recorder = Recorder()

    def fn(job):
        recorder.add((job.type, time.monotonic()))

    return fn, recorder


def _limited_times(starts, limits):
    """``(job type, its RateLimit, its sorted start times)`` for each rate-limited type in ``starts``."""
    by_type = {}
    for job_type, when in starts:
        by_type.setdefault(job_type, []).append(when)
    for job_type, times in by_type.items():
        rate_limit = limits.get(job_type)
        if rate_limit is not None:
            yield job_type, rate_limit, sorted(times)


def assert_windows_hold(starts, limits, slack=SLACK, began=None, rounding=CLOCK_ROUNDING):
    """No window of ``per - slack`` seconds holds more than ``max_starts`` starts of one type; and,
    given ``began`` (read before the first enqueue), the exact bound of
    ``assert_no_start_ahead_of_its_window``."""
    if began is not None:
        assert_no_start_ahead_of_its_window(starts, limits, began, rounding)
    for job_type, rate_limit, times in _limited_times(starts, limits):
        m = rate_limit.max_starts
        for i in range(len(times) - m):
            gap = times[i + m] - times[i]
            assert gap >= rate_limit.per - slack, (
                f"{job_type}: {m + 1} starts within {gap:.4f}s, limit {m} per {rate_limit.per}s")


def assert_no_start_ahead_of_its_window(starts, limits, began, rounding=CLOCK_ROUNDING):
    """The k-th start (from 0) of a type, as its executor read the clock, comes no earlier than
    ``k // max_starts`` windows after ``began`` (read before the jobs were enqueued).

    Unlike ``assert_windows_hold``, no load makes this fail: an executor reads the clock after the
    core recorded its start, however late, so each sorted reading is no earlier than the core's
    start of the same rank, and those keep to the rule.
    """
    for job_type, rate_limit, times in _limited_times(starts, limits):
        for k, when in enumerate(times):
            windows = k // rate_limit.max_starts
            assert when - began >= windows * rate_limit.per - rounding, (
                f"{job_type}: start {k + 1} {when - began:.4f}s after the enqueue, before window "
                f"{windows + 1} opens ({rate_limit.max_starts} per {rate_limit.per}s)")


# --- RateLimit --------------------------------------------------------------------------------


def test_rate_limit_is_exported_and_immutable():
    assert tinymq.RateLimit is RateLimit
    limit = RateLimit(100, per=60.0)
    assert (limit.max_starts, limit.per) == (100, 60.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        limit.max_starts = 5
    assert RateLimit(3, per=timedelta(milliseconds=250)).per == 0.25
    assert RateLimit(3, per=2).per == 2.0 and isinstance(RateLimit(3, per=2).per, float)
    assert RateLimit(3, per=1.5) == RateLimit(3, per=timedelta(seconds=1.5))


@pytest.mark.parametrize("max_starts, per, error, shown", [
    (0, 1.0, ValueError, "max_starts must be >= 1, got 0"),
    (-3, 1.0, ValueError, "-3"),
    (1.5, 1.0, TypeError, "max_starts must be an int, got 1.5"),
    (True, 1.0, TypeError, "True"),
    ("10", 1.0, TypeError, "'10'"),
    (1, 0, ValueError, "per must be > 0 seconds, got 0"),
    (1, -1.0, ValueError, "-1.0"),
    (1, float("inf"), ValueError, "inf"),
    (1, float("nan"), ValueError, "nan"),
    (1, "60", TypeError, "'60'"),
    (1, None, TypeError, "None"),
    (1, timedelta(0), ValueError, "timedelta"),
    # More starts than any queue can keep (8 bytes each): refused when built, not at register_executor.
    (sys.maxsize // 8 + 1, 1.0, ValueError, f"max_starts must be <= sys.maxsize // 8 ({sys.maxsize // 8}: "),
    (sys.maxsize, 1.0, ValueError, f"got {sys.maxsize}"),
])
def test_rate_limit_is_validated_and_errors_name_the_value(max_starts, per, error, shown):
    with pytest.raises(error, match=shown.replace("(", r"\(").replace(".", r"\.")):
        RateLimit(max_starts, per=per)


def test_the_largest_rate_limit_is_one_every_queue_takes():
    limit = RateLimit(sys.maxsize // 8, per=1.0)
    with Queue() as q:
        q.register_executor("r", lambda job: None, ExecutorConfig(rate_limit=limit))


def test_executor_config_takes_a_rate_limit_or_none():
    assert ExecutorConfig().rate_limit is None
    limit = RateLimit(5, per=1.0)
    assert ExecutorConfig(rate_limit=limit).rate_limit is limit
    with pytest.raises(TypeError, match="rate_limit must be a tinymq.RateLimit or None, got 5"):
        ExecutorConfig(rate_limit=5)
    with pytest.raises(TypeError, match=r"\(5, 1.0\)"):
        ExecutorConfig(rate_limit=(5, 1.0))


# --- the rule, through the Queue --------------------------------------------------------------


def test_starts_keep_to_the_limit_and_nothing_polls():
    # A scheduler_interval of a minute: only a wake-up at each window's opening can finish in time.
    limit = RateLimit(3, per=0.5)
    fn, recorder = starts_recorder()
    with Queue(config=Config(buffer_size=100, scheduler_interval=60.0)) as q:
        q.register_executor("r", fn, ExecutorConfig(rate_limit=limit))
        q.start_dispatcher(4)
        began = time.monotonic()
        for _ in range(10):
            q.enqueue(Job("r"))
        assert q.join(WAIT)
        elapsed = time.monotonic() - began
    starts = recorder.snapshot()
    assert len(starts) == 10
    assert_windows_hold(starts, {"r": limit}, began=began)
    assert elapsed >= 3 * limit.per  # 10 starts at 3 per window: 4 windows
    assert elapsed < 3 * limit.per + 5.0  # and no minute-long poll in between


def test_the_decorator_takes_a_rate_limit():
    fn, recorder = starts_recorder()
    with Queue(10) as q:
        q.executor("r", rate_limit=RateLimit(2, per=0.5))(fn)
        q.start_dispatcher(2)
        began = time.monotonic()
        for _ in range(5):
            q.enqueue(Job("r"))
        assert q.join(WAIT)
    assert_windows_hold(recorder.snapshot(), {"r": RateLimit(2, per=0.5)}, began=began)


limits_strategy = st.lists(
    st.tuples(st.integers(1, 4), st.sampled_from([0.2, 0.25]), st.integers(0, 5)),  # m, per, jobs
    min_size=1, max_size=4)


@settings(max_examples=examples(8), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs=limits_strategy, workers=st.integers(1, 4),
       priorities=st.lists(st.sampled_from(list(tinymq.Priority)), min_size=1, max_size=5))
def test_many_types_keep_to_their_limits(specs, workers, priorities):
    # Not assert_windows_hold: on a heavily loaded machine a worker now and then read the clock
    # more than SLACK after its start, and hypothesis replayed that failure for minutes (see
    # tests/conftest.py, TestTimedOut). The bound below holds however late the clock is read.
    limits = {f"t{i}": RateLimit(m, per=per) for i, (m, per, _) in enumerate(specs)}
    fn, recorder = starts_recorder()
    jobs = [Job(f"t{i}", priority=priorities[(i + k) % len(priorities)])
            for i, (_, _, n) in enumerate(specs) for k in range(n)]
    with Queue(100) as q:
        for job_type, limit in limits.items():
            q.register_executor(job_type, fn, ExecutorConfig(rate_limit=limit))
        q.start_dispatcher(workers)
        began = time.monotonic()
        q.enqueue_many(jobs)
        assert q.join(WAIT)
        stats = q.get_stats()
    starts = recorder.snapshot()
    assert len(starts) == len(jobs)
    assert_no_start_ahead_of_its_window(starts, limits, began)
    for job_type in limits:
        assert stats.executor_stats[job_type].succeeded == sum(1 for job in jobs if job.type == job_type)


def test_a_rate_limited_backlog_never_delays_another_type():
    fast_done, slow_started = Recorder(), Recorder()
    with Queue(500) as q:
        q.register_executor("slow", lambda job: slow_started.add(job), ExecutorConfig(rate_limit=RateLimit(1, per=60.0)))
        q.register_executor("fast", lambda job: fast_done.add(job))
        q.start_dispatcher(2)
        for _ in range(100):  # HIGH: ahead of every fast job, were it admitted
            q.enqueue(Job("slow", priority=tinymq.Priority.HIGH))
        for _ in range(200):
            q.enqueue(Job("fast", priority=tinymq.Priority.LOW))
        assert fast_done.wait_for(200), "the fast type waited behind a rate-limited one"
        assert slow_started.wait_for(1)
        assert not slow_started.wait_for(2, timeout=0.25)  # one start a minute
        assert q.get_stats().high_queue_size == 99  # waiting, in place
        q.stop(wait=False)


def test_rate_and_concurrency_limits_together():
    limit = RateLimit(3, per=0.5)
    with Blocker(hold=WAIT) as blocker:
        starts = Recorder()

        def fn(job):
            starts.add((job.type, time.monotonic()))
            blocker.fn(job)

        with Queue(50) as q:
            q.register_executor("r", fn, ExecutorConfig(max_concurrent_jobs=2, rate_limit=limit))
            q.start_dispatcher(4)
            began = time.monotonic()
            for _ in range(8):
                q.enqueue(Job("r"))
            assert blocker.wait_started(2)
            assert q.get_stats().executor_stats["r"].active_jobs == 2
            blocker.release()
            assert q.join(WAIT)
        assert blocker.max_active <= 2
    assert_windows_hold(starts.snapshot(), {"r": limit}, began=began)


def test_retries_count_as_starts():
    limit = RateLimit(2, per=0.5)
    starts = Recorder()

    def flaky(job):
        starts.add((job.type, time.monotonic()))
        if job.retries < 2:
            raise ConnectionError("try again")

    with Queue(10) as q:
        q.register_executor("r", flaky, ExecutorConfig(rate_limit=limit))
        q.start_dispatcher(3)
        began = time.monotonic()
        for _ in range(2):
            q.enqueue(Job("r", retry_config=RetryConfig(max_retries=3, initial_delay=0)))
        assert q.join(WAIT)
        stats = q.get_stats()
    assert len(starts) == 6  # 2 jobs x 3 attempts, 2 per window
    assert_windows_hold(starts.snapshot(), {"r": limit}, began=began)
    assert (stats.executor_stats["r"].retried, stats.executor_stats["r"].succeeded) == (4, 2)


def test_timed_out_attempts_count_as_starts():
    limit = RateLimit(1, per=0.5)
    starts = Recorder()

    def slow(job, ctx):
        starts.add((job.type, time.monotonic()))
        if job.retries == 0:
            ctx.wait(WAIT)  # returns at the deadline, cancelled

    with Queue(10) as q:
        q.register_executor("r", slow, ExecutorConfig(timeout=0.05, rate_limit=limit))
        q.start_dispatcher(2)
        began = time.monotonic()
        q.enqueue(Job("r", retry_config=RetryConfig(max_retries=1, initial_delay=0)))
        assert q.join(WAIT)
        stats = q.get_stats()
    assert len(starts) == 2
    # The retry was due at once, after a 0.05 s attempt: only the window held it back.
    assert_windows_hold(starts.snapshot(), {"r": limit}, began=began)
    assert stats.executor_stats["r"].timed_out == 1


def test_registering_again_changes_the_limit_for_later_starts():
    fn, recorder = starts_recorder()
    with Queue(20) as q:
        q.register_executor("r", fn, ExecutorConfig(rate_limit=RateLimit(1, per=60.0)))
        q.start_dispatcher(2)
        for _ in range(8):
            q.enqueue(Job("r"))
        assert recorder.wait_for(1)
        assert not recorder.wait_for(2, timeout=0.2)  # closed for a minute
        q.register_executor("r", fn, ExecutorConfig(rate_limit=RateLimit(4, per=60.0)))
        assert recorder.wait_for(4)  # the first start still counts: 3 more
        assert not recorder.wait_for(5, timeout=0.2)
        q.register_executor("r", fn, ExecutorConfig(rate_limit=RateLimit(1, per=0.05)))
        assert recorder.wait_for(5)  # parked for a minute, reopened by the shorter window
        q.register_executor("r", fn)  # no limit
        assert q.join(WAIT)
    assert len(recorder) == 8


def test_stress_many_threads_many_types():
    limits = {f"r{i}": RateLimit(2 + i % 3, per=0.5 + 0.05 * (i % 2)) for i in range(6)}
    limits.update({f"free{i}": None for i in range(3)})
    starts = Recorder()
    failures = []
    per_type = 4  # per producer

    def fn(job):
        starts.add((job.type, time.monotonic()))
        if job.payload % 5 == 0 and job.retries == 0:
            raise ValueError("fails once")

    with Queue(1000) as q:
        q.on_failure(lambda job, reason, exc: failures.append((job, reason)))
        for job_type, limit in limits.items():
            q.register_executor(job_type, fn, ExecutorConfig(rate_limit=limit, max_concurrent_jobs=3))
        q.start_dispatcher(6)
        barrier = threading.Barrier(4)

        def produce(offset):
            barrier.wait(WAIT)
            for k in range(per_type):
                for job_type in limits:
                    q.enqueue(Job(job_type, offset * per_type + k,
                                  retry_config=RetryConfig(max_retries=1, initial_delay=0)))

        producers = [threading.Thread(target=produce, args=(i,)) for i in range(4)]
        began = time.monotonic()
        for thread in producers:
            thread.start()
        for thread in producers:
            thread.join(WAIT)
        assert q.join(30.0)
        stats = q.get_stats()
    assert failures == []
    jobs = 4 * per_type * len(limits)
    retried = sum(1 for payload in range(4 * per_type) if payload % 5 == 0) * len(limits)
    assert len(starts) == jobs + retried
    assert stats.jobs_succeeded == jobs and stats.jobs_retried == retried
    assert_windows_hold(starts.snapshot(), limits, STRESS_SLACK, began=began)


def test_stop_with_parked_jobs_returns_and_leaves_them_unrun():
    done = Recorder()
    q = Queue(10)
    q.register_executor("r", lambda job: done.add(job), ExecutorConfig(rate_limit=RateLimit(1, per=60.0)))
    q.start_dispatcher(2)
    for _ in range(3):
        q.enqueue(Job("r"))
    assert done.wait_for(1)
    log = FailureLog(q)
    q.on_failure(log.callback)
    began = time.monotonic()
    q.stop()
    assert time.monotonic() - began < WAIT
    assert len(done) == 1 and len(log) == 0
    assert q.get_stats().medium_queue_size == 2
