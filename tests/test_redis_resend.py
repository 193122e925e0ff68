"""A reply lost on the wire: redis-py resends the command, and nothing happens twice.

A small TCP proxy between the broker and the real server forwards everything,
except that it can drop the connection at the moment a chosen reply comes back
(the command has run on the server, the client never hears of it): what a
network failure or a server restart can do at any moment.
"""
import socket
import threading

import pytest

from tinymq import Job, Queue
from tinymq.redis import RedisBroker

from _backends import Redis
from _helpers import WAIT, Recorder


class LossyProxy:
    """Forwards 127.0.0.1:<port> to the server; ``drop_reply(prefix)`` loses the next such reply."""

    def __init__(self, server_port):
        self.server_port = server_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._lock = threading.Lock()
        self._drop = None
        self.dropped = threading.Event()
        self._sockets = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self):
        return f"redis://127.0.0.1:{self.port}/0"

    def drop_reply(self, prefix):
        with self._lock:
            self._drop = prefix
            self.dropped.clear()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.server_port))
            self._sockets += [client, server]
            threading.Thread(target=self._pipe, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, True), daemon=True).start()

    def _pipe(self, source, target, replies):
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if replies:
                    with self._lock:
                        lose = self._drop is not None and data.startswith(self._drop)
                        if lose:
                            self._drop = None
                    if lose:  # the command ran; its reply never arrives
                        self.dropped.set()
                        break
                target.sendall(data)
        except OSError:
            pass
        for sock in (source, target):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def close(self):
        self.listener.close()
        for sock in self._sockets:
            try:
                sock.close()
            except OSError:
                pass


def assert_each_ran_once(producer, ran, payloads):
    """The queue is done: each job ran once and succeeded, and no type slot is left taken."""
    assert producer.join(WAIT)
    assert sorted(ran.snapshot()) == payloads
    stats = producer.get_stats()
    assert (stats.jobs_succeeded, stats.jobs_failed) == (len(payloads), 0)
    scripts = producer.broker._scripts
    assert scripts.client.hlen(scripts.key("running")) == 0  # no slot leaked


@pytest.fixture
def proxy(redis_server, redis_url):
    made = LossyProxy(redis_server.port)
    yield made
    made.close()


@pytest.fixture
def shared(redis_url):
    made = Redis(redis_url)
    yield made
    made.close()


def test_an_enqueue_whose_reply_is_lost_is_accepted_once(proxy, shared):
    lossy = Queue(broker=RedisBroker(proxy.url, name=shared.queue_name))
    try:
        proxy.drop_reply(b"*2\r\n$2\r\nok")
        lossy.enqueue_many([Job("t", i, id=f"j{i}") for i in range(3)])  # no DuplicateJob from the resend
        assert proxy.dropped.is_set()
        stats = shared.queue().get_stats()
        assert (stats.jobs_enqueued, stats.medium_queue_size) == (3, 3)
    finally:
        lossy.stop()


def test_a_fetch_whose_reply_is_lost_hands_out_its_jobs_once(proxy, shared):
    producer = shared.queue()
    worker = Queue(broker=RedisBroker(proxy.url, name=shared.queue_name))
    ran = Recorder()
    worker.register_executor("t", lambda job: ran.add(job.payload))
    try:
        worker.start_dispatcher(2)
        proxy.drop_reply(b"*11\r\n:1\r\n")  # the next fetch that succeeded on the server (11 fields)
        producer.enqueue_many([Job("t", i) for i in range(3)])
        assert proxy.dropped.wait(WAIT)
        assert_each_ran_once(producer, ran, [0, 1, 2])
    finally:
        worker.stop()
