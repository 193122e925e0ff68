"""Strict priorities, FIFO, the ready buffer (QueueFull / block) and per-type concurrency limits.

API.md "Priority", "Queue" (buffer_size, enqueue) and "Concurrency limits and timeouts".
"""
import queue
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tinymq import ExecutorConfig, Job, Priority, Queue, QueueFull

from _helpers import QUIET, WAIT, Blocker, Recorder, examples, make_queue, wait_until

H, M, L = Priority.HIGH, Priority.MEDIUM, Priority.LOW


def model_order(priorities):
    """Indices in the order a single worker must run them: priority desc, FIFO within."""
    return sorted(range(len(priorities)), key=lambda i: -int(priorities[i]))


# --- strict priority, FIFO ----------------------------------------------------------------

def test_strict_priority_then_fifo_when_queued_before_start():
    order = Recorder()
    spec = [L, M, H, L, H, M, M, H, L]
    with Queue(100) as q:
        q.register_executor("t", lambda job: order.add(job.payload))
        for i, p in enumerate(spec):
            q.enqueue(Job("t", i, priority=p))
        q.start_dispatcher(1)
        assert q.join(WAIT)
    assert order.items == model_order(spec)


def test_strict_priority_for_jobs_arriving_while_the_worker_is_busy():
    order = Recorder()
    blocker = Blocker()
    with Queue(100) as q, blocker:
        q.register_executor("gate", blocker.fn)
        q.register_executor("t", lambda job: order.add(job.payload))
        q.start_dispatcher(1)
        q.enqueue(Job("gate", priority=L))
        assert blocker.wait_started(1)
        spec = [L, M, H, L, H, M]
        for i, p in enumerate(spec):
            q.enqueue(Job("t", i, priority=p))
        blocker.release()
        assert q.join(WAIT)
    assert order.items == model_order(spec)


def test_new_helpers_priorities_are_scheduled():
    from tinymq import new_high_priority_job, new_job, new_low_priority_job
    order = Recorder()
    with Queue(10) as q:
        q.register_executor("t", lambda job: order.add(job.payload))
        q.enqueue(new_low_priority_job("t", "low"))
        q.enqueue(new_job("t", "medium"))
        q.enqueue(new_high_priority_job("t", "high"))
        q.start_dispatcher(1)
        assert q.join(WAIT)
    assert order.items == ["high", "medium", "low"]


@settings(max_examples=examples(60), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(list(Priority)), st.sampled_from("abc")), max_size=40))
def test_single_worker_order_matches_the_model(jobs):
    order = []
    with Queue(100) as q:
        for job_type in "abc":
            q.register_executor(job_type, lambda job: order.append(job.payload))
        for i, (priority, job_type) in enumerate(jobs):
            q.enqueue(Job(job_type, i, priority=priority))
        q.start_dispatcher(1)
        assert q.join(WAIT)
    assert order == model_order([p for p, _ in jobs])


# --- the ready buffer ---------------------------------------------------------------------

def test_queue_full_is_a_queue_full():
    assert issubclass(QueueFull, queue.Full)
    with Queue(1) as q:
        q.enqueue(Job("t"))
        with pytest.raises(queue.Full):
            q.enqueue(Job("t"))


def test_buffer_counts_ready_jobs_of_all_priorities_together():
    with Queue(3) as q:
        q.enqueue(Job("t", priority=H))
        q.enqueue(Job("t", priority=M))
        q.enqueue(Job("t", priority=L))
        for p in Priority:
            with pytest.raises(QueueFull):
                q.enqueue(Job("t", priority=p))
        stats = q.get_stats()
        assert (stats.high_queue_size, stats.medium_queue_size, stats.low_queue_size) == (1, 1, 1)
        assert stats.jobs_enqueued == 3  # rejected jobs are not counted


def test_delayed_jobs_do_not_take_buffer_room():
    with Queue(2) as q:
        for _ in range(5):
            q.enqueue(Job("t", run_at=time.time() + 3600))
        q.enqueue(Job("t"))
        q.enqueue(Job("t"))
        with pytest.raises(QueueFull):
            q.enqueue(Job("t"))
        assert q.get_stats().delayed_jobs_count == 5


def test_a_job_rejected_with_queue_full_can_be_enqueued_later():
    seen = Recorder()
    with Queue(1) as q:
        q.register_executor("t", lambda job: seen.add(job.payload))
        q.enqueue(Job("t", 1))
        rejected = Job("t", 2)
        with pytest.raises(QueueFull):
            q.enqueue(rejected)
        q.start_dispatcher(1)
        assert q.join(WAIT)
        assert q.enqueue(rejected) is rejected
        assert q.join(WAIT)
    assert seen.items == [1, 2]


def test_room_frees_as_jobs_start():
    blocker = Blocker()
    with Queue(2) as q, blocker:
        q.register_executor("t", blocker.fn)
        q.start_dispatcher(1)
        q.enqueue(Job("t"))
        assert blocker.wait_started(1)  # the running job no longer takes buffer room
        q.enqueue(Job("t"))
        q.enqueue(Job("t"))
        with pytest.raises(QueueFull):
            q.enqueue(Job("t"))


def test_block_true_waits_for_room():
    blocker = Blocker()
    returned = threading.Event()
    errors = []
    late = Job("t", "late")
    with Queue(1) as q, blocker:
        q.register_executor("t", blocker.fn)
        q.start_dispatcher(1)
        q.enqueue(Job("t", "running"))
        assert blocker.wait_started(1)
        q.enqueue(Job("t", "queued"))  # buffer now full

        def producer():
            try:
                assert q.enqueue(late, block=True) is late
            except BaseException as exc:  # reported below
                errors.append(exc)
            returned.set()

        thread = threading.Thread(target=producer)
        thread.start()
        assert not returned.wait(QUIET), "enqueue(block=True) returned while the buffer was full"
        blocker.release()  # "queued" starts, making room
        assert returned.wait(WAIT)
        thread.join(WAIT)
        assert errors == []
        assert q.join(WAIT)
    assert blocker.started_payloads() == ["running", "queued", "late"]


def test_block_true_with_timeout_raises_queue_full():
    with Queue(1) as q:
        q.enqueue(Job("t"))
        started = time.monotonic()
        with pytest.raises(QueueFull):
            q.enqueue(Job("t"), block=True, timeout=0.2)
        elapsed = time.monotonic() - started
        assert 0.18 <= elapsed <= 2.0
        assert q.get_stats().jobs_enqueued == 1


def test_block_true_with_timeout_succeeds_when_room_appears_in_time():
    blocker = Blocker()
    with Queue(1) as q, blocker:
        q.register_executor("t", blocker.fn)
        q.start_dispatcher(1)
        q.enqueue(Job("t"))
        assert blocker.wait_started(1)
        q.enqueue(Job("t"))
        threading.Timer(0.1, blocker.release).start()
        job = Job("t")
        assert q.enqueue(job, block=True, timeout=WAIT) is job


def test_block_false_is_the_default_and_raises_at_once():
    with Queue(1) as q:
        q.enqueue(Job("t"))
        started = time.monotonic()
        with pytest.raises(QueueFull):
            q.enqueue(Job("t"))
        with pytest.raises(QueueFull):
            q.enqueue(Job("t"), block=False, timeout=5)
        assert time.monotonic() - started < 1.0


def test_many_blocked_producers_all_get_in():
    seen = Recorder()
    with Queue(2) as q:
        q.register_executor("t", lambda job: seen.add(job.payload))
        barrier = threading.Barrier(5, timeout=WAIT)

        def producer(base):
            barrier.wait()
            for i in range(100):
                q.enqueue(Job("t", base + i), block=True, timeout=WAIT)

        threads = [threading.Thread(target=producer, args=(k * 1000,)) for k in range(4)]
        for t in threads:
            t.start()
        barrier.wait()
        q.start_dispatcher(2)
        for t in threads:
            t.join(WAIT * 3)
        assert q.join(WAIT)
    assert sorted(seen.items) == sorted(k * 1000 + i for k in range(4) for i in range(100))


OPS = st.lists(
    st.one_of(
        st.tuples(st.just("ready"), st.sampled_from(list(Priority))),
        st.tuples(st.just("delayed"), st.sampled_from(list(Priority))),
        st.tuples(st.just("block"), st.sampled_from(list(Priority))),
    ),
    max_size=30,
)


@settings(max_examples=examples(60), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(buffer_size=st.integers(1, 8), ops=OPS)
def test_queue_full_exactly_when_the_model_buffer_is_full(buffer_size, ops):
    ready = {p: 0 for p in Priority}
    delayed = 0
    enqueued = 0
    with Queue(buffer_size) as q:
        for kind, priority in ops:
            full = sum(ready.values()) >= buffer_size
            if kind == "delayed":
                q.enqueue(Job("t", priority=priority, run_at=time.time() + 3600))
                delayed += 1
                enqueued += 1
            else:
                kwargs = {"block": True, "timeout": 0.001} if kind == "block" else {}
                if full:
                    with pytest.raises(QueueFull):
                        q.enqueue(Job("t", priority=priority), **kwargs)
                else:
                    q.enqueue(Job("t", priority=priority), **kwargs)
                    ready[priority] += 1
                    enqueued += 1
            stats = q.get_stats()
            assert stats.high_queue_size == ready[H]
            assert stats.medium_queue_size == ready[M]
            assert stats.low_queue_size == ready[L]
            assert stats.delayed_jobs_count == delayed
            assert stats.jobs_enqueued == enqueued


# --- concurrency limits -------------------------------------------------------------------

def test_concurrency_limit_is_never_exceeded():
    blocker = Blocker()
    with Queue(100) as q, blocker:
        q.register_executor("a", blocker.fn, ExecutorConfig(max_concurrent_jobs=2))
        q.start_dispatcher(4)
        for i in range(5):
            q.enqueue(Job("a", i))
        assert blocker.wait_started(2)
        assert not blocker.wait_started(3, timeout=QUIET)
        stats = q.get_stats()
        assert stats.executor_stats["a"].active_jobs == 2
        assert stats.executor_stats["a"].max_jobs == 2
        assert stats.medium_queue_size == 3  # the others wait, still ready
        blocker.release()
        assert q.join(WAIT)
    assert blocker.max_active == 2
    assert sorted(blocker.started_payloads()) == list(range(5))


def test_concurrency_limit_under_churn():
    """Many short jobs through 4 workers: never more than the limit at once."""
    lock = threading.Lock()
    state = {"active": 0, "max": 0, "done": 0}

    def fn(job):
        with lock:
            state["active"] += 1
            state["max"] = max(state["max"], state["active"])
        threading.Event().wait(0.0005)  # a little work, to make overlaps likely
        with lock:
            state["active"] -= 1
            state["done"] += 1

    with Queue(2000) as q:
        q.register_executor("a", fn, ExecutorConfig(max_concurrent_jobs=3))
        q.start_dispatcher(4)
        for i in range(600):
            q.enqueue(Job("a", i, priority=list(Priority)[i % 3]))
        assert q.join(WAIT * 3)
        assert q.get_stats().executor_stats["a"].active_jobs == 0
    assert state["done"] == 600
    assert 1 <= state["max"] <= 3


def test_a_saturated_type_does_not_block_other_types():
    blocker = Blocker()
    others = Recorder()
    with Queue(100) as q, blocker:
        q.register_executor("a", blocker.fn, ExecutorConfig(max_concurrent_jobs=1))
        q.register_executor("b", lambda job: others.add(job.payload))
        q.start_dispatcher(2)
        q.enqueue(Job("a", "a1", priority=H))
        assert blocker.wait_started(1)
        # a2 is the oldest job of the highest priority, but its type is saturated
        q.enqueue(Job("a", "a2", priority=H))
        for i in range(5):
            q.enqueue(Job("b", i, priority=L))
        assert others.wait_for(5), "jobs of type b were held up behind saturated type a"
        assert others.items == list(range(5))  # FIFO within b
        assert blocker.started_payloads() == ["a1"]
        assert q.get_stats().high_queue_size == 1  # a2 waits, ready, in its place
        blocker.release()
        assert q.join(WAIT)
    assert blocker.started_payloads() == ["a1", "a2"]


def test_a_saturated_type_does_not_block_with_a_single_free_worker():
    """Even when the only free worker is the one that would have to wait."""
    blocker = Blocker()
    others = Recorder()
    with Queue(100) as q, blocker:
        q.register_executor("a", blocker.fn, ExecutorConfig(max_concurrent_jobs=1))
        q.register_executor("b", lambda job: others.add(job.payload))
        q.start_dispatcher(2)
        q.enqueue(Job("a", "a1"))
        assert blocker.wait_started(1)
        for i in range(3):
            q.enqueue(Job("a", f"a{i + 2}", priority=H))
        q.enqueue(Job("b", "b1", priority=L))
        assert others.wait_for(1)


def test_passed_over_jobs_keep_their_place():
    """When the slot frees, the waiting jobs of that type run in priority-then-FIFO order."""
    blocker = Blocker()
    order = Recorder()

    def a(job):
        if job.payload == "first":
            blocker.fn(job)
        else:
            order.add(job.payload)

    with Queue(100) as q, blocker:
        q.register_executor("a", a, ExecutorConfig(max_concurrent_jobs=1))
        q.register_executor("b", lambda job: order.add(job.payload))
        q.start_dispatcher(2)
        q.enqueue(Job("a", "first"))
        assert blocker.wait_started(1)
        q.enqueue(Job("a", "a-m1", priority=M))
        q.enqueue(Job("a", "a-m2", priority=M))
        q.enqueue(Job("b", "b-l1", priority=L))
        q.enqueue(Job("a", "a-h1", priority=H))
        q.enqueue(Job("a", "a-m3", priority=M))
        assert order.wait_for(1)
        assert order.items == ["b-l1"]
        blocker.release()
        assert q.join(WAIT)
    assert order.items == ["b-l1", "a-h1", "a-m1", "a-m2", "a-m3"]


def test_free_worker_takes_the_highest_priority_job_with_a_free_slot():
    """Strict priority across types: among runnable jobs, highest priority first."""
    blocker = Blocker()
    order = Recorder()
    with Queue(100) as q, blocker:
        q.register_executor("gate", blocker.fn, ExecutorConfig(max_concurrent_jobs=1))
        q.register_executor("x", lambda job: order.add(job.payload))
        q.register_executor("y", lambda job: order.add(job.payload))
        q.start_dispatcher(1)
        q.enqueue(Job("gate"))
        assert blocker.wait_started(1)
        q.enqueue(Job("gate", "gate-h", priority=H))  # would need gate's slot: but gate is released first
        q.enqueue(Job("x", "x-l", priority=L))
        q.enqueue(Job("y", "y-m", priority=M))
        q.enqueue(Job("x", "x-h", priority=H))
        blocker.release()
        assert q.join(WAIT)
    assert blocker.started_payloads()[1] == "gate-h"
    assert order.items == ["x-h", "y-m", "x-l"]


def test_limits_are_per_type():
    barrier = threading.Barrier(5, timeout=WAIT)  # a1, b1, b2, c1 + the test
    with Queue(100) as q:
        q.register_executor("a", lambda job: barrier.wait(), ExecutorConfig(max_concurrent_jobs=1))
        q.register_executor("b", lambda job: barrier.wait(), ExecutorConfig(max_concurrent_jobs=2))
        q.register_executor("c", lambda job: barrier.wait(), ExecutorConfig(max_concurrent_jobs=1))
        q.start_dispatcher(4)
        for t in ("a", "b", "b", "c"):
            q.enqueue(Job(t))
        barrier.wait()  # all four run at once: limits of one type don't touch another
        assert q.join(WAIT)


def test_limit_change_on_reregister_applies_to_new_attempts():
    blocker = Blocker()
    with Queue(100) as q, blocker:
        q.register_executor("a", blocker.fn, ExecutorConfig(max_concurrent_jobs=1))
        q.start_dispatcher(3)
        for _ in range(3):
            q.enqueue(Job("a"))
        assert blocker.wait_started(1)
        assert not blocker.wait_started(2, timeout=QUIET)
        q.register_executor("a", blocker.fn, ExecutorConfig(max_concurrent_jobs=3))
        assert blocker.wait_started(3), "raising the limit did not let waiting jobs run"


def test_enqueue_timeout_accepts_timedelta():
    from datetime import timedelta
    with Queue(1) as q:
        q.enqueue(Job("t"))
        started = time.monotonic()
        with pytest.raises(QueueFull):
            q.enqueue(Job("t"), block=True, timeout=timedelta(milliseconds=200))
        assert 0.18 <= time.monotonic() - started <= 2.0
