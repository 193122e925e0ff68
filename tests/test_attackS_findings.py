"""Findings of the attack on f6faa2f (a report survives its reporter) and dec8756 (a
buffered job does not wait behind long jobs): each test failed before its fix.

1. A rate-limited job given back unstarted (op B: stuck in a busy process's buffer, or
   unstarted at stop()) counted as a start in its type's rate window for ``per`` from the
   give-back. With RateLimit(1, per=30), the job a busy process gave back after its second
   waited 30 s for the window instead of running in the idle process at once: the
   give-back made it wait far longer than staying would have. Fixed: a B of an attempt
   whose start Redis never heard of (op T, which every started attempt of a rate-limited
   type sends first) removes its window entry; a process that does not rate-limit the type
   itself (another's registration may) sends T before the B of an attempt stop() cancelled.
2. stop() dropped the ops of a round that failed (Redis was unreachable; the pump resends
   that call as it was, but not once the queue is closing): a success settled in it was
   never sent, and the release gave the job back, so it ran a second time elsewhere (and
   an acknowledgement of a report in it was lost, so the report came twice). Found by
   restarting Redis under a worker that had just finished a job, then stopping it. Fixed:
   stop() sends that round's ops first, with its release (those Redis ran are stale).
3. A report came twice with no process killed: stop() waited 2 s for the pump and the
   heartbeat, then released; a failure callback slower than that, on a row a reply had
   handed this process, was still running, so its acknowledgement came after the release,
   which had already sent the row to `reports` for another process to report again.
   Fixed: stop() waits for the callbacks running on handed rows (but its own, when a
   callback stops the queue), so their acknowledgements go with the release; 10 s at
   most (a stuck callback does not hold stop() up: its job is reported again).
4. A waiting job that q.cancel() removes was reported only from that call's reply; the
   at-least-once promise across kill -9 did not hold for it. Fixed (session 11) for a
   canceller that holds a lease (a worker process): the row waits in its reporting hash
   until acknowledged, as fetched rows do; and (session 12) for one without a lease, which
   registers a reporter for the row while its callbacks run; the delayed jobs an enqueue
   evicts, likewise.
"""
import json
import threading
import time

import pytest

from tinymq import ExecutorConfig, Job, RateLimit
from tinymq.redis._scripts import Scripts, SettleOp

from _backends import Redis
from _helpers import WAIT

LEASE_MS = 60_000


@pytest.fixture
def scripts(redis_url):
    import redis as redis_py

    client = redis_py.Redis.from_url(redis_url, decode_responses=True)
    yield Scripts(client, "attackS")
    client.close()


@pytest.fixture
def redis(redis_url):
    made = Redis(redis_url, lease=2.0)
    yield made
    made.close()


# --- 1. an unstarted give-back is no start ---------------------------------------------

def test_a_rate_limited_job_given_back_unstarted_does_not_use_up_its_window(scripts):
    scripts.set_limits({"rl": (10, 1, 30.0)})  # one start per 30 s
    scripts.enqueue("tok", 100, 0, [("r", "rl", 1, 0, "body-r")])
    attempt = scripts.fetch("busy", "1", 1, LEASE_MS, 3, False).jobs[0].attempt
    # Given back before any worker started it (no T op): it never started.
    reply = scripts.fetch("busy", "2", 0, LEASE_MS, 3, True, [SettleOp("B", attempt)])
    assert reply.stale == 0
    assert [job.attempt.split(":", 1)[1] for job in scripts.fetch("idle", "1", 1, LEASE_MS, 3, False).jobs] == ["r"]


def test_a_rate_limited_job_given_back_after_its_start_still_counts(scripts):
    """(What held before: a start reported by T counts, whatever ends the attempt.)"""
    scripts.set_limits({"rl": (10, 1, 30.0)})
    scripts.enqueue("tok", 100, 0, [("r", "rl", 1, 0, "body-r")])
    attempt = scripts.fetch("busy", "1", 1, LEASE_MS, 3, False).jobs[0].attempt
    scripts.fetch("busy", "2", 0, LEASE_MS, 3, True, [SettleOp("T", attempt), SettleOp("B", attempt)])
    assert scripts.fetch("idle", "1", 1, LEASE_MS, 3, False).jobs == []  # parked for the window


def test_a_rate_limited_job_buffered_behind_a_long_one_runs_in_an_idle_process(redis):
    busy, idle = redis.pair()
    release, long_started, rl_ran = threading.Event(), threading.Event(), threading.Event()

    def long_job(job):
        long_started.set()
        release.wait(WAIT * 3)

    for q in (busy, idle):
        q.register_executor("long", long_job, ExecutorConfig(max_concurrent_jobs=10))
        q.register_executor("rl", lambda job: rl_ran.set(),
                            ExecutorConfig(max_concurrent_jobs=10, rate_limit=RateLimit(1, per=30.0)))
    busy.start_dispatcher(1)
    try:
        busy.enqueue_many([Job("long", None, id="long"), Job("rl", None, id="r")])
        assert long_started.wait(WAIT)
        idle.start_dispatcher(1)
        started = time.monotonic()
        # Its second in busy's buffer, a fetch by idle, margin: far from the 30 s window.
        assert rl_ran.wait(WAIT), "the given-back job waited for a rate window it never used"
        assert time.monotonic() - started < WAIT
        assert not release.is_set()
    finally:
        release.set()
    assert busy.join(WAIT)
    stats = busy.get_stats()
    assert stats.jobs_succeeded == 2 and stats.jobs_failed == 0


# --- 2. stop() sends the ops of a round that failed ------------------------------------

def test_a_success_settled_while_redis_was_down_is_not_run_again_after_stop(own_redis_server, monkeypatch):
    from tinymq.redis import broker as broker_module

    made = Redis(own_redis_server.url, lease=10.0)
    ran = []
    try:
        q = made.queue()
        release, started = threading.Event(), threading.Event()

        def work(job):
            ran.append(job.id)
            started.set()
            assert release.wait(WAIT)

        q.register_executor("work", work)
        q.start_dispatcher(1)
        q.enqueue(Job("work", None, id="a"))
        assert started.wait(WAIT)
        own_redis_server.kill()
        release.set()  # it succeeds; the round that carries its S fails
        deadline = time.monotonic() + WAIT
        while True:
            with q._link._round_lock:
                unsent = q._link._unsent
            if unsent is not None and [op.op for op in unsent[3]] == ["S"]:
                break
            assert time.monotonic() < deadline, "the success was not in a failed round"
            time.sleep(0.01)
        # stop() while Redis is down; its release call is resent (for about 5 s) until the
        # server is back. The pump resends nothing once the queue is closing.
        monkeypatch.setattr(broker_module, "_RESENDS", 8)
        stopper = threading.Thread(target=q.stop)
        stopper.start()
        deadline = time.monotonic() + WAIT
        while not q._link._released:  # the pump has left; the release is being sent
            assert time.monotonic() < deadline
            time.sleep(0.01)
        own_redis_server.start()
        stopper.join(WAIT)
        assert not stopper.is_alive()

        client = own_redis_server.client(decode_responses=True)
        try:
            stats = client.hgetall(f"tmq:{{{made.queue_name}}}:stats")
        finally:
            client.close()
        assert int(stats.get("succeeded", 0)) == 1 and int(stats.get("outstanding", 0)) == 0, stats
        # Another process finds nothing to run again.
        other = made.queue()
        other.register_executor("work", lambda job: ran.append(job.id))
        other.start_dispatcher(1)
        assert other.join(WAIT)
        assert ran == ["a"]
    finally:
        made.close()


# --- 3. stop() waits for the callbacks of handed rows ----------------------------------

def a_dead_process_holding_j(scripts):
    """Job "j" is leased to process "dead", whose lease ran out: whoever reaps it reports "j"
    crashed (max_crash_recoveries=0)."""
    from tinymq.redis._link import job_row

    scripts.enqueue("tok", 100, 0, [job_row(Job("work", None, id="j"), time.time())])
    assert len(scripts.fetch("dead", "1", 1, LEASE_MS, 0, False).jobs) == 1
    scripts.client.zadd(scripts.key("procs"), {"dead": 0})


def test_a_slow_failure_callback_at_stop_is_not_repeated_by_another_process(redis_url):
    import redis as redis_py

    made = Redis(redis_url, lease=2.0, max_crash_recoveries=0)
    client = redis_py.Redis.from_url(redis_url, decode_responses=True)
    scripts = Scripts(client, made.queue_name)
    try:
        # A process that died holding "j": whoever reaps it reports "j" crashed.
        a_dead_process_holding_j(scripts)
        reports, in_callback, go_on = [], threading.Event(), threading.Event()
        first = made.queue()

        @first.on_failure
        def slow(job, reason, exc):  # longer than stop() waits for its threads
            reports.append(("first", job.id, reason))
            in_callback.set()
            go_on.wait(WAIT)

        first.register_executor("work", lambda job: None)
        first.start_dispatcher(1)
        assert in_callback.wait(WAIT)
        stopper = threading.Thread(target=first.stop)
        stopper.start()
        stopper.join(3.0)  # (its threads get 2 s)
        go_on.set()
        stopper.join(WAIT)
        assert not stopper.is_alive()
        assert client.llen(scripts.key("reports")) == 0
        second = made.queue()
        second.on_failure(lambda job, reason, exc: reports.append(("second", job.id, reason)))
        second.register_executor("work", lambda job: None)
        second.start_dispatcher(1)
        # Its second beat (every lease / 4) would have been handed the row from `reports`.
        deadline = time.monotonic() + WAIT
        while True:
            beat = client.hget(scripts.key("beaten"), second._link._proc)
            if beat is not None and int(json.loads(beat)[0], 16) >= 2:
                break
            assert time.monotonic() < deadline, "the second process did not beat twice"
            time.sleep(0.05)
        assert reports == [("first", "j", "crashed")]
        assert client.keys(scripts.key("reporting:*")) == []
    finally:
        client.close()
        made.close()


def test_a_failure_callback_stuck_at_stop_does_not_hold_it_up_and_its_job_is_reported_again(
        redis_url, monkeypatch):
    """(stop() waits for such callbacks _REPORT_WAIT at most, then releases: at least once,
    another process reports the job again.)"""
    import redis as redis_py

    from tinymq.redis import _link
    monkeypatch.setattr(_link, "_REPORT_WAIT", 0.5)
    made = Redis(redis_url, lease=2.0, max_crash_recoveries=0)
    client = redis_py.Redis.from_url(redis_url, decode_responses=True)
    scripts = Scripts(client, made.queue_name)
    go_on = threading.Event()
    try:
        a_dead_process_holding_j(scripts)
        reports, in_callback = [], threading.Event()
        first = made.queue()

        @first.on_failure
        def stuck(job, reason, exc):
            reports.append(("first", job.id, reason))
            in_callback.set()
            go_on.wait(WAIT * 3)

        first.register_executor("work", lambda job: None)
        first.start_dispatcher(1)
        assert in_callback.wait(WAIT)
        began = time.monotonic()
        first.stop()
        assert time.monotonic() - began < 2.0 + 0.5 + WAIT / 2  # its threads' 2 s, the wait, margin
        second = made.queue()
        reported_again = threading.Event()

        @second.on_failure
        def again(job, reason, exc):
            reports.append(("second", job.id, reason))
            reported_again.set()

        second.register_executor("work", lambda job: None)
        second.start_dispatcher(1)
        assert reported_again.wait(WAIT)
        assert reports == [("first", "j", "crashed"), ("second", "j", "crashed")]
    finally:
        go_on.set()
        client.close()
        made.close()


def test_a_failure_callback_on_a_handed_row_may_stop_its_queue(redis_url):
    """(stop() from inside such a callback does not wait for itself.)"""
    import redis as redis_py

    made = Redis(redis_url, lease=2.0, max_crash_recoveries=0)
    client = redis_py.Redis.from_url(redis_url, decode_responses=True)
    scripts = Scripts(client, made.queue_name)
    try:
        a_dead_process_holding_j(scripts)
        q = made.queue()
        stopped = threading.Event()

        @q.on_failure
        def stop_it(job, reason, exc):
            q.stop()
            stopped.set()

        q.register_executor("work", lambda job: None)
        q.start_dispatcher(1)
        assert stopped.wait(WAIT)
        deadline = time.monotonic() + WAIT
        while client.exists(scripts.key("reporting:" + q._link._proc)):  # acknowledged at last
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert client.llen(scripts.key("reports")) == 0
    finally:
        client.close()
        made.close()


# --- not fixed: rows a caller's own call ends ----------------------------------------

def test_a_cancelled_waiting_job_is_reported_even_if_the_canceller_dies_before_its_callbacks(scripts):
    """The promise "every job that ends without success is reported at least once across
    kill -9 of any process" is wider than f6faa2f's scope (jobs Redis ends on a process's
    behalf): cancel.lua removes a waiting job, counts it cancelled and returns its row in
    the reply. A registered canceller (a worker process: it holds a lease) also has the row
    in its reporting hash until it acknowledges it, so its reaper reports it if it is
    killed between that reply and its callbacks. (A process without a lease registers a
    reporter for the row; the jobs an enqueue evicts are kept the same way: see
    tests/test_redis_reports.py.)"""
    scripts.enqueue("tok", 100, 0, [("a", "t", 1, 0, "body-a")])
    scripts.fetch("canceller", "1", 0, LEASE_MS, 3, False)  # a worker process, registered
    assert scripts.cancel("c1", "a", "canceller").status == "removed"  # ... then killed before its callbacks
    scripts.client.zadd(scripts.key("procs"), {"canceller": 0})
    alive, _, crashed = scripts.beat("reaper", LEASE_MS, 3, False, "b1")
    assert [(c.id, c.reason) for c in crashed] == [("a", "cancelled")]


# --- what held -------------------------------------------------------------------------

@pytest.mark.parametrize("job_id", ["a|cancelled", "a:b", "x|y:z|crashed", "é|"])
def test_an_acknowledgement_removes_exactly_its_row_whatever_the_id_holds(scripts, job_id):
    """Ids with the key's separators ("|", and ":" of attempts): a row's key ends with parts
    that hold neither (see lib.lua's handed), so one job's acknowledgement never removes
    another's row."""
    other = "a" if job_id != "a" else "b"
    scripts.enqueue("tok", 100, 0, [(job_id, "t", 1, 0, "body-1"), (other, "t", 1, 0, "body-2")])
    attempts = [job.attempt for job in scripts.fetch("p1", "1", 2, LEASE_MS, 3, False).jobs]
    for job in (job_id, other):
        assert scripts.cancel(f"c-{job}", job).status == "marked"
    reply = scripts.fetch("p1", "2", 0, LEASE_MS, 3, True, [SettleOp("S", a) for a in attempts])
    assert sorted(c.id for c in reply.crashed) == sorted([job_id, other])
    key = {c.id: c.key for c in reply.crashed}
    scripts.fetch("p1", "3", 0, LEASE_MS, 3, True, [SettleOp("A", key[job_id])])
    left = scripts.client.hgetall(scripts.key("reporting:p1"))
    assert list(left) == [key[other]]
    scripts.client.zadd(scripts.key("procs"), {"p1": 0})  # killed before acknowledging the other
    alive, _, crashed = scripts.beat("reaper", LEASE_MS, 3, False, "b1")
    assert [(c.id, c.reason) for c in crashed] == [(other, "cancelled")]
