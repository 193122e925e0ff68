"""attackDD: findings against 40258ef (a failure for good that a worker decides over Redis is
settled, and kept in reporting:<proc>, before its callbacks run; op A after them).

Each test is deterministic: interleavings are forced with events at the link's own seams
(its scripts object, its round lock), never with sleeps.
"""
import contextlib
import threading

import pytest

from _helpers import WAIT

GENEROUS = 30.0


class _WatchedLock:
    """A stand-in for QueueLink._round_lock that says when a thread of a given name asks for it."""

    def __init__(self, lock, name, arrived):
        self._lock, self._name, self._arrived = lock, name, arrived

    def __enter__(self):
        if threading.current_thread().name == self._name:
            self._arrived.set()
        self._lock.acquire()
        return self

    def __exit__(self, *exc):
        self._lock.release()
        return False

    def acquire(self, *args, **kwargs):
        if threading.current_thread().name == self._name:
            self._arrived.set()
        return self._lock.acquire(*args, **kwargs)

    def release(self):
        self._lock.release()

    def _is_owned(self):  # (the link's locks are RLocks taken with _sections.section)
        return self._lock._is_owned()


class _WatchedCondition:
    """A stand-in for QueueLink._reported that says when a thread of a given name waits on it."""

    def __init__(self, condition, name, *waiting):
        self._condition, self._name, self._waiting = condition, name, waiting

    def wait(self, timeout=None):
        if threading.current_thread().name == self._name:
            for event in self._waiting:
                event.set()
        return self._condition.wait(timeout)

    def notify_all(self):
        self._condition.notify_all()


def test_stop_during_the_settle_round_of_a_failure_does_not_wait_for_its_callbacks_and_it_is_reported_twice(
        redis_url):
    """docs/redis.md "A report survives its reporter": a kept report "is repeated only when
    the process was killed after its callbacks ran and before it said so", and stop() waits
    for such callbacks (10 s at most). API.md: exactly once when nothing dies.

    A worker decides a failure for good and sends its Z (its own round trip, QueueLink.failing
    -> _send) before it registers in _reporting. A stop() that looks at _reporting during
    that round trip sees nobody to wait for; its release moves the kept row to `reports`,
    the worker's callbacks run here anyway (no A: released), and the next process's beat
    hands the row out again: one failure, two reports, nothing died, nothing waited 10 s.
    (Natural triggers: stop(wait=False), stop(timeout=...) expiring, or a timeout's last
    attempt, which stop() never waits for, decided by the watchdog just as stop() runs.)
    """
    from tinymq import Job, PermanentFailure, Queue
    from tinymq.redis import RedisBroker

    name = "dd-stop-in-settle-round"
    worker = Queue(broker=RedisBroker(redis_url, name=name, lease=2.0))
    link = worker._link
    z_sent, stopper_waits, go_on, callback_ran = (threading.Event() for _ in range(4))
    # stopper_waits: stop() looked at _reporting (it waits for a reporting thread, or went on
    # to the release and wants the round lock). go_on: it waits for one, or it released.
    link._round_lock = _WatchedLock(link._round_lock, "attackDD-stopper", stopper_waits)
    link._reported = _WatchedCondition(link._reported, "attackDD-stopper", stopper_waits, go_on)
    scripts = link.scripts
    real_fetch, real_release = scripts.fetch, scripts.release

    def fetch(proc, fetch_id, n, lease_ms, max_crash, registered, ops=(), *rest, **bounds):
        reply = real_fetch(proc, fetch_id, n, lease_ms, max_crash, registered, ops, *rest, **bounds)
        if any(op.op == "Z" for op in ops) and not z_sent.is_set():
            z_sent.set()  # Redis settled the Z: counted, and kept in reporting:<proc>
            stopper_waits.wait(GENEROUS)  # the round trip lasts until stop() looked
        return reply

    def release(*args, **kwargs):
        try:
            return real_release(*args, **kwargs)
        finally:
            go_on.set()

    scripts.fetch, scripts.release = fetch, release
    reported_here, reported_elsewhere = [], []

    def callback_here(job, reason, exc):
        reported_here.append((job.id, reason))
        callback_ran.set()
        go_on.wait(GENEROUS)  # a slow callback: still running when stop() looks, or releases

    def fail(job):
        raise PermanentFailure("HTTP 404")

    worker.on_failure(callback_here)
    worker.register_executor("t", fail)
    other = None
    try:
        worker.enqueue(Job("t", id="doomed"))
        worker.start_dispatcher(1)
        assert z_sent.wait(GENEROUS)
        stopper = threading.Thread(target=worker.stop, kwargs={"wait": False}, name="attackDD-stopper")
        stopper.start()
        stopper.join(GENEROUS)
        assert not stopper.is_alive()
        assert callback_ran.wait(GENEROUS)
        # Another process of the fleet: its beat hands out what the release left in `reports`.
        other = Queue(broker=RedisBroker(redis_url, name=name, lease=2.0))
        other.on_failure(lambda job, reason, exc: reported_elsewhere.append((job.id, reason)))
        other.register_executor("t", fail)
        other.start_dispatcher(1)
        assert other.join(WAIT)
        assert reported_here + reported_elsewhere == [("doomed", "permanent_failure")]
    finally:
        go_on.set()
        stopper_waits.set()
        worker.stop()
        if other is not None:
            other.stop()



def test_a_kept_failure_handed_by_a_beat_whose_reply_was_lost_is_still_reported_and_join_returns(redis_url):
    """API.md: join() returns once every job ended and was reported; at-least-once reports
    through kill -9; docs/redis.md: a report survives its reporter.

    Process P decided a failure for good (its Z is settled: counted, kept in reporting:P with
    the 1 that holds stats.outstanding) and was killed -9 before its A. Process R's beat
    reaps P and hands R the row (now in reporting:R), but the reply is lost, and so are the
    two resends of _call_resending (Redis restarting). The heartbeat logs and goes on, and its
    next beat has a new beat id: beat.lua never hands R that row again, nor does a fetch. R
    lives on, so nobody reaps it: the failure is never reported, and join() never returns.
    (A fetch whose reply is lost is resent with its fetch id until it gets through.)
    """
    import redis as redis_py

    from tinymq import Job, Queue
    from tinymq.redis import RedisBroker
    from tinymq.redis._link import job_row
    from tinymq.redis._scripts import Scripts, SettleOp

    name = "dd-beat-reply-lost"
    client = redis_py.Redis.from_url(redis_url, decode_responses=True)
    scripts = Scripts(client, name)
    assert scripts.enqueue("tok", 100, 0, [job_row(Job("t", id="doomed"), 0.0)]).status == "ok"
    attempt = scripts.fetch("P", "1", 1, 60_000, 3, False).jobs[0].attempt
    scripts.fetch("P", "2", 0, 60_000, 3, True,
                  [SettleOp("Z", attempt, 1, 0, "permanent_failure", "PermanentFailure: HTTP 404")])
    assert client.hget(scripts.key("stats"), "outstanding") == "1"  # kept for P's callbacks
    assert client.hkeys(scripts.key("reporting:P")) == [f"doomed|permanent_failure|P|{attempt}"]

    r = Queue(broker=RedisBroker(redis_url, name=name, lease=2.0))
    link = r._link
    real_heartbeat = link.scripts.heartbeat
    beats = []
    lost = threading.Event()

    def heartbeat(proc, *args, **options):
        beats.append(proc)
        if len(beats) == 1:  # (called with R's round lock held: no fetch of R reaps P meanwhile)
            client.zadd(scripts.key("procs"), {"P": 0})  # P was killed: its lease runs out
            reply = real_heartbeat(proc, *args, **options)
            assert [row.id for row in reply.crashed] == ["doomed"]  # handed to R, in reporting:R
            raise redis_py.ConnectionError("the reply was lost")
        if len(beats) <= 3:  # _call_resending's two resends: Redis is still restarting
            if len(beats) == 3:
                lost.set()
            raise redis_py.ConnectionError("Redis is restarting")
        return real_heartbeat(proc, *args, **options)

    link.scripts.heartbeat = heartbeat
    reported = []
    r.on_failure(lambda job, reason, exc: reported.append((job.id, reason)))
    r.register_executor("t", lambda job: None)
    try:
        r.start_dispatcher(1)
        assert lost.wait(GENEROUS)
        assert r.join(15.0), (client.hget(scripts.key("stats"), "outstanding"),
                              client.keys(scripts.key("reporting:*")))
        assert reported == [("doomed", "permanent_failure")]
    finally:
        r.stop()
        client.close()


def test_a_failure_decided_as_stop_releases_is_not_both_reported_here_and_run_again_elsewhere(redis_url):
    """API.md "Stats" (a failure is counted before its callbacks run) and Queue.stop's
    docstring (an attempt that stop() cancels is no failure: not counted, retried or
    reported). A worker's attempt fails for good just before stop(wait=False); the worker is
    between Dispatcher.attempt_failed's stopping check and QueueLink.failing when the release
    runs (forced here by holding it in the ledger's not_held, the next call on that path).
    The release hands the started attempt back (not decided in Redis); failing's Z is queued
    after the release took the ops and is never sent; the callbacks run here all the same.
    One of the two must hold: the failure stands (counted, reported once, never run again),
    or the attempt is handed back (not reported here). Both happen instead.
    (Not from 40258ef: before it, the Z was queued after the callbacks, with the same end.)
    """
    import redis as redis_py

    from tinymq import Job, PermanentFailure, Queue
    from tinymq.redis import RedisBroker

    name = "dd-failure-as-stop-releases"
    worker = Queue(broker=RedisBroker(redis_url, name=name, lease=2.0))
    link = worker._link
    deciding, released = threading.Event(), threading.Event()
    real_not_held, real_release = link.not_held, link.scripts.release

    def not_held(job, exc):
        deciding.set()
        released.wait(GENEROUS)  # descheduled here while stop(wait=False) runs to its end
        held_not = real_not_held(job, exc)
        if held_not:  # (handed back by the release: neither failed nor given back by the worker)
            handled.set()
        return held_not

    def release(*args, **kwargs):
        try:
            return real_release(*args, **kwargs)
        finally:
            released.set()

    link.not_held, link.scripts.release = not_held, release
    handled = threading.Event()  # the worker is done with the attempt: failed, or handed back
    real_failing, real_given_back = link.failing, link.given_back

    @contextlib.contextmanager
    def failing(*args):
        try:
            with real_failing(*args) as ours:
                yield ours
        finally:
            handled.set()

    def given_back(job):
        try:
            real_given_back(job)
        finally:
            handled.set()

    link.failing, link.given_back = failing, given_back
    reported_here, ran_elsewhere = [], []

    def callback(job, reason, exc):
        reported_here.append((job.id, reason))

    def fail(job):
        raise PermanentFailure("HTTP 404")

    worker.on_failure(callback)
    worker.register_executor("t", fail)
    other = None
    client = redis_py.Redis.from_url(redis_url, decode_responses=True)
    try:
        worker.enqueue(Job("t", id="doomed"))
        worker.start_dispatcher(1)
        assert deciding.wait(GENEROUS)
        worker.stop(wait=False)
        assert released.is_set()
        assert handled.wait(GENEROUS)
        other = Queue(broker=RedisBroker(redis_url, name=name, lease=2.0))
        other.register_executor("t", lambda job: ran_elsewhere.append(job.id))
        other.start_dispatcher(1)
        assert other.join(WAIT)
        failed = client.hget(f"tmq:{{{name}}}:stats", "failed")
        assert not (reported_here and ran_elsewhere), (reported_here, ran_elsewhere, failed)
        # Fixed so: the release handed the attempt back, its late result is ignored here.
        assert (reported_here, ran_elsewhere, failed) == ([], ["doomed"], None)
    finally:
        released.set()
        worker.stop()
        if other is not None:
            other.stop()
        client.close()
