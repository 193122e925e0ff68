"""SQLitePersistence on its own: rows, recovery, quarantine, serialisers, threads, fork."""
import logging
import os
import sqlite3
import stat
import sys
import threading

import pytest

from tinymq import PersistenceError, Priority, RetryConfig
from tinymq.job import Job
from tinymq.persistence import (
    JSONSerializer, Persistence, PickleSerializer, SQLitePersistence,
)


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "jobs.db")


@pytest.fixture(params=[True, False], ids=["journal", "no-journal"])
def store(path, request):
    with SQLitePersistence(path, journal=request.param) as s:
        yield s


def rows(store, where="1"):
    """The table as another reader sees it once ``store`` has flushed its journal."""
    store.flush()
    with sqlite3.connect(store.path) as conn:
        return dict(conn.execute(f"SELECT id, state FROM tinymq_jobs WHERE {where}").fetchall())


def raw_update(store, sql, *params):
    """Change the table behind ``store``'s back, after its journal is applied."""
    store.flush()
    conn = sqlite3.connect(store.path, isolation_level=None)
    conn.execute(sql, params)
    conn.close()


def test_is_a_persistence(store):
    assert isinstance(store, Persistence)


def test_round_trip_of_every_field(store):
    config = RetryConfig(max_retries=7, initial_delay=0.5, max_delay=9.0, backoff_multiple=3.0, jitter=0.25)
    job = Job("email", {"to": "ü@example.com", "n": [1, 2.5, None, True]}, priority=Priority.HIGH,
              tags={"user": "123"}, run_at=4_000_000_000.25, retry_config=config, id="job-1")
    job.timestamp = 1_700_000_000.125
    job.retries = 2
    job.last_error = "ValueError: boom"
    store.save(job)
    (loaded,) = store.load_all()
    for name in ("id", "type", "payload", "priority", "tags", "timestamp", "run_at",
                 "retries", "retry_config", "last_error"):
        assert getattr(loaded, name) == getattr(job, name), name
    assert type(loaded.priority) is Priority


def test_defaults_round_trip(store):
    job = Job("plain")
    store.save(job)
    (loaded,) = store.load_all()
    assert (loaded.payload, loaded.tags, loaded.retry_config, loaded.last_error) == (None, {}, RetryConfig(), None)


def test_save_overwrites_and_delete_forgets(store, path):
    job = Job("t", 1, id="a")
    store.save(job)
    job.retries, job.last_error = 1, "boom"
    store.save(job)
    assert [(j.retries, j.last_error) for j in store.load_all()] == [(1, "boom")]
    store.delete("a")
    store.delete("never-saved")  # not an error
    assert store.load_all() == [] and rows(store) == {}


def test_save_many_is_all_or_nothing(store, path):
    jobs = [Job("t", i) for i in range(250)]
    store.save_many(jobs)
    assert sorted(j.payload for j in store.load_all()) == list(range(250))
    bad = [Job("t", 1, id="ok-1"), Job("t", {1, 2}, id="bad"), Job("t", 3, id="ok-2")]
    with pytest.raises(PersistenceError, match="bad"):
        store.save_many(bad)
    assert "ok-1" not in rows(store) and "ok-2" not in rows(store)


def test_unserialisable_payload_names_job_and_type(store, path):
    class Opaque:
        pass

    job = Job("report", {"when": Opaque()}, id="job-42")
    with pytest.raises(PersistenceError) as info:
        store.save(job)
    message = str(info.value)
    assert "job-42" in message and "'report'" in message and "Opaque" in message
    assert isinstance(info.value.__cause__, TypeError)
    assert rows(store) == {}


def test_running_row_comes_back_ready_with_the_crash_counted(store, path):
    job = Job("t", id="a")
    store.save(job)
    store.mark_running(job)
    assert rows(store) == {"a": "running"}
    (loaded,) = store.load_all()
    assert loaded.retries == 1 and "died" in loaded.last_error
    assert rows(store) == {"a": "ready"}


def test_a_job_that_keeps_crashing_its_process_ends_dead(store, path, caplog):
    job = Job("t", id="a").with_max_retries(2)
    store.save(job)
    for expected in (1, 2):
        store.mark_running(job)
        (job,) = store.load_all()
        assert job.retries == expected
    store.mark_running(job)
    with caplog.at_level(logging.ERROR, logger="tinymq"):
        assert store.load_all() == []
    assert rows(store) == {"a": "dead"}
    (dead,) = store.dead_jobs()
    assert dead.job.id == "a" and dead.reason == "crashed" and dead.job.retries == 3
    assert "crashed" in caplog.text


def test_dead_rows_are_kept_listed_and_purged_not_loaded(store):
    store.save(Job("t", id="alive"))
    store.mark_dead(Job("t", {"x": 1}, id="d1"), "retries_exhausted", ValueError("boom"))
    store.mark_dead(Job("t", id="d2"), "no_executor", None)
    assert [j.id for j in store.load_all()] == ["alive"]
    dead = {d.job.id: (d.reason, d.error) for d in store.dead_jobs()}
    assert dead == {"d1": ("retries_exhausted", "ValueError: boom"), "d2": ("no_executor", None)}
    assert store.purge_dead() == 2
    assert store.dead_jobs() == [] and [j.id for j in store.load_all()] == ["alive"]


@pytest.mark.parametrize("column, value", [
    ("payload", b'{"to": "trunc'),          # truncated JSON
    ("payload", b"\x80\x04\x95garbage"),     # a pickle, or garbage: never unpickled by JSON
    ("retry_config", "{not json"),
    ("retry_config", '{"max_retries": -1}'),
    ("retry_config", '{"__import__": "os"}'),
    ("tags", "[1, 2]"),
    ("priority", 9),
    ("type", None),
    ("run_at", "tomorrow"),
    ("state", "zombie"),
])
def test_corrupt_rows_are_quarantined_and_logged_while_the_rest_loads(store, path, caplog, column, value):
    for name in ("good-1", "bad", "good-2"):
        store.save(Job("t", {"n": name}, id=name))
    raw_update(store, f"UPDATE tinymq_jobs SET {column} = ? WHERE id = 'bad'", value)
    with caplog.at_level(logging.ERROR, logger="tinymq"):
        loaded = store.load_all()
    assert sorted(j.id for j in loaded) == ["good-1", "good-2"]
    assert "bad" in caplog.text and "quarantined" in caplog.text
    assert rows(store)["bad"] == "corrupt"
    assert [row[0] for row in store.quarantined()] == ["bad"]
    assert sorted(j.id for j in store.load_all()) == ["good-1", "good-2"]  # not retried
    assert store.purge_quarantined() == 1


def test_file_is_created_with_mode_0600(tmp_path):
    path = tmp_path / "private.db"
    old = os.umask(0)
    try:
        with SQLitePersistence(path) as s:
            s.save(Job("t"))
            for name in (path, tmp_path / "private.db-wal"):
                assert stat.S_IMODE(os.stat(name).st_mode) == 0o600, name
    finally:
        os.umask(old)


def test_two_stores_on_one_file(path):
    """A live store's writes reach the shared table when its journal is applied (flush)."""
    with SQLitePersistence(path) as a, SQLitePersistence(path) as b:
        a.save(Job("t", id="from-a"))
        b.save(Job("t", id="from-b"))
        b.flush()
        assert sorted(j.id for j in a.load_all()) == ["from-a", "from-b"]
        b.delete("from-a")
        b.flush()
        assert [j.id for j in a.load_all()] == ["from-b"]


def test_close_and_context_manager(path):
    with SQLitePersistence(path) as s:
        s.save(Job("t", id="kept"))
    with pytest.raises(PersistenceError, match="closed"):
        s.save(Job("t"))
    s.close()  # idempotent
    with SQLitePersistence(path) as again:
        assert [j.id for j in again.load_all()] == ["kept"]


def test_bad_arguments_name_the_value(path):
    with pytest.raises(ValueError, match="'SOMETIMES'"):
        SQLitePersistence(path, synchronous="SOMETIMES")
    with pytest.raises(ValueError, match="-1"):
        SQLitePersistence(path, busy_timeout=-1)
    with pytest.raises(TypeError, match="serializer"):
        SQLitePersistence(path, serializer=object())


def test_pickle_is_opt_in_and_warns(path):
    with pytest.warns(UserWarning, match="arbitrary code"):
        serializer = PickleSerializer()
    with SQLitePersistence(path, serializer=serializer) as s:
        s.save(Job("t", {1, 2, 3}, id="p"))
        assert s.load_all()[0].payload == {1, 2, 3}


def test_custom_serializer(path):
    class Upper(JSONSerializer):
        def dumps(self, obj):
            return super().dumps(obj).upper()

    with SQLitePersistence(path, serializer=Upper()) as s:
        s.save(Job("t", "abc"))
        assert s.load_all()[0].payload == "ABC"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_uses_its_own_connection(store, path):
    store.save(Job("t", id="parent"))
    parent_connection = store._conn
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: report and leave without running any cleanup
        code = 1
        try:
            store.save(Job("t", id="child"))
            code = 0 if store._conn is not parent_connection else 2
        finally:
            os.write(write, bytes([code]))
            os._exit(0)
    os.close(write)
    status = os.read(read, 1)
    os.close(read)
    os.waitpid(pid, 0)
    assert status == b"\x00"
    assert store._conn is parent_connection
    assert sorted(j.id for j in store.load_all()) == ["child", "parent"]


def test_concurrent_saves_and_deletes_from_8_threads(store, path):
    per_thread = 300
    barrier = threading.Barrier(8)
    errors = []

    def producer(t):
        try:
            barrier.wait()
            for i in range(per_thread):
                store.save(Job("t", i, id=f"{t}-{i}"))
                if i % 2:
                    store.delete(f"{t}-{i}")
                if i % 50 == 0:
                    store.save_many([Job("t", id=f"{t}-{i}-batch-{k}") for k in range(5)])
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=producer, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    expected = {f"{t}-{i}" for t in range(8) for i in range(0, per_thread, 2)}
    expected |= {f"{t}-{i}-batch-{k}" for t in range(8) for i in range(0, per_thread, 50) for k in range(5)}
    assert set(rows(store)) == expected
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def test_group_commit_under_full_shares_transactions(path):
    """Under contention, one committer commits other threads' saves with its own."""
    with SQLitePersistence(path, synchronous="FULL") as store:
        commits = []
        original = store._commit

        def counting_commit(conn, batch):
            commits.append(len(batch))
            original(conn, batch)

        store._commit = counting_commit
        barrier = threading.Barrier(8)

        def producer(t):
            barrier.wait()
            for i in range(50):
                store.save(Job("t", id=f"{t}-{i}"))

        threads = [threading.Thread(target=producer, args=(t,)) for t in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(rows(store)) == 400
        assert max(commits) > 1, "no commit ever carried more than one thread's save"


def test_group_commit_failure_is_reported_to_every_writer_of_the_batch(store):
    """A failed batch is retried unit by unit, so one failure does not fail the others."""
    from tinymq.persistence.sqlite import _UPSERT, _Unit

    good = _Unit([(_UPSERT, store._row(Job("t", id="good")), False)])
    bad = _Unit([("INSERT INTO no_such_table VALUES (1)", (), False)])
    with store._commit_lock:
        store._commit(store._conn, [good, bad])
    assert good.done and good.error is None
    assert bad.done and isinstance(bad.error, sqlite3.Error)
    assert [j.id for j in store.load_all()] == ["good"]


def test_store_error_becomes_persistence_error_with_cause(path):
    with SQLitePersistence(path, busy_timeout=0, journal=False) as store:
        locker = sqlite3.connect(path, isolation_level=None)
        locker.execute("BEGIN IMMEDIATE")  # another writer holds the lock
        try:
            with pytest.raises(PersistenceError) as info:
                store.save(Job("t"))
            assert isinstance(info.value.__cause__, sqlite3.OperationalError)
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        store.save(Job("t"))  # and it recovers


def test_journaled_writes_wait_out_a_locked_database(path, caplog):
    """The save is durable in the journal; applying it retries until the database is free."""
    with SQLitePersistence(path, busy_timeout=0) as store:
        locker = sqlite3.connect(path, isolation_level=None)
        locker.execute("BEGIN IMMEDIATE")
        try:
            store.save(Job("t", id="waits"))  # accepted: the journal has it
            with pytest.raises(PersistenceError) as info:
                store.flush()
            assert isinstance(info.value.__cause__, sqlite3.OperationalError)
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        assert rows(store) == {"waits": "ready"}


def test_a_full_journal_backlog_refuses_writes_naming_the_reason(path, monkeypatch):
    """When the table cannot take writes, the backlog is bounded: writers wait, then get an error."""
    monkeypatch.setattr("tinymq.persistence.sqlite._MAX_BACKLOG", 5)
    with SQLitePersistence(path, busy_timeout=0.2) as store:
        locker = sqlite3.connect(path, isolation_level=None)
        locker.execute("BEGIN IMMEDIATE")
        try:
            for i in range(5):
                store.save(Job("t", id=f"ok-{i}"))
            with pytest.raises(PersistenceError, match="5 journaled writes are waiting") as info:
                store.save(Job("t", id="refused"))
            assert "database is locked" in str(info.value)
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        store.save(Job("t", id="after"))  # room again once the table takes the backlog
        assert rows(store) == {f"ok-{i}": "ready" for i in range(5)} | {"after": "ready"}


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX file modes")
def test_existing_file_keeps_its_mode(tmp_path):
    path = tmp_path / "shared.db"
    path.touch(mode=0o640)
    os.chmod(path, 0o640)
    with SQLitePersistence(path):
        pass
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
