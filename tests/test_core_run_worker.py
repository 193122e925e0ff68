"""``core.run_worker(ready, slot, watchdog_alarm, dispatcher)`` on both cores.

The worker loop keeps the success path to itself and hands everything else to
its dispatcher through the callbacks named in ``run_worker``'s docstring:
``refresh_hooks(slot)``, ``new_context(job)``, ``returned(job, state, result, slot)``,
``attempt_failed(job, state, exc)``, ``no_executor(job, state)`` and
``after_expired(slot, exc)``. A ``FakeDispatcher`` records those calls.

Every worker runs in a thread; closing the ReadyQueue ends it, and the test
joins it with a timeout. The tests use ``push`` only (not ``push_many``,
``accept`` or ``task_done``), so they do not depend on how jobs are counted in.
"""
import math
import sys
import threading
import time

import pytest

from tinymq import Job, RetryConfig

from _helpers import WAIT, Recorder, wait_until


class Boom(Exception):
    pass


class FakeContext:
    cancelled = False  # (run_worker reads it after the attempt: see Dispatcher.cancelled_return)

    def __init__(self, job, deadline):
        self.job, self.deadline = job, deadline


class FakeDispatcher:
    """The dispatcher side of run_worker's callback protocol; records every call.

    Each entry is (callback name, args..., the type's active attempts at call time).
    """

    def __init__(self, ready):
        self.ready = ready
        self.log = Recorder()
        self.contexts = []

    def _active(self, job_type):
        return self.ready.executor_stats().get(job_type, (None, None))[0]

    def refresh_hooks(self, slot):
        self.log.add(("refresh_hooks", slot))

    def new_context(self, job):
        context = FakeContext(job, None)
        self.contexts.append(context)
        self.log.add(("new_context", job))
        return context

    def attempt_failed(self, job, state, exc, holding=False, seconds=None):
        # The worker hands the failure over with the attempt's slot still taken (``holding``) and
        # its duration (``seconds``, recorded by the real dispatcher); the real dispatcher frees
        # the slot where it places the retry or counts the failure: here, at once.
        self.log.add(("attempt_failed", job, state.name, exc, self._active(state.name)))
        if holding:
            self.ready.release_state(state)

    def no_executor(self, job, state):
        self.log.add(("no_executor", job, state.name))

    def cancelled_return(self, job):
        self.log.add(("cancelled_return", job))
        return None  # (a q.cancel decides at the success, as the real one says when not stopping)

    def after_expired(self, slot, exc):
        self.log.add(("after_expired", slot, exc))

    def returned(self, job, state, result, slot):
        self.log.add(("returned", job, state.name, result))
        return False  # (True: it handed the attempt over, with its slot: see the test of that)

    def names(self):
        return [entry[0] for entry in self.log.snapshot()]

    def calls(self, name):
        return [entry for entry in self.log.snapshot() if entry[0] == name]


def wait_idle(ready):
    """Wait until a worker sleeps in pop: exactly on the pure core (its list of sleepers); the
    compiled one has no window into it, so there the thread is given time to get there."""
    if hasattr(ready, "_getters"):
        assert wait_until(lambda: len(ready._getters) >= 1)
    else:
        time.sleep(0.2)


class Worker:
    """``core.run_worker`` in a thread; ``errors`` holds whatever escaped it."""

    def __init__(self, core, ready, dispatcher, slot=None):
        self.slot = core.WorkerSlot() if slot is None else slot
        self.alarm = core.Alarm()
        self.errors = []
        self.returned = threading.Event()

        def target():
            try:
                core.run_worker(ready, self.slot, self.alarm, dispatcher)
            except BaseException as exc:  # reported by the test, not lost in the thread
                self.errors.append(exc)
            finally:
                self.returned.set()

        self.thread = threading.Thread(target=target, name="test-run-worker", daemon=True)
        self.thread.start()

    def join(self, timeout=WAIT):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "run_worker did not return"
        assert self.errors == [], f"run_worker raised {self.errors!r}"


@pytest.fixture
def ready(core):
    """A ReadyQueue that is closed at the end of the test, so no worker thread is left behind."""
    queue = core.ReadyQueue(1000)
    yield queue
    queue.close()


def configure(ready, job_type, fn, limit=1, timeout=None, takes_context=False):
    ready.configure(job_type, fn, limit, timeout, takes_context, False)


def no_retries():
    return RetryConfig(max_retries=0)


# --- success --------------------------------------------------------------------------------

def test_a_successful_attempt_releases_the_slot_counts_and_finishes_the_job(core, ready):
    order = Recorder()
    dispatcher = FakeDispatcher(ready)
    job = Job("t", "payload")

    def fn(job):
        order.add(("fn", job, ready.executor_stats()["t"]))

    configure(ready, "t", fn, limit=1)
    slot = core.WorkerSlot()
    slot.on_start = lambda job: order.add(("on_start", job, ready.executor_stats()["t"]))
    slot.on_success = lambda job: order.add(("on_success", job, ready.executor_stats()["t"],
                                             ready.unfinished))
    assert ready.push(job)
    assert ready.unfinished == 1
    worker = Worker(core, ready, dispatcher, slot)
    try:
        assert ready.join(WAIT), "the job did not finish: unfinished was not decremented"
    finally:
        ready.close()
    worker.join()
    assert order.snapshot() == [
        ("on_start", job, (1, 1)),  # before the function, with the slot taken
        ("fn", job, (1, 1)),
        ("on_success", job, (0, 1), 1),  # slot released; still unfinished while the hook runs
    ]
    assert ready.unfinished == 0
    assert ready.counters()[core.SUCCEEDED] == 1
    assert ready.counters()[core.FAILED] == 0
    assert ready.executor_stats()["t"] == (0, 1)
    assert dispatcher.names() == []  # the success path calls nothing on the dispatcher


def test_on_succeeding_comes_before_the_count_and_false_leaves_the_success_uncounted(core, ready):
    """A broker's hook: called before the success is counted (with the slot still taken); False
    (the attempt is no longer this process's) frees the slot and finishes the job, counted nowhere,
    without on_success."""
    order = Recorder()
    dispatcher = FakeDispatcher(ready)
    configure(ready, "t", lambda job: None, limit=1)
    slot = core.WorkerSlot()

    def succeeding(job):
        order.add(("on_succeeding", job.payload, ready.executor_stats()["t"], ready.counters()[core.SUCCEEDED]))
        return job.payload == "ours"

    slot.on_succeeding = succeeding
    slot.on_success = lambda job: order.add(("on_success", job.payload, ready.counters()[core.SUCCEEDED]))
    assert ready.push(Job("t", "ours"))
    assert ready.push(Job("t", "taken back"))
    worker = Worker(core, ready, dispatcher, slot)
    try:
        assert ready.join(WAIT)
    finally:
        ready.close()
    worker.join()
    assert order.snapshot() == [
        ("on_succeeding", "ours", (1, 1), 0),  # not counted yet, the slot still taken
        ("on_success", "ours", 1),
        ("on_succeeding", "taken back", (1, 1), 1),
    ]
    assert ready.counters()[core.SUCCEEDED] == 1
    assert ready.executor_stats()["t"] == (0, 1)
    assert ready.unfinished == 0
    assert dispatcher.names() == []


def test_a_successful_attempt_without_hooks(core, ready):
    ran = Recorder()
    dispatcher = FakeDispatcher(ready)
    configure(ready, "t", lambda job: ran.add(job.payload), limit=2)
    for i in range(3):
        assert ready.push(Job("t", i))
    worker = Worker(core, ready, dispatcher)
    try:
        assert ready.join(WAIT)
    finally:
        ready.close()
    worker.join()
    assert ran.snapshot() == [0, 1, 2]
    assert ready.counters()[core.SUCCEEDED] == 3
    assert ready.unfinished == 0
    assert ready.executor_stats()["t"] == (0, 2)
    assert dispatcher.names() == []


def test_a_success_with_a_next_job_ready_ends_with_that_jobs_start_through_on_switch(core, ready):
    """With ``on_switch``, a success is finished together with the start of the worker's next job
    (one store commit for both): on_switch(finished, next) runs before the next function, and the
    finished job counts as unfinished until it returned. With nothing ready next, on_success."""
    order = Recorder()
    dispatcher = FakeDispatcher(ready)
    configure(ready, "t", lambda job: order.add(("fn", job.payload, ready.unfinished)), limit=1)
    slot = core.WorkerSlot()
    slot.on_start = lambda job: order.add(("on_start", job.payload, ready.unfinished))
    slot.on_success = lambda job: order.add(("on_success", job.payload, ready.unfinished))
    slot.on_switch = lambda finished, job: order.add(("on_switch", finished.payload, job.payload,
                                                      ready.unfinished))
    for i in range(3):
        assert ready.push(Job("t", i))
    worker = Worker(core, ready, dispatcher, slot)
    try:
        assert ready.join(WAIT)
    finally:
        ready.close()
    worker.join()
    assert order.snapshot() == [
        ("on_start", 0, 3),
        ("fn", 0, 3),
        ("on_switch", 0, 1, 3),  # job 0 is still unfinished while its end is committed
        ("fn", 1, 2),  # ... and finished once on_switch returned, before job 1 runs
        ("on_switch", 1, 2, 2),
        ("fn", 2, 1),
        ("on_success", 2, 1),  # nothing ready next: ended on its own
    ]
    assert ready.unfinished == 0
    assert ready.counters()[core.SUCCEEDED] == 3
    assert dispatcher.names() == []


def test_a_success_waiting_for_its_switch_ends_on_its_own_when_the_worker_would_wait(core, ready):
    """A worker never waits for a next job with a success still unfinished: join() returns."""
    order = Recorder()
    dispatcher = FakeDispatcher(ready)
    configure(ready, "t", lambda job: order.add(("fn", job.payload)), limit=1)
    slot = core.WorkerSlot()
    slot.on_start = lambda job: order.add(("on_start", job.payload))
    slot.on_success = lambda job: order.add(("on_success", job.payload))
    slot.on_switch = lambda finished, job: order.add(("on_switch", finished.payload, job.payload))
    worker = Worker(core, ready, dispatcher, slot)
    try:
        assert ready.push(Job("t", 0))
        assert ready.join(WAIT), "the success was left unfinished while the worker waited"
        assert ready.push(Job("t", 1))
        assert ready.join(WAIT)
    finally:
        ready.close()
    worker.join()
    assert order.snapshot() == [("on_start", 0), ("fn", 0), ("on_success", 0),
                                ("on_start", 1), ("fn", 1), ("on_success", 1)]


def test_a_worker_with_on_switch_takes_the_next_job_its_freed_slot_admits_itself(core, ready):
    """A type at its limit: the worker that frees the slot takes the next job itself (and ends its
    success with that start), instead of handing it to an idle worker."""
    order = Recorder()
    dispatcher = FakeDispatcher(ready)
    started, gate = threading.Event(), threading.Event()

    def fn(job):
        order.add(("fn", job.payload, threading.get_ident()))
        if job.payload == 0:
            started.set()
            assert gate.wait(WAIT)

    configure(ready, "t", fn, limit=1)
    slots = [core.WorkerSlot(), core.WorkerSlot()]
    for slot in slots:
        slot.on_success = lambda job: order.add(("on_success", job.payload))
        slot.on_switch = lambda finished, job: order.add(("on_switch", finished.payload, job.payload))
    for i in range(3):
        assert ready.push(Job("t", i))
    workers = [Worker(core, ready, dispatcher, slots[0])]
    try:
        assert started.wait(WAIT)
        workers.append(Worker(core, ready, dispatcher, slots[1]))
        wait_idle(ready)  # the second worker sleeps in pop: jobs 1 and 2 wait for the type's slot
        gate.set()
        assert ready.join(WAIT)
    finally:
        gate.set()
        ready.close()
    for worker in workers:
        worker.join()
    entries = order.snapshot()
    assert [entry for entry in entries if entry[0] != "fn"] == [
        ("on_switch", 0, 1), ("on_switch", 1, 2), ("on_success", 2)]
    assert len({entry[2] for entry in entries if entry[0] == "fn"}) == 1, entries  # one worker ran all three


def test_a_failing_on_switch_finishes_the_finished_job_and_fails_the_next_attempt(core, ready):
    error = Boom("store down")
    dispatcher = FakeDispatcher(ready)
    ran = Recorder()
    configure(ready, "t", lambda job: ran.add(job.payload), limit=1)
    slot = core.WorkerSlot()

    def on_switch(finished, job):
        raise error

    slot.on_switch = on_switch
    jobs = [Job("t", i, retry_config=no_retries()) for i in range(2)]
    for job in jobs:
        assert ready.push(job)
    worker = Worker(core, ready, dispatcher, slot)
    try:
        assert dispatcher.log.wait_until(lambda items: len(items) >= 1)
    finally:
        ready.close()
    worker.join()
    assert dispatcher.log.snapshot() == [("attempt_failed", jobs[1], "t", error, 1)]
    assert ran.snapshot() == [0]  # job 1's function never ran
    assert ready.unfinished == 1  # job 0 finished all the same; job 1 is the dispatcher's to decide


def test_a_success_before_a_job_without_an_executor_ends_first(core, ready):
    order = Recorder()
    dispatcher = FakeDispatcher(ready)
    configure(ready, "t", lambda job: None, limit=1)
    slot = core.WorkerSlot()
    slot.on_success = lambda job: order.add(("on_success", job.payload))
    slot.on_switch = lambda finished, job: order.add(("on_switch", finished.payload, job.payload))
    assert ready.push(Job("t", 0))
    assert ready.push(Job("unknown", 1))
    worker = Worker(core, ready, dispatcher, slot)
    try:
        assert dispatcher.log.wait_until(lambda items: len(items) >= 1)
    finally:
        ready.close()
    worker.join()
    assert order.snapshot() == [("on_success", 0)]
    assert [(entry[0], entry[1].payload) for entry in dispatcher.log.snapshot()] == [("no_executor", 1)]


class _Awaitable:
    def __await__(self):
        yield


def _generator():
    yield


def test_only_awaitables_and_generators_returned_go_to_the_dispatcher(core, ready):
    """A plain return value is a success decided in the loop; an awaitable or a generator is
    handed to ``returned`` (which awaits it, or fails the attempt)."""
    dispatcher = FakeDispatcher(ready)
    awaitable, generator = _Awaitable(), _generator()
    results = {0: 42, 1: "text", 2: {"a": 1}, 3: object(), 4: _Awaitable, 5: awaitable, 6: generator}
    configure(ready, "t", lambda job: results[job.payload], limit=1)
    jobs = [Job("t", i) for i in results]
    for job in jobs:
        assert ready.push(job)
    worker = Worker(core, ready, dispatcher)
    try:
        assert ready.join(WAIT)
    finally:
        ready.close()
    worker.join()
    assert dispatcher.log.snapshot() == [("returned", jobs[5], "t", awaitable),
                                         ("returned", jobs[6], "t", generator)]
    assert ready.counters()[core.SUCCEEDED] == len(results)
    generator.close()


class HandingOver(FakeDispatcher):
    """A dispatcher whose ``returned`` hands every attempt over, as the real one does to its
    event loop: it empties the slot and keeps the attempt (job, type state) for the test."""

    def __init__(self, ready):
        super().__init__(ready)
        self.handed = []

    def returned(self, job, state, result, slot):
        super().returned(job, state, result, slot)
        assert not slot.end()  # (not decided by a watchdog in this test)
        self.handed.append((job, state))
        return True


def test_an_attempt_handed_over_keeps_its_slot_and_frees_the_worker_at_once(core, ready):
    """``returned`` True: the rest of the attempt is someone else's (the event loop's). The worker
    goes on to the next job at once; it neither counts nor frees anything of that attempt: the
    type's slot stays taken until the new holder frees it."""
    dispatcher = HandingOver(ready)
    configure(ready, "awaits", lambda job: _Awaitable(), limit=1)
    ran = Recorder()
    configure(ready, "plain", lambda job: ran.add(job.payload), limit=1)
    first, second = Job("awaits", 1), Job("awaits", 2)
    assert ready.push(first)
    assert ready.push(Job("plain", 3))
    assert ready.push(second)
    worker = Worker(core, ready, dispatcher)
    try:
        assert wait_until(lambda: ran.snapshot() == [3])  # the only worker was not held by job 1
        assert [job for job, _ in dispatcher.handed] == [first]  # job 2 waits for the type's slot
        assert ready.executor_stats()["awaits"][0] == 1
        assert ready.counters()[core.SUCCEEDED] == 1
        assert not ready.join(0.0)
        job, state = dispatcher.handed[0]
        ready.attempt_succeeded(state, 0.0, job, True, True)  # the holder ends it: slot freed
        assert wait_until(lambda: len(dispatcher.handed) == 2)
        job, state = dispatcher.handed[1]
        assert job is second
        ready.attempt_succeeded(state, 0.0, job, True, True)
        assert ready.join(WAIT)
    finally:
        ready.close()
    worker.join()
    assert ready.counters()[core.SUCCEEDED] == 3
    assert ready.executor_stats()["awaits"][0] == 0
    assert dispatcher.names() == ["returned", "returned"]


# --- failure --------------------------------------------------------------------------------

def test_a_failed_attempt_goes_to_attempt_failed_with_the_slot_already_released(core, ready):
    error = Boom("no")
    dispatcher = FakeDispatcher(ready)
    on_success = Recorder()

    def fn(job):
        raise error

    configure(ready, "t", fn, limit=1)
    slot = core.WorkerSlot()
    slot.on_success = on_success.add
    job = Job("t", retry_config=no_retries())
    assert ready.push(job)
    worker = Worker(core, ready, dispatcher, slot)
    try:
        assert dispatcher.log.wait_until(lambda items: len(items) >= 1)
    finally:
        ready.close()
    worker.join()
    assert dispatcher.log.snapshot() == [("attempt_failed", job, "t", error, 1)]
    assert on_success.snapshot() == []
    assert ready.counters()[core.SUCCEEDED] == 0
    assert ready.unfinished == 1  # finishing a failed job is the dispatcher's decision
    assert ready.executor_stats()["t"] == (0, 1)


def test_the_loop_carries_on_after_a_failure(core, ready):
    dispatcher = FakeDispatcher(ready)
    ran = Recorder()

    def fn(job):
        ran.add(job.payload)
        if job.payload == "bad":
            raise Boom(job.payload)

    configure(ready, "t", fn)
    for payload in ("bad", "good"):
        assert ready.push(Job("t", payload))
    worker = Worker(core, ready, dispatcher)
    try:
        assert ran.wait_until(lambda items: len(items) == 2)
        assert dispatcher.log.wait_until(lambda items: len(items) == 1)
    finally:
        ready.close()
    worker.join()
    assert ran.snapshot() == ["bad", "good"]
    assert dispatcher.names() == ["attempt_failed"]
    assert ready.counters()[core.SUCCEEDED] == 1


def test_a_job_without_an_executor_goes_to_no_executor_and_the_loop_carries_on(core, ready):
    dispatcher = FakeDispatcher(ready)
    ran = Recorder()
    configure(ready, "known", lambda job: ran.add(job.payload))
    ghost = Job("ghost")
    assert ready.push(ghost)
    assert ready.push(Job("known", "after"))
    worker = Worker(core, ready, dispatcher)
    try:
        assert ran.wait_until(lambda items: items == ["after"])
    finally:
        ready.close()
    worker.join()
    assert dispatcher.log.snapshot() == [("no_executor", ghost, "ghost")]
    assert ready.counters()[core.SUCCEEDED] == 1


# --- contexts -------------------------------------------------------------------------------

@pytest.mark.parametrize("timeout", [5.0, None], ids=["timeout", "no-timeout"])
def test_an_executor_taking_a_context_gets_new_contexts_object(core, ready, timeout):
    dispatcher = FakeDispatcher(ready)
    received = Recorder()
    configure(ready, "t", lambda job, ctx: received.add((job, ctx)), timeout=timeout, takes_context=True)
    configure(ready, "plain", lambda job: received.add((job, None)), timeout=timeout)
    job, plain = Job("t"), Job("plain")
    before = core.monotonic()
    assert ready.push(job)
    assert ready.push(plain)
    worker = Worker(core, ready, dispatcher)
    try:
        assert received.wait_until(lambda items: len(items) == 2)
        after = core.monotonic()
    finally:
        ready.close()
    worker.join()
    assert dispatcher.contexts and received.snapshot() == [(job, dispatcher.contexts[0]), (plain, None)]
    assert len(dispatcher.calls("new_context")) == 1, "a context was made for an executor without one"
    _, context_job = dispatcher.calls("new_context")[0]
    assert context_job is job
    deadline = dispatcher.contexts[0].deadline  # set by the worker as it calls the function
    if timeout is None:
        assert deadline is None
    else:
        assert before + timeout <= deadline <= after + timeout


def test_an_attempts_timeout_and_duration_count_from_its_functions_call(core, ready):
    """A store writes an attempt's start (on_start; on_switch with the previous success's end)
    before its function is called: a slow write is not the function's time. While it is written
    the slot has no deadline; the deadline (ctx.deadline too) and the duration count from the call."""
    write_seconds, timeout = 0.25, 5.0
    dispatcher = FakeDispatcher(ready)
    slot = core.WorkerSlot()
    written, called = Recorder(), Recorder()

    def slow_write(*jobs):
        time.sleep(write_seconds)  # SQLite waiting for its lock
        written.add((slot.deadline, core.monotonic()))

    configure(ready, "t", lambda job, ctx: called.add(ctx.deadline), timeout=timeout, takes_context=True)
    slot.on_start, slot.on_success, slot.on_switch = slow_write, lambda job: None, slow_write
    assert ready.push(Job("t", 0))
    assert ready.push(Job("t", 1))  # its start is written with job 0's end (on_switch)
    worker = Worker(core, ready, dispatcher, slot)
    try:
        assert called.wait_until(lambda items: len(items) == 2)
    finally:
        ready.close()
    worker.join()
    writes, deadlines = written.snapshot(), called.snapshot()
    assert [deadline for deadline, _ in writes] == [math.inf, math.inf]
    for (_, write_ended), deadline in zip(writes, deadlines):
        assert deadline >= write_ended + timeout
    _, seconds = ready.attempt_durations()["t"]
    assert seconds < write_seconds  # two functions that return at once


# --- ending the loop ------------------------------------------------------------------------

def test_the_loop_returns_when_the_ready_queue_is_closed(core, ready):
    dispatcher = FakeDispatcher(ready)
    worker = Worker(core, ready, dispatcher)
    assert not worker.returned.wait(0.1), "run_worker returned with the queue open"
    ready.close()
    worker.join()
    assert dispatcher.names() == []


def test_the_loop_returns_at_once_on_a_closed_queue(core, ready):
    dispatcher = FakeDispatcher(ready)
    ready.close()
    worker = Worker(core, ready, dispatcher)
    worker.join()
    assert dispatcher.names() == []


def test_a_job_handed_to_a_worker_as_the_queue_closes_counts_as_ready_not_running(core, ready):
    """close() takes back, in its own step, a job handed to a worker that has not returned it yet
    (its worker would give it back unstarted): from then on the stats count it ready, never as an
    attempt running, which it never is. ``active_jobs`` is "attempts running now" (docs/api.md)."""
    dispatcher = FakeDispatcher(ready)
    ran = Recorder()
    configure(ready, "t", lambda job: ran.add(job), limit=1)
    worker = Worker(core, ready, dispatcher)
    wait_idle(ready)
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(1000.0)  # this thread keeps the GIL: the woken worker cannot take its job yet
    try:
        assert ready.push(Job("t", "handed"))
        handed = ready.sizes(), ready.executor_stats()
        ready.close()
        closed = ready.sizes(), ready.executor_stats()
    finally:
        sys.setswitchinterval(switch_interval)
    worker.join()
    assert handed == ((0, 0, 0), {"t": (1, 1)}), "the job was not handed to the idle worker"
    assert closed == ((0, 1, 0), {"t": (0, 1)}), "after close() the stats count the unstarted job as running"
    assert (ready.sizes(), ready.executor_stats()) == ((0, 1, 0), {"t": (0, 1)})
    assert ran.snapshot() == [] and dispatcher.names() == []
    assert ready.unfinished == 1


@pytest.mark.parametrize("outcome", ["returns", "raises"])
def test_an_attempt_expired_by_the_watchdog_makes_the_worker_retire(core, ready, outcome):
    dispatcher = FakeDispatcher(ready)
    entered, release = threading.Event(), threading.Event()
    error = Boom("late")
    ran = Recorder()

    def fn(job):
        ran.add(job.payload)
        if job.payload == "stuck":
            entered.set()
            assert release.wait(WAIT)
            if outcome == "raises":
                raise error

    configure(ready, "t", fn, limit=2, timeout=0.05)
    stuck = Job("t", "stuck")
    assert ready.push(stuck)
    worker = Worker(core, ready, dispatcher)
    try:
        assert entered.wait(WAIT)
        assert worker.slot.expire(core.monotonic() + 60.0) is stuck
        assert worker.slot.retired
        assert ready.push(Job("t", "next"))  # a retired worker must leave it for another
        release.set()
        assert worker.returned.wait(WAIT), "the worker did not retire after its expired attempt"
        worker.join()
        assert len(ready) == 1, "the retiring worker took another job"
    finally:
        release.set()
        ready.close()
    worker.join()
    assert ran.snapshot() == ["stuck"]
    assert dispatcher.log.snapshot() == [("after_expired", worker.slot, None if outcome == "returns" else error)]
    assert ready.counters()[core.SUCCEEDED] == 0  # decided at the deadline: a late return is ignored
    assert ready.executor_stats()["t"] == (0, 2), "the expired attempt's slot was not released"
    assert ready.unfinished == 2


# --- concurrency ----------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_several_workers_never_exceed_max_concurrent_jobs(core, ready):
    limits = {"a": 2, "b": 3, "c": 1}
    jobs_per_type = 150
    dispatcher = FakeDispatcher(ready)
    lock = threading.Lock()
    active = {name: 0 for name in limits}
    most = {name: 0 for name in limits}
    over = []

    def make(name):
        def fn(job):
            with lock:
                active[name] += 1
                most[name] = max(most[name], active[name])
                if active[name] > limits[name]:
                    over.append((name, active[name]))
            try:
                threading.Event().wait(0.0005)  # hold the slot a moment so attempts overlap
            finally:
                with lock:
                    active[name] -= 1
        return fn

    for name, limit in limits.items():
        configure(ready, name, make(name), limit=limit)
    workers = [Worker(core, ready, dispatcher) for _ in range(5)]
    try:
        for i in range(jobs_per_type):
            for name in limits:
                assert ready.push(Job(name, i))
        assert ready.join(WAIT * 3), "not every job finished"
    finally:
        ready.close()
    for worker in workers:
        worker.join()
    assert over == [], f"max_concurrent_jobs exceeded: {over[:5]}"
    assert ready.counters()[core.SUCCEEDED] == jobs_per_type * len(limits)
    assert dispatcher.names().count("attempt_failed") == 0
    assert all(ready.executor_stats()[name] == (0, limit) for name, limit in limits.items())
    assert most["b"] >= 2, "the attempts never overlapped: this run did not test the limit"
