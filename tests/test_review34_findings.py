"""Defects found by the outside review of session 34's changes (helper review34), each with its
test, failing before its fix."""
import asyncio
import threading

import pytest

from tinymq import ExecutorConfig, Job, Queue
from tinymq.persistence import SQLitePersistence

from _helpers import WAIT


# --- 1. a dead reporting thread's ident made a user's thread one of the queue's own ------------------

# The event loop's reporting threads (tinymq-io) are the queue's own (fix34h): recorded by ident as
# they start, dropped once the loop's shutdown has joined them. Between their exit and that drop, which
# waits for the coroutines that ignore their cancellation (decided before stop(): never waited for by
# it), an ident of theirs may be reused by any new thread of the program (glibc reuses the stack of a
# thread just joined, so often at once): that thread was taken for one of the queue's own, and its
# join() raised RuntimeError ("would wait for itself"), its stop() waited for nothing.

def _reusing_thread(idents, call, tries=500):
    """Start threads one after another until one runs with an ident in ``idents``: what ``call()``
    returned or raised there (None: no thread reused one)."""
    for _ in range(tries):
        outcome = []

        def body():
            if threading.get_ident() in idents:
                try:
                    outcome.append(("returned", call()))
                except BaseException as exc:
                    outcome.append(("raised", exc))

        thread = threading.Thread(target=body)
        thread.start()
        thread.join()
        if outcome:
            return outcome[0]
    return None


def test_a_thread_that_reuses_an_ended_reporting_threads_ident_is_not_one_of_the_queues_own(tmp_path):
    release, timed_out = threading.Event(), threading.Event()

    async def ignores_its_cancellation(job):
        while not release.is_set():
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:  # (its timeout)
                timed_out.set()

    store = SQLitePersistence(str(tmp_path / "jobs.db"))  # (outcomes are reported on tinymq-io threads)
    q = Queue(10)
    q.set_persistence(store)
    q.register_executor("s", ignores_its_cancellation, ExecutorConfig(timeout=0.1))
    q.enqueue(Job("s", id="s1"))
    q.start_dispatcher(1)
    try:
        assert timed_out.wait(WAIT)
        io_threads = [thread for thread in threading.enumerate() if thread.name.startswith("tinymq-io")]
        assert io_threads, "the timeout was reported off the loop"
        q.stop(timeout=WAIT)  # (returns at once: the timed-out coroutine is never waited for)
        for thread in io_threads:
            thread.join(WAIT)  # (the loop's shutdown joined them; it still waits for the coroutine)
            assert not thread.is_alive()
        outcome = _reusing_thread({thread.ident for thread in io_threads}, lambda: q.join(0))
        if outcome is None:
            pytest.skip("no new thread reused an ident of an ended reporting thread")
        assert outcome == ("returned", False), outcome  # (stopped with a job left: as in any thread)
    finally:
        release.set()
        q.stop()
        store.close()


# --- 2. stop()'s warning blamed a coroutine for a report that had not returned ------------------------

# A stop(timeout=...) whose loop had not closed by its end, with no coroutine it cancelled still
# running, said "the queue's event loop still blocked (a coroutine makes a call that does not await)"
# (219a8ca). But the loop's shutdown waits too for the outcomes being reported off the loop (the
# tinymq-io threads): a store whose write waits for another connection's lock kept it, with no
# coroutine blocking anything. The warning now says what the shutdown waits for.

def test_a_stop_that_times_out_on_a_report_under_way_says_so_not_that_a_coroutine_blocks_the_loop(
        tmp_path, caplog):
    from _helpers import LockedStore

    path = str(tmp_path / "jobs.db")
    store = SQLitePersistence(path)
    q = Queue(10)
    q.set_persistence(store)
    started, finish = threading.Event(), threading.Event()
    writing = threading.Event()

    async def work(job):
        started.set()
        while not finish.is_set():
            await asyncio.sleep(0.005)

    real = q._dispatcher.async_succeeded

    def reported(*args, **kwargs):  # (on the reporting thread: its store write waits for the lock)
        writing.set()
        return real(*args, **kwargs)

    q._dispatcher.async_succeeded = reported
    q.register_executor("a", work)
    q.enqueue(Job("a", id="a1"))
    q.start_dispatcher(1)
    locked = None
    try:
        assert started.wait(WAIT)
        locked = LockedStore(path).__enter__()  # (another program holds the store's write lock)
        finish.set()
        assert writing.wait(WAIT)  # (its write waits for the lock: the loop's shutdown waits for it)
        with caplog.at_level("WARNING", logger="tinymq"):
            q.stop(timeout=0.3)
        warned = [r.getMessage() for r in caplog.records if r.getMessage().startswith("stop() returns")]
        assert len(warned) == 1, warned
        assert "does not await" not in warned[0] and "being reported" in warned[0], warned
    finally:
        finish.set()
        if locked is not None:
            locked.__exit__()
        q.stop()
        store.close()
    assert q.get_stats().jobs_succeeded == 1  # (its report went through once the lock was free)


@pytest.mark.parametrize("left", ["tasks", "executor"])
def test_a_stop_that_times_out_on_a_task_or_the_default_executor_says_so(left, caplog):
    # The same for what else the loop's shutdown waits for: a task a coroutine started that ignores its
    # cancellation, and the loop's default executor (a run_in_executor call that has not returned).
    q = Queue(10)
    started, release = threading.Event(), threading.Event()

    async def stubborn():
        while not release.is_set():
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                pass

    kept = []

    async def work(job):
        loop = asyncio.get_running_loop()
        if left == "tasks":
            kept.append(loop.create_task(stubborn()))
        else:
            kept.append(loop.run_in_executor(None, release.wait, WAIT))
        started.set()

    q.register_executor("a", work)
    q.enqueue(Job("a"))
    q.start_dispatcher(1)
    try:
        assert started.wait(WAIT)
        with caplog.at_level("WARNING", logger="tinymq"):
            q.stop(timeout=0.3)
        warned = [r.getMessage() for r in caplog.records if r.getMessage().startswith("stop() returns")]
        assert len(warned) == 1 and "does not await" not in warned[0], warned
        assert ("ignore their cancellation" if left == "tasks" else "default executor") in warned[0], warned
    finally:
        release.set()
        q.stop()
