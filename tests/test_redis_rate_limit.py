"""Global rate limits over the Redis broker (API.md "Rate limits", "Scale-out").

With a broker, ``ExecutorConfig(rate_limit=RateLimit(max_starts, per))`` is one
sliding window per type in Redis, shared by every process on the broker name.
An attempt takes a place in its type's window when it is handed out; its place
lasts until ``per`` seconds after its start was reported to Redis (op T), or
after its outcome or its reap, whichever Redis saw first. So the promise holds
for real starts, however long a fetched job waited in a process's buffer.

The scripts are driven through their low-level API (as in test_redis_scripts.py),
by hand and by a hypothesis state machine (at the end; TINYMQ_MODEL_EXAMPLES sets its
length, as for test_redis_model.py); the fleet test records real start times in two
worker processes.
"""
import itertools
import math
import os
import subprocess
import sys
import time

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from tinymq import ExecutorConfig, Job, Priority, RateLimit, RetryConfig
from tinymq.redis._scripts import Scripts, SettleOp

from _backends import Redis
from _helpers import QUIET, WAIT, Recorder, examples
from test_redis_scripts import check_invariants

EXAMPLES = int(os.environ.get("TINYMQ_MODEL_EXAMPLES", "60"))

HERE = os.path.dirname(os.path.abspath(__file__))
LEASE_MS = 60_000
# Seconds by which the executor's own clock reading may follow the moment Redis recorded
# the attempt's start (its T op, sent as the worker starts it): a worker's wake-up on a
# loaded 2-core machine with several threads of each process contending for the GIL, as
# test_queue_rate_limit.STRESS_SLACK (0.15 failed now and then at a load of 15: the windows here
# are 0.5 s, the slack half of one). Not the time a job waits in a buffer.
SLACK = 0.25
# The exact bound (test_queue_rate_limit.assert_no_start_ahead_of_its_window) on Redis's clock,
# which keeps milliseconds, read against this host's monotonic one.
REDIS_ROUNDING = 0.005


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


def assert_windows_hold(starts, limits, slack=SLACK, began=None):
    """test_queue_rate_limit's check with this file's slack, on Redis's clock (REDIS_ROUNDING)."""
    from test_queue_rate_limit import assert_windows_hold as check

    check(starts, limits, slack, began, REDIS_ROUNDING)


@pytest.fixture
def shared(redis_url):
    made = Redis(redis_url, lease=2.0)
    yield made
    made.close()


def test_two_worker_processes_share_one_window_per_type_retries_included(shared, redis_url):
    import redis

    from _redis_rate_worker import OUT, RATE_LIMITS

    children = [subprocess.Popen([sys.executable, os.path.join(HERE, "_redis_rate_worker.py"), redis_url,
                                  shared.queue_name], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                for _ in range(2)]
    try:
        for child in children:
            assert child.stdout.readline().strip() == "ready"
        producer = shared.queue()
        retry = RetryConfig(max_retries=2, initial_delay=0.0)
        began = time.monotonic()
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
    print("starts (pid, type, id, retries, monotonic):", *sorted(lines, key=lambda line: float(line[4])), sep="\n")
    assert sum(1 for job_type, _ in starts if job_type == "mail") == 12  # 4 of them retried once
    # The limit is global: both processes started "api" jobs (one holds at most 4 at a time, each
    # runs past its window), and together they kept every type's window.
    assert len({pid for pid, started_type, *_ in lines if started_type == "api"}) == 2
    assert_windows_hold(starts, {job_type: limit for job_type, (_, limit) in RATE_LIMITS.items() if limit},
                        began=began)


def test_a_window_opening_wakes_an_idle_worker_at_once_and_nothing_polls_meanwhile(shared):
    producer = shared.queue()
    worker = shared.queue()
    recorder = Recorder()
    limit = RateLimit(1, per=0.5)
    worker.register_executor("r", lambda job: recorder.add(time.monotonic()),
                             ExecutorConfig(rate_limit=limit))
    worker.start_dispatcher(2)
    server = producer.broker._client
    producer.enqueue_many([Job("r", i) for i in range(4)])
    assert producer.join(WAIT)
    gaps = [b - a for a, b in zip(recorder.items, recorder.items[1:])]
    assert all(gap >= limit.per - SLACK for gap in gaps), gaps
    # Each next start follows its window's opening closely: the due-time timer fetches then
    # (an idle pump only looks again every second on its own).
    assert sorted(gaps)[len(gaps) // 2] < limit.per + 0.3, gaps
    # Only rate-waiting jobs: an idle worker makes no script calls but its timer's and its
    # idle pump's (one a second).
    slow = Recorder()
    worker.register_executor("slow", slow.add, ExecutorConfig(rate_limit=RateLimit(1, per=60.0)))
    producer.enqueue_many([Job("slow", i) for i in range(3)])
    assert slow.wait_until(lambda items: len(items) == 1)
    time.sleep(QUIET)  # its start report and outcome are sent
    server.config_resetstat()
    time.sleep(1.0)
    calls = server.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0)
    assert calls <= 6, calls
    assert len(slow.items) == 1
    assert producer.get_stats().medium_queue_size == 2  # waiting for the window, in Redis


# --- a state machine over the scripts ---------------------------------------------------------

UNIT = 1_000_000  # ms: every per and time step is a multiple, so real time decides nothing
MACHINE_LIMITS = {"r": (3, 2, 2 * UNIT), "s": (1, 1, UNIT)}  # type -> (slots, max_starts, per ms)
MACHINE_TYPES = ("r", "s", "f")  # "f" has no rate limit
MACHINE_PROCS = ("p0", "p1", "p2")
REAL_TIME_MS = 1000  # the real time a step may take, far below a UNIT


class RateMachine(RuleBasedStateMachine):
    """Processes fetch (ops riding along), report starts, settle, die and are reaped, resend a
    fetch; the clock jumps. Every hand-out is recorded with the virtual time of its call, and
    the time its start became known to Redis (a T op, an outcome, a reap). After every step:
    no moment has more than max_starts hand-outs of a type whose places were still held then
    (a place is held from hand-out until per after its start was known, or until a give-back
    with no start known: it never started); every job is in one
    place; and a type left waiting is waiting for something that will come (a slot, an unknown
    start, or a window opening the next fetch reply names)."""

    client = None  # set by the test

    def __init__(self) -> None:
        super().__init__()
        self.client.flushall()
        self.scripts = Scripts(self.client, "machine")
        self.offset = 0  # virtual ms = server ms + offset (advance moves stored times back)
        self.ids = itertools.count()
        self.fetch_ids = itertools.count(1)
        self.registered = set()
        self.held = {proc: {} for proc in MACHINE_PROCS}  # proc -> attempt -> (type, reported)
        self.handouts = {}  # (proc, attempt) -> [type, handed out at, start known at or None]
        self.freed = {}  # (proc, attempt) -> when it was given back unstarted (no place after)
        self.last_fetch = None
        self.scripts.set_limits({t: (slots, m, per / 1000.0) for t, (slots, m, per) in MACHINE_LIMITS.items()})
        self.scripts.set_limits({"f": 5})

    def now(self) -> float:
        seconds, microseconds = self.client.time()
        return seconds * 1000 + microseconds / 1000 + self.offset

    def start_known(self, proc, attempt, at) -> None:
        record = self.handouts.get((proc, attempt))
        if record is not None and record[2] is None:
            record[2] = at

    @rule(types=st.lists(st.sampled_from(MACHINE_TYPES), min_size=1, max_size=6),
          priority=st.integers(0, 2))
    def enqueue(self, types, priority):
        rows = [(f"j{next(self.ids)}", t, priority, 0, "{}") for t in types]
        assert self.scripts.enqueue(f"tok{rows[0][0]}", 1000, 0, rows).status == "ok"

    def ops_for(self, data, proc):
        ops = []
        for attempt, (job_type, reported) in sorted(self.held[proc].items()):
            op = data.draw(st.sampled_from(("", "T", "S", "Y", "B")), label=f"op {attempt}")
            if op == "T" and not reported:
                ops.append(SettleOp("T", attempt))
            elif op in ("S", "B"):
                ops.append(SettleOp(op, attempt))
            elif op == "Y":
                ops.append(SettleOp("Y", attempt, retries=1, delay_ms=0, error="E: again"))
        return ops

    def apply_ops(self, proc, ops, at) -> None:
        for op in ops:
            if op.op == "B" and not self.held[proc][op.attempt][1]:
                # Given back with no start reported (a started attempt reports it first): it
                # never started, and its place is free from the give-back on.
                self.freed[(proc, op.attempt)] = at
                del self.held[proc][op.attempt]
                continue
            self.start_known(proc, op.attempt, at)
            if op.op == "T":
                job_type, _ = self.held[proc][op.attempt]
                self.held[proc][op.attempt] = (job_type, True)
            else:
                del self.held[proc][op.attempt]

    @rule(data=st.data(), proc=st.sampled_from(MACHINE_PROCS), n=st.integers(0, 4))
    def fetch(self, data, proc, n):
        ops = self.ops_for(data, proc)
        fetch_id = format(next(self.fetch_ids), "x")
        before = self.now()
        reply = self.scripts.fetch(proc, fetch_id, n, 10 * UNIT, 100, proc in self.registered, ops)
        after = self.now()
        if reply.reaped:  # its lease ran out (advance) and another call reaped it
            assert proc not in self.registered
            return
        self.registered.add(proc)
        self.apply_ops(proc, ops, before)
        self.reaped(before)
        self.took(proc, reply, after)
        self.last_fetch = (proc, fetch_id, n, ops, reply)
        self.check_waiting(reply, n)

    def reaped(self, before) -> None:
        """Processes the last call reaped (their leases ran out): their attempts' starts are known."""
        for proc in MACHINE_PROCS:
            if proc in self.registered and self.client.zscore(self.scripts.key("procs"), proc) is None:
                for attempt in self.held[proc]:
                    self.start_known(proc, attempt, before)
                self.held[proc] = {}
                self.registered.discard(proc)

    def took(self, proc, reply, after) -> None:
        for job in reply.jobs:
            job_type = self.client.hget(self.scripts.key(f"job:{job.id}"), "t")
            self.held[proc][job.attempt] = (job_type, False)
            self.handouts.setdefault((proc, job.attempt), [job_type, after, None])

    @rule(data=st.data(), proc=st.sampled_from(MACHINE_PROCS))
    def settle(self, data, proc):
        ops = self.ops_for(data, proc)
        if not ops or proc not in self.registered:
            return
        before = self.now()
        assert self.scripts.settle(proc, ops) == 0
        self.apply_ops(proc, ops, before)

    @precondition(lambda self: self.last_fetch is not None)
    @rule()
    def resend_last_fetch(self):
        proc, fetch_id, n, ops, first = self.last_fetch
        if proc not in self.registered:
            return
        reply = self.scripts.fetch(proc, fetch_id, n, 10 * UNIT, 100, True, ops)
        if reply.reaped:
            self.reaped(self.now())
            return
        assert [job.attempt for job in reply.jobs] == [
            job.attempt for job in first.jobs if job.attempt in self.held[proc]]
        self.took(proc, reply, self.now())  # (records nothing new)
        # Each op again: stale, but a T of an attempt still held (it changes nothing either).
        assert self.scripts.settle(proc, ops) == sum(
            1 for op in ops if op.op != "T" or op.attempt not in self.held[proc])

    @rule(proc=st.sampled_from(MACHINE_PROCS))
    def die_and_be_reaped(self, proc):
        if proc not in self.registered:
            return
        self.client.zadd(self.scripts.key("procs"), {proc: 0})
        before = self.now()
        self.scripts.reap(100)
        self.reaped(before)
        assert proc not in self.registered

    @rule(units=st.integers(1, 3))
    def advance(self, units):
        ms = units * UNIT
        keys = ["procs", "delayed", "capped", "rateopen"] + [f"rate:{t}" for t in MACHINE_LIMITS]
        pipe = self.client.pipeline(transaction=True)
        for name in keys:
            for member, score in self.client.zrange(self.scripts.key(name), 0, -1, withscores=True):
                if score != float("inf"):
                    pipe.zadd(self.scripts.key(name), {member: score - ms})
        pipe.execute()
        self.offset += ms

    def check_waiting(self, reply, n) -> None:
        """After a fetch that took fewer than it asked for, a parked type waits for a slot, or
        for a full window to open: at a time the reply names, or once a start is known."""
        if len(reply.jobs) >= n:
            return
        key = self.scripts.key
        now = self.now() - self.offset  # the stored times are on the server clock
        for t, (slots, max_starts, per) in MACHINE_LIMITS.items():
            if not self.client.hexists(key("parkedn"), t):
                continue
            if int(self.client.hget(key("running"), t) or 0) >= slots:
                continue  # waits for a slot: a settle lets it out
            ends = [score for _, score in self.client.zrange(key(f"rate:{t}"), 0, -1, withscores=True)
                    if score > now]
            assert len(ends) >= max_starts, f"{t} waits with room in its window: {ends}"
            if min(ends) != float("inf"):
                opens = self.client.zscore(key("rateopen"), t)
                assert opens is not None and opens <= min(ends)
                assert reply.next_due_ms is not None and reply.next_due_ms <= opens

    @invariant()
    def never_more_than_max_starts_places_held(self):
        for t, (_, max_starts, per) in MACHINE_LIMITS.items():
            records = [r + [self.freed.get(key, math.inf)] for key, r in self.handouts.items() if r[0] == t]
            for _, moment, _, _ in records:
                held = [r for r in records if r[1] <= moment < r[3] and (r[2] is None or r[2] + per > moment)]
                assert len(held) <= max_starts, (t, moment, held)

    @invariant()
    def a_known_start_ends_its_place_per_later(self):
        for (proc, attempt), (t, _, known) in self.handouts.items():
            per = MACHINE_LIMITS[t][2] if t in MACHINE_LIMITS else None
            score = per and self.client.zscore(self.scripts.key(f"rate:{t}"), f"{proc}|{attempt}")
            if known is not None and score is not None:
                assert score + self.offset <= known + per + REAL_TIME_MS, (proc, attempt, score, known)

    @invariant()
    def every_job_in_one_place(self):
        check_invariants(self.scripts)


def test_no_window_ever_holds_more_than_max_starts_hand_outs(redis_url):
    import redis

    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        machine = type("RateMachine", (RateMachine,), {"client": client})
        run_state_machine_as_test(machine, settings=settings(
            max_examples=examples(EXAMPLES), stateful_step_count=40, deadline=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]))
    finally:
        client.close()
