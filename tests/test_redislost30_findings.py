"""Defects taken up by redislost30 (session 30: the Redis broker), each with its test."""
import threading
import time

import pytest

import tinymq

from test_redis29b_findings import PROXY_THREAD, StallingProxy


def _left(before):
    return [thread.name for thread in threading.enumerate()
            if thread not in before and thread.is_alive() and thread.name != PROXY_THREAD]


# --- 2. The pump's idle wait stuck past stop() -------------------------------------------------

# An idle pump blocks in a BLPOP on a connection of its own, for _IDLE_WAIT, its reply waited for up
# to the socket timeout (about 11 s). stop() wakes it (an RPUSH to its wake-up list); against a server
# that holds the reply (frozen, or a network that stalls) the pump waited on past stop()'s bound for
# its threads, and ran on after stop() returned. It now gives up as soon as stop() begins (as the
# heartbeat's calls do), its connection closed.

@pytest.mark.redis
def test_an_idle_wait_whose_reply_is_held_ends_before_stop_returns(redis_server, caplog):
    from tinymq.redis import RedisBroker

    proxy = StallingProxy(redis_server.port, marker=b"\r\nBLPOP\r\n")  # (the command, not a script's text)
    before = set(threading.enumerate())
    q = tinymq.Queue(broker=RedisBroker(proxy.url, name="idleheld"))
    try:
        q.register_executor("t", lambda job: None)
        q.start_dispatcher(1)
        proxy.stall()
        assert proxy.stalled.wait(10.0), "the pump sent no BLPOP"
        pump = [thread for thread in q._link._threads if "pump" in thread.name]
        assert pump and pump[0].is_alive()
        began = time.monotonic()
        q.stop()
        took = time.monotonic() - began
        assert not pump[0].is_alive(), "the pump runs on after stop() returned"
        assert proxy.stalled_closed.wait(1.0), "the held BLPOP's connection was left open"
        assert took < 4.0, f"stop() took {took:.1f} s"
        assert not [name for name in _left(before) if name.startswith("tinymq")]
        assert "waiting for jobs failed" not in caplog.text
    finally:
        proxy.thaw()
        q.stop(wait=False)
        q.broker.close()
        proxy.close()
