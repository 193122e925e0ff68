"""Defects of the Redis broker left open by earlier outside attacks (session 33, helper fix33r), each
with its test against a real redis-server (tests/conftest.py's fixtures), failing before its fix."""
import gc
import threading
import time

import pytest

from tinymq import Job

from _backends import Redis
from _helpers import WAIT


# --- 2. A cancel the collector runs between succeeding() and succeeded() of the same job ----------

# Over Redis, a process's own cancel() first sends the outcome it decided for its attempt of the job
# (a success being counted waits for its op: attack32's _send_decided), so that the cancel, sent
# ahead of that op, cannot end as cancelled a job counted here as a success. A cancel run by the
# garbage collector (a __del__ that calls q.cancel) on the very thread that counts the success,
# between its succeeding() and its succeeded(), waited there for that thread's own op: a whole lease,
# with the worker (or the event loop) held up. Its success is decided (in-process such a cancel finds
# the job ended): cancel() now returns False at once, and the success stands.

LEASE = 10.0


@pytest.mark.redis
@pytest.mark.parametrize("kind", ["thread", "coroutine"])
def test_a_cancel_the_collector_runs_as_the_same_thread_counts_the_jobs_success_returns_at_once(redis_url, kind):
    backend = Redis(redis_url, lease=LEASE)
    try:
        q = backend.queue()
        reported = []
        q.on_failure(lambda job, reason, exc: reported.append((job.id, reason)))
        if kind == "thread":
            def run(job):
                pass
        else:
            async def run(job):
                pass
        q.register_executor("t", run)
        link = q._link
        outcomes = []

        class CancelsTheJob:
            """Garbage whose __del__ cancels the job, as a user's finalizer may."""

            def __init__(self, job_id):
                self.job_id = job_id
                self.cycle = self  # (freed by the collector only)

            def __del__(self):
                began = time.monotonic()
                try:
                    outcomes.append((q.cancel(self.job_id), time.monotonic() - began))
                except Exception as error:
                    outcomes.append((error, time.monotonic() - began))

        succeeding = link.succeeding

        def collected_as_it_succeeds(job):  # (the dispatcher reads the ledger's hooks at start_dispatcher)
            decided = succeeding(job)
            if decided and job.id == "done":
                CancelsTheJob(job.id)
                gc.collect()  # the collector runs the __del__ here, on the thread that counts the success
            return decided

        link.succeeding = collected_as_it_succeeds
        q.start_dispatcher(1)
        q.enqueue(Job("t", id="done"))
        assert q.join(WAIT + LEASE)
        assert len(outcomes) == 1, outcomes
        cancelled, took = outcomes[0]
        assert cancelled is False, outcomes
        assert took < LEASE / 2, f"the cancel waited {took:.1f}s (the lease is {LEASE:g}s)"
        stats = q.get_stats()
        executor = stats.executor_stats["t"]
        assert (stats.jobs_succeeded, stats.jobs_cancelled) == (1, 0)
        assert (executor.succeeded, executor.cancelled) == (1, 0)
        assert reported == []
    finally:
        backend.close()

