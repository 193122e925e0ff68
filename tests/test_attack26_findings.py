"""Defects found by attack26 (session 26), each with its test.

docs/redis.md is the reference ("Delivery guarantee": after a restart of Redis nothing is
reaped and nothing runs twice; stop() gives back what it holds within its bounds).
"""
import logging
import threading

import pytest

from tinymq import Job, Queue

from _helpers import WAIT, Recorder, wait_until


class _WarningsSeen(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = Recorder()

    def emit(self, record):
        self.messages.add(record.getMessage())


@pytest.fixture
def warnings_seen():
    handler = _WarningsSeen()
    logger = logging.getLogger("tinymq")
    logger.addHandler(handler)
    yield handler.messages
    logger.removeHandler(handler)


# --- 1. stop() while Redis restarts -------------------------------------------------------

# stop()'s release call was sent three times within about 0.06 s (the resends of a lost reply):
# a Redis being restarted (kill -9 and up again half a second later, its append-only file
# replayed) refused all three, and stop() gave up at once, long before its 2 s give-back
# bound, logging that it could not give back what it held: the outcome the process had not
# sent yet ran again elsewhere once the lease ran out (and counted as a crash), though "after
# a restart of Redis nothing runs twice". The release now tries again until its deadline.
def test_stop_gives_back_to_a_redis_restarting_within_its_wait(own_redis_server, warnings_seen):
    pytest.importorskip("redis")
    from tinymq.redis import RedisBroker

    server = own_redis_server
    ran = Recorder()
    running, finish = threading.Event(), threading.Event()

    def run(job):
        ran.add(job.id)
        running.set()
        finish.wait(WAIT)

    q = Queue(broker=RedisBroker(server.url, name="restarting", lease=30.0))
    q.register_executor("send", run)
    q.enqueue(Job(type="send", id="once", payload={}))
    q.start_dispatcher(1)
    assert running.wait(WAIT)
    server.kill()  # its outcome cannot be sent now
    finish.set()
    link = q._link
    assert wait_until(lambda: link._ops or link._unsent is not None)  # its outcome, not sent
    restart = threading.Timer(0.5, server.start)
    restart.start()
    try:
        q.stop()
    finally:
        restart.join()
    assert not [m for m in warnings_seen.items if "could not give back" in m], warnings_seen.items

    other = Queue(broker=RedisBroker(server.url, name="restarting", lease=30.0))
    other.register_executor("send", run)
    other.start_dispatcher(1)
    try:
        assert other.join(timeout=WAIT)
        stats = other.get_stats()
    finally:
        other.stop()
    assert ran.items == ["once"]
    assert stats.jobs_succeeded == 1

