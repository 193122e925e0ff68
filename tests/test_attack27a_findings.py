"""Defects found by attack27a (session 27: the in-process queue, its store, periodic jobs,
metrics and the command line, as an outsider would use them), each with its test.
"""
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
