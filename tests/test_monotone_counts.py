"""The lifetime counters never go down over Redis (docs/redis.md, the ExecutorStats paragraph;
tinymq.metrics): Prometheus reads a counter that goes down as a reset, so rate() and increase()
showed a spike. An outcome is counted once it is decided, and one counted stands.

Before, the link moved counts already made: a timeout counted at its deadline was taken back
when stop() handed its attempt back, or when a cancel overtook it (its job ended as cancelled
only); an outcome counted before its settle's reply (a success, a retry, a failure for good
with no callback) was moved to cancelled when the reply said that another process's cancel had
marked the attempt. Now a timeout is counted where its retry or failure is decided; an attempt
this process knows marked (its own cancel, or a mark a reply named) is decided as cancelled and
counted so; and what was counted before a reply said Redis ended the job as cancelled stays
counted, the one outcome that the reply cannot change (the exception docs/redis.md states).

Each test reads the per-type and the shared counters at the point of the race (the outcome
counted, its reply still to come) and once the job ended: no counter is lower.
"""
import asyncio
import threading

import pytest

from tinymq import ExecutorConfig, Job, PermanentFailure, Queue, RetryConfig

from _backends import Redis
from _helpers import WAIT, per_type_counts, record_failures, shared_counts, wait_until

NOTHING = dict.fromkeys(["succeeded", "failed", "retried", "timed_out", "cancelled"], 0)


@pytest.fixture
def quiet(redis_url):
    """A long lease: no heartbeat tells the worker of anything during a test."""
    made = Redis(redis_url, lease=40.0)
    yield made
    made.close()


class Readings:
    """The counters of ``q`` (per type and shared), read at each ``read()``: ``never_down()``
    checks that no counter of a reading is lower than in the one before."""

    def __init__(self, q):
        self.q = q
        self.taken = []

    def read(self):
        reading = {**{("t", k): v for k, v in per_type_counts(self.q).items()},
                   **{("queue", k): v for k, v in shared_counts(self.q).items()}}
        self.taken.append(reading)
        return reading

    def never_down(self):
        for before, after in zip(self.taken, self.taken[1:]):
            down = {key: (before[key], after[key]) for key in before if after[key] < before[key]}
            assert not down, f"counters went down: {down}"


def mine(readings):
    return {k: v for (where, k), v in readings.taken[-1].items() if where == "t"}


# --- 1. an outcome counted before the reply said another process's cancel had marked it --------

ENDS = pytest.mark.parametrize("ends", ["succeeds", "retries", "fails for good", "times out"])


@ENDS
def test_an_outcome_counted_before_a_mark_from_elsewhere_overruled_it_stays_counted(quiet, ends):
    """(Before: the count was moved to cancelled as the reply came: succeeded, retried, failed,
    or timed_out and retried, went down by one.)"""
    producer, worker = quiet.pair()
    started, let_go = threading.Event(), threading.Event()

    def run(job):
        started.set()
        assert let_go.wait(WAIT)
        if ends == "retries":
            raise ValueError("boom")
        if ends == "fails for good":
            raise PermanentFailure("boom")

    config = ExecutorConfig(timeout=0.2) if ends == "times out" else None
    worker.register_executor("t", run, config)
    link = worker._link
    link._cancel_marked = lambda attempts: None  # deaf to marks: only the reply tells it
    job = Job("t", "x", retry_config=RetryConfig(max_retries=2, initial_delay=0.0))
    producer.enqueue(job)
    worker.start_dispatcher(1)
    assert started.wait(WAIT)
    readings = Readings(worker)
    try:
        with link._round_lock:  # no round meanwhile: the outcome waits to be sent
            assert producer.cancel(job.id) is True  # leased: marked in Redis only
            if ends != "times out":
                let_go.set()
            assert wait_until(lambda: link._ops)  # its op queued
            assert wait_until(lambda: per_type_counts(worker) != NOTHING)  # and counted here
            readings.read()
        assert wait_until(lambda: shared_counts(producer)["cancelled"] == 1)  # Redis ended it so
        with link._round_lock:  # (the round that read the reply is over)
            readings.read()
    finally:
        let_go.set()
    readings.never_down()
    counted = {"succeeds": {"succeeded": 1}, "retries": {"retried": 1}, "fails for good": {"failed": 1},
               "times out": {"timed_out": 1, "retried": 1}}[ends]
    assert mine(readings) == {**NOTHING, **counted}  # (the one exception to the per-type sums)
    assert shared_counts(producer) == {**NOTHING, "cancelled": 1}


def test_a_timed_out_failure_whose_settle_a_mark_from_elsewhere_overruled_counts_as_cancelled_only(quiet):
    """With a failure callback the failure for good is counted once its settle's reply came:
    the mark's cancel only. (Before: its timeout, counted at its deadline, was taken back.)"""
    producer, worker = quiet.pair()
    stuck = threading.Event()
    worker.register_executor("t", lambda job: stuck.wait(WAIT), ExecutorConfig(timeout=0.2))
    failures = record_failures(worker, key=lambda job: job.id)
    link = worker._link
    link._cancel_marked = lambda attempts: None
    job = Job("t", "x", retry_config=RetryConfig(max_retries=0))
    producer.enqueue(job)
    worker.start_dispatcher(1)
    assert wait_until(lambda: worker.get_stats().executor_stats["t"].active_jobs == 1)
    readings = Readings(worker)
    try:
        with link._round_lock:  # its failure's settle waits for the lock
            assert producer.cancel(job.id) is True
            assert wait_until(lambda: link._failing)  # decided at its deadline: its op is queued
            readings.read()
        assert failures.wait_until(lambda items: items)
        readings.read()
    finally:
        stuck.set()
    readings.never_down()
    assert failures.snapshot()[0][:2] == (job.id, "cancelled")
    assert mine(readings) == {**NOTHING, "cancelled": 1}
    assert shared_counts(producer) == {**NOTHING, "cancelled": 1}


# --- 2. a cancel of this process that overtook a timeout ----------------------------------------

def _overtaken(q, run, timeout):
    """Run job "overtaken" on ``q`` until its deadline; its failure is held (the dispatcher's
    attempt_failed, after the timeout was decided) until ``q.cancel`` of it returned. The
    Readings at the hold and once the job ended."""
    holding, go_on = threading.Event(), threading.Event()
    attempt_failed = q._dispatcher.attempt_failed

    def held(*args, **kwargs):
        holding.set()
        assert go_on.wait(WAIT)
        attempt_failed(*args, **kwargs)

    q._dispatcher.attempt_failed = held
    q.register_executor("t", run, ExecutorConfig(timeout=timeout))
    q.enqueue(Job("t", id="overtaken"))
    q.start_dispatcher(1)
    readings = Readings(q)
    assert holding.wait(WAIT)
    readings.read()
    assert q.cancel("overtaken")
    go_on.set()
    assert q.join(WAIT)
    readings.read()
    return readings


@pytest.mark.parametrize("kind", ["thread", "async"])
def test_a_timeout_that_a_cancel_of_this_process_overtook_is_never_counted(quiet, kind):
    """The job ends as cancelled only, here as in Redis. (Before: its timeout, counted at its
    deadline, was taken back; the thread's retry was counted too, then moved to cancelled.)"""
    q, _ = quiet.pair()
    stuck = threading.Event()

    async def hang_async(job):
        await asyncio.sleep(WAIT)

    try:
        readings = _overtaken(q, hang_async if kind == "async" else (lambda job: stuck.wait(WAIT)), 0.1)
    finally:
        stuck.set()
    readings.never_down()
    assert mine(readings) == {**NOTHING, "cancelled": 1}
    assert shared_counts(q) == {**NOTHING, "cancelled": 1}


def test_a_timeout_that_a_cancel_overtook_in_process_stays_counted():
    """In-process (a guard: no count was ever moved there): the timeout counted at its
    deadline stays, and the cancel counts as well."""
    q = Queue()
    stuck = threading.Event()
    try:
        readings = _overtaken(q, lambda job: stuck.wait(WAIT), 0.1)
    finally:
        stuck.set()
        q.stop()
    readings.never_down()
    assert mine(readings) == {**NOTHING, "timed_out": 1, "cancelled": 1}


# --- 3. a timed-out attempt that stop() hands back ---------------------------------------------

def test_a_timed_out_attempt_that_stop_handed_back_before_its_retry_was_decided_counts_nowhere(quiet):
    """Its deadline came; its retry was decided after stop()'s release: the attempt is no
    longer this process's, its timeout is counted nowhere. (Before: counted at its deadline,
    then taken back.)"""
    producer, worker = quiet.pair()
    stuck = threading.Event()
    worker.register_executor("t", lambda job: stuck.wait(WAIT), ExecutorConfig(timeout=0.1))
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
    readings = Readings(worker)
    stopping = threading.Thread(target=worker.stop, kwargs={"wait": False})
    try:
        assert holding.wait(WAIT)
        readings.read()
        stopping.start()
        assert wait_until(lambda: link._released)  # the release hands what it holds back
        go_on.set()
        stopping.join(WAIT)
        assert not stopping.is_alive()
        readings.read()
    finally:
        go_on.set()
        stuck.set()
    readings.never_down()
    assert mine(readings) == NOTHING
