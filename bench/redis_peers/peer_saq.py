"""saq: the job, the worker settings and the producer (runs in saq's own venv).

Workers: ``saq peer_saq.settings --workers 2``; ``concurrency`` is saq's jobs in
flight per process. Results are not kept (``ttl=-1``). ``scheduled`` is documented as
whole epoch seconds, but saq's scheduler compares it with a float ``time.time()``, so
the exact due time is passed: no rounding to the second is charged to saq.
"""
import asyncio
import os
import time
from typing import Any, List

from saq import Queue

from record import record


CONCURRENCY = int(os.environ.get("BENCH_CONCURRENCY", "10"))


async def noop(ctx: Any, *, index: int) -> None:
    record(index)


def _queue(url: str) -> Any:
    return Queue.from_url(url, name="bench")


settings = {
    "queue": _queue(os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")),
    "functions": [noop],
    "concurrency": CONCURRENCY,
}


class Producer:
    def __init__(self, url: str) -> None:
        self.queue = _queue(url)
        self.connected = False

    async def _connect(self) -> Any:
        if not self.connected:
            await self.queue.connect()
            self.connected = True
        return self.queue

    async def enqueue(self, start: int, n: int) -> None:
        queue = await self._connect()
        for index in range(start, start + n):
            await queue.enqueue("noop", index=index, ttl=-1)

    async def enqueue_many(self, start: int, n: int, batch: int) -> None:
        """No bulk enqueue in saq: gather ``enqueue`` coroutines, as saq's own ``Queue.map`` does."""
        queue, end = await self._connect(), start + n
        for first in range(start, end, batch):
            await asyncio.gather(*(queue.enqueue("noop", index=index, ttl=-1)
                                   for index in range(first, min(first + batch, end))))

    async def paced(self, start: int, n: int, gap: float) -> List[float]:
        queue, stamps, clock = await self._connect(), [], time.perf_counter
        for index in range(start, start + n):
            stamps.append(clock())
            await queue.enqueue("noop", index=index, ttl=-1)
            await asyncio.sleep(gap)
        return stamps

    async def delayed(self, start: int, delays: List[float]) -> List[float]:
        queue, due = await self._connect(), []
        for index, delay in enumerate(delays, start):
            due.append(time.perf_counter() + delay)
            await queue.enqueue("noop", index=index, ttl=-1, scheduled=time.time() + delay)
        return due
