"""Persistence: jobs survive a restart.

A store saves each job before workers can see it and deletes it when it has
finished; ``set_persistence(store)`` reloads whatever is still stored.
Delivery is at-least-once. Any object with ``save(job)``, ``delete(job_id)``
and ``load_all()`` is a store; ``SQLitePersistence`` is the built-in one.

Run: python examples/persistence.py
"""
import os
import tempfile
from typing import Dict, Iterable

import tinymq
from tinymq import Job, PersistenceError, Queue, SQLitePersistence


# A store of your own needs three methods (this one only lives in memory).
class MyPersistence:
    def __init__(self) -> None:
        self.jobs: Dict[str, Job] = {}

    def save(self, job: Job) -> None:
        self.jobs[job.id] = job  # save the job to a database/file

    def delete(self, job_id: str) -> None:
        self.jobs.pop(job_id, None)  # remove a finished job

    def load_all(self) -> Iterable[Job]:
        return list(self.jobs.values())  # load jobs on startup


assert isinstance(MyPersistence(), tinymq.Persistence)


def send(job: Job) -> None:
    print(f"ran {job.payload['message']!r} (saved by run {job.tags['run']})")


with tempfile.TemporaryDirectory() as directory:
    path = os.path.join(directory, "jobs.db")

    # Run 1: accept three jobs, then stop before any runs (as if the process exited).
    with SQLitePersistence(path) as store, Queue(100) as q:
        q.set_persistence(store)
        q.register_executor("email", send)
        for message in ("Welcome email", "Password reset"):
            q.enqueue(Job("email", {"message": message}, tags={"run": "1"}))
        q.enqueue_delayed(Job("email", {"message": "Follow-up"}, tags={"run": "1"}), 0.3)

        # Payloads are stored as JSON: one that cannot be serialised is refused up front.
        try:
            q.enqueue(Job("email", {"message": object()}))
        except PersistenceError as exc:
            print(f"PersistenceError: {exc}")

        # A file has one live owner: a second store on it is refused while this one is open.
        try:
            SQLitePersistence(path)
        except PersistenceError as exc:
            print(f"second store refused: {exc}")

        print(f"run 1 stopped with {q.get_stats().jobs_enqueued} jobs accepted and none run")
        # Leaving the block stops the queue without running them; they stay stored.

    # Inspecting a file never needs ownership, and changes nothing (a queue may be running).
    view = SQLitePersistence(path, read_only=True)
    print(f"stored between the runs: {view.counts()}")

    # Run 2: a new store on the same file, a new queue: the jobs come back.
    with SQLitePersistence(path) as store, Queue(100) as q:
        q.register_executor("email", send)
        q.set_persistence(store)  # reloads every stored job; delayed ones keep their run_at
        print(f"run 2 recovered {q.get_stats().jobs_enqueued} jobs")
        q.start_dispatcher(2)
        q.join()
        print(f"left in the store after join(): {len(store.load_all())}")

# The same with your own store.
mine = MyPersistence()
with Queue(100) as q:
    q.register_executor("email", send)
    q.set_persistence(mine)
    q.start_dispatcher(1)
    q.enqueue(Job("email", {"message": "Custom store"}, tags={"run": "3"}))
    q.join()
print(f"custom store holds {len(mine.jobs)} jobs after join()")
