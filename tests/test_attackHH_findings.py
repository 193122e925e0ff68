"""Findings of attackHH: periodic jobs, odd values at the edges of the public API (job
attributes, exceptions, text Redis cannot carry, callbacks), the Redis broker's view of a job
(retries, undecodable jobs, a full server, stop), the worker CLI's check of its target, and
interrupt_on_timeout landing inside the SQLite store's writes; attacked from outside
(shared/API.md, docs/api.md, docs/redis.md and docs/cli.md are the contract).

Each test asserts what a user relies on. One that fails today is marked
``xfail(strict=True)`` with the defect as its reason: it starts passing (and then fails
as an unexpected pass, until the mark is removed) once the defect is fixed.
"""
import threading
import time
from datetime import datetime

import pytest

from tinymq import Job, Queue, RetryConfig

from _helpers import WAIT
from test_cli import project, shared_project  # noqa: F401 (fixtures)

GAP = 0.5  # seconds between registering a schedule and starting the queue


# --- every(first_at=...) counts from start_dispatcher, not from first_at -------------------------

def test_an_every_schedule_registered_before_the_start_first_ticks_at_first_at():
    """api.md: "The first tick is one interval after the schedule begins, or at `first_at`";
    a schedule registered at import and started later (the worker CLI's way) ticks at first_at."""
    with Queue(10) as q:
        first_at = float(int(time.time()) + 60)  # a whole second, a minute ahead
        q.every(3600.0, "report", first_at=first_at)
        registered = time.monotonic()
        while time.monotonic() - registered < GAP:  # the module is imported; the worker starts later
            time.sleep(GAP / 10)
        q.start_dispatcher(1)
        (schedule,) = q.schedules()
        assert schedule.next_run_at == pytest.approx(first_at, abs=GAP / 2)


def test_an_every_schedule_whose_first_at_passed_before_the_start_fires_at_the_start():
    """api.md: "a past `first_at` fires at the start"."""
    ran = threading.Event()
    fired = []
    with Queue(10) as q:
        q.register_executor("report", lambda job: (fired.append(job.id), ran.set()))
        first_at = time.time() + 2 * GAP
        q.every(3600.0, "report", first_at=first_at)
        while time.time() < first_at + 2 * GAP:  # first_at has passed, well before the start
            time.sleep(GAP / 10)
        q.start_dispatcher(1)
        started = time.time()
        assert ran.wait(WAIT)
        # Due at the start: the tick's time, in its job's id ("<name>@<tick time, UTC, ISO 8601>").
        # (Not next_run_at: the timer may have fired the tick, and moved it an interval on, already.)
        tick = datetime.fromisoformat(fired[0].split("@")[1].replace("Z", "+00:00")).timestamp()
        assert tick <= started


# --- a job's retries are dropped by the broker ---------------------------------------------------

@pytest.fixture
def redis(redis_backend):
    return redis_backend


@pytest.mark.parametrize("call", ["enqueue", "enqueue_many"])
def test_the_failed_attempts_a_job_brings_count_against_max_retries_over_redis(redis, call):
    """api.md, enqueue: `retries` ("an int from 0, the failed attempts the job has had, which count
    against its max_retries") is one of the attributes the queue relies on; in-process and with a
    SQLite store a job enqueued with retries == max_retries gets one last attempt. Over Redis, the
    same rules "hold across processes"."""
    q = redis.queue()
    seen, failures = [], []
    q.on_failure(lambda job, reason, exc: failures.append((reason, job.retries)))

    def run(job):
        seen.append(job.retries)
        raise ConnectionError("still down")

    q.register_executor("sync", run)
    q.start_dispatcher(1)
    job = Job("sync", retry_config=RetryConfig(max_retries=2, initial_delay=0.01))
    job.retries = 2  # two failed attempts already (a job carried over from elsewhere)
    if call == "enqueue":
        q.enqueue(job)
    else:
        q.enqueue_many([job])
    assert q.join(WAIT)
    assert seen == [2]
    assert failures == [("retries_exhausted", 3)]


# --- a full Redis (maxmemory reached, noeviction) still takes enqueues ---------------------------

@pytest.mark.parametrize("call", ["enqueue", "enqueue_many", "enqueue_delayed"])
def test_a_full_redis_makes_enqueue_raise(own_redis_server, call):
    """docs/redis.md, Redis settings: "With `noeviction`, a full Redis makes `enqueue` raise
    `TinyMQError` instead" (a cancel, whose first write is an HSET-like one, does raise)."""
    from _backends import Redis
    from tinymq import TinyMQError

    backend = Redis(own_redis_server.url)
    try:
        producer = backend.queue()
        producer.enqueue(Job("mail", "before"))  # the scripts are loaded; the queue's keys exist
        with own_redis_server.client() as client:
            client.config_set("maxmemory", "1")  # full: more than 1 byte is in use
            try:
                with pytest.raises(TinyMQError):
                    if call == "enqueue":
                        producer.enqueue(Job("mail", "while full"))
                    elif call == "enqueue_many":
                        producer.enqueue_many([Job("mail", "while full")])
                    else:
                        producer.enqueue_delayed(Job("mail", "while full"), 3600.0)
            finally:
                client.config_set("maxmemory", "0")
        stats = producer.get_stats()
        assert (stats.jobs_enqueued, stats.medium_queue_size, stats.delayed_jobs_count) == (1, 1, 0)
    finally:
        backend.close()


# --- a job Redis cannot decode dies unreported and unlisted --------------------------------------

@pytest.mark.parametrize("timestamp", ["yesterday", None])
def test_a_job_accepted_over_redis_runs_or_its_failure_is_reported_and_kept(redis, timestamp):
    """api.md: `timestamp` is a plain writable attribute, and enqueue checks again every attribute
    the queue relies on ("A bad value raises TypeError/ValueError naming it"); a job accepted is
    never dropped silently, and a job that leaves without success is handed to every on_failure
    callback and kept dead (`broker.dead_jobs()`)."""
    producer, worker = redis.pair()
    ran, failures = [], []
    worker.on_failure(lambda job, reason, exc: failures.append((job.id, reason)))
    worker.register_executor("import", lambda job: ran.append(job.id))
    worker.start_dispatcher(1)
    job = Job("import", id="odd")
    job.timestamp = timestamp  # e.g. copied from an upstream record
    try:
        producer.enqueue(job)
    except (TypeError, ValueError) as exc:  # refused, naming it: as good as running it
        assert "timestamp" in str(exc)
        return
    assert producer.join(WAIT)
    if ran != ["odd"]:  # it did not run: then its failure must not be silent
        assert [job_id for job_id, _ in failures] == ["odd"]
        assert [dead.job.id for dead in producer.broker.dead_jobs()] == ["odd"]


# --- text Redis cannot carry: a lone surrogate (os.fsdecode of a non-UTF-8 file name) -----------

NON_UTF8_NAME = "report-\udcff.csv"  # os.fsdecode(b"report-\xff.csv"): a str Python code passes around


@pytest.mark.parametrize("attribute", ["payload", "tags", "type", "id"])
def test_enqueue_over_redis_names_the_attribute_whose_text_redis_cannot_take(redis, attribute):
    """api.md, Clocks and validation: "A bad value raises TypeError/ValueError naming it" (or the
    broker carries the text, as the in-process queue does); the queue stays usable."""
    q = redis.queue()
    job = Job(NON_UTF8_NAME if attribute == "type" else "import",
              NON_UTF8_NAME if attribute == "payload" else None,
              tags={"file": NON_UTF8_NAME} if attribute == "tags" else None,
              id=NON_UTF8_NAME if attribute == "id" else "import-1")
    try:
        q.enqueue(job)
    except (TypeError, ValueError) as exc:  # refused: it must say what
        assert attribute in str(exc)
        accepted = 0
    else:  # or carried as it is, like in-process
        accepted = 1
    q.enqueue(Job("import", "fine"))
    assert q.get_stats().jobs_enqueued == accepted + 1


def test_cancel_over_redis_of_an_id_no_job_can_have_returns_false(redis):
    """api.md: "Returns False when no unfinished job has that id" (in-process it does)."""
    q = redis.queue()
    assert q.cancel(NON_UTF8_NAME) is False


def test_a_schedule_whose_payload_redis_cannot_take_is_refused_at_registration(redis):
    """As test_redis_attackR_findings' non-JSON payload: q.every must raise at once, naming the
    schedule, not skip every tick."""
    q = redis.queue()
    with pytest.raises((TypeError, ValueError), match="nightly"):
        q.every(60.0, "import", {"file": NON_UTF8_NAME}, name="nightly")
    assert q.schedules() == []


# --- stop() ends a producer's wait for room with QueueFull over Redis ---------------------------

def _script_calls(client):
    stats = client.info("commandstats")
    return sum(stats.get(name, {}).get("calls", 0) for name in ("cmdstat_evalsha", "cmdstat_eval"))


def test_a_wait_for_room_ended_by_stop_raises_queue_stopped_over_redis(redis, redis_server):
    """api.md: after stop() enqueue raises QueueStopped; with block=True it waits for room "at most
    timeout seconds, then QueueFull". A producer that retries on QueueFull and shuts down on
    QueueStopped must be told the truth."""
    q = redis.queue(buffer_size=1)  # a producer: no dispatcher, nothing drains the buffer
    q.enqueue(Job("mail", 0))
    outcome = []

    def produce():
        try:
            q.enqueue(Job("mail", 1), block=True, timeout=WAIT)
            outcome.append("accepted")
        except Exception as exc:
            outcome.append(type(exc).__name__)

    producer = threading.Thread(target=produce)
    with redis_server.client() as client:
        before = _script_calls(client)
        producer.start()
        deadline = time.monotonic() + WAIT
        while _script_calls(client) < before + 2:  # it found the buffer full and looks again: waiting
            assert time.monotonic() < deadline, "the producer never tried to enqueue"
            time.sleep(0.001)
    q.stop()
    producer.join(WAIT)
    assert outcome == ["QueueStopped"]


# --- worker: a target whose import ends its process with code 0 --------------------------------

EXITS_AT_IMPORT = """
import os
os._exit(0)  # a module that daemonises itself at import (fork, parent exits), or a library's exit(0)
"""


def test_worker_refuses_a_target_whose_import_ends_the_process(shared_project, project):
    """docs/cli.md: "A target that cannot be imported ... is an error (exit 1) that says what was
    found, before any worker process starts"; a worker process that cannot load the target is not
    restarted."""
    (project / "app" / "exits.py").write_text(EXITS_AT_IMPORT)
    worker = shared_project("app.exits:queue", "--processes", 1, "--workers", 1)
    with worker.changed:  # it ends, or it starts a worker process for the target it could not load
        worker.changed.wait_for(lambda: None in worker.lines or "started worker process" in worker.log(), WAIT)
    assert "started worker process" not in worker.log(), worker.log()
    assert worker.wait(WAIT) == 1, worker.log()


# --- an exception whose str() fails loses the job its retries ------------------------------------

class UpstreamError(Exception):
    """A user's exception with a common bug: __str__ reads an attribute its __init__ never set."""

    def __str__(self):
        return f"{self.status}: upstream refused"


@pytest.mark.parametrize("backend", ["memory", "redis"])
@pytest.mark.parametrize("kind", ["thread", "async"])
def test_an_exception_whose_str_fails_is_still_retried_and_reported(redis, backend, kind):
    """api.md: a failed attempt is retried per its RetryConfig ("Default: every Exception"), and
    "retries_exhausted: the last allowed attempt failed; exc is its exception". Logging and
    traceback print such an exception as "<exception str() failed>"; the queue must not trip on it."""
    q = redis.queue() if backend == "redis" else Queue(10)
    attempts, failures = [], []
    q.on_failure(lambda job, reason, exc: failures.append((reason, type(exc))))
    if kind == "thread":
        def call_upstream(job):
            attempts.append(job.retries)
            raise UpstreamError()
    else:
        async def call_upstream(job):
            attempts.append(job.retries)
            raise UpstreamError()
    q.register_executor("sync", call_upstream)
    q.start_dispatcher(1)
    q.enqueue(Job("sync", retry_config=RetryConfig(max_retries=2, initial_delay=0.01)))
    assert q.join(WAIT)
    try:
        assert attempts == [0, 1, 2]
        assert failures == [("retries_exhausted", UpstreamError)]
        assert q.get_stats().jobs_retried == 2
    finally:
        q.stop()


# --- RetryAfter cannot be copied or pickled --------------------------------------------------------

@pytest.mark.parametrize("how", ["pickle", "copy"])
def test_retry_after_survives_pickle_and_copy_like_the_other_exceptions(how):
    """api.md: "Where this page is silent, do what a Python user would expect from the standard
    library": exceptions pickle (concurrent.futures.ProcessPoolExecutor sends an executor's
    RetryAfter back to the thread that waits for it that way; an on_failure callback gets it as the
    exc of "retries_exhausted" and may hand it to another process). PermanentFailure, JobTimeout
    and the rest do."""
    import copy
    import pickle
    from datetime import timedelta

    from tinymq import RetryAfter

    for original in (RetryAfter(30), RetryAfter(timedelta(minutes=1), "rate limited")):
        again = pickle.loads(pickle.dumps(original)) if how == "pickle" else copy.copy(original)
        assert type(again) is RetryAfter
        assert (again.seconds, str(again)) == (original.seconds, str(original))


# --- interrupt_on_timeout landing inside the store's write of an executor's enqueue -------------

@pytest.mark.parametrize("batch", [2, 3])  # one multi-row INSERT (autocommit) / two (BEGIN IMMEDIATE first)
def test_an_interrupted_enqueue_from_an_executor_is_all_or_nothing_and_the_store_stays_durable(tmp_path, batch):
    """api.md: "Every method is safe to call from any thread, executors included"; an executor
    enqueues follow-up jobs; ExecutorConfig(interrupt_on_timeout=True) raises JobTimeout in its
    thread at its next bytecode. enqueue_many is all or none ("If save raises, enqueue raises
    PersistenceError ... and the job is not enqueued"), and a job acknowledged later is durable.

    The SQLite write lock held by another connection (a migration, a backup tool) only makes the
    moment deterministic: the executor's write waits in SQLite while its deadline passes. Without
    it, 4 workers flooding enqueues from such an executor hit the same state within seconds
    ("cannot start a transaction within a transaction" on every later write, join() never true)."""
    import sqlite3

    from tinymq import ExecutorConfig, PersistenceError, SQLitePersistence

    path = str(tmp_path / "jobs.db")
    store = SQLitePersistence(path)
    q = Queue(100)
    q.set_persistence(store)
    entered, locked, done = threading.Event(), threading.Event(), threading.Event()
    outcome = []

    def import_then_report(job):
        entered.set()
        locked.wait(WAIT)
        try:
            q.enqueue_many([Job("report", n, run_at=time.time() + 3600) for n in range(batch)])
            outcome.append("enqueued")
        except PersistenceError:
            outcome.append("refused")
        finally:
            done.set()

    q.register_executor("import", import_then_report, ExecutorConfig(timeout=0.3, interrupt_on_timeout=True))
    q.start_dispatcher(1)
    q.enqueue(Job("import", retry_config=RetryConfig(max_retries=0)))
    assert entered.wait(WAIT)
    other = sqlite3.connect(path, timeout=0, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another writer holds SQLite's write lock for a moment
    locked.set()
    deadline = time.monotonic() + WAIT
    while q.get_stats().jobs_timed_out < 1:  # the watchdog decided the timeout: JobTimeout is pending
        assert time.monotonic() < deadline
        time.sleep(0.01)
    other.execute("ROLLBACK")
    other.close()
    assert done.wait(WAIT)
    q.enqueue(Job("report", "after", run_at=time.time() + 3600))  # acknowledged: durable
    q.stop()
    store.close()
    with SQLitePersistence(path) as again:
        payloads = [job.payload for job in again.load_all()]
    assert "after" in payloads
    assert sorted(p for p in payloads if p != "after") == (list(range(batch)) if outcome == ["enqueued"] else [])


def _switch_interrupted(tmp_path):
    """One worker runs "a", then "b" (interrupt_on_timeout): its write that deletes "a" and marks "b"
    running waits for SQLite's write lock (held by another connection) well past b's timeout.
    Returns (the payloads whose function ran, the store's path)."""
    import sqlite3

    from tinymq import ExecutorConfig, SQLitePersistence

    timeout, held_for = 0.3, 2.0  # the lock is held for many timeouts, well within the store's busy_timeout
    writing = threading.Event()

    class Store(SQLitePersistence):
        def delete_and_mark_running(self, job_id, job):
            writing.set()  # the worker is writing b's start: SQLite makes it wait for the lock
            super().delete_and_mark_running(job_id, job)

    path = str(tmp_path / "jobs.db")
    store = Store(path, busy_timeout=5 * held_for)
    q = Queue(100)
    q.set_persistence(store)
    entered, locked = threading.Event(), threading.Event()
    ran = []

    def work(job):
        ran.append(job.payload)
        if job.payload == "a":
            entered.set()
            locked.wait(WAIT)

    q.register_executor("first", work)  # no timeout: the test takes its time while "a" runs
    q.register_executor("sync", work, ExecutorConfig(timeout=timeout, interrupt_on_timeout=True))
    q.start_dispatcher(1)
    q.enqueue_many([Job("first", "a"), Job("sync", "b", retry_config=RetryConfig(max_retries=0))])
    assert entered.wait(WAIT)
    other = sqlite3.connect(path, timeout=0, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another writer holds the lock: "a" returns meanwhile
    locked.set()
    assert writing.wait(WAIT)
    writing_since = time.monotonic()
    # Held until b's timeout, counted from the write, has passed many times over (or, counted so,
    # it has timed b out already: the defect).
    while q.get_stats().jobs_timed_out < 1 and time.monotonic() - writing_since < held_for:
        time.sleep(0.01)
    other.execute("ROLLBACK")
    other.close()
    assert q.join(WAIT)
    q.enqueue(Job("sync", "after", run_at=time.time() + 3600))  # acknowledged: durable
    q.stop()
    store.close()
    return ran, path


def test_a_timeout_interrupting_a_workers_store_write_keeps_the_store_durable(tmp_path):
    """api.md, Persistence: delete is called when a job has finished; a job that failed for good is
    kept dead (mark_dead); a job acknowledged by enqueue survives a stop and restart. Here, after a
    clean stop(), "a" (succeeded) and "b" (failed, reported) come back as ready and "after" is lost."""
    from tinymq import SQLitePersistence

    _, path = _switch_interrupted(tmp_path)
    with SQLitePersistence(path) as again:
        assert [job.payload for job in again.load_all()] == ["after"]


def test_an_attempt_whose_function_never_ran_does_not_time_out(tmp_path):
    """api.md: `timeout` bounds an attempt of the executor ("at the deadline the attempt counts as
    failed with JobTimeout"); docs/api.md measures attempts "from the executor's call to its return".
    A job is not failed for good by the store being slow before its function is called."""
    ran, _ = _switch_interrupted(tmp_path)
    assert ran == ["a", "b"]


# --- on_failure takes callbacks whose body never runs ----------------------------------------------

@pytest.mark.filterwarnings("ignore:coroutine .* was never awaited:RuntimeWarning")
@pytest.mark.parametrize("kind", ["async", "generator"])
def test_a_failure_callback_whose_body_would_never_run_is_refused_or_run(kind):
    """api.md: every failure is "handed to every callback registered with q.on_failure(fn)" (an
    alert, a dead-letter write: a user's `async def` is the natural way to write one). The queue
    refuses such executors at registration ("calling it would never run its body"); a callback
    must be refused likewise (TypeError) or have its body run."""
    from tinymq import PermanentFailure

    ran = threading.Event()
    if kind == "async":
        async def alert(job, reason, exc):
            ran.set()
    else:
        def alert(job, reason, exc):
            ran.set()
            yield
    with Queue(10) as q:
        try:
            q.on_failure(alert)
        except TypeError as exc:
            assert "alert" in str(exc)
            return  # refused at registration, naming the problem: fine

        def fail(job):
            raise PermanentFailure("HTTP 404")

        q.register_executor("fetch", fail)
        q.start_dispatcher(1)
        q.enqueue(Job("fetch"))
        assert q.join(WAIT)
        assert ran.is_set()  # callbacks run before the job counts as finished for join()


# --- broker.names_in_use(limit) does not check its limit -----------------------------------------

def test_names_in_use_keeps_to_its_limit_and_names_a_bad_one(redis):
    """api.md: `broker.names_in_use(limit=10)` -> the sorted names of queues with jobs or counters
    ("up to limit names", its docstring); a bad value raises TypeError/ValueError naming it."""
    q = redis.queue()
    q.enqueue(Job("mail"))
    assert q.broker.names_in_use(limit=1) == [redis.queue_name]
    try:
        assert q.broker.names_in_use(limit=0) == []
    except ValueError as exc:
        assert "limit" in str(exc)
    with pytest.raises(ValueError, match="limit"):
        q.broker.names_in_use(limit=-1)
    with pytest.raises((TypeError, ValueError), match="limit"):
        q.broker.names_in_use(limit="5")
