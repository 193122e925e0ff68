"""The pure-Python core: the readable specification of ``_core.pyx``.

Both cores offer the same names with the same behaviour; tests run against
both. The compiled core keeps the same state in C values and relies on the
GIL where this one takes ``self._lock`` (one step: ``_step``, which refuses a call
back into the core from code the garbage collector runs inside a step).

- ``ReadyQueue``: ready jobs in three FIFO levels (HIGH, MEDIUM, LOW) under one
  lock and one capacity, with per-type concurrency slots and rate limits: a job
  whose type is saturated, or whose rate window is closed, is passed over and
  keeps its place. Per level, a heap of the types that may run keyed by their
  oldest waiting job finds the next job in O(log types). It also keeps the
  queue's accounting (unfinished jobs for ``join``, their ids, lifetime
  counters, per-type counters and attempt durations), so a job is counted in
  the same critical section that makes it visible. It also keeps the cancel
  marks (``mark_cancel``): a registered job that a cancel finds outside the
  ready buffer is marked, and whoever holds it next takes the mark
  (``take_cancel``, ``requeue``, ``attempt_succeeded``) and ends it as cancelled.
- ``DelayedHeap``: a min-heap on (run_at, insertion order) with capped eviction.
- ``Alarm``: a latched wake-up for the one thread (scheduler, watchdog) that
  sleeps until a deadline.
- ``WorkerSlot`` and ``run_worker``: one worker's attempt, as the watchdog sees
  it, and the per-job loop.
- ``retry_delay``, ``new_job_id`` and ``first_id``.

To the core a job is any object with ``type`` (exactly a ``str``), ``priority``
(0, 1 or 2: LOW, MEDIUM, HIGH) and ``_id`` (None, or exactly a ``str``). The
core reads them once, when it is handed the job (push, put, push_many, accept,
requeue), keeps what it read, and never reads them again while it holds the job.
"""
import ctypes
import heapq
import itertools
import math
import operator
import os
import random
import sys
import threading
import time
import types
import weakref
from collections import deque
from typing import Any, Callable, Deque, Dict, Iterable, List, Optional, Sequence, Set, Tuple, Union

from ._sections import reinit_after_fork
from ._shield import DroppedInterruption, let_it_land
from ._unnamed import Unnamed
from .errors import DuplicateJob, JobTimeout, QueueStopped

__all__ = [
    "ReadyQueue", "DelayedHeap", "Alarm", "WorkerSlot", "TypeState",
    "run_worker", "retry_delay", "new_job_id", "first_id", "interrupt_thread",
    "drop_own_interruption", "monotonic",
    "ENQUEUED", "SUCCEEDED", "FAILED", "RETRIED", "TIMED_OUT", "EVICTED", "CANCELLED",
    "THREADS", "LOOP", "CANCEL_UNKNOWN", "CANCEL_REMOVED", "CANCEL_MARKED", "CANCEL_LOST",
    "TYPE_EVENTS", "ATTEMPT_DURATION_BUCKETS",
]

# Lifetime counters, by index into ReadyQueue.counters().
ENQUEUED, SUCCEEDED, FAILED, RETRIED, TIMED_OUT, EVICTED, CANCELLED = range(7)
# Who runs a type's attempts: worker threads, or the queue's event loop (async executors).
THREADS, LOOP = 0, 1
# What ReadyQueue.mark_cancel found: no unfinished job registered with the id; a ready job, taken
# out; a job elsewhere, marked for its holder; a job whose end is decided (another cancel won).
CANCEL_UNKNOWN, CANCEL_REMOVED, CANCEL_MARKED, CANCEL_LOST = range(4)
# A cancel mark: asked for, and not yet acted on by whoever holds the job; or its end is decided.
_REQUESTED, _ENDING = 0, 1
_N_COUNTERS = 7
# The events also counted per job type, in the order of the per-type counters ReadyQueue.snapshot() gives.
TYPE_EVENTS = (SUCCEEDED, FAILED, RETRIED, TIMED_OUT, CANCELLED)
# Upper bounds (seconds) of the attempt-duration histogram's buckets; a last one is +inf.
ATTEMPT_DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                            30.0, 60.0, 300.0)
_N_BUCKETS = len(ATTEMPT_DURATION_BUCKETS) + 1
_LEVELS = (2, 1, 0)  # HIGH, MEDIUM, LOW: the order in which levels are served
_UNLIMITED = 1 << 62  # the slot limit of a type with no executor yet
_INF = math.inf
_ALWAYS_OPEN = -math.inf  # TypeState.rate_open_at of a type whose rate window never closes now
_MAX_RATE_STARTS = sys.maxsize // 8  # the ring of a rate limit's latest starts fits in memory addresses
# Starts a rate limit's ring holds at first: it grows (to max_starts at most) only while its oldest
# start still counts in the window, so its memory follows the starts of one window, not max_starts.
_RATE_RING_FIRST = 16
monotonic = time.monotonic  # the clock of every deadline in this core
_REFRESH_EVERY = 1024  # successes between two looks at the log level, off the per-job path


def _step(lock: Any) -> Any:
    """``lock`` (an RLock), to take for one step of this core: ``with _step(self._lock):``.

    A step allocates, so the garbage collector may run in it, and with it Python code (a
    gc callback, a ``__del__``, a weakref callback; a signal handler may run there too).
    Such code that calls back into the core on this thread finds the step half done: it
    is refused (RuntimeError), not left to deadlock on the lock or to act on that state.
    The compiled core takes such a call: its steps allocate nothing, so the collector
    only ever runs between two of them.
    """
    if lock._is_owned():
        raise RuntimeError(
            "tinymq's pure-Python core was called from code that ran inside one of its own steps on this "
            "thread (a gc callback, __del__ or weakref callback the garbage collector ran there, or a "
            "signal handler): refused, as the step is half done; hand such work to another thread")
    return lock


def _remaining(deadline: Optional[float]) -> Optional[float]:
    """Seconds left before a monotonic deadline, for Condition.wait (None: no deadline)."""
    if deadline is None:
        return None
    remaining = deadline - time.monotonic()
    return None if remaining >= threading.TIMEOUT_MAX else remaining


# --- job ids ------------------------------------------------------------------

_id_prefix = ""
_id_counter: "itertools.count[int]" = itertools.count(1)


def _reseed_ids() -> None:
    """A fresh random prefix: per process, and again in every forked child."""
    global _id_prefix, _id_counter
    _id_prefix = os.urandom(6).hex() + "-"
    _id_counter = itertools.count(1)


_reseed_ids()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reseed_ids)


def new_job_id() -> str:
    """A random per-process prefix plus a counter: unique without urandom per job."""
    return _id_prefix + format(next(_id_counter), "016x")  # fixed width: ids sort by creation


_first_id_lock = threading.RLock()  # taken with _step


def first_id(job: Any, job_id: Any = None, unset: Any = None) -> Union[str, Unnamed]:
    """``job._id``, set first to ``job_id`` (an id, or a queue's ``Unnamed``; None: a new id) when it
    is ``unset``: one step, so threads reading a job's first id at once all get the one made first
    (``Job.id``: "made on first use, then fixed"). Returns the ``_id`` then: a str, or an ``Unnamed``
    (the job was queued meanwhile)."""
    with _step(_first_id_lock):
        current: Union[str, Unnamed] = job._id
        if current is unset:
            job._id = current = new_job_id() if job_id is None else job_id
    return current


# --- backoff ------------------------------------------------------------------


def retry_delay(
    k: int, initial_delay: float, max_delay: float, backoff_multiple: float, jitter: float = 0.0
) -> float:
    """Seconds before the k-th retry: min(initial * multiple**(k-1), max), jittered by ±jitter."""
    if initial_delay <= 0.0:
        delay = 0.0
    else:
        try:
            delay = min(initial_delay * backoff_multiple ** (k - 1), max_delay)
        except OverflowError:
            delay = max_delay
    if jitter > 0.0 and delay > 0.0:
        delay = min(delay * (1.0 + jitter * (2.0 * random.random() - 1.0)), max_delay)
    return delay


# --- per-type slots -----------------------------------------------------------


class TypeState:
    """One job type: its executor, its concurrency slots, its waiting jobs.

    Guarded by the owning ReadyQueue's lock.
    """

    __slots__ = ("name", "fn", "limit", "active", "timeout", "takes_context", "interrupt", "levels",
                 "listed", "runner", "rate_starts", "rate_max", "rate_oldest", "rate_per", "rate_open_at",
                 "rate_parked_until", "counters", "durations", "duration_sum")

    def __init__(self, name: str) -> None:
        self.name = name
        self.fn: Optional[Callable[..., Any]] = None  # None: no executor registered
        self.limit = _UNLIMITED  # at most this many attempts at once
        self.active = 0  # attempts running now (their functions have not returned)
        self.timeout: Optional[float] = None
        self.takes_context = False
        self.interrupt = False
        self.levels: Tuple[Deque[Tuple[int, Any]], ...] = (deque(), deque(), deque())  # (seq, job)
        # listed[level]: this type has its one entry in the ReadyQueue's runnable heap of that level
        self.listed = [False, False, False]
        self.runner = THREADS  # whose runnable heaps list it: THREADS, or LOOP for an async executor
        # The rate limit: a ring of the latest start times (monotonic), empty without one. A ring
        # smaller than rate_max (max_starts) holds every start that still counts in the window.
        self.rate_starts: List[float] = []
        self.rate_max = 0
        self.rate_oldest = 0  # index in rate_starts of the oldest start, the next to be replaced
        self.rate_per = 0.0
        self.rate_open_at = _ALWAYS_OPEN  # the oldest remembered start + per: no start before it
        # The key of its latest entry in the ReadyQueue's heap of closed windows; +inf: none
        self.rate_parked_until = _INF
        self.counters = [0] * _N_COUNTERS  # per-type lifetime counters, by event (TYPE_EVENTS)
        self.durations = [0] * _N_BUCKETS  # attempts by duration bucket (not cumulative)
        self.duration_sum = 0.0

    def pending(self) -> int:
        return len(self.levels[0]) + len(self.levels[1]) + len(self.levels[2])

    def admits(self) -> bool:
        """Whether a job of this type may start now: the one admission rule of ``ReadyQueue``.

        A free slot, and an open rate window. A type that fails it is dropped
        from the runnable heaps when seen there, and comes back through
        ``ReadyQueue._readmit`` when it may run again: a slot freed, a limit
        raised, or (for a closed rate window) the scheduler's wake-up at
        ``rate_open_at``, through ``ReadyQueue.reopen_rate_limited``.
        """
        open_at = self.rate_open_at
        return self.active < self.limit and (open_at == _ALWAYS_OPEN or open_at <= monotonic())

    def held_by_rate_limit(self) -> bool:
        """A free slot and a rate limit: once ``admits()`` said no, its window is what held the type
        (it may have opened since that look at the clock: a second look would miss the type)."""
        return self.active < self.limit and self.rate_open_at != _ALWAYS_OPEN

    def set_rate_limit(self, max_starts: int, per: float) -> None:
        """At most ``max_starts`` starts per ``per`` seconds (0: no limit); the latest remembered starts still count."""
        if not max_starts:
            self.rate_starts, self.rate_max, self.rate_oldest, self.rate_per = [], 0, 0, 0.0
            self.rate_open_at = _ALWAYS_OPEN
            return
        ring = self.rate_starts
        size = min(max(_RATE_RING_FIRST, len(ring)), max_starts)  # as many as it may remember already
        latest = ring[self.rate_oldest:] + ring[:self.rate_oldest]  # oldest first
        latest = [t for t in latest if t != _ALWAYS_OPEN][-size:]
        self.rate_starts = [_ALWAYS_OPEN] * (size - len(latest)) + latest
        self.rate_max = max_starts
        self.rate_oldest = 0
        self.rate_per = per
        self.rate_open_at = self._rate_opens_at()

    def _rate_opens_at(self) -> float:
        """The max_starts-th latest start + per; -inf (always open) while the ring is smaller: the
        starts it no longer holds opened their window before the ring forgot them."""
        ring = self.rate_starts
        if len(ring) < self.rate_max:
            return _ALWAYS_OPEN
        return ring[self.rate_oldest] + self.rate_per

    def record_start(self, now: float) -> None:
        """An attempt starts now: it replaces the oldest start in the rate limit's ring, or the ring
        grows when that start still counts (and the ring is smaller than max_starts)."""
        ring = self.rate_starts
        oldest = self.rate_oldest
        size = len(ring)
        if size < self.rate_max and ring[oldest] + self.rate_per > now:
            # Doubled (to max_starts at most), its new empty slots just before its oldest start.
            ring[oldest:oldest] = [_ALWAYS_OPEN] * (min(size * 2, self.rate_max) - size)
        ring[oldest] = now
        oldest += 1
        if oldest == len(ring):
            oldest = 0
        self.rate_oldest = oldest
        self.rate_open_at = self._rate_opens_at()

    def record_duration(self, seconds: float) -> None:
        """An attempt was decided after ``seconds``: one more in its histogram bucket."""
        bucket = 0
        for bound in ATTEMPT_DURATION_BUCKETS:
            if seconds <= bound:
                break
            bucket += 1
        self.durations[bucket] += 1
        self.duration_sum += seconds


def _rate_fields(rate_limit: Any) -> Tuple[int, float]:
    """``(max_starts, per)`` of a ``RateLimit``-like object, or ``(0, 0.0)`` for None: no limit."""
    if rate_limit is None:
        return 0, 0.0
    max_starts, per = operator.index(rate_limit.max_starts), float(rate_limit.per)
    if max_starts < 1 or not 0.0 < per < _INF:
        raise ValueError(f"rate_limit must allow >= 1 start per finite seconds > 0, got {rate_limit!r}")
    if max_starts > _MAX_RATE_STARTS:
        raise ValueError(f"rate_limit must allow at most {_MAX_RATE_STARTS} starts per window "
                         f"(the latest starts are kept), got {rate_limit!r}")
    return max_starts, per


def _priority_level(job: Any) -> int:
    priority = job.priority
    if not isinstance(priority, int) or isinstance(priority, bool) or not 0 <= priority <= 2:
        raise ValueError(f"priority must be a Priority (LOW=0, MEDIUM=1, HIGH=2), got {priority!r}")
    return int(priority)


def _not_a_str(what: str, value: Any) -> TypeError:
    # str.__repr__: a str subclass's own __repr__ is not called
    shown = str.__repr__(value) if isinstance(value, str) else repr(value)
    return TypeError(f"{what} must be a str, got {shown} ({type(value).__qualname__})")


def _exact_type(job_type: Any) -> str:
    """``job_type`` if it is exactly a str: a subclass's __hash__/__eq__ never runs in the core."""
    if type(job_type) is not str:
        raise _not_a_str("job type", job_type)
    return job_type


def _ready_fields(job: Any) -> Tuple[str, int]:
    """What the core keeps of a job it places: its type and its level, read once."""
    return _exact_type(job.type), _priority_level(job)


def _id_of(job: Any) -> Optional[str]:
    """The job's id, or None when it has none (yet): exactly a str, like a type."""
    job_id = job._id
    if job_id is not None and type(job_id) is not str:
        if type(job_id) is Unnamed:  # queued (here or elsewhere) and not named yet
            return None
        raise _not_a_str("job id", job_id)
    return job_id


def _duplicate(job_id: str) -> DuplicateJob:
    return DuplicateJob(f"a job with id {job_id!r} is already queued and unfinished")


def _queued_again(job: Any) -> DuplicateJob:
    return DuplicateJob(f"this {job.type!r} job is already queued and unfinished (a Job is enqueued "
                        "once: make a new Job to run the same work again)")


def _given_twice(job: Any) -> DuplicateJob:
    return DuplicateJob(f"this {job.type!r} job is given twice in this batch (a Job is enqueued once: "
                        "make a new Job to run the same work again); none of the batch was enqueued")


def _check_once(jobs: List[Any], batch: Dict[str, Any]) -> None:
    """DuplicateJob when one job without an id is in ``jobs`` twice: a Job stands for one enqueue
    (one with an id repeats its id, which ``_batch_ids`` finds). The compiled core finds it as it
    marks the jobs (``_mark_unnamed``): one marked already is there twice."""
    if len(jobs) - len(batch) < 2:
        return
    seen = set()
    for job in jobs:
        if _id_of(job) is None:
            if id(job) in seen:
                raise _given_twice(job)
            seen.add(id(job))


def _batch_ids(jobs: List[Any]) -> Tuple[Dict[str, Any], Optional[str]]:
    """``{id: job}`` for the jobs that have an id, and an id repeated within ``jobs`` (or None)."""
    batch: Dict[str, Any] = {}
    repeated = None
    for job in jobs:
        job_id = _id_of(job)
        if job_id is not None:
            if repeated is None and job_id in batch:
                repeated = job_id
            batch[job_id] = job
    return batch, repeated


# --- the ready queue ----------------------------------------------------------


class _Waiter:
    """A worker waiting in ``ReadyQueue.pop``, asleep on its own lock.

    The lock is held unless a wake-up is pending. A producer pops the job for
    the waiter (``taken``) and releases the lock: one release per job. A
    worker keeps its waiter, so nothing is allocated between a wake-up and the job.
    """

    __slots__ = ("_lock", "taken", "reclaimed", "__weakref__")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()
        # (job, type, level) handed by a producer, under the queue's lock; the level to give it back
        self.taken: Optional[Tuple[Any, TypeState, int]] = None
        # What close() took back of ``taken`` before this worker returned it (under the queue's lock).
        self.reclaimed: Optional[Tuple[Any, TypeState, int]] = None

    def sleep(self, timeout: Optional[float]) -> bool:
        """Wait for a wake-up (at most ``timeout`` seconds): True when one came."""
        if timeout is None:
            return self._lock.acquire()
        if timeout <= 0.0:
            return self._lock.acquire(False)
        return self._lock.acquire(True, timeout)

    def wake(self) -> None:
        self._lock.release()


class ReadyQueue:
    """Ready jobs by priority, per-type slots, and the queue's accounting.

    A worker's ``pop`` takes the oldest job of the highest non-empty level whose
    type has a free slot, and takes that slot; ``release`` gives it back.

    To find that job without looking at every type, each level has a heap of
    ``(seq, type)``: the types with a job waiting at that level, keyed by the
    insertion order of their oldest one there. A type is in a level's heap at
    most once (``TypeState.listed``), so the heaps hold at most 3 entries per
    type. A type that stops admitting jobs (saturated) is not taken out at
    once: its entry is dropped when it reaches the top, and ``_readmit`` puts
    it back when it admits jobs again. An entry's key never goes stale: the
    oldest job of a type at a level only leaves through that very entry.

    Rate limits: a type whose rate window is closed (``TypeState.held_by_rate_limit``)
    is dropped from the runnable heaps like a saturated one, and waits in
    another heap, keyed by when its window opens. The scheduler sleeps until
    ``next_rate_opening()`` and calls ``reopen_rate_limited(now)``, which
    readmits the types whose windows opened and hands their jobs to idle
    workers; ``alarm`` (the scheduler's) is woken when a type parks there with
    an earlier opening than the scheduler is armed for. A worker that pops
    reopens due windows itself, so busy workers never wait for the scheduler's
    wake-up. Nothing polls.

    The unfinished jobs that have an id are known by it: a second job with the
    same id is refused (DuplicateJob) until ``task_done`` of the first.

    A join (``join_begin``, ``join_wait``, ``join_end``) waits for the jobs
    unfinished when it began, retried and requeued ones included, and not for
    the jobs accepted since: while a join is under way, an accepted job is
    stamped with a generation newer than the join's, and nothing else is
    stamped, so the per-job path pays for it only then.

    Entry points check in one order: the job's own fields (TypeError,
    ValueError), then QueueStopped, then DuplicateJob, then room (False); any
    refusal leaves everything as it was.
    """

    def __init__(self, capacity: int, alarm: "Optional[Alarm]" = None) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._alarm = alarm  # woken (wake_before) at the earliest time a closed rate window opens
        self._lock = threading.RLock()  # taken with _step
        # Everything below is guarded by _lock.
        self._types: Dict[str, TypeState] = {}  # job type -> its slots and jobs
        self._sizes = [0, 0, 0]  # ready jobs per level; sum(_sizes) <= capacity
        # Per runner (THREADS, LOOP) and level, a heapq of (seq of the type's oldest job there, type):
        # every type with a job waiting at that level that admits jobs has exactly one entry in its
        # runner's heap; listed, saturated ones may too. The two runners never take each other's jobs.
        self._runnable: Tuple[Tuple[List[Tuple[int, TypeState]], ...], ...] = (([], [], []), ([], [], []))
        # The event loop's wake-up (set_loop_waker), and whether the loop waits for one: it found
        # nothing to take last time and was not woken since. At most one wake-up is in flight.
        self._loop_waker: Optional[Callable[[], None]] = None
        self._loop_idle = False
        # The loop's deque of (job, type, level) it took (hand_to_loop) and has not started: appended
        # to under _lock; the loop pops from its left without it (one atomic popleft per job, so each
        # job is either the loop's or close()'s, which takes back what is left: _reclaim_loop_handed).
        self._loop_handed: Optional[Deque[Tuple[Any, TypeState, int]]] = None
        # A heapq of (rate_open_at, seq, type): every type with jobs waiting whose rate window is
        # closed while it has a free slot has an entry keyed rate_parked_until, no later than its
        # opening; entries with another key are stale (a later limit parked it earlier): skipped.
        self._rate_closed: List[Tuple[float, int, TypeState]] = []
        # (job, type, level) of counted jobs owed room; nonempty only when full
        self._overflow: Deque[Tuple[Any, str, int]] = deque()
        self._seq = itertools.count()  # insertion order: FIFO within a level
        self._closed = False
        self._unfinished = 0  # accepted jobs not yet succeeded or failed for good
        # What join() waits for (join_begin): the unfinished jobs accepted before it began. Jobs
        # accepted while no join is under way (_joins == 0) form the base group, with no stamp:
        # _unfinished - _stamped of them, all older than any join under way. Jobs accepted while one
        # is are stamped with _generation, in _stamps (id(job) -> generation): _stamped of them,
        # _generation_size in the current generation, the older ones' sizes in _older (oldest first,
        # only those with jobs left). A join that finds the current generation with jobs moves it to
        # _older and begins the next, and waits until the base and every generation up to its own
        # are empty. Retries and requeues keep a job's stamp: only an accept or an end changes it.
        self._joins = 0  # join_begin() calls not yet ended (join_end)
        self._stamped = 0
        self._stamps: Dict[int, int] = {}
        self._generation = 0
        self._generation_size = 0
        self._older: Dict[int, int] = {}
        self._ids: Dict[str, Any] = {}  # id -> the unfinished job registered under it
        # The _id of the unfinished jobs accepted without an id (see _unnamed): job.id names one
        # (name()); _finish puts None back.
        self._unnamed = Unnamed(self)
        # Cancel marks, by id, of registered unfinished jobs outside the ready buffer (dropped with
        # the id): _REQUESTED, a cancel found the job between places or resting elsewhere, and
        # whoever holds it next ends it as cancelled (take_cancel); _ENDING, its end is decided.
        self._marks: Dict[str, int] = {}
        self._counters = [0] * _N_COUNTERS
        # Idle workers in pop, the latest last. None waits while a job is poppable, except while
        # the worker that freed its slot comes back for it (release_state(hand_off=False)).
        self._getters: List[_Waiter] = []
        # Every waiter of a worker (and of a pop() that waited), as weak references that drop
        # themselves as their waiter dies: close() takes back the jobs handed to those that have not
        # returned them yet (_reclaim_handed). Not a WeakSet: its iteration is Python code, and a
        # waiter dying meanwhile on another thread (its callback takes no lock) changes it under it.
        self._waiters: "Set[weakref.ref[_Waiter]]" = set()
        self._room = threading.Condition(self._lock)  # the buffer may have room
        self._all_done = threading.Condition(self._lock)  # the base, or an older generation, may be empty

    # executors

    def configure(
        self, job_type: str, fn: Callable[..., Any], limit: int,
        timeout: Optional[float], takes_context: bool, interrupt: bool, runner: int = THREADS,
        rate_limit: Any = None,
    ) -> TypeState:
        """Register or replace the executor of ``job_type``; running attempts keep their slots.

        ``runner``: THREADS (worker threads pop its jobs) or LOOP (``hand_to_loop``).
        ``rate_limit``: None, or any object with ``max_starts`` (int >= 1) and
        ``per`` (seconds > 0), such as ``tinymq.RateLimit``; it applies to later
        starts, and the starts the type remembers still count.
        """
        _exact_type(job_type)
        if runner not in (THREADS, LOOP):
            raise ValueError(f"runner must be THREADS or LOOP, got {runner!r}")
        max_starts, per = _rate_fields(rate_limit)
        with _step(self._lock):
            state = self._type_state(job_type)
            try:
                state.set_rate_limit(max_starts, per)
            except MemoryError:
                raise MemoryError(f"no room for the ring of {max_starts} starts of {rate_limit!r}") from None
            if state.runner != runner:  # its waiting jobs move to the other runner's heaps
                self._unlist(state)
                state.runner = runner
            state.fn, state.limit, state.timeout = fn, limit, timeout
            state.takes_context, state.interrupt = takes_context, interrupt
            if state.pending():
                self._readmit(state)  # a higher limit may free jobs
                self._hand_off()
            return state

    def executor_stats(self) -> Dict[str, Tuple[int, int]]:
        """``{job_type: (active, limit)}`` for every registered executor."""
        with _step(self._lock):
            return {s.name: (s.active, s.limit) for s in self._types.values() if s.fn is not None}

    def snapshot(self, *heaps: "DelayedHeap", now: float = _INF) -> Tuple[Tuple[int, int, int], Tuple[int, ...],
                                                                       Dict[str, Tuple[int, ...]], int, int]:
        """What ``Queue.get_stats()`` shows of the core and of the delayed ``heaps``, read at one
        moment (under this lock, each heap's taken inside it: no heap takes this lock).

        ``((high, medium, low), counters(), {job_type: (active, limit, succeeded, failed,
        retried, timed_out, cancelled)} per registered executor, overflow_size, delayed jobs)``,
        where delayed jobs are those not due at ``now`` (the heaps' clock). A due job that is
        still in a heap counts where moving it now would put it (``requeue``): ready at its
        level while the buffer has room, else owed room (overflow_size), in the order the
        scheduler moves them (the heaps in the order given, each earliest first); one that moving
        would fail (its type or priority made invalid while it waited) counts as delayed.
        """
        with _step(self._lock):
            types = {s.name: (s.active, s.limit, *[s.counters[event] for event in TYPE_EVENTS])
                     for s in self._types.values() if s.fn is not None}
            sizes = list(self._sizes)
            waiting_for_room = len(self._overflow)
            room = 0 if self._overflow else self.capacity - sum(sizes)
            delayed = 0
            for heap in heaps:
                due, not_due = heap.peek_due(now)
                delayed += not_due
                for job in due:
                    try:
                        level = _ready_fields(job)[1]
                    except (TypeError, ValueError):  # made invalid while it waited: moving it fails it,
                        delayed += 1                 # so until then it is where it is
                        continue
                    if room > 0:
                        sizes[level] += 1
                        room -= 1
                    else:
                        waiting_for_room += 1
            return (sizes[2], sizes[1], sizes[0]), tuple(self._counters), types, waiting_for_room, delayed

    def attempt_durations(self) -> Dict[str, Tuple[Tuple[int, ...], float]]:
        """``{job_type: (attempts per bucket, sum of seconds)}`` per registered executor.

        The buckets are ``ATTEMPT_DURATION_BUCKETS`` then +inf, not cumulative.
        """
        with _step(self._lock):
            return {s.name: (tuple(s.durations), s.duration_sum)
                    for s in self._types.values() if s.fn is not None}

    def _type_state(self, job_type: str) -> TypeState:
        state = self._types.get(job_type)
        if state is None:
            state = self._types[job_type] = TypeState(job_type)
        return state

    # pushing

    def _append(self, job: Any, job_type: str, level: int) -> None:
        state = self._type_state(job_type)
        waiting = state.levels[level]
        seq = next(self._seq)
        waiting.append((seq, job))
        self._sizes[level] += 1
        if len(waiting) == 1:  # its oldest job at this level: list the type
            if state.admits():
                self._list(state, level, seq)
            else:
                self._wait_for_window(state)

    def _list(self, state: TypeState, level: int, seq: int) -> None:
        if not state.listed[level]:
            state.listed[level] = True
            heapq.heappush(self._runnable[state.runner][level], (seq, state))

    def _unlist(self, state: TypeState) -> None:
        """Take ``state``'s entries out of its runner's heaps (it changes runner: rare)."""
        for level, runnable in enumerate(self._runnable[state.runner]):
            if state.listed[level]:
                runnable[:] = [entry for entry in runnable if entry[1] is not state]
                heapq.heapify(runnable)
                state.listed[level] = False

    def _readmit(self, state: TypeState) -> None:
        """``state``, with jobs waiting, may admit jobs again: list it wherever it is not listed."""
        if state.admits():
            for level, waiting in enumerate(state.levels):
                if waiting:
                    self._list(state, level, waiting[0][0])
        else:
            self._wait_for_window(state)

    def _wait_for_window(self, state: TypeState) -> None:
        """``state`` has jobs waiting and admitted none: if its rate window is what was closed,
        park it until the window opens (the scheduler reopens it then, at once if it opened since)."""
        open_at = state.rate_open_at
        if open_at < state.rate_parked_until and state.held_by_rate_limit():
            state.rate_parked_until = open_at
            heapq.heappush(self._rate_closed, (open_at, next(self._seq), state))
            if self._alarm is not None:
                self._alarm.wake_before(open_at)

    def next_rate_opening(self) -> Optional[float]:
        """When (monotonic) the earliest closed rate window of a type with jobs waiting opens."""
        with _step(self._lock):
            return self._rate_closed[0][0] if self._rate_closed else None

    def reopen_rate_limited(self, now: float) -> None:
        """Readmit the types whose rate windows opened by ``now``; idle workers take their jobs."""
        with _step(self._lock):
            self._reopen_due(now)
            self._hand_off()

    def _reopen_due(self, now: float) -> None:
        closed = self._rate_closed
        while closed and closed[0][0] <= now:
            open_at, _, state = heapq.heappop(closed)
            if open_at != state.rate_parked_until:
                continue  # stale: parked again since, with an earlier opening
            state.rate_parked_until = _INF
            if state.pending():
                self._readmit(state)  # parks it again if starts moved its window meanwhile

    def _check_open(self) -> None:
        if self._closed:
            raise QueueStopped("the queue is stopped")

    def _check_unregistered(self, batch: Dict[str, Any], repeated: Optional[str], jobs: List[Any]) -> None:
        if repeated is not None:
            raise _duplicate(repeated)
        for job_id in batch:
            if job_id in self._ids:
                raise _duplicate(job_id)
        if len(batch) < len(jobs):
            for job in jobs:
                if batch.get(job._id) is not job:
                    self._check_unheld(job, None)

    def _check_unheld(self, job: Any, job_id: Optional[str]) -> None:
        """DuplicateJob for a job this queue holds unfinished: by ``job_id`` (read before the lock), or,
        read without one, by what ``_id`` is now. ``_name_elsewhere`` looked before the lock: another
        thread may have accepted the same job here since (the compiled core looks and accepts in one
        step). Called with _lock held."""
        if job_id is not None:
            if job_id in self._ids:
                raise _duplicate(job_id)
            return
        current = job._id
        if current is self._unnamed or (current.__class__ is str and self._ids.get(current) is job):
            raise _queued_again(job)

    def _accept(self, jobs: List[Any], batch: Dict[str, Any]) -> None:
        self._unfinished += len(jobs)
        self._counters[ENQUEUED] += len(jobs)
        if self._joins:
            for job in jobs:
                self._stamp(job)
        if batch:
            self._ids.update(batch)
        if len(batch) < len(jobs):
            for job in jobs:
                job_id = job._id
                if job_id.__class__ is not str or batch.get(job_id) is not job:
                    self._mark_unnamed(job)

    def _accept_one(self, job: Any, job_id: Optional[str]) -> None:
        self._unfinished += 1
        self._counters[ENQUEUED] += 1
        if self._joins:
            self._stamp(job)
        if job_id is not None:
            self._ids[job_id] = job
        else:
            self._mark_unnamed(job)

    def _stamp(self, job: Any) -> None:
        """``job``, accepted now, joins the current generation: a join under way does not wait for it."""
        self._stamps[id(job)] = self._generation
        self._stamped += 1
        self._generation_size += 1

    def _mark_unnamed(self, job: Any) -> None:
        """Put this queue's ``Unnamed`` in an accepted job that was read without an id. Its id may have
        been first read on another thread since (``first_id``, not under this lock): then that id is
        the job's, registered as one given at enqueue. (The compiled core reads and writes in one step.)"""
        job_id = job._id
        if job_id.__class__ is not str:  # None, or an Unnamed: this queue's, or another's (replaced)
            job_id = first_id(job, self._unnamed, job_id)
        if job_id.__class__ is str and job_id not in self._ids:
            self._ids[job_id] = job

    def _name_elsewhere(self, job: Any) -> None:
        """Before ``job`` is accepted: if another queue accepted it without an id and it is unfinished
        there, it is named there first, so that each queue registers the id the job has (each finds it
        by that id wherever it is; each end frees it in its own queue). A job this queue accepted
        without an id and holds unfinished is refused (DuplicateJob), as it is once its id was read."""
        job_id = job._id
        if job_id.__class__ is Unnamed:
            if job_id is self._unnamed:
                raise _queued_again(job)
            job_id.name(job)

    def name(self, job: Any, unnamed: Unnamed, job_id: Optional[str] = None) -> str:
        """``job.id`` of a job accepted without one (its ``_id`` is ``unnamed``, this queue's): the id,
        ``job_id`` or a new one, registered as if the job had it at enqueue (DuplicateJob when
        ``job_id`` is an unfinished job's already). One step with every move of the job, so a
        cancel by this id from now on finds it wherever it is."""
        if job_id is None:
            job_id = new_job_id()
        with _step(self._lock):
            current: Union[str, Unnamed, None] = job._id
            if current is unnamed:
                if job_id in self._ids:
                    raise _duplicate(job_id)
                job._id = job_id
                self._ids[job_id] = job
                return job_id
            if current is None:  # finished meanwhile: named as a job that was never queued
                current = first_id(job, job_id)
        if isinstance(current, Unnamed):  # queued again, in another queue, meanwhile
            return current.name(job, job_id)
        return current  # named meanwhile

    def push(self, job: Any) -> bool:
        """Accept a new ready job; False, with no effect, when the buffer is full."""
        job_type, level = _ready_fields(job)
        self._name_elsewhere(job)
        job_id = _id_of(job)
        with _step(self._lock):
            self._check_open()
            self._check_unheld(job, job_id)
            if sum(self._sizes) >= self.capacity:
                return False
            self._append(job, job_type, level)
            self._accept_one(job, job_id)
            self._hand_off()
            return True

    def put(self, job: Any, timeout: Optional[float] = None) -> bool:
        """Accept a new ready job, waiting for room like ``queue.Queue.put``; False on timeout."""
        job_type, level = _ready_fields(job)
        self._name_elsewhere(job)
        job_id = _id_of(job)
        deadline = None if timeout is None else time.monotonic() + timeout
        with _step(self._lock):
            while True:
                self._check_open()
                has_room = sum(self._sizes) < self.capacity and not self._overflow
                try:
                    self._check_unheld(job, job_id)  # again after every wait
                except DuplicateJob:
                    if has_room:
                        self._room.notify()  # the room we were woken for is the next producer's
                    raise
                if has_room:
                    break
                remaining = _remaining(deadline)
                if remaining is not None and remaining <= 0.0:
                    return False
                self._room.wait(remaining)
            self._append(job, job_type, level)
            self._accept_one(job, job_id)
            self._hand_off()
            return True

    def push_many(self, ready_jobs: Iterable[Any], delayed_jobs: Iterable[Any] = ()) -> bool:
        """Accept every job or none: False, with no effect, when the ready ones do not all fit.

        ``delayed_jobs``, which the caller places itself, are counted and their
        ids registered in the same step; no id may repeat across both lists.
        """
        return self.push_many_delayed(ready_jobs, delayed_jobs, None, ()) is not None

    def push_many_delayed(self, ready_jobs: Iterable[Any], delayed_jobs: Iterable[Any],
                          heap: Optional["DelayedHeap"], run_ats: Sequence[float]
                          ) -> Optional[List[Tuple[Any, int]]]:
        """``push_many``, and with ``heap`` each of ``delayed_jobs`` pushed onto it at its
        ``run_ats`` entry in the same step: ``snapshot()`` sees the batch counted and placed, or
        none of it. None, with no effect, when the ready ones do not all fit; else, as
        ``accept_delayed`` gives it, ``(job, counter)`` for each job the pushes evicted."""
        ready_jobs, delayed_jobs = list(ready_jobs), list(delayed_jobs)
        placed = [(job, *_ready_fields(job)) for job in ready_jobs]
        accepted = ready_jobs + delayed_jobs
        for job in accepted:
            self._name_elsewhere(job)
        batch, repeated = _batch_ids(accepted)
        _check_once(accepted, batch)
        with _step(self._lock):
            self._check_open()
            self._check_unregistered(batch, repeated, accepted)
            if sum(self._sizes) + len(placed) > self.capacity:
                return None
            pushed_out = []
            if heap is not None:  # (the heap's lock inside it, as in snapshot(): no heap takes this one)
                pushed_out = [heap.push(job, run_at) for job, run_at in zip(delayed_jobs, run_ats)]
            for job, job_type, level in placed:
                self._append(job, job_type, level)
            self._accept(accepted, batch)  # (first: a job of this batch may be among the evicted)
            evicted = [(job, self._end_evicted(job)) for job in pushed_out if job is not None]
            self._hand_off()
            return evicted

    def accept(self, jobs: Iterable[Any], counter: Optional[int] = None) -> None:
        """Count ``jobs``, which the caller places itself (delayed, recovered), and register their ids.

        ``counter``: the jobs have ended already (recovered as crashed): their ends are decided and
        counted in it in the same step, so ``snapshot()`` never sees them in no place; the caller
        reports them."""
        jobs = list(jobs)
        for job in jobs:
            self._name_elsewhere(job)
        batch, repeated = _batch_ids(jobs)
        _check_once(jobs, batch)
        with _step(self._lock):
            self._check_open()
            self._check_unregistered(batch, repeated, jobs)
            self._accept(jobs, batch)
            if counter is not None:
                for job in jobs:
                    self._decide_end(job)
                    self._count_end(job, counter)

    def _place(self, job: Any, job_type: Any, level: int) -> bool:
        """Put in an accepted job: in the buffer while it has room and no job is owed room before
        it (True), else at the end of the overflow line, where a pop moves it in (False)."""
        if sum(self._sizes) >= self.capacity or self._overflow:
            self._overflow.append((job, job_type, level))
            return False
        self._append(job, job_type, level)
        return True

    def accept_ready(self, job: Any) -> None:
        """``accept([job])`` and ``requeue(job)`` in one step, for a recovered job: never refused for
        lack of room (owed room when full), and ``snapshot()`` sees it counted and placed, or neither."""
        job_type, level = _ready_fields(job)
        self._name_elsewhere(job)
        job_id = _id_of(job)
        with _step(self._lock):
            self._check_open()
            self._check_unheld(job, job_id)
            self._accept_one(job, job_id)
            if self._place(job, job_type, level):
                self._hand_off()

    def accept_delayed(self, job: Any, heap: "DelayedHeap", run_at: float) -> Optional[Tuple[Any, int]]:
        """``accept([job])`` and ``heap.push(job, run_at)`` in one step: ``snapshot()`` sees the
        job counted and in the heap, or neither. Returns None, or ``(the job the push evicted,
        the counter it was counted in)``, counted in the same step (``_end_evicted``)."""
        jobs = [job]
        self._name_elsewhere(job)
        batch, repeated = _batch_ids(jobs)
        with _step(self._lock):  # (the heap's lock inside it, as in snapshot(): no heap takes this one)
            self._check_open()
            self._check_unregistered(batch, repeated, jobs)
            evicted = heap.push(job, run_at)
            self._accept(jobs, batch)
            return None if evicted is None else (evicted, self._end_evicted(evicted))

    def _end_evicted(self, job: Any) -> int:
        """``job`` was pushed out of a full delayed heap: decide its end and count it (EVICTED, or
        CANCELLED when a cancel of it was requested first), so that ``snapshot()`` never sees it
        out of the heap and not yet counted; the caller reports it. Called with _lock held."""
        if self._decide_end(job):
            return CANCELLED  # (counted as its mark was taken)
        self._counters[EVICTED] += 1
        return EVICTED

    def _count_end(self, job: Any, counter: int) -> None:
        """Count the end of ``job`` in ``counter``, queue-wide, and per type when its type has an
        executor (a job failed as no_executor counts queue-wide only). Called with _lock held."""
        self._counters[counter] += 1
        state = self._types.get(job.type) if type(job.type) is str else None
        if state is not None and state.fn is not None:
            state.counters[counter] += 1

    def requeue(self, job: Any, release: Optional[TypeState] = None) -> bool:
        """Make an accepted job ready (due, retried, recovered): never refused, never dropped.

        With the buffer full it waits in the overflow line, ahead of blocked
        producers, and moves in as soon as a pop makes room. Its type and level
        are read now: changing them later changes nothing here. False, with the
        job placed nowhere, when a cancel of it was requested on its way here:
        the caller ends it as cancelled (the mark is taken and counted, ``take_cancel``).
        ``release``: the type whose slot the job's attempt held, freed in the same step.
        """
        job_type, level = _ready_fields(job)
        with _step(self._lock):
            if release is not None:
                self._release(release)
            if self._marks and self._take_cancel(job):
                return False
            if self._place(job, job_type, level):
                self._hand_off()
            return True

    def move_due(self, heap: "DelayedHeap", now: float) -> List[Tuple[Any, Optional[Exception]]]:
        """Move the jobs of ``heap`` due at ``now`` (its clock) in, earliest first, as ``requeue``
        does, in one step: ``snapshot()`` sees each of them in the heap or placed, never between.

        Returns the due jobs that were placed nowhere, as ``(job, None)`` when a cancel of it
        was requested (the mark is taken: the caller ends it as cancelled), or ``(job, error)``
        when it cannot go (a priority made invalid while it waited: the caller fails it).
        """
        left: List[Tuple[Any, Optional[Exception]]] = []
        with _step(self._lock):  # (the heap's lock inside it, as in snapshot(): no heap takes this one)
            for job in heap.pop_due(now):
                try:
                    job_type, level = _ready_fields(job)
                except Exception as error:
                    left.append((job, error))
                    continue
                if self._marks and self._take_cancel(job):
                    left.append((job, None))
                else:
                    self._place(job, job_type, level)
            self._hand_off()
        return left

    # popping

    def _take(self, runner: int = THREADS) -> Optional[Tuple[Any, TypeState, int]]:
        """Take ``runner``'s next job and a slot of its type: (job, type, level), or None."""
        if self._rate_closed:  # a busy worker reopens a window without the scheduler
            now = monotonic()
            if self._rate_closed[0][0] <= now:
                self._reopen_due(now)
        for level in _LEVELS:
            runnable = self._runnable[runner][level]
            while runnable:
                state = runnable[0][1]
                if not state.admits():  # saturated or rate-limited since it was listed
                    heapq.heappop(runnable)
                    state.listed[level] = False
                    self._wait_for_window(state)  # else _readmit lists it again
                    continue
                waiting = state.levels[level]
                _, job = waiting.popleft()
                self._sizes[level] -= 1
                state.active += 1
                if state.rate_starts:
                    state.record_start(monotonic())
                if waiting and state.admits():  # keyed by its next oldest job now
                    heapq.heapreplace(runnable, (waiting[0][0], state))
                else:
                    heapq.heappop(runnable)
                    state.listed[level] = False
                    if waiting:
                        self._wait_for_window(state)
                self._refill()
                return job, state, level
        return None

    def _refill(self) -> None:
        """One pop made room for one job: the overflow line first, else a blocked producer."""
        if self._overflow:
            self._append(*self._overflow.popleft())  # the caller hands it off if a worker waits
        else:
            self._room.notify()

    def _hand_off(self) -> None:
        """While workers wait and a job is poppable, pop it for the latest idle worker and wake it.

        One lock release per job, and the woken worker returns the job at
        once: it never takes ``_lock`` again, as a Condition's waiter would. None once closed:
        no attempt starts after stop, and a job handed to a worker would count as running until
        it woke (a slot freed after close(), or a job given back then).
        """
        while self._getters and not self._closed:
            taken = self._take()
            if taken is None:
                break
            waiter = self._getters.pop()
            waiter.taken = taken
            waiter.wake()
        if self._loop_idle and any(self._runnable[LOOP]):  # the loop's jobs: one wake-up, it drains
            self._loop_idle = False
            self._loop_waker()  # type: ignore[misc]  # set whenever _loop_idle is

    def _give_back(self, job: Any, state: TypeState, level: int) -> None:
        """Undo a hand-off that its worker will not return (interrupted): like a requeue."""
        self._put_back(job, state, level)
        self._hand_off()

    def _put_back(self, job: Any, state: TypeState, level: int) -> None:
        state.active -= 1
        self._place(job, state.name, level)
        self._readmit(state)

    def enlist(self, waiter: "_Waiter") -> None:
        """``waiter`` is a worker's, for all its waits: close() takes back a job handed to it."""
        with _step(self._lock):
            self._waiters.add(weakref.ref(waiter, self._waiters.discard))

    def _reclaim_handed(self) -> None:
        """close(): take back the jobs handed to workers that have not returned them yet, in this step,
        so that no snapshot from now on counts one as running: its worker would give it back
        unstarted (no attempt starts after stop). A job whose cancel was requested stays: its
        worker ends it as cancelled. Called with _lock held, once closed."""
        for ref in list(self._waiters):  # (copied in C: no Python code runs)
            waiter = ref()
            if waiter is None:
                continue
            taken = waiter.taken
            if taken is None or self._cancel_requested(taken[0]):
                continue
            waiter.taken = None
            waiter.reclaimed = taken  # (its worker may have read taken already: see _pop)
            self._put_back(*taken)

    def _reclaim_loop_handed(self) -> None:
        """close(): take back, in this step, the jobs handed to the event loop that it has not
        started (still in its deque: hand_to_loop), as _reclaim_handed does a worker's: from now
        on they count as ready, never as running, however long the loop takes to come to them. A
        job whose cancel was requested stays: the loop ends it as cancelled. Called with _lock
        held, once closed (nothing is handed to the loop from then on)."""
        handed = self._loop_handed
        if handed is None:
            return
        kept = []
        while True:
            try:
                one = handed.popleft()  # (atomic: a job the loop pops meanwhile is the loop's)
            except IndexError:
                break
            job, state, level = one
            if self._cancel_requested(job):
                kept.append(one)
            else:
                self._put_back(job, state, level)
        handed.extend(kept)

    def _pop(self, timeout: Optional[float], waiter: "Optional[_Waiter]", with_type: bool = True) -> Any:
        """Take a job and a slot of its type: ``(job, type)``, or the job (not ``with_type``); None
        when closed or on timeout. Wait on ``waiter`` (made here when None).

        An exception that comes in as it waits or before it returns (a KeyboardInterrupt that a
        signal handler raises in the main thread, even just after a hand-off) gives back the job
        it took, as a requeue: never lost with the call. ``owned`` is that job, as (job, type,
        level), from the statement that takes it to the return.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        owned: Optional[Tuple[Any, TypeState, int]] = None
        try:
            while True:
                with _step(self._lock):
                    if self._closed:
                        self._pass_on_close()
                        return None
                    owned = self._take()
                    if owned is not None:
                        if self._getters or self._loop_idle:  # _take may have moved an overflow job in
                            self._hand_off()
                        return owned[:2] if with_type else owned[0]
                    remaining = _remaining(deadline)
                    if remaining is not None and remaining <= 0.0:
                        return None
                    if waiter is None:
                        waiter = _Waiter()
                        self._waiters.add(weakref.ref(waiter, self._waiters.discard))
                    waiter.taken = None
                    self._getters.append(waiter)
                if not waiter.sleep(remaining):  # timed out; a hand-off may have come meanwhile
                    with _step(self._lock):
                        self._leave(waiter)
                owned, waiter.taken = waiter.taken, None  # an idle worker keeps no job alive
                if owned is not None:
                    if self._closed:  # handed over just before close(): no attempt starts after stop
                        with _step(self._lock):
                            # close() set _closed before it looked at taken: if it took this job back
                            # (read before the line above cleared it), it is in place again already.
                            if waiter.reclaimed is not owned:
                                if self._cancel_requested(owned[0]):
                                    return owned[:2] if with_type else owned[0]  # its worker ends it, cancelled
                                waiter.reclaimed = owned  # (in place again from here: never given back twice)
                                self._give_back(*owned)
                            waiter.reclaimed = owned = None
                            self._pass_on_close()
                            return None
                    return owned[:2] if with_type else owned[0]
                # woken by close(), or timed out: look again
        except BaseException:
            with _step(self._lock):
                if waiter is not None:
                    self._leave(waiter)
                    if owned is None:  # handed over, not read yet
                        owned = waiter.taken
                    elif waiter.reclaimed is owned:  # close() (or this call) put it in place again
                        owned = None
                    waiter.taken = waiter.reclaimed = None
                if self._closed:  # (its wake-up may have been close()'s)
                    self._pass_on_close()
                if owned is not None:
                    self._give_back(*owned)
            raise

    def _pass_on_close(self) -> None:
        """The queue is closed: wake the latest idle worker, which does the same as it returns None.
        Called with _lock held."""
        if self._getters:
            self._getters.pop().wake()

    def _leave(self, waiter: "_Waiter") -> None:
        """``waiter`` stops waiting: off the list, or take the wake-up sent to it. Called with _lock."""
        if waiter in self._getters:
            self._getters.remove(waiter)
        else:
            waiter.sleep(0.0)  # its wake-up came (a job, or close): the lock is free, take it

    def pop_with_type(self, timeout: Optional[float] = None) -> Optional[Tuple[Any, TypeState]]:
        """Take a job and a slot of its type; None when closed or on timeout."""
        return self._pop(timeout, None)  # type: ignore[no-any-return]

    def pop(self, timeout: Optional[float] = None) -> Any:
        """Take a job and a slot of its type (give it back with ``release``); None when closed or on timeout."""
        return self._pop(timeout, None, False)  # (nothing after the call: an interruption finds the job there)

    def set_loop_waker(self, waker: Optional[Callable[[], None]],
                       handed: Optional[Deque[Tuple[Any, TypeState, int]]] = None) -> None:
        """``waker()`` (cheap, never raising) asks the event loop to call ``hand_to_loop`` soon.

        It is called at most once between two such calls that found nothing,
        so a busy loop is never woken per job. None detaches. ``handed``: the
        deque ``hand_to_loop`` fills, from which the loop pops (``popleft``)
        each job as it starts it; close() takes back what is left in it.
        """
        with _step(self._lock):
            self._loop_handed = handed
            self._loop_waker = waker
            self._loop_idle = False
            if waker is not None and any(self._runnable[LOOP]):
                waker()
            else:
                self._loop_idle = waker is not None

    def hand_to_loop(self, max_jobs: int) -> int:
        """Take up to ``max_jobs`` of the loop's jobs (and their slots), in priority order, into the
        deque given to ``set_loop_waker``, as ``(job, type, level)``: how many. Until the loop pops
        one (``popleft``, as it starts it), close() may take it back.

        Fewer than ``max_jobs`` means there were no more: the next job the loop
        can take wakes it (``set_loop_waker``). Nothing once closed.
        """
        with _step(self._lock):
            handed = self._loop_handed
            if handed is None:
                raise RuntimeError("hand_to_loop() needs the deque given to set_loop_waker(waker, handed)")
            taken = self._take_for_loop(max_jobs)
            handed.extend(taken)
            return len(taken)

    def take_back_from_loop(self) -> None:
        """Once closed, take back what is left in the loop's deque, as close() did: the loop put a
        job back there that it popped as stop() began (before the close, or after it), counted
        running until this step and ready from it. Before close(), nothing: close() takes it back."""
        with _step(self._lock):
            if self._closed:
                self._reclaim_loop_handed()

    def _take_for_loop(self, max_jobs: int) -> List[Tuple[Any, TypeState, int]]:
        taken: List[Tuple[Any, TypeState, int]] = []
        if self._closed:
            return taken
        while len(taken) < max_jobs:
            one = self._take(LOOP)
            if one is None:
                self._loop_idle = self._loop_waker is not None
                break
            taken.append(one)
        if self._getters:  # _take may have moved a worker thread's job in from the overflow line
            self._hand_off()
        return taken

    def remove(self, job_id: str) -> Any:
        """Take the ready (or overflow) job with this id out of the queue: the job, or None.

        The job stays unfinished: the caller ends it (``task_done``). Scans
        every waiting job: for a cancel, not for a per-job path.
        """
        if type(job_id) is not str:
            raise _not_a_str("job id", job_id)
        with _step(self._lock):
            return self._remove(job_id)

    def _remove(self, job_id: str) -> Any:
        """``remove``, called with _lock held."""
        for index, (job, job_type, level) in enumerate(self._overflow):
            if job._id == job_id:
                del self._overflow[index]
                return job
        for state in self._types.values():
            for level, waiting in enumerate(state.levels):
                for index, (_, job) in enumerate(waiting):
                    if job._id != job_id:
                        continue
                    del waiting[index]
                    self._sizes[level] -= 1
                    if index == 0 and state.listed[level]:  # its heap entry was keyed by this job
                        runnable = self._runnable[state.runner][level]
                        runnable[:] = [entry for entry in runnable if entry[1] is not state]
                        heapq.heapify(runnable)
                        state.listed[level] = False
                        self._readmit(state)
                    self._refill()
                    self._hand_off()
                    return job
        return None

    # cancelling: a job between two places is never missed

    def mark_cancel(self, job_id: str, *heaps: "DelayedHeap") -> Tuple[int, Any]:
        """What ``cancel(job_id)`` can decide here, in one step: ``(outcome, job)``.

        ``CANCEL_REMOVED``: the job was ready (or owed room) and is taken out;
        the caller ends it. ``CANCEL_MARKED``: it is unfinished elsewhere
        (delayed, running, or between two places): marked, so the caller ends
        it where it rests (taking the mark, ``take_cancel``), or else whoever
        holds it next does, before it rests or runs again. ``CANCEL_LOST``: a
        cancel took it already, or its end is decided (job None).
        ``CANCEL_UNKNOWN``: no unfinished job was registered with this id (it
        had none at enqueue: the caller looks for it; job None).

        With ``heaps``, a job that no unfinished job's id names (given its id behind the core's
        back: a Job.id set while another thread enqueues it) is looked for in the ready buffer
        and in ``heaps`` too: taken out and counted cancelled in the same step, ``CANCEL_REMOVED``. Not
        found there: ``CANCEL_UNKNOWN`` (it may be running: ``take_unregistered_cancel``).
        """
        if type(job_id) is not str:
            raise _not_a_str("job id", job_id)
        with _step(self._lock):
            job = self._ids.get(job_id)
            if job is None:
                if heaps:
                    job = self._remove(job_id)
                    for heap in heaps:  # (the heap's lock inside this one, as in snapshot())
                        if job is not None:
                            break
                        job = heap.remove(job_id)
                    if job is not None:
                        self._count_end(job, CANCELLED)
                        return CANCEL_REMOVED, job
                return CANCEL_UNKNOWN, None
            if job_id in self._marks:
                return CANCEL_LOST, None
            removed = self._remove(job_id)
            if removed is not None:
                self._marks[job_id] = _ENDING
                self._count_end(removed, CANCELLED)
                return CANCEL_REMOVED, removed
            self._marks[job_id] = _REQUESTED
            return CANCEL_MARKED, job

    @property
    def cancel_marks(self) -> Dict[str, int]:
        """The marks themselves (never replaced): empty means no cancel waits for a holder."""
        return self._marks

    def cancel_requested(self, job: Any) -> bool:
        """Whether a cancel of ``job`` waits for whoever holds it (peek; ``take_cancel`` acts)."""
        if not self._marks:
            return False
        with _step(self._lock):
            return self._cancel_requested(job)

    def _cancel_requested(self, job: Any) -> bool:
        job_id = job._id
        return type(job_id) is str and self._marks.get(job_id) == _REQUESTED and self._ids.get(job_id) is job

    def take_cancel(self, job: Any, release: Optional[TypeState] = None) -> bool:
        """The holder of ``job`` takes a cancel requested for it: True once, counted in the same step;
        then it ends the job as cancelled. ``release``: the slot its attempt held, freed in the
        same step when the cancel is taken (else it stays taken)."""
        if not self._marks:
            return False
        with _step(self._lock):
            if not self._take_cancel(job):
                return False
            if release is not None:
                self._release(release)
            return True

    def take_unregistered_cancel(self, job: Any) -> bool:
        """A cancel of ``job``, running, which ``mark_cancel`` found registered under no id, is counted:
        True, and the caller, deciding the attempt in this step, ends it as cancelled. When ``job``
        was enqueued again with its id since, it is marked as taken (False if a cancel or its end
        was decided there first: that decides it)."""
        with _step(self._lock):
            return self._take_unregistered_cancel(job)

    def _take_unregistered_cancel(self, job: Any) -> bool:
        job_id = job._id
        if type(job_id) is str and self._ids.get(job_id) is job:
            if job_id in self._marks:
                return False
            self._marks[job_id] = _ENDING
        self._count_end(job, CANCELLED)
        return True

    def take_cancel_from(self, job: Any, heap: "DelayedHeap") -> bool:
        """``job``, with a cancel requested, is taken out of ``heap`` and its mark taken and counted, in
        one step: True, and the caller ends it as cancelled. False, with nothing changed, else."""
        if not self._marks:
            return False
        with _step(self._lock):  # (the heap's lock inside it, as in snapshot(): no heap takes this one)
            if not self._cancel_requested(job) or heap.remove(job._id, job) is None:
                return False
            return self._take_cancel(job)

    def _take_cancel(self, job: Any) -> bool:
        """Take a cancel requested for ``job`` and count its end: snapshot() sees the job where it
        was or cancelled, never in neither. Called with _lock held."""
        if not self._cancel_requested(job):
            return False
        self._marks[job._id] = _ENDING
        self._count_end(job, CANCELLED)
        return True

    def decide_end(self, job: Any) -> bool:
        """The holder of ``job`` decides its end (success, failure for good): from now on a cancel of it
        loses. True when a cancel was requested first (counted): then it ends as cancelled instead."""
        with _step(self._lock):
            return self._decide_end(job)

    def end(self, job: Any, counter: int, release: Optional[TypeState] = None) -> int:
        """``job`` leaves without success: its end decided (``decide_end``) and counted in ``counter``,
        or in CANCELLED when a cancel of it was requested first; returns the counter used.
        ``release``: the type whose slot the job's attempt held, freed in the same step, so
        ``snapshot()`` sees the job running or ended, never in neither. The caller reports it."""
        if not 0 <= counter < _N_COUNTERS:
            raise ValueError(f"counter must be one of the counter constants, got {counter}")
        with _step(self._lock):
            if release is not None:
                self._release(release)
            if counter != CANCELLED and self._decide_end(job):
                return CANCELLED
            self._count_end(job, counter)
            return counter

    def place_delayed(self, job: Any, heap: "DelayedHeap", run_at: float,
                      release: Optional[TypeState] = None) -> Any:
        """``heap.push(job, run_at)`` for an accepted job (a retry, a recovered one), with the slot of
        ``release`` freed in the same step. Returns the job the push evicted, or None."""
        with _step(self._lock):  # (the heap's lock inside it, as in snapshot(): no heap takes this one)
            pushed_out = heap.push(job, run_at)
            if release is not None:
                self._release(release)
            return pushed_out

    def _decide_end(self, job: Any) -> bool:
        if self._marks and self._take_cancel(job):
            return True
        job_id = job._id
        if job_id is self._unnamed:  # never named: named now, and held under that id until it finishes,
            job_id = job._id = new_job_id()  # as one enqueued with an id is (its failure callbacks may
            if job_id in self._ids:          # read the id; it may change only once the job finished)
                return False
            self._ids[job_id] = job
        if self._ids and type(job_id) is str and self._ids.get(job_id) is job:
            self._marks[job_id] = _ENDING
        return False

    def release(self, job_type: str) -> None:
        """An attempt of ``job_type`` returned: free its slot."""
        _exact_type(job_type)
        with _step(self._lock):
            self._release(self._types[job_type])

    def release_state(self, state: TypeState, hand_off: bool = True, taker: int = THREADS) -> None:
        """Free a slot of ``state``; ``hand_off=False``: the caller (of runner ``taker``) takes its job itself."""
        with _step(self._lock):
            self._release(state, hand_off, taker)

    def _release(self, state: TypeState, hand_off: bool = True, taker: int = THREADS) -> None:
        state.active -= 1
        if state.pending():
            self._readmit(state)
            # Else a worker handing the job over to another would sleep as it wakes; a caller of the
            # other runner (the type was registered again meanwhile) cannot take the type's job itself.
            if hand_off or state.runner != taker:
                self._hand_off()
        elif state.fn is None and not state.active:
            del self._types[state.name]  # an unregistered type leaves nothing behind

    # sizes and lifecycle

    def sizes(self) -> Tuple[int, int, int]:
        """Ready jobs per level: (high, medium, low)."""
        with _step(self._lock):
            return self._sizes[2], self._sizes[1], self._sizes[0]

    def __len__(self) -> int:
        with _step(self._lock):
            return sum(self._sizes)

    @property
    def overflow_size(self) -> int:
        with _step(self._lock):
            return len(self._overflow)

    @property
    def closed(self) -> bool:
        return self._closed

    def close_forked(self) -> None:
        """In a fork()ed child of the process whose threads serve this core: refuse every job from
        now on (pushes raise QueueStopped, join returns), and wake no one (none of those threads
        is there). The lock is made free again: one a thread of the parent held at the fork would
        never be released in the child, where the calls still made (stop() at exit, get_stats())
        wait for it; only the forking thread runs there, so no step is under way."""
        self._closed = True
        for condition in (self._room, self._all_done):  # (their lock is _lock; waiters: the parent's threads)
            reinit_after_fork(condition)

    def close(self) -> None:
        """Stop: pops return None, pushes raise QueueStopped, every waiter wakes.

        The idle workers wake one after another, each as the one before returns
        (``_pass_on_close``): thousands woken at once would all wait for the GIL,
        and their waits would starve the threads holding it.
        """
        with _step(self._lock):
            self._closed = True
            self._reclaim_handed()
            self._reclaim_loop_handed()
            self._pass_on_close()  # with nothing: it sees the queue closed
            self._room.notify_all()
            self._all_done.notify_all()

    # accounting

    def count(self, event: int, n: int = 1, job_type: Optional[str] = None) -> None:
        """Count ``n`` events; with ``job_type`` (a registered executor's), per type too. A
        counter never goes down (Prometheus reads that as a reset): ``n`` is 0 or more, and no
        count is ever taken back or moved (an event is counted once it is decided)."""
        if not 0 <= event < len(self._counters):
            raise ValueError(f"event must be one of the counter constants, got {event}")
        if n < 0:
            raise ValueError(f"a counter never goes down: n must be 0 or more, got {n}")
        with _step(self._lock):
            self._counters[event] += n
            if type(job_type) is str:
                state = self._types.get(job_type)
                if state is not None and state.fn is not None:
                    state.counters[event] += n

    def attempt_succeeded(self, state: TypeState, seconds: float, job: Any = None, finish: bool = False,
                          release: bool = False, hand_off: bool = True) -> bool:
        """An attempt of ``state`` succeeded after ``seconds``: count it, queue-wide and per type.

        With ``job``, its end is decided (``decide_end``): False, with the success
        not counted, when a cancel of it was requested first (counted as cancelled:
        the caller ends it so); with ``finish`` too, ``task_done(job)`` in the same step.
        ``release``: the attempt's slot is freed in the same step (``release_state(state,
        hand_off)``), so ``snapshot()`` sees the job running or ended, never in neither.
        """
        with _step(self._lock):
            if release:
                self._release(state, hand_off)
            if job is None:
                self._succeeded(state, seconds)
                return True
            return self._attempt_succeeded(state, seconds, job, finish)

    def loop_attempt_succeeded(self, state: TypeState, seconds: float, job: Any) -> bool:
        """An event loop's attempt of ``state`` succeeded after ``seconds``, and ``job`` with it.

        ``release_state(state, False, LOOP)``, ``attempt_succeeded(state,
        seconds, job, finish=True)`` in one step: the loop's per-job path.
        False when a cancel of ``job`` was requested first: only its slot is freed.
        """
        with _step(self._lock):
            self._release(state, False, LOOP)
            return self._attempt_succeeded(state, seconds, job, True)

    def _succeeded(self, state: TypeState, seconds: float) -> None:
        self._counters[SUCCEEDED] += 1
        state.counters[SUCCEEDED] += 1
        state.record_duration(seconds)

    def _attempt_succeeded(self, state: TypeState, seconds: float, job: Any, finish: bool) -> bool:
        """``attempt_succeeded`` with ``job``, called with _lock held."""
        if finish:
            if self._marks and self._take_cancel(job):
                state.record_duration(seconds)  # it ran: a decided attempt, counted as cancelled
                return False
        elif self._decide_end(job):
            state.record_duration(seconds)
            return False
        self._succeeded(state, seconds)
        if finish:
            self._finish(job)
        return True

    def record_duration(self, state: TypeState, seconds: float) -> None:
        """An attempt of ``state`` was decided (failed, timed out, cancelled) after ``seconds``."""
        with _step(self._lock):
            state.record_duration(seconds)

    def counters(self) -> Tuple[int, ...]:
        with _step(self._lock):
            return tuple(self._counters)

    @property
    def unfinished(self) -> int:
        return self._unfinished

    def has_id(self, job_id: str) -> bool:
        """Whether an unfinished job was accepted with this id."""
        if type(job_id) is not str:
            raise _not_a_str("job id", job_id)
        with _step(self._lock):
            return job_id in self._ids

    def registered(self, job: Any) -> bool:
        """Whether ``job`` is the unfinished job accepted with its id (not one whose id came later)."""
        job_id = job._id
        if type(job_id) is not str:
            return False
        with _step(self._lock):
            return self._ids.get(job_id) is job

    def task_done(self, job: Any) -> None:
        """``job``, accepted earlier, finished for good: its id is free again."""
        with _step(self._lock):
            self._finish(job)

    def _finish(self, job: Any) -> None:
        """``job`` finished for good: its id is free again. Called with _lock held."""
        self._unfinished -= 1
        if self._stamped:
            self._unstamp(job)
        elif self._unfinished <= 0:
            self._all_done.notify_all()
        job_id = job._id  # under the lock: name() may have given it one just now
        if job_id is self._unnamed:
            job._id = None  # never named: an id read from now on is not this queue's to register
        elif type(job_id) is str and self._ids.get(job_id) is job:  # not another job's id
            del self._ids[job_id]
            if self._marks:
                self._marks.pop(job_id, None)

    def _unstamp(self, job: Any) -> None:
        """``job`` finished while some unfinished jobs are stamped: take it out of its group, and wake
        the joins when that group is empty now (the base, or an older generation)."""
        generation = self._stamps.pop(id(job), None)
        if generation is None:  # of the base
            if self._unfinished == self._stamped:
                self._all_done.notify_all()
            return
        self._stamped -= 1
        if generation == self._generation:  # (no join waits for the current generation)
            self._generation_size -= 1
            return
        left = self._older[generation] - 1
        if left:
            self._older[generation] = left
        else:
            del self._older[generation]
            self._all_done.notify_all()

    def join_begin(self) -> Optional[int]:
        """Begin a join: what it waits for is the jobs unfinished now (``join_wait``). Returns its
        ticket, None when no job is unfinished (nothing to wait for); ``join_end(ticket)`` ends it.
        Until then the jobs accepted are stamped with a later generation than the ticket's."""
        with _step(self._lock):
            if self._unfinished <= 0:
                return None
            if self._generation_size:  # jobs were stamped with it: they are older than this join
                self._older[self._generation] = self._generation_size
                self._generation += 1
                self._generation_size = 0
            self._joins += 1
            return self._generation - 1

    def _joined(self, ticket: int) -> bool:
        """Whether every job unfinished at the ``join_begin`` that gave ``ticket`` finished."""
        if self._unfinished != self._stamped:
            return False  # the base has jobs, all older than every join under way
        for generation in self._older:  # (oldest first)
            return generation > ticket
        return True

    def join_wait(self, ticket: Optional[int], timeout: Optional[float] = None) -> bool:
        """Wait until every job unfinished at the ``join_begin`` that gave ``ticket`` finished
        (retried and delayed ones included); False on timeout, or when closed first."""
        if ticket is None:
            return True
        deadline = None if timeout is None else time.monotonic() + timeout
        with _step(self._lock):
            while not self._joined(ticket):
                if self._closed:
                    return False
                remaining = _remaining(deadline)
                if remaining is not None and remaining <= 0.0:
                    return False
                self._all_done.wait(remaining)
            return True

    def join_end(self, ticket: Optional[int]) -> None:
        """The join that ``join_begin`` gave ``ticket`` is over: once no join is, jobs go unstamped."""
        if ticket is None:
            return
        with _step(self._lock):
            self._joins -= 1

    def join(self, timeout: Optional[float] = None) -> bool:
        """Wait until every job accepted before this call finished (``join_begin``, ``join_wait``,
        ``join_end``); jobs accepted meanwhile are not waited for. False on timeout or when closed first."""
        ticket = self.join_begin()
        try:
            return self.join_wait(ticket, timeout)
        finally:
            self.join_end(ticket)


# --- the delayed heap ---------------------------------------------------------


def _collect_due(heap: List[Tuple[float, int, Any]], index: int, now: float,
                 due: List[Tuple[float, int, Any]]) -> None:
    """Append the entries with run_at <= now in the subtree at ``index`` to ``due``."""
    if index < len(heap) and heap[index][0] <= now:
        due.append(heap[index])
        _collect_due(heap, 2 * index + 1, now, due)
        _collect_due(heap, 2 * index + 2, now, due)


_run_at_and_seq = operator.itemgetter(0, 1)


class DelayedHeap:
    """Jobs waiting for their run_at, earliest first; FIFO among equal run_at.

    With ``capacity`` > 0, pushing onto a full heap evicts and returns the job
    with the earliest run_at (the new job is always added).
    """

    def __init__(self, capacity: int = 0) -> None:
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0 (0 = unlimited), got {capacity}")
        self.capacity = capacity
        self._lock = threading.RLock()  # taken with _step
        self._heap: List[Tuple[float, int, Any]] = []  # guarded by _lock; a heapq
        self._seq = itertools.count()

    def close_forked(self) -> None:
        """In a fork()ed child (see ReadyQueue.close_forked): the lock is made free again."""
        reinit_after_fork(self._lock)

    def push(self, job: Any, run_at: float) -> Any:
        """Add ``job`` due at ``run_at``; return the evicted job, or None."""
        if not isinstance(run_at, (int, float)):
            raise TypeError(f"run_at must be a float, got {run_at!r}")
        entry = (float(run_at), next(self._seq), job)
        with _step(self._lock):
            if self.capacity and len(self._heap) >= self.capacity:
                return heapq.heapreplace(self._heap, entry)[2]  # pops the earliest, then adds
            heapq.heappush(self._heap, entry)
            return None

    def pop_due(self, now: float) -> List[Any]:
        """Remove and return, earliest first, every job with run_at <= now."""
        due = []
        with _step(self._lock):
            heap = self._heap
            while heap and heap[0][0] <= now:
                due.append(heapq.heappop(heap)[2])
        return due

    def pop_all(self) -> List[Any]:
        """Remove and return every job, earliest first."""
        with _step(self._lock):
            jobs = [entry[2] for entry in sorted(self._heap)]
            self._heap.clear()
        return jobs

    def remove(self, job_id: str, job: Any = None) -> Any:
        """Take the job whose ``_id`` is ``job_id`` out of the heap: the job, or None.

        With ``job``, only that job (another job may have its id by now).
        """
        with _step(self._lock):
            for index, entry in enumerate(self._heap):
                if entry[2]._id == job_id and (job is None or entry[2] is job):
                    self._heap[index] = self._heap[-1]
                    self._heap.pop()
                    heapq.heapify(self._heap)
                    return entry[2]
        return None

    def next_run_at(self) -> Optional[float]:
        with _step(self._lock):
            return self._heap[0][0] if self._heap else None

    def peek_due(self, now: float) -> Tuple[List[Any], int]:
        """``(the jobs with run_at <= now, earliest first, how many are not due)``, read at one
        moment and left in place: only the due entries are visited."""
        due: List[Tuple[float, int, Any]] = []
        with _step(self._lock):
            _collect_due(self._heap, 0, now, due)
            not_due = len(self._heap) - len(due)
        due.sort(key=_run_at_and_seq)  # (never compares the jobs)
        return [entry[2] for entry in due], not_due

    def __len__(self) -> int:
        return len(self._heap)


# --- sleeping until a deadline ----------------------------------------------


class Alarm:
    """A latched wake-up for one sleeper.

    ``armed_at`` is when the sleeper will wake on its own (in the clock the
    caller uses), or +inf while it is awake: ``wake_before(t)`` wakes it only
    when ``t`` is earlier, and a wake-up that arrives while it is awake is kept
    for its next ``sleep``.

    The latch is a raw lock, held while no wake-up is pending: waking is one C
    call, so an interruption (``interrupt_thread``) landing in a worker that is
    waking the watchdog can never leave it half done, as it could a Condition.
    """

    def __init__(self) -> None:
        self.armed_at = _INF
        self._no_wake_up = threading.Lock()  # held unless a wake-up is pending
        self._no_wake_up.acquire()

    def sleep(self, timeout: float, armed_at: float) -> None:
        self.armed_at = armed_at
        if timeout <= 0.0:
            self._no_wake_up.acquire(False)  # take a pending wake-up, if any
        elif timeout >= threading.TIMEOUT_MAX:
            self._no_wake_up.acquire()
        else:
            self._no_wake_up.acquire(True, timeout)
        self.armed_at = _INF

    def wake(self) -> None:
        try:
            self._no_wake_up.release()
        except RuntimeError:
            pass  # a wake-up is pending already

    def wake_before(self, when: float) -> None:
        if when < self.armed_at:
            self.wake()


# --- one worker -------------------------------------------------------------


class WorkerSlot:
    """The attempt one worker runs now, as the watchdog sees it.

    ``expire`` (watchdog) and ``end`` (worker) decide the attempt exactly once
    between them, under ``_lock``: ``end`` sees ``expired``, ``retired`` and
    ``interrupted`` all set or none.

    ``with slot:`` (the worker's thread only, see tinymq/_shield.py) shields
    tinymq's own code from an interruption: ``expire`` then defers it, and the
    outermost block raises it as it ends (or ``raise_deferred`` earlier).
    """

    __slots__ = ("_lock", "job", "type_state", "started", "deadline", "context", "expired",
                 "interrupted", "retired", "thread_id", "on_start", "on_succeeding", "on_success",
                 "on_switch", "shielded", "deferred", "forked")

    def __init__(self) -> None:
        self._lock = threading.RLock()  # taken with _step
        self.job: Any = None  # the running attempt's job, None between attempts
        self.type_state: Optional[TypeState] = None
        self.started = 0.0  # monotonic: when the running attempt's function was called (0.0 before)
        self.deadline = _INF  # monotonic; +inf until the function is called (the store writes its start first)
        self.context: Any = None
        self.expired = False  # the watchdog decided this attempt: its outcome is ignored
        self.interrupted = False  # JobTimeout was raised into the thread
        self.retired = False  # the worker leaves after this attempt
        self.thread_id = 0
        # Set in a fork()ed child whose only thread is this worker's (its function forked): see run_worker.
        self.forked = False
        self.on_start: Optional[Callable[[Any], None]] = None  # set by the dispatcher
        # Set by the dispatcher of a broker's queue: called before a success is counted; False when
        # the attempt is no longer this process's (its broker took it back): it counts nowhere.
        self.on_succeeding: Optional[Callable[[Any], bool]] = None
        self.on_success: Optional[Callable[[Any], None]] = None  # set by the dispatcher
        # Set by the dispatcher when a store commits a finished job's end and the next job's start
        # together: on_switch(finished, job) replaces on_success(finished) and on_start(job).
        self.on_switch: Optional[Callable[[Any, Any], None]] = None
        self.shielded = 0  # nested ``with slot:`` blocks the worker's thread is in (guarded by _lock)
        self.deferred = False  # an interruption came while shielded: JobTimeout is raised as it ends

    def begin(self, job: Any, state: TypeState, deadline: float, context: Any) -> None:
        with _step(self._lock):
            self.job, self.type_state, self.deadline, self.context = job, state, deadline, context
            self.started = 0.0  # until the function is called
            self.expired = self.interrupted = self.deferred = False

    def __enter__(self) -> "WorkerSlot":
        with _step(self._lock):
            self.shielded += 1
        return self

    def __exit__(self, *exc_info: object) -> None:
        with _step(self._lock):
            self.shielded -= 1
            deferred = self.deferred and not self.shielded
            if deferred:
                self.deferred = False
        if deferred:
            raise JobTimeout()

    def raise_deferred(self) -> None:
        """Raise, inside a shielded block, the JobTimeout that an interruption deferred, if one did."""
        with _step(self._lock):
            deferred, self.deferred = self.deferred, False
        if deferred:
            raise JobTimeout()

    def end(self) -> bool:
        """The function returned: True when the watchdog had already decided the attempt.

        An expired attempt's record stays for the watchdog, which reads it after
        ``expire`` while this thread may already be here.
        """
        with _step(self._lock):
            if self.expired:
                return True
            self.job = self.type_state = self.context = None
            self.deadline = _INF
            return False

    def expire(self, now: float, job: Any = None, cancel_in: Optional[ReadyQueue] = None,
               unregistered: bool = False) -> Any:
        """Decide a running attempt past its deadline as timed out: its job, or None.

        With ``job``, only that job's attempt (a cancel: ``now`` is +inf). An
        attempt that cancels itself is not interrupted: ``JobTimeout`` would be
        raised inside the cancel, before it ends the job; its context is cancelled.
        A thread inside ``with slot:`` is interrupted when the block ends.
        ``cancel_in`` (with ``job``): decided only if the cancel requested for ``job`` is
        taken there (``take_cancel``, counted) in the same step, so that the job is counted
        cancelled before its worker can see the decision and free the slot. ``unregistered``: the
        cancel is of a job registered under no id (``take_unregistered_cancel``).
        """
        with _step(self._lock):
            if self.job is None or self.expired or self.deadline > now or (job is not None and self.job is not job):
                return None
            if cancel_in is not None and not (  # (its lock inside this one)
                    cancel_in.take_unregistered_cancel(job) if unregistered else cancel_in.take_cancel(job)):
                return None
            self.expired = True
            self.retired = True
            state = self.type_state
            if state is not None and state.interrupt and self.thread_id != threading.get_ident():
                if self.shielded:
                    self.deferred = True  # tinymq's own code must not be cut midway
                else:
                    self.interrupted = interrupt_thread(self.thread_id, JobTimeout)
            job, context = self.job, self.context
        if context is not None:  # decided: the context's code may let the worker end meanwhile
            context._cancel("timed out")
        return job


def interrupt_thread(thread_id: int, exc_type: Optional[type]) -> bool:
    """Raise ``exc_type`` in another thread at its next bytecode.

    None clears it, but not for a thread's own: see drop_own_interruption.
    """
    exc = ctypes.py_object(exc_type) if exc_type is not None else None
    changed: int = ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), exc)
    return changed == 1


def drop_own_interruption() -> None:
    """Take back the interruption (JobTimeout) that may still be pending in the calling thread.

    Not by clearing it (``interrupt_thread(thread_id, None)``): on CPython 3.11 that signals
    the interpreter's eval breaker, which only a thread handling an async exception
    unsignals, so it stays set, and from then on every function called under
    ``sys.settrace`` (a debugger, coverage) spins at its first line. The thread raises
    DroppedInterruption into itself instead, replacing a pending JobTimeout, and handles it
    at once, which unsignals the flag.
    """
    try:
        interrupt_thread(threading.get_ident(), DroppedInterruption)
        let_it_land()
    except DroppedInterruption:
        pass


_GENERATORS = (types.GeneratorType, types.AsyncGeneratorType)


def _awaitable_or_generator(result: Any) -> bool:
    """Whether ``run_worker`` hands an executor's return value to ``dispatcher.returned``.

    Its type has ``__await__`` (a coroutine, a future), or it is a generator
    (whose body never ran). Any other value is a plain success, decided without
    leaving the loop.
    """
    return isinstance(result, _GENERATORS) or getattr(type(result), "__await__", None) is not None


def run_worker(ready: ReadyQueue, slot: WorkerSlot, watchdog: Alarm, dispatcher: Any) -> None:
    """Run attempts until the queue closes or the watchdog retires this worker.

    The fast path (success) stays here; everything else goes to ``dispatcher``:
    ``refresh_hooks(slot)``, ``new_context(job)``, ``returned(job, state, result, slot)``
    (a function returned an awaitable or a generator: ``_awaitable_or_generator``; True when it
    emptied ``slot`` and handed the rest of the attempt, with the type's slot, to the event loop:
    the worker goes on at once, and counts and frees nothing of it),
    ``attempt_failed(job, state, exc, holding, seconds)`` (``holding``: it frees the attempt's slot
    where it places or ends the job; ``seconds``: the attempt's duration, which it records),
    ``no_executor(job, state)``, ``after_expired(slot, exc)`` and ``end_cancelled(job)`` (a cancel
    came between the ready buffer and the attempt's start, or between its end and its success: the
    job ends as cancelled, its function not called again).
    """
    slot.thread_id = threading.get_ident()
    marks = ready.cancel_marks  # empty unless a cancel waits for a job's holder
    succeeded = 0
    waiter = _Waiter()  # this worker's, for every wait
    ready.enlist(waiter)
    finished = None  # a success whose on_success and task_done wait for the next start (on_switch)
    switch: Optional[Callable[[Any, Any], None]] = None
    while True:
        if finished is None:
            taken = job = None  # a worker waiting keeps no job alive
            taken = ready._pop(None, waiter)
        else:
            taken = ready._pop(0.0, waiter)  # the next job, if one is ready now
            switch = slot.on_switch
            if taken is None or switch is None or taken[1].fn is None:
                _settle(ready, slot, finished)
                finished = None
                if taken is None:
                    job = None
                    taken = ready._pop(None, waiter)
        if taken is None:
            return
        job, state = taken
        fn = state.fn
        if fn is None:
            dispatcher.no_executor(job, state)
            continue
        context = dispatcher.new_context(job) if state.takes_context else None  # its deadline: at the call
        error: Optional[BaseException] = None
        expired = False
        straight_back = False  # this worker pops again at once, taking the job its slot frees
        slot_kept = False  # the attempt ended, not timed out: its slot is freed where its job is counted or placed
        started = ended = 0.0  # monotonic: the function's call and return (started stays 0.0 until the call)
        cancelled = False  # a cancel was requested on its way here (after begin: a later one finds the slot)
        handed_over = False  # the rest of the attempt is the event loop's (dispatcher.returned)
        try:  # from begin() on, an interruption may land anywhere: the slot is released below
            slot.begin(job, state, _INF, context)  # no deadline yet: a slow start write is not the function's time
            try:
                decided = False  # cancelled while the store wrote its start: fn is not called
                if marks and ready.cancel_requested(job):
                    decided = cancelled = True
                    if finished is not None:
                        done, finished = finished, None
                        _settle(ready, slot, done)
                        done = None
                elif finished is not None:
                    done, finished = finished, None
                    try:
                        switch(done, job)  # type: ignore[misc]  # set: finished is kept only when it is
                    finally:
                        ready.task_done(done)
                        done = None
                    decided = slot.expired
                elif slot.on_start is not None:
                    slot.on_start(job)
                    decided = slot.expired
                if not decided:
                    # The timeout bounds the function: its clock starts now, after the store wrote the start.
                    started = slot.started = monotonic()
                    if state.timeout is not None:
                        slot.deadline = deadline = started + state.timeout
                        if context is not None:
                            context.deadline = deadline
                        watchdog.wake_before(deadline)
                    if context is None:
                        result = fn(job)
                    else:
                        result = fn(job, context)
                    if result is not None and _awaitable_or_generator(result):  # a function returning a coroutine
                        handed_over = dispatcher.returned(job, state, result, slot)
                    result = None
            except BaseException as exc:  # the attempt's failure, whatever it is
                error = exc
            if slot.forked:  # its function fork()ed and returned in the child: the queue is the parent's
                dispatcher.leave_forked_child(error)  # (ends the child: no lock of the queue is touched)
            if handed_over:  # the loop's attempt holds the type's slot now, and frees it as it ends
                slot_kept = True
                context = None
                continue
            ended = monotonic()
            if not started:  # it failed before its function was called: no time of its own
                started = ended
            expired = slot.end()
            if error is None and context is not None and not expired and context.cancelled:
                error = dispatcher.cancelled_return(job)  # stop() cancelled it: no success
            context = None
            if expired and slot.interrupted:
                drop_own_interruption()  # from here on nothing may land
            straight_back = (error is None and not expired and not cancelled
                             and (slot.on_success is None or slot.on_switch is not None))
            slot_kept = not expired  # (no interruption can land from here on)
        except JobTimeout as late:  # an interruption that landed after the function returned
            expired = slot.end() or True
            error = late
            straight_back = slot_kept = False
        finally:
            if not slot_kept:
                ready.release_state(state)
        if expired:
            dispatcher.after_expired(slot, error)
            return
        if cancelled:
            if ready.take_cancel(job, state):
                dispatcher.end_cancelled(job)
            else:  # (taken by another: never, while the slot has not expired)
                ready.release_state(state)
            continue
        if error is None:
            succeeding = slot.on_succeeding
            if succeeding is not None and not succeeding(job):  # not this process's: counted nowhere
                ready.release_state(state)
                ready.task_done(job)
                continue
            on_success = slot.on_success  # read once: refresh_hooks may change them below
            switching = slot.on_switch is not None
            if not ready.attempt_succeeded(state, ended - started, job, on_success is None and not switching,
                                           True, not straight_back):
                dispatcher.end_cancelled(job)  # a cancel came as it ended: it wins
                continue
            succeeded += 1
            if not succeeded % _REFRESH_EVERY:
                dispatcher.refresh_hooks(slot)
            if switching:
                finished = job  # its end is committed with the next job's start, or alone when none is ready
                continue
            if on_success is not None:
                try:  # finished whatever the store raises
                    on_success(job)
                finally:
                    ready.task_done(job)
        else:
            # It records the duration (unless stop() gave the attempt up) and frees the slot where it
            # places or ends the job.
            dispatcher.attempt_failed(job, state, error, True, ended - started)
            error = None


def _settle(ready: ReadyQueue, slot: WorkerSlot, job: Any) -> None:
    """End a success whose end waited for a next start that is not coming now: on_success, task_done."""
    try:
        on_success = slot.on_success
        if on_success is not None:
            on_success(job)
    finally:
        ready.task_done(job)
