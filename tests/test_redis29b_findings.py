"""Defects taken up by redis29b (session 29: known defects of the Redis broker and the command line),
each with its test.
"""
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import tinymq
from tinymq import Job, SQLitePersistence

from _backends import Redis
from _helpers import WAIT, record_failures, wait_until

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


# --- 3. A look at the Redis settings stuck past stop() ---------------------------------------

# Every minute a worker process looks at Redis's settings (CONFIG GET) on a short-lived thread of its
# own, each call waiting up to lease / 4 for its reply. stop() waited for a look under way only within
# its bound for its threads (about 2 s): a look stuck longer (a server slow to answer CONFIG) ran on
# past stop() and the broker's close(), on a connection close() leaves open while it is lent, and
# sent its second CONFIG afterwards. A look now gives up as soon as stop() begins: its connection is
# closed (a reply may be half read) and its thread has ended when stop() returns.

PROXY_THREAD = "stalling-proxy"  # its threads' name (Python 3.9 names no thread by its target)


class StallingProxy:
    """Forwards 127.0.0.1:<port> to the server; once ``stall()`` is called, a connection that sends a
    CONFIG command (or ``marker``'s bytes) gets no reply any more (the server answered; the proxy holds it back for good).
    ``freeze()`` holds everything either way until ``thaw()`` (a network that stalls for a while)."""

    def __init__(self, server_port, marker=b"CONFIG"):
        self.server_port = server_port
        self.marker = marker
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._armed = threading.Event()
        self._thawed = threading.Event()
        self._thawed.set()
        self.stalled = threading.Event()  # a connection sent CONFIG since stall()
        self.stalled_closed = threading.Event()  # ... and its client closed it
        self._sockets = []
        threading.Thread(target=self._accept, name=PROXY_THREAD, daemon=True).start()

    @property
    def url(self):
        return f"redis://127.0.0.1:{self.port}/0"

    def stall(self):
        self._armed.set()

    def freeze(self):
        self._thawed.clear()

    def thaw(self):
        self._thawed.set()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.server_port))
            self._sockets += [client, server]
            held = threading.Event()
            threading.Thread(target=self._requests, args=(client, server, held), name=PROXY_THREAD,
                             daemon=True).start()
            threading.Thread(target=self._replies, args=(server, client, held), name=PROXY_THREAD,
                             daemon=True).start()

    def _requests(self, client, server, held):
        try:
            while True:
                data = client.recv(65536)
                if not data:
                    break
                if self._armed.is_set() and self.marker in data:
                    held.set()
                    self.stalled.set()
                self._thawed.wait()
                server.sendall(data)
        except OSError:
            pass
        if held.is_set():
            self.stalled_closed.set()
        for sock in (client, server):
            _close(sock)

    def _replies(self, server, client, held):
        try:
            while True:
                data = server.recv(65536)
                if not data:
                    break
                self._thawed.wait()
                if not held.is_set():
                    client.sendall(data)
        except OSError:
            pass

    def close(self):
        self.listener.close()
        for sock in self._sockets:
            _close(sock)


def _close(sock):
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


SETTINGS_LEASE = 12.0  # a look's CONFIG waits lease / 4 for its reply: longer than stop()'s bound for threads


@pytest.mark.redis
def test_a_look_at_the_redis_settings_stuck_in_its_call_ends_before_stop_returns(redis_server, redis_url, monkeypatch):
    from tinymq.redis import RedisBroker, _link

    monkeypatch.setattr(_link, "_SETTINGS_LOOK", 0.0)  # a look at the first beat (lease / 4 after start)
    before = set(threading.enumerate())
    proxy = StallingProxy(redis_server.port)
    q = tinymq.Queue(broker=RedisBroker(proxy.url, name="settingsstuck", lease=SETTINGS_LEASE))
    try:
        q.register_executor("t", lambda job: None)
        q.start_dispatcher(1)
        proxy.stall()  # (after the broker's first look, at construction)
        assert proxy.stalled.wait(SETTINGS_LEASE), "no look at the settings began"
        look = q._link._settings_look
        assert look is not None and look.is_alive()
        began = time.monotonic()
        q.stop()
        took = time.monotonic() - began
        assert not look.is_alive(), "the look at the settings runs on after stop() returned"
        assert proxy.stalled_closed.is_set(), "the stuck look's connection was left open"
        assert took < SETTINGS_LEASE / 4, f"stop() took {took:.1f} s"
        left = [thread.name for thread in threading.enumerate() if thread not in before]
        assert not [name for name in left if name != PROXY_THREAD]
    finally:
        q.stop(wait=False)
        q.broker.close()
        proxy.close()



# --- 1. A cancel marks one attempt: this process cancels that copy of the job -----------------

# Redis marks the attempt a cancel found (its lease, its attempt id); the process holding it cancelled
# by job id, so the copy the core registered under that id was hit: an older copy of the job still
# running here (reaped while it ran, this process's id let go: its outcome counts nowhere) rather than
# the attempt marked, fetched since and waiting for that copy to leave the core. The older copy took
# the cancel; the marked one then ran in full, though cancel() had returned True before it started.
# The marked attempt itself is cancelled now: one waiting for an older copy to leave goes back to
# Redis, which ends it as cancelled (counted once, reported here), and never runs.
CANCEL_LEASE = 1.0


@pytest.mark.redis
def test_a_cancel_of_an_attempt_fetched_while_an_older_copy_runs_cancels_that_attempt(redis_server, redis_url):
    from tinymq.redis import RedisBroker

    proxy = StallingProxy(redis_server.port)
    q = tinymq.Queue(broker=RedisBroker(proxy.url, name="twocopies", lease=CANCEL_LEASE))
    other = RedisBroker(redis_url, name="twocopies")  # another process, which reaps this one
    runs, first_in, release_first = [], threading.Event(), threading.Event()
    failures = record_failures(q, key=lambda job: job.id)

    def run(job):
        runs.append(job.id)
        if len(runs) == 1:  # the older copy: it runs on while this process is reaped
            first_in.set()
            release_first.wait(WAIT)

    try:
        q.register_executor("t", run)
        q.start_dispatcher(2)
        job = q.enqueue(Job("t"))
        assert first_in.wait(WAIT)
        proxy.freeze()  # this process falls silent past its lease: the other process reaps it
        assert wait_until(lambda: other._scripts.reap(3)[0], WAIT), "this process was never reaped"
        proxy.thaw()  # it learns it was reaped, registers again and fetches the job again
        assert wait_until(lambda: q._link._held, WAIT), "the job was not fetched again"
        assert q.cancel(job.id)
        release_first.set()
        assert failures.wait_until(len)
        assert q.join(WAIT)
        assert runs == [job.id], "the attempt the cancel marked ran"
        assert failures.snapshot() == [(job.id, "cancelled", None)]
        stats = q.get_stats()
        assert (stats.jobs_cancelled, stats.jobs_succeeded) == (1, 0)
        assert stats.executor_stats["t"].cancelled == 1
    finally:
        release_first.set()
        proxy.thaw()
        q.stop(wait=False)
        q.broker.close()
        other.close()
        proxy.close()


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
