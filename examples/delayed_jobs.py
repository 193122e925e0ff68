"""Delayed jobs: run a job after a delay, or at a point in time.

The scheduler sleeps until the earliest ``run_at`` and wakes at once when an
earlier job arrives, so delayed jobs start on time, not on the next poll.

Run: python examples/delayed_jobs.py
"""
import time
from datetime import datetime, timedelta, timezone

import tinymq
from tinymq import Job, Queue

with Queue(100) as q:
    start = time.time()

    def remind(job: Job) -> None:
        now = time.time()
        print(f"{job.payload:<32} due at +{(job.run_at - start) * 1000:4.0f} ms, "
              f"started {(now - job.run_at) * 1000:.1f} ms late")

    q.register_executor("reminder", remind)
    q.start_dispatcher(2)

    # Run after a delay (seconds as a float, or a timedelta).
    q.enqueue_delayed(Job("reminder", "enqueue_delayed(job, 0.9)"), 0.9)
    q.enqueue_delayed(Job("reminder", "enqueue_delayed(job, 300 ms)"), timedelta(milliseconds=300))

    # Or set a specific run time: Unix epoch seconds, or an aware datetime.
    job = Job("reminder", "run_at = now + 0.6 s")
    job.run_at = time.time() + 0.6
    q.enqueue(job)
    q.enqueue(Job("reminder", "run_at = aware datetime (+0.5 s)",
                  run_at=datetime.now(timezone.utc) + timedelta(seconds=0.5)))

    # The helper builds a MEDIUM job that is due after the delay.
    q.enqueue(tinymq.new_delayed_job("reminder", "new_delayed_job(..., 0.1)", 0.1))

    print(f"delayed jobs waiting: {q.get_stats().delayed_jobs_count}")
    q.join()  # join() waits for delayed jobs too

print(f"all reminders ran; total {(time.time() - start) * 1000:.0f} ms")
