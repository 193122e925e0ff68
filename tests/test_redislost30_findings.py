"""Defects taken up by redislost30 (session 30: the Redis broker), each with its test."""
import threading
import time

import pytest

import tinymq

from _helpers import WAIT, timed_stop
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
        took = timed_stop(q, "pump")
        assert proxy.stalled_closed.wait(1.0), "the held BLPOP's connection was left open"
        assert took < 4.0, f"stop() took {took:.1f} s"
        assert not [name for name in _left(before) if name.startswith("tinymq")]
        assert "waiting for jobs failed" not in caplog.text
    finally:
        proxy.thaw()
        q.stop(wait=False)
        q.broker.close()
        proxy.close()


# --- 3. A connect that drop_opening() could not reach, run on past stop() and close() ---------

# Connections.drop_opening() (stop() and the broker's close()) closes the sockets of the connects a
# caller gave up on, again and again until its wait ends: redis-py sets a connection's socket only
# once its TCP connect has ended (up to the connect timeout), so a close before then finds none.
# A connect whose TCP connect ended after the drop's last close, or whose caller gave up only after
# the drop had looked (and found nothing to drop), then sent its handshake and waited for the reply
# up to the socket timeout, after stop() or close() had returned. Now a connect checks, once its
# socket is set, that it was not dropped (every drop closes that socket after marking it), and a
# caller that gives up after a drop began drops its connect itself: no handshake after a drop.

SOCKET_TIMEOUT = 10.0  # the handshake's wait for a silent server, without the fix


def _silent_server():
    """A listening socket that never accepts: the kernel completes TCP connects, nobody answers."""
    import socket

    return socket.create_server(("127.0.0.1", 0))


def _slow_connection_class(tcp_starts, tcp_may_go):
    import redis

    class SlowTCP(redis.Connection):
        """A connection whose TCP connect waits for ``tcp_may_go``: a server slow to accept."""

        def _connect(self):
            tcp_starts.set()
            tcp_may_go.wait()
            return super()._connect()

    return SlowTCP


def _connections(port, tcp_starts, tcp_may_go):
    from tinymq.redis._scripts import Connections

    connection_class = _slow_connection_class(tcp_starts, tcp_may_go)
    return Connections(lambda: connection_class(host="127.0.0.1", port=port, socket_timeout=SOCKET_TIMEOUT,
                                                socket_connect_timeout=2.0, decode_responses=True), 1, 1.0)


def _connect_threads():
    return [thread for thread in threading.enumerate() if thread.name == "tinymq-redis-connect"]


@pytest.mark.parametrize("given_up", ["before the drop", "after the drop began"])
def test_a_connect_whose_socket_a_drop_could_not_reach_sends_no_handshake(given_up):
    server = _silent_server()
    tcp_starts, tcp_may_go, abandoned = threading.Event(), threading.Event(), threading.Event()
    connections = _connections(server.getsockname()[1], tcp_starts, tcp_may_go)
    before = set(_connect_threads())
    connection = connections.acquire()
    opened = []
    caller = threading.Thread(target=lambda: opened.append(connections.open_within(connection, 60.0, abandoned)))
    try:
        if given_up == "before the drop":
            abandoned.set()
            caller.start()
            caller.join(WAIT)
        else:
            caller.start()
        assert tcp_starts.wait(WAIT)
        connect = [thread for thread in _connect_threads() if thread not in before]
        assert len(connect) == 1
        connections.drop_opening(0.1)  # its TCP connect still waits: no socket to close yet
        abandoned.set()
        caller.join(WAIT)
        assert opened == [False]
        tcp_may_go.set()  # the TCP connect ends after the drop: its handshake would wait for a reply
        connect[0].join(SOCKET_TIMEOUT / 2)
        assert not connect[0].is_alive(), "the connect sent its handshake after the drop"
        assert connection._sock is None
    finally:
        tcp_may_go.set()
        abandoned.set()
        connections.close()
        server.close()


# --- 4. A report the nested-callback bound deferred, its reporter's lease left to run out -------

# In a process without a lease (producer-only), a call that ends jobs for it to report (an evicting
# enqueue, a cancel) registers a reporter under the broker's lease, renewed while the rows' failure
# callbacks run: reaped, the reporter would have its rows reported again by a worker process. From
# failure callbacks nested _NESTED_REPORTS deep, the report waits for the callbacks above it to
# return (the dispatcher's report_bounded), and its renewal began only with its own callbacks: a
# callback above that took longer than the lease let a worker reap the reporter and report its job
# a second time. The reporter's lease is now renewed from the reply that registered it on.

LEASE = 1.0


# Fixed (session 32): the renewer renewed the reporters held one call each, one after the other;
# the chain below holds 17, and on a loaded machine (or a link with some latency) a pass outlasted
# the lease: CI saw 15 of them reported again. One call renews them all now ("slow link": each
# call of the renewer takes an eighth of the lease).
@pytest.mark.redis
@pytest.mark.parametrize("link", ["fast link", "slow link"])
def test_a_deferred_report_keeps_its_reporters_lease_while_it_waits(redis_url, link):
    from tinymq import Config, Job
    from tinymq.redis import RedisBroker

    name = "deferredlease"
    producer = tinymq.Queue(config=Config(max_delayed_jobs=1), broker=RedisBroker(redis_url, name=name, lease=LEASE))
    worker = tinymq.Queue(broker=RedisBroker(redis_url, name=name, lease=LEASE))
    if link == "slow link":
        scripts = producer._link.scripts
        hold = scripts.hold
        scripts.hold = lambda *args, **kwargs: time.sleep(LEASE / 8) or hold(*args, **kwargs)
    reported, again = [], []
    waiting, go_on = threading.Event(), threading.Event()
    chain = 40  # deeper than the nesting bound

    @producer.on_failure
    def enqueue_another(job, reason, exc):
        reported.append(job.payload)
        if job.payload + 2 <= chain:  # evicts the one waiting (payload + 1): its report nests in this one
            producer.enqueue_delayed(Job("t", job.payload + 2), 3600)
            if job.payload + 1 not in reported and not waiting.is_set():  # its report was deferred
                waiting.set()
                go_on.wait(WAIT)  # a slow callback: its deferred report waits for it

    worker.on_failure(lambda job, reason, exc: again.append(job.payload))
    worker.register_executor("t", lambda job: None)
    worker.start_dispatcher(1)
    enqueuer = threading.Thread(target=lambda: [producer.enqueue_delayed(Job("t", n), 3600) for n in (0, 1)])
    try:
        enqueuer.start()
        assert waiting.wait(WAIT), "no report was deferred"
        deadline = time.monotonic() + 4 * LEASE  # the worker's beats reap a reporter left to expire
        while time.monotonic() < deadline and not again:
            time.sleep(0.05)
        go_on.set()
        enqueuer.join(WAIT)
        assert sorted(reported) == list(range(chain)), "a job of the chain was not reported"
        assert again == [], "a worker reported again the rows of a reporter it reaped"
    finally:
        go_on.set()
        producer.stop()
        worker.stop()
