"""A worker process for the Redis rate-limit tests: ``python _redis_rate_worker.py URL NAME``.

It runs a Queue on the broker (the executors of ``RATE_LIMITS``, 3 worker threads)
until its stdin closes, then stops gracefully. Every attempt pushes
``"<pid> <type> <job id> <retries> <monotonic start>"`` to the Redis list
``tmq-test-starts`` as its first act; an "api" attempt then runs for longer than
its window; a job whose payload is "flaky" fails its first attempt, so retries
are starts too. CLOCK_MONOTONIC is one clock for every
process of the host, so the starts of all processes can be compared.
"""
import os
import sys
import time

import redis

from tinymq import ExecutorConfig, Queue, RateLimit, RetryConfig
from tinymq.redis import RedisBroker

# type -> (max_concurrent_jobs, RateLimit or None)
RATE_LIMITS = {
    "api": (8, RateLimit(3, per=0.5)),
    "mail": (2, RateLimit(2, per=0.5)),
    "free": (4, None),
}
OUT = "tmq-test-starts"
API_SECONDS = 0.8


def main() -> None:
    url, name = sys.argv[1], sys.argv[2]
    out = redis.Redis.from_url(url)
    queue = Queue(broker=RedisBroker(url, name=name, lease=5.0))

    def run(job):
        started = time.monotonic()
        out.rpush(OUT, f"{os.getpid()} {job.type} {job.id} {job.retries} {started!r}")
        if job.type == "api":  # longer than its window: a process holds at most 4 (3 workers + 1 fetched
            time.sleep(API_SECONDS)  # ahead), so in the next window the other process takes most
        if job.payload == "flaky" and job.retries == 0:
            raise ConnectionError("first attempt fails")

    for job_type, (concurrency, rate_limit) in RATE_LIMITS.items():
        queue.register_executor(job_type, run, ExecutorConfig(max_concurrent_jobs=concurrency,
                                                              rate_limit=rate_limit))
    queue.start_dispatcher(3)
    print("ready", flush=True)
    sys.stdin.read()
    queue.stop()


if __name__ == "__main__":
    main()
