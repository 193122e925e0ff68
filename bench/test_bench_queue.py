"""The Queue end to end against what a Python user would pick instead, in the same run.

- no-op jobs/s with 4 workers, job creation included: tinymq (compiled, pure) vs
  ThreadPoolExecutor, a PriorityQueue + 4 threads dispatcher, huey MemoryHuey with a
  4-thread consumer, dramatiq StubBroker + a 4-thread Worker;
- enqueue->start latency with an idle pool and a producer that sleeps 1 ms between jobs;
- delayed-job lateness (start - run_at) vs polling schedulers at 50 ms and 100 ms;
- bytes per queued job, the job object included (measured in a fresh interpreter).
"""
import concurrent.futures
import gc
import heapq
import itertools
import queue
import random
import signal
import threading
import time
import tracemalloc
import uuid
from typing import Any, Callable, Dict, List, Optional, Tuple

import pytest

from conftest import (CORE_NAMES, assert_queue_core, contender, percentile, queue_core,
                      rss_bytes, run_in_subprocess)
from tinymq import Config, ExecutorConfig, Job, Queue

WORKERS = 4
ROUNDS = 5
# Jobs per round, per contender: each round lasts about 0.3-2 s on a 2-core machine.
JOBS = {"compiled": 200_000, "pure": 50_000, "ThreadPoolExecutor": 100_000,
        "PriorityQueue + 4 threads": 100_000, "huey MemoryHuey": 20_000,
        "dramatiq StubBroker": 10_000}
LATENCY_JOBS = 1_000  # one every ~1 ms
SAMPLE_ROUNDS = 3  # latency and lateness: the median of the rounds' percentiles, against noise
LATE_JOBS = 2_000  # due at random times over LATE_SPAN seconds
LATE_SPAN = 2.0
QUEUED_JOBS = 100_000


def noop(*args: Any) -> None:
    pass


# --- contenders: each is (start, run N jobs and wait, stop) ------------------------

class TinyMQ:
    """A started queue running ``fn``; ``run`` enqueues ``n`` fresh jobs from this thread and joins.

    ``fn`` may be an ``async def`` (bench/test_bench_async.py): it then runs on the
    queue's event loop, and ``workers`` thread workers idle beside it.
    """

    def __init__(self, core_name: str, n: int, fn: Callable[..., Any] = noop, workers: int = WORKERS,
                 config: Optional[ExecutorConfig] = None) -> None:
        self.core_name, self.n, self.fn, self.workers, self.config = core_name, n, fn, workers, config

    def start(self) -> None:
        # The core stays swapped in while the queue lives: its threads look it up as they start.
        self.swap = queue_core(self.core_name)
        core = self.swap.__enter__()
        self.queue = Queue(config=Config(buffer_size=self.n))
        self.queue.register_executor("noop", self.fn, self.config)
        self.queue.start_dispatcher(self.workers)
        assert_queue_core(self.queue, core)

    def run(self) -> None:
        enqueue, job = self.queue.enqueue, Job
        for _ in range(self.n):
            enqueue(job("noop"))
        assert self.queue.join(120.0)

    def stop(self) -> None:
        self.queue.stop()
        self.swap.__exit__(None, None, None)


class ThreadPool:
    def __init__(self, n: int) -> None:
        self.n = n

    def start(self) -> None:
        self.pool = concurrent.futures.ThreadPoolExecutor(WORKERS)
        concurrent.futures.wait([self.pool.submit(time.sleep, 0.01) for _ in range(WORKERS)])

    def run(self) -> None:
        submit = self.pool.submit
        for _ in range(self.n):
            submit(noop)
        # The cheapest way to wait for all of them: wait() on 100k futures costs ~40% more.
        self.pool.shutdown(wait=True)

    def stop(self) -> None:
        self.pool.shutdown(wait=True)


class PriorityQueueDispatcher:
    """The hand-rolled design: (priority, seq, type, payload) tuples, 4 threads pulling."""

    def __init__(self, n: int, handler: Callable[..., None] = noop) -> None:
        self.n, self.handlers = n, {"noop": handler}

    def start(self) -> None:
        self.pq: "queue.PriorityQueue[Any]" = queue.PriorityQueue()
        self.seq = itertools.count()
        self.threads = [threading.Thread(target=self._work, daemon=True) for _ in range(WORKERS)]
        for thread in self.threads:
            thread.start()

    def _work(self) -> None:
        get, task_done, handlers = self.pq.get, self.pq.task_done, self.handlers
        while True:
            _, _, job_type, payload = get()
            if job_type is None:
                return
            handlers[job_type](payload)
            task_done()

    def submit(self, payload: Any) -> None:
        self.pq.put((1, next(self.seq), "noop", payload))

    def run(self) -> None:
        put, seq = self.pq.put, self.seq
        for _ in range(self.n):
            put((1, next(seq), "noop", None))
        self.pq.join()

    def stop(self) -> None:
        for _ in self.threads:
            self.pq.put((2, next(self.seq), None, None))
        for thread in self.threads:
            thread.join()


class _Countdown:
    """Sets ``done`` after ``n`` calls: how a round sees the last job of a queue with no join()."""

    def __init__(self, n: int) -> None:
        self.n, self.counter, self.done = n, itertools.count(1), threading.Event()

    def __call__(self, *args: Any) -> None:
        if next(self.counter) == self.n:
            self.done.set()


class HueyMemory:
    """huey's MemoryHuey with a real consumer: 4 worker threads (immediate mode would be no queue)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def start(self) -> None:
        from huey import MemoryHuey

        self.countdown = _Countdown(self.n)
        self.huey = MemoryHuey("bench", results=False)
        countdown = self.countdown

        def noop_task() -> None:
            countdown()

        self.task = self.huey.task()(noop_task)
        # A short idle back-off: the default (0.1 s growing to 10 s) would measure sleeping.
        self.consumer = self.huey.create_consumer(
            workers=WORKERS, worker_type="thread", periodic=False, initial_delay=0.001,
            backoff=1.15, max_delay=0.01, check_worker_health=False)
        saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        self.consumer.start()
        for sig, handler in saved.items():  # the consumer installs its own; keep pytest's
            signal.signal(sig, handler)

    def run(self) -> None:
        task = self.task
        for _ in range(self.n):
            task()
        assert self.countdown.done.wait(120.0)

    def stop(self) -> None:
        self.consumer.stop(graceful=True)


class DramatiqStub:
    """dramatiq's StubBroker with its default middleware and a 4-thread Worker."""

    def __init__(self, n: int) -> None:
        self.n = n

    def start(self) -> None:
        import dramatiq
        from dramatiq.brokers.stub import StubBroker

        self.broker = StubBroker()
        self.broker.emit_after("process_boot")
        dramatiq.set_broker(self.broker)
        self.actor = dramatiq.actor(noop, broker=self.broker, actor_name="noop", max_retries=0)
        self.worker = dramatiq.Worker(self.broker, worker_threads=WORKERS, worker_timeout=100)
        self.worker.start()

    def run(self) -> None:
        send = self.actor.send
        for _ in range(self.n):
            send()
        self.broker.join(self.actor.queue_name, fail_fast=True)
        self.worker.join()

    def stop(self) -> None:
        self.worker.stop()
        self.broker.close()


def _contender(name: str) -> Tuple[Any, str, bool]:
    n = JOBS[name]
    if name in CORE_NAMES:
        return TinyMQ(name, n), f"tinymq ({name})", True
    cls = {"ThreadPoolExecutor": ThreadPool, "PriorityQueue + 4 threads": PriorityQueueDispatcher,
           "huey MemoryHuey": HueyMemory, "dramatiq StubBroker": DramatiqStub}[name]
    return cls(n), name, False


@pytest.mark.benchmark(group="queue: end-to-end no-op jobs, 4 workers")
@pytest.mark.parametrize("name", list(JOBS))
def test_end_to_end(benchmark: Any, name: str) -> None:
    if name in CORE_NAMES:
        with queue_core(name):
            pass  # skips when the compiled core is unavailable
    subject, display, is_tinymq = _contender(name)
    contender(benchmark, display, is_tinymq=is_tinymq, ops=subject.n, op="job")
    benchmark.pedantic(subject.run, setup=subject.start, teardown=subject.stop,
                       rounds=ROUNDS, warmup_rounds=1, iterations=1)


# --- enqueue -> start latency -------------------------------------------------------

def latency_tinymq(core_name: str, workers: int = WORKERS, asynchronous: bool = False) -> List[float]:
    """Enqueue->start delays of LATENCY_JOBS paced jobs; ``asynchronous``: an ``async def`` executor."""
    delays: List[float] = []
    clock = time.perf_counter

    if asynchronous:
        async def record(job: Any) -> None:
            delays.append(clock() - job.payload)
    else:
        def record(job: Any) -> None:
            delays.append(clock() - job.payload)

    with queue_core(core_name) as core:
        q = Queue(config=Config(buffer_size=LATENCY_JOBS))
        q.register_executor("latency", record)
        q.start_dispatcher(workers)
        assert_queue_core(q, core)
        try:
            time.sleep(0.05)  # idle: every worker waits in the core, the event loop for a wake-up
            for _ in range(LATENCY_JOBS):
                job = Job("latency")
                job.payload = clock()
                q.enqueue(job)
                time.sleep(0.001)
            assert q.join(30.0)
        finally:
            q.stop()
    return delays


def _latency_thread_pool() -> List[float]:
    delays: List[float] = []
    clock = time.perf_counter

    def record(started: float) -> None:
        delays.append(clock() - started)

    with concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
        concurrent.futures.wait([pool.submit(time.sleep, 0.01) for _ in range(WORKERS)])
        time.sleep(0.05)
        futures = []
        for _ in range(LATENCY_JOBS):
            futures.append(pool.submit(record, clock()))
            time.sleep(0.001)
        concurrent.futures.wait(futures)
    return delays


def _latency_priority_queue() -> List[float]:
    delays: List[float] = []
    clock = time.perf_counter
    dispatcher = PriorityQueueDispatcher(LATENCY_JOBS, lambda started: delays.append(clock() - started))
    dispatcher.start()
    try:
        time.sleep(0.05)
        for _ in range(LATENCY_JOBS):
            dispatcher.submit(clock())
            time.sleep(0.001)
        dispatcher.pq.join()
    finally:
        dispatcher.stop()
    return delays


@pytest.mark.benchmark(group="queue: enqueue->start latency, idle pool")
@pytest.mark.parametrize("name", list(CORE_NAMES) + ["ThreadPoolExecutor", "PriorityQueue + 4 threads"])
def test_enqueue_to_start_latency(benchmark: Any, name: str) -> None:
    if name in CORE_NAMES:
        with queue_core(name):
            pass
    measure = {"ThreadPoolExecutor": _latency_thread_pool,
               "PriorityQueue + 4 threads": _latency_priority_queue}.get(name)
    if measure is None:
        measure = lambda: latency_tinymq(name)  # noqa: E731
    rounds: List[List[float]] = []
    benchmark.pedantic(lambda: rounds.append(measure()), rounds=SAMPLE_ROUNDS, iterations=1)
    assert all(len(delays) == LATENCY_JOBS for delays in rounds)
    p50s = [percentile(delays, 50) * 1e6 for delays in rounds]
    p99s = [percentile(delays, 99) * 1e6 for delays in rounds]
    contender(benchmark, f"tinymq ({name})" if name in CORE_NAMES else name,
              is_tinymq=name in CORE_NAMES, ops=LATENCY_JOBS, op="job", kind="metric",
              p50_us=round(percentile(p50s, 50), 1), p99_us=round(percentile(p99s, 50), 1),
              worst_round_p99_us=round(max(p99s), 1))


# --- delayed-job lateness -------------------------------------------------------------

def _run_ats(n: int) -> List[float]:
    base, rng = time.time() + 0.2, random.Random(7)
    return [base + rng.random() * LATE_SPAN for _ in range(n)]


def _lateness_tinymq(core_name: str) -> List[float]:
    lateness: List[float] = []
    now = time.time

    def record(job: Any) -> None:
        lateness.append(now() - job.run_at)

    with queue_core(core_name) as core:
        q = Queue(config=Config(buffer_size=LATE_JOBS, max_delayed_jobs=0))
        q.register_executor("late", record)
        q.start_dispatcher(WORKERS)
        assert_queue_core(q, core)
        try:
            for run_at in _run_ats(LATE_JOBS):
                q.enqueue(Job("late", run_at=run_at))
            assert q.join(30.0)
        finally:
            q.stop()
    return lateness


def _lateness_polling(interval: float) -> List[float]:
    """The Go seed's design: a thread wakes every ``interval`` and moves due jobs to the workers."""
    lateness: List[float] = []
    now = time.time
    heap: List[Any] = []
    lock, stopping = threading.Lock(), threading.Event()
    dispatcher = PriorityQueueDispatcher(LATE_JOBS, lambda run_at: lateness.append(now() - run_at))
    dispatcher.start()

    def schedule() -> None:
        while not stopping.wait(interval):
            current = now()
            with lock:
                while heap and heap[0][0] <= current:
                    dispatcher.submit(heapq.heappop(heap)[0])

    scheduler = threading.Thread(target=schedule, daemon=True)
    scheduler.start()
    try:
        seq = itertools.count()
        for run_at in _run_ats(LATE_JOBS):
            with lock:
                heapq.heappush(heap, (run_at, next(seq)))
        while len(lateness) < LATE_JOBS:
            time.sleep(0.05)
            if now() > _deadline[0]:
                raise AssertionError("the polling scheduler did not finish")
    finally:
        stopping.set()
        scheduler.join()
        dispatcher.stop()
    return lateness


def _lateness_exact_sleeper() -> List[float]:
    """The careful stdlib design: heapq + Condition, the scheduler sleeps until the earliest run_at."""
    lateness: List[float] = []
    now = time.time
    heap: List[Any] = []
    changed = threading.Condition()
    stopping = [False]
    dispatcher = PriorityQueueDispatcher(LATE_JOBS, lambda run_at: lateness.append(now() - run_at))
    dispatcher.start()

    def schedule() -> None:
        with changed:
            while not stopping[0]:
                current = now()
                while heap and heap[0][0] <= current:
                    dispatcher.submit(heapq.heappop(heap)[0])
                changed.wait(heap[0][0] - current if heap else None)

    scheduler = threading.Thread(target=schedule, daemon=True)
    scheduler.start()
    try:
        seq = itertools.count()
        for run_at in _run_ats(LATE_JOBS):
            with changed:
                heapq.heappush(heap, (run_at, next(seq)))
                if heap[0][0] == run_at:
                    changed.notify()
        while len(lateness) < LATE_JOBS:
            time.sleep(0.05)
            if now() > _deadline[0]:
                raise AssertionError("the sleeping scheduler did not finish")
    finally:
        with changed:
            stopping[0] = True
            changed.notify()
        scheduler.join()
        dispatcher.stop()
    return lateness


_deadline = [0.0]


@pytest.mark.benchmark(group="queue: delayed-job lateness")
@pytest.mark.parametrize("name", list(CORE_NAMES) + ["heapq + Condition", "polling 50 ms",
                                                     "polling 100 ms"])
def test_delayed_lateness(benchmark: Any, name: str) -> None:
    if name in CORE_NAMES:
        with queue_core(name):
            pass
        measure = lambda: _lateness_tinymq(name)  # noqa: E731
    elif name == "heapq + Condition":
        measure = _lateness_exact_sleeper
    else:
        interval = 0.05 if name == "polling 50 ms" else 0.1
        measure = lambda: _lateness_polling(interval)  # noqa: E731
    rounds: List[List[float]] = []

    def one_round() -> None:
        _deadline[0] = time.time() + 60.0
        rounds.append(measure())

    benchmark.pedantic(one_round, rounds=SAMPLE_ROUNDS, iterations=1)
    assert all(len(lateness) == LATE_JOBS for lateness in rounds)
    p99s = [percentile(lateness, 99) * 1e3 for lateness in rounds]
    earliest = min(min(lateness) for lateness in rounds)
    display = {"heapq + Condition": "heapq + Condition, sleeps until due (stdlib)"}.get(
        name, f"tinymq ({name})" if name in CORE_NAMES else f"{name} (seed's design)")
    contender(benchmark, display,
              is_tinymq=name in CORE_NAMES, ops=LATE_JOBS, op="job", kind="metric",
              p50_ms=round(percentile([percentile(x, 50) * 1e3 for x in rounds], 50), 3),
              p99_ms=round(percentile(p99s, 50), 3), worst_round_p99_ms=round(max(p99s), 3),
              min_ms=round(earliest * 1e3, 3))
    assert earliest >= -0.0005, "a job started before its run_at"


# --- bytes per queued job -------------------------------------------------------------

class SeedStyleJob:
    """What the seed's Job struct becomes when written plainly in Python: a dict-backed object."""

    def __init__(self, type: str, payload: Any = None) -> None:
        self.id = str(uuid.uuid4())
        self.type = type
        self.payload = payload
        self.priority = 1
        self.tags: Dict[str, str] = {}
        self.timestamp = time.time()
        self.run_at = self.timestamp
        self.retries = 0
        self.max_retries = 3
        self.last_error = None


def _enqueue_jobs(name: str, n: int) -> Any:
    if name in CORE_NAMES:
        with queue_core(name) as core:
            q = Queue(config=Config(buffer_size=n + 1))
            q.register_executor("noop", noop)
            assert_queue_core(q, core)
        enqueue, job = q.enqueue, Job
        for _ in range(n):
            enqueue(job("noop"))
        return q
    pq: "queue.PriorityQueue[Any]" = queue.PriorityQueue()
    put, seq = pq.put, itertools.count()
    job_class = SeedStyleJob if name == "PriorityQueue + seed-style job" else Job
    for _ in range(n):
        put((1, next(seq), job_class("noop")))
    return pq


def measure_queued_job_bytes(name: str, n: int) -> Dict[str, float]:
    """Bytes per queued job, job included, in a Queue that has not started (fresh interpreter).

    ``tracemalloc`` counts Python allocations exactly; ``rss`` (from /proc/self/statm)
    also sees the compiled core's C allocations.
    """
    _enqueue_jobs(name, 1000)
    gc.collect()
    gc.disable()
    before = rss_bytes()
    kept = _enqueue_jobs(name, n)
    rss = (rss_bytes() - before) / n
    del kept
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    kept = _enqueue_jobs(name, n)
    traced = (tracemalloc.get_traced_memory()[0] - base) / n
    tracemalloc.stop()
    return {"rss": rss, "tracemalloc": traced}


@pytest.mark.benchmark(group="queue: bytes per queued job (job included)")
@pytest.mark.parametrize("name", list(CORE_NAMES) + ["PriorityQueue + tinymq Job",
                                                     "PriorityQueue + seed-style job"])
def test_queued_job_bytes(benchmark: Any, name: str) -> None:
    if name in CORE_NAMES:
        with queue_core(name):
            pass
    result: Dict[str, float] = {}
    benchmark.pedantic(lambda: result.update(run_in_subprocess(
        "test_bench_queue", "measure_queued_job_bytes", name, QUEUED_JOBS)), rounds=1, iterations=1)
    contender(benchmark, f"tinymq ({name})" if name in CORE_NAMES else name,
              is_tinymq=name in CORE_NAMES, ops=QUEUED_JOBS, op="job", kind="metric",
              bytes_per_job=round(max(result["rss"], result["tracemalloc"]), 1),
              rss_bytes_per_job=round(result["rss"], 1),
              tracemalloc_bytes_per_job=round(result["tracemalloc"], 1))
