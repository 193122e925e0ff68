"""Defects a review of session 32's changes found (review32).

1. ``ReadyQueue.close()`` takes back the jobs handed to workers that have not returned them
   (fix32): it went through a ``weakref.WeakSet`` of every worker's waiter, whose iteration is
   Python code. On the compiled core, whose steps hold no lock but the GIL, a worker starting
   meanwhile (``run_worker`` enlists its waiter first: a replacement worker, one of a pool still
   starting) or a ``pop()`` that waits added to the set while close() iterated it: close() raised
   ``RuntimeError: Set changed size during iteration`` half done (closed, its idle workers never
   woken, so ``stop()`` waited for them for good).
"""
import sys
import threading

import pytest

from _helpers import WAIT, wait_until


def test_close_while_workers_enlist_completes(core):
    """Workers enlisting as the queue closes (each thread's first step in run_worker) never make
    close() fail: it completes, and the idle worker waiting in pop() is woken by it."""
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # threads switch often: the enlisting threads run inside close()
    try:
        for _ in range(60):  # (on the compiled core, most runs failed within a few rounds)
            ready = core.ReadyQueue(10)
            kept = [core._Waiter() for _ in range(3000)]  # the waiters of a big pool: a long iteration
            for waiter in kept:
                ready.enlist(waiter)
            popped = []
            idle = threading.Thread(target=lambda: popped.append(ready.pop()), daemon=True)
            idle.start()
            done = threading.Event()

            def enlisting():
                while not done.is_set():
                    ready.enlist(core._Waiter())  # as each worker thread starting does

            starters = [threading.Thread(target=enlisting, daemon=True) for _ in range(2)]
            for starter in starters:
                starter.start()
            try:
                ready.close()
            finally:
                done.set()
                for starter in starters:
                    starter.join(WAIT)
            idle.join(WAIT)
            assert not idle.is_alive(), "close() did not wake the worker waiting in pop()"
            assert popped == [None]
    finally:
        sys.setswitchinterval(switch_interval)


# --- 2. Code the collector runs inside a Redis link's round ------------------------------------------
#
# A round (fetch.lua: settle ops, fetch) holds the link's _round_lock across code that allocates
# (decoding the fetched jobs, placing them in the core): the garbage collector may run a __del__
# there. fix32 made the link's _lock refuse such code's calls (RuntimeError) where it waited for its
# own thread; _round_lock stayed a plain Lock outside that. A cancel() there of a job whose outcome
# this process had decided, its op waiting for a round (attack32's _send_decided sends it first, in
# a round of its own), waited for _round_lock, held by its own thread: the pump (or the worker
# whose round it was) hung for good, and so did stop(). The script holds _round_lock in a thread, as
# a round does, while a success's op waits, and drops there an object whose __del__ cancels the job.
REFUSED = "was called from code that ran inside one of tinymq's own locked sections"

CANCEL_INSIDE_A_ROUND = r"""
import os, sys, threading, time
from tinymq import Job, Queue
from tinymq.redis import RedisBroker

REFUSED, url = sys.argv[1], sys.argv[2]
q = Queue(broker=RedisBroker(url, name="review32-round", lease=2.0))
running, finish = threading.Event(), threading.Event()

def work(job):
    running.set()
    finish.wait(30)

q.register_executor("t", work)
q.start_dispatcher(1)
q.enqueue(Job("t", id="done"))
assert running.wait(30), "the job did not start"
link = q._link
outcomes = []

class CancelsTheJob:
    def __del__(self):
        try:
            outcomes.append(f"cancel {q.cancel('done')}")
        except Exception as error:
            outcomes.append("cancel refused" if REFUSED in str(error) else f"cancel {error!r}")

holder = [CancelsTheJob()]

def inside_a_round():
    with link._round_lock:
        finish.set()  # its success is counted, and its op queued for a round this thread holds off
        deadline = time.monotonic() + 30
        while not any(op.op == "S" for op in link._ops) and time.monotonic() < deadline:
            time.sleep(0.005)
        outcomes.append(f"queued {[op.op for op in link._ops]}")
        holder.clear()  # its __del__ runs here, as the collector would run it in a round

thread = threading.Thread(target=inside_a_round, daemon=True)
thread.start()
thread.join(30)
if thread.is_alive():
    print("deadlocked", flush=True)
    import faulthandler
    faulthandler.dump_traceback(all_threads=True)
    os._exit(3)
print(*outcomes, sep="\n", flush=True)
print("joined", q.join(timeout=20), "succeeded", q.get_stats().jobs_succeeded, flush=True)
q.stop()
print("stopped", flush=True)
"""


def test_a_cancel_from_code_the_collector_runs_inside_a_round_is_refused_not_deadlocked(redis_url):
    from test_attack30d_findings import run_python

    done = run_python(CANCEL_INSIDE_A_ROUND, REFUSED, redis_url)
    lines = done.stdout.splitlines()
    assert done.returncode == 0 and "deadlocked" not in lines, (done.stdout, done.stderr[-3000:])
    assert lines == ["queued ['S']", "cancel refused", "joined True succeeded 1", "stopped"], lines


# --- 3. A slot freed after close() handed a ready job to an idle worker ------------------------------
#
# fix32: close() takes back the jobs handed to workers that have not returned them, so that no
# snapshot after it counts as running a job its worker gives back unstarted. But a hand-off could
# still come after close(): an attempt that ends then frees its type's slot, and the core handed
# the type's next ready job to a worker still waiting in pop() (close() wakes the idle workers one
# after another), which counted it as running (active_jobs) until that worker woke and gave it
# back (handing it to the next idle worker, and so on). The test thread keeps the GIL (as in
# fix32's test), so the idle workers cannot run between the steps it looks at.
def test_a_slot_freed_after_close_hands_no_job_to_an_idle_worker(core):
    from test_core_run_worker import FakeDispatcher, Worker, configure, wait_idle

    ready = core.ReadyQueue(1000)
    dispatcher = FakeDispatcher(ready)
    configure(ready, "t", lambda job: None, limit=1)
    assert ready.push(core_job("running"))
    job, state = ready.pop_with_type(0)  # an attempt holds the type's only slot
    assert ready.push(core_job("next"))  # ready, waiting for that slot
    workers = [Worker(core, ready, dispatcher) for _ in range(2)]
    if hasattr(ready, "_getters"):
        assert wait_until(lambda: len(ready._getters) == 2)
    else:
        wait_idle(ready)
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(1000.0)  # this thread keeps the GIL: the idle workers cannot run yet
    try:
        ready.close()
        ready.release_state(state)  # the attempt ends after close()
        after = ready.sizes(), ready.executor_stats()
    finally:
        sys.setswitchinterval(switch_interval)
    for worker in workers:
        worker.join()
    assert after == ((0, 1, 0), {"t": (0, 1)}), "a job handed to an idle worker after close() counts as running"
    assert (ready.sizes(), ready.executor_stats()) == ((0, 1, 0), {"t": (0, 1)})
    assert dispatcher.names() == []


def core_job(job_id):
    from tinymq import Job

    return Job("t", job_id, id=job_id)


# --- A stress of stop() as jobs are handed to idle workers (what held) -------------------------------
#
# Idle workers, a batch handed to them at once, cancels of some, and stop() at that moment (with
# or without waiting), with threads switching often: every job runs at most once; what ran, what
# was cancelled and what is left ready add up to the batch; nothing counts as running after stop();
# and with a store, the jobs left are stored as ready, and a new queue on the store runs each once.
@pytest.mark.parametrize("with_store", [False, True])
def test_stop_as_jobs_are_handed_to_idle_workers_runs_each_job_at_most_once(tmp_path, with_store):
    import collections
    import random
    import time

    from tinymq import ExecutorConfig, Job, Queue, SQLitePersistence

    rng = random.Random(32)
    for round_ in range(6):
        ran = collections.Counter()
        lock = threading.Lock()

        def work(job):
            with lock:
                ran[job.payload] += 1

        path = str(tmp_path / f"round{round_}.db")
        q = Queue(1000)
        q.register_executor("t", work, ExecutorConfig(max_concurrent_jobs=64))
        store = None
        if with_store:
            store = SQLitePersistence(path)
            q.set_persistence(store)
        n = rng.choice([8, 32])
        q.start_dispatcher(n)
        time.sleep(0.05)  # (the workers wait in pop: not needed for the checks, only for the race)
        cancelled = []
        switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(rng.choice([1e-6, 1e-4]))
        try:
            q.enqueue_many([Job("t", i, id=f"j{i}") for i in range(n)])

            def cancel_some():
                for i in rng.sample(range(n), n // 3):
                    if q.cancel(f"j{i}"):
                        cancelled.append(i)

            canceller = threading.Thread(target=cancel_some)
            canceller.start()
            q.stop(wait=rng.random() < 0.5)
            canceller.join(WAIT)
        finally:
            sys.setswitchinterval(switch_interval)
        # (after stop(wait=False), the attempts still running end on their own)
        assert wait_until(lambda: q.get_stats().executor_stats["t"].active_jobs == 0)
        stats = q.get_stats()
        with lock:
            done = dict(ran)
        left = stats.high_queue_size + stats.medium_queue_size + stats.low_queue_size
        assert all(count == 1 for count in done.values()), done
        ran_and_cancelled = [i for i in cancelled if i in done]  # (a running attempt, cancelled)
        assert stats.jobs_cancelled == len(cancelled)
        assert stats.jobs_succeeded == len(done) - len(ran_and_cancelled)
        assert len(done) + len(cancelled) - len(ran_and_cancelled) + left == n
        if store is not None:
            again = Queue(1000)
            again.register_executor("t", work)
            again.set_persistence(store)  # (taken over once the stopped queue's attempts ended, their ends written)
            reloaded = again.get_stats()
            assert reloaded.high_queue_size + reloaded.medium_queue_size + reloaded.low_queue_size == left
            again.start_dispatcher(2)
            assert again.join(timeout=WAIT)
            again.stop()
            store.close()
            with lock:
                final = dict(ran)
            assert all(count == 1 for count in final.values()), final
            assert sorted(final) == sorted(set(range(n)) - (set(cancelled) - set(done)))
