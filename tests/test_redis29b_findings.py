"""Defects taken up by redis29b (session 29: known defects of the Redis broker and the command line),
each with its test.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

import tinymq
from tinymq import Job, SQLitePersistence

from _backends import Redis
from _helpers import WAIT

ROOT = Path(tinymq.__file__).resolve().parent.parent

# --- 2. Failure callbacks nested without bound, over Redis ------------------------------------

# A failure callback whose enqueue evicts a job (or whose cancel removes one) has that job's row
# reported in its own thread before the call returns, whose callback enqueues again, ...: one stack.
# Without a broker, callbacks nested _NESTED_REPORTS deep leave the failures they decide to the
# report above them (tests/test_smallfix28_findings.py); over Redis the reports nested on: a
# RecursionError, swallowed as the callback's, ended the chain a hundred jobs in (the evicted rows
# were acknowledged, never reported). The reports a reply hands back are bounded the same way now.

# Failures reported in one chain: far more than Python's recursion limit allows nested.
CHAIN = 1000


def _stack_depth():
    frame, depth = sys._getframe(1), 0
    while frame is not None:
        frame, depth = frame.f_back, depth + 1
    return depth


@pytest.fixture
def redis(redis_url):
    made = Redis(redis_url)
    yield made
    made.close()


@pytest.mark.redis
@pytest.mark.parametrize("worker", [False, True], ids=["producer", "worker"])
def test_a_callback_that_evicts_as_it_enqueues_without_bound_over_redis_ends_every_job(redis, worker):
    q = redis.queue(max_delayed_jobs=1)
    if worker:
        q.start_dispatcher(1)
    evicted, depths, made = [], [], {}

    @q.on_failure
    def enqueue_another(job, reason, exc):
        evicted.append((job.payload, reason))
        depths.append(_stack_depth())
        if job.payload + 2 <= CHAIN:  # evicts the one waiting (payload + 1)
            made[job.payload + 2] = q.enqueue_delayed(Job("t", job.payload + 2), 3600)

    q.enqueue_delayed(Job("t", 0), 3600)
    q.enqueue_delayed(Job("t", 1), 3600)  # evicts 0: the chain runs before this call returns
    assert evicted == [(n, "evicted") for n in range(CHAIN)]
    assert max(depths) - min(depths) < sys.getrecursionlimit() // 4, "the chain's reports nest without bound"
    assert q.cancel(made[CHAIN].id)
    assert q.join(WAIT), "a job of the chain never finished"
    stats = q.get_stats()
    assert (stats.jobs_enqueued, stats.jobs_evicted, stats.jobs_cancelled) == (CHAIN + 1, CHAIN, 1)


@pytest.mark.redis
@pytest.mark.parametrize("worker", [False, True], ids=["producer", "worker"])
def test_a_callback_that_cancels_the_next_job_without_bound_over_redis_ends_every_job(redis, worker):
    q = redis.queue()
    if worker:
        q.start_dispatcher(1)
    cancelled, found, depths = [], [], []
    jobs = [q.enqueue_delayed(Job("t", n), 3600) for n in range(CHAIN)]

    @q.on_failure
    def cancel_the_next(job, reason, exc):
        cancelled.append((job.payload, reason))
        depths.append(_stack_depth())
        if job.payload + 1 < CHAIN:
            found.append(q.cancel(jobs[job.payload + 1].id))

    assert q.cancel(jobs[0].id)
    assert cancelled == [(n, "cancelled") for n in range(CHAIN)]
    assert found == [True] * (CHAIN - 1)
    assert max(depths) - min(depths) < sys.getrecursionlimit() // 4, "the chain's reports nest without bound"
    assert q.join(WAIT), "a job of the chain never finished"
    stats = q.get_stats()
    assert (stats.jobs_cancelled, stats.delayed_jobs_count) == (CHAIN, 0)


# --- 4. A command that prints, started with stdout closed ------------------------------------

# `python -m tinymq status --db x.db >&-`: Python's sys.stdout is None, print() wrote nothing, and
# the command exited 0. A command that prints its outcome (status, requeue-dead, purge-dead, the
# demo) now refuses, before it changes anything, with one line on stderr; one whose stdout takes no
# more (a full disk) says so in one line, not a traceback. `worker` prints nothing on stdout (it
# logs on stderr): it runs with stdout closed, as a daemon (tests/test_attack28c_findings.py).

def _command(*args, redirect=""):
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return subprocess.run(["sh", "-c", f'exec "$@" {redirect}', "sh", sys.executable, "-m", "tinymq", *map(str, args)],
                          env=environment, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)


@pytest.fixture
def store_file(tmp_path):
    path = tmp_path / "jobs.db"
    store = SQLitePersistence(str(path))
    q = tinymq.Queue()
    q.set_persistence(store)
    try:
        q.enqueue(Job("t"))
    finally:
        q.stop(wait=False)
        store.close()
    return path


def _assert_one_line_error(result, *fragments):
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


@pytest.mark.parametrize("args", [("status",), ("status", "--json"), ("purge-dead", "--all"), ("requeue-dead", "--all")],
                         ids=" ".join)
def test_a_command_that_prints_with_stdout_closed_fails_in_one_line(store_file, args):
    before = store_file.read_bytes()
    result = _command(*args, "--db", store_file, redirect=">&-")
    _assert_one_line_error(result, f"python -m tinymq {args[0]}: error: stdout is closed")
    assert store_file.read_bytes() == before  # refused before it changed anything


def test_the_demo_with_stdout_closed_fails_in_one_line():
    _assert_one_line_error(_command(redirect=">&-"), "python -m tinymq: error: stdout is closed")


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full here")
def test_status_to_a_full_stdout_fails_in_one_line(store_file):
    result = _command("status", "--db", store_file, redirect=">/dev/full")
    _assert_one_line_error(result, "python -m tinymq status: error: could not write to stdout")
