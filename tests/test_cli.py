"""The command line, run as users run it: ``python -m tinymq ...`` in a subprocess.

``status`` / ``requeue-dead`` / ``purge-dead`` on a SQLite file (owned by a live
queue in another process, or by nobody), and the error paths of ``worker``.
Exit codes: 0 done, 1 an error (a clear message, no traceback), 2 bad usage.
"""
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
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

    dead = []
    all_dead = threading.Event()

    class Store(tinymq.SQLitePersistence):
        def mark_dead(self, job, reason, error=None):  # after the failure callbacks, by design
            super().mark_dead(job, reason, error)
            dead.append(job.id)
            if len(dead) == 3:
                all_dead.set()

    store = Store(sys.argv[1])
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
    assert running.wait(30) and reported.wait(30) and all_dead.wait(30)  # nothing left to write
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


# Fixed (duecount): status --db's priority and type tables put a job due at its creation under
# "delayed" when its timestamp was ahead of the clock (the clock stepped back since it was
# enqueued), while the counts above them, and a queue loading the file, take it as ready.
def test_status_tables_agree_with_the_counts_for_a_job_due_at_its_creation(tmp_path):
    path = tmp_path / "jobs.db"
    store = SQLitePersistence(str(path))
    queue = tinymq.Queue()
    queue.set_persistence(store)
    job = tinymq.Job("t")
    job.timestamp = time.time() + 3600  # as if the clock was stepped back an hour since
    job.run_at = job.timestamp  # due at its creation
    try:
        queue.enqueue(job)
        report = status_json(path)
    finally:
        queue.stop(wait=False)
        store.close()
    assert report["counts"]["ready"] == 1 and report["counts"]["delayed"] == 0
    assert report["priorities"]["MEDIUM"] == {"due": 1, "delayed": 0}
    assert report["types"] == {"t": {"due": 1, "delayed": 0}}


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
    ["worker", "app:queue", "--processes", "1025"],
    ["worker", "app:queue", "--processes", "99999999999999999999"],
    ["worker", "app:queue", "--workers", "many"],
    ["worker", "app:queue", "--workers", "10001"],
    ["worker", "app:queue", "--workers", "99999999999999999999"],  # (ran until no thread was left)
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


def test_version_prints_the_version_and_the_core_in_use():
    """For a bug report: which tinymq, and which core runs it (the environment's, as here)."""
    result = cli("--version")
    core = "compiled core" if tinymq.HAS_EXTENSION else "pure-Python core"
    assert (result.returncode, result.stdout, result.stderr) == (0, f"tinymq {tinymq.__version__} ({core})\n", "")


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


# --- worker and status on a queue shared through Redis ------------------------------------

# The user's module for `worker`: every attempt is recorded in Redis lists ("started",
# "finished": "<job id> <pid>"). A job with {"hold_once": true} holds its first attempt
# for a minute (a running attempt to stop or kill); "fail" jobs always fail.
SHARED = textwrap.dedent("""
    import os, time
    import redis
    import tinymq
    from tinymq.redis import RedisBroker

    URL = os.environ["TINYMQ_TEST_REDIS"]
    record = redis.Redis.from_url(URL)
    queue = tinymq.Queue(config=tinymq.Config(buffer_size=1000),
                         broker=RedisBroker(URL, name="cli", lease=float(os.environ["TINYMQ_TEST_LEASE"])))

    @queue.executor("record", max_concurrent_jobs=50, timeout=120)
    def run(job):
        seconds = job.payload.get("seconds", 0)
        if job.payload.get("hold_once") and record.set(f"held:{job.id}", 1, nx=True):
            seconds = 60
        record.rpush("started", f"{job.id} {os.getpid()}")
        time.sleep(seconds)
        record.rpush("finished", f"{job.id} {os.getpid()}")

    @queue.executor("fail", max_concurrent_jobs=2)
    def fail(job):
        raise ValueError(f"cannot {job.payload}")
""")

# Crashes (exit 7) just after its start, but loads fine for the supervisor's check.
CRASHING = textwrap.dedent("""
    import os, sys, threading
    from app.shared import queue

    if "--check" not in sys.argv:
        threading.Timer(0.05, os._exit, (7,)).start()
""")

# Ends its worker processes with code 0 while they import it (a module that exits at import only
# in some processes), but loads fine for the supervisor's check.
EXITS_IN_WORKERS = textwrap.dedent("""
    import os, sys
    if "--check" not in sys.argv:
        os._exit(0)
    from app.shared import queue
""")

# Ends its worker processes with code 0 just after they started the queue (a job's os._exit(0)).
EXITS_AFTER_START = textwrap.dedent("""
    import os, sys, threading
    from app.shared import queue

    if "--check" not in sys.argv:
        threading.Timer(0.05, os._exit, (0,)).start()
""")

LEASE = 2.0  # seconds: a killed worker process's attempts go back within about this


class WorkerCLI:
    """``python -m tinymq worker`` in a subprocess; its log (stdout and stderr) read as it comes."""

    def __init__(self, project, redis_url, target, *options, command=("-m", "tinymq")):
        """``command``: what the interpreter is given before ``worker`` (a script that runs tinymq's
        command line, with interpreter options of its own)."""
        self.process = subprocess.Popen(
            [sys.executable, *command, "worker", target, *map(str, options)], cwd=str(project),
            env=env(TINYMQ_TEST_REDIS=redis_url, TINYMQ_TEST_LEASE=str(LEASE)),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines = []
        self.changed = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.process.stdout:
            with self.changed:
                self.lines.append(line.rstrip("\n"))
                self.changed.notify_all()
        with self.changed:
            self.lines.append(None)  # end of output
            self.changed.notify_all()

    def log(self):
        with self.changed:
            return "\n".join(line for line in self.lines if line is not None)

    def wait_for(self, pattern, count=1, timeout=TIMEOUT):
        """The first ``count`` matches of regex ``pattern`` in the log, once there are that many."""
        regex = re.compile(pattern)
        with self.changed:
            def found():
                return [m for m in map(regex.search, filter(None, self.lines)) if m]
            if not self.changed.wait_for(lambda: len(found()) >= count or None in self.lines, timeout):
                pytest.fail(f"no {count} x {pattern!r} in {timeout} s; log:\n{self.log()}")
            matches = found()
            assert len(matches) >= count, f"exited before {count} x {pattern!r}; log:\n{self.log()}"
            return matches[:count]

    def children(self):
        """Worker process number -> pid of its latest start."""
        with self.changed:
            starts = re.findall(r"started worker process (\d+) \(pid (\d+)\)", self.log())
        return {int(number): int(pid) for number, pid in starts}

    def signal(self, number):
        self.process.send_signal(number)

    def wait(self, timeout=TIMEOUT):
        code = self.process.wait(timeout)
        self.reader.join(timeout)
        return code

    def kill(self):
        """Cleanup: the supervisor and every child it started, by pid."""
        pids = [int(pid) for pid in re.findall(r"\(pid (\d+)\)", self.log())]
        for pid in [self.process.pid] + pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.wait()


@pytest.fixture
def shared_project(project, redis_url):
    (project / "app" / "shared.py").write_text(SHARED)
    (project / "app" / "crashing.py").write_text(CRASHING)
    (project / "app" / "exits_in_workers.py").write_text(EXITS_IN_WORKERS)
    (project / "app" / "exits_after_start.py").write_text(EXITS_AFTER_START)
    started = []

    def start(target="app.shared:queue", *options):
        worker = WorkerCLI(project, redis_url, target, *options)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.kill()


@pytest.fixture
def producer(redis_url):
    """A Queue on the same broker name, in the test process: it enqueues and joins, runs nothing."""
    from tinymq.redis import RedisBroker

    queue = tinymq.Queue(config=tinymq.Config(buffer_size=1000), broker=RedisBroker(redis_url, name="cli"))
    yield queue
    queue.stop()
    queue.broker.close()


@pytest.fixture
def record(redis_url):
    import redis

    # No socket timeout: a BLPOP waits as long as its own timeout says (redis-py's default socket
    # timeout cut a wait for a worker process starting on a busy machine short).
    client = redis.Redis.from_url(redis_url, decode_responses=True, socket_timeout=None)
    yield client
    client.close()


def pop(record, key, count):
    """The next ``count`` entries of list ``key`` ("<job id> <pid>"), waiting for each (BLPOP)."""
    entries = []
    for _ in range(count):
        entry = record.blpop([key], timeout=TIMEOUT)
        assert entry is not None, f"only {entries} in {key!r} after {TIMEOUT} s"
        job_id, pid = entry[1].split()
        entries.append((job_id, int(pid)))
    return entries


def redis_status(redis_url, *options):
    result = cli("status", "--redis", redis_url, "--name", "cli", *options)
    assert result.returncode == 0, result.stderr
    return result


def alive(pid):
    """Whether ``pid`` runs (a zombie that nobody reaped yet counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):  # (the read of a process reaped after the open: ESRCH)
        return False


def eventually(predicate, what, timeout=TIMEOUT):
    """Wait for ``predicate()`` where nothing can announce it to this process (another's state)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"not {what} after {timeout} s"
        time.sleep(0.05)


def record_jobs(count, **payload):
    return [tinymq.Job("record", dict(payload), id=f"job-{number}") for number in range(count)]


def test_worker_processes_run_the_shared_queue(shared_project, producer, record, redis_url):
    worker = shared_project("app.shared:queue", "--processes", 2, "--workers", 2)
    worker.wait_for(r"worker process started: 2 worker threads", count=2)
    children = set(worker.children().values())
    assert len(children) == 2
    producer.enqueue_many(record_jobs(40, seconds=0.05))
    assert producer.join(timeout=TIMEOUT)
    finished = pop(record, "finished", 40)
    assert sorted(job_id for job_id, _ in finished) == sorted(f"job-{n}" for n in range(40))
    assert {pid for _, pid in finished} == children  # both worker processes ran jobs
    assert record.llen("finished") == 0  # each ran once
    stats = producer.get_stats()
    assert stats.jobs_succeeded == 40 and stats.jobs_failed == 0

    worker.signal(signal.SIGTERM)
    assert worker.wait() == 0, worker.log()
    assert "Traceback" not in worker.log()
    assert not any(alive(pid) for pid in children)


def test_sigterm_lets_started_jobs_finish_and_leaves_the_rest_in_redis(shared_project, producer, record,
                                                                       redis_url):
    worker = shared_project("app.shared:queue", "--processes", 2, "--workers", 1)
    worker.wait_for(r"worker process started", count=2)
    producer.enqueue_many(record_jobs(12, seconds=1.5))
    started = pop(record, "started", 2)  # one attempt running in each process
    worker.signal(signal.SIGTERM)
    assert worker.wait() == 0, worker.log()
    assert len(re.findall(r"stopping \(SIGTERM\)", worker.log())) == 2
    assert "all worker processes stopped" in worker.log()

    started += [tuple(entry.split()) for entry in record.lrange("started", 0, -1)]
    finished = [tuple(entry.split()) for entry in record.lrange("finished", 0, -1)]
    assert sorted(job_id for job_id, _ in started) == sorted(job_id for job_id, _ in finished)  # all finished
    left = 12 - len(finished)
    assert left >= 8  # 1.5 s each, one at a time per process: most never started
    report = json.loads(redis_status(redis_url, "--json").stdout)
    assert report["counts"] == {"ready": left, "waiting_for_room": 0, "delayed": 0, "taken": 0, "dead": 0}
    assert report["worker_processes"] == 0
    assert report["counters"]["jobs_succeeded"] == len(finished)

    # The jobs left run in the next worker, each once, none of them a second time.
    record.delete("started", "finished")
    worker = shared_project("app.shared:queue", "--processes", 1, "--workers", 8)
    assert producer.join(timeout=TIMEOUT)
    ran = [job_id for job_id, _ in pop(record, "finished", left)]
    assert sorted(ran + [job_id for job_id, _ in finished]) == sorted(f"job-{n}" for n in range(12))
    worker.signal(signal.SIGINT)
    assert worker.wait() == 0, worker.log()


def test_a_killed_worker_process_is_restarted_and_the_queue_drains(shared_project, producer, record):
    worker = shared_project("app.shared:queue", "--processes", 2, "--workers", 2)
    worker.wait_for(r"worker process started", count=2)
    producer.enqueue_many(record_jobs(30, seconds=0.2))
    victim = worker.children()[0]
    running_in_victim = None
    while running_in_victim is None:  # wait until the victim runs an attempt: it dies with one
        job_id, pid = pop(record, "started", 1)[0]
        if pid == victim:
            running_in_victim = job_id
    os.kill(victim, signal.SIGKILL)
    worker.wait_for(rf"worker process 0 \(pid {victim}\) was killed by SIGKILL; starting it again in 0.5 s")
    worker.wait_for(r"started worker process 0 \(pid (\d+)\)", count=2)
    assert worker.children()[0] != victim
    assert producer.join(timeout=TIMEOUT)  # the killed attempt came back (lease) and ran
    finished = {job_id for job_id, _ in (entry.split() for entry in record.lrange("finished", 0, -1))}
    assert finished == {f"job-{n}" for n in range(30)}
    stats = producer.get_stats()
    assert stats.jobs_succeeded == 30 and stats.jobs_failed == 0
    worker.signal(signal.SIGTERM)
    assert worker.wait() == 0, worker.log()


def test_a_worker_process_crashing_at_start_is_restarted_with_a_growing_delay(shared_project):
    worker = shared_project("app.crashing:queue", "--processes", 1, "--workers", 1)
    crashes = worker.wait_for(r"exited with code 7; starting it again in ([\d.]+) s", count=4)
    assert [float(match.group(1)) for match in crashes] == [0.5, 1.0, 2.0, 4.0]
    worker.signal(signal.SIGTERM)  # while a restart is pending
    assert worker.wait() == 0, worker.log()
    assert len(worker.children()) == 1 and len(re.findall("started worker process", worker.log())) == 4


# Fixed: a worker process whose import of the target ended it with code 0 (which the check, run
# once, did not meet) was started again every few seconds for ever, though it never loaded the
# target: as the check, the supervisor now stops with an error instead.
def test_a_worker_process_whose_import_exits_0_stops_the_supervisor_with_an_error(shared_project):
    worker = shared_project("app.exits_in_workers:queue", "--processes", 2, "--workers", 1)
    assert worker.wait() == 1, worker.log()
    assert re.search(r"worker process \d \(pid \d+\) exited with code 0 before it had loaded "
                     r"'app.exits_in_workers:queue' \(importing the module ended the process\): stopping",
                     worker.log()), worker.log()
    assert "starting it again" not in worker.log()
    assert len(re.findall("started worker process", worker.log())) == 2


def test_a_worker_process_that_exits_0_after_it_loaded_the_target_is_restarted_as_a_crash(shared_project):
    worker = shared_project("app.exits_after_start:queue", "--processes", 1, "--workers", 1)
    crashes = worker.wait_for(r"exited with code 0; starting it again in ([\d.]+) s", count=2)
    assert [float(match.group(1)) for match in crashes] == [0.5, 1.0]
    worker.signal(signal.SIGTERM)
    assert worker.wait() == 0, worker.log()


def test_a_second_signal_while_stopping_is_a_hard_stop(shared_project, producer, record):
    worker = shared_project("app.shared:queue", "--processes", 1, "--workers", 1)
    producer.enqueue(tinymq.Job("record", {"hold_once": True}, id="held"))
    pop(record, "started", 1)
    child = worker.children()[0]
    worker.signal(signal.SIGINT)
    worker.wait_for(r"stopping \(SIGTERM\)")  # the child waits for its running attempt
    worker.signal(signal.SIGINT)
    assert worker.wait() == 1
    assert "second SIGINT while stopping: hard stop" in worker.log()
    assert not alive(child)
    # The attempt it was running comes back when its lease runs out, and runs in the next worker.
    worker = shared_project("app.shared:queue", "--processes", 1, "--workers", 1)
    assert producer.join(timeout=TIMEOUT)
    assert pop(record, "finished", 1)[0][0] == "held"
    worker.signal(signal.SIGTERM)
    assert worker.wait() == 0, worker.log()


def test_sigterm_to_every_process_at_once_still_stops_gracefully(shared_project, producer, record):
    """As systemd stops a service: SIGTERM to the supervisor and to its worker processes together."""
    worker = shared_project("app.shared:queue", "--processes", 1, "--workers", 1)
    producer.enqueue(tinymq.Job("record", {"seconds": 1.0}, id="slow"))
    pop(record, "started", 1)
    os.kill(worker.children()[0], signal.SIGTERM)
    worker.signal(signal.SIGTERM)  # forwarded: the worker process's second SIGTERM
    assert worker.wait() == 0, worker.log()
    assert pop(record, "finished", 1)[0][0] == "slow"
    assert producer.get_stats().jobs_succeeded == 1


def test_sigterms_to_a_worker_process_until_it_has_exited_do_not_kill_it(shared_project):
    """Signals that come once a worker process stops change nothing, up to its very end: the
    interpreter's own exit puts back the default action of every signal that has a Python
    handler, and a SIGTERM then (the supervisor sends one again to a child that said it loaded
    the target after the first, systemd one to the whole group) killed the process, which the
    supervisor reported as an error (exit 1). Here SIGTERMs come until the process is gone."""
    worker = shared_project("app.shared:queue", "--processes", 1, "--workers", 1)
    worker.wait_for(r"worker process started")
    child = worker.children()[0]
    worker.signal(signal.SIGTERM)
    ended = time.monotonic() + TIMEOUT
    while alive(child) and time.monotonic() < ended:
        try:
            os.kill(child, signal.SIGTERM)
        except ProcessLookupError:
            break
        time.sleep(0.0005)
    assert worker.wait() == 0, worker.log()
    assert "killed by SIGTERM" not in worker.log()


def test_a_target_module_that_changes_the_stop_signals_at_import_is_overridden(project, shared_project,
                                                                               producer, record):
    """The worker process owns its stop: what the module set for SIGTERM/SIGINT is replaced (logged)."""
    (project / "app" / "signals.py").write_text(textwrap.dedent("""
        import signal
        from app.shared import queue

        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    """))
    worker = shared_project("app.signals:queue", "--processes", 1, "--workers", 1)
    worker.wait_for(r"importing the target changed the handling of SIGINT \(SIG_IGN\), SIGTERM \(SIG_DFL\): "
                    r"replaced")
    producer.enqueue(tinymq.Job("record", {"seconds": 1.0}, id="slow"))
    pop(record, "started", 1)
    worker.signal(signal.SIGINT)  # forwarded as SIGTERM
    assert worker.wait() == 0, worker.log()
    assert pop(record, "finished", 1)[0][0] == "slow"


def test_a_worker_process_killed_by_sigterm_while_stopping_is_an_error(project, shared_project, producer,
                                                                       record):
    """Once it loaded the target, a worker process's SIGTERM is a graceful stop: its death by SIGTERM
    (here a job resets the disposition in C, as a C library might) is not a clean exit."""
    (project / "app" / "cdefault.py").write_text(textwrap.dedent("""
        import ctypes, signal
        from app.shared import queue, record

        @queue.executor("reset", timeout=None)
        def reset(job):
            ctypes.CDLL(None).signal(signal.SIGTERM, ctypes.c_void_p(0))  # SIG_DFL, behind Python's back
            record.rpush("finished", f"{job.id} 0")
    """))
    worker = shared_project("app.cdefault:queue", "--processes", 1, "--workers", 1)
    producer.enqueue(tinymq.Job("reset", id="reset"))
    pop(record, "finished", 1)
    worker.signal(signal.SIGTERM)
    assert worker.wait() == 1, worker.log()
    assert re.search(r"worker process 0 \(pid \d+\) was killed by SIGTERM while stopping", worker.log())


def test_worker_processes_stop_when_the_supervisor_dies(shared_project, producer, record):
    worker = shared_project("app.shared:queue", "--processes", 2, "--workers", 1)
    worker.wait_for(r"worker process started", count=2)
    children = list(worker.children().values())
    producer.enqueue_many(record_jobs(2, seconds=1.0))
    pop(record, "started", 2)
    worker.process.kill()  # kill -9: no signal is forwarded
    worker.wait_for(r"stopping \(the supervisor exited\)", count=2)
    worker.wait_for(r"worker process stopped", count=2)
    assert producer.join(timeout=TIMEOUT)  # the running attempts finished
    assert len(record.lrange("finished", 0, -1)) == 2
    eventually(lambda: not any(alive(pid) for pid in children), "exited")


def test_status_of_a_redis_queue_and_its_dead_jobs(shared_project, producer, record, redis_url):
    # Nothing of 'cli' in Redis yet (a mistyped --name looks the same): an error, not an empty report.
    for command in (["status"], ["status", "--json"], ["requeue-dead", "--all"]):
        assert_user_error(cli(*command, "--redis", redis_url, "--name", "cli"),
                          "holds no tinymq queue named 'cli'", "it holds no tinymq queue")
    assert record.keys("tmq:*") == []  # status created nothing, registered no worker process

    worker = shared_project("app.shared:queue", "--processes", 2, "--workers", 1)
    worker.wait_for(r"worker process started", count=2)
    producer.enqueue_many([tinymq.Job("fail", n, id=f"fail-{n}").with_max_retries(0) for n in range(3)])
    assert producer.join(timeout=TIMEOUT)
    producer.enqueue(tinymq.Job("record", {}, id="later", run_at=time.time() + 3600))
    producer.enqueue(tinymq.Job("record", {"hold_once": True}, id="held", priority=tinymq.Priority.HIGH))
    pop(record, "started", 1)

    assert_user_error(cli("status", "--redis", redis_url, "--name", "c1i"),
                      "holds no tinymq queue named 'c1i'", "queues there: cli")
    report = json.loads(redis_status(redis_url, "--json").stdout)
    assert report["backend"] == "redis" and report["name"] == "cli" and report["redis"] == redis_url
    assert report["counts"] == {"ready": 0, "waiting_for_room": 0, "delayed": 1, "taken": 1, "dead": 3}
    assert report["worker_processes"] == 2
    assert report["executors"] == {"fail": {"taken": 0, "max_jobs": 2, "rate_limit": None},
                                   "record": {"taken": 1, "max_jobs": 50, "rate_limit": None}}
    assert report["counters"]["jobs_enqueued"] == 5
    assert report["counters"]["jobs_failed"] == 3
    dead = {entry["id"]: entry for entry in report["dead_jobs"]}
    assert set(dead) == {"fail-0", "fail-1", "fail-2"}
    assert dead["fail-1"]["reason"] == "retries_exhausted"
    assert dead["fail-1"]["error"] == "ValueError: cannot 1"
    assert dead["fail-1"]["payload"] == 1

    text = redis_status(redis_url).stdout
    assert text.splitlines()[0] == f"tinymq queue 'cli' on {redis_url}"
    assert re.search(r"^\s+0\s+0\s+1\s+1\s+3\s+2$", text, re.MULTILINE), text
    assert re.search(r"^record\s+1\s+50$", text, re.MULTILINE), text  # (no rate limit: no rate columns)
    assert "rate limit" not in text
    assert re.search(r"^fail-1\s+fail\s+MEDIUM\s+1\s+retries_exhausted\s+ValueError: cannot 1$", text,
                     re.MULTILINE), text

    result = cli("requeue-dead", "--redis", redis_url, "--name", "cli", "fail-1", "nothing")
    assert_user_error(result, "no dead job with id 'nothing'", "nothing changed")
    result = cli("purge-dead", "--redis", redis_url, "--name", "cli", "fail-0")
    assert result.returncode == 0 and result.stdout == "purged 1 dead job from Redis queue 'cli'\n"
    result = cli("requeue-dead", "--redis", redis_url, "--name", "cli", "--all")
    assert result.returncode == 0 and result.stdout.startswith("requeued 2 dead jobs in Redis queue 'cli'")
    eventually(lambda: producer.get_stats().jobs_failed == 5, "failed again")  # they ran again
    report = json.loads(redis_status(redis_url, "--json").stdout)
    assert {entry["id"] for entry in report["dead_jobs"]} == {"fail-1", "fail-2"}
    worker.signal(signal.SIGTERM)
    worker.wait_for(r"stopping \(SIGTERM\)", count=2)
    worker.kill()  # the held attempt would take a minute


def test_status_of_a_redis_queue_reads_only_the_dead_jobs_it_lists(redis_url):
    """status --redis read every dead job in its one script call: with a million, it blocked Redis.
    It counts them all and reads the newest it lists (--limit, at most 1000: --json, --limit 0)."""
    import redis

    from tinymq import Config, Queue
    from tinymq.redis import RedisBroker

    dead_count = 3000
    q = Queue(config=Config(max_delayed_jobs=1), broker=RedisBroker(redis_url, name="cli"))
    try:  # each delayed job evicts the one before it: dead in id order
        later = time.time() + 3600
        jobs = [tinymq.Job("report", n, id=f"dead-{n:04}", run_at=later + n) for n in range(dead_count + 1)]
        for start in range(0, len(jobs), 500):
            q.enqueue_many(jobs[start:start + 500])
    finally:
        q.stop()
        q.broker.close()
    server = redis.Redis.from_url(redis_url)

    def status_and_job_reads(*options):
        server.config_resetstat()
        output = redis_status(redis_url, *options).stdout
        return output, server.info("commandstats").get("cmdstat_hmget", {}).get("calls", 0)

    def newest(count):
        return [f"dead-{n:04}" for n in range(dead_count - count, dead_count)]

    try:
        text, reads = status_and_job_reads()
        assert reads <= 20, reads
        assert "\ndead jobs: 3000\n" in text
        assert re.findall(r"^(dead-\d{4})\s", text, re.MULTILINE) == newest(20)
        assert text.endswith("\n(the newest 20 of 3000; status --redis reads at most the newest 1000 "
                             "(--limit 0, --json); broker.dead_jobs() lists them all)\n"), text

        report_text, reads = status_and_job_reads("--json")
        report = json.loads(report_text)
        assert reads <= 1000, reads
        assert report["counts"]["dead"] == dead_count and report["counts"]["delayed"] == 1
        assert [entry["id"] for entry in report["dead_jobs"]] == newest(1000)

        text, reads = status_and_job_reads("--limit", 0)
        assert reads <= 1000, reads
        assert re.findall(r"^(dead-\d{4})\s", text, re.MULTILINE) == newest(1000)
        assert "(the newest 1000 of 3000; status --redis reads at most" in text
    finally:
        server.close()


# Fixed (duecount): status --redis left a delayed job that had come due out of both its ready and
# its delayed figures until a worker process fetched (get_stats() counted it nowhere), where
# status --db counted it as ready. Both show a due job as ready, at its priority.
def test_status_counts_a_due_delayed_job_as_ready_for_a_broker_and_for_a_file(tmp_path, redis_url, record):
    from tinymq.redis import RedisBroker

    path = tmp_path / "jobs.db"
    store = SQLitePersistence(str(path))
    local = tinymq.Queue()
    local.set_persistence(store)
    shared = tinymq.Queue(broker=RedisBroker(redis_url, name="cli"))
    delay = 0.2
    try:
        for queue in (local, shared):  # no dispatcher: nothing moves a due job
            queue.enqueue(tinymq.Job("t", priority=tinymq.Priority.LOW))
            queue.enqueue_delayed(tinymq.Job("t", priority=tinymq.Priority.HIGH), delay)
            queue.enqueue_delayed(tinymq.Job("t"), 3600)
        due_by = time.time() + delay  # the store keeps wall-clock due times; Redis its server's
        server_due_by = sum(part / scale for part, scale in zip(record.time(), (1, 1e6))) + delay
        eventually(lambda: time.time() > due_by
                   and sum(part / scale for part, scale in zip(record.time(), (1, 1e6))) > server_due_by,
                   "due on both clocks")
        on_file = status_json(path)
        on_redis = json.loads(redis_status(redis_url, "--json").stdout)
    finally:
        local.stop(wait=False)
        store.close()
        shared.stop(wait=False)
        shared.broker.close()
    assert on_file["counts"] == {"ready": 2, "delayed": 1, "running": 0, "dead": 0, "corrupt": 0}
    assert on_file["priorities"]["HIGH"] == {"due": 1, "delayed": 0}
    assert on_redis["counts"] == {"ready": 2, "waiting_for_room": 0, "delayed": 1, "taken": 0, "dead": 0}
    assert on_redis["priorities"] == {"HIGH": {"ready": 1}, "MEDIUM": {"ready": 0}, "LOW": {"ready": 1}}


def test_status_of_a_redis_queue_shows_rate_limits_and_the_starts_in_their_window(redis_url, record):
    """Issue #14: beside each type's global concurrency limit and taken slots, its global rate
    limit and the starts counted in its window now, in the table and in --json."""
    from tinymq.redis import RedisBroker

    queue = tinymq.Queue(broker=RedisBroker(redis_url, name="cli"))
    try:
        rate = tinymq.ExecutorConfig(max_concurrent_jobs=4, rate_limit=tinymq.RateLimit(3, per=600.0))
        queue.register_executor("api", lambda job: None, rate)
        queue.register_executor("plain", lambda job: None, tinymq.ExecutorConfig(max_concurrent_jobs=2))
        burst = tinymq.ExecutorConfig(max_concurrent_jobs=1, rate_limit=tinymq.RateLimit(2, per=0.5))
        queue.register_executor("burst", lambda job: None, burst)
        queue.enqueue_many([tinymq.Job("api", n) for n in range(5)] + [tinymq.Job("plain", 0)]
                           + [tinymq.Job("burst", n) for n in range(2)])
        queue.start_dispatcher(2)
        eventually(lambda: queue.get_stats().jobs_succeeded == 6, "3 api, 1 plain and 2 burst done")  # 2 api wait

        def executors():
            return json.loads(redis_status(redis_url, "--json").stdout)["executors"]

        report = json.loads(redis_status(redis_url, "--json").stdout)
        burst_rate = report["executors"].pop("burst")["rate_limit"]
        assert report["executors"] == {
            "api": {"taken": 0, "max_jobs": 4, "rate_limit": {"max_starts": 3, "per": 600.0, "starts": 3}},
            "plain": {"taken": 0, "max_jobs": 2, "rate_limit": None},
        }
        assert (burst_rate["max_starts"], burst_rate["per"]) == (2, 0.5)
        # Once its window has passed its starts no longer count. Redis drops such a start only when
        # the type's next hand-out looks: one that ended a moment ago, still held, is not shown.
        eventually(lambda: executors()["burst"]["rate_limit"]["starts"] == 0, "the burst window passed")
        seconds, micros = record.time()
        record.zadd("tmq:{cli}:rate:burst", {"gone|1:x": seconds * 1000 + micros / 1000 - 1})
        assert executors()["burst"]["rate_limit"]["starts"] == 0
        assert report["counts"]["ready"] == 2  # the two waiting for the window
        text = redis_status(redis_url).stdout
        assert re.search(r"^executor\s+taken\s+max\s+rate limit\s+starts$", text, re.MULTILINE), text
        assert re.search(r"^api\s+0\s+4\s+3 per 600s\s+3$", text, re.MULTILINE), text
        assert re.search(r"^plain\s+0\s+2\s+-\s+-$", text, re.MULTILINE), text
        assert re.search(r"^burst\s+0\s+1\s+2 per 0.5s\s+0$", text, re.MULTILINE), text
        assert queue.get_stats().jobs_succeeded == 6  # (the window still holds the other two api jobs)
    finally:
        queue.stop()
        queue.broker.close()


def test_status_of_an_unreachable_redis_is_an_error():
    result = cli("status", "--redis", "redis://127.0.0.1:1/0", "--name", "cli")
    assert result.returncode == 1
    assert "python -m tinymq status: error: " in result.stderr and "127.0.0.1:1" in result.stderr
    assert "Traceback" not in result.stderr
