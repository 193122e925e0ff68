"""ReadyQueue, on both cores: order, capacity, per-type slots, overflow, accounting,
blocking waits and close().

A Hypothesis state machine compares the queue with a small reference model;
the unit tests below pin the cases a reader should see spelled out. Threads
synchronise on Barriers, Events and joins; a bounded ``join(QUIET)`` is only
used to watch for something that must NOT happen (a blocked call returning).
"""
import gc
import signal
import sys
import threading
import time
import weakref

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import tinymq
from tinymq.errors import QueueStopped

WAIT = 10.0  # generous bound for "this happens soon" on a noisy 2-core machine
QUIET = 0.25  # how long to watch for something that must not happen
LONG = 60.0  # timeout of a blocked call that must be woken well before it: > WAIT
HIGH, MEDIUM, LOW = 2, 1, 0


class Item:
    """The smallest job the core accepts: a type and a priority."""

    __slots__ = ("type", "priority", "name")

    def __init__(self, type, priority=MEDIUM, name=None):
        self.type = type
        self.priority = priority
        self.name = name

    def __repr__(self):
        return f"Item({self.type!r}, {self.priority}, {self.name!r})"


def noop(job):
    pass


def start(target, *args):
    """Run ``target(*args)`` in a daemon thread; its result or exception lands in ``box``."""
    box = {}

    def run():
        try:
            box["result"] = target(*args)
        except BaseException as exc:  # reported by the test, not lost in the thread
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, box


def start_poppers(q, n, timeout=None, settle=True):
    """Start ``n`` threads that each pop once (up to ``timeout``), all at once behind a barrier.

    With ``settle``, give them a moment (QUIET in all) to block in the core before returning.
    """
    barrier = threading.Barrier(n + 1)

    def pop_after_barrier():
        barrier.wait(WAIT)
        return q.pop(timeout)

    started = [start(pop_after_barrier) for _ in range(n)]
    barrier.wait(WAIT)
    if settle:
        for thread, _ in started:
            thread.join(QUIET / n)
    return started


# --- construction, push, sizes -------------------------------------------------------------


@pytest.mark.parametrize("capacity", [0, -1])
def test_capacity_below_one_is_rejected(core, capacity):
    with pytest.raises(ValueError, match=str(capacity)):
        core.ReadyQueue(capacity)


def test_empty_queue(core):
    q = core.ReadyQueue(4)
    assert len(q) == 0
    assert q.sizes() == (0, 0, 0)
    assert q.overflow_size == 0
    assert q.closed is False
    assert q.unfinished == 0
    assert q.counters() == (0, 0, 0, 0, 0, 0)
    assert q.executor_stats() == {}
    assert q.pop(timeout=0) is None
    assert q.pop_with_type(timeout=0) is None


def test_sizes_are_high_medium_low(core):
    q = core.ReadyQueue(10)
    for priority, n in ((HIGH, 1), (MEDIUM, 2), (LOW, 3)):
        for _ in range(n):
            assert q.push(Item("a", priority)) is True
    assert q.sizes() == (1, 2, 3)
    assert len(q) == 6


def test_strict_priority_then_fifo_across_types(core):
    q = core.ReadyQueue(10)
    items = [
        Item("a", LOW, "low1"), Item("b", MEDIUM, "med1"), Item("c", HIGH, "high1"),
        Item("b", LOW, "low2"), Item("a", HIGH, "high2"), Item("c", MEDIUM, "med2"),
    ]
    for item in items:
        assert q.push(item)
    popped = [q.pop(timeout=0).name for _ in items]
    assert popped == ["high1", "high2", "med1", "med2", "low1", "low2"]
    assert q.pop(timeout=0) is None


def test_tinymq_job_is_accepted(core):
    q = core.ReadyQueue(2)
    job = tinymq.Job("email", priority=tinymq.Priority.HIGH)
    assert q.push(job)
    assert q.sizes() == (1, 0, 0)
    assert q.pop(timeout=0) is job


def test_capacity_counts_all_levels_together(core):
    q = core.ReadyQueue(3)
    assert q.push(Item("a", HIGH))
    assert q.push(Item("a", MEDIUM))
    assert q.push(Item("a", LOW))
    assert q.push(Item("a", HIGH)) is False
    assert q.push(Item("b", LOW)) is False
    assert q.sizes() == (1, 1, 1)
    assert q.counters()[core.ENQUEUED] == 3
    assert q.unfinished == 3


@pytest.mark.parametrize("priority", [-1, 3, 7, "HIGH", None, 1.0])
def test_bad_priority_is_a_value_error_with_no_effect(core, priority):
    q = core.ReadyQueue(4)
    bad = Item("a", priority)
    for call in (lambda: q.push(bad), lambda: q.put(bad, timeout=0), lambda: q.requeue(bad),
                 lambda: q.push_many([Item("a"), bad])):
        with pytest.raises(ValueError, match="priority"):
            call()
    assert len(q) == 0
    assert q.overflow_size == 0
    assert q.unfinished == 0
    assert q.counters()[core.ENQUEUED] == 0


def test_push_many_is_all_or_nothing(core):
    q = core.ReadyQueue(4)
    assert q.push(Item("a", LOW, "first"))
    assert q.push_many([Item("a", HIGH), Item("a"), Item("a"), Item("a")]) is False
    assert len(q) == 1
    assert q.counters()[core.ENQUEUED] == 1
    batch = [Item("b", LOW, "x"), Item("b", HIGH, "y"), Item("c", MEDIUM, "z")]
    assert q.push_many(batch, also_accept=2) is True
    assert q.sizes() == (1, 1, 2)
    assert q.counters()[core.ENQUEUED] == 1 + 3 + 2  # the delayed part is counted too
    assert q.unfinished == 6
    assert [q.pop(timeout=0).name for _ in range(4)] == ["y", "z", "first", "x"]


def test_push_many_empty_counts_only_also_accept(core):
    q = core.ReadyQueue(1)
    assert q.push_many([], also_accept=3) is True
    assert len(q) == 0
    assert q.unfinished == 3
    assert q.counters()[core.ENQUEUED] == 3


def test_accept_and_count_and_task_done(core):
    q = core.ReadyQueue(1)
    q.accept(5)
    assert q.unfinished == 5
    assert len(q) == 0
    q.accept()
    assert q.unfinished == 6
    for event in (core.SUCCEEDED, core.FAILED, core.RETRIED, core.TIMED_OUT, core.EVICTED):
        q.count(event, event + 10)
    q.count(core.SUCCEEDED)
    assert q.counters() == (6, 12, 12, 13, 14, 15)
    q.task_done(4)
    q.task_done()
    assert q.unfinished == 1
    assert q.join(timeout=0) is False
    q.task_done()
    assert q.unfinished == 0
    assert q.join(timeout=0) is True


def test_counter_constants(core):
    assert (core.ENQUEUED, core.SUCCEEDED, core.FAILED, core.RETRIED, core.TIMED_OUT,
            core.EVICTED) == (0, 1, 2, 3, 4, 5)


# --- per-type slots ---------------------------------------------------------------------------


def test_unregistered_types_are_unlimited(core):
    q = core.ReadyQueue(10)
    for i in range(5):
        q.push(Item("free", MEDIUM, i))
    assert [q.pop(timeout=0).name for _ in range(5)] == [0, 1, 2, 3, 4]
    assert q.executor_stats() == {}  # only registered executors are reported


def test_saturated_type_is_passed_over_and_first_again_after_release(core):
    q = core.ReadyQueue(10)
    q.configure("A", noop, 1, None, False, False)
    for name, job_type in (("a1", "A"), ("a2", "A"), ("a3", "A"), ("b1", "B"), ("b2", "B")):
        q.push(Item(job_type, MEDIUM, name))
    assert q.pop(timeout=0).name == "a1"  # A's only slot is taken
    assert q.executor_stats() == {"A": (1, 1)}
    assert q.pop(timeout=0).name == "b1"  # a2 is older but its type is saturated
    q.push(Item("B", MEDIUM, "b3"))
    q.release("A")
    assert q.executor_stats() == {"A": (0, 1)}
    assert q.pop(timeout=0).name == "a2"  # A's passed-over job is first again
    assert q.pop(timeout=0).name == "b2"
    assert q.pop(timeout=0).name == "b3"
    assert q.pop(timeout=0) is None  # a3 waits for A's slot
    assert q.sizes() == (0, 1, 0)
    q.release("A")
    assert q.pop(timeout=0).name == "a3"


def test_saturated_high_job_lets_a_lower_level_through(core):
    q = core.ReadyQueue(10)
    q.configure("A", noop, 1, None, False, False)
    q.push(Item("A", HIGH, "a-high-1"))
    q.push(Item("A", HIGH, "a-high-2"))
    q.push(Item("B", LOW, "b-low"))
    assert q.pop(timeout=0).name == "a-high-1"
    assert q.pop(timeout=0).name == "b-low"
    q.release("A")
    assert q.pop(timeout=0).name == "a-high-2"


def test_pop_with_type_returns_the_configured_state(core):
    q = core.ReadyQueue(4)
    state = q.configure("A", noop, 2, 1.5, True, False)
    assert state.name == "A"
    assert state.fn is noop
    assert state.limit == 2
    assert state.timeout == 1.5
    assert state.takes_context is True
    assert state.interrupt is False
    q.push(Item("A", MEDIUM, "x"))
    job, popped_state = q.pop_with_type(timeout=0)
    assert job.name == "x"
    assert popped_state is state
    assert state.active == 1
    q.release_state(state)
    assert state.active == 0
    assert q.executor_stats() == {"A": (0, 2)}


def test_pop_with_type_of_an_unregistered_type(core):
    q = core.ReadyQueue(4)
    q.push(Item("X", MEDIUM, "x"))
    job, state = q.pop_with_type(timeout=0)
    assert job.name == "x"
    assert state.name == "X"
    assert state.fn is None  # no executor: the dispatcher decides what to do
    assert state.active == 1
    q.release("X")
    assert state.active == 0


def test_lowering_a_limit_below_active_holds_the_type_back(core):
    q = core.ReadyQueue(10)
    for i in range(4):
        q.push(Item("A", MEDIUM, i))
    assert q.pop(timeout=0).name == 0
    assert q.pop(timeout=0).name == 1
    q.configure("A", noop, 1, None, False, False)
    assert q.executor_stats() == {"A": (2, 1)}  # running attempts keep their slots
    assert q.pop(timeout=0) is None
    q.release("A")
    assert q.pop(timeout=0) is None  # active 1 is still not below limit 1
    q.release("A")
    assert q.pop(timeout=0).name == 2


def test_raising_a_limit_frees_waiting_jobs(core):
    q = core.ReadyQueue(10)
    q.configure("A", noop, 1, None, False, False)
    for i in range(3):
        q.push(Item("A", MEDIUM, i))
    assert q.pop(timeout=0).name == 0
    assert q.pop(timeout=0) is None
    q.configure("A", noop, 3, None, False, False)
    assert q.pop(timeout=0).name == 1
    assert q.pop(timeout=0).name == 2
    assert q.executor_stats() == {"A": (3, 3)}


# --- requeue and the overflow line --------------------------------------------------------------


def test_requeue_is_not_counted_as_new(core):
    q = core.ReadyQueue(4)
    item = Item("a", HIGH)
    q.requeue(item)
    assert q.sizes() == (1, 0, 0)
    assert q.unfinished == 0
    assert q.counters()[core.ENQUEUED] == 0
    assert q.pop(timeout=0) is item


def test_requeue_when_full_waits_in_overflow_and_moves_in_on_pop(core):
    q = core.ReadyQueue(2)
    q.push(Item("a", LOW, "p1"))
    q.push(Item("a", LOW, "p2"))
    q.requeue(Item("a", HIGH, "r1"))
    q.requeue(Item("a", LOW, "r2"))
    assert len(q) == 2
    assert q.overflow_size == 2
    assert q.push(Item("a", HIGH)) is False  # full: overflow does not make room
    assert q.pop(timeout=0).name == "p1"
    assert q.overflow_size == 1  # r1 moved in
    assert q.sizes() == (1, 0, 1)
    assert q.pop(timeout=0).name == "r1"
    assert q.overflow_size == 0
    assert q.sizes() == (0, 0, 2)
    assert [q.pop(timeout=0).name for _ in range(2)] == ["p2", "r2"]
    assert q.pop(timeout=0) is None


def test_overflow_goes_ahead_of_a_blocked_producer(core):
    q = core.ReadyQueue(1)
    q.push(Item("a", MEDIUM, "first"))
    producer, box = start(q.put, Item("a", MEDIUM, "produced"), LONG)
    producer.join(QUIET)
    assert producer.is_alive(), "put returned although the queue is full"
    q.requeue(Item("a", MEDIUM, "requeued"))
    assert q.overflow_size == 1
    assert q.pop(timeout=0).name == "first"
    assert q.pop(timeout=0).name == "requeued"
    assert q.pop(timeout=WAIT).name == "produced"
    producer.join(WAIT)
    assert not producer.is_alive()
    assert box == {"result": True}


def test_a_job_moving_in_from_overflow_wakes_a_blocked_popper(core):
    q = core.ReadyQueue(1)
    q.configure("A", noop, 1, None, False, False)
    q.push(Item("A", MEDIUM, "a1"))
    assert q.pop(timeout=0).name == "a1"
    q.push(Item("A", MEDIUM, "a2"))  # full, and A is saturated
    q.requeue(Item("B", MEDIUM, "b1"))  # owed room
    started = start_poppers(q, 2, LONG)
    assert all(thread.is_alive() for thread, _ in started)
    q.release("A")  # one popper takes a2; b1 moves in and must wake the other
    for thread, _ in started:
        thread.join(WAIT)
    assert not any(thread.is_alive() for thread, _ in started), "a popper was not woken"
    assert sorted(box["result"].name for _, box in started) == ["a2", "b1"]


def test_requeue_after_close_is_not_refused(core):
    q = core.ReadyQueue(1)
    q.close()
    q.requeue(Item("a"))  # an accepted job is never dropped on the floor
    assert len(q) == 1


class Collectable:
    """A job that can be watched for being freed."""

    __slots__ = ("type", "priority", "__weakref__")

    def __init__(self, type="a", priority=MEDIUM):
        self.type = type
        self.priority = priority


def test_jobs_are_not_leaked_or_freed_early(core):
    job = Collectable()
    before = sys.getrefcount(job)
    q = core.ReadyQueue(1)
    for _ in range(100):
        assert q.push(job)
        assert q.pop(timeout=0) is job
        q.release("a")
        q.requeue(job)
        q.requeue(job)  # into the overflow line
        assert q.pop(timeout=0) is job
        q.release("a")
        assert q.pop(timeout=0) is job
        q.release("a")
        assert q.push_many([job])
        assert q.pop_with_type(timeout=0)[0] is job
        q.release("a")
    assert sys.getrefcount(job) == before


def test_a_dropped_queue_frees_its_jobs(core):
    q = core.ReadyQueue(1)
    ready, owed = Collectable(), Collectable()
    q.push(ready)
    q.requeue(owed)
    freed = []
    refs = [weakref.ref(ready, freed.append), weakref.ref(owed, freed.append)]
    del ready, owed
    assert not freed  # the queue still holds them
    del q
    gc.collect()
    assert len(freed) == 2 and all(ref() is None for ref in refs)


# --- close ----------------------------------------------------------------------------------------


def test_closed_queue_refuses_new_jobs_and_pops_nothing(core):
    q = core.ReadyQueue(4)
    q.push(Item("a"))
    q.close()
    assert q.closed is True
    with pytest.raises(QueueStopped):
        q.push(Item("a"))
    with pytest.raises(QueueStopped):
        q.put(Item("a"), timeout=0)
    with pytest.raises(QueueStopped):
        q.push_many([Item("a")])
    with pytest.raises(QueueStopped):
        q.accept(1)
    assert q.pop(timeout=0) is None
    assert q.pop() is None  # closed: does not block even without a timeout
    assert q.pop_with_type() is None
    assert q.join() is False  # one unfinished job, and nobody will finish it
    assert q.unfinished == 1
    assert tinymq.QueueStopped is QueueStopped  # one class, shared by both cores


def test_close_wakes_blocked_pop_put_and_join(core):
    empty = core.ReadyQueue(1)
    full = core.ReadyQueue(1)
    full.push(Item("a"))
    barrier = threading.Barrier(5)

    def after_barrier(call, *args):
        def run():
            barrier.wait(WAIT)
            return call(*args)
        return run

    started = [
        start(after_barrier(empty.pop)),
        start(after_barrier(empty.pop_with_type)),
        start(after_barrier(full.put, Item("b"))),
        start(after_barrier(full.join)),
    ]
    barrier.wait(WAIT)
    for thread, _ in started:
        thread.join(QUIET / 4)
    assert all(thread.is_alive() for thread, _ in started), "a blocked call returned before close()"
    began = time.monotonic()
    empty.close()
    full.close()
    for thread, _ in started:
        thread.join(WAIT)
    assert not any(thread.is_alive() for thread, _ in started), "close() left a waiter blocked"
    assert time.monotonic() - began < WAIT
    (_, pop_box), (_, pop_with_type_box), (_, put_box), (_, join_box) = started
    assert pop_box == {"result": None}
    assert pop_with_type_box == {"result": None}
    assert isinstance(put_box.get("error"), QueueStopped), put_box
    assert join_box == {"result": False}


def test_close_wakes_many_blocked_poppers(core):
    q = core.ReadyQueue(4)
    started = start_poppers(q, 6, settle=False)
    q.close()
    for thread, box in started:
        thread.join(WAIT)
        assert not thread.is_alive()
        assert box == {"result": None}


# --- blocking waits ------------------------------------------------------------------------------


def assert_took(began, low=0.18, high=2.0):
    elapsed = time.monotonic() - began
    assert low <= elapsed < high, f"took {elapsed:.3f} s, expected [{low}, {high})"


def test_pop_timeout_on_empty_returns_none_on_time(core):
    q = core.ReadyQueue(1)
    began = time.monotonic()
    assert q.pop(timeout=0.2) is None
    assert_took(began)
    began = time.monotonic()
    assert q.pop_with_type(timeout=0.2) is None
    assert_took(began)


def test_pop_timeout_when_only_saturated_jobs_wait(core):
    q = core.ReadyQueue(4)
    q.configure("A", noop, 1, None, False, False)
    q.push(Item("A"))
    q.push(Item("A"))
    assert q.pop(timeout=0) is not None
    began = time.monotonic()
    assert q.pop(timeout=0.2) is None
    assert_took(began)
    assert len(q) == 1


def test_put_timeout_on_full_returns_false_on_time(core):
    q = core.ReadyQueue(1)
    q.push(Item("a", MEDIUM, "kept"))
    began = time.monotonic()
    assert q.put(Item("a"), timeout=0.2) is False
    assert_took(began)
    assert len(q) == 1
    assert q.counters()[core.ENQUEUED] == 1
    assert q.unfinished == 1


def test_put_with_room_does_not_wait(core):
    q = core.ReadyQueue(1)
    began = time.monotonic()
    assert q.put(Item("a"), timeout=5.0) is True
    assert q.put(Item("a"), timeout=0) is False
    assert_took(began, low=0.0, high=2.0)
    assert q.unfinished == 1


def test_join_timeout_returns_false_on_time(core):
    q = core.ReadyQueue(1)
    q.accept(1)
    began = time.monotonic()
    assert q.join(timeout=0.2) is False
    assert_took(began)
    q.task_done()
    assert q.join(timeout=0.2) is True


def test_join_without_unfinished_returns_at_once(core):
    q = core.ReadyQueue(1)
    began = time.monotonic()
    assert q.join() is True
    assert_took(began, low=0.0, high=2.0)


def test_blocked_pop_wakes_on_push(core):
    q = core.ReadyQueue(1)
    popper, box = start(q.pop, LONG)
    popper.join(QUIET)
    assert popper.is_alive()
    item = Item("a")
    assert q.push(item)
    popper.join(WAIT)
    assert not popper.is_alive()
    assert box["result"] is item


def test_blocked_put_wakes_on_pop(core):
    q = core.ReadyQueue(1)
    q.push(Item("a", MEDIUM, "first"))
    producer, box = start(q.put, Item("a", MEDIUM, "second"), LONG)
    producer.join(QUIET)
    assert producer.is_alive()
    assert q.pop(timeout=0).name == "first"
    producer.join(WAIT)
    assert not producer.is_alive(), "not woken"
    assert box == {"result": True}
    assert q.pop(timeout=0).name == "second"


def test_blocked_join_wakes_on_last_task_done(core):
    q = core.ReadyQueue(1)
    q.accept(2)
    joiner, box = start(q.join, LONG)
    q.task_done()
    joiner.join(QUIET)
    assert joiner.is_alive(), "join returned with one job unfinished"
    q.task_done()
    joiner.join(WAIT)
    assert not joiner.is_alive(), "not woken"
    assert box == {"result": True}


def test_blocked_pop_wakes_on_release_of_a_saturated_type(core):
    q = core.ReadyQueue(4)
    q.configure("A", noop, 1, None, False, False)
    q.push(Item("A", MEDIUM, "a1"))
    q.push(Item("A", MEDIUM, "a2"))
    assert q.pop(timeout=0).name == "a1"
    popper, box = start(q.pop, LONG)
    popper.join(QUIET)
    assert popper.is_alive(), "pop took a job of a saturated type"
    q.release("A")
    popper.join(WAIT)
    assert not popper.is_alive(), "not woken"
    assert box["result"].name == "a2"


def test_blocked_pop_wakes_on_configure_raising_the_limit(core):
    q = core.ReadyQueue(4)
    q.configure("A", noop, 1, None, False, False)
    q.push(Item("A", MEDIUM, "a1"))
    q.push(Item("A", MEDIUM, "a2"))
    assert q.pop(timeout=0).name == "a1"
    popper, box = start(q.pop, LONG)
    popper.join(QUIET)
    assert popper.is_alive()
    q.configure("A", noop, 2, None, False, False)
    popper.join(WAIT)
    assert not popper.is_alive(), "not woken"
    assert box["result"].name == "a2"


def test_every_blocked_popper_gets_a_job_from_one_batch(core):
    """A pop wakes the next waiter: one push_many of 3 serves 3 blocked poppers."""
    q = core.ReadyQueue(8)
    started = start_poppers(q, 3, LONG)
    batch = [Item("a", MEDIUM, i) for i in range(3)]
    assert q.push_many(batch)
    for thread, _ in started:
        thread.join(WAIT)
    assert not any(thread.is_alive() for thread, _ in started), "a popper was not woken"
    got = sorted(box["result"].name for _, box in started)
    assert got == [0, 1, 2]


def test_every_blocked_popper_gets_a_job_from_requeues_and_pushes(core):
    q = core.ReadyQueue(8)
    started = start_poppers(q, 4, LONG)
    q.requeue(Item("a", HIGH, 0))
    q.push(Item("b", LOW, 1))
    q.requeue(Item("c", MEDIUM, 2))
    assert q.put(Item("a", MEDIUM, 3), timeout=0)
    for thread, _ in started:
        thread.join(WAIT)
    assert not any(thread.is_alive() for thread, _ in started), "a popper was not woken"
    assert sorted(box["result"].name for _, box in started) == [0, 1, 2, 3]


# Finite but beyond threading.TIMEOUT_MAX (~9.2e9 s): the façade accepts such a timeout
# (any finite number >= 0), so the core must wait as with None rather than raise.
HUGE = 1e10


def test_huge_finite_timeouts_wait_like_none(core):
    q = core.ReadyQueue(1)
    popper, pop_box = start(q.pop, HUGE)
    popper.join(QUIET)
    assert popper.is_alive(), pop_box
    q.push(Item("a", MEDIUM, "popped"))
    popper.join(WAIT)
    assert not popper.is_alive(), "not woken"
    assert pop_box["result"].name == "popped", pop_box

    q.push(Item("a", MEDIUM, "kept"))
    producer, put_box = start(q.put, Item("a", MEDIUM, "put"), HUGE)
    joiner, join_box = start(q.join, HUGE)
    producer.join(QUIET)
    assert producer.is_alive() and joiner.is_alive(), (put_box, join_box)
    assert q.pop(timeout=0).name == "kept"
    producer.join(WAIT)
    assert put_box == {"result": True}
    assert q.pop(timeout=HUGE).name == "put"
    q.task_done(3)
    joiner.join(WAIT)
    assert join_box == {"result": True}


def test_blocked_pop_releases_the_gil(core):
    """The main thread keeps running while another thread waits in pop."""
    q = core.ReadyQueue(1)
    ready = threading.Event()

    def wait_in_pop():
        ready.set()
        return q.pop(timeout=LONG)

    popper, box = start(wait_in_pop)
    assert ready.wait(WAIT)
    began = time.monotonic()
    # Were the GIL held during pop's wait, this join could return only after pop's LONG timeout.
    popper.join(QUIET)
    assert sum(range(200_000))  # real Python work while the other thread waits
    assert popper.is_alive() and time.monotonic() - began < LONG / 2
    item = Item("a")
    q.push(item)
    popper.join(WAIT)
    assert not popper.is_alive(), "not woken"
    assert box["result"] is item


@pytest.mark.skipif(not hasattr(signal, "pthread_kill"), reason="needs signal.pthread_kill")
def test_blocked_pop_in_main_thread_is_interruptible(core):
    """Ctrl-C reaches a main thread blocked in pop (STYLE.md habit 6)."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals are handled by the main thread only")

    class Interrupted(Exception):
        pass

    raised = []
    armed = threading.Event()

    def handler(signum, frame):
        # The helper sends more than one signal: raise once, and only inside pop's block.
        if armed.is_set() and not raised:
            raised.append(signum)
            raise Interrupted

    q = core.ReadyQueue(1)
    done = threading.Event()
    main_ident = threading.main_thread().ident

    def keep_interrupting():
        # Until the main thread acknowledges, one SIGINT every 0.1 s.
        while not done.wait(0.1):
            signal.pthread_kill(main_ident, signal.SIGINT)

    previous = signal.signal(signal.SIGINT, handler)
    helper = threading.Thread(target=keep_interrupting, daemon=True)
    try:
        began = time.monotonic()
        helper.start()
        with pytest.raises(Interrupted):
            armed.set()
            q.pop(timeout=20.0)
        elapsed = time.monotonic() - began
    finally:
        done.set()
        helper.join(WAIT)
        signal.signal(signal.SIGINT, previous)
    assert elapsed < 5.0, f"pop was interrupted only after {elapsed:.1f} s"
    # The interrupted waiter left no trace: the next push wakes a real waiter.
    popper, box = start(q.pop, LONG)
    popper.join(QUIET)
    item = Item("a")
    q.push(item)
    popper.join(WAIT)
    assert not popper.is_alive(), "a push after an interrupted pop woke nobody"
    assert box["result"] is item


# --- the reference model ---------------------------------------------------------------------


class ReadyModel:
    """A list-based restatement of ReadyQueue's scheduling rules."""

    def __init__(self, capacity):
        self.capacity = capacity
        self.ready = []  # [(seq, job)] in insertion order
        self.overflow = []
        self.seq = 0
        self.limits = {}  # configured types only
        self.active = {}
        self.enqueued = 0

    def sizes(self):
        return tuple(sum(1 for _, job in self.ready if job.priority == p) for p in (HIGH, MEDIUM, LOW))

    def _append(self, job):
        self.ready.append((self.seq, job))
        self.seq += 1

    def push(self, job):
        if len(self.ready) >= self.capacity:
            return False
        self._append(job)
        self.enqueued += 1
        return True

    def push_many(self, jobs, also_accept):
        if len(self.ready) + len(jobs) > self.capacity:
            return False
        for job in jobs:
            self._append(job)
        self.enqueued += len(jobs) + also_accept
        return True

    def requeue(self, job):
        if len(self.ready) >= self.capacity or self.overflow:
            self.overflow.append(job)
        else:
            self._append(job)

    def _free(self, job_type):
        return self.active.get(job_type, 0) < self.limits.get(job_type, float("inf"))

    def pop(self):
        for priority in (HIGH, MEDIUM, LOW):
            for index, (_, job) in enumerate(self.ready):
                if job.priority == priority and self._free(job.type):
                    del self.ready[index]
                    self.active[job.type] = self.active.get(job.type, 0) + 1
                    if self.overflow:
                        self._append(self.overflow.pop(0))
                    return job
        return None

    def release(self, job_type):
        self.active[job_type] -= 1


TYPES = ("A", "B", "C")
types = st.sampled_from(TYPES)
priorities = st.sampled_from((LOW, MEDIUM, HIGH))


class ReadyQueueMachine(RuleBasedStateMachine):
    """ReadyQueue against ReadyModel; ``core`` is set on a per-core subclass."""

    core = None

    def __init__(self):
        super().__init__()
        self.queue = None
        self.running = []  # (job, state) popped and not yet released
        self.made = 0

    def item(self, job_type, priority):
        self.made += 1
        return Item(job_type, priority, self.made)

    @initialize(capacity=st.integers(1, 6))
    def create(self, capacity):
        self.queue = self.core.ReadyQueue(capacity)
        self.model = ReadyModel(capacity)

    @rule(job_type=types, priority=priorities)
    def push(self, job_type, priority):
        job = self.item(job_type, priority)
        assert self.queue.push(job) == self.model.push(job)

    @rule(job_type=types, priority=priorities)
    def put_without_waiting(self, job_type, priority):
        job = self.item(job_type, priority)
        expected = self.model.push(job)  # full means overflow is empty or ready is full
        assert self.queue.put(job, timeout=0) == expected

    @rule(specs=st.lists(st.tuples(types, priorities), max_size=4), also_accept=st.integers(0, 2))
    def push_many(self, specs, also_accept):
        jobs = [self.item(t, p) for t, p in specs]
        assert self.queue.push_many(jobs, also_accept) == self.model.push_many(jobs, also_accept)

    @rule(job_type=types, priority=priorities)
    def requeue(self, job_type, priority):
        job = self.item(job_type, priority)
        self.queue.requeue(job)
        self.model.requeue(job)

    @precondition(lambda self: self.queue is not None and len(self.model.ready) == self.model.capacity)
    @rule(job_type=types, priority=priorities)
    def requeue_when_full(self, job_type, priority):
        self.requeue(job_type, priority)
        assert self.queue.overflow_size == len(self.model.overflow) > 0

    @rule()
    def pop(self):
        expected = self.model.pop()
        taken = self.queue.pop_with_type(timeout=0)
        if expected is None:
            assert taken is None
            return
        assert taken is not None, f"pop found nothing; the model expected {expected}"
        job, state = taken
        assert job is expected, f"popped {job}, the model expected {expected}"
        assert state.name == job.type
        assert state.active == self.model.active[job.type]
        self.running.append((job, state))

    @precondition(lambda self: self.running)
    @rule(data=st.data(), by_state=st.booleans())
    def release(self, data, by_state):
        job, state = self.running.pop(data.draw(st.integers(0, len(self.running) - 1)))
        if by_state:
            self.queue.release_state(state)
        else:
            self.queue.release(job.type)
        self.model.release(job.type)

    @rule(job_type=types, limit=st.integers(1, 3))
    def configure(self, job_type, limit):
        state = self.queue.configure(job_type, noop, limit, None, False, False)
        self.model.limits[job_type] = limit
        assert state.limit == limit

    @invariant()
    def matches_model(self):
        if self.queue is None:
            return
        model = self.model
        assert self.queue.sizes() == model.sizes()
        assert len(self.queue) == len(model.ready) <= model.capacity
        assert self.queue.overflow_size == len(model.overflow)
        if model.overflow:
            assert len(model.ready) == model.capacity  # owed room only while full
        assert self.queue.counters()[self.core.ENQUEUED] == model.enqueued
        assert self.queue.unfinished == model.enqueued
        assert self.queue.executor_stats() == {
            t: (model.active.get(t, 0), limit) for t, limit in model.limits.items()
        }


MACHINE_SETTINGS = settings(
    max_examples=80,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def test_ready_queue_matches_the_model(core):
    machine = type(f"ReadyQueueMachine[{core.__name__}]", (ReadyQueueMachine,), {"core": core})
    run_state_machine_as_test(machine, settings=MACHINE_SETTINGS)
