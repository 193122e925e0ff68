"""Monitoring: q.get_stats() returns a consistent snapshot of the queue.

Sizes are ready jobs per priority and delayed jobs; ``executor_stats`` says
how many attempts of each type run right now; the ``jobs_*`` fields are
lifetime counters.

Run: python examples/monitoring.py
"""
import threading

import tinymq
from tinymq import Job, Queue


def print_stats(stats: tinymq.QueueStats) -> None:
    print(f"High priority jobs: {stats.high_queue_size}")
    print(f"Medium priority jobs: {stats.medium_queue_size}")
    print(f"Low priority jobs: {stats.low_queue_size}")
    print(f"Delayed jobs: {stats.delayed_jobs_count}/{stats.max_delayed_jobs}")
    for job_type, exec_stats in sorted(stats.executor_stats.items()):
        print(f"Executor {job_type}: {exec_stats.active_jobs}/{exec_stats.max_jobs} active")


with Queue(100) as q:
    report_running = threading.Event()
    release_report = threading.Event()

    @q.executor("report", max_concurrent_jobs=2)
    def report(job: Job) -> None:
        report_running.set()
        release_report.wait(5)  # hold the slot so the snapshot below sees it taken

    @q.executor("email", max_concurrent_jobs=4)
    def email(job: Job) -> None:
        pass

    for _ in range(3):
        q.enqueue(tinymq.new_high_priority_job("email", "alert"))
    q.enqueue(tinymq.new_job("email", "digest"))
    q.enqueue(tinymq.new_low_priority_job("report", "monthly report"))
    q.enqueue_delayed(Job("email", "reminder"), 0.2)
    q.enqueue_delayed(Job("email", "follow-up"), 0.3)

    print("-- before start_dispatcher()")
    print_stats(q.get_stats())

    q.start_dispatcher(2)
    report_running.wait(5)
    print("-- while the report runs")
    print_stats(q.get_stats())
    release_report.set()

    q.join()
    stats = q.get_stats()
    print("-- after join()")
    print_stats(stats)
    print(f"enqueued={stats.jobs_enqueued} succeeded={stats.jobs_succeeded} "
          f"failed={stats.jobs_failed} retried={stats.jobs_retried} "
          f"timed_out={stats.jobs_timed_out} evicted={stats.jobs_evicted}")
