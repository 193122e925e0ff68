"""Periodic jobs: q.every, q.cron, q.unschedule, q.schedules (API.md "Rate limits and periodic jobs").

The real timer path runs with sub-second ``every`` intervals. Cron ticks are
checked against croniter (and hand-written instants) for DST edges through
``cron_next``, and through the timer with the schedule's wall clock moved to
just before a minute boundary.
"""
import logging
import math
import re
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

from tinymq import Job, Priority, Queue, QueueStopped, SQLitePersistence
from tinymq._periodic import SCHEDULE_TAG, _Tick, cron_next, tick_job_id

from _helpers import WAIT, Recorder, make_queue, wait_until

croniter = pytest.importorskip("croniter").croniter

INTERVAL = 0.05


def schedule_of(q, name):
    return {s.name: s for s in q.schedules()}[name]


class Runs:
    """Each run of an executor: (monotonic time, job); optionally held until released."""

    def __init__(self, hold=False):
        self.recorder = Recorder()
        self.release = threading.Event()
        self.crash = False  # a released run raises: what a process killed mid-attempt would leave
        if not hold:
            self.release.set()

    def __call__(self, job):
        self.recorder.add((time.monotonic(), job))
        assert self.release.wait(WAIT), "the test never released the executor"
        if self.crash:
            raise RuntimeError("cancelled by stop()")

    @property
    def jobs(self):
        return [job for _, job in list(self.recorder.items)]

    def wait_for(self, count):
        assert self.recorder.wait_for(count), f"{count} runs expected, saw {len(self.recorder.items)}"


# --- every: the real timer --------------------------------------------------------------------

def test_every_ticks_on_its_interval_and_never_early():
    runs = Runs()
    with make_queue() as q:
        q.register_executor("tick", runs)
        assert q.every(INTERVAL, "tick", {"n": 1}) == "tick"
        assert schedule_of(q, "tick").next_run_at is None  # nothing before start_dispatcher
        lags = []  # how late this machine wakes a plain thread from a sleep of an interval, meanwhile

        def sleeper():
            while len(runs.recorder.items) < 6:
                before = time.monotonic()
                time.sleep(INTERVAL)
                lags.append(time.monotonic() - before - INTERVAL)

        control = threading.Thread(target=sleeper)
        started = time.monotonic()
        q.start_dispatcher()
        control.start()
        runs.wait_for(6)
        control.join(WAIT)
    times = [t for t, _ in runs.recorder.items]
    for k, at in enumerate(times[:6], start=1):  # tick k is due k intervals after the start
        assert at >= started + k * INTERVAL - 0.005, f"tick {k} ran {started + k * INTERVAL - at:.3f}s early"
    # Late by no more than the slack beyond what the machine imposes on a tick (a wake-up of the
    # timer, then of a worker): a loaded one wakes any thread late by more than the slack.
    assert times[5] - started < 6 * INTERVAL + 2.0 + 2 * max(lags, default=0.0), \
        f"a plain sleep was late by {max(lags, default=0.0):.3f}s at most"
    jobs = runs.jobs
    assert all(job.type == "tick" and job.payload == {"n": 1} for job in jobs)
    assert all(job.tags[SCHEDULE_TAG] == "tick" and job.id.startswith("tick@") for job in jobs)
    assert len({job.id for job in jobs}) == len(jobs)
    assert len({id(job.payload) for job in jobs}) == len(jobs)  # each tick's job has its own copy


def test_every_accepts_timedelta_priority_and_first_at_now_fires_at_once():
    runs = Runs()
    with make_queue() as q:
        q.register_executor("tick", runs)
        q.every(timedelta(hours=1), "tick", name="hourly", priority=Priority.HIGH, first_at=time.time())
        q.every(3600.0, "tick", name="aware", first_at=datetime.now(timezone.utc) - timedelta(seconds=5))
        q.start_dispatcher()
        runs.wait_for(2)
        stats = schedule_of(q, "hourly")
        assert stats.fired == 1 and stats.trigger == "every 3600s"
        assert stats.next_run_at == pytest.approx(time.time() + 3600, abs=60)
    assert schedule_of(q, "hourly").next_run_at is None  # stopped: no tick is coming
    assert sorted(job.id.split("@")[0] for job in runs.jobs) == ["aware", "hourly"]
    assert {job.priority for job in runs.jobs} == {Priority.HIGH, Priority.MEDIUM}


def test_a_wall_clock_step_never_shifts_every_ticks():
    runs = Runs()
    with make_queue() as q:
        q.register_executor("tick", runs)
        q._periodic._wall = lambda: time.time() - 86400.0  # the wall clock steps back a day
        q.every(INTERVAL, "tick")
        q.start_dispatcher()
        runs.wait_for(4)  # would hang for a day if ticks followed the wall clock


def test_a_schedule_registered_after_start_begins_at_once():
    runs = Runs()
    with make_queue() as q:
        q.register_executor("tick", runs)
        q.start_dispatcher()
        registered = time.monotonic()
        q.every(INTERVAL, "tick")
        runs.wait_for(2)
    assert runs.recorder.items[0][0] >= registered + INTERVAL - 0.005


# --- no pile-up --------------------------------------------------------------------------------

def test_ticks_are_skipped_and_counted_while_the_previous_job_runs():
    runs = Runs(hold=True)
    with make_queue() as q:
        q.register_executor("slow", runs)
        q.every(INTERVAL, "slow")
        q.start_dispatcher(4)  # free workers: only the schedule's rule keeps a second job out
        runs.wait_for(1)
        assert wait_until(lambda: schedule_of(q, "slow").skipped >= 3)
        assert len(runs.jobs) == 1 and q.get_stats().jobs_enqueued == 1
        stats = schedule_of(q, "slow")
        assert stats.fired == 1 and stats.last_job_id == runs.jobs[0].id
        runs.release.set()
        runs.wait_for(2)  # the first tick after it finished fires again
        assert len({job.id for job in runs.jobs}) == len(runs.jobs)


def test_a_job_waiting_for_its_retry_is_unfinished_too():
    attempts = Recorder()

    def flaky(job):
        attempts.add(job.id)
        if job.retries == 0:
            raise RuntimeError("first attempt fails")  # its retry waits the default backoff, 1s

    with make_queue() as q:
        q.register_executor("flaky", flaky)
        q.every(INTERVAL, "flaky")
        q.start_dispatcher(2)
        assert attempts.wait_for(1)
        assert wait_until(lambda: schedule_of(q, "flaky").skipped >= 3)
        assert len(attempts.items) == 1  # the retry has not run yet, and no other tick's job has
        assert attempts.wait_for(3)
    assert attempts.items[0] == attempts.items[1]  # the retry came before the next tick's job


def test_a_full_buffer_skips_the_tick_and_says_so(caplog):
    with make_queue(buffer_size=1) as q:
        q.register_executor("other", lambda job: None)
        q.enqueue(Job("other"))  # no dispatcher yet: the buffer stays full
        q.every(INTERVAL, "tick", first_at=time.time())
        q._periodic.start()  # the timer alone, without workers to empty the buffer
        assert wait_until(lambda: schedule_of(q, "tick").skipped >= 1)
        assert schedule_of(q, "tick").fired == 0
    assert any("schedule 'tick' skipped a tick" in r.getMessage() and r.levelname == "WARNING"
               for r in caplog.records)


def _refusals(caplog, name):
    return [r for r in caplog.records if r.getMessage().startswith(f"schedule {name!r}")
            and ("skipped a tick" in r.getMessage() or "again" in r.getMessage())]


def test_a_full_buffer_under_a_fast_schedule_logs_one_warning_not_one_per_tick(caplog):
    # Every 10 ms into a full queue: the first refused tick is logged, the next ones only counted
    # (as a Redis outage is logged: at most every 30 s), not one WARNING per tick.
    with make_queue(buffer_size=1) as q:
        q.enqueue(Job("other"))  # no dispatcher: the buffer stays full
        began = time.monotonic()
        q.every(0.01, "tick", first_at=time.time())
        q._periodic.start()  # the timer alone, without workers to empty the buffer
        assert wait_until(lambda: schedule_of(q, "tick").skipped >= 100)
        elapsed = time.monotonic() - began
    warnings = [r for r in _refusals(caplog, "tick") if r.levelname == "WARNING"]
    assert 1 <= len(warnings) <= 1 + elapsed // 30.0
    assert schedule_of(q, "tick").fired == 0


def test_refused_ticks_are_logged_at_most_every_30s_with_the_count_and_the_recovery(caplog):
    caplog.set_level(logging.INFO, logger="tinymq")
    with make_queue(buffer_size=1) as q:
        filler = q.enqueue(Job("other"))
        q.every(0.01, "tick")
        periodic = q._periodic
        clock = [1000.0]
        periodic._monotonic = lambda: clock[0]
        schedule = periodic._schedules["tick"]
        schedule.begun = True  # as start_dispatcher would, without a timer thread racing the test

        def ticks(count):
            for _ in range(count):
                clock[0] += 0.01
                schedule.tick = _Tick(clock[0], time.time() + clock[0], 0)
                periodic._fire(schedule)

        ticks(100)
        records = _refusals(caplog, "tick")  # the first refused tick only
        assert [r.levelname for r in records] == ["WARNING"]
        assert "skipped a tick: the ready buffer is full" in records[0].getMessage()
        assert "logged at most every 30s while it lasts" in records[0].getMessage()
        clock[0] += 30.0
        ticks(1)  # 30 s later: one more record, with the count of the ticks skipped since the last one
        records = _refusals(caplog, "tick")
        assert len(records) == 2 and records[1].levelname == "WARNING"
        assert "(100 ticks skipped since the last log record, this one included)" in records[1].getMessage()
        ticks(50)
        assert len(_refusals(caplog, "tick")) == 2
        assert q.cancel(filler.id)  # room again: the next tick fires, and the log says so
        ticks(1)
        records = _refusals(caplog, "tick")
        assert len(records) == 3 and records[2].levelname == "INFO"
        assert records[2].getMessage() == ("schedule 'tick' enqueues its ticks' jobs again, after 151 skipped "
                                           "ticks whose job the queue refused (50 since the last log record)")
        stats = schedule_of(q, "tick")
        assert (stats.fired, stats.skipped) == (1, 151)  # every refused tick counted


# --- unschedule --------------------------------------------------------------------------------

def test_unschedule_from_the_ticks_own_job_stops_later_ticks():
    witness = Runs()
    results = []
    with make_queue() as q:
        def once(job):
            results.append(q.unschedule("once"))

        q.register_executor("once", once)
        q.register_executor("witness", witness)
        q.every(INTERVAL, "once")
        q.every(INTERVAL, "witness")
        q.start_dispatcher(2)
        assert wait_until(lambda: results)
        count = len(witness.jobs)
        witness.wait_for(count + 4)  # four more ticks of the same interval: none for "once"
        assert results == [True]
        assert [s.name for s in q.schedules()] == ["witness"]
        assert q.get_stats().jobs_enqueued == len(results) + len(witness.jobs)
        assert q.unschedule("once") is False


class SlowStore:
    """An in-memory store whose save() waits while ``hold`` is clear (a slow disk)."""

    def __init__(self):
        self.rows = {}
        self.hold = threading.Event()
        self.hold.set()
        self.saving = threading.Event()

    def save(self, job):
        self.saving.set()
        assert self.hold.wait(WAIT)
        self.rows[job.id] = job

    def delete(self, job_id):
        self.rows.pop(job_id, None)

    def load_all(self):
        return []


def test_unschedule_while_a_tick_is_being_enqueued_waits_for_it_then_no_more():
    store = SlowStore()
    runs = Runs()
    with make_queue() as q:
        q.set_persistence(store)
        q.register_executor("tick", runs)
        q.every(INTERVAL, "tick")
        store.hold.clear()
        q.start_dispatcher()
        assert store.saving.wait(WAIT)  # the timer is inside the tick's enqueue
        done = []
        remover = threading.Thread(target=lambda: done.append(q.unschedule("tick")))
        remover.start()
        remover.join(0.1)
        assert remover.is_alive()  # it waits for the tick in progress ...
        store.hold.set()
        remover.join(WAIT)
        assert done == [True]
        runs.wait_for(1)  # ... whose job is enqueued and runs
        assert q.join(WAIT)
        q.every(INTERVAL, "witness")
        q.register_executor("witness", runs)
        runs.wait_for(4)
    assert [job.type for job in runs.jobs].count("tick") == 1


def test_unscheduled_names_leave_nothing_behind_once_their_jobs_finished():
    # An app that adds and removes a schedule per user: the process remembers an unscheduled
    # schedule's last job only while it is unfinished (a schedule registered again under the name
    # skips its ticks meanwhile), not one entry per name ever unscheduled.
    runs = Runs(hold=True)
    names = [f"user-{i}" for i in range(40)]
    with make_queue(buffer_size=1000) as q:
        q.register_executor("work", runs)
        q.start_dispatcher()
        for name in names:
            q.every(3600.0, "work", name=name, first_at=time.time())
        assert wait_until(lambda: all(s.fired == 1 for s in q.schedules()))
        held, done = names[:20], names[20:]
        for name in held:  # their jobs unfinished: each is remembered, as documented
            assert q.unschedule(name)
        assert set(q._periodic._unscheduled) == set(held)
        q.every(INTERVAL, "work", name=held[0])  # registered again: its ticks wait for that job
        assert wait_until(lambda: schedule_of(q, held[0]).skipped >= 2)
        assert schedule_of(q, held[0]).fired == 0
        assert q.unschedule(held[0])
        runs.release.set()
        assert q.join(WAIT)
        for name in done:  # their jobs finished: nothing needs them, nor the held ones' any more
            assert q.unschedule(name)
        assert q._periodic._unscheduled == {}
        assert q.schedules() == []


# --- validation ---------------------------------------------------------------------------------

@pytest.mark.parametrize("interval, error, text", [
    (0, ValueError, "interval must be > 0 seconds, got 0"),
    (-1.0, ValueError, "got -1.0"),
    (math.nan, ValueError, "got nan"),
    (math.inf, ValueError, "got inf"),
    ("5", TypeError, "interval must be seconds (float) or a timedelta, got '5'"),
    (timedelta(0), ValueError, "interval must be > 0"),
    (1e-9, ValueError, "interval must be at least 0.001 s, got 1e-09"),  # its timer would never rest
    (timedelta(microseconds=999), ValueError, "interval must be at least 0.001 s"),
])
def test_every_refuses_a_bad_interval_naming_it(interval, error, text):
    with Queue() as q:
        with pytest.raises(error, match=None) as info:
            q.every(interval, "tick")
        assert text in str(info.value)
        assert q.schedules() == []


def test_bad_arguments_name_the_value():
    with Queue() as q:
        with pytest.raises(ValueError, match="job type must be a non-empty str"):
            q.every(1.0, "")
        with pytest.raises(ValueError, match="priority must be a Priority .* got 7"):
            q.every(1.0, "tick", priority=7)
        with pytest.raises(ValueError, match="first_at must be a finite number, got nan"):
            q.every(1.0, "tick", first_at=math.nan)
        with pytest.raises(ValueError, match="aware datetime"):
            q.every(1.0, "tick", first_at=datetime.now())
        with pytest.raises(ValueError, match="schedule name must be a non-empty str, got ''"):
            q.every(1.0, "tick", name="")
        with pytest.raises(TypeError, match="cannot be copied for each tick"):
            q.every(1.0, "tick", payload=threading.Lock())
        with pytest.raises(ValueError, match=r"cron expression '\*/5 \* \*' has 3 fields"):
            q.cron("*/5 * *", "tick")
        with pytest.raises(ValueError, match="invalid cron expression '61 \\* \\* \\* \\*'"):
            q.cron("61 * * * *", "tick")
        with pytest.raises(TypeError, match="cron expression must be a str .* got 5"):
            q.cron(5, "tick")
        with pytest.raises(ValueError, match="IANA time zone name .* got 'Mars/Olympus'"):
            q.cron("* * * * *", "tick", tz="Mars/Olympus")
        with pytest.raises(TypeError, match="tz must be a tzinfo .* got 3"):
            q.cron("* * * * *", "tick", tz=3)
        assert q.schedules() == []


@pytest.mark.parametrize("expression", [
    "0 */5 * * * *",  # seconds first, as other cron tools write it: croniter read it as every second
    "* * * * * 30",  # croniter's seconds field, last
    "0 3 * * * 0 2030",  # croniter's year field
])
def test_cron_refuses_a_seconds_or_year_field(expression):
    """q.cron() takes the 5 standard fields: croniter's 6th (seconds, read last) and 7th (year) fields
    are refused with a ValueError naming the expression, so a seconds-first expression cannot run
    every second instead of every five minutes."""
    pytest.importorskip("croniter")
    with Queue() as q:
        with pytest.raises(ValueError, match=re.escape(f"cron expression {expression!r} has "
                                                       f"{len(expression.split())} fields")):
            q.cron(expression, "tick")
        assert q.schedules() == []
        q.cron("*/5 * * * *", "tick", name="five")
        q.cron("@Daily", "tick", name="daily")  # croniter's nicknames stand for 5 fields
        q.cron("@hourly", "tick", name="hourly")
        assert sorted(schedule.name for schedule in q.schedules()) == ["daily", "five", "hourly"]


def test_a_duplicate_name_raises_value_error_naming_it():
    with Queue() as q:
        q.every(1.0, "report")
        with pytest.raises(ValueError, match="a schedule named 'report' exists already"):
            q.every(2.0, "report")
        assert q.every(2.0, "report", name="report-fast") == "report-fast"
        assert q.cron("0 3 * * *", "report") == "report 0 3 * * *"
        with pytest.raises(ValueError, match="'report 0 3 \\* \\* \\*' exists already"):
            q.cron("0 3 * * *", "report", tz="Europe/Berlin")
        assert q.unschedule("report") is True
        q.every(5.0, "report")  # the name is free again
        assert sorted(s.name for s in q.schedules()) == ["report", "report 0 3 * * *", "report-fast"]


def test_cron_without_croniter_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "croniter", None)  # import croniter now raises ImportError
    with Queue() as q:
        with pytest.raises(ImportError, match=r"pip install 'tinymq\[cron\]'"):
            q.cron("* * * * *", "tick")


def test_schedules_after_stop_are_refused():
    q = Queue()
    q.stop()
    with pytest.raises(QueueStopped):
        q.every(1.0, "tick")


# --- cron: time zones and DST -------------------------------------------------------------------

def utc(*fields):
    return datetime(*fields, tzinfo=timezone.utc).timestamp()


@pytest.mark.parametrize("zone, expression, start, expected_utc", [
    # New York springs forward at 02:00 EST on 2026-03-08: 02:30 does not exist; it runs at the jump
    ("America/New_York", "30 2 * * *", datetime(2026, 3, 7, 12), [utc(2026, 3, 8, 7, 0), utc(2026, 3, 9, 6, 30)]),
    # ... and falls back at 02:00 EDT on 2026-11-01: 01:30 happens twice, and runs at both instants
    ("America/New_York", "30 1 * * *", datetime(2026, 10, 31, 12),
     [utc(2026, 11, 1, 5, 30), utc(2026, 11, 1, 6, 30), utc(2026, 11, 2, 6, 30)]),
    ("America/New_York", "30 2 * * *", datetime(2026, 10, 31, 12), [utc(2026, 11, 1, 7, 30), utc(2026, 11, 2, 7, 30)]),
    # Berlin: 2026-03-29 02:30 does not exist (runs at 03:00 CEST); 2026-10-25 02:30 happens twice
    ("Europe/Berlin", "30 2 * * *", datetime(2026, 3, 28, 12), [utc(2026, 3, 29, 1, 0), utc(2026, 3, 30, 0, 30)]),
    ("Europe/Berlin", "30 2 * * *", datetime(2026, 10, 24, 12),
     [utc(2026, 10, 25, 0, 30), utc(2026, 10, 25, 1, 30), utc(2026, 10, 26, 1, 30)]),
    ("Europe/Berlin", "0 * * * *", datetime(2026, 10, 25, 1, 30),
     [utc(2026, 10, 25, 0, 0), utc(2026, 10, 25, 1, 0), utc(2026, 10, 25, 2, 0)]),
    ("UTC", "*/15 * * * *", datetime(2026, 12, 1, 17, 55), [utc(2026, 12, 1, 18, 0), utc(2026, 12, 1, 18, 15)]),
])
def test_cron_ticks_across_dst_match_croniter(zone, expression, start, expected_utc):
    tz = ZoneInfo(zone)
    after = start.replace(tzinfo=tz).timestamp()
    reference = croniter(expression, start.replace(tzinfo=tz))
    ticks = []
    for _ in expected_utc:
        after = cron_next(expression, tz, after)  # the timer steps from each tick it fired
        ticks.append(after)
    assert ticks == expected_utc
    assert ticks == [reference.get_next(float) for _ in expected_utc]


def test_cron_tz_defaults_to_utc_and_accepts_names_and_tzinfo():
    with Queue() as q:
        q.cron("0 3 * * *", "a")
        q.cron("0 3 * * *", "b", tz="Asia/Tokyo")
        q.cron("0 3 * * *", "c", tz=ZoneInfo("Asia/Tokyo"))
        q._periodic.start()
        stats = {s.job_type: s for s in q.schedules()}
    assert datetime.fromtimestamp(stats["a"].next_run_at, timezone.utc).hour == 3
    assert datetime.fromtimestamp(stats["b"].next_run_at, ZoneInfo("Asia/Tokyo")).hour == 3
    assert stats["b"].next_run_at == stats["c"].next_run_at
    assert "Asia/Tokyo" in stats["b"].trigger


class HeldClock:
    """The wall clock as a schedule sees it: held at a reading until ``release()``, then running on
    from it at the real pace. A test holds it just before a minute while it sets its queue up and
    releases it once the queue runs: however slow a loaded machine is meanwhile, the minute does
    not pass before the timer waits for it (with a clock running all along, it could, and the
    first tick was then a minute later)."""

    def __init__(self, reading):
        self.hold(reading)

    def hold(self, reading):
        self._state = (reading, None)  # (reading, monotonic time of the release): read and set whole

    def release(self):
        reading, _ = self._state
        self._state = (reading, time.monotonic())

    def __call__(self):
        reading, released_at = self._state
        return reading if released_at is None else reading + (time.monotonic() - released_at)


def just_before_a_minute(lead=0.2, ahead=0.0):
    """A wall-clock reading ``lead`` seconds before a minute, a minute or two after ``ahead`` seconds from now."""
    return math.ceil((time.time() + ahead) / 60.0 + 1) * 60.0 - lead


def held_just_before_a_minute(lead=0.2, ahead=0.0):
    return HeldClock(just_before_a_minute(lead, ahead))


def test_cron_fires_through_the_timer_at_the_wall_clock_minute():
    runs = Runs()
    clock = held_just_before_a_minute()
    with make_queue() as q:
        q._periodic._wall = clock
        q.register_executor("minutely", runs)
        q.cron("* * * * *", "minutely", name="m")
        q.start_dispatcher()
        minute = schedule_of(q, "m").next_run_at
        assert minute % 60 == 0 and minute - clock() == pytest.approx(0.2)
        clock.release()
        runs.wait_for(1)
        assert clock() >= minute
        assert runs.jobs[0].id == tick_job_id("m", minute)
        assert schedule_of(q, "m").next_run_at == minute + 60


def stop_with_the_attempt_cancelled(q, runs):
    """A process stopping under a running attempt: stop() cancels it, its job stays stored."""
    q.stop(wait=False)  # saves the running job back as ready, and cancels the attempt
    runs.crash = True
    runs.release.set()
    own = q._dispatcher._own_threads  # (each of the queue's threads, until its target returns)
    for thread in [thread for thread in threading.enumerate() if thread.ident in own]:
        thread.join(WAIT)
        assert not thread.is_alive()


# --- with a store: restarts ----------------------------------------------------------------------

def test_a_recovered_unfinished_job_keeps_its_schedule_from_piling_up(tmp_path):
    path = str(tmp_path / "jobs.db")
    first = Runs(hold=True)
    with SQLitePersistence(path) as store:
        q = make_queue()
        q.set_persistence(store)
        q.register_executor("slow", first)
        q.every(INTERVAL, "slow")
        q.start_dispatcher()
        first.wait_for(1)
        stop_with_the_attempt_cancelled(q, first)
    again = Runs(hold=True)
    with SQLitePersistence(path) as store:
        q = make_queue()
        q.register_executor("slow", again)
        q.every(INTERVAL, "slow")  # registered before the store gives the job back: both orders work
        q.set_persistence(store)
        q.start_dispatcher(2)
        again.wait_for(1)
        assert again.jobs[0].id == first.jobs[0].id  # the recovered job runs ...
        assert wait_until(lambda: schedule_of(q, "slow").skipped >= 3)
        assert len(again.jobs) == 1  # ... and no tick piles a job up beside it
        again.release.set()
        again.wait_for(2)
        q.stop()
    assert again.jobs[1].id != first.jobs[0].id


def test_a_cron_tick_is_not_enqueued_twice_across_a_restart(tmp_path):
    path = str(tmp_path / "jobs.db")
    clock = held_just_before_a_minute()
    first = Runs(hold=True)
    with SQLitePersistence(path) as store:
        q = make_queue()
        q._periodic._wall = clock
        q.set_persistence(store)
        q.register_executor("nightly", first)
        q.cron("* * * * *", "nightly", name="n")
        q.start_dispatcher()
        tick = schedule_of(q, "n").next_run_at
        clock.release()
        first.wait_for(1)
        stop_with_the_attempt_cancelled(q, first)
    assert first.jobs[0].id == tick_job_id("n", tick)
    # The next process starts with its clock before that tick again (a step back, a fast restart);
    # the tick's job, given back by the store, says the tick fired: the next one is a minute on.
    clock.hold(tick - 0.3)
    again = Runs()
    with SQLitePersistence(path) as store:
        q = make_queue()
        q._periodic._wall = clock
        q.set_persistence(store)
        q.register_executor("nightly", again)
        q.cron("* * * * *", "nightly", name="n")
        q.register_executor("witness", again)
        q.start_dispatcher()
        clock.release()
        assert wait_until(lambda: schedule_of(q, "n").next_run_at == tick + 60)
        assert q.join(WAIT)
        stats = schedule_of(q, "n")
        q.stop()
    assert [job.id for job in again.jobs] == [tick_job_id("n", tick)]  # the stored one, run once
    assert stats.fired == 0 and stats.skipped == 0


def test_set_persistence_refuses_a_store_that_cannot_save_an_earlier_schedules_payload(tmp_path):
    """A schedule registered before set_persistence: the store is checked against it there (as
    every/cron check with the store set), so no tick fails to enqueue for ever."""
    store = SQLitePersistence(str(tmp_path / "jobs.db"))
    q = Queue(10)
    try:
        q.every(60.0, "report", {"when": object()}, name="nightly")
        with pytest.raises(TypeError, match="nightly"):
            q.set_persistence(store)
        assert q._store is None  # nothing taken: the store may be set once the schedule is fixed
        q.unschedule("nightly")
        q.every(60.0, "clean", "a\ud800", name="cleanup")  # no store yet: accepted
        with pytest.raises(ValueError, match="cleanup.*lone surrogate"):
            q.set_persistence(store)
        q.unschedule("cleanup")
        q.every(60.0, "report", {"when": "03:00"}, name="nightly")
        q.set_persistence(store)
        assert [s.name for s in q.schedules()] == ["nightly"]
    finally:
        q.stop(wait=False)
        store.close()


# --- garbage collection -------------------------------------------------------------------------

def test_a_dropped_queue_stops_its_timer():
    q = make_queue()
    q.every(3600.0, "tick")
    q.start_dispatcher()
    timer = q._periodic._thread
    assert timer.is_alive()
    del q
    import gc
    gc.collect()
    timer.join(WAIT)
    assert not timer.is_alive()


# --- over a Redis broker: each tick once across processes ------------------------------------------

def test_two_queues_on_one_broker_fire_each_every_tick_once(redis_backend):
    runs = Runs()
    queues = redis_backend.pair()
    started = time.monotonic()
    for q in queues:
        q.register_executor("tick", runs)
        q.every(0.1, "tick")
        q.start_dispatcher(2)
    runs.wait_for(8)
    for q in queues:
        assert q.unschedule("tick")
    assert queues[0].join(WAIT)
    ids = [job.id for job in runs.jobs]
    assert len(ids) == len(set(ids)), ids  # no tick ran twice
    shared = redis_backend.brokers[0]._client.hgetall(f"tmq:{{{redis_backend.queue_name}}}:schedule:tick")
    assert int(shared["fired"]) == len(ids)  # each tick claimed once, and its job enqueued once
    # The ticks are one grid, 0.1 s apart, whichever process fired them (a tick that a late
    # timer merged into the next one leaves a gap of two intervals).
    moments = sorted(datetime.strptime(i.split("@")[1], "%Y-%m-%dT%H:%M:%S.%fZ") for i in ids)
    gaps = [(b - a).total_seconds() / 0.1 for a, b in zip(moments, moments[1:])]
    assert all(gap >= 1 and gap == pytest.approx(round(gap), abs=1e-3) for gap in gaps), gaps
    assert gaps.count(1.0) >= len(gaps) // 2, gaps
    assert time.monotonic() - started < 8 * 0.1 + WAIT


def test_over_a_broker_no_pile_up_across_processes(redis_backend):
    runs = Runs(hold=True)
    queues = redis_backend.pair()
    for q in queues:
        q.register_executor("slow", runs)
        q.every(INTERVAL, "slow")
        q.start_dispatcher(2)
    runs.wait_for(1)
    assert wait_until(lambda: sum(schedule_of(q, "slow").skipped for q in queues) >= 4)
    assert len(runs.jobs) == 1
    runs.release.set()
    runs.wait_for(2)


def test_over_a_broker_a_cron_tick_fires_once(redis_backend):
    runs = Runs()
    queues = redis_backend.pair()
    clock = held_just_before_a_minute(lead=0.3)
    for q in queues:
        q._periodic._wall = clock
        q.register_executor("minutely", runs)
        q.cron("* * * * *", "minutely", name="m")
        q.start_dispatcher()
    minute = schedule_of(queues[0], "m").next_run_at
    assert schedule_of(queues[1], "m").next_run_at == minute
    clock.release()
    runs.wait_for(1)
    assert wait_until(lambda: all(schedule_of(q, "m").next_run_at == minute + 60 for q in queues))
    assert queues[0].join(WAIT)
    assert [job.id for job in runs.jobs] == [tick_job_id("m", minute)]
    assert sorted(schedule_of(q, "m").fired for q in queues) == [0, 1]


def test_a_queue_that_never_starts_fires_nothing(redis_backend):
    producer, worker = redis_backend.pair()
    runs = Runs()
    producer.every(INTERVAL, "tick")  # a web process: registers, never starts a dispatcher
    worker.register_executor("tick", runs)
    worker.register_executor("witness", runs)
    worker.every(INTERVAL, "witness")
    worker.start_dispatcher()
    runs.wait_for(4)
    assert {job.type for job in runs.jobs} == {"witness"}
    assert schedule_of(producer, "tick").next_run_at is None


class _Killed(BaseException):
    """The process dies here: nothing after this point of it runs (no except clause catches it)."""


def _yearly(q):
    """A cron schedule "tick" whose own ticks are months away: the test fires its ticks itself."""
    return q.cron("0 0 1 1 *", "tick", name="tick")


def _fire_now(q, name):
    """Fire a tick at now of cron schedule ``name`` of ``q`` (never started: no timer races it)."""
    schedule = q._periodic._schedules[name]
    wall = time.time()
    return schedule, q._periodic.backend.fire(schedule, _Tick(time.monotonic(), wall, -1)), wall


def test_over_a_broker_a_tick_claimed_is_already_enqueued(redis_backend):
    # The process dies the moment the claim's reply comes back: the tick's job must be in Redis
    # already, or no process ever enqueues it (the others see the tick taken).
    dying = redis_backend.queue()
    _yearly(dying)
    link = dying._link
    call_resending = link.broker._call_resending

    def die_after_the_claim(call, *args, **options):
        reply = call_resending(call, *args, **options)
        if getattr(call, "__name__", "") == "schedule_tick":
            raise _Killed()
        return reply

    link.broker._call_resending = die_after_the_claim
    with pytest.raises(_Killed):
        _fire_now(dying, "tick")
    other = redis_backend.queue()
    assert other.get_stats().jobs_enqueued == 1
    runs = Runs()
    other.register_executor("tick", runs)
    other.start_dispatcher()
    runs.wait_for(1)
    assert runs.jobs[0].id.startswith("tick@")
    assert other.join(WAIT)


@pytest.fixture
def lossy(redis_server, redis_url):
    from test_redis_resend import LossyProxy

    made = LossyProxy(redis_server.port)
    yield made
    made.close()


def test_over_a_broker_a_resent_tick_claim_enqueues_its_job_once(lossy, redis_backend):
    # The claim ran on the server and its reply was lost: the resend (same token) answers
    # "fire" again, and the tick's job is in Redis once.
    from tinymq.redis import RedisBroker

    q = Queue(broker=RedisBroker(lossy.url, name=redis_backend.queue_name))
    try:
        _yearly(q)
        lossy.drop_reply(b"*2\r\n$4\r\nfire")
        schedule, outcome, wall = _fire_now(q, "tick")
        assert lossy.dropped.is_set()
        assert outcome == "fired"
        assert schedule.last_job_id == tick_job_id("tick", wall)
        other = redis_backend.queue()
        stats = other.get_stats()
        assert (stats.jobs_enqueued, stats.medium_queue_size) == (1, 1)
        shared = other.broker._client.hgetall(f"tmq:{{{redis_backend.queue_name}}}:schedule:tick")
        assert (shared["fired"], shared.get("skipped")) == ("1", None)
        runs = Runs()
        other.register_executor("tick", runs)
        other.start_dispatcher()
        runs.wait_for(1)
        assert other.join(WAIT)
        assert [job.id for job in runs.jobs] == [schedule.last_job_id]
    finally:
        q.stop()


def test_over_a_broker_a_full_queue_skips_the_tick_and_the_next_tick_fires(redis_backend):
    q = redis_backend.queue(buffer_size=1)
    q.enqueue(Job("filler", id="filler"))
    _yearly(q)
    schedule = q._periodic._schedules["tick"]
    periodic = q._periodic
    schedule.begun = True  # as start_dispatcher would, without a timer thread racing the test
    key = f"tmq:{{{redis_backend.queue_name}}}:schedule:tick"
    shared = q.broker._client

    def fire_a_tick(wall):
        schedule.tick = _Tick(time.monotonic(), wall, -1)
        periodic._fire(schedule)

    first = time.time()
    fire_a_tick(first)
    assert (schedule.fired, schedule.skipped, schedule.last_job_id) == (0, 1, None)
    assert shared.hget(key, "skipped") == "1"
    stats = q.get_stats()
    assert (stats.jobs_enqueued, stats.medium_queue_size) == (1, 1)  # the filler only
    assert not shared.exists(f"tmq:{{{redis_backend.queue_name}}}:job:{tick_job_id('tick', first)}")
    worker = redis_backend.queue()  # makes room: runs the filler
    done = Recorder()
    worker.register_executor("filler", lambda job: done.add(job.id))
    worker.start_dispatcher()
    assert done.wait_for(1)
    assert q.join(WAIT)
    second = first + 60.0
    fire_a_tick(second)  # the skipped tick's claim does not block the next one
    assert (schedule.fired, schedule.skipped) == (1, 1)
    assert schedule.last_job_id == tick_job_id("tick", second)
    assert (shared.hget(key, "fired"), shared.hget(key, "skipped")) == ("1", "1")
    assert q.get_stats().jobs_enqueued == 2


def test_schedule_tick_enqueues_by_the_rules_of_enqueue(redis_url):
    # The script itself: a tick's job goes through enqueue's rules (the delayed cap evicts,
    # a duplicate id is refused), and a resent call answers what the first one did.
    import redis

    from tinymq.redis._scripts import Scripts

    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        scripts = Scripts(client, "s")
        assert scripts.enqueue("t0", 10, 1, [("old", "t", 1, 60_000, "body-old")]).status == "ok"
        row = ("s@1", "t", 1, 60_000, "body-s@1")  # delayed, at the cap: "old" is evicted
        def evicted(outcome):
            return outcome[0], [(e.id, e.body, e.reason) for e in outcome[1]]

        assert evicted(scripts.schedule_tick("s", 1, "c1", 10, 1, row)) == ("fire", [("old", "body-old", "evicted")])
        resent = scripts.schedule_tick("s", 1, "c1", 10, 1, row)
        assert evicted(resent) == ("fire", [("old", "body-old", "evicted")])
        assert scripts.schedule_tick("s", 1, "c2", 10, 1, row) == ("taken", [])
        assert client.zrange(scripts.key("delayed"), 0, -1) == ["s@1"]
        stats = client.hgetall(scripts.key("stats"))
        assert (stats["enqueued"], stats["evicted"], stats["outstanding"]) == ("2", "1", "1")
        assert scripts.schedule_tick("s", 2, "c3", 10, 1, ("s@2", "t", 1, 0, "b")) == ("busy", [])
        # A job with the tick's own id is unfinished: skipped, and it is the previous job now.
        assert scripts.enqueue("t1", 10, 0, [("d@1", "t", 1, 0, "b")]).status == "ok"
        assert scripts.schedule_tick("d", 1, "c4", 10, 0, ("d@1", "t", 1, 0, "b")) == ("busy", [])
        assert client.hmget(scripts.key("schedule:d"), "job", "skipped") == ["d@1", "1"]
        assert client.hget(scripts.key("schedule:s"), "skipped") == "1"
        assert client.hget(scripts.key("stats"), "enqueued") == "3"
    finally:
        client.close()
