"""Findings of attack28c (an outside attack on ``python -m tinymq worker`` and ``status``, run as a
deployment runs them).

1. ``status --redis URL --name NAME`` with a mistyped name, on a server whose queue had worker
   processes and no job yet (a fresh deployment, checked before the first enqueue), said that
   the server "holds no tinymq queue": ``broker.names_in_use()`` listed only queues with
   counters, while ``in_use()`` (and docs/cli.md, "the queue names the server does hold") count
   a worker's lease and a limit too.
2. ``worker`` started with stdout and stderr closed (``>&- 2>&-``, a daemon's way) exited 1 at
   once, silently: it wrote what the check printed to ``sys.stdout``, which Python sets to None
   then. Its worker processes now get the null device there, not a closed descriptor.
"""
import os
import signal
import subprocess
import sys

import pytest

import tinymq
from tinymq._cli import CommandError
from tinymq._status import redis_status
from tinymq.redis import RedisBroker

from test_cli import (LEASE, TIMEOUT, alive, env, eventually, pop, producer, project, record,  # noqa: F401
                      record_jobs, shared_project)

pytestmark = [pytest.mark.redis, pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="Linux: /proc")]


def test_status_of_a_mistyped_name_lists_a_queue_whose_workers_ran_before_any_job(redis_url):
    queue = tinymq.Queue(broker=RedisBroker(redis_url, name="emails"))

    @queue.executor("email", max_concurrent_jobs=5)
    def send(job):
        pass

    queue.start_dispatcher(1)
    queue.stop()  # (its limit stays: what a worker process leaves before the first job)
    try:
        assert queue.broker.in_use()
        assert queue.broker.names_in_use() == ["emails"]
        with pytest.raises(CommandError, match=r"holds no tinymq queue named 'emial'.*queues there: emails$"):
            redis_status(redis_url, "emial", 0)
    finally:
        queue.broker.close()


# --- 2. `worker` started with stdout and stderr closed ----------------------------------------

def test_worker_started_with_stdout_and_stderr_closed_runs_and_stops_gracefully(shared_project, project,
                                                                                 producer, record, redis_url):
    """A daemon started with its standard descriptors closed (``>&- 2>&-``): the supervisor wrote
    what the check printed to ``sys.stdout``, None there, and exited 1 (its traceback unseen)
    before any worker process started."""
    command = [sys.executable, "-m", "tinymq", "worker", "app.shared:queue", "--workers", "1"]
    supervisor = subprocess.Popen(["sh", "-c", 'exec "$@" >&- 2>&-', "sh", *command], cwd=str(project),
                                  env=env(TINYMQ_TEST_REDIS=redis_url, TINYMQ_TEST_LEASE=str(LEASE)),
                                  stdin=subprocess.DEVNULL)
    try:
        producer.enqueue(record_jobs(1)[0])
        eventually(lambda: record.llen("finished") or supervisor.poll() is not None, "the job run")
        assert supervisor.poll() is None, f"the supervisor exited with code {supervisor.returncode}"
        (job_id, pid), = pop(record, "finished", 1)
        assert job_id == "job-0"
        # Its own stdout and stderr: the null device, not closed (nor one of the supervisor's pipes).
        assert [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in (1, 2)] == [os.devnull] * 2
        supervisor.send_signal(signal.SIGTERM)
        assert supervisor.wait(TIMEOUT) == 0
        eventually(lambda: not alive(pid), "the worker process ended")
    finally:
        supervisor.kill()
        supervisor.wait()
        for pid in {int(entry.split()[1]) for entry in record.lrange("started", 0, -1)}:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
