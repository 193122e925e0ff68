"""every(first_at=...) over a RedisBroker: the shared grid's first tick is at first_at.

first_at is turned into a delay when ``every`` is called (docs/api.md), not when the
dispatcher starts: a schedule registered at import and started later (the worker CLI's
way) must not begin its grid late by the time between the two calls.
"""
import threading
import time

import pytest

from _helpers import WAIT

GAP = 0.5  # seconds between registering a schedule and starting the queue


def _grid_anchor(redis_server, name):
    """The server time (epoch seconds) of tick 0 of schedule ``name``'s grid, once a process began it."""
    deadline = time.monotonic() + WAIT
    with redis_server.client() as client:
        while True:
            keys = client.keys(f"*schedule:{name}")
            anchor = client.hget(keys[0], "anchor") if keys else None
            if anchor is not None:
                return int(anchor) / 1_000_000
            assert time.monotonic() < deadline, "the schedule never began in Redis"
            time.sleep(0.01)


def _wait(seconds):
    """Let ``seconds`` pass (the time between importing a module and starting its worker)."""
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        time.sleep(seconds / 10)


def test_an_every_schedule_over_redis_registered_before_the_start_begins_its_grid_at_first_at(
        redis_backend, redis_server):
    q = redis_backend.queue()
    first_at = float(int(time.time()) + 60)
    q.every(3600.0, "report", first_at=first_at)
    _wait(GAP)
    q.start_dispatcher(1)
    assert _grid_anchor(redis_server, "report") == pytest.approx(first_at, abs=GAP / 2)


def test_an_every_schedule_over_redis_whose_first_at_passed_before_the_start_fires_at_the_start(
        redis_backend, redis_server):
    ran = threading.Event()
    q = redis_backend.queue()
    q.register_executor("report", lambda job: ran.set())
    first_at = time.time() + 2 * GAP
    q.every(3600.0, "report", first_at=first_at)
    _wait(4 * GAP)  # first_at has passed, well before the start
    started = time.time()
    q.start_dispatcher(1)
    assert _grid_anchor(redis_server, "report") <= started + GAP / 2  # due at the start, not later
    assert ran.wait(WAIT)
