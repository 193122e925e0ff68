"""attack35: rate limits, periodic jobs, per-type stats and metrics, attacked as a user would.

1. ``interrupt_on_timeout`` cut ``q.cron()``/``q.every()``/``q.unschedule()`` (and
   ``register_executor``) in half. An executor's deadline passing while it registered a
   schedule raised JobTimeout inside tinymq's own code: inside ``Periodic._begin`` the
   ``except Exception`` meant for a broken time zone caught it, so the schedule stayed
   registered but dead ("fires no more ticks", its ERROR blaming the zone) while ``cron()``
   returned normally; earlier or later in the call it left a schedule registered but never
   armed, or the timer thread created but never started (no schedule of the queue would ever
   fire again). docs/api.md promises that the interruption never lands inside the calls that
   change a queue's state: they take effect whole, and JobTimeout is raised as they return.
   So over a broker an executor lowering its own rate limit (the API said "slow down") as its
   deadline passed could change it in its own process and never send it to Redis: the old,
   higher global limit stayed in force; or, as the registration sends the limit at once when
   the pump is idle (a round from the executor's thread), the JobTimeout landing in that round
   was taken for a crash of the link: the whole process let its id go as if killed (its
   other jobs reaped, each counted as a crash).
2. In a process fork()ed from one whose queue was started, ``q.every()``/``q.cron()`` accepted a
   schedule that never fired (the timer thread is the parent's, not there) and ``q.schedules()``
   showed its next tick, while ``enqueue`` there refuses jobs (QueueStopped, docs/api.md: "the
   child's copy refuses jobs"). The copy's schedules now count as stopped too.
3. The system had no thread to give the periodic jobs' timer (a container's pids limit): the
   failed ``threading.Thread`` stayed the queue's timer, never started. ``every()`` raised but kept
   its schedule (the name taken), no schedule registered later ever fired, and ``stop()`` raised
   "cannot join thread before it is started" (at exit too). From ``start_dispatcher`` the queue
   was left half started: workers ran, schedules never fired. Now ``every()``/``cron()`` register
   nothing when the timer cannot start (a later call tries again), and ``start_dispatcher`` stops
   the queue and raises NoThreadLeft, as it does for its other threads.
4. Over Redis, the grid of an ``every`` schedule with ``first_at`` was set from the first process's
   own wall clock (``first_at`` minus its ``time.time()``, as a delay from the server's now): a host
   whose clock was 5 minutes behind anchored the grid 5 minutes after ``first_at``, and the grid
   stays in Redis (every process joins it, restarts too) until the schedule's definition changes:
   a daily job meant for 03:00 ran at 03:05 every day. The server's clock arbitrates the hosts'
   (docs/api.md): ``first_at`` is now placed on it as given.
"""
import os
import subprocess
import sys
import threading
import time
from datetime import timedelta, tzinfo
from pathlib import Path

import pytest

import tinymq

from tinymq import ExecutorConfig, Job, Queue, RateLimit, RetryConfig

from _helpers import WAIT, wait_until

# (the deadline passes while the call blocks in the test's hook; 1 s leaves a loaded machine time to get there)
INTERRUPTING = ExecutorConfig(timeout=1.0, interrupt_on_timeout=True)


class _ZoneThatBlocksOnce(tzinfo):
    """UTC+1. Its first conversion in ``thread`` once ``schedule`` is registered in ``queue``
    blocks until ``released`` is set: the deadline of the executor registering it passes there."""

    def __init__(self, queue, schedule):
        self.queue, self.schedule = queue, schedule
        self.thread = None
        self.arrived, self.released = threading.Event(), threading.Event()

    def utcoffset(self, dt):
        if (threading.current_thread() is self.thread and not self.arrived.is_set()
                and any(stats.name == self.schedule for stats in self.queue.schedules())):
            self.arrived.set()
            self.released.wait(WAIT)
        return timedelta(hours=1)

    def dst(self, dt):
        return timedelta(0)

    def tzname(self, dt):
        return "UTC+1"


def test_an_interrupted_cron_registration_is_whole_or_nothing():
    q = Queue()
    zone = _ZoneThatBlocksOnce(q, "nightly")
    outcome = []
    done = threading.Event()

    def set_up(job):
        zone.thread = threading.current_thread()
        try:
            outcome.append(("returned", q.cron("0 3 * * *", "report", name="nightly", tz=zone)))
        except Exception as exc:  # JobTimeout: interrupted as it returned (anything else is a defect)
            outcome.append((type(exc).__name__, None))
        finally:
            done.set()

    q.register_executor("report", lambda job: None)
    q.register_executor("set-up", set_up, INTERRUPTING)
    q.start_dispatcher(1)
    try:
        q.enqueue(Job("set-up", retry_config=RetryConfig(max_retries=0)))
        assert zone.arrived.wait(WAIT), "the zone was never converted once the schedule was registered"
        assert wait_until(lambda: q.get_stats().jobs_timed_out == 1), "the attempt never timed out"
        zone.released.set()
        assert done.wait(WAIT)
        assert outcome in ([("returned", "nightly")], [("JobTimeout", None)])
        schedules = {stats.name: stats for stats in q.schedules()}
        # Whole or nothing: no schedule, or one that fires (before the fix: registered, and dead).
        if "nightly" in schedules:
            assert schedules["nightly"].next_run_at is not None, schedules["nightly"]
    finally:
        zone.released.set()
        q.stop()


def test_an_executor_lowering_its_own_rate_limit_as_its_deadline_passes_lowers_it_in_redis(redis_url):
    from tinymq.redis import RedisBroker

    broker = RedisBroker(redis_url, name="attack35-lower", lease=5.0)
    q = Queue(broker=broker)
    executor_thread = []
    in_set_limit, released, done = threading.Event(), threading.Event(), threading.Event()
    outcome = []
    set_limit = q._link.set_limit

    def slow_set_limit(*args):  # the deadline passes just as the link takes the new limit
        if threading.current_thread() in executor_thread:
            in_set_limit.set()
            released.wait(WAIT)
        return set_limit(*args)

    q._link.set_limit = slow_set_limit

    def call_api(job):  # told "429 Too Many Requests": one call a minute from now on
        executor_thread.append(threading.current_thread())
        try:
            q.register_executor("api", call_api, ExecutorConfig(timeout=1.0, interrupt_on_timeout=True,
                                                                rate_limit=RateLimit(1, per=60.0)))
            outcome.append("returned")
        except Exception as exc:  # JobTimeout: interrupted as it returned (anything else is a defect)
            outcome.append(type(exc).__name__)
        finally:
            done.set()

    q.register_executor("api", call_api, ExecutorConfig(timeout=1.0, interrupt_on_timeout=True,
                                                        rate_limit=RateLimit(100, per=60.0)))
    q.start_dispatcher(1)
    try:
        q.enqueue(Job("api", retry_config=RetryConfig(max_retries=0)))
        assert in_set_limit.wait(WAIT)
        assert wait_until(lambda: q.get_stats().executor_stats["api"].timed_out == 1), "the attempt never timed out"
        released.set()
        assert done.wait(WAIT)
        assert outcome in (["returned"], ["JobTimeout"])
        # Registered whole: the lower limit is the global one (before the fix Redis kept 100).
        assert wait_until(lambda: broker.shared_rate_limits().get("api", (None,))[0] == 1), \
            broker.shared_rate_limits()
    finally:
        released.set()
        q.stop()


def test_an_executor_registering_an_executor_as_its_deadline_passes_does_not_crash_the_redis_link(
        redis_url, caplog):
    from tinymq.redis import RedisBroker

    q = Queue(broker=RedisBroker(redis_url, name="attack35-round", lease=5.0))
    link = q._link
    executor_thread = []
    in_round, released, done = threading.Event(), threading.Event(), threading.Event()
    real_round = link._round

    def slow_round(*args, **kwargs):  # the deadline passes in the round the registration sends
        if threading.current_thread() in executor_thread and not in_round.is_set():
            in_round.set()
            released.wait(WAIT)
        return real_round(*args, **kwargs)

    link._round = slow_round

    def set_up(job):
        executor_thread.append(threading.current_thread())
        try:
            q.register_executor("report", lambda job: None)
        finally:
            done.set()

    q.register_executor("set-up", set_up, INTERRUPTING)
    q.start_dispatcher(1)
    try:
        assert wait_until(lambda: link._pump_idle), "the pump never idled"
        q.enqueue(Job("set-up", retry_config=RetryConfig(max_retries=0)))
        assert in_round.wait(WAIT), "the registration sent no round from the executor's thread"
        assert wait_until(lambda: q.get_stats().executor_stats["set-up"].timed_out == 1)
        released.set()
        assert done.wait(WAIT)
        q.enqueue(Job("report"))
        assert q.join(WAIT)
        crashed = [record.getMessage() for record in caplog.records if "crashed" in record.getMessage()]
        assert crashed == []  # before the fix: "a round on tinymq-worker-1 crashed; this process lets its id go"
    finally:
        released.set()
        q.stop()


# --- 2. A schedule registered in a forked child's copy of a started queue ---------------------------

ROOT = Path(tinymq.__file__).resolve().parent.parent

SCHEDULE_IN_A_FORKED_CHILD = r"""
import os
from tinymq import Queue, QueueStopped
q = Queue(100)
q.register_executor("t", lambda job: None)
q.every(3600, "t", name="parent")
q.start_dispatcher(workers=1)
pid = os.fork()
if pid == 0:
    for register in (lambda: q.every(0.01, "t", name="child"), lambda: q.cron("* * * * *", "t", name="cron")):
        try:
            register()
        except QueueStopped:
            pass
        else:
            print("a schedule accepted in the child, that nothing there fires", flush=True)
            os._exit(3)
    if any(stats.next_run_at is not None for stats in q.schedules()):
        print("a next tick shown in the child, that nothing there fires", q.schedules(), flush=True)
        os._exit(4)
    os._exit(0)
_, status = os.waitpid(pid, 0)
assert [stats.next_run_at is not None for stats in q.schedules()] == [True]  # the parent's goes on
q.stop()
print("child exit", os.waitstatus_to_exitcode(status))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork")
def test_a_forked_childs_copy_of_a_started_queue_refuses_schedules():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-c", SCHEDULE_IN_A_FORKED_CHILD], env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "child exit 0" in done.stdout, done.stdout + done.stderr


# --- 3. No thread left for the periodic jobs' timer --------------------------------------------------

def _refuse_the_timer_thread(monkeypatch):
    """Thread.start raises, as with no thread left, for the next periodic timer thread only."""
    real_start = threading.Thread.start
    refused = []

    def start(thread):
        if thread.name == "tinymq-periodic" and not refused:
            refused.append(thread)
            raise RuntimeError("can't start new thread")
        real_start(thread)

    monkeypatch.setattr(threading.Thread, "start", start)
    return refused


def test_a_schedule_registered_when_no_thread_is_left_is_refused_whole_and_the_next_one_fires(monkeypatch):
    ran = []
    q = Queue()
    q.register_executor("tick", lambda job: ran.append(job.id))
    q.start_dispatcher(1)
    refused = _refuse_the_timer_thread(monkeypatch)
    try:
        with pytest.raises(RuntimeError, match="can't start new thread"):
            q.every(0.01, "tick", name="first")
        assert refused and q.schedules() == []  # nothing registered: the name is free
        q.every(0.01, "tick", name="first")  # threads again: the timer starts now
        assert wait_until(lambda: len(ran) >= 2), q.schedules()
    finally:
        q.stop()  # (before the fix: "cannot join thread before it is started")


def test_start_dispatcher_without_a_thread_for_the_timer_stops_the_queue(monkeypatch):
    from tinymq import QueueStopped

    q = Queue()
    q.register_executor("tick", lambda job: None)
    q.every(0.01, "tick")
    _refuse_the_timer_thread(monkeypatch)
    with pytest.raises(RuntimeError, match=r"start_dispatcher\(workers=2\).*can't start new thread"):
        q.start_dispatcher(2)
    with pytest.raises(QueueStopped):  # not half started: no worker runs jobs that no schedule adds
        q.enqueue(Job("tick"))
    assert [stats.next_run_at for stats in q.schedules()] == [None]
    q.stop()  # still idempotent, and returns


# --- 4. first_at over Redis, from a host whose wall clock is behind -----------------------------------

def test_over_redis_first_at_anchors_the_grid_on_the_servers_clock_not_the_hosts(redis_url):
    from tinymq._periodic import tick_job_id
    from tinymq.redis import RedisBroker

    ran = []
    q = Queue(broker=RedisBroker(redis_url, name="attack35-first-at", lease=5.0))
    q.register_executor("report", lambda job: ran.append(job.id))
    q._periodic._wall = lambda: time.time() - 300.0  # this host's wall clock is 5 minutes behind
    first_at = round(time.time() + 1.0, 3)
    q.every(3600.0, "report", name="hourly", first_at=first_at)
    q.start_dispatcher(1)
    try:  # (before the fix: its first tick 5 minutes after first_at)
        assert wait_until(lambda: ran), q.schedules()
        assert ran == [tick_job_id("hourly", first_at)]
    finally:
        q.stop()
