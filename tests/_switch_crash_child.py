"""The process test_attackP_findings kills: a durable Queue with several workers, its attempts logged.

Usage: python _switch_crash_child.py DB ACKED LOG TOTAL WORKERS

Reloads the store, records as acknowledged the recovered ids and those that
started in an earlier process (a kill between an enqueue's return and its
acknowledgement, with the job run and deleted meanwhile, must not make it enqueued
twice), enqueues every ``job-0 .. job-{TOTAL-1}`` not yet acknowledged (appending
each id to ACKED once ``enqueue`` returned), and runs them. Every attempt appends ``start ID CRASHES PID``
and ``end ID CRASHES PID`` to LOG (CRASHES: the job's crash count as this process loaded it) (one ``os.write`` each, on O_APPEND: a SIGKILL
never leaves half a line). Prints "done" after join, stop and close.
"""
import os
import sys
import time

import tinymq
from tinymq import Config, Job, RetryConfig
from tinymq.errors import DuplicateJob
from tinymq.persistence import SQLitePersistence


def main() -> None:
    db, acked_path, log_path, total_arg, workers_arg = sys.argv[1:6]
    total, workers = int(total_arg), int(workers_arg)
    acked_fd, log_fd = (os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                        for path in (acked_path, log_path))
    with open(acked_path) as f:
        acked = set(f.read().split())
    pid = os.getpid()

    def work(job: Job) -> None:
        os.write(log_fd, f"start {job.id} {crashes.get(job.id) or 0} {pid}\n".encode())
        if job.payload % 3 == 0:
            time.sleep(0.0005)  # so that kills land mid-attempt too
        os.write(log_fd, f"end {job.id} {crashes.get(job.id) or 0} {pid}\n".encode())

    store = SQLitePersistence(db, max_crash_recoveries=1000)  # every kill may count
    q = tinymq.Queue(config=Config(buffer_size=50))
    q.register_executor("work", work)
    q.set_persistence(store)
    crashes = dict(store._conn.execute("SELECT id, crashes FROM tinymq_jobs"))  # (no worker runs yet)
    recovered = {job.id for job in store.jobs()}  # before any worker starts: what the store gave back
    with open(log_path) as f:  # jobs that started in an earlier process were enqueued for good, and a
        started = {line.split()[1] for line in f if line.startswith("start ")}  # finished one is gone
    for job_id in sorted((recovered | started) - acked):  # enqueued before a kill, unacknowledged
        os.write(acked_fd, f"{job_id}\n".encode())
        acked.add(job_id)
    q.start_dispatcher(workers)
    retry = RetryConfig(max_retries=0)  # (a kill is no failed attempt)
    for i in range(total):
        job_id = f"job-{i}"
        if job_id not in acked and job_id not in recovered:
            try:
                q.enqueue(Job("work", i, id=job_id, retry_config=retry), block=True)
            except DuplicateJob:  # pragma: no cover - recovered ids are skipped above
                pass
            os.write(acked_fd, f"{job_id}\n".encode())
    if not q.join(timeout=60):
        sys.exit("join timed out")
    q.stop()
    store.close()
    print("done", flush=True)


if __name__ == "__main__":
    main()
