"""Job tagging: free-form string labels that travel with the job.

``job.tags`` is a plain dict, present on every job; executors and failure
callbacks read it to route, log or group work.

Run: python examples/tags.py
"""
import tinymq
from tinymq import Job, Queue

with Queue(100) as q:

    def process(job: Job) -> None:
        labels = ", ".join(f"{key}={value}" for key, value in sorted(job.tags.items()))
        print(f"processing {job.payload!r} tagged {labels}")

    q.register_executor("process", process)
    q.start_dispatcher(1)

    # Tag a job after creating it...
    job = tinymq.new_job("process", "data")
    job.tags["user"] = "123"
    job.tags["priority"] = "urgent"
    q.enqueue(job)

    # ...or pass the tags to the constructor.
    q.enqueue(Job("process", "more data", tags={"user": "456", "source": "import"}))
    q.join()
