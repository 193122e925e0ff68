"""Durability through the Queue: kill -9 recovery, store faults, restart at scale."""
import logging
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import pytest

import tinymq
from tinymq import Config, Job, PersistenceError
from tinymq.persistence import SQLitePersistence

from _helpers import WAIT

CHILD = os.path.join(os.path.dirname(__file__), "_crash_child.py")


def _lines(path):
    try:
        with open(path) as f:
            return f.read().split()
    except FileNotFoundError:
        return []


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_jobs_survive_sigkill_at_random_moments(tmp_path):
    """Kills land while enqueueing, while working, while recovering and while closing.

    Each restart takes over the killed owner's file (its lock died with it) and
    must find every job whose enqueue returned.
    """
    total, workers, kills = 3000, 4, 16
    db, acked, ran, stage = (str(tmp_path / name) for name in ("jobs.db", "acked", "ran", "stage"))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [
        os.path.dirname(os.path.dirname(tinymq.__file__)), os.environ.get("PYTHONPATH")])))
    rng = random.Random(4)
    deadline = time.monotonic() + 90
    killed = 0
    landed = {"recovering": 0, "running": 0, "closing": 0}  # the child's last stage when killed
    for kill in range(kills):
        moment = ("enqueue", "work", "recovery", "close")[kill % 4]
        mode = "close" if moment == "close" else "run"
        command = [sys.executable, CHILD, db, acked, ran, stage, str(total), str(workers), mode]
        stages_before = len(_lines(stage))
        if moment in ("enqueue", "work"):
            watched = acked if moment == "enqueue" else ran
            target = len(_lines(watched)) + rng.randint(1, 250)

            def due():
                return len(_lines(watched)) >= target
        else:
            wanted = "recovering" if moment == "recovery" else "closing"

            def due():
                return wanted in _lines(stage)[stages_before:]
        child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        while child.poll() is None and not due() and time.monotonic() < deadline:
            time.sleep(0.0005)  # polling a file another process writes; not a synchronisation sleep
        if child.poll() is None:
            child.send_signal(signal.SIGKILL)
            killed += 1
            last = (_lines(stage)[stages_before:] or ["recovering"])[-1]
            landed[last] += 1
        _, stderr = child.communicate()
        assert child.returncode in (0, -signal.SIGKILL), stderr.decode()
    command = [sys.executable, CHILD, db, acked, ran, stage, str(total), str(workers), "run"]
    final = subprocess.run(command, env=env, capture_output=True, timeout=90)
    assert final.returncode == 0 and b"done" in final.stdout, final.stderr.decode()

    accepted, completed = _lines(acked), _lines(ran)
    assert len(set(accepted)) == total
    assert set(accepted) <= set(completed), "a job whose enqueue returned never ran"
    duplicates = len(completed) - len(set(completed))
    # Per kill: up to `workers` attempts done but not yet deleted, plus one
    # enqueue that returned but was not yet recorded as acknowledged.
    assert duplicates <= killed * (workers + 2), (duplicates, killed)
    assert killed >= kills // 2, "the child finished before most kills: test did not test"
    assert landed["closing"] >= 1 and landed["recovering"] >= 1, landed
    print(f"crash test: {killed} kills (last stage: {landed}), {len(completed)} completions "
          f"of {total} jobs, {duplicates} duplicates")
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert conn.execute("SELECT count(*) FROM tinymq_jobs").fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM tinymq_owner").fetchone() == (0,)  # closed cleanly
    finally:
        conn.close()


class FlakyStore:
    """Wraps a store; its k-th save (or delete) raises. Tracks what is really persisted."""

    def __init__(self, inner, fail_save_at=None, fail_delete_at=None):
        self.inner = inner
        self.fail_save_at, self.fail_delete_at = fail_save_at, fail_delete_at
        self.saves = self.deletes = 0
        self.persisted = set()
        self.lock = threading.Lock()

    def save(self, job):
        with self.lock:
            self.saves += 1
            if self.saves == self.fail_save_at:
                raise OSError(f"injected failure of save #{self.saves}")
            self.inner.save(job)
            self.persisted.add(job.id)

    def delete(self, job_id):
        with self.lock:
            self.deletes += 1
            if self.deletes == self.fail_delete_at:
                raise OSError(f"injected failure of delete #{self.deletes}")
            self.inner.delete(job_id)
            self.persisted.discard(job_id)

    def load_all(self):
        return self.inner.load_all()


@pytest.mark.parametrize("operation", ["save", "delete"])
@pytest.mark.parametrize("k", range(1, 9))
def test_fault_sweep(tmp_path, caplog, operation, k):
    inner = SQLitePersistence(str(tmp_path / "jobs.db"))
    store = FlakyStore(inner, **{f"fail_{operation}_at": k})
    ran, unpersisted = [], []

    def work(job):
        if job.id not in store.persisted:
            unpersisted.append(job.id)
        ran.append(job.id)

    rejected = []
    with caplog.at_level(logging.ERROR, logger="tinymq"), tinymq.Queue(config=Config(buffer_size=100)) as q:
        q.register_executor("t", work)
        q.set_persistence(store)
        q.start_dispatcher(2)
        for i in range(8):
            try:
                q.enqueue(Job("t", i, id=f"job-{i}"))
            except PersistenceError as exc:
                assert isinstance(exc.__cause__, OSError)
                rejected.append(f"job-{i}")
        assert q.join(timeout=WAIT)
        q.enqueue(Job("t", id="after"))  # the queue keeps working
        assert q.join(timeout=WAIT)

    accepted = {f"job-{i}" for i in range(8)} - set(rejected) | {"after"}
    assert unpersisted == []
    assert sorted(ran) == sorted(accepted)
    left = {job.id for job in inner.load_all()}
    if operation == "save":
        assert rejected == [f"job-{k - 1}"] and left == set()
    else:
        assert rejected == [] and len(left) == 1  # the row whose delete failed
        assert "injected failure of delete" in caplog.text
    inner.close()


def test_restart_at_scale_first_ready_job_starts_quickly(tmp_path):
    path = str(tmp_path / "jobs.db")
    far = time.time() + 10 * 24 * 3600
    with SQLitePersistence(path) as store:
        batch = []
        for i in range(100_000):
            ready = i % 10_000 == 5_000
            batch.append(Job("t", {"i": i}, id=f"job-{i}", run_at=None if ready else far + i))
            if len(batch) == 1000:
                store.save_many(batch)
                batch = []
    started = threading.Event()
    first = []

    def work(job):
        first.append(job.id)
        started.set()

    store = SQLitePersistence(path)
    q = tinymq.Queue(config=Config(buffer_size=100, max_delayed_jobs=10_000))
    q.register_executor("t", work)
    q.start_dispatcher(2)
    t0 = time.monotonic()
    q.set_persistence(store)
    assert started.wait(2.0), "no recovered job started within 2 s"
    elapsed = time.monotonic() - t0
    assert first[0] in {f"job-{i}" for i in range(5_000, 100_000, 10_000)}
    stats = q.get_stats()
    assert stats.delayed_jobs_count == 99_990  # recovered jobs are not evicted by the cap
    q.stop()
    assert len(store.load_all()) >= 99_990  # stop() leaves them stored, and the store usable
    store.close()
    print(f"reload of 100k stored jobs: first job started after {elapsed:.3f}s")
