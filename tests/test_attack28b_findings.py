"""Findings of attack28b (an outside attack on rate limits and async executors).

1. A rate-limited type whose window opened between the core's two looks at the clock
   (``admits()`` found it closed, ``_wait_for_window`` found it open) was neither listed
   nor parked: its waiting jobs never ran (``join()`` hung, workers idle). Seen as a hang
   of a Queue with a rate-limited thread executor under load (pure core); shown here
   exactly, the window made to open at that moment.
2. An async attempt that asked its task to cancel (``asyncio.current_task().cancel()``: a
   watchdog firing as the work completes) and returned before the cancel came left it
   pending on the runner task, which runs the next job at once: that job, which nothing
   cancelled, failed for good with CancelledError. In asyncio, a cancel asked of a task
   that then ends is never anyone else's.
"""
import asyncio
import threading

from tinymq import Job, Queue, RateLimit, RetryConfig

from conftest import PURE_CORE, load_twin
from test_core_ready import WAIT, Item, noop

PER = 10.0  # the fake clock's window: nothing real waits for it


def test_a_rate_window_opening_just_after_admits_looked_never_strands_its_type(monkeypatch):
    core = load_twin(PURE_CORE)  # (the compiled core reads a C clock no test can step; it is fixed alike)
    clock = [0.0]
    monkeypatch.setattr(core, "monotonic", lambda: clock[0])
    q = core.ReadyQueue(8)
    q.configure("r", noop, 1000, None, False, False, rate_limit=RateLimit(1, per=PER))
    q.push(Item("r", name="first"))
    q.push(Item("r", name="second"))

    admits = core.TypeState.admits

    def admits_then_the_window_opens(state):
        admitted = admits(state)
        clock[0] = max(clock[0], state.rate_open_at)  # the window opens just after this look
        return admitted

    monkeypatch.setattr(core.TypeState, "admits", admits_then_the_window_opens)
    assert q.pop(timeout=0).name == "first"  # its start closes the window; "second" waits for it
    monkeypatch.setattr(core.TypeState, "admits", admits)

    clock[0] += PER  # long past the opening
    q.reopen_rate_limited(clock[0])  # what the scheduler does
    second = q.pop(timeout=0)
    assert second is not None and second.name == "second"


def test_a_cancel_an_async_attempt_asked_of_its_own_task_as_it_returned_never_reaches_the_next_job():
    failures = []
    second_ran = threading.Event()
    q = Queue(10)
    q.on_failure(lambda job, reason, exc: failures.append((job.type, reason, exc)))

    @q.executor("first")
    async def first(job):
        asyncio.current_task().cancel()  # and returns before the cancel comes

    @q.executor("second")
    async def second(job):
        await asyncio.sleep(0)
        second_ran.set()

    for _ in range(3):  # enqueued before the start: the loop takes them in one batch, one runner after another
        q.enqueue(Job("first"))
        q.enqueue(Job("second", retry_config=RetryConfig(max_retries=0)))
    q.start_dispatcher(1)
    try:
        assert q.join(WAIT)
        stats = q.get_stats()
    finally:
        q.stop()
    assert failures == []
    assert second_ran.is_set()
    assert stats.executor_stats["second"].succeeded == 3
