"""Defects of the SQLite store (session 30), each with its tests.

1. A lock file that already existed, left by an earlier owner, kept the pid of an open refused on
   the file (another program's database): it now names its last owner again.
2. Open (strict xfails): the store looks by path at its database and -wal at most every 50 ms
   after a commit: a save in that window after either was removed or replaced is acknowledged,
   and lost at a kill (and a replaced database has the -wal of the old one beside it). A check of
   each commit cost a share of every durable job that users would see: an lstat() per commit
   about a third of one producer's enqueue, a poll of an inotify watch about 8 % end to end.
3. A database file removed under its live owner (a cleaner, ``rm jobs.db*``) failed every later
   write, and what it held (every acknowledged job) was lost when the store closed or its process
   ended. The store now writes what it holds into a new file at the path, and goes on there. (Its
   tests look after every commit, _WAL_CHECK_INTERVAL = 0: what the look does is tested here.)
"""
import tinymq.persistence.sqlite as sqlite_store
import os
import subprocess
import sys

import pytest

from tinymq import Job, PersistenceError, SQLitePersistence

from _helpers import another_programs_database

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout whose tinymq is tested
posix = pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX: kill -9")


def run_child(script, *args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True,
                          timeout=120)


# --- 1. a refused open leaves a lock file it found as it was -------------------------------------

def test_a_refused_open_leaves_the_lock_file_it_found_naming_its_last_owner(path):
    another_programs_database(path)
    last_owner = b"12345\n".ljust(32)  # what an owner that exited leaves in it
    fd = os.open(path + "-tinymq.lock", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, last_owner)
    os.close(fd)
    with pytest.raises(PersistenceError, match="is not a tinymq store"):
        SQLitePersistence(path)
    with open(path + "-tinymq.lock", "rb") as f:
        assert f.read() == last_owner


# --- 2. open: a commit in the 50 ms after a look is acknowledged unchecked --------------------------

# argv: the database, what is done to it ("wal-removed", "replaced"). The look every 50 ms, widened,
# never comes: only a check of each commit would find it.
CHANGED_THEN_SAVE = """
import os, sys
import tinymq.persistence.sqlite as sqlite
from tinymq import Job, PersistenceError
path, what = sys.argv[1:]
sqlite._WAL_CHECK_INTERVAL = 3600.0
store = sqlite.SQLitePersistence(path)
store.save_many([Job("t", id="before-%d" % n) for n in range(50)])
store.save(Job("t", id="before"))  # (the first commit looks by path: the files are ours)
if what == "wal-removed":
    os.unlink(path + "-wal")  # a cleaner, `rm jobs.db-*`
else:
    os.replace(path + ".backup", path)  # a backup put in its place
try:
    store.save(Job("t", id="after"))
    print("acknowledged", flush=True)
except PersistenceError as exc:
    print("refused:", exc, flush=True)
os.kill(os.getpid(), 9)
"""


@posix
@pytest.mark.xfail(strict=True, reason="open: the database and -wal are looked at no more than every 50 ms "
                   "(a check of each commit cost a share of every durable job users would see)")
def test_a_save_right_after_the_wal_was_removed_is_acknowledged_only_once_it_is_safe(path):
    child = run_child(CHANGED_THEN_SAVE, path, "wal-removed")
    assert child.stdout == "acknowledged\n", child.stderr
    with SQLitePersistence(path) as store:
        assert {job.id for job in store.load_all()} == {f"before-{n}" for n in range(50)} | {"before", "after"}


@posix
@pytest.mark.xfail(strict=True, reason="open: the database and -wal are looked at no more than every 50 ms "
                   "(a check of each commit cost a share of every durable job users would see)")
def test_a_save_right_after_the_database_was_replaced_is_refused_and_leaves_no_wal_beside_it(path):
    with SQLitePersistence(path + ".backup") as backup:
        backup.save(Job("t", id="restored"))
    os.unlink(path + ".backup-tinymq.lock")
    child = run_child(CHANGED_THEN_SAVE, path, "replaced")
    assert child.stdout.startswith("refused:") and "database file was replaced" in child.stdout, child.stderr
    assert not os.path.exists(path + "-wal")  # (else read into the backup at the next open)
    with SQLitePersistence(path) as store:
        assert [job.id for job in store.load_all()] == ["restored"]


# --- 3. a database removed under its owner is written anew ------------------------------------------

# argv: the database, what is removed ("database", or "all": `rm jobs.db*`, its side files and lock
# file too). Saves after the removal, then kill -9.
REMOVED_THEN_SAVE = """
import logging, os, sys
import tinymq.persistence.sqlite as sqlite
from tinymq import Job, SQLitePersistence
path, what = sys.argv[1:]
sqlite._WAL_CHECK_INTERVAL = 0.0  # a look after every commit
logging.basicConfig()
store = SQLitePersistence(path)
store.save_many([Job("t", id="before-%d" % n) for n in range(50)])
store.delete("before-0")
for suffix in ("", "-wal", "-shm", "-tinymq.lock") if what == "all" else ("",):
    os.unlink(path + suffix)
store.save(Job("t", id="after"))
store.delete("before-1")
store.save_many([Job("t", id="later-%d" % n) for n in range(3)])
print("acknowledged", flush=True)
os.kill(os.getpid(), 9)
"""


@posix
@pytest.mark.parametrize("what", ["database", "all"])
def test_a_database_removed_under_its_owner_is_written_anew_with_every_acknowledged_job(path, what):
    child = run_child(REMOVED_THEN_SAVE, path, what)
    assert child.stdout == "acknowledged\n", child.stderr
    assert "its database file was removed under this store" in child.stderr
    expected = {f"before-{n}" for n in range(2, 50)} | {"after"} | {f"later-{n}" for n in range(3)}
    with SQLitePersistence(path) as store:
        assert {job.id for job in store.load_all()} == expected
    assert os.stat(path).st_mode & 0o777 == 0o600


def test_a_store_goes_on_in_the_new_file_and_a_later_store_owns_it(path, monkeypatch):
    monkeypatch.setattr(sqlite_store, "_WAL_CHECK_INTERVAL", 0.0)  # a look after every commit
    store = SQLitePersistence(path)
    store.save(Job("t", id="before"))
    os.unlink(path)
    store.save(Job("t", id="after"))
    with pytest.raises(PersistenceError, match="owned by a live store"):
        SQLitePersistence(path)  # the new file is the store's: its owner row came along
    os.unlink(path + "-wal")  # and its -wal is the new file's, looked after as before
    store.save(Job("t", id="later"))
    assert sorted(job.id for job in store.jobs()) == ["after", "before", "later"]
    store.close()
    assert sorted(os.listdir(os.path.dirname(path))) == ["jobs.db", "jobs.db-tinymq.lock"]
    with SQLitePersistence(path) as again:
        assert sorted(job.id for job in again.load_all()) == ["after", "before", "later"]


def test_a_removed_database_that_cannot_be_written_anew_fails_the_commit_that_found_it(path, monkeypatch):
    from tinymq.persistence import _ownership

    monkeypatch.setattr(sqlite_store, "_WAL_CHECK_INTERVAL", 0.0)  # a look after every commit
    store = SQLitePersistence(path)
    store.save(Job("t", id="before"))
    os.unlink(path)

    def full_disk(name):
        raise PersistenceError(f"cannot create {name!r}: [Errno 28] No space left on device")

    monkeypatch.setattr(_ownership, "create_private", full_disk)
    with pytest.raises(PersistenceError, match="database file was removed under this store"):
        store.save(Job("t", id="found-it"))
    with pytest.raises(PersistenceError, match="was removed"):
        store.save(Job("t", id="later"))
    store.close()
    assert not os.path.exists(path + "-wal")
