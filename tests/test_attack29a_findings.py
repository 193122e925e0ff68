"""Findings of attack29a (an outside attack on periodic jobs, rate limits, per-type stats and
the Prometheus exporter).

1. A scrape of a ``PrometheusCollector`` raised as soon as one of its queues could not be read
   (its Redis unreachable): prometheus_client then fails the whole exposition, so the other
   queues of the collector, and every other collector of the registry (the process's own
   metrics), were lost with it, just while Redis was down. Such a queue's shared figures are
   now left out of that scrape (logged as a WARNING, its tinymq_broker_up 0: fix36q), and the
   rest is scraped as usual.
2. Over Redis, a tick of an ``every`` schedule lying more than 3 hours ahead of the server's
   clock (the grid is on the server's clock: the server's clock was set back, a wrong clock
   corrected or a failover to a host whose clock differs) was claimed once by each process:
   the rule that makes a claim that far ahead count as none (meant for a host's wrong clock
   claiming ``cron`` ticks) took the claim of that very tick on that very grid as none too, so
   every process fired it (each tick's job ran once per process). A claim made on the
   caller's own grid is now a claim, however far ahead.
3. Over Redis, an ``every`` schedule without ``first_at`` whose grid in Redis lies more than 3
   hours ahead of the server's clock (set before the server's clock was set back) was joined as
   it was by every process that began it: its first tick was the grid's anchor, hours away, so
   once the processes had restarted the schedule fired nothing for that long, silently. Such a
   grid can only come from a clock set back (one without ``first_at`` begins an interval from
   the server's now), and a new one is set.
4. Over Redis, while the server was unreachable, the timer logged an ERROR with a traceback
   at every tick of every schedule, and at every try of each schedule that could not begin,
   where the workers log the outage as a rate-limited WARNING. The ticks are still skipped
   and counted; the outage is now logged as the workers log it.
5. Over Redis, an ``every`` schedule that could not begin (Redis unreachable when the
   dispatcher started, or when it was registered) made the timer thread spin: its wait was
   computed from the schedule's provisional first tick, past after one interval, so it
   waited 0 s again and again until Redis answered. A schedule that has not begun now wakes
   the timer only when it is to try again.
6. Over Redis, a tick's claim (and a schedule's begin) was sent again after each socket timeout
   of a frozen server, as no other waiting call is (enqueue and cancel wait for one reply, then
   raise): ``stop()`` without a timeout, which waits for the tick under way, took three socket
   timeouts instead of one and the few seconds of its own wait.
"""
import socket
import time

import pytest

from tinymq import Config, Job, Queue

from _helpers import WAIT, Recorder, wait_until

HOUR_US = 3600 * 1_000_000
SET_BACK_US = 4 * HOUR_US  # how far the server's clock was set back: past the 3 hours rule
OUTAGE_WATCH = 2.5  # seconds of outage watched: a schedule that cannot begin tries twice meanwhile
SPIN_WATCH = 1.5  # seconds the timer is watched while its schedule cannot begin
MOST_WAITS = 20  # timer waits in SPIN_WATCH: its retries to begin, and room for spurious wake-ups
STOP_BOUND = 20.0  # seconds: one socket timeout and stop()'s own few seconds, not three socket timeouts
TICKS_WATCHED = 20  # ticks skipped in the outage before the log is looked at


def closed_port():
    """A loopback port that nothing listens on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_queue_whose_redis_is_unreachable_is_left_out_of_the_scrape_not_the_rest(warnings_seen):
    pytest.importorskip("prometheus_client")
    pytest.importorskip("redis")
    from prometheus_client import CollectorRegistry, Gauge, generate_latest

    from tinymq.metrics import PrometheusCollector
    from tinymq.redis import RedisBroker

    unreachable = Queue(config=Config(buffer_size=10),
                        broker=RedisBroker(f"redis://127.0.0.1:{closed_port()}/0", name="gone"))
    local = Queue(10)
    local.enqueue(Job("t"))
    registry = CollectorRegistry()
    registry.register(PrometheusCollector({"gone": unreachable, "local": local}))
    Gauge("app_up", "Another collector of the same registry.", registry=registry).set(1)
    try:
        text = generate_latest(registry).decode("utf-8")
    finally:
        unreachable.stop()
        local.stop()
    assert 'tinymq_queue_events_total{event="enqueued",queue="local"} 1.0' in text
    assert 'tinymq_queue_size{priority="medium",queue="local"} 1.0' in text
    # (its shared figures left out, and said so; it has no executor here, whose own figures would be in)
    assert [line for line in text.splitlines() if 'queue="gone"' in line] == ['tinymq_broker_up{queue="gone"} 0.0']
    assert "app_up 1.0" in text
    assert any("'gone'" in message and "left out" in message for message in warnings_seen.snapshot())


def test_an_every_tick_far_ahead_of_the_redis_clock_is_claimed_once(redis_url):
    import redis

    from tinymq.redis._scripts import Scripts

    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        scripts = Scripts(client, "a29")
        seconds, micro = client.time()
        # The grid was set while the server's clock read SET_BACK_US later than it reads now.
        anchor, interval = seconds * 1_000_000 + micro + SET_BACK_US, 1_000_000
        grid = (anchor, interval, "")
        row = ("e@0", "t", 1, 0, "body")
        assert scripts.schedule_tick("e", anchor, "p1", 10, 0, row, grid=grid) == ("fire", [])
        assert scripts.schedule_tick("e", anchor, "p2", 10, 0, row, grid=grid) == ("taken", [])
        assert scripts.schedule_tick("e", anchor, "p3", 10, 0, row, grid=grid) == ("taken", [])
        client.delete(scripts.key("job:e@0"))  # (its job ended: no pile-up rule holds the next tick back)
        following = ("e@1", "t", 1, 0, "body")
        assert scripts.schedule_tick("e", anchor + interval, "p2", 10, 0, following, grid=grid) == ("fire", [])
        assert scripts.schedule_tick("e", anchor + interval, "p1", 10, 0, following, grid=grid) == ("taken", [])
        assert client.hmget(scripts.key("schedule:e"), "fired", "skipped") == ["2", None]
        assert client.hget(scripts.key("stats"), "enqueued") == "2"
        # Another grid's tick is not held back by those claims (they are no claims of its own).
        client.delete(scripts.key("job:e@1"))
        other = (anchor - SET_BACK_US - HOUR_US, 2 * interval, "")
        assert scripts.schedule_tick("e", other[0], "p4", 10, 0, ("e@x", "t", 1, 0, "b"), grid=other)[0] == "fire"
    finally:
        client.close()


def test_an_every_grid_left_far_ahead_by_a_server_clock_set_back_is_set_anew(redis_backend, redis_client):
    seconds, micro = redis_client.time()
    hours_ahead = seconds * 1_000_000 + micro + SET_BACK_US
    # What a process that began every(0.2) left while the server's clock read SET_BACK_US later.
    redis_client.hset(f"tmq:{{{redis_backend.queue_name}}}:schedule:e",
                      mapping={"anchor": hours_ahead, "interval": 200_000, "definition": ""})
    q = redis_backend.queue()
    runs = Recorder()
    q.register_executor("t", runs.add)
    q.every(0.2, "t", name="e")
    q.start_dispatcher()
    assert runs.wait_for(1, WAIT), "the schedule waited for the grid hours ahead"


def test_a_redis_outage_is_logged_once_not_at_every_tick(own_redis_server, warnings_seen):
    from tinymq.redis import RedisBroker

    q = Queue(broker=RedisBroker(own_redis_server.url, name="outage"))
    try:
        runs = Recorder()
        q.register_executor("t", runs.add)
        q.every(0.05, "t", name="e")
        q.every(0.05, "t", name="late")
        q.start_dispatcher()
        assert runs.wait_for(1, WAIT)
        q.unschedule("late")
        own_redis_server.kill()
        q.every(0.05, "t", name="late")  # it cannot begin while the server is gone: it tries again and again
        gone = time.monotonic()
        skipped = q.schedules()[0].skipped
        assert wait_until(lambda: q.schedules()[0].skipped >= skipped + TICKS_WATCHED)
        time.sleep(max(0.0, gone + OUTAGE_WATCH - time.monotonic()))  # (what is measured: nothing more is logged)
        seen = warnings_seen.snapshot()
        about_schedules = [message for message in seen if "schedule" in message]
        assert len(about_schedules) <= 2, about_schedules
        assert any("Redis queue 'outage'" in message for message in seen)  # (the outage is logged)
    finally:
        q.stop(timeout=1)


def test_a_schedule_that_cannot_begin_does_not_spin_the_timer():
    pytest.importorskip("redis")
    from tinymq.redis import RedisBroker

    q = Queue(broker=RedisBroker(f"redis://127.0.0.1:{closed_port()}/0", name="gone"))
    try:
        q.register_executor("t", lambda job: None)
        q.every(0.05, "t", name="e")
        waits = Recorder()
        changed = q._periodic._changed
        wait = changed.wait

        def counted(timeout=None):
            waits.add(timeout)
            return wait(timeout)

        changed.wait = counted
        q.start_dispatcher()
        time.sleep(SPIN_WATCH)  # (what is measured: how often the timer wakes meanwhile)
        assert len(waits) < MOST_WAITS, f"the timer waited {len(waits)} times in {SPIN_WATCH} s"
    finally:
        q.stop(timeout=1)


def test_stop_waits_for_a_tick_claim_to_a_frozen_redis_one_socket_timeout_at_most(own_redis_server):
    import threading

    from tinymq.redis import RedisBroker

    q = Queue(broker=RedisBroker(own_redis_server.url, name="frozen"))
    runs = Recorder()
    q.register_executor("t", runs.add)
    q.every(0.05, "t", name="e")
    scripts = q._link.scripts
    claim = scripts.schedule_tick
    claiming = threading.Event()

    def watched(*args, **options):
        claiming.set()
        return claim(*args, **options)

    scripts.schedule_tick = watched
    q.start_dispatcher()
    assert runs.wait_for(1, WAIT)
    with own_redis_server.frozen():
        claiming.clear()
        assert claiming.wait(WAIT)  # a claim is under way, unanswered
        began = time.monotonic()
        q.stop()
        took = time.monotonic() - began
    assert took < STOP_BOUND, f"stop() took {took:.1f} s"
