"""Reproducers for defects found by outside attack EE on durable persistence (branch ``attackEE``).

Each test states the promised behaviour and failed before its fix; one that is
still ``xfail(strict=True)`` names a defect not fixed yet.
"""
import os
import subprocess
import sys
import textwrap
import threading

import pytest

from tinymq import ExecutorConfig, Job, Queue, RetryConfig
from tinymq.persistence import SQLitePersistence

from _helpers import WAIT


# -- 1. a plain fn(job) attempt that stop() gives up on stays "running": a crash at the next start --

def test_an_attempt_stop_gives_up_on_is_saved_back_as_ready_whatever_its_executor_takes(path):
    """docs/api.md, stop(): once it stops waiting, stop() cancels the attempts still running; such an
    attempt is no failure, "and with a store its job is saved back as ready for the next start".
    A ``fn(job, ctx)`` attempt is; a plain ``fn(job)`` one was left "running" in the store after
    stop() returned, so a restart after a clean ``stop(timeout=...)`` and ``close()`` counted a crash
    that never happened (with max_retries=0: dead as "crashed", reported to on_failure)."""
    store = SQLitePersistence(path)
    q = Queue(10)
    started, release = threading.Event(), threading.Event()

    def plain(job):  # no ctx: nothing stop() can cancel, it runs on past stop()
        started.set()
        release.wait(WAIT)

    q.register_executor("plain", plain, ExecutorConfig(timeout=None))
    q.set_persistence(store)
    q.start_dispatcher(1)
    q.enqueue(Job("plain", id="long", retry_config=RetryConfig(max_retries=0)))
    try:
        assert started.wait(WAIT)
        q.stop(timeout=0.05)  # gives up waiting: the attempt runs on, stop() returns
        assert store.counts()["running"] == 0, "stop() returned with the attempt's row still 'running'"
        store.close()
        with SQLitePersistence(path) as again:  # the next start (the process exited after stop)
            assert [(j.id, j.retries) for j in again.load_all()] == [("long", 0)]
            assert again.take_crashed() == [] and again.dead_jobs() == []
    finally:
        release.set()
        store.close()


_DROPPED_WITHOUT_STOP = textwrap.dedent("""
    import gc, sys, threading
    from tinymq import ExecutorConfig, Job, Queue, RetryConfig
    from tinymq.persistence import SQLitePersistence
    store = SQLitePersistence(sys.argv[1])
    q = Queue(10)
    started = threading.Event()

    def plain(job):
        started.set()
        threading.Event().wait()  # runs until the interpreter ends

    q.register_executor("plain", plain, ExecutorConfig(timeout=None))
    q.set_persistence(store)
    q.start_dispatcher(1)
    q.enqueue(Job("plain", id="long", retry_config=RetryConfig(max_retries=0)))
    assert started.wait(30)
    del q
    gc.collect()  # the queue stops without waiting (docs/api.md), then the process exits
    print("exiting", flush=True)
""")


def test_a_queue_dropped_without_stop_leaves_no_crash_to_count(path, tmp_path):
    """The same through garbage collection: a queue dropped without stop() "stops its threads
    without waiting", and the process then exits normally. The running plain attempt's row
    stayed "running": the next start counted a crash (max_retries=0: dead as "crashed")."""
    script = tmp_path / "dropped.py"
    script.write_text(_DROPPED_WITHOUT_STOP)
    done = subprocess.run([sys.executable, str(script), path], capture_output=True, text=True,
                          timeout=60, env=dict(os.environ))
    assert done.returncode == 0 and "exiting" in done.stdout, done.stderr
    with SQLitePersistence(path) as again:
        assert [(j.id, j.retries) for j in again.load_all()] == [("long", 0)]
        assert again.take_crashed() == []


# -- 2. stop()'s save-back moves the attempt it gave up on behind the jobs enqueued after it ------

def test_a_job_whose_attempt_stop_gave_back_keeps_its_place_after_a_restart(path):
    """docs/persistence.md: "after a restart the jobs of one priority run in the order they were
    enqueued (a retried job in the order its retry was scheduled)". A job whose attempt stop()
    cancels is no retry (no failure, not counted): it was enqueued first and ran first, so it
    runs first again. Its save-back gave it the newest seq: it ran last."""
    store = SQLitePersistence(path)
    q = Queue(10)
    started = threading.Event()

    def cooperative(job, ctx):
        started.set()
        ctx.wait(WAIT)  # returns when stop() cancels it

    q.register_executor("t", cooperative, ExecutorConfig(timeout=None))
    q.set_persistence(store)
    q.start_dispatcher(1)
    try:
        q.enqueue(Job("t", id="first"))
        assert started.wait(WAIT)
        q.enqueue(Job("t", id="second"))
        q.enqueue(Job("t", id="third"))
        q.stop(wait=False)
    finally:
        store.close()
    with SQLitePersistence(path) as again:
        assert [j.id for j in again.load_all()] == ["first", "second", "third"]


def test_give_back_keeps_a_stored_row_s_place_and_saves_a_new_one_last(path):
    """What the fix relies on: ``give_back`` writes the whole row as ``save`` does (ready, its
    fields as the job has them), with the seq of the row it replaces."""
    with SQLitePersistence(path) as store:
        store.save_many([Job("t", id="a"), Job("t", id="b")])
        store.mark_running(Job("t", id="a"))
        back = Job("t", {"x": 1}, id="a")
        back.retries = 2
        store.give_back(back)
        store.give_back(Job("t", id="new"))
        assert store.counts()["running"] == 0
        assert [(j.id, j.payload, j.retries) for j in store.load_all()] == [
            ("a", {"x": 1}, 2), ("b", None, 0), ("new", None, 0)]



def test_give_back_keeps_the_place_of_a_row_an_older_tinymq_saved(path):
    """A row without a seq (saved by a tinymq before the column) loads first; given back, it stays first."""
    import sqlite3

    with SQLitePersistence(path) as store:
        store.save_many([Job("t", id="old"), Job("t", id="b")])
    conn = sqlite3.connect(path)
    conn.execute("UPDATE tinymq_jobs SET seq = NULL WHERE id = 'old'")
    conn.commit()
    conn.close()
    with SQLitePersistence(path) as store:
        store.mark_running(Job("t", id="old"))
        store.give_back(Job("t", id="old"))
        store.save(Job("t", id="c"))
        assert [j.id for j in store.load_all()] == ["old", "b", "c"]


# -- 3. a refused enqueue deletes the dead job that had its id ------------------------------------

@pytest.mark.parametrize("many", [False, True], ids=["enqueue", "enqueue_many"])
def test_a_refused_enqueue_leaves_the_dead_job_of_its_id_in_the_store(path, many):
    """enqueue() raises QueueFull "with nothing enqueued", and enqueue_many "none of the batch was
    enqueued"; the store keeps a dead job "until requeued or purged" (requeue_dead, dead_jobs). A
    new job given a dead job's id, refused for want of room, must leave that dead job as it was.
    The save before the push replaced the dead row, and the refusal's undo deleted it: the dead
    job vanished from dead_jobs() (and requeue_dead could no longer bring it back), though no call
    succeeded."""
    from tinymq import Config, QueueFull

    with SQLitePersistence(path) as store:
        store.mark_dead(Job("t", {"order": 42}, id="report-42"), "retries_exhausted", "boom")
        q = Queue(config=Config(buffer_size=1))
        q.set_persistence(store)
        q.enqueue(Job("t", id="filler"))  # the buffer is full now (no workers)
        try:
            with pytest.raises(QueueFull):
                if many:
                    q.enqueue_many([Job("t", {"order": 43}, id="report-42")])
                else:
                    q.enqueue(Job("t", {"order": 43}, id="report-42"))
            assert [(d.job.id, d.job.payload, d.reason) for d in store.dead_jobs()] == [
                ("report-42", {"order": 42}, "retries_exhausted")]
        finally:
            q.stop()


def test_a_refused_batch_puts_back_its_dead_rows_and_an_accepted_job_replaces_its_dead_row(path):
    """(deadrow) A refused batch mixing a dead job's id, a new id and a delayed job leaves the store as
    it was: the dead row back, the others gone. Accepted, the job of a dead job's id replaces the dead
    row for good: it runs, its row is deleted, and the store remembers nothing of the dead row."""
    import time

    from tinymq import Config, QueueFull

    with SQLitePersistence(path) as store:
        store.mark_dead(Job("t", {"order": 42}, id="report-42"), "retries_exhausted", "boom")
        dead_before = [(d.job.id, d.job.payload, d.reason, d.error) for d in store.dead_jobs()]
        q = Queue(config=Config(buffer_size=2))
        q.set_persistence(store)
        q.enqueue(Job("t", id="filler"))  # room for one more ready job
        ran = []
        try:
            with pytest.raises(QueueFull):
                q.enqueue_many([Job("t", {"order": 43}, id="report-42"), Job("t", id="new"),
                                Job("t", id="later", run_at=time.time() + 3600)])
            assert [(d.job.id, d.job.payload, d.reason, d.error) for d in store.dead_jobs()] == dead_before
            assert [j.id for j in store.jobs()] == ["filler"]
            q.enqueue(Job("t", {"order": 44}, id="report-42"))  # fits
            assert store.dead_jobs() == []
            q.register_executor("t", lambda job: ran.append((job.id, job.payload)))
            q.start_dispatcher(1)
            assert q.join(WAIT)
        finally:
            q.stop()
        assert ran == [("filler", None), ("report-42", {"order": 44})]
        assert store.jobs() == [] and store.dead_jobs() == []
        assert store._replaced == {}
