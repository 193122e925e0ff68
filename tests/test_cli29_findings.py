"""Defects of the SQLite store and of the worker command (session 29), each with its tests.

1. A store refused on a file that is not its to open (another program's database, one a newer
   tinymq wrote) left the lock file it had created beside it (``app.db-tinymq.lock``): a refused
   open now removes the lock file (and the database, side files) it made, and nothing else.
2. A store that found its database removed or replaced left its -wal and -shm beside the path: a
   new store there refused to open ("remove them"). It now removes them (they are its own), and a
   new store removes side files that hold nothing beside a missing database. (Since session 30 a
   removed database is written anew at the path, with its own side files: test_walwin30_findings.py.)
3. ``python -u -m tinymq worker``: the worker processes ran buffered (-u is not in sys.flags).
4. JSONSerializer decoded a deep payload on a thread with the process's thread stack size: an
   application's small one crashed it (SIGSEGV) at the depth dumps() accepts.
5. A file of an older tinymq (no serializer recorded) first opened with the wrong serializer had
   every row quarantined, and recorded that serializer; it is now refused.
"""
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import warnings

import pytest

import tinymq
from tinymq import Job, PersistenceError, SQLitePersistence
from tinymq.persistence import JSONSerializer, PickleSerializer
from tinymq.persistence._ownership import OwnedError

from _helpers import another_programs_database
from test_cli import TIMEOUT, WorkerCLI, producer, project, record, shared_project  # noqa: F401 (fixtures)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout whose tinymq is tested


# --- 1. a refused open leaves the directory as it found it ----------------------------------------

@pytest.mark.parametrize("tables, version, refusal", [
    (["users"], 0, "is not a tinymq store"),
    (["tinymq_jobs"], 2, "written by a newer tinymq"),
])
def test_a_refused_open_leaves_no_lock_file_behind(tmp_path, tables, version, refusal):
    path = tmp_path / "app.db"
    another_programs_database(path, tables, version)
    with pytest.raises(PersistenceError, match=refusal):
        SQLitePersistence(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app.db"]
    with pytest.raises(PersistenceError, match=refusal):  # and so again: nothing it left changes that
        SQLitePersistence(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app.db"]


def test_a_refused_open_keeps_a_lock_file_it_found(tmp_path):
    path = tmp_path / "app.db"
    another_programs_database(path)
    lock = tmp_path / "app.db-tinymq.lock"
    lock.write_bytes(b"12345\n")  # a previous opener's (a store of a tinymq that left them)
    os.chmod(lock, 0o600)
    found = os.stat(lock)
    with pytest.raises(PersistenceError, match="is not a tinymq store"):
        SQLitePersistence(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app.db", "app.db-tinymq.lock"]
    assert os.stat(lock).st_ino == found.st_ino  # (the pid in it is the refused opener's: as stale)


OWNER = """
import sys
from tinymq import Job, SQLitePersistence
with SQLitePersistence(sys.argv[1]) as owner:
    owner.save(Job("t", id="kept"))
    print("owned", flush=True)
    sys.stdin.readline()
    owner.save(Job("t", id="after"))
"""


def test_an_opener_refused_by_a_live_owner_leaves_its_lock_file(tmp_path):
    path = str(tmp_path / "jobs.db")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    owner = subprocess.Popen([sys.executable, "-c", OWNER, path], env=env, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout.readline() == "owned\n"
        lock = os.stat(path + "-tinymq.lock")
        with pytest.raises(OwnedError, match=f"pid {owner.pid}"):
            SQLitePersistence(path)
        assert os.stat(path + "-tinymq.lock").st_ino == lock.st_ino
        owner.stdin.write("go\n")
        owner.stdin.flush()
        assert owner.wait(60) == 0
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
    with SQLitePersistence(path) as store:
        assert sorted(job.id for job in store.load_all()) == ["after", "kept"]


def test_a_new_database_whose_open_fails_is_not_left_behind(tmp_path, monkeypatch):
    def fails(self, conn):
        raise PersistenceError("cannot open persistence file: disk I/O error (as a full disk would)")

    monkeypatch.setattr(SQLitePersistence, "_prepare", fails)
    with pytest.raises(PersistenceError, match="disk I/O error"):
        SQLitePersistence(tmp_path / "jobs.db")
    assert list(tmp_path.iterdir()) == []


def test_a_lock_file_that_cannot_be_written_is_not_left_behind(tmp_path, monkeypatch):
    import errno

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)  # (the pid written into the lock file)
    with pytest.raises(PersistenceError, match="cannot lock the lock file .*No space left"):
        SQLitePersistence(tmp_path / "jobs.db")
    assert list(tmp_path.iterdir()) == []


# --- 2. the -wal and -shm of a database removed under its owner -----------------------------------

def side_files(path):
    return sorted(name[len(os.path.basename(path)):] for name in os.listdir(os.path.dirname(path))
                  if name.startswith(os.path.basename(path)))


def jobs_in(path):
    with SQLitePersistence(path) as store:
        return sorted(job.id for job in store.load_all()), store.counts()


def break_store(store, what="removed"):
    """Remove ``store``'s database file (or put a tinymq store with job "new" in its place) and commit
    once: the store notices it before it acknowledges that commit."""
    os.unlink(store.path)
    store._next_wal_check = 0.0  # the next commit looks (else: the first one 50 ms after the last look)
    if what == "removed":  # written anew (test_walwin30_findings.py)
        store.save(Job("t", id="found-it"))
        return
    other = store.path + ".other"
    with SQLitePersistence(other) as replacement:
        replacement.save(Job("t", id="new"))
    os.replace(other, store.path)
    os.unlink(other + "-tinymq.lock")
    with pytest.raises(PersistenceError, match=f"database file was {what} under this store"):
        store.save(Job("t", id="found-it"))


# When the store found its database file gone, it emptied its -wal into the old file and left the
# -wal and -shm beside the path: a new store there refused to open ("remove them"), and a database put
# there meanwhile had the orphans beside it. The store now removes them (its own, by identity) as it
# notices; a removed file is written anew, and its new -wal and -shm are the new file's.
def test_a_new_store_where_the_database_was_removed_finds_what_it_held(path):
    store = SQLitePersistence(path)
    store.save_many([Job("t", id="old-1"), Job("t", id="old-2")])
    break_store(store)
    assert side_files(path) == ["", "-shm", "-tinymq.lock", "-wal"]
    assert {job.id for job in store.jobs()} == {"old-1", "old-2", "found-it"}
    store.close()
    assert side_files(path) == ["", "-tinymq.lock"]
    assert jobs_in(path)[0] == ["found-it", "old-1", "old-2"]


def test_a_database_put_in_place_of_a_removed_one_gets_nothing_of_it(path):
    store = SQLitePersistence(path)
    store.save_many([Job("t", id="old-1"), Job("t", id="old-2")])
    break_store(store, "replaced")
    assert side_files(path) == ["", "-tinymq.lock"]
    store.close()
    assert jobs_in(path)[0] == ["new"]


BREAKS_AND_DIES = """
import os, sys
from tinymq import Job, PersistenceError, SQLitePersistence
store = SQLitePersistence(sys.argv[1])
store.save_many([Job("t", id="old-%d" % n) for n in range(100)])
os.unlink(sys.argv[1])
store._next_wal_check = 0.0
try:
    store.save(Job("t", id="found-it"))
except PersistenceError:
    os._exit(1)
os._exit(0)  # killed: no close()
"""


def test_a_store_killed_after_its_database_was_removed_leaves_what_it_held_at_the_path(path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    assert subprocess.run([sys.executable, "-c", BREAKS_AND_DIES, path], env=env, timeout=60).returncode == 0
    assert jobs_in(path)[0] == sorted(["found-it"] + [f"old-{n}" for n in range(100)])


KILLED_OWNER = """
import os, sys
from tinymq import Job, SQLitePersistence
store = SQLitePersistence(sys.argv[1])
store.save_many([Job("t", id="old-%d" % n) for n in range(100)])
os._exit(0)  # killed: its commits are in its -wal only
"""


def killed_owner(path):
    """A store killed after 100 saves: its database, and its -wal that holds them."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    assert subprocess.run([sys.executable, "-c", KILLED_OWNER, path], env=env, timeout=60).returncode == 0
    assert os.path.getsize(path + "-wal") > 32


@pytest.mark.parametrize("wal", ["empty", "header alone"])
def test_a_wal_and_shm_that_hold_no_commit_beside_a_missing_database_are_removed(path, wal):
    # (What an older tinymq left beside a database removed under it, or a store killed as it noticed.)
    other = os.path.join(os.path.dirname(path), "other.db")
    killed_owner(other)
    with open(other + "-wal", "rb") as f:
        header = f.read(32)
    for suffix, content in (("-wal", b"" if wal == "empty" else header), ("-shm", b"\0" * 32768)):
        with open(os.open(path + suffix, os.O_WRONLY | os.O_CREAT, 0o600), "wb") as f:
            f.write(content)
    assert jobs_in(path)[0] == []
    assert side_files(path) == ["", "-tinymq.lock"]


def test_a_wal_with_commits_beside_a_missing_database_is_still_refused(path):
    killed_owner(path)
    os.rename(path, path + ".moved")  # (with its -wal, it is whole again: the -wal is never removed)
    with open(path + "-wal", "rb") as f:
        wal = f.read()
    with pytest.raises(PersistenceError, match="does not exist but its -wal"):
        SQLitePersistence(path)
    with open(path + "-wal", "rb") as f:
        assert f.read() == wal
    for suffix in ("-wal", "-shm"):
        os.rename(path + suffix, path + ".moved" + suffix)
    assert len(jobs_in(path + ".moved")[0]) == 100


# --- 3. python -u and the worker processes -------------------------------------------------------

# ``python -u -m tinymq worker ...``: the worker processes were started with the interpreter's options
# that sys.flags shows (-O, -X, -W ...), and -u is not one of them: a job's print() without flush sat
# in its process's buffer, and showed when the buffer filled or the process exited.
PRINTS = textwrap.dedent("""
    from app.shared import queue, record

    @queue.executor("print", timeout=120)
    def prints(job):
        print(f"printing {job.id}")  # no flush
        record.rpush("printed", job.id)
        while record.blpop(["release"], timeout=1) is None:  # (short waits: the client's read timeout)
            pass
""")


@pytest.mark.redis
def test_a_jobs_print_shows_as_it_runs_under_python_u(shared_project, project, producer, record, redis_url,
                                                      monkeypatch):
    monkeypatch.delenv("PYTHONUNBUFFERED", raising=False)  # (-u alone, not the variable children inherit)
    (project / "app" / "prints.py").write_text(PRINTS)
    worker = WorkerCLI(project, redis_url, "app.prints:queue", "--workers", 1, command=["-u", "-m", "tinymq"])
    try:
        producer.enqueue(Job("print", {}, id="p-1"))
        assert record.blpop(["printed"], timeout=TIMEOUT) is not None, worker.log()
        # (printed before the push: in the pipe already. Unbuffered, print() writes its text and its
        # newline apart: a log line of the worker's main thread may come between them.)
        worker.wait_for(r"^printing p-1", timeout=10)
        record.rpush("release", 1)
        producer.join(timeout=TIMEOUT)
        worker.signal(signal.SIGTERM)
        assert worker.wait() == 0, worker.log()
    finally:
        worker.kill()


@pytest.mark.parametrize("argv, unbuffered", [
    (["python", "-u", "-m", "tinymq", "worker"], True),
    (["python", "-Wd", "-Ou", "script.py"], True),
    (["python", "-X", "dev", "-W", "error", "-u", "-c", "code"], True),
    (["python", "-m", "tinymq", "-u"], False),  # the module's argument
    (["python", "-c", "code", "-u"], False),
    (["python", "-X", "u", "-m", "tinymq"], False),  # -X's value
    (["python", "-Xu", "-W", "u", "-m", "tinymq"], False),
    (["python", "--check-hash-based-pycs", "always", "-u", "script.py"], True),
    (["python", "script.py", "-u"], False),
    (["python", "-", "-u"], False),
    (["python"], False),
])
def test_minus_u_is_read_from_the_interpreters_own_arguments(argv, unbuffered):
    from tinymq._worker import _given_unbuffered

    assert _given_unbuffered(argv) is unbuffered


# --- 4. the C stack of the thread that decodes a deep payload --------------------------------------

# JSONSerializer decodes a deep payload (dumps() checks that it decodes again; loads() from deep in its
# caller's stack) on a thread of its own, started with whatever threading.stack_size() the process had:
# the application's setting for its own threads. At the depth dumps() accepts (about 9,998 levels on
# Python 3.13, whose C recursion limit bounds it; 993 on 3.9 to 3.11), the decode takes some 1.3 MiB
# of C stack on 3.13, 150 KiB on 3.9: an application whose threads have small stacks crashed there
# (SIGSEGV). Its thread now has a stack of its own size, and the application's setting is put back.
DEEPEST = """
import sys, threading
from tinymq.persistence.serializers import JSONSerializer

serializer = JSONSerializer()


def nested(depth):
    value = []
    for _ in range(depth - 1):
        value = [value]
    return value


def accepted(depth):
    try:
        serializer.dumps(nested(depth))
    except (ValueError, RecursionError):
        return False
    return True


low, high = 1, 1 << 20  # the deepest payload dumps() accepts, found with the process's own stack size
while high - low > 1:
    middle = (low + high) // 2
    low, high = (middle, high) if accepted(middle) else (low, middle)
threading.stack_size(SMALL)  # the application's threads: small stacks
text = serializer.dumps(nested(low))


def loaded(levels):  # loads() from deep in its caller's stack
    return loaded(levels - 1) if levels else serializer.loads(text)


value, depth = loaded(sys.getrecursionlimit() - 50), 1
while value:
    value, depth = value[0], depth + 1
assert depth == low, (depth, low)
assert threading.stack_size() == SMALL
print("decoded", low, "levels", flush=True)
"""


def test_a_payload_at_the_depth_dumps_accepts_decodes_whatever_stack_size_the_application_set():
    small = 64 * 1024
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, "-c", DEEPEST.replace("SMALL", str(small))], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    assert result.stdout.startswith("decoded "), result.stdout


# --- 5. a file of an older tinymq first opened with the wrong serializer ---------------------------

# A file written by a tinymq that did not record its serializer took the serializer of its first
# owner: given the wrong one, every row was quarantined as corrupt, and that wrong serializer was
# recorded, so the right one was then refused. Now a first row that does not decode with the store's
# serializer refuses the file, as a file recorded with another serializer is refused.
def pickle_serializer():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its warning about loading untrusted files
        return PickleSerializer()


def older_tinymqs_file(path, serializer):
    """A file as an older tinymq left it: three jobs (the oldest without a payload), no serializer record."""
    jobs = [Job("t", None, id="a"), Job("t", {"n": 2}, id="b"), Job("t", [3], id="c"), Job("t", {"n": 4}, id="d")]
    for created, job in enumerate(jobs, 1):
        job.timestamp = job.run_at = float(created)  # (an older file's rows load by creation)
    with SQLitePersistence(path, serializer=serializer) as store:
        store.save_many(jobs[:3])
        store.mark_dead(jobs[3], "retries_exhausted", "ValueError: 4")
    connection = sqlite3.connect(path)
    with connection:
        connection.execute("DELETE FROM tinymq_settings WHERE name = 'serializer'")
    connection.close()


def contents(path):
    with open(path, "rb") as f:
        return f.read()


@pytest.mark.parametrize("written_with, opened_with, written_name, opened_name", [
    (pickle_serializer, JSONSerializer, "PickleSerializer", "JSONSerializer"),
    (JSONSerializer, pickle_serializer, "JSONSerializer", "PickleSerializer"),
])
@pytest.mark.parametrize("read_only", [False, True])
def test_an_older_tinymqs_file_opened_with_the_wrong_serializer_is_refused(path, written_with, opened_with,
                                                                          written_name, opened_name, read_only):
    older_tinymqs_file(path, written_with())
    before = contents(path)
    with pytest.raises(PersistenceError) as refused:
        SQLitePersistence(path, serializer=opened_with(), read_only=read_only)
    message = str(refused.value)
    assert f"tinymq.persistence.serializers.{opened_name}" in message, message
    assert f"look written with tinymq.persistence.serializers.{written_name}" in message, message
    assert "job row 'b'" in message, message
    assert contents(path) == before  # nothing quarantined, no serializer recorded
    with SQLitePersistence(path, serializer=written_with()) as store:
        assert sorted(job.id for job in store.load_all()) == ["a", "b", "c"]
        assert store.counts()["corrupt"] == 0 and [dead.job.id for dead in store.dead_jobs()] == ["d"]
    with pytest.raises(PersistenceError, match=f"written with the serializer tinymq.persistence.serializers."
                                               f"{written_name}"):
        SQLitePersistence(path, serializer=opened_with())  # recorded now, by the right one


def test_an_older_tinymqs_file_whose_rows_look_like_no_known_serializer_says_which_one_failed(path):
    older_tinymqs_file(path, JSONSerializer())
    connection = sqlite3.connect(path)
    with connection:
        connection.execute("UPDATE tinymq_jobs SET payload = ? WHERE id = 'b'", (b"\x00\xffmsgpack?",))
    connection.close()
    with pytest.raises(PersistenceError, match=r"job row 'b' .*does not decode with tinymq\.persistence\."
                                               r"serializers\.JSONSerializer") as refused:
        SQLitePersistence(path)
    assert "look written with" not in str(refused.value)
