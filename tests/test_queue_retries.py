"""Retries with backoff, retries/last_error on the job, and failure callbacks.

API.md "Configs" (Backoff), "Job" (retries, last_error) and "Failures are never silent".
"""
import threading
import time

import pytest

from tinymq import ExecutorConfig, Job, Queue, RetryConfig

from _helpers import QUIET, WAIT, FailureLog, Recorder, make_queue, wait_until


class Boom(Exception):
    pass


def fast_retries(max_retries, initial_delay=0.01, max_delay=1.0, backoff_multiple=2.0):
    return RetryConfig(max_retries=max_retries, initial_delay=initial_delay,
                       max_delay=max_delay, backoff_multiple=backoff_multiple)


def test_backoff_gaps_follow_the_formula():
    """The k-th retry starts min(initial * mult**(k-1), max) after the failed attempt ended."""
    ends, starts = [], []

    def flaky(job):
        starts.append(time.monotonic())
        ends.append(time.monotonic())
        raise Boom(len(starts))

    cfg = RetryConfig(max_retries=3, initial_delay=0.1, max_delay=0.3, backoff_multiple=2.0)
    with Queue(10) as q:
        failures = FailureLog(q)
        q.on_failure(failures.callback)
        q.register_executor("t", flaky)
        q.start_dispatcher(1)
        q.enqueue(Job("t", retry_config=cfg))
        assert q.join(WAIT)
    assert len(starts) == 4  # 1 attempt + 3 retries
    expected = [0.1, 0.2, 0.3]  # 0.4 capped at max_delay
    for k, want in enumerate(expected, start=1):
        gap = starts[k] - ends[k - 1]
        assert want * 0.9 <= gap <= want + 1.5, f"retry {k}: gap {gap:.3f}s, want {want}s"
    assert failures.reasons() == ["retries_exhausted"]


def test_backoff_is_measured_from_the_end_of_the_failed_attempt():
    """A long attempt does not eat into the delay before its retry."""
    ends, starts = [], []

    def slow_then_ok(job):
        starts.append(time.monotonic())
        if len(starts) == 1:
            threading.Event().wait(0.3)  # the attempt itself takes a while
            ends.append(time.monotonic())
            raise Boom("slow")

    with Queue(10) as q:
        q.register_executor("t", slow_then_ok)
        q.start_dispatcher(1)
        q.enqueue(Job("t", retry_config=fast_retries(1, initial_delay=0.2)))
        assert q.join(WAIT)
    assert len(starts) == 2
    assert starts[1] - ends[0] >= 0.18


def test_retry_waits_without_holding_a_worker():
    """While a job waits for its retry, the only worker serves other jobs."""
    others = Recorder()
    with Queue(10) as q:
        attempts = []

        def flaky(job):
            attempts.append(time.monotonic())
            if len(attempts) == 1:
                raise Boom()

        q.register_executor("flaky", flaky)
        q.register_executor("other", lambda job: others.add(time.monotonic()))
        q.start_dispatcher(1)
        q.enqueue(Job("flaky", retry_config=fast_retries(1, initial_delay=1.0)))
        assert wait_until(lambda: len(attempts) == 1)
        q.enqueue(Job("other"))
        assert others.wait_for(1, timeout=0.9), "the retry delay held up the worker"
        assert len(attempts) == 1
        assert q.join(WAIT)
        assert len(attempts) == 2


def test_retries_and_last_error_are_kept_on_the_job():
    seen = []  # (retries, last_error) as each attempt sees them

    def flaky(job):
        seen.append((job.retries, job.last_error))
        if len(seen) < 3:
            raise Boom(f"failure number {len(seen)}")

    with Queue(10) as q:
        failures = FailureLog(q)
        q.on_failure(failures.callback)
        q.register_executor("t", flaky)
        q.start_dispatcher(1)
        job = q.enqueue(Job("t", retry_config=fast_retries(3)))
        assert q.join(WAIT)
        stats = q.get_stats()
    assert [r for r, _ in seen] == [0, 1, 2]
    assert seen[0][1] is None
    assert isinstance(seen[1][1], str) and "failure number 1" in seen[1][1]
    assert "failure number 2" in seen[2][1]
    assert job.retries == 2  # failed attempts so far
    assert failures.entries == []
    assert (stats.jobs_succeeded, stats.jobs_failed, stats.jobs_retried) == (1, 0, 2)


def test_retries_exhausted_callback_gets_the_last_exception():
    raised = []

    def always_fails(job):
        exc = Boom(f"attempt {len(raised) + 1}")
        raised.append(exc)
        raise exc

    with Queue(10) as q:
        failures = FailureLog(q)
        q.on_failure(failures.callback)
        q.register_executor("t", always_fails)
        q.start_dispatcher(1)
        job = q.enqueue(Job("t", retry_config=fast_retries(2)))
        assert q.join(WAIT)
        stats = q.get_stats()
    assert len(raised) == 3  # the attempt and max_retries=2 retries
    assert len(failures.entries) == 1
    failed_job, reason, exc, thread, in_callback = failures.entries[0]
    assert failed_job is job
    assert reason == "retries_exhausted"
    assert exc is raised[-1]
    assert thread is not threading.main_thread()  # decided by a worker
    assert job.retries == 3  # failed attempts so far
    assert "attempt 3" in job.last_error
    assert in_callback.jobs_failed == 1  # counted before the callback ran
    assert (stats.jobs_failed, stats.jobs_succeeded, stats.jobs_retried) == (1, 0, 2)


def test_max_retries_zero_fails_after_one_attempt():
    attempts = []
    with Queue(10) as q:
        failures = FailureLog(q)
        q.on_failure(failures.callback)

        def fails(job):
            attempts.append(job)
            raise Boom("once")

        q.register_executor("t", fails)
        q.start_dispatcher(1)
        q.enqueue(Job("t").with_max_retries(0))
        assert q.join(WAIT)
        stats = q.get_stats()
    assert len(attempts) == 1
    assert failures.reasons() == ["retries_exhausted"]
    assert stats.jobs_retried == 0
    assert stats.jobs_failed == 1


def test_default_retry_config_retries_three_times():
    attempts = Recorder()

    def fails(job):
        attempts.add(time.monotonic())
        raise Boom()

    with Queue(10) as q:
        q.register_executor("t", fails)
        q.start_dispatcher(1)
        q.enqueue(Job("t"))  # default: 3 retries, 1 s initial delay
        assert attempts.wait_for(1)
        assert not attempts.wait_for(2, timeout=0.8)  # not before ~1 s
        assert attempts.wait_for(2, timeout=WAIT)
        gap = attempts.items[1] - attempts.items[0]
        assert 0.9 <= gap <= 3.0
        q.stop(wait=True)


def test_jobs_retried_counts_events_across_jobs():
    counts = {}
    lock = threading.Lock()

    def fails_twice(job):
        with lock:
            counts[job.payload] = counts.get(job.payload, 0) + 1
            n = counts[job.payload]
        if n <= 2:
            raise Boom()

    with Queue(10) as q:
        q.register_executor("t", fails_twice)
        q.start_dispatcher(2)
        for i in range(3):
            q.enqueue(Job("t", i, retry_config=fast_retries(5)))
        assert q.join(WAIT)
        stats = q.get_stats()
    assert stats.jobs_retried == 6
    assert stats.jobs_succeeded == 3
    assert stats.jobs_enqueued == 3  # retries are not new enqueues


# --- no_executor --------------------------------------------------------------------------

def test_no_executor_is_reported():
    with Queue(10) as q:
        failures = FailureLog(q)
        q.on_failure(failures.callback)
        q.start_dispatcher(1)
        job = q.enqueue(Job("unknown", retry_config=fast_retries(3)))
        assert q.join(WAIT)
        stats = q.get_stats()
    assert len(failures.entries) == 1
    failed_job, reason, exc, thread, in_callback = failures.entries[0]
    assert failed_job is job
    assert reason == "no_executor"
    assert exc is None
    assert in_callback.jobs_failed == 1
    assert stats.jobs_failed == 1
    assert stats.jobs_succeeded == 0


def test_no_executor_is_decided_at_dispatch_not_at_enqueue():
    seen = Recorder()
    with Queue(10) as q:
        failures = FailureLog(q)
        q.on_failure(failures.callback)
        q.enqueue(Job("late"))  # no executor yet: not a failure until dispatched
        q.register_executor("late", seen.add)
        q.start_dispatcher(1)
        assert q.join(WAIT)
    assert len(seen) == 1
    assert failures.entries == []


def test_no_executor_does_not_disturb_other_jobs():
    seen = Recorder()
    with Queue(10) as q:
        failures = FailureLog(q)
        q.on_failure(failures.callback)
        q.register_executor("known", lambda job: seen.add(job.payload))
        q.start_dispatcher(1)
        q.enqueue(Job("unknown"))
        q.enqueue(Job("known", 1))
        assert q.join(WAIT)
    assert seen.items == [1]
    assert failures.reasons() == ["no_executor"]


# --- on_failure callbacks -----------------------------------------------------------------

def test_on_failure_returns_fn_and_works_as_a_decorator():
    reasons = Recorder()
    with Queue(10) as q:
        def plain(job, reason, exc):
            reasons.add(("plain", reason))

        assert q.on_failure(plain) is plain

        @q.on_failure
        def decorated(job, reason, exc):
            reasons.add(("decorated", reason))

        assert callable(decorated)
        q.start_dispatcher(1)
        q.enqueue(Job("nobody"))
        assert q.join(WAIT)
    assert sorted(reasons.items) == [("decorated", "no_executor"), ("plain", "no_executor")]


def test_every_callback_is_called_even_when_one_raises(caplog):
    calls = Recorder()
    with Queue(10) as q:
        @q.on_failure
        def broken(job, reason, exc):
            calls.add("broken")
            raise RuntimeError("callback blew up")

        @q.on_failure
        def fine(job, reason, exc):
            calls.add("fine")

        seen = Recorder()
        q.register_executor("ok", seen.add)
        q.start_dispatcher(1)
        q.enqueue(Job("nobody"))
        assert q.join(WAIT)
        # the queue keeps working
        q.enqueue(Job("ok"))
        q.enqueue(Job("nobody"))
        assert q.join(WAIT)
        assert len(seen) == 1
        stats = q.get_stats()
    assert sorted(calls.items) == ["broken", "broken", "fine", "fine"]
    assert stats.jobs_failed == 2
    assert stats.jobs_succeeded == 1


def test_callbacks_run_before_join_returns():
    gate = threading.Event()
    finished = threading.Event()
    with Queue(10) as q:
        @q.on_failure
        def slow_callback(job, reason, exc):
            gate.wait(WAIT)
            finished.set()

        q.start_dispatcher(1)
        q.enqueue(Job("nobody"))
        try:
            # the failure is decided, but the job is not finished until the callback returns
            assert q.join(timeout=0.3) is False
        finally:
            gate.set()
        assert q.join(WAIT) is True
        assert finished.is_set()


def test_callback_may_use_the_queue():
    """A callback may enqueue (e.g. to a dead-letter type) without deadlocking."""
    dead_letters = Recorder()
    with Queue(10) as q:
        @q.on_failure
        def to_dead_letter(job, reason, exc):
            if job.type != "dead":
                q.get_stats()
                q.enqueue(Job("dead", (job.type, reason)))

        q.register_executor("dead", lambda job: dead_letters.add(job.payload))

        def fails(job):
            raise Boom()

        q.register_executor("t", fails)
        q.start_dispatcher(1)
        q.enqueue(Job("t").with_max_retries(0))
        q.enqueue(Job("nobody"))
        assert q.join(WAIT)
    assert sorted(dead_letters.items) == [("nobody", "no_executor"), ("t", "retries_exhausted")]


def test_callback_registered_later_sees_later_failures_only():
    early, late = Recorder(), Recorder()
    with Queue(10) as q:
        q.on_failure(lambda job, reason, exc: early.add(reason))
        q.start_dispatcher(1)
        q.enqueue(Job("nobody"))
        assert q.join(WAIT)
        q.on_failure(lambda job, reason, exc: late.add(reason))
        q.enqueue(Job("nobody"))
        assert q.join(WAIT)
    assert len(early) == 2
    assert len(late) == 1


def test_failures_without_callbacks_are_still_counted():
    def fails(job):
        raise Boom()

    with Queue(10) as q:
        q.register_executor("t", fails)
        q.start_dispatcher(1)
        q.enqueue(Job("t").with_max_retries(0))
        q.enqueue(Job("nobody"))
        assert q.join(WAIT)
        assert q.get_stats().jobs_failed == 2


def test_base_exception_subclasses_from_executors_are_failures():
    """An executor raising e.g. SystemExit/KeyboardInterrupt-like errors must not kill the pool."""
    class Custom(BaseException):
        pass

    seen = Recorder()

    def bad(job):
        raise Custom("not an Exception")

    with Queue(10) as q:
        failures = FailureLog(q)
        q.on_failure(failures.callback)
        q.register_executor("bad", bad)
        q.register_executor("ok", seen.add)
        q.start_dispatcher(1)
        q.enqueue(Job("bad").with_max_retries(0))
        assert q.join(WAIT)
        q.enqueue(Job("ok"))
        assert q.join(WAIT)
    assert len(seen) == 1
    assert failures.reasons() == ["permanent_failure"]  # outside the default retry_on=(Exception,)
    assert isinstance(failures.entries[0][2], Custom)


def test_a_callback_raising_a_base_exception_does_not_disturb_the_queue(caplog):
    """API.md: "An exception raised by a callback is logged and does not disturb the queue."

    Also for exceptions outside the Exception hierarchy (a callback calling sys.exit(),
    or a library's BaseException subclass): the job still finishes for join().
    """
    class Fatal(BaseException):
        pass

    seen = Recorder()
    with Queue(10) as q:
        @q.on_failure
        def broken(job, reason, exc):
            raise Fatal("from a callback")

        q.register_executor("ok", seen.add)
        q.start_dispatcher(1)
        q.enqueue(Job("nobody"))
        assert q.join(5.0), "the failed job never finished: the callback's exception escaped"
        q.enqueue(Job("ok"))
        assert q.join(5.0)
        assert len(seen) == 1
        assert q.get_stats().worker_count == 1


def test_a_failure_callback_returning_a_coroutine_is_logged_as_never_run(caplog):
    """A plain callable that returns a coroutine (a lambda around an async def: on_failure cannot
    tell at registration) never runs its body: the queue says so at ERROR, names the callback,
    closes the coroutine (no "never awaited" warning), and calls the other callbacks as usual."""
    import functools
    import warnings

    async def alert(job, reason, exc):  # pragma: no cover - never runs
        raise AssertionError("the body of a coroutine nobody awaits ran")

    def wrapped_sync(*args):
        return alert(*args)

    after = []
    with make_queue() as q:
        q.on_failure(lambda job, reason, exc: alert(job, reason, exc))
        q.on_failure(lambda job, reason, exc: after.append(reason))
        with pytest.raises(TypeError, match="alert"):  # a wraps wrapper of an async def is refused
            q.on_failure(functools.wraps(alert)(wrapped_sync))

        def fail(job):
            raise Boom("no")

        q.register_executor("t", fail, ExecutorConfig())
        q.start_dispatcher(1)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a coroutine never awaited warns at its collection
            with caplog.at_level("ERROR", logger="tinymq"):
                q.enqueue(Job("t", retry_config=RetryConfig(max_retries=0)))
                assert q.join(WAIT)
    assert after == ["retries_exhausted"]
    assert [r for r in caplog.records if "its body never runs" in r.getMessage()], caplog.text
