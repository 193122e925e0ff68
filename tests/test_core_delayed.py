"""DelayedHeap, on both cores: due-popping in (run_at, insertion) order, the next
deadline, and capped eviction of the earliest waiting job.

A Hypothesis state machine compares the heap with a sorted-list model.
"""
import gc
import math
import random
import sys
import threading
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

from _helpers import run_model_test

WAIT = 10.0


class Item:
    __slots__ = ("type", "priority", "name")

    def __init__(self, name, type="a", priority=1):
        self.name = name
        self.type = type
        self.priority = priority

    def __repr__(self):
        return f"Item({self.name!r})"


def names(jobs):
    return [job.name for job in jobs]


def test_negative_capacity_is_rejected(core):
    with pytest.raises(ValueError, match="-1"):
        core.DelayedHeap(-1)


def test_empty_heap(core):
    heap = core.DelayedHeap()
    assert len(heap) == 0
    assert heap.next_run_at() is None
    assert heap.pop_due(math.inf) == []
    assert heap.pop_all() == []


def test_pop_due_takes_due_jobs_earliest_first(core):
    heap = core.DelayedHeap()
    for name, run_at in (("c", 30.0), ("a", 10.0), ("d", 40.0), ("b", 20.0)):
        assert heap.push(Item(name), run_at) is None
    assert len(heap) == 4
    assert heap.next_run_at() == 10.0
    assert heap.pop_due(9.999) == []
    assert names(heap.pop_due(20.0)) == ["a", "b"]  # run_at == now is due
    assert heap.next_run_at() == 30.0
    assert len(heap) == 2
    assert names(heap.pop_due(1e9)) == ["c", "d"]
    assert heap.next_run_at() is None


def test_equal_run_at_is_fifo(core):
    heap = core.DelayedHeap()
    for i in range(50):
        heap.push(Item(i), 5.0 if i % 2 else 3.0)
    assert names(heap.pop_due(10.0)) == list(range(0, 50, 2)) + list(range(1, 50, 2))


def test_pop_all_is_earliest_first_and_empties(core):
    heap = core.DelayedHeap()
    for name, run_at in (("late", 1e12), ("x", 2.0), ("y", 2.0), ("early", -5.0)):
        heap.push(Item(name), run_at)
    assert names(heap.pop_all()) == ["early", "x", "y", "late"]
    assert len(heap) == 0
    assert heap.next_run_at() is None


def test_pop_all_orders_many_jobs_by_run_at_then_insertion(core):
    rng = random.Random(7)
    heap = core.DelayedHeap()
    run_ats = [float(rng.randrange(40)) for _ in range(300)]
    for i, run_at in enumerate(run_ats):
        heap.push(Item(i), run_at)
    expected = sorted(range(300), key=lambda i: (run_ats[i], i))
    assert names(heap.pop_all()) == expected


def test_run_at_may_be_an_int_and_next_run_at_is_a_float(core):
    heap = core.DelayedHeap()
    heap.push(Item("a"), 7)
    assert heap.next_run_at() == 7.0
    assert isinstance(heap.next_run_at(), float)
    assert names(heap.pop_due(7)) == ["a"]


def test_full_heap_evicts_the_earliest_waiting_job(core):
    heap = core.DelayedHeap(3)
    early, middle, late = Item("early"), Item("middle"), Item("late")
    assert heap.push(middle, 20.0) is None
    assert heap.push(early, 10.0) is None
    assert heap.push(late, 30.0) is None
    assert heap.push(Item("new"), 25.0) is early
    assert len(heap) == 3
    # The new job is always added, even when it is earlier than every waiting one.
    assert heap.push(Item("earliest"), 1.0) is middle
    assert names(heap.pop_all()) == ["earliest", "new", "late"]


def test_eviction_among_equal_run_at_takes_the_oldest(core):
    heap = core.DelayedHeap(2)
    first, second = Item("first"), Item("second")
    heap.push(first, 5.0)
    heap.push(second, 5.0)
    assert heap.push(Item("third"), 5.0) is first
    assert heap.push(Item("fourth"), 5.0) is second
    assert names(heap.pop_due(5.0)) == ["third", "fourth"]


def test_capacity_zero_is_unlimited(core):
    heap = core.DelayedHeap(0)
    for i in range(1000):
        assert heap.push(Item(i), float(1000 - i)) is None
    assert len(heap) == 1000
    assert names(heap.pop_due(1000.0)) == list(range(999, -1, -1))


def test_infinite_run_at_is_never_due_before_infinity(core):
    heap = core.DelayedHeap()
    heap.push(Item("never"), math.inf)
    heap.push(Item("soon"), 1.0)
    assert names(heap.pop_due(1e300)) == ["soon"]
    assert heap.next_run_at() == math.inf
    assert names(heap.pop_due(math.inf)) == ["never"]


def test_peek_due_counts_only_jobs_not_due_as_waiting_without_moving_them(core):
    # Queue.get_stats(): a due job no longer counts as delayed, before the scheduler moves it too.
    heap = core.DelayedHeap()
    for run_at in (5.0, 1.0, 3.0, 2.0, 4.0, 2.0):
        heap.push(Item(run_at), run_at)
    assert [heap.peek_due(now)[1] for now in (0.0, 1.0, 2.0, 4.5, 5.0)] == [6, 5, 3, 1, 0]
    assert len(heap) == 6 and heap.next_run_at() == 1.0
    assert core.DelayedHeap().peek_due(0.0)[1] == 0


def test_peek_due_gives_the_due_jobs_in_order_without_moving_them(core):
    # Queue.get_stats(): a due job counts as ready from its due time on, moved or not.
    heap = core.DelayedHeap()
    for name, run_at in (("e", 5.0), ("a", 1.0), ("c", 3.0), ("b1", 2.0), ("d", 4.0), ("b2", 2.0)):
        heap.push(Item(name), run_at)
    due, not_due = heap.peek_due(3.0)
    assert (names(due), not_due) == (["a", "b1", "b2", "c"], 2)
    assert len(heap) == 6 and heap.next_run_at() == 1.0
    assert names(heap.pop_due(3.0)) == ["a", "b1", "b2", "c"]
    assert heap.peek_due(0.0) == ([], 2)
    assert core.DelayedHeap().peek_due(math.inf) == ([], 0)


def test_concurrent_pushes_and_pops_lose_nothing(core):
    heap = core.DelayedHeap()
    per_thread = 5000
    barrier = threading.Barrier(4)
    popped = [[] for _ in range(2)]

    def producer(offset):
        barrier.wait(WAIT)
        for i in range(per_thread):
            heap.push(Item(offset + i), float(i % 97))

    def consumer(out):
        barrier.wait(WAIT)
        for _ in range(per_thread // 10):
            out.extend(heap.pop_due(50.0))

    threads = [threading.Thread(target=producer, args=(k * per_thread,)) for k in range(2)]
    threads += [threading.Thread(target=consumer, args=(out,)) for out in popped]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT * 3)
    assert not any(thread.is_alive() for thread in threads)
    rest = heap.pop_all()
    seen = names(rest) + names(popped[0]) + names(popped[1])
    assert sorted(seen) == list(range(2 * per_thread))


class Collectable:
    __slots__ = ("name", "__weakref__")

    def __init__(self, name):
        self.name = name


def test_jobs_are_not_leaked_or_freed_early(core):
    job = Collectable("x")
    before = sys.getrefcount(job)
    heap = core.DelayedHeap(2)
    for _ in range(100):
        heap.push(job, 1.0)
        assert heap.pop_due(1.0) == [job]
        heap.push(job, 1.0)
        heap.push(job, 2.0)
        assert heap.push(job, 3.0) is job  # evicted
        assert heap.pop_all() == [job, job]
    assert sys.getrefcount(job) == before


def test_a_dropped_heap_frees_its_jobs(core):
    heap = core.DelayedHeap()
    jobs = [Collectable(i) for i in range(20)]
    for i, job in enumerate(jobs):
        heap.push(job, float(i))
    freed = []
    refs = [weakref.ref(job, freed.append) for job in jobs]
    del jobs, job
    assert not freed
    del heap
    gc.collect()
    assert len(freed) == 20 and all(ref() is None for ref in refs)


# --- the reference model ---------------------------------------------------------------------


class DelayedModel:
    def __init__(self, capacity):
        self.capacity = capacity
        self.entries = []  # [(run_at, seq, job)]
        self.seq = 0

    def _earliest(self):
        return min(range(len(self.entries)), key=lambda i: self.entries[i][:2])

    def push(self, job, run_at):
        evicted = None
        if self.capacity and len(self.entries) >= self.capacity:
            evicted = self.entries.pop(self._earliest())[2]
        self.entries.append((run_at, self.seq, job))
        self.seq += 1
        return evicted

    def pop_due(self, now):
        due = sorted(e for e in self.entries if e[0] <= now)
        self.entries = [e for e in self.entries if e[0] > now]
        return [e[2] for e in due]

    def pop_all(self):
        jobs = [e[2] for e in sorted(self.entries, key=lambda e: e[:2])]
        self.entries = []
        return jobs

    def next_run_at(self):
        return min(e[0] for e in self.entries) if self.entries else None

    def peek_due(self, now):
        due = sorted(e for e in self.entries if e[0] <= now)
        return [e[2] for e in due], len(self.entries) - len(due)


# Few distinct values, so that equal run_at (FIFO) and eviction ties come up often.
run_ats = st.one_of(
    st.sampled_from([0.0, 1.0, 1.5, 2.0, 3.0, 10.0]),
    st.floats(-1e6, 1e6, allow_nan=False),
)


class DelayedHeapMachine(RuleBasedStateMachine):
    """DelayedHeap against DelayedModel; ``core`` is set on a per-core subclass."""

    core = None

    def __init__(self):
        super().__init__()
        self.heap = None
        self.made = 0

    @initialize(capacity=st.integers(0, 5))
    def create(self, capacity):
        self.heap = self.core.DelayedHeap(capacity)
        self.model = DelayedModel(capacity)

    @rule(run_at=run_ats)
    def push(self, run_at):
        self.made += 1
        job = Item(self.made)
        expected = self.model.push(job, run_at)
        evicted = self.heap.push(job, run_at)
        assert evicted is expected, f"evicted {evicted}, the model expected {expected}"

    @precondition(lambda self: self.heap is not None and self.model.capacity
                  and len(self.model.entries) == self.model.capacity)
    @rule(run_at=run_ats)
    def push_when_full(self, run_at):
        self.push(run_at)

    @rule(now=run_ats)
    def pop_due(self, now):
        expected = self.model.pop_due(now)
        assert names(self.heap.pop_due(now)) == names(expected)

    @precondition(lambda self: self.heap is not None and self.model.entries)
    @rule()
    def pop_due_at_next_run_at(self):
        self.pop_due(self.model.next_run_at())

    @rule(now=run_ats)
    def peek_due(self, now):
        due, not_due = self.heap.peek_due(now)
        expected_due, expected_not_due = self.model.peek_due(now)
        assert (names(due), not_due) == (names(expected_due), expected_not_due)

    @rule()
    def pop_all(self):
        assert names(self.heap.pop_all()) == names(self.model.pop_all())

    @invariant()
    def matches_model(self):
        if self.heap is None:
            return
        assert len(self.heap) == len(self.model.entries)
        if self.model.capacity:
            assert len(self.heap) <= self.model.capacity
        assert self.heap.next_run_at() == self.model.next_run_at()


def test_delayed_heap_matches_the_model(core):
    run_model_test(DelayedHeapMachine, core, max_examples=80, steps=40)
