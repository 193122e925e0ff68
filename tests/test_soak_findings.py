"""Findings of the kill-9 soak (SQLite store and Redis fleet under random SIGKILLs).

The soak itself is not part of the suite; what it found is reproduced here in small.
"""
import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import threading

import pytest

from tinymq import Job

from _helpers import WAIT, all_accounted, make_queue, wait_until


@pytest.mark.parametrize("runner", ["thread", "async"])
def test_a_cancelled_attempt_that_returned_is_counted_somewhere_while_cancel_finishes(runner):
    """api.md "Stats": a job cancelled while running counts twice (its slot, and jobs_cancelled) until
    its function returns, and the sum is exact again once it has returned. The soak sampled
    get_stats() under cancels of running thread attempts and saw, for up to tens of milliseconds,
    one job more unfinished than placed: cancel() decided the attempt (its context cancelled), the
    function saw that and returned, its worker freed the slot, and only then did cancel() count
    the job in jobs_cancelled. The count now comes in the step that decides the attempt. Here the
    dispatcher's step that decides it is held open until the attempt has returned and freed its
    slot (before the fix, the count came after that step: the job was in no place)."""
    q = make_queue()
    started, returned = threading.Event(), threading.Event()

    if runner == "thread":
        def run(job, ctx):
            started.set()
            assert wait_until(lambda: ctx.cancelled)
            returned.set()
    else:
        async def run(job, ctx):
            started.set()
            try:
                while not ctx.cancelled:
                    await asyncio.sleep(0.001)
            finally:  # (its task is cancelled too)
                returned.set()

    q.register_executor("t", run)
    dispatcher = q._dispatcher
    decide = dispatcher._cancel_running
    seen = []

    def decide_then_look(*args, **kwargs):
        job = decide(*args, **kwargs)
        assert returned.wait(WAIT)
        assert wait_until(lambda: q.get_stats().executor_stats["t"].active_jobs == 0)
        seen.append(q.get_stats())  # the attempt has returned and freed its slot; cancel() goes on
        return job

    dispatcher._cancel_running = decide_then_look
    try:
        q.start_dispatcher(1)
        q.enqueue(Job("t", id="x"))
        assert started.wait(WAIT)
        assert q.cancel("x")
        assert q.join(WAIT)
        assert all_accounted(q.get_stats()) and q.get_stats().jobs_cancelled == 1
        assert len(seen) == 1 and all_accounted(seen[0]), seen
        assert seen[0].jobs_cancelled == 1
    finally:
        q.stop()


_KILLED_WHILE_REPORTING = textwrap.dedent("""
    import os, signal, sys
    from tinymq import Queue
    from tinymq.persistence import SQLitePersistence

    def killed(job, reason, exc):  # the process dies as the crashed job is being reported
        print(job.id, reason, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    q = Queue(10)
    q.on_failure(killed)
    q.set_persistence(SQLitePersistence(sys.argv[1], max_crash_recoveries=0))
    print("not killed", flush=True)
""")


def test_a_crashed_job_is_reported_even_when_the_loading_process_dies_before_reporting_it(tmp_path):
    """API.md "Failures are never silent": a job that leaves the queue without success is counted in
    jobs_failed and handed to every on_failure callback, reason "crashed" when its process died
    during too many attempts; persistence.md: "the queue that loads it reports it". load_all()
    marked such a row dead and committed that before set_persistence() handed the job to the
    callbacks (take_crashed). A process killed between the two (the soak's kills at random
    moments after a restart land there) left the job dead in the file and reported to no one:
    every later load skips dead rows. Now its row stays as it was until the queue has reported
    it and marked it dead, as for any other failure: a kill in between has it reported at the
    next start (at least once), its crash counted once. Here the restarted process is killed
    from its on_failure callback, as it reports the crashed job."""
    from tinymq import SQLitePersistence

    path = str(tmp_path / "jobs.db")
    with SQLitePersistence(path) as store:
        job = Job("t", id="a")
        job.retries = 1  # (an attempt failed before: a crash leaves retries as they are)
        store.save(job)
        store.mark_running(job)  # its process dies now: past max_crash_recoveries=0
    script = tmp_path / "killed_while_reporting.py"
    script.write_text(_KILLED_WHILE_REPORTING)
    done = subprocess.run([sys.executable, str(script), path], capture_output=True, text=True,
                          timeout=60, env=dict(os.environ))
    assert done.returncode == -signal.SIGKILL and done.stdout == "a crashed\n", (done.stdout, done.stderr)
    with SQLitePersistence(path, read_only=True) as view:  # meanwhile: the crashed attempt, as it was
        assert view.counts()["running"] == 1 and view.dead_jobs() == []
        assert [(job.id, job.retries) for job in view.jobs()] == [("a", 1)]
    failures = []
    q = make_queue()
    q.on_failure(lambda job, reason, exc: failures.append((job.id, reason, job.retries)))
    with SQLitePersistence(path, max_crash_recoveries=0) as store:
        try:
            q.set_persistence(store)
            assert failures == [("a", "crashed", 1)] and q.get_stats().jobs_failed == 1
            assert all_accounted(q.get_stats())
            assert [(dead.job.id, dead.reason, dead.job.retries) for dead in store.dead_jobs()] == [
                ("a", "crashed", 1)]
            assert store.counts()["running"] == 0
        finally:
            q.stop()
    again = make_queue()
    again.on_failure(lambda job, reason, exc: failures.append((job.id, reason, job.retries)))
    with SQLitePersistence(path) as store:
        try:
            again.set_persistence(store)  # reported once: dead now, never loaded again
            assert len(failures) == 1 and again.get_stats().jobs_failed == 0
        finally:
            again.stop()
