"""Thread-safety under load: 4 producers x 25,000 jobs, 3 limited types, 4 workers.

Every job runs exactly once, no per-type limit is ever exceeded, and the final
stats agree with what ran. API.md: "Every method is safe to call from any thread",
"At most max_concurrent_jobs attempts of one job type run at a time", "Stats".
"""
import random
import threading
import time

import pytest

from tinymq import Config, ExecutorConfig, Job, Priority, Queue

from _helpers import WAIT, wait_until

PRODUCERS = 4
JOBS_PER_PRODUCER = 25_000
TOTAL = PRODUCERS * JOBS_PER_PRODUCER
LIMITS = {"a": 2, "b": 3, "c": 1000}


@pytest.mark.timeout(180)
@pytest.mark.parametrize("block", [True, False], ids=["block", "big-buffer"])
def test_many_producers_many_workers(block):
    lock = threading.Lock()
    runs = bytearray(TOTAL)  # runs[i] = how many times job i ran
    active = dict.fromkeys(LIMITS, 0)
    peak = dict.fromkeys(LIMITS, 0)
    ran_by_type = dict.fromkeys(LIMITS, 0)
    violations = []

    def make_executor(job_type):
        limit = LIMITS[job_type]

        def fn(job):
            with lock:
                active[job_type] += 1
                if active[job_type] > limit:
                    violations.append((job_type, active[job_type]))
                if active[job_type] > peak[job_type]:
                    peak[job_type] = active[job_type]
                runs[job.payload] += 1
                ran_by_type[job_type] += 1
            # Yield the GIL mid-attempt (not synchronisation): other workers run now,
            # so an attempt beyond the type's limit would overlap and be seen.
            time.sleep(0)
            with lock:
                active[job_type] -= 1

        return fn

    buffer_size = 1_000 if block else TOTAL
    with Queue(config=Config(buffer_size=buffer_size)) as q:
        for job_type, limit in LIMITS.items():
            q.register_executor(job_type, make_executor(job_type), ExecutorConfig(max_concurrent_jobs=limit))
        q.start_dispatcher(4)
        start = threading.Barrier(PRODUCERS, timeout=WAIT)
        errors = []
        expected_by_type = [dict.fromkeys(LIMITS, 0) for _ in range(PRODUCERS)]

        def producer(index):
            rng = random.Random(index)
            priorities = list(Priority)
            types = list(LIMITS)
            counts = expected_by_type[index]
            try:
                start.wait()
                base = index * JOBS_PER_PRODUCER
                for i in range(base, base + JOBS_PER_PRODUCER):
                    job_type = types[rng.randrange(3)]
                    counts[job_type] += 1
                    job = Job(job_type, i, priority=priorities[rng.randrange(3)])
                    if block:
                        q.enqueue(job, block=True, timeout=60)
                    else:
                        q.enqueue(job)
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)

        threads = [threading.Thread(target=producer, args=(k,)) for k in range(PRODUCERS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not any(t.is_alive() for t in threads), "a producer is stuck"
        assert errors == []
        assert q.join(120), "join() timed out: some jobs never finished"
        stats = q.get_stats()

    assert violations == [], f"limits exceeded: {violations[:5]}"
    not_once = [i for i, n in enumerate(runs) if n != 1]
    assert not_once == [], f"{len(not_once)} jobs did not run exactly once, e.g. {not_once[:5]}"
    expected = {t: sum(c[t] for c in expected_by_type) for t in LIMITS}
    assert ran_by_type == expected
    assert stats.jobs_enqueued == TOTAL
    assert stats.jobs_succeeded == TOTAL
    assert (stats.jobs_failed, stats.jobs_retried, stats.jobs_timed_out, stats.jobs_evicted) == (0, 0, 0, 0)
    assert (stats.high_queue_size, stats.medium_queue_size, stats.low_queue_size) == (0, 0, 0)
    for job_type, limit in LIMITS.items():
        assert stats.executor_stats[job_type].active_jobs == 0
        assert stats.executor_stats[job_type].max_jobs == limit
        assert peak[job_type] <= limit


@pytest.mark.timeout(120)
def test_failures_retries_and_delays_under_load():
    """A mix of failing, retried and delayed jobs from several threads: counters stay exact."""
    lock = threading.Lock()
    attempts = {}
    failures = []
    n_per_thread = 1_500

    def fn(job):
        with lock:
            attempts[job.payload] = attempts.get(job.payload, 0) + 1
            n = attempts[job.payload]
        kind = job.payload % 3
        if kind == 1 and n == 1:
            raise RuntimeError("flaky")  # succeeds on the retry
        if kind == 2:
            raise RuntimeError("always")  # fails permanently after 1 retry

    from tinymq import RetryConfig
    retry = RetryConfig(max_retries=1, initial_delay=0.001)
    with Queue(config=Config(buffer_size=100_000, max_delayed_jobs=0)) as q:
        q.on_failure(lambda job, reason, exc: failures.append((job.payload, reason)))
        q.register_executor("t", fn, ExecutorConfig(max_concurrent_jobs=3))
        q.start_dispatcher(4)

        def producer(index):
            for i in range(index * n_per_thread, (index + 1) * n_per_thread):
                job = Job("t", i, retry_config=retry)
                if i % 5 == 0:
                    q.enqueue_delayed(job, 0.001 * (i % 50))
                else:
                    q.enqueue(job)

        threads = [threading.Thread(target=producer, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert q.join(60)
        stats = q.get_stats()

    total = 4 * n_per_thread
    kinds = [sum(1 for i in range(total) if i % 3 == k) for k in range(3)]
    assert sorted(attempts) == list(range(total))
    assert all(attempts[i] == (1 if i % 3 == 0 else 2) for i in range(total))
    assert stats.jobs_enqueued == total
    assert stats.jobs_succeeded == kinds[0] + kinds[1]
    assert stats.jobs_failed == kinds[2]
    assert stats.jobs_retried == kinds[1] + kinds[2]
    assert sorted(failures) == [(i, "retries_exhausted") for i in range(total) if i % 3 == 2]
    assert stats.executor_stats["t"].active_jobs == 0
    assert stats.delayed_jobs_count == 0


@pytest.mark.timeout(120)
def test_delayed_pushes_from_many_threads_onto_a_full_set_end_each_job_once_and_never_evict_a_due_one():
    """4 producers push jobs due in 0-3 ms or in an hour onto a delayed set of 8 while the
    scheduler promotes: each job runs, is evicted, or still waits (at most 8) - exactly one
    of them - and no job is evicted once it was due: the push that evicts it began before the
    job's push returned plus its delay (its latest due time), however long the threads wait
    for a CPU (the deterministic case is test_queue_delayed's
    test_a_due_job_that_nothing_has_promoted_yet_is_never_evicted)."""
    per_thread = 2_000
    late = []
    ran, evicted = [], []
    push = threading.local()  # .began: the wall time at which this producer's current push began
    due_by = {}  # payload -> the latest wall time at which it was due (its push's return + its delay)
    evictions = []  # (payload, the wall time at which the push that evicted it began)
    with Queue(config=Config(buffer_size=100_000, max_delayed_jobs=8)) as q:
        def on_failure(job, reason, exc):  # (run by the push that ends the job)
            evicted.append(job.payload)
            began = getattr(push, "began", None)
            if reason != "evicted" or began is None:
                late.append((job.payload, reason, threading.current_thread().name))
            else:
                evictions.append((job.payload, began))

        q.on_failure(on_failure)
        q.register_executor("t", lambda job: ran.append(job.payload))
        q.start_dispatcher(2)

        def producer(index):
            rng = random.Random(index)
            for i in range(index * per_thread, (index + 1) * per_thread):
                delay = 3600 if rng.random() < 0.3 else rng.random() * 0.003
                push.began = time.time()
                q.enqueue_delayed(Job("t", i), delay)
                due_by[i] = time.time() + delay

        threads = [threading.Thread(target=producer, args=(k,)) for k in range(PRODUCERS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        # What is left waits an hour; the rest has run or been evicted.
        assert q.get_stats().delayed_jobs_count <= 8
        def accounted():
            stats = q.get_stats()
            return stats.jobs_succeeded + stats.jobs_evicted + stats.delayed_jobs_count

        assert wait_until(lambda: accounted() == PRODUCERS * per_thread)
        stats = q.get_stats()
        q.stop(wait=True)
    late += [(payload, "evicted", began - due_by[payload]) for payload, began in evictions
             if began >= due_by[payload]]
    assert late == []
    assert len(ran) + len(evicted) + stats.delayed_jobs_count == PRODUCERS * per_thread
    assert len(set(ran) | set(evicted)) == len(ran) + len(evicted)  # none both, none twice
    assert stats.jobs_succeeded == len(ran) and stats.jobs_evicted == len(evicted)
