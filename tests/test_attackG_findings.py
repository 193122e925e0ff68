"""Reference cycles through jobs that rest in the compiled core's ready FIFOs.

The compiled core hides a resting job from the cyclic garbage collector (see
``_resting`` in ``tinymq/_core.pyx``). Whatever it does, a cycle through a job
must be freed by ``gc.collect()`` once nothing outside the cycle holds it, on
both cores, as the pure core (a deque the collector walks) frees it.
"""

import asyncio
import gc
import os
import subprocess
import sys
import threading
import time
import weakref

import pytest

import tinymq

from conftest import COMPILED_CORE, PURE_CORE, env_flag, load_twin

MEDIUM = 1


class Job:
    """The smallest job the core accepts, with a back-reference a cycle can go through."""

    __slots__ = ("type", "priority", "_id", "back", "__weakref__")

    def __init__(self, id=None, priority=MEDIUM, back=None):
        self.type = "a"
        self.priority = priority
        self._id = id
        self.back = back


def collected(ref):
    gc.collect()
    return ref() is None


@pytest.mark.parametrize("core_name", [PURE_CORE, COMPILED_CORE], ids=["pure", "compiled"])
@pytest.mark.parametrize("job_id", [None, "x"], ids=["unnamed", "named"])
@pytest.mark.parametrize("priority", [0, 1, 2])
def test_a_ready_queue_in_a_cycle_with_its_resting_job_is_collected(core_name, job_id, priority):
    # A job holding the queue it waits in (a job that enqueues follow-ups there):
    # dropped without being popped, the queue and the job are one cyclic garbage.
    core = load_twin(core_name)
    q = core.ReadyQueue(10)
    job = Job(job_id, priority, back=q)
    assert q.push(job)
    ref = weakref.ref(job)
    del job
    assert not collected(ref)  # the queue holds it
    del q
    assert collected(ref)


# --- through the public API: every way a job in a cycle goes in and out of a ready FIFO ---------
# Each test fails on the compiled core if a way out of a FIFO forgets to show the job to the
# collector again (the job stays hidden, its cycle is never freed).

WAIT = 10.0  # generous bound on a noisy machine


class Payload:
    """Weakly referenceable, and holds the job that carries it: a cycle through the job."""

    def __init__(self):
        self.job = None
        self.kept = None


def cyclic_job(refs, job_type="t", **kwargs):
    payload = Payload()
    job = tinymq.Job(job_type, payload, **kwargs)
    payload.job = job
    refs.append(weakref.ref(payload))
    return job


class CyclicJob(tinymq.Job):
    """A Job subclass in a cycle with itself, with a payload a store can save."""

    __slots__ = ("itself", "__weakref__")


def cyclic_subclass_job(refs):
    job = CyclicJob("t", {"n": 1})
    job.itself = [job]
    refs.append(weakref.ref(job))
    return job


def assert_all_freed(refs):
    gc.collect()
    assert [ref() for ref in refs] == [None] * len(refs)


def noop(job):
    pass


def _run_by_threads(q, refs):
    q.register_executor("t", noop)
    q.enqueue_many([cyclic_job(refs), cyclic_job(refs, priority=tinymq.Priority.HIGH)])
    q.enqueue(cyclic_job(refs, priority=tinymq.Priority.LOW))
    q.start_dispatcher(2)


def _run_by_the_loop(q, refs):
    async def run(job):
        pass

    q.register_executor("t", run)
    q.enqueue(cyclic_job(refs))
    q.start_dispatcher(1)


def _cancelled_while_ready(q, refs):
    job = q.enqueue(cyclic_job(refs))
    assert q.cancel(job.id) is True


def _retried_then_ran(q, refs):
    def fail_once(job):
        if job.retries == 0:
            raise ValueError("first attempt")

    q.register_executor("t", fail_once)
    q.enqueue(cyclic_job(refs, retry_config=tinymq.RetryConfig(max_retries=1, initial_delay=0.01)))
    q.start_dispatcher(1)


def _enqueued_again_after_its_failure(q, refs):
    def fail_first(job):
        if job.payload.kept is None:
            raise tinymq.PermanentFailure("once")

    @q.on_failure
    def keep(job, reason, exc):
        job.payload.kept = exc  # the exception's traceback holds frames that hold the job

    q.register_executor("t", fail_first)
    job = q.enqueue(cyclic_job(refs))
    q.start_dispatcher(1)
    assert q.join(timeout=WAIT)
    q.enqueue(job)  # finished (its callbacks returned): it may be enqueued again


def _waited_in_the_overflow(q, refs):
    # buffer_size=1: a held job runs, a second of its type rests (limit 1), so the buffer is
    # full when the delayed job falls due: it waits owed room, then rests, then runs.
    release = threading.Event()
    started = threading.Event()

    def hold(job):
        started.set()
        assert release.wait(WAIT)

    q.register_executor("hold", hold, tinymq.ExecutorConfig(max_concurrent_jobs=1))
    q.register_executor("t", noop)
    q.enqueue(tinymq.Job("hold"))
    q.start_dispatcher(2)
    assert started.wait(WAIT)
    q.enqueue(tinymq.Job("hold"))
    q.enqueue_delayed(cyclic_job(refs), 0.05)
    deadline = time.monotonic() + WAIT  # until the scheduler moved it to the overflow line
    while q.get_stats().waiting_for_room != 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    release.set()


@pytest.mark.parametrize("path", [
    _run_by_threads, _run_by_the_loop, _cancelled_while_ready, _retried_then_ran,
    _enqueued_again_after_its_failure, _waited_in_the_overflow,
])
def test_a_job_in_a_cycle_is_freed_after_its_way_through_the_queue(path):
    refs = []
    q = tinymq.Queue(1 if path is _waited_in_the_overflow else 10)
    path(q, refs)
    assert q.join(timeout=WAIT)
    q.stop()
    del q
    assert_all_freed(refs)


@pytest.mark.parametrize("store", [False, True], ids=["no_store", "sqlite"])
def test_jobs_in_cycles_left_queued_at_stop_are_freed_with_the_queue(tmp_path, store):
    refs = []
    q = tinymq.Queue(10)
    if store:
        q.set_persistence(tinymq.SQLitePersistence(str(tmp_path / "jobs.db")))
    q.register_executor("t", noop)
    q.enqueue_many([cyclic_subclass_job(refs) for _ in range(3)])
    if not store:
        q.enqueue(cyclic_job(refs))
    q.stop(wait=False)
    del q
    assert_all_freed(refs)


def _stop(q):
    q.stop(wait=False)


def _astop(q):
    asyncio.run(q.astop(wait=False))


@pytest.mark.parametrize("stop", [_stop, _astop], ids=["stop", "astop"])
@pytest.mark.parametrize("started", [False, True], ids=["never_started", "started"])
def test_a_stopped_queue_whose_queued_job_holds_it_is_freed(started, stop):
    # A job that holds its own queue (to enqueue follow-ups), still queued at stop():
    # once stopped, nothing outside the cycle may keep the queue alive.
    # stop(wait=False) does not wait for the queue's threads to end: until one has, it may hold the
    # job (the worker failing it as no_executor, if it took it) or the dispatcher, and a loaded
    # machine delayed that past the collection. Joined first: what is asserted is what holds the
    # queue and its job once they ended.
    refs = []
    q = tinymq.Queue(10)
    job = cyclic_job(refs, "unregistered")  # never runs: it stays queued
    job.payload.queue = q
    q.enqueue(job)
    before = set(threading.enumerate())
    if started:
        q.start_dispatcher(1)
    threads = set(threading.enumerate()) - before  # the queue's
    stop(q)
    for thread in threads:
        thread.join(WAIT)
        assert not thread.is_alive()
    del q, job, threads
    assert_all_freed(refs)


def test_astop_stops_the_schedules_as_stop_does():
    q = tinymq.Queue(10)
    q.register_executor("t", noop)
    q.every(3600, "t")
    q.start_dispatcher(1)
    timers = [t for t in threading.enumerate() if t.name == "tinymq-periodic"]
    assert timers
    asyncio.run(q.astop())
    for timer in timers:
        timer.join(WAIT)
        assert not timer.is_alive()


@pytest.mark.parametrize("core_name", [PURE_CORE, COMPILED_CORE], ids=["pure", "compiled"])
def test_a_delayed_heap_in_a_cycle_with_its_job_is_collected(core_name):
    core = load_twin(core_name)
    heap = core.DelayedHeap()
    job = Job(back=heap)
    heap.push(job, 1e9)
    ref = weakref.ref(job)
    del job
    assert not collected(ref)  # the heap holds it
    del heap
    assert collected(ref)


def test_a_stopped_queue_whose_delayed_job_holds_it_is_freed():
    refs = []
    q = tinymq.Queue(10)
    job = cyclic_job(refs)
    job.payload.queue = q
    q.enqueue_delayed(job, 3600)
    q.stop(wait=False)
    del q, job
    assert_all_freed(refs)


# --- a job enqueued by code the collector runs inside the core ---------------------------------
#
# The compiled core's steps allocate nothing, so the collector runs only between two of them, and
# what it runs may call the queue as anywhere else. The pure core's steps allocate: the collector
# runs inside them too, on the thread that holds the core's lock, and a call back into the core
# from there deadlocked that thread (it waited for its own plain Lock). It is refused now, with a
# RuntimeError saying why (the step is half done), and the queue stays whole.

CALLED_FROM_THE_COLLECTOR = """
import gc, sys, tinymq
from tinymq import Job
REFUSED = "tinymq's pure-Python core was called from code that ran inside one of its own steps"
q = tinymq.Queue(config=tinymq.Config(buffer_size=100000, max_delayed_jobs=100000))
busy, outcomes = [], {"enqueued": 0, "named": 0, "refused": 0}
def attempt(outcome, call):
    try:
        call()
    except RuntimeError as error:
        if not str(error).startswith(REFUSED):
            raise
        outcomes["refused"] += 1
    else:
        outcomes[outcome] += 1
def on_gc(phase, info):  # like a __del__ or weakref callback that calls the queue
    if phase == "start" and not busy:
        busy.append(1)
        try:
            attempt("enqueued", lambda: q.enqueue(Job("cleanup")))
            attempt("enqueued", lambda: q.enqueue_delayed(Job("later"), 3600))
            attempt("named", lambda: Job("named").id)
        finally:
            busy.pop()
gc.callbacks.append(on_gc)
gc.set_threshold(1)  # a collection at (nearly) every allocation, the core's own included
for i in range(100):
    q.enqueue(Job("t"))
    q.enqueue(Job("t", id=f"t{i}"))
    q.enqueue_delayed(Job("d"), 3600).id
    q.cancel(f"t{i}")
    q.get_stats()
gc.set_threshold(700, 10, 10)
gc.callbacks.remove(on_gc)
stats = q.get_stats()
assert stats.jobs_enqueued == 300 + outcomes["enqueued"], (stats, outcomes)
assert stats.medium_queue_size + stats.delayed_jobs_count + stats.jobs_cancelled == stats.jobs_enqueued, stats
assert stats.jobs_cancelled == 100, stats
q.stop(wait=False)
print(outcomes["enqueued"], outcomes["named"], outcomes["refused"])
"""


@pytest.mark.parametrize("no_extensions", [True, False], ids=["pure", "compiled"])
def test_code_the_collector_runs_inside_the_core_may_call_the_queue_without_deadlock(no_extensions):
    if not no_extensions and (env_flag("TINYMQ_NO_EXTENSIONS") or not tinymq.HAS_EXTENSION):
        pytest.skip("the compiled core is not in use")
    env = dict(os.environ, TINYMQ_NO_EXTENSIONS="1" if no_extensions else "")
    try:
        done = subprocess.run([sys.executable, "-c", CALLED_FROM_THE_COLLECTOR], env=env,
                              capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("deadlocked: no answer in 60 s")
    assert done.returncode == 0, done.stderr
    enqueued, named, refused = map(int, done.stdout.split())
    assert enqueued > 100 and named > 50, done.stdout  # most collections run between two steps
    if no_extensions:
        assert refused > 0, "no collection ran inside a step of the pure core: the test tests nothing"
    else:
        assert refused == 0, done.stdout
