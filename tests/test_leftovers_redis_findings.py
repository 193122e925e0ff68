"""Findings left open by the last review of the Redis broker, each reproduced against a real
redis-server before its fix.

Each test's docstring says the symptom, how to reproduce it, and what the docs promise.
"""
import json
import logging
import threading

from tinymq import Job, Queue

from _helpers import WAIT, wait_until

_BODY = '["t",1,null,1.0,1.0,null,null]'  # what encode_job writes for Job("t")


def _client(url):
    import redis as redis_py

    return redis_py.Redis.from_url(url, decode_responses=True)


def _prefix(name):
    return f"tmq:{{{name}}}:"


# --- 2. a row that trips its reporter ---------------------------------------------------------

def test_a_handed_row_that_trips_the_reporter_is_reported_once_not_once_per_lease(redis_url, caplog):
    """Symptom: a row handed to a process to report (reporting:<proc>) whose report raised in
    the reporter thread (here: retries "²" in Redis, a digit to str.isdigit() that int()
    refuses, so the stand-in job of undecodable_job raised ValueError) killed the reporter;
    the process let its id go as if killed (_crashed), the row went with it to whoever
    reaped it, whose reporter died on it in turn: once per lease, for ever, and join() never
    returned. Reproduce: a dead process's reporting hash holding such a row; start a worker.
    docs/redis.md: a report is repeated only when its process was killed after its callbacks
    ran; a failure callback that raises is logged and the queue goes on (API.md).
    Fix: the stand-in takes only ASCII digits as retries; and a row no job can be made of is
    logged as an ERROR naming it and acknowledged, never left to kill its reporter."""
    from tinymq.redis import RedisBroker

    name = "trips-reporter"
    prefix = _prefix(name)
    client = _client(redis_url)
    key = "odd|crashed|gone|f1|1"
    client.hset(prefix + "reporting:gone", key, json.dumps(["odd", _BODY, "²", "", "crashed", key, 1]))
    client.zadd(prefix + "procs", {"gone": 1})  # its lease ran out long ago
    client.hset(prefix + "stats", "outstanding", 1)  # (the row holds join() until acknowledged)
    q = Queue(broker=RedisBroker(redis_url, name=name, lease=0.5))
    reported = []
    q.register_executor("t", lambda job: None)
    q.on_failure(lambda job, reason, exc: reported.append((job.id, reason, job.retries)))
    try:
        with caplog.at_level(logging.ERROR, logger="tinymq"):
            q.start_dispatcher(1)
            assert q.join(WAIT)
        assert reported == [("odd", "crashed", 0)]
        assert not [r for r in caplog.records if "crashed" in r.getMessage() and "lets its id" in r.getMessage()]
        assert client.hgetall(prefix + "reporting:gone") == {}
    finally:
        q.stop()
        client.close()


def test_a_fetched_foreign_job_with_odd_retries_is_failed_once_and_the_pump_goes_on(redis_url):
    """Symptom: a job hash written by another program with retries that are a non-ASCII digit
    ("²") killed the pump that fetched it (the stand-in job raised ValueError), over and over:
    each lease its process let its id go, the job was counted a crash, and finally its
    "crashed" row killed every reporter it was handed to (above). Reproduce: HSET job:<id>
    with r "²" and RPUSH its id to a ready list; start a worker. docs/redis.md "Dead jobs": a
    job whose retries are not a number is undecodable: failed for good by the worker that
    fetches it, reported once, listed dead.
    Fix: undecodable_job takes only ASCII digits as retries (else 0)."""
    from tinymq.redis import RedisBroker

    name = "odd-retries"
    prefix = _prefix(name)
    client = _client(redis_url)
    client.hset(prefix + "job:odd", mapping={"t": "t", "p": 1, "b": _BODY, "r": "²"})
    client.rpush(prefix + "ready:1", "odd")
    q = Queue(broker=RedisBroker(redis_url, name=name, lease=0.5))
    ran, reported = [], []
    q.register_executor("t", lambda job: ran.append(job.id))
    q.on_failure(lambda job, reason, exc: reported.append((job.id, reason)))
    try:
        q.start_dispatcher(1)
        q.enqueue(Job("t", id="after"))
        assert q.join(WAIT)
        assert ran == ["after"] and reported == [("odd", "permanent_failure")]
        (dead,) = q.broker.dead_jobs()
        assert (dead.job.id, dead.reason) == ("odd", "permanent_failure")
        assert int(client.hget(prefix + "stats", "outstanding")) == 0
    finally:
        q.stop()
        client.close()


# --- 3. jobs written outside enqueue.lua --------------------------------------------------------

def test_join_waits_for_a_job_another_program_wrote_and_outstanding_stays_true(redis_url):
    """Symptom: a job hash that another program wrote (or a restore of job keys without the
    stats hash) with its id pushed to a ready list was never counted in stats.outstanding:
    join() returned True while it waited, and once it ran the count went to -1, so that
    join() then returned while a job enqueued afterwards was still unfinished.
    Reproduce: HSET job:<id> t/p/b, RPUSH ready:1; q.join(0.5) -> True (no worker ran it);
    run it: outstanding -1. docs/redis.md: join() waits until the shared queue has no
    unfinished job; "Dead jobs" treats jobs written by another program as jobs of the queue.
    Fix: fetch counts a job hash without an enqueue token (k) once, as it sees it (and marks
    it counted); join() also waits while a job waits in a ready list or the delayed set."""
    from tinymq.redis import RedisBroker

    name = "foreign-count"
    prefix = _prefix(name)
    client = _client(redis_url)
    client.hset(prefix + "job:theirs", mapping={"t": "t", "p": 1, "b": _BODY})
    client.rpush(prefix + "ready:1", "theirs")
    q = Queue(broker=RedisBroker(redis_url, name=name, lease=2.0))
    ran = []
    release = threading.Event()

    def run(job):
        ran.append(job.id)
        if job.id == "mine":
            release.wait(WAIT)

    q.register_executor("t", run)
    try:
        assert q.join(0.5) is False  # nobody ran it yet
        q.start_dispatcher(1)
        assert q.join(WAIT)
        assert ran == ["theirs"]
        assert int(client.hget(prefix + "stats", "outstanding")) == 0
        q.enqueue(Job("t", id="mine"))
        assert q.join(0.5) is False  # (with the count at -1, 0 here: True)
        release.set()
        assert q.join(WAIT) and ran == ["theirs", "mine"]
    finally:
        release.set()
        q.stop()
        client.close()


def test_cancelling_a_waiting_job_another_program_wrote_keeps_outstanding_at_zero(redis_url):
    """Symptom: q.cancel() of a waiting job that another program wrote counted it finished,
    though nothing had counted it unfinished: outstanding -1 (see above).
    Fix: cancel.lua counts such a job (no enqueue token k) unfinished as it removes it."""
    from tinymq.redis import RedisBroker

    name = "foreign-cancel"
    prefix = _prefix(name)
    client = _client(redis_url)
    client.hset(prefix + "job:theirs", mapping={"t": "t", "p": 1, "b": _BODY})
    client.rpush(prefix + "ready:1", "theirs")
    q = Queue(broker=RedisBroker(redis_url, name=name, lease=2.0))
    reported = []
    q.on_failure(lambda job, reason, exc: reported.append((job.id, reason)))
    try:
        assert q.cancel("theirs")
        assert q.join(WAIT)
        assert reported == [("theirs", "cancelled")]
        assert int(client.hget(prefix + "stats", "outstanding")) == 0
    finally:
        q.stop()
        client.close()


def test_outstanding_never_goes_below_zero_when_the_stats_hash_was_lost(redis_url):
    """Symptom: with the stats hash deleted (or restored from another moment than the jobs)
    while a job ran, its end took outstanding to -1, and join() then returned while the next
    job enqueued was unfinished. Fix: a count that would go below 0 is 0 (lib.lua's
    flush_counts): jobs ended that nothing counted."""
    from tinymq.redis import RedisBroker

    name = "stats-lost"
    prefix = _prefix(name)
    client = _client(redis_url)
    q = Queue(broker=RedisBroker(redis_url, name=name, lease=2.0))
    started, release = threading.Event(), threading.Event()

    def run(job):
        started.set()
        release.wait(WAIT)

    q.register_executor("t", run)
    try:
        q.start_dispatcher(1)
        q.enqueue(Job("t", id="first"))
        assert started.wait(WAIT)
        client.delete(prefix + "stats")
        release.set()
        assert wait_until(lambda: client.hget(prefix + "stats", "outstanding") is not None)  # its settle
        assert client.hget(prefix + "stats", "outstanding") == "0"
        started.clear()
        release.clear()
        q.enqueue(Job("t", id="second"))
        assert started.wait(WAIT)
        assert q.join(0.5) is False
        release.set()
        assert q.join(WAIT)
    finally:
        release.set()
        q.stop()
        client.close()
