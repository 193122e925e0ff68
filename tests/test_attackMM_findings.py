"""Findings of attackMM: scale-out on Redis (the broker, the worker CLI, status) attacked from outside.

Each test failed on the code before its fix; its docstring says the symptom, how to
reproduce it, and what API.md or the docs promise.
"""
import os
import shutil
import threading

from tinymq import ExecutorConfig, Job, Queue, RateLimit

from _helpers import WAIT, wait_until


def _restart_without_its_data(server):
    """kill -9 of Redis, and a start without its append-only file: what a Redis run without
    persistence (or restored from an older backup) does to the queue's keys."""
    server.kill()
    shutil.rmtree(os.path.join(server.directory, "appendonlydir"), ignore_errors=True)
    server.start()


def test_the_global_limits_hold_after_redis_lost_its_data(own_redis_server):
    """Symptom: after Redis restarted without its data (no `appendonly`, a FLUSHALL, a restore
    of an older backup), the worker processes carry on (they register again, as after a reap)
    and run new jobs, but with no global `rate_limit` nor `max_concurrent_jobs` at all: the
    limits were sent to Redis once, at register_executor, and never again, so Redis hands out
    every job of a rate-limited type at once.
    Reproduce: a worker with RateLimit(2, per=60); restart Redis empty; enqueue 4 jobs: all 4
    start at once. API.md Scale-out: `max_concurrent_jobs` and `rate_limit` are global limits
    per type (docs/redis.md: without `appendonly` the jobs are lost, not the limits).
    Fix: a process that finds it must register again sends its limits again, before it fetches."""
    from tinymq.redis import RedisBroker

    lock = threading.Lock()
    started = []

    def run(job):
        with lock:
            started.append(job.id)

    worker = Queue(broker=RedisBroker(own_redis_server.url, name="wiped", lease=1.0))
    worker.register_executor("t", run, ExecutorConfig(rate_limit=RateLimit(2, per=3600.0)))
    try:
        worker.start_dispatcher(4)
        worker.enqueue(Job("t", id="before"))
        assert worker.join(WAIT)
        _restart_without_its_data(own_redis_server)
        with own_redis_server.client() as client:  # the worker registered again, under a new id
            assert wait_until(lambda: client.zcard("tmq:{wiped}:procs") >= 1)
            for i in range(4):
                worker.enqueue(Job("t", id=f"after-{i}"))
            assert wait_until(lambda: len(started) >= 3)  # two of the four start
            assert not worker.join(1.0)  # the other two wait for the window: an hour
            with lock:
                assert len(started) == 3, started
            assert client.hget("tmq:{wiped}:ratelimits", "t") is not None
    finally:
        worker.stop(wait=False)

