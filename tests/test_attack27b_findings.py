"""Findings of attack27b (session 27): the Redis broker attacked from outside.

Each test failed on the code before its fix; its docstring says the symptom, how to
reproduce it, and what API.md or the docs promise.
"""
import os
import shutil
import threading

import pytest

from tinymq import Job, Queue

from _helpers import WAIT, wait_until, watch_join_looks


def _restart_without_its_data(server):
    """kill -9 of Redis, and a start without its append-only file: a Redis run without
    persistence (or failed over to an empty replica) comes back so."""
    server.kill()
    shutil.rmtree(os.path.join(server.directory, "appendonlydir"), ignore_errors=True)
    server.start()


def test_a_worker_says_redis_lost_the_queue_not_that_it_was_silent(own_redis_server, warnings_seen):
    """Symptom: after Redis restarted without its data, every worker process logged "this process
    (...) was silent past its 1s lease and its jobs were given to others": it had not been silent,
    and nobody had its jobs: the running attempt's outcome is ignored, its buffered and queued
    jobs are gone. Nothing said that Redis had lost the queue.
    Reproduce: two worker processes on one name, one running a job, a delayed job queued;
    kill -9 of Redis and a start without its append-only file. docs/redis.md (Redis settings):
    without `appendonly` a restart loses the queue; a failure is never silent (API.md).
    Fix: Redis keeps when the queue's state began (the clock hash's e); a process that registered
    before that and finds itself unknown is told so (status -1), and logs an ERROR that Redis
    lost the queue's state, with what it held, instead of the reap's WARNING."""
    from tinymq.redis import RedisBroker

    started = threading.Event()
    release = threading.Event()

    def hold(job):
        started.set()
        release.wait(WAIT)

    queues = [Queue(broker=RedisBroker(own_redis_server.url, name="lost", lease=1.0)) for _ in range(2)]
    try:
        for q in queues:
            q.register_executor("t", hold)
            q.start_dispatcher(2)
        queues[0].enqueue(Job("t", id="running"))
        queues[0].enqueue_delayed(Job("t", id="later"), 3600)
        assert started.wait(WAIT)
        # Both registered first: a process whose first fetch or beat got no reply before the
        # restart held nothing there, and rightly registers as new without a word (seen on a
        # loaded CI run: the idle one's first round came after the restart).
        assert wait_until(lambda: all(q._link._registered for q in queues))
        _restart_without_its_data(own_redis_server)
        assert warnings_seen.wait_until(
            lambda seen: len({m.split("process (")[1].split(")")[0] for m in seen
                              if "lost the state of queue 'lost'" in m}) >= 2), warnings_seen.items
        lost = [m for m in warnings_seen.snapshot() if "lost the state of queue 'lost'" in m]
        assert any("the 1 attempt(s) this process" in m for m in lost), lost
        assert not [m for m in warnings_seen.snapshot() if "silent past" in m], lost
        release.set()
        with own_redis_server.client() as client:  # both registered again, and run new jobs
            assert wait_until(lambda: client.zcard("tmq:{lost}:procs") >= 2)
        queues[1].enqueue(Job("t", id="after"))
        assert queues[1].join(WAIT)
    finally:
        release.set()
        for q in queues:
            q.stop(wait=False)


def test_a_url_urllib_cannot_split_is_refused_by_name_without_a_traceback(capsys):
    """Symptom: `python -m tinymq status --redis 'redis://:pw@[::1/0' --name q` (an IPv6 host's
    bracket left open) printed a traceback of tinymq's, three exceptions deep, ending in
    "ValueError: Invalid IPv6 URL", and `RedisBroker(url)` raised that bare error, naming no URL:
    the message that names a bad URL hid its password with urllib, which raised on it again.
    docs/cli.md: a mistake of yours never prints a traceback of tinymq's; a password in the URL
    is shown as `***`.
    Fix: redacted_url hides the user and password of a URL that urllib cannot split."""
    pytest.importorskip("redis")
    from tinymq.__main__ import main
    from tinymq.redis import RedisBroker

    with pytest.raises(ValueError, match=r"url 'redis://\*\*\*@\[::1/0' is not a usable Redis URL"):
        RedisBroker("redis://:s3cret@[::1/0", name="q")
    assert main(["status", "--redis", "redis://:s3cret@[::1/0", "--name", "q"]) == 1
    err = capsys.readouterr().err
    assert "is not a usable Redis URL" in err and "Invalid IPv6 URL" in err, err
    assert "Traceback" not in err and "s3cret" not in err, err


def test_a_worker_warns_of_a_maxmemory_policy_changed_after_it_connected(own_redis_server, warnings_seen,
                                                                          monkeypatch):
    """Symptom: `CONFIG SET maxmemory-policy allkeys-lru` (or `appendonly no`) on a Redis that the
    worker processes had connected to with `noeviction` was never warned of: tinymq looked at the
    settings once, at connect. Under memory pressure such a Redis then evicts job hashes, which a
    fetch drops without a word, and join() waits for them for ever.
    Reproduce: a worker on a noeviction server; CONFIG SET maxmemory-policy allkeys-lru; no
    WARNING, however long it runs. docs/redis.md (Redis settings): tinymq warns when the policy
    is anything but noeviction, and when appendonly is off.
    Fix: each worker process looks at the settings again every minute (beside its heartbeat),
    and warns when one changed to a value that loses jobs."""
    from tinymq.redis import RedisBroker, _link

    monkeypatch.setattr(_link, "_SETTINGS_LOOK", 0.2, raising=False)
    q = Queue(broker=RedisBroker(own_redis_server.url, name="policy", lease=0.4))
    try:
        q.register_executor("t", lambda job: None)
        q.start_dispatcher(1)
        with own_redis_server.client() as client:
            client.config_set("maxmemory-policy", "allkeys-lru")
            assert warnings_seen.wait_until(
                lambda seen: any("maxmemory-policy 'allkeys-lru'" in m for m in seen)), warnings_seen.snapshot()
            client.config_set("appendonly", "no")
            assert warnings_seen.wait_until(
                lambda seen: any("appendonly no" in m for m in seen)), warnings_seen.snapshot()
    finally:
        q.stop(wait=False)
    said = warnings_seen.snapshot()
    assert sum("maxmemory-policy" in m for m in said) == 1, said  # once per change, not at every look


def test_a_join_waiting_as_redis_loses_the_queue_says_so(own_redis_server, warnings_seen):
    """Symptom: a producer waiting in join() while Redis restarted without its data returned True
    without a word, as if every job it waited for had finished: they were gone, never run.
    Reproduce: a worker running a job; another Queue (a producer, never started) in join();
    kill -9 of Redis and a start without its append-only file: join() returns True, nothing is
    logged in the producer. API.md: join() waits until every job enqueued so far has finished;
    failures are never silent.
    Fix: join() reads, with each look, when the queue's state began (see the worker's ERROR
    above), and logs an ERROR when that changed while it waited."""
    from tinymq.redis import RedisBroker

    started = threading.Event()
    release = threading.Event()
    worker = Queue(broker=RedisBroker(own_redis_server.url, name="gone", lease=1.0))
    producer = Queue(broker=RedisBroker(own_redis_server.url, name="gone", lease=1.0))
    looked = watch_join_looks(producer)
    joined = []
    try:
        worker.register_executor("t", lambda job: (started.set(), release.wait(WAIT)))
        worker.start_dispatcher(1)
        producer.enqueue(Job("t", id="lost"))
        assert started.wait(WAIT)
        waiter = threading.Thread(target=lambda: joined.append(producer.join(WAIT)))
        waiter.start()
        assert looked.wait(WAIT)
        _restart_without_its_data(own_redis_server)
        waiter.join(WAIT + 5)
        assert joined == [True]
        assert [m for m in warnings_seen.snapshot() if "lost the state of queue 'gone' while join() waited" in m], \
            warnings_seen.snapshot()
    finally:
        release.set()
        worker.stop(wait=False)
        producer.stop(wait=False)


def test_an_enqueue_that_redis_answers_with_an_error_does_not_say_it_got_no_answer(redis_url):
    """Symptom: an enqueue that Redis answered with an error (here a key of the queue that another
    program wrote with another type; a replica's READONLY is alike) raised "Redis queue 'q' did not
    answer an enqueue of 1 job(s) (WRONGTYPE ...)": it had answered, and the user looks for a
    network fault that is not there.
    Reproduce: SET tmq:{q}:signal to a string; enqueue. docs/cli.md and API.md: errors say what
    went wrong.
    Fix: an error reply is told apart: "answered an enqueue of 1 job(s) with an error (...)", still
    saying that the jobs may or may not have been enqueued (a script that failed part-way keeps
    its writes up to there)."""
    import redis

    from tinymq import TinyMQError
    from tinymq.redis import RedisBroker

    q = Queue(broker=RedisBroker(redis_url, name="foreign"))
    try:
        client = redis.Redis.from_url(redis_url)
        client.set("tmq:{foreign}:signal", "not a list")
        with pytest.raises(TinyMQError, match=r"answered an enqueue of 1 job\(s\) with an error \(WRONGTYPE.*"
                                              r"may or may not have been enqueued"):
            q.enqueue(Job("t", id="x"))
        client.delete("tmq:{foreign}:signal")
        client.close()
    finally:
        q.stop(wait=False)
