"""dramatiq with its Redis broker: the actor and the producer (runs in dramatiq's own venv).

Workers: ``dramatiq peer_dramatiq --processes 2 --threads 4``, default middleware.
"""
import os
import time
from typing import List

import dramatiq
from dramatiq.brokers.redis import RedisBroker

from record import record


broker = RedisBroker(url=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"))
dramatiq.set_broker(broker)


@dramatiq.actor(queue_name="bench", max_retries=0)
def noop(index: int) -> None:
    record(index)


class Producer:
    def __init__(self, url: str) -> None:
        pass  # the module's broker was built from BENCH_REDIS_URL, which the agent sets

    def enqueue(self, start: int, n: int) -> None:
        send = noop.send
        for index in range(start, start + n):
            send(index)

    def enqueue_many(self, start: int, n: int, batch: int) -> None:
        """No bulk enqueue in dramatiq: ``group(...).run()`` sends message by message."""
        end = start + n
        for first in range(start, end, batch):
            dramatiq.group(noop.message(index) for index in range(first, min(first + batch, end))).run()

    def paced(self, start: int, n: int, gap: float) -> List[float]:
        stamps, send, clock = [], noop.send, time.perf_counter
        for index in range(start, start + n):
            stamps.append(clock())
            send(index)
            time.sleep(gap)
        return stamps

    def delayed(self, start: int, delays: List[float]) -> List[float]:
        due = []
        for index, delay in enumerate(delays, start):
            due.append(time.perf_counter() + delay)
            noop.send_with_options(args=(index,), delay=int(round(delay * 1000)))
        return due
