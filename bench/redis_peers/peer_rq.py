"""RQ: the job and the producer (runs in RQ's own venv, see setup.sh).

Workers are ``rq worker --worker-class rq.worker.SimpleWorker`` processes (RQ's
documented no-fork worker; the default forks once per job). Results are not kept
(``result_ttl=0``), as no contender keeps them.
"""
from datetime import timedelta

from redis import Redis
from rq import Queue

from producer import SyncProducer
from record import record

QUEUE = "bench"


def noop(index: int) -> None:
    record(index)


class Producer(SyncProducer):
    def __init__(self, url: str) -> None:
        self.queue = Queue(QUEUE, connection=Redis.from_url(url))

    def send(self, index: int) -> None:
        self.queue.enqueue(noop, index, result_ttl=0)

    def send_batch(self, indices: range) -> None:
        """RQ's bulk API: ``Queue.enqueue_many``, one pipeline per batch."""
        self.queue.enqueue_many([Queue.prepare_data(noop, (index,), result_ttl=0) for index in indices])

    def send_in(self, index: int, delay: float) -> None:
        self.queue.enqueue_in(timedelta(seconds=delay), noop, index, result_ttl=0)
