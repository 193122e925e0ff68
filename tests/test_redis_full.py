"""A full Redis (maxmemory reached, maxmemory-policy noeviction): new jobs are refused, the
queue still drains (docs/redis.md, Redis settings).

Redis refuses a command that may add memory only while the script that calls it has not
written yet, so each script's first write says which it is (lib.lua's refuse_if_full and
even_if_full). "Full" is made here with ``maxmemory 1``: more than one byte is always in use.
"""
import os
import re
import threading
import time

import pytest

from tinymq import ExecutorConfig, Job, PermanentFailure, RetryConfig, TinyMQError

from _helpers import WAIT

SCRIPTS = os.path.join(os.path.dirname(__file__), "..", "tinymq", "redis")
READ_ONLY = {"stats", "status", "unfinished"}  # they write nothing: nothing to refuse, and a replica may run them
TAKE_NEW_JOBS = {"enqueue", "schedule_tick"}


@pytest.fixture
def full(own_redis_server):
    """``full(True)`` makes the server full, ``full(False)`` gives it room again."""
    with own_redis_server.client() as client:
        yield lambda on: client.config_set("maxmemory", "1" if on else "0")
        client.config_set("maxmemory", "0")


def snapshot(client):
    """Every key and its serialised value: equal snapshots hold the same data."""
    return {key: client.dump(key) for key in client.keys("*")}


def test_every_script_that_writes_says_first_what_it_does_when_redis_is_full():
    """The guard must be each writing script's first statement: any write before it (even one
    that frees memory) would let every later write of the script past maxmemory."""
    for name in sorted(f[:-4] for f in os.listdir(SCRIPTS) if f.endswith(".lua") and f != "lib.lua"):
        with open(os.path.join(SCRIPTS, f"{name}.lua"), encoding="utf-8") as file:
            text = file.read()
        code = re.sub(r"^--\[\[.*?\]\]\n", "", text, count=1, flags=re.S)  # the header comment
        first = next(line for line in code.splitlines() if line.strip() and not line.startswith("--"))
        if name in READ_ONLY:
            assert "_if_full" not in code, name
        elif name in TAKE_NEW_JOBS:
            assert first == "refuse_if_full()", name
        else:
            assert first == "even_if_full()", name


@pytest.mark.parametrize("call", ["enqueue", "enqueue_many", "enqueue_delayed", "evicting"])
def test_a_full_redis_refuses_new_jobs_naming_the_cause_and_writes_nothing(own_redis_server, full, call):
    """"With noeviction, a full Redis makes enqueue raise TinyMQError": nothing of the call is
    written (no token, no promoted or evicted job), and the queue takes jobs again once it has room."""
    from _backends import Redis

    backend = Redis(own_redis_server.url)
    try:
        q = backend.queue(max_delayed_jobs=1)
        q.enqueue(Job("mail", "before"))
        q.enqueue_delayed(Job("mail", "waiting"), 3600.0)  # the one an evicting enqueue would push out
        with own_redis_server.client() as client:
            before = snapshot(client)
            full(True)
            with pytest.raises(TinyMQError, match="full"):
                if call == "enqueue":
                    q.enqueue(Job("mail", "while full"))
                elif call == "enqueue_many":
                    q.enqueue_many([Job("mail", "while full"), Job("mail", "while full")])
                else:
                    q.enqueue_delayed(Job("mail", "while full"), 3600.0 if call == "evicting" else 60.0)
            assert snapshot(client) == before
            full(False)
        q.enqueue(Job("mail", "after"))
        assert (q.get_stats().jobs_enqueued, q.get_stats().jobs_evicted) == (3, 0)
    finally:
        backend.close()


def test_a_full_redis_still_drains(own_redis_server, full):
    """Workers started while Redis is full fetch, run, retry, fail and settle every job that
    was in it, a waiting job can be cancelled, and a stopping worker leaves; only new jobs are
    refused. Else a full Redis could never get room again."""
    from _backends import Redis

    backend = Redis(own_redis_server.url)
    try:
        producer = backend.queue()
        jobs = [Job("mail", n) for n in range(6)]
        jobs.append(Job("flaky", retry_config=RetryConfig(max_retries=1, initial_delay=0.01)))
        jobs.append(Job("broken"))
        jobs.append(Job("mail", "to cancel", run_at=time.time() + 3600))
        producer.enqueue_many(jobs)
        full(True)
        assert producer.cancel(jobs[-1].id) is True
        worker = backend.queue()
        ran, failures = [], []
        lock = threading.Lock()
        worker.on_failure(lambda job, reason, exc: failures.append((job.type, reason)))

        def mail(job):
            with lock:
                ran.append(job.payload)

        def flaky(job):
            if job.retries == 0:
                raise ConnectionError("try again")
            with lock:
                ran.append("flaky")

        def broken(job):
            raise PermanentFailure("no such mailbox")

        worker.register_executor("mail", mail, ExecutorConfig(max_concurrent_jobs=2))
        worker.register_executor("flaky", flaky)
        worker.register_executor("broken", broken)
        worker.start_dispatcher(2)
        assert producer.join(WAIT)
        with pytest.raises(TinyMQError, match="full"):
            producer.enqueue(Job("mail", "while full"))
        worker.stop()
        assert sorted(ran, key=str) == sorted([*range(6), "flaky"], key=str)
        assert failures == [("broken", "permanent_failure")]
        stats = producer.get_stats()
        assert (stats.jobs_succeeded, stats.jobs_failed, stats.jobs_retried, stats.jobs_cancelled) == (7, 1, 1, 1)
        (dead,) = producer.broker.dead_jobs()
        assert dead.job.type == "broken"
        assert producer.broker.purge_dead() == 1
        assert producer.broker.shared_executors()[1] == 0  # the worker left (its release ran)
    finally:
        backend.close()
