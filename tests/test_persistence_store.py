"""SQLitePersistence on its own: rows, recovery, quarantine, dead jobs, serialisers, threads, limits.

Ownership, read-only stores, file safety and fork() are in test_persistence_ownership.py.
"""
import itertools
import logging
import math
import os
import re
import signal
import sqlite3
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
from datetime import timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tinymq
from tinymq import PersistenceError, Priority, Queue, RetryConfig
from tinymq.job import Job
from tinymq.persistence import (
    JSONSerializer, Persistence, PickleSerializer, SQLitePersistence,
)

from _helpers import WAIT, examples


@pytest.fixture(params=["NORMAL", "FULL"])
def store(path, request):
    with SQLitePersistence(path, synchronous=request.param) as s:
        yield s


def rows(store, where="1", column="state"):
    """The table as another reader sees it (each id's ``column``): every write is committed when its
    call returns."""
    conn = sqlite3.connect(store.path)
    try:
        return dict(conn.execute(f"SELECT id, {column} FROM tinymq_jobs WHERE {where}").fetchall())
    finally:
        conn.close()


def raw_update(store, sql, *params):
    """Change the table behind ``store``'s back."""
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


def crashes(store):
    """Each row's crash count, as another reader sees it."""
    return rows(store, column="crashes")


def test_running_row_comes_back_ready_with_the_crash_counted(store, path):
    job = Job("t", id="a")
    store.save(job)
    store.mark_running(job)
    assert rows(store) == {"a": "running"}
    (loaded,) = store.load_all()
    assert loaded.retries == 0 and "died" in loaded.last_error  # the attempt did not fail: its process died
    assert rows(store) == {"a": "ready"} and crashes(store) == {"a": 1}


def test_delete_and_mark_running_ends_one_job_and_starts_the_next_in_one_commit(store, path):
    finished, started = Job("t", 1, id="a"), Job("t", 2, id="b")
    store.save_many([finished, started])
    store.delete_and_mark_running("a", started)
    assert rows(store) == {"b": "running"}  # both committed when the call returns
    (loaded,) = store.load_all()  # a crash now: the started job comes back with the crash counted
    assert loaded.id == "b" and crashes(store) == {"b": 1}


def test_delete_and_mark_running_changes_nothing_when_refused(store, path):
    store.save(Job("t", id="a"))
    with pytest.raises(PersistenceError, match="ud800"):  # a lone surrogate: SQLite cannot store it
        store.delete_and_mark_running("a", Job("t", id="\ud800"))
    with pytest.raises(PersistenceError, match="None"):
        store.delete_and_mark_running(None, Job("t", id="a"))
    assert rows(store) == {"a": "ready"}


def test_a_job_that_keeps_crashing_its_process_ends_dead(store, path, caplog):
    assert store.max_crash_recoveries == 3  # the default, as RedisBroker's
    job = Job("t", id="a").with_max_retries(0)  # (crashes are not failed attempts: retries do not bound them)
    store.save(job)
    for expected in (1, 2, 3):
        store.mark_running(job)
        (job,) = store.load_all()
        assert crashes(store) == {"a": expected} and job.retries == 0
        if expected == 2:  # a failed attempt's retry saved between two crashes keeps the count
            store.save(job)
            assert crashes(store) == {"a": 2}
    store.mark_running(job)
    with caplog.at_level(logging.ERROR, logger="tinymq"):
        assert store.load_all() == []
    assert "crashed its process 4 times" in caplog.text
    # Its row stays as it was until the queue has reported it and marked it dead: a load after a
    # kill in between hands it on again, the same crash counted (not one more).
    assert rows(store) == {"a": "running"} and store.dead_jobs() == []
    (crashed,) = store.take_crashed()
    assert crashed.id == "a" and crashed.retries == 0 and "died" in crashed.last_error
    assert store.take_crashed() == []
    assert store.load_all() == [] and store.load_all() == []  # (each load hands on what it found)
    (crashed,) = store.take_crashed()
    assert crashed.id == "a" and store.take_crashed() == []
    store.mark_dead(crashed, "crashed", None)  # what the queue does once it has reported it
    assert rows(store) == {"a": "dead"}
    (dead,) = store.dead_jobs()
    assert dead.job.id == "a" and dead.reason == "crashed"
    assert "died" in dead.error
    assert store.requeue_dead() == 1  # a requeued job's crashes begin again, as its retries do
    assert crashes(store) == {"a": None}
    (again,) = store.load_all()
    assert again.id == "a"


@pytest.mark.parametrize("limit", [0, 1])
def test_max_crash_recoveries_bounds_the_crashes_a_job_survives(path, limit):
    with SQLitePersistence(path, max_crash_recoveries=limit) as store:
        job = Job("t", id="a")
        store.save(job)
        for _ in range(limit):
            store.mark_running(job)
            (job,) = store.load_all()
        store.mark_running(job)
        assert store.load_all() == [] and [j.id for j in store.take_crashed()] == ["a"]


def test_a_job_given_back_by_stop_keeps_its_crashes(store, path):
    job = Job("t", id="a")
    store.save(job)
    store.mark_running(job)
    (job,) = store.load_all()
    store.mark_running(job)
    store.give_back(job)  # stop() gave the attempt up: not a crash, and no crash forgotten
    assert rows(store) == {"a": "ready"} and crashes(store) == {"a": 1}


@pytest.mark.parametrize("bad", [-1, 1.0, True, None, "3"])
def test_max_crash_recoveries_must_be_an_int_of_at_least_zero(path, bad):
    error = ValueError if bad == -1 else TypeError
    with pytest.raises(error, match=f"max_crash_recoveries must be .*, got {re.escape(repr(bad))}"):
        SQLitePersistence(path, max_crash_recoveries=bad)
    assert not os.path.exists(path)


def test_a_file_of_a_tinymq_without_crash_counts_gets_the_column(path):
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE tinymq_jobs (id TEXT PRIMARY KEY NOT NULL, state TEXT NOT NULL, type TEXT, "
                 "priority INTEGER, run_at REAL, timestamp REAL, retries INTEGER, payload BLOB, "
                 "retry_config TEXT, tags TEXT, last_error TEXT, reason TEXT, seq INTEGER) WITHOUT ROWID")
    conn.execute("INSERT INTO tinymq_jobs VALUES ('a', 'running', 't', 1, 1.0, 1.0, 0, NULL, NULL, NULL, "
                 "NULL, NULL, 1)")
    conn.commit()
    conn.close()
    with SQLitePersistence(path) as store:
        (job,) = store.load_all()
        assert job.id == "a" and job.retries == 0 and crashes(store) == {"a": 1}


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
    assert store.counts()["corrupt"] == 1
    assert store.purge_quarantined() == 1


def test_files_are_created_with_mode_0600_whatever_the_umask(tmp_path):
    path = tmp_path / "private.db"
    old = os.umask(0)
    try:
        with SQLitePersistence(path) as s:
            s.save(Job("t"))
            for name in (path, tmp_path / "private.db-wal", tmp_path / "private.db-shm",
                         tmp_path / "private.db-tinymq.lock"):
                assert stat.S_IMODE(os.stat(name).st_mode) == 0o600, name
    finally:
        os.umask(old)


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


@pytest.mark.parametrize("name", ["jobs/", "jobs/.", "jobs/..", ".", b"jobs/", "jobs\x00.db", b"jobs\x00.db"])
def test_a_path_that_names_a_directory_is_refused_before_anything_is_created(tmp_path, name):
    """"jobs/" (a directory, as open() reads it) made a file named "jobs", and "jobs/." too; they are
    refused with ValueError naming them, and nothing is created."""
    where = os.fsencode(tmp_path) if isinstance(name, bytes) else str(tmp_path)
    with pytest.raises(ValueError, match="path must name a file"):
        SQLitePersistence(os.path.join(where, name))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("path", [5, None, ["jobs.db"]])
def test_a_path_of_another_type_is_a_type_error_naming_it(path):
    with pytest.raises(TypeError, match=re.escape(f"path must be a str, bytes or os.PathLike, got {path!r}")):
        SQLitePersistence(path)


def test_a_file_name_that_is_not_utf8_opens_as_bytes_or_as_str(tmp_path):
    """A POSIX file name is bytes; Python shows the undecodable ones as lone surrogates. A bytes path
    was refused ("must name a file"), and a str path with such a name raised UnicodeEncodeError after
    creating the file: either form now opens that same file, for writing and read-only."""
    raw = os.path.join(os.fsencode(tmp_path), b"jobs-\xff.db")
    try:
        os.close(os.open(raw + b"-probe", os.O_CREAT | os.O_WRONLY, 0o600))
        os.unlink(raw + b"-probe")
    except OSError:  # pragma: no cover - a filesystem that only takes UTF-8 names
        pytest.skip("this filesystem refuses a name that is not UTF-8")
    with SQLitePersistence(raw) as store:
        store.save(Job("t", "payload", id="kept"))
    with SQLitePersistence(os.fsdecode(raw)) as store:
        assert [(j.id, j.payload) for j in store.load_all()] == [("kept", "payload")]
    with SQLitePersistence(raw, read_only=True) as view:
        assert [j.id for j in view.jobs()] == ["kept"]
    assert b"jobs-\xff.db" in os.listdir(os.fsencode(tmp_path))


@pytest.mark.parametrize("busy_timeout", [1e300, 2147483.648, timedelta(days=30), 1 << 80,
                                          math.inf, math.nan, -1.0, -timedelta(seconds=1)])
def test_a_busy_timeout_sqlite_cannot_take_is_refused_naming_it(path, busy_timeout):
    """sqlite3 hands SQLite the busy timeout as a C int of milliseconds: above 2147483.647 seconds it
    wrapped around, and the store stopped waiting for locks at all (a lock held by another
    connection failed the write at once). Such a value, and one no duration can be, is refused."""
    with pytest.raises(ValueError, match=re.escape(repr(busy_timeout))):
        SQLitePersistence(path, busy_timeout=busy_timeout)
    assert not os.path.exists(path)  # refused before anything was created


def test_the_largest_busy_timeout_sqlite_takes_still_waits_for_a_lock(path):
    """At the limit the store waits for a lock another connection holds, and writes once it is free."""
    with SQLitePersistence(path, busy_timeout=2147483.647) as store:
        assert store.busy_timeout == 2147483.647
        other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        other.execute("BEGIN IMMEDIATE")
        waiting = threading.Event()
        original = store._write

        def write(statements):
            waiting.set()
            original(statements)

        store._write = write
        saver = threading.Thread(target=store.save, args=(Job("t", id="waited"),))
        saver.start()
        assert waiting.wait(WAIT)
        saver.join(0.2)  # blocked on the lock, not failed at once
        assert saver.is_alive()
        other.execute("COMMIT")
        other.close()
        saver.join(WAIT)
        assert rows(store) == {"waited": "ready"}


@pytest.mark.parametrize("read_only", [False, True])
def test_a_serializer_class_instead_of_an_instance_is_refused_before_it_quarantines_every_job(path, read_only):
    """serializer=JSONSerializer (the class) passed the dumps()/loads() check; its methods then took
    each payload as ``self``: load_all() quarantined every stored job that has a payload as corrupt
    (a save with a payload failed). It is a TypeError naming the class, and the rows stay as they are."""
    with SQLitePersistence(path) as store:
        store.save(Job("t", {"x": 1}, id="one"))
    with pytest.raises(TypeError, match=r"JSONSerializer\(\), not the class"):
        SQLitePersistence(path, serializer=JSONSerializer, read_only=read_only)
    with SQLitePersistence(path) as store:
        assert store.quarantined() == []
        assert [(j.id, j.payload) for j in store.load_all()] == [("one", {"x": 1})]


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


def _commit_sizes_of_eight_threads(store, work):
    """Run ``work(t)`` in 8 threads released at once; the number of units each commit carried."""
    commits = []
    original = store._commit

    def counting_commit(batch):
        commits.append(len(batch))
        original(batch)

    store._commit = counting_commit
    barrier = threading.Barrier(8)

    def thread_body(t):
        barrier.wait()
        work(t)

    threads = [threading.Thread(target=thread_body, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return commits


def test_group_commit_under_full_shares_transactions(path):
    """Under contention, one committer commits other threads' saves with its own."""
    with SQLitePersistence(path, synchronous="FULL") as store:
        def producer(t):
            for i in range(50):
                store.save(Job("t", id=f"{t}-{i}"))

        commits = _commit_sizes_of_eight_threads(store, producer)
        assert len(rows(store)) == 400
        assert max(commits) > 1, "no commit ever carried more than one thread's save"


def test_under_full_the_wal_is_reused_after_about_a_thousand_pages(path):
    """Under FULL every commit waits for an fsync, which costs more while it appends to a growing -wal
    (the filesystem commits the file's new size too): the -wal is checkpointed and written again from
    its start after about 1,000 pages (1 KiB each), not 10,000 as under NORMAL."""
    with SQLitePersistence(path, synchronous="FULL") as store:
        for i in range(1500):  # a page or two of WAL each: some 2,600 pages in all
            store.save(Job("t", {"n": i}, id=f"job-{i:05d}"))
        wal = os.path.getsize(path + "-wal")
        assert len(rows(store)) == 1500
    # 1,000 frames (a 24-byte header and a 1 KiB page each) and the last commit's few past them
    assert wal <= 1100 * (24 + 1024), f"the -wal grew to {wal} bytes"


def test_workers_ending_and_starting_jobs_at_once_share_transactions_and_each_gets_its_rows(path):
    """delete_and_mark_running from 8 threads under FULL: batched together, each row as its thread left it."""
    with SQLitePersistence(path, synchronous="FULL") as store:
        store.save_many([Job("t", id=f"{t}-{i}") for t in range(8) for i in range(21)])

        def worker(t):
            for i in range(20):
                store.delete_and_mark_running(f"{t}-{i}", Job("t", id=f"{t}-{i + 1}"))

        commits = _commit_sizes_of_eight_threads(store, worker)
        assert rows(store) == {f"{t}-20": "running" for t in range(8)}
        assert max(commits) > 1, "no commit ever carried more than one thread's switch"


def test_group_commit_failure_is_reported_to_every_writer_of_the_batch(store):
    """A failed batch is retried unit by unit, so one failure does not fail the others."""
    from tinymq.persistence.sqlite import _Unit

    good = _Unit([store._upsert(Job("t", id="good"))])
    bad = _Unit([("INSERT INTO no_such_table VALUES (1)", ())])
    with store._commit_lock:
        store._commit([good, bad])
    assert good.done and good.error is None
    assert not bad.done and isinstance(bad.error, sqlite3.Error)
    assert [j.id for j in store.load_all()] == ["good"]


def test_store_error_becomes_persistence_error_with_cause(path):
    with SQLitePersistence(path, busy_timeout=0) as store:
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


def test_dead_jobs_are_requeued_with_retries_reset_and_loaded_again(store):
    job = Job("t", {"x": 1}, id="d1")
    job.retries = 3
    store.mark_dead(job, "retries_exhausted", ValueError("boom"))
    store.mark_dead(Job("t", id="d2"), "no_executor")
    store.mark_dead(Job("t", id="d3"), "evicted")
    assert store.load_all() == []
    assert store.requeue_dead(["d1", "unknown"]) == 1
    (again,) = store.load_all()
    assert (again.id, again.retries, again.payload) == ("d1", 0, {"x": 1})
    assert sorted(d.job.id for d in store.dead_jobs()) == ["d2", "d3"]
    assert store.requeue_dead() == 2
    assert sorted(j.id for j in store.load_all()) == ["d1", "d2", "d3"]
    assert store.dead_jobs() == []
    store.mark_dead(Job("t", id="d4"), "evicted")
    store.mark_dead(Job("t", id="d5"), "evicted")
    assert store.purge_dead(["d4"]) == 1 and [d.job.id for d in store.dead_jobs()] == ["d5"]
    with pytest.raises(TypeError, match="one str"):
        store.requeue_dead("d5")


@pytest.mark.parametrize("method", ["requeue_dead", "purge_dead"])
def test_dead_job_ids_of_another_type_are_a_type_error_and_impossible_ids_count_nothing(store, method):
    """requeue_dead([1]) raised PersistenceError (a store failure, to a caller that handles those as
    disk trouble), and so did "" or a lone surrogate, where RedisBroker raises TypeError for a
    non-str id and counts an id no job has as 0. Now the same, and a refused call changes nothing."""
    store.mark_dead(Job("t", id="d1"), "retries_exhausted")
    for bad in (1, None, b"d1"):
        with pytest.raises(TypeError, match=re.escape(f"job ids must be str, got {bad!r}")):
            getattr(store, method)(["d1", bad])
    assert [d.job.id for d in store.dead_jobs()] == ["d1"]
    assert getattr(store, method)(["", "\udcff"]) == 0
    assert getattr(store, method)(["", "d1"]) == 1


def test_counts_and_jobs_show_rows_by_state_without_changing_them(store):
    store.save(Job("t", id="now"))
    store.save(Job("t", id="later", run_at=4_000_000_000.0))
    store.save(Job("t", id="busy"))
    store.mark_running(Job("t", id="busy"))
    store.mark_dead(Job("t", id="gone"), "evicted")
    assert store.counts() == {"ready": 1, "delayed": 1, "running": 1, "dead": 1, "corrupt": 0}
    assert sorted(j.id for j in store.jobs()) == ["busy", "later", "now"]
    assert [j.retries for j in store.jobs() if j.id == "busy"] == [0]  # jobs() counts no crash
    assert rows(store)["busy"] == "running"


def test_save_many_with_a_repeated_id_keeps_the_last(path):
    with SQLitePersistence(path) as store:
        old = Job("t", "old", id="same", tags={"v": "old"})  # a full row
        new = Job("t", "new", id="same")  # a lean row: inserted by another statement
        store.save_many([old, new])
        assert [(job.payload, job.tags) for job in store.load_all()] == [("new", {})]


@settings(max_examples=examples(60), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(["save", "save_many", "delete", "running"]),
                          st.lists(st.integers(0, 5), min_size=1, max_size=3),
                          st.floats(-1e6, 1e6)), max_size=25))
def test_load_all_returns_jobs_in_the_order_of_their_last_save_whatever_their_timestamps(steps):
    """FIFO within a priority survives a restart: load_all's order is the order of the last
    save of each job (a retry's save moves it to the back, as the queue does), not its
    creation time, which follows the wall clock (here: anything, as after clock steps)."""
    model = {}  # id -> None, in the order load_all must return them
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "jobs.db")
        with SQLitePersistence(path) as store:
            for op, ids, stamp in steps:
                ids = [f"j{n}" for n in dict.fromkeys(ids)]
                jobs = []
                for job_id in ids:
                    job = Job("t", id=job_id)
                    job.timestamp = job.run_at = stamp  # a creation time from any clock
                    jobs.append(job)
                if op == "save":
                    for job in jobs:
                        store.save(job)
                elif op == "save_many":
                    store.save_many(jobs)
                elif op == "running":  # an attempt starts: the job keeps its place
                    for job_id in ids:
                        if job_id in model:
                            store.mark_running(Job("t", id=job_id))
                    continue
                for job_id in ids:
                    model.pop(job_id, None)
                    if op != "delete":
                        model[job_id] = None
                if op == "delete":
                    for job_id in ids:
                        store.delete(job_id)
        with SQLitePersistence(path) as store:  # the restart
            assert [job.id for job in store.load_all()] == list(model)


@pytest.mark.parametrize("planted", ["'abc'", "x'00'", "1e300", str(2**63 - 1)])
def test_a_planted_seq_opens_and_only_moves_its_row_to_the_end(path, planted):
    with SQLitePersistence(path) as store:
        store.save(Job("t", id="planted"))
        store.save(Job("t", id="first"))
    raw_update(store, f"UPDATE tinymq_jobs SET seq = {planted} WHERE id = 'planted'")
    with SQLitePersistence(path) as store:
        store.save(Job("t", id="second"))
    with SQLitePersistence(path) as store:
        assert [job.id for job in store.load_all()] == ["first", "second", "planted"]


# Connection.setlimit arrived in Python 3.11; before it, SQLite refuses only rows near 1 GB.
needs_setlimit = pytest.mark.skipif(not hasattr(sqlite3.Connection, "setlimit"),
                                    reason="sqlite3.Connection.setlimit needs Python 3.11")


@needs_setlimit
def test_save_many_is_one_transaction_even_when_sqlite_refuses_a_row_midway(path):
    """The refusal comes from SQLite itself, after other rows of the batch were inserted."""
    with SQLitePersistence(path) as store:
        store._conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, 10_000)  # store._max_length still says 1e9
        jobs = [Job("t", "x" * 10, id=f"ok-{i}") for i in range(600)]  # more than one INSERT statement
        jobs.append(Job("t", "y" * 20_000, id="too-long"))
        with pytest.raises(PersistenceError) as info:
            store.save_many(jobs)
        assert isinstance(info.value.__cause__, sqlite3.Error)
        assert rows(store) == {}
        store.save_many(jobs[:-1])  # nothing stuck: the next batch goes in
        assert len(rows(store)) == 600


def test_a_payload_over_sqlite_s_length_limit_is_refused_at_save_and_blocks_nothing(path):
    with SQLitePersistence(path) as store:
        if hasattr(store._conn, "setlimit"):
            store._conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, 100_000)
        store._max_length = 100_000  # as if opened with that limit: the check reads it at open
        with pytest.raises(PersistenceError, match="over SQLite's limit of 100000 bytes") as info:
            store.save(Job("t", "x" * 100_000, id="huge"))
        assert "huge" in str(info.value)
        with pytest.raises(PersistenceError, match="over SQLite's limit"):
            store.save(Job("t", "é" * 60_000, id="huge-utf8"))  # 120,000 bytes in UTF-8
        with pytest.raises(PersistenceError, match="over SQLite's limit"):
            store.save_many([Job("t", 1, id="fine-1"), Job("t", "x" * 100_000, id="huge-2")])
        store.save(Job("t", "x" * 1000, id="normal"))
        assert rows(store) == {"normal": "ready"}


@needs_setlimit
def test_a_row_sqlite_refuses_fails_only_its_own_call_even_past_the_check(path):
    """Were the check to miss a row, SQLite's refusal still reaches only its caller."""
    with SQLitePersistence(path) as store:
        store._conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, 10_000)
        with pytest.raises(PersistenceError) as info:
            store.save(Job("t", "x" * 20_000, id="huge"))
        assert isinstance(info.value.__cause__, sqlite3.Error)
        store.save(Job("t", id="next"))
        assert rows(store) == {"next": "ready"}


def test_sqlite_s_real_length_limit_is_read_from_the_connection(path):
    with SQLitePersistence(path) as store:
        expected = store._conn.getlimit(sqlite3.SQLITE_LIMIT_LENGTH) if hasattr(store._conn, "getlimit") else 10 ** 9
        assert store._max_length == expected


def test_values_sqlite_cannot_store_are_refused_when_saved(path):
    class Upper(str):
        pass

    class Listing:
        def dumps(self, obj):
            return [obj]

        def loads(self, data):
            return data

    with SQLitePersistence(path) as store:
        job = Job("t", id="huge")
        job.retries = 2 ** 63
        with pytest.raises(PersistenceError, match="retries"):
            store.save(job)
        store.save(Job(Upper("typed"), id="subclass"))  # a str subclass is stored as its text
        assert [(j.id, j.type, type(j.type)) for j in store.load_all()] == [("subclass", "typed", str)]
        store.delete("subclass")  # (a file holding a job is refused to another serializer)
    with SQLitePersistence(path, serializer=Listing()) as store:
        with pytest.raises(PersistenceError, match="must return str or bytes"):
            store.save(Job("t", "payload", id="listed"))
        store.save(Job("t", id="after"))


def test_text_sqlite_cannot_store_is_refused_when_saved(path):
    import json

    lone = json.loads('{"n": "\\ud800"}')  # what any JSON client can send
    with SQLitePersistence(path) as store:
        with pytest.raises(PersistenceError, match="not valid Unicode"):
            store.save(Job("t", lone, id="bad-payload"))
        with pytest.raises(PersistenceError, match="not valid Unicode"):
            store.save(Job("t", id="bad-tags", tags={"k": "\ud800"}))
        with pytest.raises(PersistenceError, match="SQLite can store"):
            store.delete("\ud800")
        store.save(Job("t", {"n": "é✓"}, id="fine"))  # non-ASCII text is fine
        assert [job.payload for job in store.load_all()] == [{"n": "é✓"}]


def test_a_closed_store_refuses_every_call(path):
    store = SQLitePersistence(path)
    store.close()
    for call in (lambda: store.save(Job("t")), lambda: store.delete("x"), store.load_all,
                 store.dead_jobs, store.counts, lambda: store.save_many([Job("t")])):
        with pytest.raises(PersistenceError, match="closed"):
            call()


def test_two_producer_threads_all_land_through_group_commit(path):
    per_thread = 2000
    with SQLitePersistence(path) as store:
        barrier = threading.Barrier(2)
        errors = []

        def producer(name):
            try:
                barrier.wait()
                for i in range(per_thread):
                    store.save(Job("t", i, id=f"{name}-{i}"))
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=producer, args=(name,)) for name in ("a", "b")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        assert len(rows(store)) == 2 * per_thread
        assert len(store.load_all()) == 2 * per_thread


def test_a_writer_whose_unit_a_failed_committer_drained_gets_an_error_not_silence(path):
    """If the committing thread dies (an exception raised into it) after taking others' units, they raise."""
    import time

    with SQLitePersistence(path) as store:
        outcome = []

        def writer():
            try:
                store.save(Job("t", id="drained"))
                outcome.append("returned")
            except PersistenceError as exc:
                outcome.append(str(exc))

        with store._commit_lock:  # as a committer holding the lock
            thread = threading.Thread(target=writer)
            thread.start()
            deadline = time.monotonic() + 10
            while not store._pending and time.monotonic() < deadline:
                time.sleep(0.001)  # waiting for the writer to queue its unit
            store._pending.popleft()  # drained, then the committer dies before committing
        thread.join(10)
        assert len(outcome) == 1 and "interrupted before its commit" in outcome[0]
        assert rows(store) == {}


def test_a_follower_whose_unit_a_dying_committer_took_is_committed_by_the_next_leader_under_full(path):
    """Under FULL a writer that finds a commit under way waits on a lock of its own: if the writer that
    leads its batch dies (an exception raised into it) after taking the units, the death is its own:
    the others' units go back to the queue, the oldest of their writers leads, and they return once
    committed (they used to raise PersistenceError "interrupted before its commit")."""
    import time

    with SQLitePersistence(path, synchronous="FULL") as store:
        outcome = {}

        def writer(name):
            try:
                store.save(Job("t", id=name))
                outcome[name] = "returned"
            except PersistenceError as exc:
                outcome[name] = str(exc)
            except _Killed:
                outcome[name] = "killed"

        def dies(batch):
            del store._commit  # (once: the next leader commits)
            raise _Killed()

        deadline = time.monotonic() + 10
        with store._commit_lock:  # as a read holding the lock: the first writer waits for it to lead
            committer = threading.Thread(target=writer, args=("committer",))
            committer.start()
            while store._leader is None and time.monotonic() < deadline:
                time.sleep(0.001)
            drained = threading.Thread(target=writer, args=("drained",))
            drained.start()
            while not store._pending and time.monotonic() < deadline:
                time.sleep(0.001)  # waiting for the second writer to queue its unit
            store._commit = dies  # the committer takes it, then dies before committing
        committer.join(10)
        drained.join(10)
        assert outcome == {"committer": "killed", "drained": "returned"}
        assert rows(store) == {"drained": "ready"}


class _Killed(BaseException):
    """An exception raised into a committing thread (as JobTimeout is with interrupt_on_timeout)."""


@pytest.mark.parametrize("synchronous", ["NORMAL", "FULL"])
def test_writers_from_many_threads_with_failures_and_a_dying_committer_never_hang(path, synchronous):
    """16 threads save, delete and save_many at once; some units are refused by SQLite and now
    and then a committer dies in its commit. Every call returns or raises PersistenceError
    (none waits forever), and the store holds exactly what the calls that returned wrote."""
    with SQLitePersistence(path, synchronous=synchronous) as store:
        original = store._commit
        rounds = itertools.count()

        def sometimes_dies(batch):
            if next(rounds) % 97 == 50:
                raise _Killed()
            original(batch)

        store._commit = sometimes_dies
        expected, errors, unexpected = {}, [], []
        barrier = threading.Barrier(16)

        def writer(t):
            barrier.wait()
            for i in range(150):
                job_id = f"{t}-{i}"
                try:
                    if i % 10 == 9:
                        store._write([("INSERT INTO no_such_table VALUES (1)", ())])
                    elif i % 7 == 6:
                        store.save_many([Job("t", id=f"{job_id}-{k}") for k in range(3)])
                        expected.update(dict.fromkeys((f"{job_id}-{k}" for k in range(3)), "ready"))
                    else:
                        store.save(Job("t", id=job_id))
                        expected[job_id] = "ready"
                        if i % 3 == 0:
                            store.delete(job_id)
                            del expected[job_id]
                except PersistenceError as exc:
                    errors.append(exc)
                except _Killed:
                    errors.append("killed")
                except BaseException as exc:  # pragma: no cover - reported below
                    unexpected.append(exc)

        threads = [threading.Thread(target=writer, args=(t,)) for t in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WAIT * 3)
        assert not any(thread.is_alive() for thread in threads), "a writer is waiting forever"
        assert unexpected == []
        assert errors, "no write failed: the test did not exercise failures"
        del store._commit
        stored = rows(store)
        # A failed call wrote nothing that is expected; a returned one is there as it left it.
        assert {k: v for k, v in stored.items() if k in expected} == expected


def test_a_merged_batch_has_the_effect_of_its_statements_in_order(path):
    """Group commit merges runs of single-row statements: the table must end as if run one by one."""
    from tinymq.persistence.sqlite import _DELETE, _MARK_RUNNING

    with SQLitePersistence(path) as store:
        statements = [
            store._upsert(Job("t", "v1", id="a")), store._upsert(Job("t", "v2", id="a")),
            store._upsert(Job("t", id="b", tags={"full": "row"})), store._upsert(Job("t", id="c")),
            (_MARK_RUNNING, ("a",)), (_MARK_RUNNING, ("c",)),
            (_DELETE, ("c",)), (_DELETE, ("b",)),
            store._upsert(Job("t", "v3", id="b")),
        ]
        merged = store._merged(statements)
        assert len(merged) == 6  # a+a, b, c, marks, deletes, b
        with store._commit_lock:
            store._execute(merged)
        assert rows(store) == {"a": "running", "b": "ready"}
        assert {j.id: j.payload for j in store.jobs()} == {"a": "v2", "b": "v3"}


def test_a_file_of_the_previous_layout_opens_and_a_newer_schema_is_refused(path):
    """Files written before the owner table existed: same jobs table, columns in another order."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("CREATE TABLE tinymq_jobs (id TEXT PRIMARY KEY NOT NULL, state TEXT NOT NULL, type TEXT, "
                 "priority INTEGER, run_at REAL, timestamp REAL, retries INTEGER, retry_config TEXT, "
                 "tags TEXT, last_error TEXT, reason TEXT, payload BLOB) WITHOUT ROWID")
    conn.execute("INSERT INTO tinymq_jobs (id, state, type, priority, run_at, timestamp, retries, payload) "
                 "VALUES ('old', 'ready', 't', 1, 1.0, 1.0, 0, '{\"x\":1}')")
    conn.execute("PRAGMA user_version=1")
    conn.close()
    with SQLitePersistence(path) as store:
        assert [(j.id, j.payload) for j in store.load_all()] == [("old", {"x": 1})]
        store.save(Job("t", id="new", priority=Priority.MEDIUM))
    conn = sqlite3.connect(path, isolation_level=None)
    # The order column was added and the version kept: an older tinymq still opens the file,
    # and its INSERTs (which name their columns) still work; its rows come first, by creation.
    assert conn.execute("PRAGMA user_version").fetchone() == (1,)
    conn.execute("INSERT INTO tinymq_jobs (id, state, type, priority, run_at, timestamp, retries, payload) "
                 "VALUES ('older', 'ready', 't', 1, 0.5, 0.5, 0, NULL)")
    conn.close()
    with SQLitePersistence(path) as store:
        assert [j.id for j in store.load_all()] == ["older", "old", "new"]
        store._conn.execute("PRAGMA user_version=99")
    with pytest.raises(PersistenceError, match="schema version 99, written by a newer tinymq"):
        SQLitePersistence(path)


# --- a save over a dead job's row, and its undo ---------------------------------------------------

def raw_rows(store):
    """Every row, every column, as another reader sees them."""
    conn = sqlite3.connect(store.path)
    try:
        return sorted(conn.execute("SELECT * FROM tinymq_jobs").fetchall())
    finally:
        conn.close()


def kept_row(store, kind, job_id):
    """A row of ``job_id`` that is not an unfinished job: "dead" (mark_dead) or "corrupt" (quarantined)."""
    if kind == "dead":
        store.mark_dead(Job("t", {"old": job_id}, id=job_id), "retries_exhausted", "boom")
    else:
        store.save(Job("t", {"old": job_id}, id=job_id))
        raw_update(store, "UPDATE tinymq_jobs SET state = 'corrupt', reason = 'corrupt: planted' WHERE id = ?", job_id)


@pytest.mark.parametrize("kind", ["dead", "corrupt"])
@pytest.mark.parametrize("how", ["save", "save_many"])
def test_undo_save_puts_back_the_dead_or_quarantined_row_a_save_replaced(store, kind, how):
    """A new job may take a dead job's id: its save overwrites the dead row. When the queue refuses that
    job after all (QueueFull), undo_save must leave the store as before the save: the dead row back,
    every column as it was, and the other rows of the batch gone (fixed: the undo was a delete)."""
    kept_row(store, kind, "x")
    store.save(Job("t", id="other"))
    before = raw_rows(store)
    new = [Job("t", {"new": 1}, id="x"), Job("t", {"new": 2}, id="fresh", tags={"a": "full row"})]
    if how == "save":
        for job in new:
            store.save(job)
    else:
        store.save_many(new)
    assert rows(store) == {"x": "ready", "fresh": "ready", "other": "ready"}
    assert {j.id: j.payload for j in store.jobs()}["x"] == {"new": 1}
    for job in new:
        store.undo_save(job.id)
    assert raw_rows(store) == before
    assert store._replaced == {}


def test_a_save_over_a_dead_row_stands_when_not_undone_and_its_end_forgets_the_dead_row(store):
    """Accepted, the new job's row stands (as before); once it has ended, a later refused save of the
    same id is undone by a delete: the dead row the first save replaced is not brought back."""
    kept_row(store, "dead", "x")
    store.save(Job("t", {"new": 1}, id="x"))  # accepted: runs
    store.mark_running(Job("t", id="x"))
    store.save(Job("t", {"new": 1}, id="x"))  # a retry's save overwrites its own row
    assert rows(store) == {"x": "ready"}
    store.delete("x")  # it succeeded
    assert store._replaced == {}
    store.save(Job("t", {"new": 2}, id="x"))
    store.undo_save("x")
    assert rows(store) == {} and store.dead_jobs() == []


def test_undo_save_after_a_later_save_of_the_id_deletes_instead_of_restoring(store):
    """undo_save puts a replaced row back only over the row of the save that replaced it."""
    kept_row(store, "dead", "x")
    store.save(Job("t", {"new": 1}, id="x"))
    store.save(Job("t", {"new": 2}, id="x"))  # the row is no longer that save's
    store.undo_save("x")
    assert rows(store) == {}


def test_a_group_commit_that_merges_a_save_over_a_dead_row_saves_every_unit(path):
    """Group commit merges saves of several threads into one statement: one of them over a dead row
    must still replace it (and keep it for undo_save), the others land as usual."""
    from tinymq.persistence.sqlite import _MARK_RUNNING, _Unit

    with SQLitePersistence(path) as store:
        kept_row(store, "dead", "x")
        store.save(Job("t", id="running"))
        store.mark_running(Job("t", id="running"))
        dead_before = [row for row in raw_rows(store) if row[0] == "x"]
        units = [_Unit([store._upsert(Job("t", {"new": i}, id=job_id))])
                 for i, job_id in enumerate(["a", "x", "running", "b"])]
        units.append(_Unit([(_MARK_RUNNING, ("a",))]))
        with store._commit_lock:
            store._commit(units)
        assert all(unit.done and unit.error is None for unit in units)
        assert rows(store) == {"a": "running", "x": "ready", "running": "ready", "b": "ready"}
        assert {j.id: j.payload for j in store.jobs()} == {"a": {"new": 0}, "x": {"new": 1},
                                                           "running": {"new": 2}, "b": {"new": 3}}
        store.undo_save("x")
        assert [row for row in raw_rows(store) if row[0] == "x"] == dead_before
        assert rows(store) == {"a": "running", "x": "dead", "running": "ready", "b": "ready"}


def test_saves_over_kept_rows_work_without_sqlite_upsert(path):
    """SQLite before 3.24 has no upsert: a save there inserts or ignores, and what it left (any row of
    its id, a retry's own included) is replaced the slower way, with the same results."""
    script = textwrap.dedent(f"""
        import sqlite3
        sqlite3.sqlite_version_info = (3, 23, 0)
        from tinymq.job import Job
        from tinymq.persistence import sqlite as module
        assert not module._UPSERT_SUPPORTED and "OR IGNORE" in module._SAVE
        store = module.SQLitePersistence({path!r})
        store.mark_dead(Job("t", "old", id="x"), "retries_exhausted", "boom")
        store.save(Job("t", "first", id="r"))
        store.mark_running(Job("t", id="r"))
        store.save(Job("t", "retry", id="r"))
        store.save_many([Job("t", "new", id="x"), Job("t", "fresh", id="f")])
        assert {{j.id: j.payload for j in store.jobs()}} == {{"r": "retry", "x": "new", "f": "fresh"}}, store.jobs()
        assert store.dead_jobs() == []
        store.undo_save("x")
        store.undo_save("f")
        assert [(d.job.id, d.job.payload, d.reason) for d in store.dead_jobs()] == [("x", "old", "retries_exhausted")]
        assert [j.id for j in store.jobs()] == ["r"]
        store.close()
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_a_job_without_retries_whose_process_was_killed_runs_after_the_restart(path):
    # At-least-once: a kill -9 (a deploy, the OOM killer) is no failure of the job. Its crash was
    # counted as a failed attempt, so a job with max_retries=0 was reported "crashed", never run again.
    child = textwrap.dedent(f"""
        import os, signal
        from tinymq import Job, Queue, SQLitePersistence
        q = Queue()
        q.set_persistence(SQLitePersistence({path!r}))
        q.register_executor("once", lambda job: os.kill(os.getpid(), signal.SIGKILL))
        q.enqueue(Job("once", id="a").with_max_retries(0))
        q.start_dispatcher()
        q.join(60)
    """)
    tinymq_root = os.path.dirname(os.path.dirname(tinymq.__file__))
    killed = subprocess.run([sys.executable, "-c", child], timeout=60, stdin=subprocess.DEVNULL,
                            env=dict(os.environ, PYTHONPATH=tinymq_root))
    assert killed.returncode == -signal.SIGKILL
    ran, failures = [], []
    q = Queue()
    q.on_failure(lambda job, reason, exc: failures.append((job.id, reason)))
    with SQLitePersistence(path) as store:
        q.set_persistence(store)
        q.register_executor("once", lambda job: ran.append((job.id, job.retries)))
        q.start_dispatcher()
        assert q.join(WAIT)
        q.stop()
        assert ran == [("a", 0)] and failures == []
        assert store.counts() == dict.fromkeys(("ready", "delayed", "running", "dead", "corrupt"), 0)
