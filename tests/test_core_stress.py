"""Threaded stress on both cores: producers and consumers move many items
through a small ReadyQueue with blocking put/pop; each item arrives exactly once.
"""
import gc
import random
import threading
import time

import pytest

WAIT = 10.0
PRODUCERS = 4
CONSUMERS = 4
ITEMS = 200_000
PER_PRODUCER = ITEMS // PRODUCERS


class Item:
    __slots__ = ("type", "priority", "_id", "origin")

    def __init__(self, type, priority, origin, id=None):
        self.type = type
        self.priority = priority
        self._id = id
        self.origin = origin


def noop(job):
    pass


def _produce_then_drain(q, barrier, produce, consume, received):
    """Run PRODUCERS producers and a consumer per list in ``received``; close once all is done.

    Returns the threads (producers first); the consumers have been joined.
    """
    threads = [threading.Thread(target=produce, args=(p,), daemon=True) for p in range(PRODUCERS)]
    threads += [threading.Thread(target=consume, args=(out,), daemon=True) for out in received]
    for thread in threads:
        thread.start()
    barrier.wait(WAIT)
    for thread in threads[:PRODUCERS]:
        thread.join(400)
    assert not any(thread.is_alive() for thread in threads[:PRODUCERS]), "a producer is stuck"
    assert q.join(timeout=120), f"{q.unfinished} items never arrived"
    q.close()
    for thread in threads[PRODUCERS:]:
        thread.join(WAIT)
    return threads


@pytest.mark.timeout(600)
def test_four_producers_four_consumers_move_every_item_exactly_once(core):
    q = core.ReadyQueue(64)
    q.configure("limited", noop, 2, None, False, False)  # 4 consumers, 2 slots: passing over happens
    barrier = threading.Barrier(PRODUCERS + CONSUMERS + 1)
    received = [[] for _ in range(CONSUMERS)]
    errors = []

    def produce(producer):
        try:
            rng = random.Random(producer)
            jobs = [
                Item(rng.choice(("a", "b", "limited")), rng.randrange(3), (producer, i))
                for i in range(PER_PRODUCER)
            ]
            barrier.wait(WAIT)
            put = q.put
            for job in jobs:
                if not put(job, WAIT * 6):
                    raise AssertionError(f"put timed out at {job.origin}")
        except BaseException as exc:
            errors.append(exc)

    def consume(out):
        try:
            barrier.wait(WAIT)
            pop, release, task_done, append = q.pop, q.release, q.task_done, out.append
            while True:
                job = pop()
                if job is None:  # closed
                    return
                append(job.origin)
                release(job.type)
                task_done(job)
        except BaseException as exc:
            errors.append(exc)

    began = time.monotonic()
    threads = _produce_then_drain(q, barrier, produce, consume, received)
    assert not any(thread.is_alive() for thread in threads), "a consumer did not stop on close()"
    assert errors == []
    elapsed = time.monotonic() - began

    everything = [origin for out in received for origin in out]
    assert len(everything) == ITEMS
    assert set(everything) == {(p, i) for p in range(PRODUCERS) for i in range(PER_PRODUCER)}
    assert all(len(out) > 0 for out in received), "a consumer never got an item"
    assert len(q) == 0 and q.overflow_size == 0
    assert q.counters()[core.ENQUEUED] == ITEMS
    assert q.unfinished == 0
    assert q.executor_stats() == {"limited": (0, 2)}
    print(f"{core.__name__}: {ITEMS} items in {elapsed:.2f} s")


@pytest.mark.timeout(300)
def test_requeues_under_contention_are_never_lost(core):
    """Requeues overflow a tiny buffer while consumers pop; nothing is dropped."""
    q = core.ReadyQueue(2)
    total = 20_000
    barrier = threading.Barrier(3)
    received = [[] for _ in range(2)]
    jobs = [Item("t", i % 3, i) for i in range(total)]
    q.accept(jobs)

    def requeue_all():
        barrier.wait(WAIT)
        for job in jobs:
            q.requeue(job)

    def consume(out):
        barrier.wait(WAIT)
        while True:
            job = q.pop()
            if job is None:
                return
            out.append(job.origin)
            q.release(job.type)
            q.task_done(job)

    producer = threading.Thread(target=requeue_all, daemon=True)
    consumers = [threading.Thread(target=consume, args=(out,), daemon=True) for out in received]
    for thread in [producer, *consumers]:
        thread.start()
    producer.join(200)
    assert not producer.is_alive()
    assert q.join(timeout=120), f"{q.unfinished} requeued items never arrived"
    q.close()
    for thread in consumers:
        thread.join(WAIT)
    assert not any(thread.is_alive() for thread in consumers)
    assert sorted(received[0] + received[1]) == list(range(total))
    assert q.overflow_size == 0 and len(q) == 0


class Yielder:
    """Cyclic garbage whose finalizer gives the GIL away, wherever the collector runs it."""

    def __init__(self):
        self.cycle = self

    def __del__(self):
        time.sleep(0)


@pytest.mark.timeout(300)
def test_requeues_are_not_stranded_in_the_overflow_when_the_collector_switches_threads(core):
    """An allocation may run the garbage collector, and a finalizer may switch threads: a
    requeue that made its overflow entry after seeing the buffer full could park a job there
    after a pop had made room, and with the buffer drained nothing would ever move it in."""
    q = core.ReadyQueue(2)
    jobs = [Item("t", i % 3, i) for i in range(20_000)]
    q.accept(jobs)
    received = []

    def consume():
        while True:
            job = q.pop()
            if job is None:
                return
            received.append(job.origin)
            q.release(job.type)
            q.task_done(job)

    consumers = [threading.Thread(target=consume, daemon=True) for _ in range(2)]
    thresholds = gc.get_threshold()
    gc.set_threshold(5, 1, 1)  # collect at almost every allocation
    try:
        for thread in consumers:
            thread.start()
        for i, job in enumerate(jobs):
            if i % 5 == 0:
                Yielder()
            q.requeue(job)
        finished = q.join(timeout=60)
    finally:
        gc.set_threshold(*thresholds)
        q.close()
    for thread in consumers:
        thread.join(WAIT)
    assert finished, f"{q.unfinished} jobs never ran ({q.overflow_size} in the overflow, {len(q)} ready)"
    assert sorted(received) == list(range(len(jobs)))


@pytest.mark.timeout(600)
def test_many_types_never_exceed_their_limits_and_every_job_runs_once(core):
    """4 producers and 4 consumers over 1,000 types with limits 1-3: a consumer counts the
    attempts of each type running at once, which must never exceed its limit."""
    type_count, per_producer = 1_000, 25_000
    names = [f"tenant-{i}" for i in range(type_count)]
    limits = {name: 1 + i % 3 for i, name in enumerate(names)}
    q = core.ReadyQueue(256)
    for name, limit in limits.items():
        q.configure(name, noop, limit, None, False, False)
    running = dict.fromkeys(names, 0)
    running_lock = threading.Lock()
    barrier = threading.Barrier(PRODUCERS + CONSUMERS + 1)
    received = [[] for _ in range(CONSUMERS)]
    errors = []

    # Made before the threads start: made by them, they took a loaded machine past the start barrier.
    jobs_of = []
    for producer in range(PRODUCERS):
        rng = random.Random(producer)
        jobs_of.append([Item(rng.choice(names), rng.randrange(3), (producer, i)) for i in range(per_producer)])

    def produce(producer):
        try:
            barrier.wait(WAIT)
            for job in jobs_of[producer]:
                if not q.put(job, WAIT * 6):
                    raise AssertionError(f"put timed out at {job.origin}")
        except BaseException as exc:
            errors.append(exc)

    def consume(out):
        try:
            barrier.wait(WAIT)
            while True:
                taken = q.pop_with_type()
                if taken is None:  # closed
                    return
                job, state = taken
                with running_lock:
                    running[job.type] += 1
                    if running[job.type] > limits[job.type]:
                        raise AssertionError(f"{job.type}: {running[job.type]} running, limit {limits[job.type]}")
                out.append(job.origin)
                if len(out) % 7 == 0:
                    time.sleep(0)  # let the others pile up behind a saturated type
                with running_lock:
                    running[job.type] -= 1
                q.release_state(state)
                q.task_done(job)
        except BaseException as exc:
            errors.append(exc)

    _produce_then_drain(q, barrier, produce, consume, received)
    assert errors == []
    everything = [origin for out in received for origin in out]
    assert len(everything) == PRODUCERS * per_producer
    assert set(everything) == {(p, i) for p in range(PRODUCERS) for i in range(per_producer)}
    assert len(q) == 0 and q.overflow_size == 0 and q.unfinished == 0
    assert q.executor_stats() == {name: (0, limit) for name, limit in limits.items()}
