"""The core's hot structures against the standard-library structures a user would use instead.

- ready queue push+pop (what a worker does per job) vs ``queue.PriorityQueue``,
  ``heapq`` under a ``Lock``, and a bare ``collections.deque``;
- delayed heap with 1M entries, push and pop, vs ``heapq`` on (run_at, seq, job) tuples;
- bytes per queued entry beyond the job object (measured in a fresh interpreter).
"""
import gc
import heapq
import itertools
import queue
import random
import threading
import tracemalloc
from collections import deque
from typing import Any, Dict, List

import pytest

from conftest import CORE_NAMES, contender, load_core, rss_bytes, run_in_subprocess
from tinymq import Job

PAIRS = 10_000  # push+pop pairs per round: a round lasts 0.3-30 ms
PAIR_ROUNDS = 100  # rounds of the ReadyQueue case (each pushes PAIRS new jobs, made untimed)
DELAYED = 1_000_000  # entries in the delayed-heap cases
DUE_STEPS = 1_000  # the pop case drains the heap in this many pop_due(now) calls
ENTRY_COUNT = 250_000  # entries in the bytes-per-entry case


# --- ready queue: push+pop ----------------------------------------------------

def _ready_queue(core: Any, capacity: int) -> Any:
    """A ReadyQueue with the job type registered, as the Queue's register_executor leaves it.

    (An unregistered type's slot state is dropped whenever it empties, and made again on
    the next push: that is not the per-job path of a running queue.)
    """
    ready = core.ReadyQueue(capacity)
    ready.configure("noop", lambda job: None, 1 << 30, None, False, False)
    return ready


def _ready_queue_pairs(ready: Any, jobs: List[Any]) -> None:
    # push, pop, release(type): the fastest of the core's public ways (pop_with_type +
    # release_state builds a tuple per job). New jobs, as a queue's enqueue gets: a job the
    # queue holds unfinished is refused (DuplicateJob), and these are never finished.
    push, pop, release, job_type = ready.push, ready.pop, ready.release, jobs[0].type
    for job in jobs:
        push(job)
        pop()
        release(job_type)


def _priority_queue_pairs(pq: "queue.PriorityQueue[Any]", job: Any, n: int) -> None:
    put, get, seq = pq.put, pq.get, itertools.count()
    for _ in range(n):
        put((1, next(seq), job))
        get()


def _heapq_lock_pairs(heap: List[Any], job: Any, n: int) -> None:
    lock, push, pop, seq = threading.Lock(), heapq.heappush, heapq.heappop, itertools.count()
    for _ in range(n):
        with lock:
            push(heap, (1, next(seq), job))
        with lock:
            pop(heap)


def _deque_pairs(line: "deque[Any]", job: Any, n: int) -> None:
    append, popleft = line.append, line.popleft
    for _ in range(n):
        append(job)
        popleft()


@pytest.mark.benchmark(group="core: ready-queue push+pop", warmup=True, warmup_iterations=20)
@pytest.mark.parametrize("core_name", CORE_NAMES)
def test_ready_queue_push_pop(benchmark: Any, core_name: str) -> None:
    core = load_core(core_name)
    ready = _ready_queue(core, 1000)
    contender(benchmark, f"tinymq ReadyQueue ({core_name})", is_tinymq=True, ops=PAIRS,
              op="push+pop pair")
    benchmark.pedantic(_ready_queue_pairs, setup=lambda: ((ready, _jobs(PAIRS)), {}),
                       rounds=PAIR_ROUNDS, warmup_rounds=2)
    assert len(ready) == 0


@pytest.mark.benchmark(group="core: ready-queue push+pop", warmup=True, warmup_iterations=20)
@pytest.mark.parametrize("baseline", ["queue.PriorityQueue", "heapq + Lock", "collections.deque"])
def test_ready_queue_push_pop_baseline(benchmark: Any, baseline: str) -> None:
    job = Job("noop")
    target, structure = {
        "queue.PriorityQueue": (_priority_queue_pairs, queue.PriorityQueue()),
        "heapq + Lock": (_heapq_lock_pairs, []),
        "collections.deque": (_deque_pairs, deque()),
    }[baseline]
    contender(benchmark, baseline, is_tinymq=False, ops=PAIRS, op="push+pop pair")
    benchmark(target, structure, job, PAIRS)


# --- delayed heap: 1M entries -----------------------------------------------

def _run_ats(n: int) -> List[float]:
    rng = random.Random(42)
    return [rng.random() * DUE_STEPS for _ in range(n)]  # due over DUE_STEPS "seconds"


def _jobs(n: int) -> List[Any]:
    return [Job("noop") for _ in range(n)]


class _TupleHeap:
    """The baseline: heapq on (run_at, seq, job) tuples, popped the way a scheduler pops."""

    def __init__(self) -> None:
        self.heap: List[Any] = []
        self.seq = itertools.count()

    def push(self, job: Any, run_at: float) -> None:
        heapq.heappush(self.heap, (run_at, next(self.seq), job))

    def pop_due(self, now: float) -> List[Any]:
        heap, pop, due = self.heap, heapq.heappop, []
        while heap and heap[0][0] <= now:
            due.append(pop(heap)[2])
        return due

    def __len__(self) -> int:
        return len(self.heap)


def _new_heap(name: str) -> Any:
    return _TupleHeap() if name == "heapq tuples" else load_core(name).DelayedHeap(0)


def _push_all(heap: Any, jobs: List[Any], run_ats: List[float]) -> None:
    push, n = heap.push, len(jobs)
    for i, run_at in enumerate(run_ats):
        push(jobs[i % n], run_at)


def _pop_all(heap: Any) -> None:
    pop_due, popped = heap.pop_due, 0
    for now in range(1, DUE_STEPS + 1):
        popped += len(pop_due(float(now)))
    assert popped == DELAYED and len(heap) == 0


@pytest.fixture(scope="module")
def delayed_input() -> Any:
    return _jobs(1024), _run_ats(DELAYED)


def _heap_name(name: str) -> str:
    return name if name == "heapq tuples" else f"tinymq DelayedHeap ({name})"


@pytest.mark.benchmark(group="core: delayed heap, push 1M")
@pytest.mark.parametrize("name", CORE_NAMES + ("heapq tuples",))
def test_delayed_heap_push(benchmark: Any, name: str, delayed_input: Any) -> None:
    jobs, run_ats = delayed_input
    _new_heap(name)  # skips early when the core is missing
    contender(benchmark, _heap_name(name), is_tinymq=name != "heapq tuples", ops=DELAYED, op="push")
    benchmark.pedantic(_push_all, setup=lambda: ((_new_heap(name), jobs, run_ats), {}),
                       rounds=3, iterations=1)


@pytest.mark.benchmark(group="core: delayed heap, pop 1M")
@pytest.mark.parametrize("name", CORE_NAMES + ("heapq tuples",))
def test_delayed_heap_pop(benchmark: Any, name: str, delayed_input: Any) -> None:
    jobs, run_ats = delayed_input

    def filled() -> Any:
        heap = _new_heap(name)
        _push_all(heap, jobs, run_ats)
        return (heap,), {}

    _new_heap(name)
    contender(benchmark, _heap_name(name), is_tinymq=name != "heapq tuples", ops=DELAYED,
              op=f"pop (pop_due over {DUE_STEPS} steps)")
    benchmark.pedantic(_pop_all, setup=filled, rounds=3, iterations=1)


# --- bytes per entry --------------------------------------------------------

def _fill(structure: str, core_name: str, n: int) -> Any:
    """Build ``structure`` holding ``n`` references to one job: only the container's cost remains."""
    job = Job("noop")
    if structure == "ReadyQueue":
        ready = _ready_queue(load_core(core_name), n + 1)
        for _ in range(n):
            ready.requeue(job)  # (push refuses a job the queue holds already: the same entry, uncounted)
        return ready
    if structure == "DelayedHeap":
        heap, run_at = load_core(core_name).DelayedHeap(0), 1e9
        for i in range(n):
            heap.push(job, run_at + i)  # a fresh float per entry in the baseline too
        return heap
    if structure == "heapq tuples":
        heap = _TupleHeap()
        for i in range(n):
            heap.push(job, 1e9 + i)
        return heap
    if structure == "PriorityQueue tuples":
        pq: "queue.PriorityQueue[Any]" = queue.PriorityQueue()
        seq = itertools.count()
        for _ in range(n):
            pq.put((1, next(seq), job))
        return pq
    if structure == "collections.deque":
        line: "deque[Any]" = deque()
        for _ in range(n):
            line.append(job)
        return line
    raise ValueError(f"unknown structure {structure!r}")


def measure_entry_bytes(structure: str, core_name: str, n: int) -> Dict[str, float]:
    """Bytes per entry, two ways (run in a fresh interpreter by the test below).

    ``rss``: the resident-set growth over n entries, from /proc/self/statm; sees every
    allocation, C ``malloc`` included. ``tracemalloc``: Python-allocator growth; exact
    for Python objects, blind to the compiled core's raw ``malloc``.
    """
    _fill(structure, core_name, 1000)  # warm up: code objects, free lists
    gc.collect()
    gc.disable()
    before = rss_bytes()
    kept = _fill(structure, core_name, n)
    rss = (rss_bytes() - before) / n
    del kept
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    kept = _fill(structure, core_name, n)
    traced = (tracemalloc.get_traced_memory()[0] - base) / n
    tracemalloc.stop()
    return {"rss": rss, "tracemalloc": traced}


ENTRY_CASES = [("ReadyQueue", c) for c in CORE_NAMES] + [("DelayedHeap", c) for c in CORE_NAMES] + [
    ("PriorityQueue tuples", ""), ("heapq tuples", ""), ("collections.deque", "")]


@pytest.mark.benchmark(group="core: bytes per queued entry (beyond the job)")
@pytest.mark.parametrize("structure,core_name", ENTRY_CASES)
def test_entry_bytes(benchmark: Any, structure: str, core_name: str) -> None:
    if core_name:
        load_core(core_name)
    result: Dict[str, float] = {}

    def measure() -> None:
        result.update(run_in_subprocess("test_bench_core", "measure_entry_bytes",
                                        structure, core_name, ENTRY_COUNT))

    name = f"tinymq {structure} ({core_name})" if core_name else structure
    contender(benchmark, name, is_tinymq=bool(core_name), ops=ENTRY_COUNT, op="entry", kind="metric")
    benchmark.pedantic(measure, rounds=1, iterations=1)
    # The headline figure: RSS sees C allocations; tracemalloc is the cross-check.
    benchmark.extra_info["metrics"] = {
        "bytes_per_entry": round(max(result["rss"], result["tracemalloc"]), 1),
        "rss_bytes_per_entry": round(result["rss"], 1),
        "tracemalloc_bytes_per_entry": round(result["tracemalloc"], 1),
    }
