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
from _helpers import WAIT

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
