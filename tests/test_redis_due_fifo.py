"""A delayed job over Redis takes its FIFO place when it comes due, not when some fetch
gets round to it (docs/redis.md "Delayed jobs and retries").

Found: a due job stayed in the `delayed` ZSET until a fetch promoted it, and a process whose
workers are all busy does not fetch. Jobs of the same priority enqueued after its due time
went into the ready list first, and it ran after them; enqueue's buffer check did not count
it either, though get_stats() did. Now every call that appends to a ready list promotes the
jobs due by then first, and the buffer check counts any still left.
"""
import threading
import time

import pytest

from tinymq import ExecutorConfig, Job, QueueFull
from tinymq.redis._scripts import Scripts

from _backends import Redis
from _helpers import WAIT

DELAY = 0.2  # seconds until the delayed job is due


@pytest.fixture
def redis(redis_url):
    made = Redis(redis_url, lease=2.0)
    yield made
    made.close()


def client_of(redis):
    import redis as redis_py

    return redis_py.Redis.from_url(redis.url, decode_responses=True)


def wait_until_due(redis, job_id):
    """Wait until the server clock is past ``job_id``'s due time (its score in `delayed`)."""
    client = client_of(redis)
    try:
        due_ms = client.zscore(f"tmq:{{{redis.queue_name}}}:delayed", job_id)
        assert due_ms is not None, f"{job_id} is not delayed"
        deadline = time.monotonic() + WAIT
        while True:
            seconds, micros = client.time()
            if seconds * 1000 + micros / 1000 > due_ms:
                return
            assert time.monotonic() < deadline, "the server clock never reached the due time"
            time.sleep(0.01)
    finally:
        client.close()


def inflight(redis, q):
    client = client_of(redis)
    try:
        return sorted(a.split(":", 1)[1] for a in client.hkeys(f"tmq:{{{redis.queue_name}}}:inflight:{q._link._proc}"))
    finally:
        client.close()


def test_a_due_job_runs_before_jobs_enqueued_after_its_due_time_while_every_worker_is_busy(redis):
    worker, producer = redis.pair()
    release, long_started = threading.Event(), threading.Event()
    ran = []

    def work(job):
        ran.append(job.id)
        if job.id == "long":
            long_started.set()
            release.wait(WAIT * 2)

    worker.register_executor("work", work, ExecutorConfig(max_concurrent_jobs=10))
    worker.start_dispatcher(1)
    try:
        # "filler" waits in the worker's buffer (or, given back after a while, at the head in
        # Redis): either way the worker has no free slot, so it fetches nothing more.
        producer.enqueue_many([Job("work", None, id="long"), Job("work", None, id="filler")])
        assert long_started.wait(WAIT)
        deadline = time.monotonic() + WAIT
        while inflight(redis, worker) != ["filler", "long"]:
            assert time.monotonic() < deadline, inflight(redis, worker)
            time.sleep(0.01)
        producer.enqueue_delayed(Job("work", None, id="due"), DELAY)
        wait_until_due(redis, "due")
        producer.enqueue_many([Job("work", None, id="later-1"), Job("work", None, id="later-2")])
        producer.enqueue(Job("work", None, id="later-3"))
    finally:
        release.set()
    assert worker.join(WAIT)
    assert ran == ["long", "filler", "due", "later-1", "later-2", "later-3"]


def test_due_jobs_not_yet_fetched_count_against_the_buffer(redis):
    producer = redis.queue(buffer_size=3)
    producer.enqueue_delayed(Job("work", None, id="due-1"), DELAY)
    producer.enqueue_delayed(Job("work", None, id="due-2"), DELAY)
    producer.enqueue(Job("work", None, id="now-1"))
    wait_until_due(redis, "due-2")
    assert producer.get_stats().medium_queue_size == 3  # two due, one ready: the buffer is full
    with pytest.raises(QueueFull):
        producer.enqueue(Job("work", None, id="now-2"))
    stats = producer.get_stats()
    assert (stats.medium_queue_size, stats.delayed_jobs_count, stats.jobs_enqueued) == (3, 0, 3)


def test_beyond_promote_per_call_the_due_jobs_left_still_count_as_ready(redis_url):
    """One call promotes at most PROMOTE_PER_CALL (100) due jobs, the earliest first; the
    rest wait for the next call, and the buffer check counts them all the same."""
    import redis as redis_py

    client = redis_py.Redis.from_url(redis_url, decode_responses=True)
    try:
        scripts = Scripts(client, "bound")
        due = [(f"d{k:03}", "t", 1, 1 + k * 0.001, "") for k in range(150)]  # due within 1.2 ms
        assert scripts.enqueue("tok-0", 1000, 0, due).status == "ok"
        last_due = client.zscore(scripts.prefix + "delayed", "d149")
        while True:
            seconds, micros = client.time()
            if seconds * 1000 + micros / 1000 > last_due:
                break
        assert scripts.enqueue("tok-1", 150, 0, [("now", "t", 1, 0, "")]).status == "full"
        ready = client.lrange(scripts.prefix + "ready:1", 0, -1)
        assert ready == [f"d{k:03}" for k in range(100)]  # promoted all the same, in due order
        assert scripts.enqueue("tok-2", 151, 0, [("now", "t", 1, 0, "")]).status == "ok"
        ready = client.lrange(scripts.prefix + "ready:1", 0, -1)
        assert ready == [f"d{k:03}" for k in range(150)] + ["now"]
        assert client.zcard(scripts.prefix + "delayed") == 0
    finally:
        client.close()
