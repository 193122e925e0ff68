"""Findings of attackGG over Redis: a failure for good decided while stop() releases.

api.md "Failures are never silent" and docs/redis.md: a job that fails for good is reported
once, by the process that ran the attempt, or, when that process no longer holds it (its
stop() handed it back), by another process that runs it again or reaps the report.
"""
import threading

from tinymq import Job, RetryConfig

from _backends import Redis
from _helpers import WAIT, Recorder


def test_a_failure_decided_while_stop_releases_is_reported_once_not_here_and_elsewhere(redis_url):
    """stop(wait=False) leaves a plain fn(job) attempt running; it fails for good just as stop()
    gives back what this process holds (after stop() stopped waiting for failure callbacks, before
    the release is sent). Its outcome comes too late to be this process's: no callback runs here,
    and another process reports the job once (it runs again there, or reaps the report)."""
    shared = Redis(redis_url, lease=1.0)
    started, go, decided, releasing = (threading.Event() for _ in range(4))
    reports = Recorder()
    try:
        first = shared.queue()

        def fails_when_told(job):
            started.set()
            go.wait(WAIT)
            raise ValueError("too late")

        first.register_executor("t", fails_when_told)
        first.on_failure(lambda job, reason, exc: reports.add(("first", job.id, reason)))
        first.start_dispatcher(1)
        job = first.enqueue(Job("t", retry_config=RetryConfig(max_retries=0)))
        assert started.wait(WAIT)
        link = first._link
        decide = link._decide

        def noted_decide(*args, **kwargs):
            try:
                return decide(*args, **kwargs)
            finally:
                decided.set()

        link._decide = noted_decide
        not_held = link.not_held

        def noted_not_held(*args, **kwargs):  # (handed back by stop(): decided as no longer held)
            try:
                return not_held(*args, **kwargs)
            finally:
                decided.set()

        link.not_held = noted_not_held
        stopping = threading.get_ident()

        class ReleaseLock:
            """stop()'s release takes the round lock: the attempt fails just then."""

            def __init__(self, lock):
                self.lock = lock

            def __enter__(self):
                if threading.get_ident() == stopping and not go.is_set():
                    go.set()
                    decided.wait(WAIT)
                    self.lock.acquire()
                    releasing.set()
                    return
                if go.is_set():  # (the worker: the release goes first)
                    releasing.wait(WAIT)
                self.lock.acquire()

            def __exit__(self, *exc):
                self.lock.release()

            def acquire(self, timeout=-1):  # (stop() waits for it with a timeout)
                self.__enter__()
                return True

            def release(self):
                self.lock.release()

            def _is_owned(self):  # (the link's locks are RLocks taken with _sections.section)
                return self.lock._is_owned()

        link._round_lock = ReleaseLock(link._round_lock)
        first.stop(wait=False)
        assert decided.is_set(), "the attempt's failure was not decided while stop() released"

        second = shared.queue()
        second.register_executor("t", lambda job: (_ for _ in ()).throw(ValueError("again")))
        second.on_failure(lambda job, reason, exc: reports.add(("second", job.id, reason)))
        second.start_dispatcher(1)
        assert second.join(WAIT)
        stats = second.get_stats()
    finally:
        go.set()
        shared.close()
    assert [(job_id, reason) for _, job_id, reason in reports.snapshot()] == [(job.id, "retries_exhausted")], \
        reports.snapshot()
    assert stats.jobs_failed == 1
