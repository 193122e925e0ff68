"""Stopping, exiting and waiting: what happens to running attempts and accepted jobs.

API.md "Queue" (stop), "Persistence" (an attempt that stop() cancels is not a failure)
and "Clocks and validation" (join that would wait for itself, interpreter exit and
garbage collection, timed-out attempts never waited for, the monotonic clock).
"""
import asyncio
import gc
import logging
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from tinymq import ExecutorConfig, Job, Queue, RetryConfig

from _helpers import QUIET, WAIT, Blocker, FailureLog, Recorder, make_queue, wait_until


def test_join_inside_an_executor_raises_instead_of_deadlocking():
    seen = Recorder()

    def fn(job):
        try:
            q.join(1.0)
        except RuntimeError as exc:
            seen.add(str(exc))

    with Queue(10) as q:
        q.register_executor("t", fn)
        q.start_dispatcher(1)
        q.enqueue(Job("t"))
        assert q.join(WAIT)
    assert len(seen) == 1 and "wait for itself" in seen.snapshot()[0]


def test_join_inside_a_failure_callback_raises_instead_of_deadlocking():
    seen = Recorder()
    with make_queue(buffer_size=10, max_delayed_jobs=1) as q:
        @q.on_failure
        def callback(job, reason, exc):
            try:
                q.join()  # the evicted job finishes only after its callbacks
            except RuntimeError as exc:
                seen.add(str(exc))

        q.enqueue(Job("t", run_at=time.time() + 1000))
        q.enqueue(Job("t", run_at=time.time() + 2000))  # evicts the first, in this thread
        assert seen.wait_for(1)
        assert "wait for itself" in seen.snapshot()[0]


def test_join_during_stop_returns_false_once_stop_returns_with_queued_jobs_left():
    """docs/api.md: join() waits for the attempts a stop() under way lets finish, then
    says False when jobs stop() leaves queued are left (they are never run): no hang."""
    q = make_queue(buffer_size=10)
    with Blocker() as blocker:
        q.register_executor("t", blocker.fn)
        q.start_dispatcher(1)
        q.enqueue(Job("t"))
        q.enqueue(Job("t"))  # queued behind the running one: stop() leaves it unrun
        assert blocker.wait_started(1)
        stopper = threading.Thread(target=q.stop, kwargs={"wait": True})
        stopper.start()
        assert wait_until(lambda: q._dispatcher.stopping)
        outcome = []
        joiner = threading.Thread(target=lambda: outcome.append(q.join(WAIT)))
        joiner.start()
        joiner.join(QUIET)
        assert not outcome  # it waits for the attempt stop() waits for
        blocker.release()
        joiner.join(WAIT)
        stopper.join(WAIT)
    assert outcome == [False]
    assert q.get_stats().jobs_succeeded == 1
    began = time.monotonic()
    assert q.join(WAIT) is False  # after stop() returned: at once
    assert time.monotonic() - began < WAIT / 2


def test_ajoin_during_stop_waits_for_the_attempt_stop_lets_finish():
    """ajoin() as join(): while a stop(wait=True) waits for an attempt that ends the last job,
    ajoin() waits for it too (beyond its wait slices) and returns True."""
    q = make_queue(buffer_size=10)
    with Blocker() as blocker:
        q.register_executor("t", blocker.fn)
        q.start_dispatcher(1)
        q.enqueue(Job("t"))
        assert blocker.wait_started(1)
        stopper = threading.Thread(target=q.stop, kwargs={"wait": True})
        stopper.start()
        assert wait_until(lambda: q._dispatcher.stopping)
        outcome = []
        joiner = threading.Thread(target=lambda: outcome.append(asyncio.run(q.ajoin(WAIT))))
        joiner.start()
        joiner.join(QUIET)  # longer than ajoin's wait slices
        assert not outcome
        blocker.release()
        joiner.join(WAIT)
        stopper.join(WAIT)
    assert outcome == [True]


def test_leaving_with_queue_never_waits_for_an_attempt_that_timed_out():
    release = threading.Event()
    failures_seen = threading.Event()

    def stuck(job):
        release.wait(60)  # ignores its deadline: only the test lets it go

    try:
        started = time.monotonic()
        with Queue(10) as q:
            q.on_failure(lambda job, reason, exc: failures_seen.set())
            q.register_executor("t", stuck, ExecutorConfig(timeout=0.1))
            q.start_dispatcher(1)
            q.enqueue(Job("t", retry_config=RetryConfig(max_retries=0)))
            assert failures_seen.wait(WAIT)
        assert time.monotonic() - started < WAIT
    finally:
        release.set()


def test_a_queue_garbage_collected_without_stop_logs_the_jobs_it_leaves(caplog):
    caplog.set_level(logging.INFO, logger="tinymq")
    q = Queue(10)
    for _ in range(3):
        q.enqueue(Job("t"))
    del q
    gc.collect()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "garbage-collected" in r.getMessage()]
    assert len(warnings) == 1
    assert "3 accepted jobs not run" in warnings[0].getMessage()


def test_explicit_stop_reports_unrun_jobs_at_info(caplog):
    caplog.set_level(logging.INFO, logger="tinymq")
    q = Queue(10)
    q.enqueue(Job("t"))
    q.stop()
    q.stop()
    messages = [r for r in caplog.records if "not run" in r.getMessage()]
    assert [r.levelno for r in messages] == [logging.INFO]


def _run_script(body):
    script = textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)


def test_interpreter_exit_lets_running_attempts_finish_and_logs_the_rest():
    result = _run_script("""
        import logging, threading, time
        from tinymq import ExecutorConfig, Job, Queue
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
        started = threading.Event()
        def slow(job):
            started.set()
            time.sleep(0.5)
            print("finished", job.payload, flush=True)
        q = Queue(10)
        q.register_executor("slow", slow, ExecutorConfig(timeout=30))
        q.start_dispatcher(1)
        for n in range(4):
            q.enqueue(Job("slow", n))
        started.wait(10)
        # the main thread ends here without stop()
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["finished 0"]
    assert "at interpreter exit with 3 accepted jobs not run" in result.stderr


def test_interpreter_exit_never_waits_for_an_attempt_that_timed_out():
    result = _run_script("""
        import threading, time
        from tinymq import ExecutorConfig, Job, Queue, RetryConfig
        failed = threading.Event()
        def forever(job):
            while True:
                time.sleep(0.01)
        q = Queue(10)
        q.on_failure(lambda job, reason, exc: failed.set())
        q.register_executor("t", forever, ExecutorConfig(timeout=0.1))
        q.start_dispatcher(1)
        q.enqueue(Job("t", retry_config=RetryConfig(max_retries=0)))
        assert failed.wait(10)
        print("timed out", flush=True)
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "timed out"


def _step_wall_clock(monkeypatch, seconds):
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + seconds)


class _StepOnRetry:
    """A store that steps the wall clock when the retry is saved: after its run_at was set."""

    def __init__(self, monkeypatch, step):
        self.monkeypatch, self.step = monkeypatch, step

    def save(self, job):
        if job.retries == 1:
            _step_wall_clock(self.monkeypatch, self.step)

    def delete(self, job_id):
        pass

    def load_all(self):
        return []


@pytest.mark.parametrize("step", [-3600.0, 3600.0])
def test_a_wall_clock_step_neither_delays_nor_hastens_a_retry(monkeypatch, step):
    delay = 0.4
    attempts = []
    done = threading.Event()

    def fn(job):
        attempts.append(time.monotonic())
        if len(attempts) == 1:
            raise RuntimeError("first attempt fails")
        done.set()

    retry = RetryConfig(max_retries=1, initial_delay=delay)
    with Queue(10) as q:
        q.set_persistence(_StepOnRetry(monkeypatch, step))
        q.register_executor("t", fn)
        q.start_dispatcher(1)
        q.enqueue(Job("t", retry_config=retry))
        assert done.wait(WAIT)
    waited = attempts[1] - attempts[0]
    assert delay * 0.9 <= waited < delay + 5.0


@pytest.mark.parametrize("step", [-3600.0, 3600.0])
def test_a_wall_clock_step_neither_delays_nor_hastens_a_delayed_job(monkeypatch, step):
    delay = 0.4
    ran = threading.Event()
    with Queue(10) as q:
        q.register_executor("t", lambda job: ran.set())
        q.start_dispatcher(1)
        started = time.monotonic()
        q.enqueue_delayed(Job("t"), delay)
        _step_wall_clock(monkeypatch, step)
        assert ran.wait(WAIT)
        waited = time.monotonic() - started
    assert delay * 0.9 <= waited < delay + 5.0


def test_stop_keeps_the_blocker_waiting_attempts_bounded_by_timeout():
    blocker = Blocker()
    with blocker:
        q = Queue(10)
        q.register_executor("t", blocker.fn, ExecutorConfig(timeout=None))
        q.start_dispatcher(1)
        q.enqueue(Job("t"))
        assert blocker.wait_started(1)
        started = time.monotonic()
        q.stop(timeout=0.2)  # a non-cooperative attempt: stop gives up waiting after 0.2 s
        assert time.monotonic() - started < WAIT / 2


def test_start_dispatcher_does_no_work_per_worker_that_grows_with_the_workers(monkeypatch):
    """start_dispatcher(n) took time quadratic in n: starting each thread looked at every thread
    started before it (whether it was alive). Starting n workers is linear now; counted here as
    those looks, since a timing bound would be either loose or flaky."""
    workers = 200
    looks = []
    real_is_alive = threading.Thread.is_alive

    def counted_is_alive(thread):
        looks.append(thread)
        return real_is_alive(thread)

    q = Queue(10)
    monkeypatch.setattr(threading.Thread, "is_alive", counted_is_alive)
    try:
        q.start_dispatcher(workers)
        during_start = len(looks)
        started = q.get_stats().worker_count
    finally:
        monkeypatch.undo()
        q.stop()
    assert started == workers
    assert during_start < workers, f"{during_start} looks at threads to start {workers} workers"
