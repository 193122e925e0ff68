"""get_stats() counts every accepted job exactly once at every moment, also as its attempts end.

A job is in a place (ready, owed room, delayed, running) or has ended (succeeded, failed for good,
cancelled, evicted): ``all_accounted`` in _helpers. These tests end attempts in each way, from
several worker threads with a tiny switch interval, while another thread takes snapshots all along:
no snapshot may catch a job between the end of its attempt and its next place or its end.
"""
import os
import threading
import time

import pytest

from tinymq import DuplicateJob, ExecutorConfig, Job, PermanentFailure, RetryConfig, SQLitePersistence

from _helpers import (WAIT, Blocker, all_accounted_in_type, make_queue, places, queue_with_store,
                      record_failures, stats_watched)

WORKERS = 4
JOBS = 1500
STORED_JOBS = 200  # with a store every attempt's end is a write: fewer jobs, as many moments


def _accounted(stats):
    return all_accounted_in_type(stats, "t")


def _check(q, wrong, **expected):
    stats = q.get_stats()
    assert _accounted(stats), stats
    assert {name: getattr(stats, f"jobs_{name}") for name in expected} == expected
    assert wrong == [], (f"{len(wrong)} snapshots lost or doubled jobs, e.g. {places(wrong[0])} placed, "
                         f"{wrong[0].jobs_succeeded} succeeded, {wrong[0].jobs_failed} failed, "
                         f"{wrong[0].jobs_cancelled} cancelled of {wrong[0].jobs_enqueued} enqueued: {wrong[0]}")


def _fails_first(job):
    if job.retries == 0:
        raise ValueError("first attempt")


def test_successes_are_counted_as_their_slot_is_freed(tiny_switch_interval):
    with make_queue(buffer_size=JOBS) as q:
        q.register_executor("t", lambda job: None, ExecutorConfig(max_concurrent_jobs=2))
        q.start_dispatcher(WORKERS)
        with stats_watched(q, _accounted) as wrong:
            for n in range(JOBS):
                q.enqueue(Job("t", n))
            assert q.join(WAIT)
        _check(q, wrong, enqueued=JOBS, succeeded=JOBS)


@pytest.mark.parametrize("backend", ["memory", "sqlite"])
@pytest.mark.parametrize("initial_delay", [0.0, 0.001], ids=["at-once", "delayed"])
def test_a_retry_is_placed_as_its_failed_attempt_frees_its_slot(backend, initial_delay, tmp_path,
                                                                tiny_switch_interval):
    jobs = JOBS if backend == "memory" else STORED_JOBS
    retry = RetryConfig(max_retries=1, initial_delay=initial_delay)
    with queue_with_store(backend, tmp_path, buffer_size=jobs, scheduler_interval=0.01) as q:
        q.register_executor("t", _fails_first, ExecutorConfig(max_concurrent_jobs=2))
        q.start_dispatcher(WORKERS)
        with stats_watched(q, _accounted) as wrong:
            for n in range(jobs):
                q.enqueue(Job("t", n, retry_config=retry))
            assert q.join(WAIT)
        _check(q, wrong, enqueued=jobs, succeeded=jobs, retried=jobs)


@pytest.mark.parametrize("backend", ["memory", "sqlite"])
def test_a_failure_for_good_is_counted_as_its_attempt_frees_its_slot(backend, tmp_path, tiny_switch_interval):
    jobs = JOBS if backend == "memory" else STORED_JOBS

    def fails(job):
        if job.payload % 2:
            raise PermanentFailure("no")
        raise ValueError("out of retries")

    with queue_with_store(backend, tmp_path, buffer_size=jobs) as q:
        failed = record_failures(q)
        q.register_executor("t", fails, ExecutorConfig(max_concurrent_jobs=2))
        q.start_dispatcher(WORKERS)
        with stats_watched(q, _accounted) as wrong:
            for n in range(jobs):
                q.enqueue(Job("t", n, retry_config=RetryConfig(max_retries=0)))
            assert q.join(WAIT)
        assert len(failed) == jobs
        _check(q, wrong, enqueued=jobs, failed=jobs)


def test_async_attempts_are_counted_as_their_slot_is_freed(tiny_switch_interval):
    async def sometimes_fails(job):
        if job.payload % 3 == 1 and job.retries == 0:
            raise ValueError("retried")
        if job.payload % 3 == 2:
            raise PermanentFailure("failed")

    retry = RetryConfig(max_retries=1, initial_delay=0.0)
    with make_queue(buffer_size=JOBS) as q:
        q.register_executor("t", sometimes_fails, ExecutorConfig(max_concurrent_jobs=8))
        q.start_dispatcher(WORKERS)
        with stats_watched(q, _accounted) as wrong:
            for n in range(JOBS):
                q.enqueue(Job("t", n, retry_config=retry))
            assert q.join(WAIT)
        failed = len(range(2, JOBS, 3))
        _check(q, wrong, enqueued=JOBS, succeeded=JOBS - failed, failed=failed, retried=len(range(1, JOBS, 3)))


def test_cancels_from_other_threads_count_each_job_once(tiny_switch_interval):
    """Cancels of ready jobs, of delayed ones and of due ones the scheduler is moving, from two
    threads; the type is saturated by a held attempt, so none of them runs."""
    jobs = 1000
    with make_queue(buffer_size=jobs, scheduler_interval=0.01) as q, Blocker() as blocker:
        q.register_executor("t", blocker.fn, ExecutorConfig(max_concurrent_jobs=1))
        q.start_dispatcher(2)
        q.enqueue(Job("t", "holder"))
        assert blocker.wait_started(1)
        start = time.monotonic()
        ids = []
        for n in range(jobs):
            job = Job("t", n, id=f"job-{n}")
            if n % 2:
                q.enqueue(job)
            else:  # due from 0.1s on, over 0.2s: many are moved while the cancels come (on a loaded
                # machine the enqueues may outlast that: the later ones are due at once)
                q.enqueue_delayed(job, max(0.0, 0.1 + 0.2 * n / jobs - (time.monotonic() - start)))
            ids.append(job.id)
        cancelled = []

        def cancel(some):
            cancelled.extend(job_id for job_id in some if q.cancel(job_id))

        with stats_watched(q, _accounted) as wrong:
            cancellers = [threading.Thread(target=cancel, args=(ids[k::2],)) for k in range(2)]
            for thread in cancellers:
                thread.start()
            for thread in cancellers:
                thread.join()
            blocker.release()
            assert q.join(WAIT)
        assert len(cancelled) == jobs
        _check(q, wrong, enqueued=jobs + 1, succeeded=1, cancelled=jobs)


def test_recovered_jobs_are_counted_as_they_are_placed(tmp_path, tiny_switch_interval):
    """set_persistence: the store's jobs, ready and delayed, are counted enqueued with their place."""
    path = os.path.join(str(tmp_path), "jobs.db")
    with SQLitePersistence(path) as store:
        for n in range(JOBS):
            job = Job("t", n)
            if n % 2:
                job.run_at = job.timestamp + 3600.0
            store.save(job)
    with make_queue(buffer_size=10) as q, SQLitePersistence(path) as store:
        q.register_executor("t", lambda job: None)
        with stats_watched(q, _accounted) as wrong:
            q.set_persistence(store)
        stats = q.get_stats()
        assert stats.delayed_jobs_count == JOBS // 2
        assert stats.waiting_for_room + stats.medium_queue_size == JOBS // 2
        _check(q, wrong, enqueued=JOBS)


def test_core_a_cancel_is_counted_in_the_step_that_takes_the_job(core):
    """mark_cancel of a ready job, take_cancel_from a heap, take_cancel by a holder: each counts the
    cancel, queue-wide and per type, in the step that takes the job or its mark; nothing else does."""
    ready, heap = core.ReadyQueue(10), core.DelayedHeap(0)
    ready.configure("t", lambda job: None, 1, None, False, False)
    queued, delayed, held = Job("t", id="queued"), Job("t", id="delayed"), Job("t", id="held")
    assert ready.push(queued)
    assert ready.accept_delayed(delayed, heap, 5.0) is None
    ready.accept([held])

    def cancelled():
        return ready.counters()[core.CANCELLED], ready.snapshot(heap)[2]["t"][6]

    assert ready.mark_cancel("queued") == (core.CANCEL_REMOVED, queued)
    assert cancelled() == (1, 1)
    assert ready.mark_cancel("delayed")[0] == core.CANCEL_MARKED and cancelled() == (1, 1)
    assert ready.take_cancel_from(delayed, heap) and len(heap) == 0 and cancelled() == (2, 2)
    assert not ready.take_cancel_from(delayed, heap) and cancelled() == (2, 2)
    assert ready.mark_cancel("held")[0] == core.CANCEL_MARKED and cancelled() == (2, 2)
    assert ready.take_cancel(held) and cancelled() == (3, 3)
    assert not ready.take_cancel(held) and cancelled() == (3, 3)


def test_core_recovered_jobs_are_counted_with_their_place_or_their_end(core):
    """accept_ready places a recovered job as requeue does (owed room when the buffer is full, never
    refused) in the step that counts it; accept(jobs, counter) counts jobs that ended already
    (recovered as crashed) in the step that accepts them, their ends decided."""
    ready = core.ReadyQueue(1)
    ready.configure("t", lambda job: None, 1, None, False, False)
    first, second, crashed = Job("t", 1), Job("t", 2, id="second"), Job("t", id="crashed")
    ready.accept_ready(first)
    ready.accept_ready(second)
    assert ready.sizes() == (0, 1, 0) and ready.overflow_size == 1
    ready.accept([crashed], core.FAILED)
    counters = ready.counters()
    assert (counters[core.ENQUEUED], counters[core.FAILED], ready.unfinished) == (3, 1, 3)
    assert ready.snapshot()[2]["t"][3] == 1  # the type's failed
    assert ready.mark_cancel("crashed")[0] == core.CANCEL_LOST  # its end is decided: a cancel loses
    with pytest.raises(DuplicateJob):
        ready.accept_ready(Job("t", id="second"))
    assert ready.counters()[core.ENQUEUED] == 3
