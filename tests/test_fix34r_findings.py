"""Defects of the Redis broker left open by session 33 (session 34, helper fix34r), each with its test
against a real redis-server (tests/conftest.py's fixtures), failing before its fix."""
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import tinymq
from tinymq import ExecutorConfig, Job, Priority

from _backends import Redis
from _helpers import WAIT

ROOT = Path(tinymq.__file__).resolve().parent.parent
COMMAND_TIMEOUT = 60  # seconds for one `python -m tinymq status`: it returns in well under one


# --- 1. status --redis read every due job waiting for room --------------------------------------------

# Due delayed jobs pile up while the ready buffer is full (they keep their FIFO place: docs/redis.md).
# `python -m tinymq status --redis` placed each of them at its priority, a read per job in its one
# script call (60 ms of Redis for 20,000, with nobody else served meanwhile), where get_stats() reads
# only those the buffer's room takes and counts the rest (fix33r). status now does as get_stats() does,
# with the buffer_size the worker processes' fetches keep; before any has fetched (the room unknown)
# it places the first 1000 due jobs at their priority and counts the rest as waiting for room.

DUE = 20_000


def _status(redis_url, name, *options):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, "-m", "tinymq", "status", "--redis", redis_url, "--name", name,
                             *options], env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                            timeout=COMMAND_TIMEOUT)
    assert result.returncode == 0, result.stderr
    return result.stdout


def _status_and_job_reads(redis_client, redis_url, name, *options):
    """status's output, and the job hashes Redis read meanwhile (HMGET: as job_fields reads one)."""
    redis_client.config_resetstat()
    output = _status(redis_url, name, *options)
    return output, redis_client.info("commandstats").get("cmdstat_hmget", {}).get("calls", 0)


def _enqueue_due(q, priority_of):
    """DUE jobs, due in about 3 s, waited until due."""
    due_at = time.time() + 3.0  # (not due before the last batch is in: a due one would need room)
    for first in range(0, DUE, 1000):
        q.enqueue_many([Job("t", n, id=f"due-{n:05}", run_at=due_at, priority=priority_of(n))
                        for n in range(first, first + 1000)])
    by = time.monotonic() + 3.0 + WAIT
    while q.get_stats().delayed_jobs_count:
        assert time.monotonic() < by, "not due on the server's clock"
        time.sleep(0.05)


@pytest.mark.redis
def test_status_reads_only_the_due_jobs_the_buffers_room_takes(redis_url, redis_client):
    backend = Redis(redis_url)
    release = threading.Event()
    started = threading.Event()

    def held(job):
        started.set()
        release.wait(WAIT * 6)

    try:
        q = backend.queue(buffer_size=10, max_delayed_jobs=DUE)
        _enqueue_due(q, lambda n: Priority.HIGH if n < 4 else Priority.LOW)
        q.register_executor("t", held, ExecutorConfig(max_concurrent_jobs=1))
        q.start_dispatcher(1)  # its fetch keeps buffer_size 10 in Redis (and takes a job or more)
        assert started.wait(WAIT)

        text, reads = _status_and_job_reads(redis_client, redis_url, backend.queue_name, "--json")
        assert reads < 200, f"status read {reads} job hashes for a buffer of 10"
        report = json.loads(text)
        counts = report["counts"]
        assert report["buffer_size"] == 10
        assert counts["ready"] == 10  # (the buffer's room takes the first due ones not taken)
        assert counts["ready"] + counts["waiting_for_room"] + counts["taken"] == DUE
        assert counts["delayed"] == 0 and counts["waiting_for_room"] > DUE - 100
        assert sum(level["ready"] for level in report["priorities"].values()) == 10

        text, reads = _status_and_job_reads(redis_client, redis_url, backend.queue_name)
        assert reads < 200, reads
        assert "waiting for room" in text and "buffer_size 10;" in text, text
    finally:
        release.set()
        backend.close()


@pytest.mark.redis
def test_status_places_at_most_the_first_1000_due_jobs_before_any_worker_has_fetched(redis_url, redis_client):
    backend = Redis(redis_url)
    try:
        q = backend.queue(buffer_size=10, max_delayed_jobs=DUE)  # (never started: nothing fetches)
        _enqueue_due(q, lambda n: Priority.HIGH if n % 4 == 0 else Priority.LOW)

        text, reads = _status_and_job_reads(redis_client, redis_url, backend.queue_name, "--json")
        assert reads < 1200, f"status read {reads} job hashes"
        report = json.loads(text)
        assert report["buffer_size"] is None
        assert report["counts"] == {"ready": 1000, "waiting_for_room": DUE - 1000, "delayed": 0, "taken": 0,
                                    "dead": 0}
        ready = {level: sizes["ready"] for level, sizes in report["priorities"].items()}  # (a quarter HIGH)
        assert sum(ready.values()) == 1000 and ready["MEDIUM"] == 0 and 150 < ready["HIGH"] < 350, ready

        text, reads = _status_and_job_reads(redis_client, redis_url, backend.queue_name)
        assert reads < 1200, reads
        assert "no worker process has fetched yet: the first 1000 due count as ready" in text, text
    finally:
        backend.close()
