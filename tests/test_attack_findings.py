"""Reproducers for defects found by the outside attack (branch ``attack``).

Each test states the promised behaviour and failed before its fix; one that is
still ``xfail(strict=True)`` names a defect not fixed yet.
"""
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import tinymq
from tinymq import (DuplicateJob, ExecutorConfig, Job, PersistenceError, Queue, QueueFull,
                    RetryConfig)
from tinymq.persistence import SQLitePersistence

from _helpers import WAIT, Recorder, make_queue, wait_until, worker_threads

posix = pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX: flock, modes, SIGKILL")


def _env():
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [
        os.path.dirname(os.path.dirname(tinymq.__file__)), os.environ.get("PYTHONPATH")])))


# -- 1. hang: a blocked producer holds the claim lock -----------------------------------

def test_blocking_enqueue_with_a_store_does_not_block_other_non_blocking_enqueues(path):
    store = SQLitePersistence(path)
    q = Queue(1)
    q.set_persistence(store)
    q.enqueue(Job("t", id="fills-the-buffer"))
    producer = threading.Thread(
        target=lambda: pytest.raises(Exception, q.enqueue, Job("t", id="waits"), block=True, timeout=WAIT))
    producer.start()
    try:
        assert wait_until(lambda: "waits" in q._claimed), "the blocking producer never got going"
        outcome = Recorder()

        def non_blocking():
            try:
                q.enqueue(Job("t", id="must-not-wait"), block=False)
                outcome.add("enqueued")
            except Exception as exc:  # QueueFull expected; QueueStopped once the test stops the queue
                outcome.add(type(exc).__name__)

        threading.Thread(target=non_blocking, daemon=True).start()
        # block=False must answer at once (QueueFull): it waited for the other producer's timeout
        # instead. With workers doing this in an executor, the queue deadlocks for good.
        assert outcome.wait_for(1, timeout=2.0), "enqueue(block=False) blocked behind another producer"
        assert outcome.snapshot() == ["QueueFull"]
    finally:
        q.stop()
        producer.join(WAIT)
        store.close()


# -- 3. duplicate: changing the id of a queued job ------------------------------------------

def test_the_id_of_a_queued_job_cannot_change_so_its_row_and_id_are_freed(path):
    store = SQLitePersistence(path)
    q = Queue(10)
    q.set_persistence(store)
    ran = Recorder()
    q.register_executor("t", lambda job: ran.add(job.id))
    job = q.enqueue(Job("t", id="report-2026-12"))
    with pytest.raises(ValueError, match="cannot change"):
        job.id = "renamed"  # it would strand the stored row and keep the old id taken
    job.id = "report-2026-12"  # setting the id it has is fine
    q.start_dispatcher(1)
    try:
        assert q.join(WAIT)
        assert ran.snapshot() == ["report-2026-12"]
        assert [j.id for j in store.jobs()] == []
        q.enqueue(Job("t", id="report-2026-12"))  # finished: the id is free again
        assert q.join(WAIT)
    finally:
        q.stop()
        store.close()


# -- 4. silent failure: "crashed" never reaches on_failure -------------------------------------

def test_a_job_that_crashed_its_process_too_often_is_reported_as_crashed(path):
    with SQLitePersistence(path) as store:  # what a store killed mid-attempt leaves behind
        job = Job("t", id="kills-its-process", retry_config=RetryConfig(max_retries=0))
        store.save(job)
        store.mark_running(job)
    store = SQLitePersistence(path, max_crash_recoveries=0)
    q = Queue(10)
    failures = Recorder()
    q.on_failure(lambda job, reason, exc: failures.add((job.id, reason, exc)))
    try:
        q.set_persistence(store)
        assert [d.reason for d in store.dead_jobs()] == ["crashed"]
        assert failures.snapshot() == [("kills-its-process", "crashed", None)]
        assert q.get_stats().jobs_failed == 1
    finally:
        q.stop()
        store.close()


# -- 5. wrong outcome: stop(timeout=...) returns before the cancelled attempt is saved back --------

def test_an_attempt_cancelled_by_stop_is_not_counted_as_a_crash_after_close(path):
    store = SQLitePersistence(path)
    q = Queue(10)
    q.set_persistence(store)
    started, release = threading.Event(), threading.Event()

    def cooperative(job, ctx):
        started.set()
        ctx.wait(WAIT)  # returns once stop() cancels the context
        release.wait(WAIT)  # a moment of cleanup, as a real executor has
        raise RuntimeError("cancelled, unwinding")

    q.register_executor("t", cooperative, ExecutorConfig(timeout=None))
    before = worker_threads()
    q.start_dispatcher(1)
    q.enqueue(Job("t", id="cancelled", retry_config=RetryConfig(max_retries=0)))
    assert started.wait(WAIT)
    q.stop(timeout=0.2)  # gives up waiting, cancels the attempt
    store.close()  # the store goes with the queue: what every app does after stop()
    release.set()
    assert wait_until(lambda: not (worker_threads() - before))  # (its own: another test's may still end)
    with SQLitePersistence(path) as reopened:
        jobs = reopened.load_all()
        assert reopened.dead_jobs() == []  # it never failed: it must not end dead as "crashed"
        assert [(j.id, j.retries) for j in jobs] == [("cancelled", 0)]


# -- 6. planted file loaded: a hot -journal of another user is replayed -----------------------------

EVIL_JOURNAL = textwrap.dedent("""
    import os, sqlite3, sys
    conn = sqlite3.connect(sys.argv[1], isolation_level=None)
    conn.execute("PRAGMA journal_mode=DELETE")
    conn.execute("PRAGMA cache_size=1")
    conn.execute("BEGIN")
    conn.execute("DELETE FROM tinymq_jobs")
    for i in range(50):
        conn.execute("INSERT INTO tinymq_jobs (id, state) VALUES (?, 'x')", (str(i) * 200,))
    print("journal written", flush=True)
    os.kill(os.getpid(), 9)  # dies mid-transaction: the -journal is hot
""")


@posix
@pytest.mark.skipif(not hasattr(os, "getuid") or os.getuid() != 0, reason="needs root to chown")
def test_a_hot_journal_planted_by_another_user_is_never_loaded(tmp_path):
    victim = str(tmp_path / "jobs.db")
    with SQLitePersistence(victim) as store:
        store.save(Job("email", "hello", id="legit"))
    # Another local user builds a store of their own with a job of their choosing ...
    (tmp_path / "evil").mkdir()
    evil = str(tmp_path / "evil" / "evil.db")
    with SQLitePersistence(evil) as store:
        store.save(Job("email", "attacker's payload", id="planted"))
    # ... leaves a hot rollback journal of it, and plants that beside the victim's database.
    done = subprocess.run([sys.executable, "-c", EVIL_JOURNAL, evil], capture_output=True, text=True)
    assert done.returncode == -signal.SIGKILL and "journal written" in done.stdout, done.stderr
    with open(evil + "-journal", "rb") as src, open(victim + "-journal", "wb") as dst:
        dst.write(src.read())
    os.chown(victim + "-journal", 12345, 12345)
    try:
        with SQLitePersistence(victim) as store:
            loaded = [job.id for job in store.load_all()]
    except PersistenceError:
        loaded = []  # refusing the planted file is fine too
    assert "planted" not in loaded


# -- 7. two owners: `rm jobs.db-*` under a live owner --------------------------------------------

OWNER = textwrap.dedent("""
    import sys
    from tinymq import Job, SQLitePersistence
    store = SQLitePersistence(sys.argv[1])
    for i in range(20):
        store.save(Job("t", i, id=f"acked-{i}"))
    print("ready", flush=True)
    for line in sys.stdin:
        store.save(Job("t", id=line.strip()))
        print("saved", flush=True)
""")


class _Owner:
    def __init__(self, path):
        self.process = subprocess.Popen([sys.executable, "-c", OWNER, path], env=_env(), text=True,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE)
        line = self.process.stdout.readline()
        assert line == "ready\n", (line, self.process.stderr.read())

    def save(self, job_id):
        self.process.stdin.write(job_id + "\n")
        self.process.stdin.flush()
        return self.process.stdout.readline() == "saved\n"

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)
        for stream in (self.process.stdin, self.process.stdout, self.process.stderr):
            stream.close()


def _rm_side_files(path):
    for suffix in ("-tinymq.lock", "-wal", "-shm"):  # `rm jobs.db-*`, a "cleanup" under a live owner
        try:
            os.unlink(path + suffix)
        except FileNotFoundError:
            pass


@posix
def test_removing_the_side_files_of_a_live_owner_lets_no_second_owner_in(path):
    with _Owner(path):
        _rm_side_files(path)
        with pytest.raises(PersistenceError, match="owned by a live store"):
            SQLitePersistence(path).close()


@posix
def test_removing_the_wal_of_a_live_owner_loses_no_acknowledged_job(path):
    with _Owner(path) as owner:
        os.unlink(path + "-wal")
        time.sleep(0.2)  # longer than the store's interval between looks at its -wal
        acked = [f"after-{i}" for i in range(3) if owner.save(f"after-{i}")]
    # The owner is dead (SIGKILL). Every save that returned must be found by the next store.
    with SQLitePersistence(path) as store:
        stored = {job.id for job in store.load_all()}
    assert {f"acked-{i}" for i in range(20)} | set(acked) <= stored


# -- 8. wrong behaviour: a delayed job runs at once when its timestamp is later than run_at ---------

def test_a_future_run_at_is_honoured_whatever_the_job_timestamp_says():
    with make_queue(buffer_size=10) as q:
        ran = threading.Event()
        q.register_executor("t", lambda job: ran.set())
        q.start_dispatcher(1)
        job = Job("t", run_at=time.time() + 3600)
        job.timestamp = time.time() + 7200  # e.g. copied from a host whose clock runs ahead
        q.enqueue(job)
        assert q.get_stats().delayed_jobs_count == 1
        assert not ran.wait(0.5), "a job due in an hour ran at once"


# -- 9. wrong error: bad values accepted or reported without their name ---------------------------

def test_enqueue_rejects_a_bad_timeout_even_when_the_buffer_has_room():
    with make_queue(buffer_size=10) as q:
        with pytest.raises(ValueError, match="timeout"):
            q.enqueue(Job("t"), timeout=float("nan"))
        with pytest.raises(ValueError, match="timeout"):
            q.enqueue(Job("t"), block=True, timeout=-1)


def test_an_int_run_at_too_large_for_a_float_is_a_value_error_naming_run_at():
    with pytest.raises(ValueError, match="run_at"):
        Job("t", run_at=10 ** 400)
