"""Executor timeouts: decided at the deadline, slots held until return, worker replacement.

API.md "Concurrency limits and timeouts". The cooperative context (``fn(job, ctx)``) and
``ExecutorConfig(interrupt_on_timeout=True)`` are the implementation's documented design
for "the executor is told cooperatively".
"""
import math
import sys
import threading
import time
from datetime import timedelta

import pytest

import tinymq
from tinymq import ExecutorConfig, Job, JobTimeout, Queue, RetryConfig, TinyMQError

from _helpers import QUIET, WAIT, Blocker, FailureLog, Recorder, make_queue, wait_until

TIMEOUT = 0.2


def no_retries():
    return RetryConfig(max_retries=0)


def test_job_timeout_is_a_timeout_error():
    assert issubclass(JobTimeout, TimeoutError)
    assert issubclass(JobTimeout, TinyMQError)


def test_timeout_is_decided_at_the_deadline_while_the_function_still_runs():
    blocker = Blocker()
    with Queue(10) as q, blocker:
        failures = FailureLog(q)
        q.on_failure(failures.callback)
        q.register_executor("t", blocker.fn, ExecutorConfig(timeout=TIMEOUT))
        q.start_dispatcher(1)
        started = time.monotonic()
        job = q.enqueue(Job("t", retry_config=no_retries()))
        assert blocker.wait_started(1)
        assert failures.wait_for(1)
        decided = time.monotonic() - started
        assert TIMEOUT * 0.9 <= decided <= TIMEOUT + 2.0
        failed_job, reason, exc, thread, in_callback = failures.entries[0]
        assert failed_job is job
        assert reason == "retries_exhausted"
        assert isinstance(exc, JobTimeout)
        assert isinstance(exc, TimeoutError)
        assert in_callback.jobs_timed_out == 1
        assert in_callback.jobs_failed == 1
        assert job.retries == 1
        assert job.last_error
        # the function is still running: its slot is still taken
        assert blocker.active == 1
        assert q.get_stats().executor_stats["t"].active_jobs == 1
        # the job is finished for join() even though the function has not returned
        assert q.join(WAIT)
        blocker.release()
        assert blocker.wait_finished(1)
        assert wait_until(lambda: q.get_stats().executor_stats["t"].active_jobs == 0)
        stats = q.get_stats()
        # the late return is ignored: no success, one failure
        assert stats.jobs_succeeded == 0
        assert stats.jobs_failed == 1
        assert stats.jobs_timed_out == 1
        assert len(failures) == 1


def test_a_timeout_longer_than_the_idle_watchdog_sleep_is_decided_at_its_deadline():
    # With nothing running the watchdog sleeps a while, and a start due later than its
    # wake-up does not wake it: it must look again then and decide at the deadline.
    timeout = tinymq._dispatch._IDLE_WATCH * 1.5
    blocker = Blocker()
    with Queue(10) as q, blocker:
        failures = FailureLog(q)
        q.on_failure(failures.callback)
        q.register_executor("t", blocker.fn, ExecutorConfig(timeout=timeout))
        q.start_dispatcher(1)
        watchdog = q._dispatcher.watchdog_alarm
        assert wait_until(lambda: watchdog.armed_at < math.inf)  # asleep, with nothing running
        started = time.monotonic()
        q.enqueue(Job("t", retry_config=no_retries()))
        assert blocker.wait_started(1)
        assert failures.wait_for(1)
        decided = time.monotonic() - started
        assert timeout * 0.9 <= decided <= timeout + 2.0
        assert isinstance(failures.entries[0][2], JobTimeout)
        blocker.release()


def test_a_late_return_does_not_count_as_success_and_the_retry_runs():
    gate = threading.Event()
    attempts = Recorder()

    def fn(job):
        attempts.add(job.retries)
        if len(attempts) == 1:
            gate.wait(WAIT)  # first attempt overruns its deadline, then returns normally

    with Queue(10) as q:
        failures = FailureLog(q)
        q.on_failure(failures.callback)
        q.register_executor("t", fn, ExecutorConfig(timeout=TIMEOUT, max_concurrent_jobs=2))
        q.start_dispatcher(1)
        job = q.enqueue(Job("t", retry_config=RetryConfig(max_retries=1, initial_delay=0.05)))
        try:
            # the retry is scheduled at the deadline and runs on a fresh worker
            assert attempts.wait_for(2), "the retry did not run while the first attempt was stuck"
            assert attempts.items == [0, 1]
        finally:
            gate.set()
        assert q.join(WAIT)
        assert wait_until(lambda: q.get_stats().executor_stats["t"].active_jobs == 0)
        stats = q.get_stats()
    assert failures.entries == []
    assert stats.jobs_succeeded == 1
    assert stats.jobs_timed_out == 1
    assert stats.jobs_retried == 1
    assert stats.jobs_failed == 0


def test_the_slot_stays_taken_until_the_function_returns():
    blocker = Blocker()
    with Queue(10) as q, blocker:
        failures = FailureLog(q)
        q.on_failure(failures.callback)
        q.register_executor("t", blocker.fn, ExecutorConfig(max_concurrent_jobs=1, timeout=TIMEOUT))
        q.start_dispatcher(2)
        q.enqueue(Job("t", "stuck", retry_config=no_retries()))
        assert blocker.wait_started(1)
        q.enqueue(Job("t", "next", retry_config=no_retries()))
        assert failures.wait_for(1)  # "stuck" timed out ...
        assert not blocker.wait_started(2, timeout=QUIET)  # ... but still holds the only slot
        assert q.get_stats().executor_stats["t"].active_jobs == 1
        blocker.release()
        assert blocker.wait_started(2)
        assert blocker.max_active == 1
        assert q.join(WAIT)
    assert blocker.started_payloads() == ["stuck", "next"]


def test_a_stuck_worker_is_replaced_and_the_pool_keeps_its_size():
    stuck = Blocker(name="stuck")
    with make_queue(buffer_size=100) as q, stuck:
        q.register_executor("slow", stuck.fn, ExecutorConfig(timeout=TIMEOUT))
        barrier = threading.Barrier(3, timeout=WAIT)  # two "pair" jobs + the test
        q.register_executor("pair", lambda job: barrier.wait())
        q.start_dispatcher(2)
        q.enqueue(Job("slow", retry_config=no_retries()))
        assert stuck.wait_started(1)
        q.enqueue(Job("pair"))
        q.enqueue(Job("pair"))
        # two pair jobs at once need two serving workers besides the stuck one
        barrier.wait()
        assert q.join(WAIT)
        assert q.get_stats().worker_count == 2
        assert stuck.active == 1


def test_single_worker_pool_keeps_serving_after_a_timeout():
    stuck = Blocker(name="stuck")
    others = Recorder()
    with Queue(100) as q, stuck:
        q.register_executor("slow", stuck.fn, ExecutorConfig(timeout=TIMEOUT))
        q.register_executor("fast", lambda job: others.add(job.payload))
        q.start_dispatcher(1)
        q.enqueue(Job("slow", retry_config=no_retries()))
        assert stuck.wait_started(1)
        for i in range(5):
            q.enqueue(Job("fast", i))
        assert others.wait_for(5), "the pool stopped serving while its worker was stuck"
        assert others.items == list(range(5))


def test_replaced_workers_do_not_grow_the_pool():
    """After the stuck function returns, the pool is back to `workers` threads."""
    stuck = Blocker(name="stuck")
    barrier = threading.Barrier(2, timeout=QUIET)  # two "wide" jobs meet only with 2 workers
    with Queue(100) as q, stuck:
        failures = FailureLog(q)
        q.on_failure(failures.callback)
        q.register_executor("slow", stuck.fn, ExecutorConfig(timeout=TIMEOUT, max_concurrent_jobs=1))
        q.register_executor("wide", lambda job: barrier.wait())
        q.start_dispatcher(1)
        q.enqueue(Job("slow", retry_config=no_retries()))
        assert stuck.wait_started(1)
        assert failures.wait_for(1)
        stuck.release()
        assert stuck.wait_finished(1)
        assert wait_until(lambda: q.get_stats().executor_stats["slow"].active_jobs == 0)
        # with one worker only, the two "wide" jobs run one after the other and both fail
        q.enqueue(Job("wide", retry_config=no_retries()))
        q.enqueue(Job("wide", retry_config=no_retries()))
        assert q.join(WAIT)
        assert q.get_stats().worker_count == 1
        assert failures.reasons() == ["retries_exhausted"] * 3, "more than 1 worker served jobs"


def test_timeouts_are_retried_with_backoff_and_counted_as_events():
    attempts = Recorder()

    def fn(job, ctx):
        attempts.add(time.monotonic())
        ctx.wait(WAIT)  # cooperative: returns at the deadline

    with Queue(10) as q:
        failures = FailureLog(q)
        q.on_failure(failures.callback)
        q.register_executor("t", fn, ExecutorConfig(timeout=0.1))
        q.start_dispatcher(1)
        q.enqueue(Job("t", retry_config=RetryConfig(max_retries=2, initial_delay=0.05)))
        assert q.join(WAIT)
        stats = q.get_stats()
    assert len(attempts) == 3
    assert stats.jobs_timed_out == 3
    assert stats.jobs_retried == 2
    assert stats.jobs_failed == 1
    assert failures.reasons() == ["retries_exhausted"]
    assert isinstance(failures.entries[0][2], JobTimeout)


def test_timeout_none_means_no_timeout():
    gate = threading.Event()

    def fn(job, ctx):
        assert ctx.deadline is None
        assert ctx.remaining() is None
        assert ctx.cancelled is False
        gate.wait(WAIT)

    with Queue(10) as q:
        failures = FailureLog(q)
        q.on_failure(failures.callback)
        q.register_executor("t", fn, ExecutorConfig(timeout=None))
        q.start_dispatcher(1)
        q.enqueue(Job("t", retry_config=no_retries()))
        try:
            assert q.join(timeout=0.5) is False
        finally:
            gate.set()
        assert q.join(WAIT)
        assert q.get_stats().jobs_succeeded == 1
        assert q.get_stats().jobs_timed_out == 0


def test_timeout_given_as_timedelta():
    blocker = Blocker()
    with Queue(10) as q, blocker:
        failures = FailureLog(q)
        q.on_failure(failures.callback)
        q.register_executor("t", blocker.fn, ExecutorConfig(timeout=timedelta(milliseconds=200)))
        q.start_dispatcher(1)
        q.enqueue(Job("t", retry_config=no_retries()))
        assert failures.wait_for(1)
        assert isinstance(failures.entries[0][2], JobTimeout)


def test_decorator_timeout():
    blocker = Blocker()
    with Queue(10) as q, blocker:
        failures = FailureLog(q)
        q.on_failure(failures.callback)
        q.executor("t", max_concurrent_jobs=1, timeout=TIMEOUT)(blocker.fn)
        q.start_dispatcher(1)
        q.enqueue(Job("t", retry_config=no_retries()))
        assert failures.wait_for(1)
        assert isinstance(failures.entries[0][2], JobTimeout)


# --- the cooperative tier -----------------------------------------------------------------

def test_context_exposes_the_deadline_and_is_cancelled_at_it():
    observed = {}

    def fn(job, ctx):
        observed["type"] = type(ctx)
        observed["deadline"] = ctx.deadline
        observed["now"] = time.monotonic()
        observed["remaining"] = ctx.remaining()
        observed["cancelled_before"] = ctx.cancelled
        observed["woke_early"] = ctx.wait(WAIT)
        observed["woke_at"] = time.monotonic()
        observed["cancelled_after"] = ctx.cancelled
        try:
            ctx.check()
        except JobTimeout as exc:
            observed["check"] = exc
            raise

    with Queue(10) as q:
        failures = FailureLog(q)
        q.on_failure(failures.callback)
        q.register_executor("t", fn, ExecutorConfig(timeout=TIMEOUT))
        q.start_dispatcher(1)
        q.enqueue(Job("t", retry_config=no_retries()))
        assert q.join(WAIT)
        assert wait_until(lambda: q.get_stats().executor_stats["t"].active_jobs == 0)
    assert observed["type"] is tinymq.JobContext
    assert observed["deadline"] == pytest.approx(observed["now"] + TIMEOUT, abs=0.1)
    assert 0 < observed["remaining"] <= TIMEOUT
    assert observed["cancelled_before"] is False
    assert observed["woke_early"] is True
    assert observed["deadline"] - 0.01 <= observed["woke_at"] <= observed["deadline"] + 1.0
    assert observed["cancelled_after"] is True
    assert isinstance(observed["check"], JobTimeout)
    assert failures.reasons() == ["retries_exhausted"]
    assert isinstance(failures.entries[0][2], JobTimeout)


def test_context_wait_returns_false_when_not_cancelled():
    results = []

    def fn(job, ctx):
        results.append(ctx.wait(0.01))
        ctx.check()  # not cancelled: does not raise

    with Queue(10) as q:
        q.register_executor("t", fn, ExecutorConfig(timeout=5.0))
        q.start_dispatcher(1)
        q.enqueue(Job("t"))
        assert q.join(WAIT)
        assert q.get_stats().jobs_succeeded == 1
    assert results == [False]


@pytest.mark.parametrize("how", [{"wait": False}, {"wait": True, "timeout": 0.1}])
def test_context_is_cancelled_when_stop_stops_waiting(how):
    entered = threading.Event()
    outcome = {}

    def fn(job, ctx):
        entered.set()
        outcome["woke_early"] = ctx.wait(WAIT)
        outcome["cancelled"] = ctx.cancelled

    q = Queue(10)
    try:
        q.register_executor("t", fn, ExecutorConfig(timeout=None))
        q.start_dispatcher(1)
        q.enqueue(Job("t"))
        assert entered.wait(WAIT)
        started = time.monotonic()
    finally:
        q.stop(**how)
    assert wait_until(lambda: len(outcome) == 2)
    assert time.monotonic() - started < WAIT / 2
    assert outcome == {"woke_early": True, "cancelled": True}


def test_single_argument_function_with_an_optional_second_parameter_gets_only_the_job():
    calls = []

    def fn(job, extra="default"):
        calls.append(extra)

    with Queue(10) as q:
        q.register_executor("t", fn)
        q.start_dispatcher(1)
        q.enqueue(Job("t"))
        assert q.join(WAIT)
    assert calls == ["default"]


# --- the interruption tier ----------------------------------------------------------------

# CPython 3.13 can deliver an asynchronous exception where the executor's own try/except
# does not see it (python/cpython#139622): it still stops the executor, and the worker
# loop still catches it, but the executor cannot catch it itself.
ASYNC_EXCEPTIONS_ESCAPE_TRY = sys.version_info[:2] == (3, 13)


def test_interrupt_on_timeout_raises_job_timeout_inside_a_python_loop():
    seen = {}

    def busy(job):
        deadline = time.monotonic() + WAIT
        try:
            while time.monotonic() < deadline:  # pure-Python loop: interruptible
                pass
        except JobTimeout as exc:
            seen["raised_inside"] = exc
            raise
        seen["ran_to_the_end"] = True

    with Queue(10) as q:
        failures = FailureLog(q)
        q.on_failure(failures.callback)
        q.register_executor("t", busy, ExecutorConfig(timeout=TIMEOUT, interrupt_on_timeout=True))
        q.start_dispatcher(1)
        started = time.monotonic()
        q.enqueue(Job("t", retry_config=no_retries()))
        assert q.join(WAIT)
        # The slot is released only when the function really returned: it returned early.
        assert wait_until(lambda: q.get_stats().executor_stats["t"].active_jobs == 0)
        elapsed = time.monotonic() - started
    assert "ran_to_the_end" not in seen, "the executor was not interrupted"
    if not ASYNC_EXCEPTIONS_ESCAPE_TRY:
        assert "raised_inside" in seen, "JobTimeout was not raised inside the executor"
    assert elapsed < WAIT / 2
    assert failures.reasons() == ["retries_exhausted"]
    assert isinstance(failures.entries[0][2], JobTimeout)


def test_interrupt_does_not_leak_into_the_next_job_on_that_thread():
    seen = Recorder()

    def busy(job):
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            pass

    def quick(job):
        seen.add(threading.current_thread().name)

    with Queue(100) as q:
        failures = FailureLog(q)
        q.on_failure(failures.callback)
        q.register_executor("busy", busy, ExecutorConfig(timeout=TIMEOUT, interrupt_on_timeout=True))
        q.register_executor("quick", quick)
        q.start_dispatcher(1)
        q.enqueue(Job("busy", retry_config=no_retries()))
        assert failures.wait_for(1)
        for _ in range(20):
            q.enqueue(Job("quick", retry_config=no_retries()))
        assert q.join(WAIT)
        stats = q.get_stats()
    assert len(seen) == 20
    assert stats.jobs_succeeded == 20
    assert stats.jobs_failed == 1


def test_interrupt_on_timeout_leaves_a_fast_job_alone():
    with Queue(100) as q:
        failures = FailureLog(q)
        q.on_failure(failures.callback)
        q.register_executor("t", lambda job: None, ExecutorConfig(timeout=5.0, interrupt_on_timeout=True))
        q.start_dispatcher(2)
        for _ in range(50):
            q.enqueue(Job("t"))
        assert q.join(WAIT)
        assert q.get_stats().jobs_succeeded == 50
    assert failures.entries == []


@pytest.mark.timeout(60)
def test_interruptions_racing_with_normal_returns_never_leak_a_slot():
    """Attempts that end right around their deadline: every slot comes back, every job finishes.

    A JobTimeout raised into the thread just as the function returns must not land in
    the queue's own bookkeeping (leaking the type's slot or killing the pool).
    """
    rng_lock = threading.Lock()
    import random
    rng = random.Random(7)

    def around_the_deadline(job):
        with rng_lock:
            spin = rng.uniform(0.006, 0.014)
        end = time.monotonic() + spin
        while time.monotonic() < end:
            pass

    with Queue(1000) as q:
        q.register_executor("t", around_the_deadline, ExecutorConfig(
            max_concurrent_jobs=1, timeout=0.01, interrupt_on_timeout=True))
        q.start_dispatcher(2)
        for i in range(150):
            q.enqueue(Job("t", i, retry_config=no_retries()))
        assert q.join(WAIT * 3), "some jobs never finished"
        assert wait_until(lambda: q.get_stats().executor_stats["t"].active_jobs == 0), \
            "a slot leaked: active_jobs stays above 0 with nothing running"
        stats = q.get_stats()
        assert stats.jobs_succeeded + stats.jobs_failed == 150
        # the pool still serves at its size, and the type still has its slot
        done = Recorder()
        q.register_executor("after", lambda job: done.add(1))
        for _ in range(10):
            q.enqueue(Job("after"))
        q.enqueue(Job("t", "last", retry_config=no_retries()))
        assert q.join(WAIT)
        assert len(done) == 10
