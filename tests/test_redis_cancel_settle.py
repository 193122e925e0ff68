"""A running attempt that another process cancelled, whatever it does before its process hears
of the cancel, ends as cancelled: API.md "Async executors and cancellation" (a running attempt
cancelled "is not retried. The job is reported with reason "cancelled" and counted in
jobs_cancelled") and docs/redis.md ("Cancelling across processes", and the ExecutorStats
paragraph: the per-type counters of all processes add up to the shared ones).

The worker Queue runs the job while the producer Queue (another process, as far as Redis can
tell) cancels it: cancel() returns True, the attempt is marked in Redis. The worker hears of
the mark only with its next fetch or heartbeat reply: its heartbeat is a quarter of a long
lease away, and its pump waits for a free worker (a second job is buffered behind the running
one), so the executor's outcome (a success, a retry, a failure for good, a timeout) is decided
there before it hears of the mark, and reaches Redis after it. Before the fix a failure for
good stood (the job dead, counted failed, reported with its failure), and the worker's
per-type counters counted whatever the attempt did. (Since test_monotone_counts an outcome
the worker counted before the reply said Redis ended the job as cancelled stays counted so
in its per-type counters, as a counter never goes down: a success, a retry with its timeout,
a failure for good with no callback registered. One with a callback waits for that reply,
and counts as cancelled.)
"""
import logging
import threading

import pytest

from tinymq import ExecutorConfig, Job, PermanentFailure, RetryConfig

from _backends import Redis
from _helpers import WAIT, per_type_counts, record_failures, shared_counts, wait_until

LEASE = 40.0  # the worker's heartbeat (every lease / 4) tells it of no mark during a test
TIMEOUT = 2.0  # seconds: the deadline comes after the cancel, before the executor returns

# outcome -> (what the executor does once let go, max_retries, whether it times out)
OUTCOMES = {
    "success": (None, 2, False),
    "retry": (ValueError("boom"), 2, False),
    "permanent failure": (PermanentFailure("HTTP 404"), 2, False),
    "retries exhausted": (ValueError("boom"), 0, False),
    "timeout, then a retry": (None, 2, True),
    "timeout on the last retry": (None, 0, True),
}
FAILURES_FOR_GOOD = ["permanent failure", "retries exhausted", "timeout on the last retry"]
# outcome -> what the worker counts of it before the reply says Redis ended it as cancelled
# (with a failure callback, a failure for good waits for that reply: counted as cancelled)
COUNTED_BEFORE_THE_REPLY = {
    "success": {"succeeded": 2},  # (1: the filler)
    "retry": {"retried": 1},
    "permanent failure": {"cancelled": 1},
    "retries exhausted": {"cancelled": 1},
    "timeout, then a retry": {"timed_out": 1, "retried": 1},
    "timeout on the last retry": {"cancelled": 1},
}


@pytest.fixture
def redis(redis_url):
    made = Redis(redis_url, lease=LEASE)
    yield made
    made.close()


def run_cancelled_elsewhere(redis, outcome, callbacks, before_stop=None):
    """Run the job in ``worker`` and cancel it from ``producer`` while its executor waits, then
    let the executor end as ``outcome`` says; returns (producer, worker, job, reports of each).
    ``before_stop(job)``: called once the producer's join() returned, before the worker stops."""
    raised, max_retries, times_out = OUTCOMES[outcome]
    producer, worker = redis.pair()
    reports = {}
    if callbacks:
        reports = {q: record_failures(q, key=lambda job: job.id) for q in (producer, worker)}
    started, let_go = threading.Event(), threading.Event()

    def run(job):
        if job.payload == "filler":
            return
        started.set()
        assert let_go.wait(WAIT)  # deaf to ctx.cancelled: it ends on its own
        if raised is not None:
            raise raised

    config = ExecutorConfig(timeout=TIMEOUT if times_out else None)
    for q in (producer, worker):  # (every process registers the same executors)
        q.register_executor("t", run, config)
    if times_out:
        # A deadline comes only after the filler waited here its second: given back, its reply
        # would tell the worker of the mark, which would cancel the attempt before the deadline.
        worker._link._cancel_marked = lambda attempts: None
    retry = RetryConfig(max_retries=max_retries, initial_delay=0.0)
    job = Job("t", "target", retry_config=retry)
    producer.enqueue_many([job, Job("t", "filler")])
    worker.start_dispatcher(1)  # the target runs, the filler is buffered: no worker is free
    assert started.wait(WAIT)
    assert producer.cancel(job.id) is True  # leased: marked in Redis
    if not times_out:
        let_go.set()
    assert producer.join(WAIT)
    let_go.set()  # (a timed-out attempt returns late)
    if before_stop is not None:
        before_stop(job)
    worker.stop()  # its last replies are in: every count it makes is made
    return producer, worker, job, reports


@pytest.mark.parametrize("outcome", list(OUTCOMES))
def test_an_attempt_cancelled_elsewhere_ends_cancelled_whatever_it_did_before_its_process_heard(
        redis, outcome):
    producer, worker, job, reports = run_cancelled_elsewhere(redis, outcome, callbacks=True)
    # Reported once, as cancelled, by the process that held it.
    assert [(i, reason) for i, reason, _ in reports[worker].snapshot()] == [(job.id, "cancelled")]
    assert reports[producer].snapshot() == []
    expected = {"succeeded": 1, "failed": 0, "retried": 0, "timed_out": 0, "cancelled": 1}  # (1: the filler)
    assert shared_counts(producer) == expected
    assert producer.broker.dead_jobs() == []  # not dead: cancelled
    assert producer.cancel(job.id) is False
    # The worker's per-type counters count a failure for good (its callbacks waited for the
    # settle's reply) as cancelled too; what it counted before the reply stays counted.
    assert per_type_counts(worker) == {**expected, "cancelled": 0, **COUNTED_BEFORE_THE_REPLY[outcome]}
    assert per_type_counts(producer) == dict.fromkeys(expected, 0)


@pytest.mark.parametrize("outcome", FAILURES_FOR_GOOD)
def test_a_failure_for_good_cancelled_elsewhere_counts_as_cancelled_with_no_callback_registered(
        redis, outcome, caplog):
    """With no on_failure callback nothing waits for the failure's settle: the worker counts
    the failure at once, and it stays counted so when the reply of that settle says that Redis
    ended the job as cancelled (logged)."""
    def logged(job):
        return any(record.levelno == logging.INFO and f"job {job.id} (t) was cancelled" in record.getMessage()
                   for record in caplog.records)

    # The log comes with the reply to the failure's settle, which the worker's pump reads after
    # Redis ran it (the producer's join() may return first): waited for before stop(), which
    # gives up a round in flight (its ops go again with the release, found already run).
    with caplog.at_level(logging.INFO, logger="tinymq"):
        producer, worker, job, _ = run_cancelled_elsewhere(
            redis, outcome, callbacks=False, before_stop=lambda job: wait_until(lambda: logged(job)))
    expected = {"succeeded": 1, "failed": 0, "retried": 0, "timed_out": 0, "cancelled": 1}
    assert shared_counts(producer) == expected
    assert producer.broker.dead_jobs() == []
    counted = {"failed": 1, "timed_out": 1} if outcome == "timeout on the last retry" else {"failed": 1}
    assert per_type_counts(worker) == {**expected, "cancelled": 0, **counted}
    assert logged(job)
