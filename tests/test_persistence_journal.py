"""SQLitePersistence's write-behind journal: durable on return, replayed after a crash."""
import logging
import marshal
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import zlib

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import tinymq
from tinymq import PersistenceError
from tinymq.job import Job
from tinymq.persistence import SQLitePersistence, _journal

pytestmark = pytest.mark.skipif(not _journal.SUPPORTED, reason="the journal needs flock()")


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "jobs.db")


@pytest.fixture
def manual_flush(monkeypatch):
    """The flusher thread never applies on its own: only flush() and close() do."""
    monkeypatch.setattr(_journal, "_LINGER", 3600.0)


def table(path):
    with sqlite3.connect(path) as conn:
        return dict(conn.execute("SELECT id, state FROM tinymq_jobs").fetchall())


def journal_files(path):
    directory, name = os.path.split(path)
    return sorted(f for f in os.listdir(directory) if f.startswith(name + "-tinymq-"))


def crash(store):
    """What SIGKILL leaves: the journal on disk, unapplied, and its lock released."""
    journal = store._journal
    journal._stop.set()
    with journal._lock:
        if journal._idle:
            journal._idle = False
            journal._wake.release()
    journal._thread.join()
    journal.abandon_after_fork()  # closes the files without applying anything
    _journal._live.discard(journal)
    store._conn.close()
    store._closed = True


def test_writes_are_in_the_table_after_flush_and_the_journal_is_gone_after_close(path):
    with SQLitePersistence(path) as store:
        assert store.journal is True
        store.save(Job("t", id="a"))
        store.save_many([Job("t", id="b"), Job("t", id="c")])
        store.mark_running(Job("t", id="b"))
        store.delete("c")
        store.mark_dead(Job("t", id="d"), "retries_exhausted", ValueError("boom"))
        store.flush()
        assert table(path) == {"a": "ready", "b": "running", "d": "dead"}
        assert journal_files(path)  # the live journal: a lock file and the current segment
    assert journal_files(path) == []


def test_rows_reach_the_table_without_flush(path):
    """The flusher applies on its own within moments: no flush() needed (bounded wait: 2 s)."""
    store = SQLitePersistence(path)
    store.save(Job("t", id="a"))
    for _ in range(200):
        if table(path):
            break
        store._journal._stop.wait(0.01)  # polling another connection's view, bounded
    assert table(path) == {"a": "ready"}
    store.close()


def test_a_crashed_store_s_journal_is_replayed_by_the_next_open(path, manual_flush):
    store = SQLitePersistence(path)
    store.save(Job("t", {"n": 1}, id="saved"))
    store.save_many([Job("t", id="batch-1"), Job("t", id="batch-2")])
    store.save(Job("t", id="finished"))
    store.delete("finished")
    store.save(Job("t", id="started"))
    store.mark_running(Job("t", id="started"))
    crash(store)
    assert table(path) == {}  # nothing was applied before the "crash"
    with SQLitePersistence(path) as again:
        assert table(path) == {"saved": "ready", "batch-1": "ready", "batch-2": "ready", "started": "running"}
        loaded = {job.id: job for job in again.load_all()}
        assert sorted(loaded) == ["batch-1", "batch-2", "saved", "started"]
        assert loaded["saved"].payload == {"n": 1}
        assert loaded["started"].retries == 1  # the crash during its attempt counts
        assert len(journal_files(path)) == 2  # only again's own lock file and segment
    assert journal_files(path) == []


def test_load_all_first_flushes_the_other_stores_of_this_process_on_the_same_file(path, manual_flush):
    """Their writes come first; their journals stay theirs (a live journal is never replayed)."""
    with SQLitePersistence(path) as owner, SQLitePersistence(path) as other:
        owner.save(Job("t", id="owned"))
        assert [job.id for job in other.load_all()] == ["owned"]
        owner.delete("owned")
        assert other.load_all() == []
        assert any(owner._journal.token in name for name in journal_files(path))


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_jobs_journaled_by_a_process_killed_with_sigkill_are_recovered(path):
    """A real kill -9: the child's flusher is stuck, so its jobs exist only in its journal."""
    child = textwrap.dedent(f"""
        import sys, threading
        from tinymq.job import Job
        from tinymq.persistence import SQLitePersistence
        SQLitePersistence._apply = lambda self, *args: threading.Event().wait()  # a hung disk
        store = SQLitePersistence({path!r})
        for i in range(500):
            store.save(Job("t", i, id=f"job-{{i}}"))
        store.delete("job-7")
        print("saved", flush=True)
        threading.Event().wait()
    """)
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(tinymq.__file__)))
    process = subprocess.Popen([sys.executable, "-c", child], env=env, stdout=subprocess.PIPE)
    try:
        assert process.stdout.readline() == b"saved\n"
        with SQLitePersistence(path) as live:
            assert live.load_all() == []  # the child is alive: its journal is its own
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    with SQLitePersistence(path) as store:
        recovered = {job.id: job.payload for job in store.load_all()}
    assert recovered == {f"job-{i}": i for i in range(500) if i != 7}
    assert journal_files(path) == []


def test_a_torn_last_record_is_skipped_and_the_rest_replayed(path, manual_flush, caplog):
    store = SQLitePersistence(path)
    store.save(Job("t", id="whole"))
    segment = store._journal._segment(store._journal._seq)
    crash(store)
    with open(segment, "ab") as f:  # a write() cut short by the kill
        f.write(_journal.encode((_journal.SAVE, SQLitePersistence._row(store, Job("t", id="torn"))))[:-5])
    with caplog.at_level(logging.WARNING, logger="tinymq"):
        with SQLitePersistence(path) as again:
            assert [job.id for job in again.load_all()] == ["whole"]
    assert "torn record" in caplog.text


def write_segment(path, *bodies, header=True):
    with open(path, "wb") as f:
        if header:
            f.write(_journal.encode((_journal.FORMAT, _journal.VERSION)))
        for body in bodies:
            f.write(_journal._HEADER.pack(len(body), zlib.crc32(body)) + body)


ROW = 12  # columns in a row


@pytest.mark.parametrize("body", [
    marshal.dumps(("S", ("id", "ready") + (None,) * 9 + (frozenset(),))),  # not a plain value
    marshal.dumps(("S", (compile("1", "x", "eval"),))),  # a code object: never accepted
    marshal.dumps(("S", ("id", "ready", None))),  # a row of another length
    marshal.dumps(("X", "id")),  # unknown kind
    marshal.dumps(["S", "id"]),  # not a tuple
    b"\xffnot marshal at all",
])
def test_a_damaged_record_is_logged_and_skipped(tmp_path, caplog, body):
    segment = str(tmp_path / "segment.log")
    write_segment(segment, body, marshal.dumps((_journal.DELETE, "after")))
    with caplog.at_level(logging.ERROR, logger="tinymq"):
        assert _journal.read_segment(segment, ROW) == [(_journal.DELETE, "after")]
    assert "damaged record" in caplog.text


def test_a_record_with_a_bad_checksum_is_skipped(tmp_path, caplog):
    segment = str(tmp_path / "segment.log")
    record = bytearray(_journal.encode((_journal.DELETE, "flipped")))
    record[-2] ^= 0xFF
    with open(segment, "wb") as f:
        f.write(_journal.encode((_journal.FORMAT, _journal.VERSION)) + bytes(record)
                + _journal.encode((_journal.DELETE, "kept")))
    with caplog.at_level(logging.ERROR, logger="tinymq"):
        assert _journal.read_segment(segment, ROW) == [(_journal.DELETE, "kept")]


def test_a_segment_of_another_format_is_kept_and_logged_and_the_rest_recovered(path, manual_flush, caplog):
    future = SQLitePersistence(path)
    future.save(Job("t", id="future"))
    segment = future._journal._segment(future._journal._seq)
    crash(future)
    data = open(segment, "rb").read()
    first = len(_journal.encode((_journal.FORMAT, _journal.VERSION)))
    with open(segment, "wb") as f:
        f.write(_journal.encode((_journal.FORMAT, _journal.VERSION + 1)) + data[first:])
    current = SQLitePersistence(path)
    current.save(Job("t", id="current"))
    crash(current)
    with caplog.at_level(logging.ERROR, logger="tinymq"):
        with SQLitePersistence(path) as store:
            assert [job.id for job in store.load_all()] == ["current"]
    assert "format version 2" in caplog.text
    assert os.path.exists(segment)  # left for a tinymq that reads it


def test_a_damaged_first_record_does_not_hide_the_rest(tmp_path, caplog):
    segment = str(tmp_path / "segment.log")
    write_segment(segment, b"\0" * 16, marshal.dumps((_journal.DELETE, "kept")), header=False)
    with caplog.at_level(logging.ERROR, logger="tinymq"):
        assert _journal.read_segment(segment, ROW) == [(_journal.DELETE, "kept")]
    assert "first record is damaged" in caplog.text


def test_journal_is_refused_where_it_cannot_keep_its_promise(path):
    with pytest.raises(ValueError, match="synchronous OFF or NORMAL.*'FULL'"):
        SQLitePersistence(path, synchronous="FULL", journal=True)
    with pytest.raises(ValueError, match="':memory:'"):
        SQLitePersistence(":memory:", journal=True)
    with pytest.raises(TypeError, match="'yes'"):
        SQLitePersistence(path, journal="yes")
    with SQLitePersistence(path, synchronous="FULL") as full:
        assert full.journal is False  # FULL commits (with group commit) before returning


def test_a_closed_store_refuses_journaled_writes(path):
    store = SQLitePersistence(path)
    store.close()
    with pytest.raises(PersistenceError, match="closed"):
        store.save(Job("t"))
    with pytest.raises(PersistenceError, match="closed"):
        store.flush()


# -- the journal against a model: any operations, flushes and crashes ------------------

_IDS = ["a", "b", "c"]
_step = st.one_of(
    st.tuples(st.just("save"), st.sampled_from(_IDS), st.integers(0, 3)),
    st.tuples(st.just("save_many"), st.lists(st.sampled_from(_IDS), min_size=1, max_size=3, unique=True),
              st.integers(0, 3)),
    st.tuples(st.just("running"), st.sampled_from(_IDS)),
    st.tuples(st.just("dead"), st.sampled_from(_IDS)),
    st.tuples(st.just("delete"), st.sampled_from(_IDS)),
    st.tuples(st.just("flush")),
    st.tuples(st.just("flush_fails")),  # the database is busy: one more segment stays unapplied
    st.tuples(st.just("crash")),
    st.tuples(st.just("crash_after_commit")),  # applied, then killed before its files are removed
    st.tuples(st.sampled_from(["other_save", "other_delete"]), st.sampled_from(_IDS)),
)


def _flush_against_a_busy_database(store, path):
    locker = sqlite3.connect(path, isolation_level=None)
    locker.execute("BEGIN IMMEDIATE")
    try:
        store.flush()
    except PersistenceError:
        pass
    finally:
        locker.execute("ROLLBACK")
        locker.close()


def _flush_then_die_before_unlink(store):
    real_unlink = os.unlink
    os.unlink = lambda target, *a, **k: None if str(target).endswith(".log") else real_unlink(target, *a, **k)
    try:
        store.flush()
    finally:
        os.unlink = real_unlink
    crash(store)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(_step, max_size=25))
@example(steps=[("save", "a", 0), ("flush",), ("delete", "a"), ("running", "a"), ("flush",)])
@example(steps=[("save", "a", 1), ("running", "a"), ("crash",), ("delete", "a"), ("save", "a", 2)])
@example(steps=[("save", "a", 0), ("flush_fails",), ("delete", "a"), ("crash",)])
@example(steps=[("save", "a", 0), ("crash_after_commit",), ("delete", "a"), ("flush",), ("crash",)])
@example(steps=[("save", "a", 0), ("delete", "a"), ("crash_after_commit",), ("other_save", "a"), ("flush",)])
def test_the_table_always_ends_as_the_operations_say(tmp_path_factory, manual_flush, steps):
    """Replaying journals (coalesced, after any crash) leaves each row as its last write left it.

    A second store on the same file writes too ("other_..."), after the first
    store's writes are in the table: a dead journal's replay must never undo it.
    """
    path = str(tmp_path_factory.mktemp("model") / "jobs.db")
    model = {}  # id -> (state, retries) as a store committing every write would have it
    store = SQLitePersistence(path, busy_timeout=0)
    other = SQLitePersistence(path, busy_timeout=0)
    unapplied_at_crash = False  # a crash left writes that only the next open applies
    try:
        for step in steps:
            kind = step[0]
            if kind.startswith("other_"):
                if store is None and unapplied_at_crash:
                    store = SQLitePersistence(path, busy_timeout=0)  # those writes come first
                if store is not None:
                    store.flush()
                job = Job("t", id=step[1])
                job.retries = 7
                other.save(job) if kind == "other_save" else other.delete(step[1])
                other.flush()
                if kind == "other_save":
                    model[step[1]] = ("ready", 7)
                else:
                    model.pop(step[1], None)
                continue
            if store is None:
                store = SQLitePersistence(path, busy_timeout=0)  # opening replays the dead journal
            if kind == "save":
                job = Job("t", id=step[1])
                job.retries = step[2]
                store.save(job)
                model[step[1]] = ("ready", step[2])
            elif kind == "save_many":
                jobs = [Job("t", id=job_id) for job_id in step[1]]
                for job in jobs:
                    job.retries = step[2]
                store.save_many(jobs)
                model.update({job_id: ("ready", step[2]) for job_id in step[1]})
            elif kind == "running":
                store.mark_running(Job("t", id=step[1]))
                if step[1] in model:
                    model[step[1]] = ("running", model[step[1]][1])
            elif kind == "dead":
                store.mark_dead(Job("t", id=step[1]), "retries_exhausted", None)
                model[step[1]] = ("dead", 0)
            elif kind == "delete":
                store.delete(step[1])
                model.pop(step[1], None)
            elif kind == "flush":
                store.flush()
            elif kind == "flush_fails":
                _flush_against_a_busy_database(store, path)
            else:
                if kind == "crash":
                    crash(store)
                    unapplied_at_crash = True
                else:
                    _flush_then_die_before_unlink(store)
                    unapplied_at_crash = False
                store = None  # reopened by the next step that needs it
        if store is None:
            store = SQLitePersistence(path, busy_timeout=0)
        store.flush()
        with sqlite3.connect(path) as conn:
            rows = {job_id: (state, retries) for job_id, state, retries in
                    conn.execute("SELECT id, state, retries FROM tinymq_jobs")}
        assert rows == model
    finally:
        if store is not None:
            store.close()
        other.close()
    assert journal_files(path) == []


# -- regressions found in review ---------------------------------------------------------


def test_a_chdir_after_opening_does_not_scatter_the_journal(tmp_path, monkeypatch, manual_flush):
    home, elsewhere = tmp_path / "home", tmp_path / "elsewhere"
    home.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(home)
    store = SQLitePersistence("jobs.db")  # a relative path
    store.save(Job("t", id="first"))
    monkeypatch.chdir(elsewhere)
    store.flush()  # starts a new segment
    store.save(Job("t", id="second"))
    crash(store)
    assert os.listdir(elsewhere) == []
    with SQLitePersistence(str(home / "jobs.db")) as again:
        assert sorted(job.id for job in again.load_all()) == ["first", "second"]


def test_a_journal_applied_before_a_crash_is_not_replayed_over_newer_writes(path, manual_flush, monkeypatch):
    """Crash between the apply's COMMIT and the unlink: its files remain, but their watermark says applied."""
    other = SQLitePersistence(path)  # a store already open on the file
    first = SQLitePersistence(path)
    first.save(Job("t", id="nightly"))
    first.delete("nightly")
    real_unlink = os.unlink
    monkeypatch.setattr(os, "unlink", lambda target, *args, **kwargs: None if str(target).endswith(".log")
                        else real_unlink(target, *args, **kwargs))  # the crash comes before the unlink
    first.flush()
    monkeypatch.undo()
    token = first._journal.token
    crash(first)
    assert any(token in name for name in journal_files(path))  # the applied segments are still there
    other.save(Job("t", id="nightly"))  # the same id, enqueued again
    other.flush()
    with SQLitePersistence(path) as later:  # replays first's leftover files: all already applied
        assert [job.id for job in later.load_all()] == ["nightly"]
        assert not any(token in name for name in journal_files(path))  # first's files are gone
    other.close()


def test_a_failed_flush_from_another_thread_does_not_strand_a_full_backlog(path, monkeypatch):
    """Another thread's flush() takes the new writes and fails just after the flusher's own success:
    the flusher must retry them, not sleep while writers wait for room."""
    monkeypatch.setattr("tinymq.persistence.sqlite._MAX_BACKLOG", 3)
    with SQLitePersistence(path, busy_timeout=0.2) as store:
        journal = store._journal
        real_flush = journal.flush
        locker = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        armed, injected = threading.Event(), threading.Event()

        def flush_then_lose_the_race():  # runs in the flusher thread
            real_flush()
            if armed.is_set() and not injected.is_set():
                locker.execute("BEGIN IMMEDIATE")  # the database becomes busy ...
                for i in range(3):  # ... new writes fill the backlog ...
                    journal.append((_journal.SAVE, store._row(Job("t", id=f"ok-{i}"))))
                try:  # ... and "another thread's" flush takes them and fails
                    real_flush()
                except PersistenceError:
                    pass
                injected.set()

        monkeypatch.setattr(journal, "flush", flush_then_lose_the_race)
        armed.set()
        store.save(Job("t", id="trigger"))
        assert injected.wait(10)
        locker.execute("ROLLBACK")
        locker.close()
        store.save(Job("t", id="after"))  # needs room: the flusher must retry the failed batch
        monkeypatch.undo()
        store.flush()
        assert table(path) == {"trigger": "ready", "ok-0": "ready", "ok-1": "ready", "ok-2": "ready",
                               "after": "ready"}


def test_concurrent_closes_both_wait_for_the_journal(path, manual_flush):
    store = SQLitePersistence(path)
    for i in range(100):
        store.save(Job("t", id=f"job-{i}"))
    barrier = threading.Barrier(2)
    errors = []

    def close():
        barrier.wait()
        try:
            store.close()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
        assert len(table(path)) == 100  # whichever returns, the rows are in

    threads = [threading.Thread(target=close) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert journal_files(path) == []


def test_save_many_with_a_repeated_id_keeps_the_last_without_journal(path):
    with SQLitePersistence(path, journal=False) as store:
        old = Job("t", "old", id="same", tags={"v": "old"})  # a full row: tags are set
        new = Job("t", "new", id="same")  # a lean row: inserted by another statement
        store.save_many([old, new])
        assert [job.payload for job in store.load_all()] == ["new"]


def test_an_applied_batch_is_never_applied_again_even_if_its_files_cannot_be_removed(path, monkeypatch, caplog):
    with SQLitePersistence(path) as mine, SQLitePersistence(path) as other:
        mine.save(Job("t", "v1", id="job"))
        real_unlink = os.unlink

        def failing_unlink(target, *args, **kwargs):
            if target.endswith(".log"):
                raise PermissionError(13, "read-only for a moment", target)
            return real_unlink(target, *args, **kwargs)

        monkeypatch.setattr(os, "unlink", failing_unlink)
        with caplog.at_level(logging.ERROR, logger="tinymq"):
            mine.flush()  # applied; removing the segment fails and is logged
        monkeypatch.undo()
        assert "cannot remove the applied segment" in caplog.text
        other.save(Job("t", "v2", id="job"))
        other.flush()
        mine.flush()  # nothing new: must not write v1 again
        assert [job.payload for job in other.load_all()] == ["v2"]


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors in /proc")
def test_a_database_outage_does_not_pile_up_open_files(path, monkeypatch):
    with SQLitePersistence(path, busy_timeout=0) as store:
        locker = sqlite3.connect(path, isolation_level=None)
        locker.execute("BEGIN IMMEDIATE")
        try:
            before = len(os.listdir("/proc/self/fd"))
            for i in range(40):
                store.save(Job("t", id=f"job-{i}"))
                with pytest.raises(PersistenceError):
                    store.flush()  # a new segment each time, none applied
            assert len(os.listdir("/proc/self/fd")) <= before + 3
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        store.flush()
        assert len(table(path)) == 40


def test_values_sqlite_cannot_store_are_refused_when_saved_not_later(path):
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
        store.flush()
        assert [(j.id, j.type, type(j.type)) for j in store.load_all()] == [("subclass", "typed", str)]
    with SQLitePersistence(path, serializer=Listing()) as store:
        with pytest.raises(PersistenceError, match="must return str or bytes"):
            store.save(Job("t", "payload", id="listed"))
        store.flush()  # nothing poisoned the journal


def test_a_failed_reopen_in_a_forked_child_is_retried(path, monkeypatch):
    store = SQLitePersistence(path)
    store._journal.abandon_after_fork()  # as the at-fork hook does in a child ...
    store._pid = -1  # ... whose pid differs from the parent's
    monkeypatch.setattr(_journal, "Journal", lambda *args, **kwargs: (_ for _ in ()).throw(OSError(24, "EMFILE")))
    with pytest.raises(PersistenceError, match="EMFILE"):
        store.save(Job("t", id="refused"))
    with pytest.raises(PersistenceError, match="EMFILE"):
        store.flush()  # no silent no-op: the store is still waiting to reopen
    monkeypatch.undo()
    store.save(Job("t", id="accepted"))  # the next call reopens
    assert store._pid == os.getpid()
    store.close()
    assert table(path) == {"accepted": "ready"}


def test_an_orphan_with_several_segments_replays_them_in_order(path, manual_flush):
    store = SQLitePersistence(path, busy_timeout=0)
    locker = sqlite3.connect(path, isolation_level=None)
    locker.execute("BEGIN IMMEDIATE")
    store.save(Job("t", id="x"))
    with pytest.raises(PersistenceError):
        store.flush()  # segment 0 swapped out, not applied
    store.delete("x")  # lands in segment 1
    locker.execute("ROLLBACK")
    locker.close()
    crash(store)
    with SQLitePersistence(path) as again:
        assert again.load_all() == []


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
        store.flush()
        assert [job.payload for job in store.load_all()] == [{"n": "é✓"}]


def test_flush_reports_writes_it_could_not_apply(path, monkeypatch):
    with SQLitePersistence(path) as store:
        store.save(Job("t", id="pending"))
        monkeypatch.setattr(store._journal, "_open_segment",
                            lambda seq: (_ for _ in ()).throw(OSError(24, "Too many open files")))
        with pytest.raises(PersistenceError, match="Too many open files"):
            store.flush()
        monkeypatch.undo()
        store.flush()
        assert table(path) == {"pending": "ready"}


def test_switching_stores_applies_the_old_stores_writes_first(path, manual_flush):
    from tinymq import Queue

    first, second = SQLitePersistence(path), SQLitePersistence(path)
    q = Queue(10)
    q.set_persistence(first)
    q.enqueue(Job("t", "v1", id="x"))  # journaled by first, not yet in the table
    q.set_persistence(second)  # second.load_all() flushes first first: x is in the table, then loaded
    second.delete("x")
    second.flush()
    first.flush()  # nothing left in first to write x back
    assert second.load_all() == []
    q.stop(wait=False)
    first.close()
    second.close()


def test_exceptions_raised_into_a_writer_thread_never_wedge_the_journal(path, manual_flush, monkeypatch):
    """interrupt_on_timeout (or Ctrl-C) raises into a thread at any bytecode, also inside append()."""
    import ctypes

    class Interrupt(Exception):
        pass

    # CPython 3.13 may deliver one where no try sees it (python/cpython#139622): the writer
    # thread then dies, which is not what this test is about; a new one takes its place.
    original_hook = threading.excepthook
    monkeypatch.setattr(threading, "excepthook",
                        lambda args: None if args.exc_type is Interrupt else original_hook(args))
    # One may also land in a finalizer the writer thread runs ("Exception ignored in ..."),
    # or in the hook reporting that: neither is what this test is about.
    monkeypatch.setattr(sys, "unraisablehook", lambda args: None)
    store = SQLitePersistence(path)
    journal = store._journal
    journal._max_backlog = 10 ** 9
    stop = threading.Event()
    appended = [0]

    def interrupted_writer():
        while not stop.is_set():
            try:
                try:
                    journal.append((_journal.DELETE, "x"))
                except Interrupt:
                    pass
            except Interrupt:
                pass

    def other_writer():
        while not stop.is_set():
            journal.append((_journal.DELETE, "y"))
            appended[0] += 1

    other = threading.Thread(target=other_writer)
    other.start()
    target = None
    try:
        for _ in range(8):  # about 2 s of exceptions; the other writer must keep going throughout
            if target is None or not target.is_alive():
                target = threading.Thread(target=interrupted_writer)
                target.start()
            before, deadline = appended[0], time.monotonic() + 0.25
            while time.monotonic() < deadline:
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(target.ident), ctypes.py_object(Interrupt))
                time.sleep(0.0002)
            assert journal._lock.acquire(timeout=2), "the journal's lock was left held"
            journal._lock.release()
            assert appended[0] > before
    finally:
        stop.set()
        for thread in (target, other):
            if thread is not None:
                thread.join(5)
    store.close()


def _save_and_exit_without_closing(path, count):
    """A multiprocessing child's work: journaled writes, then the child's own exit (os._exit)."""
    store = SQLitePersistence(path)
    for i in range(count):
        store.save(Job("t", id=f"child-{i}"))


@pytest.mark.parametrize("start_method", ["fork", "forkserver", "spawn"])
def test_a_multiprocessing_child_applies_its_journal_when_it_exits(path, start_method):
    """Its exit skips atexit; multiprocessing's own exit hook applies and removes the journal."""
    import multiprocessing

    if start_method not in multiprocessing.get_all_start_methods():
        pytest.skip(f"no {start_method} start method here")
    child = multiprocessing.get_context(start_method).Process(target=_save_and_exit_without_closing,
                                                              args=(path, 50))
    child.start()
    child.join(60)
    assert child.exitcode == 0
    assert journal_files(path) == []  # nothing left for the next open to replay
    assert table(path) == {f"child-{i}": "ready" for i in range(50)}  # read without a store: no replay
