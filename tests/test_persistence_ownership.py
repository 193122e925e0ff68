"""One live owner per file, takeover, claim(), read-only inspection, file safety and fork()."""
import gc
import os
import pathlib
import re
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import tinymq
from tinymq import PersistenceError
from tinymq.job import Job
from tinymq.persistence import SQLitePersistence

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX: flock, modes, fork")

OWNER = textwrap.dedent("""
    import sys
    from tinymq import Job, SQLitePersistence
    store = SQLitePersistence(sys.argv[1])
    for i in range(int(sys.argv[2])):
        store.save(Job("t", i, id=f"owned-{i}"))
    store.mark_running(Job("t", id="owned-0"))
    print("ready", flush=True)
    for line in sys.stdin:  # "save N": N more jobs; EOF: close and exit
        count = int(line.split()[1])
        store.save_many([Job("t", id=f"more-{line.split()[2]}-{i}") for i in range(count)])
        print("saved", flush=True)
    store.close()
""")


def env():
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [
        os.path.dirname(os.path.dirname(tinymq.__file__)), os.environ.get("PYTHONPATH")])))


class Owner:
    """Another process that owns ``path`` until it is told to exit (or killed)."""

    def __init__(self, path, jobs=3):
        self.process = subprocess.Popen([sys.executable, "-c", OWNER, path, str(jobs)], env=env(),
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True)
        line = self.process.stdout.readline()
        assert line == "ready\n", (line, self.process.stderr.read())
        self.pid = self.process.pid
        self.batches = 0

    def save(self, count):
        self.batches += 1
        self.process.stdin.write(f"save {count} {self.batches}\n")
        self.process.stdin.flush()
        assert self.process.stdout.readline() == "saved\n"

    def exit(self):
        self.process.stdin.close()
        assert self.process.wait(30) == 0, self.process.stderr.read()

    def kill(self):
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        if self.process.poll() is None:
            self.kill()
        for stream in (self.process.stdin, self.process.stdout, self.process.stderr):
            if not stream.closed:
                stream.close()


def snapshot(directory):
    """Every file's name, bytes and mtime: what "changes nothing" compares."""
    result = {}
    for name in sorted(os.listdir(directory)):
        full = os.path.join(directory, name)
        with open(full, "rb") as f:
            result[name] = (f.read(), os.stat(full).st_mtime_ns, stat.S_IMODE(os.stat(full).st_mode))
    return result


# -- one owner ----------------------------------------------------------------------

def test_a_second_store_in_this_process_is_refused_naming_our_pid(path):
    with SQLitePersistence(path) as first:
        first.save(Job("t", id="kept"))
        with pytest.raises(PersistenceError, match=f"pid {os.getpid()}") as info:
            SQLitePersistence(path)
        assert "owned by a live store" in str(info.value)
        first.save(Job("t", id="still-works"))  # the refusal touched nothing of the owner's
        assert sorted(j.id for j in first.load_all()) == ["kept", "still-works"]
    with SQLitePersistence(path) as again:  # closed: free to take
        assert len(again.load_all()) == 2


def test_a_store_dropped_without_close_gives_the_file_up(path):
    store = SQLitePersistence(path)
    store.save(Job("t", id="kept"))
    del store
    gc.collect()
    with SQLitePersistence(path) as again:
        assert [j.id for j in again.load_all()] == ["kept"]


def test_a_store_in_another_process_is_refused_naming_its_pid(path):
    with Owner(path) as owner:
        with pytest.raises(PersistenceError, match=f"pid {owner.pid}\\b"):
            SQLitePersistence(path)
        owner.exit()
    with SQLitePersistence(path) as store:  # exited and closed: taken over
        assert len(store.load_all()) == 3


def test_the_file_of_an_owner_killed_with_sigkill_is_taken_over_with_its_crash_counted(path):
    with Owner(path) as owner:
        owner.kill()
    with SQLitePersistence(path) as store:
        jobs = {job.id: job for job in store.load_all()}
        assert sorted(jobs) == ["owned-0", "owned-1", "owned-2"]
        assert jobs["owned-0"].retries == 0 and "died" in jobs["owned-0"].last_error  # (a crash: no failure)
        assert jobs["owned-1"].retries == 0
        store.save(Job("t", id="mine"))


def test_deleting_the_lock_file_of_a_live_owner_in_another_process_lets_no_one_in(path):
    with Owner(path) as owner:
        os.unlink(path + "-tinymq.lock")
        with pytest.raises(PersistenceError, match=f"pid {owner.pid}\\b.*lock file was removed"):
            SQLitePersistence(path)
        owner.save(5)  # the owner kept its file
        owner.exit()
    with SQLitePersistence(path) as store:
        assert len(store.load_all()) == 8


def test_deleting_the_lock_file_of_a_live_owner_in_this_process_lets_no_one_in(path):
    with SQLitePersistence(path) as owner:
        os.unlink(path + "-tinymq.lock")
        with pytest.raises(PersistenceError, match=f"pid {os.getpid()}"):
            SQLitePersistence(path)
        owner.save(Job("t"))


def test_an_owner_row_of_a_dead_process_with_another_lock_file_is_taken_over(path):
    with Owner(path) as owner:
        os.unlink(path + "-tinymq.lock")  # the new opener will lock a new file ...
        owner.kill()  # ... and the recorded owner is dead
    with SQLitePersistence(path) as store:
        assert len(store.load_all()) == 3


# -- claim ---------------------------------------------------------------------------

def test_claim_takes_the_first_free_slot_and_skips_owned_ones(tmp_path):
    pattern = str(tmp_path / "jobs-{}.db")
    with Owner(pattern.format(0)) as owner:
        with SQLitePersistence.claim(pattern, slots=3) as second, SQLitePersistence.claim(pattern, slots=3) as third:
            assert (second.path, third.path) == (pattern.format(1), pattern.format(2))
            with pytest.raises(PersistenceError, match=f"every one of the 3 slots.*{owner.pid}"):
                SQLitePersistence.claim(pattern, slots=3)
        owner.kill()
        with SQLitePersistence.claim(pattern, slots=3) as restarted:  # the dead one's file and jobs
            assert restarted.path == pattern.format(0)
            assert len(restarted.load_all()) == 3


def test_claim_checks_its_arguments(tmp_path):
    with pytest.raises(ValueError, match="'jobs.db'"):
        SQLitePersistence.claim("jobs.db")
    with pytest.raises(ValueError, match="slots"):
        SQLitePersistence.claim(str(tmp_path / "j-{}.db"), slots=0)
    with pytest.raises(ValueError, match="read_only"):
        SQLitePersistence.claim(str(tmp_path / "j-{}.db"), read_only=True)


@pytest.mark.parametrize("pattern", ["j-{}-{}.db", "j-{}{name}.db", "j-{{}}.db", "j-{}{:x}.db",
                                     "j-{.db"])
def test_claim_refuses_a_pattern_that_does_not_make_one_file_per_slot(tmp_path, pattern):
    """A pattern with a second field raised IndexError or KeyError from the loop, and an escaped
    "{{}}" passed the check and named one file for every slot: each is a ValueError naming it,
    raised before any file is created."""
    with pytest.raises(ValueError, match=re.escape(repr(os.path.join(str(tmp_path), pattern)))):
        SQLitePersistence.claim(os.path.join(str(tmp_path), pattern), slots=2)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("kind", [pathlib.Path, os.fsencode])
def test_claim_takes_a_path_object_or_bytes_pattern_as_the_constructor_takes_a_path(tmp_path, kind):
    with SQLitePersistence.claim(kind(str(tmp_path / "jobs-{}.db")), slots=2) as first, \
            SQLitePersistence.claim(kind(str(tmp_path / "jobs-{}.db")), slots=2) as second:
        assert (first.path, second.path) == (str(tmp_path / "jobs-0.db"), str(tmp_path / "jobs-1.db"))


def test_claim_does_not_skip_a_refused_file(tmp_path):
    pattern = str(tmp_path / "jobs-{}.db")
    os.symlink(tmp_path / "elsewhere.db", pattern.format(0))
    with pytest.raises(PersistenceError, match="symlink"):
        SQLitePersistence.claim(pattern, slots=2)


# -- read-only inspection ----------------------------------------------------------------

def test_read_only_inspects_a_file_another_process_owns_and_writes(path):
    with Owner(path) as owner:
        reader = SQLitePersistence(path, read_only=True)
        assert reader.counts() == {"ready": 2, "delayed": 0, "running": 1, "dead": 0, "corrupt": 0}
        for batch in range(1, 4):
            owner.save(100)
            assert len(reader.jobs()) == 3 + 100 * batch
        assert {j.id for j in reader.jobs()} >= {"owned-0", "more-3-99"}
        assert reader.dead_jobs() == [] and reader.quarantined() == []
        with pytest.raises(PersistenceError, match=f"pid {owner.pid}"):
            SQLitePersistence(path)  # inspecting took no ownership away
        owner.exit()
    assert len(reader.jobs()) == 303  # and after the owner left


def test_read_only_in_the_owner_s_process(path):
    with SQLitePersistence(path) as owner:
        owner.save(Job("t", id="a"))
        reader = SQLitePersistence(path, read_only=True)
        assert [j.id for j in reader.jobs()] == ["a"]
        owner.delete("a")
        assert reader.jobs() == []


@pytest.mark.parametrize("state", ["closed", "crashed", "owned"])
def test_read_only_changes_nothing_and_creates_nothing(tmp_path, state):
    path = str(tmp_path / "jobs.db")
    with Owner(path) as owner:
        if state == "closed":
            owner.exit()
        elif state == "crashed":
            owner.kill()
        before = snapshot(tmp_path)
        reader = SQLitePersistence(path, read_only=True)
        assert len(reader.jobs()) == 3
        assert reader.counts()["running"] == 1  # the crash is not counted by a reader
        reader.dead_jobs()
        reader.quarantined()
        reader.close()
        assert snapshot(tmp_path) == before


def test_read_only_refuses_every_write(path):
    with SQLitePersistence(path) as owner:
        owner.save(Job("t", id="a"))
    reader = SQLitePersistence(path, read_only=True)
    for call in (lambda: reader.save(Job("t")), lambda: reader.save_many([Job("t")]),
                 lambda: reader.delete("a"), lambda: reader.mark_running(Job("t", id="a")),
                 lambda: reader.mark_dead(Job("t", id="a"), "evicted"), reader.load_all,
                 reader.requeue_dead, reader.purge_dead, reader.purge_quarantined):
        with pytest.raises(PersistenceError, match="read-only"):
            call()
    assert [j.id for j in reader.jobs()] == ["a"]


def test_read_only_of_a_missing_file_creates_nothing(tmp_path):
    with pytest.raises(PersistenceError, match="does not exist"):
        SQLitePersistence(str(tmp_path / "missing.db"), read_only=True)
    assert os.listdir(tmp_path) == []


def test_read_only_refuses_a_wal_without_its_shm_instead_of_creating_one(path, tmp_path):
    with Owner(path) as owner:
        owner.kill()
    os.unlink(path + "-shm")
    before = snapshot(tmp_path)
    with pytest.raises(PersistenceError, match="no -shm"):
        SQLitePersistence(path, read_only=True)
    assert snapshot(tmp_path) == before


def leave_a_header_only_wal(path):
    """The files of an owner killed as it began a new -wal: the -wal holds its 32-byte header, no frame.

    The database (closed cleanly before) holds every commit. The header and -shm are SQLite's own,
    from a connection that wrote one frame and checkpointed it."""
    connection = sqlite3.connect(path, isolation_level=None)
    connection.execute("PRAGMA user_version = 1")  # a header, then a frame
    connection.execute("PRAGMA wal_checkpoint(FULL)")
    with open(path + "-wal", "rb") as wal, open(path + "-shm", "rb") as shm:
        header, index = wal.read(32), shm.read()
    connection.close()  # removes both
    for suffix, content in (("-wal", header), ("-shm", index)):
        with open(path + suffix, "wb") as f:
            f.write(content)
        os.chmod(path + suffix, 0o600)


# `python -m tinymq ARGS`, which writes on its last line of stderr how long main() took.
TIMED_STATUS = """\
import sys, time
from tinymq.__main__ import main
began = time.monotonic()
code = main(sys.argv[1:])
print(time.monotonic() - began, file=sys.stderr)
sys.exit(code)
"""


@pytest.mark.parametrize("shm", ["kept", "removed"])
def test_read_only_reads_at_once_a_header_only_wal_a_killed_owner_left(path, tmp_path, shm):
    # SQLite alone fails each read-only look at such a file after about 10 s ("locking protocol").
    with SQLitePersistence(path) as store:
        store.save_many([Job("t", i, id=f"j{i}") for i in range(30)])
    leave_a_header_only_wal(path)
    if shm == "removed":  # no commit to index: nothing to refuse either
        os.unlink(path + "-shm")
    before = snapshot(tmp_path)
    began = time.monotonic()
    with SQLitePersistence(path, read_only=True) as view:
        assert view.counts() == {"ready": 30, "delayed": 0, "running": 0, "dead": 0, "corrupt": 0}
        assert [j.id for j in view.jobs()] == [f"j{i}" for i in range(30)]
    assert time.monotonic() - began < 5.0
    # And from a process of its own, its look timed there: the start of an interpreter is no
    # part of it (on a loaded machine, that alone can outlast the bound).
    status = subprocess.run([sys.executable, "-c", TIMED_STATUS, "status", "--db", path, "--json"], env=env(),
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    assert status.returncode == 0, status.stderr
    assert '"ready": 30' in status.stdout
    assert float(status.stderr.split()[-1]) < 5.0
    assert snapshot(tmp_path) == before
    with SQLitePersistence(path) as owner:  # and an owner takes it over as it is
        assert len(owner.load_all()) == 30


@pytest.mark.parametrize("shm", ["garbage", "removed"])
def test_read_only_reads_at_once_beside_a_garbage_wal_sqlite_ignores(path, tmp_path, shm):
    # A -wal whose header SQLite's recovery refuses holds no commit (an owner opening the file
    # ignores it). Read-only, SQLite alone failed each look after about 10 s ("locking protocol").
    with SQLitePersistence(path) as store:
        store.save_many([Job("t", i, id=f"j{i}") for i in range(30)])
    planted = {"-wal": os.urandom(5000), "-shm": os.urandom(32768) if shm == "garbage" else None}
    for suffix, content in planted.items():
        if content is not None:
            with open(path + suffix, "wb") as f:
                f.write(content)
            os.chmod(path + suffix, 0o600)
    before = snapshot(tmp_path)
    began = time.monotonic()
    with SQLitePersistence(path, read_only=True) as view:
        assert view.counts() == {"ready": 30, "delayed": 0, "running": 0, "dead": 0, "corrupt": 0}
    assert time.monotonic() - began < 5.0
    assert snapshot(tmp_path) == before
    with SQLitePersistence(path) as owner:  # which is what an owner finds too
        assert len(owner.load_all()) == 30


def test_a_wal_header_is_read_as_sqlite_reads_it(path):
    from tinymq.persistence.sqlite import _valid_wal_header
    connection = sqlite3.connect(path, isolation_level=None)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("CREATE TABLE t (x)")
    with open(path + "-wal", "rb") as wal:
        header = wal.read(32)
    connection.close()
    assert _valid_wal_header(header)
    for at in range(32):  # any byte changed: a wrong magic, page size or checksum (it covers the rest)
        changed = header[:at] + bytes([header[at] ^ 0x10]) + header[at + 1:]
        assert not _valid_wal_header(changed), at


def test_read_only_reads_again_when_an_owner_writes_during_a_read_of_the_database_alone(
        path, monkeypatch):
    with SQLitePersistence(path) as store:
        store.save_many([Job("t", i, id=f"j{i}") for i in range(30)])
    leave_a_header_only_wal(path)
    view = SQLitePersistence(path, read_only=True)
    modes, owners = [], []
    connect = SQLitePersistence._connect

    def connect_then_let_an_owner_write(store, mode):
        connection = connect(store, mode)
        if store is view:
            modes.append(mode)
            if not owners:  # the read of the database alone has begun: an owner comes and writes
                owners.append(SQLitePersistence(path))
                owners[0].save(Job("t", id="written-meanwhile"))  # into its -wal, not the database
        return connection

    monkeypatch.setattr(SQLitePersistence, "_connect", connect_then_let_an_owner_write)
    try:
        assert sum(view.counts().values()) == 31
        assert modes == ["mode=ro&immutable=1", "mode=ro&readonly_shm=1"]
    finally:
        owners[0].close()
    assert sum(view.counts().values()) == 31


@pytest.mark.parametrize("owner", ["live", "killed"])
def test_read_only_reads_a_wal_with_frames_through_its_index(path, monkeypatch, owner):
    modes = []
    connect = SQLitePersistence._connect

    def noting(store, mode):
        if store.read_only:
            modes.append(mode)
        return connect(store, mode)

    monkeypatch.setattr(SQLitePersistence, "_connect", noting)
    with Owner(path) as other:  # 3 jobs, each only in its -wal
        if owner == "killed":
            other.kill()
        assert os.path.getsize(path + "-wal") > 32
        with SQLitePersistence(path, read_only=True) as view:
            assert len(view.jobs()) == 3
    assert modes and set(modes) == {"mode=ro&readonly_shm=1"}


# -- files: modes, symlinks, other users ------------------------------------------------------

def test_looser_existing_files_are_tightened_to_0600(path):
    with SQLitePersistence(path) as store:
        store.save(Job("t"))
    for suffix in ("", "-tinymq.lock"):
        os.chmod(path + suffix, 0o666)
    with SQLitePersistence(path) as store:
        store.save(Job("t"))
        for suffix in ("", "-wal", "-shm", "-tinymq.lock"):
            assert stat.S_IMODE(os.stat(path + suffix).st_mode) == 0o600, suffix


def test_a_refused_opener_changes_nothing_of_the_owner_s_files(path):
    with Owner(path) as owner:
        os.chmod(path, 0o644)
        with pytest.raises(PersistenceError, match=f"pid {owner.pid}"):
            SQLitePersistence(path)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o644  # not ours to tighten
        owner.exit()


def test_a_crash_s_looser_wal_is_tightened_before_use(path):
    with Owner(path) as owner:
        owner.kill()
    os.chmod(path + "-wal", 0o644)
    with SQLitePersistence(path) as store:
        assert stat.S_IMODE(os.stat(path + "-wal").st_mode) == 0o600
        assert len(store.load_all()) == 3


@pytest.mark.parametrize("suffix", ["", "-wal", "-shm", "-tinymq.lock"])
def test_a_symlink_in_place_of_any_file_is_refused(path, tmp_path, suffix):
    with SQLitePersistence(path) as store:
        store.save(Job("t"))
    target = tmp_path / "target"
    if suffix in ("-wal", "-shm") or not os.path.exists(path + suffix):
        target.write_bytes(b"")
    else:
        os.rename(path + suffix, target)
    if os.path.exists(path + suffix):
        os.unlink(path + suffix)
    os.symlink(target, path + suffix)
    with pytest.raises(PersistenceError, match="symlink"):
        SQLitePersistence(path)
    if suffix != "-tinymq.lock":
        with pytest.raises(PersistenceError, match="symlink"):
            SQLitePersistence(path, read_only=True)


@pytest.mark.parametrize("replacement", ["symlink", "fifo"])
def test_a_side_file_replaced_after_its_check_is_not_read(tmp_path, replacement):
    # The -wal a read-only store looks into (its header), swapped between the check and the open.
    from tinymq.persistence import _ownership

    wal, target = str(tmp_path / "jobs.db-wal"), tmp_path / "target"
    with open(wal, "wb") as f:
        f.write(b"h" * 32)
    checked = _ownership.check_file(wal, mode="refuse")
    assert _ownership.head(wal, checked, 33) == b"h" * 32
    os.unlink(wal)
    if replacement == "symlink":
        target.write_bytes(b"secret")
        os.symlink(target, wal)
    else:
        os.mkfifo(wal, 0o600)  # opened blocking, it would wait for a writer forever
    assert _ownership.head(wal, checked, 33) is None


def test_a_symlinked_new_database_is_refused_and_its_target_untouched(tmp_path):
    target = tmp_path / "target.db"
    os.symlink(target, tmp_path / "jobs.db")
    with pytest.raises(PersistenceError, match="symlink"):
        SQLitePersistence(str(tmp_path / "jobs.db"))
    assert not target.exists()


def test_a_planted_wal_beside_a_missing_database_is_refused(path):
    with open(path + "-wal", "wb") as f:
        f.write(b"planted")
    with pytest.raises(PersistenceError, match="does not exist but its -wal, -shm or -journal"):
        SQLitePersistence(path)
    assert not os.path.exists(path)


@pytest.mark.skipif(os.getuid() != 0, reason="giving a file to another uid needs root")
@pytest.mark.parametrize("suffix", ["", "-wal", "-shm", "-tinymq.lock"])
def test_a_file_of_another_uid_is_refused(path, suffix):
    with Owner(path) as owner:
        owner.kill()  # leaves -wal and -shm too
    os.chown(path + suffix, 4242, -1)
    with pytest.raises(PersistenceError, match="belongs to uid 4242, not to this process's uid 0"):
        SQLitePersistence(path)
    if suffix != "-tinymq.lock":
        with pytest.raises(PersistenceError, match="belongs to uid 4242"):
            SQLitePersistence(path, read_only=True)


def test_uid_checks_compare_with_this_process_s_uid(path, monkeypatch):
    with SQLitePersistence(path) as store:
        store.save(Job("t"))
    other = os.getuid() + 1000
    monkeypatch.setattr(os, "getuid", lambda: other)  # every file now belongs to "someone else"
    with pytest.raises(PersistenceError, match=f"this process's uid {other}"):
        SQLitePersistence(path)


def test_read_only_refuses_a_file_others_may_write_and_changes_not_its_mode(path):
    with SQLitePersistence(path) as store:
        store.save(Job("t"))
    os.chmod(path, 0o666)
    with pytest.raises(PersistenceError, match="others may write it"):
        SQLitePersistence(path, read_only=True)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666


# -- fork() -----------------------------------------------------------------------------------

def _in_forked_child(body, timeout=30):
    """Run ``body()`` in a forked child; returns its one-byte report. Never hangs: kills at the deadline."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report and leave without running any cleanup
        code = 99
        try:
            code = body()
        finally:
            os.write(write, bytes([code]))
            os._exit(0)
    os.close(write)
    deadline = time.monotonic() + timeout
    while True:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(read)
            pytest.fail("the forked child hung")
        time.sleep(0.005)  # polling waitpid for a deadline; not a synchronisation sleep
    report = os.read(read, 1)
    os.close(read)
    return report


def test_a_forked_child_gets_a_clear_error_and_the_parent_keeps_its_store(path):
    store = SQLitePersistence(path)
    store.save(Job("t", id="parent"))

    def child():
        try:
            store.save(Job("t", id="child"))
            return 1
        except PersistenceError as exc:
            message = str(exc)
            if f"opened in pid {os.getppid()}, used in forked child pid {os.getpid()}" not in message:
                return 2
        try:
            store.load_all()
            return 3
        except PersistenceError:
            pass
        store.close()  # only marks it closed here
        gc.collect()
        with SQLitePersistence(path, read_only=True) as reader:  # a new store works in the child
            return 0 if [j.id for j in reader.jobs()] == ["parent"] else 4

    assert _in_forked_child(child) == b"\x00"
    store.save(Job("t", id="after"))  # the child closed nothing of ours
    assert sorted(j.id for j in store.load_all()) == ["after", "parent"]
    with pytest.raises(PersistenceError, match=f"pid {os.getpid()}"):
        SQLitePersistence(path)  # still the owner
    store.close()


def test_a_fork_after_close_leaves_the_child_s_descriptors_alone(path, tmp_path):
    store = SQLitePersistence(path)
    lock_fd = store._held[1].fileno()
    store.close()
    with open(tmp_path / "other", "w") as other:  # likely reuses the lock's descriptor number
        fd = other.fileno()

        def child():
            try:
                os.fstat(fd)
            except OSError:
                return 1
            return 0

        assert _in_forked_child(child) == b"\x00", (lock_fd, fd)


def test_a_fork_while_another_thread_commits_does_not_deadlock_the_child(path):
    with SQLitePersistence(path) as store:
        holding, release = threading.Event(), threading.Event()

        def committer():
            with store._commit_lock:  # as a thread in the middle of a commit at fork time
                holding.set()
                release.wait(30)

        thread = threading.Thread(target=committer)
        thread.start()
        holding.wait(30)
        try:
            def child():
                try:
                    store.save(Job("t"))
                except PersistenceError:
                    pass
                else:
                    return 1
                with SQLitePersistence(path + ".child") as own:  # the child's own store works
                    own.save(Job("t"))
                return 0

            assert _in_forked_child(child) == b"\x00"
        finally:
            release.set()
            thread.join()
        store.save(Job("t", id="parent"))


def test_a_child_that_outlives_its_parent_does_not_keep_the_file(tmp_path):
    """The child closes its copy of the lock at fork: the parent's death frees the file."""
    path = str(tmp_path / "jobs.db")
    script = textwrap.dedent("""
        import os, sys
        from tinymq import Job, SQLitePersistence
        store = SQLitePersistence(sys.argv[1])
        store.save(Job("t", id="x"))
        if os.fork() == 0:
            print("forked", flush=True)  # after the at-fork hooks ran
            sys.stdin.read()  # lives until the test closes stdin
            os._exit(0)
        os._exit(0)  # the parent dies without close(); the child lives on
    """)
    process = subprocess.Popen([sys.executable, "-c", script, path], env=env(), stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline() == "forked\n"
        assert process.wait(30) == 0
        with SQLitePersistence(path) as store:  # the live child does not hold the parent's lock
            assert [j.id for j in store.load_all()] == ["x"]
    finally:
        process.stdin.close()  # the child exits
        process.stdout.read()  # EOF once the child is gone
        process.stdout.close()
        process.stderr.close()


# --- a store handed from a stopped queue to a new one -------------------------------------------

def _running_queue(path, executor):
    store = SQLitePersistence(path)
    q = tinymq.Queue(10)
    q.set_persistence(store)
    q.register_executor("report", executor, tinymq.ExecutorConfig(timeout=None))
    q.start_dispatcher(1)
    return q, store


def _take_once_handed_on(queue, store):
    """``queue.set_persistence(store)``, tried again until the queue that had it hands it on."""
    deadline = time.monotonic() + 10.0
    while True:
        try:
            queue.set_persistence(store)
            return
        except RuntimeError:
            assert time.monotonic() < deadline, "the store was never handed on"
            time.sleep(0.01)


@pytest.mark.parametrize("kind", ["thread", "async"])
def test_a_store_stays_the_stopped_queue_s_until_its_given_up_attempt_returned(path, kind):
    """stop(timeout=...) gives up on an attempt that runs on (its job saved back as ready): another
    queue's set_persistence raises RuntimeError saying why until the attempt has returned (its end
    written), then takes the store, with nothing left to run twice."""
    running, release = threading.Event(), threading.Event()
    runs = []

    if kind == "thread":
        def report(job):  # no context: stop() cannot cancel it
            runs.append(job.id)
            running.set()
            release.wait(10.0)
    else:
        import asyncio

        async def report(job):
            runs.append(job.id)
            running.set()
            while not release.is_set():  # ignores its cancellation
                try:
                    await asyncio.sleep(0.01)
                except asyncio.CancelledError:
                    pass

    q1, store = _running_queue(path, report)
    q2 = tinymq.Queue(10)
    try:
        q1.enqueue(Job("report", id="report-2026-12"))
        assert running.wait(10.0)
        q1.stop(timeout=0.2)
        with pytest.raises(RuntimeError, match=r"1 attempt\(s\) that its stop\(\) gave up on still run"):
            q2.set_persistence(store)
        release.set()
        _take_once_handed_on(q2, store)
        # A thread's late success deletes its row; a coroutine stop() cancelled is no success and its
        # job stays stored (docs/api.md): it runs again, but only now, after the first attempt.
        assert q2.get_stats().jobs_enqueued == (0 if kind == "thread" else 1)
        assert runs == ["report-2026-12"]
    finally:
        release.set()
        q1.stop()
        q2.stop()
        store.close()


def test_a_store_stays_a_garbage_collected_queue_s_while_an_attempt_it_gave_up_on_runs(path):
    running, release = threading.Event(), threading.Event()

    def report(job):
        running.set()
        release.wait(10.0)

    q1, store = _running_queue(path, report)
    q2 = tinymq.Queue(10)
    try:
        q1.enqueue(Job("report", id="report-2026-12"))
        assert running.wait(10.0)
        del q1  # stopped without waiting: its attempt is given up on and runs on
        gc.collect()
        with pytest.raises(RuntimeError, match="still run"):
            q2.set_persistence(store)
        release.set()
        _take_once_handed_on(q2, store)
        assert q2.get_stats().jobs_enqueued == 0  # its late success deleted its row
    finally:
        release.set()
        q2.stop()
        store.close()


def test_a_store_whose_queue_stopped_without_waiting_and_ran_nothing_is_handed_on_at_once(path):
    q1, store = _running_queue(path, lambda job: None)
    q1.enqueue(Job("report", id="done"))
    assert q1.join(10.0)
    q1.stop(wait=False)  # idle workers may not have exited yet: nothing of theirs runs
    q2 = tinymq.Queue(10)
    try:
        q2.set_persistence(store)
    finally:
        q2.stop()
        store.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_a_fork_as_close_gives_the_file_up_leaves_no_lock_in_the_child(path):
    """A process forked (by another thread) while close() gives the file up must not keep the lock
    file locked: its inherited copy of the lock's descriptor would hold the flock for as long as it
    lives, and no store could open the file meanwhile. The store stays among those whose copies a
    child closes until it has given the file up (the lock file is a file object: closing a copy
    again is nothing)."""
    store = SQLitePersistence(path)
    real = store._conn
    children = []
    read_end, write_end = os.pipe()
    started_read, started_write = os.pipe()

    class ForksAsItCloses:  # the connection, with a fork() landing inside close()'s last steps
        def __getattr__(self, name):
            return getattr(real, name)

        def close(self):
            pid = os.fork()
            if pid == 0:  # the child: waits until the parent has looked, touching nothing else
                os.close(write_end)
                os.write(started_write, b"s")  # (its at-fork handlers have run: they come first)
                os.read(read_end, 1)
                os._exit(0)
            children.append(pid)
            real.close()

    store._conn = ForksAsItCloses()
    try:
        store.close()
        assert children
        # Once the child runs (the copies it closes as it starts: os.register_at_fork), not before: a
        # CI run opened the file while the child had not run yet, its copy of the lock still open.
        assert os.read(started_read, 1) == b"s"
        with SQLitePersistence(path):  # at once, while the child lives
            pass
    finally:
        for end in (read_end, write_end, started_read, started_write):
            os.close(end)
        for pid in children:
            os.waitpid(pid, 0)
