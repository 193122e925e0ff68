"""get_stats() counts every unfinished job exactly once, while the queue moves jobs between places.

API.md "Stats" and "Delayed jobs": a job is ready (at its priority, or waiting for room), delayed,
or running; no snapshot may catch one between two of these. Nothing finishes in these tests (the
only type is saturated by an attempt that is held), so every snapshot must add up to the jobs
accepted. The GIL switch interval is made tiny, so other threads get in between any two steps.
"""
import contextlib
import gc
import threading
import time
from collections import deque

import pytest

from tinymq import ExecutorConfig, Job, Priority, RateLimit

from _helpers import WAIT, Blocker, loop_takes, make_queue, places, stats_watched, wait_until
from test_core_run_worker import FakeDispatcher, Worker, configure, wait_idle

PRIORITIES = [Priority.HIGH, Priority.MEDIUM, Priority.LOW]
BATCHES = 20
BATCH_SIZE = 100
BATCH_GAP = 0.02  # seconds between two batches coming due
FIRST_DUE = 0.3  # seconds after the last enqueue's start: all are enqueued before any is due
LATE_DELAY = 0.25  # seconds: the least delay given, however late the loop runs (see the test)


@pytest.mark.parametrize("buffer_size", [10_000, 64], ids=["room", "full"])
def test_due_jobs_moved_by_the_scheduler_are_counted_every_moment(buffer_size, tiny_switch_interval):
    with make_queue(buffer_size=buffer_size, max_delayed_jobs=0, scheduler_interval=0.05) as q, \
            Blocker() as blocker:  # (released first: the queue's stop waits for the held attempt)
        q.register_executor("t", blocker.fn, ExecutorConfig(max_concurrent_jobs=1))
        q.start_dispatcher(2)
        q.enqueue(Job("t", "holder"))
        assert blocker.wait_started(1)  # the type is saturated from now on: nothing finishes
        start = time.monotonic()
        for n in range(BATCHES * BATCH_SIZE):
            # (late, on a loaded machine: due soon, still through the delayed set and the scheduler; a
            # delay that has passed when enqueue_delayed looks at it goes to the ready buffer, which is
            # full: 1 us did once, on a loaded CI lane)
            delay = max(LATE_DELAY, FIRST_DUE + BATCH_GAP * (n % BATCHES) - (time.monotonic() - start))
            q.enqueue_delayed(Job("t", n, priority=PRIORITIES[n % 3]), delay)
        with stats_watched(q, lambda stats: places(stats) == stats.jobs_enqueued) as wrong:
            moved = wait_until(lambda: q._dispatcher.delayed_count() == 0)  # the scheduler moved them all
        assert moved
        stats = q.get_stats()
        assert places(stats) == stats.jobs_enqueued == BATCHES * BATCH_SIZE + 1
        assert wrong == [], (f"{len(wrong)} snapshots lost or doubled jobs, e.g. {places(wrong[0])} "
                             f"placed of {wrong[0].jobs_enqueued} enqueued")


def test_core_move_due_places_due_jobs_and_hands_back_those_that_cannot_go(core):
    """move_due, on both cores: the due jobs go in as requeue puts them (ready while there is room,
    then owed room); a job marked by a cancel, or whose priority was made invalid while it waited,
    is handed back to the caller (which ends or fails it), its mark taken."""
    ready, heap = core.ReadyQueue(2), core.DelayedHeap(0)
    jobs = {name: Job("t", name, id=name) for name in ("a", "marked", "bad", "b", "c", "later")}
    ready.accept(list(jobs.values()))
    for run_at, name in enumerate(["a", "marked", "bad", "b", "c", "later"]):
        heap.push(jobs[name], float(run_at))
    assert ready.mark_cancel("marked") == (core.CANCEL_MARKED, jobs["marked"])
    jobs["bad"].priority = 7
    left = ready.move_due(heap, 4.0)
    assert [(job.payload, type(error)) for job, error in left] == [("marked", type(None)), ("bad", ValueError)]
    assert not ready.cancel_requested(jobs["marked"])  # taken: the caller ends it
    assert ready.sizes() == (0, 2, 0) and ready.overflow_size == 1  # a, b in; c owed room
    assert [entry for entry in heap.peek_due(float("inf"))[0]] == [jobs["later"]]
    assert ready.pop(timeout=0) is jobs["a"] and ready.pop(timeout=0) is jobs["b"]
    assert ready.pop(timeout=0) is jobs["c"]  # moved in from the overflow line by the first pop
    assert ready.move_due(heap, 4.5) == [] and len(heap) == 1



@pytest.mark.parametrize("max_delayed_jobs", [0, 10], ids=["unlimited", "capped"])
def test_a_delayed_job_is_counted_as_enqueued_only_together_with_its_place(max_delayed_jobs):
    """jobs_enqueued and delayed_jobs_count move in one step: a snapshot taken between the queue's
    steps of an enqueue (here: just before the job goes to the delayed set) never counts a job
    as enqueued that is in no place yet."""
    with make_queue(max_delayed_jobs=max_delayed_jobs) as q:
        dispatcher, seen = q._dispatcher, []
        push_delayed = dispatcher.push_delayed

        def looked_at_first(*args, **kwargs):
            seen.append(q.get_stats())
            return push_delayed(*args, **kwargs)

        dispatcher.push_delayed = looked_at_first
        for n in range(20):
            q.enqueue_delayed(Job("t", n), 3600.0 + n)
        stats = q.get_stats()
        kept = min(20, max_delayed_jobs or 20)
        assert stats.delayed_jobs_count == kept and stats.jobs_evicted == 20 - kept
        assert stats.jobs_enqueued == 20
        assert len(seen) == 20
        for stats in seen:
            assert places(stats) + stats.jobs_evicted == stats.jobs_enqueued, stats


def test_core_accept_delayed_counts_and_places_together_or_refuses_with_no_effect(core):
    from tinymq.errors import DuplicateJob, QueueStopped

    ready, heap = core.ReadyQueue(1), core.DelayedHeap(2)
    first, second, third = Job("t", 1, id="a"), Job("t", 2), Job("t", 3)
    assert ready.accept_delayed(first, heap, 5.0) is None
    with pytest.raises(DuplicateJob):
        ready.accept_delayed(Job("t", id="a"), heap, 1.0)
    assert ready.accept_delayed(second, heap, 6.0) is None
    # The earliest waiting one is evicted, and counted in the same step.
    assert ready.accept_delayed(third, heap, 7.0) == (first, core.EVICTED)
    assert ready.counters()[core.ENQUEUED] == ready.unfinished == 3 and len(heap) == 2
    assert ready.counters()[core.EVICTED] == 1
    assert ready.snapshot(heap, now=0.0)[4] == 2
    ready.close()
    with pytest.raises(QueueStopped):
        ready.accept_delayed(Job("t"), heap, 1.0)
    assert ready.unfinished == 3 and len(heap) == 2


def compiled_only(core, what):
    if not getattr(core, "__file__", "").endswith((".so", ".pyd")):
        pytest.skip(f"the pure core's snapshot holds the lock every {what} takes: nothing gets in")


@contextlib.contextmanager
def collections_watched(on_collection):
    """The block runs with a collection at nearly every allocation of an object the collector
    tracks, each starting with ``on_collection()``, as a thread switching in would. CPython's free
    lists of tuples and lists are emptied first (held), else their allocations count towards none."""
    def collector_ran(phase, info):
        if phase == "start":
            on_collection()

    hold = [tuple(range(size)) for size in range(1, 9) for _ in range(2_500)] + [[] for _ in range(200)]
    threshold = gc.get_threshold()
    gc.callbacks.append(collector_ran)
    gc.set_threshold(1)
    try:
        yield
    finally:
        gc.callbacks.remove(collector_ran)
        gc.set_threshold(*threshold)
        del hold


def test_core_snapshot_is_one_moment_even_when_it_runs_the_collector(core):
    """The compiled core's snapshot relies on the GIL, and an allocation may run the garbage
    collector, whose callbacks (Python code) may let another thread in: here each collection moves
    one due job, as the scheduler would. The snapshot still sees every job exactly once."""
    compiled_only(core, "move")
    ready, heap = core.ReadyQueue(1000), core.DelayedHeap(0)
    jobs = [Job("t", n, priority=PRIORITIES[n % 3]) for n in range(50)]
    ready.accept(jobs)
    for n, job in enumerate(jobs):
        heap.push(job, float(n))
    moves = []

    def move_one():  # the next job in: one per collection
        if len(moves) < len(jobs):
            moves.append(ready.move_due(heap, float(len(moves))))

    with collections_watched(move_one):
        sizes, _, _, waiting_for_room, delayed = ready.snapshot(heap, now=1000.0)
        after = len(moves)
    assert after > 0, "no collection ran: the test shows nothing"
    assert sum(sizes) + waiting_for_room + delayed == len(jobs), (sizes, waiting_for_room, delayed, after)


def test_a_cancel_taking_a_ready_job_out_counts_it_in_that_step_even_when_the_collector_runs(core):
    """The compiled core's mark_cancel counted a ready job cancelled, then looked for it in the
    buffer; the search allocates, so the collector may run (Python code: other threads get in), and
    a snapshot meanwhile saw the job both ready and cancelled (seen in CI: 1002 of 1001 jobs). Here
    each collection takes a snapshot, as a thread switching in would."""
    compiled_only(core, "cancel")
    ready = core.ReadyQueue(1000)
    for job_type in ("a", "b", "t"):  # (the search walks every type)
        ready.configure(job_type, lambda job: None, 1, None, False, False)
    jobs = [Job("t", n, id=f"job-{n}", priority=PRIORITIES[n % 3]) for n in range(50)]
    assert all(ready.push(job) for job in jobs)
    seen = []

    def look():
        sizes, counters, _, waiting_for_room, delayed = ready.snapshot()
        seen.append(sum(sizes) + waiting_for_room + delayed + counters[core.CANCELLED])

    with collections_watched(look):
        outcomes = [ready.mark_cancel(job.id)[0] for job in jobs[::-1]]  # the last one: the longest search
    assert outcomes == [core.CANCEL_REMOVED] * len(jobs)
    assert seen, "no collection ran: the test shows nothing"
    assert set(seen) == {len(jobs)}, f"snapshots saw {sorted(set(seen))} of {len(jobs)} jobs"
    assert ready.counters()[core.CANCELLED] == len(jobs)


# --- the compiled core's steps, each with a snapshot at every collection ---------------------

def line_up(n, spare):
    """Before the ``n``-th step: take the tuple of one that the last step freed (CPython keeps it for
    reuse: the step's own is allocated anew), collect (the count towards the next collection starts
    again), and allocate ``n % 3`` more (sets have no free list): from step to step, collections
    fall on each of the step's allocations."""
    spare.append((n,))
    gc.collect(0)
    spare.extend([set() for _ in range(n % 3)])


def books(core, ready, heap=()):
    """``(jobs in a place or ended, jobs accepted)`` as one snapshot sees them: equal at every moment.
    A place: ready, owed room, running (a registered executor's), or in ``heap`` (none due here).
    (Nothing here frees a tuple of one, such as snapshot()'s arguments or a closure's cells: it would
    go back to CPython's free list, and the core's next one would come from there, with no collection.)"""
    sizes, counters, types, waiting_for_room, _ = ready.snapshot()
    running = sum(fields[0] for fields in types.values())
    ended = counters[core.SUCCEEDED] + counters[core.FAILED] + counters[core.CANCELLED] + counters[core.EVICTED]
    return sum(sizes) + waiting_for_room + len(heap) + running + ended, counters[core.ENQUEUED]


def test_a_delayed_job_pushed_out_is_counted_in_the_step_that_pushes_it_even_when_the_collector_runs(core):
    """The compiled core's accept_delayed (and push_many_delayed, through the same _accept) pushed a
    new job onto a full delayed heap, which pushed the earliest out, then registered the new ids
    (dict.update allocates a tuple for its arguments when CPython has none to reuse: the collector
    may run, other threads get in), and only then counted the pushed-out job: a snapshot meanwhile
    saw it in no place."""
    compiled_only(core, "accept")
    ready, heap = core.ReadyQueue(10), core.DelayedHeap(1)
    seen, spare = [], []
    with collections_watched(lambda: seen.append(books(core, ready, heap))):
        for n in range(50):
            job = Job("t", n, id=f"job-{n}")
            line_up(n, spare)
            ready.accept_delayed(job, heap, 1.0 + n)
    assert seen, "no collection ran: the test shows nothing"
    assert [moment for moment in seen if moment[0] != moment[1]] == []
    assert ready.counters()[core.EVICTED] == 49 and len(heap) == 1


def test_jobs_accepted_as_ended_are_counted_ended_in_that_step_even_when_the_collector_runs(core):
    """``accept(jobs, counter)`` (jobs recovered as crashed) counted them accepted, registered their
    ids (allocating, as above), and only then counted their ends: a snapshot meanwhile saw them
    accepted and in no place."""
    compiled_only(core, "accept")
    ready = core.ReadyQueue(10)
    seen, spare = [], []
    with collections_watched(lambda: seen.append(books(core, ready))):
        for n in range(50):
            job = Job("t", n, id=f"job-{n}")
            line_up(n, spare)
            ready.accept([job], core.FAILED)
    assert seen, "no collection ran: the test shows nothing"
    assert [moment for moment in seen if moment[0] != moment[1]] == []
    assert ready.counters()[core.FAILED] == 50


def test_a_batch_of_new_types_is_counted_with_its_places_even_when_the_collector_runs(core):
    """The compiled core's push_many_delayed made the state of a job type it had not seen as it
    placed that type's first job (allocating: the collector may run), after placing the batch's
    delayed job and its earlier ready ones and before counting any: a snapshot meanwhile saw jobs
    placed that were not accepted."""
    compiled_only(core, "push_many")
    ready, heap = core.ReadyQueue(1000), core.DelayedHeap(0)
    seen = []
    with collections_watched(lambda: seen.append(books(core, ready, heap))):
        for n in range(20):
            batch = [Job(f"type-{n}-{k}", k) for k in range(5)]
            assert ready.push_many_delayed(batch, [Job("t", n)], heap, [1.0]) == []
    assert seen, "no collection ran: the test shows nothing"
    assert [moment for moment in seen if moment[0] != moment[1]] == []
    assert len(ready) == 100 and len(heap) == 20


def owed_room_of_a_forgotten_type(core, job_type):
    """A full queue (one ready job of a registered type) where a job of the unregistered
    ``job_type`` is owed room, after the last attempt of that type ended (its state forgotten)."""
    ready = core.ReadyQueue(1)
    configure(ready, "t", lambda job: None)
    assert ready.push(Job(job_type, "ran"))
    job, state = ready.pop_with_type(timeout=0)
    assert ready.push(Job("t", "ready"))
    ready.accept_ready(Job(job_type, "owed"))
    ready.end(job, core.FAILED, state)  # (no executor: it fails, and its slot is freed)
    return ready


def test_a_job_owed_room_moves_in_counted_even_when_its_type_was_forgotten(core):
    """The compiled core forgot an unregistered type as its last attempt ended even while a job of
    it was owed room; the pop that moved that job in then made the type's state again (allocating:
    the collector may run), with the job out of the overflow line and not yet ready: a snapshot
    meanwhile missed it."""
    compiled_only(core, "pop")
    queues = [owed_room_of_a_forgotten_type(core, f"x{n}") for n in range(20)]
    seen = []
    with collections_watched(lambda: seen.extend(books(core, ready) for ready in queues)):
        for ready in queues:
            assert ready.pop(timeout=0).payload == "ready"
    assert seen, "no collection ran: the test shows nothing"
    assert [moment for moment in seen if moment[0] != moment[1]] == []
    assert all(ready.sizes() == (0, 1, 0) and ready.overflow_size == 0 for ready in queues)


def test_a_worker_counts_a_success_in_the_step_that_frees_its_slot_even_when_that_wakes_the_loop(core):
    """The compiled run_worker freed a successful attempt's slot, which may hand the type's next job
    on and wake the event loop (Python code: other threads get in), before it counted the success:
    a snapshot meanwhile missed the job. Here the type is registered again as an async one while its
    attempt runs, so freeing the slot wakes the loop, whose waker takes a snapshot."""
    compiled_only(core, "success")
    ready = core.ReadyQueue(10)
    started, go = threading.Event(), threading.Event()

    def fn(job):
        started.set()
        assert go.wait(WAIT)

    configure(ready, "t", fn)
    seen = []
    ready.set_loop_waker(lambda: seen.append(books(core, ready)))
    assert ready.push(Job("t", 1)) and ready.push(Job("t", 2))
    worker = Worker(core, ready, FakeDispatcher(ready))
    try:
        assert started.wait(WAIT)
        ready.configure("t", fn, 1, None, False, False, core.LOOP)  # job 2 is the loop's now
        go.set()
        assert wait_until(lambda: ready.counters()[core.SUCCEEDED] == 1)
    finally:
        go.set()
        ready.close()
        worker.join()
    assert seen == [(2, 2)]


def test_the_loop_counts_a_success_in_the_step_that_frees_its_slot_even_when_that_wakes_the_loop(core):
    """loop_attempt_succeeded, as run_worker above: it freed the slot (a hand-off may wake the event
    loop) before it counted the success. Here the type, registered again for worker threads while
    the loop ran its attempt, has a job waiting for an idle worker; handing it over reopens the
    closed rate window of another async type, which wakes the loop, whose waker takes a snapshot."""
    compiled_only(core, "success")
    ready = core.ReadyQueue(10)
    ready.configure("s", lambda job: None, 1, None, False, False, core.LOOP)
    # (A window long enough that the getter below is idle before it opens: a _take after the opening
    # reopens it, and then no hand-off does.)
    ready.configure("r", lambda job: None, 5, None, False, False, core.LOOP, RateLimit(max_starts=1, per=1.0))
    handed = deque()
    ready.set_loop_waker(None, handed)
    for job in (Job("s", 1), Job("s", 2), Job("r", 1), Job("r", 2)):
        assert ready.push(job)
    (s1, s_state), (r1, r_state) = loop_takes(ready, 8, handed)  # s is saturated, r's window closed
    assert loop_takes(ready, 8, handed) == []  # the loop waits for a wake-up
    assert ready.loop_attempt_succeeded(r_state, 0.0, r1)
    ready.configure("s", lambda job: None, 1, None, False, False, core.THREADS)
    seen = []
    ready.set_loop_waker(lambda: seen.append(books(core, ready)))
    popped = []
    getter = threading.Thread(target=lambda: popped.append(ready.pop(timeout=WAIT)))
    getter.start()
    try:
        wait_idle(ready)
        assert wait_until(lambda: core.monotonic() >= ready.next_rate_opening())
        assert ready.loop_attempt_succeeded(s_state, 0.0, s1)
        getter.join(WAIT)
    finally:
        ready.close()
        getter.join(WAIT)
    assert [job.payload for job in popped] == [2]
    assert seen == [(4, 4)]


def test_a_cancel_and_an_end_decided_while_it_searches_the_buffer_agree(core):
    """The compiled core's mark_cancel marked the job ENDING (an end decided), searched the ready
    buffer (allocating: the collector may run, other threads get in), and, not finding it there,
    marked it REQUESTED. A holder that decided the job's end meanwhile saw no cancel and counted a
    success; the cancel then said MARKED as well (cancel() True for a job reported succeeded), and
    its mark outlived the job: the next job with that id was cancelled by it. Here the holder is
    the collection's callback, as a thread switching in would be."""
    compiled_only(core, "cancel")
    ready = core.ReadyQueue(1000)
    configure(ready, "t", lambda job: None, limit=5)
    for n in range(20):  # (jobs to search past)
        assert ready.push(Job("t", n, id=f"other-{n}"))
    assert ready.push(Job("t", "x", id="x", priority=Priority.HIGH))
    job, state = ready.pop_with_type(timeout=0)
    assert job.id == "x"
    decided = []

    def holder_ends_it():
        if not decided:
            decided.append(ready.attempt_succeeded(state, 0.0, job, True, True))

    with collections_watched(holder_ends_it):
        outcome, _ = ready.mark_cancel("x")
    assert decided, "no collection ran: the test shows nothing"
    if not decided[0]:  # the cancel came first: the holder ends the job as cancelled
        ready.task_done(job)
    assert (decided[0], outcome) in [(True, core.CANCEL_UNKNOWN), (False, core.CANCEL_MARKED)]
    again = Job("t", "again", id="x")
    assert ready.push(again)
    assert not ready.cancel_requested(again)
