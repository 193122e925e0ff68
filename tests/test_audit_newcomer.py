"""Findings of a newcomer's audit of the user-facing surface (README, docs, CLI, bad input)."""
import datetime
import re
import sys
import threading

import pytest

import tinymq
from tinymq import Job


# --- status --redis: one snapshot ------------------------------------------------------------

# Fixed: `python -m tinymq status --redis` read its figures with several calls (the stats script,
# then the executors, then the dead jobs), so a job that moved between two of them was counted
# twice or not at all: a dead job requeued meanwhile was neither ready nor dead in the report.
# Every figure it prints now comes from one script call (status.lua).


@pytest.mark.redis
def test_status_redis_counts_each_job_once_while_another_process_requeues(redis_backend, monkeypatch):
    from tinymq._status import redis_status
    from tinymq.redis import _scripts

    worker = redis_backend.queue(buffer_size=100)
    failed = threading.Event()
    worker.on_failure(lambda job, reason, exc: failed.set())

    @worker.executor("fail")
    def fail(job):
        raise tinymq.PermanentFailure("no")

    worker.start_dispatcher(1)
    worker.enqueue(Job("fail", id="dead-1"))
    assert worker.join(timeout=30) and failed.is_set()
    worker.stop()
    producer = redis_backend.queue(buffer_size=100)
    producer.enqueue(Job("waits", id="ready-1"))  # no process runs "waits": it stays ready

    import redis as redis_py

    other_client = redis_py.Redis.from_url(redis_backend.url, decode_responses=True)
    other = _scripts.Scripts(other_client, redis_backend.queue_name)  # another process
    real_call = _scripts.Scripts._call
    moved = []

    def call_then_requeue(self, script, args):
        reply = real_call(self, script, args)
        if script in ("stats", "status") and not moved:  # status has read (some of) its figures
            moved.append(other.requeue_dead(["dead-1"]))
        return reply

    monkeypatch.setattr(_scripts.Scripts, "_call", call_then_requeue)
    try:
        report = redis_status(redis_backend.url, redis_backend.queue_name)
    finally:
        other_client.close()
    assert moved == [1]
    counts = report["counts"]
    # Read before the requeue: "dead-1" is dead, "ready-1" ready, each counted once.
    assert counts == {"ready": 1, "waiting_for_room": 0, "delayed": 0, "taken": 0, "dead": 1}
    assert sum(level["ready"] for level in report["priorities"].values()) == counts["ready"]
    assert [entry["id"] for entry in report["dead_jobs"]] == ["dead-1"]
    assert report["counters"]["jobs_failed"] == 1 and report["counters"]["jobs_enqueued"] == 2
    assert report["executors"]["fail"] == {"taken": 0, "max_jobs": 10, "rate_limit": None}


# --- counts beyond the compiled core's C integers ------------------------------------------------

# Fixed: a count above sys.maxsize (buffer_size=10**30) passed the config's checks; the compiled
# core then raised "OverflowError: Python int too large to convert to C ssize_t", naming no value,
# when the Queue was built or the executor registered, while the pure core took it. Both cores
# now see the same ValueError, raised by the config, naming the field and the value.

HUGE = sys.maxsize + 1


@pytest.mark.parametrize("make, field", [
    (lambda: tinymq.Config(buffer_size=HUGE), "buffer_size"),
    (lambda: tinymq.Config(max_delayed_jobs=HUGE), "max_delayed_jobs"),
    (lambda: tinymq.ExecutorConfig(max_concurrent_jobs=HUGE), "max_concurrent_jobs"),
    (lambda: tinymq.RetryConfig(max_retries=HUGE), "max_retries"),
    (lambda: tinymq.RateLimit(HUGE, per=1.0), "max_starts"),
    (lambda: tinymq.Queue(HUGE), "buffer_size"),
    (lambda: tinymq.Job("t").with_max_retries(HUGE), "max_retries"),
])
def test_a_count_beyond_sys_maxsize_is_refused_naming_it(make, field):
    with pytest.raises(ValueError, match=rf"^{field} must be <= sys.maxsize .*got {HUGE}$"):
        make()


def test_a_retry_number_beyond_sys_maxsize_is_refused_naming_it():
    with pytest.raises(ValueError, match=rf"got {HUGE}$"):
        tinymq.RetryConfig().retry_delay(HUGE)


def test_counts_up_to_sys_maxsize_work_on_either_core():
    q = tinymq.Queue(config=tinymq.Config(buffer_size=sys.maxsize, max_delayed_jobs=sys.maxsize))
    try:
        q.register_executor("t", lambda job: None, tinymq.ExecutorConfig(max_concurrent_jobs=sys.maxsize))
        stats = q.get_stats()
        assert stats.executor_stats["t"].max_jobs == sys.maxsize
        assert stats.max_delayed_jobs == sys.maxsize
    finally:
        q.stop()
    assert tinymq.RetryConfig(max_retries=sys.maxsize).retry_delay(sys.maxsize) == 300.0


# --- job.retries is checked at enqueue -----------------------------------------------------------

# Fixed: enqueue took any job.retries (job.retries = "x", None, -1, 2.5). The first failed attempt
# then could not schedule its retry ("can only concatenate str", or retry_delay refusing k=0):
# the job failed for good at once with that internal error instead of being retried. enqueue now
# refuses such a job, naming the value, like every other attribute the queue relies on.


@pytest.mark.parametrize("retries, error", [
    ("x", TypeError), (None, TypeError), (2.5, TypeError), (True, TypeError),
    (-1, ValueError), (sys.maxsize + 1, ValueError),
])
@pytest.mark.parametrize("enqueue", ["enqueue", "enqueue_many"])
def test_enqueue_refuses_a_bad_retries_naming_it(retries, error, enqueue):
    q = tinymq.Queue(10)
    try:
        job = Job("t")
        job.retries = retries
        with pytest.raises(error, match=rf"^retries must .*got {retries!r}$"):
            q.enqueue(job) if enqueue == "enqueue" else q.enqueue_many([job])
        assert q.get_stats().jobs_enqueued == 0
    finally:
        q.stop()


def test_a_job_enqueued_with_retries_already_made_gets_the_ones_left():
    q = tinymq.Queue(10)
    failures = []
    attempts = []

    @q.executor("t")
    def fail(job):
        attempts.append(job.retries)
        raise ValueError("no")

    q.on_failure(lambda job, reason, exc: failures.append((reason, job.retries)))
    q.start_dispatcher(1)
    try:
        job = Job("t", retry_config=tinymq.RetryConfig(max_retries=3, initial_delay=0.0))
        job.retries = 2  # say, recovered from a store of your own
        q.enqueue(job)
        assert q.join(timeout=30)
    finally:
        q.stop()
    assert attempts == [2, 3]
    assert failures == [("retries_exhausted", 4)]


# --- unschedule refuses what cannot be a schedule's name ------------------------------------------

# Fixed: q.unschedule(5) returned False ("no such schedule") and q.unschedule(["a"]) raised
# "unhashable type: 'list'", where q.cancel(5) raises a TypeError naming the value. A name is
# a str: anything else is now refused the same way.


@pytest.mark.parametrize("name", [5, None, ["heartbeat"], b"heartbeat"])
def test_unschedule_refuses_a_name_that_is_not_a_str(name):
    q = tinymq.Queue(10)
    try:
        q.every(60, "heartbeat")
        with pytest.raises(TypeError, match=r"^schedule name must be a str, got " + re.escape(repr(name)) + "$"):
            q.unschedule(name)
        assert [schedule.name for schedule in q.schedules()] == ["heartbeat"]
        assert q.unschedule("heartbeat") is True and q.unschedule("heartbeat") is False
    finally:
        q.stop()


# --- start_dispatcher when the system has no thread left ----------------------------------------

# Fixed: start_dispatcher(workers) raised "RuntimeError: can't start new thread", naming nothing,
# when the system ran out of threads part of the way, and left the queue half started: some
# workers ran and took jobs, while the scheduler (delayed jobs, retries) or the watchdog
# (timeouts) never started. It now names the workers asked for and stops the queue.


@pytest.mark.parametrize("threads_given", [2, 4, 5])  # among workers; the loop; the scheduler
def test_start_dispatcher_without_threads_left_names_workers_and_stops_the_queue(monkeypatch, threads_given):
    real_start = threading.Thread.start
    given = []

    def start(thread):
        if thread.name.startswith("tinymq-"):
            if len(given) == threads_given:
                raise RuntimeError("can't start new thread")
            given.append(thread)
        real_start(thread)

    monkeypatch.setattr(threading.Thread, "start", start)
    q = tinymq.Queue(10)
    q.register_executor("t", lambda job: None)
    with pytest.raises(RuntimeError, match=r"start_dispatcher\(workers=4\).*can't start new thread"):
        q.start_dispatcher(4)
    with pytest.raises(tinymq.QueueStopped):
        q.enqueue(Job("t"))
    for thread in given:
        thread.join(timeout=30)
        assert not thread.is_alive()
    q.stop()  # still idempotent


# --- status --db: one read of the file -------------------------------------------------------------

# Fixed: `status --db` read the counts, the unfinished jobs, the dead jobs and the quarantined
# rows with four reads, each at its own moment: a job a live queue saved in between showed in
# the priority table and not in the counts (or the other way round). They are now read in one
# read transaction.


def test_status_db_counts_and_tables_agree_while_the_owner_writes(tmp_path, monkeypatch):
    from tinymq._status import db_status
    from tinymq.persistence import sqlite

    path = str(tmp_path / "jobs.db")
    owner = tinymq.SQLitePersistence(path)
    owner.save(Job("email", id="first"))
    real_reading = sqlite.SQLitePersistence._reading
    saved = []

    def reading_then_save(store, work):
        result = real_reading(store, work)
        if getattr(work, "__name__", "") != "_check_schema" and not saved:  # status has read something
            saved.append(owner.save(Job("email", id="second")))
        return result

    monkeypatch.setattr(sqlite.SQLitePersistence, "_reading", reading_then_save)
    try:
        report = db_status(path)
    finally:
        owner.close()
    assert saved == [None]
    due = sum(level["due"] for level in report["priorities"].values())
    assert report["counts"]["ready"] + report["counts"]["running"] == due == 1
    assert report["types"] == {"email": {"due": 1, "delayed": 0}}


# --- every(first_at=...) names first_at ------------------------------------------------------------

# Fixed: a bad first_at was refused as "run_at must be a finite number, got nan": a parameter
# the caller never passed. The message now names first_at.


@pytest.mark.parametrize("first_at, error", [
    (float("nan"), ValueError), (float("inf"), ValueError), ("tomorrow", TypeError), (True, TypeError),
    (datetime.datetime(2030, 1, 1), ValueError),  # naive
])
def test_every_names_a_bad_first_at(first_at, error):
    q = tinymq.Queue(10)
    try:
        with pytest.raises(error, match=r"^first_at must .*got " + re.escape(repr(first_at))):
            q.every(60, "heartbeat", first_at=first_at)
        assert q.schedules() == []
    finally:
        q.stop()
