"""q.cancel over a Redis broker, from a Queue other than the one that holds the job.

API.md "Async executors and cancellation" and "Scale-out": a waiting job is
removed in Redis and reported to the cancelling Queue; a leased one (buffered
or running in another Queue) is cancelled there within ``lease`` and reported
by that Queue; every race ends the job exactly once, counted in jobs_cancelled.
Producer and worker are separate Queue objects with their own RedisBroker, as
separate processes would be (the scripts see only process ids).
"""
import asyncio
import json
import threading
import time

import pytest

from tinymq import DuplicateJob, ExecutorConfig, Job, JobTimeout, PermanentFailure, Priority, RetryConfig

from _backends import Redis
from _helpers import QUIET, WAIT, record_failures, wait_until

LEASE = 2.0  # seconds; a cancel reaches a busy owner within a quarter of it (its heartbeat)


@pytest.fixture
def redis(redis_url):
    made = Redis(redis_url, lease=LEASE)
    yield made
    made.close()


def failures_of(q):
    """A Recorder of (job id, reason, exc) for every on_failure call of ``q``."""
    return record_failures(q, key=lambda job: job.id)


def counters(q):
    s = q.get_stats()
    return {"succeeded": s.jobs_succeeded, "failed": s.jobs_failed, "retried": s.jobs_retried,
            "cancelled": s.jobs_cancelled, "timed_out": s.jobs_timed_out}


def leftover_keys(broker):
    """The job hashes (a marked attempt's too) and cancel marks still in Redis for this queue."""
    prefix = broker._scripts.prefix
    return sorted(k for k in broker._client.keys(prefix + "*")
                  if k.startswith((prefix + "job:", prefix + "cancels:", prefix + "cancelled:")))


def test_cancel_a_ready_job_from_a_producer_reports_it_there(redis):
    producer = redis.queue()
    failures = failures_of(producer)
    job = producer.enqueue(Job("t", {"n": 1}))
    assert producer.cancel(job.id) is True
    assert failures.snapshot() == [(job.id, "cancelled", None)]
    assert producer.cancel(job.id) is False  # finished now
    assert producer.join(WAIT)
    stats = producer.get_stats()
    assert (stats.jobs_cancelled, stats.medium_queue_size, stats.jobs_failed) == (1, 0, 0)
    # a worker started later never runs it
    worker = redis.queue()
    ran = []
    worker.register_executor("t", lambda j: ran.append(j.id))
    after = producer.enqueue(Job("t", 2))
    worker.start_dispatcher(1)
    assert producer.join(WAIT)
    assert ran == [after.id]


# Fixed: a job enqueued with a dead job's id replaces it. An aenqueue cancelled just as its job got
# in takes the job back (the caller was told it enqueued nothing); with a SQLite store the dead job it
# replaced comes back, as when the job is refused. Over Redis the dead job was gone for good.
@pytest.mark.parametrize("leased", [False, True], ids=["waiting", "leased"])
def test_an_aenqueue_taken_back_keeps_the_dead_job_of_that_id(redis, leased):
    producer, worker = redis.pair()
    failures = failures_of(producer)
    worker_failures = failures_of(worker)
    running = threading.Event()

    @worker.executor("report")
    def run(job, ctx):
        if job.payload == "fail":
            raise PermanentFailure("the first try")
        running.set()
        ctx.wait(WAIT)  # until its cancel reaches it

    worker.start_dispatcher(1)
    producer.enqueue(Job("report", "fail", id="report-12"))
    assert producer.join(WAIT)
    [dead] = producer.broker.dead_jobs()
    assert (dead.job.id, dead.reason) == ("report-12", "permanent_failure")

    link = producer._link
    real_enqueue = link.enqueue
    got_in = threading.Event()
    release = threading.Event()

    def enqueue_then_wait(jobs, block, timeout):
        real_enqueue(jobs, block, timeout)
        got_in.set()
        assert release.wait(WAIT)  # the enqueue returns after the caller gave up

    link.enqueue = enqueue_then_wait
    again = Job("report", "hold", id="report-12", run_at=None if leased else time.time() + 60)

    async def scenario():
        putter = asyncio.ensure_future(producer.aenqueue(again))
        while not (got_in.is_set() and (running.is_set() or not leased)):
            await asyncio.sleep(0.001)
        putter.cancel()
        await asyncio.sleep(0)
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await putter

    asyncio.run(scenario())
    assert producer.join(WAIT)
    reported = failures.snapshot() + [f for f in worker_failures.snapshot() if f[1] == "cancelled"]
    assert [(job_id, reason) for job_id, reason, _ in reported] == [("report-12", "cancelled")]
    [kept] = producer.broker.dead_jobs()
    assert (kept.job.id, kept.job.payload, kept.reason, kept.error) == ("report-12", "fail", "permanent_failure",
                                                                        dead.error)
    assert producer.cancel("report-12") is False  # dead again, not unfinished
    stats = producer.get_stats()
    assert (stats.jobs_cancelled, stats.jobs_failed) == (1, 1)
    assert producer.broker._client.keys(producer.broker._scripts.prefix + "replaced:*") == []


def test_cancel_unknown_finished_and_dead_ids_returns_false(redis):
    producer, worker = redis.pair()
    worker.register_executor("ok", lambda j: None)
    worker.register_executor("bad", lambda j: 1 / 0)
    ok = producer.enqueue(Job("ok"))
    bad = producer.enqueue(Job("bad", retry_config=RetryConfig(max_retries=0)))
    worker.start_dispatcher(1)
    assert producer.join(WAIT)
    assert producer.cancel("no-such-job") is False
    assert producer.cancel(ok.id) is False
    assert producer.cancel(bad.id) is False  # dead: not unfinished
    assert producer.get_stats().jobs_cancelled == 0
    with pytest.raises(TypeError):
        producer.cancel(123)


def test_cancel_delayed_and_backing_off_jobs(redis):
    producer, worker = redis.pair()
    failures = failures_of(producer)
    attempts = []

    def flaky(job):
        attempts.append(job.id)
        raise ConnectionError("down")

    worker.register_executor("flaky", flaky)
    worker.register_executor("later", lambda j: None)
    delayed = producer.enqueue_delayed(Job("later"), 60.0)
    backing_off = producer.enqueue(Job("flaky", retry_config=RetryConfig(max_retries=5, initial_delay=60.0)))
    worker.start_dispatcher(1)
    assert wait_until(lambda: producer.get_stats().jobs_retried == 1)
    assert producer.get_stats().delayed_jobs_count == 2
    assert producer.cancel(delayed.id) and producer.cancel(backing_off.id)
    assert producer.join(WAIT)
    assert sorted((i, reason) for i, reason, _ in failures.snapshot()) == sorted(
        [(delayed.id, "cancelled"), (backing_off.id, "cancelled")])
    assert counters(producer)["cancelled"] == 2 and producer.get_stats().delayed_jobs_count == 0
    assert attempts == [backing_off.id]
    assert leftover_keys(producer.broker) == []


def test_cancel_a_job_parked_behind_a_saturated_type_keeps_the_others_in_order(redis):
    producer, worker = redis.pair()
    started = threading.Event()
    release = threading.Event()
    order = []

    def one(job):
        order.append(job.payload)
        if job.payload == "first":
            started.set()
            release.wait(WAIT)

    worker.register_executor("one", one, ExecutorConfig(max_concurrent_jobs=1))
    worker.register_executor("other", lambda j: order.append(j.payload))
    producer.enqueue(Job("one", "first"))
    worker.start_dispatcher(2)
    assert started.wait(WAIT)
    parked = [producer.enqueue(Job("one", f"p{i}")) for i in range(3)]
    producer.enqueue(Job("other", "x"))
    assert wait_until(lambda: "x" in order)  # the other type passes the parked ones
    assert producer.cancel(parked[1].id)
    release.set()
    assert producer.join(WAIT)
    assert order == ["first", "x", "p0", "p2"]
    assert counters(producer) == {"succeeded": 4, "failed": 0, "retried": 0, "cancelled": 1, "timed_out": 0}
    assert producer.get_stats().medium_queue_size == 0


@pytest.mark.parametrize("kind", ["thread", "thread-interrupt", "async"])
def test_cancel_a_running_attempt_in_another_queue(redis, kind):
    producer, worker = redis.pair()
    producer_failures, worker_failures = failures_of(producer), failures_of(worker)
    started, saw_cancel, finished = threading.Event(), threading.Event(), threading.Event()
    if kind == "async":
        async def run(job, ctx):
            started.set()
            try:
                await asyncio.sleep(WAIT * 10)
            except asyncio.CancelledError:
                if ctx.cancelled:
                    saw_cancel.set()
                finished.set()
                raise
        config = ExecutorConfig(timeout=None)
    elif kind == "thread":
        def run(job, ctx):
            started.set()
            if ctx.wait(WAIT * 10):  # True when cancelled
                saw_cancel.set()
            finished.set()
        config = ExecutorConfig(timeout=None)
    else:
        def run(job):
            started.set()
            try:
                deadline = time.monotonic() + WAIT * 10
                while time.monotonic() < deadline:
                    time.sleep(0.001)
            except BaseException:
                saw_cancel.set()
                finished.set()
                raise
        config = ExecutorConfig(timeout=WAIT * 10, interrupt_on_timeout=True)
    worker.register_executor("t", run, config)
    job = producer.enqueue(Job("t", retry_config=RetryConfig(max_retries=3, initial_delay=0.0)))
    worker.start_dispatcher(1)
    assert started.wait(WAIT)
    began = time.monotonic()
    assert producer.cancel(job.id) is True
    assert saw_cancel.wait(LEASE + WAIT / 2)  # (within lease; the generous bound is the noisy machine)
    assert finished.wait(WAIT)
    assert producer.join(WAIT)
    assert time.monotonic() - began < LEASE + WAIT
    assert [(i, reason) for i, reason, _ in worker_failures.snapshot()] == [(job.id, "cancelled")]
    assert producer_failures.snapshot() == []
    assert counters(producer) == {"succeeded": 0, "failed": 0, "retried": 0, "cancelled": 1, "timed_out": 0}
    assert producer.cancel(job.id) is False
    assert wait_until(lambda: worker.broker.shared_executors()[0]["t"][0] == 0)  # its slot is free again
    assert leftover_keys(producer.broker) == []


def test_a_running_cancelled_attempt_holds_its_global_slot_until_it_returns(redis):
    producer, worker = redis.pair()
    started = threading.Event()
    let_go = threading.Event()
    ran = []

    def stubborn(job):  # ignores its cancellation
        ran.append(job.payload)
        if job.payload == 0:
            started.set()
            let_go.wait(WAIT)

    worker.register_executor("t", stubborn, ExecutorConfig(max_concurrent_jobs=1, timeout=None))
    first = producer.enqueue(Job("t", 0))
    worker.start_dispatcher(2)
    assert started.wait(WAIT)
    producer.enqueue(Job("t", 1))
    assert producer.cancel(first.id)
    assert wait_until(lambda: producer.get_stats().jobs_cancelled == 1)
    time.sleep(QUIET)
    assert ran == [0]  # the limit of one holds while the cancelled attempt still runs
    let_go.set()
    assert producer.join(WAIT)
    assert ran == [0, 1]


def test_cancel_a_job_buffered_in_another_queue(redis):
    producer, worker = redis.pair()
    started = threading.Event()
    release = threading.Event()
    ran = []

    def run(job):
        ran.append(job.payload)
        started.set()
        release.wait(WAIT)

    worker.register_executor("t", run)
    producer.enqueue(Job("t", "running", priority=Priority.HIGH))
    buffered = producer.enqueue(Job("t", "buffered"))
    worker.start_dispatcher(1)  # one worker, one job prefetched into its buffer
    assert started.wait(WAIT)
    assert wait_until(lambda: producer.get_stats().medium_queue_size == 0)  # fetched: leased
    worker_failures = failures_of(worker)
    assert producer.cancel(buffered.id)
    assert worker_failures.wait_for(1, LEASE + WAIT / 2)
    release.set()
    assert producer.join(WAIT)
    assert ran == ["running"]
    assert [(i, reason) for i, reason, _ in worker_failures.snapshot()] == [(buffered.id, "cancelled")]
    assert counters(producer)["cancelled"] == 1 and counters(producer)["succeeded"] == 1


def test_an_idle_owner_hears_of_a_cancel_at_once_not_at_its_heartbeat(redis_url):
    slow_beat = Redis(redis_url, lease=40.0)  # heartbeat every 10 s
    try:
        producer, worker = slow_beat.pair()
        started, cancelled = threading.Event(), threading.Event()

        def run(job, ctx):
            started.set()
            if ctx.wait(WAIT * 10):
                cancelled.set()

        worker.register_executor("t", run, ExecutorConfig(timeout=None))
        job = producer.enqueue(Job("t"))
        worker.start_dispatcher(2)  # a free worker: its pump waits in Redis, where the cancel wakes it
        assert started.wait(WAIT)
        began = time.monotonic()
        assert producer.cancel(job.id)
        assert cancelled.wait(WAIT)
        assert time.monotonic() - began < 40.0 / 4
        assert producer.join(WAIT)
    finally:
        slow_beat.close()


# --- the races, through the scripts (cancel.lua and the settle rules of lib.lua) -------------

from tinymq.redis._scripts import Scripts, SettleOp  # noqa: E402

LEASE_MS = 60_000


@pytest.fixture
def scripts(redis_url):
    import redis as redis_py

    client = redis_py.Redis.from_url(redis_url, decode_responses=True)
    yield Scripts(client, "c")
    client.close()


def script_stats(scripts):
    return {k: int(v) for k, v in scripts.client.hgetall(scripts.key("stats")).items() if v != "0"}


def acknowledge(scripts, proc):
    """``proc`` says its failure callbacks ran for every row kept for it to report (op A):
    those rows, as (id, body, reason)."""
    kept = scripts.client.hgetall(scripts.key(f"reporting:{proc}"))
    if kept:
        assert scripts.settle(proc, [SettleOp("A", field) for field in kept]) == 0
    return sorted((row[0], row[1], row[4]) for row in map(json.loads, kept.values()))


def enqueue(scripts, *ids, delay_ms=0):
    reply = scripts.enqueue(f"tok-{ids[0]}", 100, 0, [(i, "t", 1, delay_ms, f"body-{i}") for i in ids])
    assert reply.status == "ok"


def fetched(scripts, proc, fetch_id, n=1, ops=()):
    return scripts.fetch(proc, fetch_id, n, LEASE_MS, 3, fetch_id != "1", list(ops))


def only_cancelled_left(scripts):
    """Nothing of the job stays: no hash, no mark, no slot, nothing outstanding."""
    client = scripts.client
    assert client.keys(scripts.key("job:*")) == []
    assert client.keys(scripts.key("cancels:*")) == []
    assert client.keys(scripts.key("cancelled:*")) == []  # (a marked attempt's moved hash)
    assert client.hgetall(scripts.key("running")) == {}
    assert int(client.hget(scripts.key("stats"), "outstanding") or 0) == 0


def test_a_resent_cancel_gets_the_first_reply_and_a_second_cancel_finds_nothing(scripts):
    enqueue(scripts, "a")
    first = scripts.cancel("tok1", "a")
    assert first.status == "removed" and first.removed.id == "a" and first.removed.body == "body-a"
    assert scripts.cancel("tok1", "a") == first  # its reply was lost: the resend says the same
    assert scripts.cancel("tok2", "a").status == "none"
    assert script_stats(scripts) == {"enqueued": 1, "cancelled": 1}
    only_cancelled_left(scripts)


@pytest.mark.parametrize("op", ["S", "Y", "B"])  # (a failure for good: test_redis_attackR_findings)
def test_a_marked_attempt_ends_cancelled_whatever_its_settle_says(scripts, op):
    enqueue(scripts, "a")
    attempt = fetched(scripts, "p1", "1").jobs[0].attempt
    marked = scripts.cancel("tok", "a")
    assert (marked.status, marked.proc, marked.attempt) == ("marked", "p1", attempt)
    assert scripts.cancel("tok-again", "a").status == "none"  # cancelled already: not twice
    beat = scripts.heartbeat("p1", LEASE_MS, 3, True, "b1")
    assert list(beat.cancels) == [attempt]  # the owner hears of it at its heartbeat
    settle = SettleOp(op, attempt, 1, 0.0, "", "boom")
    reply = fetched(scripts, "p1", "2", 1, [settle])
    # The owner did not cancel it itself: the reply hands the job back to report, once.
    assert [(c.id, c.reason, c.body) for c in reply.crashed] == [("a", "cancelled", "body-a")]
    assert list(reply.cancels) == [] and reply.jobs == []  # not retried, not given back
    assert list(reply.overruled) == [(attempt, "t")]  # what p1 counted for its op is counted as cancelled
    resent = fetched(scripts, "p1", "2", 1, [settle])
    assert (resent.crashed, resent.overruled) == (reply.crashed, reply.overruled)  # a resend: the same
    # Unfinished for join() until its owner says its failure callbacks ran (op A).
    assert script_stats(scripts) == {"enqueued": 1, "cancelled": 1, "outstanding": 1}
    assert acknowledge(scripts, "p1") == [("a", "body-a", "cancelled")]
    assert script_stats(scripts) == {"enqueued": 1, "cancelled": 1}
    only_cancelled_left(scripts)


def test_the_owners_own_cancel_is_not_handed_back_to_report(scripts):
    enqueue(scripts, "a")
    attempt = fetched(scripts, "p1", "1").jobs[0].attempt
    assert scripts.cancel("tok", "a").status == "marked"
    reply = fetched(scripts, "p1", "2", 1, [SettleOp("Z", attempt, 0, 0, "cancelled", "")])
    assert reply.crashed == []  # its process reports it, from when it cancelled it ...
    # ... and until it says so, the job waits for it (unfinished), as for any row it reports
    assert script_stats(scripts) == {"enqueued": 1, "cancelled": 1, "outstanding": 1}
    assert acknowledge(scripts, "p1") == [("a", "body-a", "cancelled")]
    assert script_stats(scripts) == {"enqueued": 1, "cancelled": 1}
    only_cancelled_left(scripts)


@pytest.mark.parametrize("late_return_first", [False, True])
def test_a_marked_attempt_that_times_out_ends_cancelled_and_keeps_its_slot_until_it_returns(
        scripts, late_return_first):
    scripts.set_limits({"t": 1})
    enqueue(scripts, "a", "b")
    attempt = fetched(scripts, "p1", "1").jobs[0].attempt
    assert scripts.cancel("tok", "a").status == "marked"
    decision = SettleOp("y", attempt, 1, 0.0, "", "JobTimeout: late")
    late = SettleOp("E", attempt)
    ops = [late, decision] if late_return_first else [decision]
    reply = fetched(scripts, "p1", "2", 1, ops)
    assert [(c.id, c.reason) for c in reply.crashed] == [("a", "cancelled")]
    if not late_return_first:  # it still runs: b waits for the slot
        assert reply.jobs == []
        reply = fetched(scripts, "p1", "3", 1, [late])
    assert [j.id for j in reply.jobs] == ["b"]  # a is not retried
    stats = script_stats(scripts)
    assert (stats.get("cancelled"), stats.get("retried"), stats.get("timed_out")) == (1, None, None)


@pytest.mark.parametrize("reaper", ["beat", "fetch", "reap"])
def test_a_marked_attempt_of_a_dead_process_ends_cancelled_not_back_to_ready(scripts, reaper):
    enqueue(scripts, "a", "b")
    fetched(scripts, "p1", "1", 2)
    assert scripts.cancel("tok", "a").status == "marked"
    scripts.client.zadd(scripts.key("procs"), {"p1": 0})  # p1 stopped renewing long ago
    if reaper == "beat":
        crashed = scripts.heartbeat("p2", LEASE_MS, 3, False, "b1").crashed
    elif reaper == "fetch":
        crashed = fetched(scripts, "p2", "1", 0).crashed
    else:
        crashed = scripts.reap(3)[1]
    assert [(c.id, c.reason) for c in crashed] == [("a", "cancelled")]  # reported once, by the reaper
    assert scripts.client.lrange(scripts.key("ready:1"), 0, -1) == ["b"]  # b back; a is not
    # a counts as unfinished until its report is acknowledged (reap.lua keeps nothing: at once)
    held = 0 if reaper == "reap" else 1
    assert script_stats(scripts) == {"enqueued": 2, "cancelled": 1, "outstanding": 1 + held}
    if held:
        assert acknowledge(scripts, "p2") == [("a", "body-a", "cancelled")]
        assert script_stats(scripts) == {"enqueued": 2, "cancelled": 1, "outstanding": 1}
    assert scripts.client.keys(scripts.key("cancels:*")) == []


def test_a_marked_attempt_given_back_at_release_ends_cancelled_and_is_reported_by_another(scripts):
    enqueue(scripts, "a")
    attempt = fetched(scripts, "p1", "1").jobs[0].attempt
    assert scripts.cancel("tok", "a").status == "marked"
    released = scripts.release("p1", [SettleOp("B", attempt)])  # it stopped before it heard
    assert (released.stale, list(released.overruled)) == (0, [(attempt, "t")])  # p1 counts it cancelled
    assert scripts.client.lrange(scripts.key("ready:1"), 0, -1) == []
    # Unfinished for join() while its row waits in `reports`, and until p2 acknowledges it.
    assert script_stats(scripts) == {"enqueued": 1, "cancelled": 1, "outstanding": 1}
    reply = scripts.heartbeat("p2", LEASE_MS, 3, False, "b1")
    assert [(c.id, c.reason) for c in reply.crashed] == [("a", "cancelled")]
    assert scripts.heartbeat("p2", LEASE_MS, 3, True, "b1").crashed == reply.crashed  # resent
    assert scripts.heartbeat("p2", LEASE_MS, 3, True, "b2").crashed == []  # handed out once
    assert script_stats(scripts) == {"enqueued": 1, "cancelled": 1, "outstanding": 1}
    assert acknowledge(scripts, "p2") == [("a", "body-a", "cancelled")]
    assert script_stats(scripts) == {"enqueued": 1, "cancelled": 1}
    only_cancelled_left(scripts)


def test_cancelling_a_parked_job_keeps_the_parked_counts(scripts):
    scripts.set_limits({"t": 1})
    enqueue(scripts, "a", "b", "c")
    first = fetched(scripts, "p1", "1", 3)  # a taken, b and c parked behind it
    assert [j.id for j in first.jobs] == ["a"]
    assert scripts.cancel("tok", "b").status == "removed"
    assert script_stats(scripts).get("parked:1") == 1
    nxt = fetched(scripts, "p1", "2", 1, [SettleOp("S", first.jobs[0].attempt)])
    assert [j.id for j in nxt.jobs] == ["c"]
    assert scripts.client.hgetall(scripts.key("parkedn")) == {}


# --- a cancelled running job's id is free at once: its late outcome never touches a newer job -----


def moved_hashes(scripts):
    """The hashes of marked attempts (cancelled:<proc>|<attempt>, see lib.lua)."""
    return scripts.client.keys(scripts.key("cancelled:*"))


# How the marked attempt of the old job "a" ends, after a new job "a" was enqueued:
# (ops its owner p1 sends, whether its reply hands the old job back to report as cancelled,
#  the counters of the old job's end). A failure for good that p1 decided before it heard of the
#  mark ends it as cancelled too, kept for p1 to report (the reply says its op was overruled).
LATE_ENDS = {
    "success": ([("S",)], True, {"cancelled": 1}),
    "retry": ([("Y", 1, 0.0, "", "ValueError: boom")], True, {"cancelled": 1}),
    "retry at the deadline, then the late return": (
        [("y", 1, 0.0, "", "JobTimeout: late"), ("E",)], True, {"cancelled": 1}),
    "late return, then the decision": ([("E",), ("y", 1, 0.0, "", "JobTimeout: late")], True, {"cancelled": 1}),
    "its own cancel": ([("Z", 0, 0.0, "cancelled", "")], False, {"cancelled": 1}),
    "failure for good": ([("Z", 0, 0.0, "permanent_failure", "PermanentFailure: 404")], False, {"cancelled": 1}),
    "failure for good at the deadline": (
        [("z", 0, 0.0, "retries_exhausted", "JobTimeout: late"), ("E",)], False, {"cancelled": 1}),
    "given back at stop": ([("B",)], True, {"cancelled": 1}),
}


def _ops(attempt, specs):
    return [SettleOp(spec[0], attempt, *spec[1:]) for spec in specs]


@pytest.mark.parametrize("new_owner", ["p1", "p2"])
@pytest.mark.parametrize("end", sorted(LATE_ENDS))
def test_a_late_outcome_of_a_cancelled_attempt_never_ends_counts_or_deletes_the_new_job_of_its_id(
        scripts, end, new_owner):
    """API.md: cancel() returning True ends the job, and an explicit id is unique among the
    unfinished jobs, so the id is free at once (as in-process). The old attempt still runs in
    its owner until it hears of the cancel; whatever it then reports (success, retry, timeout,
    failure for good, give-back), only the old job ends, once: the new job of the same id
    keeps its hash, place and lease, and runs once."""
    enqueue(scripts, "a")
    old = fetched(scripts, "p1", "1").jobs[0].attempt
    assert scripts.cancel("tok-c", "a").status == "marked"
    assert scripts.enqueue("tok-new", 100, 0, [("a", "t", 1, 0, "body-new")]).status == "ok"  # free at once
    assert scripts.enqueue("tok-dup", 100, 0, [("a", "t", 1, 0, "body-dup")]).status == "dup"  # the new one's
    new = fetched(scripts, new_owner, "2" if new_owner == "p1" else "1")
    assert [(j.id, j.body) for j in new.jobs] == [("a", "body-new")]
    new_attempt = new.jobs[0].attempt

    specs, reported, counted = LATE_ENDS[end]
    reply = fetched(scripts, "p1", "3", 0, _ops(old, specs))
    assert reply.stale == 0
    rows = [(c.id, c.reason, c.body) for c in reply.crashed]
    assert rows == ([("a", "cancelled", "body-a")] if reported else [])  # the old job's body
    assert list(reply.overruled) == ([] if end == "its own cancel" else [(old, "t")])
    # Handed to p1 by the reply, or ended by p1 itself: kept for p1 until its callbacks ran.
    assert acknowledge(scripts, "p1") == [("a", "body-a", "cancelled")]
    assert scripts.client.hget(scripts.key("job:a"), "b") == "body-new"
    assert scripts.client.hget(scripts.key("job:a"), "x") is None
    assert scripts.client.zrange(scripts.key("dead"), 0, -1) == []  # the id is the new job's
    assert scripts.client.hget(scripts.key(f"inflight:{new_owner}"), new_attempt) == "Lt"
    assert moved_hashes(scripts) == []
    assert script_stats(scripts) == dict({"enqueued": 2, "outstanding": 1}, **counted)

    assert scripts.settle(new_owner, [SettleOp("S", new_attempt)]) == 0
    assert script_stats(scripts) == dict({"enqueued": 2, "succeeded": 1}, **counted)
    assert scripts.client.keys(scripts.key("job:*")) == []
    assert scripts.client.keys(scripts.key("cancels:*")) == []


def test_a_cancel_while_the_old_marked_attempt_still_runs_marks_the_new_job_of_its_id(scripts):
    """Two leased jobs of one id (the old one marked): a cancel of the id finds the new one,
    and each attempt's end reports its own job once."""
    enqueue(scripts, "a")
    old = fetched(scripts, "p1", "1").jobs[0].attempt
    assert scripts.cancel("tok-c1", "a").status == "marked"
    assert scripts.enqueue("tok-new", 100, 0, [("a", "t", 1, 0, "body-new")]).status == "ok"
    new = fetched(scripts, "p1", "2").jobs[0].attempt
    second = scripts.cancel("tok-c2", "a")
    assert (second.status, second.proc, second.attempt) == ("marked", "p1", new)
    assert scripts.cancel("tok-c3", "a").status == "none"  # both cancelled already
    assert scripts.enqueue("tok-newer", 100, 0, [("a", "t", 1, 0, "body-newer")]).status == "ok"
    assert sorted(fetched(scripts, "p1", "3", 0).cancels) == sorted([old, new])
    reply = fetched(scripts, "p1", "4", 0, [SettleOp("S", new)])
    assert [(c.id, c.reason, c.body) for c in reply.crashed] == [("a", "cancelled", "body-new")]
    reply = fetched(scripts, "p1", "5", 0, [SettleOp("S", old)])
    assert [(c.id, c.reason, c.body) for c in reply.crashed] == [("a", "cancelled", "body-a")]
    assert scripts.client.hget(scripts.key("job:a"), "b") == "body-newer"  # waiting, untouched
    assert scripts.client.lrange(scripts.key("ready:1"), 0, -1) == ["a"]
    assert moved_hashes(scripts) == []
    assert script_stats(scripts) == {"enqueued": 3, "cancelled": 2, "outstanding": 3}  # two rows unacknowledged
    assert acknowledge(scripts, "p1") == [("a", "body-a", "cancelled"), ("a", "body-new", "cancelled")]
    assert script_stats(scripts) == {"enqueued": 3, "cancelled": 2, "outstanding": 1}


@pytest.mark.parametrize("how", ["reap", "release"])
def test_the_owner_of_a_cancelled_attempt_that_dies_or_leaves_ends_only_the_old_job(scripts, how):
    """Crash recovery (kill -9 of the owner, then a reap) and a stop that gives the attempt back
    end the old job as cancelled from its moved hash, and leave the new job of its id alone."""
    enqueue(scripts, "a")
    old = fetched(scripts, "p1", "1").jobs[0].attempt
    assert scripts.cancel("tok-c", "a").status == "marked"
    assert scripts.enqueue("tok-new", 100, 0, [("a", "t", 1, 0, "body-new")]).status == "ok"
    new_attempt = fetched(scripts, "p2", "1").jobs[0].attempt
    if how == "reap":
        scripts.client.zadd(scripts.key("procs"), {"p1": 0})  # p1 stopped renewing long ago
        reaped, crashed = scripts.reap(3)
        assert reaped == 1
    else:
        assert scripts.release("p1", [SettleOp("B", old)]).stale == 0
        crashed = scripts.heartbeat("p2", LEASE_MS, 3, True, "b1").crashed
    assert [(c.id, c.reason, c.body) for c in crashed] == [("a", "cancelled", "body-a")]
    assert moved_hashes(scripts) == [] and scripts.client.keys(scripts.key("cancels:*")) == []
    assert scripts.client.hget(scripts.key("job:a"), "b") == "body-new"
    assert scripts.client.hget(scripts.key("job:a"), "c") is None  # no crash counted on the new job
    if how == "release":  # (the reap's reply keeps nothing: the old job finished as it handed it out)
        assert script_stats(scripts) == {"enqueued": 2, "cancelled": 1, "outstanding": 2}
        assert acknowledge(scripts, "p2") == [("a", "body-a", "cancelled")]
    assert script_stats(scripts) == {"enqueued": 2, "cancelled": 1, "outstanding": 1}
    assert scripts.settle("p2", [SettleOp("S", new_attempt)]) == 0
    assert script_stats(scripts) == {"enqueued": 2, "cancelled": 1, "succeeded": 1}
    only_cancelled_left(scripts)


def test_a_failure_for_good_of_a_cancelled_attempt_ends_it_cancelled_when_its_id_is_free_again(scripts):
    """A failure its process decided before it heard of the mark ends the job as cancelled
    (test_redis_attackR_findings), also when no newer job has the id by then: nothing is kept
    dead under the id, and the row waits for p1 under the key of its op (p1 made it)."""
    enqueue(scripts, "a")
    old = fetched(scripts, "p1", "1").jobs[0].attempt
    assert scripts.cancel("tok-c", "a").status == "marked"
    assert scripts.client.exists(scripts.key("job:a")) == 0  # moved: the id is free
    assert scripts.enqueue("tok-new", 100, 0, [("a", "t", 1, 0, "body-new")]).status == "ok"
    new_attempt = fetched(scripts, "p2", "1").jobs[0].attempt
    assert scripts.settle("p2", [SettleOp("S", new_attempt)]) == 0  # the new one finished first
    failure = SettleOp("Z", old, 2, 0, "permanent_failure", "PermanentFailure: 404")
    reply = fetched(scripts, "p1", "2", 0, [failure])
    assert reply.crashed == [] and list(reply.overruled) == [(old, "t")]  # p1 reports it, as cancelled
    assert list(scripts.client.hgetall(scripts.key("reporting:p1"))) == [f"a|permanent_failure|p1|{old}"]
    assert acknowledge(scripts, "p1") == [("a", "body-a", "cancelled")]
    assert scripts.client.zrange(scripts.key("dead"), 0, -1) == []
    assert scripts.client.keys(scripts.key("job:*")) == []
    assert moved_hashes(scripts) == []
    assert script_stats(scripts) == {"enqueued": 2, "succeeded": 1, "cancelled": 1}


@pytest.mark.parametrize("outcome", ["return", "raise", "permanent", "timeout"])
def test_a_cancelled_running_jobs_id_runs_a_new_job_once_whatever_the_old_attempt_does(redis_url, outcome):
    """API.md, through two Queues: cancel a running job, enqueue a new job with the same id at
    once, then let the old attempt end on its own (its owner, busy, has not heard of the
    cancel: its heartbeat is 10 s away and its pump waits for a free slot): it returns,
    raises (a retry was due), fails for good, or times out. The old job is reported exactly
    once, as cancelled (a failure for good its owner decided first too), nothing is
    retried, and the new job runs exactly once and succeeds; the id is then free again."""
    slow_beat = Redis(redis_url, lease=40.0)
    try:
        producer, worker = slow_beat.pair()
        reports = record_failures(worker, key=lambda job: (job.id, job.payload))
        reports_elsewhere = record_failures(producer, key=lambda job: (job.id, job.payload))
        started, let_go, timed_out = threading.Event(), threading.Event(), threading.Event()
        runs = []

        def run(job, ctx):
            runs.append((job.id, job.payload))
            if job.payload != "old":
                return
            started.set()
            assert let_go.wait(WAIT)  # deaf to ctx: it ends on its own
            if outcome == "raise":
                raise ValueError("boom")
            if outcome == "permanent":
                raise PermanentFailure("HTTP 404")
            if outcome == "timeout":
                timed_out.wait(WAIT)

        timeout = 0.5 if outcome == "timeout" else None
        worker.register_executor("t", run, ExecutorConfig(timeout=timeout))
        retry = RetryConfig(max_retries=2, initial_delay=0.0)
        producer.enqueue_many([Job("t", "old", id="report", retry_config=retry),
                               Job("t", "filler", retry_config=retry)])
        worker.start_dispatcher(1)  # the old job runs, the filler is buffered: no slot free
        assert started.wait(WAIT)
        assert producer.cancel("report") is True
        producer.enqueue(Job("t", "new", id="report", retry_config=retry))  # free at once
        with pytest.raises(DuplicateJob):
            producer.enqueue(Job("t", "again", id="report"))  # ... for one new job
        if outcome == "timeout":  # decided at its deadline while it still runs
            assert wait_until(lambda: ("report", "new") in runs, WAIT)
            let_go.set()
        else:
            let_go.set()
        assert producer.join(WAIT)
        timed_out.set()
        worker.stop()
        assert runs.count(("report", "new")) == 1 and runs.count(("report", "old")) == 1
        old_reports = [(key, reason) for key, reason, _ in reports.snapshot() + reports_elsewhere.snapshot()]
        assert old_reports == [(("report", "old"), "cancelled")]
        stats = producer.get_stats()
        ended = {"cancelled": stats.jobs_cancelled, "failed": stats.jobs_failed, "retried": stats.jobs_retried,
                 "succeeded": stats.jobs_succeeded}
        assert ended == {"cancelled": 1, "failed": 0, "retried": 0, "succeeded": 2}
        assert producer.broker.dead_jobs() == []
        assert leftover_keys(producer.broker) == []
        producer.enqueue(Job("t", "later", id="report"))  # free again
    finally:
        slow_beat.close()


def test_kill_9_of_the_owner_of_a_cancelled_attempt_ends_only_the_old_job(redis_url, tmp_path):
    """Crash recovery with a real kill -9: the owner of a running job dies, the job is
    cancelled (True: still leased in Redis) and a new job takes its id at once; when the
    dead owner is reaped, the reaper reports the old job as cancelled once and removes its
    hash, and the new job runs once, in another process, untouched by the reap."""
    import os
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    log = tmp_path / "log"
    shared = Redis(redis_url, lease=1.0)
    child = subprocess.Popen([sys.executable, os.path.join(here, "_redis_crash_worker.py"), redis_url,
                              shared.queue_name, "1.0", "3", str(log), "1"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        producer = shared.queue()
        producer.enqueue(Job("a", 60_000, id="report"))  # the child sleeps in it
        assert wait_until(lambda: log.exists() and log.read_text().startswith("S report"), WAIT)
        child.kill()
        assert child.wait(WAIT) == -9
        assert producer.cancel("report") is True  # leased to a process not reaped yet: marked
        producer.enqueue(Job("a", 0, id="report"))
        worker = shared.queue()
        reports = record_failures(worker, key=lambda job: (job.id, job.payload))
        runs = []
        worker.register_executor("a", lambda job: runs.append((job.id, job.payload)))
        worker.start_dispatcher(1)  # it reaps the child once its lease has run out
        assert producer.join(WAIT)
        worker.stop()
        assert runs == [("report", 0)]
        assert [(key, reason) for key, reason, _ in reports.snapshot()] == [(("report", 60_000), "cancelled")]
        stats = producer.get_stats()
        assert (stats.jobs_cancelled, stats.jobs_succeeded, stats.jobs_failed) == (1, 1, 0)
        assert leftover_keys(producer.broker) == []
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(WAIT)
        child.stdin.close()
        child.stdout.close()
        shared.close()
