"""Defects seen in session 24 and left unfixed then (seen25); each with its test."""
import asyncio
import contextlib
import logging
import os
import socket
import threading
import time
from datetime import datetime, timezone

import pytest

from tinymq import Job, Queue
from tinymq._periodic import tick_of_job_id

from _helpers import STORES, WAIT, Recorder, queue_with_store, wait_until
from test_cli import cli, project  # noqa: F401 (a fixture)


# --- stop(timeout=...) and a coroutine that swallows its cancellation ---------------------------

# Fixed: stop(timeout=0.2) took about 3.2 s when a coroutine swallowed the CancelledError of its
# stop: after the timeout, stop() gave the cancelled coroutines _UNWIND_WAIT (1 s) to unwind,
# then waited up to twice that again for the loop's thread, which that coroutine kept. Now one
# moment to unwind, that ends a little after stop()'s timeout at most, covers both waits.


@contextlib.contextmanager
def _queue_on(backend, request, tmp_path):
    """A Queue in memory, with a SQLite store (``q.store``), or over the test's Redis server."""
    if backend != "redis":
        with queue_with_store(backend, tmp_path) as q:
            yield q
        return
    q = request.getfixturevalue("redis_backend").queue()
    q.store = None
    yield q


@pytest.mark.parametrize("backend", STORES + [pytest.param("redis", marks=pytest.mark.redis)])
def test_stop_returns_near_its_timeout_when_a_coroutine_swallows_its_cancellation(
        backend, request, tmp_path, caplog):
    started, gate, returned = threading.Event(), threading.Event(), threading.Event()

    async def stubborn(job):
        started.set()
        while not gate.is_set():
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                pass  # swallowed: it keeps its slot until it returns
        returned.set()

    try:
        with _queue_on(backend, request, tmp_path) as q:
            q.register_executor("stubborn", stubborn)
            q.start_dispatcher()
            job = q.enqueue(Job("stubborn"))
            assert started.wait(WAIT)
            with caplog.at_level(logging.WARNING, logger="tinymq"):
                began = time.monotonic()
                q.stop(wait=True, timeout=0.2)
                took = time.monotonic() - began
            assert took < 1.5, f"stop(timeout=0.2) took {took:.2f}s"
            assert q.get_stats().executor_stats["stubborn"].active_jobs == 1  # its slot is kept
            assert not returned.is_set()
            assert any("ignore their cancellation" in r.getMessage() and r.levelno == logging.WARNING
                       for r in caplog.records), [r.getMessage() for r in caplog.records]
            if q.store is not None:  # saved back as ready for the next start, as any stop-cancelled attempt
                assert [stored.id for stored in q.store.load_all()] == [job.id]
    finally:
        gate.set()
    assert returned.wait(WAIT)


# --- every(first_at=...) far ahead, and a grid in Redis set by it ------------------------------

# Fixed: every(..., first_at=1e300) (a typo) was accepted: in-process its schedule never ticked,
# and over Redis its grid (tick 0 about 1e300 s ahead) was kept there: a process that began the
# schedule again after the typo was fixed joined that grid, as every process with the same
# interval did, and the schedule stayed silent until its key in Redis was deleted. Now a first_at
# later than a tick's job id can name (9999-12-31 UTC) is refused, naming it; and the grid in
# Redis records the first_at it was set for: a process that begins the schedule with another one
# (a corrected typo, a first_at moved) sets a new grid.

FAR_TYPO = 17e9  # 1.7e9 mistyped: a first_at in the year 2508, which a tick's job id can name


def _schedule_named(q, name):
    return {s.name: s for s in q.schedules()}[name]


def _begun(q, name):
    """The schedule's first tick, once the queue (a broker: Redis) has placed it."""
    assert wait_until(lambda: q._periodic._schedules[name].begun), q.schedules()
    return _schedule_named(q, name).next_run_at


@pytest.mark.parametrize("backend", ["memory", pytest.param("redis", marks=pytest.mark.redis)])
def test_every_refuses_a_first_at_no_tick_can_have_naming_it(backend, request):
    q = request.getfixturevalue("redis_backend").queue() if backend == "redis" else Queue()
    try:
        with pytest.raises(ValueError, match=r"^first_at must be no later than 9999-12-31 UTC .*got 1e\+300$"):
            q.every(60, "report", first_at=1e300)
        assert q.schedules() == []
        q.every(60, "report", first_at=datetime(9999, 12, 31, 23, 59, tzinfo=timezone.utc))  # the last minute
    finally:
        q.stop(wait=False)


@pytest.mark.redis
@pytest.mark.parametrize("corrected", ["none", "near"])
def test_over_redis_a_grid_set_far_ahead_by_a_wrong_first_at_goes_once_it_is_corrected(
        redis_backend, corrected):
    typo = redis_backend.queue()
    typo.every(3600, "report", first_at=FAR_TYPO)
    typo.start_dispatcher(1)
    assert _begun(typo, "report") == pytest.approx(FAR_TYPO, abs=WAIT)
    typo.stop()

    fixed = redis_backend.queue()  # the next deploy, the typo corrected
    first_at = None if corrected == "none" else time.time() + 60
    fixed.every(3600, "report", first_at=first_at)
    began = time.time()
    fixed.start_dispatcher(1)
    try:
        expected = began + 3600 if first_at is None else first_at
        assert _begun(fixed, "report") == pytest.approx(expected, abs=WAIT)
    finally:
        fixed.stop()


@pytest.mark.redis
def test_over_redis_two_first_ats_never_take_the_grid_from_each_other_at_every_tick(redis_backend):
    """The last process to begin the schedule sets its grid; one that began before is told
    'regrid' at its next tick and joins that grid, whatever first_at it was set for: the ticks stay
    one interval apart, and the grid stays the last one begun."""
    interval = 0.2
    ran = Recorder()
    queues = []
    for first_at in (time.time() + interval, time.time() + 1.5 * interval):
        q = redis_backend.queue()
        q.register_executor("tick", lambda job: ran.add(job.id))
        q.every(interval, "tick", first_at=first_at)
        q.start_dispatcher(1)
        queues.append(q)
        assert ran.wait_for(len(ran.items) + 2)
    try:
        seen = len(ran.items)
        assert ran.wait_for(seen + 6)
        ticks = sorted(tick_of_job_id(job_id) for job_id in ran.items[seen:])
        gaps = [later - earlier for earlier, later in zip(ticks, ticks[1:])]
        assert min(gaps) > interval * 0.9, gaps
        key = f"tmq:{{{redis_backend.queue_name}}}:schedule:tick"
        assert redis_backend.brokers[0]._client.hget(key, "definition") == repr(first_at)
    finally:
        for q in queues:
            q.stop(wait=False)


# --- python -m tinymq worker: a module that forks when it is imported ---------------------------

# Fixed: a fork made by the target's import went on as the check's process did: both reported the
# same error, so the supervisor printed it twice (the fork's copy first, as output of the import,
# with the check's record separator in it), and a module that daemonises (its parent exits 0)
# gave two errors with two prefixes, the fork's and the supervisor's. Now a fork never repeats
# its parent's error: it tells the supervisor it was made, and the supervisor says so in its one
# error (or in a warning, when the check's own process loaded the target).

FORKS_THEN_RAISES = """
import os
os.fork()  # both go on
raise RuntimeError("bad config")
"""

FORKS_THEN_HAS_NO_BROKER = """
import os
os.fork()  # both go on
from tinymq import Queue
queue = Queue()
"""

DAEMONISES_WITHOUT_A_BROKER = """
import os
if os.fork():
    os._exit(0)  # the parent exits, as a daemonising module does; the fork goes on importing
from tinymq import Queue
queue = Queue()
"""


def _one_error(result):
    """The one error line of the supervisor's stderr, checked to be the only thing in it."""
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    assert "\x1e" not in result.stderr and "\x1d" not in result.stderr, repr(result.stderr)
    assert result.stderr.startswith("python -m tinymq worker: error: "), result.stderr
    assert result.stderr.count("error:") == 1, result.stderr
    return result.stderr


@pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX: fork")
def test_worker_says_the_error_of_a_module_that_forks_and_raises_at_import_once(project):
    (project / "app" / "forks.py").write_text(FORKS_THEN_RAISES)
    stderr = _one_error(cli("worker", "app.forks:queue", cwd=project))
    assert stderr.count("RuntimeError: bad config") == 1, stderr


@pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX: fork")
def test_worker_says_once_that_a_module_that_forks_at_import_has_no_broker(project):
    (project / "app" / "forks.py").write_text(FORKS_THEN_HAS_NO_BROKER)
    stderr = _one_error(cli("worker", "app.forks:queue", cwd=project))
    assert stderr.count("is a tinymq.Queue without a broker") == 1, stderr
    assert len(stderr.strip().splitlines()) == 1, stderr


@pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX: fork")
def test_worker_says_in_one_error_that_the_module_daemonises(project):
    (project / "app" / "daemonises.py").write_text(DAEMONISES_WITHOUT_A_BROKER)
    stderr = _one_error(cli("worker", "app.daemonises:queue", cwd=project))
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert "importing the module forked the process that checked it" in stderr, stderr
    assert "exited with code 0 before it had loaded the target" in stderr, stderr


# --- a Redis that was never reached --------------------------------------------------------------

# Checked: a refused connection (nothing listens at the URL: a wrong port, a server not started)
# is reported at once, by the constructor (a WARNING), enqueue and cancel (tests/
# test_newcomer24_findings.py), get_stats() and the worker threads. Fixed: get_stats() and the
# worker threads' WARNING named the queue, not where they looked; and a server that takes the
# connection and never answers (a port forwarded to nothing, a frozen Redis) held the
# constructor, and so the import of the module that builds the broker, for the 10 s socket
# timeout: its first look now waits for the connect timeout at most (it looks again at first use).


def _closed_port():
    """A loopback port nothing listens on (bound, then closed: a connect there is refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_redis_that_refuses_the_connection_is_reported_at_once_naming_its_url(warnings_seen):
    pytest.importorskip("redis")
    from tinymq import TinyMQError
    from tinymq.redis import RedisBroker

    url = f"redis://127.0.0.1:{_closed_port()}/0"
    began = time.monotonic()
    q = Queue(broker=RedisBroker(url, name="emails"))
    try:
        assert time.monotonic() - began < WAIT / 2
        assert any(f"Redis at {url} is not reachable yet" in m for m in warnings_seen.items), warnings_seen.items
        began = time.monotonic()
        with pytest.raises(TinyMQError, match=f"could not read the stats of Redis queue 'emails' at {url}: "):
            q.get_stats()
        assert time.monotonic() - began < WAIT / 2
        q.register_executor("send", lambda job: None)
        q.start_dispatcher(1)  # its threads' first calls find no server
        assert warnings_seen.wait_until(
            lambda seen: any(m.startswith(f"Redis queue 'emails' at {url}: ") and "retrying" in m for m in seen))
    finally:
        q.stop(timeout=5)


def test_the_constructor_waits_for_a_server_that_never_answers_no_longer_than_the_connect_timeout(
        warnings_seen):
    pytest.importorskip("redis")
    from tinymq.redis import RedisBroker

    with socket.socket() as silent:  # takes connections (the kernel does), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"
        began = time.monotonic()
        broker = RedisBroker(url, name="emails")
        took = time.monotonic() - began
        broker.close()
    assert took < 6.0, f"RedisBroker() waited {took:.1f}s for a server that never answers"
    assert any(f"Redis at {url} is not reachable yet" in m for m in warnings_seen.items), warnings_seen.items


# get_stats() against a server that takes the connection and never answers (a frozen Redis)
# resent its read after each socket timeout: three times the timeout (30 s) before it raised. A
# read that got no reply within the socket timeout is not sent again: it raises after one.
def test_get_stats_waits_for_a_server_that_never_answers_one_socket_timeout(monkeypatch, warnings_seen):
    pytest.importorskip("redis")
    from tinymq import TinyMQError
    from tinymq.redis import RedisBroker, broker as broker_module

    monkeypatch.setattr(broker_module, "_SOCKET_TIMEOUT", 1.0)  # (10 s: the test would wait 30 s)
    with socket.socket() as silent:  # takes connections (the kernel does), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"
        q = Queue(broker=RedisBroker(url, name="emails"))
        try:
            began = time.monotonic()
            with pytest.raises(TinyMQError, match=f"could not read the stats of Redis queue 'emails' at {url}: "):
                q.get_stats()
            took = time.monotonic() - began
        finally:
            q.stop(timeout=0)
    assert took < 2.5, f"get_stats() waited {took:.1f}s for a server that never answers (socket timeout 1 s)"
