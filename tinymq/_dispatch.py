"""The moving parts: worker threads, the delayed-job scheduler, the timeout watchdog.

Workers pull straight from the core's ReadyQueue and run the per-job loop in
the core (``core.run_worker``); they come back here only for what is not the
fast path: failures, retries, timeouts, persistence and callbacks.

Threads:
- ``workers`` worker threads; one stuck in a timed-out attempt is retired and
  replaced at once, so the pool keeps serving at its size.
- the scheduler sleeps until the earliest run_at or the earliest opening of
  a closed rate window (at most ``scheduler_interval``), and is woken at once
  by an earlier arrival or a type newly closed by its rate limit.
- the watchdog sleeps until the earliest attempt deadline and is woken when an
  attempt starts with an earlier one.
- the event loop (``_event_loop.LoopRunner``) runs async executors' attempts as
  tasks; their timeouts are the loop's own timers, which cancel the tasks (the
  watchdog decides one the loop has not, LOOP_LATE after its deadline: a coroutine
  blocks the loop).

Every wait here is on the monotonic clock: a delayed job or a retry is due
``delay`` seconds after it was scheduled, whatever the wall clock does
meanwhile (``run_at`` is only what the user sees and a store keeps).

Stopping: ``stop(wait=True)`` waits for running attempts (timeouts still
apply), then cancels the contexts of any still running; a cancelled attempt is
not a failure (its job stays stored for the next start). At interpreter exit
every running queue is stopped like ``stop(wait=True)`` from threading's exit
hook, the one ``concurrent.futures`` uses, so attempts finish before ``atexit``
handlers (a store's ``close``) run. Worker threads are daemon threads only so
that one stuck in an attempt that already timed out, which nothing waits for,
can never hold the interpreter open.
"""
import inspect
import logging
import math
import os
import sys
import threading
import time
import traceback
import types
import weakref
from collections import deque
from typing import (Any, Callable, ContextManager, Deque, Dict, Iterable, Iterator, List, NoReturn, Optional,
                    Protocol, Sequence, Set, Tuple)

from . import _shield
from ._pick_core import core
from ._sections import owned, refuse, reinit_after_fork, section
from ._shield import shield
from .config import Config, ExecutorConfig, _seconds
from ._event_loop import _UNWIND_PAST_TIMEOUT, _UNWIND_WAIT, LOOP_LATE, LoopRunner, timeout_error
from .context import JobContext
from .errors import JobTimeout, PermanentFailure, QueueStopped, RetryAfter, _describe, counted

__all__ = ["Dispatcher", "FailureCallback", "AttemptLedger", "MAX_WORKERS", "NoThreadLeft"]

logger = logging.getLogger("tinymq")
# What a failure callback returns when calling it did not run its body (a coroutine, a generator).
_BODIES_NEVER_RUN = (types.CoroutineType, types.GeneratorType, types.AsyncGeneratorType)

# Worker threads one queue starts: more would take the system's threads one by one, for minutes
# (a typo such as 10**9), before failing.
MAX_WORKERS = 10_000
# Seconds the watchdog sleeps while no attempt runs: an attempt that starts meanwhile wakes
# it only if it is due sooner, not at every start.
_IDLE_WATCH = 1.0
# Failure callbacks nested this deep on one thread (a callback's enqueue evicts a job, whose callback
# enqueues, ...): a failure decided deeper is reported once the callbacks above it return, one after
# another, so an unbounded chain never reaches Python's recursion limit midway through a job's end.
_NESTED_REPORTS = 16
# Frames kept free below Python's recursion limit: a failure decided with fewer left (a chain of
# callbacks begun deep in the stack) is reported as one decided past _NESTED_REPORTS is.
_STACK_RESERVE = 150

FailureCallback = Callable[[Any, str, Optional[BaseException]], None]


def _close_unrun(awaitable: Any) -> None:
    """An awaitable whose attempt ended before it could run: a coroutine is closed (no "never
    awaited" warning). Off the loop: anything else is left alone (a future is the loop's)."""
    if inspect.iscoroutine(awaitable):
        awaitable.close()


def _near_recursion_limit() -> bool:
    """Whether this thread's stack is within _STACK_RESERVE frames of Python's recursion limit
    (a walk of the stack: for the failure path, not a per-job one)."""
    try:
        sys._getframe(sys.getrecursionlimit() - _STACK_RESERVE)
    except ValueError:  # not that deep
        return False
    return True


def _log_safely(log: Callable[..., None], message: str, *args: Any) -> None:
    """Log a failed job's report without raising: a logging filter that raises (logging guards a
    handler's emit, not a filter), or logging out of stack (a RecursionError), would leave the job
    unfinished for good. What raised goes to stderr, as logging reports an emit that raised."""
    try:
        log(message, *args)
    except Exception:
        try:
            traceback.print_exc()
        except Exception:
            pass
# The end of a job decided in a step that decided others too: ``(method, args)`` (see Dispatcher.end_all).
End = Tuple[Callable[..., None], Tuple[Any, ...]]


def _taken_from(ends: Deque[End]) -> Iterator[End]:
    """The ends of ``ends`` in order, each taken out as it is run, those appended meanwhile included."""
    while ends:
        yield ends.popleft()


class AttemptLedger(Protocol):
    """Where a queue fed by a broker reports each attempt (``tinymq.redis`` meets it).

    Without one, the core's ReadyQueue is the whole truth. With one, the jobs
    in the core are attempts leased from the broker: the ledger records every
    outcome there, and the shared counters live there too.
    """

    def held_here(self) -> bool:
        """Whether this thread is inside one of the ledger's locked sections (see _sections)."""

    def started(self, job: Any) -> None:
        """Before the executor runs; raises when the attempt is no longer held (it is not run)."""

    def succeeding(self, job: Any) -> bool:
        """The attempt succeeded; called before its success is counted. False when it is no
        longer this process's (stop() handed it back while it ran, or this process was reaped:
        its job runs again elsewhere): it counts nowhere, and succeeded() is not called."""

    def succeeded(self, job: Any) -> None:
        """Counted as succeeded already (succeeding() said it is this process's)."""

    def expired(self, job: Any, timed_out: bool = False, duration: Optional[Tuple[Any, float]] = None) -> bool:
        """The watchdog (at its deadline: ``timed_out``) or cancel() decided the attempt; its
        function may still run. A timeout is counted (TIMED_OUT) by the ledger where its retry or
        failure is decided (``retry``, ``failing``), once it stands: a counter never goes down;
        so is its ``duration`` (type state, seconds) recorded (not if stop() hands it back first).
        False when the attempt is no longer this process's: its timeout counts nowhere. A
        timed-out attempt whose job a cancel ends (it came before the failure was decided) ends
        as cancelled only."""

    def returned_late(self, job: Any) -> None:
        """A timed-out attempt's function returned: its type slot is free."""

    def retry(self, job: Any, delay: float) -> Optional[str]:
        """The attempt failed; the job runs again ``delay`` seconds from now: counted RETRIED by
        the ledger (and TIMED_OUT, if it timed out), in the step that decides it ("retried"); as
        CANCELLED only when the ledger knows a cancel marked it (its broker ends it so, and
        reports it): "cancelled". None when the attempt is no longer this process's: counted
        nowhere."""

    def failing(self, job: Any, reason: str, exc: Optional[BaseException]) -> ContextManager[Optional[str]]:
        """The job failed for good: counted (where the counters are) inside, by the caller, if it
        yields ``reason`` (its timeout, if it timed out, counted by the ledger just before), then
        the failure callbacks run; "cancelled" when the broker ended the job as cancelled
        instead (a cancel reached it first), or the ledger knew a cancel marked it: counted per
        type by the ledger; None: the attempt is no longer this process's, its result is
        ignored."""

    def not_held(self, job: Any, exc: BaseException) -> bool:
        """True when ``exc`` is the ledger refusing the attempt at its start, or the attempt is
        no longer this process's (stop() handed it back while it ran): not a failure, uncounted."""

    def given_back(self, job: Any) -> None:
        """stop() cancelled the attempt: the job goes back, uncounted."""

    def runs_on(self, job_type: str, on_loop: bool, limit: int) -> None:
        """``job_type``'s executor was registered: async (``on_loop``, its attempts run on the
        event loop, holding no worker thread) or not, with ``max_concurrent_jobs`` ``limit``."""

    def stop(self, deadline: Optional[float] = None) -> None:
        """The dispatcher stopped: give back what was not started, and leave (by ``deadline``,
        a monotonic time, if given: stop()'s timeout)."""


def _unwinding_deadline(stop_by: Optional[float]) -> float:
    """When stop() stops waiting for the coroutines it cancelled to unwind (time.monotonic): a
    moment after it cancelled them, and never much past its own timeout's end ``stop_by``: a
    coroutine that ignores its cancellation keeps its slot and the loop, not the caller of stop()."""
    now = time.monotonic()
    unwound_by = now + _UNWIND_WAIT
    if stop_by is not None:
        unwound_by = min(unwound_by, max(stop_by, now) + _UNWIND_PAST_TIMEOUT)
    return unwound_by


class NoThreadLeft(RuntimeError):
    """start_dispatcher could not start all its threads: the Queue stops, and this is raised."""


# Why a queue garbage-collected without stop() stops (see Dispatcher.stop_unreferenced).
_UNREFERENCED = "garbage-collected without stop()"
# Dispatchers that may still have work at interpreter exit (see _stop_at_exit).
_live: "weakref.WeakSet[Dispatcher]" = weakref.WeakSet()
_exit_hook_lock = threading.Lock()
_exit_hook_registered = False


def _stop_at_exit() -> None:
    """Threading's exit hook: stop every live queue like ``stop(wait=True)``."""
    for dispatcher in list(_live):
        try:
            dispatcher.stop(True, None, "at interpreter exit")
        except Exception:  # pragma: no cover - a bug; stop the others all the same
            logger.exception("tinymq could not stop a queue at interpreter exit")


def _after_fork_in_child() -> None:
    """In a fork()ed child the one thread is the one that forked: a worker of a queue whose function
    forked ends the child when that function returns there (see run_worker), and a queue's event loop
    whose coroutine forked when that attempt ends there (LoopRunner.mark_forked), instead of running
    their parent's jobs a second time."""
    forking_thread = threading.get_ident()
    for dispatcher in list(_live):
        dispatcher.mark_forked_worker(forking_thread)
        dispatcher.refuse_in_forked_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _register_exit_hook() -> None:
    global _exit_hook_registered
    with _exit_hook_lock:
        if _exit_hook_registered:
            return
        # Threading runs its exit hooks last registered first, and concurrent.futures.thread
        # registers one when first imported, which shuts every thread pool (the loop's default
        # executor and its tinymq-io pool among them). Imported here, whatever the user imported
        # before, its hook is registered before ours and so runs after it: stop() still has those
        # pools to finish and record the attempts running at exit.
        import concurrent.futures.thread  # noqa: F401
        try:
            # Runs before threading joins non-daemon threads and before atexit handlers.
            threading._register_atexit(_stop_at_exit)  # type: ignore[attr-defined]  # private: not in typeshed
        except RuntimeError:  # the interpreter is shutting down already
            return
        _exit_hook_registered = True


class Dispatcher:
    """Owns the core structures and the threads that move jobs through them."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.scheduler_alarm = core.Alarm()  # armed in monotonic time (due jobs, rate windows)
        self.ready = core.ReadyQueue(config.buffer_size, self.scheduler_alarm)
        self.delayed = core.DelayedHeap(config.max_delayed_jobs)
        self.uncapped = core.DelayedHeap(0)  # retries and recovered jobs: never evicted
        self.watchdog_alarm = core.Alarm()  # armed in monotonic time (deadlines)
        self.failure_callbacks: List[FailureCallback] = []
        self.store: Any = None
        self.ledger: Optional[AttemptLedger] = None  # set once, before start, by a broker's Queue
        self._lock = threading.RLock()  # taken with section()
        # Guarded by _lock: the live worker slots, the lifecycle. Other threads read the sets of slots
        # without it, through list(...) or len(...): one C call, which no other thread cuts into.
        self._slots: Set[Any] = set()
        # Slots of workers whose attempt stop() gave up on (saved back as ready) and that have not
        # exited: until then the store is not free for another queue (gave_up_attempts).
        self._gave_up_slots: Set[Any] = set()
        # This queue's threads (join() there would wait for itself), by ident: one is this queue's own
        # while it is the very thread recorded (a reporting thread's ident is dropped only once joined,
        # and meanwhile a new thread of the program may have it: see own_thread_started).
        self._own_threads: Dict[int, threading.Thread] = {}
        # The scheduler's, watchdog's and loop's threads, and the worker threads that exited the pool
        # once stopping (guarded by _lock): what stop(wait=True) waits for to leave (_join_threads).
        self._service_threads: Dict[str, threading.Thread] = {}
        self._exited_workers: List[threading.Thread] = []
        self._started = False
        self._started_in: Optional[int] = None  # the pid whose threads serve the queue (see forked_copy)
        self._stopping = False
        self._stopped = threading.Event()  # the first stop() returned: later ones wait for it
        self._stop_cancels = False  # a stop() cancels the running attempts: no stop() waits for them
        self._worker_number = 0
        # stop() cancelling an attempt and its worker deciding the outcome take _stop_order,
        # so a job's store row ends as the one that came last says, never resurrected.
        self._stop_order = threading.RLock()  # taken with section()
        self._stop_cancelled: Set[Any] = set()  # jobs whose attempt stop() cancelled: not failures
        # Jobs whose end was decided after stop() began, by their attempt's own outcome or by a
        # cancel (end_cancelled): stop() no longer saves them back, their own store write stands.
        self._decided: Set[Any] = set()
        # Jobs whose attempt stop() cancelled, handled (saved back as ready, no holder left): a
        # cancel() that marks one afterwards ends it itself (see _stop_gave_back).
        self._stop_given_back: Set[Any] = set()
        # Jobs whose cancel takes them back (take_back): their end undoes their save. Each use is one
        # set operation (atomic), as fail() may run where _lock is held.
        self._taken_back: Set[Any] = set()
        self._workers_changed = threading.Condition(self._lock)  # a worker exited or was retired
        # Once stopping: the workers that may still be running, as last seen (see _workers_left).
        self._workers_at_stop: Optional[List[Any]] = None
        # Per thread: .depth > 0 while a failure callback runs; .later, the ends deferred past
        # _NESTED_REPORTS (fail), run by the fail() whose callbacks are the deepest allowed.
        self._in_callback = threading.local()
        # job type -> how it was registered: its retry_on, and to move a thread executor found to
        # return awaitables
        self._registered: Dict[str, Tuple[Callable[..., Any], ExecutorConfig, bool]] = {}
        # The types whose plain function was found to return awaitables (``returned``): that function.
        self._found_async: Dict[str, Callable[..., Any]] = {}
        self.loop_runner: Optional[LoopRunner] = None  # async executors' loop, made by start()
        _live.add(self)
        _register_exit_hook()

    # --- executors and persistence ----------------------------------------

    def register(self, job_type: str, fn: Callable[..., Any], config: ExecutorConfig,
                 takes_context: bool, is_async: bool = False, found: bool = False) -> None:
        """``found``: ``fn`` is a plain function found to return awaitables (``returned``)."""
        if config.interrupt_on_timeout:
            _shield.interrupting = True  # from now on, shield() protects tinymq's code in worker threads
        with section(self._lock):
            self._registered[job_type] = (fn, config, takes_context)
            if found:
                self._found_async[job_type] = fn
            else:
                self._found_async.pop(job_type, None)
        self.ready.configure(job_type, fn, config.max_concurrent_jobs, config.timeout,
                             takes_context, config.interrupt_on_timeout,
                             core.LOOP if is_async else core.THREADS, config.rate_limit)
        if self.ledger is not None:
            self.ledger.runs_on(job_type, is_async, config.max_concurrent_jobs)

    def _retry_on(self, job_type: str) -> Tuple[type, ...]:
        """The exception classes that ``job_type``'s failures are retried for (``retry_on``)."""
        with section(self._lock):
            registered = self._registered.get(job_type)
        return (Exception,) if registered is None else registered[1].retry_on

    def set_store(self, store: Any) -> None:
        with section(self._lock):
            self.store = store
            for slot in self._slots:
                self._set_hooks(slot)

    def _set_hooks(self, slot: Any) -> None:
        ledger = self.ledger
        if ledger is not None:
            slot.on_start, slot.on_success, slot.on_switch = ledger.started, ledger.succeeded, None
            slot.on_succeeding = ledger.succeeding
            return
        slot.on_succeeding = None
        store = self.store
        slot.on_start = self._mark_running if getattr(store, "mark_running", None) else None
        debug = logger.isEnabledFor(logging.DEBUG)
        slot.on_success = self._succeeded if (store is not None or debug) else None
        # A store that commits a worker's finished job and its next start together: one commit, not two.
        slot.on_switch = (self._switched if slot.on_start is not None
                          and getattr(store, "delete_and_mark_running", None) else None)

    def refresh_hooks(self, slot: Any) -> None:
        """Called by the worker loop now and then: picks up a changed log level."""
        with section(self._lock):
            self._set_hooks(slot)

    def call_store(self, what: str, method: Callable[..., Any], *args: Any) -> None:
        """Call the store; a failure is logged and the queue keeps working. A SystemExit counts as a
        failure (a sys.exit() in the store must not end the thread that called it); a
        KeyboardInterrupt, or another BaseException, is not swallowed."""
        try:
            method(*args)
        except (Exception, SystemExit):
            logger.exception("persistence %s failed for job %s", what,
                             getattr(args[0], "id", args[0]))

    def undo_save(self, store: Any, job_id: str) -> None:
        """Take back the save of a job that was not enqueued: the store's ``undo_save`` puts back a
        dead job's row that the save replaced; a store without it deletes the row."""
        undo_save = getattr(store, "undo_save", None)
        if undo_save is not None:
            self.call_store("undo_save", undo_save, job_id)
        else:
            self.call_store("delete", store.delete, job_id)

    def _mark_running(self, job: Any) -> None:
        store = self.store
        if store is not None:
            with shield():  # the attempt's deadline may pass while the store writes its start
                self.call_store("mark_running", store.mark_running, job)
                if self._stopping:
                    self._started_after_stop(job)

    def _started_after_stop(self, job: Any) -> None:
        """A start was written while stop() began: if stop() cancelled this attempt and saved its job
        back as ready meanwhile, that save must come last (not "running": no crash at the next start)."""
        with section(self._stop_order):
            if job in self._stop_cancelled and job not in self._decided:
                self._save_back(self.store, job)

    def _save_back(self, store: Any, job: Any) -> None:
        """stop() gave the running attempt of ``job`` up: its row back to ready, keeping its place in
        the store's order (``give_back``, when the store has it; else ``save``). No retry: it was
        not moved back."""
        give_back = getattr(store, "give_back", None)
        if give_back is not None:
            self.call_store("give_back", give_back, job)
        else:
            self.call_store("save", store.save, job)

    def _succeeded(self, job: Any) -> None:
        logger.debug("job %s (%s) succeeded", job.id, job.type)
        store = self.store
        if store is None:
            return
        if not self._stopping:
            self.call_store("delete", store.delete, job.id)
            return
        with section(self._stop_order):  # after stop()'s save-back of this job, if it made one
            self._decided.add(job)
            self.call_store("delete", store.delete, job.id)

    def _switched(self, finished: Any, job: Any) -> None:
        """A worker's job succeeded and its next starts: the store deletes one and marks the other running,
        in one commit, before ``finished`` counts as finished and before ``job`` runs."""
        logger.debug("job %s (%s) succeeded", finished.id, finished.type)
        store = self.store
        with shield():  # the next attempt's deadline may pass while the store writes
            if not self._stopping:
                self._switch(store, finished, job)
                if self._stopping:
                    self._started_after_stop(job)
                return
            with section(self._stop_order):  # after stop()'s save-back of the finished job, if it made one
                self._decided.add(finished)
                if job in self._stop_cancelled:  # stop() saved the next job back as ready: it stays so
                    self.call_store("delete", store.delete, finished.id)
                else:
                    self._switch(store, finished, job)

    def _switch(self, store: Any, finished: Any, job: Any) -> None:
        """``delete_and_mark_running``; when it raises, the finished job's delete is tried alone: its
        success stands."""
        try:
            store.delete_and_mark_running(finished.id, job)
        except (Exception, SystemExit):  # (as call_store)
            logger.exception("persistence delete_and_mark_running failed for jobs %s and %s", finished.id, job.id)
            self.call_store("delete", store.delete, finished.id)

    # --- lifecycle ---------------------------------------------------------

    def start(self, workers: int) -> None:
        with section(self._lock):
            if self._started:
                raise RuntimeError("start_dispatcher() was already called on this queue")
            if self._stopping:
                raise RuntimeError("the queue is stopped; it cannot be started again")
            self._started = True
            self._started_in = os.getpid()
            try:
                for _ in range(workers):
                    self._start_worker()
                self.loop_runner = LoopRunner(self)
                for name, target in (("loop", self.loop_runner.run), ("scheduler", self._schedule),
                                     ("watchdog", self._watch)):
                    self._service_threads[name] = self._start_thread(target, "tinymq-" + name)
            except RuntimeError as exc:  # the system has no thread to give
                raise NoThreadLeft(f"could not start the threads of start_dispatcher(workers={workers}) "
                                   f"({exc}); the queue is stopped") from exc

    @property
    def worker_count(self) -> int:
        """The live workers that were not retired: the pool's size while it runs (a retired worker
        has its replacement), 0 once every worker has exited after stop(). Without the lock (get_stats()
        from a __del__ the collector runs inside a section of this thread's: answered)."""
        return sum(1 for slot in list(self._slots) if not slot.retired)

    def _start_thread(self, target: Callable[..., None], name: str, *args: Any) -> threading.Thread:
        """Start a thread of this queue's. Called with _lock held."""
        thread = threading.Thread(target=self._run_thread, name=name, args=(target, *args), daemon=True)
        thread.start()  # (RuntimeError when the system has no thread to give)
        return thread

    def _run_thread(self, target: Callable[..., None], *args: Any) -> None:
        ident = threading.get_ident()
        self._own_threads[ident] = threading.current_thread()  # (one operation: atomic)
        try:
            target(*args)
        finally:
            with section(self._lock):
                self._own_threads.pop(ident, None)

    def own_thread_started(self) -> None:
        """Called in a thread that the queue started otherwise (the loop's reporting threads), as it
        starts: one of its own (``waits_for_itself``) until it exits. Recorded as the thread itself, not
        its ident alone: those threads exit with no step of their own, and their idents are dropped only
        once joined (``own_threads_ended``), after the loop's shutdown has waited for the coroutines that
        ignore their cancellation; meanwhile any new thread may have such an ident."""
        self._own_threads[threading.get_ident()] = threading.current_thread()  # (one operation: atomic)

    def own_threads_ended(self, threads: List[threading.Thread]) -> None:
        """The ``threads`` of ``own_thread_started`` have exited (joined): each forgotten, unless a
        worker of this queue's has its ident by now."""
        with section(self._lock):
            for thread in threads:
                ident = thread.ident
                if ident is not None and self._own_threads.get(ident) is thread:
                    del self._own_threads[ident]

    def mark_forked_worker(self, thread_id: int) -> None:
        """In a fork()ed child: mark the slot of the worker whose thread forked, if it is one of ours, or
        the loop's attempt that forked.
        (No lock: no other thread runs in the child, and one held at the fork would never be released.)"""
        for slot in list(self._slots) + list(self._gave_up_slots):
            if slot.thread_id == thread_id:
                slot.forked = True
        runner = self.loop_runner
        if runner is not None:  # or of its loop's thread, whose coroutine forked
            runner.mark_forked(thread_id)

    def refuse_in_forked_child(self) -> None:
        """In a fork()ed child: a started queue's copy accepts no job (QueueStopped), as none of its
        threads is there to run one, and join() waits for nothing. (No lock, as above.)"""
        if self._started_in is not None:
            self._stopping = True
            # Made free again: held at the fork by a thread of the parent, they would never be
            # released here, where the calls still made (get_stats(), cancel(), stop() at exit) take them.
            for lock in (self._workers_changed, self._stop_order):  # (the first's lock is _lock)
                reinit_after_fork(lock)
            runner = self.loop_runner
            if runner is not None:
                runner.reinit_in_forked_child()
            self.ready.close_forked()
            self.delayed.close_forked()
            self.uncapped.close_forked()

    def leave_forked_child(self, error: Optional[BaseException]) -> NoReturn:
        """A job's function fork()ed, and returned (or raised) in the child, whose only thread is the
        worker's: end the child as its own code would have, touching nothing of the queue, whose
        threads, locks and store are the parent's (its jobs would run a second time there)."""
        code = 0
        if isinstance(error, SystemExit):
            if isinstance(error.code, int):
                code = error.code
            elif error.code is not None:  # sys.exit("message"), as the interpreter shows it
                print(error.code, file=sys.stderr)
                code = 1
        else:
            logger.warning("a job's function fork()ed and %s in the child (pid %d): the child exits, "
                           "as the queue that ran the job is its parent's (end a child with os._exit())",
                           "returned" if error is None else f"raised {_describe(error)}", os.getpid())
            code = 0 if error is None else 1
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # (closed, or None): nothing more to write
                pass
        os._exit(code)

    def forked_copy(self) -> bool:
        """True in a process fork()ed from the one that started the queue, where none of its threads runs."""
        started_in = self._started_in
        return started_in is not None and started_in != os.getpid()

    def in_section(self) -> bool:
        """Whether this thread is inside a section of the dispatcher's locks or its loop's, or its
        broker link's or its SQLite store's: code the garbage collector runs here runs there (see _sections)."""
        runner = self.loop_runner
        if owned(self._lock) or owned(self._stop_order) or (runner is not None and runner.in_section()):
            return True
        ledger = self.ledger
        if ledger is not None and ledger.held_here():
            return True
        store_held = getattr(self.store, "_held_here", None)  # a SQLitePersistence's
        return store_held is not None and bool(store_held())

    def refuse_reentry(self, what: str) -> None:
        """RuntimeError (saying why) when this thread is inside a section of the dispatcher's or its
        loop's: ``what`` was called from code the collector ran there, and is refused before it does
        anything (a section it would take later, refused then, would leave it half done)."""
        if self.in_section():
            refuse(what)

    def stop_unreferenced(self) -> None:
        """Its queue was garbage-collected without stop(): stop like stop(wait=False). When the collector
        ran inside a section of this thread's (of one of the queue's own threads), on a thread of its own."""
        if not self.in_section():
            self.stop(False, None, _UNREFERENCED)
            return
        try:
            threading.Thread(target=self.stop, args=(False, None, _UNREFERENCED), name="tinymq-stop",
                             daemon=True).start()
        except RuntimeError:  # no thread at interpreter exit: the exit hook stops it
            pass

    def waits_for_itself(self) -> bool:
        """True in this queue's own threads and in its failure callbacks, where join() cannot return."""
        if getattr(self._in_callback, "depth", 0) > 0:
            return True
        own = self._own_threads.get(threading.get_ident())  # (current_thread() only for one of ours:
        return own is not None and own is threading.current_thread()  # no _DummyThread for a foreign one)

    def _start_worker(self, failure: Optional[Tuple[Any, Any, BaseException]] = None) -> None:
        """Start one worker thread, which first handles ``failure``. Called with _lock held."""
        slot = core.WorkerSlot()
        self._set_hooks(slot)
        self._slots.add(slot)
        self._worker_number += 1
        try:
            # (In a list it empties: the thread's arguments would keep the job alive as long as it runs.)
            self._start_thread(self._work, f"tinymq-worker-{self._worker_number}", slot, [failure])
        except BaseException:
            self._slots.discard(slot)  # no thread runs it: stop() must not wait for it
            raise

    def _replace_worker(self, failure: Optional[Tuple[Any, Any, BaseException]] = None) -> bool:
        """Start a worker in place of a retired one (``failure``: as _start_worker); False, logged, when
        the system has no thread to give: the pool is one short, and the caller handles ``failure``.
        Called with _lock held."""
        try:
            self._start_worker(failure)
        except RuntimeError:
            logger.exception("tinymq could not start a worker thread to replace a retired one; the "
                             "pool is one short")
            return False
        return True

    def _work(self, slot: Any, first: List[Optional[Tuple[Any, Any, BaseException]]]) -> None:
        try:
            failure = first.pop()
            if failure is not None:
                self.attempt_failed(*failure)
                failure = None
            _shield.set_worker_slot(slot)
            core.run_worker(self.ready, slot, self.watchdog_alarm, self)
        except JobTimeout:  # a late interruption landing in a retired worker on its way out
            logger.debug("a retired worker received its interruption late; it exits")
        except BaseException:
            logger.exception("tinymq worker crashed; starting a replacement")
            with section(self._lock):
                if not self._stopping and not slot.retired:
                    self._replace_worker()
        finally:
            with section(self._lock):
                self._slots.discard(slot)
                self._gave_up_slots.discard(slot)
                if self._stopping:
                    self._exited_workers.append(threading.current_thread())
                # What stop() waits for, once stopping: told once, by the last, not by each of thousands.
                last = self._stopping and not self._workers_left()
                if last:
                    self._workers_changed.notify_all()
            if last:  # the watchdog leaves once no worker is left to watch
                self.watchdog_alarm.wake()

    def stop(self, wait: bool = True, timeout: Optional[float] = None, why: Optional[str] = None,
             own_caller: bool = False) -> None:
        """Accept nothing more; with ``wait``, wait for running attempts (at most ``timeout``).

        Attempts still running afterwards have their contexts cancelled; such
        an attempt's failure is not counted (see ``attempt_failed``). Attempts
        that already timed out are never waited for. ``why`` (exit, garbage
        collection) makes the jobs left unrun a WARNING instead of INFO. ``own_caller``:
        the caller, which runs this in another thread (``astop``), is one of this queue's
        threads, its loop or a failure callback, as its own thread decided.
        """
        if self.forked_copy():
            # Its threads, attempts and store are the parent's: waiting for them would never end, and
            # saving back or reporting its jobs is the parent's work. This copy stopped accepting at
            # the fork (refuse_in_forked_child): nothing is left to do here.
            return
        with section(self._lock):
            first = not self._stopping
            self._stopping = True
        own_thread = self.waits_for_itself() or own_caller  # it cannot wait for itself
        released_later = False
        try:
            released_later = self._stop(first, own_thread, wait, timeout, why)
        finally:
            if first and not released_later:
                self._stopped.set()
        if not first and not own_thread:
            # Until the first one has stopped every thread (and a broker's link has given back
            # what this process holds): bounded, as this one cancelled, or waited for, what
            # the first one waits for.
            self._stopped.wait()

    def _stop(self, first: bool, own_thread: bool, wait: bool, timeout: Optional[float],
              why: Optional[str]) -> bool:
        """stop()'s work; True when a thread of its own releases the broker's link later (see
        _release_when_idle), and sets _stopped then."""
        stop_by = None if timeout is None else time.monotonic() + timeout  # (the ledger's bound too)
        self.ready.close()
        self.scheduler_alarm.wake()
        runner = self.loop_runner
        if wait and not own_thread:
            self._wait_for_attempts(stop_by)
        if not (wait and own_thread):
            self._cancel_attempts()
        if runner is not None and first:
            unwound_by = None
            if not own_thread:  # cancelled coroutines unwind before the loop stops, briefly
                unwound_by = _unwinding_deadline(stop_by)
                runner.wait_finished(unwound_by, undecided_only=False)
            runner.stop(unwound_by, when_idle=wait and own_thread)
        self.watchdog_alarm.wake()  # it leaves once no worker is left to watch
        if self.ledger is not None:
            if first and wait and own_thread:
                # The attempts it lets run (its caller's own too) settle first: released now, they
                # would go back to Redis and run again, their outcomes ignored there.
                threading.Thread(target=self._release_when_idle, args=(self.ledger, stop_by),
                                 name="tinymq-stop", daemon=True).start()
                return True
            self.ledger.stop(stop_by)
        elif first:
            self._report_unrun(why)
        if wait and not own_thread:
            self._join_threads(stop_by)
        return False

    def _join_threads(self, stop_by: Optional[float]) -> None:
        """stop(wait=True), once the attempts have ended or been given up on: wait (at most until
        ``stop_by``, and a moment past it) for the queue's threads that are leaving, so that none is
        left when stop() returns: the scheduler, the workers that have left the pool, the watchdog
        once no worker is left for it to watch (it decides the timeouts of those still running, and
        reports the failures it decides), and the loop's thread once it has shut the loop down (not
        while a coroutine that ignores its cancellation keeps it). Never a worker still in an attempt,
        nor one retired by a timeout: those are never waited for."""
        service = self._service_threads  # (any of them missing if start() found no thread to give)
        with section(self._lock):
            threads = [service.get("scheduler")]
            if not self._workers_left():
                threads.append(service.get("watchdog"))
            threads += self._exited_workers
        runner = self.loop_runner
        if runner is not None and runner.thread_done():
            threads.append(service.get("loop"))
        until = None if stop_by is None else max(stop_by, time.monotonic()) + _UNWIND_PAST_TIMEOUT
        for thread in threads:
            if thread is not None and thread is not threading.current_thread():
                thread.join(None if until is None else max(0.0, until - time.monotonic()))

    def _release_when_idle(self, ledger: AttemptLedger, stop_by: Optional[float]) -> None:
        """A stop(wait=True) called in one of the queue's own threads (or its loop), over a broker:
        wait for the running attempts as stop() does elsewhere (at most until ``stop_by``), cancel
        those still running, then give back what this process holds."""
        try:
            self._wait_for_attempts(stop_by)
            self._cancel_attempts()
            ledger.stop(stop_by)
        except BaseException:  # (nothing else would see it: the thread ends here)
            logger.exception("tinymq could not give back what this process holds at stop()")
        finally:
            self._stopped.set()

    def _wait_for_attempts(self, deadline: Optional[float]) -> None:
        """stop(wait=True): until the running attempts, threads' and coroutines', have ended, at
        most until ``deadline`` (monotonic; None: no bound)."""
        with section(self._lock):
            self._wait_for_workers(deadline, until_cancelled=True)
        if self.loop_runner is not None:
            self.loop_runner.wait_finished(deadline, undecided_only=True)

    def _cancel_attempts(self) -> None:
        """Cancel the attempts still running (stop's wait is over): saved back, not failures."""
        with section(self._lock):
            self._stop_cancels = True
            self._workers_changed.notify_all()
            slots = self._running_workers()
        for slot in slots:
            self._cancel_for_stop(slot)
        if self.loop_runner is not None:
            for job in self.loop_runner.cancel_for_stop():
                self._stopped_async(job)

    def _running_workers(self) -> List[Any]:
        """The slots of live workers that were not retired. Called with _lock held."""
        return [slot for slot in self._slots if not slot.retired]

    def _workers_left(self) -> bool:
        """Whether a live worker that was not retired is left. Called with _lock held, once stopping
        (no worker starts then).

        The workers running at the first call are listed once; each call pops those found exited or
        retired off its end and stops at the first still running: as thousands of workers exit,
        each asking, a call looks at one or two of them, not at every worker left.
        """
        left = self._workers_at_stop
        if left is None:
            left = self._workers_at_stop = self._running_workers()
        while left:
            slot = left[-1]
            if not slot.retired and slot in self._slots:
                return True
            left.pop()
        return False

    def _wait_for_workers(self, deadline: Optional[float], until_cancelled: bool = False) -> bool:
        """Wait until no live worker that was not retired is left (True), at most until ``deadline``
        (monotonic; None: no bound), or with ``until_cancelled`` until a stop() cancels the attempts.
        Called with _lock held, once stopping."""
        while self._workers_left():
            if until_cancelled and self._stop_cancels:
                return False
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0.0:
                return False
            self._workers_changed.wait(remaining)
        return True

    def _cancel_for_stop(self, slot: Any) -> None:
        """Cancel a running attempt; its job is saved back as ready now, before stop() returns.

        Not when the attempt fails: by then the store may be closed, and a row
        left "running" would count as a crash at the next start. With a store, a
        plain ``fn(job)`` attempt too: it has no context to cancel and runs on,
        but stop() has given up on it as on any other (its failure is no failure;
        a success still deletes its row). With a broker, stop()'s release hands
        such an attempt back, and its late outcome is ignored there.
        """
        job, context = slot.job, slot.context
        if job is None:
            return
        if context is None and self.ledger is not None:
            return
        with section(self._stop_order):
            if job in self._decided:
                return  # it ended meanwhile: its own outcome stands
            if job in self._stop_cancelled:
                return  # a stop() before this one (or the exit hook's) gave it up and saved it back
            self._stop_cancelled.add(job)
            store = self.store
            if store is not None:
                self._save_back(store, job)
        with section(self._lock):
            if slot in self._slots:  # (its worker has not exited already)
                self._gave_up_slots.add(slot)
        if context is not None:
            context._cancel("the queue stopped")

    def _stopped_async(self, job: Any) -> None:
        """stop() cancelled this async attempt: saved back as ready, not a failure."""
        if self.ledger is None and self.ready.take_cancel(job):  # a cancel() came first: it wins
            self.end_cancelled(job)  # (a broker's given-back job keeps its cancel mark in the broker)
            return
        with section(self._stop_order):
            self._stop_cancelled.add(job)
            store = self.store
            if store is not None:
                self._save_back(store, job)
        logger.info("job %s (%s): its attempt was cancelled by stop(); not counted as a failure",
                    job.id, job.type)
        if self.ledger is not None:
            self.ledger.given_back(job)
        else:
            self._stop_gave_back(job)

    def _stop_gave_back(self, job: Any) -> None:
        """The attempt of ``job`` that stop() cancelled was handled: its job rests nowhere (saved
        back as ready, with a store), so a cancel() that marks it finds no holder to end it. Noted
        first, then the mark looked for; cancel() marks first, then looks for the note
        (_cancel_marked): one of the two sees the other, and taking the mark is exclusive."""
        with section(self._stop_order):
            self._stop_given_back.add(job)
        if self.ready.take_cancel(job):
            self.end_cancelled(job)

    def _report_unrun(self, why: Optional[str]) -> None:
        unrun = self.ready.unfinished
        if unrun <= 0:
            return
        kept = ("a persistence store keeps them for the next start" if self.store is not None
                else "they are lost: the queue has no persistence store")
        jobs = counted(unrun, "accepted job")
        if why is None:
            logger.info("queue stopped with %s not run (%s)", jobs, kept)
        else:
            logger.warning("queue stopped %s with %s not run (%s); call stop() "
                           "(or use `with Queue() as q:`) to decide when", why, jobs, kept)

    @property
    def started(self) -> bool:
        return self._started

    @property
    def stopping(self) -> bool:
        return self._stopping

    def wait_stopped(self, timeout: Optional[float]) -> bool:
        """Wait until the first stop() has returned (its running attempts finished or cancelled).
        In a fork()ed copy, at once: its attempts and its threads are the parent's."""
        if self.forked_copy():
            return True
        return self._stopped.wait(timeout)

    def gave_up_attempts(self) -> int:
        """How many attempts that stop() gave up on (their jobs saved back as ready) still run, on a
        worker (until it has written the attempt's end and exited) or on the loop. While one does,
        the store stays this queue's: another queue's reload would run its job a second time."""
        running = len(self._gave_up_slots)
        runner = self.loop_runner
        if runner is not None:
            running += runner.stopped_attempts()
        return running

    def attempts_ended(self, timeout: float) -> bool:
        """Wait at most ``timeout`` seconds until no attempt of this stopped queue may still run: no
        worker that was not retired is left (a worker exits once its attempt's end is written, or
        once it has handed the attempt over to the loop), and no attempt runs on the loop but those
        never waited for (timed out, cancelled). Any such attempt keeps the store this queue's:
        another queue's reload would run its job a second time, whether stop() waited for it,
        gave it up, or was called from the queue's own thread and left it running."""
        deadline = time.monotonic() + timeout
        with section(self._lock):
            if not self._wait_for_workers(deadline):
                return False
        runner = self.loop_runner
        return runner is None or runner.wait_finished(deadline, undecided_only=False)

    # --- delayed jobs ----------------------------------------------------

    def push_delayed(self, job: Any, delay: float, evictable: bool = True, accept: bool = False,
                     release: Any = None) -> Optional[List[End]]:
        """Add an accepted job (with ``accept``, a new one, counted in the same step of the core),
        due ``delay`` seconds from now, to the delayed set. ``release``: the type whose slot the
        job's attempt held, freed in the same step (get_stats() never sees the job in neither).

        The heaps are keyed by monotonic due time. An evicted job fails, counted
        in the step that pushes it out. Only new delayed jobs count against
        ``max_delayed_jobs`` and can be evicted, and only those not due yet: a retry
        or a recovered job was accepted long ago and is never pushed out by a newcomer.

        Returns None, or the ends (``end_all``) of the jobs this push decided (evicted, due ones
        that could not go in, the job itself when a cancel came first): the caller runs them once
        the job is in, so a store raising as one ends neither leaves the others unended nor
        takes back the job's own save.
        """
        now = core.monotonic()
        due = now + delay
        heap = self.delayed if evictable else self.uncapped
        ends = None
        if heap.capacity and len(heap) >= heap.capacity:
            # A due job no longer counts as delayed, even one the scheduler has not moved
            # yet (or that waits for start_dispatcher): it goes to the ready buffer, not out.
            ends = self._due_ends(heap, now)
        try:
            if accept:  # counted and placed together (an evicted job with its count): never nowhere
                evicted = self.ready.accept_delayed(job, heap, due)
                if evicted is not None:
                    ends = self._add_end(ends, self.end_evicted, *evicted)
            else:
                pushed_out = self.ready.place_delayed(job, heap, due, release)
                if pushed_out is not None:  # (counted as it fails)
                    ends = self._add_end(ends, self.fail, pushed_out, "evicted", None, core.EVICTED)
        except BaseException:  # refused (a duplicate id...): the due jobs moved in all the same
            if ends is not None:
                self.end_all(ends)
            raise
        self.scheduler_alarm.wake_before(due)
        # A cancel that looked for it before it arrived here left a mark: whoever takes it out ends it.
        if self.ready.take_cancel_from(job, heap):
            ends = self._add_end(ends, self.end_cancelled, job)
        return ends

    def end_evicted(self, job: Any, counter: int) -> None:
        """Report a job that a push evicted, counted by the core in ``counter`` (``_end_evicted``)."""
        reason = "cancelled" if counter == core.CANCELLED else "evicted"
        self.fail(job, reason, None, counter, counted=True)

    def push_many(self, ready_jobs: List[Any], delayed_jobs: List[Any], delays: List[float]) -> Optional[Sequence[End]]:
        """Accept a batch (enqueue_many): the ready jobs into the buffer and each delayed one, due
        its ``delays`` entry from now, into the delayed set, in one step of the core (get_stats()
        never sees a job of it counted and nowhere). None, with no effect, when the ready ones
        do not all fit. As push_delayed does, due jobs go in first if the batch may evict; and as
        push_delayed, returns the ends of the jobs it decided, for the caller to run once the
        batch is in (``end_all``; empty: none)."""
        now = core.monotonic()
        heap = self.delayed
        ends = None
        if delayed_jobs and heap.capacity and len(heap) + len(delayed_jobs) > heap.capacity:
            ends = self._due_ends(heap, now)
        due = [now + delay for delay in delays]
        try:
            evicted = self.ready.push_many_delayed(ready_jobs, delayed_jobs, heap, due)
        except BaseException:  # refused (a duplicate id...): the due jobs moved in all the same
            if ends is not None:
                self.end_all(ends)
            raise
        if evicted is None:
            if ends is not None:  # (due jobs moved in all the same: their ends go on up)
                self.end_all(ends)
            return None
        if due:
            self.scheduler_alarm.wake_before(min(due))
        for job in delayed_jobs:  # (as in push_delayed: a cancel that came first left a mark)
            if self.ready.take_cancel_from(job, heap):
                ends = self._add_end(ends, self.end_cancelled, job)
        for job, counter in evicted:
            ends = self._add_end(ends, self.end_evicted, job, counter)
        return () if ends is None else ends

    @staticmethod
    def _add_end(ends: Optional[List[End]], end: Callable[..., None], *args: Any) -> List[End]:
        if ends is None:
            ends = []
        ends.append((end, args))
        return ends

    def end_all(self, ends: Iterable[End]) -> None:
        """Run every end of ``ends``, ``(method, args)`` for jobs decided in one step (``fail``,
        ``end_cancelled``...). Each job counts finished whatever its store raises (see ``fail``); what a
        store raises that is not swallowed (a KeyboardInterrupt) leaves no other job of the step
        unended: the first goes on up once all have ended, any later one is logged."""
        first: Optional[BaseException] = None
        for end, args in ends:
            try:
                end(*args)
            except BaseException as error:
                if first is None:
                    first = error
                else:
                    logger.exception("tinymq: another error while ending the jobs of one step "
                                     "(the first goes on up)")
        if first is not None:
            try:
                raise first
            finally:
                first = None  # (no cycle through this frame)

    def _schedule(self) -> None:
        interval = self.config.scheduler_interval
        delayed, uncapped, alarm, ready = self.delayed, self.uncapped, self.scheduler_alarm, self.ready
        monotonic = core.monotonic
        while not self._stopping:
            try:
                now = monotonic()
                for heap in (delayed, uncapped):
                    self.move_due(heap, now)
                ready.reopen_rate_limited(now)
                wake_at = now + interval
                for heap in (delayed, uncapped):
                    next_due = heap.next_run_at()
                    if next_due is not None and next_due < wake_at:
                        wake_at = next_due
                next_opening = ready.next_rate_opening()
                if next_opening is not None and next_opening < wake_at:
                    wake_at = next_opening
                alarm.sleep(wake_at - monotonic(), wake_at)
            except BaseException:  # a bug, or a store's BaseException as a due job fails: keep scheduling
                logger.exception("tinymq scheduler error")  # (no other thread moves the delayed jobs in)

    def move_due(self, heap: Any, now: float) -> None:
        """Move the due jobs of ``heap`` into the ready buffer, in one step of the core (get_stats()
        never catches one between the two); one that cannot go fails, loudly, as in make_ready."""
        ends = self._due_ends(heap, now)
        if ends is not None:
            self.end_all(ends)

    def _due_ends(self, heap: Any, now: float) -> Optional[List[End]]:
        """``move_due``, the ends of the jobs that could not go in left to the caller (``end_all``):
        None when there are none."""
        left = self.ready.move_due(heap, now)
        if not left:
            return None
        ends: List[End] = []
        for job, error in left:
            if error is None:  # a cancel of it came on its way here
                ends.append((self.end_cancelled, (job,)))
            else:  # e.g. a priority made invalid while the job waited
                ends.append((self.fail, (job, "retries_exhausted", error)))
        return ends

    def make_ready(self, job: Any, release: Any = None, retry: Optional[float] = None) -> None:
        """Move an accepted job into the ready buffer; one that cannot go fails, loudly.
        ``release``: the type whose slot the job's attempt held, freed in the step that places it.
        ``retry``: it is a retry (its delay, due by now), logged once placed, or as a cancel overtook
        it (before its end)."""
        try:
            placed = self.ready.requeue(job, release)
        except Exception as exc:  # e.g. a priority made invalid while the job waited (nothing freed yet)
            self.fail(job, "retries_exhausted", exc, release=release)
            return
        if retry is not None:
            self._log_retry(job, retry, placed)
        if not placed:  # a cancel of it came on its way here
            self.end_cancelled(job)

    def delayed_count(self) -> int:
        return len(self.delayed) + len(self.uncapped)

    # --- timeouts ----------------------------------------------------------

    def _watch(self) -> None:
        alarm = self.watchdog_alarm
        loop_looked = -math.inf
        while True:
            try:
                now = core.monotonic()
                earliest = math.inf
                slots = list(self._slots)
                if self._stopping:
                    with section(self._lock):
                        if not self._workers_left():
                            return  # timeouts apply until the last attempt has ended
                runner = self.loop_runner
                if runner is not None and now - loop_looked >= LOOP_LATE:
                    # The loop's own timer decides its attempts' deadlines; one it has not decided
                    # LOOP_LATE after is held by a coroutine blocking the loop: decided here.
                    loop_looked = now
                    runner.expire_overdue(now - LOOP_LATE)
                runner = None
                for slot in slots:
                    job = slot.expire(now)
                    if job is not None:
                        self._timed_out(slot, job)
                    elif slot.job is not None and not slot.expired and slot.deadline < earliest:
                        earliest = slot.deadline
                job = None  # the watchdog waiting keeps no job alive
                slots.clear()
                if earliest == math.inf:
                    earliest = now + _IDLE_WATCH
                alarm.sleep(earliest - core.monotonic(), earliest)
            except Exception:  # pragma: no cover - a bug; keep watching
                logger.exception("tinymq watchdog error")

    def _timed_out(self, slot: Any, job: Any) -> None:
        """The watchdog decided ``slot``'s attempt: fail it now, replace the stuck worker."""
        state = slot.type_state
        exc = timeout_error(job, state)
        counted = not (self._stopping and job in self._stop_cancelled)  # stop's: not counted
        seconds = core.monotonic() - slot.started
        # A broker records the duration, and counts the timeout, as it decides the attempt's end,
        # once it stands (not if stop() hands the attempt back first).
        if self.ledger is not None and not self.ledger.expired(job, counted, (state, seconds) if counted else None):
            counted = False  # no longer this process's attempt: its timeout counts nowhere
        try:  # slot.expire() has cancelled the attempt's context already
            if counted:
                if self.ledger is None:  # (else the ledger records and counts it as it decides the attempt's end)
                    self.ready.record_duration(state, seconds)
                    self.ready.count(core.TIMED_OUT, 1, job.type)
                logger.warning("job %s (%s) timed out; its thread is retired and replaced",
                               job.id, job.type)
        finally:  # whatever happened above, the job and the pool are looked after
            with section(self._lock):
                # The pool keeps its size while the old thread is stuck; the replacement
                # handles the failure first, so a slow callback never delays the watchdog.
                replaced = not self._stopping and self._replace_worker((job, state, exc))
                self._workers_changed.notify_all()  # stop() never waits for a retired worker
            if not replaced:
                self.attempt_failed(job, state, exc)

    def after_expired(self, slot: Any, error: Optional[BaseException]) -> None:
        """A timed-out attempt finally returned; its outcome was decided at the deadline.

        (run_worker dropped an interruption still pending before: see drop_own_interruption.)
        """
        if self.ledger is not None and slot.job is not None:
            self.ledger.returned_late(slot.job)
        logger.debug("a timed-out attempt returned late (%s); its result is ignored",
                     "ok" if error is None else _describe(error))

    def returned(self, job: Any, state: Any, result: Any, slot: Any) -> bool:
        """A thread executor's function returned ``result``, an awaitable or a generator: True
        when the rest of the attempt, awaiting it, is handed over to the event loop (``slot``
        emptied; the type's slot is that attempt's until its task has unwound): the worker is
        free at once, and the attempt is the loop's, as an async def's (its timeout, a cancel and
        stop() cancel its task there; its outcome is reported there).

        A function that returns an awaitable is an async executor that registration could not
        tell from a plain one: its later jobs are called on the loop, as an async def's are.
        False when the watchdog or a cancel decided the attempt first (the awaitable never
        runs: the worker ends the attempt as one of its own). Raises QueueStopped when stop()
        gave the attempt up first (the awaitable never runs: no failure, see attempt_failed).
        """
        if isinstance(result, (types.GeneratorType, types.AsyncGeneratorType)) and not inspect.isawaitable(result):
            if isinstance(result, types.GeneratorType):  # (a @types.coroutine generator is an awaitable)
                result.close()
            raise TypeError(f"executor for {job.type!r} returned a generator ({result!r}): its body "
                            "never runs; a job's function must do its work when called (or return an awaitable)")
        if not inspect.isawaitable(result):
            return False  # a plain function's return value means nothing
        with section(self._lock):
            registered = self._registered.get(job.type)
        if registered is not None and registered[0] is state.fn:  # not replaced meanwhile
            fn, config, takes_context = registered
            logger.info("executor %r for %r returned an awaitable: its jobs now run on the event loop",
                        fn, job.type)
            self.register(job.type, fn, config, takes_context, is_async=True, found=True)
        runner = self.loop_runner
        if runner is None:  # pragma: no cover - start() makes it before a worker can read it (under _lock)
            raise RuntimeError("the queue's event loop is not running")
        started, deadline, context = slot.started, slot.deadline, slot.context
        with shield():  # no interruption between the slot's end and the hand-over
            if slot.end():  # decided in the slot first (timed out, cancelled): its awaitable never runs
                _close_unrun(result)
                return False
            if not self._given_up_by_stop(job) and runner.adopt(job, state, context, result, started, deadline):
                return True
            # stop() gave the attempt up, or has cancelled the loop's attempts: it never runs.
            _close_unrun(result)
            if not self._given_back_at_stop(job):  # (the loop refuses only once stop() began)
                raise RuntimeError("the queue's event loop is closed")
            raise QueueStopped("the queue stopped before the awaitable its executor returned could run")

    def found_async(self, job_type: str, fn: Callable[..., Any]) -> bool:
        """``fn``, ``job_type``'s executor, is a plain function found to return awaitables: on the
        loop, a return of anything else is a success, as it is in a worker thread."""
        return self._found_async.get(job_type) is fn

    def _given_up_by_stop(self, job: Any) -> bool:
        """stop() cancelled the running attempt of ``job`` (saved back as ready, with a store)."""
        if not self._stopping:
            return False
        with section(self._stop_order):
            return job in self._stop_cancelled

    def _given_back_at_stop(self, job: Any) -> bool:
        """The awaitable a worker's attempt returned cannot run, as stop() gave the attempt up or
        cancelled the loop's attempts: True when stopping. Then, like an attempt stop() cancels,
        it is no failure: noted so (saved back as ready, with a store), and attempt_failed,
        handed QueueStopped, counts and reports nothing."""
        if not self._stopping:
            return False
        with section(self._stop_order):
            if job not in self._decided and job not in self._stop_cancelled:
                self._stop_cancelled.add(job)
                store = self.store
                if store is not None:
                    self._save_back(store, job)
        return True

    def new_context(self, job: Any) -> JobContext:
        """An attempt's context; the worker sets its deadline when it calls the function."""
        return JobContext(job, None)

    # --- async attempts (called by the LoopRunner, on the loop) -------------

    def needs_hooks(self) -> bool:
        """Whether an attempt must be announced before it runs (a store's mark_running, a broker)."""
        return self.ledger is not None or getattr(self.store, "mark_running", None) is not None

    def attempt_starting(self, job: Any) -> None:
        if self.ledger is not None:
            self.ledger.started(job)
        else:
            self._mark_running(job)

    def blocks(self) -> bool:
        """Whether reporting an outcome may block (a store or a broker): then not on the loop."""
        return self.store is not None or self.ledger is not None

    def async_succeeded(self, job: Any, state: Any, seconds: float) -> None:
        """An async attempt succeeded; its slot, still taken, is freed in the step that counts it."""
        if self.ledger is not None and not self.ledger.succeeding(job):  # not this process's: counted nowhere
            self.ready.release_state(state)
            self.ready.task_done(job)
            return
        if not self.ready.attempt_succeeded(state, seconds, job, False, True):
            self.end_cancelled(job)  # a cancel came as it ended: it wins
            return
        try:  # finished whatever the store raises
            if self.ledger is not None:
                self.ledger.succeeded(job)
            elif self.store is not None or logger.isEnabledFor(logging.DEBUG):
                self._succeeded(job)
        finally:
            self.ready.task_done(job)

    def async_timed_out(self, job: Any, state: Any, exc: JobTimeout, seconds: float, holding: bool = False) -> None:
        """An async attempt's deadline, ``seconds`` after its start: its task is being cancelled;
        the slot stays until it unwinds. ``holding``: it has unwound, its slot still taken (see attempt_failed)."""
        if self.ledger is None:
            self.ready.count(core.TIMED_OUT, 1, job.type)
            self.ready.record_duration(state, seconds)
        else:  # (recorded and counted as its end is decided, if it stands, as a thread's)
            self.ledger.expired(job, True, (state, seconds))
        logger.warning("job %s (%s) timed out; its task is cancelled", job.id, job.type)
        self.attempt_failed(job, state, exc, holding)

    def returned_late(self, job: Any) -> None:
        if self.ledger is not None:
            self.ledger.returned_late(job)

    # --- cancelling ----------------------------------------------------------

    def cancel(self, job_id: str) -> bool:
        """Cancel the unfinished job ``job_id``: queued, delayed, running, or between two of these.

        False when no unfinished job has that id, or when its end was decided
        first. The core marks the job in the step that finds it outside the
        ready buffer (``ReadyQueue.mark_cancel``); then it is ended here, where
        it rests, or by whoever moves it next: every move into a place (a
        heap, a worker's slot, the loop's attempts, the ready buffer) looks at
        the marks after arriving, and this looks at the places after marking,
        so one of the two sees the other. Taking a job out of a place is
        exclusive, so exactly one ends it.
        """
        self.refuse_reentry("cancel()")
        outcome, job = self.ready.mark_cancel(job_id)
        if outcome == core.CANCEL_LOST:
            return False
        if outcome == core.CANCEL_REMOVED:
            self.end_cancelled(job)
            return True
        if outcome == core.CANCEL_MARKED:
            self._cancel_marked(job)
            return True
        return self._cancel_unregistered(job_id)

    def take_back(self, job: Any) -> None:
        """``cancel`` of a job that got in as its enqueuer gave up (aenqueue): reported "cancelled",
        and its store row goes as for a refused job (``undo_save``), whenever its end comes."""
        self._taken_back.add(job)
        if not self.cancel(job._id):  # it has ended already (it ran): nothing to take back
            self._taken_back.discard(job)

    def _cancel_marked(self, job: Any) -> None:
        """End ``job``, marked by ``mark_cancel``, where it rests now; if it rests nowhere, it is
        between two places and its next holder ends it (``take_cancel``)."""
        # Looked for as the job itself: once it has ended, a new job may have its id. Out of a heap
        # in the step that counts it; a running attempt keeps its slot until its function returns.
        if self.ready.take_cancel_from(job, self.delayed) or self.ready.take_cancel_from(job, self.uncapped):
            self.end_cancelled(job)
            return
        # A running attempt is decided in the step that takes the cancel and counts it: its function
        # may return and its worker free the slot at once, and the job must be counted by then.
        taken = self._cancel_running(job._id, job, True)
        if taken is not None:
            self.end_cancelled(job, True)
        elif taken is None and self._stopping:
            with section(self._stop_order):
                given_back = job in self._stop_given_back  # (stop() cancelled its attempt: no holder)
            if given_back and self.ready.take_cancel(job):
                self.end_cancelled(job)

    def _cancel_running(self, job_id: str, only: Any = None, take: bool = False,
                        unregistered: bool = False) -> Any:
        """Decide the running attempt of ``job_id`` (``only``: of that job), on the loop or a worker,
        as cancelled: its job, or None. ``take`` (with ``only``, marked by ``mark_cancel``): decided
        only in the step that takes its cancel and counts it (``take_cancel``). ``unregistered``: of
        a job registered under no id, decided in the step that counts its cancel
        (``take_unregistered_cancel``)."""
        job = None
        if self.loop_runner is not None:
            job = self.loop_runner.cancel(job_id, only, take, unregistered)
        if job is None:
            job = self._cancel_thread_attempt(job_id, only, take, unregistered)
        return job

    def end_cancelled(self, job: Any, running: bool = False) -> None:
        """End a job whose cancel was taken (``mark_cancel``, ``take_cancel``), which the core counted as
        it took it: reported "cancelled".

        ``running``: its attempt was decided here while it runs; a broker frees the
        attempt's slot when it returns (``returned_late``), as after a timeout.
        """
        if running and self.ledger is not None:
            self.ledger.expired(job)
        if self._stopping:
            with section(self._stop_order):
                self._decided.add(job)  # after a save-back by stop(), if it made one: the delete comes last
        self.fail(job, "cancelled", None, core.CANCELLED, True)

    def _cancel_unregistered(self, job_id: str) -> bool:
        """``cancel`` of a job the core knows by no id, looked for in every place: one given its id behind
        the core's back (a Job.id set while another thread enqueues the job, which docs/api.md rules
        out). (Every other job has its id registered: given, made through Job.id, or made as its end
        was decided.) Taken out of its place, or its attempt decided, in the step of the core that
        counts it cancelled."""
        outcome, job = self.ready.mark_cancel(job_id, self.delayed, self.uncapped)
        if outcome == core.CANCEL_REMOVED:
            self.end_cancelled(job)
            return True
        if outcome == core.CANCEL_MARKED:  # enqueued with this id since the first look found it free
            self._cancel_marked(job)
            return True
        if outcome == core.CANCEL_LOST:
            return False
        job = self._cancel_running(job_id, unregistered=True)
        if job is None:
            return False
        self.end_cancelled(job, True)  # (a running attempt's type slot stays taken until it returns)
        return True

    def _cancel_thread_attempt(self, job_id: str, only: Any = None, take: bool = False,
                               unregistered: bool = False) -> Any:
        """Decide a worker's running attempt of ``job_id`` (``only``: of that job) as cancelled;
        retire and replace the worker. ``take``, ``unregistered``: as in ``_cancel_running``."""
        cancel_in = self.ready if take or unregistered else None
        for slot in list(self._slots):
            job = slot.job
            if job is None or job._id != job_id or (only is not None and job is not only):
                continue
            if slot.expire(math.inf, job, cancel_in, unregistered) is None:  # decided already (it ended, or timed out)
                continue
            with section(self._lock):
                if not self._stopping:  # its thread may run on: the pool keeps its size
                    self._replace_worker()
                self._workers_changed.notify_all()
            if slot.context is not None:
                slot.context._reason = "cancelled"
            started = slot.started
            if started:  # its function was called: decided now, as at a timeout (its return is ignored)
                self.ready.record_duration(slot.type_state, core.monotonic() - started)
            return job
        return None

    # --- failures --------------------------------------------------------

    def no_executor(self, job: Any, state: Any) -> None:
        self.fail(job, "no_executor", None, release=state)

    def cancelled_return(self, job: Any) -> Optional[BaseException]:
        """A ``fn(job, ctx)`` executor returned normally after its context was cancelled: when
        stop() cancelled it, that is no success (a cooperative executor stops early so), and
        the worker hands the attempt to attempt_failed as one stop() cancelled (the job stays
        saved back as ready, nothing is counted). None otherwise (a q.cancel decides at the
        success, as ever)."""
        if not self._stopping:
            return None
        with section(self._stop_order):
            if job not in self._stop_cancelled:
                return None
        return QueueStopped("its attempt returned after stop() cancelled it")

    def attempt_failed(self, job: Any, state: Any, exc: BaseException, holding: bool = False,
                       seconds: Optional[float] = None) -> None:
        """An attempt failed: schedule its retry, or fail the job for good.

        ``seconds``: its duration, recorded here unless stop() cancelled it, or it is no longer this
        process's (a broker's: not_held): then it is counted nowhere.

        An attempt that ``stop()`` cancelled is no failure: nothing is counted,
        retried or reported (``stop()`` saved the job back as ready, so the
        next start runs it without counting a crash).

        ``holding``: the caller still holds the attempt's slot of ``state``; it is freed in
        the step of the core that places the retry or counts the job's end, so get_stats()
        never sees the job in no place. A retry's store save comes before: the slot stays
        taken while it writes. Failure callbacks always run after it is freed.
        """
        if seconds is not None and self._stopping:
            with section(self._stop_order):
                if job in self._stop_cancelled:
                    seconds = None
        ledger = self.ledger
        if seconds is not None and ledger is None:
            self.ready.record_duration(state, seconds)
        release = state if holding else None
        if ledger is not None or self._stopping:  # (no stats to keep whole: freed at once)
            if release is not None:
                self.ready.release_state(release)
            release = None
        if ledger is None and self.ready.take_cancel(job, release):  # a cancel came as the attempt ended: it wins
            self.end_cancelled(job)
            return
        if self._stopping:
            with section(self._stop_order):
                cancelled = job in self._stop_cancelled
                if not cancelled:
                    self._decided.add(job)  # a failure of its own: stop() leaves its row alone
            if cancelled:
                logger.info("job %s (%s): its attempt was cancelled by stop() (%s); not counted as a "
                            "failure", job.id, job.type, _describe(exc))
                if self.ledger is not None:
                    self.ledger.given_back(job)
                else:
                    self._stop_gave_back(job)
                return
        if ledger is not None:
            if ledger.not_held(job, exc):
                self.ready.task_done(job)  # given back before it started, or by stop(): nothing to count
                return
            if seconds is not None:  # (after: an attempt no longer this process's is recorded nowhere)
                self.ready.record_duration(state, seconds)
            if self.ready.take_cancel(job):  # after stop's give-back and the broker's refusal, as before
                self.end_cancelled(job)
                return
        ends: Optional[Sequence[End]] = None
        interrupted: Optional[BaseException] = None  # what the retry's save raised that is not swallowed
        try:
            job.retries += 1
            job.last_error = _describe(exc)
            if not isinstance(exc, RetryAfter) and (
                    isinstance(exc, PermanentFailure)
                    or not isinstance(exc, self._retry_on(job.type))):
                self.fail(job, "permanent_failure", exc, release=release)
                return
            retry_config = job.retry_config
            if job.retries > retry_config.max_retries:
                self.fail(job, "retries_exhausted", exc, release=release)
                return
            if isinstance(exc, RetryAfter):  # checked again: its executor may have set it since
                delay = _seconds("RetryAfter seconds", exc.seconds)
            else:
                delay = retry_config.retry_delay(job.retries)
                if not math.isfinite(delay):  # NaN or inf (a RetryConfig subclass): no run_at to wait for
                    raise ValueError(f"retry_delay({job.retries}) of {retry_config!r} must be a finite "
                                     f"number of seconds, got {delay!r}")
            job.run_at = time.time() + delay  # what the user and a store see; the wait is monotonic
            if ledger is not None:  # the broker keeps the retry: a crash here never loses it
                decided = ledger.retry(job, delay)  # (counted there; None: no longer this process's, ignored)
                if decided is not None:
                    self._log_retry(job, delay, decided == "retried")
                self.ready.task_done(job)
                return
            self.ready.count(core.RETRIED, 1, job.type)
            if self.store is not None:  # (a cancel meanwhile marks it: the move below ends it, after the save)
                try:
                    self.call_store("save", self.store.save, job)
                except BaseException as error:  # (a KeyboardInterrupt) the retry is placed all the same, then it goes on up
                    interrupted = error
            placing, release = release, None  # (from here on the move below frees it, or fails the job)
            if delay <= 0.0:
                self.make_ready(job, placing, retry=delay)
            else:
                ends = self.push_delayed(job, delay, evictable=False, release=placing)
                self._log_retry(job, delay, not any(end == self.end_cancelled and args[0] is job
                                                    for end, args in ends or ()))
        except (Exception, SystemExit) as error:  # a job made unusable (its retry_config, a sys.exit() in it): fail it
            logger.exception("tinymq could not schedule the retry of job %r", job)
            self.fail(job, "retries_exhausted", error, release=release)
        if ends is not None:  # (the retry is placed: ended here, its own cancel too, never failed again)
            self.end_all(ends)
        if interrupted is not None:
            try:
                raise interrupted
            finally:
                interrupted = None  # (no cycle through this frame)

    @staticmethod
    def _log_retry(job: Any, delay: float, retried: bool) -> None:
        """Log a failed attempt whose job runs again: ``retried``; else a cancel overtook its retry
        (it came as the retry was placed, or its broker ends the attempt so), and the job ends as
        cancelled (its own report logs that too)."""
        if retried:
            logger.info("job %s (%s) failed (%s); retry %d of %d in %.3gs", job.id, job.type,
                        job.last_error, job.retries, job.retry_config.max_retries, delay)
        else:
            logger.info("job %s (%s) failed (%s); not retried: a cancel overtook its retry %d of %d, and it "
                        "ends as cancelled", job.id, job.type, job.last_error, job.retries,
                        job.retry_config.max_retries)

    def fail(self, job: Any, reason: str, exc: Optional[BaseException], counter: int = core.FAILED,
             counted: bool = False, release: Any = None) -> None:
        """The job leaves the queue without success: count, log, callbacks, store, finished.

        Counted per type too when its type has an executor: a job failed as
        ``no_executor`` counts only in the queue-wide counters. A cancel
        requested before this decision wins: the job ends as cancelled.
        ``counted``: the core decided its end and counted it already (an evicted or cancelled job).
        ``release``: the type whose slot the job's attempt held, freed in the step that counts it
        (before the callbacks run).
        """
        if self.ledger is None:
            if not counted:
                decided = self.ready.end(job, counter, release)
                if decided != counter:  # a cancel requested before this decision wins
                    reason, exc, counter = "cancelled", None, decided
            elif release is not None:
                self.ready.release_state(release)
            self.report_bounded(self._report_and_finish, job, reason, exc)  # (counted: reported now or soon)
        else:
            if release is not None:
                self.ready.release_state(release)
            if not counted and counter != core.CANCELLED and self.ready.decide_end(job):
                reason, exc, counter, counted = "cancelled", None, core.CANCELLED, True
            self.report_bounded(self._fail_through_ledger, self.ledger, job, reason, exc, counter, counted)

    def report_bounded(self, report: Callable[..., None], *args: Any) -> None:
        """Run ``report(*args)``, a failure's report (its callbacks, and what follows them: its store
        write, a broker's acknowledgement), now; or, from failure callbacks nested _NESTED_REPORTS
        deep on this thread (or fewer, once the stack is within _STACK_RESERVE frames of the recursion
        limit), once the callbacks above it return, after the reports deferred before it, run by the
        report whose callbacks are the deepest allowed: the stack stays bounded, and clear of the limit."""
        in_callback = self._in_callback
        depth = getattr(in_callback, "depth", 0)
        later = getattr(in_callback, "later", None)
        if later is not None and (depth >= _NESTED_REPORTS or _near_recursion_limit()):
            later.append((report, args))
            return
        if later is None and (depth == _NESTED_REPORTS - 1 or _near_recursion_limit()):
            # the reports its callbacks defer run here, in turn
            in_callback.later = later = deque()
            try:
                report(*args)
            finally:
                try:
                    self.end_all(_taken_from(later))  # (each one's callbacks may add more)
                finally:
                    in_callback.later = None
            return
        report(*args)

    def _report_and_finish(self, job: Any, reason: str, exc: Optional[BaseException]) -> None:
        self.report_failure(job, reason, exc)
        self._finish_failed(job, reason, exc)

    def _fail_through_ledger(self, ledger: AttemptLedger, job: Any, reason: str, exc: Optional[BaseException],
                             counter: int, counted: bool) -> None:
        """``fail`` of an attempt leased from a broker: its ``ledger`` decides, counts and keeps the job until
        its callbacks ran (``AttemptLedger.failing``), then it is finished."""
        with ledger.failing(job, reason, exc) as ended:
            if ended is not None:  # (else the attempt was handed back, or this process reaped: ignored)
                if ended != reason:  # the broker ended it so (a cancel from elsewhere), counted by the ledger
                    reason, exc, counted = ended, None, True
                if not counted:
                    self.ready.count(counter, 1, job.type)
                self.report_failure(job, reason, exc)
        self._finish_failed(job, reason, exc)

    def _finish_failed(self, job: Any, reason: str, exc: Optional[BaseException]) -> None:
        """A failed job's store write (deleted, or kept dead), then it is finished, whatever the store raises."""
        store = self.store
        if store is None:
            self.ready.task_done(job)
            return
        try:  # finished whatever the store raises (what call_store does not swallow goes on up)
            mark_dead = getattr(store, "mark_dead", None) if reason != "cancelled" else None
            if mark_dead is not None:
                self.call_store("mark_dead", mark_dead, job, reason, exc)
            elif self._taken_back and reason == "cancelled" and self._end_of_taken_back(job):
                self.undo_save(store, job.id)
            else:
                self.call_store("delete", store.delete, job.id)
        finally:
            self.ready.task_done(job)

    def _end_of_taken_back(self, job: Any) -> bool:
        try:
            self._taken_back.remove(job)
        except KeyError:
            return False
        return True

    def report_failure(self, job: Any, reason: str, exc: Optional[BaseException]) -> None:
        """Log a permanent failure and run the failure callbacks (a broker counts it itself).
        A cancel is logged at INFO: it was asked for, no alert should fire for it."""
        if reason == "cancelled":
            _log_safely(logger.info, "job %s (%s) was cancelled", job.id, job.type)
        elif exc is not None:
            _log_safely(logger.error, "job %s (%s) failed permanently (%s): %s", job.id, job.type, reason,
                        _describe(exc))
        else:
            _log_safely(logger.error, "job %s (%s) failed permanently (%s)", job.id, job.type, reason)
        in_callback = self._in_callback
        in_callback.depth = getattr(in_callback, "depth", 0) + 1
        try:
            for callback in list(self.failure_callbacks):
                try:
                    result = callback(job, reason, exc)
                    if isinstance(result, _BODIES_NEVER_RUN):  # (one on_failure could not tell at registration)
                        if not isinstance(result, types.AsyncGeneratorType):
                            result.close()  # (never started: no "never awaited" warning)
                        logger.error("failure callback %r returned %r for job %s: its body never runs; "
                                     "register a plain function", callback, result, job.id)
                    result = None
                except BaseException:  # whatever a callback raises, the queue carries on
                    _log_safely(logger.exception, "failure callback %r raised for job %s", callback, job.id)
        finally:
            in_callback.depth -= 1
