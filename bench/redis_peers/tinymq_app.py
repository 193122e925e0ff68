"""tinymq's side: the Queue every bench process builds (public API only).

Producers (the bench itself) and worker processes (tinymq_worker.py) build the same
Queue on the same broker name, as API.md asks of every process sharing one queue.
"""
import os
import time

from tinymq import Config, Job, Queue
from tinymq.redis import RedisBroker

from record import record

BUFFER_SIZE = 10_000_000  # the enqueue cases leave every job queued: never QueueFull
HOLD_FILE_ENV = "BENCH_HOLD_FILE"
HOLD_POLL = 0.01  # seconds between looks at the hold file


def noop(job: Job) -> None:
    record(job.payload)


def hold(job: Job) -> None:
    """Record the start, then run until the controller removes its hold file."""
    record(job.payload)
    path = os.environ[HOLD_FILE_ENV]
    while os.path.exists(path):
        time.sleep(HOLD_POLL)


def build_queue(url: str, name: str, lease: float) -> Queue:
    queue = Queue(config=Config(buffer_size=BUFFER_SIZE, max_delayed_jobs=0),
                  broker=RedisBroker(url, name=name, lease=lease))
    queue.register_executor("noop", noop)
    queue.register_executor("hold", hold)
    return queue
