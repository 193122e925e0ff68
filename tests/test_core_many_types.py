"""ReadyQueue with many job types, on both cores (#11).

The choice of the next job goes through per-level heaps of the types that may
run; these tests hold it to the same rules as the list-based model of
test_core_ready.py (strict priority, FIFO across types within a level, per-type
limits), with many types, saturate/release churn and limits that change.
"""
import threading

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from test_core_ready import HIGH, LOW, MEDIUM, WAIT, Item, ReadyModel, noop

from _helpers import run_model_test

MANY_TYPES = [f"type-{i}" for i in range(24)]
types = st.sampled_from(MANY_TYPES)
priorities = st.sampled_from((LOW, MEDIUM, HIGH))


class ManyTypesMachine(RuleBasedStateMachine):
    """ReadyQueue against ReadyModel with many types and small limits; ``core`` set per core."""

    core = None

    def __init__(self):
        super().__init__()
        self.queue = None
        self.running = []  # (job, state) popped and not yet released
        self.made = 0

    def item(self, job_type, priority):
        self.made += 1
        return Item(job_type, priority, self.made)

    @initialize(capacity=st.integers(1, 40))
    def create(self, capacity):
        self.queue = self.core.ReadyQueue(capacity)
        self.model = ReadyModel(capacity)

    @rule(job_type=types, priority=priorities)
    def push(self, job_type, priority):
        job = self.item(job_type, priority)
        assert self.queue.push(job) == self.model.push(job)

    @rule(specs=st.lists(st.tuples(types, priorities), max_size=8))
    def push_many(self, specs):
        jobs = [self.item(*spec) for spec in specs]
        assert self.queue.push_many(jobs) == self.model.push_many(jobs, [])

    @rule(job_type=types, priority=priorities)
    def requeue(self, job_type, priority):
        job = self.item(job_type, priority)
        self.queue.requeue(job)
        self.model.requeue(job)

    @rule()
    def pop(self):
        expected = self.model.pop()
        taken = self.queue.pop_with_type(timeout=0)
        job = None if taken is None else taken[0]
        assert job is expected, f"popped {job}, the model expected {expected}"
        if taken is not None:
            self.running.append(taken)

    @rule(rounds=st.integers(1, 6))
    def churn(self, rounds):
        """Pop and release at once, again and again: types saturate and come back."""
        for _ in range(rounds):
            expected = self.model.pop()
            job = self.queue.pop(timeout=0)
            assert job is expected
            if job is None:
                return
            self.queue.release(job.type)
            self.model.release(job.type)

    @precondition(lambda self: self.running)
    @rule(data=st.data(), by_state=st.booleans())
    def release(self, data, by_state):
        job, state = self.running.pop(data.draw(st.integers(0, len(self.running) - 1)))
        if by_state:  # the worker's way
            self.queue.release_state(state)
        else:
            self.queue.release(job.type)
        self.model.release(job.type)

    @rule(job_type=types, limit=st.integers(1, 4))
    def configure(self, job_type, limit):
        """Register, or change a limit (lower or higher than the running attempts)."""
        self.queue.configure(job_type, noop, limit, None, False, False)
        self.model.limits[job_type] = limit

    @invariant()
    def matches_model(self):
        if self.queue is None:
            return
        assert self.queue.sizes() == self.model.sizes()
        assert self.queue.overflow_size == len(self.model.overflow)
        assert self.queue.executor_stats() == {
            t: (self.model.active.get(t, 0), limit) for t, limit in self.model.limits.items()
        }


def test_many_types_match_the_model(core):
    run_model_test(ManyTypesMachine, core, max_examples=150, steps=60)


# --- spelled out ------------------------------------------------------------------------------

def test_fifo_across_ten_thousand_types_within_a_level(core):
    q = core.ReadyQueue(40_000)
    names = [f"tenant-{i}" for i in range(10_000)]
    for i, name in enumerate(names):
        q.configure(name, noop, 1 + i % 4, None, False, False)
    jobs = [Item(names[i % len(names)], MEDIUM, i) for i in range(30_000)]
    for job in jobs:
        assert q.push(job)
    popped = []
    while True:
        job = q.pop(timeout=0)
        if job is None:
            break
        popped.append(job)
    # Saturated types are passed over: each type runs up to its limit, in push order.
    expected = [job for i, job in enumerate(jobs) if i // len(names) < 1 + (i % len(names)) % 4]
    assert popped == expected
    for job in popped:
        q.release(job.type)
    rest = []
    while True:
        job = q.pop(timeout=0)
        if job is None:
            break
        rest.append(job)
        q.release(job.type)
    taken = {id(job) for job in popped}
    assert rest == [job for job in jobs if id(job) not in taken]  # the rest in push order


def test_a_saturated_type_keeps_its_place_among_many(core):
    q = core.ReadyQueue(100)
    for name in ("a", "b", "c", "d"):
        q.configure(name, noop, 1, None, False, False)
    first_a = q.push(Item("a", MEDIUM, "a1")) and q.pop(timeout=0)  # a is saturated now
    older_a = Item("a", MEDIUM, "a2")
    later = [Item(name, MEDIUM, name + "1") for name in ("b", "c", "d")]
    q.push(older_a)
    for job in later:
        q.push(job)
    assert q.pop(timeout=0) is later[0]
    q.release("a")  # a admits again: its job is the oldest waiting
    assert q.pop(timeout=0) is older_a
    assert q.pop(timeout=0) is later[1]
    assert first_a.type == "a"


def test_strict_priority_over_many_saturating_types(core):
    q = core.ReadyQueue(1000)
    names = [f"t{i}" for i in range(50)]
    for name in names:
        q.configure(name, noop, 1, None, False, False)
    lows = [Item(name, LOW, f"{name}-low") for name in names]
    highs = [Item(name, HIGH, f"{name}-high") for name in names]
    for low, high in zip(lows, highs):
        q.push(low)
        q.push(high)
    assert [q.pop(timeout=0) for _ in names] == highs  # one slot each: the HIGH jobs first
    assert q.pop(timeout=0) is None
    for name in reversed(names):  # freed in the opposite order: still oldest first
        q.release(name)
    assert [q.pop(timeout=0) for _ in names] == lows


def test_raising_limits_of_many_types_hands_their_jobs_to_blocked_poppers(core):
    q = core.ReadyQueue(100)
    names = [f"t{i}" for i in range(20)]
    for name in names:
        q.configure(name, noop, 1, None, False, False)
        q.push(Item(name, MEDIUM, name + "-running"))
    running = [q.pop(timeout=0) for _ in names]
    assert all(job is not None for job in running)
    waiting = [Item(name, MEDIUM, name + "-waiting") for name in names[:4]]
    for job in waiting:
        q.push(job)
    got = []
    barrier = threading.Barrier(5)

    def popper():
        barrier.wait(WAIT)
        got.append(q.pop(timeout=WAIT))

    threads = [threading.Thread(target=popper, daemon=True) for _ in range(4)]
    for thread in threads:
        thread.start()
    barrier.wait(WAIT)
    for name in names[:4]:
        q.configure(name, noop, 2, None, False, False)
    for thread in threads:
        thread.join(WAIT)
    assert sorted(job.name for job in got) == sorted(job.name for job in waiting)


def test_unregistered_types_leave_nothing_behind_among_many(core):
    q = core.ReadyQueue(5000)
    jobs = [Item(f"gone-{i}", i % 3, i) for i in range(3000)]
    for job in jobs:
        q.push(job)
    for _ in jobs:
        q.release(q.pop(timeout=0).type)
    assert q.executor_stats() == {} and len(q) == 0
    types = getattr(q, "_types", None)  # the pure core's table, where it can be seen
    if types is not None:
        assert types == {} and all(not heap for heaps in q._runnable for heap in heaps)


def test_saturate_release_churn_keeps_one_listing_per_type_and_level(core):
    if not hasattr(core.ReadyQueue(1), "_runnable"):
        pytest.skip("the listings are visible in the pure core only")
    q = core.ReadyQueue(10_000)
    names = [f"t{i}" for i in range(30)]
    for name in names:
        q.configure(name, noop, 1, None, False, False)
    for i in range(3000):
        q.push(Item(names[i % 30], i % 3, i))
    for _ in range(2000):
        job = q.pop(timeout=0)
        q.release(job.type)
        q.configure(job.type, noop, 1 + len(q) % 2, None, False, False)
        threads_heaps = q._runnable[core.THREADS]
        assert all(len(heap) <= len(names) for heap in threads_heaps)
        for level, heap in enumerate(threads_heaps):
            listed = [state.name for _, state in heap]
            assert len(listed) == len(set(listed))
