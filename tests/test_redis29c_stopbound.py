"""After q.stop() (and the broker's close()) nothing of a Redis queue runs on or touches Redis (session
29, stopbound): a connect a bounded call gave up on, and the heartbeat's beat against a frozen server.
"""
import threading
import time

import pytest

import tinymq

from _helpers import timed_stop
from test_redis29b_findings import PROXY_THREAD, StallingProxy


def _left(before):
    return [thread.name for thread in threading.enumerate()
            if thread not in before and thread.is_alive() and thread.name != PROXY_THREAD]


# --- 1. A connect given up on, left to run past close() --------------------------------------

# A call with a time limit opens a fresh connection on a thread of its own ("tinymq-redis-connect"):
# redis-py's connect waits for the handshake's replies up to the socket timeout (10 s). Against a
# silent server the call gave up at its bound, and the thread ran on past stop() and the broker's
# close(), then gave an open connection back to the pool close() had emptied. Now close() (and stop())
# abandons it: its socket closed, its thread ended, the connection back in the pool closed.

@pytest.mark.redis
def test_a_connect_a_call_gave_up_on_ends_with_close(redis_server):
    from tinymq.redis import RedisBroker

    proxy = StallingProxy(redis_server.port)
    broker = RedisBroker(proxy.url, name="connectleft")
    before = set(threading.enumerate())
    try:
        connections = broker._scripts.connections
        connections.close()  # (every connection is a fresh one at its next use)
        proxy.freeze()
        began = time.monotonic()
        with pytest.raises(Exception, match="new connection"):
            broker._scripts.command("PING", timeout=0.3)
        assert time.monotonic() - began < 5.0
        assert "tinymq-redis-connect" in _left(before)
        broker.close()
        assert "tinymq-redis-connect" not in _left(before), "the connect runs on after close()"
        free = list(connections._free.queue)
        assert len(free) == len(set(map(id, free))) and all(c._sock is None for c in free), "an open connection left"
    finally:
        proxy.thaw()
        broker.close()
        proxy.close()


@pytest.mark.redis
def test_a_connect_given_up_on_ends_before_stop_returns(redis_server):
    from tinymq.redis import RedisBroker

    proxy = StallingProxy(redis_server.port)
    q = tinymq.Queue(broker=RedisBroker(proxy.url, name="connectstop"))
    before = set(threading.enumerate())
    try:
        q.broker._scripts.connections.close()
        proxy.freeze()
        with pytest.raises(Exception):
            q.broker._scripts.command("PING", timeout=0.3)
        q.stop(timeout=1.0)
        assert "tinymq-redis-connect" not in _left(before), "the connect runs on after stop()"
    finally:
        proxy.thaw()
        q.stop(wait=False)
        q.broker.close()
        proxy.close()


# --- 2. The heartbeat's beat stuck past stop() -------------------------------------------------

# The heartbeat's beat waited for its reply up to the socket timeout (10 s), sent again twice: against
# a frozen server it ran on past stop()'s bound for its threads (about 2 s), holding the lock stop()'s
# give-back waits for. It now gives up as soon as stop() begins (as a look at the settings does), its
# connection closed, and its thread has ended when stop() returns.

BEAT_LEASE = 4.0  # a beat every second


@pytest.mark.redis
def test_a_beat_stuck_in_its_call_ends_before_stop_returns(redis_server, caplog):
    from tinymq.redis import RedisBroker

    broker = RedisBroker(f"redis://127.0.0.1:{redis_server.port}/0", name="beatstuck", lease=BEAT_LEASE)
    proxy = StallingProxy(redis_server.port, marker=broker._scripts._script["beat"].sha.encode())
    broker.close()
    before = set(threading.enumerate())
    q = tinymq.Queue(broker=RedisBroker(proxy.url, name="beatstuck", lease=BEAT_LEASE))
    try:
        q.register_executor("t", lambda job: None)
        q.start_dispatcher(1)
        proxy.stall()
        assert proxy.stalled.wait(BEAT_LEASE * 2), "no beat was sent"
        took = timed_stop(q, "heartbeat")
        assert proxy.stalled_closed.wait(1.0), "the stuck beat's connection was left open"
        assert took < 3.0, f"stop() took {took:.1f} s"
        assert not [name for name in _left(before) if name.startswith("tinymq")]
        assert "heartbeat failed" not in caplog.text
    finally:
        proxy.thaw()
        q.stop(wait=False)
        q.broker.close()
        proxy.close()
