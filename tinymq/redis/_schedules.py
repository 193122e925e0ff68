"""Periodic jobs over the broker: each tick of a schedule fires once across all processes.

Every process that started a dispatcher runs its own timer (tinymq/_periodic.py);
at a tick, it claims the tick in Redis (``schedule_tick.lua``), and the call that
claims it enqueues the tick's job, by the rules of any enqueue: no moment exists
at which a tick is claimed and its job not yet enqueued. The claim also applies
the no-pile-up rule against the schedule's previous job, whichever process
enqueued it.

Ticks must mean the same instant in every process: a ``cron`` tick is its wall-clock
time; an ``every`` schedule's ticks lie on a grid kept in Redis on the server's
clock (``schedule_begin.lua``), tick k at ``anchor + k * interval``, which each
process maps onto its own monotonic clock when the schedule begins (a new grid's anchor is
first_at itself, on the server's clock, or an interval from the server's now without one: no
host's wall clock enters it). The grid records what it
was set for (the interval, and first_at: ``_definition``): a process that begins the schedule
with another sets a new one, so a grid set far ahead by a wrong first_at goes once it is
corrected; a process told "regrid" joins the grid Redis holds as it is. A tick is claimed
by its time in microseconds, of either kind: a schedule that changes kind under its
name (a deploy, a rollback) finds no claim of the other kind "later" than its ticks.
The server's clock arbitrates the hosts' wall clocks: a ``cron`` tick more than
``_CLOCK_SET_BACK`` ahead of it is not claimed (its process's clock is wrong; once
corrected, its claim would have held every process's ticks back for as long). That
wrong clock is the process's, whichever schedule's tick shows it: logged as the
ticks the queue refuses are, the first at once, then at most every ``_LOG_EVERY``
with the count since, and at INFO once a cron tick is claimed again.
An ``every`` tick's claim carries its grid: Redis that lost its data keeps it again, and a
process whose grid is not the one Redis holds (of the same interval: Redis lost its data, and
a process that began since set a new one) is told so ("regrid") and joins Redis's.
"""
import logging
import math
import os
import time
import weakref
from typing import Any, Dict, Optional, Tuple

from .._periodic import _CLOCK_SET_BACK, _Tick
from ..errors import _LOG_EVERY, QueueStopped, _buffer_full, _LastingCondition
from ._codec import encode_job, unsendable
from ._link import _call_deadline, _look_deadline, job_row

__all__ = ["BrokerTicks"]

logger = logging.getLogger("tinymq")

_US = 1_000_000


class BrokerTicks:
    """The TickBackend of a Queue built with a RedisBroker (see tinymq/_periodic.py)."""

    def __init__(self, link: Any, queue: Any) -> None:
        self._link = link
        self._queue = weakref.ref(queue)  # the timer never keeps the queue alive
        # Schedule name -> (anchor, interval: server us; the definition the grid was set for).
        self._grids: Dict[str, Tuple[int, int, str]] = {}
        self._claims = 0
        self._token_prefix = os.urandom(8).hex()
        self._redis_error = __import__("redis").RedisError
        # Cron ticks not claimed as "ahead" of the server's clock (in a row, since one was claimed).
        # Changed only in fire(), which Periodic._firing calls for one tick at a time.
        self._ahead = _LastingCondition()

    def begin(self, schedule: Any, first: _Tick, rejoin: bool) -> Optional[_Tick]:
        trigger = schedule.trigger
        if first.index < 0:  # cron: wall-clock ticks mean the same instant everywhere
            return first
        interval_us = max(1, round(trigger.interval * _US))
        first_delay_us = round((first.due - time.monotonic()) * _US)
        definition = _definition(trigger)
        monotonic_before = time.monotonic()
        try:
            # (As enqueue's: a call a frozen server did not answer within the socket timeout is not sent
            # again, and stop() waits for it.)
            anchor_us, interval_us, server_us = self._link.broker._call_resending(
                self._link.scripts.schedule_begin, schedule.name, interval_us, max(0, first_delay_us), definition,
                rejoin, _first_at_us(trigger), deadline=_call_deadline(None))
        except self._redis_error as exc:  # (logged as the workers log an outage: not at every try)
            self._link._log_outage(f"beginning schedule {schedule.name!r}", exc)
            return None
        monotonic_now = (monotonic_before + time.monotonic()) / 2  # the reply's instant, give or take
        anchor, interval, server_now = anchor_us / _US, interval_us / _US, server_us / _US
        self._grids[schedule.name] = (anchor_us, interval_us, definition)
        index = max(0, math.ceil((server_now - anchor) / interval))
        due_server = anchor + index * interval
        return _Tick(monotonic_now + (due_server - server_now), time.time() + (due_server - server_now), index)

    def unfinished(self, job_id: str) -> bool:
        """Never: the schedule's previous job is kept in Redis (its hash), for every process."""
        return False

    def check(self, schedule: Any) -> None:
        """A tick's job goes to Redis as JSON text: refuse a payload that is not JSON, or has text
        Redis cannot take, as enqueue would."""
        job = schedule.new_job_at(time.time())
        try:
            encode_job(job)
        except TypeError as exc:
            raise TypeError(f"schedule {schedule.name!r}: {exc}") from exc
        error = unsendable([job])
        if error is not None:
            raise ValueError(f"schedule {schedule.name!r}: {error}")

    def fire(self, schedule: Any, tick: _Tick) -> str:
        queue = self._queue()
        if queue is None:
            raise QueueStopped("the queue was garbage-collected")
        link = self._link
        if link.dispatcher.stopping:
            raise QueueStopped("the queue is stopped")
        grid = None
        if tick.index < 0:
            number, wall = round(tick.wall * _US), tick.wall
        else:
            grid = anchor_us, interval_us, _ = self._grids[schedule.name]
            number = anchor_us + tick.index * interval_us
            wall = number / _US
        job = schedule.new_job_at(wall)
        row = job_row(job, time.time())
        self._claims += 1
        token = f"{self._token_prefix}:{self._claims}"  # the same when resent
        outcome: str  # (Scripts.schedule_tick's reply, through _call_resending)
        with link._reporting_rows(token) as (caller, lease_ms):  # (its enqueue may evict)
            try:
                link.broker._check_server(_look_deadline(None))
                outcome, evicted = link.broker._call_resending(  # (not sent again after a socket timeout)
                    link.scripts.schedule_tick, schedule.name, number, token, link.config.buffer_size,
                    link.config.max_delayed_jobs, row, caller, lease_ms, grid, deadline=_call_deadline(None))
            except self._redis_error as exc:  # (logged as the workers log an outage: not at every tick)
                link._reply_lost(caller, token)
                link._log_outage(f"claiming a tick of schedule {schedule.name!r} (skipped)", exc)
                return "unreachable"
            if outcome == "ahead":  # (not claimed: the other processes fire it, on their clocks)
                self._log_ahead(schedule.name, job.id)
            elif tick.index < 0 and self._ahead.in_row:
                logger.info("schedule %r: its tick %s is claimed: this process's cron ticks are no longer ahead "
                            "of the Redis server's clock, after %d that were not claimed (%d since the last log "
                            "record)", schedule.name, job.id, self._ahead.in_row, self._ahead.unlogged)
                self._ahead.reset()
            if outcome == "full":  # claimed and skipped: the next tick is claimed as usual
                raise _buffer_full(link.config.buffer_size, job.id, job.type)
            if outcome != "fire":
                return outcome  # "busy", "taken", "regrid" or "ahead"
            schedule.last_job_id = job.id
            link._report_ended(evicted, caller)
        return "fired"

    def _log_ahead(self, name: str, job_id: str) -> None:
        """A cron tick was not claimed, as more than _CLOCK_SET_BACK ahead of the server's clock: the
        first in a row logged at once, then at most once per _LOG_EVERY with the count since the last
        record (a wrong clock lasts: each of the process's cron schedules meets it at every tick)."""
        count = self._ahead.seen(time.monotonic(), _LOG_EVERY)
        if count is None:
            return
        again = ("" if self._ahead.in_row == 1 else
                 f" ({count} cron ticks not claimed since the last log record, this one included)")
        logger.warning("schedule %r: its tick %s is more than %gs ahead of the Redis server's clock: this "
                       "process's wall clock (or the server's) is wrong; its cron ticks are not claimed until the "
                       "two agree%s; logged at most every %gs while it lasts", name, job_id, _CLOCK_SET_BACK,
                       again, _LOG_EVERY)


def _first_at_us(trigger: Any) -> Optional[int]:
    """An ``every`` schedule's first_at as epoch us, or None: a new grid places it on the server's clock,
    not as a delay this host's wall clock computed (a host whose clock is wrong would move the grid that
    every process keeps, as long as the schedule's definition stays)."""
    return None if trigger.first_at is None else round(trigger.first_at * _US)


def _definition(trigger: Any) -> str:
    """What an ``every`` schedule's grid in Redis is set for, besides its interval: its first_at as
    given (epoch seconds, repr), or "" without one. A process that begins the schedule with
    another one sets a new grid (a first_at changed, or a typo corrected, takes effect)."""
    return "" if trigger.first_at is None else repr(trigger.first_at)
