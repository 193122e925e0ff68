"""Concurrency control: cap how many jobs of one type run at the same time.

At most ``max_concurrent_jobs`` attempts of a type run at once, however many
workers are free. A saturated type does not hold up other types: its jobs
wait, keep their place, and the free workers serve everything else.

Run: python examples/concurrency_control.py
"""
import threading
import time

from tinymq import ExecutorConfig, Job, Queue

with Queue(100) as q:
    lock = threading.Lock()
    running = 0
    most_at_once = 0
    quick_jobs_done_while_limited = []

    def transcode(job: Job) -> None:
        global running, most_at_once
        with lock:
            running += 1
            most_at_once = max(most_at_once, running)
        time.sleep(0.2)  # slow work
        with lock:
            running -= 1

    def ping(job: Job) -> None:
        with lock:
            quick_jobs_done_while_limited.append(running > 0)

    # Only 3 transcodes run simultaneously, even with 6 workers.
    q.register_executor("transcode", transcode, ExecutorConfig(max_concurrent_jobs=3, timeout=5.0))
    q.register_executor("ping", ping)

    for number in range(9):
        q.enqueue(Job("transcode", f"video-{number}"))
    for number in range(5):
        q.enqueue(Job("ping", number))

    started = time.monotonic()
    q.start_dispatcher(6)
    q.join()
    elapsed = time.monotonic() - started

print(f"max transcodes running at once: {most_at_once} (limit 3)")
print(f"9 transcodes x 200 ms took {elapsed:.2f} s: three waves of three")
print(f"pings done while transcodes were running: "
      f"{sum(quick_jobs_done_while_limited)} of {len(quick_jobs_done_while_limited)}")
