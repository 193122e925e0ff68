"""An outside attack on the Redis broker's buffer cap and its neighbours (session 31): each test
is a defect found, failing before its fix. Real redis-server (tests/conftest.py's fixtures)."""
import re
import time

import pytest

from tinymq import Config, Job, Queue
from tinymq.redis import RedisBroker

from _helpers import WAIT


def _overwrite(redis_client, q, job_id):
    key = q._link.scripts.key("job:" + job_id)
    redis_client.delete(key)
    redis_client.set(key, "another program's value")


# --- 1. get_stats() and status over a due job whose key another program overwrote -------------------

# A due delayed job waiting for room (the buffer full) whose job:<id> key another program overwrote
# with a string made get_stats() and `status --redis` fail with WRONGTYPE (queue_sizes read its
# priority with a bare HGET) for as long as it waited, though such a job is lost, not a fault of
# every call (docs/redis.md, Dead jobs). get_stats() reads no due job beyond the buffer's room (since
# fix33r: a read of each made a get_stats() loop starve the fetches that make room), so there it
# counts as waiting for room, as it counts as unfinished, until the call that moves it drops it;
# `status --redis`, which (no worker process having fetched) reads the first 1000 due jobs' priorities,
# reads it and leaves it out, as a deleted hash.

@pytest.mark.redis
def test_stats_and_status_read_a_queue_whose_due_job_another_program_overwrote(redis_url, redis_client):
    broker = RedisBroker(redis_url, name="planted", lease=2.0)
    q = Queue(config=Config(buffer_size=2), broker=broker)
    try:
        q.enqueue(Job("t", {}, id="d", run_at=time.time() + 0.2))
        q.enqueue(Job("t", {}, id="a"))
        q.enqueue(Job("t", {}, id="b"))
        by = time.monotonic() + WAIT
        while q.get_stats().waiting_for_room != 1:  # due, and no room for it
            assert time.monotonic() < by
            time.sleep(0.01)
        _overwrite(redis_client, q, "d")
        stats = q.get_stats()
        assert (stats.medium_queue_size, stats.waiting_for_room, stats.delayed_jobs_count) == (2, 1, 0)
        status, _ = broker._status(10, 1000)  # (what `python -m tinymq status --redis` prints)
        assert (status.sizes, status.delayed) == ((0, 2, 0), 0)
    finally:
        q.stop(timeout=WAIT)
        broker.close()


# --- 2. An eviction that meets a delayed job whose key another program overwrote -------------------

# With max_delayed_jobs reached, an enqueue_delayed evicts the earliest delayed job. When that job's
# key held a string or a list (another program's), the script failed with WRONGTYPE after it had
# taken the id out of the delayed set: the enqueue raised, and the job's id was gone without being
# counted finished, so join() waited for ever. It is a lost job now (docs/redis.md, Dead jobs): the
# enqueue evicts nothing, and the job counts finished.

@pytest.mark.redis
@pytest.mark.parametrize("kind", ["string", "list"])
def test_an_eviction_that_meets_an_overwritten_delayed_job_drops_it_as_lost(redis_url, redis_client, kind):
    broker = RedisBroker(redis_url, name="evict", lease=2.0)
    q = Queue(config=Config(buffer_size=2, max_delayed_jobs=2), broker=broker)
    failed = []
    q.on_failure(lambda job, reason, exc: failed.append((job.id, reason)))
    try:
        q.enqueue(Job("t", {}, id="d1", run_at=time.time() + 600))
        q.enqueue(Job("t", {}, id="d2", run_at=time.time() + 600))
        key = q._link.scripts.key("job:d1")
        redis_client.delete(key)
        if kind == "string":
            redis_client.set(key, "another program's value")
        else:
            redis_client.rpush(key, "another program's value")
        q.enqueue(Job("t", {}, id="d3", run_at=time.time() + 600))
        assert failed == [], "a lost job is reported to no callback"
        assert q.get_stats().delayed_jobs_count == 2
        assert q.cancel("d2") and q.cancel("d3")
        assert q.join(timeout=WAIT), "join() waits for a job that is gone"
    finally:
        q.stop(timeout=WAIT)
        broker.close()


# --- 3. A retry owed a place, and the Redis server's clock set back ----------------------------------

# A retry without delay that meets a full buffer waits for room in `delayed`, scored by the server's
# now (lib.lua's to_tail); a due delayed job that finds no room keeps its due time. Set the server's
# clock back (an NTP step, a restored VM) and such a job is no longer due: the fetch that makes room
# lets it wait on, `enqueue` takes new jobs ahead of it (no QueueFull while a job owed a place
# waits), and it runs only once the clock catches up again, however far back it went. Jobs that a
# give-back made wait are scored by their FIFO order and stay due. A fix needs the jobs owed a place
# kept apart from the due times (a line of their own, or scores below every due time for all of
# them, with lib.lua's promote_due, stats and the scripts' model test reworked): more than this
# session's time allowed.

@pytest.mark.redis
@pytest.mark.xfail(strict=True, reason="a job owed a place waits by a due time of the server's clock: a clock "
                                       "set back makes it not due (see the comment above)")
def test_a_retry_owed_a_place_stays_due_when_the_servers_clock_is_set_back(redis_client):
    from tinymq.redis._scripts import Scripts, SettleOp

    scripts, cap, lease = Scripts(redis_client, "clockback"), 2, 60_000

    def fetch(fetch_id, n, ops=()):
        return scripts.fetch("p", fetch_id, n, lease, 3, fetch_id != "1", list(ops), cap)

    def rows(*ids):
        return [(job_id, "t", 1, 0, f"body-{job_id}") for job_id in ids]

    scripts.enqueue("t1", cap, 0, rows("a"))
    attempt = fetch("1", 1).jobs[0].attempt
    scripts.enqueue("t2", cap, 0, rows("b", "c"))
    fetch("2", 0, [SettleOp("Y", attempt, 1, 0, "", "boom")])  # the retry finds no room: it waits
    assert scripts.stats(cap)[3] == 1
    delayed = scripts.key("delayed")
    for member in redis_client.zrange(delayed, 0, -1):  # the server's clock set back ten minutes
        redis_client.zincrby(delayed, 600_000, member)
    assert scripts.stats(cap)[3] == 1, "the retry no longer counts as waiting for room"
    assert [job.id for job in fetch("3", 1).jobs] == ["b"]
    assert redis_client.lrange(scripts.key("ready:1"), 0, -1) == ["c", "a"], "room made, and the retry not let in"


# --- 4. A resent fetch that meets a job whose key another program overwrote ---------------------------

# A fetch whose reply was lost is sent again as it was (the pump resends it until it gets a reply).
# The resend read the body of each attempt the first call took with a bare HMGET: one whose job key
# another program overwrote meanwhile with a string failed it with WRONGTYPE, every time, so the
# process resent it for ever, its heartbeat renewing the lease of the attempts it never got. The
# overwritten job is left out of the resent reply now, as a job whose hash is gone is.

@pytest.mark.redis
def test_a_resent_fetch_leaves_out_a_job_whose_key_another_program_overwrote(redis_client):
    from tinymq.redis._scripts import Scripts

    scripts = Scripts(redis_client, "resend")
    scripts.enqueue("t1", 10, 0, [("a", "t", 1, 0, "{}"), ("b", "t", 1, 0, "{}")])
    first = scripts.fetch("p", "1", 2, 60_000, 3, False, [], 10)
    assert [job.id for job in first.jobs] == ["a", "b"]
    redis_client.delete(scripts.key("job:a"))
    redis_client.set(scripts.key("job:a"), "another program's value")
    again = scripts.fetch("p", "1", 2, 60_000, 3, True, [], 10)  # its reply was lost: sent again
    assert [job.id for job in again.jobs] == ["b"]


# --- 5. A schedule tick whose previous job's key another program overwrote ----------------------------

# Each tick of an `every`/`cron` schedule looks at the job its previous tick fired (busy while it is
# unfinished). That look was a bare HMGET: once another program overwrote that job's key with a string
# (the job is then lost), every later tick of the schedule failed with WRONGTYPE, and the schedule
# never fired again. Such a job is no job now: the tick fires.

@pytest.mark.redis
def test_a_tick_fires_after_another_program_overwrote_the_previous_ticks_job(redis_client):
    from tinymq.redis._scripts import Scripts

    scripts = Scripts(redis_client, "ticks")
    now_us = int(time.time() * 1e6)
    assert scripts.schedule_tick("s", now_us - 2_000_000, "k1", 10, 0, ("s1", "t", 1, 0, "{}"))[0] == "fire"
    redis_client.delete(scripts.key("job:s1"))
    redis_client.set(scripts.key("job:s1"), "another program's value")
    assert scripts.schedule_tick("s", now_us - 1_000_000, "k2", 10, 0, ("s2", "t", 1, 0, "{}"))[0] == "fire"


# --- 6. The key an error blames, in a queue that has no `seq` yet ---------------------------------------

# A call that met a value of another kind (WRONGTYPE) looks for the queue's key that holds it, to name
# it. In a queue that had no ready job yet (no `seq` key), that look read the missing `seq` as the text
# "None" and blamed it: "Redis key 'tmq:{NAME}:seq' holds None, not a whole number", sending the user
# after a key that is fine. A missing key holds nothing wrong.

@pytest.mark.redis
def test_an_error_over_another_programs_value_does_not_blame_a_missing_seq(redis_client):
    from tinymq.redis._scripts import Scripts

    scripts = Scripts(redis_client, "noseq")  # (no job ever went to a ready list: no seq)
    named = scripts.wrong_kinds(True)  # what a WRONGTYPE over a job's key, say, adds to its error
    assert scripts.key("seq") not in named
    assert "another program wrote it" in named


# --- 7. An enqueue whose job id's key holds another program's value -------------------------------------

# An enqueue of a job whose id's key (job:<id>) held a value of another kind (another program's) failed
# with Redis's bare WRONGTYPE, naming no key (and, in a queue without a `seq` yet, blaming that one: 6).
# It is refused naming the key now, with nothing of the call written; the value is left as it was.

@pytest.mark.redis
@pytest.mark.parametrize("delayed", [False, True])
def test_an_enqueue_over_another_programs_value_at_its_jobs_key_names_the_key(redis_url, redis_client, delayed):
    from tinymq import TinyMQError

    broker = RedisBroker(redis_url, name="planted-id", lease=2.0)
    q = Queue(config=Config(buffer_size=2), broker=broker)
    try:
        key = q._link.scripts.key("job:x")
        redis_client.set(key, "another program's value")
        with pytest.raises(TinyMQError, match="Redis key " + re.escape(repr(key)) + " holds a string") as refused:
            q.enqueue(Job("t", {}, id="x", run_at=time.time() + 60 if delayed else None))
        assert "1 job not enqueued" in str(refused.value) and "may or may not" not in str(refused.value)
        assert redis_client.get(key) == "another program's value"
        assert q.get_stats().jobs_enqueued == 0
        q.enqueue(Job("t", {}, id="y"))  # the others go on
    finally:
        q.stop(timeout=WAIT)
        broker.close()


@pytest.mark.redis
def test_a_tick_whose_jobs_key_holds_another_programs_value_fails_naming_it_and_fires_nothing(redis_client):
    import redis

    from tinymq.redis._scripts import Scripts

    scripts = Scripts(redis_client, "tickplanted")
    redis_client.set(scripts.key("job:s1"), "another program's value")
    named = "Redis key " + re.escape(repr(scripts.key("job:s1"))) + " holds a string"
    with pytest.raises(redis.ResponseError, match=named):
        scripts.schedule_tick("s", int(time.time() * 1e6) - 1_000_000, "k1", 10, 0, ("s1", "t", 1, 0, "{}"))
    assert redis_client.hget(scripts.key("schedule:s"), "fired") is None
    assert redis_client.get(scripts.key("job:s1")) == "another program's value"
