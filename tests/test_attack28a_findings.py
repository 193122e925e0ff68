"""Defects found by attack28a (session 28: the durability of the SQLite store and its command
line, attacked from outside), each with its test.
"""
import errno
import json
import os
import re
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import pytest

import tinymq
from tinymq import Job, Queue, SQLitePersistence

from _helpers import WAIT, another_programs_database

ROOT = Path(tinymq.__file__).resolve().parent.parent
TIMEOUT = 60  # seconds for one command: each returns in well under one


def cli(*args):
    """``python -m tinymq *args`` as a user runs it; the finished process (text output)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-m", "tinymq", *map(str, args)], env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=TIMEOUT)


# --- 1. requeue-dead / purge-dead of a job the default serializer cannot decode -------------

# `requeue-dead --db FILE ID` checked its ids against dead_jobs(), which leaves out a row the
# command's JSON serializer cannot decode (a store written with PickleSerializer): a dead job in
# the file was refused as "no dead job with id 'd1' ... nothing changed", while `--all` requeued
# it. docs/cli.md: only "an id that is not a dead job in the file is an error".
@pytest.mark.parametrize("command, done", [("requeue-dead", "requeued 1 dead job"), ("purge-dead", "purged 1 dead job")])
def test_requeue_and_purge_dead_by_id_take_a_dead_job_json_cannot_decode(tmp_path, command, done):
    from tinymq.persistence import PickleSerializer

    path = tmp_path / "jobs.db"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PickleSerializer's warning
        serializer = PickleSerializer()
    with SQLitePersistence(path, serializer=serializer) as store:
        job = Job("t", {1, 2}, id="d1")  # a set: pickle only
        store.save(job)
        store.mark_dead(job, "retries_exhausted", "boom")
    result = cli(command, "--db", path, "d1")
    assert result.returncode == 0 and result.stdout.startswith(done), (result.stdout, result.stderr)
    result = cli(command, "--db", path, "d2")  # an id no dead job has is still an error
    assert result.returncode == 1 and "no dead job with id 'd2'" in result.stderr
    with SQLitePersistence(path, serializer=serializer, read_only=True) as view:
        assert view.dead_jobs() == []
        assert [job.id for job in view.jobs()] == (["d1"] if command == "requeue-dead" else [])


# --- 2. A payload nested about as deep as the recursion limit -------------------------------

# JSON's encoder and decoder both recurse once per level of nesting, so how deep a payload they
# take depends on how deep in the stack they are called. A payload that a save from a shallow
# stack encoded could not be decoded by a load from a deeper one: the job whose enqueue had
# returned was quarantined at the next start ("corrupt: RecursionError"), and never ran.
# JSONSerializer.loads now decodes such a text on a new thread (its depth starts from none), and
# dumps refuses a value nested too deeply to be decoded even there.

def nested(depth):
    value = []
    for _ in range(depth):
        value = [value]
    return value


def depth_of(value):
    depth = 0
    while value:
        value, depth = value[0], depth + 1
    return depth


def deep_in_the_stack(frames, work):
    return work() if frames == 0 else deep_in_the_stack(frames - 1, work)


def on_a_new_thread(work):
    """``work()`` on a new thread (the shallowest stack a call can have); its result or exception."""
    outcome = []

    def run():
        try:
            outcome.append(work())
        except Exception as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return outcome[0]


def deepest(accepts):
    """The deepest nesting that ``accepts(depth)`` (True/False) takes, by bisection."""
    low, high = 1, 4 * sys.getrecursionlimit()
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if accepts(middle) else (low, middle - 1)
    return low


def test_json_loads_whatever_dumps_made_however_deep_in_the_stack_it_is_called():
    from tinymq.persistence import JSONSerializer

    serializer = JSONSerializer()

    def dumps_on_a_new_thread(depth):
        return isinstance(on_a_new_thread(lambda: serializer.dumps(nested(depth))), str)

    depth = deepest(dumps_on_a_new_thread)
    text = on_a_new_thread(lambda: serializer.dumps(nested(depth)))
    for frames in (0, 100, 300):
        assert depth_of(deep_in_the_stack(frames, lambda: serializer.loads(text))) == depth
        assert depth_of(deep_in_the_stack(frames, lambda: serializer.loads(text.encode()))) == depth
    with pytest.raises(ValueError):  # not RecursionError, whatever the depth (and still not JSON)
        deep_in_the_stack(300, lambda: serializer.loads(text + "x"))


def test_a_deeply_nested_payload_whose_enqueue_returned_runs_after_a_restart_from_a_deeper_stack(tmp_path):
    path = tmp_path / "jobs.db"
    with SQLitePersistence(tmp_path / "probe.db") as probe:
        def saved(depth):
            try:
                probe.save(Job("t", nested(depth), id=str(depth)))
            except tinymq.PersistenceError:
                return False
            return True

        depth = deepest(saved)
    with SQLitePersistence(path) as store:
        q = Queue(10)
        q.set_persistence(store)
        while True:  # the deepest the queue takes (its enqueue is a few frames deeper than a save)
            try:
                q.enqueue(Job("t", nested(depth), id="deep"))
                break
            except tinymq.PersistenceError:
                depth -= 1
        q.stop()
    ran = []

    def restart():  # a set_persistence deep in some framework's start-up
        with SQLitePersistence(path) as store:
            q = Queue(10)
            q.register_executor("t", lambda job: ran.append((job.id, depth_of(job.payload))))
            q.set_persistence(store)
            q.start_dispatcher(1)
            assert q.join(timeout=WAIT)
            q.stop()
            assert store.quarantined() == []

    deep_in_the_stack(300, restart)
    assert ran == [("deep", depth)]


# --- 3. A lock file that cannot be written or locked -----------------------------------------

# On a full disk the first open of a new store created its lock file, and the write of its pid
# into it failed: the constructor raised a bare OSError ("[Errno 28] No space left on device",
# naming no file) instead of the PersistenceError docs/persistence.md promises for a file that
# "cannot be opened"; so did a filesystem whose flock() fails (ENOLCK: NFS without a lock daemon).
@pytest.mark.parametrize("call, error", [("pwrite", errno.ENOSPC), ("flock", errno.ENOLCK)])
def test_a_lock_file_that_cannot_be_written_or_locked_is_a_persistence_error_naming_it(tmp_path, monkeypatch,
                                                                                         call, error):
    import fcntl

    def fails(*args):
        raise OSError(error, os.strerror(error))

    monkeypatch.setattr(os if call == "pwrite" else fcntl, call, fails)
    path = tmp_path / "jobs.db"
    with pytest.raises(tinymq.PersistenceError, match=re.escape(repr(f"{path}-tinymq.lock")) + ".*" + os.strerror(error)):
        SQLitePersistence(path)
    monkeypatch.undo()
    with SQLitePersistence(path) as store:  # nothing left behind stands in the way once it works
        store.save(Job("t", id="j"))


# --- 4. The owner row kept out of the database file by a reader -----------------------------

# docs/persistence.md: with its lock file and -wal removed under it (`rm jobs.db-*`), a live owner
# "is still found through the owner row, so no second store gets in": the open copies that row
# into the database file with a checkpoint. A PASSIVE one, which leaves the frames that a reader
# of an older state of the file still needs (any program reading it as the owner opens): the row
# was then in the -wal alone, and after `rm jobs.db-*` a second process took the file over from
# the live owner. The open's checkpoint now waits for such a reader (up to busy_timeout), and one
# that held it out longer is copied at a later commit.
SECOND_OWNER = """
import sys
from tinymq import PersistenceError, SQLitePersistence
try:
    SQLitePersistence(sys.argv[1])
except PersistenceError as exc:
    print(exc)
else:
    print("a second owner got in")
"""


@pytest.mark.parametrize("reader_leaves", ["during the open", "after the open"])
def test_the_owner_row_reaches_the_database_file_whatever_a_reader_held(tmp_path, reader_leaves):
    import sqlite3

    path = tmp_path / "jobs.db"
    SQLitePersistence(path).close()
    reader = sqlite3.connect(path, check_same_thread=False)  # any program reading the file
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM tinymq_jobs").fetchall()  # holds the state before the owner's open
    if reader_leaves == "during the open":
        leaves = threading.Timer(0.1, reader.rollback)  # the open waits for it (busy_timeout)
        leaves.start()
        owner = SQLitePersistence(path, busy_timeout=WAIT)
        leaves.join()
    else:
        owner = SQLitePersistence(path, busy_timeout=0.1)  # it stays longer than the open waits
        reader.rollback()
        owner.save(Job("t", id="j"))  # a commit once it has gone
    reader.close()
    try:
        database_alone = sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True)
        assert database_alone.execute("SELECT pid FROM tinymq_owner").fetchall() == [(os.getpid(),)]
        database_alone.close()
        for suffix in ("-wal", "-shm", "-tinymq.lock"):  # rm jobs.db-*: a cleaner
            os.unlink(f"{path}{suffix}")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        second = subprocess.run([sys.executable, "-c", SECOND_OWNER, str(path)], env=env, capture_output=True,
                                text=True, timeout=TIMEOUT)
        assert f"owned by a live store (pid {os.getpid()}" in second.stdout, (second.stdout, second.stderr)
    finally:
        owner.close()


# The same over Redis: a worker process fetching a job whose body (the payload nested in it) it
# could not decode where its fetch runs, deeper than its producer's encode, found it "undecodable"
# and kept it dead, never run.
def test_a_redis_job_body_decodes_however_deep_in_the_stack_the_fetch_runs():
    from tinymq.redis._codec import decode_job, encode_job

    def encoded(depth):
        try:
            return encode_job(Job("t", nested(depth), id="deep"))
        except TypeError:  # (its payload is not JSON a process can decode again)
            return None

    depth = deepest(lambda depth: on_a_new_thread(lambda: encoded(depth)) is not None)
    body = on_a_new_thread(lambda: encoded(depth))
    job = deep_in_the_stack(300, lambda: decode_job("deep", body))
    assert depth_of(job.payload) == depth


# --- 5. Another program's SQLite database given as the store's path ----------------------------

# A store opened on an SQLite file that is not a tinymq store (a mistyped path: the application's
# own database) switched it to WAL and created tinymq's tables in it before looking at it: with
# user_version 0 it set user_version to 1 (which schema migrations of that application read) and
# adopted the file; with a higher one it refused it as "written by a newer tinymq", after those
# changes. A file a store refuses is now left as it was, and one holding other tables and no
# tinymq table is refused as not a tinymq store (as read_only=True and `status` refuse it).
@pytest.mark.parametrize("tables, version, refusal", [
    (["users"], 0, "is not a tinymq store"),
    (["users"], 7, "is not a tinymq store"),
    (["tinymq_jobs"], 2, "schema version 2, written by a newer tinymq"),
])
def test_a_database_a_store_refuses_is_left_as_it_was(tmp_path, tables, version, refusal):
    path = tmp_path / "app.db"
    another_programs_database(path, tables, version)
    before = path.read_bytes()
    with pytest.raises(tinymq.PersistenceError, match=refusal):
        SQLitePersistence(path)
    assert path.read_bytes() == before  # its journal mode, tables and user_version as they were
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app.db"]  # (no lock file: test_cli29_findings)


# --- 6. A side file that is a hard link to another file -------------------------------------

# docs/persistence.md: "nothing another local user can put in the directory is loaded", and a
# lock file with a second name (a hard link) is refused, "it may be another store's database".
# A -wal, -shm or -journal with a second name was used all the same: its mode tightened, and the
# -wal and -shm overwritten by SQLite, so a hard link to any file of ours put beside a closed
# store (by anyone, where fs.protected_hardlinks is off) destroyed that file at the next open.
# SQLite never makes a side file with two names: one is refused and left as it is.
@pytest.mark.parametrize("suffix", ["-wal", "-shm", "-journal"])
@pytest.mark.parametrize("read_only", [False, True])
def test_a_side_file_with_a_second_name_is_refused_and_the_other_file_left_whole(tmp_path, suffix, read_only):
    path = tmp_path / "jobs.db"
    with SQLitePersistence(path) as store:
        store.save(Job("t", id="kept"))
    precious = tmp_path / "precious"
    content = b"not a -wal, -shm or -journal " * 4096
    precious.write_bytes(content)
    os.chmod(precious, 0o644)
    os.link(precious, f"{path}{suffix}")
    with pytest.raises(tinymq.PersistenceError, match=re.escape(repr(f"{path}{suffix}")) + " has 2 names"):
        SQLitePersistence(path, read_only=read_only)
    assert precious.read_bytes() == content and os.stat(precious).st_mode & 0o777 == 0o644
    os.unlink(f"{path}{suffix}")
    with SQLitePersistence(path, read_only=read_only) as store:
        assert [job.id for job in store.jobs()] == ["kept"]


# --- 7. status --json of a dead job with a deeply nested payload --------------------------------

# `status --db FILE --json` walks every dead job's payload in Python, level by level: one nested a
# few hundred levels deep (which the store takes) ended the command with a RecursionError and a
# traceback thousands of lines long, where docs/cli.md promises one clear message on stderr.
def test_status_json_of_a_dead_payload_too_deep_to_print_is_one_clear_error(tmp_path):
    path = tmp_path / "jobs.db"
    with SQLitePersistence(path) as store:
        job = Job("t", nested(600), id="deep")
        store.save(job)
        store.mark_dead(job, "retries_exhausted", "boom")
    result = cli("status", "--db", path, "--json")
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    if result.returncode == 0:  # (Python 3.12 and later walk 600 levels within the recursion limit)
        assert [dead["id"] for dead in json.loads(result.stdout)["dead_jobs"]] == ["deep"]
    else:
        assert result.returncode == 1, result.stderr[-2000:]
        assert "dead job 'deep' is nested too deeply to print as JSON" in result.stderr
    result = cli("status", "--db", path)  # the table lists it
    assert result.returncode == 0 and "deep" in result.stdout
