"""Defects taken up by puregc30 (session 30: the pure core and the queue layer around it), each with its test.
"""
import itertools
import sys

import pytest

from tinymq import Config, DuplicateJob, Job, PermanentFailure, Queue

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


# --- 2. The id of a job whose failure callbacks run -------------------------------------------

# A job's failure callbacks run before it counts as finished (API.md "Failures are never silent"),
# and its id may change only while no queue holds it: "before its enqueue, or once it has finished
# (succeeded, or failed for good and its failure callbacks returned)" (docs/api.md "Job"). A job
# enqueued with an id refused a new one in its callbacks; one enqueued without an id (and without a
# store, which names every job it saves) took one there, its queue having let go of it as its end
# was decided: the id read there named it nowhere, so a cancel by it or a Job(id=...) with it was
# not told the job was still unfinished. Such a job is now named as its end is decided, and held
# under that id until it finishes, as one enqueued with an id is.
REFUSED = "cannot change to"


def _fails_for_good(q, reason, new_job):
    """Enqueue a job (``new_job(type)``) that fails for good with ``reason``: ``(it, the jobs left waiting)``."""
    if reason == "evicted":
        job = q.enqueue_delayed(new_job("t"), 3600)
        return job, [q.enqueue_delayed(new_job("t"), 3600)]  # evicts it: its callbacks run in this call
    if reason == "cancelled":
        job = q.enqueue_delayed(new_job("t"), 3600)
        assert q.cancel(job.id)
        return job, []
    if reason == "no_executor":
        job = q.enqueue(new_job("none"))
    else:
        q.register_executor("t", lambda job: (_ for _ in ()).throw(PermanentFailure("no")))
        job = q.enqueue(new_job("t"))
    q.start_dispatcher(1)
    return job, []


@pytest.mark.parametrize("named", [False, True], ids=["unnamed", "named"])
@pytest.mark.parametrize("reason", ["permanent_failure", "evicted", "cancelled", "no_executor"])
def test_a_job_refuses_a_new_id_while_its_failure_callbacks_run(reason, named):
    q = Queue(config=Config(buffer_size=10, max_delayed_jobs=1))
    ids = itertools.count()
    seen = []

    @q.on_failure
    def rename(job, reason, exc):
        if seen:
            return  # (a job this callback enqueued, evicted)
        job_id = job.id  # (made now, or the one it has)
        try:
            job.id = "from-callback"
        except ValueError as error:
            seen.append(("refused", REFUSED in str(error)))
        else:
            seen.append(("changed", job.id))
        seen.append(("cancel", q.cancel(job_id)))  # ending: a cancel loses
        try:
            q.enqueue(Job("none", id=job_id))
        except DuplicateJob:
            seen.append(("duplicate", True))
        else:
            seen.append(("duplicate", False))

    try:
        job, waiting = _fails_for_good(q, reason, lambda job_type: Job(job_type, id=f"j{next(ids)}") if named
                                       else Job(job_type))
        for other in waiting:
            assert q.cancel(other.id)
        q.register_executor("none", lambda job: None)  # (a duplicate that was not refused runs)
        assert q.join(WAIT)
        assert seen == [("refused", True), ("cancel", False), ("duplicate", True)], seen
        job.id = "retried-by-hand"  # finished: free
        assert job.id == "retried-by-hand"
    finally:
        q.stop(wait=False)
