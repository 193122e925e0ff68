"""This process's per-type counters (ExecutorStats) of the attempts that stopped being its own
while they ran, over Redis: docs/redis.md, the ExecutorStats paragraph (the per-type counters of
all processes add up to the shared ones) and API.md ("The late result of a process declared
dead is ignored").

- An attempt that stop() hands back while it runs counts nowhere here, not even for the
  instant between the core's count and the link's take-back (a get_stats() then saw a success
  that was none); one whose success was decided before the hand-back stands, and stop() waits
  for it to go with the release (it was counted, then taken back, and its job ran again).
- A process reaped while silent (its reaper counted its attempts as crashed and gave their jobs
  back): its attempts' late outcomes count nowhere here once it learnt it was reaped. Before,
  they were counted here, and the job's run elsewhere counted again. One counted before it
  learnt so (its op went in the call whose reply told it so: Redis did not run it) stays
  counted: a counter never goes down (Prometheus reads that as a reset).
- A marked attempt that stop() could not give back (its release got no reply): ended as
  cancelled by whoever reaps the process, counted in the shared counters only, as a crash.
"""
import threading

import pytest
import redis as redis_py

from tinymq import ExecutorConfig, Job, PermanentFailure, RetryConfig

from _backends import Redis
from _helpers import WAIT, per_type_counts, record_failures, shared_counts, signal_after, wait_until

NOTHING = dict.fromkeys(["succeeded", "failed", "retried", "timed_out", "cancelled"], 0)
ONE_SUCCESS = {**NOTHING, "succeeded": 1}


def expire_and_reap(scripts, proc):
    """Reap ``proc`` as if it had been silent past its lease (one transaction: its own heartbeat
    cannot renew the lease in between), as test_redis_broker.py does."""
    with scripts.client.pipeline(transaction=True) as pipe:
        pipe.zadd(scripts.key("procs"), {proc: 0})
        scripts._script["reap"](keys=[scripts.prefix], args=[1], client=pipe)
        return pipe.execute()[1][0]


class FirstRunHeld:
    """A plain fn(job) whose first run waits for ``let_go`` (then raises ``raises``, an exception
    class, or ValueError if True); later runs (its job's run elsewhere, or in a later life)
    return at once."""

    def __init__(self, raises=False):
        self.raises = raises
        self.started, self.let_go = threading.Event(), threading.Event()
        self.threads = []
        self.runs = 0

    def __call__(self, job):
        self.runs += 1
        if self.threads:
            return
        self.threads.append(threading.current_thread())
        self.started.set()
        assert self.let_go.wait(WAIT)
        if self.raises:
            raise (ValueError if self.raises is True else self.raises)("boom")

    def end_first_run(self):
        """(Its worker thread exits then: its queue stopped.)"""
        self.let_go.set()
        self.threads[0].join(WAIT)
        assert not self.threads[0].is_alive()


# --- 1. A success that stop() handed back, counted for an instant ------------------------------


@pytest.fixture
def quiet(redis_url):
    """A long lease: no heartbeat tells the worker of anything during a test."""
    made = Redis(redis_url, lease=40.0)
    yield made
    made.close()


def test_a_success_stop_handed_back_is_never_counted_here_not_even_for_an_instant(quiet):
    producer, worker = quiet.pair()
    run = FirstRunHeld()
    for q in (producer, worker):
        q.register_executor("t", run)
    seen = []  # this process's counters when the link hears of the success (the core counted it by then)
    succeeded = worker._link.succeeded

    def succeeded_seen(job):
        seen.append(per_type_counts(worker))
        succeeded(job)

    worker._link.succeeded = succeeded_seen  # (before start_dispatcher: its workers read their hooks then)
    producer.enqueue(Job("t", "first"))
    worker.start_dispatcher(1)
    assert run.started.wait(WAIT)
    worker.stop(wait=False)  # the release hands the running attempt back
    run.end_first_run()
    assert all(counts == NOTHING for counts in seen), seen  # (before: [succeeded 1], taken back after)
    assert per_type_counts(worker) == NOTHING
    producer.start_dispatcher(1)
    assert producer.join(WAIT)
    assert shared_counts(producer) == ONE_SUCCESS
    assert per_type_counts(producer) == ONE_SUCCESS


def test_a_success_counted_before_stop_hands_back_stands_and_goes_with_the_release(quiet):
    """The core counted the success; stop() comes before the link queued its op: stop() waits for
    it, and the release sends it (before: handed back, the count taken back and the job run again)."""
    producer, worker = quiet.pair()
    run = FirstRunHeld()
    for q in (producer, worker):
        q.register_executor("t", run)
    counted, gate = threading.Event(), threading.Event()
    succeeded = worker._link.succeeded

    def succeeded_gated(job):
        counted.set()
        assert gate.wait(WAIT)
        succeeded(job)

    worker._link.succeeded = succeeded_gated
    stop_waits = threading.Event()
    link = worker._link

    class Watched(threading.Condition):
        def wait(self, timeout=None):
            stop_waits.set()
            return super().wait(timeout)

    link._reported = Watched(link._lock)
    producer.enqueue(Job("t", "first"))
    worker.start_dispatcher(1)
    assert run.started.wait(WAIT)
    run.let_go.set()
    assert counted.wait(WAIT)
    assert per_type_counts(worker) == ONE_SUCCESS
    stopper = threading.Thread(target=worker.stop, kwargs={"wait": False})
    stopper.start()
    assert wait_until(lambda: stop_waits.is_set() or not stopper.is_alive())
    gate.set()
    stopper.join(WAIT)
    assert not stopper.is_alive()
    assert per_type_counts(worker) == ONE_SUCCESS  # (before: taken back, 0)
    assert shared_counts(producer) == ONE_SUCCESS  # the release carried it
    assert producer.join(WAIT)
    assert run.runs == 1  # not handed back: it does not run again


def test_a_retry_decided_as_stop_hands_the_attempt_back_is_not_counted(quiet):
    """The attempt raised; stop()'s release hands it back between the check that it is still this
    process's and its retry's count (before: counted retried here, while Redis had a give-back)."""
    producer, worker = quiet.pair()
    run = FirstRunHeld(raises=True)
    for q in (producer, worker):
        q.register_executor("t", run)
    checked, gate = threading.Event(), threading.Event()
    not_held = worker._link.not_held

    def not_held_gated(job, exc):
        held_elsewhere = not_held(job, exc)
        checked.set()
        assert gate.wait(WAIT)
        return held_elsewhere

    worker._link.not_held = not_held_gated
    producer.enqueue(Job("t", "first", retry_config=RetryConfig(max_retries=2, initial_delay=0.0)))
    worker.start_dispatcher(1)
    assert run.started.wait(WAIT)
    run.let_go.set()
    assert checked.wait(WAIT)  # still this process's attempt when its failure was looked at
    worker.stop(wait=False)  # the release hands it back
    gate.set()
    run.threads[0].join(WAIT)
    assert not run.threads[0].is_alive()
    assert per_type_counts(worker) == NOTHING  # (before: retried 1)
    producer.start_dispatcher(1)
    assert producer.join(WAIT)
    assert shared_counts(producer) == ONE_SUCCESS
    assert per_type_counts(producer) == ONE_SUCCESS


# --- 2. A process reaped while silent -----------------------------------------------------------


@pytest.fixture
def short(redis_url):
    made = Redis(redis_url, lease=1.0)  # its heartbeat (every lease / 4) learns of the reap at once
    yield made
    made.close()


ENDINGS = pytest.mark.parametrize("raises", [False, True, PermanentFailure],
                                  ids=["returns", "raises", "fails for good"])


@ENDINGS
def test_a_reaped_process_counts_nowhere_what_its_attempt_ends_as_after_it_learnt_so(short, raises):
    producer, worker = short.pair()
    run = FirstRunHeld(raises)
    worker.register_executor("t", run)
    failures = record_failures(worker)
    producer.enqueue(Job("t", "x", retry_config=RetryConfig(max_retries=2, initial_delay=0.0)))
    worker.start_dispatcher(1)
    assert run.started.wait(WAIT)
    proc = worker._link._proc
    assert expire_and_reap(producer.broker._scripts, proc) == 1  # counted as a crash, the job back in Redis
    assert wait_until(lambda: worker._link._proc != proc)  # its heartbeat learnt it
    run.let_go.set()  # the late result of a process declared dead
    assert producer.join(WAIT)  # the job ran again, in the worker's second life
    assert run.runs == 2
    assert shared_counts(producer) == ONE_SUCCESS
    assert per_type_counts(worker) == ONE_SUCCESS  # (before: succeeded 2, or retried 1 too, or failed 1)
    assert failures.snapshot() == []  # (before: its failure for good reported here too)


def test_a_reaped_process_counts_nowhere_the_timeout_of_an_attempt_it_ran_under_its_old_id(short):
    producer, worker = short.pair()
    run = FirstRunHeld()
    worker.register_executor("t", run, ExecutorConfig(timeout=2.0))
    decided = signal_after(worker._link, "not_held")
    producer.enqueue(Job("t", "x", retry_config=RetryConfig(max_retries=2, initial_delay=0.0)))
    worker.start_dispatcher(1)
    assert run.started.wait(WAIT)
    proc = worker._link._proc
    assert expire_and_reap(producer.broker._scripts, proc) == 1
    assert wait_until(lambda: worker._link._proc != proc)  # learnt well within the attempt's timeout
    assert decided.wait(WAIT)  # its deadline came, under the id it let go
    run.let_go.set()
    assert producer.join(WAIT)  # it ran again in the worker's second life
    assert shared_counts(producer) == ONE_SUCCESS
    assert per_type_counts(worker) == ONE_SUCCESS  # (before: timed_out 1, retried 1 too)


@ENDINGS
@pytest.mark.parametrize("callbacks", [False, True], ids=["", "on_failure"])
def test_a_reaped_process_keeps_the_counts_of_the_outcomes_it_sent_in_the_call_that_found_it_reaped(
        quiet, raises, callbacks):
    """The attempt ends before the process hears of its reap: its op goes in a fetch whose
    reply says the process was reaped, and Redis runs none of it. What it counted stays counted
    (redisfix: it was taken back, and the counter went down). (With a failure callback, a
    failure for good is counted, and its callbacks run, once its op reached Redis: never here.)"""
    producer, worker = quiet.pair()
    run = FirstRunHeld(raises)
    worker.register_executor("t", run)
    failures = record_failures(worker) if callbacks else None
    producer.enqueue(Job("t", "x", retry_config=RetryConfig(max_retries=2, initial_delay=0.0)))
    worker.start_dispatcher(1)
    assert run.started.wait(WAIT)
    link = worker._link
    proc = link._proc
    with link._round_lock:  # no round meanwhile: the outcome waits to be sent
        assert expire_and_reap(producer.broker._scripts, proc) == 1
        run.let_go.set()
        assert wait_until(lambda: link._ops)  # its op queued
        counted_here = not (callbacks and raises is PermanentFailure)
        if counted_here:
            assert wait_until(lambda: per_type_counts(worker) != NOTHING)  # and counted here
    assert wait_until(lambda: link._proc != proc)  # the next round's reply said it was reaped
    assert producer.join(WAIT)
    assert run.runs == 2
    assert shared_counts(producer) == ONE_SUCCESS
    outcome = {False: "succeeded", True: "retried", PermanentFailure: "failed"}[raises]
    kept = {**ONE_SUCCESS, outcome: ONE_SUCCESS[outcome] + 1} if counted_here else ONE_SUCCESS
    assert wait_until(lambda: per_type_counts(worker) == kept), per_type_counts(worker)
    if callbacks:
        assert failures.snapshot() == []


# --- 3. A release that fails --------------------------------------------------------------------


def test_a_marked_attempt_stop_could_not_give_back_counts_as_cancelled_in_the_shared_counters_only(quiet):
    producer, worker = quiet.pair()
    run = FirstRunHeld()
    for q in (producer, worker):
        q.register_executor("t", run)
    worker._link._cancel_marked = lambda attempts: None  # deaf to marks: only the release's reply tells it

    def refused(*args, **kwargs):
        raise redis_py.ConnectionError("Redis is out of reach (test)")

    worker._link._release_call = refused
    job = Job("t", "first")
    producer.enqueue(job)
    worker.start_dispatcher(1)
    assert run.started.wait(WAIT)
    assert producer.cancel(job.id) is True  # leased: marked in Redis only
    proc = worker._link._proc
    worker.stop(wait=False)  # its release fails: nothing is given back, it hears of no mark
    run.end_first_run()
    assert per_type_counts(worker) == NOTHING
    assert expire_and_reap(producer.broker._scripts, proc) == 1  # its lease ran out: the mark ends the job
    assert shared_counts(producer) == {**NOTHING, "cancelled": 1}
    assert per_type_counts(worker) == NOTHING  # as a crashed job: in the shared counters only
    assert run.runs == 1
