"""What is particular to a queue shared through Redis (API.md "Scale-out").

Separate Queue objects (and processes) on one broker name; stop() giving jobs
back; dead jobs; a reaped process's late results; crash recovery counted and
reported once; Redis killed and restarted under a running queue.
"""
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from tinymq import Config, ExecutorConfig, Job, Queue, RetryConfig, SQLitePersistence, TinyMQError
from tinymq.redis import RedisBroker

from _backends import Redis
from _helpers import QUIET, WAIT, Blocker, Recorder, wait_until

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture
def shared(redis_url):
    made = Redis(redis_url, lease=1.0, max_crash_recoveries=1)
    yield made
    made.close()


def ready_ids(queue, level=1):
    scripts = queue.broker._scripts
    return scripts.client.lrange(scripts.key(f"ready:{level}"), 0, -1)


def test_broker_property_and_no_persistence_with_a_broker(shared, tmp_path):
    queue = shared.queue()
    assert isinstance(queue.broker, RedisBroker)
    assert Queue().broker is None
    with pytest.raises(RuntimeError, match="broker"):
        queue.set_persistence(SQLitePersistence(str(tmp_path / "jobs.db")))
    with pytest.raises(ValueError, match="one RedisBroker per Queue"):
        Queue(broker=queue.broker)


# Fixed (smallfix): help(RedisBroker) showed call_resending, and dir(broker) its redis-py
# client, as if they were API: neither is in API.md or docs/api.md (STYLE.md: a small public surface).
def test_broker_shows_only_its_documented_api(redis_url):
    assert {name for name in dir(RedisBroker) if not name.startswith("_")} == {
        "close", "dead_jobs", "requeue_dead", "purge_dead",  # API.md "Scale-out"
        "in_use", "names_in_use", "shared_executors", "shared_rate_limits",  # docs/api.md
    }
    with RedisBroker(redis_url, name="surface") as broker:
        # What it was built with, read back (the constructor's arguments in API.md).
        assert {name for name in vars(broker) if not name.startswith("_")} == {
            "url", "name", "lease", "max_crash_recoveries"}


@pytest.mark.parametrize("lease", [0, 1e-9, 0.099])
def test_broker_rejects_a_lease_under_a_tenth_of_a_second_naming_it(redis_url, lease):
    """A lease is renewed every lease / 4: a tiny one would make the heartbeat call Redis without pause."""
    with pytest.raises(ValueError, match=f"lease must be >= 0.1 seconds, got {lease!r}"):
        RedisBroker(redis_url, name="q", lease=lease)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=f"lease must be a finite number >= 0, got {bad!r}"):
            RedisBroker(redis_url, name="q", lease=bad)


@pytest.mark.parametrize("name", ["", "a{b", "c}"])
def test_broker_rejects_a_name_that_is_not_one_hash_tag(redis_url, name):
    with pytest.raises(ValueError, match="name"):
        RedisBroker(redis_url, name=name)


def test_global_limit_across_two_worker_queues(shared):
    producer = shared.queue()
    workers = [shared.queue(), shared.queue()]
    with Blocker() as blocker:
        for worker in workers:
            worker.register_executor("t", blocker.fn, ExecutorConfig(max_concurrent_jobs=2))
            worker.start_dispatcher(3)
        producer.enqueue_many([Job("t", i) for i in range(6)])
        assert blocker.wait_started(2)
        assert not blocker.wait_started(3, timeout=QUIET)
        assert producer.get_stats().medium_queue_size == 4  # waiting, parked or listed
    assert producer.join(WAIT)
    assert blocker.max_active == 2
    assert sorted(job.payload for job in blocker.started) == list(range(6))


def test_shared_executors_show_the_fleets_slots_and_live_worker_processes(shared):
    producer = shared.queue()  # never started: not a worker process
    workers = [shared.queue(), shared.queue()]
    assert producer.broker.shared_executors() == ({}, 0)
    with Blocker() as blocker:
        for worker in workers:
            worker.register_executor("t", blocker.fn, ExecutorConfig(max_concurrent_jobs=2))
            worker.register_executor("u", blocker.fn)  # the default limit, 10
            worker.start_dispatcher(3)
        # a worker process counts from its first call to Redis (it registers then)
        assert wait_until(lambda: producer.broker.shared_executors()[1] == 2)
        producer.enqueue_many([Job("t", i) for i in range(3)])
        assert blocker.wait_started(2)
        assert producer.broker.shared_executors() == ({"t": (2, 2), "u": (0, 10)}, 2)
    assert producer.join(WAIT)
    assert producer.broker.shared_executors() == ({"t": (0, 2), "u": (0, 10)}, 2)
    workers[0].stop()
    assert producer.broker.shared_executors() == ({"t": (0, 2), "u": (0, 10)}, 1)


def test_stop_gives_unstarted_buffered_jobs_back_to_the_head_in_order(shared):
    producer, worker = shared.pair()
    with Blocker() as blocker:
        worker.register_executor("t", blocker.fn)
        worker.start_dispatcher(1)  # fetches 2: one runs, one waits in this process
        producer.enqueue_many([Job("t", name, id=name) for name in "abcd"])
        assert blocker.wait_started(1)
        assert wait_until(lambda: ready_ids(producer) == ["c", "d"])
        stopper = threading.Thread(target=worker.stop)
        stopper.start()
        assert wait_until(lambda: worker._dispatcher.stopping)
        blocker.release()  # "a" finishes during stop(wait=True); "b" never started
        stopper.join(WAIT)
    assert ready_ids(producer) == ["b", "c", "d"]
    stats = producer.get_stats()
    assert (stats.jobs_succeeded, stats.medium_queue_size, stats.jobs_failed) == (1, 3, 0)
    again = shared.queue()
    ran = Recorder()
    again.register_executor("t", lambda job: ran.add(job.payload))
    again.start_dispatcher(1)
    assert producer.join(WAIT)
    assert ran.snapshot() == ["b", "c", "d"]


def test_an_attempt_cancelled_by_stop_is_given_back_not_counted(shared):
    producer, worker = shared.pair()
    with Blocker() as blocker:
        worker.register_executor("t", blocker.fn)
        worker.start_dispatcher(1)
        producer.enqueue(Job("t", "x", id="x"))
        assert blocker.wait_started(1)
        worker.stop(wait=False)
        assert ready_ids(producer) == ["x"]
    stats = producer.get_stats()
    assert (stats.jobs_failed, stats.jobs_retried, stats.jobs_succeeded) == (0, 0, 0)


def test_dead_jobs_requeue_and_purge(shared):
    producer, worker = shared.pair()
    healthy = threading.Event()

    def fn(job):
        if not healthy.is_set():
            raise RuntimeError(f"broken {job.payload}")

    worker.register_executor("t", fn)
    worker.start_dispatcher(2)
    producer.enqueue_many([Job("t", i, id=f"j{i}", retry_config=RetryConfig(max_retries=0)) for i in range(3)])
    assert producer.join(WAIT)
    dead = producer.broker.dead_jobs()
    assert sorted((d.job.id, d.reason, d.error) for d in dead) == [
        (f"j{i}", "retries_exhausted", f"RuntimeError: broken {i}") for i in range(3)]
    assert dead[0].job.payload in (0, 1, 2) and dead[0].job.retries == 1
    healthy.set()
    assert producer.broker.requeue_dead(["j0", "j1"]) == 2
    assert producer.join(WAIT)
    assert [d.job.id for d in producer.broker.dead_jobs()] == ["j2"]
    assert producer.get_stats().jobs_succeeded == 2
    assert producer.broker.purge_dead() == 1
    assert producer.broker.dead_jobs() == []


# Fixed (duecount): requeue_dead put dead jobs back as unfinished (join() waits for them) without
# counting them in jobs_enqueued, so jobs_enqueued less the jobs that ended (succeeded, failed,
# evicted, cancelled) no longer gave the unfinished jobs, and went below zero once they ended
# again. A store's requeued job counts as enqueued when the next queue recovers it; over Redis
# it counts at the requeue.
def test_requeued_dead_jobs_count_as_enqueued_again(shared):
    producer = shared.queue(max_delayed_jobs=1)  # no worker: nothing runs, nothing moves
    producer.enqueue_delayed(Job("t", "first", id="first"), 3600)
    producer.enqueue_delayed(Job("t", "second"), 3600)  # evicts the first: dead
    assert [entry.job.id for entry in producer.broker.dead_jobs()] == ["first"]
    assert producer.broker.requeue_dead() == 1
    stats = producer.get_stats()
    assert (stats.medium_queue_size, stats.delayed_jobs_count) == (1, 1)
    assert (stats.jobs_enqueued, stats.jobs_evicted) == (3, 1)
    assert (stats.jobs_enqueued - stats.jobs_succeeded - stats.jobs_failed - stats.jobs_evicted
            - stats.jobs_cancelled) == 2


def test_a_reaped_process_late_result_is_ignored_and_it_registers_again(shared):
    producer, worker = shared.pair()
    with Blocker() as blocker:
        worker.register_executor("t", blocker.fn)
        worker.start_dispatcher(1)
        producer.enqueue(Job("t", "x"))
        assert blocker.wait_started(1)
        proc = worker._link._proc
        assert expire_and_reap(producer.broker._scripts, proc) == 1
        assert wait_until(lambda: worker._link._proc != proc)  # its heartbeat learnt it
        blocker.release()
        assert producer.join(WAIT)  # the job ran again, in its second life
    assert [job.payload for job in blocker.started] == ["x", "x"]
    stats = producer.get_stats()
    assert (stats.jobs_succeeded, stats.jobs_failed) == (1, 0)  # the fenced success counted once


def expire_and_reap(scripts, proc):
    """Reap ``proc`` as if it had been silent past its lease: one transaction, so that its own
    heartbeat cannot renew the lease in between."""
    with scripts.client.pipeline(transaction=True) as pipe:
        pipe.zadd(scripts.key("procs"), {proc: 0})
        scripts._script["reap"](keys=[scripts.prefix], args=[1], client=pipe)
        return pipe.execute()[1][0]


def _start_worker(url, name, lease=1.0, max_crashes=1):
    child = subprocess.Popen(
        [sys.executable, os.path.join(HERE, "_redis_worker.py"), url, name, str(lease), str(max_crashes)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "ready"
    return child


def _output(url):
    import redis

    return [line.decode() for line in redis.Redis.from_url(url).lrange("tmq-test-out", 0, -1)]


def test_a_worker_in_another_process_runs_the_jobs(shared, redis_url):
    producer = shared.queue()
    child = _start_worker(redis_url, shared.queue_name)
    try:
        producer.enqueue_many([Job("record", i) for i in range(50)])
        assert producer.join(WAIT)
        out = _output(redis_url)
        assert sorted(int(line.split(":")[1]) for line in out) == list(range(50))
        assert {line.split(":")[0] for line in out} == {str(child.pid)}
    finally:
        child.stdin.close()
        assert child.wait(WAIT) == 0
    assert producer.get_stats().jobs_succeeded == 50


def test_a_job_that_kills_its_process_is_dead_after_max_crash_recoveries_reported_once(shared, redis_url):
    producer = shared.queue()
    producer.enqueue(Job("poison", "p", id="poison"))
    for _ in range(2):  # max_crash_recoveries=1: started twice, then dead
        child = _start_worker(redis_url, shared.queue_name)
        assert child.wait(WAIT + 2 * shared.lease) == 3  # it took the job and died
    reaper = shared.queue()
    crashed = Recorder()
    reaper.on_failure(lambda job, reason, exc: crashed.add((job.id, reason, exc)))
    reaper.register_executor("poison", lambda job: crashed.add("ran here"))
    reaper.start_dispatcher(1)
    assert producer.join(WAIT)
    assert crashed.snapshot() == [("poison", "crashed", None)]
    assert not crashed.wait_for(2, timeout=QUIET)
    assert len(_output(redis_url)) == 2
    assert [(d.job.id, d.reason) for d in producer.broker.dead_jobs()] == [("poison", "crashed")]
    assert producer.get_stats().jobs_failed == 1


def test_redis_killed_and_restarted_enqueue_raises_then_workers_resume(own_redis_server):
    backend = Redis(own_redis_server.url, lease=2.0)
    try:
        producer, worker = backend.pair(buffer_size=1000)
        ran = Recorder()
        worker.register_executor("t", lambda job: ran.add(job.payload))
        worker.start_dispatcher(2)
        producer.enqueue_many([Job("t", i) for i in range(10)])
        assert producer.join(WAIT)
        own_redis_server.kill()
        with pytest.raises(TinyMQError) as raised:
            producer.enqueue(Job("t", "while down"))
        assert raised.value.__cause__ is not None
        own_redis_server.start()
        producer.enqueue_many([Job("t", i) for i in range(10, 20)])
        assert producer.join(WAIT)
        assert sorted(ran.snapshot()) == list(range(20))
        stats = producer.get_stats()
        assert (stats.jobs_enqueued, stats.jobs_succeeded) == (20, 20)  # the AOF kept the counters
    finally:
        backend.close()


def test_a_job_held_past_the_lease_during_an_outage_waits_and_stop_does_not_hang(own_redis_server):
    # Redis goes down while a worker runs one job and holds the next: once the lease since
    # its last renewal has run out, the worker may not start the next one (another process
    # may have it), and stop() must not wait for a renewal that cannot come.
    backend = Redis(own_redis_server.url, lease=0.5)
    try:
        queue = backend.queue()
        with Blocker() as blocker:
            queue.register_executor("t", blocker.fn)
            queue.start_dispatcher(1)
            queue.enqueue_many([Job("t", "first"), Job("t", "held")])
            assert blocker.wait_started(1)
            scripts = queue.broker._scripts
            assert wait_until(lambda: len(scripts.client.keys(scripts.key("inflight:*"))) == 1
                              and len(scripts.client.hgetall(scripts.client.keys(scripts.key("inflight:*"))[0])) == 2)
            own_redis_server.kill()
            time.sleep(1.0)  # two leases without a renewal
            blocker.release()
            assert not blocker.wait_started(2, timeout=QUIET)  # "held" waits for a renewal
            began = time.monotonic()
            queue.stop(wait=True)
            assert time.monotonic() - began < WAIT / 2
        assert [job.payload for job in blocker.started] == ["first"]
    finally:
        backend.close()


OUTAGE_WATCH = 4.0  # seconds a worker tries to reach a server that is not there
RETRY_GAP = 1.0  # the longest pause allowed between two tries late in an outage (0.25 s + noise)


def test_a_worker_keeps_trying_at_a_short_interval_through_a_long_outage():
    # A port that accepts and drops every connection: a server that is down (or restarting).
    # The pump's retries may back off, but not so far that a worker sits idle for seconds
    # after Redis is back (it used to double up to 2 s).
    listener = socket.create_server(("127.0.0.1", 0))
    tries = []

    def accept():
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            tries.append(time.monotonic())
            connection.close()

    threading.Thread(target=accept, daemon=True).start()
    broker = RedisBroker(f"redis://127.0.0.1:{listener.getsockname()[1]}/0", name="down", lease=60.0)
    queue = Queue(broker=broker)
    queue.register_executor("t", lambda job: None)
    try:
        start = time.monotonic()
        queue.start_dispatcher(1)
        time.sleep(OUTAGE_WATCH)
        end = time.monotonic()
    finally:
        queue.stop(wait=False)
        broker.close()
        listener.close()
    late = [start + 1.0] + [t for t in tries if start + 1.0 < t < end] + [end]  # (stop() tries once more)
    assert max(b - a for a, b in zip(late, late[1:])) < RETRY_GAP, [round(t - start, 3) for t in tries]


def warnings_at_connect(tmp_path, caplog, *settings):
    """The WARNINGs a broker logs connecting to a server of its own started with ``settings``,
    and that server's port."""
    from _redis_server import RedisServer, require_redis

    require_redis()
    directory = tmp_path / "server"
    directory.mkdir()
    server = RedisServer(str(directory), extra=list(settings)).start()
    try:
        with caplog.at_level("WARNING", logger="tinymq"):
            RedisBroker(server.url, name="checked").close()
        return [r.getMessage() for r in caplog.records], server.port
    finally:
        server.stop()


def test_an_evicting_maxmemory_policy_is_warned_about_at_connect(tmp_path, caplog):
    (warning,), _ = warnings_at_connect(tmp_path, caplog, "--maxmemory-policy", "allkeys-lru")
    assert "allkeys-lru" in warning and "noeviction" in warning


def test_a_server_without_its_append_only_file_is_warned_about_at_connect(tmp_path, caplog):
    """at-least-once through a kill of the server holds with appendonly yes (API.md): without it,
    every job accepted since the last snapshot dies with the server, and nobody was told."""
    (warning,), port = warnings_at_connect(tmp_path, caplog, "--appendonly", "no")
    assert "appendonly no" in warning and "set appendonly yes" in warning and str(port) in warning


def test_noeviction_gives_no_warning(redis_url, caplog):
    with caplog.at_level("WARNING", logger="tinymq"):
        RedisBroker(redis_url, name="quiet").close()
    assert caplog.records == []


def test_a_server_older_than_the_minimum_is_refused_naming_its_version(redis_url, monkeypatch):
    """The version check refuses a server older than tinymq needs, with what it runs: here the
    minimum is raised past the test server's own version (Debian's Redis 7)."""
    import tinymq.redis.broker as broker_module

    monkeypatch.setattr(broker_module, "_MIN_VERSION", (99, 0))
    with pytest.raises(TinyMQError, match=r"needs Redis >= 6\.2.* runs \d+\.\d+"):
        RedisBroker(redis_url, name="too-old")


def test_bytes_not_utf8_read_and_text_redis_cannot_take_sent_are_the_same_with_and_without_hiredis(redis_url):
    """docs/redis.md: bytes that are not UTF-8 in Redis (another program wrote a job's id, body or
    payload) read as lone surrogates and go back as the same bytes; text Redis cannot take (a lone
    surrogate) is refused before it is sent. The script connections decode replies in their parser:
    hiredis's when it is installed, else redis-py's own, which must read and send the same."""
    import _redis_foreign_bytes

    expected = {
        "ran": [["good", None], ["id-\udcff", None], ["latin-1", "caf\udce9"]],
        "reported": [["binary", "\udcff\udcfe\x00[", "permanent_failure"]],
        "dead": [["binary", "\udcff\udcfe\x00[", "permanent_failure"]],
        "command": "\udcff\udcfe",
        "cancel": False,
        "refused": "job 'surrogate' ('t') cannot be sent to Redis: its payload has text that is not "
                   "valid Unicode (a lone surrogate?)",
        "requeued": 1,
    }
    here = _redis_foreign_bytes.outcome(redis_url, "bytes-here")
    here.pop("parser")  # (hiredis's when it is installed)
    assert here == expected
    child = subprocess.run([sys.executable, _redis_foreign_bytes.__file__, redis_url, "bytes-no-hiredis", "--no-hiredis"],
                           capture_output=True, text=True, timeout=60)
    assert child.returncode == 0, child.stderr
    pure = json.loads(child.stdout)
    assert pure.pop("parser") in ("_RESP2Parser", "_RESP3Parser")  # (redis-py's own, by protocol)
    assert pure == expected
