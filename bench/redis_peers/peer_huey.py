"""huey with RedisHuey: the task and the producer (runs in huey's own venv).

Workers: ``huey_consumer peer_huey.huey --workers 4 --worker-type thread`` per
process. RedisHuey's consumers block on BRPOP (``blocking=True``, its default), so
no idle back-off is involved; results are not kept (``results=False``).
"""
import os
import time
from typing import List

from huey import RedisHuey

from record import record


huey = RedisHuey("bench", url=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"), results=False)


@huey.task()
def noop(index: int) -> None:
    record(index)


class Producer:
    def __init__(self, url: str) -> None:
        pass  # the module's huey was built from BENCH_REDIS_URL, which the agent sets

    def enqueue(self, start: int, n: int) -> None:
        for index in range(start, start + n):
            noop(index)

    def enqueue_many(self, start: int, n: int, batch: int) -> None:
        """No bulk enqueue in huey: ``Task.map`` enqueues one by one."""
        end = start + n
        for first in range(start, end, batch):
            noop.map(range(first, min(first + batch, end)))

    def paced(self, start: int, n: int, gap: float) -> List[float]:
        stamps, clock = [], time.perf_counter
        for index in range(start, start + n):
            stamps.append(clock())
            noop(index)
            time.sleep(gap)
        return stamps

    def delayed(self, start: int, delays: List[float]) -> List[float]:
        due = []
        for index, delay in enumerate(delays, start):
            due.append(time.perf_counter() + delay)
            noop.schedule(args=(index,), delay=delay)
        return due
