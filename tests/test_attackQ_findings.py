"""Round-7 attack (attackQ) from outside: the command line (``worker``, ``status``) and periodic jobs.

Each test reproduces a defect that the attack found; its fix is in the commit that removed
the test's xfail mark.
"""
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from datetime import datetime, timezone

import pytest

import tinymq
from tinymq import Job, PermanentFailure, Queue, SQLitePersistence

from _helpers import STORES, queue_with_store
from test_cli import TIMEOUT, alive, assert_user_error, cli, env, eventually

# --- periodic jobs -------------------------------------------------------------------------

# Valid cron syntax that names no instant: February 30, April 31. (A past year needed croniter's
# 7th field, which q.cron() refuses now: see test_periodic.py.)
NEVER = ["0 0 30 2 *", "0 0 31 4 *"]


@pytest.mark.parametrize("expression", NEVER)
def test_a_cron_expression_that_never_fires_is_refused_at_registration(expression):
    pytest.importorskip("croniter")
    queue = Queue()
    try:
        with pytest.raises(ValueError, match="never"):
            queue.cron(expression, "report", name="report")
        assert queue.schedules() == []
        queue.start_dispatcher(1)  # nothing registered, nothing to fail
    finally:
        queue.stop()


@pytest.mark.parametrize("expression", NEVER)
def test_a_cron_expression_that_never_fires_is_refused_on_a_running_queue(expression):
    pytest.importorskip("croniter")
    queue = Queue()
    queue.start_dispatcher(1)
    try:
        with pytest.raises(ValueError, match="never"):
            queue.cron(expression, "report", name="report")
        assert queue.schedules() == []
        queue.cron("* * * * *", "report", name="report")  # the name is free
    finally:
        queue.stop()


@pytest.mark.parametrize("backend", STORES)
def test_a_schedule_registered_again_under_its_name_does_not_pile_up(backend, tmp_path):
    """Changing a schedule's interval (unschedule, then every() again) keeps "no pile-up": the job of the
    name's previous tick is still its previous job, as it is after a restart with a store."""
    started = threading.Semaphore(0)
    release = threading.Event()
    runs = []

    def report(job):
        runs.append(job.id)
        started.release()
        release.wait(TIMEOUT)

    with queue_with_store(backend, tmp_path) as queue:
        queue.register_executor("report", report)
        try:
            queue.every(0.05, "report", name="report")
            queue.start_dispatcher(4)
            assert started.acquire(timeout=TIMEOUT)
            assert queue.unschedule("report")
            queue.every(0.02, "report", name="report")
            deadline = time.monotonic() + TIMEOUT
            while queue.schedules()[0].skipped < 3:  # ticks while the first job runs (nothing announces them)
                assert time.monotonic() < deadline, queue.schedules()
                time.sleep(0.01)
            assert len(runs) == 1, runs
            release.set()
            assert started.acquire(timeout=TIMEOUT)  # once the first job is done, the new schedule fires
            assert runs[1].startswith("report@") and runs[1] != runs[0]
        finally:
            release.set()


class _Records(logging.Handler):
    """Sets ``seen`` at the first record of the tinymq logger from ``level`` up."""

    def __init__(self, level=logging.ERROR):
        super().__init__(level)
        self.seen = threading.Event()
        self.messages = []

    def emit(self, record):
        self.messages.append(self.format(record))
        self.seen.set()


FAR_INTERVAL = 7000 * 365 * 86400.0  # seconds: far beyond threading.TIMEOUT_MAX, before year 9999


@pytest.mark.parametrize("kind", ["interval", "first_at"])
def test_a_schedule_far_in_the_future_waits_quietly(kind):
    """A tick further away than threading.TIMEOUT_MAX (about 292 years) is a plain long wait."""
    queue = Queue()
    queue.register_executor("tick", lambda job: None)
    if kind == "interval":
        queue.every(FAR_INTERVAL, "tick", name="far")  # (1e300, reaching past year 9999, is refused)
    else:
        queue.every(60, "tick", name="far", first_at=datetime(9999, 1, 1, tzinfo=timezone.utc))
    errors = _Records()
    logger = logging.getLogger("tinymq")
    logger.addHandler(errors)
    try:
        queue.start_dispatcher(1)
        # The overflow comes at the timer's first wait; a quiet timer is waited for a while.
        assert not errors.seen.wait(2.0), errors.messages
        # And the timer still serves a schedule registered meanwhile.
        fired = threading.Event()
        queue.register_executor("near", lambda job: fired.set())
        queue.every(0.05, "near", name="near")
        assert fired.wait(TIMEOUT)
        assert [s.next_run_at > time.time() + 1e9 for s in queue.schedules() if s.name == "far"] == [True]
    finally:
        logger.removeHandler(errors)
        queue.stop()
    assert errors.messages == []


# --- status --json ---------------------------------------------------------------------------


def _strict_json(text):
    """Parse ``text`` as RFC 8259 JSON: NaN and Infinity are not JSON (jq, JavaScript, Go refuse them)."""

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_status_json_is_standard_json_when_a_payload_holds_nan_or_infinity(tmp_path):
    path = tmp_path / "jobs.db"
    store = SQLitePersistence(path)
    queue = Queue()
    queue.set_persistence(store)

    def refuse(job):
        raise PermanentFailure("not today")

    queue.register_executor("measure", refuse)
    payload = {"mean": float("nan"), "max": float("inf"), "min": float("-inf"), "values": [1.5, float("nan")]}
    queue.enqueue(Job("measure", payload, id="measure-1"))
    queue.start_dispatcher(1)
    assert queue.join(TIMEOUT)
    queue.stop()
    store.close()
    result = cli("status", "--db", path, "--json")
    assert result.returncode == 0, result.stderr
    report = _strict_json(result.stdout)
    [dead] = report["dead_jobs"]
    assert dead["id"] == "measure-1"
    # The same spelling as Python's json module, as strings: what a script can still tell apart.
    assert dead["payload"] == {"mean": "NaN", "max": "Infinity", "min": "-Infinity", "values": [1.5, "NaN"]}


# --- worker ---------------------------------------------------------------------------------

SELF_STARTING = textwrap.dedent("""
    import os
    import tinymq
    from tinymq.redis import RedisBroker

    queue = tinymq.Queue(broker=RedisBroker(os.environ["TINYMQ_TEST_REDIS"], name="selfstart"))

    @queue.executor("noop")
    def noop(job):
        pass

    queue.start_dispatcher(2)  # as a web app's module might: the worker command does this itself
""")

SELF_STOPPING = SELF_STARTING.replace("queue.start_dispatcher(2)", "queue.stop()")


@pytest.mark.parametrize("module, fragment", [
    (SELF_STARTING, "was started when its module was imported (start_dispatcher() ran at import)"),
    (SELF_STOPPING, "is a stopped tinymq.Queue (its module called stop() when it was imported)"),
], ids=["started", "stopped"])
def test_worker_refuses_a_queue_that_its_module_started_or_stopped(tmp_path, redis_url, module, fragment):
    (tmp_path / "selfstart.py").write_text(module)
    result = subprocess.run([sys.executable, "-m", "tinymq", "worker", "selfstart:queue", "--processes", "2"],
                            cwd=str(tmp_path), env=env(TINYMQ_TEST_REDIS=redis_url), stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=TIMEOUT)
    assert_user_error(result, f"python -m tinymq worker: error: 'selfstart:queue' {fragment}")
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr  # said once, before any start


@pytest.mark.parametrize("code", ["0", "3", "'settings missing'"])
def test_worker_reports_a_module_that_calls_sys_exit_at_import(tmp_path, code):
    (tmp_path / "exiting.py").write_text(f"import sys\n\nqueue = None\nsys.exit({code})\n")
    try:
        result = subprocess.run([sys.executable, "-m", "tinymq", "worker", "exiting:queue"], cwd=str(tmp_path),
                                env=env(), stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired as exc:  # (run() killed the supervisor; its children follow it)
        pytest.fail(f"still running after 20 s: {exc.stderr}")
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith("python -m tinymq worker: error: importing 'exiting' (from 'exiting:queue') "
                                    "raised an exception:\n"), result.stderr
    assert 'exiting.py", line 4, in <module>' in result.stderr
    assert result.stderr.rstrip().endswith(f"SystemExit: {eval(code)}")
    assert "started worker process" not in result.stderr


def test_status_refuses_a_store_of_a_newer_schema_as_its_owner_does(tmp_path):
    import sqlite3

    path = tmp_path / "jobs.db"
    SQLitePersistence(path).close()
    connection = sqlite3.connect(str(path))
    connection.execute("PRAGMA user_version = 99")  # a later tinymq's file: its rows may mean other things
    connection.commit()
    connection.close()
    message = "has schema version 99, written by a newer tinymq; this one reads version 1"
    with pytest.raises(tinymq.PersistenceError, match=message):
        SQLitePersistence(path, read_only=True)
    with pytest.raises(tinymq.PersistenceError, match=message):
        SQLitePersistence(path)
    for command in (["status", "--db", path], ["status", "--db", path, "--json"]):
        assert_user_error(cli(*command), f"python -m tinymq status: error: '{path}' {message}")


def test_worker_checks_a_module_that_starts_a_thread_at_import(tmp_path):
    """A module may start a thread that runs for ever (a poller, a metrics server): the check of the
    target gives its verdict without waiting for it."""
    (tmp_path / "polling.py").write_text(textwrap.dedent("""
        import threading

        stop = threading.Event()
        threading.Thread(target=stop.wait, name="poller").start()  # not a daemon
        queue = 5
    """))
    try:
        result = subprocess.run([sys.executable, "-m", "tinymq", "worker", "polling:queue"], cwd=str(tmp_path),
                                env=env(), stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"still running after 20 s: {exc.stderr}")
    assert_user_error(result, "python -m tinymq worker: error: 'polling:queue' is an int (5), not a tinymq.Queue")


# Hangs at import (a module waiting for a service that is down), after noting its pid and whether it
# is the supervisor's check of the target or a worker process.
HANGING = textwrap.dedent("""
    import os, sys, time

    with open("pids", "a") as pids:
        pids.write(f"{'check' if '--check' in sys.argv else 'worker'} {os.getpid()}\\n")
    checking = "--check" in sys.argv
    if checking == (os.environ["HANG_IN"] == "check"):
        time.sleep(3600)
    from tinymq import Queue
    from tinymq.redis import RedisBroker

    queue = Queue(broker=RedisBroker(os.environ["TINYMQ_TEST_REDIS"], name="hanging"))
""")


@pytest.mark.parametrize("hang_in", ["check", "worker"])
def test_a_process_still_loading_the_target_ends_when_the_supervisor_is_killed(tmp_path, redis_url, hang_in):
    (tmp_path / "hanging.py").write_text(HANGING)
    supervisor = subprocess.Popen([sys.executable, "-m", "tinymq", "worker", "hanging:queue"], cwd=str(tmp_path),
                                  env=env(TINYMQ_TEST_REDIS=redis_url, HANG_IN=hang_in),
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pids = tmp_path / "pids"
    hanging = []
    try:
        eventually(lambda: hang_in in (pids.read_text() if pids.exists() else ""), f"a {hang_in} importing")
        hanging = [int(line.split()[1]) for line in pids.read_text().splitlines() if line.startswith(hang_in)]
        supervisor.kill()
        supervisor.wait(TIMEOUT)
        eventually(lambda: not any(map(alive, hanging)), f"the {hang_in} process gone after the supervisor", 20)
    finally:
        supervisor.kill()
        supervisor.wait()
        for pid in hanging:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
