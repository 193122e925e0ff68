"""Defects of the Redis broker seen in session 25 and left unfixed then (seen26); each with its test.

docs/redis.md is the reference: "Delivery guarantee" (a Redis that keeps its connections open
but does not answer), the ExecutorStats paragraph of "What holds across processes", and the
worker threads that fail on something other than Redis.
"""
import contextlib
import socket
import threading
import time

import pytest

from tinymq import ExecutorConfig, Job, PermanentFailure, Queue

from _backends import Redis
from _helpers import WAIT, held_elsewhere, record_failures, wait_until

LEASE = 40.0  # a heartbeat (every lease / 4) that tells the worker of no mark during a test


@contextlib.contextmanager
def silent_server():
    """The URL of a server that takes connections (the kernel does) and never answers."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        yield f"redis://127.0.0.1:{silent.getsockname()[1]}/0"


# --- 1. a server that takes the connection and never answers ---------------------------------

# enqueue (and cancel) looked at the server first (its version) with the 10 s socket timeout:
# against a server that never answers, each call waited 10 s before it said "cannot reach". The
# first look waits for the connect timeout (2 s) at most, as RedisBroker() does since seen25.
def test_enqueue_and_cancel_give_up_on_a_server_that_never_answers_within_the_first_look_wait(
        warnings_seen):
    pytest.importorskip("redis")
    from tinymq import TinyMQError
    from tinymq.redis import RedisBroker

    with silent_server() as url:
        q = Queue(broker=RedisBroker(url, name="emails"))
        try:
            began = time.monotonic()
            with pytest.raises(TinyMQError, match=f"cannot reach Redis at {url} .*; 1 job not enqueued"):
                q.enqueue(Job("send", {}))
            enqueue_took = time.monotonic() - began
            began = time.monotonic()
            with pytest.raises(TinyMQError, match=f"cannot reach Redis at {url} .*; job 'x' not cancelled"):
                q.cancel("x")
            cancel_took = time.monotonic() - began
        finally:
            q.stop(timeout=0)
    assert enqueue_took < 6.0, f"enqueue waited {enqueue_took:.1f}s for a server that never answers"
    assert cancel_took < 6.0, f"cancel waited {cancel_took:.1f}s for a server that never answers"


# stop() without a timeout took about 37 s against a server that never answers: the wake-up of
# the pump waited for the socket timeout (10 s), each thread 2 s in turn, and the release waited
# without bound for the round lock, which the heartbeat held through its call and its two
# resends (3 x 10 s). Now stop() waits for Redis a few seconds in all, and says what it could
# not give back and that it returns once the lease runs out. (Since redisstop31 the round under way,
# the first look at the server, gives up as soon as stop() begins: a process that never reached
# Redis holds nothing there and has nothing to give back, and stop() says nothing of it.)
def test_stop_without_a_timeout_returns_in_a_few_seconds_from_a_server_that_never_answers(warnings_seen):
    pytest.importorskip("redis")
    from tinymq.redis import RedisBroker

    with silent_server() as url:
        q = Queue(broker=RedisBroker(url, name="emails", lease=0.4))  # a beat every 0.1 s
        q.register_executor("send", lambda job: None)
        q.start_dispatcher(2)
        link = q._link
        assert wait_until(lambda: held_elsewhere(link._round_lock))  # a round, or a beat, waits for Redis
        began = time.monotonic()
        q.stop()
        took = time.monotonic() - began
    assert took < 8.0, f"stop() waited {took:.1f}s for a server that never answers"
    assert not any(thread.is_alive() for thread in link._threads)
    assert all(("lease runs out" in m) for m in warnings_seen.items if "stop() could not" in m), warnings_seen.items


# --- 2. the reply of stop()'s release lost, and the call resent --------------------------------

# release.lua ran a resent call again: it found every op stale and the process gone, and
# replied that no op was overruled, so the process did not move its per-type counts (a success
# of an attempt that another process had cancelled stayed a success here, while the shared
# counters said cancelled). A resent release now gets the first call's reply. (Since
# test_monotone_counts a success counted before the reply stays counted whatever the reply
# says, a counter never going down; the reply still decides what an attempt given back counts.)
def test_a_resent_release_gets_the_overruled_attempts_of_its_lost_first_reply(redis_url, monkeypatch):
    import redis as redis_py

    made = Redis(redis_url, lease=LEASE)
    try:
        producer, worker = made.pair()
        started, let_go = threading.Event(), threading.Event()

        def run(job):
            started.set()
            assert let_go.wait(WAIT)  # deaf to ctx.cancelled: it succeeds

        for q in (producer, worker):
            q.register_executor("t", run)
        job = Job("t", "target")
        producer.enqueue(job)
        worker.start_dispatcher(1)
        assert started.wait(WAIT)
        link = worker._link
        monkeypatch.setattr(link, "_round", lambda unless_sent=None: 0)  # its success goes with the release
        assert producer.cancel(job.id) is True  # leased: marked in Redis; the worker does not hear of it
        let_go.set()
        assert wait_until(lambda: any(op.op == "S" for op in link._ops))
        released = []
        real_release = link.scripts.release

        def reply_lost_once(*args, **kwargs):
            reply = real_release(*args, **kwargs)
            released.append(reply)
            if len(released) == 1:
                raise redis_py.ConnectionError("the connection broke before the reply came (test)")
            return reply

        monkeypatch.setattr(link.scripts, "release", reply_lost_once)
        worker.stop()
        assert len(released) == 2  # sent, and sent again
        assert [t for _, t in released[1].overruled] == ["t"]  # as the lost first reply said
        assert list(released[1].overruled) == list(released[0].overruled)
        stats = worker.get_stats()
        assert (stats.jobs_succeeded, stats.jobs_cancelled) == (0, 1)  # (shared: Redis ended it cancelled)
        per_type = stats.executor_stats["t"]
        assert (per_type.succeeded, per_type.cancelled) == (1, 0)  # counted before the reply: it stands
    finally:
        made.close()


# --- 3. an internal exception in failing() after its op was sent ----------------------------

# The failure for good is sent first (with a callback registered), and Redis keeps the job in
# reporting:<proc>, unfinished for join(), until the process acknowledges it after its
# callbacks. An exception inside failing() after the send (a bug) left the row there under a
# live process: join() waited for ever. Now the process goes on as if killed and started again
# (as a thread that crashes does): whoever reaps its old id reports the job, and join() returns.
def test_join_does_not_hang_when_failing_raises_after_its_op_was_sent(redis_url, monkeypatch):
    from tinymq.redis import _link

    made = Redis(redis_url, lease=0.5)
    try:
        q = made.queue()
        failures = record_failures(q, key=lambda job: job.id)

        def broken(job):
            raise PermanentFailure("HTTP 404")

        q.register_executor("t", broken)
        real_report_key = _link._report_key
        raised = []

        def report_key_once(*args):
            if not raised:
                raised.append(True)
                raise RuntimeError("an internal step failed (test)")
            return real_report_key(*args)

        monkeypatch.setattr(_link, "_report_key", report_key_once)  # (called after the send)
        job = Job("t", "target")
        q.enqueue(job)
        q.start_dispatcher(1)
        assert q.join(WAIT), "join() hangs: the job's report row stays under the live process"
        assert raised
        assert failures.wait_until(lambda seen: any(i == job.id for i, _, _ in seen))
        assert q.get_stats().jobs_failed == 1
    finally:
        made.close()
