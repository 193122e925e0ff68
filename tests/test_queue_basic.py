"""The Queue's life cycle: construction, registration, start, enqueue, join, stop.

API.md sections "Import surface" and "Queue".
"""
import os
import threading
import time

import pytest

import tinymq
from tinymq import (
    Config,
    ExecutorConfig,
    Job,
    Priority,
    Queue,
    QueueFull,
    QueueStopped,
    TinyMQError,
)

from _helpers import QUIET, WAIT, Blocker, Recorder, make_queue, wait_until


# --- import surface -----------------------------------------------------------------------

def test_import_surface():
    names = [
        "Queue", "Job", "Priority", "Config", "ExecutorConfig", "RetryConfig",
        "QueueStats", "ExecutorStats", "Persistence", "SQLitePersistence",
        "TinyMQError", "QueueFull", "QueueStopped", "PersistenceError", "JobTimeout",
        "PermanentFailure", "RetryAfter",
        "new_job", "new_high_priority_job", "new_low_priority_job", "new_delayed_job",
    ]
    missing = [name for name in names if not hasattr(tinymq, name)]
    assert missing == []
    assert isinstance(tinymq.__version__, str) and tinymq.__version__
    assert isinstance(tinymq.HAS_EXTENSION, bool)


def test_no_extensions_switch_selects_the_pure_core():
    if os.environ.get("TINYMQ_NO_EXTENSIONS", "") in ("", "0"):
        pytest.skip("runs in the TINYMQ_NO_EXTENSIONS=1 pass")
    assert tinymq.HAS_EXTENSION is False


def test_exceptions_hierarchy():
    for name in ("QueueFull", "QueueStopped", "PersistenceError", "JobTimeout"):
        assert issubclass(getattr(tinymq, name), TinyMQError)


# --- construction -------------------------------------------------------------------------

def test_queue_positional_buffer_size():
    with Queue(3) as q:
        for _ in range(3):
            q.enqueue(Job("t"))
        with pytest.raises(QueueFull):
            q.enqueue(Job("t"))


def test_queue_default_buffer_size_is_100():
    with Queue() as q:
        for _ in range(100):
            q.enqueue(Job("t"))
        with pytest.raises(QueueFull):
            q.enqueue(Job("t"))
        assert q.get_stats().max_delayed_jobs == 10000


def test_queue_from_config():
    with Queue(config=Config(buffer_size=2, max_delayed_jobs=7)) as q:
        q.enqueue(Job("t"))
        q.enqueue(Job("t"))
        with pytest.raises(QueueFull):
            q.enqueue(Job("t"))
        assert q.get_stats().max_delayed_jobs == 7


@pytest.mark.parametrize("bad", [0, -1])
def test_queue_rejects_bad_buffer_size(bad):
    with pytest.raises(ValueError) as info:
        Queue(bad)
    assert str(bad) in str(info.value)


def test_queue_rejects_a_config_of_the_wrong_type():
    with pytest.raises(TypeError):
        Queue(config={"buffer_size": 5})


def test_context_manager_returns_the_queue_and_stops_it():
    with Queue(10) as q:
        assert isinstance(q, Queue)
        q.register_executor("t", lambda job: None)
        q.start_dispatcher(2)
    with pytest.raises(QueueStopped):
        q.enqueue(Job("t"))


def test_context_manager_stops_on_exception():
    with pytest.raises(KeyError):
        with Queue(10) as q:
            q.start_dispatcher(1)
            raise KeyError("boom")
    with pytest.raises(QueueStopped):
        q.enqueue(Job("t"))


# --- registration -------------------------------------------------------------------------

def test_executor_receives_the_job_object():
    seen = Recorder()
    with Queue(10) as q:
        q.register_executor("email", seen.add)
        q.start_dispatcher(1)
        job = Job("email", {"to": "x"}, tags={"user": "1"})
        q.enqueue(job)
        assert seen.wait_for(1)
        assert seen.items[0] is job


def test_register_again_replaces():
    first, second = Recorder(), Recorder()
    with Queue(10) as q:
        q.register_executor("t", lambda job: first.add(job))
        q.register_executor("t", lambda job: second.add(job))
        q.start_dispatcher(1)
        q.enqueue(Job("t"))
        assert q.join(WAIT)
    assert len(first) == 0
    assert len(second) == 1


def test_register_again_replaces_the_config():
    with Queue(10) as q:
        q.register_executor("t", lambda job: None, ExecutorConfig(max_concurrent_jobs=2))
        q.register_executor("t", lambda job: None, ExecutorConfig(max_concurrent_jobs=7))
        assert q.get_stats().executor_stats["t"].max_jobs == 7


def test_register_after_start_is_used():
    seen = Recorder()
    with Queue(10) as q:
        q.start_dispatcher(1)
        q.register_executor("late", seen.add)
        q.enqueue(Job("late"))
        assert seen.wait_for(1)


def test_register_executor_default_config():
    with Queue(10) as q:
        q.register_executor("t", lambda job: None)
        stats = q.get_stats().executor_stats["t"]
        assert stats.max_jobs == ExecutorConfig().max_concurrent_jobs
        assert stats.active_jobs == 0


def test_register_executor_keyword_config():
    with Queue(10) as q:
        q.register_executor("t", lambda job: None, config=ExecutorConfig(max_concurrent_jobs=3))
        assert q.get_stats().executor_stats["t"].max_jobs == 3


@pytest.mark.parametrize("bad", [42, None, "not callable"])
def test_register_non_callable_raises_naming_it(bad):
    with Queue(10) as q:
        with pytest.raises(TypeError) as info:
            q.register_executor("t", bad)
        assert repr(bad) in str(info.value)


def test_register_empty_job_type_raises():
    with Queue(10) as q:
        with pytest.raises(ValueError):
            q.register_executor("", lambda job: None)


def test_register_with_a_config_of_the_wrong_type():
    with Queue(10) as q:
        with pytest.raises(TypeError):
            q.register_executor("t", lambda job: None, {"max_concurrent_jobs": 1})


def test_executor_decorator_with_keywords():
    seen = Recorder()
    with Queue(10) as q:
        def send(job):
            seen.add(job.payload)

        decorated = q.executor("email", max_concurrent_jobs=5, timeout=10)(send)
        assert decorated is send  # the function stays usable as written
        assert q.get_stats().executor_stats["email"].max_jobs == 5
        q.start_dispatcher(1)
        q.enqueue(Job("email", "hello"))
        assert seen.wait_for(1)
        assert seen.items == ["hello"]


def test_executor_decorator_with_config_and_bare():
    with Queue(10) as q:
        @q.executor("a", config=ExecutorConfig(max_concurrent_jobs=2))
        def a(job):
            pass

        @q.executor("b")
        def b(job):
            pass

        stats = q.get_stats().executor_stats
        assert stats["a"].max_jobs == 2
        assert stats["b"].max_jobs == ExecutorConfig().max_concurrent_jobs
        assert callable(a) and callable(b)


def test_executor_decorator_validates():
    with Queue(10) as q:
        with pytest.raises(ValueError):
            q.executor("t", max_concurrent_jobs=0)


@pytest.mark.parametrize("make", ["bound_method", "callable_instance"])
def test_single_argument_callables_of_any_kind(make):
    """A bound method or callable instance taking just the job is called as fn(job)."""
    seen = Recorder()

    class Handler:
        def run(self, job):
            seen.add(job)

        def __call__(self, job):
            seen.add(job)

    handler = Handler()
    fn = handler.run if make == "bound_method" else handler
    with Queue(10) as q:
        q.register_executor("t", fn)
        q.start_dispatcher(1)
        job = q.enqueue(Job("t"))
        assert q.join(WAIT)
        assert seen.items == [job]
        assert q.get_stats().jobs_succeeded == 1


# --- start_dispatcher ---------------------------------------------------------------------

def test_nothing_runs_before_start_dispatcher():
    ran = threading.Event()
    with Queue(10) as q:
        q.register_executor("t", lambda job: ran.set())
        q.enqueue(Job("t"))
        assert not ran.wait(QUIET)
        assert q.get_stats().medium_queue_size == 1
        q.start_dispatcher(1)
        assert ran.wait(WAIT)


def test_start_dispatcher_starts_that_many_workers():
    barrier = threading.Barrier(4, timeout=WAIT)  # 3 workers + the test
    with Queue(10) as q:
        q.register_executor("t", lambda job: barrier.wait())
        q.start_dispatcher(3)
        for _ in range(3):
            q.enqueue(Job("t"))
        barrier.wait()  # raises BrokenBarrierError unless 3 jobs run at once
        assert q.join(WAIT)
        assert q.get_stats().worker_count == 3


def test_start_dispatcher_default_is_one_worker():
    blocker = Blocker()
    with Queue(10) as q, blocker:
        q.register_executor("t", blocker.fn)
        q.start_dispatcher()
        q.enqueue(Job("t"))
        q.enqueue(Job("t"))
        assert blocker.wait_started(1)
        assert not blocker.wait_started(2, timeout=QUIET)
        assert q.get_stats().worker_count == 1


@pytest.mark.parametrize("bad", [0, -2])
def test_start_dispatcher_rejects_fewer_than_one_worker(bad):
    with Queue(10) as q:
        with pytest.raises(ValueError) as info:
            q.start_dispatcher(bad)
        assert str(bad) in str(info.value)


def test_start_dispatcher_rejects_a_non_int():
    with Queue(10) as q:
        with pytest.raises(TypeError):
            q.start_dispatcher("4")


def test_start_dispatcher_twice_raises():
    with Queue(10) as q:
        q.start_dispatcher(1)
        with pytest.raises((RuntimeError, ValueError, TinyMQError)):
            q.start_dispatcher(1)


# --- enqueue ------------------------------------------------------------------------------

def test_enqueue_returns_the_job():
    with Queue(10) as q:
        job = Job("t")
        assert q.enqueue(job) is job


def test_enqueue_rejects_a_non_job():
    with Queue(10) as q:
        with pytest.raises(TypeError):
            q.enqueue("t")


def test_jobs_run_and_join_returns_true():
    seen = Recorder()
    with Queue(100) as q:
        q.register_executor("t", lambda job: seen.add(job.payload))
        q.start_dispatcher(2)
        for i in range(50):
            q.enqueue(Job("t", i))
        assert q.join(WAIT) is True
        assert sorted(seen.items) == list(range(50))


# --- join ---------------------------------------------------------------------------------

def test_join_on_an_empty_queue_returns_true_at_once():
    with Queue(10) as q:
        assert q.join() is True
        assert q.join(0) is True
        q.start_dispatcher(1)
        assert q.join(0.01) is True


def test_join_returns_false_on_timeout():
    blocker = Blocker()
    with Queue(10) as q, blocker:
        q.register_executor("t", blocker.fn)
        q.start_dispatcher(1)
        q.enqueue(Job("t"))
        assert blocker.wait_started(1)
        started = time.monotonic()
        assert q.join(timeout=0.2) is False
        elapsed = time.monotonic() - started
        assert 0.18 <= elapsed <= 2.0
        blocker.release()
        assert q.join(WAIT) is True


def test_join_waits_for_jobs_not_yet_started():
    """join() covers queued jobs too, not only those running."""
    with Queue(10) as q:
        q.register_executor("t", lambda job: None)
        q.enqueue(Job("t"))
        assert q.join(timeout=0.1) is False  # not started: cannot finish
        q.start_dispatcher(1)
        assert q.join(WAIT) is True


def test_join_accepts_timedelta():
    from datetime import timedelta
    with Queue(10) as q:
        q.register_executor("t", lambda job: None)
        q.enqueue(Job("t"))
        assert q.join(timedelta(milliseconds=50)) is False
        q.start_dispatcher(1)
        assert q.join(timedelta(seconds=WAIT)) is True


def test_join_on_a_stopped_queue_with_jobs_left_returns_false():
    """Those jobs can never finish: join() says so instead of blocking forever."""
    result = []
    with Queue(10) as q:
        q.register_executor("t", lambda job: None)
        q.enqueue(Job("t"))  # never started
        q.stop()
        joiner = threading.Thread(target=lambda: result.append(q.join()), daemon=True)
        joiner.start()
        joiner.join(WAIT)
        assert not joiner.is_alive(), "join() blocked forever on a stopped queue"
        assert result == [False]


# --- stop ---------------------------------------------------------------------------------

def test_stop_is_idempotent():
    q = Queue(10)
    q.start_dispatcher(2)
    q.stop()
    q.stop()
    q.stop(wait=False)
    with pytest.raises(QueueStopped):
        q.enqueue(Job("t"))


def test_stop_without_start_dispatcher():
    q = Queue(10)
    q.stop()
    with pytest.raises(QueueStopped):
        q.enqueue(Job("t"))


def test_enqueue_after_stop_raises_queue_stopped_for_every_form():
    q = Queue(10)
    q.register_executor("t", lambda job: None)
    q.start_dispatcher(1)
    q.stop()
    with pytest.raises(QueueStopped):
        q.enqueue(Job("t"))
    with pytest.raises(QueueStopped):
        q.enqueue(Job("t"), block=True, timeout=0.1)
    with pytest.raises(QueueStopped):
        q.enqueue(Job("t", run_at=time.time() + 60))
    with pytest.raises(QueueStopped):
        q.enqueue_delayed(Job("t"), 1.0)
    assert q.get_stats().jobs_enqueued == 0


def test_stop_wakes_producers_blocked_on_a_full_buffer():
    """A producer waiting for room gets QueueStopped instead of waiting forever."""
    outcome = []
    with Queue(1) as q:
        q.enqueue(Job("t"))  # full, and nothing will ever take it
        def producer():
            try:
                q.enqueue(Job("t"), block=True)
                outcome.append("enqueued")
            except QueueStopped:
                outcome.append("stopped")
            except BaseException as exc:  # reported below
                outcome.append(exc)

        thread = threading.Thread(target=producer, daemon=True)
        thread.start()
        assert not wait_until(lambda: outcome, timeout=QUIET)
        q.stop()
        thread.join(WAIT)
        assert not thread.is_alive(), "a blocked producer was left waiting after stop()"
    assert outcome == ["stopped"]


def test_stop_wait_lets_the_running_attempt_finish_and_skips_queued_jobs():
    blocker = Blocker()
    stopped = threading.Event()
    with Queue(100) as q, blocker:
        q.register_executor("t", blocker.fn)
        q.start_dispatcher(1)
        for i in range(4):
            q.enqueue(Job("t", i))
        assert blocker.wait_started(1)

        stopper = threading.Thread(target=lambda: (q.stop(wait=True), stopped.set()))
        stopper.start()
        # Wait until the stop has taken effect (enqueue refuses), without finishing the job.
        def refuses():
            try:
                q.enqueue(Job("probe"))
            except QueueStopped:
                return True
            return False
        assert wait_until(refuses)
        assert not stopped.wait(QUIET), "stop(wait=True) returned while an attempt was running"
        blocker.release()
        assert stopped.wait(WAIT)
        stopper.join(WAIT)
        # the running attempt finished (successfully); queued jobs were not run
        assert blocker.finished and blocker.finished[0].payload == 0
        assert blocker.started_payloads() == [0]
        assert q.get_stats().jobs_succeeded == 1


def test_stop_without_wait_returns_while_an_attempt_runs():
    blocker = Blocker()
    with Queue(10) as q, blocker:
        q.register_executor("t", blocker.fn)
        q.start_dispatcher(1)
        q.enqueue(Job("t"))
        assert blocker.wait_started(1)
        started = time.monotonic()
        q.stop(wait=False)
        assert time.monotonic() - started < 2.0
        assert blocker.active == 1
        with pytest.raises(QueueStopped):
            q.enqueue(Job("t"))
        blocker.release()
        assert blocker.wait_finished(1)


def test_stop_with_timeout_returns_after_the_timeout():
    blocker = Blocker()
    with Queue(10) as q, blocker:
        q.register_executor("t", blocker.fn)
        q.start_dispatcher(1)
        q.enqueue(Job("t"))
        assert blocker.wait_started(1)
        started = time.monotonic()
        q.stop(wait=True, timeout=0.2)
        elapsed = time.monotonic() - started
        assert 0.18 <= elapsed <= 3.0
        assert blocker.active == 1


def test_stop_stops_the_worker_threads():
    before = set(threading.enumerate())
    q = Queue(10)
    q.register_executor("t", lambda job: None)
    q.start_dispatcher(3)
    q.enqueue(Job("t"))
    assert q.join(WAIT)
    q.stop(wait=True)
    assert wait_until(lambda: not [t for t in threading.enumerate() if t not in before and t.is_alive()])


def test_stopped_queue_jobs_never_run_even_if_queued_before_start():
    ran = threading.Event()
    q = Queue(10)
    q.register_executor("t", lambda job: ran.set())
    q.enqueue(Job("t"))
    q.stop()
    try:
        q.start_dispatcher(1)  # unspecified whether this raises; it must not run anything
    except (QueueStopped, RuntimeError, TinyMQError):
        pass
    finally:
        q.stop()
    assert not ran.wait(QUIET)


# --- every method from any thread, executors included --------------------------------------

def test_enqueue_and_stats_from_inside_an_executor():
    children = Recorder()
    stats_seen = []
    with Queue(100) as q:
        def parent(job):
            stats_seen.append(q.get_stats())
            for i in range(3):
                q.enqueue(Job("child", i, priority=Priority.HIGH))
            q.enqueue_delayed(Job("child", "late"), 0.05)

        q.register_executor("parent", parent)
        q.register_executor("child", lambda job: children.add(job.payload))
        q.start_dispatcher(1)  # one worker: the children must not need a second thread
        q.enqueue(Job("parent"))
        assert q.join(WAIT)  # the parent, and nothing enqueued after this call began: its children...
        assert q.join(WAIT)  # ...enqueued before the parent finished, so before this call
        assert sorted(map(str, children.items)) == ["0", "1", "2", "late"]
        assert stats_seen[0].executor_stats["parent"].active_jobs == 1
        assert q.get_stats().jobs_enqueued == 5


def test_register_on_failure_and_join_from_inside_an_executor():
    results = {}
    with Queue(10) as q:
        def setup(job):
            q.register_executor("later", lambda j: results.setdefault("later", True))
            results["on_failure"] = q.on_failure(lambda *a: None)
            try:
                q.join(timeout=0.05)  # this very job is unfinished: it would wait for itself
            except RuntimeError:
                results["join"] = "refused"
            q.enqueue(Job("later"))

        q.register_executor("setup", setup)
        q.start_dispatcher(1)
        q.enqueue(Job("setup"))
        assert q.join(WAIT)
    assert results["join"] == "refused"
    assert results["later"] is True
    assert callable(results["on_failure"])


def test_stop_from_inside_an_executor_does_not_deadlock():
    returned = threading.Event()
    with Queue(10) as q:
        def shutdown(job):
            q.stop()
            returned.set()

        q.register_executor("shutdown", shutdown)
        q.start_dispatcher(1)
        q.enqueue(Job("shutdown"))
        assert returned.wait(WAIT), "stop() called from an executor did not return"
        with pytest.raises(QueueStopped):
            q.enqueue(Job("shutdown"))


def test_methods_from_many_threads_at_once():
    seen = Recorder()
    with Queue(10_000) as q:
        q.register_executor("t", lambda job: seen.add(job.payload))
        q.start_dispatcher(2)
        barrier = threading.Barrier(4, timeout=WAIT)

        def producer(base):
            barrier.wait()
            for i in range(250):
                q.enqueue(Job("t", base + i))
                if i % 50 == 0:
                    q.get_stats()

        threads = [threading.Thread(target=producer, args=(k * 1000,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT)
        assert q.join(WAIT)
        assert sorted(seen.items) == sorted(k * 1000 + i for k in range(4) for i in range(250))


def test_a_coroutine_function_runs_its_body_on_the_queues_loop():
    """An async def is an async executor: its body runs (it is awaited), not just created."""
    ran = Recorder()

    async def send(job):
        ran.add(job.payload)

    with Queue(10) as q:
        q.register_executor("email", send)
        q.start_dispatcher(1)
        q.enqueue(Job("email", "hello"))
        assert q.join(WAIT)
    assert ran.items == ["hello"]
