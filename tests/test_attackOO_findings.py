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
