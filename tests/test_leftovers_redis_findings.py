"""Findings left open by the last review of the Redis broker, each reproduced against a real
redis-server before its fix.

Each test's docstring says the symptom, how to reproduce it, and what the docs promise.
"""
import json
import logging
import threading
import time

import pytest

from tinymq import DuplicateJob, Job, Queue, TinyMQError

from _helpers import WAIT, wait_until

_BODY = '["t",1,null,1.0,1.0,null,null]'  # what encode_job writes for Job("t")


def _client(url):
    import redis as redis_py

    return redis_py.Redis.from_url(url, decode_responses=True)


def _write_waiting_job(client, prefix, job_id):
    """What another program may write: a job hash of type "t" (no enqueue token), waiting at MEDIUM."""
    client.hset(prefix + "job:" + job_id, mapping={"t": "t", "p": 1, "b": _BODY})
    client.rpush(prefix + "ready:1", job_id)


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
    _write_waiting_job(client, prefix, "theirs")
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
    _write_waiting_job(client, prefix, "theirs")
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


# --- 1. a frozen Redis (SIGSTOP: connected, silent) ------------------------------------------------


def test_join_with_a_timeout_returns_in_time_while_redis_is_frozen(own_redis_server):
    """Symptom: while Redis is frozen (SIGSTOP, a stalled VM, a full network buffer: connected
    but silent), q.join(0.5) returned False after 10 s, the socket timeout of its poll.
    API.md: join(timeout) returns False on timeout, as the standard library's waits do.
    A second join(0.5) in the same freeze took 10 s even once the first was bounded: the
    connection the first gave up on is opened again, and redis-py's connect waits for the
    server's handshake replies with the socket timeout.
    Fix: each look of join() waits for its reply no longer than the time left (0.5 s at least),
    and a connection not known open is opened within that time too (on a thread of its own)."""
    from tinymq.redis import RedisBroker

    q = Queue(broker=RedisBroker(own_redis_server.url, name="frozen-join", lease=2.0))
    q.enqueue(Job("t"))  # unfinished: join() waits for it
    try:
        with own_redis_server.frozen():
            for _ in range(3):  # (a caller that looks again and again)
                began = time.monotonic()
                assert q.join(0.5) is False
                assert time.monotonic() - began < 3.0
        assert q.join(0.0) is False  # Redis answers again: the job is there, unfinished
    finally:
        q.stop()


def test_enqueue_raises_within_its_stated_bound_while_redis_is_frozen(own_redis_server):
    """Symptom: enqueue() into a frozen Redis raised after about 30 s (three sends, each waiting
    its 10 s socket timeout), and enqueue(block=True, timeout=1) as late; its error said the
    jobs were not enqueued, though the call may have reached Redis and run (at-least-once: a
    caller that believed it would not know to look). docs/redis.md states the bound (10 s
    without a reply) and that the outcome is unknown.
    Fix: a call's resends share one deadline, the caller's timeout if sooner; the error says
    the jobs may or may not have been enqueued."""
    from tinymq.redis import RedisBroker

    q = Queue(broker=RedisBroker(own_redis_server.url, name="frozen-enqueue", lease=2.0))
    try:
        q.enqueue(Job("t", id="before"))  # (a producer at work: its connection is open)
        with own_redis_server.frozen():
            began = time.monotonic()
            with pytest.raises(TinyMQError, match="frozen-enqueue.*may or may not have been enqueued"):
                q.enqueue(Job("t", id="timed"), block=True, timeout=1.0)
            assert time.monotonic() - began < 5.0
            began = time.monotonic()
            with pytest.raises(TinyMQError, match="frozen-enqueue.*may or may not have been enqueued"):
                q.enqueue(Job("t", id="untimed"))
            assert time.monotonic() - began < 20.0  # 10 s stated (plus a connect, on a loaded machine)
        # Whether they got in is learnt by enqueueing them again: the server, woken, may have run
        # the calls it had read (DuplicateJob), or not (in they go now); either way, once.
        for job_id in ("timed", "untimed"):
            try:
                q.enqueue(Job("t", id=job_id))
            except DuplicateJob:
                pass
        assert q.get_stats().jobs_enqueued == 3
    finally:
        q.stop()


def test_stop_with_a_timeout_returns_in_time_while_redis_is_frozen_and_the_job_runs_again(own_redis_server):
    """Symptom: stop(timeout=1) of a worker whose Redis froze returned after about a minute:
    it waited for its threads' calls, then for the release's three sends, each up to the 10 s
    socket timeout. Fix: stop()'s timeout bounds the link's stop too (each wait, and each call
    to Redis); what it could not give back returns when its lease runs out (at least once)."""
    from tinymq.redis import RedisBroker

    url = own_redis_server.url
    started = threading.Event()
    runs = []

    def run(job, ctx):
        runs.append(job.id)
        started.set()
        ctx.wait(3 * WAIT)  # until stop() cancels it

    q = Queue(broker=RedisBroker(url, name="frozen-stop", lease=1.0))
    q.register_executor("t", run)
    other = Queue(broker=RedisBroker(url, name="frozen-stop", lease=1.0))
    other.register_executor("t", lambda job: runs.append(job.id))
    try:
        q.start_dispatcher(1)
        q.enqueue(Job("t", id="held"))
        assert started.wait(WAIT)
        with own_redis_server.frozen():
            began = time.monotonic()
            q.stop(timeout=1.0)
            assert time.monotonic() - began < 6.0
        other.start_dispatcher(1)
        assert other.join(WAIT + 10)
        assert runs == ["held", "held"]
    finally:
        q.stop()
        other.stop()


def test_a_cancel_without_a_reply_says_its_outcome_is_unknown(own_redis_server):
    """Symptom: a cancel whose call got no reply raised "could not cancel job ...", though the
    call may have reached Redis and run (as for enqueue: the reply, not the call, was lost),
    so a caller believing it would leave a cancelled job for dead or cancel nothing again.
    docs/redis.md: the error says the outcome is unknown; cancelling again tells.
    Fix: the error says the job may or may not have been cancelled, and what to do."""
    from tinymq.redis import RedisBroker

    q = Queue(broker=RedisBroker(own_redis_server.url, name="cancel-unanswered", lease=2.0))
    try:
        q.enqueue(Job("t", id="waiting"))  # (no executor here: it waits in Redis)
        own_redis_server.stop()
        with pytest.raises(TinyMQError, match="cancel-unanswered.*'waiting'.*may or may not have been "
                                              "cancelled; cancel it again"):
            q.cancel("waiting")
        own_redis_server.start()
        assert q.cancel("waiting") is True  # (it had not got in: cancelled now, once)
        assert q.get_stats().jobs_cancelled == 1
    finally:
        q.stop()
