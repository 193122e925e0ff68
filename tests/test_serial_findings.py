"""Two durability defects of the SQLite store found from outside (session 28), each with its tests:
a file opened once with the wrong serializer lost every job, and a database file removed under
its live owner kept acknowledging saves that were lost at close.
"""
import logging
import os
import sqlite3
import subprocess
import sys
import warnings

import pytest

from tinymq import Job, PersistenceError, Queue, SQLitePersistence
from tinymq.persistence import JSONSerializer, PickleSerializer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout whose tinymq is tested


def pickle_serializer():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its warning about loading untrusted files
        return PickleSerializer()


class Upper(JSONSerializer):
    """A custom serializer: upper-case JSON text."""

    def dumps(self, obj):
        return super().dumps(obj).upper()


def save_three(path, serializer):
    with SQLitePersistence(path, serializer=serializer) as store:
        store.save_many([Job("t", {1, 2}, id="a"), Job("t", {3}, id="b"), Job("t", None, id="c")])


def loaded_ids(path, serializer):
    with SQLitePersistence(path, serializer=serializer) as store:
        return sorted(job.id for job in store.load_all()), store.counts()["corrupt"]


# --- 1. a file opened with another serializer ----------------------------------------------------

# The reproduction: jobs saved with PickleSerializer, then the file opened once with the default
# JSON one. Every row failed to decode and was quarantined as corrupt; reopening with pickle did not
# bring them back (counts() corrupt: 3, jobs() empty). The file records its serializer now, and a
# store given another one is refused before it reads or changes anything.
def test_a_file_opened_with_another_serializer_is_refused_and_keeps_every_job(path):
    save_three(path, pickle_serializer())
    with open(path, "rb") as f:
        before = f.read()
    queue = Queue(10)
    with pytest.raises(PersistenceError) as refused:
        queue.set_persistence(SQLitePersistence(path))
    message = str(refused.value)
    assert "tinymq.persistence.serializers.PickleSerializer" in message, message
    assert "tinymq.persistence.serializers.JSONSerializer" in message, message
    queue.stop()
    with open(path, "rb") as f:
        assert f.read() == before  # left as it was
    assert loaded_ids(path, pickle_serializer()) == (["a", "b", "c"], 0)


def test_a_read_only_look_with_another_serializer_says_so(path):
    save_three(path, pickle_serializer())
    with pytest.raises(PersistenceError, match=r"written with the serializer .*PickleSerializer.*given "
                                               r".*JSONSerializer"):
        SQLitePersistence(path, read_only=True)
    with SQLitePersistence(path, serializer=pickle_serializer(), read_only=True) as view:
        assert sorted(job.id for job in view.jobs()) == ["a", "b", "c"]


def test_a_custom_serializer_is_known_by_its_qualified_class_name(path):
    with SQLitePersistence(path, serializer=Upper()) as store:
        store.save(Job("t", "abc", id="u"))
    with pytest.raises(PersistenceError, match=r"serializer test_serial_findings\.Upper, and this store "
                                               r"was given tinymq\.persistence\.serializers\.JSONSerializer"):
        SQLitePersistence(path, serializer=JSONSerializer())
    with SQLitePersistence(path, serializer=Upper()) as store:
        assert [job.payload for job in store.load_all()] == ["ABC"]


def test_a_row_the_files_own_serializer_cannot_decode_is_still_quarantined(path):
    save_three(path, pickle_serializer())
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("UPDATE tinymq_jobs SET payload = ? WHERE id = 'b'", (b"not a pickle",))
    conn.close()
    assert loaded_ids(path, pickle_serializer()) == (["a", "c"], 1)


def test_a_file_without_a_job_takes_the_serializer_of_its_next_owner(path):
    with SQLitePersistence(path, serializer=pickle_serializer()) as store:
        store.save(Job("t", {1}, id="done"))
        store.delete("done")
    with SQLitePersistence(path) as store:  # nothing a serializer could misread: JSON from now on
        store.save(Job("t", [1], id="json"))
    with pytest.raises(PersistenceError, match="JSONSerializer"):
        SQLitePersistence(path, serializer=pickle_serializer())
    assert loaded_ids(path, JSONSerializer()) == (["json"], 0)


def test_a_file_of_an_older_tinymq_is_read_as_before_and_records_its_first_owners_serializer(path):
    save_three(path, pickle_serializer())
    conn = sqlite3.connect(path)
    conn.execute("DROP TABLE tinymq_settings")  # as an older tinymq left it
    conn.close()
    assert loaded_ids(path, pickle_serializer()) == (["a", "b", "c"], 0)
    with pytest.raises(PersistenceError, match="PickleSerializer"):
        SQLitePersistence(path)


def test_the_commands_read_a_file_of_another_serializer(path):
    from tinymq._status import change_dead_in_db, db_status

    save_three(path, pickle_serializer())
    assert db_status(path)["counts"]["ready"] == 3
    assert change_dead_in_db(path, "purge", None).startswith("purged 0 dead jobs")
    assert loaded_ids(path, pickle_serializer()) == (["a", "b", "c"], 0)  # and recorded nothing


# --- 2. the database file removed or replaced under its live owner --------------------------------

# The store looked at its -wal every 50 ms after a commit, never at the database: removed (a cleaner,
# `rm jobs.db`) or replaced, every later save was acknowledged into a file nobody would open again,
# and lost at close or at a kill. Now the look sees it; replaced, it logs an ERROR, and every write
# from that commit on raises PersistenceError. (Removed, it is written anew: test_walwin30_findings.py.)
@pytest.mark.parametrize("what", ["replaced"])
def test_saves_into_a_database_replaced_under_its_owner_fail(path, caplog, what):
    replacement = b"another file, put in its place"
    store = SQLitePersistence(path)
    store.save(Job("t", id="before"))
    os.unlink(path)
    with open(path, "wb") as f:
        f.write(replacement)
    store._next_wal_check = 0.0  # the next commit looks (else: the first one 50 ms after the last look)
    with caplog.at_level(logging.ERROR, logger="tinymq.persistence"):
        with pytest.raises(PersistenceError, match=f"database file was {what} under this store"):
            store.save(Job("t", id="found-it"))
    assert f"its database file was {what}" in caplog.text
    for write in (lambda: store.save(Job("t", id="later")), lambda: store.delete("before"),
                  lambda: store.save_many([Job("t", id="many")]), store.load_all):
        with pytest.raises(PersistenceError, match=f"was {what}"):
            write()
    store.close()
    # No -wal that a later open would read into another file (removed: test_cli29_findings.py).
    assert not os.path.exists(path + "-wal") and not os.path.exists(path + "-shm")
    with open(path, "rb") as f:
        assert f.read() == replacement  # never written
    os.unlink(path)
    with SQLitePersistence(path) as store:
        assert store.load_all() == []


OWNER = """
import sys
from tinymq import Job, SQLitePersistence
with SQLitePersistence(sys.argv[1]) as owner:  # an empty file, owned with JSON
    print("owned", flush=True)
    sys.stdin.readline()
    owner.save(Job("t", [1], id="json"))
"""


def test_an_opener_refused_by_a_live_owner_records_no_serializer(path):
    from tinymq.persistence._ownership import OwnedError

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    owner = subprocess.Popen([sys.executable, "-c", OWNER, path], env=env, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout.readline() == "owned\n"
        os.unlink(path + "-tinymq.lock")  # the owner is then found through its owner row
        with pytest.raises(OwnedError):
            SQLitePersistence(path, serializer=pickle_serializer())
        owner.stdin.write("go\n")
        owner.stdin.flush()
        assert owner.wait(60) == 0
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
    assert loaded_ids(path, JSONSerializer()) == (["json"], 0)
