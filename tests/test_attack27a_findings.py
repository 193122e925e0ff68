"""Defects found by attack27a (session 27: the in-process queue, its store, periodic jobs,
metrics and the command line, as an outsider would use them), each with its test.
"""
import logging
import re
import threading

import pytest

from tinymq import Job, Queue

from _helpers import WAIT, Recorder


# --- 1. start_dispatcher(workers=<a typo>) ------------------------------------------------

# start_dispatcher(10**9) (a typo, or a count computed wrong) started threads until the system
# had none left: minutes of a machine brought to its knees (every other process slowed),
# before NoThreadLeft. The command line has refused more than 10000 threads per process all
# along ("more would exhaust the system's threads, slowly"); start_dispatcher now refuses
# them too, with a ValueError naming the count, and the queue stays as it was. Thread.start fails in this test, so a start that was tried
# (the old behaviour) fails the test at once instead of starting 10,001 threads.
@pytest.mark.parametrize("workers", [10_001, 10**9])
def test_start_dispatcher_refuses_more_workers_than_a_process_should_start(workers, monkeypatch):
    with Queue(10) as q:
        ran = Recorder()
        q.register_executor("t", lambda job: ran.add(job.id))
        with monkeypatch.context() as patched:
            def no_thread(self):
                raise RuntimeError("can't start new thread (the test refuses it)")

            patched.setattr(threading.Thread, "start", no_thread)
            with pytest.raises(ValueError, match=rf"workers must be <= 10000\b.*got {workers}\b"):
                q.start_dispatcher(workers)
        job = q.enqueue(Job("t"))  # not stopped: the refused call changed nothing
        q.start_dispatcher(1)
        assert ran.wait_for(1, WAIT) and ran.items == [job.id]


# --- 2. A second stop() after the store was closed ------------------------------------------

# stop(timeout=...) gave up an attempt that ignores its context and saved its job back as ready
# (give_back); the user then closed the store, as the docs show. A second stop() (stop() is
# idempotent), or the interpreter's exit hook, which stops every queue again, gave the same job
# back again: on the closed store, an ERROR with a traceback ("give_back failed ... is closed")
# for a job that was kept as it should be. An attempt given up once is not given back again.
def test_a_second_stop_does_not_give_back_again_what_the_first_gave_back(tmp_path, caplog):
    from tinymq import SQLitePersistence

    given_back = Recorder()

    class CountingStore(SQLitePersistence):
        def give_back(self, job):
            given_back.add(job.id)
            return super().give_back(job)

    started, release = threading.Event(), threading.Event()

    def ignores_its_context(job):  # a plain fn(job): nothing tells it to stop
        started.set()
        release.wait(WAIT)

    store = CountingStore(str(tmp_path / "jobs.db"))
    q = Queue(10)
    q.set_persistence(store)
    q.register_executor("t", ignores_its_context)
    q.start_dispatcher(1)
    try:
        job = q.enqueue(Job("t"))
        assert started.wait(WAIT)
        q.stop(timeout=0.05)
        assert given_back.items == [job.id]
        assert store.counts()["ready"] == 1
        store.close()
        caplog.clear()
        with caplog.at_level("ERROR", logger="tinymq"):
            q.stop()
            assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == []
        assert given_back.items == [job.id]
    finally:
        release.set()
        store.close()


# --- 3. A store's error for a timestamp that is not a number ---------------------------------

# job.timestamp = "x" (or None), then enqueue with a SQLite store: PersistenceError "cannot be
# stored: could not convert string to float: 'x'", naming neither the field nor what it should
# be (a NaN there was already named: "its timestamp must be a number"). Same for a store's own
# save() of a job whose run_at is not a number.
@pytest.mark.parametrize("bad", ["x", None, [1.0]])
def test_a_stored_timestamp_or_run_at_that_is_no_number_is_named(tmp_path, bad):
    from tinymq import PersistenceError, SQLitePersistence

    with SQLitePersistence(str(tmp_path / "jobs.db")) as store:
        q = Queue(10)
        q.set_persistence(store)
        job = Job("t")
        job.timestamp = bad
        with pytest.raises(PersistenceError, match=rf"its timestamp must be a number, got {re.escape(repr(bad))}$"):
            q.enqueue(job)
        assert q.get_stats().jobs_enqueued == 0
        q.stop()
        job = Job("t")
        job.run_at = bad
        with pytest.raises(PersistenceError, match=rf"its run_at must be a number, got {re.escape(repr(bad))}$"):
            store.save(job)
        assert store.counts() == {"ready": 0, "delayed": 0, "running": 0, "dead": 0, "corrupt": 0}


# --- 4. A rate limit's memory --------------------------------------------------------------

# A RateLimit kept a ring of its max_starts latest start times, allocated whole at registration:
# RateLimit(10**8, per=60) took 0.8 GB (1.5 GB in the pure core) and 5 to 10 s in
# register_executor, RateLimit(10**9, per=86400) ("a billion a day") 8 GB, for starts that
# never happen. The ring now begins small and grows (to max_starts at most) only while its
# oldest start still counts in the window: its memory follows the starts of one window.
def test_a_rate_limit_takes_memory_for_its_starts_not_for_max_starts(core):
    import tracemalloc

    from tinymq import RateLimit

    q = core.ReadyQueue(8)
    tracemalloc.start()
    try:
        q.configure("t", lambda job: None, 10, None, False, False, rate_limit=RateLimit(10**7, per=60.0))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000, f"registering RateLimit(10**7) took {peak} bytes"


# The ring that grows keeps the rule exact: never more than max_starts starts in any window of
# per seconds, and max_starts of them when jobs wait (the existing tests use max_starts < 16,
# the ring's first size).
@pytest.mark.parametrize("max_starts, per, jobs", [(17, 0.3, 60), (40, 0.3, 100), (40, 0.005, 300),
                                                   (100, 0.02, 400)])
def test_a_rate_limit_larger_than_the_first_ring_holds_every_window(core, max_starts, per, jobs):
    from tinymq import RateLimit

    from test_core_rate_limit import Item, MEDIUM, assert_windows_hold, drive, limited

    limits = {"t": RateLimit(max_starts, per=per)}
    q = limited(core, capacity=jobs, **limits)
    items = [Item("t", MEDIUM) for _ in range(jobs)]
    for item in items:
        assert q.push(item)
    starts, idle_at = drive(q, core, jobs)
    assert sorted(id(job) for job, _, _ in starts) == sorted(id(item) for item in items)
    assert_windows_hold(starts, limits)
    if per >= 0.3:  # (a window this long outlasts the first max_starts pops)
        assert idle_at[0] == max_starts


def test_a_type_registered_again_keeps_the_starts_its_grown_ring_holds(core):
    from tinymq import RateLimit

    from test_core_rate_limit import Item, MEDIUM

    q = core.ReadyQueue(100)
    q.configure("t", lambda job: None, 1000, None, False, False, rate_limit=RateLimit(30, per=WAIT))
    for _ in range(60):
        assert q.push(Item("t", MEDIUM))
    for _ in range(25):  # 25 starts: the ring grew past its first size
        job, state = q.pop_with_type(timeout=0)
        q.release_state(state)
    q.configure("t", lambda job: None, 1000, None, False, False, rate_limit=RateLimit(40, per=WAIT))
    started = 0
    while True:
        taken = q.pop_with_type(timeout=0)
        if taken is None:
            break
        q.release_state(taken[1])
        started += 1
    assert started == 15  # the 25 starts still count against 40
    q.configure("t", lambda job: None, 1000, None, False, False, rate_limit=RateLimit(20, per=WAIT))
    assert q.pop_with_type(timeout=0) is None  # lowered: its latest 20 starts fill the window


# --- 5. A failure whose report raises ---------------------------------------------------------

# fail() logged the failure and ran the callbacks, then deleted (or kept dead) the job's row and
# marked it finished: when the logging raised, the callbacks did not run and the job stayed
# unfinished for good (its slot taken), and join() never returned. A logging filter that raises
# does it (logging guards a handler's emit, not a filter), and so does a failure callback that
# recurses without bound (evicting as it enqueues) until logging its RecursionError runs out of
# stack. The report's logging now never raises (what raised goes to stderr, as logging does).
class _RaisingFilter:
    def filter(self, record):
        if "failed permanently" in record.getMessage():
            raise RuntimeError("a broken logging filter")
        return True


@pytest.mark.parametrize("backend", ["memory", "sqlite"])
def test_a_failure_whose_logging_raises_still_finishes_its_job(tmp_path, backend):
    from tinymq import ExecutorConfig, PermanentFailure

    from _helpers import queue_with_store

    broken = _RaisingFilter()
    logger = logging.getLogger("tinymq")
    with queue_with_store(backend, tmp_path) as q:
        failed = Recorder()
        q.on_failure(lambda job, reason, exc: failed.add((job.id, reason)))

        def fails(job):
            raise PermanentFailure("HTTP 404")

        q.register_executor("t", fails, ExecutorConfig(max_concurrent_jobs=1))
        q.start_dispatcher(1)
        logger.addFilter(broken)
        try:
            jobs = [q.enqueue(Job("t")) for _ in range(3)]
            assert q.join(WAIT), "a job whose failure report raised never finished"
        finally:
            logger.removeFilter(broken)
        stats = q.get_stats()
        assert (stats.jobs_failed, stats.executor_stats["t"].active_jobs) == (3, 0)
        if q.store is not None:
            assert q.store.counts()["dead"] == 3
        assert sorted(failed.items) == sorted((job.id, "permanent_failure") for job in jobs)  # reported all the same


# --- 6. The command line on a console that cannot show a job's type -------------------------

# `status` (and requeue-dead/purge-dead, which name the file) printed with stdout's strict
# encoding: a dead job of type "日本" or "émail" on an ASCII console (PYTHONIOENCODING=ascii, a
# cp1252 Windows console) ended the command with a UnicodeEncodeError and tinymq's traceback,
# though the docs promise one clear message and never a traceback of tinymq's. What the console
# cannot show is now written escaped, as Python writes it (\xe9), like the control characters.
def test_status_on_a_console_that_cannot_show_a_type_escapes_it(tmp_path):
    import os
    import subprocess
    import sys

    from tinymq import SQLitePersistence

    db = str(tmp_path / "jöbs.db")
    with SQLitePersistence(db) as store:
        q = Queue(10)
        q.set_persistence(store)
        q.enqueue(Job("émail", 1, id="jöb-1"))
        q.enqueue(Job("日本", 2, id="job-2"))
        q.start_dispatcher(1)
        assert q.join(WAIT)  # both fail as no_executor, kept dead
        q.stop()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONIOENCODING="ascii",
               PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))

    def command(*args):
        return subprocess.run([sys.executable, "-m", "tinymq", *args], env=env, capture_output=True,
                              text=True, encoding="ascii", errors="replace", timeout=60)

    shown = command("status", "--db", db)
    assert (shown.returncode, shown.stderr) == (0, ""), shown.stderr
    assert "\\xe9mail" in shown.stdout and "\\u65e5\\u672c" in shown.stdout and "j\\xf6b-1" in shown.stdout
    purged = command("purge-dead", "--db", db, "--all")
    assert (purged.returncode, purged.stderr) == (0, ""), purged.stderr
    assert "purged 2 dead jobs from" in purged.stdout and "j\\xf6bs.db" in purged.stdout
