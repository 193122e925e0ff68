"""Findings of the kill-9 soak (SQLite store and Redis fleet under random SIGKILLs).

The soak itself is not part of the suite; what it found is reproduced here in small.
"""
import threading

import pytest

from tinymq import Job

from _helpers import WAIT, all_accounted, make_queue, wait_until


@pytest.mark.xfail(strict=True, reason="a cancel counts a running attempt's job after deciding it: if the "
                                       "function returns and frees its slot in between, the job is in no place")
def test_a_cancelled_attempt_that_returned_is_counted_somewhere_while_cancel_finishes():
    """api.md "Stats": a job cancelled while running counts twice (its slot, and jobs_cancelled) until
    its function returns, and the sum is exact again once it has returned. The soak sampled
    get_stats() under cancels of running thread attempts and saw, for up to tens of milliseconds,
    one job more unfinished than placed: cancel() decides the attempt (its context is cancelled),
    the function sees that and returns, its worker frees the slot, and only then does cancel()
    count the job in jobs_cancelled. Here the window between the decision and the count is held
    open (the dispatcher's step that decides the attempt waits until the slot is free)."""
    q = make_queue()
    started, returned = threading.Event(), threading.Event()

    def run(job, ctx):
        started.set()
        assert wait_until(lambda: ctx.cancelled)
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
    finally:
        q.stop()
