"""Attack of session 24 (attack24): periodic jobs, rate limits, metrics and the worker command, as an
outsider would attack them; each finding with its test.
"""
import math
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

import tinymq
from tinymq import SQLitePersistence
from tinymq._periodic import tick_job_id

from _helpers import WAIT, Recorder, make_queue, wait_until

pytest.importorskip("croniter")

# (after the skip: it needs croniter)
from test_periodic import held_just_before_a_minute, just_before_a_minute, schedule_of  # noqa: E402

DAY = 86400.0
WALL_CLOCK_RECHECK = 0.2  # seconds


def test_a_cron_schedule_goes_on_when_a_clock_set_a_day_ahead_is_set_back(monkeypatch):
    """A wall clock a day ahead (a host booted without NTP) is corrected: a cron schedule went on
    waiting, silent, for the day-ahead minute after the tick it had fired, for a whole day (cron
    itself takes a step back of more than 3 hours as a correction)."""
    # (the timer looks at a cron schedule's wall clock again within this: the test need not wait a minute)
    monkeypatch.setattr(tinymq._periodic, "_WALL_CLOCK_RECHECK", WALL_CLOCK_RECHECK)
    runs = Recorder()
    clock = held_just_before_a_minute(ahead=DAY)
    with make_queue() as q:
        q._periodic._wall = clock
        q.register_executor("minutely", runs.add)
        q.cron("* * * * *", "minutely", name="m")
        q.start_dispatcher()
        clock.release()
        assert runs.wait_for(1)
        clock.hold(just_before_a_minute())  # corrected: back a day, again just before a minute
        corrected_minute = math.ceil(clock() / 60.0) * 60.0
        # (held until the timer has taken the correction: a loaded machine does not let the minute pass first)
        assert wait_until(lambda: schedule_of(q, "m").next_run_at == corrected_minute), \
            f"next tick at {schedule_of(q, 'm').next_run_at}, the clock reads {clock()}"
        clock.release()
        assert runs.wait_for(2), f"next tick at {schedule_of(q, 'm').next_run_at}, the clock reads {clock()}"
    assert runs.items[1].id == tick_job_id("m", corrected_minute)


def test_a_cron_schedule_restarted_with_its_clock_corrected_from_a_day_ahead_goes_on_at_once(tmp_path):
    """Its tick's job, recovered from the store, marks the day-ahead tick fired: a restart with the
    clock corrected waited a day for the next tick."""
    path = str(tmp_path / "jobs.db")
    clock = held_just_before_a_minute(ahead=DAY)
    hold = threading.Event()
    runs = Recorder()

    def held(job):
        runs.add(job)
        assert hold.wait(WAIT)
        raise RuntimeError("cancelled by stop()")

    with SQLitePersistence(path) as store:
        q = make_queue()
        q._periodic._wall = clock
        q.set_persistence(store)
        q.register_executor("minutely", held)
        q.cron("* * * * *", "minutely", name="m")
        q.start_dispatcher()
        clock.release()
        assert runs.wait_for(1)
        q.stop(wait=False)  # the process stops under the attempt: its job stays stored
        hold.set()
        own = q._dispatcher._own_threads  # (each of the queue's threads, until its target returns)
        for thread in [thread for thread in threading.enumerate() if thread.ident in own]:
            thread.join(WAIT)
            assert not thread.is_alive()
    clock.hold(just_before_a_minute())
    with SQLitePersistence(path) as store:
        q = make_queue()
        q._periodic._wall = clock
        q.set_persistence(store)
        q.register_executor("minutely", runs.add)
        q.cron("* * * * *", "minutely", name="m")
        q.start_dispatcher()
        next_run_at = schedule_of(q, "m").next_run_at
        q.stop()
    assert next_run_at - clock() < 60.0, f"next tick {next_run_at - clock():.0f}s away"


def test_over_redis_a_cron_process_a_day_ahead_claims_nothing_and_its_schedule_goes_on_once_corrected(
        redis_backend, monkeypatch):
    """Its claim of the day-ahead minute was taken as the schedule's latest: once its clock was
    corrected, every claim (of that process, and of every other) was "taken" for a day."""
    monkeypatch.setattr(tinymq._periodic, "_WALL_CLOCK_RECHECK", WALL_CLOCK_RECHECK)  # (as above)
    runs = Recorder()
    clock = held_just_before_a_minute(ahead=DAY)
    q = redis_backend.queue()
    try:
        q._periodic._wall = clock
        q.register_executor("minutely", runs.add)
        q.cron("* * * * *", "minutely", name="m")
        q.start_dispatcher()
        clock.release()
        assert wait_until(lambda: schedule_of(q, "m").skipped == 1)  # refused by Redis's clock
        assert runs.items == [] and q.get_stats().jobs_enqueued == 0
        clock.hold(just_before_a_minute())  # corrected
        corrected_minute = math.ceil(clock() / 60.0) * 60.0
        assert wait_until(lambda: schedule_of(q, "m").next_run_at == corrected_minute), \
            f"next tick at {schedule_of(q, 'm').next_run_at}, the clock reads {clock()}"
        clock.release()
        assert runs.wait_for(1), f"next tick at {schedule_of(q, 'm').next_run_at}, the clock reads {clock()}"
        assert runs.items[0].id == tick_job_id("m", corrected_minute)
    finally:
        q.stop()


def test_a_schedule_claim_far_ahead_of_the_redis_clock_is_no_claim(redis_url):
    """A claim in Redis more than 3 hours ahead of its clock (left by a wrong clock, or written by
    hand) held back every later tick of the schedule, in every process, until then."""
    import redis

    from tinymq.redis._scripts import Scripts

    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        scripts = Scripts(client, "s")
        seconds, micro = client.time()
        now_us = seconds * 1_000_000 + micro
        row = ("m@now", "t", 1, 0, "body")
        client.hset(scripts.key("schedule:m"), mapping={"last": now_us + round(DAY * 1_000_000), "by": "x",
                                                        "outcome": "fire"})
        assert scripts.schedule_tick("m", now_us, "c1", 10, 0, row) == ("fire", [])
        assert scripts.schedule_tick("m", now_us, "c2", 10, 0, row) == ("taken", [])  # claimed once
        ahead = ("m@ahead", "t", 1, 0, "body")  # a cron tick a day ahead: its process's clock is wrong
        assert scripts.schedule_tick("m", now_us + round(DAY * 1_000_000), "c3", 10, 0, ahead) == ("ahead", [])
        assert client.hget(scripts.key("schedule:m"), "last") == str(now_us)
        assert client.hget(scripts.key("stats"), "enqueued") == "1"
    finally:
        client.close()


def test_worker_reports_a_bad_target_without_the_modules_import_output_as_the_error(tmp_path):
    """The check's whole stderr was the error: a module that logs (or warns) at import, as one
    that registers schedules does at INFO, had that output shown after "error:", and the error
    itself on a line of its own."""
    (tmp_path / "logs_at_import.py").write_text(textwrap.dedent("""
        import sys
        print("configuring the app", file=sys.stderr)
        queue = None
    """))
    root = str(Path(tinymq.__file__).resolve().parent.parent)
    result = subprocess.run([sys.executable, "-m", "tinymq", "worker", "logs_at_import:queues"], cwd=tmp_path,
                            env=dict(os.environ, PYTHONPATH=root), stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines() == [
        "configuring the app",  # the module's own output, passed on as it came
        "python -m tinymq worker: error: 'logs_at_import' has no attribute 'queues' (from 'logs_at_import:queues')",
    ]
