"""The queue's event loop: where async executors' attempts run.

One loop per queue, in its own thread (``tinymq-loop``), started with the
dispatcher. The core keeps the jobs of async executors' types apart from the
worker threads' (``core.LOOP``): worker threads never take them, and the loop
never takes a thread executor's job, so neither kind waits for the other.

Hand-off: the core calls ``_wake`` (one ``call_soon_threadsafe``) only when
the loop had found nothing to take and was not woken since; the loop then
drains everything the core can give it, a batch at a time, in priority order.
A busy loop is never woken per job. The core puts each batch in ``_todo``
(``hand_to_loop``), and each runner pops its job from there as it starts it;
what is left there when stop() closes the core, the core takes back in that
step: counted ready, never running, however long a coroutine holds the loop.

Runners: attempts run in long-lived runner tasks, one attempt at a time each,
not in a task per attempt (creating and scheduling a task is most of what a
short coroutine costs). A runner that ends an attempt takes the next job from
``_todo``, or from the core itself, without suspending; an idle one waits on a
``_Wakeup``; ``_call_runners`` wakes or starts one for every job waiting in
``_todo``, so a job never waits for another's attempt; woken from ``_drain``,
an idle runner starts its attempt in that same pass of the loop. Timeouts, cancels and
stop cancel the runner's task while it is inside that attempt (``running``,
checked on the loop); the runner takes the CancelledError as the attempt's end
and goes on. A runner's context variables carry over from one of its attempts
to the next, as in any long-lived task. An attempt that may have left a way to
cancel its task (``asyncio.current_task()``: a cancel it asked that has not come,
a timer armed to cancel it, a reference kept) is its runner's last: the runner
ends, and a cancel still to come ends that task, as in asyncio, never a later
attempt; a new runner takes the next job (``_RunnerTask``, ``_run``).

Deadlines: one loop timer for all attempts, armed for the earliest deadline
it knows of; an attempt that starts with an earlier one re-arms it, and when
it fires it expires every attempt that is due and re-arms for the next: no
timer per attempt. Every decision about an attempt (success, failure,
timeout, cancel, stop) is taken once, under ``_lock`` (``_decide``); the
type's slot is freed only when the attempt has unwound, so
``max_concurrent_jobs`` counts coroutines still unwinding. A runner registers
its attempt in ``_attempts`` under ``_lock``, in the step that sees stop() has
not begun (once it has, the job goes back to ``_todo`` unstarted, where close()
takes it back as ready); other threads read a snapshot of it.

Hand-overs: a plain callable that returns an awaitable is only known to be one
once called, on a worker thread. The rest of that attempt is handed over
(``adopt``, under ``_lock``): registered in ``_attempts`` with the deadline and
context the worker gave it, its awaitable run in a task of its own, its
outcome taken from that task as it ends; the worker goes on at once, and the
type's slot stays the attempt's until its task has unwound.
"""
import asyncio
import concurrent.futures
import functools
import inspect
import logging
import sys
import threading
import time
import types
import weakref
from collections import deque
from typing import Any, Deque, Dict, List, Optional, Tuple

from ._pick_core import core
from ._sections import owned, reinit_after_fork, section
from .context import JobContext
from .errors import JobTimeout, counted

__all__ = ["LoopRunner", "is_async_executor", "timeout_error"]

logger = logging.getLogger("tinymq")

_DRAIN_BATCH = 256  # jobs started per loop callback: the loop runs other callbacks between batches
_UNWIND_WAIT = 1.0  # seconds stop() waits for cancelled coroutines to unwind before leaving them
# Seconds past stop(timeout=...)'s end that it still gives them: its timeout bounds the whole stop().
_UNWIND_PAST_TIMEOUT = 0.1
_NEVER_WAITED_FOR = ("timed_out", "cancelled")  # decided before stop(): stop() never waits for them
_NO_DEADLINE = float("inf")
# Seconds past an attempt's deadline after which another thread decides it (expire_overdue): the
# loop's timer has not, so a coroutine blocks the loop (a call that does not await).
LOOP_LATE = 0.25
monotonic = core.monotonic  # the clock of loop.time() and of the core's deadlines
_COROUTINE = types.CoroutineType
_GENERATORS = (types.GeneratorType, types.AsyncGeneratorType)  # never awaited: their bodies never run
try:
    from sys import getrefcount
except ImportError:  # no reference counts (not CPython): no runner's task is known to be held by it alone
    def getrefcount(obj: Any, /) -> int:
        return -1


class _Attempt:
    """One running attempt of an async executor. ``decided`` is guarded by LoopRunner._lock."""

    __slots__ = ("job", "state", "context", "task", "started", "deadline", "decided",
                 "running", "called", "cancel_requested")

    def __init__(self, job: Any, state: Any, context: Optional[JobContext], task: Any,
                 started: float, deadline: float) -> None:
        self.job = job
        self.state = state
        self.context = context
        self.task = task  # the runner's task that runs it (a _RunnerTask); adopted: its own, once started
        self.started = started  # monotonic, as loop.time(): its duration is counted per type (from the call)
        self.deadline = deadline  # monotonic; +inf without a timeout, and until the function is called
        self.running = False  # loop thread only: its runner is inside it (awaiting its coroutine)
        # Under LoopRunner._lock: its function is called, or will be with no await before (it was
        # undecided when its runner came to it; one with a start write to await checks after it)
        self.called = False
        self.cancel_requested = False  # loop thread only: the runner's task.cancel() was called for it
        # None while undecided; then "returned", "timed_out", "cancelled" or "stopped"
        self.decided: Optional[str] = None


class _RunnerTask(asyncio.Task):  # type: ignore[type-arg]
    """A runner's task (``LoopRunner._run``), which knows whether anything but its runner asked it to
    cancel: an attempt that asked "its task" to (``asyncio.current_task().cancel()``), a timer one
    armed, the loop's shutdown."""

    __slots__ = ("cancel_asked",)

    def __init__(self, coroutine: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.cancel_asked = False
        super().__init__(coroutine, loop=loop)

    def cancel(self, msg: Any = None) -> bool:
        self.cancel_asked = True
        return super().cancel(msg)

    def cancel_attempt(self) -> bool:
        """The runner's own cancel of the attempt it is inside: a timeout, Queue.cancel(), stop()."""
        return super().cancel()


class _Wakeup:
    """What an idle runner awaits: a minimal future whose task ``_drain`` resumes in its own pass.

    A task awaiting an ``asyncio.Future`` resumes from a loop callback queued
    when the future completes: one more pass of the loop (a ``select`` call and
    a GIL release) between a wake-up from another thread and the attempt. A
    task accepts any object that keeps asyncio's future protocol
    (``_asyncio_future_blocking``, ``add_done_callback``, ``result``,
    ``cancel``, ``get_loop``); this one keeps the task's wake-up callback, so
    ``resume`` runs the task's next step at once when called outside a task.
    """

    __slots__ = ("_asyncio_future_blocking", "_loop", "_callback", "_context", "_cancelled")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._asyncio_future_blocking = False
        self._loop = loop
        self._callback: Any = None  # the awaiting task's wake-up, until it is resumed or cancelled
        self._context: Any = None
        self._cancelled = False

    def __await__(self) -> Any:
        self._asyncio_future_blocking = True
        yield self  # the task calls add_done_callback, then resumes through resume() or cancel()
        return self.result()

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def add_done_callback(self, callback: Any, *, context: Any = None) -> None:
        self._callback, self._context = callback, context

    def remove_done_callback(self, callback: Any) -> int:
        if self._callback is callback:
            self._callback = None
            return 1
        return 0

    def done(self) -> bool:
        return self._callback is None

    def cancelled(self) -> bool:
        return self._cancelled

    def result(self) -> None:
        if self._cancelled:
            raise asyncio.CancelledError()

    def cancel(self, msg: Any = None) -> bool:
        """The runner's task is cancelled (shutdown): it wakes with CancelledError, in a loop callback."""
        callback = self._callback
        if callback is None:
            return False
        self._callback, self._cancelled = None, True
        self._loop.call_soon(callback, self, context=self._context)
        return True

    def resume(self) -> bool:
        """Run the waiting task's next step now (on the loop, outside any task); False if it is not waiting."""
        callback = self._callback
        if callback is None:
            return False
        self._callback = None
        self._context.run(callback, self)
        return True


async def _awaited(awaitable: Any) -> Any:
    """Await any awaitable in a task of its own (a task takes coroutines only)."""
    return await awaitable


def _discard(awaitable: Any) -> None:
    """An awaitable that will never be awaited (its attempt was decided first): a coroutine is
    closed (no "never awaited" warning), an asyncio future cancelled; on the loop."""
    if awaitable.__class__ is _COROUTINE or inspect.iscoroutine(awaitable):
        awaitable.close()
    elif isinstance(awaitable, asyncio.Future):
        awaitable.cancel()


class LoopRunner:
    """Runs async executors on one event loop thread, for one Dispatcher."""

    def __init__(self, dispatcher: Any) -> None:
        self.dispatcher = dispatcher
        self.ready = dispatcher.ready
        self.loop = asyncio.new_event_loop()
        # Where a store's or a broker's writes for async attempts run (a start, an outcome): threads
        # of the queue's own, not the loop's default executor, which the coroutines share: while they
        # hold its threads (awaiting q.aenqueue(block=True), a run_in_executor waiting on the queue),
        # no attempt could start or be reported.
        # Each of them is one of the queue's own threads (Dispatcher.waits_for_itself), as a worker's:
        # a stop() or join() that the collector runs in a report there would wait for that report.
        self._io_threads: List[threading.Thread] = []  # (appended in the threads; read once they are joined)
        self._io = concurrent.futures.ThreadPoolExecutor(thread_name_prefix="tinymq-io",
                                                         initializer=self._io_thread_started)
        self._lock = threading.RLock()  # taken with section() (but by _finished, on the loop only)
        # The attempts whose coroutines have not unwound (the keys; added by the loop thread, or by a
        # worker thread's adopt() under _lock; removed under _lock; other threads read a snapshot,
        # list(...)), and their decisions (_Attempt.decided, guarded by _lock).
        self._attempts: Dict[_Attempt, None] = {}
        self._all_finished = threading.Condition(self._lock)  # _attempts may have emptied, or one was decided
        self._waiting_for_end = 0  # threads in wait_finished: only then is _all_finished notified
        # Attempts that ended by themselves whose outcome is being reported off the loop (_report_end;
        # guarded by _lock): stop() waits for those reports as for the attempts, as a worker thread's
        # attempt ends with its own report; else stop()'s release over a broker could give back a job
        # whose success was decided, counted nowhere then and run again elsewhere.
        self._reporting = 0
        # Jobs taken from the core (slots held) for the runners, as (job, type, level): filled by the
        # core (hand_to_loop, on the loop thread), each popped from the left by the runner that starts
        # it; what is left in it when stop() closes the core, the core takes back (counted ready, not
        # running). Loop thread only: idle runners' wake-up futures; runners woken or started and not
        # yet back for a job; shutting down.
        self._todo: Deque[Tuple[Any, Any, int]] = deque()
        self._idle: Deque[_Wakeup] = deque()
        self._coming = 0
        self._closing = False
        self._stop_when_idle = False  # stop() from one of its attempts: the loop stops after the last
        self._halting = False  # the queue stopped the loop (_halt): anything else that ends it is a mishap
        self._thread_done = threading.Event()
        self._thread_id: Optional[int] = None  # the loop thread's, once it runs
        # In a fork()ed child whose only thread is the loop's (an attempt's coroutine forked): the task
        # that forked, whose attempt's end ends the child (see mark_forked); None elsewhere.
        self._forked_task: Optional["asyncio.Task[Any]"] = None
        # The loop thread has done all that stop() waits for: what is left of it waits only for
        # coroutines that timed out or were cancelled before stop() (_NEVER_WAITED_FOR).
        self._settled = threading.Event()
        self._left_unwinding = False  # stop() returned before _settled and logged the coroutines it left
        # Loop thread only (stop() reads it for its warning): what the loop's shutdown waits for, once it
        # has begun: "tasks" (tasks to end), "executor" (the loop's default executor), "reports"
        # (outcomes being reported off the loop, _io); "" before (the loop runs, or a call blocks it).
        self._shutdown_step = ""
        # Guarded by _lock: stop() has cancelled the loop's attempts (cancel_for_stop): an attempt a
        # worker thread hands over from now on is refused (adopt), not started and left running.
        self._refusing = False
        # Loop thread only: the deadline timer, and the deadline it is armed for (+inf: none).
        self._expiry: Optional[asyncio.TimerHandle] = None
        self._expiry_at = _NO_DEADLINE
        # Loop thread only: whether success is reported on the loop with no log line (no DEBUG logging);
        # looked at again every _DRAIN_BATCH attempts of a runner, off the per-job path.
        self._quiet = not logger.isEnabledFor(logging.DEBUG)

    # --- the loop thread ----------------------------------------------------

    def run(self) -> None:
        """The loop thread's body: runs until ``stop``."""
        loop = self.loop
        self._thread_id = threading.get_ident()
        asyncio.set_event_loop(loop)
        try:
            self.ready.set_loop_waker(self._wake, self._todo)  # drains at once if jobs are waiting
            self._run_until_halted()
        finally:
            self.ready.set_loop_waker(None)
            self._closing = True
            try:
                for waiting in self._idle:
                    waiting.cancel()  # idle runners end
                for job in self.cancel_for_stop():  # stop() from an attempt on this loop waited for none
                    self.dispatcher._stopped_async(job)
                # Taken from the core and never started: close() took back all but those whose cancel
                # was requested, ended so here (counted cancelled in the step that frees the slot:
                # get_stats() never sees the job in no place; over a broker the mark stays there).
                dispatcher = self.dispatcher
                while self._todo:
                    job, state, _ = self._todo.popleft()
                    if dispatcher.ledger is None and self.ready.take_cancel(job, state):
                        dispatcher.end_cancelled(job)
                        continue
                    self.ready.release_state(state, False, core.LOOP)
                    dispatcher._stopped_async(job)
                self._shutdown_step = "tasks"
                if self._end_tasks(spare_never_waited_for=True):  # such coroutines are still running:
                    self._shutdown_step = "reports"
                    self._io.shutdown(wait=True)  # stop() returns once the outcomes are reported
                    self._settled.set()
                    self._shutdown_step = "tasks"
                self._end_tasks()
                loop.run_until_complete(loop.shutdown_asyncgens())
                self._shutdown_step = "executor"
                loop.run_until_complete(loop.shutdown_default_executor())
                self._shutdown_step = "tasks"
                self._end_tasks()  # a task started meanwhile, by a callback run in the two calls above
            except Exception:  # pragma: no cover - a bug; the loop closes all the same
                logger.exception("tinymq event loop did not shut down cleanly")
            finally:
                self._shutdown_step = "reports"
                self._io.shutdown(wait=True)  # outcomes reported off the loop
                self.dispatcher.own_threads_ended(self._io_threads)  # (joined: an ident may be reused)
                loop.close()
                self._settled.set()
                self._thread_done.set()

    def thread_done(self) -> bool:
        """Whether the loop's thread has shut the loop down and closed it (it only returns then)."""
        return self._thread_done.is_set()

    def _io_thread_started(self) -> None:
        """In a reporting thread (``_io``), as it starts: the queue's own thread from now on."""
        self._io_threads.append(threading.current_thread())
        self.dispatcher.own_thread_started()

    def _run_until_halted(self) -> None:
        """Run the loop until the queue stops it (``_halt``), whatever its executors do to it.

        The loop ends too when a task raises SystemExit or KeyboardInterrupt (asyncio lets
        those out of ``run_forever``: a task an executor awaits through ``asyncio.gather``
        or ``create_task``), or when an executor calls ``loop.stop()``. Then the queue's
        async side would be gone without a word: its later jobs accepted and never run,
        ``join()`` never returning. The loop is run again instead, and it is logged; the
        awaiting attempt sees the exception, and fails, as if it had raised it itself.
        """
        loop = self.loop
        while True:
            try:
                loop.run_forever()
            except BaseException:
                if self._halting:
                    logger.exception("tinymq event loop ended with an exception while the queue stopped")
                    return
                logger.exception("an async executor's task let an exception out of the queue's event loop "
                                 "(asyncio does so with SystemExit and KeyboardInterrupt); the loop runs on")
                continue
            if self._halting:
                return
            logger.error("an async executor stopped the queue's event loop (loop.stop()); the loop runs on: "
                         "only Queue.stop() stops it")

    def _halt(self) -> None:
        """On the loop: the queue stops it."""
        self._halting = True
        self.loop.stop()

    def _end_tasks(self, spare_never_waited_for: bool = False) -> bool:
        """Cancel every task still on the loop, and run the loop until each has ended.

        A loop closed with a task pending destroys it pending (asyncio logs
        "Task was destroyed but it is pending!"), and the coroutine never runs
        its cleanup. A coroutine that ignores its cancellation keeps this
        thread (a daemon, which ``stop`` waits for only briefly) until it
        returns; it is cancelled again every ``_UNWIND_WAIT`` seconds.

        ``spare_never_waited_for``: leave alone the runners still inside attempts that timed
        out or were cancelled before stop(), which stop() never waits for; True if any is left.
        """
        loop = self.loop
        warned = False
        while True:
            spared = set()
            if spare_never_waited_for:
                spared = {a.task for a in list(self._attempts) if a.decided in _NEVER_WAITED_FOR}
            pending = [task for task in asyncio.all_tasks(loop) if not task.done() and task not in spared]
            if not pending:
                return any(not task.done() for task in spared)
            for task in pending:
                task.cancel()
            _, left = loop.run_until_complete(asyncio.wait(pending, timeout=_UNWIND_WAIT))
            if left and not warned:
                warned = True
                if self._left_unwinding:  # stop() has said so
                    continue
                logger.warning("%d coroutines ignore their cancellation after stop(); the queue's event "
                               "loop closes when they have returned", len(left))

    def _wake(self) -> None:
        """Called by the core (any thread): the loop has jobs to take."""
        try:
            self.loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the loop is closed: the queue stopped
            pass
        except Exception:  # pragma: no cover - never into the core's caller (an enqueue that succeeded)
            logger.exception("tinymq could not wake its event loop")

    def _drain(self) -> None:
        """Take what the core has for the loop into ``_todo`` and see that a runner comes for each."""
        self._quiet = not logger.isEnabledFor(logging.DEBUG)
        if not self._closing and self._take():
            self._call_runners(at_once=True)

    def _take(self) -> bool:
        """Move a batch of the core's jobs (their slots taken) into ``_todo``: False when none."""
        taken = self.ready.hand_to_loop(_DRAIN_BATCH)
        if not taken:
            return False
        if taken == _DRAIN_BATCH:  # maybe more: after the callbacks queued meanwhile
            self.loop.call_soon(self._drain)
        return True

    def _call_runners(self, at_once: bool = False) -> None:
        """Wake idle runners, or start new ones, until one is on its way for every job in ``_todo``.

        ``at_once`` (outside any task: ``_drain``): an idle runner runs its next
        step here and now, not in the loop's next pass.
        """
        todo, idle = self._todo, self._idle
        while self._coming < len(todo):
            self._coming += 1
            while idle:
                waiting = idle.popleft()
                if at_once:
                    if waiting.resume():
                        break
                elif not waiting.done():
                    self.loop.call_soon(waiting.resume)
                    break
            else:
                _RunnerTask(self._run(), self.loop)

    async def _run(self) -> None:
        """A runner: runs attempts from ``_todo`` one after another; idles on a future when none.

        Runners outlive attempts, so an attempt costs no task of its own: a
        timeout or a cancel cancels the runner's task while it awaits that
        attempt, and the runner takes the CancelledError as the attempt's end.
        The attempt is run here, not in a coroutine of its own: one less per job.

        A cancel of the task an attempt ran on must never reach a later attempt. An attempt
        can cancel its task only through a cancel asked before it returned (``cancel_asked``)
        or a reference to the task (``asyncio.current_task()``) kept somewhere, strong or weak:
        a timer armed to cancel it, a variable. After each attempt the runner looks at both;
        if either is there, it ends (its task with it, cancelled if a cancel is still to come)
        and a new runner takes the next job.
        """
        todo, idle, attempts, dispatcher = self._todo, self._idle, self._attempts, self.dispatcher
        acquire, release = self._lock.acquire, self._lock.release  # (once per attempt: looked up once)
        marks = self.ready.cancel_marks  # empty unless a cancel waits for a job's holder
        task: _RunnerTask = asyncio.current_task()  # type: ignore[assignment]
        # Its references while nothing but the runner holds it, as counted here: this frame's, asyncio's
        # while it runs one of its steps, the count's own; after an attempt, the attempt's too
        # (_Attempt.task). Its weak ones: asyncio's registry of tasks, on some Pythons. Anything else
        # that holds it (a debugger too) costs a new runner, never a cancel in the wrong attempt.
        references, weak_references = getrefcount(task) + 1, weakref.getweakrefcount(task)
        references_of, weak_references_of = getrefcount, weakref.getweakrefcount
        coming = True  # woken or started for a job in _todo (counted in _coming)
        in_a_row = 0
        while not self._closing:
            if coming:
                coming = False
                self._coming -= 1
            if not todo and not self._take():
                waiting = _Wakeup(self.loop)
                idle.append(waiting)
                await waiting  # cancelled at shutdown: the runner ends
                coming = True
                continue
            if len(todo) > 1 and self._coming < len(todo) - 1 and not dispatcher._stopping:
                self._call_runners()  # the others in _todo must not wait for this attempt to end
            try:
                taken = todo.popleft()
            except IndexError:  # stop() closed the core, which took back what was left: none comes
                continue
            job, state, _ = taken
            context = JobContext(job, None) if state.takes_context else None  # its deadline: at the call
            # No deadline yet: a slow write of its start (attempt_starting) is not the function's time.
            attempt = _Attempt(job, state, context, task, monotonic(), _NO_DEADLINE)
            # Registered unless stop() began, in one step against stop()'s look at the attempts (which
            # comes after it set stopping and closed the core): it sees this one, or this one sees it.
            # (Not section(): as in _finished.)
            acquire()
            try:
                stopping = dispatcher._stopping  # (not the property: once per attempt)
                if not stopping:
                    attempts[attempt] = None
            finally:
                release()
            if stopping:
                # stop() began as it was popped: unstarted, back where close() takes it back (in this
                # call if it has closed already), counted running until then and ready from then, as
                # if the runner had never come to it. Nothing is reported: it never started. The runner
                # ends: no attempt starts once stop() began (nor does a runner call others for _todo).
                todo.appendleft(taken)
                self.ready.take_back_from_loop()
                return
            # Cancelled on its way here (from the core, through _todo): never run. A cancel from now
            # on finds the attempt registered above.
            if marks and self.ready.cancel_requested(job):
                if self._decide(attempt, "cancelled"):  # else a cancel() decided it: it reports it
                    self.ready.take_cancel(job)
                    if dispatcher.ledger is not None:  # as for a cancel of a running attempt
                        dispatcher.ledger.expired(job)
                    self._report(dispatcher.end_cancelled, job)
                self._finished(attempt, None, True)  # frees the slot (and tells a broker, returned_late)
                continue
            error: Optional[BaseException] = None
            ours = False  # the CancelledError that ended it came from a decision (timeout, cancel, stop)
            hooked = (dispatcher.ledger is not None or dispatcher.store is not None) and dispatcher.needs_hooks()
            attempt.running = True
            attempt.called = not hooked  # (no await before its call: a cancel() from now on finds it called)
            try:
                if hooked:
                    try:
                        writing = self.loop.run_in_executor(self._io, dispatcher.attempt_starting, job)
                    except RuntimeError:  # no new thread at interpreter exit (Python 3.12): written here
                        dispatcher.attempt_starting(job)
                    else:
                        await writing
                    # The timeout bounds the function: its clock starts now, after the store wrote the start.
                    attempt.started = monotonic()
                if state.timeout is not None:
                    attempt.deadline = attempt.started + state.timeout
                    if context is not None:
                        context.deadline = attempt.deadline
                    if attempt.deadline < self._expiry_at:
                        self._arm(attempt.deadline)
                fn = state.fn
                if hooked:
                    if self._forked_task is not None:  # resumed in a fork()ed child: none of the parent's jobs runs
                        raise asyncio.CancelledError
                    with section(self._lock):  # against cancel(): decided during the start write, it never runs
                        attempt.called = attempt.decided is None
                    if not attempt.called:
                        raise asyncio.CancelledError  # as if the decision had cancelled the start write
                awaitable = fn(job) if context is None else fn(job, context)
                if awaitable.__class__ is _COROUTINE or inspect.isawaitable(awaitable):
                    await awaitable
                elif isinstance(awaitable, _GENERATORS) or not dispatcher.found_async(job.type, fn):
                    raise TypeError(
                        f"async executor for {job.type!r} returned {awaitable!r}, not an awaitable")
                # Else a plain function found to return awaitables returned something else: done at
                # once, a success, as its return is in a worker thread.
            except asyncio.CancelledError as exc:
                ours = attempt.decided is not None
                if not ours:
                    error = exc
            except BaseException as exc:  # the attempt's failure, whatever it is
                error = exc
            attempt.running = False
            if attempt.cancel_requested and sys.version_info >= (3, 11):
                while task.cancelling():  # 3.11+: the runner is not being cancelled itself
                    task.uncancel()
            self._finished(attempt, error, ours)
            if (task.cancel_asked or references_of(task) != references
                    or weak_references_of(task) != weak_references):
                # The attempt may cancel this task later: the runner ends, and the next job is
                # another runner's (one already coming, an idle one woken, or a new one).
                if not self._closing and (todo or self._take()):
                    self._call_runners()
                return
            in_a_row += 1
            if in_a_row >= _DRAIN_BATCH:  # attempts that never suspend: let the loop breathe
                in_a_row = 0
                self._quiet = not logger.isEnabledFor(logging.DEBUG)
                await asyncio.sleep(0)

    def _finished(self, attempt: _Attempt, error: Optional[BaseException], ours: bool) -> None:
        """The attempt has ended (unwound): report what was not decided yet, its slot freed in the
        step that counts or places its job (get_stats() never sees the job in no place); else
        free the slot.

        The runner takes the type's next job itself (``_take``): the slot is freed without a hand-off.
        """
        # Past its deadline without the timer having fired: it blocked the loop; a timeout all the same.
        ended = monotonic()
        late = ended >= attempt.deadline
        attempts, lock, dispatcher = self._attempts, self._lock, self.dispatcher
        # (not ``with``: its enter and exit calls cost more, once per attempt; nor section(): only the
        # loop's own code ends an attempt, never a call from code the collector runs)
        lock.acquire()
        try:
            del attempts[attempt]
            decided = attempt.decided
            if decided is None:
                attempt.decided = "timed_out" if late else "returned"
                if dispatcher.store is not None or dispatcher.ledger is not None:  # reported off the loop
                    self._reporting += 1  # (in the step that decides it: no wait_finished sees neither)
            if self._waiting_for_end:
                self._all_finished.notify_all()
        finally:
            lock.release()
        if self._stop_when_idle:  # (not a call per attempt)
            self._halt_if_idle()
        state, job, ready = attempt.state, attempt.job, self.ready
        if (decided is None and error is None and not late and self._quiet
                and dispatcher.store is None and dispatcher.ledger is None):
            if not ready.loop_attempt_succeeded(state, ended - attempt.started, job):  # nothing else to tell
                self._report(dispatcher.end_cancelled, job)  # unless a cancel came as it ended: it wins
            return
        if decided is None:  # the slot is freed where the outcome places or ends the job
            report = self._report if dispatcher.store is None and dispatcher.ledger is None else self._report_end
            seconds = ended - attempt.started
            if late:
                report(dispatcher.async_timed_out, job, state, timeout_error(job, state), seconds, True)
            elif error is not None:
                report(dispatcher.attempt_failed, job, state, error, True, seconds)
            else:
                report(dispatcher.async_succeeded, job, state, seconds)
            return
        ready.release_state(state, False, core.LOOP)
        if not ours:  # it was cancelled (timeout, cancel, stop) and carried on
            logger.warning("job %s (%s): its coroutine ignored its cancellation (%s) and ran until it "
                           "returned; its slot was held until then", job.id, job.type, decided)
        dispatcher.returned_late(job)

    def _adopt(self, attempt: _Attempt, awaitable: Any) -> None:
        """On the loop: run the rest of an attempt a worker thread handed over (``adopt``), awaiting
        ``awaitable`` in a task of its own; or end it at once, decided meanwhile (it never runs)."""
        job = attempt.job
        if self._forked_task is not None:  # in a fork()ed child: none of the parent's jobs runs
            _discard(awaitable)
            return
        # Cancelled between the worker's slot and _attempts, where the cancel found it in neither:
        # decided here as cancel() would have (a cancel from adopt() on finds it registered).
        if self.ready.cancel_marks and self.ready.cancel_requested(job):
            if self.cancel(job._id, job, take=True) is not None:
                self._report(self.dispatcher.end_cancelled, job, True)
        if attempt.decided is not None:  # whoever decided it reported it; the slot is freed here
            _discard(awaitable)
            self._finished(attempt, None, True)
            self._after_own_task()
            return
        # Its outcome is taken from the task as it ends, however it ends: a task cancelled before
        # its first step never runs its coroutine's body.
        task = _RunnerTask(awaitable if awaitable.__class__ is _COROUTINE else _awaited(awaitable), self.loop)
        attempt.task = task
        attempt.running = True  # (a decision from now on cancels the task; one before came first, above)
        task.add_done_callback(functools.partial(self._adopted_ended, attempt))
        if attempt.deadline < self._expiry_at:
            self._arm(attempt.deadline)

    def _adopted_ended(self, attempt: _Attempt, task: "asyncio.Task[Any]") -> None:
        """On the loop: the task of an adopted attempt has ended (unwound)."""
        attempt.running = False
        error: Optional[BaseException] = None
        ours = False
        if task.cancelled():
            ours = attempt.decided is not None
            if not ours:
                error = asyncio.CancelledError()
        else:
            error = task.exception()
        self._finished(attempt, error, ours)
        self._after_own_task()

    def _after_own_task(self) -> None:
        """An attempt that no runner ran has freed its slot: a runner takes the job it may let start."""
        if not self._closing and (self._todo or self._take()):
            self._call_runners()

    def _arm(self, deadline: float) -> None:
        """Fire the deadline timer at ``deadline`` (earlier than it was armed for)."""
        if self._expiry is not None:
            self._expiry.cancel()
        self._expiry_at = deadline
        self._expiry = self.loop.call_at(deadline, self._expire_due)

    def _expire_due(self) -> None:
        """The earliest deadline known: expire every undecided attempt that is due, re-arm for the next."""
        if self._forked_task is not None:  # in a fork()ed child, whose attempts are the parent's
            return
        self._expiry, self._expiry_at = None, _NO_DEADLINE
        now = monotonic()
        earliest = _NO_DEADLINE
        for attempt in list(self._attempts):
            if attempt.decided is not None:
                continue
            if attempt.deadline <= now:
                self._expire(attempt)
            elif attempt.deadline < earliest:
                earliest = attempt.deadline
        if earliest < _NO_DEADLINE:
            self._arm(earliest)

    def _decide(self, attempt: _Attempt, how: str) -> bool:
        """Decide ``attempt`` as ``how``, unless it was decided already: True when this call did."""
        with section(self._lock):
            if attempt.decided is not None:
                return False
            attempt.decided = how
            self._notify_decided()
        return True

    def _notify_decided(self) -> None:
        """An attempt was decided: a wait_finished(undecided_only=True) may be over. Called with _lock held."""
        if self._waiting_for_end:
            self._all_finished.notify_all()

    def _expire(self, attempt: _Attempt) -> None:
        """The attempt's deadline (on the loop): it failed with JobTimeout; its task is cancelled."""
        if not self._decide(attempt, "timed_out"):
            return
        job, state = attempt.job, attempt.state
        if attempt.context is not None:
            attempt.context._cancel("timed out")
        self._cancel_running(attempt)
        self._report(self.dispatcher.async_timed_out, job, state, timeout_error(job, state),
                     monotonic() - attempt.started)

    def _report(self, report: Any, *args: Any) -> None:
        """Hand an outcome to the dispatcher: on the loop, or off it when a store or broker may block."""
        if self.dispatcher.blocks():
            self._off_loop(self._report_safely, report, args)
        else:
            self._report_safely(report, args)

    def _report_end(self, report: Any, *args: Any) -> None:
        """``_report`` of an attempt's own end, counted in ``_reporting`` (a store or a broker: off
        the loop); uncounted once reported, and a wait_finished told."""
        self._off_loop(self._report_counted, report, args)

    def _off_loop(self, run: Any, report: Any, args: Any) -> None:
        """``run(report, args)`` on the reporting thread, or here if no thread can start."""
        try:
            self._io.submit(run, report, args)
            return
        except RuntimeError:  # no new thread at interpreter exit (Python 3.12), or shut down
            pass
        run(report, args)

    def _report_counted(self, report: Any, args: Any) -> None:
        try:
            self._report_safely(report, args)
        finally:
            with section(self._lock):
                self._reporting -= 1
                self._notify_decided()

    @staticmethod
    def _report_safely(report: Any, args: Any) -> None:
        try:
            report(*args)
        except BaseException:  # (a store's KeyboardInterrupt too: in an io thread nothing else would see it)
            logger.exception("tinymq could not report an async attempt's outcome")

    def mark_forked(self, thread_id: int) -> None:
        """In a fork()ed child: if the loop's thread forked (an attempt's coroutine called os.fork()),
        the child runs no more of its parent's jobs, and the end of the forking attempt, when its
        coroutine returns or raises there, ends the child as a worker's function's does (see
        Dispatcher.leave_forked_child). (No lock: one held at the fork would never be released.)"""
        if thread_id != self._thread_id:
            return
        self._forked_task = asyncio.current_task(self.loop)  # (the task running that coroutine)
        # No job of the parent's is taken or started in the child (_run, _adopt), nor decided there
        # (_expire_due): only the forking attempt goes on, and others' ends report nothing. (An
        # instance attribute in place of the method: no look on the per-attempt path elsewhere.)
        self._closing = True
        self._finished = self._finished_in_forked_child  # type: ignore[method-assign]

    def _finished_in_forked_child(self, attempt: _Attempt, error: Optional[BaseException], ours: bool) -> None:
        """``_finished`` in a fork()ed child (see mark_forked): the forking attempt's end ends the child;
        another's reports nothing (the queue is the parent's)."""
        if attempt.task is self._forked_task:
            self.dispatcher.leave_forked_child(error)

    # --- from any thread ----------------------------------------------------

    def in_section(self) -> bool:
        """Whether this thread is inside a section of ``_lock`` (see Dispatcher.refuse_reentry)."""
        return owned(self._lock)

    def cancel(self, job_id: str, job: Any = None, take: bool = False,
               unregistered: bool = False) -> Optional[Any]:
        """Decide the running attempt of ``job_id`` (with ``job``: of that job) as cancelled and cancel
        its task: its job, or None.

        ``take`` (with ``job``): decided only if the cancel requested for ``job`` is taken
        (``ReadyQueue.take_cancel``, counted) in the same step, so that the job is counted
        cancelled before the attempt can end and free its slot (``_finished``).
        ``unregistered``: a cancel of a job registered under no id, counted so in the same step
        (``ReadyQueue.take_unregistered_cancel``)."""
        with section(self._lock):
            for attempt in list(self._attempts):
                if attempt.decided is None and attempt.job._id == job_id and (job is None or attempt.job is job):
                    if unregistered:  # (the core's lock inside this one)
                        if not self.ready.take_unregistered_cancel(attempt.job):
                            return None
                    elif take and not self.ready.take_cancel(attempt.job):  # (the core's lock inside this one)
                        return None
                    attempt.decided = "cancelled"
                    called = attempt.called
                    self._notify_decided()
                    break
            else:
                return None
        if called:  # its function was called: decided now, as at a timeout (not during its start write)
            self.ready.record_duration(attempt.state, monotonic() - attempt.started)
        self._cancel_task(attempt, "cancelled")
        return attempt.job

    def reinit_in_forked_child(self) -> None:
        """In a fork()ed child (no thread of the queue's there): ``_lock`` made free again, as one
        held at the fork would never be released there (see Dispatcher.refuse_in_forked_child)."""
        reinit_after_fork(self._all_finished)  # (its lock is _lock)

    def adopt(self, job: Any, state: Any, context: Optional[JobContext], awaitable: Any,
              started: float, deadline: float) -> bool:
        """From a worker thread: the loop runs the rest of an attempt of ``job`` whose function,
        called there at ``started``, returned ``awaitable``, its deadline and its context
        unchanged. The type's slot the worker took is the attempt's until it has unwound, as an
        async def's; the worker is free at once. False (nothing taken) once stop() has cancelled
        the loop's attempts.

        The worker has emptied its slot first: a cancel between the two finds the job in neither
        place and marks it (``_adopt`` looks); from here on cancel(), a timeout and stop() find
        it registered, as any attempt of the loop's, and only the loop frees its slot."""
        attempt = _Attempt(job, state, context, None, started, deadline)
        attempt.called = True
        with section(self._lock):  # (registered with its start queued: cancel_for_stop sees both or neither)
            if self._refusing:
                return False
            self._attempts[attempt] = None
            try:
                self.loop.call_soon_threadsafe(self._adopt, attempt, awaitable)
            except RuntimeError:  # the loop is closed: the queue stopped
                del self._attempts[attempt]
                return False
        return True

    def cancel_for_stop(self) -> List[Any]:
        """Decide every undecided attempt as stopped (not a failure) and cancel its task: their jobs.
        From now on a worker thread's hand-over is refused (``adopt``)."""
        with section(self._lock):
            self._refusing = True
            stopped = [a for a in list(self._attempts) if a.decided is None]
            for attempt in stopped:
                attempt.decided = "stopped"
            if stopped:
                self._notify_decided()
        for attempt in stopped:
            self._cancel_task(attempt, "the queue stopped")
        return [attempt.job for attempt in stopped]

    def stopped_attempts(self) -> int:
        """How many attempts that stop() cancelled have not returned yet (a coroutine that ignores
        its cancellation, or one still unwinding)."""
        with section(self._lock):
            return sum(1 for attempt in self._attempts if attempt.decided == "stopped")

    def _cancel_task(self, attempt: _Attempt, reason: str) -> None:
        if attempt.context is not None:
            attempt.context._cancel(reason)
        try:
            self.loop.call_soon_threadsafe(self._cancel_running, attempt)
        except RuntimeError:  # the loop is closed: the attempt ended with it
            pass

    def _cancel_running(self, attempt: _Attempt) -> None:
        """On the loop: cancel the runner's task while, and only while, it is inside ``attempt``."""
        if attempt.running and not attempt.cancel_requested:
            attempt.cancel_requested = True
            attempt.task.cancel_attempt()

    def wait_finished(self, deadline: Optional[float], undecided_only: bool) -> bool:
        """Wait until no undecided attempt runs (not ``undecided_only``: nor one that stop()
        cancelled, still unwinding) and the outcome of each that ended by itself is reported;
        False at ``deadline``.

        An attempt ``LOOP_LATE`` past its deadline that the loop has not decided (a coroutine
        blocks it) is decided here, as timed out: a timed-out attempt is never waited for, nor
        one that a cancel() decided.
        """
        while True:
            with section(self._lock):
                self._waiting_for_end += 1
                try:
                    while True:
                        attempts = list(self._attempts)
                        if not self._reporting and all(
                                a.decided in _NEVER_WAITED_FOR or (undecided_only and a.decided is not None)
                                for a in attempts):
                            return True
                        now = core.monotonic()
                        remaining = None if deadline is None else deadline - now
                        if remaining is not None and remaining <= 0.0:
                            return False
                        late = min((a.deadline for a in attempts if a.decided is None),
                                   default=_NO_DEADLINE) + LOOP_LATE - now
                        if late <= 0.0:
                            break  # decided below, without the lock
                        wait = late if remaining is None else min(remaining, late)
                        self._all_finished.wait(min(wait, threading.TIMEOUT_MAX))
                finally:
                    self._waiting_for_end -= 1
            self.expire_overdue(core.monotonic() - LOOP_LATE)

    def expire_overdue(self, before: float) -> None:
        """From any thread: decide, as timed out, every undecided attempt whose deadline is before
        ``before``: the loop's timer should have, so a coroutine blocks the loop. As ``_expire``
        does on the loop; the task is cancelled once the loop runs again, and the slot stays taken
        until the coroutine has returned. The failure is reported off this thread (``_io``)."""
        for attempt in list(self._attempts):
            if attempt.decided is not None or attempt.deadline >= before:
                continue
            if not self._decide(attempt, "timed_out"):
                continue
            job, state = attempt.job, attempt.state
            if attempt.context is not None:
                attempt.context._cancel("timed out")
            try:
                self.loop.call_soon_threadsafe(self._cancel_running, attempt)
            except RuntimeError:  # the loop is closed: the attempt ended with it
                pass
            args = (job, state, timeout_error(job, state), monotonic() - attempt.started)
            logger.warning("job %s (%s) is past its deadline and the event loop has not run for %.3gs: "
                           "a coroutine blocks it (a call that does not await)", job.id, job.type,
                           monotonic() - attempt.deadline)
            try:
                self._io.submit(self._report_safely, self.dispatcher.async_timed_out, args)
            except RuntimeError:  # shut down: the loop has closed
                self._report_safely(self.dispatcher.async_timed_out, args)

    def stop(self, wait_until: Optional[float], when_idle: bool = False) -> None:
        """Stop the loop (after what is queued on it); with ``wait_until`` (monotonic), wait until
        then at most for its thread, but not for coroutines that timed out or were cancelled
        before: never waited for. A coroutine that ignores its cancellation keeps the thread
        (``_end_tasks``), so this wait is part of stop()'s moment to unwind, not one of its own.

        ``when_idle``: only once no attempt runs (stop() awaited in one of them, which it cannot wait for).
        """
        try:
            self.loop.call_soon_threadsafe(self._stop_loop if when_idle else self._halt)
        except RuntimeError:
            return  # closed already
        if wait_until is not None:  # not for coroutines that timed out or were cancelled before (_settled)
            if not self._settled.wait(max(0.0, wait_until - monotonic())):
                self._left_unwinding = True  # said here, as stop() returns: _end_tasks does not say it again
                unwinding = self.stopped_attempts()
                step = self._shutdown_step
                if unwinding:
                    logger.warning("stop() returns with %s that ignore their cancellation still running; the "
                                   "queue's event loop closes when they have returned", counted(unwinding, "coroutine"))
                elif step == "reports" or self._reporting:  # (the shutdown's wait, or stop()'s: wait_finished)
                    logger.warning("stop() returns with outcomes of async jobs still being reported (a call to "
                                   "the store or to Redis has not returned); the queue's event loop closes "
                                   "once they are")
                elif step == "executor":
                    logger.warning("stop() returns with the queue's event loop waiting for its default executor "
                                   "(a loop.run_in_executor call has not returned); the loop closes when it has")
                elif step == "tasks":
                    logger.warning("stop() returns with tasks on the queue's event loop that ignore their "
                                   "cancellation still running; the loop closes when they have returned")
                else:  # none it cancelled: the loop has not come back from a call that does not await
                    logger.warning("stop() returns with the queue's event loop still blocked (a coroutine makes "
                                   "a call that does not await); the loop closes when that call returns")

    def _stop_loop(self) -> None:
        """On the loop: stop it once no attempt runs on it (``stop(when_idle=True)``)."""
        self._stop_when_idle = True
        self._halt_if_idle()

    def _halt_if_idle(self) -> None:
        """On the loop: after ``_stop_loop``, halt it once no attempt runs on it (those worker
        threads handed over included); each one's end calls this."""
        if self._stop_when_idle and not self._halting and not self._attempts:
            self._halt()


def timeout_error(job: Any, state: Any) -> JobTimeout:
    """The failure of an attempt of ``job`` that ran past its type's timeout (thread or task)."""
    timeout = state.timeout  # None if the executor was registered again without one
    limit = f"its {timeout:g}s timeout" if timeout is not None else "its deadline"
    return JobTimeout(f"job {job.id} ({job.type!r}) ran past {limit}")


def is_async_executor(fn: Any) -> bool:
    """Whether ``fn`` is run on the loop from its first attempt: an ``async def`` function, a
    ``functools.partial`` of one, a function wrapping one (``functools.wraps``), an object whose
    ``__call__`` is one (or a partial of such an object), or one marked
    (``inspect.markcoroutinefunction``). Anything else is known to return awaitables only
    once called (see ``Dispatcher.returned``)."""
    if fn.__class__ is types.FunctionType and not fn.__dict__:  # a plain function: its code says
        return bool(fn.__code__.co_flags & inspect.CO_COROUTINE)
    while isinstance(fn, functools.partial):  # (iscoroutinefunction sees through partials of functions only)
        fn = fn.func
    for target in (fn, getattr(fn, "__call__", None), inspect.unwrap(fn) if callable(fn) else None):
        if inspect.iscoroutinefunction(target):
            return True
    return False
