"""Async executors over Redis hold no worker thread: API.md "Async executors and cancellation"
("they do not occupy worker threads, so ``workers`` bounds only thread executors") and
"Scale-out" (everything holds over a broker). A process fetches the jobs of its async types up
to their limits beyond its free worker threads (docs/redis.md, "What holds across processes").
"""
import asyncio
import threading
import time

from tinymq import ExecutorConfig, Job

from _helpers import WAIT, Recorder

SLEEP = 0.2


def test_many_sleeping_coroutines_share_one_worker_process(redis_backend):
    """N async jobs sleeping SLEEP each, in one process with workers=1, end in about one SLEEP,
    not in N / 2 of them (a process held at most workers + 1 jobs, its coroutines' included)."""
    count = 20
    q = redis_backend.queue(buffer_size=100)

    async def nap(job):
        await asyncio.sleep(SLEEP)

    q.register_executor("nap", nap, ExecutorConfig(max_concurrent_jobs=count))
    q.enqueue_many([Job("nap", i) for i in range(count)])
    began = time.monotonic()
    q.start_dispatcher(workers=1)
    assert q.join(WAIT)
    took = time.monotonic() - began
    assert took < count / 2 * SLEEP / 2, f"{count} jobs sleeping {SLEEP}s took {took:.2f}s with one worker"
    assert q.get_stats().jobs_succeeded == count


def test_coroutines_run_while_a_thread_job_holds_the_only_worker(redis_backend):
    """A thread job holds the only worker thread; the async jobs queued after it (behind the one
    job fetched ahead for the worker) all run meanwhile, each type to its own limit."""
    q = redis_backend.queue(buffer_size=100)
    holding, release = threading.Event(), threading.Event()
    inside = Recorder()
    all_in = threading.Event()
    count = 6

    def hold(job):
        holding.set()
        release.wait(WAIT)

    async def wait(job):
        inside.add(job.payload)
        if len(inside) == count:
            all_in.set()
        while not release.is_set():
            await asyncio.sleep(0.01)

    q.register_executor("hold", hold)
    q.register_executor("a", wait, ExecutorConfig(max_concurrent_jobs=count // 2))
    q.register_executor("b", wait, ExecutorConfig(max_concurrent_jobs=count // 2))
    q.enqueue_many([Job("hold"), Job("hold")] + [Job("ab"[i % 2], i) for i in range(count)])
    q.start_dispatcher(workers=1)
    try:
        assert holding.wait(WAIT)
        assert all_in.wait(WAIT), f"only {inside.snapshot()} of {count} async jobs run beside the thread job"
        stats = q.get_stats().executor_stats
        assert (stats["a"].active_jobs, stats["b"].active_jobs) == (count // 2, count // 2)
    finally:
        release.set()
    assert q.join(WAIT)
    assert q.get_stats().jobs_succeeded == count + 2
