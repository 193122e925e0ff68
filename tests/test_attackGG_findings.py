"""Findings of attackGG: counts and places while the queue moves jobs, in process and over Redis."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinymq import Job, Priority

from _helpers import examples, make_queue, places, record_failures, stats_watched, wait_until

PRIORITIES = [Priority.HIGH, Priority.MEDIUM, Priority.LOW]


def test_a_job_evicted_by_enqueue_is_counted_evicted_when_it_leaves_the_delayed_set():
    """enqueue_delayed on a full delayed set: a get_stats() taken on the way to reporting the job it
    evicts (here: as the failure is decided) already counts it in jobs_evicted, not in no place."""
    with make_queue(buffer_size=10, max_delayed_jobs=5) as q:
        dispatcher, seen = q._dispatcher, []
        fail = dispatcher.fail

        def looked_at_first(job, reason, *args, **kwargs):
            if reason == "evicted":
                seen.append(q.get_stats())
            return fail(job, reason, *args, **kwargs)

        dispatcher.fail = looked_at_first
        evicted = record_failures(q)
        for n in range(20):
            q.enqueue_delayed(Job("t", n), 3600.0 + n)
        stats = q.get_stats()
        assert (stats.jobs_enqueued, stats.delayed_jobs_count, stats.jobs_evicted) == (20, 5, 15)
        assert [(job.payload, reason) for job, reason, _ in evicted.items] == [(n, "evicted") for n in range(15)]
        assert len(seen) == 15
        for stats in seen:
            assert places(stats) + stats.jobs_evicted == stats.jobs_enqueued, stats


def test_enqueue_delayed_on_a_full_delayed_set_never_loses_a_job_in_get_stats(tiny_switch_interval):
    """The same, with get_stats() called from another thread all along (a stress test)."""
    with make_queue(buffer_size=10, max_delayed_jobs=5) as q:
        with stats_watched(q, lambda stats: places(stats) + stats.jobs_evicted == stats.jobs_enqueued) as wrong:
            for n in range(2000):
                q.enqueue_delayed(Job("t", n), 3600.0 + n)
        stats = q.get_stats()
        assert (stats.jobs_enqueued, stats.delayed_jobs_count, stats.jobs_evicted) == (2000, 5, 1995)
        assert wrong == [], (f"{len(wrong)} snapshots lost an evicted job, e.g. {places(wrong[0])} "
                             f"placed and {wrong[0].jobs_evicted} evicted of {wrong[0].jobs_enqueued} enqueued")


def test_core_an_evicted_job_is_counted_in_the_push_that_evicts_it(core):
    """accept_delayed decides and counts the end of the job it evicts in the same step: evicted, or
    cancelled when a cancel of it was requested first (the caller reports it with that reason)."""
    ready, heap = core.ReadyQueue(10), core.DelayedHeap(1)
    marked, plain = Job("t", id="marked"), Job("t", id="plain")
    assert ready.accept_delayed(marked, heap, 1.0) is None
    assert ready.mark_cancel("marked") == (core.CANCEL_MARKED, marked)  # (as if on its way somewhere)
    assert ready.accept_delayed(plain, heap, 2.0) == (marked, core.CANCELLED)
    assert ready.accept_delayed(Job("t"), heap, 3.0) == (plain, core.EVICTED)
    counters = ready.counters()
    assert (counters[core.ENQUEUED], counters[core.EVICTED], counters[core.CANCELLED]) == (3, 1, 1)
    assert not ready.cancel_requested(marked)  # taken: a second cancel finds its end decided
    assert ready.mark_cancel("plain")[0] == core.CANCEL_LOST


def _delayed(job, delay):
    job.run_at = job.timestamp + delay
    return job


def _mixed_batch(tag, size):
    """``size`` jobs of all priorities, every third one ready, the others delayed by an hour or more."""
    return [Job("t", (tag, n), priority=PRIORITIES[n % 3]) if n % 3 == 0
            else _delayed(Job("t", (tag, n), priority=PRIORITIES[n % 3]), 3600.0 + n)
            for n in range(size)]


@pytest.mark.parametrize("max_delayed_jobs", [0, 5], ids=["unlimited", "capped"])
def test_enqueue_many_counts_its_delayed_jobs_together_with_their_place(max_delayed_jobs):
    """enqueue_many of ready and delayed jobs: a get_stats() taken as the queue tells its scheduler
    about the batch's delayed jobs (they are in place by then) counts each job of the batch once."""
    with make_queue(max_delayed_jobs=max_delayed_jobs) as q:
        seen = []

        class LookingAlarm:  # (no dispatcher runs: nothing else uses the scheduler's alarm)
            def wake_before(self, when):
                seen.append(q.get_stats())

        alarm, q._dispatcher.scheduler_alarm = q._dispatcher.scheduler_alarm, LookingAlarm()
        try:
            for batch in range(3):
                q.enqueue_many(_mixed_batch(batch, 12))
        finally:
            q._dispatcher.scheduler_alarm = alarm
        stats = q.get_stats()
        assert stats.jobs_enqueued == 36 and places(stats) + stats.jobs_evicted == 36
        assert seen
        for stats in seen:
            assert places(stats) + stats.jobs_evicted == stats.jobs_enqueued, stats


@pytest.mark.parametrize("max_delayed_jobs", [0, 50], ids=["unlimited", "capped"])
def test_enqueue_many_never_shows_a_job_counted_and_nowhere(max_delayed_jobs, tiny_switch_interval):
    """The same with get_stats() called from another thread all along (a stress test)."""
    batches, batch_size = 40, 30
    with make_queue(buffer_size=10_000, max_delayed_jobs=max_delayed_jobs) as q:
        with stats_watched(q, lambda stats: places(stats) + stats.jobs_evicted == stats.jobs_enqueued) as wrong:
            for batch in range(batches):
                q.enqueue_many(_mixed_batch(batch, batch_size))
        stats = q.get_stats()
        assert stats.jobs_enqueued == batches * batch_size
        assert places(stats) + stats.jobs_evicted == stats.jobs_enqueued
        assert wrong == [], (f"{len(wrong)} snapshots counted jobs in no place, e.g. {places(wrong[0])} "
                             f"placed and {wrong[0].jobs_evicted} evicted of {wrong[0].jobs_enqueued} enqueued")


def test_core_push_many_delayed_places_and_counts_in_one_step_or_not_at_all(core):
    ready, heap = core.ReadyQueue(1), core.DelayedHeap(2)
    delayed = [Job("t", n, id=f"d{n}") for n in range(3)]
    # No room for the two ready ones: nothing is counted, registered or pushed.
    assert ready.push_many_delayed([Job("t"), Job("t")], delayed, heap, [1.0, 2.0, 3.0]) is None
    assert ready.unfinished == 0 and len(heap) == 0 and not ready.has_id("d0")
    # Room: the third push evicts the batch's own earliest job, counted in the same step.
    assert ready.push_many_delayed([Job("t")], delayed, heap, [1.0, 2.0, 3.0]) == [(delayed[0], core.EVICTED)]
    counters = ready.counters()
    assert (counters[core.ENQUEUED], counters[core.EVICTED], ready.unfinished) == (4, 1, 4)
    assert ready.snapshot(heap, now=0.0)[0] == (0, 1, 0) and ready.snapshot(heap, now=0.0)[4] == 2


@pytest.mark.parametrize("made_invalid", ["priority", "type"])
def test_a_due_job_made_invalid_while_it_waited_is_counted_until_it_fails(made_invalid):
    """A delayed job whose priority (or type) a user made invalid while it waited fails when it is
    moved in. Due but not moved yet (no dispatcher here), get_stats() still counts it once: where
    it is (delayed), not in a ready size it never reaches, nor nowhere."""
    from tinymq import _pick_core

    with make_queue() as q:
        job = q.enqueue_delayed(Job("t", "waits"), 0.05)
        q.enqueue_delayed(Job("t", "later"), 3600.0)
        due = _pick_core.core.monotonic() + 0.05
        assert wait_until(lambda: _pick_core.core.monotonic() > due)
        if made_invalid == "priority":
            job.priority = 7
        else:
            job.type = b"t"
        stats = q.get_stats()
        assert (stats.jobs_enqueued, stats.jobs_failed) == (2, 0)
        assert (stats.high_queue_size, stats.medium_queue_size, stats.low_queue_size) == (0, 0, 0)
        assert stats.delayed_jobs_count == 2


@settings(max_examples=examples(60), deadline=None)
@given(batches=st.lists(st.lists(st.one_of(st.none(), st.integers(0, 20)), min_size=1, max_size=8),
                        min_size=1, max_size=8),
       cap=st.integers(1, 6))
def test_enqueue_many_evicts_as_one_push_at_a_time_would(batches, cap):
    """Against a model: each batch's delayed jobs (None: a ready one; d: due in an hour plus d
    seconds) go into the capped delayed set in batch order, each push on a full set evicting the
    earliest-due waiting job (among those, and not the job being pushed); the counts add up."""
    waiting, evicted_model, n = [], [], 0
    with make_queue(buffer_size=10_000, max_delayed_jobs=cap) as q:
        evicted = record_failures(q, key=lambda job: job.payload)
        for batch in batches:
            jobs = []
            for delay in batch:
                # (n / 1000: two due times never closer than the clocks' jitter between batches)
                job = Job("t", n) if delay is None else _delayed(Job("t", n), 3600.0 + delay + n / 1000)
                if delay is not None:
                    if len(waiting) >= cap:
                        waiting.sort()
                        evicted_model.append(waiting.pop(0)[1])
                    waiting.append((delay + n / 1000, n))
                jobs.append(job)
                n += 1
            q.enqueue_many(jobs)
        stats = q.get_stats()
    assert [payload for payload, reason, _ in evicted.items] == evicted_model
    assert all(reason == "evicted" for _, reason, _ in evicted.items)
    assert (stats.jobs_enqueued, stats.jobs_evicted, stats.delayed_jobs_count) == (n, len(evicted_model), len(waiting))
    assert places(stats) + stats.jobs_evicted == stats.jobs_enqueued
