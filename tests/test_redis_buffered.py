"""A job fetched into a busy process's buffer does not wait there behind a long job while
another process could run it (docs/redis.md "Fetching"): found when the CLI test's
requeued job sat 57 s in the buffer of the process running a 60 s job, beside an idle one.

Each process fetches one job beyond its free workers, so that the next job is at hand when
one frees. A buffered job that waited a second without a free worker goes back to the head
of its priority in Redis, and its process fetches no extra job until one of its workers
frees (else it would take the same job again).
"""
import threading
import time

import pytest

from tinymq import ExecutorConfig, Job

from _backends import Redis
from _helpers import WAIT


@pytest.fixture
def redis(redis_url):
    made = Redis(redis_url, lease=2.0)
    yield made
    made.close()


def inflight(redis, q):
    import redis as redis_py

    client = redis_py.Redis.from_url(redis.url, decode_responses=True)
    try:
        return sorted(a.split(":", 1)[1] for a in client.hkeys(f"tmq:{{{redis.queue_name}}}:inflight:{q._link._proc}"))
    finally:
        client.close()


def held_in_redis(redis, q, ids):
    """Wait until Redis has exactly the attempts of jobs ``ids`` leased to ``q``'s process."""
    deadline = time.monotonic() + WAIT
    while inflight(redis, q) != ids:
        assert time.monotonic() < deadline, inflight(redis, q)
        time.sleep(0.01)


def test_a_job_buffered_behind_a_long_one_runs_in_an_idle_process(redis):
    busy, idle = redis.pair()
    release, long_started = threading.Event(), threading.Event()
    ran_in = {}

    def work(job):
        ran_in[job.id] = threading.current_thread().name
        if job.id == "long":
            long_started.set()
            release.wait(WAIT * 2)

    for q in (busy, idle):
        q.register_executor("work", work, ExecutorConfig(max_concurrent_jobs=10))
    busy.start_dispatcher(1)
    try:
        busy.enqueue_many([Job("work", None, id="long"), Job("work", None, id="next")])
        assert long_started.wait(WAIT)
        held_in_redis(redis, busy, ["long", "next"])  # "next" waits in busy's buffer
        idle.start_dispatcher(1)
        started = time.monotonic()
        deadline = started + WAIT
        while "next" not in ran_in:
            assert time.monotonic() < deadline, "the buffered job never left the busy process"
            time.sleep(0.01)
        assert not release.is_set()  # it ran while the long job still held busy's only worker
        assert time.monotonic() - started < 1.0 + 2.0 + 1.0  # its second in the buffer, a beat, margin
        # The busy process does not take it, or any other, back into its buffer meanwhile.
        assert inflight(redis, busy) == ["long"]
    finally:
        release.set()
    assert busy.join(WAIT)
    stats = busy.get_stats()
    assert stats.jobs_succeeded == 2 and stats.jobs_failed == 0


def test_a_job_given_back_leaves_the_core_and_its_process_takes_it_again_when_a_worker_frees(redis):
    """With no other process, the job goes back to Redis and comes back to the same process
    once its worker frees: placed at once, since its given-back copy left the core."""
    (busy,) = [redis.queue()]
    release, long_started, next_ran = threading.Event(), threading.Event(), threading.Event()

    def work(job):
        if job.id == "long":
            long_started.set()
            release.wait(WAIT * 2)
        else:
            next_ran.set()

    busy.register_executor("work", work, ExecutorConfig(max_concurrent_jobs=10))
    busy.start_dispatcher(1)
    try:
        busy.enqueue_many([Job("work", None, id="long"), Job("work", None, id="next")])
        assert long_started.wait(WAIT)
        held_in_redis(redis, busy, ["long"])  # "next" went back to Redis
        assert busy._ready.sizes() == (0, 0, 0)  # and left the core
        assert [job.id for job in busy._link._attempts] == ["long"]
        assert busy.get_stats().medium_queue_size == 1  # it waits in Redis
    finally:
        release.set()
    assert next_ran.wait(WAIT)
    assert busy.join(WAIT)
    assert busy._link._attempts == {} and busy._link._held == []
    stats = busy.get_stats()
    assert stats.jobs_succeeded == 2 and stats.jobs_failed == 0
