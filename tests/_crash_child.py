"""The process the crash test kills: enqueue jobs into a durable Queue and run them.

Usage: python _crash_child.py DB ACKED RAN STAGE TOTAL WORKERS MODE

On start it takes over the store (the previous child was killed: its lock is
gone), reloads it (``set_persistence``), then enqueues every job
``job-0 .. job-{TOTAL-1}`` whose id is not yet in ACKED, appending each id to
ACKED once ``enqueue`` has returned (or refused it as a duplicate of a
recovered job). The executor appends the job's id to RAN
when it completes. STAGE gets a line as the child moves on: "recovering"
before ``set_persistence``, "running" after it, "closing" before
``stop()``/``close()``. Each line is one ``os.write`` on an O_APPEND
descriptor, so a SIGKILL never leaves half a line.

MODE "run" joins, stops, closes and prints "done". MODE "close" enqueues up to
``CLOSE_BATCH`` jobs without starting the workers, then stops and closes (the
jobs stay stored) and prints "closed": the test kills it during close().
"""
import os
import sys
import time

import tinymq
from tinymq import Config, Job, RetryConfig
from tinymq.errors import DuplicateJob
from tinymq.persistence import SQLitePersistence

CLOSE_BATCH = 400


def main() -> None:
    db, acked_path, ran_path, stage_path, total, workers, mode = sys.argv[1:8]
    total, workers = int(total), int(workers)
    acked_fd, ran_fd, stage_fd = (os.open(p, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                                  for p in (acked_path, ran_path, stage_path))
    with open(acked_path) as f:
        acked = set(f.read().split())

    def work(job: Job) -> None:
        time.sleep(0.0005)  # simulated work, so kills land mid-attempt too
        os.write(ran_fd, f"{job.id}\n".encode())

    store = SQLitePersistence(db)
    q = tinymq.Queue(config=Config(buffer_size=50 if mode == "run" else 100_000))
    q.register_executor("work", work)
    os.write(stage_fd, b"recovering\n")
    q.set_persistence(store)
    os.write(stage_fd, b"running\n")
    if mode == "run":
        q.start_dispatcher(workers)
    retry = RetryConfig(max_retries=20, initial_delay=0.0)  # kills count as attempts
    enqueued = 0
    for i in range(total):
        job_id = f"job-{i}"
        if job_id not in acked:
            if mode == "close" and enqueued == CLOSE_BATCH:
                break
            try:
                q.enqueue(Job("work", i, id=job_id, retry_config=retry), block=True)
            except DuplicateJob:  # saved before a kill, unacknowledged, and recovered: queued already
                pass
            os.write(acked_fd, f"{job_id}\n".encode())
            enqueued += 1
    if mode == "run" and not q.join(timeout=60):
        sys.exit("join timed out")
    os.write(stage_fd, b"closing\n")
    q.stop()
    store.close()
    print("done" if mode == "run" else "closed", flush=True)


if __name__ == "__main__":
    main()
