"""Findings left open by the last review, in-process (second part): a cancel of a job its core knows
by no id is counted in the step that decides it.

API.md "Stats": get_stats() sees every unfinished job in exactly one place, or ended.
"""
import asyncio
import threading

import pytest

from tinymq import ExecutorConfig, Job, PermanentFailure

from _helpers import WAIT, Blocker, Recorder, all_accounted, make_queue, record_failures, wait_until
from test_stats_in_transit import books, collections_watched, compiled_only, line_up


# --- 1. a cancel of a job known by no id -----------------------------------------------------------

def known_by_no_id(core, ready, n):
    """A job of ``ready`` whose id was read after its first end was decided and that was enqueued
    again before that end was done (from its failure callback): its id is registered nowhere."""
    job = Job("t", n)
    ready.accept([job])
    assert ready.end(job, core.FAILED) == core.FAILED  # (its end decided: its id is not the core's any more)
    ready.accept([job])  # enqueued again from its failure callback
    ready.task_done(job)  # its first end done
    assert isinstance(job.id, str) and not ready.registered(job) and not ready.has_id(job.id)
    return job


def test_core_a_job_known_by_no_id_is_taken_out_and_counted_in_one_step(core):
    """mark_cancel(job_id, *heaps): a job registered under no id is looked for in the buffer and in
    the heaps, taken out and counted cancelled there; not found: CANCEL_UNKNOWN, nothing counted.
    take_unregistered_cancel counts such a job's running attempt (the caller decides it)."""
    ready, heap = core.ReadyQueue(10), core.DelayedHeap(0)
    waiting, delayed, running = (known_by_no_id(core, ready, n) for n in ("waiting", "delayed", "running"))
    ready.requeue(waiting)  # (accepted already: placed)
    heap.push(delayed, 1.0)
    cancelled = lambda: ready.counters()[core.CANCELLED]
    assert ready.mark_cancel(running.id, heap) == (core.CANCEL_UNKNOWN, None) and cancelled() == 0
    assert ready.mark_cancel(waiting.id) == (core.CANCEL_UNKNOWN, None)  # (no heaps: not looked for)
    assert ready.mark_cancel(waiting.id, heap) == (core.CANCEL_REMOVED, waiting) and cancelled() == 1
    assert len(ready) == 0
    assert ready.mark_cancel(delayed.id, heap) == (core.CANCEL_REMOVED, delayed) and cancelled() == 2
    assert len(heap) == 0
    assert ready.take_unregistered_cancel(running) and cancelled() == 3
    assert ready.cancel_marks == {}  # (no id of theirs is marked: a later job with one is not touched)


def test_core_a_running_job_enqueued_again_with_its_id_is_counted_once(core):
    """take_unregistered_cancel of a job that got its id registered since (enqueued again, as itself):
    marked as taken, counted once; a second, or one after a cancel marked it, takes nothing."""
    ready = core.ReadyQueue(10)
    job = known_by_no_id(core, ready, "again")
    ready.accept([job])  # enqueued again, as itself, while it runs: now registered under its id
    assert ready.registered(job)
    assert ready.take_unregistered_cancel(job) and ready.counters()[core.CANCELLED] == 1
    assert not ready.take_unregistered_cancel(job) and ready.counters()[core.CANCELLED] == 1
    assert ready.mark_cancel(job.id) == (core.CANCEL_LOST, None)


def test_core_a_cancel_of_a_job_known_by_no_id_counts_it_in_that_step_even_when_the_collector_runs(core):
    """The compiled core's search for such a job allocates (the collector may run: other threads get
    in); a snapshot at each collection sees every job in its place or cancelled, never in neither."""
    compiled_only(core, "cancel")
    ready, heap = core.ReadyQueue(100), core.DelayedHeap(0)
    for job_type in ("a", "b", "t"):  # (the search walks every type)
        ready.configure(job_type, lambda job: None, 1, None, False, False)
    jobs = [known_by_no_id(core, ready, n) for n in range(40)]
    for n, job in enumerate(jobs):
        if n % 2:
            heap.push(job, 1000.0 + n)
        else:
            ready.requeue(job)
    seen, spare = [], []
    with collections_watched(lambda: seen.append(books(core, ready, heap))):
        for n, job in enumerate(jobs[::-1]):
            line_up(n, spare)
            assert ready.mark_cancel(job.id, heap)[0] == core.CANCEL_REMOVED
    assert seen, "no collection ran: the test shows nothing"
    assert [moment for moment in seen if moment[0] != moment[1]] == []
    assert ready.counters()[core.CANCELLED] == len(jobs)


WHERE = ["ready", "delayed", "thread", "async"]


@pytest.mark.parametrize("where", WHERE)
def test_a_cancel_of_a_job_known_by_no_id_is_counted_when_it_takes_the_job(where):
    """_cancel_unregistered took such a job out of its place (or decided its running attempt, whose
    function then returned and freed its slot), and only then counted the cancel: a get_stats()
    meanwhile saw the job nowhere. Here one is taken as the cancel reports it."""
    attempts, started = Recorder(), threading.Event()

    def run(job, ctx):
        attempts.add(job)
        if len(attempts.snapshot()) == 1:
            raise PermanentFailure("not now")
        started.set()
        ctx.wait(WAIT)  # until cancelled: then it returns, and its slot is freed

    async def run_async(job, ctx):
        attempts.add(job)
        if len(attempts.snapshot()) == 1:
            raise PermanentFailure("not now")
        started.set()
        await asyncio.sleep(WAIT)  # cancelled: its task unwinds, and its slot is freed

    with make_queue() as q, Blocker() as blocker:
        failures = record_failures(q)
        q.register_executor("t", run_async if where == "async" else run)
        q.register_executor("held", blocker.fn, ExecutorConfig(max_concurrent_jobs=1))

        def enqueue_again(job, reason, exc):
            if reason != "permanent_failure":
                return
            if where == "delayed":
                q.enqueue_delayed(job, 60.0)
            else:
                if where == "ready":
                    job.type = "held"  # (its type's one slot is taken: it waits in the buffer)
                q.enqueue(job)

        q.on_failure(enqueue_again)
        q.enqueue(Job("held", "holder"))
        job = q.enqueue(Job("t"))
        q.start_dispatcher(2)
        assert blocker.wait_started(1)
        # (its first end done: the callback returned, the job waits again, or runs)
        assert wait_until(lambda: q._ready.unfinished == 2 and failures.snapshot())
        if where in ("thread", "async"):
            assert started.wait(WAIT)
        dispatcher, fail, seen = q._dispatcher, q._dispatcher.fail, []

        def watched_fail(ended, reason, *args, **kwargs):
            if reason == "cancelled":  # a running attempt's slot first freed, as its worker or the loop does
                assert wait_until(lambda: q.get_stats().executor_stats["t"].active_jobs == 0)
                seen.append(q.get_stats())
            return fail(ended, reason, *args, **kwargs)

        dispatcher.fail = watched_fail
        assert q.cancel(job.id) is True
        assert len(seen) == 1
        assert all_accounted(seen[0]), (f"the cancelled job was seen nowhere: {seen[0].jobs_enqueued} enqueued, "
                                        f"{seen[0].jobs_failed} failed, {seen[0].jobs_cancelled} cancelled")
        blocker.release()
        assert q.join(WAIT)
        assert [(ended, reason) for ended, reason, _ in failures.snapshot()] == [
            (job, "permanent_failure"), (job, "cancelled")]
        stats = q.get_stats()
        assert (stats.jobs_failed, stats.jobs_cancelled, stats.jobs_succeeded) == (1, 1, 1)
        assert all_accounted(stats)
