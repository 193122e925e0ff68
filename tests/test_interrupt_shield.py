"""interrupt_on_timeout never cuts tinymq's own code in half (tinymq/_shield.py).

The JobTimeout that ``ExecutorConfig(interrupt_on_timeout=True)`` raises in a worker
thread waits while that thread is inside tinymq's code (an executor's ``enqueue``,
``enqueue_many`` or ``cancel``, a store's write that may hold other threads' saves)
and is raised as that code ends: each call takes effect whole or not at all, and the
store keeps every later acknowledged save.

Another connection holding SQLite's write lock makes the moment deterministic: the
executor's write waits in SQLite while its deadline passes.
"""
import threading
from collections import Counter
import time

import pytest

from tinymq import Config, ExecutorConfig, JobTimeout, Job, Queue, RetryConfig, SQLitePersistence

from _helpers import WAIT, LockedStore, held_elsewhere, stored_payloads, wait_until

INTERRUPTING = ExecutorConfig(timeout=0.3, interrupt_on_timeout=True)
LATER = 3600.0  # seconds: jobs that stay delayed (stored) for the whole test


# --- the core: a shielded worker slot defers its interruption --------------------------------


def _type_state(core):
    return core.ReadyQueue(1).configure("A", lambda job: None, 1, 1.0, False, True)


def test_a_shielded_slot_defers_the_interruption_to_the_end_of_its_outermost_block(core):
    slot = core.WorkerSlot()
    slot.thread_id = threading.get_ident() + 1  # "another thread": expire would interrupt it
    slot.begin("job", _type_state(core), 1.0, None)
    with pytest.raises(JobTimeout):
        with slot:
            with slot:
                assert slot.expire(2.0) == "job"  # decided, not raised into a thread
                assert (slot.interrupted, slot.deferred) == (False, True)
            assert slot.deferred  # an inner block's end does not raise it
        pytest.fail("the outermost block's end raises it")  # pragma: no cover
    assert (slot.shielded, slot.deferred) == (0, False)
    assert slot.end() is True


def test_raise_deferred_raises_inside_the_block_and_only_once(core):
    slot = core.WorkerSlot()
    slot.thread_id = threading.get_ident() + 1
    slot.begin("job", _type_state(core), 1.0, None)
    with slot:
        slot.raise_deferred()  # nothing deferred: nothing raised
        assert slot.expire(2.0) == "job"
        with pytest.raises(JobTimeout):
            slot.raise_deferred()
    assert slot.shielded == 0  # the block ended without raising it again
    slot.begin("next", _type_state(core), 1.0, None)
    with slot:
        pass  # a fresh attempt starts with nothing deferred


# --- a Queue whose executor enqueues or cancels while the store waits for SQLite ----------------


def _wait_for(condition, what):
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def _run_interrupted(tmp_path, call, before=None):
    """Run ``call(q)`` in an interrupting executor whose deadline passes while the store waits for
    SQLite's lock; then an acknowledged enqueue. Returns (what call did, stored payloads, queue stats)."""
    path = str(tmp_path / "jobs.db")
    store = SQLitePersistence(path)
    q = Queue(100)
    q.set_persistence(store)
    entered, locked, done = threading.Event(), threading.Event(), threading.Event()
    outcome = []

    def executor(job):
        entered.set()
        locked.wait(WAIT)
        try:
            outcome.append(("returned", call(q)))
        except Exception as exc:  # JobTimeout: interrupted (anything else is a defect)
            outcome.append((type(exc).__name__, None))
        finally:
            done.set()

    q.register_executor("import", executor, INTERRUPTING)
    if before is not None:
        before(q)
    q.start_dispatcher(1)
    q.enqueue(Job("import", "import", retry_config=RetryConfig(max_retries=0)))
    assert entered.wait(WAIT)
    with LockedStore(path):
        locked.set()
        _wait_for(lambda: q.get_stats().jobs_timed_out >= 1, "the attempt never timed out")
    assert done.wait(WAIT)
    q.enqueue(Job("report", "after", run_at=time.time() + LATER))  # acknowledged: durable
    stats = q.get_stats()
    q.stop()
    store.close()
    return outcome, stored_payloads(path), stats


@pytest.mark.parametrize("when", ["now", "later"])
def test_an_interrupted_enqueue_from_an_executor_is_all_or_nothing(tmp_path, when):
    def enqueue(q):
        run_at = None if when == "now" else time.time() + LATER
        q.enqueue(Job("report", "follow-up", run_at=run_at))

    outcome, stored, stats = _run_interrupted(tmp_path, enqueue)
    assert outcome in ([("returned", None)], [("JobTimeout", None)])
    queued = stats.medium_queue_size + stats.delayed_jobs_count - 1  # "after" is delayed
    if outcome[0][0] == "returned":
        assert (stored, queued) == (["after", "follow-up"], 1)
    else:  # not enqueued: neither in the queue nor in the store
        assert (stored, queued) == (["after"], 0)
    assert stats.jobs_timed_out == 1


def test_an_interrupted_cancel_from_an_executor_is_all_or_nothing(tmp_path):
    failures = []

    def queue_the_victim(q):
        q.on_failure(lambda job, reason, exc: failures.append((job.payload, reason)))
        q.enqueue(Job("report", "victim", id="victim", run_at=time.time() + LATER))

    outcome, stored, stats = _run_interrupted(tmp_path, lambda q: q.cancel("victim"), queue_the_victim)
    assert outcome in ([("returned", True)], [("JobTimeout", None)])
    # The cancel was decided before its store write was interrupted: it happened whole.
    assert ("victim", "cancelled") in failures
    assert stored == ["after"]
    assert (stats.jobs_cancelled, stats.delayed_jobs_count) == (1, 1)


def test_an_interrupted_worker_that_commits_other_threads_saves_acknowledges_them_truly(tmp_path):
    """Group commit: the interrupted thread may be the one that commits a producer's save."""
    path = str(tmp_path / "jobs.db")
    store = SQLitePersistence(path)
    q = Queue(100)
    q.set_persistence(store)
    entered, go, done = threading.Event(), threading.Event(), threading.Event()
    results = {}

    def executor(job):
        entered.set()
        go.wait(WAIT)
        try:
            q.enqueue_many([Job("report", f"batch-{n}", run_at=time.time() + LATER) for n in range(3)])
            results["executor"] = "returned"
        except Exception as exc:  # JobTimeout: interrupted (anything else is a defect)
            results["executor"] = type(exc).__name__
        finally:
            done.set()

    def produce(name):
        try:
            q.enqueue(Job("report", name, run_at=time.time() + LATER))
            results[name] = "returned"
        except Exception as exc:  # refused: then it must not be stored
            results[name] = type(exc).__name__

    q.register_executor("import", executor, INTERRUPTING)
    q.start_dispatcher(1)
    q.enqueue(Job("import", retry_config=RetryConfig(max_retries=0)))
    assert entered.wait(WAIT)
    producers = [threading.Thread(target=produce, args=(f"producer-{n}",)) for n in range(2)]
    with LockedStore(path):
        producers[0].start()  # leads a commit and waits in SQLite, holding the store's commit lock
        _wait_for(lambda: held_elsewhere(store._commit_lock), "the first producer never began its write")
        go.set()  # the executor's save waits for the commit lock, behind it...
        _wait_for(lambda: len(store._pending) >= 1, "the executor never began its write")
        producers[1].start()  # ...and so does the second producer's: one of them commits both
        _wait_for(lambda: len(store._pending) >= 2, "the second producer never began its write")
        _wait_for(lambda: q.get_stats().jobs_timed_out >= 1, "the attempt never timed out")
    for producer in producers:
        producer.join(WAIT)
    assert done.wait(WAIT)
    q.enqueue(Job("report", "after", run_at=time.time() + LATER))
    delayed = q.get_stats().delayed_jobs_count
    q.stop()
    store.close()
    stored = stored_payloads(path)
    acknowledged = sorted(name for name, result in results.items() if result == "returned" and name != "executor")
    assert [name for name in stored if name.startswith("producer")] == acknowledged
    batch = [name for name in stored if name.startswith("batch")]
    assert batch in ([], ["batch-0", "batch-1", "batch-2"])
    assert results["executor"] in ("returned", "JobTimeout")
    if results["executor"] == "returned":
        assert batch
    assert "after" in stored
    assert delayed == len(stored)  # the queue and its store agree


# --- a flood: every interruption lands in some enqueue ------------------------------------------


def test_executors_interrupted_while_flooding_enqueues_leave_the_queue_and_store_in_agreement(tmp_path):
    """Stress: 4 workers whose executors enqueue batches until their interruption; each batch is
    stored whole or not at all, exactly as the queue holds it, and the store keeps working."""
    path = str(tmp_path / "jobs.db")
    store = SQLitePersistence(path)
    q = Queue(config=Config(max_delayed_jobs=0))  # unlimited: no report is evicted
    q.set_persistence(store)
    attempts = 24
    acknowledged = []

    def flood(job):
        for n in range(100_000):
            batch = f"{job.payload}-{n}"
            q.enqueue_many([Job("report", f"{batch}/{part}", run_at=time.time() + LATER) for part in range(3)])
            acknowledged.append(batch)
        raise AssertionError("never interrupted")  # pragma: no cover

    q.register_executor("flood", flood, ExecutorConfig(timeout=0.02, interrupt_on_timeout=True))
    q.start_dispatcher(4)
    for n in range(attempts):
        q.enqueue(Job("flood", f"a{n}", retry_config=RetryConfig(max_retries=0)))

    def all_ended():  # every attempt failed, and every function really returned (its slot is free)
        stats = q.get_stats()
        return stats.jobs_failed == attempts and stats.executor_stats["flood"].active_jobs == 0

    _wait_for(all_ended, "the flood did not end")
    q.enqueue(Job("report", "after", run_at=time.time() + LATER))  # acknowledged: durable
    delayed = q.get_stats().delayed_jobs_count
    q.stop()
    store.close()
    stored = stored_payloads(path)
    batches = Counter(name.split("/")[0] for name in stored if "/" in name)
    assert sorted(set(batches.values())) == [3]  # each batch whole, or not at all
    assert set(acknowledged) <= set(batches)
    assert "after" in stored
    assert delayed == len(stored)  # the queue holds exactly what the store holds


# --- a Redis worker's start of an attempt is not cut by a cancel's interruption -------------------

# Fixed: QueueLink.started (a worker's "I start this attempt", which for a rate-limited type
# sends the start in a fetch round of the worker's own when the pump is idle) ran unshielded. A
# q.cancel() of that attempt interrupts its thread (interrupt_on_timeout=True) at once, since the
# attempt's deadline is not set yet: landing in that round after Redis handed this process more
# jobs, it lost them here, leased to this live process and never run (join() never returned).
def test_a_cancel_interrupting_a_redis_worker_as_it_starts_never_loses_jobs_it_fetched(redis_url):
    from tinymq import RateLimit
    from tinymq.redis._link import job_row

    from _backends import Redis

    backend = Redis(redis_url, lease=30.0)  # (no renewal wait in started: the lease stays fresh)
    q = backend.queue(buffer_size=10)
    link = q._link
    # "first" is held in its start for as long as the test needs: it did not wait for a worker, so
    # it is not given back to Redis as a job that did (_BUFFERED_MAX; its worker would refuse it).
    link._give_back_stuck = lambda: None
    ran = []
    ended = []
    q.on_failure(lambda job, reason, exc: ended.append((job.id, reason)))
    q.register_executor("limited", lambda job: ran.append(job.id), ExecutorConfig(
        timeout=WAIT, interrupt_on_timeout=True, rate_limit=RateLimit(1000, per=60.0)))
    q.register_executor("later", lambda job: ran.append(job.id))

    starting = threading.Event()
    go = threading.Event()
    real_started = link.started

    def started(job):  # (the worker's hook: it holds the attempt until the test is ready)
        if job.id == "first":
            starting.set()
            go.wait()  # (set by the test, by its finally at the latest)
        real_started(job)

    link.started = started  # read by start_dispatcher
    in_take = threading.Event()
    real_take = link._take

    def take(fetched):  # the worker's own round took "second": the cancel comes now
        if threading.current_thread().name.startswith("tinymq-redis-") or not fetched:
            return real_take(fetched)
        in_take.set()
        while not any(slot.expired for slot in q._dispatcher._slots):  # until the cancel decided "first"
            time.sleep(0.001)  # (Python code: an interruption lands here at once)
        return real_take(fetched)

    link._take = take
    real_round = link._round
    others_wait = threading.Event()  # the pump's and the timer's rounds do nothing: the worker's takes "second"
    resumed = threading.Event()
    pump_parked = threading.Event()

    def round_(*args, **kwargs):
        name = threading.current_thread().name
        if others_wait.is_set() and name == "tinymq-redis-pump":
            # Woken in Redis (by the enqueue of "second"), it waits here, idle as it was there:
            # the worker then sends its start itself (a pump between two waits would leave it
            # unsent, and the worker would run "first").
            with link._lock:
                link._pump_idle = True
            pump_parked.set()
            resumed.wait()
            with link._lock:
                link._pump_idle = False
            return 0
        if others_wait.is_set() and name.startswith("tinymq-redis-"):
            return 0
        return real_round(*args, **kwargs)

    link._round = round_

    def due_in_redis():  # by the server's clock, which the delay of an enqueue counts from
        score = link.scripts.command("ZSCORE", link.scripts.key("delayed"), "second")
        seconds, micros = link.scripts.command("TIME")
        return score is not None and (int(seconds) * 1_000_000 + int(micros)) // 1000 > float(score)

    try:
        q.start_dispatcher(1)
        q.enqueue(Job("limited", id="first"))
        assert starting.wait(WAIT)
        others_wait.set()
        assert wait_until(lambda: link._pump_idle)  # (a round of the pump under way has ended)
        # Straight into Redis, delayed: neither the pump nor the timer fetches it. (The earliest
        # delayed job, it signals: the pump wakes and waits in round_.)
        link.scripts.enqueue("second", 10, 0, [job_row(Job("later", id="second", run_at=time.time() + 0.05),
                                                       time.time())])
        assert pump_parked.wait(WAIT)
        assert wait_until(due_in_redis)
        go.set()
        assert in_take.wait(WAIT)
        others_wait.clear()
        resumed.set()
        assert q.cancel("first") is True
        assert q.join(WAIT)
        assert ran == ["second"]
        assert ended == [("first", "cancelled")]
    finally:
        go.set()
        others_wait.clear()
        resumed.set()
        backend.close()
