"""saq: the job, the worker settings and the producer (runs in saq's own venv).

Workers: ``saq peer_saq.settings --workers 2``; ``concurrency`` is saq's jobs in
flight per process. Results are not kept (``ttl=-1``). ``scheduled`` is documented as
whole epoch seconds, but saq's scheduler compares it with a float ``time.time()``, so
the exact due time is passed: no rounding to the second is charged to saq.
"""
import asyncio
import os
import time
from typing import Any

from saq import Queue

from producer import AsyncProducer
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


class Producer(AsyncProducer):
    def __init__(self, url: str) -> None:
        self.queue = _queue(url)
        self.connected = False

    async def connect(self) -> None:
        if not self.connected:
            await self.queue.connect()
            self.connected = True

    def send(self, index: int) -> Any:
        return self.queue.enqueue("noop", index=index, ttl=-1)

    def send_batch(self, indices: range) -> Any:
        """No bulk enqueue in saq: gather ``enqueue`` coroutines, as saq's own ``Queue.map`` does."""
        return asyncio.gather(*(self.queue.enqueue("noop", index=index, ttl=-1) for index in indices))

    def send_in(self, index: int, delay: float) -> Any:
        return self.queue.enqueue("noop", index=index, ttl=-1, scheduled=time.time() + delay)
