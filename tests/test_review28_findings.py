"""Findings of review28 (a review of session 28's merges).

1. The pure core looked at whether a Job without an id was queued already (``_name_elsewhere``)
   before it took its lock: two threads enqueuing the same Job at once into one queue both passed
   that look, and the job was accepted twice (the compiled core, one step under the GIL, refuses
   the second with DuplicateJob). Since join() stamps the jobs accepted while a join is under way
   by ``id(job)``, the second stamp replaced the first: one stamp counted twice, taken back once,
   and the count of stamped jobs stayed one above the truth: every later join() begun with a job
   unfinished waited for ever for that phantom job.
2. A Redis worker's look at the server's settings (every minute, on a thread of its own since
   redisfix) was not waited for by stop(): a look still in its CONFIG call when stop() returned
   went on past the broker's close(), on a connection that close() leaves open while it is lent
   (it closes the idle ones), so that socket stayed open.
"""
import threading

import pytest

from tinymq import DuplicateJob, Job

from _helpers import wait_until
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


@pytest.mark.redis
def test_stop_waits_for_a_look_at_the_redis_settings_under_way(redis_url, monkeypatch):
    from tinymq import Queue
    from tinymq.redis import RedisBroker, _link

    monkeypatch.setattr(_link, "_SETTINGS_LOOK", 0.0)  # a look at the first beat
    q = Queue(broker=RedisBroker(redis_url, name="settingslook", lease=1.0))
    scripts = q.broker._scripts
    command = scripts.command
    in_config, answer, stop_returned = threading.Event(), threading.Event(), threading.Event()
    answered_after_stop = []

    def slow_config(*args, **kwargs):
        if args and args[0] == "CONFIG":
            in_config.set()
            answer.wait(WAIT)
            answered_after_stop.append(stop_returned.is_set())
        return command(*args, **kwargs)

    scripts.command = slow_config
    q.register_executor("t", lambda job: None)
    q.start_dispatcher(1)
    stopper = threading.Thread(target=lambda: (q.stop(), stop_returned.set()))
    try:
        assert in_config.wait(WAIT)
        stopper.start()
        assert wait_until(q._link._stopped.is_set, timeout=WAIT)
        # stop() waits for the look (at most its own bound for the threads, 2 s: not this long)
        assert not stop_returned.wait(0.5)
    finally:
        answer.set()
        if stopper.is_alive():
            stopper.join(WAIT)
        q.broker.close()
    assert answered_after_stop and not any(answered_after_stop)
