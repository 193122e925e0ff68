"""attackRR: an outsider's attack on this session's changes (frozen Redis bounds, cancel in the
deciding step, crashed rows until reported, store BaseExceptions, cron's next tick).

Each test's docstring says the symptom, how to reproduce it, and what the docs promise.
"""
import logging
import signal
import threading
import time

import pytest

from tinymq import DuplicateJob, Job, Queue, TinyMQError


# --- 1. a Redis frozen before the broker's first look at it -----------------------------------

def test_enqueue_with_a_timeout_keeps_it_when_redis_froze_before_the_first_reply(own_redis_server):
    """Symptom: a RedisBroker made while Redis was down (its version check put off to the first
    use), then Redis frozen (SIGSTOP) once back: enqueue(block=True, timeout=1) raised after
    10 s, the socket timeout of the version check (INFO) that every call makes first until one
    answers; three producers at once raised after 10, 20 and 30 s (the check's lock). Against a
    server that accepts TCP but never answers, the same.
    docs/redis.md: enqueue raises after its own timeout (half a second at least).
    Fix: the first look at the server (INFO, CONFIG GET) is bounded by the caller's deadline,
    and so is the wait for another thread's look under way."""
    from tinymq.redis import RedisBroker

    own_redis_server.kill()  # down: the broker's check fails at once (refused) and is put off
    q = Queue(broker=RedisBroker(own_redis_server.url, name="frozen-first", lease=2.0))
    own_redis_server.start()
    try:
        with _Frozen(own_redis_server):
            took = {}

            def produce(job_id):
                began = time.monotonic()
                try:
                    q.enqueue(Job("t", id=job_id), block=True, timeout=1.0)
                except TinyMQError as exc:
                    assert "may or may not have been enqueued" in str(exc)
                took[job_id] = time.monotonic() - began

            threads = [threading.Thread(target=produce, args=(f"p{i}",)) for i in range(3)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(40)
            assert len(took) == 3
            assert max(took.values()) < 5.0, took
        for job_id in ("p0", "p1", "p2"):  # each got in once, whatever the frozen calls did
            try:
                q.enqueue(Job("t", id=job_id))
            except DuplicateJob:
                pass
        assert q.get_stats().jobs_enqueued == 3
    finally:
        q.stop(timeout=5)


def test_the_put_off_look_at_redis_still_warns_of_an_evicting_policy(own_redis_server, caplog):
    """The first look made by a bounded enqueue (see above) reads CONFIG GET on a raw connection
    (a RESP3 map there): it still warns of a maxmemory-policy that may evict tinymq's keys."""
    import redis as redis_py

    from tinymq.redis import RedisBroker

    own_redis_server.kill()
    q = Queue(broker=RedisBroker(own_redis_server.url, name="policy-first", lease=2.0))
    own_redis_server.start()
    client = redis_py.Redis.from_url(own_redis_server.url)
    try:
        client.config_set("maxmemory-policy", "allkeys-lru")
        with caplog.at_level(logging.WARNING, logger="tinymq"):
            q.enqueue(Job("t"), block=True, timeout=5.0)
        assert [record for record in caplog.records if "'allkeys-lru'" in record.getMessage()]
        assert q.get_stats().jobs_enqueued == 1
    finally:
        client.close()
        q.stop(timeout=5)


class _Frozen:
    """The server SIGSTOPped for the ``with`` block, SIGCONTed after it, whatever happens."""

    def __init__(self, server):
        self.server = server

    def __enter__(self):
        self.server.process.send_signal(signal.SIGSTOP)
        return self

    def __exit__(self, *exc_info):
        self.server.process.send_signal(signal.SIGCONT)
