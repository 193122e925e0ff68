"""What a stopping process counts, per type, of the attempts its stop() gives back: docs/redis.md,
the ExecutorStats paragraph (the per-type counters of all processes add up to the shared ones)
and `stop()` ("An attempt that stop() cancels ... is given back, not counted; if its function
later returns or raises, that result is ignored ... and the job runs again elsewhere").

A plain ``fn(job)`` attempt has no context for stop(wait=False) to cancel: it runs on while the
release hands its job back to Redis. Before the fix its later return counted succeeded (its
raise, retried) in the stopping process, and the job's run elsewhere counted it again.
"""
import threading

import pytest

from tinymq import ExecutorConfig, Job, JobTimeout, RetryConfig

from _backends import Redis
from _helpers import WAIT, per_type_counts, shared_counts, signal_after

LEASE = 40.0  # the worker's heartbeat (every lease / 4) tells it of no mark during a test


@pytest.fixture
def redis(redis_url):
    made = Redis(redis_url, lease=LEASE)
    yield made
    made.close()


NOTHING = dict.fromkeys(["succeeded", "failed", "retried", "timed_out", "cancelled"], 0)


def run_and_stop(redis, raises, cancelled_elsewhere=False):
    """The worker runs a plain attempt; stop(wait=False) while it runs (after the producer
    cancelled it, if ``cancelled_elsewhere``, unheard of by the worker); then the attempt ends
    (raising, if ``raises``) and its thread exits. Returns (producer, worker, job)."""
    producer, worker = redis.pair()
    started, let_go = threading.Event(), threading.Event()
    ran_on = []

    def run(job):
        if ran_on:  # its run elsewhere, after the give-back
            return
        ran_on.append(threading.current_thread())
        started.set()
        assert let_go.wait(WAIT)  # a plain function: stop() has no context to cancel
        if raises:
            raise raises if isinstance(raises, BaseException) else ValueError("boom")

    for q in (producer, worker):
        q.register_executor("t", run)
    worker._link._cancel_marked = lambda attempts: None  # deaf to marks: stop() meets the mark
    job = Job("t", "first", retry_config=RetryConfig(max_retries=2, initial_delay=0.0))
    producer.enqueue(job)
    worker.start_dispatcher(1)
    assert started.wait(WAIT)
    if cancelled_elsewhere:
        assert producer.cancel(job.id) is True  # leased: marked in Redis only
    worker.stop(wait=False)  # the release hands the running attempt back
    let_go.set()
    ran_on[0].join(WAIT)  # its outcome is decided (and counted, if at all) by now
    assert not ran_on[0].is_alive()
    return producer, worker, job


@pytest.mark.parametrize("raises", [False, True, JobTimeout("its own")], ids=["returns", "raises", "raises JobTimeout"])
def test_a_plain_attempt_that_stop_gave_back_counts_nowhere_in_its_process(redis, raises):
    """(A JobTimeout of the function's own, not its executor's timeout: no timeout was counted
    here, so none is taken back: before, the count went to -1.)"""
    producer, worker, job = run_and_stop(redis, raises)
    assert per_type_counts(worker) == NOTHING  # (before: succeeded 1, or retried 1)
    assert shared_counts(producer) == NOTHING
    # The job is back in Redis: another process runs it, and the fleet counts one success.
    producer.start_dispatcher(1)
    assert producer.join(WAIT)
    expected = {**NOTHING, "succeeded": 1}
    assert shared_counts(producer) == expected
    assert per_type_counts(producer)["succeeded"] + per_type_counts(worker)["succeeded"] == 1


@pytest.mark.parametrize("raises", [False, True], ids=["returns", "raises"])
def test_a_marked_plain_attempt_that_stop_gave_back_counts_as_cancelled_as_in_redis(redis, raises):
    producer, worker, job = run_and_stop(redis, raises, cancelled_elsewhere=True)
    expected = {**NOTHING, "cancelled": 1}
    assert shared_counts(producer) == expected  # the release ended it as cancelled
    assert per_type_counts(worker) == expected
    assert producer.cancel(job.id) is False  # (reported "cancelled" by the next process's beat)


def test_a_marked_unstarted_attempt_that_stop_gave_back_counts_as_cancelled_as_in_redis(redis):
    """A buffered job cancelled elsewhere: stop()'s release gives it back, Redis ends it as
    cancelled, and its reply has the stopping process count it so."""
    producer, worker = redis.pair()
    started, let_go = threading.Event(), threading.Event()

    def run(job):
        if job.payload == "running":
            started.set()
            assert let_go.wait(WAIT)

    for q in (producer, worker):
        q.register_executor("t", run)
    worker._link._cancel_marked = lambda attempts: None
    running, buffered = Job("t", "running"), Job("t", "buffered")
    producer.enqueue_many([running, buffered])
    worker.start_dispatcher(1)  # one runs, the other is buffered: no worker is free
    assert started.wait(WAIT)
    assert producer.cancel(buffered.id) is True
    let_go.set()
    worker.stop()
    expected = {**NOTHING, "succeeded": 1, "cancelled": 1}
    assert shared_counts(producer) == expected
    assert per_type_counts(worker) == expected


def test_a_plain_attempt_that_stop_gave_back_then_timed_out_counts_nowhere_in_its_process(redis):
    producer, worker = redis.pair()
    started, let_go = threading.Event(), threading.Event()
    ran_on = []

    def run(job):
        if ran_on:
            return
        ran_on.append(threading.current_thread())
        started.set()
        assert let_go.wait(WAIT)

    for q in (producer, worker):
        q.register_executor("t", run, ExecutorConfig(timeout=0.5))
    decided = signal_after(worker._link, "not_held")
    job = Job("t", "first")
    producer.enqueue(job)
    worker.start_dispatcher(1)
    assert started.wait(WAIT)
    worker.stop(wait=False)
    assert decided.wait(WAIT)  # its deadline came after the release handed it back
    let_go.set()
    ran_on[0].join(WAIT)
    assert per_type_counts(worker) == NOTHING  # (before: timed_out 1, retried 1)
    assert shared_counts(producer) == NOTHING
