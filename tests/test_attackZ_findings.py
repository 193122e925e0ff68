"""attackZ: a row Redis hands a process to report keeps one key (432b0b9, 31102dc); a
process without a lease registers a *reporter* for the rows its cancel or evicting enqueue
ends (5b2f1f6, cb638f4); a cooperative executor returning after stop() cancelled it is no
success (b8fae7c). Defects found by attacking them."""
import threading

import pytest

from tinymq import Job, Queue
from tinymq.redis import RedisBroker
from tinymq.redis._scripts import Scripts

from _helpers import wait_until


def _worker_and_producer(redis_url, name, lease):
    import redis as redis_py

    worker = Queue(broker=RedisBroker(redis_url, name=name, lease=lease))
    producer = Queue(broker=RedisBroker(redis_url, name=name, lease=lease))
    client = redis_py.Redis.from_url(redis_url, decode_responses=True)
    worker.register_executor("work", lambda job: None)
    worker.start_dispatcher(1)
    assert wait_until(lambda: worker._link._registered)
    producer.enqueue_delayed(Job("work", None, id="a"), 600.0)  # it waits in Redis
    return worker, producer, client, Scripts(client, name)


# Fixed: a reporter's lease is renewed while its rows' callbacks run (QueueLink._holding,
# hold.lua): it was never renewed, so a producer-only process whose on_failure callback
# outlasted the lease was reaped as dead, and a worker reported its cancelled job again,
# though no process died (docs/redis.md: a report is repeated only when its process was
# killed after its callbacks ran).
def test_a_slow_callback_of_a_producer_only_process_reports_its_cancel_once(redis_url):
    lease = 1.0
    worker, producer, client, keys = _worker_and_producer(redis_url, "attackZ-slow", lease)
    reported = []
    worker_reported = threading.Event()

    @worker.on_failure
    def worker_report(job, reason, exc):
        reported.append(("worker", job.id, reason))
        worker_reported.set()

    @producer.on_failure
    def producer_report(job, reason, exc):
        reported.append(("producer", job.id, reason))
        # A slow callback (an e-mail, a database write): longer than the lease. The worker
        # beats every lease / 4, so it reaps an expired reporter within about 1.25 leases.
        worker_reported.wait(4 * lease)

    try:
        assert producer.cancel("a")
        assert wait_until(lambda: not client.keys(keys.key("reporting:*")))
        worker.stop()
        producer.stop()
        assert reported == [("producer", "a", "cancelled")]  # nothing died: reported once
        assert int(client.hget(keys.key("stats"), "cancelled")) == 1
    finally:
        worker.stop()
        producer.stop()
        client.close()


# Fixed: a reporter registers without setting the fleet's lease gap (register_reporter in
# lib.lua): a producer's lease, shorter than the workers', made their silence between two
# beats look like an outage, and every lease moved forward at each cancel or evicting enqueue.
def test_a_reporter_with_a_short_lease_does_not_move_the_workers_leases(redis_url):
    import redis as redis_py

    name = "attackZ-gap"
    client = redis_py.Redis.from_url(redis_url, decode_responses=True)
    keys = Scripts(client, name)
    producer = Queue(broker=RedisBroker(redis_url, name=name, lease=0.2))  # (it had no use for one)
    try:
        producer.enqueue_delayed(Job("work", None, id="a"), 600.0)
        # A worker process with a 2 s lease: it calls Redis every 0.5 s (its heartbeat).
        keys.fetch("worker", "1", 1, 2000, 3, False)
        expiry = client.zscore(keys.key("procs"), "worker")
        seconds, micros = client.time()
        now = seconds * 1000 + micros // 1000
        client.hset(keys.key("clock"), "t", now - 400)  # its last call, 0.4 s ago: no outage
        assert producer.cancel("a")
        assert client.zscore(keys.key("procs"), "worker") == expiry  # nobody's lease moved
    finally:
        producer.stop()
        client.close()


@pytest.mark.parametrize("with_store", [True, False], ids=["store", "no store"])
# Fixed (Dispatcher._stop_gave_back): q.cancel of a job whose attempt stop() cancelled (the
# attempt given back, its job saved back as ready) returned True and did nothing: the core
# marked the id, which no holder ever took; nothing was reported or counted, and the store
# kept the job, which ran at the next start.
def test_a_cancel_after_stop_cancelled_an_attempt_ends_the_job_or_says_false(tmp_path, with_store):
    import logging

    from tinymq import SQLitePersistence

    path = str(tmp_path / "jobs.db")
    store = SQLitePersistence(path) if with_store else None
    q = Queue()
    if store is not None:
        q.set_persistence(store)
    started, given_back = threading.Event(), threading.Event()
    reported = []
    q.on_failure(lambda job, reason, exc: reported.append((job.id, reason)))

    class Seen(logging.Handler):
        def emit(self, record):
            if "cancelled by stop()" in record.getMessage():
                given_back.set()  # attempt_failed handled the attempt stop() cancelled

    def work(job, ctx):
        started.set()
        if ctx.wait(60):  # cancelled: a cooperative executor stops early
            return

    handler = Seen(logging.INFO)
    logger = logging.getLogger("tinymq")
    old_level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        q.register_executor("w", work)
        q.start_dispatcher(1)
        q.enqueue(Job("w", None, id="j1"))
        assert started.wait(10)
        q.stop(wait=False)
        assert given_back.wait(10)
        cancelled = q.cancel("j1")
        if cancelled:  # the given_back log line comes just before the worker notes the give-back:
            # a cancel in between marks the job, and the worker ends it as it notes it, moments later
            wait_until(lambda: reported)
        stored = None
        if store is not None:
            store.close()
            with SQLitePersistence(path, read_only=True) as inspect:
                stored = [job.id for job in inspect.jobs()]
        if cancelled:  # API.md: cancel ends the job: reported, counted, deleted from the store
            assert (reported, q.get_stats().jobs_cancelled, stored) == (
                [("j1", "cancelled")], 1, [] if store is not None else None)
        else:  # nothing to cancel: the job stays saved back for the next start
            assert reported == [] and stored == (["j1"] if store is not None else None)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        q.stop(wait=False)


def test_the_keys_a_reply_gives_its_caller_are_the_fields_its_rows_wait_under(redis_url):
    """What the model cannot see (it acknowledges a registered process's rows by the fields
    it adopts from Redis, and drops the keys of enqueue's replies): the key a reply gives
    the client, which it acknowledges with op A, is the field the row waits under, for a
    worker process's evicting enqueue (and its resend), its cancel (the key the client
    builds), and a beat's rows from `reports`. Held: no defect; a guard."""
    import redis as redis_py

    client = redis_py.Redis.from_url(redis_url, decode_responses=True)
    s = Scripts(client, "attackZ-keys")
    try:
        s.fetch("w", "1", 1, 60_000, 3, False)  # registered
        row = lambda i, d: (i, "t", 1, d, f"body-{i}")  # noqa: E731
        s.enqueue("e1", 100, 1, [row("a|1~:é", 60_000)])
        reply = s.enqueue("e2", 100, 1, [row("b", 70_000)], "w")  # evicts a
        again = s.enqueue("e2", 100, 1, [row("b", 70_000)], "w")  # a resend
        fields = set(client.hkeys(s.key("reporting:w")))
        assert [e.key for e in reply.evicted] == [e.key for e in again.evicted] and {reply.evicted[0].key} == fields
        assert s.cancel("c1", "b", "w").kept
        assert "b|cancelled|c1" in set(client.hkeys(s.key("reporting:w")))  # (QueueLink.cancel's key)
        s.release("w")  # unacknowledged: to `reports`, keys and all
        alive, _, crashed = s.beat("v", 60_000, 3, False, "b1")
        assert alive and {c.key for c in crashed} == set(client.hkeys(s.key("reporting:v"))) == fields | {"b|cancelled|c1"}
    finally:
        client.close()
