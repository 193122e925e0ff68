"""An outside attack on rate limits, periodic jobs, per-type stats, metrics and the CLI (session 32):
each test is a defect found, failing before its fix. Real redis-server (tests/conftest.py's fixtures)."""
import time

import pytest

from tinymq import Job

from _backends import Redis
from _helpers import WAIT


# --- 1. a process's own cancel of a job whose success it counted already --------------------------

# Over Redis, q.cancel(id) of a job whose success this process had counted already (its
# ExecutorStats.succeeded showed it) could reach Redis before the success's settle op, which waits
# for the pump's next round: cancel() returned True, the job was reported "cancelled" to on_failure
# and counted in jobs_cancelled, though its executor had succeeded and this process counted it so
# (one time in ten here, under load one in two). In-process such a cancel finds the job ended and
# returns False; and the one Queue on the name ran every attempt, so its per-type counters must add
# up to the shared ones (docs/redis.md names two exceptions: another process's cancel, a reap). Now
# the cancel sends this process's decided outcome of the job first.

@pytest.mark.redis
@pytest.mark.parametrize("kind", ["thread", "coroutine"])
def test_own_cancel_of_a_job_whose_success_was_counted_finds_it_ended(redis_url, kind):
    backend = Redis(redis_url)
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
        q.start_dispatcher(1)
        for n in range(1, 61):
            job = q.enqueue(Job("t"))
            by = time.monotonic() + WAIT
            while q.get_stats().executor_stats["t"].succeeded != n:  # its success is counted here
                assert time.monotonic() < by
            assert q.cancel(job.id) is False, f"attempt {n}: cancelled after its success was counted"
            assert q.join(WAIT)
        stats = q.get_stats()
        executor = stats.executor_stats["t"]
        assert (stats.jobs_succeeded, stats.jobs_cancelled, executor.cancelled) == (60, 0, 0)
        assert reported == []
    finally:
        backend.close()
