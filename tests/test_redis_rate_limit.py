"""Global rate limits over the Redis broker (API.md "Rate limits", "Scale-out").

With a broker, ``ExecutorConfig(rate_limit=RateLimit(max_starts, per))`` is one
sliding window per type in Redis, shared by every process on the broker name.
An attempt takes a place in its type's window when it is handed out; its place
lasts until ``per`` seconds after its start was reported to Redis (op T), or
after its outcome or its reap, whichever Redis saw first. So the promise holds
for real starts, however long a fetched job waited in a process's buffer.

The scripts are driven through their low-level API (as in test_redis_scripts.py);
the fleet test records real start times in two worker processes.
"""
import os
import subprocess
import sys
import time

import pytest

from tinymq import ExecutorConfig, Job, Priority, RateLimit, RetryConfig
from tinymq.redis._scripts import Scripts, SettleOp

from _backends import Redis
from _helpers import QUIET, WAIT, Recorder

HERE = os.path.dirname(os.path.abspath(__file__))
LEASE_MS = 60_000
# Seconds between the moment Redis records an attempt's start (its T op, sent as the
# worker starts it) and the executor's own clock reading: a worker's wake-up on a loaded
# 2-core machine, as test_queue_rate_limit.SLACK. Not the time a job waits in a buffer.
SLACK = 0.1


@pytest.fixture
def scripts(redis_url):
    import redis

    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield Scripts(client, "rate")
    client.close()


def rows(*ids, job_type="r", priority=1):
    return [(job_id, job_type, priority, 0, f"body-{job_id}") for job_id in ids]


def taken(reply):
    return [job.id for job in reply.jobs]


def window(scripts, job_type="r"):
    return scripts.client.zrange(scripts.key(f"rate:{job_type}"), 0, -1, withscores=True)


def server_ms(scripts):
    seconds, microseconds = scripts.client.time()
    return seconds * 1000 + microseconds / 1000


# --- the scripts ------------------------------------------------------------------------------


def test_hand_outs_stop_at_max_starts_and_the_rest_wait_in_order_without_holding_up_others(scripts):
    scripts.set_limits({"r": (10, 2, 60.0)})
    scripts.enqueue("t1", 100, 0, rows("r1", "r2", "r3") + rows("f1", job_type="f") + rows("r4"))
    first = scripts.fetch("p1", "1", 10, LEASE_MS, 3, False)
    assert taken(first) == ["r1", "r2", "f1"]
    # Both places are held until their starts are known: no opening time yet.
    assert first.next_due_ms is None
    assert [score for _, score in window(scripts)] == [float("inf")] * 2
    assert scripts.client.lrange(scripts.key("parked:1:r"), 0, -1) == ["r3", "r4"]
    # The first start is reported: the window opens per after it, and the reply says when.
    before = server_ms(scripts)
    again = scripts.fetch("p1", "2", 10, LEASE_MS, 3, True, [SettleOp("T", first.jobs[0].attempt)])
    after = server_ms(scripts)
    assert taken(again) == []
    assert before + 60_000 <= again.next_due_ms <= after + 60_000
    # A success later does not move the window end (the start was earlier).
    scripts.settle("p1", [SettleOp("S", first.jobs[0].attempt)])
    assert min(score for _, score in window(scripts)) == again.next_due_ms


def test_the_window_opens_per_after_the_reported_start_and_parked_jobs_keep_their_priority_order(scripts):
    scripts.set_limits({"r": (10, 1, 0.2)})
    scripts.enqueue("t1", 100, 0, rows("a") + rows("low", priority=0) + rows("b") + rows("high", priority=2))
    first = scripts.fetch("p1", "1", 10, LEASE_MS, 3, False)
    assert taken(first) == ["high"]
    reply = scripts.fetch("p1", "2", 10, LEASE_MS, 3, True, [SettleOp("T", first.jobs[0].attempt)])
    assert taken(reply) == []
    opens = reply.next_due_ms
    order = []
    for fetch_id in range(3, 6):
        time.sleep(max(0.0, (opens - server_ms(scripts)) / 1000))
        early = scripts.fetch("p1", f"{fetch_id}a", 10, LEASE_MS, 3, True)
        assert taken(early) == [] or server_ms(scripts) >= opens  # never before the window opens
        reply = early if early.jobs else scripts.fetch("p1", f"{fetch_id}b", 10, LEASE_MS, 3, True)
        assert len(reply.jobs) == 1
        order += taken(reply)
        reply = scripts.fetch("p1", f"{fetch_id}c", 10, LEASE_MS, 3, True, [SettleOp("T", reply.jobs[0].attempt)])
        opens = reply.next_due_ms
    assert order == ["a", "b", "low"]


def test_a_resent_fetch_counts_its_hand_outs_once(scripts):
    scripts.set_limits({"r": (10, 2, 60.0)})
    scripts.enqueue("t1", 100, 0, rows("a", "b", "c"))
    first = scripts.fetch("p1", "1", 1, LEASE_MS, 3, False)
    resent = scripts.fetch("p1", "1", 1, LEASE_MS, 3, False)
    assert taken(first) == taken(resent) == ["a"]
    assert len(window(scripts)) == 1
    assert taken(scripts.fetch("p1", "2", 5, LEASE_MS, 3, True)) == ["b"]
    # A resent T (its reply was lost) changes nothing either.
    ops = [SettleOp("T", first.jobs[0].attempt)]
    scripts.settle("p1", ops)
    ends = window(scripts)
    assert scripts.settle("p1", ops) == 0
    assert window(scripts) == ends


def test_a_reaped_attempt_still_counts_as_a_start(scripts):
    scripts.set_limits({"r": (10, 1, 60.0)})
    scripts.enqueue("t1", 100, 0, rows("a", "b"))
    assert taken(scripts.fetch("p1", "1", 5, LEASE_MS, 3, False)) == ["a"]
    scripts.client.zadd(scripts.key("procs"), {"p1": 0})  # p1 died without a word
    reaped_at = server_ms(scripts)
    reply = scripts.fetch("p2", "1", 5, LEASE_MS, 3, False)
    assert taken(reply) == []  # "a" is back at the head, but p1 may have started it
    assert reply.next_due_ms >= reaped_at + 60_000
    assert scripts.client.lrange(scripts.key("parked:1:r"), 0, -1) == ["a", "b"]


def test_changed_limits_apply_at_once_and_the_last_one_set_wins(scripts):
    scripts.set_limits({"r": (10, 1, 60.0)})
    scripts.enqueue("t1", 100, 0, rows("a", "b", "c", "d"))
    assert taken(scripts.fetch("p1", "1", 5, LEASE_MS, 3, False)) == ["a"]
    assert scripts.set_limits({"r": (10, 2, 60.0)}) == 1  # one more place: one job let out
    assert taken(scripts.fetch("p1", "2", 5, LEASE_MS, 3, True)) == ["b"]
    assert scripts.set_limits({"r": 10}) == 2  # no rate limit any more: all let out
    assert scripts.client.exists(scripts.key("rate:r"), scripts.key("ratelimits")) == 0
    assert taken(scripts.fetch("p1", "3", 5, LEASE_MS, 3, True)) == ["c", "d"]


# --- through the Queue ------------------------------------------------------------------------


def assert_windows_hold(starts, limits, slack=SLACK):
    """No window of ``per - slack`` seconds holds more than ``max_starts`` starts of one type."""
    by_type = {}
    for job_type, when in starts:
        by_type.setdefault(job_type, []).append(when)
    for job_type, rate_limit in limits.items():
        times = sorted(by_type.get(job_type, []))
        m = rate_limit.max_starts
        for i in range(len(times) - m):
            gap = times[i + m] - times[i]
            assert gap >= rate_limit.per - slack, (
                f"{job_type}: {m + 1} starts within {gap:.4f}s, limit {m} per {rate_limit.per}s")


@pytest.fixture
def shared(redis_url):
    made = Redis(redis_url, lease=2.0)
    yield made
    made.close()


def test_two_worker_processes_share_one_window_per_type_retries_included(shared, redis_url):
    import redis

    sys.path.insert(0, HERE)
    from _redis_rate_worker import OUT, RATE_LIMITS

    children = [subprocess.Popen([sys.executable, os.path.join(HERE, "_redis_rate_worker.py"), redis_url,
                                  shared.queue_name], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                for _ in range(2)]
    try:
        for child in children:
            assert child.stdout.readline().strip() == "ready"
        producer = shared.queue()
        retry = RetryConfig(max_retries=2, initial_delay=0.0)
        jobs = ([Job("api", i, retry_config=retry) for i in range(12)]
                + [Job("mail", "flaky" if i % 2 else i, retry_config=retry) for i in range(8)]
                + [Job("free", i, priority=Priority.LOW) for i in range(20)])
        producer.enqueue_many(jobs)
        assert producer.join(WAIT * 3)
        assert producer.get_stats().jobs_succeeded == 40
    finally:
        for child in children:
            child.stdin.close()
        for child in children:
            assert child.wait(WAIT) == 0
    lines = [line.decode().split() for line in redis.Redis.from_url(redis_url).lrange(OUT, 0, -1)]
    starts = [(job_type, float(when)) for _, job_type, _, _, when in lines]
    assert sum(1 for job_type, _ in starts if job_type == "mail") == 12  # 4 of them retried once
    # The limit is global: both processes started "api" jobs (one holds at most 4 at a time, each
    # runs past its window), and together they kept every type's window.
    assert len({pid for pid, started_type, *_ in lines if started_type == "api"}) == 2
    assert_windows_hold(starts, {job_type: limit for job_type, (_, limit) in RATE_LIMITS.items() if limit})


def test_a_window_opening_wakes_an_idle_worker_at_once_and_nothing_polls_meanwhile(shared):
    producer = shared.queue()
    worker = shared.queue()
    recorder = Recorder()
    limit = RateLimit(1, per=0.4)
    worker.register_executor("r", lambda job: recorder.add(time.monotonic()),
                             ExecutorConfig(rate_limit=limit))
    worker.start_dispatcher(2)
    server = producer.broker.client
    producer.enqueue_many([Job("r", i) for i in range(4)])
    assert producer.join(WAIT)
    gaps = [b - a for a, b in zip(recorder.items, recorder.items[1:])]
    assert all(gap >= limit.per - SLACK for gap in gaps), gaps
    # Each next start follows its window's opening closely: the due-time timer fetches then
    # (an idle pump only looks again every second on its own).
    assert sorted(gaps)[len(gaps) // 2] < limit.per + 0.3, gaps
    # Only rate-waiting jobs: an idle worker makes no script calls but its timer's and its
    # idle pump's (one a second).
    worker.register_executor("slow", lambda job: None, ExecutorConfig(rate_limit=RateLimit(1, per=60.0)))
    producer.enqueue_many([Job("slow", i) for i in range(3)])
    assert recorder.wait_until(lambda items: True)
    time.sleep(QUIET)
    server.config_resetstat()
    time.sleep(1.0)
    calls = server.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0)
    assert calls <= 6, calls
    assert producer.get_stats().medium_queue_size == 2  # waiting for the window, in Redis
