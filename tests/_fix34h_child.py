"""A process for tests/test_fix34h_findings.py: ``python _fix34h_child.py redis URL NAME WAIT`` or
``python _fix34h_child.py sqlite PATH - WAIT``.

One async job ("done") runs; as the queue reports its success on the event loop's reporting
thread (the Redis link's ``succeeding``, or the store's ``delete``), the garbage collector runs a
``__del__`` there that calls ``q.stop()`` (wait=True, no timeout). It prints one JSON line: how
long that stop() took and what it raised, once it returned; or exits 3 if it had not returned
within WAIT seconds (it hung: the process is ended with os._exit, as its threads never would).
Then it stops the queue from the main thread and exits 0.
"""
import json
import os
import sys
import threading
import time

from tinymq import Job, Queue

from _helpers import collect_garbage_that  # (this script's folder is tests/)


def main() -> None:
    kind, where, name, wait = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    if kind == "redis":
        from tinymq.redis import RedisBroker

        q = Queue(broker=RedisBroker(where, name=name, lease=wait * 3))  # (not reaped meanwhile)
        target = q._link
        method = "succeeding"
    else:
        from tinymq.persistence import SQLitePersistence

        q = Queue()
        target = SQLitePersistence(where)
        method = "delete"
    runs = []
    failures = []

    async def run(job):
        runs.append(job.id)

    q.register_executor("t", run)
    q.on_failure(lambda job, reason, exc: failures.append((job.id, reason)))
    if kind == "sqlite":
        q.set_persistence(target)

    stopped = []
    collected = threading.Event()

    def stops_the_queue() -> None:  # (a user's finalizer may)
        began = time.monotonic()
        try:
            q.stop()
            stopped.append((None, time.monotonic() - began, threading.current_thread().name))
        except Exception as error:
            stopped.append((repr(error), time.monotonic() - began, threading.current_thread().name))
        collected.set()

    reporting = getattr(target, method)

    def collected_as_it_reports(job_or_id):  # (read at each report: an instance attribute wins)
        if getattr(job_or_id, "id", job_or_id) == "done" and not collected.is_set():
            collect_garbage_that(stops_the_queue)  # on the thread that reports the outcome
        return reporting(job_or_id)

    setattr(target, method, collected_as_it_reports)
    q.start_dispatcher(1)
    q.enqueue(Job("t", id="done"))
    if not collected.wait(wait):
        print(json.dumps({"hung": True}), flush=True)
        os._exit(3)
    q.stop()  # (returns once the first one's work is done: with a broker, the give-back)
    # The report the collector's stop() did not wait for has ended (the store is the queue's until then).
    ended = q._dispatcher.attempts_ended(wait)
    print(json.dumps({"stopped": stopped, "ended": ended, "runs": runs, "failures": failures,
                      "succeeded": q.get_stats().jobs_succeeded}), flush=True)
    if kind == "sqlite":
        target.close()


if __name__ == "__main__":
    main()
