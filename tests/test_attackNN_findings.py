"""Attack NN: an outsider's attack on the in-process queue, its SQLite store, cancel, periodic
jobs and stats (each test failed before its fix)."""
import os
from datetime import datetime
import threading
import time

import pytest

import tinymq
from tinymq import ExecutorConfig, Job, RetryConfig
from tinymq.persistence import SQLitePersistence

from _helpers import WAIT, wait_until


def test_a_failure_naming_a_file_that_is_not_utf8_is_retried_and_kept_dead_in_the_store(tmp_path):
    """Symptom: an executor whose attempt fails with an error naming a file whose name is not
    UTF-8 (a name from ``os.listdir``: ``os.fsdecode`` makes a lone surrogate of its byte
    ``\\xff``, and ``f"cannot parse {name}"`` keeps it) with a SQLite store:
    the retry's save fails (logged ERROR, the row keeps the old retries), and at the last failure
    ``mark_dead`` fails too, so the row stays "running": ``dead_jobs()`` is empty, and the next
    start counts a crash and runs the job again although it failed for good and was reported.

    Reproduction: a job that fails twice with such an error, ``max_retries=1``.

    Promise: API.md, Persistence: `save` is called "again when its state changes (a retry is
    scheduled)"; "a job that failed permanently is kept there as dead instead of deleted".
    docs/redis.md escapes such text for Redis; the store refused it (``_row``: "not valid Unicode").
    """
    store = SQLitePersistence(str(tmp_path / "jobs.db"))
    q = tinymq.Queue(10)
    q.set_persistence(store)
    seen_retries, failures = [], []
    q.on_failure(lambda job, reason, exc: failures.append((job.id, reason)))
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    with open(os.path.join(os.fsencode(str(inbox)), b"report-\xff.csv"), "wb"):
        pass

    def read_file(job):
        seen_retries.append([row.retries for row in store.jobs()])  # the row as the store keeps it
        for name in os.listdir(str(inbox)):
            raise ValueError(f"cannot parse {name}")

    q.register_executor("read", read_file, ExecutorConfig(max_concurrent_jobs=1))
    q.start_dispatcher(1)
    q.enqueue(Job("read", id="r1", retry_config=RetryConfig(max_retries=1, initial_delay=0.0)))
    assert q.join(WAIT)
    q.stop()
    assert failures == [("r1", "retries_exhausted")]
    assert seen_retries == [[0], [1]], "the retry was not saved"
    assert store.counts()["running"] == 0
    dead = store.dead_jobs()
    assert [(d.job.id, d.reason) for d in dead] == [("r1", "retries_exhausted")]
    assert dead[0].error == "ValueError: cannot parse report-\\udcff.csv"
    store.close()
    with SQLitePersistence(str(tmp_path / "jobs.db")) as again:
        assert again.load_all() == []  # a job that failed for good does not run again


def test_a_retry_whose_executor_set_a_tag_to_a_number_comes_back_after_a_restart(tmp_path):
    """Symptom: an executor that notes something in its job's tags with a value that is not a
    ``str`` (``job.tags["attempt"] = job.retries + 1``) and then fails, with a SQLite store:
    the retry's save writes that row, which the store itself cannot read back, so after a
    restart ``load_all()`` quarantines it ("tags must map str to str") and the accepted job
    never runs again.

    Reproduction: one job whose first attempt sets an int tag and raises; its retry waits an
    hour; the queue stops (or the process dies) and a new store opens the file.

    Promise: API.md, Persistence: "Delivery is at-least-once: a job saved and not yet deleted
    when the process dies runs again after the next start"; tags are ``str -> str``. The store
    must refuse the save it cannot load (the row it holds then comes back, as after a crash).
    """
    path = str(tmp_path / "jobs.db")
    store = SQLitePersistence(path)
    q = tinymq.Queue(10)
    q.set_persistence(store)
    failed_once = threading.Event()

    def note_and_fail(job):
        job.tags["attempt"] = job.retries + 1
        failed_once.set()
        raise ConnectionError("try later")

    q.register_executor("sync", note_and_fail)
    q.start_dispatcher(1)
    q.enqueue(Job("sync", {"account": 7}, id="s1", tags={"user": "42"},
                  retry_config=RetryConfig(max_retries=3, initial_delay=3600.0)))
    assert failed_once.wait(WAIT)
    assert wait_until(lambda: q.get_stats().delayed_jobs_count == 1)
    q.stop()
    store.close()
    with SQLitePersistence(path) as again:
        jobs = again.load_all()
        assert again.quarantined() == []
        assert [(job.id, job.payload, job.tags["user"]) for job in jobs] == [("s1", {"account": 7}, "42")]


class _BrokenBackoff(tinymq.RetryConfig):
    """A custom backoff with a bug: its delay is not a finite number of seconds."""

    def __init__(self, delay, **fields):
        super().__init__(**fields)
        object.__setattr__(self, "broken_delay", delay)

    def retry_delay(self, k):
        return self.broken_delay


@pytest.mark.parametrize("delay", [float("nan"), float("inf")])
def test_a_retry_delay_that_is_not_finite_fails_the_job_loudly_instead_of_wedging_it(delay):
    """Symptom: a ``RetryConfig`` subclass (a custom backoff) whose ``retry_delay`` returns NaN
    or inf: the failed job's retry is placed with ``run_at`` NaN/inf and never runs, is never
    reported, and ``join()`` never returns (the compiled core even shows the NaN one as a ready
    job that no worker takes).

    Reproduction: one job with such a retry_config whose first attempt fails.

    Promise: API.md, Clocks and validation: "run_at must be finite" and a bad value raises
    naming it; "Failures are never silent". The retry's delay is checked as RetryAfter's is: a
    job whose retry cannot be scheduled fails for good (``retries_exhausted``, with that error).
    """
    q = tinymq.Queue(10)
    failures = []
    q.on_failure(lambda job, reason, exc: failures.append((job.id, reason, type(exc))))
    attempts = []

    def flaky(job):
        attempts.append(job.retries)
        raise ConnectionError("try later")

    q.register_executor("t", flaky)
    q.start_dispatcher(1)
    q.enqueue(Job("t", id="b1", retry_config=_BrokenBackoff(delay, max_retries=3)))
    try:
        assert q.join(WAIT), "the job whose retry delay is not finite never ended"
        assert attempts == [0]
        assert failures == [("b1", "retries_exhausted", ValueError)]
        stats = q.get_stats()
        assert (stats.jobs_failed, stats.jobs_retried, stats.delayed_jobs_count) == (1, 0, 0)
    finally:
        q.stop(wait=False)


def test_an_async_attempt_cancelled_while_its_start_is_written_is_not_in_the_duration_histogram():
    """Symptom: with a store, an async job cancelled (``q.cancel``) while the store writes its
    attempt's start (``mark_running``: SQLite waiting for its lock) is counted in
    ``tinymq_attempt_duration_seconds`` with the write's time as its duration, although its
    function was never called; a thread executor's attempt is not (its clock starts at the call).

    Reproduction: a store whose ``mark_running`` waits; an async job; ``q.cancel`` during that write.

    Promise: docs/api.md, Metrics: "Attempt durations are measured in the worker from the
    executor's call to its return ... every attempt whose function was called and whose outcome
    is counted ... is recorded once"; the timeout too "counts from the call".
    """
    writing, release = threading.Event(), threading.Event()

    class SlowStartStore:
        def save(self, job):
            pass

        def delete(self, job_id):
            pass

        def load_all(self):
            return []

        def mark_running(self, job):
            writing.set()
            release.wait(WAIT)

    q = tinymq.Queue(10)
    q.set_persistence(SlowStartStore())
    called = []

    async def work(job):
        called.append(job.id)

    q.register_executor("a", work)
    q.start_dispatcher(1)
    try:
        q.enqueue(Job("a", id="v"))
        assert writing.wait(WAIT)
        assert q.cancel("v")
        release.set()
        assert q.join(WAIT)
        assert called == []
        assert q.get_stats().executor_stats["a"].cancelled == 1
        counts, _ = q._attempt_durations().get("a", ((0,), 0.0))
        assert sum(counts) == 0, "an attempt whose function was never called has a duration"
    finally:
        release.set()
        q.stop(wait=False)


@pytest.mark.parametrize("stop_kwargs", [{"wait": False}, {"wait": True, "timeout": 0.2}])
def test_stop_does_not_wait_for_a_tick_whose_save_waits_for_the_store(stop_kwargs):
    """Symptom: ``q.stop(wait=False)``, or ``q.stop(timeout=0.2)``, on a queue with a schedule and
    a store takes as long as the store keeps the tick's save waiting: with SQLite whose file a
    backup tool or a migration holds locked, ``busy_timeout`` (5 s by default), up to twice.

    Reproduction: an ``every`` schedule; the store's save of a tick's job waits (here: until
    released); ``stop()`` is called meanwhile.

    Promise: API.md, Queue: "stop(wait=True, timeout=None): ... let running attempts finish
    (when wait)": ``wait=False`` does not wait, and ``timeout`` bounds the wait. A tick being
    enqueued is no running attempt: like any producer's enqueue racing ``stop()``, it is placed
    (and stays stored) or refused with ``QueueStopped``.
    """
    saving, release = threading.Event(), threading.Event()

    class SlowStore:
        def save(self, job):
            saving.set()
            release.wait(WAIT)

        def delete(self, job_id):
            pass

        def load_all(self):
            return []

    q = tinymq.Queue(10)
    q.set_persistence(SlowStore())
    q.register_executor("tick", lambda job: None)
    q.every(0.01, "tick")
    q.start_dispatcher(1)
    try:
        assert saving.wait(WAIT)
        began = time.monotonic()
        q.stop(**stop_kwargs)
        took = time.monotonic() - began
        assert took < WAIT / 4, f"stop({stop_kwargs}) waited {took:.1f} s for a tick's save"
    finally:
        release.set()
        q.stop()


@pytest.mark.parametrize("change", ["payload", "priority", "retry_config"])
def test_a_job_whose_executor_made_it_unstorable_is_kept_dead_not_run_again(tmp_path, change):
    """Symptom: with a SQLite store, an executor that notes something in its job's payload that
    JSON cannot hold (``job.payload["tried_at"] = datetime.now()``), or sets its priority to what
    is no Priority (``"urgent"``) or its retry_config to what is no RetryConfig, and then fails
    for good: the failure is reported, but ``mark_dead`` is refused (the payload cannot be
    serialised; ``int("urgent")`` raised ValueError, the config's fields AttributeError), so the
    row stays "running": ``dead_jobs()`` does not show it, and the next start counts a crash and
    runs the failed job again.

    Reproduction: one job, ``max_retries=0``, whose executor makes that change and raises.

    Promise: API.md, Persistence: "A store may also have mark_dead(job, reason, exc): then a job
    that failed permanently is kept there as dead instead of deleted". The store keeps it dead
    as it was last saved (its stored payload), with the reason and error of its failure.
    """
    path = str(tmp_path / "jobs.db")
    store = SQLitePersistence(path)
    q = tinymq.Queue(10)
    q.set_persistence(store)
    failures = []
    q.on_failure(lambda job, reason, exc: failures.append((job.id, reason)))

    def charge(job):
        if change == "payload":
            job.payload["tried_at"] = datetime.now()
        elif change == "priority":
            job.priority = "urgent"
        else:
            job.retry_config = "bogus"
        raise ValueError("card declined")

    q.register_executor("charge", charge)
    q.start_dispatcher(1)
    q.enqueue(Job("charge", {"order": 7}, id="c1", retry_config=RetryConfig(max_retries=0)))
    assert q.join(WAIT)
    q.stop()
    assert failures == [("c1", "retries_exhausted")]
    dead = store.dead_jobs()
    # (a retry_config that is no RetryConfig fails the job as its retry is scheduled, with that error)
    error = "AttributeError" if change == "retry_config" else "ValueError: card declined"
    assert [(d.job.id, d.job.payload, d.reason, d.error.startswith(error)) for d in dead] == [
        ("c1", {"order": 7}, "retries_exhausted", True)]
    store.close()
    with SQLitePersistence(path) as again:
        assert again.load_all() == []  # a job that failed for good does not run again


def test_a_job_whose_attempt_stop_cancelled_comes_back_whatever_its_executor_did_to_its_payload(tmp_path):
    """Symptom: with a SQLite store, an executor that notes something JSON cannot hold in its
    job's payload (``job.payload["started_at"] = datetime.now()``) while ``stop()`` cancels its
    attempt: ``stop()`` cannot save the job back as ready (``give_back`` refuses the payload), so
    the row stays "running" and the next start counts a crash; with ``max_retries=0`` the job is
    then dead as "crashed" and never runs again.

    Reproduction: one job, ``max_retries=0``, whose executor sets a datetime in its payload and
    waits for its context; ``stop(wait=False)``; a new store opens the file.

    Promise: API.md, Persistence: "An attempt that stop() cancels is not a failure: it is not
    counted, retried or reported, and its job stays stored for the next start."
    """
    path = str(tmp_path / "jobs.db")
    store = SQLitePersistence(path)
    q = tinymq.Queue(10)
    q.set_persistence(store)
    started, returned = threading.Event(), threading.Event()

    def charge(job, ctx):
        job.payload["started_at"] = datetime.now()
        started.set()
        ctx.wait(WAIT)
        returned.set()

    q.register_executor("charge", charge)
    q.start_dispatcher(1)
    q.enqueue(Job("charge", {"order": 7}, id="c1", retry_config=RetryConfig(max_retries=0)))
    assert started.wait(WAIT)
    q.stop(wait=False)
    assert returned.wait(WAIT)
    store.close()
    with SQLitePersistence(path) as again:
        jobs = again.load_all()
        assert again.take_crashed() == []
        assert [(job.id, job.payload, job.retries) for job in jobs] == [("c1", {"order": 7}, 0)]
