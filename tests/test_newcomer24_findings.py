"""Findings of a newcomer (session 24) who follows README.md on a fresh machine and checks the
public contract against the code: the mistakes a first user makes, and what they are told."""
import socket

import pytest

from tinymq import Job, Queue, QueueFull, TinyMQError


def _closed_port():
    """A loopback port nothing listens on (bound, then closed: a connect there is refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- Redis not started yet ------------------------------------------------------------------------

# Fixed: a producer whose Redis was never reached (the newcomer forgot to start redis-server, or
# mistyped the port) got "Redis queue 'emails' did not answer an enqueue of 1 job(s) (Error 111
# connecting to localhost:6379. Connection refused.): they may or may not have been enqueued;
# enqueue the same job(s) again to know". Nothing had been sent: the first look at the server
# (its version) comes before the enqueue's script, and it is that look that failed. The error
# now says where it looked, that nothing was enqueued, and what to check; a cancel likewise.


def test_an_enqueue_to_a_redis_never_reached_says_nothing_was_enqueued_and_where_it_looked():
    pytest.importorskip("redis")
    from tinymq.redis import RedisBroker

    url = f"redis://127.0.0.1:{_closed_port()}/0"
    q = Queue(broker=RedisBroker(url, name="emails"))
    try:
        for call in (lambda: q.enqueue(Job("send")), lambda: q.enqueue_many([Job("send"), Job("send")])):
            with pytest.raises(TinyMQError) as raised:
                call()
            message = str(raised.value)
            assert f"cannot reach Redis at {url} (queue 'emails')" in message, message
            assert "not enqueued" in message and "may or may not" not in message, message
            assert "is a redis-server running there" in message, message  # what to check
            assert raised.value.__cause__ is not None
        with pytest.raises(TinyMQError) as raised:  # a cancel, likewise: nothing was sent
            q.cancel("report-42")
        message = str(raised.value)
        assert f"cannot reach Redis at {url} (queue 'emails')" in message, message
        assert "job 'report-42' not cancelled" in message and "may or may not" not in message, message
    finally:
        q.stop(timeout=5)


# --- messages that count ------------------------------------------------------------------------------

# Fixed: a full buffer of one job said "the ready buffer is full (1 jobs)".


def test_a_full_buffer_of_one_job_says_1_job():
    q = Queue(1)
    try:
        q.enqueue(Job("x"))
        with pytest.raises(QueueFull, match=r"the ready buffer is full \(1 job\)"):
            q.enqueue(Job("x"))
    finally:
        q.stop()


# Fixed: broker.requeue_dead() and broker.purge_dead() (all dead jobs: no ids) raised a bare
# redis.ConnectionError while Redis was unreachable, where docs/api.md says the dead-job calls
# raise TinyMQError with the connection error as __cause__ (with ids they did): the list of every
# dead id was read before the call that wraps the error.


def test_requeue_and_purge_of_every_dead_job_raise_tinymq_error_while_redis_is_unreachable():
    redis = pytest.importorskip("redis")
    from tinymq.redis import RedisBroker

    url = f"redis://127.0.0.1:{_closed_port()}/0"
    q = Queue(broker=RedisBroker(url, name="emails"))
    try:
        for call in (q.broker.requeue_dead, q.broker.purge_dead):
            for ids in (None, ["a"]):
                with pytest.raises(TinyMQError, match=f"dead jobs on {url}") as raised:
                    call(ids)
                assert isinstance(raised.value.__cause__, redis.ConnectionError)
            with pytest.raises(TypeError):  # bad ids are still refused as such, before any call
                call("a")
    finally:
        q.stop(timeout=5)
