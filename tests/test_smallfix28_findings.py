"""Defects taken up by smallfix (session 28: known defects carried over from session 27), each with its test.
"""
import sys
import threading
import time

import pytest

from tinymq import Config, Job, Queue

from _helpers import STORES, WAIT, queue_with_store, wait_until

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


# --- 2. stop() of thousands of idle workers ---------------------------------------------------

# Idle workers wait in the core's pop. close() woke them all at once, and in the compiled core it
# did so holding the GIL: thousands of threads then waited for the GIL together, waking every few
# milliseconds, and starved the threads that held it (close() alone took seconds for 4,000, and
# grew faster than the count). Each worker now wakes the next as it leaves the core.
IDLE_POPPERS = 5000
SET_UP_WAIT = 6 * WAIT  # for the poppers to start and block: set-up, not what is measured


def test_close_lets_thousands_of_idle_poppers_return_soon(core):
    q = core.ReadyQueue(10)
    barrier = threading.Barrier(IDLE_POPPERS + 1)
    returned = []

    def popper():
        barrier.wait(SET_UP_WAIT)
        returned.append(_pop_once(q))

    threads = [threading.Thread(target=popper, daemon=True) for _ in range(IDLE_POPPERS)]
    for thread in threads:
        thread.start()
    barrier.wait(SET_UP_WAIT)
    # (set-up only, bounded loosely: thousands of threads start slowly on a loaded machine, and each
    # look at their frames costs, so the looks are spaced)
    assert wait_until(lambda: _all_in_pop(threads), SET_UP_WAIT, 0.05), "the poppers never blocked in pop()"
    began = time.monotonic()
    q.close()
    for thread in threads:
        thread.join(WAIT)
    took = time.monotonic() - began
    assert not any(thread.is_alive() for thread in threads), "close() left a popper blocked"
    assert returned == [None] * IDLE_POPPERS
    assert took < WAIT / 2, f"{IDLE_POPPERS} idle poppers took {took:.1f} s to return after close()"


def _pop_once(q):
    return q.pop()


def _all_in_pop(threads):
    """Whether each thread is inside its ``q.pop()`` call, as far as Python frames show (the
    compiled core's frames are not Python's: its caller's frame stands for it)."""
    frames = sys._current_frames()
    for thread in threads:
        frame = frames.get(thread.ident)
        while frame is not None and frame.f_code is not _pop_once.__code__:
            frame = frame.f_back
        if frame is None:
            return False
    return True


# stop() waited for the workers by listing, at each wake-up (each worker that exited), every
# worker left that was not retired, and the watchdog, woken by each exit too, did the same: the
# looks grew with the square of the workers (with the lock contention of 10,000 exiting workers,
# start_dispatcher(10000) then stop() took tens of seconds). The workers still running are now
# listed once; each later look pops those gone off the list's end, and only the last worker out
# tells stop() and the watchdog.
STOPPED_WORKERS = 2000


def test_stop_of_thousands_of_idle_workers_looks_at_each_a_few_times(monkeypatch):
    from tinymq import _dispatch

    listed = []
    running_workers = _dispatch.Dispatcher._running_workers

    def counted(self):
        listed.append(len(self._slots))
        return running_workers(self)

    monkeypatch.setattr(_dispatch.Dispatcher, "_running_workers", counted)
    q = Queue(10)
    try:
        q.register_executor("t", lambda job: None)
        q.start_dispatcher(STOPPED_WORKERS)
        del listed[:]
        began = time.monotonic()
        q.stop()
        took = time.monotonic() - began
        assert sum(listed) <= 3 * STOPPED_WORKERS, f"stop() looked at workers {sum(listed)} times"
        assert took < WAIT, f"stop() of {STOPPED_WORKERS} idle workers took {took:.1f} s"
        assert not q._dispatcher._slots  # (stop() waited for every worker)
    finally:
        q.stop(wait=False)
