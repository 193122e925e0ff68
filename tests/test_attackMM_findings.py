"""Findings of attackMM: scale-out on Redis (the broker, the worker CLI, status) attacked from outside.

Each test failed on the code before its fix; its docstring says the symptom, how to
reproduce it, and what API.md or the docs promise.
"""
import os
import shutil
import threading

import pytest

from tinymq import ExecutorConfig, Job, Queue, RateLimit
from tinymq._periodic import tick_of_job_id

from _helpers import WAIT, wait_until


def _restart_without_its_data(server):
    """kill -9 of Redis, and a start without its append-only file: what a Redis run without
    persistence (or restored from an older backup) does to the queue's keys."""
    server.kill()
    shutil.rmtree(os.path.join(server.directory, "appendonlydir"), ignore_errors=True)
    server.start()


def test_the_global_limits_hold_after_redis_lost_its_data(own_redis_server):
    """Symptom: after Redis restarted without its data (no `appendonly`, a FLUSHALL, a restore
    of an older backup), the worker processes carry on (they register again, as after a reap)
    and run new jobs, but with no global `rate_limit` nor `max_concurrent_jobs` at all: the
    limits were sent to Redis once, at register_executor, and never again, so Redis hands out
    every job of a rate-limited type at once.
    Reproduce: a worker with RateLimit(2, per=60); restart Redis empty; enqueue 4 jobs: all 4
    start at once. API.md Scale-out: `max_concurrent_jobs` and `rate_limit` are global limits
    per type (docs/redis.md: without `appendonly` the jobs are lost, not the limits).
    Fix: a process that finds it must register again sends its limits again, before it fetches
    (for the types Redis holds none for)."""
    from tinymq.redis import RedisBroker

    lock = threading.Lock()
    started = []

    def run(job):
        with lock:
            started.append(job.id)

    worker = Queue(broker=RedisBroker(own_redis_server.url, name="wiped", lease=1.0))
    worker.register_executor("t", run, ExecutorConfig(rate_limit=RateLimit(2, per=3600.0)))
    try:
        worker.start_dispatcher(4)
        worker.enqueue(Job("t", id="before"))
        assert worker.join(WAIT)
        _restart_without_its_data(own_redis_server)
        with own_redis_server.client() as client:  # the worker registered again, under a new id
            assert wait_until(lambda: client.zcard("tmq:{wiped}:procs") >= 1)
            for i in range(4):
                worker.enqueue(Job("t", id=f"after-{i}"))
            assert wait_until(lambda: len(started) >= 3)  # two of the four start
            assert not worker.join(1.0)  # the other two wait for the window: an hour
            with lock:
                assert len(started) == 3, started
            assert client.hget("tmq:{wiped}:ratelimits", "t") is not None
            # Sent again, they only fill in what Redis lacks: a process reaped after a stall
            # never overrides a newer registration of the type.
            worker.broker._scripts.set_limits({"t": 7}, only_missing=True)
            assert client.hget("tmq:{wiped}:limits", "t") == b"10"
    finally:
        worker.stop(wait=False)


def test_a_password_given_in_the_query_of_a_redis_url_is_never_shown(own_redis_server, capsys, caplog):
    """Symptom: `python -m tinymq status --redis 'redis://host/0?password=s3cret' --name q` (redis-py
    takes the password from the query string as well as from before the host) prints the
    password, in its output and in its errors, and RedisBroker's repr shows it too: only a
    password before the host was hidden.
    Reproduce: that command against a server that wants the password, for a name it does not
    hold: the error names the URL, password and all. docs/cli.md: "A password in the URL is
    shown as `***`"."""
    from tinymq.__main__ import main
    from tinymq.redis import RedisBroker

    with own_redis_server.client() as client:
        client.config_set("requirepass", "s3cret")
    url = own_redis_server.url + "?password=s3cret"
    assert main(["status", "--redis", url, "--name", "q"]) == 1  # (it holds no queue "q")
    captured = capsys.readouterr()
    assert "holds no tinymq queue" in captured.err and "password=***" in captured.err
    assert "s3cret" not in captured.out + captured.err
    broker = RedisBroker(url, name="q")
    try:
        assert "s3cret" not in repr(broker) and "password=***" in repr(broker)
    finally:
        broker.close()
    assert "s3cret" not in caplog.text


def test_an_every_schedule_fires_once_per_tick_after_redis_lost_its_data(own_redis_server):
    """Symptom: after Redis restarted without its data, an `every` schedule fires about twice per
    interval once a process joins (a restarted worker process, a new one): the processes that
    ran before tick on the grid they had read from Redis, the new one starts a new grid (Redis
    has none), and the claims of the two grids interleave, each tick of each grid firing.
    Reproduce: a queue on every(0.5); Redis restarted empty; a second queue registers the same
    schedule: 4 s later about 14 jobs have run, not 8. API.md Scale-out: periodic jobs, each
    tick fires once across all processes.
    Fix: a tick's claim carries its grid; Redis keeps it again when it has none, and a claim on
    another grid of the same interval is refused: that process joins the grid Redis has."""
    from tinymq.redis import RedisBroker

    interval = 0.5
    lock = threading.Lock()
    ran = []

    def tick(job):
        with lock:
            ran.append(job.id)

    def queue():
        q = Queue(broker=RedisBroker(own_redis_server.url, name="ticks", lease=1.0))
        q.register_executor("tick", tick)
        q.every(interval, "tick")
        return q

    first = queue()
    second = None
    try:
        first.start_dispatcher(2)
        assert wait_until(lambda: len(ran) >= 1)
        _restart_without_its_data(own_redis_server)
        assert wait_until(lambda: len(ran) >= 2)  # the first queue's grid goes on
        second = queue()
        second.start_dispatcher(2)
        # Every tick after the second queue began, on one grid: their job ids are tick times
        # (microseconds) one interval apart, never closer.
        assert wait_until(lambda: len(ran) >= 12, timeout=WAIT * 2)
        with lock:
            ticks = sorted(tick_of_job_id(job_id) for job_id in ran[-8:])
        gaps = [later - earlier for earlier, later in zip(ticks, ticks[1:])]
        assert min(gaps) > interval * 0.9, gaps
    finally:
        first.stop(wait=False)
        if second is not None:
            second.stop(wait=False)



def test_a_job_whose_last_error_is_not_text_is_enqueued_over_redis_as_with_a_store(redis_url):
    """Symptom: enqueue over Redis of a job whose `last_error` a user set to something other
    than text (the exception itself, re-enqueueing a failed job) raised a bare
    AttributeError ("'ValueError' object has no attribute 'isascii'") that names nothing,
    while the in-process queue accepts the job and a SQLite store keeps its text (str()).
    Reproduce: job.last_error = ValueError("boom"); q.enqueue(job) on a RedisBroker queue.
    API.md Scale-out: everything of the in-process API holds across processes; a failure
    to enqueue raises TypeError/ValueError naming what is wrong, never an unrelated error."""
    from _backends import Redis

    shared = Redis(redis_url)
    seen = []
    try:
        producer, worker = shared.pair()
        worker.register_executor("t", lambda job: seen.append(job.last_error))
        job = Job("t")
        job.last_error = ValueError("boom")
        producer.enqueue(job)
        worker.start_dispatcher(1)
        assert worker.join(WAIT)
        assert seen == ["boom"]
    finally:
        shared.close()


@pytest.mark.parametrize("job_id, body, retries", [
    ("", "{not json", 0),
    ("odd-retries", '["t",1,null,1.0,1.0,null,null]', "x"),
])
def test_a_foreign_job_with_an_odd_id_or_retries_is_failed_and_the_worker_goes_on(redis_url, job_id, body, retries):
    """Symptom: a job that another program wrote into the queue's keys with an empty id and a
    body tinymq cannot decode, or with retries that are not a number, killed the worker
    process's pump thread (ValueError from the stand-in Job(id=''), or from int() of the
    retries in the fetch reply): that process never fetched again, while its heartbeat kept its lease,
    so the jobs it had fetched with it (and every later one it would take) never ran and were
    never given to another process; join() never returned. broker.dead_jobs() and `status`
    raised the same ValueError once it was dead.
    Reproduce: enqueue.lua called with the row ('', 't', 1, 0, '{not json') (or a good body
    with retries 'x') beside a good job;
    start a worker. docs/redis.md "Dead jobs": a job no process can decode is never run, the
    worker fails it for good ("permanent_failure") and it is reported and listed dead with a
    stand-in Job of its id."""
    import redis as redis_py

    from tinymq.redis import RedisBroker
    from tinymq.redis._scripts import Scripts

    name = "foreign-empty-id"
    client = redis_py.Redis.from_url(redis_url, decode_responses=True)
    q = Queue(broker=RedisBroker(redis_url, name=name, lease=2.0))
    ran, reported = [], []
    q.register_executor("t", lambda job: ran.append(job.id))
    q.on_failure(lambda job, reason, exc: reported.append((job.id, reason)))
    try:
        rows = [("good", "t", 1, 0, '["t",1,null,1.0,1.0,null,null]'), (job_id, "t", 1, 0, body, retries)]
        assert Scripts(client, name).enqueue("tok", 100, 0, rows).status == "ok"
        q.start_dispatcher(2)
        assert q.join(WAIT)
        q.enqueue(Job("t", id="later"))
        assert q.join(WAIT)
        assert sorted(ran) == ["good", "later"] and reported == [(job_id, "permanent_failure")]
        (dead,) = q.broker.dead_jobs()
        assert (dead.job.id, dead.reason) == (job_id, "permanent_failure")
        assert dead.error.startswith("cannot decode")
    finally:
        q.stop()
        client.close()


def test_a_foreign_job_whose_bytes_are_not_utf8_is_failed_or_run_and_the_worker_goes_on(redis_url):
    """Symptom: a job that another program wrote with a body that is not UTF-8 (msgpack, pickle,
    any binary serialiser) killed the pump thread of the worker that fetched it: redis-py
    raised UnicodeDecodeError reading the fetch reply, which is no RedisError. That process
    never fetched again while its heartbeat kept its lease: the jobs fetched with it never ran
    nor went to another process, join() never returned; dead_jobs() raised the same error.
    A job id that is not UTF-8 did the same.
    Reproduce: enqueue.lua called with a row whose body is b'\\xff\\xfe...' beside a good job;
    start a worker. docs/redis.md "Dead jobs": a job no process can decode (its body written
    by another program) is never run: the worker fails it for good and it is reported and
    listed dead with a stand-in Job, its body's text as the payload.
    Fix: script replies are read as bytes and decoded with surrogateescape (what os.fsdecode
    does with a file name), and an attempt id goes back to Redis as the same bytes."""
    import redis as redis_py

    from tinymq.redis import RedisBroker
    from tinymq.redis._scripts import Scripts

    name = "foreign-bytes"
    client = redis_py.Redis.from_url(redis_url, decode_responses=True)
    q = Queue(broker=RedisBroker(redis_url, name=name, lease=2.0))
    ran, reported = [], []
    q.register_executor("t", lambda job: ran.append(job.id))
    q.on_failure(lambda job, reason, exc: reported.append((job.id, job.payload, reason)))
    good = '["t",1,null,1.0,1.0,null,null]'
    try:
        rows = [("good", "t", 1, 0, good), ("binary", "t", 1, 0, b"\xff\xfe\x00["), (b"id-\xff", "t", 1, 0, good)]
        assert Scripts(client, name).enqueue("tok", 100, 0, rows).status == "ok"
        q.start_dispatcher(2)
        assert q.join(WAIT)
        q.enqueue(Job("t", id="later"))
        assert q.join(WAIT)
        body = b"\xff\xfe\x00[".decode("utf-8", "surrogateescape")
        assert sorted(ran) == ["good", "id-\udcff", "later"]
        assert reported == [("binary", body, "permanent_failure")]
        (dead,) = q.broker.dead_jobs()
        assert (dead.job.id, dead.job.payload, dead.reason) == ("binary", body, "permanent_failure")
    finally:
        q.stop()
        client.close()
