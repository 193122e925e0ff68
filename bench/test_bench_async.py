"""Async executors against what an asyncio user would write instead, in the same run.

- 10,000 jobs that each ``await asyncio.sleep(0.005)``, at most 500 at a time: tinymq
  (async executor, max_concurrent_jobs=500; enqueue from a thread, join) vs a bare
  ``asyncio.gather`` under a ``Semaphore(500)``, and vs ``ThreadPoolExecutor(64)``
  running ``time.sleep(0.005)``;
- no-op async jobs end to end, job creation included, each side as an asyncio user
  writes it: tinymq (``await q.aenqueue(Job(...))`` per job from ``asyncio.run``, then
  ``await q.ajoin()``) vs an ``asyncio.Queue`` drained by ``CONSUMERS`` consumer tasks
  (one object created per item, ``put_nowait``; each consumer awaits the same no-op
  ``async def`` per item, as tinymq's executor is awaited per job);
- enqueue->start latency of an async executor on an idle queue (the loop is woken
  from the producer's thread), a producer that sleeps 1 ms between jobs; beside it the
  same hand-off without a queue, ``asyncio.run_coroutine_threadsafe`` into a loop thread.
"""
import asyncio
import concurrent.futures
import threading
import time
from typing import Any, List

import pytest

from conftest import CORE_NAMES, contender, percentile, queue_core
from test_bench_queue import LATENCY_JOBS, TinyMQ, latency_tinymq
from tinymq import ExecutorConfig, Job

SLEEP_JOBS = 10_000
SLEEP = 0.005
CONCURRENCY = 500
THREADS = 64
NOOP_JOBS = {"compiled": 100_000, "pure": 30_000, "asyncio.Queue": 100_000}
CONSUMERS = 10  # the default max_concurrent_jobs: what a user sizes a consumer pool at
ROUNDS = 5
SAMPLE_ROUNDS = 3

SLEEP_GROUP = "async: 10,000 jobs awaiting sleep(5 ms), concurrency 500"
NOOP_GROUP = "async: end-to-end no-op jobs"
LATENCY_GROUP = "async: enqueue->start latency, idle queue"


def tinymq_async(core_name: str, n: int, limit: int, sleep: float, kind: Any = None) -> TinyMQ:
    """A queue with one async executor (``limit`` at once) and one idle thread worker (a ``kind``,
    by default ``TinyMQ``: enqueue from this thread, join)."""
    if sleep:
        async def run(job: Any) -> None:
            await asyncio.sleep(sleep)
    else:
        async def run(job: Any) -> None:
            pass
    return (kind or TinyMQ)(core_name, n, run, workers=1, config=ExecutorConfig(max_concurrent_jobs=limit))


class TinyMQFromAsyncCode(TinyMQ):
    """``run`` is what async code calls: ``aenqueue`` per job in an event loop, then ``ajoin``."""

    def run(self) -> None:
        queue, n = self.queue, self.n

        async def main() -> None:
            aenqueue, job = queue.aenqueue, Job
            for _ in range(n):
                await aenqueue(job("noop"))
            assert await queue.ajoin(120.0)

        asyncio.run(main())


def _gather_with_semaphore() -> None:
    async def main() -> None:
        semaphore = asyncio.Semaphore(CONCURRENCY)

        async def one() -> None:
            async with semaphore:
                await asyncio.sleep(SLEEP)

        await asyncio.gather(*[one() for _ in range(SLEEP_JOBS)])

    asyncio.run(main())


def _thread_pool_sleeping() -> None:
    with concurrent.futures.ThreadPoolExecutor(THREADS) as pool:
        for _ in pool.map(time.sleep, [SLEEP] * SLEEP_JOBS):
            pass


@pytest.mark.benchmark(group=SLEEP_GROUP)
@pytest.mark.parametrize("name", ["compiled", "asyncio.gather + Semaphore(500)", "ThreadPoolExecutor(64)"])
def test_sleeping_jobs(benchmark: Any, name: str) -> None:
    if name in CORE_NAMES:
        with queue_core(name):
            pass  # skips when the compiled core is unavailable
        subject = tinymq_async(name, SLEEP_JOBS, CONCURRENCY, SLEEP)
        contender(benchmark, f"tinymq ({name})", is_tinymq=True, ops=SLEEP_JOBS, op="job")
        benchmark.pedantic(subject.run, setup=subject.start, teardown=subject.stop,
                           rounds=ROUNDS, warmup_rounds=1, iterations=1)
        return
    run = _gather_with_semaphore if name.startswith("asyncio") else _thread_pool_sleeping
    contender(benchmark, name, is_tinymq=False, ops=SLEEP_JOBS, op="job")
    benchmark.pedantic(run, rounds=ROUNDS if run is _gather_with_semaphore else 2, warmup_rounds=1,
                       iterations=1)


class _Item:
    __slots__ = ("payload",)

    def __init__(self, payload: Any) -> None:
        self.payload = payload


def _asyncio_queue(n: int) -> None:
    async def main() -> None:
        items: "asyncio.Queue[_Item]" = asyncio.Queue()

        async def run(item: _Item) -> None:
            pass

        async def consume() -> None:
            while True:
                item = await items.get()
                await run(item)
                items.task_done()

        consumers = [asyncio.ensure_future(consume()) for _ in range(CONSUMERS)]
        for _ in range(n):
            items.put_nowait(_Item(None))
        await items.join()
        for consumer in consumers:
            consumer.cancel()

    asyncio.run(main())


@pytest.mark.benchmark(group=NOOP_GROUP)
@pytest.mark.parametrize("name", list(NOOP_JOBS))
def test_noop_end_to_end(benchmark: Any, name: str) -> None:
    n = NOOP_JOBS[name]
    if name in CORE_NAMES:
        with queue_core(name):
            pass
        subject = tinymq_async(name, n, CONSUMERS, 0.0, TinyMQFromAsyncCode)
        contender(benchmark, f"tinymq ({name})", is_tinymq=True, ops=n, op="job")
        benchmark.pedantic(subject.run, setup=subject.start, teardown=subject.stop,
                           rounds=ROUNDS, warmup_rounds=1, iterations=1)
        return
    contender(benchmark, f"asyncio.Queue + {CONSUMERS} consumer tasks", is_tinymq=False, ops=n, op="job")
    benchmark.pedantic(lambda: _asyncio_queue(n), rounds=ROUNDS, warmup_rounds=1, iterations=1)


def _latency_run_coroutine_threadsafe() -> List[float]:
    """The same hand-off without a queue: a thread submits coroutines to a loop running in another."""
    delays: List[float] = []
    clock = time.perf_counter

    async def record(started: float) -> None:
        delays.append(clock() - started)

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever)
    thread.start()
    try:
        time.sleep(0.05)
        futures = []
        for _ in range(LATENCY_JOBS):
            futures.append(asyncio.run_coroutine_threadsafe(record(clock()), loop))
            time.sleep(0.001)
        for future in futures:
            future.result(30.0)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()
    return delays


@pytest.mark.benchmark(group=LATENCY_GROUP)
@pytest.mark.parametrize("name", list(CORE_NAMES) + ["asyncio.run_coroutine_threadsafe"])
def test_enqueue_to_start_latency(benchmark: Any, name: str) -> None:
    if name in CORE_NAMES:
        with queue_core(name):
            pass
        measure = lambda: latency_tinymq(name, workers=1, asynchronous=True)  # noqa: E731
    else:
        measure = _latency_run_coroutine_threadsafe
    rounds: List[List[float]] = []
    benchmark.pedantic(lambda: rounds.append(measure()), rounds=SAMPLE_ROUNDS, iterations=1)
    assert all(len(delays) == LATENCY_JOBS for delays in rounds)
    p50s = [percentile(delays, 50) * 1e6 for delays in rounds]
    p99s = [percentile(delays, 99) * 1e6 for delays in rounds]
    contender(benchmark, f"tinymq ({name})" if name in CORE_NAMES else name, is_tinymq=name in CORE_NAMES,
              ops=LATENCY_JOBS, op="job", kind="metric",
              p50_us=round(percentile(p50s, 50), 1), p99_us=round(percentile(p99s, 50), 1))
