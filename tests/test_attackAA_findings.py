"""attackAA: the command line (``python -m tinymq worker``/``status``) and periodic jobs.

Each test is one defect found by the attack; a fixed one has lost its xfail mark.
"""
import os
import sys
import time

import pytest

from tinymq._periodic import _Tick

from _backends import Redis
from _helpers import Recorder, wait_until

pytest.importorskip("croniter")


@pytest.fixture
def redis_backend(redis_url):
    made = Redis(redis_url)
    yield made
    made.close()


# --- periodic jobs over a broker -------------------------------------------------------------------

def test_an_every_schedule_fires_after_a_cron_schedule_of_the_same_name(redis_backend):
    # A deploy moves schedule "report" from every() to cron() and back (a rollback): the every
    # schedule's grid is still in Redis with its interval, so schedule_begin keeps it, and the
    # cron tick's claim (1.7e12) is "later" than every grid index: each tick is "taken".
    runs = Recorder()
    first = redis_backend.queue()
    first.register_executor("report", lambda job: runs.add(job.id))
    first.every(0.05, "report", name="report")
    first.start_dispatcher()
    assert runs.wait_for(1)
    first.stop()

    second = redis_backend.queue()  # the cron deploy (yearly: its one tick fires by hand)
    second.cron("0 0 1 1 *", "report", name="report")
    schedule = second._periodic._schedules["report"]
    second.start_dispatcher()
    assert wait_until(lambda: schedule.begun)
    assert second._periodic.backend.fire(schedule, _Tick(time.monotonic(), time.time(), -1)) == "fired"
    cron_job = schedule.last_job_id
    second.stop(wait=False)

    third = redis_backend.queue()  # the rollback
    third.register_executor("report", lambda job: runs.add(job.id))
    third.every(0.05, "report", name="report")
    before = len(runs.items)  # nothing runs the cron tick's job before this start
    third.start_dispatcher()
    assert runs.wait_until(lambda ids: len([i for i in ids[before:] if i != cron_job]) >= 2), \
        third.schedules()
