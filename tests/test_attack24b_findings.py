"""Attack of session 24 (attack24b): async executors, cancellation and how a job failed, as an
outsider would attack them; each finding with its test.
"""
import asyncio
import threading
import time

import pytest

from tinymq import Config, ExecutorConfig, Job, Queue
from tinymq.redis import RedisBroker

from _helpers import WAIT, wait_until


def _succeeded_and_ready(q):
    stats = q.get_stats()
    return stats.jobs_succeeded, stats.high_queue_size + stats.medium_queue_size + stats.low_queue_size


@pytest.mark.redis
@pytest.mark.parametrize("kind", ["thread", "async"])
def test_over_a_broker_attempts_that_outlive_a_stop_called_in_an_executor_settle_before_the_release(
        redis_backend, kind):
    """docs/api.md, "Waiting and stopping": called from an executor, ``stop()`` waits for
    neither the others nor another ``stop()``; it does not cancel them either: in-process
    (with or without a store) the attempts it lets run, its caller's own included, end as
    they end (a success counts and deletes the job). Over a broker they were given back to
    Redis at once by the release that stop() ran in the executor's own thread: their
    successes, counted in the process's per-type ``succeeded``, were stale there, the two
    jobs stayed ready (``jobs_succeeded`` 0) and ran again in the next process, so a job
    that stops its queue stopped every queue that started after it too."""
    q = redis_backend.queue()
    ran = []
    both_running = threading.Barrier(2, timeout=WAIT)

    def body(job):
        ran.append(job.payload)

    if kind == "thread":
        def executor(job):
            both_running.wait()
            if job.payload == "stop":
                q.stop(wait=True, timeout=WAIT)
            else:
                time.sleep(0.2)
            body(job)
        workers = 2
    else:
        async def executor(job):
            await asyncio.get_running_loop().run_in_executor(None, both_running.wait)
            if job.payload == "stop":
                await q.astop(wait=True, timeout=WAIT)
            else:
                await asyncio.sleep(0.2)
            body(job)
        workers = 1

    q.register_executor("t", executor, ExecutorConfig(timeout=None))
    q.start_dispatcher(workers)
    q.enqueue(Job("t", "other"))
    q.enqueue(Job("t", "stop"))
    assert wait_until(lambda: len(ran) == 2)
    q.stop()  # (returns once the first stop() has given back what this process held)
    assert q.get_stats().executor_stats["t"].succeeded == 2
    observer = redis_backend.queue()
    assert wait_until(lambda: _succeeded_and_ready(observer) == (2, 0)), _succeeded_and_ready(observer)
    assert sorted(ran) == ["other", "stop"]
