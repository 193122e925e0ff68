"""auditY: statements of /work/shared/API.md that the code did not keep.

Each test names the section of API.md it checks. Run on both cores (the pure twin
with TINYMQ_NO_EXTENSIONS=1) and, where API.md says it holds over a broker, on Redis.
"""
import threading
import time

import pytest

from tinymq import Job, PermanentFailure, RetryConfig

from _backends import Redis
from _helpers import WAIT


def test_per_type_counters_count_over_a_broker(redis_url):
    """API.md "More stats": ExecutorStats has per-type lifetime counters ``succeeded``,
    ``failed``, ``retried``, ``timed_out``, ``cancelled``; "Scale-out": everything above holds
    across processes, ``get_stats()`` included. One Queue on a broker runs one job that
    succeeds, one that is retried once and then fails for good: its own types' counters
    must show it (they count the events this process's attempts decided, as get_stats shows
    this process's executors)."""
    backend = Redis(redis_url)
    try:
        q = backend.queue()
        q.register_executor("ok", lambda job: None)

        def fail(job):
            raise PermanentFailure("no") if job.retries else ValueError("once")

        q.register_executor("bad", fail)
        q.start_dispatcher(1)
        q.enqueue(Job("ok"))
        q.enqueue(Job("bad", retry_config=RetryConfig(max_retries=3, initial_delay=0)))
        assert q.join(WAIT)
        stats = q.get_stats()
        assert (stats.jobs_succeeded, stats.jobs_failed, stats.jobs_retried) == (1, 1, 1)
        assert stats.executor_stats["ok"].succeeded == 1
        assert (stats.executor_stats["bad"].failed, stats.executor_stats["bad"].retried) == (1, 1)
    finally:
        backend.close()


def test_failure_is_counted_before_its_callbacks_over_a_broker(redis_url):
    """API.md "Stats": counters are updated before any callback for the same event runs;
    "Scale-out": everything above (on_failure, get_stats) holds across processes. A failure
    callback of the very Queue that decided the failure sees the job in ``jobs_failed``."""
    backend = Redis(redis_url)
    try:
        q = backend.queue()
        seen = []
        q.on_failure(lambda job, reason, exc: seen.append((reason, q.get_stats().jobs_failed)))

        def fail(job):
            raise PermanentFailure("HTTP 404")

        q.register_executor("bad", fail)
        q.start_dispatcher(1)
        q.enqueue(Job("bad"))
        assert q.join(WAIT)
        assert seen == [("permanent_failure", 1)]
    finally:
        backend.close()


def test_a_due_delayed_job_is_never_evicted_over_a_broker(redis_url):
    """API.md "Delayed jobs": a due job that finds the ready buffer full waits for room; it no
    longer counts as delayed and is never evicted or dropped; the evicted job is one *waiting*;
    "Scale-out": delayed jobs and max_delayed_jobs (with eviction) hold across processes.
    The only worker thread is busy and the process holds the job it runs next, so nothing
    fetches while job "due" comes due; a later delayed job must not evict it."""
    backend = Redis(redis_url)
    release = threading.Event()
    started = threading.Event()
    try:
        q = backend.queue(max_delayed_jobs=1)
        evicted = []
        q.on_failure(lambda job, reason, exc: evicted.append((job.id, reason)))
        ran = []

        def run(job):
            ran.append(job.id)
            if job.id == "busy":
                started.set()
                release.wait(WAIT)

        q.register_executor("t", run)
        q.start_dispatcher(1)
        q.enqueue(Job("t", id="busy"))
        assert started.wait(WAIT)
        q.enqueue(Job("t", id="next"))  # fetched to run next: this process takes no more
        time.sleep(0.2)
        q.enqueue_delayed(Job("t", id="due"), 0.05)
        time.sleep(0.3)  # "due" is due; the worker is still busy
        q.enqueue_delayed(Job("t", id="later"), 60)
        assert evicted == []
        release.set()
        assert q.cancel("later")
        assert q.join(WAIT)
        assert sorted(ran) == ["busy", "due", "next"]
    finally:
        release.set()
        backend.close()


def test_context_waits_accept_a_timedelta():
    """API.md "Units": every duration is seconds as a float and also accepts
    ``datetime.timedelta``; "Async executors and cancellation": ``ctx.remaining()``,
    ``await ctx.sleep(seconds)``, and docs/api.md's ``ctx.wait(seconds)``."""
    import asyncio
    from datetime import timedelta

    from tinymq import JobContext

    ctx = JobContext(Job("t"), None)
    assert ctx.wait(timedelta(milliseconds=1)) is False
    assert asyncio.run(ctx.sleep(timedelta(milliseconds=1))) is False
    ctx._cancel("stop")
    assert ctx.wait(timedelta(seconds=5)) is True
    assert asyncio.run(ctx.sleep(timedelta(seconds=5))) is True


@pytest.mark.parametrize("with_store", [True, False], ids=["store", "no store"])
def test_an_attempt_that_returns_after_stop_cancelled_it_is_no_success(tmp_path, with_store):
    """API.md "Persistence": an attempt that ``stop()`` cancels is not counted, and its job
    stays stored for the next start. A cooperative executor stops early when its context is
    cancelled, and returns normally: that return was counted as a success and its row
    deleted, so the job, never done, was lost at the next start."""
    from tinymq import Queue, SQLitePersistence

    path = str(tmp_path / "jobs.db")
    q = Queue()
    if with_store:
        q.set_persistence(SQLitePersistence(path))
    started = threading.Event()

    def work(job, ctx):
        started.set()
        if ctx.wait(WAIT * 3):  # cancelled: it stops early, its work not done
            return

    q.register_executor("w", work)
    q.start_dispatcher(1)
    q.enqueue(Job("w", None, id="j1"))
    assert started.wait(WAIT)
    q.stop(wait=False)
    stats = q.get_stats()
    assert (stats.jobs_succeeded, stats.jobs_failed, stats.executor_stats["w"].succeeded) == (0, 0, 0)
    if with_store:
        with SQLitePersistence(path, read_only=True) as inspect:
            assert [job.id for job in inspect.jobs()] == ["j1"]  # it runs at the next start
