"""Priorities: HIGH jobs run before MEDIUM ones, MEDIUM before LOW.

Scheduling is strict: a free worker always takes the oldest ready job of the
highest non-empty priority. Jobs are enqueued *before* the dispatcher starts,
and one worker runs them, so the order they run in is the priority order.

Run: python examples/priorities.py
"""
import tinymq
from tinymq import Priority, Queue

with Queue(100) as q:

    def run(job: tinymq.Job) -> None:
        print(f"{job.priority.name:<6} {job.type:<10} {job.payload}")

    for job_type in ("urgent", "normal", "background", "process"):
        q.register_executor(job_type, run)

    # Low priority: processed last.
    q.enqueue(tinymq.new_low_priority_job("background", "Cleanup task"))
    # Medium priority: the default.
    q.enqueue(tinymq.new_job("normal", "Regular task"))
    # High priority: processed first.
    q.enqueue(tinymq.new_high_priority_job("urgent", "Critical alert"))

    # Fluent setters return the job itself, so they chain.
    job = tinymq.new_job("process", "data").with_high_priority().with_max_retries(5)
    assert job.priority is Priority.HIGH and job.retry_config.max_retries == 5
    q.enqueue(job)  # HIGH too, but enqueued after "Critical alert": FIFO within a priority

    # The constructor takes the priority as well.
    q.enqueue(tinymq.Job("normal", "Another regular task", priority=Priority.MEDIUM))

    q.start_dispatcher(1)
    q.join()
