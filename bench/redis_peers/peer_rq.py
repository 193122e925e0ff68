"""RQ: the job and the producer (runs in RQ's own venv, see setup.sh).

Workers are ``rq worker --worker-class rq.worker.SimpleWorker`` processes (RQ's
documented no-fork worker; the default forks once per job). Results are not kept
(``result_ttl=0``), as no contender keeps them.
"""
import time
from datetime import timedelta
from typing import List

from redis import Redis
from rq import Queue

from record import record

QUEUE = "bench"


def noop(index: int) -> None:
    record(index)


class Producer:
    def __init__(self, url: str) -> None:
        self.queue = Queue(QUEUE, connection=Redis.from_url(url))

    def enqueue(self, start: int, n: int) -> None:
        enqueue = self.queue.enqueue
        for index in range(start, start + n):
            enqueue(noop, index, result_ttl=0)

    def enqueue_many(self, start: int, n: int, batch: int) -> None:
        """RQ's bulk API: ``Queue.enqueue_many``, one pipeline per batch."""
        prepare, end = Queue.prepare_data, start + n
        for first in range(start, end, batch):
            self.queue.enqueue_many([prepare(noop, (index,), result_ttl=0)
                                     for index in range(first, min(first + batch, end))])

    def paced(self, start: int, n: int, gap: float) -> List[float]:
        stamps, enqueue, clock = [], self.queue.enqueue, time.perf_counter
        for index in range(start, start + n):
            stamps.append(clock())
            enqueue(noop, index, result_ttl=0)
            time.sleep(gap)
        return stamps

    def delayed(self, start: int, delays: List[float]) -> List[float]:
        due = []
        for index, delay in enumerate(delays, start):
            due.append(time.perf_counter() + delay)
            self.queue.enqueue_in(timedelta(seconds=delay), noop, index, result_ttl=0)
        return due
