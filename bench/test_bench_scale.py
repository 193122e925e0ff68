"""The core at scale (#11): many job types, and the idle pool's hand-off.

- no-op jobs/s end to end with 1, 100, 1,000 and 10,000 job types (4 workers,
  limits 1-4 per type, jobs round robin over the types), against
  ThreadPoolExecutor running the same no-op jobs (it has no types);
- registering 10,000 job types, against the dict of (function, semaphore) a user
  would build for per-type limits;
- enqueue->start latency with an idle pool, tinymq and ThreadPoolExecutor
  interleaved round by round in one run with one method: a producer sleeping
  1 ms between jobs, 4 workers, the time from the call to the executor's first line.
"""
import concurrent.futures
import threading
import time
from typing import Any, Callable, Dict, List

import pytest

from conftest import assert_queue_core, contender, load_core, percentile, queue_core
from test_bench_queue import ThreadPool
from tinymq import Config, ExecutorConfig, Job, Queue

WORKERS = 4
ROUNDS = 3
TYPE_COUNTS = (1, 100, 1_000, 10_000)
LIMITS = 4  # type i may run 1 + i % LIMITS jobs at once
JOBS = {"compiled": 100_000, "pure": 20_000, "ThreadPoolExecutor": 100_000}
REGISTERED_TYPES = 10_000
LATENCY_JOBS = 1_000  # per round and contender, one every ~1 ms
LATENCY_ROUNDS = 5  # each contender's rounds alternate with the others'
GROUP_TYPES = "queue: end-to-end no-op jobs by number of job types, 4 workers"
GROUP_REGISTER = "queue: register 10,000 job types"
GROUP_LATENCY = "queue: enqueue->start latency, idle pool, interleaved with ThreadPoolExecutor"


def noop(*args: Any) -> None:
    pass


def _type_names(n: int) -> List[str]:
    return [f"tenant-{i}" for i in range(n)]


def _register(q: Queue, names: List[str]) -> None:
    configs = [ExecutorConfig(max_concurrent_jobs=1 + i) for i in range(LIMITS)]
    register = q.register_executor
    for i, name in enumerate(names):
        register(name, noop, configs[i % LIMITS])


# --- end to end by number of types ------------------------------------------------------

class ManyTypes:
    """A started queue with ``types`` registered; a round enqueues N jobs round robin over them."""

    def __init__(self, core_name: str, types: int) -> None:
        self.core_name, self.types, self.n = core_name, types, JOBS[core_name]

    def start(self) -> None:
        self.swap = queue_core(self.core_name)
        core = self.swap.__enter__()
        self.queue = Queue(config=Config(buffer_size=self.n))
        self.names = _type_names(self.types)
        _register(self.queue, self.names)
        self.queue.start_dispatcher(WORKERS)
        assert_queue_core(self.queue, core)

    def run(self) -> None:
        enqueue, job, names, types = self.queue.enqueue, Job, self.names, self.types
        for i in range(self.n):
            enqueue(job(names[i % types]))
        assert self.queue.join(600.0)

    def stop(self) -> None:
        self.queue.stop()
        self.swap.__exit__(None, None, None)


@pytest.mark.benchmark(group=GROUP_TYPES)
@pytest.mark.parametrize("types", TYPE_COUNTS)
@pytest.mark.parametrize("core_name", ["compiled", "pure"])
def test_types_end_to_end(benchmark: Any, core_name: str, types: int) -> None:
    load_core(core_name)  # skips when the compiled core is unavailable
    subject = ManyTypes(core_name, types)
    contender(benchmark, f"tinymq ({core_name}), {types:,} type{'s' if types > 1 else ''}",
              is_tinymq=True, ops=subject.n, op="job")
    benchmark.pedantic(subject.run, setup=subject.start, teardown=subject.stop,
                       rounds=ROUNDS, warmup_rounds=1, iterations=1)


@pytest.mark.benchmark(group=GROUP_TYPES)
def test_types_end_to_end_thread_pool(benchmark: Any) -> None:
    subject = ThreadPool(JOBS["ThreadPoolExecutor"])
    contender(benchmark, "ThreadPoolExecutor (no types)", is_tinymq=False, ops=subject.n, op="job")
    benchmark.pedantic(subject.run, setup=subject.start, teardown=subject.stop,
                       rounds=ROUNDS, warmup_rounds=1, iterations=1)


# --- registering many types -------------------------------------------------------------

def _register_tinymq(core_name: str) -> Callable[[], None]:
    names = _type_names(REGISTERED_TYPES)

    def register() -> None:
        with queue_core(core_name) as core:
            q = Queue(config=Config(buffer_size=16))
            assert_queue_core(q, core)
        _register(q, names)
        assert len(q._ready.executor_stats()) == REGISTERED_TYPES

    return register


def _register_semaphores() -> None:
    executors: Dict[str, Any] = {}
    for i, name in enumerate(_type_names(REGISTERED_TYPES)):
        executors[name] = (noop, threading.BoundedSemaphore(1 + i % LIMITS))


@pytest.mark.benchmark(group=GROUP_REGISTER)
@pytest.mark.parametrize("name", ["compiled", "pure", "dict of (function, BoundedSemaphore)"])
def test_register_types(benchmark: Any, name: str) -> None:
    if name in ("compiled", "pure"):
        load_core(name)
        measure, display = _register_tinymq(name), f"tinymq ({name})"
    else:
        measure, display = _register_semaphores, name
    contender(benchmark, display, is_tinymq=display.startswith("tinymq"), ops=REGISTERED_TYPES,
              op="type")
    benchmark.pedantic(measure, rounds=5, warmup_rounds=1, iterations=1)


# --- enqueue -> start, interleaved --------------------------------------------------------

def _latency_tinymq(core_name: str) -> Callable[[], List[float]]:
    def measure() -> List[float]:
        delays: List[float] = []
        clock = time.perf_counter

        def record(job: Any) -> None:
            delays.append(clock() - job.payload)

        with queue_core(core_name) as core:
            q = Queue(config=Config(buffer_size=LATENCY_JOBS))
            q.register_executor("latency", record)
            q.start_dispatcher(WORKERS)
            assert_queue_core(q, core)
        try:
            time.sleep(0.05)  # the pool is idle: every worker waits
            enqueue, sleep = q.enqueue, time.sleep
            for _ in range(LATENCY_JOBS):
                job = Job("latency")
                job.payload = clock()
                enqueue(job)
                sleep(0.001)
            assert q.join(30.0)
        finally:
            q.stop()
        return delays

    return measure


def _latency_thread_pool() -> List[float]:
    delays: List[float] = []
    clock = time.perf_counter

    def record(started: float) -> None:
        delays.append(clock() - started)

    with concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
        concurrent.futures.wait([pool.submit(time.sleep, 0.01) for _ in range(WORKERS)])
        time.sleep(0.05)  # the pool is idle: every worker waits
        submit, sleep = pool.submit, time.sleep
        for _ in range(LATENCY_JOBS):
            started = clock()
            submit(record, started)
            sleep(0.001)
    return delays


LATENCY_CONTENDERS = {"tinymq (compiled)": lambda: _latency_tinymq("compiled"),
                      "tinymq (pure)": lambda: _latency_tinymq("pure"),
                      "ThreadPoolExecutor": lambda: _latency_thread_pool}


@pytest.fixture(scope="module")
def interleaved_latency() -> Dict[str, List[List[float]]]:
    """Every contender's rounds, run one contender after the other, round after round."""
    measures = {}
    for name, make in LATENCY_CONTENDERS.items():
        try:
            if "compiled" in name:
                load_core("compiled")
        except pytest.skip.Exception:
            continue
        measures[name] = make()
    rounds: Dict[str, List[List[float]]] = {name: [] for name in measures}
    for _ in range(LATENCY_ROUNDS):
        for name, measure in measures.items():
            rounds[name].append(measure())
    return rounds


@pytest.mark.benchmark(group=GROUP_LATENCY)
@pytest.mark.parametrize("name", list(LATENCY_CONTENDERS))
def test_interleaved_latency(benchmark: Any, name: str,
                             interleaved_latency: Dict[str, List[List[float]]]) -> None:
    if name not in interleaved_latency:
        pytest.skip("the compiled core is not built")
    rounds = interleaved_latency[name]
    assert all(len(delays) == LATENCY_JOBS for delays in rounds)
    p50s = [percentile(delays, 50) * 1e6 for delays in rounds]
    p99s = [percentile(delays, 99) * 1e6 for delays in rounds]
    # The figures were taken by the fixture; the round time here means nothing.
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    contender(benchmark, name, is_tinymq=name.startswith("tinymq"), ops=LATENCY_JOBS, op="job",
              kind="metric", p50_us=round(percentile(p50s, 50), 1),
              p99_us=round(percentile(p99s, 50), 1))
