"""Defects of the Redis broker seen in session 25 and left unfixed then (seen26); each with its test.

docs/redis.md is the reference: "Delivery guarantee" (a Redis that keeps its connections open
but does not answer), the ExecutorStats paragraph of "What holds across processes", and the
worker threads that fail on something other than Redis.
"""
import contextlib
import logging
import socket
import threading
import time

import pytest

from tinymq import ExecutorConfig, Job, PermanentFailure, Queue

from _backends import Redis
from _helpers import WAIT, Recorder, record_failures, wait_until

LEASE = 40.0  # a heartbeat (every lease / 4) that tells the worker of no mark during a test


class _WarningsSeen(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = Recorder()

    def emit(self, record):
        self.messages.add(record.getMessage())


@pytest.fixture
def warnings_seen():
    handler = _WarningsSeen()
    logger = logging.getLogger("tinymq")
    logger.addHandler(handler)
    yield handler.messages
    logger.removeHandler(handler)


@contextlib.contextmanager
def silent_server():
    """The URL of a server that takes connections (the kernel does) and never answers."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        yield f"redis://127.0.0.1:{silent.getsockname()[1]}/0"


# --- 2. the reply of stop()'s release lost, and the call resent --------------------------------

# release.lua ran a resent call again: it found every op stale and the process gone, and
# replied that no op was overruled, so the process did not move its per-type counts (a success
# of an attempt that another process had cancelled stayed a success here, while the shared
# counters said cancelled). A resent release now gets the first call's reply.
def test_a_resent_release_moves_the_per_type_counts_as_its_lost_first_reply_would(redis_url, monkeypatch):
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
        stats = worker.get_stats()
        assert (stats.jobs_succeeded, stats.jobs_cancelled) == (0, 1)  # (shared: Redis ended it cancelled)
        per_type = stats.executor_stats["t"]
        assert (per_type.succeeded, per_type.cancelled) == (0, 1)  # this process counts it so too
    finally:
        made.close()
