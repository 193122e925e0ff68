"""Findings of an outsider's attack on cancel (attackX): each a reproducer of a defect, then its fix.

Every test checks what a user relies on: cancel returns True exactly when the
job is reported "cancelled" exactly once, jobs_cancelled matches, join()
returns, and the queue goes on running other jobs.
"""
import asyncio
import threading
from collections import deque

import pytest

from tinymq import DuplicateJob, ExecutorConfig, Job, PermanentFailure, RetryConfig

from _helpers import QUIET, WAIT, Recorder, loop_takes, make_queue, record_failures

from test_core_run_worker import configure


def test_a_thread_job_that_cancels_itself_with_interrupt_on_timeout_ends_cancelled_once():
    """cancel() of the calling attempt raised JobTimeout inside cancel() itself (the interrupt of
    its own thread landed before the cancel was finished): the job was never reported, join()
    hung, and its worker was not replaced, so no later job ran."""
    returned, ran = Recorder(), Recorder()
    with make_queue() as q:
        failures = record_failures(q, key=lambda job: job.id)

        def cancels_itself(job):
            try:
                returned.add(q.cancel(job.id))
            except BaseException as exc:  # what cancel() raised into its caller
                returned.add(type(exc).__name__)
                raise

        q.register_executor("self", cancels_itself, ExecutorConfig(interrupt_on_timeout=True))
        q.register_executor("next", lambda job: ran.add(job.id))
        q.start_dispatcher(workers=1)
        q.enqueue(Job("self", id="me"))
        assert returned.wait_for(1)
        q.enqueue(Job("next", id="after"))
        assert q.join(WAIT)
        assert returned.snapshot() == [True]
        assert failures.snapshot() == [("me", "cancelled", None)]
        assert ran.snapshot() == ["after"]
        stats = q.get_stats()
        assert (stats.jobs_cancelled, stats.jobs_failed, stats.jobs_succeeded) == (1, 0, 1)


@pytest.mark.parametrize("where", ["running", "delayed", "async"])
def test_a_cancel_whose_job_ended_meanwhile_never_touches_the_new_job_of_its_id(where):
    """A cancel marks running job A, and before it looks for A where it rests, A ends (its
    worker takes the mark: reported cancelled) and a new job B gets A's id. The cancel then
    looked up the places by id: it took B out of the delayed heap (lost: join() hung) or
    decided B's running attempt as cancelled without reporting it."""
    first_started, first_go = threading.Event(), threading.Event()
    second_started, second_go = threading.Event(), threading.Event()
    ran = Recorder()
    with make_queue() as q:
        failures = record_failures(q, key=lambda job: (job.id, job.payload))

        def fn(job):
            if job.payload == "A":
                first_started.set()
                assert first_go.wait(WAIT)
            elif where != "delayed":
                second_started.set()
                assert second_go.wait(WAIT)
            ran.add(job.payload)

        async def afn(job):
            fn(job)  # blocks the loop on purpose: nothing else runs on it meanwhile

        if where == "async":
            q.register_executor("t", afn)
        else:
            q.register_executor("t", fn)
        q.start_dispatcher(workers=2)
        dispatcher = q._dispatcher
        cancel_marked = dispatcher._cancel_marked
        marked, go_on = threading.Event(), threading.Event()

        def held_cancel_marked(job):  # after mark_cancel, before the places are looked at
            marked.set()
            assert go_on.wait(WAIT)
            cancel_marked(job)

        dispatcher._cancel_marked = held_cancel_marked
        q.enqueue(Job("t", id="x", payload="A"))
        assert first_started.wait(WAIT)
        returned = Recorder()
        canceller = threading.Thread(target=lambda: returned.add(q.cancel("x")))
        canceller.start()
        assert marked.wait(WAIT)
        dispatcher._cancel_marked = cancel_marked
        first_go.set()  # A returns; its worker (or the loop) finds the mark: A ends cancelled
        assert failures.wait_for(1)
        if where == "delayed":
            q.enqueue_delayed(Job("t", id="x", payload="B"), 0.5)
        else:
            q.enqueue(Job("t", id="x", payload="B"))
            if where != "delayed":
                assert second_started.wait(WAIT)
        go_on.set()
        canceller.join(WAIT)
        second_go.set()
        assert q.join(WAIT)
        assert returned.snapshot() == [True]
        assert failures.snapshot() == [(("x", "A"), "cancelled", None)]
        assert ran.snapshot() == ["A", "B"]
        stats = q.get_stats()
        assert (stats.jobs_cancelled, stats.jobs_failed, stats.jobs_succeeded) == (1, 0, 1)


@pytest.mark.parametrize("where", ["ready", "delayed"])
def test_two_cancels_of_a_job_enqueued_while_the_first_found_its_id_free_return_true_once(where):
    """A cancel that finds no job registered with the id looks for a job without one (its id
    read after enqueue) in every place; a job enqueued with that id meanwhile was taken there,
    unmarked, so a second cancel marked it as well: both returned True, one report."""
    with make_queue() as q:
        failures = record_failures(q, key=lambda job: job.id)
        q.register_executor("t", lambda job: None)  # never started: the job rests where it is put
        dispatcher = q._dispatcher
        cancel_unregistered, fail = dispatcher._cancel_unregistered, dispatcher.fail
        searching, found = threading.Event(), threading.Event()
        go_on, go_fail = threading.Event(), threading.Event()
        canceller = []

        def held_cancel_unregistered(job_id):  # the id was free when the first cancel looked
            searching.set()
            assert go_on.wait(WAIT)
            return cancel_unregistered(job_id)

        def held_fail(job, *args):  # the first cancel holds the job it took, before it ends it
            if threading.current_thread() in canceller:
                found.set()
                assert go_fail.wait(WAIT)
            return fail(job, *args)

        dispatcher._cancel_unregistered, dispatcher.fail = held_cancel_unregistered, held_fail
        returned = Recorder()
        canceller.append(threading.Thread(target=lambda: returned.add(q.cancel("x"))))
        canceller[0].start()
        assert searching.wait(WAIT)
        dispatcher._cancel_unregistered = cancel_unregistered
        if where == "delayed":
            q.enqueue_delayed(Job("t", id="x"), 60.0)
        else:
            q.enqueue(Job("t", id="x"))
        go_on.set()
        assert found.wait(WAIT)
        returned.add(q.cancel("x"))
        go_fail.set()
        canceller[0].join(WAIT)
        assert sorted(returned.snapshot()) == [False, True]
        assert failures.snapshot() == [("x", "cancelled", None)]
        assert q.get_stats().jobs_cancelled == 1
        assert q.join(WAIT)


def test_a_cancel_that_takes_a_ready_job_owns_it_even_while_it_wakes_the_event_loop(core):
    """The compiled core's mark_cancel took a ready job out, woke the event loop (Python code: other
    threads may run) and only then marked it: a second cancel meanwhile found the job registered and
    unmarked, marked it and returned True as well (two Trues, one report). Seen with async executors."""
    ready = core.ReadyQueue(2)
    ready.configure("s", lambda job: None, 1, None, False, False, core.LOOP)
    ready.configure("b", lambda job: None, 1, None, False, False, core.LOOP)
    second, armed = [], []

    def waker():  # as a thread switch in the waker would: another cancel of the same id runs now
        if armed and not second:
            other = threading.Thread(target=lambda: second.append(ready.mark_cancel("x")[0]))
            second.append(other)
            other.start()
            other.join(QUIET)  # the pure core holds its lock here: the other cancel waits for it

    handed = deque()
    ready.set_loop_waker(waker, handed)
    assert ready.push(Job("s", id="running"))
    assert len(loop_takes(ready, 8, handed)) == 1  # "s" is saturated from now on
    assert loop_takes(ready, 8, handed) == []  # nothing runnable: the loop waits for a wake-up
    assert ready.push(Job("s", id="x")) and ready.push(Job("s", id="w"))
    ready.requeue(Job("b", id="z"))  # the buffer is full: it waits in the overflow line
    armed.append(True)
    assert ready.mark_cancel("x")[0] == core.CANCEL_REMOVED  # z moves in: the loop is woken
    assert second, "the loop was not woken"
    second[0].join(WAIT)
    assert second[1:] == [core.CANCEL_LOST]


@pytest.mark.parametrize("kind", ["thread", "async"])
def test_cancels_racing_enqueues_of_the_same_ids_end_every_job_once(kind):
    """The race that found the defects above, bounded: two threads cancel three ids in a tight
    loop while a third enqueues jobs with those ids (enqueue, enqueue_many, enqueue_delayed) as
    they become free; the jobs succeed, retry, or fail for good. Every job ends once, cancel
    returns True exactly as often as a job of its id is reported cancelled, the counters match,
    and join() returns."""
    ids = ["a", "b", "c"]
    retry = RetryConfig(max_retries=1, initial_delay=0.001, max_delay=0.005)
    lock = threading.Lock()
    reports, accepted, true_cancels = {}, [], {job_id: 0 for job_id in ids}
    producing = threading.Event()

    def body(job):
        if job.payload % 4 == 1:
            raise ValueError("retried")
        if job.payload % 4 == 2:
            raise PermanentFailure("for good")

    async def async_body(job):
        body(job)
        await asyncio.sleep(0)

    with make_queue(buffer_size=1000) as q:
        q.on_failure(lambda job, reason, exc: reports.setdefault(id(job), []).append(reason))
        q.register_executor("t", async_body if kind == "async" else body, ExecutorConfig(max_concurrent_jobs=3))
        q.start_dispatcher(workers=3)

        def produce():
            n = 0
            while len(accepted) < 150:
                n += 1
                job = Job("t", n, id=ids[n % 3], retry_config=retry)
                try:
                    if n % 3 == 0:
                        q.enqueue_many([job])
                    elif n % 3 == 1:
                        q.enqueue_delayed(job, 0.001)
                    else:
                        q.enqueue(job)
                except DuplicateJob:
                    continue
                accepted.append(job)
            producing.set()

        def cancel():
            n = 0
            while not producing.is_set():
                n += 1
                job_id = ids[n % 3]
                if q.cancel(job_id):
                    with lock:
                        true_cancels[job_id] += 1

        threads = [threading.Thread(target=produce), threading.Thread(target=cancel), threading.Thread(target=cancel)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60.0)
        assert producing.is_set()
        assert q.join(WAIT)
        assert all(len(reasons) == 1 for reasons in reports.values())
        cancelled = {job_id: sum(1 for job in accepted if job.id == job_id and reports.get(id(job)) == ["cancelled"])
                     for job_id in ids}
        assert cancelled == true_cancels
        failed = sum(1 for job in accepted if reports.get(id(job), ["cancelled"]) != ["cancelled"])
        stats = q.get_stats()
        assert (stats.jobs_cancelled, stats.jobs_failed, stats.jobs_succeeded) == (
            sum(cancelled.values()), failed, len(accepted) - sum(cancelled.values()) - failed)


def test_the_core_finds_a_job_by_itself_not_only_by_its_id(core):
    """What the fixes above rely on, on both cores: ``registered(job)`` is True only for the job
    accepted with its id (or named in the queue since: see test_cancel_unnamed.py), not a later
    job given the same id, and ``DelayedHeap.remove(job_id, job)`` takes only that job out."""
    ready = core.ReadyQueue(10)
    configure(ready, "t", lambda job: None)
    first, lazy = Job("t", id="x"), Job("t")
    ready.accept([first, lazy])
    later = Job("t", id="x")
    assert ready.registered(first) and not ready.registered(later)
    lazy.id  # made after it was accepted: registered as it is made
    assert ready.registered(lazy)
    ready.task_done(first)
    assert not ready.registered(first)

    heap = core.DelayedHeap(0)
    heap.push(later, 1.0)
    assert heap.remove("x", first) is None and len(heap) == 1
    assert heap.remove("x", later) is later and len(heap) == 0
