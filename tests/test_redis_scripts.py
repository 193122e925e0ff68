"""The Lua scripts through their low-level API (tinymq/redis/_scripts.py), on a real server.

What a resend after a lost reply must not change, how a dead process's attempts
come back, fencing of late settles, the timeout states, parking and giving back.
A process "dies" here by having its lease set in the past, as time would.
"""
import json
import re

import pytest

from tinymq.redis._scripts import Scripts, SettleOp, _source

LEASE_MS = 60_000


@pytest.fixture
def scripts(redis_client):
    return Scripts(redis_client, "s")


def key(scripts, suffix):
    return scripts.key(suffix)


def stats(scripts):
    return {k: int(v) for k, v in scripts.client.hgetall(key(scripts, "stats")).items()}


def ready(scripts, level=1):
    return scripts.client.lrange(key(scripts, f"ready:{level}"), 0, -1)


def expire(scripts, proc):
    """As if ``proc`` stopped renewing its lease long ago."""
    scripts.client.zadd(key(scripts, "procs"), {proc: 0})


def check_invariants(scripts):
    """running[t] = L and X attempts of t; outstanding = unfinished jobs + rows waiting to be reported."""
    client = scripts.client
    held = {}
    unfinished = set()
    for inflight in client.scan_iter(key(scripts, "inflight:*")):
        for attempt, value in client.hgetall(inflight).items():
            if value[0] in "LX":
                held[value[1:]] = held.get(value[1:], 0) + 1
            if value[0] in "LR":
                unfinished.add(attempt.split(":", 1)[1])
    assert {t: int(n) for t, n in client.hgetall(key(scripts, "running")).items()} == held
    for level in (0, 1, 2):
        unfinished.update(client.lrange(key(scripts, f"ready:{level}"), 0, -1))
    unfinished.update(client.zrange(key(scripts, "delayed"), 0, -1))
    for parked in client.scan_iter(key(scripts, "parked:*")):
        unfinished.update(client.lrange(parked, 0, -1))
    # A job ended for good counts until its row is reported (lib.lua's held_row): every row
    # waiting to be reported, in a process's reporting hash or in `reports`, ends in that 1.
    kept = [row for hash_key in client.scan_iter(key(scripts, "reporting:*"))
            for row in client.hvals(hash_key)] + client.lrange(key(scripts, "reports"), 0, -1)
    assert all(json.loads(row)[6:7] == [1] for row in kept), kept
    held_back = len(kept)
    assert int(client.hget(key(scripts, "stats"), "outstanding") or 0) == len(unfinished) + held_back
    # get_stats() (stats.lua) places every waiting job once: ready, parked (counted per level by
    # parked:<p>) or due, at its level; not due, as delayed.
    (high, medium, low), delayed, counters, waiting_for_room = scripts.stats()
    waiting = client.zcard(key(scripts, "delayed"))
    for level in (0, 1, 2):
        parked = sum(client.llen(k) for k in client.scan_iter(key(scripts, f"parked:{level}:*")))
        assert counters.get(f"parked:{level}", 0) == parked, (level, counters)
        waiting += client.llen(key(scripts, f"ready:{level}")) + parked
    assert high + medium + low + delayed + waiting_for_room == waiting


def rows(*ids, job_type="t", priority=1, delay_ms=0):
    return [(job_id, job_type, priority, delay_ms, f"body-{job_id}") for job_id in ids]


def test_an_enqueue_resent_with_its_token_changes_nothing(scripts):
    assert scripts.enqueue("tok", 100, 0, rows("a", "b")).status == "ok"
    assert scripts.enqueue("tok", 100, 0, rows("a", "b")).status == "again"
    assert scripts.enqueue("other", 100, 0, rows("a")).status == "dup"
    assert ready(scripts) == ["a", "b"]
    assert stats(scripts)["enqueued"] == 2
    check_invariants(scripts)


def test_an_enqueue_resent_after_its_job_finished_changes_nothing_and_its_token_expires_by_itself(scripts):
    assert scripts.enqueue("tok", 100, 0, rows("a")).status == "ok"
    taken = scripts.fetch("p1", "1", 1, LEASE_MS, 3, False)
    assert scripts.settle("p1", [SettleOp("S", taken.jobs[0].attempt)]) == 0
    assert scripts.enqueue("tok", 100, 0, rows("a")).status == "again"  # (the job's hash is gone)
    assert ready(scripts) == []
    assert 0 < scripts.client.pttl(key(scripts, "token:tok")) <= 60_000  # one key per token
    check_invariants(scripts)


def test_an_enqueue_row_brings_its_retries_and_last_error_and_shorter_rows_still_enqueue(scripts):
    scripts.enqueue("tok", 100, 0, [("full", "t", 1, 0, "body", 2, "ValueError: no"),
                                    ("no-error", "t", 1, 0, "body", 1),  # a row of before last_error
                                    ("bare", "t", 1, 0, "body")])  # a row of before retries
    fetched = scripts.fetch("p1", "1", 3, LEASE_MS, 3, False)
    assert [(j.id, j.retries, j.error) for j in fetched.jobs] == [
        ("full", 2, "ValueError: no"), ("no-error", 1, ""), ("bare", 0, "")]
    check_invariants(scripts)


def test_a_resent_fetch_returns_the_same_attempts_and_takes_nothing_more(scripts):
    scripts.enqueue("tok", 100, 0, rows("a", "b", "c"))
    first = scripts.fetch("p1", "1", 2, LEASE_MS, 3, False)
    again = scripts.fetch("p1", "1", 2, LEASE_MS, 3, True)
    assert [j.id for j in first.jobs] == ["a", "b"]
    assert again.jobs == first.jobs
    assert ready(scripts) == ["c"]
    assert scripts.client.hget(key(scripts, "running"), "t") == "2"
    check_invariants(scripts)


def test_ids_and_types_may_hold_any_character(scripts):
    odd = ["a:b", "line\nbreak", "{tag}", "é ü"]
    scripts.enqueue("tok", 100, 0, [(job_id, "ty:pe\n", 1, 0, "body") for job_id in odd])
    first = scripts.fetch("p1", "1", 4, LEASE_MS, 3, False)
    assert [j.id for j in first.jobs] == odd
    assert scripts.fetch("p1", "1", 4, LEASE_MS, 3, True).jobs == first.jobs  # a resend
    assert scripts.settle("p1", [SettleOp("S", j.attempt) for j in first.jobs]) == 0
    assert stats(scripts)["outstanding"] == 0
    check_invariants(scripts)


def test_a_resent_settle_is_stale_and_counts_once(scripts):
    scripts.enqueue("tok", 100, 0, rows("a"))
    attempt = scripts.fetch("p1", "1", 1, LEASE_MS, 3, False).jobs[0].attempt
    assert scripts.settle("p1", [SettleOp("S", attempt)]) == 0
    assert scripts.settle("p1", [SettleOp("S", attempt)]) == 1
    assert stats(scripts)["succeeded"] == 1
    assert stats(scripts)["outstanding"] == 0
    check_invariants(scripts)


def test_a_dead_process_attempts_go_back_to_the_head_and_its_late_settles_are_ignored(scripts):
    scripts.enqueue("tok", 100, 0, rows("a", "b", "c"))
    taken = scripts.fetch("p1", "1", 2, LEASE_MS, 3, False).jobs
    expire(scripts, "p1")
    reaped, crashed = scripts.reap(3)
    assert (reaped, crashed) == (1, [])
    assert sorted(ready(scripts)[:2]) == ["a", "b"] and ready(scripts)[2] == "c"
    assert scripts.client.hget(key(scripts, "job:a"), "c") == "1"
    # The reaped process's results are fenced, and it learns it was reaped.
    assert scripts.settle("p1", [SettleOp("S", taken[0].attempt)]) == 1
    assert scripts.fetch("p1", "2", 1, LEASE_MS, 3, True).reaped
    assert scripts.beat("p1", LEASE_MS, 3, True)[0] is False
    assert stats(scripts).get("succeeded", 0) == 0
    check_invariants(scripts)


def test_a_job_that_keeps_killing_its_process_ends_dead_reported_once(scripts):
    scripts.enqueue("tok", 100, 0, rows("poison"))
    crashed_reports = []
    for n in range(3):  # max_crash_recoveries = 2: the third crash is the end
        proc = f"p{n}"
        assert [j.id for j in scripts.fetch(proc, "1", 1, LEASE_MS, 2, False).jobs] == ["poison"]
        expire(scripts, proc)
        alive, _, crashed = scripts.beat("reaper", LEASE_MS, 2, False)
        assert alive
        crashed_reports.extend(crashed)
    assert [c.id for c in crashed_reports] == ["poison"]
    assert scripts.client.zrange(key(scripts, "dead"), 0, -1) == ["poison"]
    assert scripts.client.hget(key(scripts, "job:poison"), "x") == "crashed"
    assert stats(scripts)["failed"] == 1 and stats(scripts)["outstanding"] == 0
    assert scripts.reap(2) == (0, [])  # nothing reported twice
    check_invariants(scripts)


@pytest.mark.parametrize("late_return_first", [False, True])
def test_a_timed_out_attempt_holds_its_slot_until_it_returns_in_either_order(scripts, late_return_first):
    scripts.set_limits({"t": 1})
    scripts.enqueue("tok", 100, 0, rows("a"))
    attempt = scripts.fetch("p1", "1", 1, LEASE_MS, 3, False).jobs[0].attempt
    decision = SettleOp("y", attempt, retries=1, delay_ms=0, error="JobTimeout: late")
    late = SettleOp("E", attempt)
    if late_return_first:
        scripts.settle("p1", [late])
        assert scripts.client.hget(key(scripts, "running"), "t") is None  # returned: slot free
        scripts.settle("p1", [decision])
    else:
        scripts.settle("p1", [decision])
        # Retried, but the first attempt still runs: the retry is parked, not handed out.
        assert scripts.client.hget(key(scripts, "running"), "t") == "1"
        assert scripts.fetch("p1", "2", 1, LEASE_MS, 3, True).jobs == []
        scripts.settle("p1", [late])
    check_invariants(scripts)
    again = scripts.fetch("p1", "3", 1, LEASE_MS, 3, True).jobs
    assert [(j.id, j.retries, j.error) for j in again] == [("a", 1, "JobTimeout: late")]
    assert stats(scripts)["timed_out"] == 1 and stats(scripts)["retried"] == 1
    # A resend of either op changes nothing.
    assert scripts.settle("p1", [decision, late]) == 2
    check_invariants(scripts)


def test_a_saturated_type_is_parked_in_order_and_released_on_settle(scripts):
    scripts.set_limits({"slow": 1})
    scripts.enqueue("tok", 100, 0, rows("s1", "s2", "s3", job_type="slow") + rows("f1", job_type="fast"))
    first = scripts.fetch("p1", "1", 5, LEASE_MS, 3, False).jobs
    assert [j.id for j in first] == ["s1", "f1"]
    assert stats(scripts)["parked:1"] == 2
    check_invariants(scripts)
    nxt = scripts.fetch("p1", "2", 5, LEASE_MS, 3, True, [SettleOp("S", first[0].attempt)]).jobs
    assert [j.id for j in nxt] == ["s2"]
    assert scripts.set_limits({"slow": 3}) == 1  # a raised limit releases what now fits
    assert ready(scripts) == ["s3"]
    check_invariants(scripts)


# Fixed (perf36e): a fetch signalled the idle processes for the parked jobs its own settles let
# out, before its take took them: while one process held every slot of a type, the others woke
# once per fetch of it, fetched nothing and waited again (end to end with 2 processes x 9 threads,
# a type limited to 10: ~2,000 empty fetches and BLPOPs in 20,000 jobs, 0.31 round trips a job).
def test_a_fetch_wakes_no_idle_process_for_the_jobs_it_takes_itself_and_does_for_those_it_leaves(scripts):
    scripts.set_limits({"t": 2})
    scripts.enqueue("tok", 100, 0, rows("a", "b", "c", "d", "e"))
    first = scripts.fetch("p1", "1", 5, LEASE_MS, 3, False).jobs  # c, d, e parked
    assert [j.id for j in first] == ["a", "b"]
    signal = key(scripts, "signal")
    scripts.client.delete(signal)  # (an idle process took the enqueue's wake-up)
    second = scripts.fetch("p1", "2", 5, LEASE_MS, 3, True, [SettleOp("S", j.attempt) for j in first]).jobs
    assert [j.id for j in second] == ["c", "d"]
    assert scripts.client.llen(signal) == 0  # nothing another process could take: no wake-up
    check_invariants(scripts)
    assert scripts.fetch("p1", "3", 0, LEASE_MS, 3, True, [SettleOp("S", j.attempt) for j in second]).jobs == []
    assert ready(scripts) == ["e"] and scripts.client.llen(signal) == 1  # let out and left: a wake-up
    check_invariants(scripts)


# Fixed (duecount; test_scripts_follow_the_model's no-lost-wake-up invariant found it): a cancel
# that removed the ready job which a free slot of its type was waiting for left the older jobs of
# that type parked with the slot free, until some attempt of the type ended.
def test_a_cancelled_ready_job_lets_out_a_parked_one_of_its_type_for_the_free_slot(scripts):
    scripts.set_limits({"slow": 1})
    scripts.enqueue("tok", 100, 0, rows("s1", "s2", "s3", job_type="slow"))
    assert [j.id for j in scripts.fetch("p1", "1", 3, LEASE_MS, 3, False).jobs] == ["s1"]  # s2, s3 parked
    assert scripts.set_limits({"slow": 2}) == 1  # one slot more: s2 is let out for it
    assert ready(scripts) == ["s2"]
    assert scripts.cancel("ctok", "s2").status == "removed"
    check_invariants(scripts)
    assert [j.id for j in scripts.fetch("p2", "1", 3, LEASE_MS, 3, False).jobs] == ["s3"]  # the free slot
    check_invariants(scripts)


def test_release_gives_unstarted_attempts_back_to_the_head_in_order(scripts):
    scripts.enqueue("tok", 100, 0, rows("a", "b", "c", "d"))
    taken = scripts.fetch("p1", "1", 3, LEASE_MS, 3, False).jobs
    ops = [SettleOp("S", taken[0].attempt)] + [SettleOp("B", j.attempt) for j in reversed(taken[1:])]
    assert scripts.release("p1", ops).stale == 0
    assert ready(scripts) == ["b", "c", "d"]
    assert scripts.client.zscore(key(scripts, "procs"), "p1") is None
    assert stats(scripts)["succeeded"] == 1
    check_invariants(scripts)


def test_delayed_jobs_are_promoted_by_fetch_when_due(scripts):
    scripts.enqueue("tok", 100, 0, rows("later", delay_ms=60_000) + rows("soon", delay_ms=1))
    reply = scripts.fetch("p1", "1", 5, LEASE_MS, 3, False)
    while not reply.jobs:  # "soon" is due a millisecond after it was enqueued
        reply = scripts.fetch("p1", format(int(reply.now_ms), "x"), 5, LEASE_MS, 3, True)
    assert [j.id for j in reply.jobs] == ["soon"]
    assert reply.next_due_ms is not None and reply.next_due_ms > reply.now_ms + 50_000
    check_invariants(scripts)


def test_requeue_and_purge_dead(scripts):
    scripts.enqueue("tok", 100, 0, rows("a", "b"))
    taken = scripts.fetch("p1", "1", 2, LEASE_MS, 3, False).jobs
    scripts.settle("p1", [SettleOp("Z", j.attempt, 3, 0, "retries_exhausted", "boom") for j in taken])
    # Counted failed at once, and kept for p1 to report: unfinished (for join) until it says so.
    assert stats(scripts)["failed"] == 2 and stats(scripts)["outstanding"] == 2
    kept = scripts.client.hgetall(key(scripts, "reporting:p1"))
    assert sorted(kept) == sorted(f"{j.id}|retries_exhausted|p1|{j.attempt}" for j in taken)
    assert [json.loads(row)[:5] for row in sorted(kept.values())] == [
        ["a", "body-a", "3", "boom", "retries_exhausted"], ["b", "body-b", "3", "boom", "retries_exhausted"]]
    scripts.settle("p1", [SettleOp("A", field) for field in kept])
    assert stats(scripts)["outstanding"] == 0 and not scripts.client.exists(key(scripts, "reporting:p1"))
    assert scripts.requeue_dead(["a", "nope"]) == 1
    assert ready(scripts) == ["a"] and stats(scripts)["outstanding"] == 1
    assert scripts.client.hget(key(scripts, "job:a"), "r") == "0"
    assert scripts.purge_dead(["b", "a"]) == 1
    assert not scripts.client.exists(key(scripts, "job:b"))
    check_invariants(scripts)


def test_enqueueing_the_id_of_a_dead_job_replaces_it(scripts):
    scripts.enqueue("tok", 100, 0, rows("a"))
    attempt = scripts.fetch("p1", "1", 1, LEASE_MS, 3, False).jobs[0].attempt
    scripts.settle("p1", [SettleOp("Z", attempt, 2, 0, "retries_exhausted", "boom")])
    assert scripts.client.zrange(key(scripts, "dead"), 0, -1) == ["a"]
    assert scripts.enqueue("tok2", 100, 0, rows("a")).status == "ok"
    assert scripts.client.zrange(key(scripts, "dead"), 0, -1) == []
    assert scripts.client.hgetall(key(scripts, "job:a")) == {
        "t": "t", "p": "1", "b": "body-a", "r": "0", "k": "tok2", "o": "2",  # o: its FIFO order
        "u": key(scripts, "replaced:tok2|a")}  # u: where the dead job is kept aside for a take-back
    check_invariants(scripts)


def test_an_enqueue_batch_finds_a_known_id_anywhere_in_it(scripts):
    # A batch is looked at job by job only when some of its ids exist: the look must span the
    # whole batch, beyond the first chunk of ids, for duplicates and for dead jobs to replace.
    scripts.enqueue("tok", 10_000, 0, rows("a"))
    attempt = scripts.fetch("p1", "1", 1, LEASE_MS, 3, False).jobs[0].attempt
    scripts.settle("p1", [SettleOp("Z", attempt, 0, 0, "retries_exhausted", "boom")])  # "a" is dead
    scripts.enqueue("tok2", 10_000, 0, rows("b"))  # "b" is unfinished
    fresh = [f"n{k}" for k in range(1500)]
    reply = scripts.enqueue("tok3", 10_000, 0, rows(*fresh[:1200], "b", *fresh[1200:]))
    assert (reply.status, reply.duplicate_id) == ("dup", "b")
    assert ready(scripts) == ["b"]  # nothing of the refused batch stayed
    assert scripts.enqueue("tok4", 10_000, 0, rows(*fresh[:1200], "a", *fresh[1200:])).status == "ok"
    assert scripts.client.zrange(key(scripts, "dead"), 0, -1) == []
    assert scripts.client.hget(key(scripts, "job:a"), "k") == "tok4"
    assert ready(scripts) == ["b", *fresh[:1200], "a", *fresh[1200:]]
    assert stats(scripts)["enqueued"] == 2 + 1501
    check_invariants(scripts)


def _dead(scripts, job_id):
    scripts.enqueue("first-" + job_id, 100, 0, rows(job_id))
    attempt = scripts.fetch("p1", "f-" + job_id, 1, LEASE_MS, 3, False).jobs[0].attempt
    scripts.settle("p1", [SettleOp("Z", attempt, 0, 0, "retries_exhausted", "boom")])


def test_only_a_take_back_of_its_enqueue_brings_back_the_dead_job_it_replaced(scripts):
    client = scripts.client
    _dead(scripts, "a")
    died = client.zscore(key(scripts, "dead"), "a")
    scripts.enqueue("again", 100, 0, rows("a"))
    assert client.zrange(key(scripts, "dead"), 0, -1) == []
    assert 0 < client.pttl(key(scripts, "replaced:again|a")) <= 90_000  # kept aside for a while only
    assert scripts.cancel("c1", "a", take_back="other").status == "none"  # not that enqueue's job
    assert scripts.cancel("c2", "a", take_back="again").status == "removed"
    assert client.zrange(key(scripts, "dead"), 0, -1, withscores=True) == [("a", died)]
    assert client.hmget(key(scripts, "job:a"), "x", "e", "b") == ["retries_exhausted", "boom", "body-a"]
    assert client.pttl(key(scripts, "job:a")) == -1 and client.keys(key(scripts, "replaced:*")) == []
    # A plain cancel ends the new job only: the dead one stays replaced.
    scripts.enqueue("third", 100, 0, rows("a"))
    assert scripts.cancel("c3", "a").status == "removed"
    assert client.zrange(key(scripts, "dead"), 0, -1) == [] and not client.exists(key(scripts, "job:a"))
    check_invariants(scripts)


def test_a_taken_back_leased_job_brings_back_the_dead_job_when_its_attempt_ends(scripts):
    client = scripts.client
    _dead(scripts, "a")
    _dead(scripts, "b")
    scripts.enqueue("again", 100, 0, rows("a", "b"))
    attempts = {j.id: j.attempt for j in scripts.fetch("p2", "1", 2, LEASE_MS, 3, False).jobs}
    for job_id in ("a", "b"):
        assert scripts.cancel("c-" + job_id, job_id, take_back="again").status == "marked"
    assert client.pttl(key(scripts, "replaced:again|a")) == -1  # kept until its attempt ends
    assert client.zrange(key(scripts, "dead"), 0, -1) == []
    # Each ends as cancelled (given back, or failed for good before its process heard of the
    # mark), whatever its attempt did: its dead job is back.
    scripts.settle("p2", [SettleOp("B", attempts["a"]),
                          SettleOp("Z", attempts["b"], 0, 0, "permanent_failure", "newer")])
    assert client.hmget(key(scripts, "job:a"), "x", "e") == ["retries_exhausted", "boom"]
    assert client.hmget(key(scripts, "job:b"), "x", "e") == ["retries_exhausted", "boom"]
    assert sorted(client.zrange(key(scripts, "dead"), 0, -1)) == ["a", "b"]
    assert client.keys(key(scripts, "replaced:*")) == []
    check_invariants(scripts)


def test_a_dead_process_counts_a_crash_for_every_attempt_it_held(scripts):
    # Started or only buffered, Redis cannot tell: each counts (API: a job that kills its
    # process starts at most max_crash_recoveries + 1 times).
    scripts.enqueue("tok", 100, 0, rows("a", "b"))
    scripts.fetch("p1", "1", 2, LEASE_MS, 0, False)
    expire(scripts, "p1")
    assert sorted(c.id for c in scripts.reap(0)[1]) == ["a", "b"]


def test_a_resent_beat_reports_what_the_first_call_found_crashed(scripts):
    scripts.enqueue("tok", 100, 0, rows("poison"))
    scripts.fetch("p1", "1", 1, LEASE_MS, 0, False)
    expire(scripts, "p1")
    first = scripts.beat("p2", LEASE_MS, 0, False, "1")
    assert [c.id for c in first[2]] == ["poison"]
    again = scripts.beat("p2", LEASE_MS, 0, True, "1")  # its reply was lost: sent again
    assert again[0] and again[2] == first[2]  # (was [] without the beat id)
    assert scripts.beat("p2", LEASE_MS, 0, True, "2")[2] == []  # the next beat: nothing new
    scripts.release("p2")
    assert scripts.client.hgetall(key(scripts, "beaten")) == {}


def _state(scripts):
    """Every key of the queue, by suffix: what the ops left, the server times in it aside."""
    client = scripts.client
    state = {}
    for name in client.scan_iter(key(scripts, "*")):
        suffix = name[len(key(scripts, "")):]
        kind = client.type(name)
        if suffix == "clock" or suffix.startswith("token:"):
            continue  # server times; the calls' tokens
        if kind == "hash":
            state[suffix] = client.hgetall(name)
        elif kind == "list":
            state[suffix] = client.lrange(name, 0, -1)
        elif kind == "set":
            state[suffix] = sorted(client.smembers(name))
        elif kind == "zset":
            state[suffix] = client.zrange(name, 0, -1)  # members in order: their scores are times
        else:
            state[suffix] = client.get(name)
    return state


def test_ops_of_one_attempt_in_one_settle_call_apply_in_order(redis_client):
    # settle reads the in-flight entries of a call's attempts once, up front: a later op of an
    # attempt must see what an earlier op of the same call left (a timeout's X, a late return's
    # R, an end), as it would in a call of its own.
    def start(name):
        queue = Scripts(redis_client, name)
        queue.set_limits({"t": 20, "r": (20, 20, 60.0)})
        queue.enqueue("tok", 100, 0, rows("a", "b", "c", "d", "e", "f", "g") + rows("h", "i", job_type="r"))
        attempts = {j.id: j.attempt for j in queue.fetch("p1", "1", 9, LEASE_MS, 3, False).jobs}
        assert queue.cancel("c", "f").status == "marked"
        return queue, attempts

    def ops(attempts):
        timeout = dict(retries=1, delay_ms=0, error="JobTimeout: late")
        per_attempt = [
            [SettleOp("y", attempts["a"], **timeout), SettleOp("E", attempts["a"])],
            [SettleOp("E", attempts["b"]), SettleOp("z", attempts["b"], 0, 0, "timed_out", "JobTimeout")],
            [SettleOp("S", attempts["c"]), SettleOp("S", attempts["c"])],  # the second: a resend
            [SettleOp("Y", attempts["d"], 1, 0, "", "boom"), SettleOp("B", attempts["d"])],  # B: a resend
            [SettleOp("y", attempts["e"], **timeout), SettleOp("y", attempts["e"], **timeout)],  # a resend
            [SettleOp("y", attempts["f"], **timeout), SettleOp("E", attempts["f"])],  # marked: cancelled
            [SettleOp("E", attempts["g"]), SettleOp("E", attempts["g"])],  # the second: a resend
            [SettleOp("T", attempts["h"]), SettleOp("S", attempts["h"])],
            [SettleOp("T", attempts["i"]), SettleOp("B", attempts["i"])],
        ]
        return [op for step in zip(*per_attempt) for op in step]  # the attempts' ops interleaved

    together, attempts = start("together")
    assert together.settle("p1", ops(attempts)) == 4  # the resends
    apart, attempts = start("apart")
    assert sum(apart.settle("p1", [op]) for op in ops(attempts)) == 4
    assert _state(together) == _state(apart)
    assert _state(together)["inflight:p1"] == {attempts["e"]: "Xt", attempts["g"]: "Rt"}
    for queue in (together, apart):
        check_invariants(queue)


def test_a_settle_runs_as_many_commands_for_many_attempts_as_for_two(scripts):
    # One HMGET reads the entries of all its attempts, one HDEL removes them.
    scripts.enqueue("tok", 100, 0, rows(*(f"j{k}" for k in range(60))))
    attempts = [j.attempt for j in scripts.fetch("p1", "1", 60, LEASE_MS, 3, False).jobs]

    def commands_of_settling(batch):
        scripts.client.config_resetstat()
        assert scripts.settle("p1", [SettleOp("S", attempt) for attempt in batch]) == 0
        return sum(s["calls"] for name, s in scripts.client.info("commandstats").items() if name != "cmdstat_evalsha")

    assert commands_of_settling(attempts[:2]) == commands_of_settling(attempts[2:59])
    check_invariants(scripts)


# --- each script's text: the definitions of lib.lua it uses, in front (_scripts._script_text) ---

def script_texts():
    """Each script's text as Scripts sends it (a client that never connects: nothing is sent)."""
    redis = pytest.importorskip("redis")
    return {name: script.script for name, script in Scripts(redis.Redis(), "s")._script.items()}


def defined_names(text):
    """The names Lua ``text`` defines at its top level."""
    return set(re.findall(r"^local (?:function )?(\w+)", text, re.MULTILINE))


def undefined_lib_names(text):
    """The names of lib.lua's top-level definitions that Lua ``text`` uses but does not define."""
    code = re.sub(r"--\[\[.*?\]\]|--[^\n]*", "", text, flags=re.DOTALL)
    return (set(re.findall(r"[A-Za-z_]\w*", code)) & defined_names(_source("lib"))) - defined_names(code)


def test_every_script_text_defines_each_definition_of_lib_lua_it_uses():
    """A definition it needs left out would fail a call only when it runs (a global Redis refuses)."""
    assert undefined_lib_names(_source("fetch")) >= {"settle", "reap", "K_FETCHED"}  # (the check sees them)
    for name, text in script_texts().items():
        assert undefined_lib_names(text) == set(), name


def test_a_script_text_leaves_out_the_definitions_it_does_not_use_keeping_lib_lua_line_numbers():
    """Redis runs a script's whole text on every call: the definitions it does not use cost each call."""
    texts = script_texts()
    assert defined_names(texts["unfinished"]) == {"P", "READY", "K_DELAYED", "K_STATS", "K_CLOCK", "ready_left",
                                                  "began"}
    assert "settle" in defined_names(texts["fetch"]) and "enqueue_jobs" not in defined_names(texts["fetch"])
    lib = _source("lib").split("\n")
    for name, text in texts.items():
        lines = text.split("\n")
        assert lines[len(lib):] == _source(name).split("\n"), name  # (lib.lua, a newline, the script)
        assert all(line in ("", kept) for line, kept in zip(lines, lib)), name


def test_lib_lua_holds_only_definitions_each_from_its_local_line_to_the_next():
    """What _script_text relies on: a statement of another kind at the top level of lib.lua would
    be cut off with the definition above it whenever a script does not use that one."""
    code = re.sub(r"--\[\[.*?\]\]", lambda comment: "\n" * comment.group().count("\n"), _source("lib"), flags=re.DOTALL)
    for line in code.split("\n"):
        if line and not line[0].isspace() and not line.startswith("--"):
            assert re.match(r"local (function \w+\(|\w+ = )|end\b", line), line
