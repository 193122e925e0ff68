"""The queue's event loop: where async executors' attempts run.

One loop per queue, in its own thread (``tinymq-loop``), started with the
dispatcher. The core keeps the jobs of async executors' types apart from the
worker threads' (``core.LOOP``): worker threads never take them, and the loop
never takes a thread executor's job, so neither kind waits for the other.

Hand-off: the core calls ``_wake`` (one ``call_soon_threadsafe``) only when
the loop had found nothing to take and was not woken since; the loop then
drains everything the core can give it, a batch at a time, in priority order.
A busy loop is never woken per job. A slot freed on the loop schedules a drain
with a plain ``call_soon``.

Each attempt is a task. Deadlines: the attempts of one type with one timeout
start in deadline order, so each (type, timeout) keeps its attempts in a FIFO
with one loop timer, armed for the oldest: no timer per attempt. Every decision
about an attempt (success, failure, timeout, cancel, stop) is taken once,
under ``_lock`` (``_decide``); the type's slot is freed only when the task
has finished, so ``max_concurrent_jobs`` counts coroutines still unwinding.
"""
import asyncio
import inspect
import logging
import threading
from collections import deque
from typing import Any, Deque, Dict, List, Optional, Tuple

from ._pick_core import core
from .context import JobContext
from .errors import JobTimeout

__all__ = ["LoopRunner"]

logger = logging.getLogger("tinymq")

_DRAIN_BATCH = 256  # jobs started per loop callback: the loop runs other callbacks between batches
_UNWIND_WAIT = 1.0  # seconds stop() waits for cancelled coroutines to unwind before leaving them


class _Attempt:
    """One running attempt of an async executor. ``decided`` is guarded by LoopRunner._lock."""

    __slots__ = ("job", "state", "context", "task", "deadline", "deadlines", "decided")

    def __init__(self, job: Any, state: Any, context: Optional[JobContext]) -> None:
        self.job = job
        self.state = state
        self.context = context
        self.task: Optional["asyncio.Task[Any]"] = None
        self.deadline = 0.0  # in loop.time(), when it has a timeout
        self.deadlines: "Optional[_Deadlines]" = None  # the FIFO it waits in for its deadline
        # None while undecided; then "returned", "timed_out", "cancelled" or "stopped"
        self.decided: Optional[str] = None


class _Deadlines:
    """The attempts of one type and timeout, by start (so by deadline); one timer for the oldest."""

    __slots__ = ("attempts", "timer")

    def __init__(self) -> None:
        self.attempts: Deque[_Attempt] = deque()
        self.timer: Optional[asyncio.TimerHandle] = None


class LoopRunner:
    """Runs async executors on one event loop thread, for one Dispatcher."""

    def __init__(self, dispatcher: Any) -> None:
        self.dispatcher = dispatcher
        self.ready = dispatcher.ready
        self.loop = asyncio.new_event_loop()
        self._lock = threading.Lock()
        # Guarded by _lock: the attempts whose tasks have not finished, and their decisions.
        self._attempts: Dict[int, _Attempt] = {}  # id(task) -> attempt
        self._all_finished = threading.Condition(self._lock)  # _attempts may have emptied
        self._drain_scheduled = False  # loop thread only: a _drain is queued with call_soon
        self._stop_when_idle = False  # stop() from one of its attempts: the loop stops after the last
        self._thread_done = threading.Event()
        self._deadlines: Dict[Tuple[Any, float], _Deadlines] = {}  # loop thread only

    # --- the loop thread ----------------------------------------------------

    def run(self) -> None:
        """The loop thread's body: runs until ``stop``."""
        loop = self.loop
        asyncio.set_event_loop(loop)
        try:
            self.ready.set_loop_waker(self._wake)  # drains at once if jobs are waiting
            loop.run_forever()
        finally:
            self.ready.set_loop_waker(None)
            try:
                for job in self.cancel_for_stop():  # stop() from an attempt on this loop waited for none
                    self.dispatcher._stopped_async(job)
                pending = [task for task in asyncio.all_tasks(loop) if not task.done()]
                for task in pending:  # only coroutines that ignored their cancellation are left
                    task.cancel()
                if pending:
                    loop.run_until_complete(asyncio.wait(pending, timeout=_UNWIND_WAIT))
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.run_until_complete(loop.shutdown_default_executor())  # outcomes reported off the loop
            except Exception:  # pragma: no cover - a bug; the loop closes all the same
                logger.exception("tinymq event loop did not shut down cleanly")
            finally:
                loop.close()
                self._thread_done.set()

    def _wake(self) -> None:
        """Called by the core (any thread): the loop has jobs to take."""
        try:
            self.loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the loop is closed: the queue stopped
            pass
        except Exception:  # pragma: no cover - never into the core's caller (an enqueue that succeeded)
            logger.exception("tinymq could not wake its event loop")

    def _schedule_drain(self) -> None:
        if not self._drain_scheduled:
            self._drain_scheduled = True
            self.loop.call_soon(self._drain)

    def _drain(self) -> None:
        self._drain_scheduled = False
        taken = self.ready.take_for_loop(_DRAIN_BATCH)
        for job, state in taken:
            self._start(job, state)
        if len(taken) == _DRAIN_BATCH:  # maybe more: after the callbacks queued meanwhile
            self._schedule_drain()

    def _start(self, job: Any, state: Any) -> None:
        dispatcher = self.dispatcher
        timeout = state.timeout
        context = None
        if state.takes_context:
            context = JobContext(job, None if timeout is None else core.monotonic() + timeout)
        attempt = _Attempt(job, state, context)
        try:
            if dispatcher.needs_hooks():
                awaitable = self._with_hooks(attempt)
            else:
                fn = state.fn
                awaitable = fn(job) if context is None else fn(job, context)
            if asyncio.iscoroutine(awaitable):
                task = self.loop.create_task(awaitable)
            elif inspect.isawaitable(awaitable):  # a Future, or an object with __await__
                task = asyncio.ensure_future(awaitable, loop=self.loop)
            else:
                raise TypeError(f"async executor for {job.type!r} returned {awaitable!r}, not an awaitable")
        except BaseException as exc:  # the call itself raised, or returned no awaitable
            self.ready.release_state(state, False)
            self._schedule_drain()
            self._report(dispatcher.attempt_failed, job, state, exc)
            return
        attempt.task = task
        with self._lock:
            self._attempts[id(task)] = attempt
        if timeout is not None:
            self._watch(attempt, timeout)
        task.add_done_callback(self._finished)

    def _watch(self, attempt: _Attempt, timeout: float) -> None:
        key = (attempt.state, timeout)
        deadlines = self._deadlines.get(key)
        if deadlines is None:
            deadlines = self._deadlines[key] = _Deadlines()
        attempt.deadline = self.loop.time() + timeout
        attempt.deadlines = deadlines
        deadlines.attempts.append(attempt)
        if deadlines.timer is None:
            deadlines.timer = self.loop.call_at(attempt.deadline, self._expire_due, deadlines)

    def _expire_due(self, deadlines: _Deadlines) -> None:
        """The oldest attempt's deadline: expire every undecided one that is due, re-arm for the next."""
        attempts = deadlines.attempts
        now = self.loop.time()
        while attempts:
            attempt = attempts[0]
            if attempt.decided is None and attempt.deadline > now:
                deadlines.timer = self.loop.call_at(attempt.deadline, self._expire_due, deadlines)
                return
            attempts.popleft()
            if attempt.decided is None:
                self._expire(attempt)
        deadlines.timer = None

    async def _with_hooks(self, attempt: _Attempt) -> Any:
        """The attempt with the dispatcher's start hook (a store's mark_running, a broker's lease)."""
        await self.loop.run_in_executor(None, self.dispatcher.attempt_starting, attempt.job)
        fn = attempt.state.fn
        context = attempt.context
        return await (fn(attempt.job) if context is None else fn(attempt.job, context))

    def _decide(self, attempt: _Attempt, how: str) -> bool:
        """Decide ``attempt`` as ``how``, unless it was decided already: True when this call did."""
        with self._lock:
            if attempt.decided is not None:
                return False
            attempt.decided = how
        return True

    def _expire(self, attempt: _Attempt) -> None:
        """The attempt's deadline (on the loop): it failed with JobTimeout; its task is cancelled."""
        if not self._decide(attempt, "timed_out"):
            return
        job, state = attempt.job, attempt.state
        if attempt.context is not None:
            attempt.context._cancel("timed out")
        assert attempt.task is not None
        attempt.task.cancel()
        limit = f"its {state.timeout:g}s timeout" if state.timeout is not None else "its deadline"
        self._report(self.dispatcher.async_timed_out, job, state,
                     JobTimeout(f"job {job.id} ({job.type!r}) ran past {limit}"))

    def _finished(self, task: "asyncio.Task[Any]") -> None:
        """The task has finished (unwound): free the slot, then report what was not decided yet."""
        with self._lock:
            attempt = self._attempts.pop(id(task))
            decided = attempt.decided
            if decided is None:
                attempt.decided = "returned"
            idle = not self._attempts
            if idle:
                self._all_finished.notify_all()
        if idle and self._stop_when_idle:
            self.loop.stop()
        deadlines = attempt.deadlines
        if deadlines is not None:  # forget the decided attempts at its head: they need no deadline
            waiting = deadlines.attempts
            while waiting and waiting[0].decided is not None:
                waiting.popleft()
        state = attempt.state
        self.ready.release_state(state, False)
        if state.pending():
            self._schedule_drain()
        job = attempt.job
        if decided is None:
            if task.cancelled():
                error: Optional[BaseException] = asyncio.CancelledError()
            else:
                error = task.exception()
            if error is None:
                self._report(self.dispatcher.async_succeeded, job)
            else:
                self._report(self.dispatcher.attempt_failed, job, state, error)
        elif not task.cancelled():  # it was cancelled (timeout, cancel, stop) and carried on
            logger.warning("job %s (%s): its coroutine ignored its cancellation (%s) and ran until it "
                           "returned; its slot was held until then", job.id, job.type, decided)
            self.dispatcher.returned_late(job)
        else:
            self.dispatcher.returned_late(job)

    def _report(self, report: Any, *args: Any) -> None:
        """Hand an outcome to the dispatcher: on the loop, or off it when a store or broker may block."""
        if self.dispatcher.blocks():
            self.loop.run_in_executor(None, self._report_safely, report, args)
        else:
            self._report_safely(report, args)

    @staticmethod
    def _report_safely(report: Any, args: Any) -> None:
        try:
            report(*args)
        except Exception:  # pragma: no cover - a bug; the loop keeps running
            logger.exception("tinymq could not report an async attempt's outcome")

    # --- from any thread ----------------------------------------------------

    def running(self) -> List[_Attempt]:
        with self._lock:
            return [a for a in self._attempts.values() if a.decided is None]

    def cancel(self, job_id: str) -> Optional[Any]:
        """Decide the running attempt of ``job_id`` as cancelled and cancel its task: its job, or None."""
        with self._lock:
            for attempt in self._attempts.values():
                if attempt.decided is None and attempt.job._id == job_id:
                    attempt.decided = "cancelled"
                    break
            else:
                return None
        self._cancel_task(attempt, "cancelled")
        return attempt.job

    def cancel_for_stop(self) -> List[Any]:
        """Decide every undecided attempt as stopped (not a failure) and cancel its task: their jobs."""
        with self._lock:
            stopped = [a for a in self._attempts.values() if a.decided is None]
            for attempt in stopped:
                attempt.decided = "stopped"
        for attempt in stopped:
            self._cancel_task(attempt, "the queue stopped")
        return [attempt.job for attempt in stopped]

    def _cancel_task(self, attempt: _Attempt, reason: str) -> None:
        if attempt.context is not None:
            attempt.context._cancel(reason)
        task = attempt.task
        if task is not None:
            try:
                self.loop.call_soon_threadsafe(task.cancel)
            except RuntimeError:  # the loop is closed: the task ended with it
                pass

    def wait_finished(self, deadline: Optional[float], undecided_only: bool) -> bool:
        """Wait until no attempt (``undecided_only``: no undecided one) runs; False at ``deadline``."""
        with self._lock:
            while True:
                attempts = self._attempts.values()
                if not any(a.decided is None for a in attempts) if undecided_only else not attempts:
                    return True
                remaining = None if deadline is None else deadline - core.monotonic()
                if remaining is not None and remaining <= 0.0:
                    return False
                self._all_finished.wait(None if remaining is None else min(remaining, threading.TIMEOUT_MAX))

    def notify_decided(self) -> None:
        with self._lock:
            self._all_finished.notify_all()

    def stop(self, wait_for_thread: bool, when_idle: bool = False) -> None:
        """Stop the loop (after what is queued on it); with ``wait_for_thread``, wait for its thread.

        ``when_idle``: only once no attempt runs (stop() awaited in one of them, which it cannot wait for).
        """
        try:
            self.loop.call_soon_threadsafe(self._stop_loop if when_idle else self.loop.stop)
        except RuntimeError:
            return  # closed already
        if wait_for_thread:
            self._thread_done.wait(_UNWIND_WAIT * 2)

    def _stop_loop(self) -> None:
        self._stop_when_idle = True
        if not self._attempts:
            self.loop.stop()

    @property
    def active(self) -> int:
        return len(self._attempts)


def is_async_executor(fn: Any) -> bool:
    """Whether ``fn`` is run on the loop: an ``async def`` function, a ``functools.partial`` of
    one, a function wrapping one (``functools.wraps``), or an object whose ``__call__`` is one."""
    for target in (fn, getattr(fn, "__call__", None), inspect.unwrap(fn) if callable(fn) else None):
        if inspect.iscoroutinefunction(target):
            return True
    return False
