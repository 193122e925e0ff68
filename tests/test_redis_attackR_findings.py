"""Defects found by attacking the Redis broker's cancel, rate limits and periodic ticks
from outside (round 6, attackR). Each test states the promise of API.md / docs/redis.md
that it checks; each was a strict xfail before its fix.
"""
import json
import threading

import pytest

from tinymq import (DuplicateJob, ExecutorConfig, Job, PermanentFailure, Priority, Queue, RetryConfig,
                    TinyMQError)
from tinymq.redis._scripts import Scripts, SettleOp

from _backends import Redis
from _helpers import WAIT, record_failures

LEASE = 2.0
LEASE_MS = int(LEASE * 1000)


@pytest.fixture
def redis(redis_url):
    made = Redis(redis_url, lease=LEASE)
    yield made
    made.close()


@pytest.fixture
def scripts(redis_url):
    import redis as redis_py

    client = redis_py.Redis.from_url(redis_url, decode_responses=True)
    yield Scripts(client, "attackR")
    client.close()



def _stop_fleet(children, killed):
    """Close the live worker children's stdin (each then stops cleanly, exit 0) and the killed one's pipes."""
    for child in children:
        child.stdin.close()
    for child in children:
        assert child.wait(WAIT) == 0
    if killed is not None:
        killed.stdin.close()
        killed.stdout.close()

def test_a_failure_its_process_decided_before_a_cancel_reached_it_is_reported_once(redis):
    """"Every job ends exactly once ... reported once" (API.md Scale-out, docs/redis.md
    Cancelling). The owner decides a failure for good, and reports it, the moment its
    executor raises; its settle reaches Redis a little later. A cancel from another
    process that lands in between returns True (the job is still leased in Redis) and
    must not make the job end (and be reported) a second time. Since a failure reaches
    Redis before its callbacks run, a cancel from a callback finds the job ended (False);
    the race itself (a cancel landing before that settle) is the model's (test_redis_model:
    a marked attempt's Z stands)."""
    producer, worker = redis.pair()
    worker_failures = record_failures(worker, key=lambda job: job.id)
    cancelled_in_between = []

    def cancel_from_elsewhere(job, reason, exc):
        if reason == "permanent_failure":
            cancelled_in_between.append(producer.cancel(job.id))

    worker.on_failure(cancel_from_elsewhere)

    def run(job):
        raise PermanentFailure("HTTP 404")

    worker.register_executor("t", run, ExecutorConfig(timeout=None))
    job = producer.enqueue(Job("t", retry_config=RetryConfig(max_retries=0)))
    worker.start_dispatcher(1)
    assert producer.join(WAIT)
    assert cancelled_in_between == [False]  # Redis counted the failure before the callback ran
    worker.stop()  # its last replies are in: every report it will make is made
    assert [(i, reason) for i, reason, _ in worker_failures.snapshot()] == [(job.id, "permanent_failure")]
    stats = producer.get_stats()
    assert (stats.jobs_failed, stats.jobs_cancelled) == (1, 0)  # counted as what was reported
    assert [dead.job.id for dead in producer.broker.dead_jobs()] == [job.id]
    assert producer.cancel(job.id) is False


@pytest.mark.parametrize("op", ["Z", "z"])
def test_a_marked_attempts_failure_for_good_ends_it_cancelled_and_drops_the_mark(scripts, op):
    """The scripts' side of the race above: a Z (or, at the deadline, z) op of an attempt
    that another process's cancel marked first is a failure its process decided before it
    heard of the mark. cancel() returned True, so the job ends as cancelled (API.md "Async
    executors and cancellation"): not dead, counted cancelled (not failed, nor timed out),
    kept for that process to report under the key of its op, and the reply names the op as
    overruled, so that the process reports (and counts) the cancel, not its failure."""
    scripts.enqueue("tok", 100, 0, [("a", "t", 1, 0, "body-a")])
    attempt = scripts.fetch("p1", "1", 1, LEASE_MS, 3, False, []).jobs[0].attempt
    assert scripts.cancel("c1", "a").status == "marked"
    failure = SettleOp(op, attempt, 1, 0.0, "retries_exhausted", "JobTimeout: late")
    reply = scripts.fetch("p1", "2", 1, LEASE_MS, 3, True, [failure])
    assert reply.crashed == [] and list(reply.cancels) == []  # reported by p1, which decided it
    assert list(reply.overruled) == [(attempt, "t")]
    resent = scripts.fetch("p1", "2", 1, LEASE_MS, 3, True, [failure])  # its reply was lost
    assert (resent.crashed, list(resent.overruled)) == ([], [(attempt, "t")])
    stats = scripts.client.hgetall(scripts.key("stats"))
    # Counted at once; unfinished until p1 says its callbacks ran (the row kept for it).
    assert (stats.get("failed"), stats.get("cancelled"), stats.get("timed_out"),
            stats.get("outstanding")) == (None, "1", None, "1")
    kept = scripts.client.hgetall(scripts.key("reporting:p1"))
    assert list(kept) == [f"a|retries_exhausted|p1|{attempt}"]  # (the key p1 made for its op)
    assert json.loads(kept[f"a|retries_exhausted|p1|{attempt}"])[4] == "cancelled"
    assert scripts.settle("p1", [SettleOp("A", field) for field in kept]) == 0
    stats = scripts.client.hgetall(scripts.key("stats"))
    assert (stats.get("failed"), stats.get("cancelled"), stats.get("outstanding")) == (None, "1", "0")
    assert scripts.client.zrange(scripts.key("dead"), 0, -1) == []
    assert scripts.client.keys(scripts.key("cancels:*")) == []
    assert scripts.client.keys(scripts.key("cancelled:*")) == []
    assert scripts.client.exists(scripts.key("job:a")) == 0
    assert scripts.cancel("c2", "a").status == "none"  # ended: nothing to cancel
    held = scripts.client.hgetall(scripts.key("inflight:p1"))
    assert held == ({attempt: "Xt"} if op == "z" else {})  # (z: it still runs, holding its slot)


def test_a_reaped_process_leaves_no_wake_list_behind(scripts):
    """A cancel of an attempt leased to a process that then died pushes onto the process's
    wake list (so that an idle owner hears of it at once). Reaping the process ends the
    attempt as cancelled and must remove everything of the process: a fleet whose worker
    processes come and go must not grow Redis by a key per dead process."""
    scripts.enqueue("tok", 100, 0, [("a", "t", 1, 0, "body-a")])
    assert [job.id for job in scripts.fetch("p1", "1", 1, LEASE_MS, 3, False, []).jobs] == ["a"]
    assert scripts.cancel("c1", "a").status == "marked"
    scripts.client.zadd(scripts.key("procs"), {"p1": 0})  # p1 stopped renewing long ago
    reaped, crashed = scripts.reap(3)
    assert reaped == 1 and [(c.id, c.reason) for c in crashed] == [("a", "cancelled")]
    assert [k for k in scripts.client.keys(scripts.key("*")) if "p1" in k] == []


@pytest.mark.parametrize("kind", ["every", "cron"])
def test_a_schedule_whose_payload_is_not_json_is_refused_at_registration_naming_it(redis, kind):
    """Bad input raises a clear exception naming the value (API.md "Clocks and validation"):
    over a broker a job's payload must be JSON (``enqueue`` raises TypeError naming it), so
    ``q.every``/``q.cron`` with such a payload must raise at once, not skip every tick."""
    q = redis.queue()
    payload = {"when": object()}
    with pytest.raises(TypeError, match="nightly") as raised:
        if kind == "every":
            q.every(60.0, "report", payload, name="nightly")
        else:
            pytest.importorskip("croniter")
            q.cron("0 3 * * *", "report", payload, name="nightly")
    assert "JSON" in str(raised.value)
    assert q.schedules() == []  # nothing registered
    q.every(60.0, "report", {"when": "03:00"}, name="nightly")  # the name is still free


@pytest.mark.parametrize("kill", [False, True])
def test_cancels_racing_a_fleet_end_every_job_once_and_report_it_once(redis, redis_url, kill):
    """API.md Scale-out and "Async executors and cancellation", attacked with many cancels at
    random moments from a producer while two worker processes run the jobs (hand-out, start,
    success, failure to be retried, failure for good, timeout), and with ``kill``, kill -9 of
    one of them amid the cancels (a third takes its place): every job ends exactly once (the
    shared counters add up), each job that did not succeed is reported exactly once across
    all processes (a report by the killed process may be repeated: at-least-once for what
    it held), a cancel that returned True is reported, its job never starts a new attempt
    afterwards, and join() returns."""
    import json
    import os
    import random
    import subprocess
    import sys
    import time

    import redis as redis_py

    from _redis_cancel_worker import REPORTS, STARTS

    here = os.path.dirname(os.path.abspath(__file__))
    def spawn():
        return subprocess.Popen([sys.executable, os.path.join(here, "_redis_cancel_worker.py"), redis_url,
                                 redis.queue_name, str(LEASE)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True)

    children = [spawn() for _ in range(2)]
    killed = None
    rng = random.Random(6)
    producer = redis.queue()
    producer_reports = record_failures(producer, key=lambda job: job.id)
    try:
        for child in children:
            assert child.stdout.readline().strip() == "ready"
        kinds = ["ok", "retry", "perm", "slow"]
        jobs = [Job("work", {"kind": rng.choice(kinds), "ms": rng.choice([0, 5, 50, 600])},
                    retry_config=RetryConfig(max_retries=1, initial_delay=rng.choice([0.0, 0.05])))
                for _ in range(90)]
        for job in jobs:
            if job.payload["kind"] == "slow":
                job.payload["ms"] = 600  # past the 0.3 s timeout
        cancels = []  # (id, returned, monotonic time it returned)
        producer.enqueue_many(jobs)
        for k, job in enumerate(rng.sample(jobs, 45)):
            time.sleep(rng.choice([0.0, 0.002, 0.01]))
            cancels.append((job.id, producer.cancel(job.id), time.time()))
            if kill and k == 15:
                killed = children.pop(0)
                killed.kill()
                assert killed.wait(WAIT) == -9
                children.append(spawn())
                assert children[-1].stdout.readline().strip() == "ready"
        assert producer.join(WAIT * 3)
    finally:
        _stop_fleet(children, killed)
    out = redis_py.Redis.from_url(redis_url)
    rows = [json.loads(r) for r in out.lrange(REPORTS, 0, -1)]
    by_killed = {i for i, _, pid in rows if killed is not None and pid == killed.pid}
    reports = [(i, reason) for i, reason, pid in rows if i not in by_killed or pid != killed.pid]
    reports += [(i, reason) for i, reason, _ in producer_reports.snapshot()]
    starts = [json.loads(s) for s in out.lrange(STARTS, 0, -1)]
    out.close()
    stats = producer.get_stats()
    assert stats.jobs_succeeded + stats.jobs_failed + stats.jobs_cancelled == len(jobs)
    reported_ids = [i for i, _ in reports]
    assert len(reported_ids) == len(set(reported_ids)), sorted(reports)  # each once
    # (A failure the killed process reported may not have reached Redis: its job ran again.)
    ended_unsuccessfully = stats.jobs_failed + stats.jobs_cancelled
    assert len(set(reported_ids)) <= ended_unsuccessfully <= len(set(reported_ids) | by_killed)
    if killed is None:
        assert len(reports) == ended_unsuccessfully
    if killed is None:
        assert sum(1 for _, reason in reports if reason == "cancelled") == stats.jobs_cancelled
    for job_id, returned, when in cancels:
        if returned:
            assert job_id in reported_ids or job_id in by_killed
            later = [s for s in starts if s[0] == job_id and s[2] > when + 0.05]
            assert len(later) <= 1, (job_id, later)  # at most the attempt it held then


def test_rate_windows_hold_through_kill_9_of_a_worker_holding_starts(redis_url):
    """API.md "Rate limits" over Redis (global, no window ever holds more than max_starts
    starts), attacked with kill -9 of one of two worker processes while it holds started
    attempts and a buffered one: its places stay taken until it is reaped (and count from
    the reap), its attempts run again elsewhere, and every window of every type still holds,
    the killed process's own starts included. join() returns; every job succeeds once."""
    import os
    import subprocess
    import sys
    import time

    import redis as redis_py

    from _redis_rate_worker import OUT, RATE_LIMITS
    from test_redis_rate_limit import assert_windows_hold

    shared = Redis(redis_url, lease=5.0)  # (the worker processes' lease)
    here = os.path.dirname(os.path.abspath(__file__))

    def spawn():
        child = subprocess.Popen([sys.executable, os.path.join(here, "_redis_rate_worker.py"), redis_url,
                                  shared.queue_name], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "ready"
        return child

    out = redis_py.Redis.from_url(redis_url)
    children = [spawn(), spawn()]
    killed = None
    try:
        producer = shared.queue()
        retry = RetryConfig(max_retries=2, initial_delay=0.0)
        began = time.monotonic()
        producer.enqueue_many([Job("api", i, retry_config=retry) for i in range(12)]
                              + [Job("mail", "flaky" if i % 2 else i, retry_config=retry) for i in range(8)]
                              + [Job("free", i, priority=Priority.LOW) for i in range(20)])
        victim = children[0].pid

        def victim_runs_api():
            return any(line.split()[:2] == [str(victim).encode(), b"api"] for line in out.lrange(OUT, 0, -1))

        deadline = time.monotonic() + WAIT
        while not victim_runs_api() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert victim_runs_api()
        killed = children.pop(0)
        killed.kill()
        assert killed.wait(WAIT) == -9
        children.append(spawn())
        assert producer.join(WAIT * 4)
        assert producer.get_stats().jobs_succeeded == 40
    finally:
        _stop_fleet(children, killed)
        shared.close()
    lines = [line.decode().split() for line in out.lrange(OUT, 0, -1)]
    out.close()
    assert any(pid == str(killed.pid) for pid, *_ in lines)
    starts = [(job_type, float(when)) for _, job_type, _, _, when in lines]
    assert_windows_hold(starts, {job_type: limit for job_type, (_, limit) in RATE_LIMITS.items() if limit},
                        began=began)


@pytest.mark.parametrize("url, part", [
    ("notaurl", "'notaurl'"),  # no scheme
    ("redis://:s3cret@127.0.0.1:notaport/0", "redis://:***@127.0.0.1:notaport/0"),
    ("redis://127.0.0.1:6379/0?socket_timeout=abc", "socket_timeout=abc"),
    ("redis://127.0.0.1:6379/jobs", "/jobs"),  # (redis-py would quietly use db 0)
])
def test_a_bad_redis_url_is_refused_naming_it_without_its_password(url, part):
    """API.md / the work rules: errors name the bad value. A RedisBroker URL that cannot be
    used raises ValueError naming the URL (its password hidden), not redis-py's bare message;
    and a database that is not a number is refused, not silently replaced by db 0."""
    from tinymq.redis import RedisBroker

    with pytest.raises(ValueError) as raised:
        RedisBroker(url, name="x")
    assert part in str(raised.value)
    assert "s3cret" not in str(raised.value)


def test_the_id_of_a_cancelled_running_job_is_free_at_once_as_in_process(redis):
    """API.md: an explicit id is unique among the unfinished jobs; q.cancel() returning True
    ends the job (in-process, its id is free at once: "cancel report-2026-12, enqueue a fresh
    one"). Over Redis a running job's cancel only marks it; its owner hears of it up to
    lease / 4 later while busy. Before the fix the job hash (which the id's uniqueness is
    checked against) stayed at job:<id> until then, and the enqueue raised DuplicateJob;
    cancel.lua now moves it to a key of the marked attempt's own."""
    producer, worker = redis.pair()
    started = threading.Event()

    def run(job, ctx):
        started.set()
        ctx.wait(WAIT)

    worker.register_executor("t", run, ExecutorConfig(timeout=None))
    producer.enqueue_many([Job("t", id="report-2026-12"), Job("t", id="other")])
    worker.start_dispatcher(1)  # busy with the first, the second buffered: no idle pump to wake
    assert started.wait(WAIT)
    assert producer.cancel("report-2026-12") is True
    producer.enqueue(Job("t", id="report-2026-12"))
    with pytest.raises(DuplicateJob):  # the fresh one holds the id now
        producer.enqueue(Job("t", id="report-2026-12"))


def test_a_cancel_mark_survives_kill_9_of_redis_and_a_cancel_while_it_is_down_raises(own_redis_server):
    """API.md Scale-out: a cancel while Redis is unreachable raises TinyMQError (its cause
    attached), never a silent False; a cancel that returned True survives kill -9 and restart
    of Redis (appendfsync always): the running attempt is still cancelled in its owner,
    reported once, counted once, and join() returns."""
    from tinymq.redis import RedisBroker

    def queue():
        return Queue(broker=RedisBroker(own_redis_server.url, name="restart", lease=LEASE))

    producer, worker = queue(), queue()
    worker_failures = record_failures(worker, key=lambda job: job.id)
    started, saw_cancel = threading.Event(), threading.Event()

    def run(job, ctx):
        started.set()
        if ctx.wait(WAIT * 3):
            saw_cancel.set()

    worker.register_executor("t", run, ExecutorConfig(timeout=None))
    try:
        job = producer.enqueue(Job("t"))
        other = producer.enqueue(Job("t"))
        worker.start_dispatcher(1)
        assert started.wait(WAIT)
        own_redis_server.kill()
        with pytest.raises(TinyMQError) as raised:
            producer.cancel(other.id)
        assert raised.value.__cause__ is not None
        own_redis_server.restart()
        assert producer.cancel(other.id) is True  # waiting, or buffered in the worker
        assert producer.cancel(job.id) is True  # running: marked
        own_redis_server.kill()  # the mark is in the append-only file
        own_redis_server.restart()
        assert saw_cancel.wait(WAIT)
        assert producer.join(WAIT)
        stats = producer.get_stats()
        assert (stats.jobs_cancelled, stats.jobs_succeeded, stats.jobs_failed) == (2, 0, 0)
        reported = [i for i, reason, _ in worker_failures.snapshot() if reason == "cancelled"]
        assert job.id in reported and reported.count(job.id) == 1
        assert producer.cancel(job.id) is False
    finally:
        worker.stop(wait=False)
        producer.stop(wait=False)
