"""The producer's operations, one loop for every contender: each says only how it sends.

A contender's ``Producer`` subclasses ``SyncProducer`` or ``AsyncProducer`` and defines

- ``send(index)``: enqueue job ``index`` (for ``AsyncProducer``: return an awaitable);
- ``send_batch(indices)``: enqueue one batch of ``enqueue_many`` the way its users would;
- ``send_in(index, delay)``: enqueue job ``index`` due ``delay`` seconds from now;

and, for ``AsyncProducer``, ``connect()``, awaited at the start of every operation.
The operations (agent.py documents them) then time the same loop around every library.
"""
import asyncio
import time
from typing import Any, List, Sequence


class SyncProducer:
    def send(self, index: int) -> Any:
        raise NotImplementedError

    def send_batch(self, indices: range) -> Any:
        raise NotImplementedError

    def send_in(self, index: int, delay: float) -> Any:
        raise NotImplementedError

    def enqueue(self, start: int, n: int) -> None:
        send = self.send
        for index in range(start, start + n):
            send(index)

    def enqueue_many(self, start: int, n: int, batch: int) -> None:
        send_batch, end = self.send_batch, start + n
        for first in range(start, end, batch):
            send_batch(range(first, min(first + batch, end)))

    def paced(self, start: int, n: int, gap: float) -> List[float]:
        stamps, send, clock = [], self.send, time.perf_counter
        for index in range(start, start + n):
            stamps.append(clock())
            send(index)
            time.sleep(gap)
        return stamps

    def delayed(self, start: int, delays: Sequence[float]) -> List[float]:
        due, send_in, clock = [], self.send_in, time.perf_counter
        for index, delay in enumerate(delays, start):
            due.append(clock() + delay)
            send_in(index, delay)
        return due


class AsyncProducer:
    async def connect(self) -> None:
        raise NotImplementedError

    def send(self, index: int) -> Any:
        raise NotImplementedError

    def send_batch(self, indices: range) -> Any:
        raise NotImplementedError

    def send_in(self, index: int, delay: float) -> Any:
        raise NotImplementedError

    async def enqueue(self, start: int, n: int) -> None:
        await self.connect()
        send = self.send
        for index in range(start, start + n):
            await send(index)

    async def enqueue_many(self, start: int, n: int, batch: int) -> None:
        await self.connect()
        send_batch, end = self.send_batch, start + n
        for first in range(start, end, batch):
            await send_batch(range(first, min(first + batch, end)))

    async def paced(self, start: int, n: int, gap: float) -> List[float]:
        await self.connect()
        stamps, send, clock = [], self.send, time.perf_counter
        for index in range(start, start + n):
            stamps.append(clock())
            await send(index)
            await asyncio.sleep(gap)
        return stamps

    async def delayed(self, start: int, delays: Sequence[float]) -> List[float]:
        await self.connect()
        due, send_in, clock = [], self.send_in, time.perf_counter
        for index, delay in enumerate(delays, start):
            due.append(clock() + delay)
            await send_in(index, delay)
        return due
