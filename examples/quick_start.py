"""Quick Start: a queue, an executor, two jobs and a worker.

The seed's Go example sleeps for a second and hopes the jobs are done;
here ``q.join()`` waits exactly until they are.

Run: python examples/quick_start.py
"""
import tinymq
from tinymq import Queue

# A queue whose ready buffer holds up to 100 jobs; leaving the block stops it.
with Queue(100) as q:

    # An executor runs every job of its type: return normally on success,
    # raise on failure.
    def send_email(job: tinymq.Job) -> None:
        print(f"Sending email: {job.payload}")

    q.register_executor("email", send_email)

    # Enqueue jobs: a MEDIUM one and a HIGH one.
    q.enqueue(tinymq.new_job("email", "Welcome email"))
    q.enqueue(tinymq.new_high_priority_job("email", "Password reset"))

    # One worker thread, started once both wait: the HIGH one runs first.
    q.start_dispatcher(1)

    # Block until every job enqueued so far has finished.
    q.join()

print("all emails sent")
