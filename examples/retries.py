"""Retries: a failed attempt is retried with exponential backoff.

The k-th retry (k = 1 .. max_retries) runs
``min(initial_delay * backoff_multiple**(k-1), max_delay)`` seconds after the
failed attempt ended. ``job.retries`` counts failed attempts, ``job.last_error``
describes the latest one.

Run: python examples/retries.py
"""
import time

from tinymq import Job, Queue, RetryConfig

retry_config = RetryConfig(
    max_retries=5,          # up to 5 retries after the first attempt
    initial_delay=0.05,     # seconds before the 1st retry
    max_delay=1.0,          # no retry waits longer than this
    backoff_multiple=2.0,   # each retry waits twice as long as the one before
)
print("planned backoff:", ", ".join(
    f"retry {k}: {retry_config.retry_delay(k) * 1000:.0f} ms" for k in range(1, 6)))

with Queue(100) as q:
    started = time.monotonic()

    def flaky(job: Job) -> None:
        attempt = job.retries + 1
        print(f"attempt {attempt} at +{(time.monotonic() - started) * 1000:4.0f} ms"
              f" (last error: {job.last_error})")
        if attempt < 4:
            raise ConnectionError(f"service unavailable (attempt {attempt})")

    q.register_executor("flaky-task", flaky)
    q.start_dispatcher(1)

    job = Job("flaky-task", "data")
    job.with_retry_config(retry_config)
    started = time.monotonic()
    q.enqueue(job)
    q.join()

    stats = q.get_stats()
    print(f"succeeded on attempt {job.retries + 1} after {job.retries} failures; "
          f"jobs_retried={stats.jobs_retried}, jobs_succeeded={stats.jobs_succeeded}")
