"""Findings of attackOO: the Redis worker's background threads, and jobs that another program
wrote into the queue's keys, attacked from outside.

Each test failed on the code before its fix; its docstring says the symptom, how to
reproduce it, and what API.md or the docs promise.
"""
import threading

from tinymq import Job, Queue

from _helpers import WAIT

GOOD_BODY = '["t",1,null,1.0,1.0,null,null]'  # a job of type "t", as encode_job writes it


def _fails_once(method, fault, exc=RuntimeError("a bug")):
    """``method`` (bound), raising ``exc`` on its first call, after setting ``fault``."""
    def once(*args, **kwargs):
        if not fault.is_set():
            fault.set()
            raise exc
        return method(*args, **kwargs)
    return once


def test_a_pump_that_crashes_lets_the_jobs_it_fetched_go_to_other_processes(redis_url, caplog):
    """Symptom: an exception other than Redis's in the worker's pump thread (a bug, a job that
    trips something unexpected, a MemoryError) ended the pump for good with a log line, while
    the heartbeat went on renewing the lease: the jobs it had just fetched were held for ever,
    never run, never given to another process (they only reap an expired lease), and that
    process fetched no more; join() never returned.
    Reproduce: make QueueLink._take raise once (the round that takes the first jobs); enqueue
    three jobs; start a second worker process once the fault happened. API.md Scale-out:
    delivery is at-least-once through kill -9 of any worker process.
    Fix: a crashed background thread is handled as a process killed and started again: loudly
    logged, its id is never renewed again (whoever reaps it gives its jobs to others), it
    drops its buffer and carries on under a new id."""
    from tinymq.redis import RedisBroker

    name = "oo-pump"
    lock = threading.Lock()
    ran = []

    def run(job):
        with lock:
            ran.append(job.id)

    first = Queue(broker=RedisBroker(redis_url, name=name, lease=1.0))
    second = Queue(broker=RedisBroker(redis_url, name=name, lease=1.0))
    fault = threading.Event()
    for q in (first, second):
        q.register_executor("t", run)
    try:
        first._link._take = _fails_once(first._link._take, fault)
        for i in range(3):
            first.enqueue(Job("t", id=f"j{i}"))
        first.start_dispatcher(2)
        assert fault.wait(WAIT)
        second.start_dispatcher(2)
        assert first.join(WAIT)
        assert sorted(ran) == ["j0", "j1", "j2"]
        assert "tinymq-redis-pump crashed" in caplog.text
        first.enqueue(Job("t", id="later"))  # the first process fetches again too
        assert first.join(WAIT)
    finally:
        first.stop()
        second.stop()


def test_a_heartbeat_that_crashes_goes_on_renewing_the_lease(redis_url, caplog):
    """Symptom: an exception other than Redis's in the heartbeat thread (here from its look for
    stuck jobs) ended it for good: the process renewed its lease only with its fetches, and a
    process whose workers are all busy fetches nothing, so it was reaped while it ran its job
    and another process ran that job again (a duplicate while nothing died); the job buffered
    beside it was never given back to an idle process either.
    Reproduce: make QueueLink._give_back_stuck raise once; then give a one-worker process a job
    that outlasts the lease and a second one (buffered), beside an idle second process: both
    processes start the long job. docs/redis.md: a live process renews its lease every lease / 4;
    duplicates happen only for attempts in flight when their process was declared dead, or
    while a live process is silent for longer than its lease.
    Fix: the heartbeat is started again (see the pump's test) a quarter lease after it crashed."""
    from tinymq.redis import RedisBroker

    name = "oo-beat"
    lease = 1.0
    lock = threading.Lock()
    long_starts = []
    started = threading.Event()
    twice = threading.Event()
    release = threading.Event()
    quick = []

    def run_long(job):
        with lock:
            long_starts.append(job.id)
            (twice if len(long_starts) > 1 else started).set()
        release.wait(WAIT)

    busy = Queue(broker=RedisBroker(redis_url, name=name, lease=lease))
    idle = Queue(broker=RedisBroker(redis_url, name=name, lease=lease))
    fault = threading.Event()
    for q in (busy, idle):
        q.register_executor("long", run_long)
        q.register_executor("quick", lambda job: quick.append(job.id))
    try:
        busy._link._give_back_stuck = _fails_once(busy._link._give_back_stuck, fault)
        busy.start_dispatcher(1)
        assert fault.wait(WAIT)
        busy.enqueue_many([Job("long", id="long"), Job("quick", id="quick")])  # one fetch takes both
        assert started.wait(WAIT)
        idle.start_dispatcher(2)  # (the quick job, stuck behind the long one, is given back to it)
        assert not twice.wait(4 * lease), long_starts  # the busy process renews its lease
        release.set()
        assert busy.join(WAIT)
        assert long_starts == ["long"] and quick == ["quick"]
        assert "tinymq-redis-heartbeat crashed" in caplog.text
    finally:
        release.set()
        busy.stop()
        idle.stop()


def test_a_reporter_that_crashes_lets_its_job_go_to_be_failed_again(redis_url, caplog):
    """Symptom: an exception other than Redis's in a reporter thread (the thread a fetch reply
    hands the jobs it cannot decode, to fail them for good and run the failure callbacks)
    ended it with the attempt still held by its live process: the heartbeat renewed the
    lease, so the job was never failed, listed dead nor reported, and join() never returned.
    Reproduce: a job whose body is not JSON, written by another program; make
    QueueLink.failing raise once. docs/redis.md "Dead jobs": such a job is failed for good
    ("permanent_failure"), reported to on_failure and listed by dead_jobs().
    Fix: a reporter's crash is handled as the other threads' (see the pump's test): the id is
    let go, its attempt reaped (a crash) and fetched again, and failed then."""
    import redis as redis_py

    from tinymq.redis import RedisBroker
    from tinymq.redis._scripts import Scripts

    name = "oo-reporter"
    client = redis_py.Redis.from_url(redis_url, decode_responses=True)
    q = Queue(broker=RedisBroker(redis_url, name=name, lease=1.0))
    reported = []
    fault = threading.Event()
    q.register_executor("t", lambda job: None)
    q.on_failure(lambda job, reason, exc: reported.append((job.id, reason)))
    try:
        assert Scripts(client, name).enqueue("tok", 100, 0, [("foreign", "t", 1, 0, "{not json")]).status == "ok"
        q._link.failing = _fails_once(q._link.failing, fault)
        q.start_dispatcher(2)
        assert fault.wait(WAIT)
        assert q.join(WAIT)
        assert reported == [("foreign", "permanent_failure")]
        (dead,) = q.broker.dead_jobs()
        assert (dead.job.id, dead.reason) == ("foreign", "permanent_failure")
        assert "a reporter crashed" in caplog.text
    finally:
        q.stop()
        client.close()


def test_foreign_job_hashes_are_failed_for_good_and_the_other_jobs_run(redis_url):
    """Symptom: job hashes that another program wrote with a priority (p) that is not 0, 1 or 2
    made the scripts fail half-way, keeping their writes up to there (Redis does not roll a
    script back): enqueue.lua failed on such a row; a delayed one, once due, was taken out of
    `delayed` by the fetch that then failed, and was lost (never run, never dead: join() never
    returned); one held by a process that died failed every reap, so every fetch and beat of
    every worker failed (their rows lost with it) until its crash count ran past
    max_crash_recoveries; a waiting one made cancel() and get_stats() fail. A hash without a
    type (t) was dropped by the fetch that popped its id: lost, never listed dead.
    Reproduce: such rows through enqueue.lua, or HSET on job:<id>, beside good jobs; start a
    worker. docs/redis.md "Dead jobs": a job no process can decode is never run, the worker
    fails it for good ("permanent_failure", last_error starting "cannot decode"), reports it
    and lists it dead.
    Fix: the scripts read a p that is no level as level 1 (lib.lua's level_of), and fetch
    fails a job whose hash has no type or such a p for good, handing it to the fetching
    process to report. An id with no hash (ghost) stays dropped (redisfix: counted finished, and
    logged, as a job whose hash Redis lost); a type that is not UTF-8 runs."""
    import redis as redis_py

    from tinymq.redis import RedisBroker
    from tinymq.redis._scripts import Scripts

    name = "oo-foreign"
    key = "tmq:{%s}:" % name
    client = redis_py.Redis.from_url(redis_url, decode_responses=True)
    scripts = Scripts(client, name)
    q = Queue(broker=RedisBroker(redis_url, name=name, lease=1.0))
    lock = threading.Lock()
    ran, reported = [], []

    def run(job):
        with lock:
            ran.append(job.id)

    def failed(job, reason, exc):
        with lock:
            reported.append((job.id, reason))

    q.register_executor("t", run)
    q.on_failure(failed)
    try:
        # Held by a process that died (a 50 ms lease, never renewed), then given a p of 9.
        assert scripts.enqueue("tok-1", 100, 0, [("leased", "t", 1, 0, GOOD_BODY)]).status == "ok"
        assert [job.id for job in scripts.fetch("gone:1", "1", 1, 50, 3, False).jobs] == ["leased"]
        client.hset(key + "job:leased", "p", "9")
        rows = [("good-1", "t", 1, 0, GOOD_BODY), ("bad-p", "t", "x", 0, GOOD_BODY),
                ("no-t", "t", 1, 0, GOOD_BODY), ("bin-t", b"\xff", 2, 0, GOOD_BODY), ("good-2", "t", 0, 0, GOOD_BODY)]
        assert scripts.enqueue("tok-2", 100, 0, rows).status == "ok"
        client.hdel(key + "job:no-t", "t")
        client.rpush(key + "ready:2", "ghost")
        client.hincrby(key + "stats", "outstanding", 1)  # (as a job enqueued whose hash was lost: counted)
        assert scripts.enqueue("tok-3", 100, 0, [("cancel-me", "t", 1, 60_000, GOOD_BODY)]).status == "ok"
        client.hset(key + "job:cancel-me", "p", "7")
        assert scripts.enqueue("tok-4", 100, 0, [("far-p", "t", 7, 1, GOOD_BODY)]).status == "ok"
        q.get_stats()
        assert q.cancel("cancel-me") is True
        q.start_dispatcher(2)
        assert q.join(WAIT)
        foreign = ["bad-p", "far-p", "leased", "no-t"]
        with lock:
            assert sorted(ran) == ["bin-t", "good-1", "good-2"]
            assert sorted(reported) == sorted([("cancel-me", "cancelled")] + [(i, "permanent_failure") for i in foreign])
        dead = q.broker.dead_jobs()
        assert sorted((d.job.id, d.reason) for d in dead) == [(i, "permanent_failure") for i in foreign]
        assert all(d.error.startswith("cannot decode") for d in dead)
        assert q.broker.requeue_dead(["bad-p"]) == 1  # back, and failed again
        q.enqueue(Job("t", id="later"))
        assert q.join(WAIT)
        with lock:
            assert sorted(ran) == ["bin-t", "good-1", "good-2", "later"]
            assert reported.count(("bad-p", "permanent_failure")) == 2
        stats = q.get_stats()
        assert stats.jobs_succeeded == 4 and stats.jobs_failed == 5 and stats.jobs_cancelled == 1
    finally:
        q.stop()
        client.close()


def test_a_reporters_renewer_that_fails_once_goes_on_renewing(redis_url):
    """Symptom: in a producer-only process, an exception other than Redis's in the thread that
    renews the lease of a reporter (registered by a cancel(), an evicting enqueue or a tick,
    while the failure callbacks of its rows run) ended it: the reporter was reaped by a worker
    process a lease later, which reported the job again although nothing had died.
    Reproduce: make the producer's Scripts.hold raise once; cancel() a delayed job from it,
    with an on_failure that runs longer than the lease, beside a worker process: the worker
    reports the job "cancelled" too. docs/redis.md: such a reporter is renewed every lease / 4
    while its callbacks run, however long they take.
    Fix: the renewer logs the exception and goes on (it holds no state)."""
    from tinymq.redis import RedisBroker

    name = "oo-renewer"
    lease = 1.0
    producer = Queue(broker=RedisBroker(redis_url, name=name, lease=lease))
    worker = Queue(broker=RedisBroker(redis_url, name=name, lease=lease))
    in_callback = threading.Event()
    release = threading.Event()
    again = threading.Event()
    fault = threading.Event()
    reported = []

    def slow(job, reason, exc):
        reported.append((job.id, reason))
        in_callback.set()
        release.wait(WAIT)

    producer.on_failure(slow)
    worker.on_failure(lambda job, reason, exc: again.set())
    worker.register_executor("t", lambda job: None)
    scripts = producer._link.scripts
    scripts.hold = _fails_once(scripts.hold, fault)
    cancelled = []
    try:
        producer.enqueue_delayed(Job("t", id="later"), 60.0)
        worker.start_dispatcher(1)
        canceller = threading.Thread(target=lambda: cancelled.append(producer.cancel("later")))
        canceller.start()
        assert in_callback.wait(WAIT)
        assert fault.wait(WAIT)
        assert not again.wait(4 * lease)  # the reporter's lease is renewed: nobody reaps it
        release.set()
        canceller.join(WAIT)
        assert cancelled == [True] and reported == [("later", "cancelled")]
        assert worker.join(WAIT)
    finally:
        release.set()
        producer.stop()
        worker.stop()
