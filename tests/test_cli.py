"""The command line, run as users run it: ``python -m tinymq ...`` in a subprocess.

``status`` / ``requeue-dead`` / ``purge-dead`` on a SQLite file (owned by a live
queue in another process, or by nobody), and the error paths of ``worker``.
Exit codes: 0 done, 1 an error (a clear message, no traceback), 2 bad usage.
"""
import hashlib
import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

import tinymq
from tinymq import SQLitePersistence

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX: flock, signals, sessions")

ROOT = Path(tinymq.__file__).resolve().parent.parent
TIMEOUT = 60  # seconds for one command: every command here returns in well under one


def env(**extra):
    variables = dict(os.environ, **extra)
    variables["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return variables


def cli(*args, cwd=None):
    """Run ``python -m tinymq *args``; the finished process (text output)."""
    return subprocess.run([sys.executable, "-m", "tinymq", *map(str, args)], cwd=cwd, env=env(),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=TIMEOUT)


def assert_user_error(result, *fragments, code=1):
    """Exit ``code`` with every fragment in stderr, no traceback, nothing on stdout."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr)
    assert result.stdout == ""


def snapshot(directory):
    """Every file in ``directory``: name -> sha256 of its bytes."""
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(Path(directory).iterdir())}


# --- a live queue that owns the file, in another process -----------------------------------

# A queue on the store, with jobs in every state: one email running (held until stdin
# closes), one HIGH and one LOW email ready behind it (emails run one at a time), one
# delayed email, and three dead jobs (two failed attempts, one with no executor).
OWNER = textwrap.dedent("""
    import json, os, sys, threading, time
    import tinymq
    from tinymq import ExecutorConfig, Job, Priority

    store = tinymq.SQLitePersistence(sys.argv[1])
    queue = tinymq.Queue(100)
    queue.set_persistence(store)
    release = threading.Event()
    running = threading.Event()
    failed = []
    reported = threading.Event()

    def email(job):
        running.set()
        release.wait()

    def fail(job):
        raise ValueError(f"boom {job.payload}")

    @queue.on_failure
    def record(job, reason, exc):
        failed.append(job.id)
        if len(failed) == 3:
            reported.set()

    queue.register_executor("email", email, ExecutorConfig(max_concurrent_jobs=1, timeout=None))
    queue.register_executor("fail", fail)
    jobs = [
        Job("email", "first", priority=Priority.HIGH, id="email-high-1"),
        Job("email", "second", priority=Priority.HIGH, id="email-high-2"),
        Job("email", "last", priority=Priority.LOW, id="email-low"),
        Job("email", "tomorrow", run_at=time.time() + 86400, id="email-delayed"),
        Job("fail", 1, id="fail-1").with_max_retries(0),
        Job("fail", 2, id="fail-2").with_max_retries(0),
        Job("sms", None, id="sms-1", tags={"user": "7"}),
    ]
    for job in jobs:
        queue.enqueue(job)
    queue.start_dispatcher(2)
    assert running.wait(30) and reported.wait(30)
    print(json.dumps({"pid": os.getpid()}), flush=True)
    sys.stdin.read()  # until the test closes our stdin
    release.set()
    queue.stop()
    store.close()
""")


class Owner:
    """The process running OWNER on ``path``, until ``exit()``."""

    def __init__(self, path):
        self.process = subprocess.Popen([sys.executable, "-c", OWNER, str(path)], env=env(),
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True)
        line = self.process.stdout.readline()
        assert line, self.process.stderr.read()
        self.pid = json.loads(line)["pid"]
        assert self.pid == self.process.pid

    def exit(self):
        _, errors = self.process.communicate(timeout=TIMEOUT)
        assert self.process.returncode == 0, errors


@pytest.fixture
def owned(tmp_path):
    """(path of a store owned by a live queue in another process, that Owner)."""
    path = tmp_path / "jobs.db"
    owner = Owner(path)
    yield path, owner
    if owner.process.poll() is None:
        owner.process.kill()
        owner.process.wait()


def status_json(path):
    result = cli("status", "--db", path, "--json")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return json.loads(result.stdout)


def test_status_json_of_a_file_owned_by_a_live_queue(owned):
    path, owner = owned
    report = status_json(path)
    assert report["backend"] == "sqlite"
    assert report["db"] == str(path)
    assert report["counts"] == {"ready": 2, "delayed": 1, "running": 1, "dead": 3, "corrupt": 0}
    # Due: ready or running. The running one is a HIGH email.
    assert report["priorities"] == {
        "HIGH": {"due": 2, "delayed": 0},
        "MEDIUM": {"due": 0, "delayed": 1},
        "LOW": {"due": 1, "delayed": 0},
    }
    assert report["types"] == {"email": {"due": 3, "delayed": 1}}
    dead = {entry["id"]: entry for entry in report["dead_jobs"]}
    assert set(dead) == {"fail-1", "fail-2", "sms-1"}
    assert dead["fail-1"]["reason"] == "retries_exhausted"
    assert dead["fail-1"]["error"] == "ValueError: boom 1"
    assert dead["fail-2"]["payload"] == 2
    assert dead["fail-2"]["retries"] == 1
    assert dead["sms-1"]["reason"] == "no_executor"
    assert dead["sms-1"]["type"] == "sms"
    assert dead["sms-1"]["priority"] == "MEDIUM"
    assert dead["sms-1"]["tags"] == {"user": "7"}
    assert report["quarantined"] == []
    assert owner.process.poll() is None  # the owner was not disturbed


def test_status_table_of_a_file_owned_by_a_live_queue(owned):
    path, owner = owned
    result = cli("status", "--db", path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"tinymq store {path}"
    header = lines.index("ready  delayed  running  dead  corrupt")
    assert lines[header + 2].split() == ["2", "1", "1", "3", "0"]
    rows = {line.split()[0]: line.split()[1:] for line in lines
            if line.split()[:1] in (["HIGH"], ["MEDIUM"], ["LOW"])}
    assert rows == {"HIGH": ["2", "0"], "MEDIUM": ["0", "1"], "LOW": ["1", "0"]}
    assert "dead jobs: 3" in lines
    dead_rows = {line.split()[0]: line for line in lines if line.startswith(("fail-", "sms-"))}
    assert set(dead_rows) == {"fail-1", "fail-2", "sms-1"}
    assert "retries_exhausted" in dead_rows["fail-1"] and "ValueError: boom 1" in dead_rows["fail-1"]
    assert "no_executor" in dead_rows["sms-1"]


def test_status_changes_nothing(owned):
    path, owner = owned
    before = snapshot(path.parent)
    assert cli("status", "--db", path).returncode == 0
    assert cli("status", "--db", path, "--json").returncode == 0
    assert snapshot(path.parent) == before
    owner.exit()
    before = snapshot(path.parent)  # no owner: the database alone, read as it is
    assert status_json(path)["counts"]["dead"] == 3
    assert snapshot(path.parent) == before


def test_status_limits_the_dead_jobs_listed(owned):
    path, _ = owned
    result = cli("status", "--db", path, "--limit", "1")
    assert result.returncode == 0, result.stderr
    listed = [line for line in result.stdout.splitlines() if line.startswith(("fail-", "sms-"))]
    assert len(listed) == 1
    assert "(the newest 1 of 3;" in result.stdout
    assert len(status_json(path)["dead_jobs"]) == 3  # --json lists all


def test_status_of_a_missing_file_creates_nothing(tmp_path):
    result = cli("status", "--db", tmp_path / "nothing.db")
    assert_user_error(result, "nothing.db", "does not exist")
    assert list(tmp_path.iterdir()) == []


def test_status_of_a_file_that_is_not_a_store(tmp_path):
    path = tmp_path / "other.db"
    import sqlite3
    with sqlite3.connect(str(path)) as connection:
        connection.execute("CREATE TABLE users (name TEXT)")
    connection.close()
    os.chmod(path, 0o600)
    before = snapshot(tmp_path)
    assert_user_error(cli("status", "--db", path), "other.db", "is not a tinymq store")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("command", ["requeue-dead", "purge-dead"])
def test_changing_dead_jobs_is_refused_while_a_live_queue_owns_the_file(owned, command):
    path, owner = owned
    for ids in (["fail-1"], ["--all"]):
        result = cli(command, "--db", path, *ids)  # at once: subprocess.run's timeout would fail a hang
        assert_user_error(result, str(path), f"pid {owner.pid}", "stop that process first")
    assert status_json(path)["counts"]["dead"] == 3
    assert owner.process.poll() is None


def test_requeue_and_purge_dead_jobs_once_the_owner_has_exited(owned):
    path, owner = owned
    owner.exit()
    result = cli("requeue-dead", "--db", path, "fail-1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"requeued 1 dead job in {path}")
    report = status_json(path)
    assert {entry["id"] for entry in report["dead_jobs"]} == {"fail-2", "sms-1"}
    with SQLitePersistence(path, read_only=True) as store:
        requeued = [job for job in store.jobs() if job.id == "fail-1"]
    assert len(requeued) == 1 and requeued[0].retries == 0 and requeued[0].payload == 1

    result = cli("purge-dead", "--db", path, "--all")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"purged 2 dead jobs from {path}")
    report = status_json(path)
    assert report["dead_jobs"] == [] and report["counts"]["dead"] == 0
    # The requeued job runs on the next queue that opens the file.
    ran = []
    done = threading.Event()
    with SQLitePersistence(path) as store:
        queue = tinymq.Queue(100)
        queue.register_executor("fail", lambda job: (ran.append(job.id), done.set()))
        queue.register_executor("email", lambda job: None)
        queue.set_persistence(store)
        queue.start_dispatcher(1)
        assert done.wait(TIMEOUT)
        queue.stop()
    assert ran == ["fail-1"]


def test_changing_dead_jobs_is_all_or_nothing(owned):
    path, owner = owned
    owner.exit()
    before = snapshot(path.parent)
    for command in ("requeue-dead", "purge-dead"):
        result = cli(command, "--db", path, "fail-1", "email-low", "no-such-job")
        assert_user_error(result, "'email-low', 'no-such-job'", "nothing changed")
    assert {entry["id"] for entry in status_json(path)["dead_jobs"]} == {"fail-1", "fail-2", "sms-1"}
    assert snapshot(path.parent).keys() == before.keys()


def test_changing_dead_jobs_of_a_missing_file_creates_nothing(tmp_path):
    for command in ("requeue-dead", "purge-dead"):
        assert_user_error(cli(command, "--db", tmp_path / "nothing.db", "--all"), "does not exist")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("arguments", [
    ["requeue-dead", "--db", "jobs.db"],                     # neither ids nor --all
    ["purge-dead", "--db", "jobs.db", "--all", "some-id"],   # both
    ["status"],                                              # no --db
    ["status", "--db", "jobs.db", "--limit", "-1"],
    ["worker", "app:queue", "--processes", "0"],
    ["worker", "app:queue", "--workers", "many"],
    ["worker", "app"],                                       # no attribute
    ["worker", "app:queue:more"],
    ["no-such-command"],
])
def test_bad_usage_exits_2(tmp_path, arguments):
    result = cli(*arguments, cwd=tmp_path)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "usage: python -m tinymq" in result.stderr
    assert "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_help_lists_the_commands():
    result = cli("--help")
    assert result.returncode == 0
    for command in ("demo", "status", "requeue-dead", "purge-dead", "worker"):
        assert f"    {command} " in result.stdout, result.stdout
    assert "_worker-child" not in result.stdout


# --- worker: targets that cannot run ----------------------------------------------------

APP = textwrap.dedent("""
    import tinymq
    queue = tinymq.Queue(10)
    settings = {"queue": "not here"}

    class Holder:
        pass

    holder = Holder()
    holder.queue = queue
""")

BROKEN = textwrap.dedent("""
    def configure():
        return undefined_setting

    queue = configure()
""")


@pytest.fixture
def project(tmp_path):
    """A directory with the user's modules, for ``worker`` to import from (it is the cwd)."""
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "__init__.py").write_text("")
    (tmp_path / "app" / "tasks.py").write_text(APP)
    (tmp_path / "app" / "broken.py").write_text(BROKEN)
    return tmp_path


@pytest.mark.parametrize("target, fragments", [
    ("app.missing:queue", ["cannot import 'app.missing'", "no module named 'app.missing'"]),
    ("elsewhere:queue", ["cannot import 'elsewhere'", "no module named 'elsewhere'"]),
    ("app.tasks:nothing", ["'app.tasks' has no attribute 'nothing'"]),
    ("app.tasks:holder.nothing", ["'app.tasks:holder' has no attribute 'nothing'"]),
    ("app.tasks:settings", ["'app.tasks:settings' is a dict ({'queue': 'not here'}), not a tinymq.Queue"]),
    ("app.tasks:Holder", ["'app.tasks:Holder' is a type", "not a tinymq.Queue"]),
    ("app.tasks:queue", ["'app.tasks:queue' is a tinymq.Queue without a broker", "RedisBroker"]),
    ("app.tasks:holder.queue", ["'app.tasks:holder.queue' is a tinymq.Queue without a broker"]),
])
def test_worker_refuses_a_target_that_is_not_a_queue_with_a_broker(project, target, fragments):
    result = cli("worker", target, "--processes", "2", cwd=project)
    assert_user_error(result, f"python -m tinymq worker: error: {fragments[0]}", *fragments[1:])
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr  # said once, not once per process


def test_worker_shows_where_the_users_module_failed_to_import(project):
    result = cli("worker", "app.broken:queue", cwd=project)
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith("python -m tinymq worker: error: importing 'app.broken' "
                                    "(from 'app.broken:queue') raised an exception:\n")
    # The user's own frames and exception, without importlib's or tinymq's.
    assert 'broken.py", line 5, in <module>' in result.stderr
    assert 'broken.py", line 3, in configure' in result.stderr
    assert result.stderr.rstrip().endswith("NameError: name 'undefined_setting' is not defined")
    assert "importlib" not in result.stderr and "_worker.py" not in result.stderr
