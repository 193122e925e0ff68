"""Defects seen in session 24 and left unfixed then (seen25); each with its test."""
import asyncio
import contextlib
import logging
import threading
import time

import pytest

from tinymq import Job

from _helpers import STORES, WAIT, queue_with_store


# --- stop(timeout=...) and a coroutine that swallows its cancellation ---------------------------

# Fixed: stop(timeout=0.2) took about 3.2 s when a coroutine swallowed the CancelledError of its
# stop: after the timeout, stop() gave the cancelled coroutines _UNWIND_WAIT (1 s) to unwind,
# then waited up to twice that again for the loop's thread, which that coroutine kept. Now one
# moment to unwind, that ends a little after stop()'s timeout at most, covers both waits.


@contextlib.contextmanager
def _queue_on(backend, request, tmp_path):
    """A Queue in memory, with a SQLite store (``q.store``), or over the test's Redis server."""
    if backend != "redis":
        with queue_with_store(backend, tmp_path) as q:
            yield q
        return
    q = request.getfixturevalue("redis_backend").queue()
    q.store = None
    yield q


@pytest.mark.parametrize("backend", STORES + [pytest.param("redis", marks=pytest.mark.redis)])
def test_stop_returns_near_its_timeout_when_a_coroutine_swallows_its_cancellation(
        backend, request, tmp_path, caplog):
    started, gate, returned = threading.Event(), threading.Event(), threading.Event()

    async def stubborn(job):
        started.set()
        while not gate.is_set():
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                pass  # swallowed: it keeps its slot until it returns
        returned.set()

    try:
        with _queue_on(backend, request, tmp_path) as q:
            q.register_executor("stubborn", stubborn)
            q.start_dispatcher()
            job = q.enqueue(Job("stubborn"))
            assert started.wait(WAIT)
            with caplog.at_level(logging.WARNING, logger="tinymq"):
                began = time.monotonic()
                q.stop(wait=True, timeout=0.2)
                took = time.monotonic() - began
            assert took < 1.5, f"stop(timeout=0.2) took {took:.2f}s"
            assert q.get_stats().executor_stats["stubborn"].active_jobs == 1  # its slot is kept
            assert not returned.is_set()
            assert any("ignore their cancellation" in r.getMessage() and r.levelno == logging.WARNING
                       for r in caplog.records), [r.getMessage() for r in caplog.records]
            if q.store is not None:  # saved back as ready for the next start, as any stop-cancelled attempt
                assert [stored.id for stored in q.store.load_all()] == [job.id]
    finally:
        gate.set()
    assert returned.wait(WAIT)
