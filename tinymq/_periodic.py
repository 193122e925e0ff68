"""Periodic jobs: ``q.every(...)`` and ``q.cron(...)``, one timer thread for all of a queue's schedules.

A schedule enqueues a new job at each of its ticks, from ``start_dispatcher``
on (a schedule registered later begins at once). The timer thread sleeps until
the earliest tick of any schedule and is woken by a registration; nothing polls.
The schedules wait in a heap by the time each is next due (to begin, or to fire), so a
wake and a registration cost O(log n) in the number of schedules; an entry of a
schedule removed or re-armed since it was pushed is skipped when it comes up.

- ``every`` ticks on the monotonic clock: tick k is due ``first delay + k * interval``
  after the schedule began, whatever the wall clock does meanwhile.
- ``cron`` ticks are wall-clock instants computed by ``croniter`` in the schedule's
  time zone (UTC unless given). A wait is measured on the monotonic clock but never
  trusted for longer than ``_WALL_CLOCK_RECHECK``: a stepped wall clock moves the tick.

No pile-up: a tick is skipped, and counted in the schedule's ``skipped``, while
the job of the schedule's previous fired tick is unfinished (queued, delayed,
running or waiting for a retry), or when the queue refuses its job (full): the refusals
in a row are logged as a Redis outage is, at most every ``_LOG_EVERY`` with their count.
A tick's job has a deterministic id, ``"<name>@<tick time, UTC ISO 8601>"``, and
the tag ``tinymq.schedule = <name>``: with a store, a recovered unfinished job
of the schedule is its previous job, and the same tick is never enqueued twice.
Over a broker (``tinymq.redis``) the ticks are claimed in Redis, so each fires
once across all processes (``tinymq/redis/_schedules.py``).
"""
import copy
import heapq
import itertools
import logging
import math
import re
import threading
import time
import weakref
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone, tzinfo
from typing import Any, Callable, Dict, Iterable, List, Optional, Protocol, Tuple, Union

from ._sections import reinit_after_fork
from .config import _positive_seconds
from .errors import _LOG_EVERY, DuplicateJob, PersistenceError, QueueFull, QueueStopped, _LastingCondition
from .job import Job, Priority, _as_priority, _as_run_at, _as_type

__all__ = ["Periodic", "ScheduleStats", "SCHEDULE_TAG", "cron_next", "tick_job_id", "tick_of_job_id"]

logger = logging.getLogger("tinymq")
MIN_INTERVAL = 0.001  # seconds: the shortest every() interval

SCHEDULE_TAG = "tinymq.schedule"  # the tag naming the schedule that enqueued a job
# The longest a cron wait relies on the monotonic clock keeping pace with the wall clock.
_WALL_CLOCK_RECHECK = 60.0
# A wall clock set back by more than this was wrong and is corrected (cron's own rule): a cron schedule
# goes on from the corrected time, instead of waiting, silent, until the clock reaches its last tick again.
# A smaller step back never fires a tick twice.
_CLOCK_SET_BACK = 3 * 3600.0
# The last instant a tick's job id can name (datetime's last year): a later first_at is a typo
# (1e300), never a tick, and over a broker it would set the grid every process joins.
_LAST_FIRST_AT = datetime(9999, 12, 31, 23, 59, 59, tzinfo=timezone.utc).timestamp()
_BEGIN_RETRY = 1.0  # seconds before a schedule whose backend failed to begin it tries again
_CRON_EXTRA_HINT = "q.cron() needs the croniter package: pip install 'tinymq[cron]'"
_CRON_FIELDS = 5  # minute hour day-of-month month day-of-week: croniter's extra 6th and 7th are refused
# croniter's random field ("R", "R(0-29)", "R/15"), redrawn by each croniter: a schedule that
# computes every tick afresh would move between ticks, and differ from process to process.
_CRON_RANDOM_ITEM = re.compile(r"r(\(\d+-\d+\))?(/\d+)?", re.IGNORECASE | re.ASCII)
_CRON_NICKNAMES = frozenset({"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"})


@dataclass(frozen=True)
class ScheduleStats:
    """One schedule, as ``Queue.schedules()`` reports it.

    ``fired`` counts ticks that enqueued a job, ``skipped`` ticks that did not
    (the previous job was unfinished, or the queue refused the job); with a
    broker both count this process's ticks only. ``next_run_at`` is the next
    tick in Unix epoch seconds (None before ``start_dispatcher``, after ``stop()``,
    once a cron expression names no later instant, and once the next tick could not be computed).
    """

    name: str
    job_type: str
    trigger: str
    next_run_at: Optional[float]
    fired: int
    skipped: int
    last_job_id: Optional[str]


def tick_job_id(name: str, tick_wall: float) -> str:
    """The id of the job of schedule ``name``'s tick at ``tick_wall`` (epoch seconds)."""
    moment = datetime.fromtimestamp(tick_wall, timezone.utc)
    return f"{name}@{moment.strftime('%Y-%m-%dT%H:%M:%S.%fZ')}"


def tick_of_job_id(job_id: str) -> Optional[float]:
    """The tick time (epoch seconds) in a tick's job id, or None if ``job_id`` is no such id."""
    _, _, moment = job_id.rpartition("@")
    try:
        return datetime.strptime(moment, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc).timestamp()
    except ValueError:
        return None


def _croniter() -> Any:
    try:
        from croniter import croniter
    except ImportError as exc:
        raise ImportError(_CRON_EXTRA_HINT) from exc
    return croniter


def _as_tz(tz: object) -> tzinfo:
    if tz is None:
        return timezone.utc
    if isinstance(tz, tzinfo):
        try:  # one that cannot place an instant in its zone would fail at every tick
            datetime.now(timezone.utc).astimezone(tz)
        except Exception as exc:
            raise ValueError(f"tz must be a tzinfo that converts times (e.g. zoneinfo.ZoneInfo), got {tz!r}: "
                             f"{exc!r}") from exc
        return tz
    if isinstance(tz, str):
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            return ZoneInfo(tz)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"tz must be an IANA time zone name (e.g. 'Europe/Berlin'), got {tz!r}: "
                             f"{exc} (install 'tzdata' where the system has no zone database)") from None
    raise TypeError(f"tz must be a tzinfo (e.g. zoneinfo.ZoneInfo), an IANA zone name or None, got {tz!r}")


def cron_next(expression: str, tz: tzinfo, after: float) -> float:
    """The first tick of ``expression`` in zone ``tz`` strictly after epoch ``after``; inf if none.

    A wall time that a DST jump skips runs at the jump; one that the clock
    passes twice runs at both instants (croniter's rule). Valid syntax may name
    no instant (February 30): then there is no tick, ``math.inf``.
    """
    iterator = _croniter()(expression, datetime.fromtimestamp(after, tz))
    from croniter import CroniterBadDateError

    try:
        return float(iterator.get_next(float))
    except CroniterBadDateError:
        return math.inf


class _Trigger(Protocol):
    description: str

    def first(self, now_mono: float, now_wall: float, fired_until: float) -> "_Tick":
        """The first tick from now on; never one at or before ``fired_until`` (a tick already fired)."""

    def after(self, tick: "_Tick", now_mono: float, now_wall: float) -> "_Tick": ...


@dataclass(frozen=True)
class _Tick:
    due: float  # monotonic time the timer wakes for it
    wall: float  # the tick as epoch seconds: its job's run_at and id
    index: int  # every: k, the tick's place on the schedule's grid; cron: -1
    since: float = -math.inf  # cron: the wall time it is the first tick after (the tick fired before, or now)


_NO_TICK = _Tick(math.inf, math.inf, -1)  # a schedule's tick once it has no next one: never due


class _Every:
    def __init__(self, interval: float, first_due: Optional[float], first_at: Optional[float]) -> None:
        self.interval = interval
        self.first_due = first_due  # monotonic time of first_at (from when every() was called), or None
        self.first_at = first_at  # first_at as given (epoch seconds), or None: with interval, its definition
        self.description = f"every {interval:g}s"

    def first(self, now_mono: float, now_wall: float, fired_until: float) -> _Tick:
        # A new series: ticks on the monotonic clock do not survive a restart.
        if self.first_due is None:
            due = now_mono + self.interval
        else:
            due = max(self.first_due, now_mono)  # a first_at that passed before the start fires at it
        return _Tick(due, now_wall + (due - now_mono), 0)

    def after(self, tick: _Tick, now_mono: float, now_wall: float) -> _Tick:
        # Ticks the timer overslept (a blocked store, a suspended machine) are merged into one.
        steps = max(1, math.floor((now_mono - tick.due) / self.interval) + 1)
        due = tick.due + steps * self.interval
        return _Tick(due, now_wall + (due - now_mono), tick.index + steps)


class _Cron:
    def __init__(self, expression: str, tz: tzinfo) -> None:
        self.expression = expression
        self.tz = tz
        self.description = f"cron {expression!r} ({tz})"

    def _next(self, fired_until: float, now_mono: float, now_wall: float) -> _Tick:
        # Strictly after both the tick fired last and now: a tick is never fired twice, a missed one
        # not made up; unless the clock was set back far before that tick (see _CLOCK_SET_BACK).
        since = now_wall if fired_until - now_wall > _CLOCK_SET_BACK else max(fired_until, now_wall)
        wall = cron_next(self.expression, self.tz, since)
        return _Tick(now_mono + (wall - now_wall), wall, -1, since)

    def again(self, tick: _Tick, now_mono: float, now_wall: float) -> _Tick:
        """``tick``, its wait measured again from the wall clock now (a stepped clock moves it)."""
        return _Tick(now_mono + (tick.wall - now_wall), tick.wall, -1, tick.since)

    def first(self, now_mono: float, now_wall: float, fired_until: float) -> _Tick:
        return self._next(fired_until, now_mono, now_wall)

    def after(self, tick: _Tick, now_mono: float, now_wall: float) -> _Tick:
        return self._next(tick.wall, now_mono, now_wall)

    def set_back(self, tick: _Tick, now_wall: float) -> bool:
        """The wall clock was set back far before the tick fired before ``tick`` (see _CLOCK_SET_BACK)."""
        return tick.since - now_wall > _CLOCK_SET_BACK


class _Schedule:
    """One registered schedule.

    ``tick``, ``begun``, ``rejoin``, ``begin_at``, ``entry`` and the counters are guarded by Periodic._lock;
    ``active`` and ``last_job_id`` change only under Periodic._firing.
    """

    def __init__(self, name: str, job_type: str, payload: Any, priority: Priority, trigger: Any) -> None:
        self.name = name
        self.job_type = job_type
        self.payload = payload
        self.priority = priority
        self.trigger = trigger
        self.tick: Optional[_Tick] = None  # None until the schedule begins
        self.begun = False  # the backend has placed the first tick (a broker: on the shared grid)
        self.rejoin = False  # a broker holds another grid of it: it joins that one, whatever it is
        self.begin_at = 0.0  # monotonic time to (try to) begin it
        self.fired = 0
        self.skipped = 0
        self.last_job_id: Optional[str] = None
        self.active = True  # cleared by unschedule, under Periodic._firing
        # Ticks whose job the queue refused (in a row, since a tick fired). Changed only under Periodic._firing.
        self.refused = _LastingCondition()
        self.entry = -1  # the sequence number of its live entry in Periodic._heap (-1: none)

    def new_job_at(self, tick_wall: float) -> Job:
        """The job of the tick at ``tick_wall`` (epoch seconds): due now, named after the tick."""
        return Job(self.job_type, copy.deepcopy(self.payload), priority=self.priority,
                   tags={SCHEDULE_TAG: self.name}, id=tick_job_id(self.name, tick_wall))

    def stats(self, stopped: bool) -> ScheduleStats:
        tick = None if stopped else self.tick  # a stopped queue fires no more ticks
        return ScheduleStats(self.name, self.job_type, self.trigger.description,
                             None if tick is None or tick.wall == math.inf else tick.wall, self.fired,
                             self.skipped, self.last_job_id)


class TickBackend(Protocol):
    """How a tick turns into a job: in-process (below) or over a broker (tinymq.redis)."""

    def begin(self, schedule: _Schedule, first: _Tick, rejoin: bool) -> Optional[_Tick]:
        """The schedule begins; returns its first tick (a broker aligns it with other processes'), or
        None when the broker could not be reached (it logged that): tried again in _BEGIN_RETRY.
        ``rejoin``: after "regrid", join the broker's grid even if it was set for another definition."""

    def fire(self, schedule: _Schedule, tick: _Tick) -> str:
        """Enqueue the tick's job: "fired", "busy" (the previous job is unfinished), "taken",
        "regrid" (a broker: the tick is not on the grid other processes tick on; begin it again),
        "ahead" (a broker: not claimed, the tick is far ahead of the broker's clock; counted as skipped),
        or "unreachable" (a broker it could not reach, which logged that; counted as skipped)."""

    def check(self, schedule: _Schedule) -> None:
        """Raise TypeError/ValueError, naming the schedule, when its jobs cannot be enqueued."""

    def unfinished(self, job_id: str) -> bool:
        """Whether this process is to remember ``job_id``, an unscheduled schedule's last job, as the
        previous job of a schedule registered again under its name: while it is unfinished in-process;
        never with a broker, where the previous job is kept in Redis."""


def check_storable(store: Any, schedule: _Schedule) -> None:
    """Raise TypeError/ValueError, naming the schedule, when ``store`` would refuse its ticks' jobs
    (a payload its serializer cannot encode, text SQLite cannot keep): each tick's enqueue would
    fail. A store without ``_check_storable`` (not a SQLitePersistence) decides at each save."""
    check = getattr(store, "_check_storable", None)
    if check is None:
        return
    try:
        check(schedule.new_job_at(time.time()))
    except PersistenceError as exc:  # the serializer's own error is its cause: a payload of the wrong kind
        error = TypeError if exc.__cause__ is not None else ValueError
        raise error(f"schedule {schedule.name!r}: {exc}") from exc


class _LocalTicks:
    """The queue's own core knows every unfinished job id: the previous job is busy while it has it."""

    def __init__(self, queue: Any) -> None:
        self._queue = weakref.ref(queue)

    def begin(self, schedule: _Schedule, first: _Tick, rejoin: bool) -> Optional[_Tick]:
        return first

    def check(self, schedule: _Schedule) -> None:
        queue = self._queue()
        if queue is not None:
            check_storable(queue._store, schedule)

    def unfinished(self, job_id: str) -> bool:
        queue = self._queue()
        return queue is not None and queue._ready.has_id(job_id)

    def fire(self, schedule: _Schedule, tick: _Tick) -> str:
        queue = self._queue()
        if queue is None:
            raise QueueStopped("the queue was garbage-collected")
        previous = schedule.last_job_id
        if previous is not None and queue._ready.has_id(previous):
            return "busy"
        job = schedule.new_job_at(tick.wall)
        try:
            queue.enqueue(job)
        except DuplicateJob:  # this very tick's job, recovered from a store and unfinished
            schedule.last_job_id = job.id
            return "busy"
        schedule.last_job_id = job.id
        return "fired"


_Now = Callable[[], float]


class Periodic:
    """A queue's schedules and the one timer thread that fires them."""

    def __init__(self, queue: Any, monotonic: _Now = time.monotonic, wall: _Now = time.time) -> None:
        self._queue = weakref.ref(queue, self._queue_gone)  # the timer never keeps the queue alive
        self._monotonic = monotonic
        self._wall = wall
        self.backend: TickBackend = _LocalTicks(queue)  # a broker's Queue sets its own
        # Reentrant: the weakref callback that stops the timer may run (as garbage collection)
        # in a thread that holds it.
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)  # a schedule was added or removed, or stop
        # Guarded by _lock: the schedules by name, the lifecycle, the timer thread.
        self._schedules: Dict[str, _Schedule] = {}
        # Guarded by _lock: (due, sequence number, schedule), the monotonic time the timer is to look
        # at the schedule; an entry whose number is not its schedule's ``entry`` is stale (skipped).
        self._heap: List[Tuple[float, int, _Schedule]] = []
        self._sequence = itertools.count()
        self._stale = 0  # entries left stale by unschedule (the heap is rebuilt when they are most of it)
        self._started = False
        self._stopped = False
        self._thread: Optional[threading.Thread] = None
        # Held while a tick is fired: unschedule() takes it, so no job is enqueued once it returns.
        # Reentrant: a failure callback run by that enqueue (an eviction) may call unschedule().
        self._firing = threading.RLock()
        # Schedule name -> the id of its latest job a store gave back (the id names its tick), until the
        # schedule registered under that name begins (_begin): its previous job, and its tick fired last.
        # Guarded by _lock.
        self._recovered: Dict[str, str] = {}
        # Schedule name -> the last job of an unscheduled schedule, while it is unfinished (backend.unfinished):
        # a schedule registered again under the name (another interval) takes it as its previous job (no
        # pile-up). A finished one is needed no more: unschedule drops those, looking at all of them
        # once per as many calls as it kept last time (amortized O(1)), so an app that adds and removes
        # a schedule per user keeps no entry per name. Guarded by _lock.
        self._unscheduled: Dict[str, str] = {}
        self._sweep_in = 1  # unschedule calls until it looks at every entry of _unscheduled again

    # --- registering -------------------------------------------------------------

    def every(self, interval: Union[float, timedelta], job_type: str, payload: Any, name: Optional[str],
              priority: Any, first_at: Any) -> str:
        seconds = _positive_seconds("interval", interval)
        if seconds < MIN_INTERVAL:  # each tick is a wake-up of the timer thread, even a skipped one
            raise ValueError(f"interval must be at least {MIN_INTERVAL} s, got {interval!r}")
        if self._wall() + seconds > _LAST_FIRST_AT:  # a tick one interval away, refused as such a first_at is
            raise ValueError(f"interval must put the first tick no later than 9999-12-31 UTC (the last time a "
                             f"tick's job id can name), got {interval!r}")
        job_type = _as_type(job_type)
        first_due = first_epoch = None
        if first_at is not None:  # as run_at: a delay from now, on the monotonic clock
            first_epoch = _as_run_at(first_at, "first_at")
            if first_epoch > _LAST_FIRST_AT:
                raise ValueError(f"first_at must be no later than 9999-12-31 UTC (the last time a tick's job "
                                 f"id can name), got {first_at!r}")
            first_due = self._monotonic() + max(0.0, first_epoch - self._wall())
        return self._add(name if name is not None else job_type, job_type, payload, priority,
                         _Every(seconds, first_due, first_epoch))

    def cron(self, expression: str, job_type: str, payload: Any, name: Optional[str], priority: Any,
             tz: Any) -> str:
        if not isinstance(expression, str):
            raise TypeError(f"cron expression must be a str like '*/5 * * * *', got {expression!r}")
        expression = str.__str__(expression)  # (its text, as a name's: in the default name and description)
        croniter = _croniter()
        job_type = _as_type(job_type)
        zone = _as_tz(tz)
        fields = expression.split()
        if len(fields) != _CRON_FIELDS and not (len(fields) == 1 and fields[0].lower() in _CRON_NICKNAMES):
            # croniter reads a 6th field as seconds, last: "0 */5 * * * *", seconds first as other
            # tools write it, would fire every second. Refused rather than guessed.
            raise ValueError(f"cron expression {expression!r} has {len(fields)} fields; q.cron() takes the "
                             "5 standard ones (minute hour day-of-month month day-of-week) or a nickname "
                             "such as '@daily', not a seconds or a year field")
        if any(_CRON_RANDOM_ITEM.fullmatch(item) for field in fields for item in field.split(",")):
            raise ValueError(f"cron expression {expression!r} has a random ('R') field, which would be "
                             "drawn again at every tick (and in every process); write the value you want")
        if not croniter.is_valid(expression):
            raise ValueError(f"invalid cron expression {expression!r}")
        if cron_next(expression, zone, self._wall()) == math.inf:
            raise ValueError(f"cron expression {expression!r} never fires in {zone} "
                             "(a date that does not exist, such as February 30)")
        return self._add(name if name is not None else f"{job_type} {expression}", job_type, payload,
                         priority, _Cron(expression, zone))

    def _add(self, name: str, job_type: str, payload: Any, priority: Any, trigger: Any) -> str:
        if not isinstance(name, str):
            raise TypeError(f"schedule name must be a str, got {name!r}")
        if not name:
            raise ValueError(f"schedule name must be a non-empty str, got {name!r}")
        name = str.__str__(name)  # its text, as a job type's (a str Enum member: its value, in ids and tags alike)
        priority = _as_priority(priority)
        try:  # kept as registered (the caller may change or reuse its object), and copied for each tick
            payload = copy.deepcopy(payload)
        except Exception as exc:
            raise TypeError(f"payload of schedule {name!r} cannot be copied for each tick: {exc!r}") from exc
        schedule = _Schedule(name, job_type, payload, priority, trigger)
        with self._lock:
            # Under the lock check_store reads the schedules with: a set_persistence that sets its
            # store (_StoreLoading, then the store) after this check finds the schedule there.
            self.backend.check(schedule)
            if self._stopped:
                raise QueueStopped("the queue is stopped")
            if name in self._schedules:
                raise ValueError(f"a schedule named {name!r} exists already; pass another name= "
                                 "or unschedule it first")
            if self._started:  # before anything changes: with no thread left, nothing is registered
                self._ensure_thread()
            recovered = self._recovered.get(name)
            previous = self._unscheduled.pop(name, None)
            if previous is not None:
                schedule.last_job_id = previous
            elif recovered is not None:
                schedule.last_job_id = recovered
            self._schedules[name] = schedule
            if self._started:
                self._begin(schedule)
                self._changed.notify()
        logger.info("schedule %r: %s enqueues %r jobs", name, trigger.description, job_type)
        return name

    def check_store(self, store: Any) -> None:
        """``set_persistence(store)``: raise as ``every``/``cron`` would with the store set, when it
        would refuse the jobs of a schedule registered before it."""
        with self._lock:
            schedules = list(self._schedules.values())
        for schedule in schedules:
            check_storable(store, schedule)

    def unschedule(self, name: str) -> bool:
        """Remove schedule ``name``: True if it existed. No tick of it enqueues a job after this returns."""
        with self._firing, self._lock:
            schedule = self._schedules.pop(name, None)
            if schedule is None:
                return False
            schedule.active = False
            if schedule.entry >= 0:
                schedule.entry = -1
                self._stale += 1
                if self._stale > len(self._heap) // 2:
                    self._heap = [entry for entry in self._heap if entry[1] == entry[2].entry]
                    heapq.heapify(self._heap)
                    self._stale = 0
            if schedule.last_job_id is not None and self.backend.unfinished(schedule.last_job_id):
                self._unscheduled[name] = schedule.last_job_id
            self._sweep_in -= 1
            if self._sweep_in <= 0:
                unfinished = self.backend.unfinished
                self._unscheduled = {key: job_id for key, job_id in self._unscheduled.items()
                                     if unfinished(job_id)}
                self._sweep_in = max(1, len(self._unscheduled))
            self._changed.notify()
        logger.info("schedule %r removed", name)
        return True

    def schedules(self) -> List[ScheduleStats]:
        with self._lock:
            return [schedule.stats(self._stopped) for schedule in self._schedules.values()]

    def recovered(self, jobs: Iterable[Job]) -> None:
        """Jobs a store gave back: a schedule's latest one is its previous job (no pile-up), and its
        tick the last one fired. Kept by id until the schedule of that name begins."""
        with self._lock:
            for job in jobs:
                tags = job._tags
                name = tags.get(SCHEDULE_TAG) if tags else None
                if name is None:
                    continue
                known = self._recovered.get(name)
                if known is None or (tick_of_job_id(job.id) or -math.inf) >= (tick_of_job_id(known) or -math.inf):
                    self._recovered[name] = job.id
                schedule = self._schedules.get(name)
                if schedule is not None and schedule.last_job_id is None:
                    schedule.last_job_id = self._recovered[name]
                if schedule is not None and self._started:  # it has begun: no later call reads the entry
                    del self._recovered[name]

    # --- running -----------------------------------------------------------------

    def start(self) -> None:
        """start_dispatcher() was called: every schedule begins now."""
        with self._lock:
            if self._started or self._stopped:
                return
            self._started = True
            for schedule in self._schedules.values():
                self._begin(schedule)
            if self._schedules:
                self._ensure_thread()

    def reinit_in_forked_child(self) -> None:
        """In a fork()ed child: the locks a thread of the parent (the timer, a caller) may have held at
        the fork are made free again; it would never release them there, where stop() takes _lock.
        A started queue's copy fires nothing there (its timer thread is the parent's): it refuses
        schedules (QueueStopped), as the copy refuses jobs, and shows no next tick."""
        reinit_after_fork(self._changed)  # (its lock is _lock)
        reinit_after_fork(self._firing)
        if self._started:  # (no lock: only the forking thread runs in the child)
            self._stopped = True

    def stop(self, timeout: Optional[float] = None) -> None:
        """No tick fires from now on; wait up to ``timeout`` seconds for the timer thread to end
        (a tick being enqueued, whose store may be slow to save it, then ends as any producer's
        enqueue racing stop(): placed, or refused with QueueStopped)."""
        with self._lock:
            self._stopped = True
            self._changed.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _queue_gone(self, _ref: Any) -> None:
        with self._lock:
            self._stopped = True
            self._changed.notify()

    def _begin(self, schedule: _Schedule) -> None:
        """The schedule's first tick counts from now; the timer thread has the backend place it.

        Called with _lock held.
        """
        now_mono = self._monotonic()
        # Served once the schedule begins: a schedule registered again under the name later has the
        # ticks fired since, and its previous job from unschedule (_unscheduled), not this stale one.
        recovered = self._recovered.pop(schedule.name, None)
        fired_until = -math.inf if recovered is None else (tick_of_job_id(recovered) or -math.inf)
        try:
            schedule.tick = schedule.trigger.first(now_mono, self._wall(), fired_until)
        except Exception:
            self._no_next_tick(schedule)
        schedule.begin_at = now_mono
        self._arm(schedule, now_mono)

    def _arm(self, schedule: _Schedule, at: float) -> None:
        """The timer looks at ``schedule`` at monotonic time ``at`` (never: inf); its earlier entry,
        if any, goes stale. Called with _lock held."""
        schedule.entry = -1
        if at == math.inf or not schedule.active:
            return
        schedule.entry = next(self._sequence)
        heapq.heappush(self._heap, (at, schedule.entry, schedule))

    def _no_next_tick(self, schedule: _Schedule) -> None:
        """Computing the next tick of ``schedule`` raised (a time zone that fails from some date on,
        croniter): logged once, and it fires no more ticks (its due tick, kept, would fire again at
        every pass of the timer). Called with _lock held, in an except clause."""
        logger.exception("schedule %r: its next tick could not be computed (%s); it fires no more ticks "
                         "(unschedule it, and register it again once fixed)", schedule.name,
                         schedule.trigger.description)
        schedule.tick = _NO_TICK

    def _place_first_tick(self, schedule: _Schedule, first: _Tick) -> None:
        """Outside _lock: a broker's backend asks Redis where the shared grid is (``first``: the
        schedule's tick, read under _lock)."""
        try:
            tick = self.backend.begin(schedule, first, schedule.rejoin)
        except QueueStopped:
            raise
        except Exception:
            logger.exception("schedule %r could not begin; trying again in %gs", schedule.name, _BEGIN_RETRY)
            tick = None
        if tick is None:
            with self._lock:
                schedule.begin_at = self._monotonic() + _BEGIN_RETRY
                self._arm(schedule, schedule.begin_at)
            return
        with self._lock:
            schedule.tick = tick
            schedule.begun = True
            schedule.rejoin = False
            self._arm(schedule, self._look_at(tick, self._monotonic()))

    def _ensure_thread(self) -> None:
        """Start the timer thread, unless it runs. The system may have no thread to give (RuntimeError):
        then there is none still, and a later call tries again. Called with _lock held."""
        if self._thread is None:
            thread = threading.Thread(target=self._run, name="tinymq-periodic", daemon=True)
            thread.start()
            self._thread = thread

    def _run(self) -> None:
        while True:
            try:
                work = self._wait_for_work()
                if work is None:
                    return
                to_begin, due = work
                for schedule, first in to_begin:
                    self._place_first_tick(schedule, first)
                for schedule in due:
                    self._fire(schedule)
            except QueueStopped:
                return
            except Exception:  # pragma: no cover - a bug; keep the schedules going
                logger.exception("tinymq periodic timer error")
                with self._lock:
                    self._changed.wait(1.0)

    def _is_due(self, tick: _Tick, now_mono: float, now_wall: float) -> bool:
        return tick.due <= now_mono and (tick.index >= 0 or tick.wall <= now_wall)

    def _look_at(self, tick: _Tick, now_mono: float) -> float:
        """When the timer is to look at a begun schedule whose next tick is ``tick``: at the tick, and
        for cron, whose tick is due by the wall clock, no later than a recheck of that clock; never
        once it has no next tick."""
        if tick is _NO_TICK or tick.index >= 0:
            return tick.due
        return min(tick.due, now_mono + _WALL_CLOCK_RECHECK)

    def _wait_for_work(self) -> Optional[Tuple[List[Tuple[_Schedule, _Tick]], List[_Schedule]]]:
        """Sleep until a schedule is to begin or a tick is due: (to begin, with its tick; due), or None
        once stopped."""
        with self._lock:
            while not self._stopped:
                now_mono, now_wall = self._monotonic(), self._wall()
                to_begin: List[Tuple[_Schedule, _Tick]] = []
                due: List[_Schedule] = []
                heap = self._heap
                while heap and heap[0][0] <= now_mono:
                    _, entry, schedule = heapq.heappop(heap)
                    if entry != schedule.entry:
                        if not schedule.active:
                            self._stale -= 1
                        continue
                    schedule.entry = -1  # (armed again once begun or fired)
                    tick = schedule.tick
                    if tick is None:  # (not expected: a schedule has its tick from the moment it is armed)
                        continue
                    if not schedule.begun:  # (its tick, provisional, is placed as it begins: not waited for)
                        to_begin.append((schedule, tick))
                    elif self._is_due(tick, now_mono, now_wall):
                        due.append(schedule)
                    else:  # cron: due by the wall clock, rechecked now and then
                        tick = schedule.tick = self._cron_again(schedule, tick, now_mono, now_wall)
                        self._arm(schedule, self._look_at(tick, now_mono))
                if to_begin or due:
                    return to_begin, due
                wake_at = heap[0][0] if heap else math.inf
                # A tick further away than the longest wait a lock takes (about 292 years) is waited
                # for in steps of that.
                self._changed.wait(None if wake_at == math.inf
                                   else min(threading.TIMEOUT_MAX, max(0.0, wake_at - now_mono)))
            return None

    def _cron_again(self, schedule: _Schedule, tick: _Tick, now_mono: float, now_wall: float) -> _Tick:
        """A cron schedule's next tick, by the wall clock now: the first from now on once the clock
        was set back far (logged), else the same tick. Called with _lock held."""
        trigger: _Cron = schedule.trigger  # (called for cron schedules only)
        if not trigger.set_back(tick, now_wall):
            return trigger.again(tick, now_mono, now_wall)
        logger.warning("schedule %r: the wall clock was set back by %gs; its ticks go on from the corrected "
                       "time", schedule.name, tick.since - now_wall)
        try:
            return trigger.first(now_mono, now_wall, -math.inf)
        except Exception:
            self._no_next_tick(schedule)
            return _NO_TICK

    def _log_refused(self, schedule: _Schedule, exc: Exception) -> None:
        """The queue refused the job of ``schedule``'s tick (skipped, and counted): logged as a Redis
        outage is, the first refusal in a row at once, then at most once per _LOG_EVERY with the count
        since the last record. Called with _firing held, in an except clause."""
        count = schedule.refused.seen(self._monotonic(), _LOG_EVERY)
        if count is None:
            return
        again = ("" if schedule.refused.in_row == 1 else
                 f" ({count} ticks skipped since the last log record, this one included)")
        if isinstance(exc, QueueFull):
            logger.warning("schedule %r skipped a tick: %s%s; logged at most every %gs while it lasts",
                           schedule.name, exc, again, _LOG_EVERY)
        else:
            logger.exception("schedule %r could not enqueue its tick's job; the tick is skipped%s; logged at "
                             "most every %gs while it lasts", schedule.name, again, _LOG_EVERY)

    def _fire(self, schedule: _Schedule) -> None:
        with self._firing:
            with self._lock:
                tick = schedule.tick
                if not schedule.active or self._stopped or tick is None or not schedule.begun:
                    return
            try:
                outcome = self.backend.fire(schedule, tick)
            except QueueStopped:
                raise
            except QueueFull as exc:
                outcome = "refused"
                self._log_refused(schedule, exc)
            except Exception as exc:
                outcome = "refused"
                self._log_refused(schedule, exc)
            if outcome in ("fired", "taken") and schedule.refused.in_row:  # (the queue takes its jobs again)
                logger.info("schedule %r enqueues its ticks' jobs again, after %d skipped ticks whose job the "
                            "queue refused (%d since the last log record)", schedule.name,
                            schedule.refused.in_row, schedule.refused.unlogged)
                schedule.refused.reset()
            with self._lock:
                if outcome == "regrid":  # (a broker holds another grid of the schedule: join it)
                    logger.warning("schedule %r: Redis holds another grid of its ticks (it lost its data, or "
                                   "a process began the schedule with another first_at, while this process "
                                   "ticked); this process joins it", schedule.name)
                    schedule.begun = False
                    schedule.rejoin = True
                    schedule.begin_at = self._monotonic()
                    self._arm(schedule, schedule.begin_at)
                    return
                if outcome == "fired":
                    schedule.fired += 1
                    if logger.isEnabledFor(logging.DEBUG):
                        logger.debug("schedule %r enqueued job %s", schedule.name, schedule.last_job_id)
                elif outcome != "taken":  # "taken": another process fired this tick
                    schedule.skipped += 1
                    if outcome == "busy" and logger.isEnabledFor(logging.DEBUG):
                        logger.debug("schedule %r skipped a tick: its previous job %s is unfinished",
                                     schedule.name, schedule.last_job_id)
                try:
                    schedule.tick = schedule.trigger.after(tick, self._monotonic(), self._wall())
                except Exception:
                    self._no_next_tick(schedule)
                    return
                self._arm(schedule, self._look_at(schedule.tick, self._monotonic()))
                if schedule.tick.wall == math.inf:  # (croniter found no later instant: not expected)
                    logger.warning("schedule %r has no further tick: %s names no later instant",
                                   schedule.name, schedule.trigger.description)
