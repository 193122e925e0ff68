"""The process the crash test kills: enqueue jobs into a durable Queue and run them.

Usage: python _crash_child.py DB ACKED RAN TOTAL WORKERS

On start it reloads the store (``set_persistence``), then enqueues every job
``job-0 .. job-{TOTAL-1}`` whose id is not yet in ACKED, appending each id to
ACKED once ``enqueue`` has returned (or refused it as a duplicate of a recovered job). The executor appends the job's id to RAN
when it completes. Each line is one ``os.write`` on an O_APPEND descriptor, so
a SIGKILL never leaves half a line. Prints "done" after ``join()``.
"""
import os
import sys
import time

import tinymq
from tinymq import Config, Job, RetryConfig
from tinymq.errors import DuplicateJob
from tinymq.persistence import SQLitePersistence


def main() -> None:
    db, acked_path, ran_path, total, workers = sys.argv[1:6]
    total, workers = int(total), int(workers)
    acked_fd = os.open(acked_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    ran_fd = os.open(ran_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with open(acked_path) as f:
        acked = set(f.read().split())

    def work(job: Job) -> None:
        time.sleep(0.0005)  # simulated work, so kills land mid-attempt too
        os.write(ran_fd, f"{job.id}\n".encode())

    store = SQLitePersistence(db)
    q = tinymq.Queue(config=Config(buffer_size=50))
    q.register_executor("work", work)
    q.set_persistence(store)
    q.start_dispatcher(workers)
    retry = RetryConfig(max_retries=20, initial_delay=0.0)  # kills count as attempts
    for i in range(total):
        job_id = f"job-{i}"
        if job_id not in acked:
            try:
                q.enqueue(Job("work", i, id=job_id, retry_config=retry), block=True)
            except DuplicateJob:  # saved before a kill, unacknowledged, and recovered: queued already
                pass
            os.write(acked_fd, f"{job_id}\n".encode())
    if not q.join(timeout=60):
        sys.exit("join timed out")
    q.stop()
    store.close()
    print("done", flush=True)


if __name__ == "__main__":
    main()
