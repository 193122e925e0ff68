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
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

import tinymq
from tinymq.errors import DuplicateJob, QueueStopped

from _helpers import run_model_test

WAIT = 10.0  # generous bound for "this happens soon" on a noisy 2-core machine
QUIET = 0.25  # how long to watch for something that must not happen
LONG = 60.0  # timeout of a blocked call that must be woken well before it: > WAIT
HIGH, MEDIUM, LOW = 2, 1, 0


class Item:
    """The smallest job the core accepts: a type, a priority and an id (None: none yet)."""

    __slots__ = ("type", "priority", "_id", "name")

    def __init__(self, type, priority=MEDIUM, name=None, id=None):
        self.type = type
        self.priority = priority
        self._id = id
        self.name = name

    def __repr__(self):
        return f"Item({self.type!r}, {self.priority}, {self.name!r}, id={self._id!r})"


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
    assert q.counters() == (0, 0, 0, 0, 0, 0, 0)
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
    assert q.push_many(batch, [Item("d"), Item("d")]) is True
    assert q.sizes() == (1, 1, 2)
    assert q.counters()[core.ENQUEUED] == 1 + 3 + 2  # the delayed part is counted too
    assert q.unfinished == 6
    assert [q.pop(timeout=0).name for _ in range(4)] == ["y", "z", "first", "x"]


def test_push_many_with_no_ready_jobs_counts_the_delayed_ones(core):
    q = core.ReadyQueue(1)
    assert q.push_many([], [Item("d") for _ in range(3)]) is True
    assert len(q) == 0
    assert q.unfinished == 3
    assert q.counters()[core.ENQUEUED] == 3


def test_accept_and_count_and_task_done(core):
    q = core.ReadyQueue(1)
    jobs = [Item("d") for _ in range(6)]
    q.accept(jobs[:5])
    assert q.unfinished == 5
    assert len(q) == 0
    q.accept(jobs[5:])
    assert q.unfinished == 6
    q.accept([])
    assert q.unfinished == 6
    for event in (core.SUCCEEDED, core.FAILED, core.RETRIED, core.TIMED_OUT, core.EVICTED, core.CANCELLED):
        q.count(event, event + 10)
    q.count(core.SUCCEEDED)
    assert q.counters() == (6, 12, 12, 13, 14, 15, 16)
    for job in jobs[:5]:
        q.task_done(job)
    assert q.unfinished == 1
    assert q.join(timeout=0) is False
    q.task_done(jobs[5])
    assert q.unfinished == 0
    assert q.join(timeout=0) is True


def test_count_never_takes_a_count_back(core):
    """No counter goes down (Prometheus reads that as a reset): a negative ``n`` is refused,
    and nothing moves a count (the core has no recount since test_monotone_counts)."""
    q = core.ReadyQueue(10)
    q.configure("t", lambda job: None, 2, None, False, False, core.THREADS)
    q.count(core.SUCCEEDED, 2, "t")
    counters = q.counters()
    with pytest.raises(ValueError, match="never goes down"):
        q.count(core.SUCCEEDED, -1, "t")
    assert q.counters() == counters
    assert q.snapshot()[2]["t"][2 + core.TYPE_EVENTS.index(core.SUCCEEDED)] == 2
    assert not hasattr(q, "recount")


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

    __slots__ = ("type", "priority", "_id", "__weakref__")

    def __init__(self, type="a", priority=MEDIUM):
        self.type = type
        self.priority = priority
        self._id = None


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
        q.task_done(job)  # finished: it may be pushed again
        assert q.push_many([job])
        assert q.pop_with_type(timeout=0)[0] is job
        q.release("a")
        q.task_done(job)
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


class Cyclic(Collectable):
    """A job in a reference cycle (it holds itself), which only the cyclic collector frees."""

    __slots__ = ("itself",)

    def __init__(self, id=None):
        super().__init__()
        self._id = id
        self.itself = [self]


def _pop_it(q, job):
    assert q.pop(timeout=0) is job
    q.release("a")


def _remove_it(q, job):
    assert q.remove("x") is job


def _drop_the_queue(q, job):
    q.close()


@pytest.mark.parametrize("leave", [_pop_it, _remove_it, _drop_the_queue], ids=["popped", "removed", "dropped"])
def test_a_job_in_a_reference_cycle_is_collected_once_it_leaves_the_queue(core, leave):
    # The compiled core hides a resting job from the cyclic collector (a collection
    # need not walk the backlog); each way out must show it again, or its cycle leaks.
    q = core.ReadyQueue(10)
    job = Cyclic(id="x")
    freed = []
    ref = weakref.ref(job, freed.append)
    assert q.push(job)
    gc.collect()
    assert ref() is job  # the queue holds it
    leave(q, job)
    q.task_done(job)
    if leave is _drop_the_queue:
        del q
    del job
    gc.collect()
    assert freed and ref() is None


# --- what the core reads of a job, and when -----------------------------------------------------


class NoisyStr(str):
    """A str subclass that records every time the core would run its Python code."""

    calls = []

    def __hash__(self):
        NoisyStr.calls.append("__hash__")
        return str.__hash__(self)

    def __eq__(self, other):
        NoisyStr.calls.append("__eq__")
        return str.__eq__(self, other)


def assert_untouched(core, q):
    assert len(q) == 0 and q.overflow_size == 0
    assert q.unfinished == 0 and q.counters()[core.ENQUEUED] == 0
    assert q.executor_stats() == {}


@pytest.mark.parametrize("bad_type", [NoisyStr("a"), None, 7, b"a"])
def test_a_job_type_that_is_not_exactly_a_str_is_refused_with_no_effect(core, bad_type):
    q = core.ReadyQueue(4)
    bad = Item(bad_type)
    NoisyStr.calls.clear()
    calls = {
        "push": lambda: q.push(bad),
        "put": lambda: q.put(bad, timeout=0),
        "push_many": lambda: q.push_many([Item("a"), bad]),
        "requeue": lambda: q.requeue(bad),
        "configure": lambda: q.configure(bad_type, noop, 1, None, False, False),
        "release": lambda: q.release(bad_type),
    }
    for name, call in calls.items():
        with pytest.raises(TypeError, match="job type must be a str, got") as raised:
            call()
        assert type(bad_type).__qualname__ in str(raised.value), name
        assert_untouched(core, q)
    assert NoisyStr.calls == []  # the subclass's Python code never ran in the core


def test_a_full_buffer_refuses_a_bad_type_as_a_type_error(core):
    q = core.ReadyQueue(1)
    assert q.push(Item("a"))
    with pytest.raises(TypeError, match="job type"):
        q.push(Item(NoisyStr("a")))  # a bad job is refused before the buffer is looked at


def test_a_job_in_the_overflow_keeps_the_level_and_type_it_was_requeued_with(core):
    """Changing a parked job's priority (or type) once made the pop that moved it in raise:
    the popped job and the parked one vanished, and join() never returned."""
    q = core.ReadyQueue(1)
    first, parked = Item("a", LOW, "first"), Item("a", HIGH, "parked")
    q.push(first)
    q.accept([parked])
    q.requeue(parked)  # full: it waits in the overflow
    assert q.overflow_size == 1
    parked.priority = "bogus"
    parked.type = NoisyStr("elsewhere")
    NoisyStr.calls.clear()
    assert q.pop(timeout=0) is first
    assert q.sizes() == (1, 0, 0)  # moved in at HIGH, the level it was requeued with
    assert q.overflow_size == 0
    job, state = q.pop_with_type(timeout=0)
    assert job is parked and state.name == "a"
    assert NoisyStr.calls == []
    q.release("a")
    q.release_state(state)
    q.task_done(first)
    q.task_done(parked)
    assert q.join(timeout=WAIT) is True
    assert q.executor_stats() == {}


def test_a_blocked_put_keeps_the_level_and_type_it_was_called_with(core):
    q = core.ReadyQueue(1)
    q.push(Item("a", LOW, "first"))
    waiting = Item("a", HIGH, "waiting")
    producer, box = start(q.put, waiting, LONG)
    producer.join(QUIET)
    assert producer.is_alive()
    waiting.priority = "bogus"
    waiting.type = NoisyStr("elsewhere")
    NoisyStr.calls.clear()
    assert q.pop(timeout=0).name == "first"
    producer.join(WAIT)
    assert box == {"result": True}
    assert q.sizes() == (1, 0, 0)
    job, state = q.pop_with_type(timeout=0)
    assert job is waiting and state.name == "a"
    assert NoisyStr.calls == []


# --- unique ids among the unfinished jobs -------------------------------------------------------


def test_a_second_push_of_an_unfinished_id_is_refused_with_no_effect(core):
    q = core.ReadyQueue(4)
    first = Item("a", MEDIUM, "first", id="job-1")
    assert q.push(first)
    assert q.has_id("job-1") and not q.has_id("job-2")
    for call in (lambda job: q.push(job), lambda job: q.put(job, timeout=0),
                 lambda job: q.push_many([job]), lambda job: q.push_many([], [job]),
                 lambda job: q.accept([job])):
        with pytest.raises(DuplicateJob, match="'job-1' is already queued and unfinished"):
            call(Item("a", HIGH, "second", id="job-1"))
        assert q.sizes() == (0, 1, 0)
        assert q.unfinished == 1 and q.counters()[core.ENQUEUED] == 1
    assert issubclass(DuplicateJob, ValueError) and issubclass(DuplicateJob, tinymq.TinyMQError)


def test_a_duplicate_is_refused_even_when_the_buffer_is_full(core):
    q = core.ReadyQueue(1)
    assert q.push(Item("a", id="job-1"))
    with pytest.raises(DuplicateJob):
        q.push(Item("a", id="job-1"))
    assert q.push(Item("a", id="job-2")) is False
    assert not q.has_id("job-2")  # registered only when the push succeeds


def test_ids_repeated_within_a_batch_are_refused_with_no_effect(core):
    q = core.ReadyQueue(8)
    for ready, delayed in (
        ([Item("a", id="x"), Item("a", id="x")], []),
        ([Item("a", id="x")], [Item("a", id="x")]),
        ([], [Item("a", id="y"), Item("a"), Item("a", id="y")]),
    ):
        with pytest.raises(DuplicateJob):
            q.push_many(ready, delayed)
        with pytest.raises(DuplicateJob):
            q.accept(ready + delayed)
        assert_untouched(core, q)
        assert not q.has_id("x") and not q.has_id("y")


def test_a_batch_registers_every_id_and_counts_every_job(core):
    q = core.ReadyQueue(2)
    ready = [Item("a", id="r1"), Item("a")]
    delayed = [Item("a", id="d1"), Item("a"), Item("a", id="d2")]
    assert q.push_many(ready, delayed)
    assert q.unfinished == 5 and q.counters()[core.ENQUEUED] == 5 and len(q) == 2
    assert [q.has_id(i) for i in ("r1", "d1", "d2")] == [True, True, True]
    assert q.push_many([Item("a", id="r2")], [Item("a", id="d3")]) is False  # no room: no effect
    assert not q.has_id("r2") and not q.has_id("d3") and q.unfinished == 5
    recovered = [Item("a", id="s1"), Item("a", id="s2")]
    q.accept(recovered)
    assert q.has_id("s1") and q.has_id("s2") and q.unfinished == 7


def test_task_done_frees_the_id_of_that_very_job_only(core):
    q = core.ReadyQueue(4)
    first = Item("a", id="job-1")
    q.push(first)
    q.pop(timeout=0)
    q.release("a")
    q.requeue(first)  # a retry: no id check, the id stays registered
    assert q.has_id("job-1")
    q.pop(timeout=0)
    q.release("a")
    q.task_done(first)
    assert not q.has_id("job-1") and q.unfinished == 0
    second = Item("a", id="job-1")
    assert q.push(second)  # the id is free again
    stranger = Item("a")
    q.accept([stranger])
    stranger._id = "job-1"  # e.g. an id set after it was accepted
    q.task_done(stranger)
    assert q.has_id("job-1"), "task_done of another job freed the id"
    q.pop(timeout=0)
    q.release("a")
    q.task_done(second)
    assert not q.has_id("job-1") and q.unfinished == 0


def test_an_id_written_after_acceptance_is_not_registered(core):
    q = core.ReadyQueue(4)
    job = Item("a")
    q.push(job)
    job._id = "late"  # written behind the core's back (Job.id registers it: test_cancel_unnamed.py)
    assert not q.has_id("late")
    assert q.push(Item("a", id="late"))
    q.task_done(job)
    assert q.has_id("late")


@pytest.mark.parametrize("bad_id", [NoisyStr("job-1"), 7, b"job-1"])
def test_an_id_that_is_not_exactly_a_str_is_refused(core, bad_id):
    q = core.ReadyQueue(4)
    NoisyStr.calls.clear()
    bad = Item("a", id=bad_id)
    for call in (lambda: q.push(bad), lambda: q.put(bad, timeout=0), lambda: q.push_many([bad]),
                 lambda: q.push_many([], [bad]), lambda: q.accept([bad]), lambda: q.has_id(bad_id)):
        with pytest.raises(TypeError, match="job id must be a str, got"):
            call()
        assert_untouched(core, q)
    assert NoisyStr.calls == []


def test_a_put_waiting_for_room_is_refused_when_its_id_arrives_meanwhile(core):
    q = core.ReadyQueue(1)
    q.push(Item("a", MEDIUM, "first"))
    waiting = Item("a", MEDIUM, "waiting", id="job-1")
    producer, box = start(q.put, waiting, LONG)
    producer.join(QUIET)
    assert producer.is_alive()
    q.accept([Item("a", id="job-1")])  # e.g. a delayed job with that id
    q.pop(timeout=0)  # room: the producer wakes, and must see the id taken
    producer.join(WAIT)
    assert not producer.is_alive()
    assert isinstance(box.get("error"), DuplicateJob), box
    assert len(q) == 0 and q.unfinished == 2


def test_jobs_without_ids_leave_no_trace(core):
    q = core.ReadyQueue(4)
    jobs = [Item("a") for _ in range(3)]
    assert q.push(jobs[0]) and q.push_many(jobs[1:2], jobs[2:])
    for job in jobs:
        q.task_done(job)
    assert q.unfinished == 0 and q.join(timeout=0)



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
        q.accept([Item("a")])
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
    job = Item("a")
    q.accept([job])
    began = time.monotonic()
    assert q.join(timeout=0.2) is False
    assert_took(began)
    q.task_done(job)
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
    first, second = Item("a"), Item("a")
    q.accept([first, second])
    joiner, box = start(q.join, LONG)
    q.task_done(first)
    joiner.join(QUIET)
    assert joiner.is_alive(), "join returned with one job unfinished"
    q.task_done(second)
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
    jobs = [Item("a", MEDIUM, "popped"), Item("a", MEDIUM, "kept"), Item("a", MEDIUM, "put")]
    q.push(jobs[0])
    popper.join(WAIT)
    assert not popper.is_alive(), "not woken"
    assert pop_box["result"].name == "popped", pop_box

    q.push(jobs[1])
    producer, put_box = start(q.put, jobs[2], HUGE)
    joiner, join_box = start(q.join, HUGE)
    producer.join(QUIET)
    assert producer.is_alive() and joiner.is_alive(), (put_box, join_box)
    assert q.pop(timeout=0).name == "kept"
    producer.join(WAIT)
    assert put_box == {"result": True}
    assert q.pop(timeout=HUGE).name == "put"
    for job in jobs:
        q.task_done(job)
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

DUPLICATE = "DuplicateJob"  # what the model expects when the queue must raise DuplicateJob


class ReadyModel:
    """A list-based restatement of ReadyQueue's scheduling rules and of its unfinished ids."""

    def __init__(self, capacity):
        self.capacity = capacity
        self.ready = []  # [(seq, job)] in insertion order
        self.overflow = []
        self.seq = 0
        self.limits = {}  # configured types only
        self.active = {}
        self.enqueued = 0
        self.finished = 0
        self.ids = {}  # id -> the unfinished job registered under it

    def sizes(self):
        return tuple(sum(1 for _, job in self.ready if job.priority == p) for p in (HIGH, MEDIUM, LOW))

    def _append(self, job):
        self.ready.append((self.seq, job))
        self.seq += 1

    def _taken(self, jobs):
        """True when an id of ``jobs`` belongs to an unfinished job or repeats within ``jobs``."""
        ids = [job._id for job in jobs if isinstance(job._id, str)]  # (not a core's "not made yet")
        return len(set(ids)) < len(ids) or any(job_id in self.ids for job_id in ids)

    def _accept(self, jobs):
        self.enqueued += len(jobs)
        self.ids.update((job._id, job) for job in jobs if isinstance(job._id, str))

    def push(self, job):
        if self._taken([job]):
            return DUPLICATE
        if len(self.ready) >= self.capacity:
            return False
        self._append(job)
        self._accept([job])
        return True

    def push_many(self, jobs, delayed_jobs):
        if self._taken(jobs + delayed_jobs):
            return DUPLICATE
        if len(self.ready) + len(jobs) > self.capacity:
            return False
        for job in jobs:
            self._append(job)
        self._accept(jobs + delayed_jobs)
        return True

    def accept(self, jobs):
        if self._taken(jobs):
            return DUPLICATE
        self._accept(jobs)
        return None

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

    def task_done(self, job):
        self.finished += 1
        if job._id is not None and self.ids.get(job._id) is job:  # never another job's id
            del self.ids[job._id]


TYPES = ("A", "B", "C")
IDS = ("x", "y", "z")  # few, so that ids collide
types = st.sampled_from(TYPES)
priorities = st.sampled_from((LOW, MEDIUM, HIGH))
job_ids = st.none() | st.sampled_from(IDS)
specs = st.lists(st.tuples(types, priorities, job_ids), max_size=4)


class ReadyQueueMachine(RuleBasedStateMachine):
    """ReadyQueue against ReadyModel; ``core`` is set on a per-core subclass."""

    core = None

    def __init__(self):
        super().__init__()
        self.queue = None
        self.running = []  # (job, state) popped and not yet released
        self.made = 0
        self.accepted = {}  # id(job) -> job, for every job the queue counted
        self.placed_by_caller = []  # accepted jobs not handed to the queue yet (delayed ones)
        self.finishable = []  # accepted jobs popped and not yet task_done

    def item(self, job_type, priority, job_id=None):
        self.made += 1
        return Item(job_type, priority, self.made, job_id)

    def expect(self, expected, call, *args):
        """Call ``call(*args)`` and check its result, or that it raised DuplicateJob."""
        if expected == DUPLICATE:
            with pytest.raises(DuplicateJob, match="already queued and unfinished"):
                call(*args)
            return False
        assert call(*args) == expected
        return expected is not False

    def counted(self, jobs, placed_by_caller=()):
        for job in [*jobs, *placed_by_caller]:
            self.accepted[id(job)] = job
        self.placed_by_caller.extend(placed_by_caller)

    @initialize(capacity=st.integers(1, 6))
    def create(self, capacity):
        self.queue = self.core.ReadyQueue(capacity)
        self.model = ReadyModel(capacity)
        self.heap = self.core.DelayedHeap(0)
        self.delayed = []  # (run_at, job) in the heap, in the order they were pushed

    @rule(job_type=types, priority=priorities, job_id=job_ids)
    def push(self, job_type, priority, job_id):
        job = self.item(job_type, priority, job_id)
        if self.expect(self.model.push(job), self.queue.push, job):
            self.counted([job])

    @rule(job_type=types, priority=priorities, job_id=job_ids)
    def put_without_waiting(self, job_type, priority, job_id):
        job = self.item(job_type, priority, job_id)
        expected = self.model.push(job)  # full means overflow is empty or ready is full
        if self.expect(expected, self.queue.put, job, 0):
            self.counted([job])

    @rule(ready_specs=specs, delayed_specs=specs)
    def push_many(self, ready_specs, delayed_specs):
        jobs = [self.item(*spec) for spec in ready_specs]
        delayed = [self.item(*spec) for spec in delayed_specs]
        if self.expect(self.model.push_many(jobs, delayed), self.queue.push_many, jobs, delayed):
            self.counted(jobs, delayed)

    @rule(accepted_specs=specs)
    def accept(self, accepted_specs):
        jobs = [self.item(*spec) for spec in accepted_specs]
        expected = self.model.accept(jobs)
        self.expect(expected, self.queue.accept, jobs)
        if expected != DUPLICATE:
            self.counted((), jobs)

    @rule(job_type=types, priority=priorities)
    def requeue(self, job_type, priority):
        job = self.item(job_type, priority)
        self.queue.requeue(job)
        self.model.requeue(job)

    @precondition(lambda self: self.placed_by_caller)
    @rule(data=st.data())
    def requeue_accepted(self, data):
        """An accepted job becomes ready: no id check, its id stays registered."""
        job = self.placed_by_caller.pop(data.draw(st.integers(0, len(self.placed_by_caller) - 1)))
        self.queue.requeue(job)
        self.model.requeue(job)

    @precondition(lambda self: self.placed_by_caller)
    @rule(data=st.data(), run_at=st.integers(0, 3))
    def delay_accepted(self, data, run_at):
        """An accepted job waits in the delayed heap (the model keeps it with its run_at, in order)."""
        job = self.placed_by_caller.pop(data.draw(st.integers(0, len(self.placed_by_caller) - 1)))
        self.heap.push(job, float(run_at))
        self.delayed.append((run_at, job))

    @rule(now=st.integers(0, 3))
    def move_due(self, now):
        """The scheduler moves the due jobs in, earliest first (FIFO among equal run_at), as requeue does."""
        due = sorted((entry for entry in self.delayed if entry[0] <= now), key=lambda entry: entry[0])
        self.delayed = [entry for entry in self.delayed if entry[0] > now]
        assert self.queue.move_due(self.heap, float(now)) == []  # none cancelled or invalid here
        for _, job in due:
            self.model.requeue(job)
        assert len(self.heap) == len(self.delayed)

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
        if id(job) in self.accepted:
            self.finishable.append(job)

    @precondition(lambda self: self.running)
    @rule(data=st.data(), by_state=st.booleans())
    def release(self, data, by_state):
        job, state = self.running.pop(data.draw(st.integers(0, len(self.running) - 1)))
        if by_state:
            self.queue.release_state(state)
        else:
            self.queue.release(job.type)
        self.model.release(job.type)

    @precondition(lambda self: self.finishable)
    @rule(data=st.data(), renamed=st.booleans(), new_id=job_ids)
    def task_done(self, data, renamed, new_id):
        """A job finishes; renamed first, it must not free the id another job holds."""
        job = self.finishable.pop(data.draw(st.integers(0, len(self.finishable) - 1)))
        if renamed:
            job._id = new_id
        self.queue.task_done(job)
        self.model.task_done(job)

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
        assert self.queue.unfinished == model.enqueued - model.finished
        assert self.queue.executor_stats() == {
            t: (model.active.get(t, 0), limit) for t, limit in model.limits.items()
        }
        assert [self.queue.has_id(job_id) for job_id in IDS] == [job_id in model.ids for job_id in IDS]


def test_ready_queue_matches_the_model(core):
    run_model_test(ReadyQueueMachine, core, max_examples=80, steps=40)
