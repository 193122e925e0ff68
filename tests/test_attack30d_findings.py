"""Defects found by an outside attack (session 30) on the in-process queue with a SQLite store:
exit paths (fork), files planted beside the database, and bad input."""
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

import tinymq
from tinymq import Job, SQLitePersistence

ROOT = Path(tinymq.__file__).resolve().parent.parent
TIMEOUT = 60  # seconds for a script whose work takes about one


def run_python(script, *args):
    """``python -c script *args`` with this checkout's tinymq; the finished process (text output)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-c", script, *map(str, args)], env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=TIMEOUT)


# --- 1. A process forked from one that runs a queue -------------------------------------------------

# The parent's wait for its forked child ``child``, in a test's script: up to 20 s, then it prints
# how the child ended ("child exited N"), or kills it and prints "child hung".
WAIT_FOR_CHILD = r"""
deadline = time.monotonic() + 20
while time.monotonic() < deadline:
    done, status = os.waitpid(child, os.WNOHANG)
    if done:
        print("child exited", os.WEXITSTATUS(status) if os.WIFEXITED(status) else -os.WTERMSIG(status), flush=True)
        break
    time.sleep(0.01)
else:
    os.kill(child, 9)
    os.waitpid(child, 0)
    print("child hung", flush=True)
"""


# A process fork()ed while a started queue ran an attempt (a web server's workers forked after the app
# module started its queue, a daemon's double fork, a plain os.fork()) never ended: at its interpreter
# exit the queue's exit hook stopped the child's copy of the queue like stop(wait=True), which waited
# for the running attempt of a worker thread that exists only in the parent. A stop() in the child
# hung the same way. The copy's threads, attempts and store are the parent's: in the child, stop()
# (and so the exit hook and the copy's collection) only makes the copy refuse jobs, and the parent's
# jobs run and stay stored as before.
FORK_WHILE_AN_ATTEMPT_RUNS = r"""
import os, sys, threading, time
import tinymq
from tinymq import Job, SQLitePersistence
from tinymq import Job, Queue, SQLitePersistence

store = SQLitePersistence(sys.argv[1])
q = Queue(100)
q.set_persistence(store)
started, release = threading.Event(), threading.Event()

@q.executor("slow")
def slow(job):
    started.set()
    release.wait(30)

q.start_dispatcher(1)
q.enqueue(Job("slow", id="running"))
q.enqueue(Job("slow", id="queued"))
started.wait(30)
pid = os.fork()
if pid == 0:  # the child
    if sys.argv[2] == "stop":
        q.stop()
        try:
            q.enqueue(Job("slow", id="child"))
        except tinymq.QueueStopped:
            print("child refused", flush=True)
    sys.exit(0)  # the interpreter's exit: the queue's exit hook runs here too
child = pid
""" + WAIT_FOR_CHILD + r"""release.set()
print("parent joined", q.join(timeout=20), flush=True)
q.stop()
print("left", [job.id for job in store.jobs()], flush=True)
store.close()
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
@pytest.mark.parametrize("child_does", ["exit", "stop"])
def test_a_process_forked_while_an_attempt_runs_ends_and_leaves_the_parents_queue_whole(tmp_path, child_does):
    done = run_python(FORK_WHILE_AN_ATTEMPT_RUNS, tmp_path / "jobs.db", child_does)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert "child exited 0" in lines, (done.stdout, done.stderr[-3000:])
    if child_does == "stop":
        assert "child refused" in lines
    assert "parent joined True" in lines and "left []" in lines, (done.stdout, done.stderr[-3000:])


# --- 2. The mode of a file a store refuses ----------------------------------------------------------

# docs/persistence.md: "a file refused is left as it was". The store made the database, and its -wal
# and -shm, 0600 before it looked at what the file was: another program's database (readable by its
# group, say), one a newer tinymq wrote, a file that is no database at all, refused with a clear
# error, had lost the permissions its own program relies on. A refused open now gives each file it
# tightened its mode back.
def _mode(path):
    return os.stat(path).st_mode & 0o777


@pytest.mark.parametrize("kind, journal", [("another_program", "delete"), ("another_program", "wal"),
                                           ("newer_tinymq", "delete"), ("newer_tinymq", "wal"),
                                           ("not_a_database", None)])
def test_a_file_a_store_refuses_keeps_its_mode_and_that_of_its_side_files(tmp_path, kind, journal):
    path = tmp_path / "app.db"
    keep_open = None
    if kind == "not_a_database":
        path.write_bytes(b"a text file, not SQLite's " * 100)
    else:
        connection = sqlite3.connect(path)
        connection.execute(f"PRAGMA journal_mode={journal}")
        connection.execute("CREATE TABLE users (id TEXT)" if kind == "another_program"
                           else "CREATE TABLE tinymq_jobs (id TEXT PRIMARY KEY)")
        connection.execute("INSERT INTO " + ("users" if kind == "another_program" else "tinymq_jobs") + " VALUES ('a')")
        connection.execute("PRAGMA user_version=" + ("0" if kind == "another_program" else "99"))
        connection.commit()
        if journal == "wal":
            keep_open = connection  # its -wal and -shm stay while the program runs
        else:
            connection.close()
    files = sorted(p for p in tmp_path.iterdir())
    for name in files:
        os.chmod(name, 0o640)
    try:
        with pytest.raises(tinymq.PersistenceError):
            SQLitePersistence(path)
        assert {p.name: _mode(p) for p in files} == {p.name: 0o640 for p in files}
        assert sorted(p for p in tmp_path.iterdir()) == files
    finally:
        if keep_open is not None:
            keep_open.close()


# --- 3. A database with a second name (a hard link) ----------------------------------------------

# The lock file and the -wal are named after the name a store opens the database by. With a hard link
# to the file (copy.db beside jobs.db), a store opened by one name committed its saves to copy.db-wal,
# and after its process died a store opened by the other name read jobs.db without that -wal: the
# acknowledged jobs were gone (and two stores opened by the two names at once could both own the file:
# one's saves overwrote the other's). SQLite itself warns of this ("multiple links to file"). A
# database with more than one name is refused for writing, by every name.
SAVE_THEN_DIE = r"""
import os, signal, sys
from tinymq import Job, PersistenceError, SQLitePersistence
try:
    store = SQLitePersistence(sys.argv[1])
except PersistenceError as exc:
    print("refused:", exc, flush=True)
    sys.exit(0)
store.save(Job("t", id="acknowledged"))
print("acknowledged", flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_database_with_a_second_name_is_refused_so_no_acknowledged_save_is_lost(tmp_path):
    path, other = tmp_path / "jobs.db", tmp_path / "copy.db"
    with SQLitePersistence(path) as store:
        store.save(Job("t", id="first"))
    os.link(path, other)
    done = run_python(SAVE_THEN_DIE, other)
    try:
        with SQLitePersistence(path) as store:
            found = [job.id for job in store.load_all()]
    except tinymq.PersistenceError as exc:
        found = str(exc)
    if "acknowledged" in done.stdout.splitlines():
        assert "acknowledged" in found, found  # an acknowledged save is never lost
    assert f"{str(other)!r} has 2 names (hard links): refused" in done.stdout, (done.stdout, done.stderr[-2000:])
    assert f"{str(path)!r} has 2 names (hard links): refused" in found
    os.unlink(other)
    with SQLitePersistence(path) as store:  # by its one name again
        assert [job.id for job in store.load_all()] == ["first"]


# --- 4. What a store's load_all() returns ---------------------------------------------------------

# set_persistence placed the jobs load_all() returned one by one. An item that is no Job raised an
# AttributeError ("'int' object has no attribute '_tags'") that named nothing of the store, and a
# second job of one id a DuplicateJob; either way midway, with the store installed, the jobs before it
# placed and those after it never placed (nor could set_persistence be called again). Both are now a
# PersistenceError naming what the store returned, raised before anything is placed: the queue is as
# it was, and takes a store again.
class _ListStore:
    def __init__(self, jobs):
        self.jobs, self.deleted = jobs, []

    def save(self, job):
        pass

    def delete(self, job_id):
        self.deleted.append(job_id)

    def load_all(self):
        return list(self.jobs)


@pytest.mark.parametrize("bad, refusal", [(5, r"load_all\(\) returned 5, not a tinymq.Job"),
                                          ("duplicate", r"load_all\(\) returned two jobs with id 'a'")])
def test_a_store_whose_load_all_returns_what_no_queue_can_place_is_refused_before_any_is_placed(bad, refusal):
    with tinymq.Queue(10) as q:
        ran = []
        q.register_executor("t", lambda job: ran.append(job.id))
        jobs = [Job("t", id="a"), Job("t", id="a") if bad == "duplicate" else bad, Job("t", id="c")]
        with pytest.raises(tinymq.PersistenceError, match=refusal):
            q.set_persistence(_ListStore(jobs))
        assert q.get_stats().jobs_enqueued == 0
        good = _ListStore([Job("t", id="a"), Job("t", id="c")])
        q.set_persistence(good)  # the queue takes a store again
        q.start_dispatcher(1)
        assert q.join(timeout=10)
        assert sorted(ran) == ["a", "c"] and sorted(good.deleted) == ["a", "c"]


# --- 5. A job whose function forks ------------------------------------------------------------------

# The parent's side of a fork in a job (FORK_IN_A_JOB, and test_gclock31's in a coroutine): it runs
# the queue, waits for the child, and prints what the test reads.
WAIT_FOR_THE_FORKED_CHILD = r"""
q.enqueue(Job("forks", id="forks"))
q.enqueue_many([Job("work", id=f"w{i}") for i in range(20)])
q.start_dispatcher(2)
print("joined", q.join(timeout=20), flush=True)
child = children[0]
""" + WAIT_FOR_CHILD + r"""q.stop()
runs = open(sys.argv[1] + ".ran").read().split()
print("runs", sorted(set(runs[0::2])) == [str(os.getpid())], len(runs[1::2]), len(set(runs[1::2])), flush=True)
"""

# A job's function that fork()ed (a library that forks without exec, a daemon's fork) and whose child
# returned from it, or ended it with sys.exit(), as a child of a plain script would: the child, whose
# only thread is the worker's, went on in tinymq's worker loop. It ran its parent's queued jobs a
# second time (each ran in both processes) and then waited for more, never exiting; with sys.exit()
# it hung at once on a lock another thread of the parent held at the fork. The worker now ends such a
# child when the function returns there, touching nothing of the queue: with the code of its
# sys.exit(), 0 for a return (logged), 1 for another exception.
FORK_IN_A_JOB = r"""
import logging, os, sys, time
from tinymq import Job, Queue, SQLitePersistence

logging.basicConfig()
ran = os.open(sys.argv[1] + ".ran", os.O_WRONLY | os.O_APPEND | os.O_CREAT)
q = Queue(100)
if sys.argv[2] == "sqlite":
    store = SQLitePersistence(sys.argv[1])
    q.set_persistence(store)
children = []

@q.executor("forks")
def forks(job):
    pid = os.fork()
    if pid == 0:  # the child
        if sys.argv[3] == "exit":
            sys.exit(3)
        if sys.argv[3] == "raise":
            raise ValueError("in the child")
        return
    children.append(pid)

@q.executor("work")
def work(job):
    os.write(ran, f"{os.getpid()} {job.id}\n".encode())

""" + WAIT_FOR_THE_FORKED_CHILD


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
@pytest.mark.parametrize("backend", ["memory", "sqlite"])
@pytest.mark.parametrize("child_does, code", [("return", 0), ("exit", 3), ("raise", 1)])
def test_a_child_that_a_jobs_function_forks_ends_instead_of_running_the_queue(tmp_path, backend, child_does, code):
    assert_the_forked_child_ended(run_python(FORK_IN_A_JOB, tmp_path / "jobs.db", backend, child_does),
                                  child_does, code)


def assert_the_forked_child_ended(done, child_does, code):
    """What a script ending in WAIT_FOR_THE_FORKED_CHILD printed: the parent joined, the child ended
    with ``code``, each job ran once in the parent, and the child said it exits (unless it exited)."""
    lines = done.stdout.splitlines()
    assert done.returncode == 0 and "joined True" in lines, (done.stdout, done.stderr[-3000:])
    assert f"child exited {code}" in lines, (done.stdout, done.stderr[-3000:])
    assert "runs True 20 20" in lines, (done.stdout, done.stderr[-3000:])  # each job once, in the parent
    if child_does != "exit":
        assert "the child exits" in done.stderr


# --- 6. Another program's table named tinymq_jobs -------------------------------------------------

# A file whose tinymq_jobs table is another program's (other columns) was refused with SQLite's
# words, "cannot open persistence file ...: no such column: id", which say neither what the file is
# nor that it was left alone. It is refused as another program's database is.
@pytest.mark.parametrize("read_only", [False, True])
def test_another_programs_table_named_tinymq_jobs_is_refused_as_no_tinymq_store(tmp_path, read_only):
    path = tmp_path / "app.db"
    connection = sqlite3.connect(path)
    connection.execute("CREATE TABLE tinymq_jobs (name TEXT, queued_at REAL)")
    connection.execute("INSERT INTO tinymq_jobs VALUES ('mail', 1.0)")
    connection.commit()
    connection.close()
    os.chmod(path, 0o600)
    before = path.read_bytes()
    with pytest.raises(tinymq.PersistenceError, match=re.escape(f"{str(path)!r} is not a tinymq store: its "
                                                                "tinymq_jobs table has no id, state, type")):
        SQLitePersistence(path, read_only=read_only)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app.db"]
