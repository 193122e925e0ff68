"""huey with RedisHuey: the task and the producer (runs in huey's own venv).

Workers: ``huey_consumer peer_huey.huey --workers 4 --worker-type thread`` per
process. RedisHuey's consumers block on BRPOP (``blocking=True``, its default), so
no idle back-off is involved; results are not kept (``results=False``).
"""
import os

from huey import RedisHuey

from producer import SyncProducer
from record import record


huey = RedisHuey("bench", url=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"), results=False)


@huey.task()
def noop(index: int) -> None:
    record(index)


class Producer(SyncProducer):
    def __init__(self, url: str) -> None:
        pass  # the module's huey was built from BENCH_REDIS_URL, which the agent sets

    def send(self, index: int) -> None:
        noop(index)

    def send_batch(self, indices: range) -> None:
        """No bulk enqueue in huey: ``Task.map`` enqueues one by one."""
        noop.map(indices)

    def send_in(self, index: int, delay: float) -> None:
        noop.schedule(args=(index,), delay=delay)
