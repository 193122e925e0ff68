"""A stop() that the garbage collector runs on the event loop's reporting thread (session 34, helper
fix34h), failing before its fix.

An async attempt's outcome is reported to a broker (Redis) or a store (SQLite) off the event loop,
on a reporting thread of the queue's (tinymq-io). A ``__del__`` (a weakref callback, a gc.callbacks
hook) that calls ``q.stop()`` runs wherever the collector lands: there too, in the middle of a
report. stop() with its default wait=True and no timeout then waited for that report, which its own
thread finishes only once stop() returns: it hung for ever (and every later stop(), and the exit).
The reporting threads are now the queue's own threads, as its workers are: a stop() there waits for
none of the attempts (docs/api.md: as from an executor or a failure callback), and the report in
progress still reaches Redis (the give-back waits for it) or the store.

Each case runs in a child process (tests/_fix34h_child.py) that reports a stop() not returned within
a generous bound and exits, so a regression fails here instead of hanging the suite.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import tinymq
from tinymq.persistence import SQLitePersistence

from _backends import Redis
from _helpers import WAIT, collect_garbage_that, wait_until

ROOT = Path(tinymq.__file__).resolve().parent.parent
CHILD = Path(__file__).with_name("_fix34h_child.py")
HANG = 30.0  # seconds the child waits for the collector's stop() to return (it returns in well under one)


def _child(*args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, str(CHILD), *args, str(HANG)], env=env, stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=HANG * 4)
    lines = result.stdout.splitlines()
    assert lines, result.stderr
    said = json.loads(lines[-1])
    assert not said.get("hung"), f"the stop() the collector ran on the reporting thread did not return " \
                                 f"within {HANG:g}s (it waits for its own thread's report)"
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    return said, result.stderr


def _stopped_there_at_once(said):
    assert len(said["stopped"]) == 1, said
    error, took, thread = said["stopped"][0]
    assert error is None, said
    assert thread.startswith("tinymq-io"), said  # (the reporting thread, as the test means)
    assert took < HANG / 3, said
    assert said["ended"], said  # the report it did not wait for ended all the same
    assert said["runs"] == ["done"] and said["failures"] == [] and said["succeeded"] == 1, said


@pytest.mark.redis
def test_a_stop_the_collector_runs_on_the_reporting_thread_over_redis_returns_and_the_success_counts(redis_url):
    backend = Redis(redis_url)
    try:
        said, _ = _child("redis", redis_url, backend.queue_name)
        _stopped_there_at_once(said)
        other = backend.queue()  # (never started: it runs nothing) the job's success reached Redis
        assert other.join(WAIT), "the job is unfinished in Redis (handed back, to run again)"
        stats = other.get_stats()
        assert (stats.jobs_succeeded, stats.jobs_cancelled, stats.jobs_failed) == (1, 0, 0)
    finally:
        backend.close()


def test_a_stop_the_collector_runs_on_the_reporting_thread_with_a_store_returns_and_the_success_is_written(tmp_path):
    path = str(tmp_path / "jobs.db")
    said, stderr = _child("sqlite", path, "-")
    _stopped_there_at_once(said)
    assert "ignore their cancellation" not in stderr, stderr
    with SQLitePersistence(path) as store:  # the success deleted the job's row: it does not run again
        assert store.jobs() == [] and store.dead_jobs() == []


def test_a_stop_the_collector_runs_on_the_reporting_thread_in_process_does_not_wait_for_the_blocked_loop(caplog):
    # Without a store or a broker, outcomes are reported on the loop, but for one: a coroutine that
    # blocks the loop past its deadline is decided timed out by another thread, and its failure
    # reported on the reporting thread. A stop() the collector ran there waited for the blocked loop
    # (1 s), then said that coroutines ignoring their cancellation were left running ("0 coroutines").
    import threading

    from tinymq import ExecutorConfig, Job, Queue

    q = Queue()
    release = threading.Event()
    collected = threading.Event()
    stopped = []

    async def blocks(job):
        release.wait(WAIT * 3)  # (does not await: the loop is blocked until the test releases it)

    q.register_executor("t", blocks, ExecutorConfig(timeout=0.2))

    def stops_the_queue():  # (a user's finalizer may)
        try:
            q.stop()
            stopped.append((None, threading.current_thread().name))
        except Exception as error:
            stopped.append((error, threading.current_thread().name))
        collected.set()

    dispatcher = q._dispatcher
    timed_out = dispatcher.async_timed_out

    def collected_as_it_reports(*args):  # (the loop runner reads it at each report)
        if not collected.is_set():
            collect_garbage_that(stops_the_queue)  # on the thread that reports the timeout
        return timed_out(*args)

    dispatcher.async_timed_out = collected_as_it_reports
    try:
        with caplog.at_level("WARNING", logger="tinymq"):
            q.start_dispatcher(1)
            q.enqueue(Job("t", id="blocks"))
            assert collected.wait(WAIT), "the coroutine blocking the loop was not decided timed out"
            assert stopped == [(None, stopped[0][1])] and stopped[0][1].startswith("tinymq-io"), stopped
            assert not release.is_set()  # (the loop was blocked while that stop() ran)
            release.set()
            q.stop()
        # Counted once its report, on the reporting thread, is done: stop() waits for no attempt that
        # timed out already (docs/api.md), and that thread may still be in the collection that ran
        # the first stop() (finalizing other tests' garbage: after test_attackP_findings' model test,
        # for a while).
        assert wait_until(lambda: q.get_stats().jobs_timed_out == 1)  # (its retry is left delayed)
        assert "ignore their cancellation still running" not in caplog.text
    finally:
        release.set()
        q.stop(wait=False)


def test_a_stop_that_times_out_on_a_blocked_loop_says_the_loop_is_blocked(caplog):
    # Found by fix34h: a stop(timeout=...) from an ordinary thread, with the loop blocked by a coroutine
    # already decided timed out (so none that stop() cancelled), said "stop() returns with 0 coroutines
    # that ignore their cancellation still running".
    import threading

    from tinymq import ExecutorConfig, Job, Queue

    q = Queue()
    release, timed_out = threading.Event(), threading.Event()

    async def blocks(job):
        release.wait(WAIT * 3)  # (does not await: the loop is blocked until the test releases it)

    q.register_executor("t", blocks, ExecutorConfig(timeout=0.2))
    dispatcher = q._dispatcher
    decided = dispatcher.async_timed_out

    def seen(*args):  # (the loop runner reads it at each report)
        try:
            return decided(*args)
        finally:
            timed_out.set()

    dispatcher.async_timed_out = seen
    try:
        q.start_dispatcher(1)
        q.enqueue(Job("t").with_max_retries(0))
        assert timed_out.wait(WAIT), "the coroutine blocking the loop was not decided timed out"
        with caplog.at_level("WARNING", logger="tinymq"):
            q.stop(timeout=0.3)
        warned = [r.getMessage() for r in caplog.records if r.getMessage().startswith("stop() returns")]
        assert len(warned) == 1 and "event loop still blocked" in warned[0], warned
        assert "0 coroutines" not in caplog.text
    finally:
        release.set()
        q.stop(wait=False)
