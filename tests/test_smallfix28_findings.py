"""Defects taken up by smallfix (session 28: known defects carried over from session 27), each with its test.
"""
import sys

import pytest

from tinymq import Config, Job, Queue

from _helpers import STORES, WAIT, queue_with_store

# Failures reported in one chain: far more than Python's recursion limit allows nested.
CHAIN = 2000


def _stack_depth():
    frame, depth = sys._getframe(1), 0
    while frame is not None:
        frame, depth = frame.f_back, depth + 1
    return depth


# --- 1. A failure callback whose enqueue or cancel fails another job, without bound ----------

# A failure is reported (callbacks, store, finished) in the thread that decides it, before the
# call that decided it returns. A failure callback that enqueues a delayed job into a full delayed
# set evicts a job, whose callback enqueues one, ... : one stack, about nine frames a job. Near
# Python's recursion limit a RecursionError landed midway through a job's end and the job stayed
# unfinished for good, out of every place: join() never returned. With the pure core it lands in
# the core's accept_delayed, between the push that evicted a job and counting its end (the job is
# neither counted nor reported); with either core it can land between counting an evicted job and
# its callbacks, depending on the stack's depth. The same with a callback that cancels the next job.
# Callbacks nested _NESTED_REPORTS deep now leave the failures they decide to the fail() above
# them, which reports them one after another: the stack stays bounded, and every job ends.
@pytest.mark.parametrize("backend", STORES)
def test_a_callback_that_evicts_as_it_enqueues_without_bound_ends_every_job(tmp_path, backend):
    with queue_with_store(backend, tmp_path, max_delayed_jobs=1) as q:
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
        assert q.get_stats().delayed_jobs_count == 1
        assert q.cancel(made[CHAIN].id)  # the one job left waiting
        assert q.join(WAIT), "a job of the chain never finished"
        stats = q.get_stats()
        assert (stats.jobs_enqueued, stats.jobs_evicted, stats.jobs_cancelled) == (CHAIN + 1, CHAIN, 1)
        if q.store is not None:
            assert q.store.counts()["dead"] == CHAIN  # each evicted job's row kept dead, none left pending


def test_a_callback_that_cancels_the_next_job_without_bound_ends_every_job():
    with Queue(config=Config(max_delayed_jobs=0)) as q:
        cancelled, found = [], []
        jobs = [q.enqueue_delayed(Job("t", n), 3600) for n in range(CHAIN)]

        @q.on_failure
        def cancel_the_next(job, reason, exc):
            cancelled.append((job.payload, reason))
            if job.payload + 1 < CHAIN:
                found.append(q.cancel(jobs[job.payload + 1].id))

        assert q.cancel(jobs[0].id)
        assert cancelled == [(n, "cancelled") for n in range(CHAIN)]
        assert found == [True] * (CHAIN - 1)
        assert q.join(WAIT), "a job of the chain never finished"
        stats = q.get_stats()
        assert (stats.jobs_cancelled, stats.delayed_jobs_count) == (CHAIN, 0)


# Below the nesting bound nothing changed: an eviction decided in a callback is reported before
# the enqueue that decided it returns, as docs/api.md promises.
def test_an_eviction_in_a_callback_is_still_reported_before_its_enqueue_returns():
    with Queue(config=Config(max_delayed_jobs=1)) as q:
        reported, on_return = [], []

        @q.on_failure
        def enqueue_another(job, reason, exc):
            reported.append(job.payload)
            if job.payload == 0:
                q.enqueue_delayed(Job("t", 2), 3600)  # evicts 1
                on_return.extend(reported)

        q.enqueue_delayed(Job("t", 0), 3600)
        q.enqueue_delayed(Job("t", 1), 3600)  # evicts 0
        assert (reported, on_return) == ([0, 1], [0, 1])
