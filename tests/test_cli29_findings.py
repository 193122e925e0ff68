"""Defects of the SQLite store and of the worker command (session 29), each with its tests.

1. A store refused on a file that is not its to open (another program's database, one a newer
   tinymq wrote) left the lock file it had created beside it (``app.db-tinymq.lock``): a refused
   open now removes the lock file (and the database, side files) it made, and nothing else.
"""
import os
import sqlite3
import subprocess
import sys

import pytest

from tinymq import Job, PersistenceError, SQLitePersistence
from tinymq.persistence._ownership import OwnedError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout whose tinymq is tested


# --- 1. a refused open leaves the directory as it found it ----------------------------------------

def another_programs_database(path, tables=("users",), version=0):
    connection = sqlite3.connect(path)
    for table in tables:
        connection.execute(f"CREATE TABLE {table} (id TEXT)")
    connection.execute(f"PRAGMA user_version={version}")
    connection.commit()
    connection.close()
    os.chmod(path, 0o600)


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
