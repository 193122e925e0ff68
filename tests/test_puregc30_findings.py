"""Defects taken up by puregc30 (session 30: the pure core and the queue layer around it), each with its test.
"""
import sys

import pytest

from tinymq import Config, Job, Queue

from _helpers import WAIT


def _at_depth(frames, call):
    """``call()`` from a stack ``frames`` deeper than this one."""
    if frames:
        return _at_depth(frames - 1, call)
    return call()


def _stack_depth():
    frame, depth = sys._getframe(1), 0
    while frame is not None:
        frame, depth = frame.f_back, depth + 1
    return depth


# --- 1. A chain of failure callbacks begun deep in the stack -----------------------------------

# A failure callback that enqueues a delayed job into a full delayed set evicts a job, whose
# callback enqueues one, ...: past 16 nested callbacks, a failure is reported once the callbacks
# above it return (test_smallfix28_findings), so a chain begun from a shallow stack never nests
# deeper than that. Begun less than about sixteen callbacks' worth of frames from Python's recursion
# limit, it still reached the limit, and with the pure core the RecursionError landed inside the
# core's accept_delayed, between the push that evicted a job and counting its end: the job was
# neither counted nor reported nor finished (the compiled core's steps call no Python code, and
# its RecursionError came between two of them). Callbacks now also stop nesting once the stack is
# near the limit: a failure decided there is reported once the callbacks above it return.
CHAIN = 300
SPARE_FRAMES = range(60, 260, 8)  # how far below the recursion limit the chain begins


@pytest.mark.parametrize("spare", SPARE_FRAMES)
def test_a_chain_of_callbacks_begun_near_the_recursion_limit_ends_every_job(spare):
    q = Queue(config=Config(buffer_size=10, max_delayed_jobs=1))
    try:
        reported, made = [], {}

        @q.on_failure
        def enqueue_another(job, reason, exc):  # each enqueue evicts the one waiting
            reported.append((job.payload, reason))
            if job.payload + 2 <= CHAIN:
                made[job.payload + 2] = q.enqueue_delayed(Job("t", job.payload + 2), 3600)

        q.enqueue_delayed(Job("t", 0), 3600)
        depth = sys.getrecursionlimit() - _stack_depth() - spare
        _at_depth(depth, lambda: q.enqueue_delayed(Job("t", 1), 3600))  # evicts 0: the chain runs in this call
        assert reported == [(n, "evicted") for n in range(CHAIN)]
        stats = q.get_stats()
        assert (stats.jobs_enqueued, stats.jobs_evicted, stats.delayed_jobs_count) == (CHAIN + 1, CHAIN, 1)
        assert q.cancel(made[CHAIN].id)  # the one job left waiting
        assert q.join(WAIT), "a job of the chain never finished"
    finally:
        q.stop(wait=False)
