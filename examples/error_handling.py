"""Error handling: failures are never silent, and nothing is dropped.

A job that leaves the queue without success is logged on the ``tinymq``
logger, counted in the stats, and handed to every ``on_failure`` callback as
``fn(job, reason, exc)``. A full ready buffer raises ``QueueFull`` (or, with
``block=True``, waits for room) instead of dropping the job.

Run: python examples/error_handling.py
"""
import logging
import sys
import threading
from typing import Optional

from tinymq import Config, ExecutorConfig, Job, JobContext, JobTimeout, Queue, QueueFull, RetryConfig

# Failures are logged on the "tinymq" logger; show them.
logging.basicConfig(stream=sys.stdout, level=logging.ERROR, format="  log: %(message)s")

with Queue(config=Config(buffer_size=2, max_delayed_jobs=2)) as q:

    # A failure callback gets every job that leaves without success, with the reason.
    @q.on_failure
    def report(job: Job, reason: str, exc: Optional[BaseException]) -> None:
        error = "" if exc is None else f" ({type(exc).__name__}: {exc})"
        print(f"on_failure: {job.payload} -> {reason}{error}")

    @q.executor("charge")
    def charge(job: Job) -> None:
        raise RuntimeError("card declined")

    @q.executor("remind")
    def remind(job: Job) -> None:
        print(f"ran {job.payload}")

    # Timeouts. Python cannot kill a thread: at the deadline the attempt is failed
    # with JobTimeout and the executor is told through its context (an executor
    # taking (job, ctx) gets one). Its slot stays taken until it really returns.
    returned = threading.Event()

    @q.executor("export", config=ExecutorConfig(timeout=0.2))
    def export(job: Job, ctx: JobContext) -> None:
        try:
            if ctx.wait(10):  # sleeps, but wakes at once when cancelled at the deadline
                print("export noticed its timeout and returns")
        finally:
            returned.set()

    # 1. Retries exhausted, and a job nobody handles.
    q.enqueue(Job("charge", "order #1", retry_config=RetryConfig(max_retries=1, initial_delay=0.05)))
    q.enqueue(Job("nobody-handles-this", "orphan job"))

    # 2. A full buffer: before the dispatcher starts nothing is taken out,
    #    so a third ready job does not fit in a buffer of 2.
    export_job = Job("export", "nightly export").with_max_retries(0)
    try:
        q.enqueue(export_job)
    except QueueFull as exc:
        print(f"QueueFull: {exc}")

    q.start_dispatcher(2)
    # With block=True, enqueue waits for room like queue.Queue.put (at most `timeout` s).
    q.enqueue(export_job, block=True, timeout=5)
    print("export job enqueued with block=True once a worker made room")
    q.join()
    returned.wait(5)

    # 3. Delayed-set overflow: with max_delayed_jobs=2, a third delayed job
    #    evicts the waiting one due earliest; it is reported, not silently dropped.
    q.enqueue_delayed(Job("remind", "reminder due in 0.1 s"), 0.1)
    q.enqueue_delayed(Job("remind", "reminder due in 0.2 s"), 0.2)
    q.enqueue_delayed(Job("remind", "reminder due in 0.3 s"), 0.3)
    q.join()

    stats = q.get_stats()
    print(f"failed={stats.jobs_failed} retried={stats.jobs_retried} "
          f"timed_out={stats.jobs_timed_out} evicted={stats.jobs_evicted}")

# JobTimeout is a TimeoutError and QueueFull a queue.Full: the standard names catch them too.
assert issubclass(JobTimeout, TimeoutError)
