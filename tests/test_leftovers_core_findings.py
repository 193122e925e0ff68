"""Findings left open by the last review, in-process: a store's BaseException as a job ends, a cron
schedule whose next tick cannot be computed, and push_many_delayed's type states.

API.md "Persistence": ``delete`` returns before the job counts as finished for ``join()``, and if it
raises, the error is logged and the queue keeps working. docs/api.md "Periodic jobs" and "Stats".
"""
import asyncio
import contextlib
import logging
import math
import threading
import time
from datetime import datetime, timedelta, timezone, tzinfo

import pytest

from tinymq import Job, Queue, RetryConfig

from _helpers import WAIT, Recorder, all_accounted, record_failures
from test_stats_in_transit import books, collections_watched, compiled_only, line_up


# --- 1. a store's delete or mark_dead raising a BaseException as a job ends -----------------------

class StoreDied(BaseException):
    """Not an Exception: what a store's own code may raise (a library's abort, a test double)."""


class EndingFailsOnce:
    """An in-memory store (save, delete, load_all, and mark_dead when ``dead``) whose first
    ``fails_in`` call ("delete" or "mark_dead") raises ``error``; every call is recorded."""

    def __init__(self, fails_in, error, dead):
        self.fails_in, self.error = fails_in, error
        self.calls = Recorder()
        self.rows = {}
        self._lock = threading.Lock()
        if dead:
            self.mark_dead = self._mark_dead

    def _ending(self, method, job_id):
        self.calls.add((method, job_id))
        with self._lock:
            self.rows.pop(job_id, None)
            error, self.error = (self.error, None) if method == self.fails_in else (None, self.error)
        if error is not None:
            raise error

    def save(self, job):
        with self._lock:
            self.rows[job.id] = job

    def delete(self, job_id):
        self._ending("delete", job_id)

    def _mark_dead(self, job, reason, exc):
        self._ending("mark_dead", job.id)

    def load_all(self):
        return []


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.ERROR)
        self.recorder = Recorder()

    def emit(self, record):
        self.recorder.add(record)


@contextlib.contextmanager
def errors_logged():
    """A Recorder of the ERROR records of the ``tinymq`` logger while the block runs (from any thread)."""
    handler = _Records()
    tinymq_logger = logging.getLogger("tinymq")
    tinymq_logger.addHandler(handler)
    try:
        yield handler.recorder
    finally:
        tinymq_logger.removeHandler(handler)


ERRORS = [SystemExit, KeyboardInterrupt, StoreDied]
ENDINGS = [("delete", "succeeds", False), ("delete", "fails", False), ("mark_dead", "fails", True)]


def _executor(kind, ran):
    """A thread or async executor that records its job and raises for the payload "fails"."""
    if kind == "thread":
        def run(job):
            ran.add(job.payload)
            if job.payload == "fails":
                raise ValueError("boom")
        return run

    async def run_async(job):
        ran.add(job.payload)
        await asyncio.sleep(0)
        if job.payload == "fails":
            raise ValueError("boom")
    return run_async


@pytest.mark.parametrize("kind", ["thread", "async"])
@pytest.mark.parametrize("method, outcome, dead", ENDINGS, ids=["delete-success", "delete-failure", "mark_dead"])
@pytest.mark.parametrize("raised", ERRORS, ids=lambda raised: raised.__name__)
def test_a_job_ends_whatever_its_store_raises_as_it_ends(kind, method, outcome, dead, raised):
    """The store's delete (or mark_dead) raising something that is not an Exception skipped the
    job's task_done (join() hung, the job stayed unfinished), and for a thread executor ended the
    worker thread; for an async one the outcome's report died unseen. Now the job counts finished
    whatever the store raised, the error is logged, and the pool keeps its size: both workers
    meet at a barrier afterwards."""
    error = raised("store gone")
    store = EndingFailsOnce(method, error, dead)
    ran, met = Recorder(), threading.Barrier(2)
    q = Queue(10)
    try:
        q.set_persistence(store)
        failures = record_failures(q, key=lambda job: job.payload)
        q.register_executor("t", _executor(kind, ran))
        q.register_executor("meet", lambda job: met.wait(WAIT))  # two at once: both workers are alive
        q.start_dispatcher(2)
        with errors_logged() as logged:
            q.enqueue(Job("t", outcome, retry_config=RetryConfig(max_retries=0)))
            assert q.join(WAIT), "the job whose store raised as it ended never counted finished"
            assert store.calls.snapshot()[0][0] == method
            stats = q.get_stats()
            assert (stats.jobs_succeeded, stats.jobs_failed) == ((1, 0) if outcome == "succeeds" else (0, 1))
            assert all_accounted(stats) and stats.executor_stats["t"].active_jobs == 0
            if outcome == "fails":
                assert [(payload, reason) for payload, reason, _ in failures.snapshot()] == [
                    ("fails", "retries_exhausted")]
            q.enqueue(Job("meet", 1))
            q.enqueue(Job("meet", 2))
            assert q.join(WAIT), "the pool shrank: the two jobs that wait for each other never met"
            # (The job counts finished before the error goes on up to where it is logged.)
            assert logged.wait_until(lambda records: any(record.exc_info and record.exc_info[1] is error
                                                         for record in records)), "the store's error was not logged"
    finally:
        met.abort()
        q.stop(wait=False)



@pytest.mark.parametrize("raised", ERRORS, ids=lambda raised: raised.__name__)
def test_the_scheduler_goes_on_whatever_a_store_raises_as_it_fails_a_due_job(raised):
    """The scheduler thread fails a due job that cannot go in (its priority made invalid while it
    waited); the store's mark_dead raising a KeyboardInterrupt or another BaseException there ended
    the scheduler thread: no delayed job was moved in again, and join() hung. Now it is logged and the
    scheduler goes on (as a worker thread that dies is logged and replaced)."""
    error = raised("store gone")
    store = EndingFailsOnce("mark_dead", error, dead=True)
    ran = Recorder()
    q = Queue(10)
    try:
        q.set_persistence(store)
        failures = record_failures(q, key=lambda job: job.payload)
        q.register_executor("t", lambda job: ran.add(job.payload))
        q.start_dispatcher(1)
        with errors_logged() as logged:
            broken = q.enqueue_delayed(Job("t", "broken"), 0.05)
            broken.priority = 7  # (made invalid while it waits: moving it in fails it)
            assert failures.wait_for(1)
            assert q.join(WAIT)
            assert logged.wait_until(lambda records: any(record.exc_info and record.exc_info[1] is error
                                                         for record in records)), "the store's error was not logged"
            q.enqueue_delayed(Job("t", "later"), 0.05)
            assert q.join(WAIT), "the scheduler no longer moves delayed jobs in"
        assert ran.snapshot() == ["later"]
        assert [(payload, reason) for payload, reason, _ in failures.snapshot()] == [("broken", "retries_exhausted")]
    finally:
        q.stop(wait=False)


# --- 2. a cron schedule whose next tick cannot be computed ----------------------------------------

class FailsFrom(tzinfo):
    """UTC, until its offsets become unknown: at and after ``limit`` (a UTC wall time) they raise."""

    def __init__(self, limit):
        self.limit = limit

    def _known(self, moment):
        if moment is not None and moment.replace(tzinfo=None) >= self.limit:
            raise ValueError(f"no offset known from {self.limit}")

    def utcoffset(self, moment):
        self._known(moment)
        return timedelta(0)

    def dst(self, moment):
        self._known(moment)
        return timedelta(0)

    def tzname(self, moment):
        return "FAILS-FROM"


def _errors_about(caplog, name):
    return [record for record in caplog.records
            if record.name == "tinymq" and record.levelno >= logging.ERROR and name in record.getMessage()]


def _timer_fires(periodic, schedule):
    """What the timer thread (Periodic._run) does with a schedule it found due: an error is logged."""
    try:
        periodic._fire(schedule)
    except Exception:
        logging.getLogger("tinymq").exception("tinymq periodic timer error")


def test_a_cron_schedule_whose_next_tick_cannot_be_computed_stops_and_says_so_once(caplog):
    """Computing a cron schedule's next tick raised (here: its time zone knows no offset from the
    next minute on) out of the timer's firing of a tick, with the tick left in place: the timer
    logged an error and fired that same tick again a second later, again and again (its job ran
    once per second once the previous one had finished). Now the failure is logged once, as an
    ERROR naming the schedule, and the schedule fires no more ticks (it has no next run).
    The timer is driven by hand, as it would fire the ticks it finds due."""
    pytest.importorskip("croniter")
    minute = math.floor(time.time() / 60.0) * 60.0 + 60.0  # the last tick the zone can place
    zone = FailsFrom(datetime.fromtimestamp(minute + 1.0, timezone.utc).replace(tzinfo=None))
    wall = [minute - 10.0]  # the schedule's wall clock, set by the test
    q = Queue(10)
    try:
        periodic = q._periodic
        periodic._wall = lambda: wall[0]
        q.cron("* * * * *", "tick", name="tick", tz=zone)
        schedule = periodic._schedules["tick"]
        with periodic._lock:
            periodic._begin(schedule)  # as start_dispatcher does, without a timer thread racing the test
        schedule.begun = True
        assert schedule.tick.wall == minute
        wall[0] = minute + 0.5
        assert periodic._is_due(schedule.tick, time.monotonic() + 10.0, wall[0])
        with caplog.at_level(logging.ERROR, logger="tinymq"):
            _timer_fires(periodic, schedule)
            assert q.get_stats().jobs_enqueued == 1 and schedule.fired == 1
            q._ready.task_done(q._ready.remove(schedule.last_job_id))  # the tick's job ran and finished
            wall[0] += 1.0  # a second later
            # The timer fires what it finds due: that tick, again, every second, until now.
            assert not periodic._is_due(schedule.tick, time.monotonic() + 11.0, wall[0]), "the tick is due again"
        assert q.get_stats().jobs_enqueued == 1
        assert len(_errors_about(caplog, "'tick'")) == 1
        assert {s.name: s for s in q.schedules()}["tick"].next_run_at is None
    finally:
        q.stop(wait=False)


def test_a_cron_schedule_whose_first_tick_cannot_be_computed_at_start_stops_and_the_others_run(caplog):
    """The first tick of each schedule is computed as start_dispatcher() begins them: one that raised
    there (its zone fails from a date passed since its registration) came out of start_dispatcher(),
    and the schedules after it never began. Now it is logged once and that schedule fires no ticks;
    the others run."""
    pytest.importorskip("croniter")
    zone = FailsFrom(datetime(9000, 1, 1))
    ran = Recorder()
    q = Queue(10)
    try:
        q.register_executor("often", lambda job: ran.add(job.id))
        q.cron("* * * * *", "tick", name="broken", tz=zone)
        q.every(0.01, "often", name="often")
        zone.limit = datetime(1970, 1, 2)  # from now on it knows no offset
        with caplog.at_level(logging.ERROR, logger="tinymq"):
            q.start_dispatcher()
            assert ran.wait_for(3), "the schedule registered after the broken one never ran"
        assert len(_errors_about(caplog, "'broken'")) == 1
        assert {s.name: s for s in q.schedules()}["broken"].next_run_at is None
        assert q.get_stats().jobs_enqueued == len(ran) or q.get_stats().jobs_enqueued >= 3
    finally:
        q.stop(wait=False)


# --- 3. push_many_delayed: a batch with new types and an unregistered type's running attempt -------

def test_a_batch_with_new_types_counts_its_jobs_with_their_places_while_an_unregistered_type_ends(core):
    """push_many_delayed made, before its step, the states of the batch's types it had not seen
    (allocating: the collector may run, other threads get in). Meanwhile the last attempt of a type
    of the batch looked up already, one with no executor (a worker failing its job as no_executor),
    could end, and its type's state was forgotten; the step then made that state again as it placed
    the type's job (allocating again), after pushing the batch's delayed job and before counting
    any: a snapshot meanwhile saw a job placed that was not accepted. Here the ``ends_at``-th
    collection ends that attempt, as its worker would, and every collection takes a snapshot (the
    running attempt, of a type with no executor, is in no snapshot's places: added here)."""
    compiled_only(core, "push_many")
    spare = []
    for new_types in range(1, 6):
        for ends_at in range(8):
            ready, heap = core.ReadyQueue(1000), core.DelayedHeap(0)
            assert ready.push(Job("none", "running"))
            running, state = ready.pop_with_type(timeout=0)  # (no executor: its worker fails it)
            batch = [Job("none", "next")] + [Job(f"new-{k}", k) for k in range(new_types)]
            delayed = [Job("t", 0)]
            collections, ended, seen = [0], [], []

            def collection():
                if collections[0] == ends_at and not ended:
                    ended.append(ready.end(running, core.FAILED, state))
                collections[0] += 1
                placed, accepted = books(core, ready, heap)
                seen.append((placed + (0 if ended else 1), accepted))

            line_up(ends_at, spare)
            with collections_watched(collection):
                assert ready.push_many_delayed(batch, delayed, heap, [1.0]) == []
            if not ended:
                ready.end(running, core.FAILED, state)
            state = running = None
            assert collections[0], "no collection ran: the test shows nothing"
            assert [moment for moment in seen if moment[0] != moment[1]] == [], (new_types, ends_at)
            assert len(ready) == 1 + new_types and len(heap) == 1
            assert ready.counters()[core.ENQUEUED] == 3 + new_types and ready.counters()[core.FAILED] == 1
