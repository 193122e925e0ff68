"""Defects taken up by redisstop31 (session 31: the Redis broker), each with its test."""
import contextlib
import threading
import time

import pytest

import tinymq
from tinymq import Job, TinyMQError

from _helpers import WAIT, wait_until
from test_redis29b_findings import PROXY_THREAD, StallingProxy


def _left(before):
    return [thread.name for thread in threading.enumerate()
            if thread not in before and thread.is_alive() and thread.name != PROXY_THREAD]


# --- 3. A call Redis refused as BUSY, said to have maybe run -----------------------------------

# While a script runs past Redis's busy-reply-threshold (lua-time-limit before Redis 7: another
# program's slow script), Redis answers every other call BUSY without running it. An enqueue so
# refused raised "they may or may not have been enqueued", as for a call whose reply was lost: a
# caller would enqueue again to find out, or leave out jobs it believes in. Redis ran nothing of it:
# the error now says they were NOT enqueued (and a cancel so refused, that the job was not cancelled).

@contextlib.contextmanager
def _busy(server):
    """Redis busy in a Lua script (a busy loop, past busy-reply-threshold) for the ``with`` block,
    then SCRIPT KILLed: every other call meanwhile is answered BUSY, unrun."""
    import redis

    admin = server.client(decode_responses=True)
    threshold = admin.config_get("busy-reply-threshold")["busy-reply-threshold"]
    admin.config_set("busy-reply-threshold", 100)  # ms (Redis 7's name for lua-time-limit)
    looping = server.client(decode_responses=True)
    ended = []

    def loop():
        try:
            looping.eval("while true do end", 0)
        except redis.ResponseError as exc:
            ended.append(exc)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()

    def busy():
        try:
            admin.ping()
        except redis.ResponseError as exc:
            assert str(exc).startswith("BUSY"), exc
            return True
        return False

    try:
        assert wait_until(busy), "Redis never answered BUSY"
        yield
    finally:
        deadline = time.monotonic() + WAIT
        while thread.is_alive() and time.monotonic() < deadline:
            try:
                admin.script_kill()
            except redis.ResponseError:  # (NOTBUSY: it has not started yet, or ended)
                pass
            thread.join(0.05)
        assert not thread.is_alive(), "the busy script was not killed"
        admin.config_set("busy-reply-threshold", threshold)
        looping.close()
        admin.close()


@pytest.mark.redis
def test_calls_that_redis_refused_as_busy_say_they_did_not_run(redis_server, redis_url):
    from tinymq.redis import RedisBroker

    q = tinymq.Queue(broker=RedisBroker(redis_url, name="busyrefused"))  # (producer only: no beat meanwhile)
    try:
        q.enqueue(Job("t", id="waiting"))
        with _busy(redis_server):
            with pytest.raises(TinyMQError) as one:
                q.enqueue(Job("t", id="one"))
            with pytest.raises(TinyMQError) as many:
                q.enqueue_many([Job("t", id="two"), Job("t", id="three")])
            with pytest.raises(TinyMQError) as cancel:
                q.cancel("waiting")
        for raised, what in ((one, "1 job"), (many, "2 jobs")):
            text = str(raised.value)
            assert "busyrefused" in text and "BUSY" in text, text
            assert f"{what} not enqueued" in text and "may or may not" not in text, text
        text = str(cancel.value)
        assert "'waiting' not cancelled" in text and "may or may not" not in text, text
        # What the errors said: nothing of those calls ran.
        assert q.get_stats().jobs_enqueued == 1
        assert q.cancel("waiting") is True
        q.enqueue_many([Job("t", id="one"), Job("t", id="two"), Job("t", id="three")])  # (no DuplicateJob)
        assert q.get_stats().jobs_enqueued == 4
    finally:
        q.stop()
