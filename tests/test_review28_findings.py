"""Findings of review28 (a review of session 28's merges).

1. The pure core looked at whether a Job without an id was queued already (``_name_elsewhere``)
   before it took its lock: two threads enqueuing the same Job at once into one queue both passed
   that look, and the job was accepted twice (the compiled core, one step under the GIL, refuses
   the second with DuplicateJob). Since join() stamps the jobs accepted while a join is under way
   by ``id(job)``, the second stamp replaced the first: one stamp counted twice, taken back once,
   and the count of stamped jobs stayed one above the truth: every later join() begun with a job
   unfinished waited for ever for that phantom job.
"""
import threading

import pytest

from tinymq import DuplicateJob, Job

from conftest import PURE_CORE, load_twin
from test_core_ready import WAIT, noop


def test_one_job_enqueued_into_one_queue_by_two_threads_at_once_is_accepted_once(monkeypatch):
    core = load_twin(PURE_CORE)  # (the compiled core looks and accepts in one step under the GIL)
    q = core.ReadyQueue(8)
    q.configure("t", noop, 8, None, False, False)
    q.push(Job("t"))  # unfinished: the join below is under way while the two pushes stamp
    ticket = q.join_begin()
    assert ticket is not None

    both_looked = threading.Barrier(2, timeout=WAIT)
    id_of = core._id_of

    def id_of_once_both_looked(job):  # (read after _name_elsewhere, before the lock)
        both_looked.wait()
        return id_of(job)

    monkeypatch.setattr(core, "_id_of", id_of_once_both_looked)
    job = Job("t")
    outcomes = []

    def push():
        try:
            outcomes.append(q.push(job))
        except DuplicateJob as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=push) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
    monkeypatch.setattr(core, "_id_of", id_of)
    assert sorted(type(outcome).__name__ for outcome in outcomes) == ["DuplicateJob", "bool"]
    assert q.unfinished == 2

    while q.unfinished:
        q.task_done(q.pop(timeout=0))
    q.join_end(ticket)
    q.push(Job("t"))
    ticket = q.join_begin()
    q.task_done(q.pop(timeout=0))
    assert q.join_wait(ticket, WAIT)  # (it waited for ever for the job stamped twice, finished)
    q.join_end(ticket)
