"""Defects taken up by redis29b (session 29: known defects of the Redis broker and the command line),
each with its test.
"""
import sys

import pytest

from tinymq import Job

from _backends import Redis
from _helpers import WAIT

# --- 2. Failure callbacks nested without bound, over Redis ------------------------------------

# A failure callback whose enqueue evicts a job (or whose cancel removes one) has that job's row
# reported in its own thread before the call returns, whose callback enqueues again, ...: one stack.
# Without a broker, callbacks nested _NESTED_REPORTS deep leave the failures they decide to the
# report above them (tests/test_smallfix28_findings.py); over Redis the reports nested on: a
# RecursionError, swallowed as the callback's, ended the chain a hundred jobs in (the evicted rows
# were acknowledged, never reported). The reports a reply hands back are bounded the same way now.

# Failures reported in one chain: far more than Python's recursion limit allows nested.
CHAIN = 1000


def _stack_depth():
    frame, depth = sys._getframe(1), 0
    while frame is not None:
        frame, depth = frame.f_back, depth + 1
    return depth


@pytest.fixture
def redis(redis_url):
    made = Redis(redis_url)
    yield made
    made.close()


@pytest.mark.redis
@pytest.mark.parametrize("worker", [False, True], ids=["producer", "worker"])
def test_a_callback_that_evicts_as_it_enqueues_without_bound_over_redis_ends_every_job(redis, worker):
    q = redis.queue(max_delayed_jobs=1)
    if worker:
        q.start_dispatcher(1)
    evicted, depths, made = [], [], {}

    @q.on_failure
    def enqueue_another(job, reason, exc):
        evicted.append((job.payload, reason))
        depths.append(_stack_depth())
        if job.payload + 2 <= CHAIN:  # evicts the one waiting (payload + 1)
            made[job.payload + 2] = q.enqueue_delayed(Job("t", job.payload + 2), 3600)

    q.enqueue_delayed(Job("t", 0), 3600)
    q.enqueue_delayed(Job("t", 1), 3600)  # evicts 0: the chain runs before this call returns
    assert evicted == [(n, "evicted") for n in range(CHAIN)]
    assert max(depths) - min(depths) < sys.getrecursionlimit() // 4, "the chain's reports nest without bound"
    assert q.cancel(made[CHAIN].id)
    assert q.join(WAIT), "a job of the chain never finished"
    stats = q.get_stats()
    assert (stats.jobs_enqueued, stats.jobs_evicted, stats.jobs_cancelled) == (CHAIN + 1, CHAIN, 1)


@pytest.mark.redis
@pytest.mark.parametrize("worker", [False, True], ids=["producer", "worker"])
def test_a_callback_that_cancels_the_next_job_without_bound_over_redis_ends_every_job(redis, worker):
    q = redis.queue()
    if worker:
        q.start_dispatcher(1)
    cancelled, found, depths = [], [], []
    jobs = [q.enqueue_delayed(Job("t", n), 3600) for n in range(CHAIN)]

    @q.on_failure
    def cancel_the_next(job, reason, exc):
        cancelled.append((job.payload, reason))
        depths.append(_stack_depth())
        if job.payload + 1 < CHAIN:
            found.append(q.cancel(jobs[job.payload + 1].id))

    assert q.cancel(jobs[0].id)
    assert cancelled == [(n, "cancelled") for n in range(CHAIN)]
    assert found == [True] * (CHAIN - 1)
    assert max(depths) - min(depths) < sys.getrecursionlimit() // 4, "the chain's reports nest without bound"
    assert q.join(WAIT), "a job of the chain never finished"
    stats = q.get_stats()
    assert (stats.jobs_cancelled, stats.delayed_jobs_count) == (CHAIN, 0)

