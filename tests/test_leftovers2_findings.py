"""Findings left open by the last review, in-process (second part): a cancel of a job its core knows
by no id is counted in the step that decides it; a store raising KeyboardInterrupt as one of several
jobs decided in one step ends leaves none of the others unended.

API.md "Stats": get_stats() sees every unfinished job in exactly one place, or ended. docs/api.md
"Persistence": a store's KeyboardInterrupt goes on up once the job counts finished.
"""
import asyncio
import threading
import time

import pytest

from tinymq import ExecutorConfig, Job, Queue

from _helpers import WAIT, Blocker, Recorder, all_accounted, make_queue, record_failures, wait_until
from test_leftovers_core_findings import EndingFailsOnce
from test_stats_in_transit import books, collections_watched, compiled_only, line_up


# --- 1. a cancel of a job known by no id -----------------------------------------------------------

def known_by_no_id(core, ready, n):
    """An unfinished job of ``ready`` whose id its core knows nothing of: accepted without one, then
    given one behind the core's back, as a Job.id set on one thread while another enqueues the job
    leaves it (a race docs/api.md rules out). (A job's own failure callback enqueuing it again left
    one so too, until such a job was held under its id until its callbacks returned.)"""
    job = Job("t", n)
    ready.accept([job])
    job._id = f"known-by-no-id-{n}"
    assert not ready.registered(job) and not ready.has_id(job.id)
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
    started = threading.Event()

    def run(job, ctx):
        started.set()
        ctx.wait(WAIT)  # until cancelled: then it returns, and its slot is freed

    async def run_async(job, ctx):
        started.set()
        await asyncio.sleep(WAIT)  # cancelled: its task unwinds, and its slot is freed

    with make_queue() as q, Blocker() as blocker:
        failures = record_failures(q)
        q.register_executor("t", run_async if where == "async" else run)
        q.register_executor("held", blocker.fn, ExecutorConfig(max_concurrent_jobs=1))
        q.enqueue(Job("held", "holder"))
        q.start_dispatcher(2)
        assert blocker.wait_started(1)
        if where == "delayed":
            job = q.enqueue_delayed(Job("t"), 60.0)
        else:  # (of "held", whose one slot is taken: it waits in the buffer)
            job = q.enqueue(Job("held" if where == "ready" else "t"))
        if where in ("thread", "async"):
            assert started.wait(WAIT)
        job._id = "known-by-no-id"  # (see known_by_no_id)
        assert q._ready.unfinished == 2 and not q._ready.registered(job)
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
        assert [(ended, reason) for ended, reason, _ in failures.snapshot()] == [(job, "cancelled")]
        stats = q.get_stats()
        assert (stats.jobs_failed, stats.jobs_cancelled, stats.jobs_succeeded) == (0, 1, 1)
        assert all_accounted(stats)


# --- 2. a store's KeyboardInterrupt as one of several jobs of one step ends ----------------------

def interrupts_once(method, dead=None):
    """A store whose first ``method`` call ("delete" or "mark_dead") raises KeyboardInterrupt."""
    return EndingFailsOnce(method, KeyboardInterrupt("store gone"), method == "mark_dead" if dead is None else dead)


def make_due_and_broken(q, count):
    """``count`` delayed jobs, due almost at once, whose priority is made invalid while they wait
    (moving them in fails them), then waited for until they are due."""
    jobs = [q.enqueue_delayed(Job("t", f"broken-{n}"), 0.01) for n in range(count)]
    for job in jobs:
        job.priority = 7
    due = time.time() + 0.05
    assert wait_until(lambda: time.time() > due)
    return jobs


def test_every_due_job_the_scheduler_fails_in_one_move_ends_whatever_the_store_raises():
    """The scheduler fails the due jobs of one move that cannot go in; the store's mark_dead raising
    KeyboardInterrupt for the first one left the others of that move counted nowhere and unended:
    join() hung. Now each ends, and the error is logged by the scheduler, which goes on."""
    store = interrupts_once("mark_dead")
    q = Queue(10)
    try:
        q.set_persistence(store)
        failures = record_failures(q, key=lambda job: job.payload)
        q.register_executor("t", lambda job: None)
        make_due_and_broken(q, 3)
        q.start_dispatcher(1)  # (its scheduler's first move finds the three due)
        assert q.join(WAIT), "a job of the move whose first end raised never ended"
        assert sorted(payload for payload, _, _ in failures.snapshot()) == ["broken-0", "broken-1", "broken-2"]
        stats = q.get_stats()
        assert stats.jobs_failed == 3 and all_accounted(stats)
        q.enqueue_delayed(Job("t", "later"), 0.01)
        assert q.join(WAIT), "the scheduler no longer moves delayed jobs in"
    finally:
        q.stop(wait=False)


def test_an_enqueue_delayed_that_fails_due_jobs_on_a_full_heap_ends_all_and_keeps_its_job():
    """On a full delayed heap, enqueue_delayed moves the due jobs in first; those that cannot go fail.
    The store raising KeyboardInterrupt at the first of them left the others unended (join() hung),
    and the new job was never enqueued. Now every one ends, the new job is in and stays saved, and
    the KeyboardInterrupt goes on up to the caller after."""
    store = interrupts_once("mark_dead")
    q = make_queue(max_delayed_jobs=3)
    try:
        q.set_persistence(store)
        failures = record_failures(q, key=lambda job: job.payload)
        make_due_and_broken(q, 2)
        later = q.enqueue_delayed(Job("t", "later"), 60.0)
        new = Job("t", "new")
        with pytest.raises(KeyboardInterrupt):
            q.enqueue_delayed(new, 60.0)  # the heap is full: the two due ones are moved first
        assert sorted(payload for payload, _, _ in failures.snapshot()) == ["broken-0", "broken-1"]
        stats = q.get_stats()
        assert (stats.jobs_failed, stats.delayed_jobs_count) == (2, 2) and all_accounted(stats)
        assert q._ready.unfinished == 2, "a due job whose end came after the store raised never ended"
        assert new.id in store.rows, "the job that got in was taken back from the store"
        assert q.cancel(new.id) and q.cancel(later.id)
        assert q.join(WAIT)
    finally:
        q.stop(wait=False)


def test_an_enqueue_delayed_that_evicts_a_job_keeps_its_own_save_whatever_the_store_raises():
    """The store raising KeyboardInterrupt as the evicted job was deleted went on up through the new
    job's enqueue, which took the new job's save back although the job was in the queue: after a
    restart it was gone. Now its save stands; the evicted job ends; the error goes on up after."""
    store = interrupts_once("delete")
    q = make_queue(max_delayed_jobs=1)
    try:
        q.set_persistence(store)
        failures = record_failures(q, key=lambda job: job.payload)
        first = q.enqueue_delayed(Job("t", "first"), 60.0)
        second = Job("t", "second")
        with pytest.raises(KeyboardInterrupt):
            q.enqueue_delayed(second, 61.0)
        assert [(payload, reason) for payload, reason, _ in failures.snapshot()] == [("first", "evicted")]
        assert second.id in store.rows and first.id not in store.rows
        stats = q.get_stats()
        assert (stats.jobs_evicted, stats.delayed_jobs_count) == (1, 1) and all_accounted(stats)
        assert q.cancel(second.id)
        assert q.join(WAIT)
    finally:
        q.stop(wait=False)


def test_every_job_one_enqueue_many_evicts_ends_whatever_the_store_raises():
    """A batch of delayed jobs pushed onto a full delayed heap evicts several; the store raising
    KeyboardInterrupt as the first evicted one was deleted left the others unended (join() hung),
    and took back the saves of the whole batch, which was in the queue. Now every evicted job ends,
    the batch stays saved, and the error goes on up after."""
    store = interrupts_once("delete")
    q = make_queue(max_delayed_jobs=2)
    try:
        q.set_persistence(store)
        failures = record_failures(q, key=lambda job: job.payload)
        q.enqueue_delayed(Job("t", "old-0"), 60.0)
        q.enqueue_delayed(Job("t", "old-1"), 61.0)
        now = time.time()
        batch = [Job("t", f"new-{n}", run_at=now + 120.0 + n) for n in range(3)]
        with pytest.raises(KeyboardInterrupt):
            q.enqueue_many(batch)
        assert sorted(payload for payload, reason, _ in failures.snapshot() if reason == "evicted") == [
            "new-0", "old-0", "old-1"]
        stats = q.get_stats()
        assert (stats.jobs_evicted, stats.delayed_jobs_count) == (3, 2) and all_accounted(stats)
        assert q._ready.unfinished == 2, "a job the batch evicted after the store raised never ended"
        assert {job.id for job in batch[1:]} <= set(store.rows), "the batch in the queue was taken back from the store"
        for job in batch[1:]:
            assert q.cancel(job.id)
        assert q.join(WAIT)
    finally:
        q.stop(wait=False)


class CrashedOnLoad(EndingFailsOnce):
    """``interrupts_once("mark_dead")`` that holds ``loaded`` and hands ``crashed`` to take_crashed."""

    def __init__(self, loaded, crashed):
        super().__init__("mark_dead", KeyboardInterrupt("store gone"), dead=True)
        self.loaded, self.crashed = loaded, crashed

    def load_all(self):
        return list(self.loaded)

    def take_crashed(self):
        return list(self.crashed)


def test_every_job_found_crashed_at_load_ends_and_every_loaded_job_is_in_whatever_the_store_raises():
    """set_persistence reports the jobs its store found crashed too often, then marks them dead; the
    store raising KeyboardInterrupt for the first left the others counted failed and unfinished
    (join() hung), and the jobs it loaded were never enqueued. Now every job is placed or ended
    first, and the KeyboardInterrupt goes on up after."""
    crashed = [Job("t", f"crashed-{n}") for n in range(3)]
    loaded = [Job("t", "loaded")]
    store = CrashedOnLoad(loaded, crashed)
    q = Queue(10)
    try:
        failures = record_failures(q, key=lambda job: job.payload)
        with pytest.raises(KeyboardInterrupt):
            q.set_persistence(store)
        assert sorted((payload, reason) for payload, reason, _ in failures.snapshot()) == [
            ("crashed-0", "crashed"), ("crashed-1", "crashed"), ("crashed-2", "crashed")]
        stats = q.get_stats()
        assert (stats.jobs_failed, stats.medium_queue_size) == (3, 1) and all_accounted(stats)
        assert q._ready.unfinished == 1, "a crashed job whose end came after the store raised never ended"
        ran = Recorder()
        q.register_executor("t", lambda job: ran.add(job.payload))
        q.start_dispatcher(1)
        assert q.join(WAIT)
        assert ran.snapshot() == ["loaded"]
    finally:
        q.stop(wait=False)
