"""The Queue façade: register executors, enqueue, stats, join, stop.

Everything here is safe to call from any thread, executors included. The
per-job path (``enqueue`` of a ready job with no store) is one call into the
core; everything else takes the slow path below it.
"""
import asyncio
import dataclasses
import inspect
import logging
import os
import threading
import time
import types
import weakref
from datetime import timedelta
from typing import (TYPE_CHECKING, Any, Callable, Dict, Iterable, List, Optional, Protocol, Sequence, Set, Tuple,
                    TypeVar, Union)

from . import _shield
from ._dispatch import MAX_WORKERS, AttemptLedger, Dispatcher, End, FailureCallback, NoThreadLeft
from ._periodic import Periodic, ScheduleStats
from ._event_loop import is_async_executor
from ._pick_core import core
from ._shield import shield
from ._sections import reinit_after_fork, section
from .config import Config, ExecutorConfig, RateLimit, RetryConfig, _optional_seconds, _seconds
from .errors import (DuplicateJob, PersistenceError, QueueFull, QueueStopped, _buffer_full, _describe,
                     _exception_text, counted)
from .job import Job, Priority, RunAt, _as_priority, _as_type, _exact_hint, _validate
from .stats import ExecutorStats, QueueStats

if TYPE_CHECKING:  # (the store modules are imported when a store is set; tinymq.redis needs redis-py)
    from .persistence import Persistence
    from .redis import RedisBroker

__all__ = ["Queue"]

logger = logging.getLogger("tinymq")

F = TypeVar("F", bound=Callable[..., Any])
C = TypeVar("C", bound=FailureCallback)
_now = time.time


# Seconds ajoin() (and aenqueue waiting for room) waits in a thread at a time: how long a
# cancelled one may keep that thread.
_WAIT_SLICE = 0.1
# A new job's retries: CPython's one shared 0. Any other value (a retried job's, or one set by
# hand) goes through _validate, which checks it: an `is` costs the per-job path next to nothing.
_NO_RETRIES = 0
_DEFAULT_EXECUTOR_CONFIG = ExecutorConfig()  # immutable: one for every registration without a config
# The queue that took each store (by id(store), and a SQLitePersistence also by its file: another
# store opened on the file once the first is closed holds the same rows): a second queue must not
# load the rows of a live one.
_store_users: "weakref.WeakValueDictionary[Any, Queue]" = weakref.WeakValueDictionary()
# Its dispatcher, which outlives a queue garbage-collected while an attempt of it runs.
_store_dispatchers: "weakref.WeakValueDictionary[Any, Dispatcher]" = weakref.WeakValueDictionary()
_store_users_lock = threading.Lock()
# Every Queue of this process, for the after-fork hook (_after_fork_in_child).
_queues: "weakref.WeakSet[Queue]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """In a fork()ed child: the queues' claim locks, their schedules' locks and the store users' lock
    are made free again. One held at the fork by a thread of the parent would never be released
    there, where a queue's copy is still called (enqueue, which it refuses; stop()) and new queues
    take stores (set_persistence)."""
    global _store_users_lock
    _store_users_lock = threading.Lock()
    for queue in list(_queues):
        reinit_after_fork(queue._claim_lock)
        queue._periodic.reinit_in_forked_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
# How long set_persistence waits for a stopped queue's last workers to exit before it refuses the
# store: idle ones exit at once, but may not have yet when stop(wait=False) has just returned.
_HAND_OVER_WAIT = 0.5


def _store_keys(store: Any) -> List[Any]:
    """The keys of ``store`` in _store_users: its id and, for a SQLitePersistence, its file's."""
    from .persistence.sqlite import SQLitePersistence  # (imported here, when a store is set)

    file_key = getattr(store, "_key", None) if isinstance(store, SQLitePersistence) else None
    return [id(store)] if file_key is None else [id(store), ("file", file_key)]


def _holds(taken: Any, store: Any, key: Any) -> bool:
    """Whether a queue that took ``taken`` holds ``key`` of ``store`` (not a reused id)."""
    return taken is store if key == id(store) else (taken is not None and key in _store_keys(taken))


class _StoreLoading:
    """The queue's store while set_persistence() loads the real one: an enqueue meanwhile is refused.

    Without it, an enqueue from another thread during a long load_all would be
    accepted by the core and never saved.
    """

    def __init__(self, loading: Any) -> None:
        self._loading = loading

    def save(self, job: Job) -> None:
        raise PersistenceError(f"job {job.id} was not enqueued: set_persistence() is loading the queue's "
                               "store on another thread (enqueue once it has returned)")

    def save_many(self, jobs: Iterable[Job]) -> None:
        raise PersistenceError("the batch was not enqueued: set_persistence() is loading the queue's "
                               "store on another thread (enqueue once it has returned)")

    def delete(self, job_id: str) -> None:
        pass  # nothing was saved

    def _check_storable(self, job: Job) -> None:
        """A schedule registered meanwhile (every, cron) is checked against the store being loaded."""
        check = getattr(self._loading, "_check_storable", None)
        if check is not None:
            check(job)

    def __repr__(self) -> str:
        return "<a store set_persistence() is loading>"


# A plain function's answer, for the next registration of the same function (one handler for
# many job types): valid while the code and defaults that decided it are the same objects.
_plain_answers: "weakref.WeakKeyDictionary[Any, Tuple[Any, Any, Any, bool]]" = weakref.WeakKeyDictionary()


def _misplaced_in_queue(value: Any) -> str:
    """The TypeError message for ``Queue(value)`` where ``value`` is not a buffer size."""
    if isinstance(value, Config):
        instead = "pass a Config as Queue(config=...)"
    elif isinstance(value, ExecutorConfig):
        instead = "an ExecutorConfig is per job type: q.register_executor(job_type, fn, config)"
    else:
        instead = "pass a broker as Queue(broker=...)"
    return f"Queue's first argument is buffer_size (an int), got {value!r}; {instead}"


def _misplaced_in_executor(job_type: Any) -> str:
    """The TypeError message for ``q.executor(job_type)`` where ``job_type`` is not a str."""
    if isinstance(job_type, ExecutorConfig):
        instead = 'write @q.executor("email", config=...)'
    elif callable(job_type) and not isinstance(job_type, type):  # a bare @q.executor
        instead = 'write @q.executor("email"): the type of the jobs it runs, in parentheses'
    else:
        return f"job type must be a str, got {job_type!r}"
    return f"q.executor takes the job type first, got {job_type!r}; {instead}"


def _takes_context(job_type: str, fn: Callable[..., Any]) -> bool:
    """How to call executor ``fn``: True for ``fn(job, ctx)``, False for ``fn(job)``.

    Raises TypeError for what would never run its body (a generator
    function) or cannot be called with either.
    """
    if fn.__class__ is not types.FunctionType or fn.__dict__:  # __wrapped__, __signature__...
        return _inspect_takes_context(job_type, fn)
    known = _plain_answers.get(fn)
    keyword_defaults = tuple(fn.__kwdefaults__ or ())  # a copy: the dict may change in place
    if (known is not None and known[0] is fn.__code__ and known[1] is fn.__defaults__
            and known[2] == keyword_defaults):
        return known[3]
    answer = _inspect_takes_context(job_type, fn)
    _plain_answers[fn] = (fn.__code__, fn.__defaults__, keyword_defaults, answer)
    return answer


def _makes_awaitables(fn: Any) -> bool:
    """A ``@types.coroutine`` generator function: the generators it makes are awaitables."""
    code = getattr(inspect.unwrap(fn), "__code__", None)
    return code is not None and bool(code.co_flags & inspect.CO_ITERABLE_COROUTINE)


def _inspect_takes_context(job_type: str, fn: Callable[..., Any]) -> bool:
    for target in (fn, getattr(fn, "__call__", None)):
        if ((inspect.isgeneratorfunction(target) and not _makes_awaitables(target))
                or inspect.isasyncgenfunction(target)):
            raise TypeError(f"executor for {job_type!r} is a generator function ({fn!r}): calling "
                            "it would only create a generator, never run its body")
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    try:
        signature = inspect.signature(fn, follow_wrapped=False)  # what is called: a wrapper's own parameters
        if not any(p.kind in positional for p in signature.parameters.values()):
            signature = inspect.signature(fn)  # wrapper(*args, **kwargs): the function it wraps (functools.wraps) says
    except (TypeError, ValueError):  # some builtins have no signature: call them with the job
        return False
    required = [p for p in signature.parameters.values() if p.kind in positional and p.default is p.empty]
    for takes_context in (len(required) >= 2, len(required) < 2):
        try:
            signature.bind(*((None, None) if takes_context else (None,)))
            return takes_context
        except TypeError:
            continue
    raise TypeError(f"executor for {job_type!r} must be callable as fn(job) or fn(job, ctx); "
                    f"{fn!r} has the signature {signature}")


class BrokerLink(AttemptLedger, Protocol):
    """What a Queue built with ``broker=`` uses: the one seam to a shared backend.

    ``broker._attach(config, dispatcher)`` returns it (``tinymq.redis`` meets it).
    The Queue validates jobs as always, then hands these calls to the link
    instead of the core; as the dispatcher's ``AttemptLedger`` it also hears
    every attempt's outcome. Without a broker none of this runs.
    """

    def enqueue(self, jobs: Sequence[Job], block: bool, timeout: Optional[float]) -> None:
        """All of ``jobs`` or none (QueueFull, DuplicateJob, QueueStopped, TinyMQError)."""

    def stats(self, deadline: Optional[float] = None) -> QueueStats:
        """``deadline`` (monotonic): waited for the broker until then at most (TinyMQError after)."""

    def join(self, timeout: Optional[float]) -> bool: ...

    def cancel(self, job_id: str) -> bool:
        """``Queue.cancel`` for the shared queue (a job held by another process is cancelled there)."""

    def last_enqueue(self) -> str:
        """What names this thread's last ``enqueue`` call, for ``take_back``."""

    def take_back(self, job: Job, enqueued: str) -> bool:
        """Cancel ``job``, got in by the enqueue ``enqueued`` as its aenqueue caller gave up: as
        ``cancel``, and a dead job of its id that the enqueue replaced comes back."""

    def check_type(self, job_type: str) -> None:
        """ValueError, naming it, for a job type the shared backend cannot hold (before it is registered)."""

    def set_limit(self, job_type: str, limit: int, rate_limit: Optional[RateLimit] = None) -> None:
        """A registered executor's max_concurrent_jobs and rate_limit, as shared (global) limits."""

    def start(self, workers: int) -> None:
        """Start taking jobs for ``workers`` worker threads."""

    def ticks(self, queue: "Queue") -> Any:
        """The TickBackend (tinymq/_periodic.py) that fires each schedule's tick once across processes."""


def _check_job(job: object) -> Job:
    if not isinstance(job, Job):
        raise TypeError(f"expected a tinymq.Job, got {job!r}")
    return job


async def _uncancelled(future: "asyncio.Future[Any]") -> None:
    """Wait until ``future`` is done, whatever cancels the awaiting task meanwhile (its cancel
    is under way already: the caller raises CancelledError once this returns)."""
    while not future.done():
        try:
            await asyncio.shield(future)
        except asyncio.CancelledError:
            continue
        except Exception:
            return


def _check_loaded(store: Any, method: str, jobs: List[Any]) -> None:
    """PersistenceError, before any of them is placed, if what ``store.<method>()`` returned is not Jobs of
    distinct ids: one placed after another of its id would be refused midway, the rest left unplaced."""
    ids: Set[str] = set()
    for job in jobs:
        if not isinstance(job, Job):
            raise PersistenceError(f"{store!r}.{method}() returned {job!r}, not a tinymq.Job; nothing was loaded")
        job_id = job._id
        if type(job_id) is str:
            if job_id in ids:
                raise PersistenceError(f"{store!r}.{method}() returned two jobs with id {job_id!r}; "
                                       "nothing was loaded")
            ids.add(job_id)


class Queue:
    """An in-process job queue with strict priorities, delayed jobs and per-type limits.

    ``Queue(100)`` caps the ready buffer at 100 jobs; ``Queue(config=Config(...))``
    sets everything. Nothing runs before ``start_dispatcher``. With
    ``broker=tinymq.redis.RedisBroker(...)`` the queue is shared by every process
    that builds one on the same broker name (see docs/redis.md).
    """

    def __init__(self, buffer_size: Optional[int] = None, *, config: Optional[Config] = None,
                 broker: "Optional[RedisBroker]" = None) -> None:
        if isinstance(buffer_size, (Config, ExecutorConfig)) or callable(getattr(buffer_size, "_attach", None)):
            raise TypeError(_misplaced_in_queue(buffer_size))
        # Invariant (with a store): an id set before enqueue is in _claimed, guarded by
        # _claim_lock, from before its save until the core has it, so a duplicate is
        # refused before its save could overwrite the unfinished job's row.
        if config is None:
            config = Config() if buffer_size is None else Config(buffer_size=buffer_size)
        elif buffer_size is not None:
            raise ValueError(f"give buffer_size or config, not both (got buffer_size={buffer_size!r})")
        elif not isinstance(config, Config):
            raise TypeError(f"config must be a tinymq.Config, got {config!r}")
        self._config = config
        self._dispatcher = Dispatcher(config)
        self._ready = self._dispatcher.ready
        self._store: Any = None
        self._store_taken: Any = None  # the store set_persistence is loading or uses; under _store_users_lock
        self._claim_lock = threading.RLock()  # taken with section(); made free again in a forked child
        _queues.add(self)
        self._claimed: Set[str] = set()
        self._joined_before_start = False  # join() warned, once, that nothing runs jobs yet
        # With a broker (tinymq.redis.RedisBroker) the queue's state lives there: the link
        # enqueues, joins and counts through it, and the dispatcher reports attempts to it.
        self._broker = broker
        self._link: Optional[BrokerLink] = None
        if broker is not None:
            attach = getattr(broker, "_attach", None)
            if not callable(attach):
                raise TypeError(f"broker must be a tinymq broker (e.g. tinymq.redis.RedisBroker), got {broker!r}")
            self._link = attach(config, self._dispatcher)
            self._dispatcher.ledger = self._link
        self._periodic = Periodic(self)  # q.every / q.cron: see _periodic.py
        if self._link is not None:
            self._periodic.backend = self._link.ticks(self)
        # Dropping the queue without stop() still stops its threads, and says what was left.
        self._finalizer = weakref.finalize(self, self._dispatcher.stop_unreferenced)

    # --- executors -----------------------------------------------------------

    def register_executor(
        self, job_type: str, fn: Callable[..., Any], config: Optional[ExecutorConfig] = None
    ) -> None:
        """Run jobs of ``job_type`` with ``fn(job)`` (or ``fn(job, ctx)``); replaces any earlier one.

        ``fn`` returns normally on success and raises on failure. An ``async def``
        ``fn`` (or a partial of one, or an object with an ``async def __call__``)
        runs on the queue's event loop instead of a worker thread.
        """
        job_type = _as_type(job_type)
        if not callable(fn):
            raise TypeError(f"executor for {job_type!r} must be callable, got {fn!r}")
        takes_context = _takes_context(job_type, fn)
        if config is None:
            config = _DEFAULT_EXECUTOR_CONFIG
        elif not isinstance(config, ExecutorConfig):
            raise TypeError(f"config must be a tinymq.ExecutorConfig, got {config!r}")
        if self._link is not None:  # (else its limits could never be sent, and no job of the queue would run)
            self._link.check_type(job_type)
        local_config = config
        if self._link is not None and config.rate_limit is not None:  # the broker holds its one rate window
            local_config = dataclasses.replace(config, rate_limit=None)
        is_async = is_async_executor(fn)
        with shield():  # an executor registering one (its own, with a new rate limit) is not cut midway
            self._dispatcher.register(job_type, fn, local_config, takes_context, is_async)
            if self._link is not None:
                self._link.set_limit(job_type, config.max_concurrent_jobs, config.rate_limit)

    def executor(
        self, job_type: str, *, config: Optional[ExecutorConfig] = None, **options: Any
    ) -> Callable[[F], F]:
        """Decorator form: ``@q.executor("email", max_concurrent_jobs=5, timeout=10)``."""
        if not isinstance(job_type, str):  # else the mistake shows only when its jobs fail ("no_executor")
            raise TypeError(_misplaced_in_executor(job_type))
        if config is not None and options:
            raise ValueError(f"give config or options, not both (got {sorted(options)})")
        if options:
            config = ExecutorConfig(**options)

        def decorate(fn: F) -> F:
            self.register_executor(job_type, fn, config)
            return fn

        return decorate

    def on_failure(self, fn: C) -> C:
        """Call ``fn(job, reason, exc)`` for every job that leaves without success; returns ``fn``."""
        if not callable(fn):
            raise TypeError(f"failure callback must be callable, got {fn!r}")
        # Callbacks run synchronously, in a plain call; the same functions as is_async_executor's look at.
        for target in (fn, getattr(fn, "__call__", None), inspect.unwrap(fn)):
            if (inspect.iscoroutinefunction(target) or inspect.isgeneratorfunction(target)
                    or inspect.isasyncgenfunction(target)):
                raise TypeError(f"failure callback {fn!r} is an async def or generator function: calling "
                                "it would only create a coroutine or generator, never run its body")
        try:  # its own parameters: a wrapper (functools.wraps) is called, not the function it wraps
            signature = inspect.signature(fn, follow_wrapped=False)
        except (TypeError, ValueError):  # some builtins have no signature: taken as they are
            signature = None
        if signature is not None:
            try:
                signature.bind(None, None, None)
            except TypeError:  # else it would fail (logged) at every failure it was meant to report
                raise TypeError(f"failure callback must be callable as fn(job, reason, exc); {fn!r} has the "
                                f"signature {signature}") from None
        self._dispatcher.failure_callbacks.append(fn)
        return fn

    def start_dispatcher(self, workers: int = 1) -> None:
        """Start ``workers`` worker threads (and the scheduler and watchdog)."""
        if not isinstance(workers, int) or isinstance(workers, bool):
            raise TypeError(f"workers must be an int, got {workers!r}")
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if workers > MAX_WORKERS:
            raise ValueError(f"workers must be <= {MAX_WORKERS} (worker threads of one queue; more would exhaust "
                             f"the system's threads), got {workers}")
        try:
            self._dispatcher.start(workers)  # (NoThreadLeft; a RuntimeError of a second call goes out as is)
            try:
                if self._link is not None:
                    self._link.start(workers)
                self._periodic.start()
            except RuntimeError as exc:  # the system has no thread to give
                raise NoThreadLeft(f"could not start the threads of start_dispatcher(workers={workers}) "
                                   f"({exc}); the queue is stopped") from exc
        except NoThreadLeft:
            self.stop(wait=False)  # (half started, it would accept jobs that some threads never serve)
            raise

    # --- enqueueing ----------------------------------------------------------

    def enqueue(self, job: Job, *, block: bool = False, timeout: Union[float, timedelta, None] = None) -> Job:
        """Accept ``job``: ready now, or delayed until its ``run_at``.

        Every attribute the queue relies on is checked here, however it was set
        (TypeError/ValueError naming it). With the ready buffer full, raise
        QueueFull, or with ``block=True`` wait for room (at most ``timeout``
        seconds). Never a silent drop. An id of an unfinished job raises DuplicateJob.
        """
        if job.__class__ is not Job:
            _check_job(job)
        if timeout is not None:
            timeout = _optional_seconds("timeout", timeout)
        run_at = job.run_at
        job_type = job.type
        if (run_at.__class__ is not float or run_at - run_at != 0.0 or job_type.__class__ is not str
                or not job_type or job._tags is not None or job.retry_config.__class__ is not RetryConfig
                or job.retries is not _NO_RETRIES):
            run_at = _validate(job)  # the core checks priority itself
        if self._link is not None:
            job.priority = _as_priority(job.priority)
            with shield():  # an executor's enqueue is not cut midway by its interruption
                self._link.enqueue([job], block, timeout)
            return job
        # A job due at its creation (the default: the same float) is due now, whatever the clock did.
        # (Once an executor interrupts, the slow path shields the push: the pure core's is Python code.)
        if (self._store is None and not _shield.interrupting and (run_at is job.timestamp or run_at <= _now())
                and self._ready.push(job)):
            return job
        return self._enqueue_slow(job, run_at, block, timeout)

    def _enqueue_slow(self, job: Job, run_at: float, block: bool, wait: Optional[float],
                      withdrawn: Optional[threading.Event] = None) -> Job:
        with shield():  # an executor's enqueue is not cut midway by its interruption
            job_id = job._id
            if self._store is None or type(job_id) is not str:
                # No store (the core refuses duplicates), or an id the save makes (unique).
                return self._save_and_place(job, run_at, block, wait, withdrawn)
            self._claim([job_id])
            try:
                return self._save_and_place(job, run_at, block, wait, withdrawn)
            finally:
                self._unclaim([job_id])

    def _refuse_if_stopped(self) -> None:
        if self._dispatcher.stopping:
            raise QueueStopped("the queue is stopped")

    def _claim(self, job_ids: List[str]) -> None:
        """Reserve ids before a store saves them: a duplicate's save would overwrite the unfinished job's row."""
        with section(self._claim_lock):
            for job_id in job_ids:
                if job_id in self._claimed or self._ready.has_id(job_id):
                    raise DuplicateJob(f"a job with id {job_id!r} is already queued and unfinished")
            self._claimed.update(job_ids)

    def _unclaim(self, job_ids: List[str]) -> None:
        """The jobs were handed to the core (which knows their ids from now on), or refused."""
        with section(self._claim_lock):
            self._claimed.difference_update(job_ids)

    def _save_and_place(self, job: Job, run_at: float, block: bool, wait: Optional[float],
                        withdrawn: Optional[threading.Event] = None) -> Job:
        """Save ``job`` once (with a store), then place it; a job that is not placed is deleted again.

        ``withdrawn`` (from ``aenqueue``): the wait for room goes in ``_WAIT_SLICE`` steps and
        ends, the job not placed, once it is set.
        """
        store = self._store
        if store is not None:
            self._refuse_if_stopped()  # before the save: a refused job never touches the store
            try:  # saved before it is visible: a failure is the caller's error
                store.save(job)
            except PersistenceError:
                raise
            except Exception as exc:
                raise PersistenceError(f"could not save job {job.id} ({job.type!r}): {_describe(exc)}") from exc
        ends = None
        try:
            shield().raise_deferred()  # interrupted while it saved: the job is not placed, and not kept
            delay = run_at - _now()
            if run_at is not job.timestamp and delay > 0.0:
                job.priority = _as_priority(job.priority)  # the core reads it only when due
                ends = self._dispatcher.push_delayed(job, delay, accept=True)
            elif not self._ready.push(job) and not (block and self._wait_for_room(job, wait, withdrawn)):
                raise _buffer_full(self.config.buffer_size, job.id, job.type)
        except BaseException:
            if store is not None:
                self._dispatcher.undo_save(store, job.id)
            raise
        if ends is not None:  # jobs its push ended (evicted ones): once it is in, its save stands
            self._dispatcher.end_all(ends)
        return job

    def _wait_for_room(self, job: Job, wait: Optional[float], withdrawn: Optional[threading.Event]) -> bool:
        """Put ``job`` in the ready buffer once it has room: False after ``wait`` seconds, or once withdrawn."""
        if withdrawn is None:
            return self._ready.put(job, wait)
        deadline = None if wait is None else time.monotonic() + wait
        while not withdrawn.is_set():
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            step = _WAIT_SLICE if remaining is None else min(remaining, _WAIT_SLICE)
            if self._ready.put(job, step):
                return True
            if remaining is not None and remaining <= _WAIT_SLICE:
                return False
        return False

    def enqueue_delayed(self, job: Job, delay: Union[float, timedelta]) -> Job:
        """Enqueue ``job`` to run ``delay`` seconds from now (sets its ``run_at``)."""
        _check_job(job)
        job.run_at = _now() + _seconds("delay", delay)
        return self.enqueue(job)

    def enqueue_many(self, jobs: Iterable[Job]) -> List[Job]:
        """Accept all of ``jobs`` or none: one store transaction, one core call.

        Raises QueueFull, with nothing enqueued, when the ready ones do not all
        fit; DuplicateJob when an id is taken (or given twice in the batch).
        """
        batch = [job if job.__class__ is Job else _check_job(job) for job in jobs]
        ready_jobs: List[Job] = []
        delayed_jobs: List[Job] = []
        delays: List[float] = []
        now = _now()
        for job in batch:
            run_at = job.run_at
            job_type = job.type
            # As in enqueue(), and a Priority as is: the store saves every job before the core looks.
            if (run_at.__class__ is not float or run_at - run_at != 0.0 or job_type.__class__ is not str
                    or not job_type or job._tags is not None or job.retry_config.__class__ is not RetryConfig
                    or job.priority.__class__ is not Priority or job.retries is not _NO_RETRIES):
                run_at = _validate(job)
            if run_at is not job.timestamp and run_at > now:
                delayed_jobs.append(job)
                delays.append(run_at - now)
            else:
                ready_jobs.append(job)
        with shield():  # an executor's enqueue_many is not cut midway by its interruption
            if self._link is not None:
                if batch:
                    self._link.enqueue(batch, False, None)
            else:
                self._enqueue_batch(batch, ready_jobs, delayed_jobs, delays)
        return batch

    def _enqueue_batch(self, batch: List[Job], ready_jobs: List[Job], delayed_jobs: List[Job],
                       delays: List[float]) -> None:
        job_ids = [job._id for job in batch if type(job._id) is str] if self._store is not None else []
        if len(set(job_ids)) < len(job_ids):
            raise DuplicateJob(f"an id is given twice in this batch of {len(batch)} jobs; "
                               "none of the batch was enqueued")
        if not job_ids:
            try:
                self._save_and_place_many(batch, ready_jobs, delayed_jobs, delays)
            except DuplicateJob:  # the core's: say so when the batch itself repeats an id (no cost before)
                given = [job._id for job in batch if type(job._id) is str]
                if len(set(given)) < len(given):
                    raise DuplicateJob(f"an id is given twice in this batch of {len(batch)} jobs; "
                                       "none of the batch was enqueued") from None
                raise
        else:
            self._claim(job_ids)
            try:
                self._save_and_place_many(batch, ready_jobs, delayed_jobs, delays)
            finally:
                self._unclaim(job_ids)

    def _save_and_place_many(self, batch: List[Job], ready_jobs: List[Job], delayed_jobs: List[Job],
                             delays: List[float]) -> None:
        store = self._store
        if store is not None and batch:
            self._refuse_if_stopped()
            save_many = getattr(store, "save_many", None)
            saved: List[Job] = []  # what to take back if the batch fails half-way
            try:
                if save_many is not None:
                    save_many(batch)  # all-or-nothing by the hook's contract
                else:
                    for job in batch:
                        store.save(job)
                        saved.append(job)
            except Exception as exc:
                for job in saved:
                    self._dispatcher.undo_save(store, job.id)
                if isinstance(exc, PersistenceError):
                    raise
                raise PersistenceError(f"could not save a batch of {len(batch)} jobs: {_exception_text(exc)}") from exc
        try:
            shield().raise_deferred()  # interrupted while it saved: nothing is placed, and nothing kept
            ends = self._dispatcher.push_many(ready_jobs, delayed_jobs, delays)
            if ends is None:
                raise QueueFull(
                    f"the ready buffer has no room for {len(ready_jobs)} more jobs "
                    f"(buffer_size={self.config.buffer_size}); none of the batch was enqueued"
                )
        except BaseException:
            if store is not None:
                for job in batch:
                    self._dispatcher.undo_save(store, job.id)
            raise
        if ends:  # jobs its push ended (evicted ones): once the batch is in, its saves stand
            self._dispatcher.end_all(ends)

    # --- periodic jobs (tinymq/_periodic.py) ----------------------------------

    def every(self, interval: Union[float, timedelta], job_type: str, payload: Any = None, *,
              name: Optional[str] = None, priority: Priority = Priority.MEDIUM,
              first_at: Optional[RunAt] = None) -> str:
        """Enqueue a ``job_type`` job every ``interval`` seconds (monotonic clock); returns the name.

        The first tick is one interval after ``start_dispatcher`` (or after this
        call, if later), or at ``first_at`` (epoch seconds or an aware datetime).
        ``name`` defaults to ``job_type``; a name in use raises ValueError.
        A tick is skipped, and counted, while the previous tick's job is unfinished.
        """
        with shield():  # an executor's every() is not cut midway by its interruption
            return self._periodic.every(interval, job_type, payload, name, priority, first_at)

    def cron(self, expression: str, job_type: str, payload: Any = None, *, name: Optional[str] = None,
             priority: Priority = Priority.MEDIUM, tz: Any = None) -> str:
        """Enqueue a ``job_type`` job at each tick of cron ``expression``; returns the name.

        Needs ``croniter`` (``pip install 'tinymq[cron]'``). ``tz``: a tzinfo or an
        IANA name; None means UTC. ``name`` defaults to ``"<job_type> <expression>"``.
        """
        with shield():  # (as every)
            return self._periodic.cron(expression, job_type, payload, name, priority, tz)

    def unschedule(self, name: str) -> bool:
        """Stop schedule ``name``: True if it existed, False if not (like ``cancel``).

        No tick of it enqueues a job once this returns; a job it already enqueued still runs.
        """
        if not isinstance(name, str):  # (a schedule's name is a str: anything else is a mistake, not "absent")
            raise TypeError(f"schedule name must be a str, got {name!r}")
        with shield():  # (as every)
            return self._periodic.unschedule(str.__str__(name))  # (as every/cron keep it: its text)

    def schedules(self) -> List[ScheduleStats]:
        """The registered schedules, with their next tick and fired/skipped counts."""
        return self._periodic.schedules()

    # --- persistence ---------------------------------------------------------

    def set_persistence(self, store: "Persistence") -> None:
        """Use ``store`` from now on, and enqueue every job it holds (delayed ones keep run_at).

        Call it once, before the first enqueue: jobs enqueued earlier would not
        be durable, and a second store's jobs could run twice (RuntimeError).
        Jobs the store found crashed too often are reported to the failure
        callbacks registered so far (reason "crashed"), then marked dead in the
        store (or deleted): a process killed before that reports them at its next start.
        Recovery never drops a job for lack of room, and recovered delayed jobs
        are never evicted (nor are retries waiting for their backoff).
        """
        if self._link is not None:
            raise RuntimeError(f"set_persistence() cannot be used with a broker ({self._broker!r}): "
                               "the broker is the queue's durable store")
        for method in ("save", "delete", "load_all"):
            if not callable(getattr(store, method, None)):
                raise TypeError(f"persistence store must have a callable {method}(), got {store!r}")
        if self._dispatcher.stopping:
            raise QueueStopped("the queue is stopped")
        if self._store is not None:
            raise RuntimeError(f"set_persistence() was called already (with {self._store!r}); "
                               "a queue uses one store for its whole life")
        self._take_store(store)
        # From now on an enqueue is refused until the store is loaded, and every/cron check their
        # payloads against the store (under the schedules' lock, as check_store reads them).
        self._store = _StoreLoading(store)
        take_crashed = getattr(store, "take_crashed", None)
        try:
            self._periodic.check_store(store)  # a schedule registered earlier whose every tick the store would refuse
            self._refuse_if_enqueued()
            try:
                jobs = list(store.load_all())
            except Exception as exc:
                raise PersistenceError(f"could not load jobs from {store!r}: {_exception_text(exc)}") from exc
            _check_loaded(store, "load_all", jobs)
            self._refuse_if_enqueued()  # one that saw no store before _StoreLoading was set, and got in
            try:
                crashed = [] if take_crashed is None else list(take_crashed())
            except Exception as exc:
                raise PersistenceError(f"could not load jobs from {store!r}: {_exception_text(exc)}") from exc
            _check_loaded(store, "take_crashed", crashed)
        except BaseException:
            self._store = None
            with _store_users_lock:
                self._store_taken = None
                for key in _store_keys(store):
                    if _store_users.get(key) is self:
                        del _store_users[key]
                    if _store_dispatchers.get(key) is self._dispatcher:
                        del _store_dispatchers[key]
            raise
        self._store = store
        self._dispatcher.set_store(store)
        self._periodic.recovered(jobs)
        # Each job is counted in jobs_enqueued in the step that places it, or that counts its end:
        # get_stats() never sees a recovered job counted and nowhere.
        self._ready.accept(crashed, core.FAILED)
        # Every job is placed, or its end counted, before any end runs: a store raising as one ends
        # (end_all) leaves no job unended, nor any unplaced.
        dispatcher = self._dispatcher
        ends: List[End] = [(dispatcher.fail, (job, "crashed", None, core.FAILED, True)) for job in crashed]
        try:
            now = _now()
            for job in jobs:  # one due at its creation (the same float) is due now, whatever the clock did
                if job.run_at is not job.timestamp and job.run_at > now:
                    pushed_ends = dispatcher.push_delayed(job, job.run_at - now, evictable=False, accept=True)
                    if pushed_ends is not None:
                        ends.extend(pushed_ends)
                    continue
                try:
                    self._ready.accept_ready(job)
                except DuplicateJob:
                    raise
                except (TypeError, ValueError) as exc:  # e.g. a priority the store holds is not one
                    self._ready.accept([job], core.FAILED)
                    ends.append((dispatcher.fail, (job, "retries_exhausted", exc, core.FAILED, True)))
        finally:
            if ends:
                dispatcher.end_all(ends)
        if jobs:
            logger.info("recovered %d jobs from %r", len(jobs), store)

    def _refuse_if_enqueued(self) -> None:
        enqueued = self._ready.counters()[core.ENQUEUED]
        if enqueued:
            raise RuntimeError(f"set_persistence() must be called before the first enqueue; "
                               f"{counted(enqueued, 'job')} {'was' if enqueued == 1 else 'were'} enqueued without a store")

    def _take_store(self, store: Any) -> None:
        """RuntimeError if another queue that has not stopped uses ``store``, or its file (a store
        closed and opened again): its load_all would count that queue's running attempts as crashes
        and hand their jobs to this queue too. So until that queue's stop() has returned, and while
        any attempt of it still runs (one stop() gave up on, saved back as ready; one a stop() from
        the queue's own thread did not wait for): its job would run a second time at once."""
        with _store_users_lock:  # (the wait for a stopped queue's last workers is outside the lock)
            holders = [(key, _store_dispatchers.get(key)) for key in _store_keys(store)]
        for key, dispatcher in holders:
            if (dispatcher is not None and dispatcher is not self._dispatcher
                    and _holds(dispatcher.store, store, key) and dispatcher.wait_stopped(0)):
                dispatcher.attempts_ended(_HAND_OVER_WAIT)
        with _store_users_lock:
            if self._store_taken is not None:
                raise RuntimeError(f"set_persistence() was called already (with {self._store_taken!r}); "
                                   "a queue uses one store for its whole life")
            keys = _store_keys(store)
            for key in keys:
                other = _store_users.get(key)
                if other is not None and other is not self and _holds(other._store_taken, store, key):
                    if not other._dispatcher.wait_stopped(0):
                        raise RuntimeError(f"{store!r} is in use by another queue (its store: {other._store_taken!r}) "
                                           "whose stop() has not returned; a store serves one queue at a time "
                                           "(stop() that queue first, or open another file)")
                dispatcher = _store_dispatchers.get(key)
                if (dispatcher is not None and dispatcher is not self._dispatcher
                        and _holds(dispatcher.store, store, key)):
                    if not dispatcher.wait_stopped(0):
                        raise RuntimeError(f"{store!r} is the store of another queue that has not stopped; "
                                           "a store serves one queue at a time (stop() that queue first, or "
                                           "open another file)")
                    if not dispatcher.attempts_ended(0.0):
                        gave_up = dispatcher.gave_up_attempts()
                        running = (f"{gave_up} attempt(s) that its stop() gave up on still run" if gave_up
                                   else "attempts that its stop() did not wait for (called from the queue's "
                                        "own thread) still run")
                        raise RuntimeError(f"{store!r} is the store (or on the file) of a stopped queue of "
                                           f"which {running}; their jobs would run a second time at once. "
                                           "Try again once they have returned (stop() without a timeout, "
                                           "from another thread, waits for them)")
            for key in keys:
                _store_users[key] = self
                _store_dispatchers[key] = self._dispatcher
            self._store_taken = store

    # --- observing and stopping ---------------------------------------------

    @property
    def config(self) -> Config:
        """The queue's settings, fixed for its whole life (its core and broker keep them)."""
        return self._config

    @property
    def broker(self) -> "Optional[RedisBroker]":
        """The broker this queue's state lives in, or None for an in-process queue."""
        return self._broker

    def get_stats(self) -> QueueStats:
        """Sizes, counters and executors; with a broker, the shared queue's sizes and counters."""
        return self._stats_by(None)

    def _stats_by(self, deadline: Optional[float]) -> QueueStats:
        """get_stats(); with a broker, its read waits for Redis until ``deadline`` (monotonic) at most
        (half a second at least; None: the socket timeout), then raises TinyMQError."""
        if self._link is not None:
            return self._link.stats(deadline)
        # One read of the core and the delayed heaps, so the counters and every place agree.
        dispatcher = self._dispatcher
        (high, medium, low), counters, types, waiting_for_room, delayed = self._ready.snapshot(
            dispatcher.delayed, dispatcher.uncapped, now=core.monotonic())  # due ones count as ready
        enqueued, succeeded, failed, retried, timed_out, evicted, cancelled = counters
        return QueueStats(
            high_queue_size=high,
            medium_queue_size=medium,
            low_queue_size=low,
            delayed_jobs_count=delayed,
            max_delayed_jobs=self.config.max_delayed_jobs,
            worker_count=self._dispatcher.worker_count,
            executor_stats={job_type: ExecutorStats(*fields) for job_type, fields in types.items()},
            jobs_enqueued=enqueued,
            jobs_succeeded=succeeded,
            jobs_failed=failed,
            jobs_retried=retried,
            jobs_timed_out=timed_out,
            jobs_evicted=evicted,
            jobs_cancelled=cancelled,
            waiting_for_room=waiting_for_room,
        )

    def _executor_stats(self) -> Dict[str, ExecutorStats]:
        """get_stats()'s ``executor_stats`` (this process's executors, also with a broker), read here only."""
        return {job_type: ExecutorStats(*fields) for job_type, fields in self._ready.snapshot()[2].items()}

    def _attempt_durations(self) -> Dict[str, Tuple[Tuple[int, ...], float]]:
        """Per registered type: attempts per duration bucket (``ATTEMPT_DURATION_BUCKETS``, +inf) and their sum."""
        return self._ready.attempt_durations()

    def join(self, timeout: Union[float, timedelta, None] = None) -> bool:
        """Wait until every job enqueued before this call, retries and delayed jobs included, has finished.

        Jobs enqueued meanwhile (by other threads, schedules, or the jobs themselves) are
        not waited for. Returns False on timeout, or when the queue was stopped with jobs
        left: while a stop() is under way, once it has returned (the attempts it lets
        finish count). Raises RuntimeError in an executor or a failure callback of this
        queue, where it would wait for itself. With a broker: until the shared queue has
        no unfinished job.
        """
        wait = _optional_seconds("timeout", timeout)
        if self._dispatcher.waits_for_itself():
            raise RuntimeError("join() called from an executor or a failure callback of this queue "
                               "would wait for itself; call it from another thread")
        ticket = self._join_begin()
        try:
            return self._join_ticket(ticket, wait)
        finally:
            self._join_end(ticket)

    def _join_begin(self) -> Optional[int]:
        """Begin a join: the core's ticket for the jobs unfinished now (None: none are, or a broker
        joins the shared queue instead); ``_join_end`` ends it."""
        if self._link is not None:
            return None
        if not self._joined_before_start and not self._dispatcher.started:
            unfinished = self._ready.unfinished
            if unfinished and not self._dispatcher.stopping:  # a forgotten start_dispatcher() would hang here
                self._joined_before_start = True
                logger.warning("join() called before start_dispatcher(): nothing runs the queue's %s until "
                               "start_dispatcher() is called", counted(unfinished, "unfinished job"))
        return self._ready.join_begin()

    def _join_end(self, ticket: Optional[int]) -> None:
        """The join of ``ticket`` is over (its caller returned, or gave up)."""
        if self._link is None:
            self._ready.join_end(ticket)

    def _join_ticket(self, ticket: Optional[int], wait: Optional[float]) -> bool:
        """``join`` of the jobs ``ticket`` stands for, at most ``wait`` seconds."""
        deadline = None if wait is None else time.monotonic() + wait
        if self._join_unfinished(ticket, wait):
            return True
        if not self._dispatcher.stopping:
            return False  # its timeout
        # Stopped, or stopping: the core (or the link) gave up at the close, but the attempts
        # stop() lets finish may still end the jobs left; decided once stop() has returned.
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not self._dispatcher.wait_stopped(remaining):
            return False  # its timeout
        return self._join_unfinished(ticket, 0.0)

    def _join_unfinished(self, ticket: Optional[int], wait: Optional[float]) -> bool:
        """Wait until the jobs of ``ticket`` have finished (with a broker: until no job of the shared
        queue is unfinished); False on timeout or once the queue is closed."""
        if self._link is not None:
            return self._link.join(wait)
        return self._ready.join_wait(ticket, wait)

    def stop(self, wait: bool = True, timeout: Union[float, timedelta, None] = None) -> None:
        """Accept no more jobs, let running attempts finish (when ``wait``), stop all threads.

        With ``wait``, running attempts get at most ``timeout`` seconds (their own
        timeouts still apply); then, or at once with ``wait=False``, the contexts of
        those still running are cancelled. An attempt that stop() cancels is not a
        failure: not counted, retried or reported (a store keeps its job as ready).
        Idempotent: called while another thread's stop() runs, it returns once that
        one has (not from an executor or a failure callback: it would wait for
        itself). Jobs still queued are not run; a persistence store keeps them.
        """
        self._stop(wait, _optional_seconds("timeout", timeout), False)

    def _stop(self, wait: bool, limit: Optional[float], own_caller: bool) -> None:
        """``stop`` and ``astop``: schedules, then the dispatcher. ``own_caller``: astop's caller
        (not this thread) is one of the queue's threads, loop or failure callbacks."""
        self._dispatcher.refuse_reentry("stop()")  # (before the schedules stop: refused, it does nothing)
        with shield():  # an executor's stop() of a queue is not cut midway by its interruption
            deadline = None if limit is None else time.monotonic() + limit
            self._periodic.stop(limit if wait else 0.0)  # a tick's slow save is no running attempt
            if deadline is not None:
                limit = max(0.0, deadline - time.monotonic())
            self._dispatcher.stop(wait, limit, None, own_caller)
            # Stopped: the finalizer has nothing left to do, and it would keep the dispatcher,
            # and so the jobs still queued, alive (with the queue too, if a job holds it).
            self._finalizer.detach()

    def cancel(self, job_id: str) -> bool:
        """Cancel the unfinished job ``job_id``; False when no unfinished job has that id.

        A queued or delayed job is removed (and deleted from the store). A running
        attempt is cancelled: its context is cancelled, an async executor's task
        is cancelled, a thread with ``interrupt_on_timeout=True`` is interrupted;
        it is not retried. A job between two places (handed to a worker, becoming
        a retry) is marked, and whoever holds it next ends it. The job is
        reported with reason ``"cancelled"``; False when its end was decided first.

        With a broker, any process can cancel any job of the shared queue: one
        that another process holds is cancelled there within ``lease`` (it
        learns of it at its next fetch or heartbeat), and that process reports it.
        """
        if type(job_id) is not str:
            raise TypeError(f"job_id must be a str, got {job_id!r}{_exact_hint(job_id)}")
        with shield():  # an executor's cancel is not cut midway by its interruption
            if self._link is not None:
                return self._link.cancel(job_id)
            return self._dispatcher.cancel(job_id)

    async def aenqueue(self, job: Job, *, block: bool = False,
                       timeout: Union[float, timedelta, None] = None) -> Job:
        """``enqueue`` for async code: never blocks the event loop it is awaited on.

        A save to a store, or a wait for room (``block=True``), runs in the
        loop's default executor; a wait for room there ``_WAIT_SLICE`` seconds at a
        time. As with ``enqueue(block=True)``, a store saves the job once, before
        the wait, keeps it while it waits, and deletes it if it is not placed. Cancelled
        (``asyncio.wait_for``, a task cancel, once or more), it enqueues nothing:
        a wait for room gives up within a slice, and a job that got in just as the
        caller gave up (its save, or the room, came at that moment) is taken back
        with ``cancel`` (so reported ``"cancelled"``), unless it has run already; a
        store's row of a dead job with its id, which its save replaced, comes back (a
        broker's dead job that its enqueue replaced, too).
        """
        wait = None if timeout is None else _optional_seconds("timeout", timeout)  # checked on every path
        if self._store is None and self._link is None:
            try:
                return self.enqueue(job)  # no store: one call into the core, never blocking
            except QueueFull:
                if not block:
                    raise
        return await self._aenqueue_off_loop(job, block, wait)

    async def _aenqueue_off_loop(self, job: Job, block: bool, wait: Optional[float]) -> Job:
        """``aenqueue`` with a store or a broker, or a wait for room: placed in the loop's default
        executor. (Apart from ``aenqueue``: its closures' cells would cost every call, the fast one too.)"""
        loop = asyncio.get_running_loop()
        withdrawn = threading.Event()  # the caller gave up: no new try to place the job
        enqueued = [""]  # with a broker: what names the enqueue that placed it (take_back)

        def place() -> Optional[Job]:
            if self._link is not None:
                placed = place_in_link()
                enqueued[0] = self._link.last_enqueue()  # (this thread's: the call that got the job in)
                return placed
            if not block:
                return None if withdrawn.is_set() else self.enqueue(job)
            try:  # a store saves it once and keeps it while it waits, as enqueue(block=True)
                return self._enqueue_slow(_check_job(job), _validate(job), True, wait, withdrawn)
            except QueueFull:
                if withdrawn.is_set():
                    return None
                raise

        def place_in_link() -> Optional[Job]:
            if not block:
                return None if withdrawn.is_set() else self.enqueue(job)
            deadline = None if wait is None else time.monotonic() + wait
            while not withdrawn.is_set():  # the broker: each slice a new try (it keeps nothing between)
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                step = _WAIT_SLICE if remaining is None else min(remaining, _WAIT_SLICE)
                try:
                    return self.enqueue(job, block=True, timeout=step)
                except QueueFull:
                    if remaining is not None and remaining <= _WAIT_SLICE:
                        raise
            return None

        placing = loop.run_in_executor(None, place)
        try:
            placed = await asyncio.shield(placing)
        except asyncio.CancelledError:
            withdrawn.set()
            # The try under way ends within a slice (or its save), waited for whatever else
            # cancels the caller meanwhile, and so is the take-back of a job that got in.
            await _uncancelled(placing)
            placed = None if placing.cancelled() or placing.exception() is not None else placing.result()
            if placed is not None:  # it got in as the caller gave up: the caller was told it did not
                taking = loop.run_in_executor(None, self._take_back, job, enqueued[0])
                await _uncancelled(taking)
                taking.result()  # (its error, if any, rather than the cancel)
            raise
        return placed  # type: ignore[return-value]  # (None only once withdrawn)

    def _take_back(self, job: Job, enqueued: str) -> None:
        """Cancel ``job``, which got in as its ``aenqueue`` caller gave up: with a store, its save is
        undone as for a refused job (a dead job's row that it replaced comes back), not deleted;
        with a broker, the dead job that its enqueue ``enqueued`` replaced comes back."""
        if self._link is not None:
            with shield():  # (as cancel)
                self._link.take_back(job, enqueued)
        else:
            self._dispatcher.take_back(job)

    async def ajoin(self, timeout: Union[float, timedelta, None] = None) -> bool:
        """``join`` for async code: waits in the loop's default executor, not on the loop.

        It waits there ``_WAIT_SLICE`` seconds at a time: a cancelled ``ajoin`` gives its
        thread back within one slice (a thread left in ``join`` would hold the executor,
        and ``asyncio.run``'s exit, until the queue is idle). Raises RuntimeError where ``join``
        does (also through ``asyncio.run`` there) and awaited in an async executor of this queue.
        """
        wait = _optional_seconds("timeout", timeout)
        runner = self._dispatcher.loop_runner
        loop = asyncio.get_running_loop()
        if runner is not None and loop is runner.loop:
            raise RuntimeError("ajoin() awaited in an async executor of this queue would wait for "
                               "itself; await it from another event loop")
        # Decided here, in the caller's thread: join() below runs in a pool thread, which is
        # never one of this queue's threads or in a failure callback.
        if self._dispatcher.waits_for_itself():
            raise RuntimeError("ajoin() called from an executor or a failure callback of this queue "
                               "would wait for itself; call it from another thread")
        deadline = None if wait is None else time.monotonic() + wait
        ticket = self._join_begin()  # what it waits for is decided now, not at each slice
        try:
            while True:
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                step = _WAIT_SLICE if remaining is None else min(remaining, _WAIT_SLICE)
                stopped = self._dispatcher.wait_stopped(0)  # stop() had returned: join()'s False is final
                if await loop.run_in_executor(None, self._join_ticket, ticket, step):
                    return True
                if (remaining is not None and remaining <= _WAIT_SLICE) or stopped:
                    return False  # its timeout, or stopped with jobs left (join() says False at once)
        finally:
            self._join_end(ticket)

    async def astop(self, wait: bool = True, timeout: Union[float, timedelta, None] = None) -> None:
        """``stop`` for async code: waits in the loop's default executor, not on the loop.

        Awaited in one of this queue's executors (an ``asyncio.run`` in a thread
        executor too) or failure callbacks, it does not wait for running attempts
        (its own among them), like ``stop`` there.
        """
        limit = _optional_seconds("timeout", timeout)
        runner = self._dispatcher.loop_runner
        loop = asyncio.get_running_loop()
        # Decided here, in the caller's thread: _stop runs in a pool thread, which is never
        # one of this queue's threads or in a failure callback.
        own_caller = (runner is not None and loop is runner.loop) or self._dispatcher.waits_for_itself()
        await loop.run_in_executor(None, self._stop, wait, limit, own_caller)

    def __enter__(self) -> "Queue":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return (
            f"<tinymq.Queue buffer_size={self.config.buffer_size} ready={len(self._ready)} "
            f"delayed={self._dispatcher.delayed_count()} workers={self._dispatcher.worker_count}>"
        )
