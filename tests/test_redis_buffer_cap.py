"""buffer_size over a broker, path by path (API.md "Queue", "Delayed jobs", "Scale-out";
docs/redis.md): no script moves the ready jobs (parked ones included) past buffer_size. A job
owed a place that finds no room waits for it in Redis, counted in ``waiting_for_room``, and
the call that makes room moves it in: nothing is dropped, nothing is pushed past the cap, and
no timer polls for it. Driven through the scripts' low-level API (tinymq/redis/_scripts.py),
as tests/test_redis_model.py, whose state machine checks the cap after every call.
"""
from typing import List

import pytest

from tinymq.redis._scripts import Scripts, SettleOp

LEASE = 60_000  # ms
CAP = 2  # buffer_size


@pytest.fixture
def scripts(redis_client):
    return Scripts(redis_client, "cap")


def rows(*ids, priority=1, delay_ms=0, job_type="t"):
    return [(job_id, job_type, priority, delay_ms, f"body-{job_id}") for job_id in ids]


def ready(scripts: Scripts, level: int = 1) -> List[str]:
    return scripts.client.lrange(scripts.key(f"ready:{level}"), 0, -1)


def waiting(scripts: Scripts) -> List[str]:
    """The ids in `delayed` that are due: those owed a place, waiting for room."""
    seconds, micros = scripts.client.time()
    return scripts.client.zrangebyscore(scripts.key("delayed"), "-inf", seconds * 1000 + micros / 1000)


def make_due(scripts: Scripts) -> None:
    """Every delayed job is due now (its due time moved far back, as a clock jump would)."""
    for member in scripts.client.zrange(scripts.key("delayed"), 0, -1):
        scripts.client.zincrby(scripts.key("delayed"), -10**9, member)


def fetch(scripts: Scripts, proc: str, fetch_id: str, n: int, ops=()):
    return scripts.fetch(proc, fetch_id, n, LEASE, 3, fetch_id != "1", list(ops), CAP)


def test_a_due_job_waits_for_room_and_the_fetch_that_makes_it_lets_it_in(scripts):
    assert scripts.enqueue("t1", CAP, 0, rows("d", delay_ms=60_000)).status == "ok"  # (make_due: due now)
    assert scripts.enqueue("t2", CAP, 0, rows("a", "b")).status == "ok"
    make_due(scripts)
    first = fetch(scripts, "p", "1", 0)  # takes nothing: the buffer is full, the due job waits
    assert ready(scripts) == ["a", "b"] and waiting(scripts) == ["d"]
    assert first.next_due_ms is None, "a timer armed for a due job that has no room would poll"
    sizes, delayed, _, waiting_for_room = scripts.stats(CAP)
    assert (sizes, delayed, waiting_for_room) == ((0, 2, 0), 0, 1)
    assert scripts.enqueue("t3", CAP, 0, rows("late")).status == "full"
    taken = fetch(scripts, "p", "2", 1)
    assert [job.id for job in taken.jobs] == ["a"]
    assert ready(scripts) == ["b", "d"] and waiting(scripts) == []


def test_a_resent_fetch_arms_no_timer_for_a_job_that_waits_for_room(scripts):
    """redis-py resends a fetch whose reply was lost: the reply it gets again leaves out the due
    job that waits for room as the first one did (a timer for it would fetch at once, for nothing)."""
    scripts.enqueue("t1", CAP, 0, rows("d", delay_ms=60_000))
    scripts.enqueue("t2", CAP, 0, rows("a", "b"))
    make_due(scripts)
    assert fetch(scripts, "p", "1", 0).next_due_ms is None
    again = fetch(scripts, "p", "1", 0)
    assert waiting(scripts) == ["d"]
    assert again.next_due_ms is None, f"a resend armed a timer at {again.next_due_ms} for a job that has no room"


def test_a_retry_without_delay_at_a_full_buffer_waits_for_room(scripts):
    scripts.enqueue("t1", CAP, 0, rows("a"))
    attempt = fetch(scripts, "p", "1", 1).jobs[0].attempt
    scripts.enqueue("t2", CAP, 0, rows("b", "c"))
    assert fetch(scripts, "p", "2", 0, [SettleOp("Y", attempt, 1, 0, "", "boom")]).stale == 0
    assert ready(scripts) == ["b", "c"] and waiting(scripts) == ["a"]
    assert [job.id for job in fetch(scripts, "p", "3", 1).jobs] == ["b"]
    assert ready(scripts) == ["c", "a"]


def test_a_retry_that_waits_for_room_arms_no_timer_at_any_microsecond(redis_client):
    """The retry waits in `delayed` scored by the fetch's now to the microsecond; the reply's
    next due time leaves it out. (It once did about every other time: the script wrote that
    now into its bound as Lua text, which keeps 14 digits, 0.1 ms, and rounded it down.)"""
    for round_ in range(20):
        scripts = Scripts(redis_client, f"cap{round_}")
        scripts.enqueue("t1", CAP, 0, rows("a"))
        attempt = fetch(scripts, "p", "1", 1).jobs[0].attempt
        scripts.enqueue("t2", CAP, 0, rows("b", "c"))
        reply = fetch(scripts, "p", "2", 0, [SettleOp("Y", attempt, 1, 0, "", "boom")])
        assert waiting(scripts) == ["a"]
        assert reply.next_due_ms is None, f"a timer armed at {reply.next_due_ms} for a job that has no room"


def test_a_retry_that_waits_for_room_goes_in_when_the_same_fetch_makes_some(scripts):
    scripts.enqueue("t1", CAP, 0, rows("a"))
    attempt = fetch(scripts, "p", "1", 1).jobs[0].attempt
    scripts.enqueue("t2", CAP, 0, rows("b", "c"))
    reply = fetch(scripts, "p", "2", 1, [SettleOp("Y", attempt, 1, 0, "", "boom")])
    assert [job.id for job in reply.jobs] == ["b"]
    assert ready(scripts) == ["c", "a"] and waiting(scripts) == [], "room made, and a job left waiting for it"


def test_a_job_a_give_back_made_wait_goes_in_when_the_same_fetch_makes_room(scripts):
    scripts.enqueue("t1", CAP, 0, rows("a", "b"))
    attempts = [job.attempt for job in fetch(scripts, "p", "1", 2).jobs]
    scripts.enqueue("t2", CAP, 0, rows("c"))
    # a retry without delay looks for room first (none: it waits), then b is given back
    reply = fetch(scripts, "p", "2", 2, [SettleOp("Y", attempts[0], 1, 0, "", "boom"), SettleOp("B", attempts[1])])
    assert [job.id for job in reply.jobs] == ["b", "c"]
    assert ready(scripts) == ["a"] and waiting(scripts) == []


@pytest.mark.parametrize("how", ["give-back", "release", "reap"])
def test_jobs_given_back_keep_their_head_and_the_last_ready_job_waits_for_room(scripts, how):
    scripts.enqueue("t1", CAP, 0, rows("a", "b"))
    attempts = [job.attempt for job in fetch(scripts, "p", "1", 2).jobs]
    scripts.enqueue("t2", CAP, 0, rows("c", "d"))
    if how == "give-back":  # buffered jobs that waited too long go back (op B)
        assert scripts.settle("p", [SettleOp("B", attempt) for attempt in attempts]) == 0
    elif how == "release":  # stop()
        scripts.release("p", [SettleOp("B", attempt) for attempt in attempts])
    else:  # its process died: the reaper gives its leases back
        scripts.client.zadd(scripts.key("procs"), {"p": 0})
        assert scripts.reap(3)[0] == 1
    assert ready(scripts) == ["a", "b"], "given-back jobs keep their place at the head"
    assert waiting(scripts) == ["c", "d"], "the last ready jobs wait for room, in their order"
    assert scripts.enqueue("t3", CAP, 0, rows("e")).status == "full"
    assert [job.id for job in fetch(scripts, "q", "1", 1).jobs] == ["a"]
    assert ready(scripts) == ["b", "c"] and waiting(scripts) == ["d"]


def test_a_dead_job_requeued_at_a_full_buffer_waits_for_room(scripts):
    scripts.enqueue("t1", CAP, 0, rows("x"))
    attempt = fetch(scripts, "p", "1", 1).jobs[0].attempt
    fetch(scripts, "p", "2", 0, [SettleOp("Z", attempt, 0, 0, "permanent_failure", "no")])
    scripts.enqueue("t2", CAP, 0, rows("a", "b"))
    assert scripts.requeue_dead(["x"]) == 1
    assert ready(scripts) == ["a", "b"] and waiting(scripts) == ["x"]


def test_a_cancel_of_a_ready_job_lets_a_waiting_job_in(scripts):
    scripts.enqueue("t1", CAP, 0, rows("d", delay_ms=60_000))  # (make_due: due now)
    scripts.enqueue("t2", CAP, 0, rows("a", "b"))
    make_due(scripts)
    fetch(scripts, "p", "1", 0)
    assert waiting(scripts) == ["d"]
    assert scripts.cancel("c1", "a").status == "removed"
    assert ready(scripts) == ["b", "d"] and waiting(scripts) == []


def test_a_give_back_never_makes_wait_the_job_a_free_slot_of_its_type_waits_for(scripts):
    """A tail job of a type with parked jobs may be the one a free slot of its type waits for:
    it stays, and the job given back waits for room itself (it left its slot to the parked job
    let out for it)."""
    scripts.set_limits({"a": 1})
    cap = 3
    scripts.enqueue("t1", cap, 0, rows("a1", job_type="a"))
    attempt = scripts.fetch("p", "1", 1, LEASE, 3, False, [], cap).jobs[0].attempt
    scripts.enqueue("t2", cap, 0, rows("a2", "a3", job_type="a"))
    assert scripts.fetch("q", "1", 2, LEASE, 3, False, [], cap).jobs == []  # both parked: a's slot is taken
    scripts.enqueue("t3", cap, 0, rows("x", job_type="a"))
    assert scripts.settle("p", [SettleOp("B", attempt)]) == 0  # the slot frees: a2 is let out for it
    assert ready(scripts) == ["a2", "x"] and waiting(scripts) == ["a1"]
    assert scripts.client.lrange(scripts.key("parked:1:a"), 0, -1) == ["a3"]
