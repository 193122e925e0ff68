"""Findings of review27 (session 27): the Redis link's changes of this session attacked from outside.

Each test failed on the code before its fix; its docstring says the symptom, how to
reproduce it, and what the docs promise.
"""
import threading

import pytest

from tinymq import Job, Queue

from _helpers import WAIT, wait_until, watch_join_looks

pytestmark = pytest.mark.redis


def _clock_stepped_back(client, name):
    """The queue's state began (the clock hash's e) an hour ahead of the server's clock now, as
    when the server's clock was stepped back by an hour (NTP, a VM moved) after that."""
    seconds, micros = client.time()
    client.hset(f"tmq:{{{name}}}:clock", "e", seconds * 1000 + micros // 1000 + 3_600_000)


def test_a_reaped_worker_after_a_clock_step_back_does_not_say_redis_lost_the_queue(own_redis_server,
                                                                                    warnings_seen):
    """Symptom: a worker process that registered after the Redis server's clock was stepped back
    (to before the moment the queue's state began), and was later reaped (silent past its lease),
    logged the ERROR "Redis ... lost the state of queue 'skew' ...: the jobs queued there are
    gone": nothing was lost, the queue's jobs were all there. The reply compared the worker's
    registration time with the state's start on a clock that had gone back.
    Reproduce: the clock hash's e set an hour ahead of the server's time (a step back by an
    hour); a worker registers; its id is reaped. docs/redis.md: that ERROR says Redis lost the
    queue's state (a restart without its data, its keys deleted).
    Fix: a registration earlier than e (the clock went back) moves e back to it, so every
    process registered in the queue's state registered no earlier than e."""
    from tinymq.redis import RedisBroker

    q = Queue(broker=RedisBroker(own_redis_server.url, name="skew", lease=1.0))
    try:
        with own_redis_server.client() as client:
            _clock_stepped_back(client, "skew")
            q.register_executor("t", lambda job: None)
            q.start_dispatcher(1)
            assert wait_until(lambda: client.zcard("tmq:{skew}:procs") == 1)
            [proc] = client.zrange("tmq:{skew}:procs", 0, -1)
            client.zrem("tmq:{skew}:procs", proc)  # (reaped: its lease ran out while it was silent)
            assert warnings_seen.wait_until(lambda seen: any("silent past" in m for m in seen)), \
                warnings_seen.snapshot()
        assert not [m for m in warnings_seen.snapshot() if "lost the state" in m], warnings_seen.snapshot()
        q.enqueue(Job("t", id="still-runs"))
        assert q.join(WAIT)
    finally:
        q.stop(wait=False)


def test_a_join_waiting_as_a_worker_registers_after_a_clock_step_back_says_nothing_is_lost(
        own_redis_server, warnings_seen):
    """The fix above moves e back as a worker registers after a step back of the server's clock:
    a join() waiting meanwhile must not take that for a Redis that lost the queue's state."""
    from tinymq.redis import RedisBroker

    producer = Queue(broker=RedisBroker(own_redis_server.url, name="skew2", lease=1.0))
    worker = Queue(broker=RedisBroker(own_redis_server.url, name="skew2", lease=1.0))
    release = threading.Event()
    looked = watch_join_looks(producer)
    joined = []
    try:
        with own_redis_server.client() as client:
            _clock_stepped_back(client, "skew2")
        producer.enqueue(Job("t", id="waited-for"))
        waiter = threading.Thread(target=lambda: joined.append(producer.join(WAIT)))
        waiter.start()
        assert looked.wait(WAIT)
        worker.register_executor("t", lambda job: release.wait(WAIT))
        worker.start_dispatcher(1)
        release.set()
        waiter.join(WAIT + 5)
        assert joined == [True]
        assert not [m for m in warnings_seen.snapshot() if "lost the state" in m], warnings_seen.snapshot()
    finally:
        release.set()
        worker.stop(wait=False)
        producer.stop(wait=False)


def test_a_stop_waiting_for_a_success_being_counted_goes_on_when_the_process_is_reaped_meanwhile(redis_url):
    """Symptom: stop() waits for a success the core is counting (its op then goes with the
    release); when the process learned meanwhile that it was reaped (a round's reply, a beat's),
    the success was no longer this process's and nothing was left to wait for, yet stop() slept
    on until its 10 s bound for failure callbacks (nothing woke it to look again).
    Reproduce: a success held between the link's succeeding() and succeeded(); stop(); the
    process reaped (_abandon, as a round does). docs/redis.md: stop() gives back what the
    process holds at once.
    Fix: letting the id go wakes a stop() waiting for the successes it took away."""
    from _backends import Redis
    from _helpers import per_type_counts

    made = Redis(redis_url, lease=40.0)  # (no heartbeat tells the worker of anything meanwhile)
    try:
        producer, worker = made.pair()
        for q in (producer, worker):
            q.register_executor("t", lambda job: None)
        counting, gate = threading.Event(), threading.Event()
        link = worker._link
        succeeded = link.succeeded

        def succeeded_gated(job):
            counting.set()
            assert gate.wait(WAIT)
            succeeded(job)

        link.succeeded = succeeded_gated  # (before start_dispatcher: its workers read their hooks then)
        stop_waits = threading.Event()

        class Watched(threading.Condition):
            def wait(self, timeout=None):
                stop_waits.set()
                return super().wait(timeout)

        link._reported = Watched(link._lock)
        producer.enqueue(Job("t", "held"))
        worker.start_dispatcher(1)
        assert counting.wait(WAIT)
        stopper = threading.Thread(target=worker.stop, kwargs={"wait": False})
        stopper.start()
        assert stop_waits.wait(WAIT)
        with link._round_lock:
            link._abandon(False)  # (a round's reply said this process was reaped)
        gate.set()
        stopper.join(WAIT / 2)  # (before: it went on only at its 10 s bound)
        assert not stopper.is_alive()
        stopper.join(WAIT)
        # Counted by the core before the process heard of the reap: it stays (redisfix: a counter
        # never goes down; it was taken back here).
        assert per_type_counts(worker)["succeeded"] == 1
    finally:
        made.close()


def test_a_join_takes_a_state_start_another_program_wrote_as_none(redis_url):
    """The clock hash's e that another program wrote (not a number) is taken as missing, as the
    scripts take it (renew writes a new one): join() compares it with the next one it reads
    without raising (float() of it raised ValueError out of join())."""
    import redis as redis_py

    from tinymq.redis import RedisBroker

    producer = Queue(broker=RedisBroker(redis_url, name="junk"))
    looked = watch_join_looks(producer)
    joined = []
    try:
        client = redis_py.Redis.from_url(redis_url)
        client.hset("tmq:{junk}:clock", "e", "not a time")
        producer.enqueue(Job("t", id="waited-for"))
        waiter = threading.Thread(target=lambda: joined.append(producer.join(WAIT)))
        waiter.start()
        assert looked.wait(WAIT)
        looked.clear()
        client.hset("tmq:{junk}:clock", "e", "12345")
        assert looked.wait(WAIT)
        assert producer.cancel("waited-for")
        waiter.join(WAIT + 5)
        assert joined == [True]
    finally:
        producer.stop(wait=False)
