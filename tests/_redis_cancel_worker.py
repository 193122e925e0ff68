"""A worker process for the cancel fleet test: ``python _redis_cancel_worker.py URL NAME LEASE``.

It runs a Queue on the broker until its stdin closes, then stops gracefully. Executor
"work" (payload {"kind": ok|retry|perm|slow, "ms": ...}) pushes [id, pid, time] to the
Redis list ``tmq-test-starts`` when it starts, waits ``ms`` (or until cancelled), then
succeeds, fails to be retried (kind retry, first attempt), fails for good (perm), or
runs past its 0.3 s timeout (slow). Every on_failure call pushes [id, reason, pid] to
``tmq-test-reports``.
"""
import json
import os
import sys
import time

import redis

from tinymq import ExecutorConfig, PermanentFailure, Queue
from tinymq.redis import RedisBroker

STARTS, REPORTS = "tmq-test-starts", "tmq-test-reports"
CONFIG = ExecutorConfig(max_concurrent_jobs=4, timeout=0.3)


def main() -> None:
    url, name, lease = sys.argv[1], sys.argv[2], float(sys.argv[3])
    out = redis.Redis.from_url(url)
    queue = Queue(broker=RedisBroker(url, name=name, lease=lease))

    def work(job, ctx):
        out.rpush(STARTS, json.dumps([job.id, os.getpid(), time.time()]))
        kind = job.payload["kind"]
        if ctx.wait(job.payload["ms"] / 1000.0):  # cancelled (or timed out): its outcome is decided
            return
        if kind == "retry" and job.retries == 0:
            raise ValueError("once more")
        if kind == "perm":
            raise PermanentFailure("no")

    queue.register_executor("work", work, CONFIG)
    queue.on_failure(lambda job, reason, exc: out.rpush(REPORTS, json.dumps([job.id, reason, os.getpid()])))
    print("ready", flush=True)
    queue.start_dispatcher(3)
    sys.stdin.read()
    queue.stop()


if __name__ == "__main__":
    main()
