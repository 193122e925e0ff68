"""dramatiq with its Redis broker: the actor and the producer (runs in dramatiq's own venv).

Workers: ``dramatiq peer_dramatiq --processes 2 --threads 4``, default middleware.
"""
import os

import dramatiq
from dramatiq.brokers.redis import RedisBroker

from producer import SyncProducer
from record import record


broker = RedisBroker(url=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"))
dramatiq.set_broker(broker)


@dramatiq.actor(queue_name="bench", max_retries=0)
def noop(index: int) -> None:
    record(index)


class Producer(SyncProducer):
    def __init__(self, url: str) -> None:
        pass  # the module's broker was built from BENCH_REDIS_URL, which the agent sets

    def send(self, index: int) -> None:
        noop.send(index)

    def send_batch(self, indices: range) -> None:
        """No bulk enqueue in dramatiq: ``group(...).run()`` sends message by message."""
        dramatiq.group(noop.message(index) for index in indices).run()

    def send_in(self, index: int, delay: float) -> None:
        noop.send_with_options(args=(index,), delay=int(round(delay * 1000)))
