"""Defects taken up by redisstop31 (session 31: the Redis broker), each with its test."""
import contextlib
import threading
import time

import pytest

import tinymq
from tinymq import Job, TinyMQError

from _helpers import WAIT, timed_stop, wait_until
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
    threshold = admin.config_get("lua-time-limit")["lua-time-limit"]
    admin.config_set("lua-time-limit", 100)  # ms (Redis 7 calls it busy-reply-threshold too)
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
        admin.config_set("lua-time-limit", threshold)
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


# --- 1. The pump's fetch round stuck past stop() -------------------------------------------------

# A fetch round waited for its reply up to the socket timeout (10 s), holding the lock stop()'s
# release waits for: against a server that holds the reply (frozen, or a network that stalls), stop()
# waited for the pump in vain (about 2 s), then for that lock (2 s more), and returned with the pump
# still in its call and nothing given back. A round now gives up as soon as stop() begins (as the idle
# wait and the heartbeat's beat do), its connection closed; the release sends its ops and gives back
# what it leased (a fetch given up may have run in Redis), or, when Redis does not answer that either,
# the lease does once it runs out: no job is lost.

FETCH_LEASE = 1.0


@pytest.mark.redis
@pytest.mark.parametrize("held", ["the fetch's reply", "everything"])
def test_a_fetch_whose_reply_is_held_ends_before_stop_returns_and_its_job_runs_elsewhere(
        redis_server, redis_url, redis_client, held, caplog):
    from tinymq.redis import RedisBroker

    name = "fetchheld"
    probe = RedisBroker(redis_url, name=name)
    fetch = probe._scripts._script["fetch"]
    redis_client.script_load(fetch.script)  # (else the fetch's NOSCRIPT reply is what the proxy holds)
    sha = fetch.sha.encode()
    probe.close()
    proxy = StallingProxy(redis_server.port, marker=sha)
    producer = tinymq.Queue(broker=RedisBroker(redis_url, name=name, lease=FETCH_LEASE))
    before = set(threading.enumerate())
    q = tinymq.Queue(broker=RedisBroker(proxy.url, name=name, lease=FETCH_LEASE))
    other = tinymq.Queue(broker=RedisBroker(redis_url, name=name, lease=FETCH_LEASE))
    ran = []
    try:
        q.register_executor("t", lambda job: ran.append(("q", job.id)))
        other.register_executor("t", lambda job: ran.append(("other", job.id)))
        producer.enqueue(Job("t", id="fetched"))
        proxy.stall()
        q.start_dispatcher(1)  # its first fetch leases the job in Redis; its reply is held
        assert proxy.stalled.wait(WAIT), "the pump sent no fetch"
        fetched = "tmq:{%s}:fetched" % name

        def ready():
            return sum(redis_client.llen("tmq:{%s}:ready:%d" % (name, level)) for level in range(3))

        assert wait_until(lambda: redis_client.hlen(fetched) == 1 and ready() == 0), "the held fetch did not run"
        if held == "everything":
            proxy.freeze()  # (the release too: the job comes back when the lease runs out)
        took = timed_stop(q, "pump")
        assert took < 4.5, f"stop() took {took:.1f} s"  # (about 2 s: its give-back's wait, docs/redis.md)
        # (the pump has ended, timed_stop checked; and stop() returns once the queue's threads have left)
        assert not [thread for thread in _left(before) if thread.startswith("tinymq")], _left(before)
        assert "fetch failed" not in caplog.text
        if held == "the fetch's reply":
            assert proxy.stalled_closed.wait(1.0), "the held fetch's connection was left open"
            assert ready() == 1, "the release did not give back the job the held fetch leased"
        proxy.thaw()
        other.start_dispatcher(1)
        assert producer.join(WAIT + 4 * FETCH_LEASE)
        assert ran == [("other", "fetched")]
    finally:
        proxy.thaw()
        q.stop(wait=False)
        q.broker.close()
        other.stop()
        producer.stop()
        proxy.close()


# --- 2. A connect still opening its TCP connection, waited for by stop() and close() -------------

# A call with a time limit opens a fresh connection on a thread of its own; one given up on is dropped
# by stop() and the broker's close() (Connections.drop_opening): its socket closed, its thread waited
# for. One still opening its TCP connection (a host that drops the connection: a firewall) has no
# socket to close yet, and drop_opening waited for it for its whole wait (stop(): 0.5 s, close(): 1 s)
# and returned with it still running, up to the connect timeout (2 s). It is no longer waited for:
# once its TCP connect ends it sends nothing (session 30 made sure of that) and goes back closed.

def _gated_connection_class(tcp_starts, tcp_may_go, sent):
    import redis

    class GatedTCP(redis.Connection):
        """A connection whose TCP connect waits for ``tcp_may_go`` (a host slow to answer the
        connection), and that records what it sends."""

        def _connect(self):
            tcp_starts.set()
            tcp_may_go.wait()
            return super()._connect()

        def send_packed_command(self, command, check_health=True):
            sent.append(command)
            return super().send_packed_command(command, check_health)

    return GatedTCP


@pytest.mark.redis
def test_a_connect_still_opening_its_tcp_connection_is_not_waited_for_and_sends_nothing(redis_server):
    from tinymq.redis._scripts import Connections

    tcp_starts, tcp_may_go, abandoned = threading.Event(), threading.Event(), threading.Event()
    sent = []
    connection_class = _gated_connection_class(tcp_starts, tcp_may_go, sent)
    connections = Connections(lambda: connection_class(host="127.0.0.1", port=redis_server.port, socket_timeout=10.0,
                                                       socket_connect_timeout=2.0, decode_responses=True), 1, 1.0)
    before = set(threading.enumerate())
    connection = connections.acquire()
    try:
        abandoned.set()  # (its caller gives up at once: a stop() began)
        assert connections.open_within(connection, WAIT, abandoned) is False
        assert tcp_starts.wait(WAIT)
        connect = [thread for thread in threading.enumerate()
                   if thread not in before and thread.name == "tinymq-redis-connect"]
        assert len(connect) == 1
        began = time.monotonic()
        connections.drop_opening(WAIT)
        took = time.monotonic() - began
        assert took < WAIT / 2, f"drop_opening() waited {took:.1f} s for a TCP connect it cannot end"
        tcp_may_go.set()  # its TCP connect ends now, after the drop
        connect[0].join(WAIT)
        assert not connect[0].is_alive()
        assert sent == [], "the dropped connect sent its handshake"
        assert connections.acquire(WAIT) is connection and connection._sock is None, "not given back closed"
    finally:
        tcp_may_go.set()
        connections.close()
