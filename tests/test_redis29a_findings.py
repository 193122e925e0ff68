"""Findings of redis29a (session 29): defects of the Redis broker around lost job data, durations
and logs.

Each test failed on the code before its fix; its docstring says the symptom, how to
reproduce it, and what the docs promise.
"""
import logging
import threading

import pytest

from tinymq import ExecutorConfig, Job, PermanentFailure, RetryConfig

from _backends import Redis
from _helpers import WAIT, wait_until

pytestmark = pytest.mark.redis

LEASE_MS = 60_000


@pytest.fixture
def scripts(redis_client):
    from tinymq.redis._scripts import Scripts

    return Scripts(redis_client, "s")


@pytest.fixture
def quiet(redis_url):
    """A long lease: no heartbeat tells the worker of anything during a test."""
    made = Redis(redis_url, lease=40.0)
    yield made
    made.close()


def _rows(*ids, delay_ms=0):
    return [(job_id, "t", 1, delay_ms, f'{{"id": "{job_id}"}}') for job_id in ids]


def _stats(client, key):
    return {k: int(v) for k, v in client.hgetall(key("stats")).items()}


def _gone_errors(caplog, job_id):
    return [r for r in caplog.records if r.levelno == logging.ERROR and f"job {job_id} " in r.getMessage()
            and "data" in r.getMessage() and "on_failure" in r.getMessage()]


# --- 1. a failure for good of a job whose hash Redis lost ---------------------------------------


@pytest.mark.parametrize("op", ["Z", "z"])
def test_a_failure_for_good_of_a_job_whose_hash_is_gone_writes_no_dead_hash(scripts, op):
    """Symptom: a failure for good (Z; z, decided at a timeout) of an attempt whose job hash Redis
    lost while it ran wrote a dead hash anew, half (no type, body, priority): dead_jobs() listed a
    stand-in with missing fields, and it counted as failed (and timed out).
    Reproduce: fetch a job, delete its hash, settle its failure for good.
    docs/redis.md (Dead jobs): a job whose data Redis lost is lost, counted in no counter but the
    unfinished one, dropped and named for a worker to log, as job_gone does everywhere else."""
    from tinymq.redis._scripts import SettleOp

    client, key = scripts.client, scripts.key
    assert scripts.enqueue("e1", 100, 0, _rows("f1", "kept")).status == "ok"
    jobs = {j.id: j.attempt for j in scripts.fetch("P", "1", 2, LEASE_MS, 3, False).jobs}
    client.delete(key("job:f1"))
    reply = scripts.fetch("P", "2", 0, LEASE_MS, 3, True,
                          [SettleOp(op, jobs["f1"], 1, 0, "retries_exhausted", "boom")])
    assert reply.gone == ["f1"]
    assert client.zcard(key("dead")) == 0
    assert not client.exists(key("job:f1"))
    assert client.hlen(key("reporting:P")) == 0  # no row: nothing of the job is left to report
    stats = _stats(client, key)
    assert stats["outstanding"] == 1  # "kept", still in flight
    assert (stats.get("failed", 0), stats.get("timed_out", 0)) == (0, 0)
    assert int(client.hget(key("running"), "t")) == (2 if op == "z" else 1)  # (z: it may still run)


def test_an_eviction_of_a_delayed_job_whose_hash_is_gone_writes_no_dead_hash(scripts):
    """The same for an eviction (max_delayed_jobs): the evicted job's hash was gone; its dead
    hash was written anew, half, and it was reported as evicted with an empty body."""
    client, key = scripts.client, scripts.key
    assert scripts.enqueue("e1", 100, 1, _rows("old", delay_ms=60_000)).status == "ok"
    client.delete(key("job:old"))
    reply = scripts.enqueue("e2", 100, 1, _rows("new", delay_ms=60_000))
    assert (reply.status, reply.evicted) == ("ok", [])
    assert client.zcard(key("dead")) == 0 and not client.exists(key("job:old"))
    stats = _stats(client, key)
    assert (stats["outstanding"], stats.get("evicted", 0), stats.get("failed", 0)) == (1, 0, 0)
    assert scripts.heartbeat("Q", LEASE_MS, 3, False, "b1").gone == ["old"]


@pytest.mark.parametrize("callback", [True, False], ids=["on_failure", "no-callback"])
def test_a_job_whose_hash_redis_lost_as_it_failed_for_good_is_lost_not_dead(quiet, callback, caplog):
    """End to end: a job's hash is deleted while its attempt runs, which then fails for good. It
    is no dead job (dead_jobs() listed a stand-in without its type or payload), the worker logs
    the ERROR of a lost job, runs no on_failure callback for it (with one registered, the
    failure waits for its settle's reply, which says the job is gone), and join() returns."""

    producer, worker = quiet.pair()
    client = __import__("redis").Redis.from_url(quiet.url, decode_responses=True)
    key = f"tmq:{{{quiet.queue_name}}}:job:doomed"
    reported = []

    def work(job):
        client.delete(key)  # behind the queue's back, as an eviction would
        raise PermanentFailure("no")

    worker.register_executor("t", work)
    if callback:
        worker.on_failure(lambda job, reason, exc: reported.append((job.id, reason)))
    try:
        producer.enqueue(Job("t", id="doomed"))
        with caplog.at_level(logging.ERROR, logger="tinymq"):
            worker.start_dispatcher(1)
            assert producer.join(WAIT)
            assert wait_until(lambda: _gone_errors(caplog, "doomed"))
        assert quiet.brokers[-1].dead_jobs() == []
        assert reported == []
        stats = producer.get_stats()
        assert (stats.jobs_failed, stats.jobs_succeeded) == (0, 0)
    finally:
        client.close()


# --- 2. the duration of a timed-out attempt that stop() handed back ---------------------------


def _durations(q):
    counts, total = q._attempt_durations().get("t", ((), 0.0))
    return sum(counts), total


@pytest.mark.parametrize("kind", ["thread", "async"])
def test_a_timed_out_attempt_stop_handed_back_records_no_duration(quiet, kind):
    """Symptom: over Redis, an attempt that timed out and that stop() handed back before its
    retry was decided (it runs again elsewhere: its timeout counts nowhere) still had its duration
    recorded in its type's histogram (tinymq_attempt_duration_seconds), at its deadline.
    Reproduce: hold the retry's decision (link.retry) past the deadline, stop(), let it go on.
    Expected: as in-process, where an attempt stop() gave back records none, and as over Redis
    its timeout: recorded where its end is decided, once it stands."""
    import asyncio

    producer, worker = quiet.pair()
    stuck = threading.Event()

    async def hang(job):
        await asyncio.sleep(WAIT)

    fn = hang if kind == "async" else (lambda job: stuck.wait(WAIT))
    worker.register_executor("t", fn, ExecutorConfig(timeout=0.1))
    link = worker._link
    holding, go_on = threading.Event(), threading.Event()
    retry = link.retry

    def held(*args, **kwargs):
        holding.set()
        assert go_on.wait(WAIT)
        return retry(*args, **kwargs)

    link.retry = held
    producer.enqueue(Job("t", "x", retry_config=RetryConfig(max_retries=2, initial_delay=0.0)))
    worker.start_dispatcher(1)
    stopping = threading.Thread(target=worker.stop, kwargs={"wait": False})
    try:
        assert holding.wait(WAIT)
        stopping.start()
        assert wait_until(lambda: link._released)  # the release hands what it holds back
        go_on.set()
        stopping.join(WAIT)
        assert not stopping.is_alive()
    finally:
        go_on.set()
        stuck.set()
    assert _durations(worker) == (0, 0.0)
    assert worker.get_stats().executor_stats["t"].timed_out == 0


@pytest.mark.parametrize("kind", ["thread", "async"])
def test_a_timed_out_attempt_whose_retry_stands_records_its_duration_once(quiet, kind):
    """A guard: a timed-out attempt whose retry is decided records its duration, once."""
    import asyncio

    producer, worker = quiet.pair()
    stuck = threading.Event()

    async def hang(job):
        if job.retries == 0:
            await asyncio.sleep(WAIT)

    fn = hang if kind == "async" else (lambda job: job.retries or stuck.wait(WAIT))
    worker.register_executor("t", fn, ExecutorConfig(timeout=0.1))
    try:
        producer.enqueue(Job("t", "x", retry_config=RetryConfig(max_retries=2, initial_delay=0.0)))
        worker.start_dispatcher(2)
        assert producer.join(WAIT)
        assert _durations(worker)[0] == 2  # the timeout and the success
        assert worker.get_stats().executor_stats["t"].timed_out == 1
    finally:
        stuck.set()
        worker.stop()


# --- 3. the log of a retry that a cancel overtook -----------------------------------------------


def _logged(caplog, text):
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


def test_a_retry_a_cancel_of_this_process_overtook_over_redis_is_logged_as_cancelled(quiet, caplog):
    """Symptom: a retry decided as cancelled (its attempt timed out; this process's cancel came
    before the retry was decided, so Redis ends it as cancelled and it counts as cancelled only)
    was logged at INFO as "failed (...); retry 1 of 2", as if it would run again.
    Reproduce: hold the dispatcher's attempt_failed after a timeout, cancel, let it go on.
    Expected: the log says it is not retried, ending as cancelled."""
    producer, worker = quiet.pair()
    stuck = threading.Event()
    holding, go_on = threading.Event(), threading.Event()
    attempt_failed = worker._dispatcher.attempt_failed

    def held(*args, **kwargs):
        holding.set()
        assert go_on.wait(WAIT)
        attempt_failed(*args, **kwargs)

    worker._dispatcher.attempt_failed = held
    worker.register_executor("t", lambda job: stuck.wait(WAIT), ExecutorConfig(timeout=0.1))
    try:
        with caplog.at_level(logging.INFO, logger="tinymq"):
            producer.enqueue(Job("t", id="overtaken", retry_config=RetryConfig(max_retries=2, initial_delay=0.0)))
            worker.start_dispatcher(1)
            assert holding.wait(WAIT)
            assert worker.cancel("overtaken")
            go_on.set()
            assert producer.join(WAIT)
            assert wait_until(lambda: _logged(caplog, "not retried: a cancel overtook its retry 1 of 2"))
        assert _logged(caplog, "; retry 1 of") == []
        assert _logged(caplog, "stays counted here as a retry") == []  # (counted as cancelled here)
        assert len(_logged(caplog, "job overtaken (t) failed (")) == 1
        assert worker.get_stats().executor_stats["t"].retried == 0
    finally:
        go_on.set()
        stuck.set()


def test_a_retry_a_cancel_from_elsewhere_overruled_over_redis_is_logged_as_cancelled(quiet, caplog):
    """The same when this process hears of the cancel only from its settle's reply (a cancel from
    another process reached Redis first): the retry stays counted here (a counter never goes
    down), and the reply's news is logged, as it is for a failure for good."""
    producer, worker = quiet.pair()
    started, let_go = threading.Event(), threading.Event()

    def run(job):
        started.set()
        assert let_go.wait(WAIT)
        raise ValueError("boom")

    worker.register_executor("t", run)
    link = worker._link
    link._cancel_marked = lambda attempts: None  # deaf to marks: only the reply tells it
    try:
        with caplog.at_level(logging.INFO, logger="tinymq"):
            producer.enqueue(Job("t", id="x", retry_config=RetryConfig(max_retries=2, initial_delay=0.0)))
            worker.start_dispatcher(1)
            assert started.wait(WAIT)
            with link._round_lock:  # no round meanwhile: the retry waits to be sent
                assert producer.cancel("x") is True  # leased: marked in Redis only
                let_go.set()
                assert wait_until(lambda: link._ops)
            assert producer.join(WAIT)
            assert wait_until(lambda: _logged(caplog, "reached Redis before its retry"))
        assert _logged(caplog, "job x (t) was cancelled: a cancel from another process reached Redis before "
                               "its retry, which stays counted here as a retry")
    finally:
        let_go.set()


@pytest.mark.parametrize("backoff", [0.0, 60.0], ids=["retry_now", "retry_later"])
def test_a_retry_a_cancel_overtook_in_process_is_logged_as_cancelled(backoff, caplog):
    """In-process: a cancel that came after the retry was counted, before it was placed, ends the
    job as cancelled (the move finds its mark); it was logged "retry 1 of 5" all the same."""
    from tinymq import Queue

    from test_cancel_in_transit import HoldAtRetry

    q = Queue()
    hold = HoldAtRetry()

    def fail(job):
        raise RuntimeError("again")

    q.register_executor("t", fail)
    hold.install(q)
    try:
        with caplog.at_level(logging.INFO, logger="tinymq"):
            q.start_dispatcher(1)
            q.enqueue(Job("t", id="r", retry_config=RetryConfig(max_retries=5, initial_delay=backoff)))
            assert hold.reached.wait(WAIT)
            assert q.cancel("r") is True
            hold.go_on.set()
            assert q.join(WAIT)
        assert _logged(caplog, "; retry 1 of") == []
        assert len(_logged(caplog, "job r (t) failed (RuntimeError: again); not retried: a cancel overtook "
                                   "its retry 1 of 5")) == 1
        assert len(_logged(caplog, "job r (t) was cancelled")) == 1
    finally:
        hold.go_on.set()
        q.stop()


# --- 4. what the model test found once it lost job hashes ---------------------------------------


def test_a_lost_job_let_out_for_a_free_slot_lets_the_next_parked_job_out(scripts):
    """Symptom: a job let out of its parked line for a free slot of its type (its id back in its
    ready list), whose hash Redis then lost, was dropped by the fetch that met it; the jobs parked
    behind it stayed parked beside the free slot for ever (no attempt of the type ran to free
    another). Found by the model test's invariant (no lost wake-up) once it deletes job hashes.
    Expected: the fetch that drops such an id lets parked jobs out into free slots."""
    from tinymq.redis._scripts import SettleOp

    client, key = scripts.client, scripts.key
    scripts.set_limits({"t": 1})
    assert scripts.enqueue("e1", 100, 0, _rows("a", "b", "c")).status == "ok"
    first = scripts.fetch("P", "1", 3, LEASE_MS, 3, False).jobs
    assert [j.id for j in first] == ["a"] and client.lrange(key("parked:1:t"), 0, -1) == ["b", "c"]
    scripts.fetch("P", "2", 0, LEASE_MS, 3, True, [SettleOp("S", first[0].attempt)])  # b let out
    client.delete(key("job:b"))
    reply = scripts.fetch("P", "3", 3, LEASE_MS, 3, True)
    assert reply.gone == ["b"]
    taken = reply.jobs or scripts.fetch("P", "4", 3, LEASE_MS, 3, True).jobs
    assert [j.id for j in taken] == ["c"]
    assert _stats(client, key)["outstanding"] == 1


@pytest.mark.parametrize("op", ["Z", "z"])
def test_a_cancel_by_its_process_of_a_job_whose_hash_is_gone_keeps_no_row(scripts, op):
    """Symptom: a process's own cancel of its attempt (a Z or z op for reason "cancelled") whose job
    hash Redis lost was kept as a row to report with an empty body, and counted cancelled.
    Expected: the job is lost, as for any other op (job_gone): no row, no counter but the unfinished one."""
    from tinymq.redis._scripts import SettleOp

    client, key = scripts.client, scripts.key
    assert scripts.enqueue("e1", 100, 0, _rows("x")).status == "ok"
    attempt = scripts.fetch("P", "1", 1, LEASE_MS, 3, False).jobs[0].attempt
    client.delete(key("job:x"))
    reply = scripts.fetch("P", "2", 0, LEASE_MS, 3, True, [SettleOp(op, attempt, 0, 0, "cancelled", "")])
    assert reply.gone == ["x"]
    assert client.hlen(key("reporting:P")) == 0
    stats = _stats(client, key)
    assert (stats.get("outstanding", 0), stats.get("cancelled", 0)) == (0, 0)


@pytest.mark.parametrize("ends", ["settle", "reap"])
def test_a_marked_attempt_whose_moved_hash_is_gone_is_lost(scripts, ends):
    """The same for an attempt that a cancel marked, whose hash (moved to cancelled:<proc>|<attempt>)
    Redis lost: its settle, or the reap of its process, reported a row with an empty body."""
    from tinymq.redis._scripts import SettleOp

    client, key = scripts.client, scripts.key
    assert scripts.enqueue("e1", 100, 0, _rows("x")).status == "ok"
    attempt = scripts.fetch("P", "1", 1, LEASE_MS, 3, False).jobs[0].attempt
    assert scripts.cancel("c1", "x").status == "marked"
    client.delete(key(f"cancelled:P|{attempt}"))
    if ends == "settle":
        reply = scripts.fetch("P", "2", 0, LEASE_MS, 3, True, [SettleOp("S", attempt)])
        assert (reply.gone, reply.crashed, list(reply.overruled)) == (["x"], [], [])
    else:
        client.zadd(key("procs"), {"P": 0})
        beat = scripts.heartbeat("Q", LEASE_MS, 3, False, "b1")
        assert (beat.gone, beat.crashed) == (["x"], [])
    assert client.hlen(key("reporting:P")) == 0 and client.llen(key("reports")) == 0
    stats = _stats(client, key)
    assert (stats.get("outstanding", 0), stats.get("cancelled", 0)) == (0, 0)
