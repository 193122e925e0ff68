"""The core's side of async executors and cancel, on both twins: runners, the loop's
wake-up and batched take, and removing a waiting job by id."""
import threading
from collections import deque

import pytest
from hypothesis import given, settings, strategies as st

from _helpers import examples, loop_takes


class Item:
    """A minimal job: what the core reads (type, priority, _id)."""

    def __init__(self, type, priority=1, payload=None, _id=None):
        self.type, self.priority, self.payload, self._id = type, priority, payload, _id

    def __repr__(self):
        return f"Item({self.type!r}, {self.priority}, {self.payload!r})"


def noop(job):
    pass


class Waker:
    def __init__(self):
        self.calls = 0

    def __call__(self):
        self.calls += 1


def test_loop_jobs_are_never_popped_by_workers_and_wake_the_loop_once(core):
    q = core.ReadyQueue(100)
    waker = Waker()
    q.configure("a", noop, 10, None, False, False, core.LOOP)
    q.configure("t", noop, 10, None, False, False)
    handed = deque()
    q.set_loop_waker(waker, handed)
    assert waker.calls == 0  # nothing waiting
    for i in range(5):
        q.push(Item("a", 1, i))
    assert waker.calls == 1  # one wake-up, however many jobs
    q.push(Item("t", 1, "t"))
    assert q.pop(timeout=0).payload == "t"
    assert q.pop(timeout=0) is None  # the loop's jobs are not a worker's
    taken = loop_takes(q, 3, handed)
    assert [job.payload for job, state in taken] == [0, 1, 2] and taken[0][1].name == "a"
    q.push(Item("a", 1, 5))
    assert waker.calls == 1  # the loop has not found the queue empty yet: no wake-up
    assert [job.payload for job, _ in loop_takes(q, 10, handed)] == [3, 4, 5]  # fewer than asked: idle now
    q.push(Item("a", 1, 6))
    assert waker.calls == 2


def test_loop_attempt_succeeded_counts_finishes_and_leaves_the_freed_slot_to_the_loop(core):
    q = core.ReadyQueue(100)
    waker = Waker()
    q.configure("a", noop, 1, None, False, False, core.LOOP)
    handed = deque()
    q.set_loop_waker(waker, handed)
    first, second = Item("a", 1, 0, _id="first"), Item("a", 1, 1, _id="second")
    q.push_many([first, second])
    assert waker.calls == 1
    (job, state), = loop_takes(q, 10, handed)  # one slot: one job, and the loop counts as idle
    assert job is first and q.executor_stats()["a"] == (1, 1)
    q.loop_attempt_succeeded(state, 0.002, job)
    assert waker.calls == 1  # no wake-up for the job the freed slot admits: its runner takes it
    assert q.executor_stats()["a"] == (0, 1)
    assert q.unfinished == 1 and not q.has_id("first") and q.has_id("second")
    assert q.counters()[core.SUCCEEDED] == 1
    assert q.snapshot()[2]["a"][2 + core.TYPE_EVENTS.index(core.SUCCEEDED)] == 1  # (active, limit, events...)
    buckets, total = q.attempt_durations()["a"]
    assert buckets[core.ATTEMPT_DURATION_BUCKETS.index(0.005)] == 1 and sum(buckets) == 1
    assert total == pytest.approx(0.002)
    (job, state), = loop_takes(q, 10, handed)
    assert job is second
    q.loop_attempt_succeeded(state, 0.5, job)
    assert q.join(timeout=0) and q.unfinished == 0 and q.counters()[core.SUCCEEDED] == 2


def test_a_worker_waiting_is_not_handed_the_loops_jobs(core):
    q = core.ReadyQueue(10)
    q.configure("a", noop, 10, None, False, False, core.LOOP)
    got = []
    worker = threading.Thread(target=lambda: got.append(q.pop(timeout=0.3)))
    worker.start()
    q.push(Item("a"))
    worker.join()
    assert got == [None] and len(q) == 1


@settings(max_examples=examples(40), deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["a", "b", "t"]), st.integers(0, 2)), max_size=40),
       st.integers(1, 3))
def test_the_loops_take_is_strict_priority_and_fifo_within_limits(jobs, limit):
    from tinymq import _core_py
    cores = [_core_py]
    try:
        from tinymq import _core
        cores.append(_core)
    except ImportError:
        pass
    for core in cores:
        q = core.ReadyQueue(100)
        for name in ("a", "b"):
            q.configure(name, noop, limit, None, False, False, core.LOOP)
        handed = deque()
        q.set_loop_waker(None, handed)
        items = [Item(t, p, i) for i, (t, p) in enumerate(jobs)]
        for item in items:
            q.push(item)
        taken = [job for job, _ in loop_takes(q, 1000, handed)]
        expected = []  # by priority then age, each type up to its limit: the loop takes all it may
        per_type = {"a": 0, "b": 0}
        for item in sorted((i for i in items if i.type != "t"), key=lambda i: (-i.priority, i.payload)):
            if per_type[item.type] < limit:
                per_type[item.type] += 1
                expected.append(item)
        assert taken == expected
        assert len(q) == len(items) - len(taken)


def test_changing_runner_moves_waiting_jobs(core):
    q = core.ReadyQueue(10)
    for i in range(3):
        q.push(Item("x", i, i))
    q.configure("x", noop, 10, None, False, False, core.LOOP)
    handed = deque()
    q.set_loop_waker(None, handed)
    assert q.pop(timeout=0) is None
    assert [job.payload for job, _ in loop_takes(q, 10, handed)] == [2, 1, 0]
    q.push(Item("x", 1, "again"))
    q.configure("x", noop, 10, None, False, False, core.THREADS)
    assert loop_takes(q, 10, handed) == []
    assert q.pop(timeout=0).payload == "again"


def test_closed_queue_gives_the_loop_nothing(core):
    q = core.ReadyQueue(10)
    q.configure("a", noop, 10, None, False, False, core.LOOP)
    handed = deque()
    q.set_loop_waker(None, handed)
    q.push(Item("a"))
    q.close()
    assert q.hand_to_loop(10) == 0 and not handed


def test_runner_is_validated(core):
    q = core.ReadyQueue(10)
    with pytest.raises(ValueError, match="runner"):
        q.configure("a", noop, 1, None, False, False, 7)


def test_remove_by_id_from_any_place_keeps_order(core):
    q = core.ReadyQueue(100)
    items = [Item("t" if i % 2 else "u", i % 3, i, f"id-{i}") for i in range(12)]
    for item in items:
        q.push(item)
    for i in (0, 1, 6, 11, 4):  # heads and middles of several (type, level) FIFOs
        assert q.remove(f"id-{i}") is items[i]
    assert q.remove("id-0") is None and q.remove("nope") is None
    with pytest.raises(TypeError):
        q.remove(0)
    assert len(q) == 7 and sum(q.sizes()) == 7
    popped = []
    while True:
        job = q.pop(timeout=0)
        if job is None:
            break
        popped.append(job.payload)
        q.release(job.type)
    left = [i for i in range(12) if i not in (0, 1, 6, 11, 4)]
    assert popped == sorted(left, key=lambda i: (-(i % 3), i))


def test_remove_from_the_overflow_line_and_room_goes_to_it(core):
    q = core.ReadyQueue(2)
    for i in range(2):
        q.push(Item("t", 1, i, f"id-{i}"))
    owed = [Item("t", 1, "owed-a", "id-a"), Item("t", 1, "owed-b", "id-b")]
    for item in owed:
        q.requeue(item)
    assert q.overflow_size == 2
    assert q.remove("id-a") is owed[0] and q.overflow_size == 1
    assert q.remove("id-0").payload == 0  # makes room: the overflow line moves in
    assert q.overflow_size == 0 and len(q) == 2


def test_remove_hands_the_freed_room_to_a_waiting_worker_of_another_type(core):
    q = core.ReadyQueue(10)
    q.configure("t", noop, 1, None, False, False)
    q.push(Item("t", 1, "running"))
    assert q.pop(timeout=0).payload == "running"  # t is saturated
    q.push(Item("t", 1, "blocked", "id-blocked"))
    assert q.remove("id-blocked").payload == "blocked"
    q.release("t")
    assert q.pop(timeout=0) is None


def test_delayed_heap_remove(core):
    heap = core.DelayedHeap()
    items = [Item("t", 1, i, f"id-{i}") for i in range(8)]
    for i, item in enumerate(items):
        heap.push(item, float((i * 5) % 8))
    assert heap.remove("id-3") is items[3] and heap.remove("id-3") is None
    assert heap.remove("id-0") is items[0]
    due = heap.pop_all()
    assert [item.payload for item in due] == sorted(
        [i for i in range(8) if i not in (0, 3)], key=lambda i: ((i * 5) % 8, i))
