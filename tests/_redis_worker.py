"""A worker process for the Redis tests: ``python _redis_worker.py URL NAME LEASE MAX_CRASHES``.

It runs a Queue on the broker until its stdin closes, then stops gracefully.
Executors: "record" pushes the payload to the Redis list ``tmq-test-out``;
"poison" pushes it too, then kills this process (``os._exit``), as a job that
crashes its interpreter would.
"""
import os
import sys

import redis

from tinymq import Queue
from tinymq.redis import RedisBroker


def main() -> None:
    url, name, lease, max_crashes = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
    out = redis.Redis.from_url(url)
    queue = Queue(broker=RedisBroker(url, name=name, lease=lease, max_crash_recoveries=max_crashes))

    def record(job):
        out.rpush("tmq-test-out", f"{os.getpid()}:{job.payload}")

    def poison(job):
        out.rpush("tmq-test-out", f"{os.getpid()}:{job.payload}")
        os._exit(3)

    queue.register_executor("record", record)
    queue.register_executor("poison", poison)
    print("ready", flush=True)  # before it starts: a poison job may end it at once
    queue.start_dispatcher(2)
    sys.stdin.read()
    queue.stop()


if __name__ == "__main__":
    main()
