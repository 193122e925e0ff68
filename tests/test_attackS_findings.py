"""Findings of the attack on f6faa2f (a report survives its reporter) and dec8756 (a
buffered job does not wait behind long jobs): each test failed before its fix.

1. A rate-limited job given back unstarted (op B: stuck in a busy process's buffer, or
   unstarted at stop()) counted as a start in its type's rate window for ``per`` from the
   give-back. With RateLimit(1, per=30), the job a busy process gave back after its second
   waited 30 s for the window instead of running in the idle process at once: the
   give-back made it wait far longer than staying would have. Fixed: a B of an attempt
   whose start Redis never heard of (op T, which every started attempt of a rate-limited
   type sends first) removes its window entry; a process that does not rate-limit the type
   itself (another's registration may) sends T before the B of an attempt stop() cancelled.
"""
import threading
import time

import pytest

from tinymq import ExecutorConfig, Job, RateLimit
from tinymq.redis._scripts import Scripts, SettleOp

from _backends import Redis
from _helpers import WAIT

LEASE_MS = 60_000


@pytest.fixture
def scripts(redis_url):
    import redis as redis_py

    client = redis_py.Redis.from_url(redis_url, decode_responses=True)
    yield Scripts(client, "attackS")
    client.close()


@pytest.fixture
def redis(redis_url):
    made = Redis(redis_url, lease=2.0)
    yield made
    made.close()


# --- 1. an unstarted give-back is no start ---------------------------------------------

def test_a_rate_limited_job_given_back_unstarted_does_not_use_up_its_window(scripts):
    scripts.set_limits({"rl": (10, 1, 30.0)})  # one start per 30 s
    scripts.enqueue("tok", 100, 0, [("r", "rl", 1, 0, "body-r")])
    attempt = scripts.fetch("busy", "1", 1, LEASE_MS, 3, False).jobs[0].attempt
    # Given back before any worker started it (no T op): it never started.
    reply = scripts.fetch("busy", "2", 0, LEASE_MS, 3, True, [SettleOp("B", attempt)])
    assert reply.stale == 0
    assert [job.attempt.split(":", 1)[1] for job in scripts.fetch("idle", "1", 1, LEASE_MS, 3, False).jobs] == ["r"]


def test_a_rate_limited_job_given_back_after_its_start_still_counts(scripts):
    """(What held before: a start reported by T counts, whatever ends the attempt.)"""
    scripts.set_limits({"rl": (10, 1, 30.0)})
    scripts.enqueue("tok", 100, 0, [("r", "rl", 1, 0, "body-r")])
    attempt = scripts.fetch("busy", "1", 1, LEASE_MS, 3, False).jobs[0].attempt
    scripts.fetch("busy", "2", 0, LEASE_MS, 3, True, [SettleOp("T", attempt), SettleOp("B", attempt)])
    assert scripts.fetch("idle", "1", 1, LEASE_MS, 3, False).jobs == []  # parked for the window


def test_a_rate_limited_job_buffered_behind_a_long_one_runs_in_an_idle_process(redis):
    busy, idle = redis.pair()
    release, long_started, rl_ran = threading.Event(), threading.Event(), threading.Event()

    def long_job(job):
        long_started.set()
        release.wait(WAIT * 3)

    for q in (busy, idle):
        q.register_executor("long", long_job, ExecutorConfig(max_concurrent_jobs=10))
        q.register_executor("rl", lambda job: rl_ran.set(),
                            ExecutorConfig(max_concurrent_jobs=10, rate_limit=RateLimit(1, per=30.0)))
    busy.start_dispatcher(1)
    try:
        busy.enqueue_many([Job("long", None, id="long"), Job("rl", None, id="r")])
        assert long_started.wait(WAIT)
        idle.start_dispatcher(1)
        started = time.monotonic()
        # Its second in busy's buffer, a fetch by idle, margin: far from the 30 s window.
        assert rl_ran.wait(WAIT), "the given-back job waited for a rate window it never used"
        assert time.monotonic() - started < WAIT
        assert not release.is_set()
    finally:
        release.set()
    assert busy.join(WAIT)
    stats = busy.get_stats()
    assert stats.jobs_succeeded == 2 and stats.jobs_failed == 0
