"""QueueLink: one Queue's end of the broker — enqueue, the pump, the heartbeat, the timer.

The core (compiled or pure) stays this process's local buffer: the pump fetches leased
attempts from Redis (``free slots + 1`` per call for the worker threads, and the jobs of
async executors up to their types' limits, settles of finished attempts in the same call)
and hands them to the core's ReadyQueue, where the usual workers, the event loop, local
limits and watchdog run them. The dispatcher tells this link
every attempt's outcome (it is the dispatcher's ``AttemptLedger``); outcomes
are batched into the next script call.

Threads (started by ``start``):
- the pump: flush settles + fetch; when Redis has nothing, it blocks in BLPOP
  on the ``signal`` list (its own connection) for at most ``_IDLE_WAIT``; both given up
  as soon as stop() begins (every round is: see _round); meanwhile a worker that finishes
  an attempt flushes it itself;
- the timer: fetches at the earliest delayed job's due time, measured on the
  local monotonic clock from the server's reply (Redis's blocking timeouts are
  too coarse for this);
- the heartbeat: renews this process's lease every ``lease / 4`` and reaps
  dead processes; if this process was reaped, it abandons its buffer and
  registers again under a new id. It also looks up the rows that a cancel or an
  evicting enqueue without a reply kept for this process (``_report_lost``), and every
  ``_SETTINGS_LOOK`` starts a short-lived thread (``_look_at_settings``) that looks at
  Redis's settings: a server slow to answer CONFIG never delays a beat (and a look under
  way gives up, its connection closed, as soon as stop() begins, as a beat under way does).
- a reporter (``_hand_on``, one per fetch or beat reply that hands this process rows
  to report or attempts to cancel): runs their failure callbacks, so that no thread
  that renews the lease or fetches ever waits for a callback (one slower than the
  lease would get this live process reaped, and its attempts run again elsewhere).
- the reporters' renewer (``_hold``, while any call that registered a reporter, a
  cancel, an evicting enqueue or a tick of a process without a lease, producer-only
  or stopping, holds its rows): renews each such reporter's lease every ``lease / 4``
  from the call's reply until the failure callbacks of its rows ran (a report deferred
  by the bound on nested callbacks waits for the callbacks above it first).
A thread that fails on anything but Redis (a bug, a foreign job that trips it) makes the
process go on as if killed and started again (``_crashed``): its id is let go for others to
reap, and the pump, timer or heartbeat starts again under a new id.

A worker starts a fetched job only while the last confirmed renewal of the
lease is younger than the lease (measured from when that call was sent, so
never later than the server's expiry): past it, this process may have been
reaped and the job handed to another, so the worker waits for the next
renewal, or for the news that the job is no longer this process's.
"""
import contextlib
import itertools
import json
import logging
import math
import os
import socket
import threading
import time
from typing import Any, Callable, Dict, FrozenSet, Iterator, List, Optional, Sequence, Set, Tuple, Union

from .._pick_core import core
from .._sections import owned, refuse, section
from .._shield import shield
from ..config import RateLimit
from ..errors import _LOG_EVERY, DuplicateJob, QueueFull, QueueStopped, TinyMQError, _buffer_full, _describe, counted
from ..stats import ExecutorStats, QueueStats
from ._codec import decode_job, encode_job, sendable_text, undecodable_job, unsendable
from ._scripts import IN_FLIGHT, Crashed, Scripts, SettleOp, readable_id, retries_of
from .broker import _FIRST_LOOK_WAIT, redacted_url, refused, reply_wait

__all__ = ["QueueLink"]

logger = logging.getLogger("tinymq")

_PREFETCH = 1  # jobs fetched beyond the free worker slots: the next one is at hand
_BUFFERED_MAX = 1.0  # seconds a fetched job waits for a worker here before it goes back
_REPORT_WAIT = 10.0  # seconds stop() waits for failure callbacks on rows handed to this process
_SETTLE_BATCH = 32  # settle ops that make the pump flush at once
_SETTLE_DELAY = 0.001  # seconds an op may wait for company before the pump flushes it
_IDLE_WAIT = 1.0  # seconds an idle pump blocks in Redis before it looks again
# Seconds between a worker process's looks at Redis's settings (broker._look_at_settings): a
# maxmemory-policy or appendonly changed after connect is warned of too.
_SETTINGS_LOOK = 60.0
_BACKOFF_MIN = 0.05  # seconds before the first retry after Redis failed
_BACKOFF_MAX = 0.25  # (connecting to a server that is back costs little; waiting costs latency)
_ROOM_POLL_MIN = 0.001  # enqueue(block=True) and join() look again after this, doubling
_ROOM_POLL_MAX = 0.05
_MS = 1000.0
_US = 1_000_000.0
_DIGITS = 3  # delays are sent in ms to the microsecond
_SOCKET_TIMEOUT = 10.0  # beyond the idle wait, a reply slower than this is a dead connection
# A caller's timeout bounds the wait for a call's reply (join, enqueue, stop), but leaves it at
# least this long (a loaded machine may take that long to answer a healthy call).
_CALL_FLOOR = 0.5
_RENEWAL_POLL = 0.05  # seconds a worker waiting for a renewal looks again (it is also woken)
_SEND_TRIES = 3  # rounds a failure for good waits for (one resends a failed call first)
# Seconds stop() without a timeout waits to give back what this process holds (for a round under
# way, then for its release call): Redis that does not answer by then is not waited for longer,
# the lease returns what it holds (a healthy call takes a small part of it).
_STOP_WAIT = 2.0

_PENDING, _STARTED, _GIVEN_BACK = range(3)


class _NotHeld(TinyMQError):
    """Raised at an attempt's start when this process no longer holds it (stopped, or reaped)."""


class _Attempt:
    """This process's hold on one job: guarded by QueueLink._lock."""

    __slots__ = ("attempt", "since", "state", "expired", "timed_out", "decided", "returned", "ending", "marked",
                 "duration", "on_loop")

    def __init__(self, attempt: str, since: float, on_loop: bool = False) -> None:
        self.attempt = attempt
        self.on_loop = on_loop  # its executor is async: it holds no worker's place (_on_loop, not _in_hand)
        self.since = since  # monotonic time it was fetched
        self.state = _PENDING
        self.expired = False  # the watchdog decided it at its deadline; it may still run
        self.timed_out = False  # expired by its deadline, not by a cancel (counted once its end is decided)
        self.decided = False  # its retry/dead op was queued
        self.returned = False  # a timed-out attempt's function came back
        # The thread counting its success (succeeding), 0 while none is: stop() waits for its op
        self.ending = 0
        self.marked = False  # a cancel marked it in Redis, and this process heard of it (_cancel_marked)
        self.duration: Optional[Tuple[Any, float]] = None  # (type state, seconds) of a timeout, recorded as decided


class _Failure:
    """A failure for good decided here whose settle may find the attempt marked by another
    process's cancel (``overruled``): guarded by QueueLink._lock. Not counted yet when the
    settle's reply comes (it waits for that reply when a failure callback is registered), it is
    counted as cancelled (see QueueLink.failing); counted already, it stays counted, as what it
    was decided as (a counter never goes down). Its op dropped unsent as this process let its id
    go (``dropped``, see _let_go), or its job found lost as its op ran (Redis lost its hash: see
    QueueLink._settled): not counted yet, it is never counted, and no callback runs for it;
    counted already, it stays counted (see QueueLink._take_back)."""

    __slots__ = ("counted", "overruled", "dropped")

    def __init__(self, counted: bool) -> None:
        self.counted = counted  # counted here (by the deciding thread; a cancel: before, as decided)
        self.overruled: Optional[bool] = None  # the settle's verdict: None until its reply is read
        self.dropped = False  # its op never reached Redis: this process's id was let go first


# The ops that end an attempt counted here before their settle's reply came (a success, a
# retry; a failure for good is counted by its thread: _Failure). A mark that overrules one
# leaves its count as it is: a counter never goes down (Prometheus reads that as a reset).
_Overruled = Tuple[SettleOp, str]  # see QueueLink._settled


def job_row(job: Any, now: float, job_id: Optional[str] = None) -> Tuple[str, str, int, float, str, int, str]:
    """``job`` as a row of enqueue.lua: (id (``job_id``: read already), type, priority, delay ms
    (0: due now), body, retries, last error ('' for none))."""
    run_at = job.run_at
    delay = 0.0 if run_at is job.timestamp else round((run_at - now) * _MS, _DIGITS)
    return (job.id if job_id is None else job_id, job.type, int(job.priority), delay if delay > 0.0 else 0,
            encode_job(job), job.retries, _sent_error(job.last_error))


def _sent_error(error: Any) -> str:
    """A job's last error as a row or a settle op carries it: '' for none; one set by hand (an
    exception, a number) as its text, as a store keeps it; lone surrogates escaped."""
    text = error if error.__class__ is str else ("" if error is None else str(error))
    return sendable_text(text) if text else ""


def _sendable_count(retries: Any) -> int:
    """A job's ``retries`` that its executor set to something other than an int, as a settle op
    carries it: what int() makes of it (a float, a numeric text), else 0 (None, a list)."""
    try:
        return int(retries)
    except Exception:
        return 0


def _no_reply(exc: BaseException, call: str) -> str:
    """How ``call`` (``"a cancel of job 'x'"``), which raised ``exc``, went, for its error: Redis
    answered it with an error (a script that failed part-way, on a key another program wrote; a
    replica that takes no writes), or no reply came. Either way it may have run, in part or in full."""
    if isinstance(exc, __import__("redis").ResponseError):
        return f"answered {call} with an error"
    return f"did not answer {call}"


def _refused_unwritten(exc: BaseException, lost: int) -> Optional[str]:
    """How Redis refused a call having written nothing, when no send of it went without a reply
    (``lost``: see _Counted): what to do about it ("" when the error says), or None when the call may
    have run. Three such refusals: BUSY (a plain ResponseError in redis-py), given unrun to every call
    while a script (another program's), a function or a module's command runs past its
    busy-reply-threshold (lua-time-limit before Redis 7); LOADING (redis.exceptions.BusyLoadingError),
    given unrun to every call while Redis loads its data after a restart; and an enqueue of a job
    whose key holds another program's value (lib.lua's enqueue_jobs raises before any write, naming
    the key). A send without a reply before it may have run."""
    redis = __import__("redis")
    if lost:
        return None
    if isinstance(exc, redis.exceptions.BusyLoadingError):
        return ("Redis is still loading its data into memory (after a restart) and refuses every call unrun "
                "until it is done: {} again once it has loaded")
    if not isinstance(exc, redis.ResponseError):
        return None
    text = str(exc)
    if text.startswith("BUSY"):
        return ("Redis is busy running a script (another program's, past its busy-reply-threshold, "
                "lua-time-limit before Redis 7) and refuses every call unrun until it ends or SCRIPT KILL "
                "ends it: {} again once it answers")
    if ", not a job: " in text:
        return ""
    return None


class _Counted:
    """``call``, counting the sends of one call by broker._call_resending that got no reply (``lost``):
    each may have run. (One answered with an error, BUSY or LOADING among them, got its reply.)"""

    def __init__(self, call: Callable[..., Any]) -> None:
        self.call = call
        self.lost = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return self.call(*args, **kwargs)
        except BaseException as exc:
            redis = __import__("redis")  # (here, not per call: every enqueue and cancel comes through)
            if not isinstance(exc, (redis.exceptions.BusyLoadingError, redis.ResponseError)):
                self.lost += 1
            raise


def _state_start(text: str) -> Optional[float]:
    """When the queue's state began (ms), as unfinished.lua reads it; None when it is missing or
    not a number (another program wrote it), as the scripts take it (renew writes a new one)."""
    try:
        return float(text)
    except ValueError:
        return None


def _refused_as_full(exc: BaseException) -> bool:
    """Whether Redis refused a call for its maxmemory (a script that takes new jobs, at its
    first write: lib.lua's refuse_if_full). Redis 7 replies with an OOM error, 6.2 with a
    script error that quotes it."""
    return "'maxmemory'" in str(exc)


def _call_deadline(deadline: Optional[float]) -> float:
    """When a call that a caller waits on must have its reply (for _call_resending, reply_wait):
    the caller's ``deadline`` (monotonic), never less than _CALL_FLOOR away; without one, the
    socket timeout's (math.inf), so that a silent Redis makes it raise, not wait for ever."""
    if deadline is None:
        return math.inf
    return max(deadline, time.monotonic() + _CALL_FLOOR)


def _look_deadline(deadline: Optional[float]) -> float:
    """When a caller's first look at the server (broker._check_server) must have its reply: by
    the caller's ``deadline`` (_call_deadline), and within _FIRST_LOOK_WAIT, as at construction: a
    server that takes the connection and never answers is reported as unreachable then."""
    return min(_call_deadline(deadline), time.monotonic() + _FIRST_LOOK_WAIT)


def _report_key(job_id: str, reason: str, proc: str, attempt: str) -> str:
    """The field of a job this process ended for good in reporting:<proc> (lib.lua's keep_report)."""
    return f"{job_id}|{reason}|{proc}|{attempt}"


class QueueLink:
    """What one Queue does through its broker (see the module docstring)."""

    def __init__(self, broker: Any, config: Any, dispatcher: Any) -> None:
        self.broker = broker
        self.config = config
        self.dispatcher = dispatcher
        self.ready = dispatcher.ready
        self.scripts: Scripts = broker._scripts
        self.client = broker._client
        self._redis_error = __import__("redis").RedisError
        self._lease_ms = max(1, int(broker.lease * _MS))
        # An RLock taken with section() (see tinymq/_sections.py): a call into the link from code the
        # garbage collector runs inside one of its sections on the same thread (a __del__ that cancels)
        # is refused with a RuntimeError saying why, where it waited for its own thread for good.
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)  # slots freed, ops added, closing
        self._renewal = threading.Condition(self._lock)  # the lease was renewed, or lost, or closing
        self._reported = threading.Condition(self._lock)  # a thread finished reporting handed rows
        self._reporters: Set[threading.Thread] = set()  # _hand_on's threads not yet done (guarded by _lock)
        # thread -> the acknowledgement (op A's key) of the handed row whose failure callbacks it runs
        self._reporting: Dict[int, Optional[str]] = {}  # None: no row yet (a cancel() under way)
        self._renewed_at = -math.inf  # monotonic time the last call that renewed the lease was sent
        # (proc, token) of calls that may have kept rows for this process to report (a cancel's,
        # an evicting enqueue's or tick's) but whose reply never came: looked up at the next beat.
        self._lost_replies: List[Tuple[str, str]] = []  # guarded by _lock
        # Reporters whose rows this process holds (_hold) -> how many holds, and the one thread
        # that renews their leases while any is held (None: none runs). Guarded by _lock.
        self._held_reporters: Dict[str, int] = {}
        self._reporters_renewer: Optional[threading.Thread] = None
        self._reporters_held = threading.Condition(self._lock)  # the renewer is no longer wanted
        # Guarded by _lock:
        self._attempts: Dict[Any, _Attempt] = {}  # job -> this process's attempt of it
        self._in_hand = 0  # attempts for worker threads fetched and not yet decided (buffered or running)
        self._on_loop = 0  # the same, for the event loop (their executors are async: _Attempt.on_loop)
        # type -> max_concurrent_jobs of the types whose executors are async here (runs_on): their
        # jobs are fetched up to their limits, beyond the worker threads' free places
        self._loop_types: Dict[str, int] = {}
        self._freed = 0  # attempts whose place freed so far (_slot_freed)
        # _freed as the last round stopped at a job this process could not take (FetchReply.stopped):
        # while no place freed since, asking Redis again for the loop's jobs would stop there again.
        self._stopped_at = -1
        self._prefetch = _PREFETCH  # 0 from a give-back of a job stuck here until a worker frees
        self._ops: List[SettleOp] = []  # outcomes not yet sent
        self._ops_since = 0.0  # monotonic time of the oldest unsent op
        self._failing: Dict[str, _Failure] = {}  # attempt -> its failure for good, until settled
        # Jobs whose running attempt is no longer this process's (stop()'s release handed it back,
        # as a plain fn(job) has no context to cancel; or it ran under an id this process let go:
        # reaped, or after a crash): it runs on, and whatever it ends as counts nowhere here, as
        # its job runs again elsewhere or was ended by its reaper. One not expired still holds its
        # worker's place (_in_hand) until it ends. Lock order: this link calls the core's
        # ReadyQueue with _lock held (an outcome counted in the step that decides it is still
        # this process's, as stop() and _let_go take attempts away under _lock), never the reverse.
        self._disowned: Dict[Any, _Attempt] = {}
        self._handed_back: Dict[Any, _Attempt] = {}  # the running attempts stop()'s release hands back
        self._workers = 0  # 0 until start: a producer-only queue fetches nothing
        self._closing = False
        self._pump_idle = False  # the pump is blocked in Redis: workers flush their own ops
        # What the pump waits for on _changed: this many free slots, or _SETTLE_BATCH ops;
        # 0 while it waits with nothing to do (the first op or freed slot wakes it).
        # Wakes it only when it may go.
        self._pump_goal = 1
        # type -> limit not yet sent (see Scripts.set_limits): sent before the next fetch
        self._limits: Dict[str, Union[int, Tuple[int, int, float]]] = {}
        # type -> its limit as last registered here: sent again when this process registers again
        # (after a reap, or after Redis lost its data: then it has no limits left to apply), as
        # _lost_limits, which set only the types Redis holds no limits for (a newer registration wins)
        self._registered_limits: Dict[str, Union[int, Tuple[int, int, float]]] = {}
        self._lost_limits: Dict[str, Union[int, Tuple[int, int, float]]] = {}
        self._rate_limited: FrozenSet[str] = frozenset()  # types whose starts this process reports (op T)
        self._proc = self._new_proc_id()
        # The server time (ms) at which _proc registered (its first fetch or beat that succeeded), or 0.
        self._registered = 0
        # The id of a fetch or beat that got no reply in time, or was given up as stop() began (guarded
        # by _round_lock): it may have registered the id, which stop()'s release then unregisters, and
        # gives back what it leased, even when _registered is 0 (a connect refused sent nothing: not so).
        self._registering = ""
        # Guarded by _round_lock: one fetch round at a time, and the round to resend, if any. An RLock
        # taken with section(), as _lock is: a round (and a beat) holds it across code that allocates
        # (decoding fetched jobs, placing them), where the collector may run a __del__ that cancels or
        # stops; refused (RuntimeError), where its cancel's round or stop's release waited for its own
        # thread for good.
        self._round_lock = threading.RLock()
        # (proc, fetch id, n, ops, loop room, loop types, _freed as it was built)
        self._unsent: Optional[Tuple[str, str, int, List[SettleOp], int, Tuple[str, ...], int]] = None
        self._unsent_tried = False  # _unsent was sent and got no reply: Redis may have run it
        self._fetch_ids = itertools.count(1)
        self._beat_ids = itertools.count(1)  # (used by the heartbeat only)
        # Fetched jobs whose id the core still holds (a copy this process gave up, still running):
        # placed once that copy is done. Guarded by _round_lock.
        self._held: List[Any] = []
        self._released = False
        self._next_due = math.inf  # monotonic time of the earliest delayed job
        self._timer_alarm = core.Alarm()
        self._stopped = threading.Event()
        self._threads: List[threading.Thread] = []
        self._settings_look: Optional[threading.Thread] = None  # the heartbeat's last (_look_at_settings)
        self._outage_logged = 0.0
        self._enqueues = threading.local()  # .token: the token of this thread's last enqueue (take_back)

    @staticmethod
    def _new_proc_id() -> str:
        return f"{socket.gethostname()}:{os.getpid()}:{os.urandom(4).hex()}"

    # --- producing ---------------------------------------------------------------

    def enqueue(self, jobs: Sequence[Any], block: bool, timeout: Optional[float]) -> None:
        """Send ``jobs`` in one script call: all are accepted, or none (QueueFull, DuplicateJob)."""
        if self.dispatcher.stopping:
            raise QueueStopped("the queue is stopped")
        now = time.time()
        rows = []
        seen = set()
        for job in jobs:
            job_id = job.id
            if job_id in seen:
                raise DuplicateJob(f"an id is given twice in this batch of {len(jobs)} jobs; "
                                   "none of the batch was enqueued")
            seen.add(job_id)
            rows.append(job_row(job, now, job_id))
        token = os.urandom(8).hex()  # a resend of this call is recognised by it
        self._enqueues.token = token
        try:
            if self.config.max_delayed_jobs and any(row[3] for row in rows):  # it may evict
                with self._reporting_rows(token) as (caller, lease_ms):
                    self._enqueue(rows, token, block, timeout, caller, lease_ms)
            else:
                self._enqueue(rows, token, block, timeout, "", 0)
        except UnicodeEncodeError as exc:  # (from the client, before it sent anything)
            error = unsendable(jobs)
            if error is None:
                raise
            raise error from exc

    def _enqueue(self, rows: List[Any], token: str, block: bool, timeout: Optional[float],
                 caller: str, lease_ms: int) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = _ROOM_POLL_MIN
        while True:
            try:
                self.broker._check_server(_look_deadline(deadline))
            except self._redis_error as exc:  # (before this call sent anything: certainly not enqueued)
                raise self._unreachable(exc, f"{counted(len(rows), 'job')} not enqueued") from exc
            enqueue = _Counted(self.scripts.enqueue)
            try:
                reply = self.broker._call_resending(enqueue, token, self.config.buffer_size,
                                                   self.config.max_delayed_jobs, rows, caller, lease_ms,
                                                   deadline=_call_deadline(deadline))
            except self._redis_error as exc:
                if _refused_as_full(exc):  # (refuse_if_full: nothing was written)
                    raise TinyMQError(f"Redis is full (its maxmemory is reached): {len(rows)} job(s) were not "
                                      f"enqueued to Redis queue {self.broker.name!r} ({exc})") from exc
                todo = _refused_unwritten(exc, enqueue.lost)
                if todo is not None:  # (nothing was written, nothing kept)
                    raise TinyMQError(f"Redis queue {self.broker.name!r} refused an enqueue ({exc}): "
                                      f"{counted(len(rows), 'job')} not enqueued" + (todo and "; " + todo.format(
                                          "enqueue"))) from exc
                self._reply_lost(caller, token)
                # Not "not enqueued": the call may have reached Redis and run, its reply lost.
                went = _no_reply(exc, f"an enqueue of {len(rows)} job(s)")
                raise TinyMQError(f"Redis queue {self.broker.name!r} {went} ({exc}): they may or may not have "
                                  "been enqueued; enqueue the same "
                                  f"job(s) again to know (DuplicateJob: it got in){self._replica_hint(exc)}") from exc
            if reply.status in ("ok", "again"):
                break
            if reply.status == "dup":
                raise DuplicateJob(f"a job with id {reply.duplicate_id!r} is already queued and unfinished"
                                   + ("" if len(rows) == 1 else "; none of the batch was enqueued"))
            if block and self.dispatcher.stopping:  # stop() ended the wait for room, as in-process
                raise QueueStopped("the queue was stopped while enqueue waited for room in the ready buffer")
            remaining = None if deadline is None else deadline - time.monotonic()
            if not block or (remaining is not None and remaining <= 0.0):
                if len(rows) == 1:
                    raise _buffer_full(self.config.buffer_size, rows[0][0], rows[0][1])
                raise QueueFull(f"the ready buffer has no room for {len(rows)} more jobs "
                                f"(buffer_size={self.config.buffer_size}); none of the batch was enqueued")
            time.sleep(pause if remaining is None else min(pause, remaining))
            pause = min(pause * 2, _ROOM_POLL_MAX)
        self._report_ended(reply.evicted, caller)

    @contextlib.contextmanager
    def _reporting_rows(self, token: str) -> Iterator[Tuple[str, int]]:
        """For a call whose reply may hand this process rows to report (a cancel's, or the
        jobs an enqueue evicts): ``(caller, lease ms)`` for the script. A process with a
        lease is the caller; one without (producer-only, or stopping) registers a reporter
        for them alone, under an id of this call's own, with the broker's lease: if it is
        killed before its callbacks ran, whoever reaps the reporter reports them. stop()
        waits for this thread meanwhile, as for a running callback."""
        with self._reporting_here():
            with section(self._lock):  # (once stopping, no row is kept under our own lease)
                caller = self._proc if self._registered and not self._closing else ""
            yield (caller, 0) if caller else (f"{self._proc}~{token}", self._lease_ms)

    def _reply_lost(self, caller: str, token: str) -> None:
        """The call ``token`` got no reply (call_resending gave up): Redis may have run it and
        kept rows for ``caller`` to report, which no later reply hands out. Under this
        process's own lease the heartbeat looks for them (_report_lost); a reporter's rows are
        reported by whoever reaps it once its lease, never renewed, runs out."""
        if caller and "~" not in caller:
            with section(self._lock):
                self._lost_replies.append((caller, token))

    def _report_lost(self) -> None:
        """Report the rows that calls without a reply kept for this process (_reply_lost), as
        a reply would have (on a reporter): each holds join() until acknowledged. Called by
        the heartbeat after a beat renewed the lease, outside _round_lock. Rows of an id this
        process no longer has (it was reaped) went to its reaper, which reports them."""
        with section(self._lock):
            lost, self._lost_replies = self._lost_replies, []
        proc = self._proc
        tokens = {token for owner, token in lost if owner == proc}
        if not tokens:
            return
        try:  # (given up, as the beat, once stop() begins: its release hands the rows on)
            found = self.scripts.command("HGETALL", self.scripts.key("reporting:" + proc), timeout=_SOCKET_TIMEOUT,
                                         abandoned=self._stopped)
        except self._redis_error as exc:
            with section(self._lock):
                self._lost_replies.extend((proc, token) for token in tokens)
            if not self._stopped.is_set():
                self._log_outage("looking for rows of calls without a reply", exc)
            return
        kept = found if isinstance(found, dict) else dict(zip(found[::2], found[1::2]))  # (RESP3: a map)
        rows = []
        for key, text in kept.items():
            row = json.loads(text)  # (its key: lib.lua's handed, and cancel.lua's)
            job_id = row[0]
            if any(key == f"{job_id}|cancelled|{token}" or key.startswith(f"{job_id}|evicted|{proc}|{token}|")
                   for token in tokens):
                rows.append(Crashed(job_id, row[1], retries_of(row[2]), row[3] or "", row[4], key))
        if rows:
            logger.warning("Redis queue %r: reporting %d job(s) that calls without a reply ended",
                           self.broker.name, len(rows))
        self._hand_on(rows)

    def _report_ended(self, rows: Sequence[Crashed], caller: str) -> None:
        """Report the rows a reply ended for this call (``caller`` as _reporting_rows gave it):
        those that wait in Redis (a key) are acknowledged after their callbacks ran. From failure
        callbacks nested deep (one whose enqueue evicts a job, whose callback enqueues, ...), once
        the callbacks above return (the dispatcher's report_bounded): the stack stays bounded."""
        if not rows:
            return
        # A reporter's lease is renewed from now on, not from when its rows' callbacks start: a
        # report deferred until the callbacks above it return may wait longer than the lease.
        held = self._hold(caller) if "~" in caller and any(row.key for row in rows) else None
        try:
            self.dispatcher.report_bounded(self._report_rows_ended, rows, caller, held)
        except BaseException:
            if held is not None:
                held()
            raise

    def _report_rows_ended(self, rows: Sequence[Crashed], caller: str, held: Optional[Callable[[], None]]
                           ) -> None:
        """``held``: ends the renewal of the reporter ``caller`` (_hold), once its rows' callbacks ran."""
        try:
            for row in rows:
                if not row.key or held is not None:
                    self._report(row.id, row.body, row.reason, row.retries, row.error)
        finally:
            if held is not None:
                held()
        kept = [row for row in rows if row.key]
        if not kept:
            return
        if "~" not in caller:  # our own lease: acknowledged with our next call
            self._report_handed(kept)
            return
        try:  # acknowledged and unregistered in one call
            self.broker._call_resending(self.scripts.release, caller, [SettleOp("A", row.key) for row in kept])
        except self._redis_error as exc:
            logger.warning("could not tell Redis queue %r that %d job(s) ended in a call were reported "
                           "(%s); they will be reported again once the lease of %s runs out",
                           self.broker.name, len(kept), exc, caller)

    def _hold(self, reporter: str) -> Callable[[], None]:
        """Keep the lease of ``reporter`` renewed every lease / 4 until the function returned is
        called (from the reply that registered it until its rows' callbacks ran): a reporter
        reaped meanwhile would have them reported again by a worker, though nothing died. One
        renewer renews every reporter held, in one call; the last end waits for it to end."""
        with section(self._lock):
            self._held_reporters[reporter] = self._held_reporters.get(reporter, 0) + 1
            if self._reporters_renewer is None:
                renewer = threading.Thread(target=self._renew_reporters, name="tinymq-reporter", daemon=True)
                self._reporters_renewer = renewer
                renewer.start()

        def end() -> None:
            with section(self._lock):
                holds = self._held_reporters.pop(reporter) - 1
                if holds:
                    self._held_reporters[reporter] = holds
                renewer = self._reporters_renewer
                if self._held_reporters or renewer is None:
                    return
                self._reporters_renewer = None  # (a hold from now on starts another one)
                self._reporters_held.notify_all()
            renewer.join()

        return end

    def _renew_reporters(self) -> None:
        """The renewer of the reporters held (_hold): each one's lease every lease / 4, the first
        renewal of each within a quarter lease of the reply that registered it."""
        me = threading.current_thread()
        interval = self.broker.lease / 4
        while True:
            with section(self._lock):
                due = time.monotonic() + interval
                while self._reporters_renewer is me and time.monotonic() < due:
                    self._reporters_held.wait(due - time.monotonic())
                if self._reporters_renewer is not me:
                    return
                reporters = list(self._held_reporters)
            # All in one call (one released or reaped meanwhile is left as it is): a round trip per
            # reporter, one after the other, outlasted the lease on a loaded machine with 17 held.
            try:
                self.scripts.hold(reporters, self._lease_ms)
            except self._redis_error as exc:
                self._log_outage("renewing reporters' leases", exc)
            except Exception:  # (a bug: it holds no state, so it goes on; ended, it would let the
                logger.exception("Redis queue %r: renewing the leases of reporters %s failed",  # reporters be
                                 self.broker.name, ", ".join(reporters))  # reaped, their rows reported twice)

    def _report(self, job_id: str, body: str, reason: str, retries: Union[int, str] = 0, error: str = "") -> None:
        """Log and hand to the failure callbacks a job that Redis ended (its counters are there).
        A job that not even a stand-in can be made of is logged as an ERROR and not reported:
        its caller acknowledges it all the same (raising here would kill the reporter, and the
        row would go from process to process for ever, once per lease)."""
        try:
            try:
                job = decode_job(job_id, body, retries, error)
            except Exception as exc:  # reported all the same, with its body as the payload
                logger.error("job %s in Redis cannot be decoded (%s)", job_id, _describe(exc))
                job = undecodable_job(job_id, body, retries, error)
        except Exception:
            logger.exception("Redis queue %r: job %s (%s) cannot be reported to on_failure; dropped",
                             self.broker.name, job_id, reason)
            return
        self.dispatcher.report_failure(job, reason, None)

    def _hand_on(self, rows: Sequence[Crashed], cancels: Sequence[str] = (), undecodable: Sequence[Any] = ()
                 ) -> None:
        """What a fetch or beat reply handed this process (rows to report, its attempts that
        q.cancel() marked, fetched jobs it cannot decode) goes to a reporter thread of its own,
        which runs the failure callbacks: the thread that got the reply goes on renewing the
        lease, or fetching. Registered before it starts, so that a stop() from now on waits for it."""
        if not rows and not cancels and not undecodable:
            return
        reporter = threading.Thread(target=self._report_reply, args=(rows, cancels, undecodable),
                                    name="tinymq-redis-reporter", daemon=True)
        with section(self._lock):
            self._reporters.add(reporter)
        try:
            reporter.start()
        except RuntimeError:  # no new thread (the interpreter is exiting): report on this one
            with section(self._lock):
                self._reporters.discard(reporter)
            self._report_reply(rows, cancels, undecodable)

    def _report_reply(self, rows: Sequence[Crashed], cancels: Sequence[str], undecodable: Sequence[Any] = ()
                      ) -> None:
        """A reporter (_hand_on): cancel the marked ``cancels`` (first: a cancel is due within
        the lease), fail the ``undecodable`` stand-ins (_take), report ``rows``, then send the
        acknowledgements if the pump sleeps in Redis (join() waits for them)."""
        try:
            if cancels:
                self._cancel_marked(cancels)
            for job in undecodable:  # as a failure decided here: dead, counted, then reported
                with self.failing(job, "permanent_failure", None) as reason:
                    if reason is not None:
                        if reason == "permanent_failure":  # (else a cancel overruled it, counted so)
                            self.ready.count(core.FAILED, 1, job.type)
                        self.dispatcher.report_failure(job, reason, None)
            self._report_handed(rows)
        except Exception:  # (not a callback's: report_failure keeps those) the rows not yet
            self._crashed("a reporter")  # acknowledged go to whoever reaps the id, as if killed
        finally:
            with section(self._lock):
                self._reporters.discard(threading.current_thread())
                self._reported.notify_all()
        self._flush_if_idle()

    def _report_handed(self, rows: Sequence[Crashed], keys: Optional[Sequence[str]] = None) -> None:
        """Report the rows a reply handed to this process (on a reporter, or for a call's own
        reply on its caller's thread), acknowledging each once its callbacks ran (op A, sent
        with the next call): until then Redis keeps it for whoever reaps this process, should
        it die first (reported at least once)."""
        if not rows:
            return
        me = threading.get_ident()
        with self._reporting_here():
            for i, row in enumerate(rows):
                key = keys[i] if keys else row.key  # (its field in reporting:<proc>)
                with section(self._lock):
                    if self._released:  # (stop() waits for other threads): a callback here stopped
                        break               # the queue, and the release handed the rest on
                    self._reporting[me] = key  # stop() waits for it, so that its A goes with the release
                self._report(row.id, row.body, row.reason, row.retries, row.error)
                with section(self._lock):
                    self._queue_op(SettleOp("A", key))

    @contextlib.contextmanager
    def _reporting_here(self) -> Iterator[None]:
        """This thread reports rows handed to this process (its entry in _reporting is the
        row's acknowledgement key, None until it has one): stop() waits for it. Nested (a
        failure callback's own cancel()), the outer entry is put back afterwards."""
        me = threading.get_ident()
        with section(self._lock):
            nested = me in self._reporting
            outer = self._reporting.get(me)
            if not nested:
                self._reporting[me] = None
        try:
            yield
        finally:
            with section(self._lock):
                if not nested:
                    self._reporting.pop(me, None)
                else:
                    self._reporting[me] = outer
                self._reported.notify_all()

    # --- observing ---------------------------------------------------------------

    def stats(self, deadline: Optional[float] = None) -> QueueStats:
        """get_stats(); ``deadline`` (monotonic): Redis's reply is waited for until then at most
        (_CALL_FLOOR at least; None: the socket timeout), TinyMQError after that."""
        counters: Dict[str, int]  # (Scripts.stats's reply, through _call_resending)
        try:
            # One script: a delayed job due on the server's clock counts at its priority (or as
            # waiting for room, beyond buffer_size), not as delayed, before a script call promotes
            # it, and the figures are read at one instant. A read with no reply within the socket
            # timeout (a frozen server), or by the deadline, is not sent again.
            (high, medium, low), delayed, counters, waiting = self.broker._call_resending(
                self.scripts.stats, self.config.buffer_size, deadline=_call_deadline(deadline))
        except self._redis_error as exc:
            raise TinyMQError(f"could not read the stats of Redis queue {self.broker.name!r} at "
                              f"{redacted_url(self.broker.url)}: {exc}") from exc

        def counter(name: str) -> int:
            return counters.get(name, 0)

        return QueueStats(
            high_queue_size=high,
            medium_queue_size=medium,
            low_queue_size=low,
            delayed_jobs_count=delayed,
            waiting_for_room=waiting,
            max_delayed_jobs=self.config.max_delayed_jobs,
            worker_count=self.dispatcher.worker_count,
            # This process's executors: their attempts running here, limits, and the events of
            # the attempts decided here (Redis counts the queue-wide ones, not per type).
            executor_stats={job_type: ExecutorStats(*fields)
                            for job_type, fields in self.dispatcher.ready.snapshot()[2].items()},
            jobs_enqueued=counter("enqueued"),
            jobs_succeeded=counter("succeeded"),
            jobs_failed=counter("failed"),
            jobs_retried=counter("retried"),
            jobs_timed_out=counter("timed_out"),
            jobs_evicted=counter("evicted"),
            jobs_cancelled=counter("cancelled"),
        )

    def join(self, timeout: Optional[float]) -> bool:
        """Wait until the shared queue has no unfinished job; False on timeout or when stopped.
        Each look waits for Redis no longer than the time left (_CALL_FLOOR at least): a
        frozen server costs join(timeout) about its timeout, not the socket's."""
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = _ROOM_POLL_MIN
        began: Optional[float] = None  # when the queue's state began (ms), as the last look saw it
        while True:
            try:
                waits, start = self.scripts.unfinished(timeout=reply_wait(_call_deadline(deadline)))
                now_began = _state_start(start)
                # (not none -> a time: a first worker registered; nor a time -> an earlier one: one
                # registered after the server's clock was stepped back, see renew in lib.lua)
                if began is not None and (now_began is None or now_began > began):
                    logger.error("Redis at %s lost the state of queue %r while join() waited (it restarted "
                                 "without its data, or its keys were deleted): the jobs it waited for are gone, "
                                 "not run", redacted_url(self.broker.url), self.broker.name)
                began = now_began
                if not waits:
                    return True
            except self._redis_error as exc:
                self._log_outage("join()", exc)
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0.0:
                return False
            if self._stopped.wait(pause if remaining is None else min(pause, remaining)):
                return False
            pause = min(pause * 2, _ROOM_POLL_MAX)

    def last_enqueue(self) -> str:
        """The token of the last enqueue this thread made (for ``take_back``)."""
        return getattr(self._enqueues, "token", "")

    def take_back(self, job: Any, enqueued: str) -> bool:
        """Cancel ``job``, which its enqueue ``enqueued`` (``last_enqueue``) got in as its aenqueue
        caller gave up: reported "cancelled", and a dead job of its id that the enqueue replaced
        comes back (when its attempt ends, if it was leased). False when it has ended already."""
        return self._cancel(job.id, enqueued)

    def cancel(self, job_id: str) -> bool:
        """``q.cancel`` over the broker (see ``_cancel``)."""
        return self._cancel(job_id, "")

    def held_here(self) -> bool:
        """Whether this thread is inside a section of the link's locks (Dispatcher.in_section)."""
        return owned(self._lock) or owned(self._round_lock)

    def _cancel(self, job_id: str, take_back: str) -> bool:
        """``q.cancel`` over the broker, from any process (see cancel.lua).

        A waiting job is removed in Redis and reported here. A leased one is
        marked: the process holding it cancels it when its next fetch or beat
        reply says so (this one at once), and reports it; whatever its attempt
        does meanwhile (a failure for good too), its settle ends the job as cancelled,
        counted once, and its reply tells that process so (see failing).
        """
        # Called from code the collector ran inside a section of this link's, or of its dispatcher's:
        # refused before anything is sent (a section taken later, refused then, would leave it half done).
        self.dispatcher.refuse_reentry("cancel()")
        if not readable_id(job_id):  # no bytes in Redis read so, so no job has it
            return False
        if self._send_decided(job_id):  # (its success stands: sent, the cancel would overrule it)
            return False
        token = "c" + os.urandom(8).hex()  # a resend of this call gets the first one's reply
        # From the call on, stop() waits for this thread as for a running callback: a row the
        # call keeps is reported here, and acknowledged, before the release (which would hand
        # it on). Registered first, so that a stop() this does not wait for is seen as closing.
        with self._reporting_rows(token) as (caller, lease_ms):
            try:
                self.broker._check_server(_look_deadline(None))
            except self._redis_error as exc:  # (before this call sent anything: certainly not cancelled)
                raise self._unreachable(exc, f"job {job_id!r} not cancelled") from exc
            cancel = _Counted(self.scripts.cancel)
            try:
                reply = self.broker._call_resending(cancel, token, job_id, caller, lease_ms,
                                                    take_back, deadline=_call_deadline(None))
            except self._redis_error as exc:
                todo = _refused_unwritten(exc, cancel.lost)
                if todo is not None:  # (nothing was written, nothing kept)
                    raise TinyMQError(f"Redis queue {self.broker.name!r} refused a cancel ({exc}): job {job_id!r} "
                                      "not cancelled" + (todo and "; " + todo.format("cancel"))) from exc
                self._reply_lost(caller, token)
                # Not "not cancelled": the call may have reached Redis and run, its reply lost.
                raise TinyMQError(f"Redis queue {self.broker.name!r} {_no_reply(exc, f'a cancel of job {job_id!r}')} "
                                  f"({exc}): it may or may not have been cancelled; cancel it again to "
                                  f"make sure (False: it had ended, or was cancelled already){self._replica_hint(exc)}"
                                  ) from exc
            if reply.status == "removed":
                self._report_ended([reply.removed], caller)  # (kept: with the key it waits under)
                return True
        if reply.status == "marked":
            if reply.proc == self._proc:
                self._cancel_marked([reply.attempt])
            return True
        return False

    def _send_decided(self, job_id: str) -> bool:
        """Before this process's cancel of ``job_id``: the outcome it decided already for its attempt
        of that job (a success being counted, a retry, a failure) reaches Redis first, as in-process
        a cancel finds such a job ended (or waiting for its retry). Else the cancel, sent ahead of
        the op that waits for a round, would end as cancelled a job counted here as a success.
        True when this very thread counts that job's success (a cancel from a __del__ the collector
        ran between its succeeding() and succeeded()): its op comes only once this call returns, so
        it is not waited for (it would be, a whole lease), and the cancel finds the job ended."""
        me = threading.get_ident()
        by = time.monotonic() + self.broker.lease
        with section(self._lock):  # (a success being counted has its op queued once counted: see stop)
            while True:
                ending = [record.ending for job, record in self._attempts.items()
                          if job.id == job_id and record.ending]
                if not ending:
                    break
                if me in ending:
                    return True
                remaining = by - time.monotonic()
                if remaining <= 0.0:
                    break
                self._reported.wait(remaining)
            queued = list(self._ops) + (list(self._unsent[3]) if self._unsent is not None else [])
            ops = [op for op in queued if op.op != "A" and op.attempt.split(":", 1)[1] == job_id]
        if ops:
            self._send(ops[-1])
        return False

    def _cancel_marked(self, attempts: Sequence[str]) -> None:
        """Cancel this process's attempts that q.cancel() marked, as the in-process cancel does:
        each the copy of its job that the attempt fetched, never another copy of its id.

        Not with _round_lock held (cancelling settles, which may call a round). A
        marked attempt that is not found here (it ended meanwhile, or is not yet in
        the core) needs nothing: its settle ends the job as cancelled and the
        reply hands it back to report, or the next reply names it again. One that
        waits for an older copy of its id to leave the core (_held: one still running
        here, no longer this process's) goes back to Redis, which ends it as cancelled
        (the reply counts it here, and hands it back to report): it never runs.
        """
        wanted = set(attempts)
        with section(self._lock):
            jobs = []
            for job, record in self._attempts.items():
                if record.attempt in wanted:
                    record.marked = True  # (its end, decided from now on, is counted as cancelled: _decide)
                    if not record.expired and record.state != _GIVEN_BACK:
                        jobs.append(job)
        in_core = [job for job in jobs if self.ready.registered(job)]  # (the copy the core holds under its id)
        rest = [job for job in jobs if all(job is not other for other in in_core)]
        if rest:
            with section(self._round_lock):  # (a round placing one ends first: it is then in the core, or held)
                held = [job for job in rest if any(job is other for other in self._held)]
                in_core += [job for job in rest if self.ready.registered(job)]
                if held:
                    self._held = [job for job in self._held if all(job is not other for other in held)]
                    with section(self._lock):
                        for job in held:
                            given_back = self._attempts.pop(job, None)
                            if given_back is not None:
                                self._count_out(given_back)
                                self._queue_op(SettleOp("B", given_back.attempt))
            if held:
                self._flush_if_idle()
        for job in in_core:
            if self.dispatcher.cancel(job.id):
                logger.info("job %s (%s) was cancelled through Redis queue %r", job.id, job.type,
                            self.broker.name)

    def _replica_hint(self, exc: BaseException) -> str:
        """What to do about a call refused by a read-only replica (a URL that names one, or a primary
        demoted by a failover), which no resend to the same URL gets past: "" for any other error.
        (The call may still have run: a resend after a lost reply can reach a server demoted since.)"""
        if not isinstance(exc, __import__("redis").exceptions.ReadOnlyError):
            return ""
        return f"; Redis at {redacted_url(self.broker.url)} is a read-only replica: give the URL of its primary"

    def _unreachable(self, exc: BaseException, outcome: str) -> TinyMQError:
        """The error of a call whose first look at the server got no reply: it sent nothing, so
        ``outcome`` ("1 job not enqueued") is certain. A server that answered with an error (a wrong
        password, a database out of range) is not asked whether it runs."""
        if refused(exc):
            return TinyMQError(f"Redis at {redacted_url(self.broker.url)} (queue {self.broker.name!r}) refused "
                               f"the connection: {exc}; {outcome} (are the URL's user, password and database right?)")
        tls = ", with TLS (rediss://)" if self.broker.url.startswith("rediss://") else ""
        return TinyMQError(f"cannot reach Redis at {redacted_url(self.broker.url)} (queue {self.broker.name!r}): "
                           f"{exc}; {outcome} (is a redis-server running there, and answering{tls}?)")

    def check_type(self, job_type: str) -> None:
        """A type is sent as a job reads it (a byte that is not UTF-8 as a lone surrogate: another
        program wrote it); one that no bytes read as (a lone surrogate such as \\ud800) is refused."""
        if not readable_id(job_type):
            raise ValueError(f"job type {job_type!r} cannot be sent to Redis: it has text that is not "
                             "valid Unicode (a lone surrogate?)")

    def set_limit(self, job_type: str, limit: int, rate_limit: Optional[RateLimit] = None) -> None:
        """A registered executor's ``max_concurrent_jobs`` and ``rate_limit``: sent before
        this process's next fetch. Redis holds the one rate window of the type."""
        with section(self._lock):
            if rate_limit is None:
                self._limits[job_type] = limit
                self._rate_limited = self._rate_limited - {job_type}
            else:
                self._limits[job_type] = (limit, rate_limit.max_starts, float(rate_limit.per))
                self._rate_limited = self._rate_limited | {job_type}
            self._registered_limits[job_type] = self._limits[job_type]
        # A pump waiting in Redis would send them at its next look only: a lifted or raised
        # limit lets parked jobs out now, so send them (and fetch what they free) at once.
        self._flush_if_idle()

    # --- the AttemptLedger: what the dispatcher reports ------------------------------

    def started(self, job: Any) -> None:
        """A worker is about to run ``job``: refuse it unless this process still holds it.

        Past the lease since the last confirmed renewal, the job may be another
        process's already: wait for the next renewal (or for the news that it is not
        ours), since Redis may be slow to answer just as this process wakes up.
        Shielded: the attempt's deadline is not set yet, but a cancel interrupts the
        thread (interrupt_on_timeout) at once, and the round this may run fetches jobs
        that must reach the core. A cancel while it waits for a renewal ends the wait.
        """
        lease = self.broker.lease
        guard = shield()
        with guard:
            with section(self._lock):
                while True:
                    record = self._attempts.get(job)
                    if record is None or record.state != _PENDING:
                        raise _NotHeld(f"job {job.id} was given back before it started")
                    if time.monotonic() < self._renewed_at + lease:
                        break
                    if self._closing or self.dispatcher.stopping:  # release() hands it back with the rest
                        raise _NotHeld(f"job {job.id} was not started: this process stops, and its "
                                       f"lease was last confirmed more than {lease:g}s ago")
                    guard.raise_deferred()  # (cancelled while it waits: nothing is started yet)
                    self._renewal.wait(_RENEWAL_POLL)
                record.state = _STARTED
                if job.type not in self._rate_limited:
                    return
                # Sent after the start: the type's rate window counts it from a server time no sooner.
                self._queue_op(SettleOp("T", record.attempt))
            self._flush_if_idle()

    def _renewed(self, sent: float) -> None:
        """A call sent at ``sent`` (monotonic) renewed the lease. Called with _lock held."""
        if sent > self._renewed_at:
            self._renewed_at = sent
            self._renewal.notify_all()

    def _slot_freed(self, record: _Attempt) -> None:
        """An attempt that held a worker here (or a place on the loop) ended: the next job may be
        fetched ahead again (after a give-back of a stuck one, none was). Called with _lock held."""
        self._freed += 1
        self._count_out(record)
        if not record.on_loop:
            self._prefetch = _PREFETCH

    def _count_out(self, record: _Attempt) -> None:
        """``record`` no longer holds its place here (a worker's, or the loop's). With _lock held."""
        if record.on_loop:
            self._on_loop -= 1
        else:
            self._in_hand -= 1

    def _queue_op(self, op: SettleOp) -> None:
        """Called with _lock held."""
        if not self._ops:
            self._ops_since = time.monotonic()
        self._ops.append(op)
        self._wake_pump()

    def _wake_pump(self) -> None:
        """A slot freed or an op came: wake the pump if that is what it waits for. With _lock held."""
        if len(self._ops) >= _SETTLE_BATCH or self._free() >= self._pump_goal:
            self._changed.notify()

    def _flush_if_idle(self) -> None:
        if self._pump_idle:  # the pump sleeps in Redis: send it now, from this thread
            try:
                self._round()
            except self._redis_error as exc:
                if not self._stopped.is_set():  # (else abandoned: its ops go with stop()'s release)
                    self._log_outage("settle", exc)
            except Exception:  # (as the pump's round: a worker thread, or a caller's, must not end here)
                self._crashed(f"a round on {threading.current_thread().name}")

    def succeeding(self, job: Any) -> bool:
        """A worker's attempt of ``job`` succeeded, not yet counted: whether it is this process's
        to count (then the core counts it, and succeeded() follows). Not when stop()'s release
        handed it back while it ran, or this process let the id it ran under go: then it counts
        nowhere, not even for an instant (its job runs again elsewhere, where it counts). From
        here on stop() waits for its op before it hands back what runs (see stop)."""
        with section(self._lock):
            record = self._attempts.get(job)
            if record is not None:
                record.ending = threading.get_ident()
                return True
            self._forget(job)
            return False

    def succeeded(self, job: Any) -> None:
        """Counted as succeeded by the core already (succeeding() said so): its op is queued. One
        that this process let go of meanwhile (its id reaped, or stop()'s wait for it ran out)
        stays counted (a counter never goes down: see _take_back), its op unsent."""
        with section(self._lock):
            record = self._attempts.pop(job, None)
            if record is None:
                self._forget(job)
                return
            self._succeeded(record)
            self._ended(record)
        self._flush_if_idle()

    def _succeeded(self, record: _Attempt) -> None:
        """``record``, taken out of _attempts, succeeded: its slot freed, its op queued. With _lock held."""
        self._slot_freed(record)
        self._queue_op(SettleOp("S", record.attempt))

    def _forget(self, job: Any) -> Optional[_Attempt]:
        """An attempt no longer this process's (_disowned) ended: forgotten, and the worker's
        place it held freed. It counts nowhere here (a timeout of its too: counted only where
        its end is decided, see _decide). Returns its record, or None (not one). Called with
        _lock held."""
        record = self._disowned.pop(job, None)
        if record is not None and not record.expired:
            self._slot_freed(record)
            self._wake_pump()  # (a reaped process goes on fetching under its new id)
        return record

    def _ended(self, record: _Attempt) -> None:
        """``record`` left _attempts with its op queued: a stop() waiting for it goes on. With _lock held."""
        if record.ending:
            self._reported.notify_all()

    def expired(self, job: Any, timed_out: bool = False, duration: Optional[Tuple[Any, float]] = None) -> bool:
        """The watchdog (``timed_out``: at its deadline) or a cancel decided ``job``'s attempt;
        a replacement worker takes its place. Its timeout is counted where its retry or failure
        is decided (_decide, failing), once it is known to stand, and so is its ``duration``
        ((type state, seconds): recorded in _decide). False when the attempt is no longer this
        process's (_disowned): its timeout is never counted, nor its duration recorded; nor are
        they when it stops being this process's before its end is decided (stop()'s release)."""
        with section(self._lock):
            record = self._attempts.get(job)
            if record is None:
                record = self._disowned.get(job)
                if record is not None and not record.expired:
                    record.expired = True
                    self._slot_freed(record)
                    self._wake_pump()
                return False
            if not record.expired:
                record.expired = True
                record.timed_out = timed_out
                record.duration = duration
                self._slot_freed(record)
                self._wake_pump()
            return True

    def _decide(self, job: Any, op: str, delay: float = 0.0, reason: str = "", error: str = "",
                counts: Tuple[int, ...] = ()) -> Optional[Tuple[SettleOp, str, bool, Optional[_Failure], bool]]:
        """Queue the op that ends ``job``'s attempt, counting the events ``counts`` in the same
        step (a retry's timeout with it, if it timed out; a failure's is counted with the failure,
        by failing): (the op, this process's id, whether it timed out, its _Failure if it is a
        failure for good, whether it is decided as cancelled), or None when the attempt is no longer
        this process's to end (given back, or this process was reaped), whose timeout then
        counts nowhere either. An attempt this process knows marked by a cancel (its own, or
        one a reply named) ends as cancelled whatever its op says (Redis ends it so): counted
        so here, and nothing else (a failure for good is sent as the cancel it is)."""
        with section(self._lock):
            record = self._attempts.get(job)
            if record is None:
                self._forget(job)
                return None
            if self._released:  # (the release hands the attempt back: it runs again elsewhere)
                return None
            if record.expired:
                record.decided = True
                if record.returned:
                    del self._attempts[job]
                op = op.lower()
                if record.duration is not None:  # (its end stands: see expired)
                    self.ready.record_duration(*record.duration)
                    record.duration = None
            else:
                del self._attempts[job]
                self._slot_freed(record)
            retries = job.retries
            if retries.__class__ is not int:  # (set by its executor: an op that cannot be sent would stop the link)
                retries = _sendable_count(retries)
            decided = SettleOp(op, record.attempt, retries, max(0.0, round(delay * _MS, _DIGITS)),
                               reason, _sent_error(error) if error else "")
            if record.marked and reason != "cancelled":  # (a cancel the core took counted it already)
                counts = (core.CANCELLED,)
                # (Redis ends a failure for good as its own cancel; a retry's reason, which Redis
                # never reads, tells _settled that it was counted as cancelled, not as a retry)
                decided = decided._replace(reason="cancelled")
            elif record.timed_out and op not in "Zz":  # (a failure's: counted with it, by failing)
                counts = (core.TIMED_OUT, *counts)
            failure = None
            if op in "Zz":  # (its settle may find it marked, or its op be dropped: see failing)
                failure = _Failure(decided.reason == "cancelled")  # (a cancel is counted as it is decided)
                self._failing[record.attempt] = failure
            for event in counts:  # (before its op: a mark that overrules it leaves the count as it is)
                self.ready.count(event, 1, job.type)
            self._queue_op(decided)
            self._ended(record)
            return decided, self._proc, record.timed_out, failure, decided.reason == "cancelled"

    def retry(self, job: Any, delay: float) -> Optional[str]:
        """``job``'s attempt failed and runs again: counted RETRIED here in the step that decides
        it, so that stop()'s release never hands back an attempt counted so ("retried"); an
        attempt this process knows marked by a cancel is decided as cancelled ("cancelled": Redis
        ends it so, and it is reported so). None when it is no longer this process's: counted
        nowhere."""
        decided = self._decide(job, "Y", delay=delay, error=job.last_error or "", counts=(core.RETRIED,))
        self._flush_if_idle()
        if decided is None:
            return None
        return "cancelled" if decided[4] else "retried"

    @contextlib.contextmanager
    def failing(self, job: Any, reason: str, exc: Optional[BaseException]) -> Iterator[Optional[str]]:
        """``job`` failed for good here; its failure callbacks run inside this context, if
        it yields a reason: ``reason``, or "cancelled" when Redis ended the job as cancelled
        instead (another process's cancel had marked the attempt before its settle came:
        counted here as cancelled already, per type, and nothing else), or this process knew
        the attempt marked as it decided the failure (then sent as the cancel it is). A
        cancel here that overtook the attempt's timeout (it came before the failure was
        decided) ends it as cancelled, which Redis counts as cancelled only: so does this
        process (a timeout is counted with the failure, once it stands). None
        when the attempt is no longer this process's to end (handed back by stop()'s
        release, or this process was reaped), whose late result is ignored: the job runs
        again elsewhere, or is reported there.

        Redis counts the failure before they run (the op is sent first, in a round of
        this thread's own), and keeps the job in reporting:<proc> until they ran (op A,
        sent with the next call): if this process dies in between, whoever reaps it
        reports the job. stop() waits for the callbacks meanwhile, as for a handed row's.
        When Redis cannot be reached, the callbacks run anyway and the op follows later.
        With no callback registered there is nothing to wait for: the op goes with the
        next call, as other outcomes do, without a round trip of its own. Either way the A
        is queued only once the caller counted the failure (in this process's per-type
        counters), so join() never returns before that count; and the thread counts as
        reporting from the decision on: a stop() meanwhile waits for it, or its release
        would hand the kept row on to be reported again by another process, though the
        callbacks run here too. A failure counted here before the reply of its settle came
        (no callback, or Redis out of reach) that a cancel mark overruled stays counted as
        what it was decided as (_Failure): a counter never goes down. An exception after the decision (a bug)
        leaves no A to come: the process goes on as if killed (_crashed), and whoever reaps
        its old id reports the job, which join() waits for until then.
        """
        error = (job.last_error or "") if exc is None else _describe(exc)
        me = threading.get_ident()
        with self._reporting_here():
            decided = self._decide(job, "Z", reason=reason, error=error)
            if decided is None:
                yield None
                return
            op, proc, timed_out, failure, _ = decided
            assert failure is not None  # (a "Z" op always has one)
            try:
                if self.dispatcher.failure_callbacks:
                    self._send(op)
                key = _report_key(job.id, op.reason, proc, op.attempt)  # (Redis keeps a cancel's row under it too)
                with section(self._lock):
                    self._reporting[me] = key  # stop() sends its A if this is its thread
                    overruled, dropped = failure.overruled, failure.dropped
                    if overruled is not None or dropped:
                        self._failing.pop(op.attempt, None)  # (settled, or never to be: nothing left to do)
                if dropped:  # its op never reached Redis (this process's id was let go first: reaped), or its job was lost
                    yield None  # the late result of a process declared dead: its reaper ends the job (a lost one: none)
                    return  # (counted nowhere, its timeout neither)
                if op.reason == "cancelled":  # (counted as its cancel was decided: the core's, or _decide)
                    yield "cancelled"
                elif overruled:
                    self.ready.count(core.CANCELLED, 1, job.type)  # (nothing counted before: a callback waited)
                    yield "cancelled"
                else:
                    if timed_out:  # (before the failure: a snapshot sees the timeout before its end)
                        self.ready.count(core.TIMED_OUT, 1, job.type)
                    yield reason  # (the caller counts the failure here, then runs the callbacks)
                    if overruled is None:  # its reply is still to come, or came meanwhile
                        with section(self._lock):  # (a round that reads it now finds it counted)
                            failure.counted = True
                            overruled, dropped = failure.overruled, failure.dropped
                            if overruled is not None or dropped:
                                self._failing.pop(op.attempt, None)
                        if overruled and not dropped:  # (dropped as the callbacks ran: it stays counted)
                            self._overruled_after_counted(op.attempt, job.type, op.reason)
                with section(self._lock):
                    if self._released:
                        return
                    self._queue_op(SettleOp("A", key))  # (until it reaches Redis, join() waits)
            except BaseException:  # (a bug) no A would come: the row Redis keeps would hold join() for ever
                self._crashed(f"ending job {job.id} on {threading.current_thread().name}")  # (reaped: reported)
                raise
        self._flush_if_idle()

    @staticmethod
    def _overruled_after_counted(attempt: str, job_type: str, reason: str) -> None:
        """A failure for good counted here (no callback waited for its settle's reply), or a retry
        (``reason`` "retry"), that Redis ended as cancelled: a cancel had marked the attempt before
        its op came, unheard of here. It stays counted as what it was decided as (a counter never
        goes down: Prometheus reads that as a reset): logged."""
        job_id = attempt.split(":", 1)[1]
        if reason == "retry":
            logger.info("job %s (%s) was cancelled: a cancel from another process reached Redis before its "
                        "retry, which stays counted here as a retry", job_id, job_type)
            return
        logger.info("job %s (%s) was cancelled: a cancel from another process reached Redis before its "
                    "failure (%s), which stays counted here as a failure", job_id, job_type, reason)

    def _settled(self, ops: Sequence[SettleOp], overruled: Sequence[Tuple[str, str]],
                 gone: Sequence[str] = ()) -> List[_Overruled]:
        """The reply to ``ops`` came, naming those a cancel mark ``overruled`` ((attempt, type): Redis
        ended their jobs as cancelled): those whose cancel is still to count here, or to log, with
        their types (``_count_overruled``). An outcome counted before the reply (S, Y, y, and a
        failure for good without callback) stays counted as it is: a counter never goes down
        (Prometheus reads that as a reset). A failure for good of a job the reply names ``gone``
        (Redis lost its hash: lib.lua's job_gone) is lost, as its id would be anywhere else: not
        counted yet, it is never counted, and no callback runs for it (see failing); the reply's
        gone ids are logged (_log_gone). Called with _lock held."""
        types = dict(overruled)
        lost = set(gone)
        found: List[_Overruled] = []
        for op in ops:
            failure = self._failing.get(op.attempt) if op.op in "Zz" else None
            if failure is not None:
                if lost and op.attempt.split(":", 1)[1] in lost:
                    failure.dropped = True  # (as an op that never reached Redis: nothing to report)
                failure.overruled = op.attempt in types
                if failure.counted or not failure.overruled:  # (else its thread, yet to count, sees it)
                    del self._failing[op.attempt]
                    if failure.overruled and op.reason != "cancelled":
                        found.append((op, types[op.attempt]))
            elif op.attempt in types and (op.op == "B" or (op.op in "Yy" and op.reason != "cancelled")):
                found.append((op, types[op.attempt]))  # (S, Y, y: counted before the reply, they stay; a retry's: logged)
        return found

    def _count_overruled(self, found: Sequence[_Overruled]) -> None:
        """What ``_settled`` found overruled: an attempt given back (B), counted nowhere, counts as
        cancelled now; a failure for good or a retry counted already stays counted
        (_overruled_after_counted)."""
        for op, job_type in found:
            if op.op == "B":
                self.ready.count(core.CANCELLED, 1, job_type)
            else:
                self._overruled_after_counted(op.attempt, job_type, "retry" if op.op in "Yy" else op.reason)

    def _send(self, op: SettleOp) -> None:
        """Send the ops queued so far, ``op`` among them, and wait for Redis to have run them
        (a round under way may carry it: failures of several threads share round trips)."""
        for _ in range(_SEND_TRIES):
            try:
                self._round(unless_sent=op)
            except self._redis_error as exc:
                if not self._stopped.is_set():  # (else abandoned: its ops go with stop()'s release)
                    self._log_outage("settle", exc)
                return
            except Exception:  # (as in _flush_if_idle: the op went with the id let go, whose reaper reports it)
                self._crashed(f"a round on {threading.current_thread().name}")
                return
            if not self._unsent_op(op):
                return

    def _unsent_op(self, op: SettleOp) -> bool:
        """Whether ``op`` still waits to be sent, or to be sent again (its call failed)."""
        with section(self._lock):
            return not self._released and (any(queued is op for queued in self._ops) or (
                self._unsent is not None and any(unsent is op for unsent in self._unsent[3])))

    def returned_late(self, job: Any) -> None:
        """A timed-out attempt's function returned: its type slot is free."""
        with section(self._lock):
            record = self._attempts.get(job)
            if record is None:
                return
            record.returned = True
            if record.decided:
                del self._attempts[job]
            self._queue_op(SettleOp("E", record.attempt))
        self._flush_if_idle()

    def not_held(self, job: Any, exc: BaseException) -> bool:
        """Whether a failed attempt was only refused at its start (given back already), or is
        no longer this process's (_disowned: handed back by stop()'s release while it ran, or
        run under an id this process let go): its failure counts nowhere here (its timeout
        neither: a timeout is counted as the attempt's end is decided)."""
        with section(self._lock):
            if self._forget(job) is not None:
                return True
        if not isinstance(exc, _NotHeld):
            return False
        with section(self._lock):
            self._attempts.pop(job, None)
        return True

    def given_back(self, job: Any) -> None:
        """An attempt that stop() cancelled: back to Redis, not counted."""
        with section(self._lock):
            record = self._attempts.pop(job, None)
            if record is None:
                self._forget(job)
                return
            if not record.expired:
                self._slot_freed(record)
                for op in self._giving_back(job, record):
                    self._queue_op(op)

    def _giving_back(self, job: Any, record: _Attempt) -> List[SettleOp]:
        """The ops that give ``job``'s attempt back to Redis, uncounted. One that started: a B
        op of an attempt whose start Redis never heard of (T) counts no start in a rate window,
        so a type this process does not rate-limit (another process's registration may)
        reports the start first. Called with _lock held."""
        if record.state == _STARTED and job.type not in self._rate_limited:
            return [SettleOp("T", record.attempt), SettleOp("B", record.attempt)]
        return [SettleOp("B", record.attempt)]

    # --- fetching ----------------------------------------------------------------

    def _free(self) -> int:
        """Jobs to ask for: for the worker threads, and for the loop (_loop_room). None after a
        round that stopped at a job this process could not take (FetchReply.stopped), until a place
        here frees: asked again, Redis would stop there again. Called with _lock held."""
        if self._closing or not self._workers:
            return 0
        free = max(0, self._workers + self._prefetch - self._in_hand)
        if not self._loop_types:
            return free
        return 0 if self._stopped_at == self._freed else free + self._loop_room()

    def _loop_room(self) -> int:
        """Jobs of async executors to ask for: what their types' limits leave of this process's
        attempts on the loop (Redis holds each type to its limit across processes). With _lock held."""
        return max(0, sum(self._loop_types.values()) - self._on_loop)

    def runs_on(self, job_type: str, on_loop: bool, limit: int) -> None:
        """``job_type``'s executor, registered (again), is async (``on_loop``) or not: its jobs are
        fetched for the event loop, up to its ``limit``, or for the worker threads. One found async
        as its function returned an awaitable (its attempt handed over to the loop): its attempts
        held here hold no worker's place any more."""
        with section(self._lock):
            if not on_loop:
                self._loop_types.pop(job_type, None)
                return
            self._loop_types[job_type] = limit
            moved = [record for job, record in itertools.chain(self._attempts.items(), self._disowned.items())
                     if job.type == job_type and not record.on_loop and not record.expired
                     and record.state != _GIVEN_BACK]
            for record in moved:
                self._count_out(record)
                record.on_loop = True
                self._on_loop += 1
            if moved:
                self._prefetch = _PREFETCH
            self._freed += 1  # (a round that stopped at one of its jobs, or at a thread job, may go on now)
            self._wake_pump()

    def _round(self, unless_sent: Optional[SettleOp] = None) -> int:
        """One fetch script call: send the unsent ops, take up to the free slots; jobs taken.
        With ``unless_sent``: none if the round before this one sent that op."""
        with section(self._round_lock):
            if self._released or (unless_sent is not None and not self._unsent_op(unless_sent)):
                return 0
            with section(self._lock):
                if self._unsent is None:  # else resend the failed call as it was: the script knows it
                    ops, self._ops = self._ops, []
                    free = self._free()  # (none after a round that stopped, until a place frees)
                    loop_room = min(free, self._loop_room()) if self._loop_types else 0
                    self._unsent = (self._proc, format(next(self._fetch_ids), "x"), free - loop_room, ops,
                                    loop_room, tuple(self._loop_types), self._freed)
                    self._unsent_tried = False
                limits, self._limits = self._limits, {}
                lost, self._lost_limits = self._lost_limits, {}
            # Every call of a round gives up as soon as stop() begins (its connection closed), as the
            # idle wait and the heartbeat's beat do: a server that holds its reply (frozen) would keep
            # it up to the socket timeout, past stop(), holding _round_lock, which stop()'s release
            # waits for. A fetch so given up may have run: the release gives back what it leased.
            stopped = self._stopped
            try:  # before the fetch, a resent one too, so that it admits by the current limits
                if lost:
                    self.scripts.set_limits(lost, only_missing=True, timeout=_SOCKET_TIMEOUT, abandoned=stopped)
                if limits:
                    self.scripts.set_limits(limits, timeout=_SOCKET_TIMEOUT, abandoned=stopped)
            except BaseException:
                with section(self._lock):  # sent again before the next round's fetch; a newer one wins
                    self._limits = {**limits, **self._limits}
                    self._lost_limits = {**lost, **self._lost_limits}
                raise
            proc, fetch_id, n, ops, loop_room, loop_types, freed = self._unsent
            self.broker._check_server(abandoned=stopped)
            sent = time.monotonic()
            tried, self._unsent_tried = self._unsent_tried, True
            try:
                reply = self.scripts.fetch(proc, fetch_id, n, self._lease_ms, self.broker.max_crash_recoveries,
                                           self._registered, ops, self.config.buffer_size, loop_room, loop_types,
                                           timeout=_SOCKET_TIMEOUT, abandoned=stopped)
            except self._redis_error as exc:
                self._no_answer(proc, exc)
                raise
            if reply.reaped:  # (this call ran none of its ops; a try before it without a reply may have)
                self._unsent_tried = tried
                self._abandon(reply.lost)
                return 0
            self._unsent = None
            self._registered = self._registered or reply.now_ms
            with section(self._lock):
                self._renewed(sent)
                if reply.stopped:
                    self._stopped_at = freed
                found = self._settled(ops, reply.overruled, reply.gone) if reply.overruled or self._failing else ()
            self._count_overruled(found)  # (before a reporter reports their rows)
            if reply.next_due_ms is None:
                self._next_due = math.inf
            else:
                # The script ran about half a round trip before the reply came; fire half a round
                # trip early, so the fetch reaches the server at the due time.
                due = sent + (reply.next_due_ms * _MS - reply.now_us) / _US
                self._next_due = due
                self._timer_alarm.wake_before(due)
            jobs, undecodable = self._take(reply.jobs)
        self._log_gone(reply.gone)
        self._hand_on(reply.crashed, reply.cancels, undecodable)
        return jobs

    def _no_answer(self, proc: str, exc: BaseException) -> None:
        """A fetch or beat of ``proc`` failed with ``exc``: one that got no reply in time, or that
        stop() made give up, may have run and registered ``proc`` (see _registering). With
        _round_lock held."""
        if isinstance(exc, __import__("redis").TimeoutError) or self._stopped.is_set():
            self._registering = proc

    def _log_gone(self, ids: Sequence[str]) -> None:
        """The jobs a reply says Redis lost the data of (lib.lua's job_gone): dropped there, and
        no longer unfinished; no failure callback can run for them, as nothing of them is left."""
        for job_id in ids:
            logger.error("job %s of Redis queue %r is lost: its id waited in Redis but its data (its "
                         "job:<id> hash) is gone (evicted under a maxmemory-policy other than noeviction, "
                         "or deleted or overwritten by another program); it was dropped and runs no more, and no "
                         "on_failure callback can run for it, as its data is gone", job_id, self.broker.name)

    def _place(self, job: Any) -> bool:
        """Into the core; False when a copy of the job is still there. Called with _round_lock held."""
        try:
            self.ready.accept([job])
        except DuplicateJob:
            return False
        self.ready.requeue(job)
        return True

    def _take(self, fetched: Sequence[Any]) -> Tuple[int, List[Any]]:
        """Hand fetched attempts to the core: (how many, and the stand-ins (undecodable_job) of
        those that cannot be decoded, for a reporter to fail). Called with _round_lock held."""
        if self._held:
            with section(self._lock):  # one given back while it waited for its copy to leave: no copy is in the core
                for job in self._held:
                    record = self._attempts.get(job)
                    if record is not None and record.state == _GIVEN_BACK:
                        del self._attempts[job]
            try:
                self._held = [job for job in self._held if job in self._attempts and not self._place(job)]
            except QueueStopped:
                self._held = []  # stop() gives them back
        if not fetched:
            return 0, []
        jobs = []
        give_back = []
        undecodable = []  # never run: dead, and reported with its body as the payload
        for item in fetched:
            try:
                job = decode_job(item.id, item.body, item.retries, item.error)
            except Exception as exc:  # written by another program, or a broken client
                logger.error("job %s in Redis cannot be decoded (%s); it is dead", item.id, _describe(exc))
                undecodable.append((undecodable_job(item.id, item.body, item.retries,
                                                    f"cannot decode: {_describe(exc)}"), item.attempt))
                continue
            jobs.append((job, item.attempt))
        now = time.monotonic()
        with section(self._lock):
            loop_types = self._loop_types
            for job, attempt in jobs:
                if job.type in loop_types:
                    self._attempts[job] = _Attempt(attempt, now, True)
                    self._on_loop += 1
                else:
                    self._attempts[job] = _Attempt(attempt, now)
                    self._in_hand += 1
            for job, attempt in undecodable:  # (no worker takes it, nor a give-back: a reporter fails it)
                record = self._attempts[job] = _Attempt(attempt, now)
                record.state = _STARTED
                self._in_hand += 1
        try:  # the whole batch in one core call, most of the time
            placed = self.ready.push_many([job for job, _ in jobs])
        except (DuplicateJob, QueueStopped):
            placed = False
        if not placed:  # one by one: the buffer is small, or a given-up copy holds an id
            for job, attempt in jobs:
                try:
                    if not self._place(job):
                        self._held.append(job)
                except QueueStopped:
                    give_back.append(job)
        if give_back:
            with section(self._lock):
                for job in give_back:
                    record = self._attempts.pop(job)
                    self._count_out(record)
                    self._queue_op(SettleOp("B", record.attempt))
        return len(jobs), [job for job, _ in undecodable]

    def _abandon(self, lost: bool) -> None:
        """This process was reaped (silent past its lease), or Redis lost the queue's state since it
        registered (``lost``): drop what it held, register anew."""
        with section(self._lock):
            running = sum(1 for r in self._attempts.values() if r.state == _STARTED and not r.expired)
            buffered = len(self._attempts) - running
        old = self._let_go()
        if lost:  # (not "given to others": nobody has them, and no process will run them again)
            logger.error("Redis at %s lost the state of queue %r (it restarted without its data, or its keys "
                         "were deleted): the jobs queued there are gone, and so are the %d attempt(s) this "
                         "process (%s) was running, whose outcomes are ignored, and the %d job(s) it had "
                         "fetched, which it dropped; it registers again as %s", redacted_url(self.broker.url),
                         self.broker.name, running, old, buffered, self._proc)
            return
        logger.warning("this process (%s) was silent past its %gs lease and its jobs were given to "
                       "others; it dropped its buffer and registers again as %s", old, self.broker.lease,
                       self._proc)

    def _let_go(self) -> str:
        """Drop this process's id and what it held under it (its running attempts run on, their
        outcomes stale), for a new id that the next fetch or beat registers; returns the old
        id. Called with _round_lock held."""
        with section(self._lock):
            for record in self._attempts.values():
                if record.state == _PENDING:
                    record.state = _GIVEN_BACK  # a worker that pops it refuses it
            running = [r for r in self._attempts.values() if r.state == _STARTED and not r.expired]
            # The late result of a process declared dead is ignored: the running attempts run on,
            # counted nowhere here whatever they end as from now on (their reaper gave their jobs
            # back, or ended them; a timeout not decided yet is never counted). What was counted
            # here before stays (see _take_back): the outcomes whose ops never reached Redis
            # (dropped here, or sent in the call whose reply said this id was reaped: not run).
            for job, r in self._attempts.items():
                if r.state == _STARTED and not r.decided:  # (a decided one's op is dropped)
                    self._disowned[job] = r
            self._attempts = {}
            self._held = []  # (called with _round_lock held)
            # (ops of a call that got no reply may have been run by Redis: their counts stay)
            dropped = self._ops if self._unsent is None or self._unsent_tried else self._unsent[3] + self._ops
            self._unsent = None  # a call for the old id: resent, it would register that id again
            # running attempts still occupy their workers (their places on the loop)
            self._on_loop = sum(1 for r in running if r.on_loop)
            self._in_hand = len(running) - self._on_loop
            self._stopped_at = -1  # (the round that stopped was the old id's)
            self._ops = []  # their attempts are no longer ours: every op would be stale
            self._take_back(dropped)
            self._failing = {}  # (no reply will say what became of their ops)
            old, self._proc = self._proc, self._new_proc_id()
            self._registered = 0
            # Sent again before the next fetch, for the types Redis holds none for: it may have lost
            # them (it restarted without its data: every process finds itself reaped), and would
            # hand out jobs without limits.
            self._lost_limits = dict(self._registered_limits)
            self._renewal.notify_all()  # workers waiting to start a job of the old id refuse it
            self._reported.notify_all()  # a stop() waiting for a success being counted (ending) goes on
        return old

    def _take_back(self, dropped: Sequence[SettleOp]) -> None:
        """``dropped``, ops that never reached Redis as this process let its id go: what they
        counted here stays counted, since a counter that goes down reads as a reset to
        Prometheus (a failure for good is marked, so that its thread runs no callback for it and,
        not counted yet, never counts it: see failing). Called with _lock held."""
        for op in dropped:
            failure = self._failing.get(op.attempt) if op.op in "Zz" else None
            if failure is not None:
                failure.dropped = True

    # --- threads -----------------------------------------------------------------

    def ticks(self, queue: Any) -> Any:
        """The TickBackend of ``queue``'s schedules: each tick claimed once in Redis."""
        from ._schedules import BrokerTicks

        return BrokerTicks(self, queue)

    def start(self, workers: int) -> None:
        with section(self._lock):
            self._workers = workers
        for target, name in ((self._pump, "tinymq-redis-pump"), (self._timer, "tinymq-redis-timer"),
                             (self._heartbeat, "tinymq-redis-heartbeat")):
            thread = threading.Thread(target=self._keep_running, args=(target, name), name=name, daemon=True)
            thread.start()  # (RuntimeError when the system has no thread to give: the queue stops)
            self._threads.append(thread)  # (stop() joins them: only those started)

    def _keep_running(self, loop: Any, name: str) -> None:
        """Run ``loop`` (the pump, the timer or the heartbeat) until stop(); after a crash
        (_crashed), again from the start, a quarter lease later."""
        while True:
            try:
                loop()
                return
            except Exception:
                if not self._crashed(name):
                    return
            if self._stopped.wait(self.broker.lease / 4):
                return

    def _crashed(self, name: str) -> bool:
        """The thread ``name`` failed on something other than Redis (a bug, a job written by
        another program that trips something, a MemoryError): its state, and this process's,
        may be half-changed, and with that thread gone the others would go on (a heartbeat
        renewing the lease of jobs that no pump settles or fetches any more: held for ever;
        a pump without a heartbeat: reaped while it runs them). So the process goes on as
        if it had been killed and started again: the id it held is never renewed again, so
        that whoever reaps it (other processes, or this one) gives its attempts to others,
        each counted as a crash, and reports the rows it was handed; it drops its buffer,
        and registers again under a new id. Called in the except clause. False when stopping."""
        with section(self._round_lock):
            with section(self._lock):
                closing = self._closing
            old = "" if closing else self._let_go()
        if closing:
            logger.exception("Redis queue %r: %s crashed while the queue stops", self.broker.name, name)
            return False
        logger.exception("Redis queue %r: %s crashed; this process lets its id %s go as if it had been "
                         "killed (its jobs go to other processes once its %gs lease runs out, each "
                         "counted as a crash), drops its buffer and carries on as %s", self.broker.name,
                         name, old, self.broker.lease, self._proc)
        return True

    def _log_outage(self, what: str, exc: BaseException) -> None:
        now = time.monotonic()
        if now - self._outage_logged >= _LOG_EVERY:
            self._outage_logged = now
            logger.warning("Redis queue %r at %s: %s failed (%s); retrying", self.broker.name,
                           redacted_url(self.broker.url), what, exc)

    def _pump(self) -> None:
        # Its idle wait on a connection of its own, given up (its socket closed) as soon as stop()
        # begins, as the heartbeat's calls are: a server that holds the reply (frozen) would keep
        # it up to the socket timeout, past stop().
        blocking = self.broker._connections(1, _IDLE_WAIT + _SOCKET_TIMEOUT)
        signal_key = self.scripts.key("signal")
        pause = _BACKOFF_MIN
        backlog = False  # the last round filled its batch: Redis has more
        try:  # (another exception ends it: _keep_running)
            while True:
                with section(self._lock):
                    self._wait_for_a_round(backlog)
                    if self._closing:
                        return
                    asked = self._free()
                try:
                    taken = self._round()
                    backlog = asked > 0 and taken >= asked
                    pause = _BACKOFF_MIN
                except self._redis_error as exc:
                    if self._stopped.is_set():
                        return  # (abandoned: stop() began, and its release sends the round's ops)
                    self._log_outage("fetch", exc)
                    self._stopped.wait(pause)
                    pause = min(pause * 2, _BACKOFF_MAX)
                    continue
                if asked and taken < asked:  # Redis has nothing more for us now: wait for a signal
                    with section(self._lock):
                        # (or it stopped at a job this process cannot take: wait for a place here to free)
                        if self._ops or self._closing or self._stopped_at == self._freed:
                            continue
                        self._pump_idle = True
                    if taken:
                        # Give up the GIL: the workers this round woke start now, not once this
                        # thread blocks in the BLPOP's reply (after it has built and sent it).
                        time.sleep(0)
                    try:
                        self.scripts.blocking_pop(blocking, (signal_key, self._wake_key()), _IDLE_WAIT,
                                                  _IDLE_WAIT + _SOCKET_TIMEOUT, self._stopped)
                    except self._redis_error as exc:
                        if self._stopped.is_set():
                            return  # (abandoned: stop() began)
                        self._log_outage("waiting for jobs", exc)
                        self._stopped.wait(pause)
                        pause = min(pause * 2, _BACKOFF_MAX)
                    finally:
                        with section(self._lock):
                            self._pump_idle = False
        finally:
            blocking.close()

    def _wait_for_a_round(self, backlog: bool) -> None:
        """Wait until a round is worth its round trip. Called with _lock held.

        Idle, a single free slot is worth it (latency). With a backlog, wait up
        to ``_SETTLE_DELAY`` for the whole batch of slots to free, so a round
        carries many settles and jobs; unsent ops wait as long at most.
        """
        goal = self._workers + self._prefetch if backlog else 1
        since = None
        try:
            while not self._closing and self._unsent is None:
                free = self._free()
                if free >= goal or len(self._ops) >= _SETTLE_BATCH:
                    return
                self._pump_goal = goal
                if free or self._ops:
                    now = time.monotonic()
                    if since is None:
                        since = min(now, self._ops_since) if self._ops else now
                    left = since + _SETTLE_DELAY - now
                    if left <= 0.0:
                        return
                    self._changed.wait(left)
                else:
                    self._pump_goal = 0
                    self._changed.wait()
        finally:
            self._pump_goal = 1

    def _wake_key(self) -> str:
        return self.scripts.key("wake:" + self._proc)

    def _timer(self) -> None:
        alarm = self._timer_alarm
        while not self._closing:
            due = self._next_due
            now = time.monotonic()
            if due > now:
                alarm.sleep(min(due - now, _IDLE_WAIT), due)
                continue
            self._next_due = math.inf  # the round below sets the next one
            with section(self._lock):
                free = self._free()
            if not free:
                continue  # the pump fetches when a slot frees; enqueues promote due jobs meanwhile
            try:
                self._round()
            except self._redis_error as exc:
                if self._stopped.is_set():
                    return  # (abandoned: stop() began)
                self._log_outage("fetching due jobs", exc)
                self._next_due = time.monotonic() + _BACKOFF_MIN

    def _give_back_stuck(self) -> None:
        """Jobs that waited ``_BUFFERED_MAX`` here without a worker (each one is busy with a
        long job) go back to the head of their priority in Redis, where an idle process
        takes them; until a worker here frees, this process fetches none beyond its free
        workers (else it would take them again). Each leaves the core at once, so that
        fetched again here it is placed at once; one a worker took meanwhile is refused."""
        now = time.monotonic()
        with section(self._round_lock):  # (_held stays as it is)
            with section(self._lock):
                if self._closing:
                    return
                stuck = [(job, record) for job, record in self._attempts.items()
                         if record.state == _PENDING and now - record.since >= _BUFFERED_MAX]
                if not stuck:
                    return
                for _, record in stuck:
                    record.state = _GIVEN_BACK  # a worker that pops it refuses it
                    self._count_out(record)
                self._prefetch = 0
                for _, record in reversed(stuck):  # each goes to the head: the first last
                    self._queue_op(SettleOp("B", record.attempt))
            for job, _ in stuck:
                if any(job is other for other in self._held):
                    continue  # not in the core (an older copy is: refused when a worker pops it)
                if self.ready.remove(job.id) is job:
                    self.ready.task_done(job)
                    with section(self._lock):
                        self._attempts.pop(job, None)
        logger.debug("gave back %d job(s) that waited %gs for a worker here", len(stuck), _BUFFERED_MAX)
        self._flush_if_idle()

    def _heartbeat(self) -> None:
        """Renew the lease every lease / 4; meanwhile, every second, give back stuck jobs."""
        interval = self.broker.lease / 4
        next_beat = time.monotonic() + interval
        # (proc, beat id) of a beat that got no reply: the next one is that beat again, so the
        # rows it handed this process (reporting:<proc>) reach it; a fresh beat id never would.
        unanswered: Optional[Tuple[str, str]] = None
        next_look = time.monotonic() + _SETTINGS_LOOK
        while not self._stopped.wait(max(0.0, min(next_beat - time.monotonic(), _BUFFERED_MAX))):
            self._give_back_stuck()
            if time.monotonic() < next_beat:
                continue
            next_beat = time.monotonic() + interval
            look = self._settings_look
            if time.monotonic() >= next_look and (look is None or not look.is_alive()):
                next_look = time.monotonic() + _SETTINGS_LOOK
                look = self._settings_look = threading.Thread(target=self._look_at_settings, args=(interval,),
                                                              name="tinymq-redis-settings", daemon=True)
                look.start()
            try:
                with section(self._round_lock):  # never beside a round: a reap answer must meet a settled state
                    proc, registered = self._proc, self._registered
                    if unanswered is None or unanswered[0] != proc:
                        unanswered = (proc, format(next(self._beat_ids), "x"))
                    sent = time.monotonic()
                    try:
                        beat = self.broker._call_resending(  # (its crashed jobs must not be lost)
                            self.scripts.heartbeat, proc, self._lease_ms,
                            self.broker.max_crash_recoveries, registered, unanswered[1],
                            abandoned=self._stopped)  # (given up, its connection closed, once stop() begins)
                    except self._redis_error as exc:
                        self._no_answer(proc, exc)
                        raise
                    unanswered = None
                    alive = beat.alive
                    if not alive:
                        self._abandon(beat.lost)
                    else:
                        self._registered = self._registered or beat.now_ms
                        with section(self._lock):
                            self._renewed(sent)
            except self._redis_error as exc:
                if not self._stopped.is_set():  # (else abandoned: the beat's reply no longer matters)
                    self._log_outage("heartbeat", exc)
                continue
            self._log_gone(beat.gone)
            self._hand_on(beat.crashed, beat.cancels if alive else ())  # (never run here: the lease comes first)
            if alive:
                self._report_lost()

    def _look_at_settings(self, timeout: float) -> None:
        """The broker's look at Redis's settings (every _SETTINGS_LOOK), on a thread of its own: a
        server slow to answer CONFIG (each call waits ``timeout`` at most) never delays a beat. It
        gives up as soon as stop() begins (its connection closed), so that stop() returns after it."""
        try:
            self.broker._look_at_settings(timeout, self._stopped)
        except self._redis_error:
            pass  # (an outage: the heartbeat says so)
        except Exception:  # (a bug: the next look tries again; the lease is not this thread's)
            logger.exception("Redis queue %r: the look at Redis's settings failed", self.broker.name)

    # --- stopping ----------------------------------------------------------------

    def stop(self, deadline: Optional[float] = None) -> None:
        """After the dispatcher stopped: give back unstarted jobs (in order), settle, unregister.

        ``deadline`` (monotonic; stop()'s timeout): every wait here ends by then, and each call
        to Redis gets what is left (_CALL_FLOOR at least): against a frozen Redis, stop(timeout)
        returns in about its timeout, what it could not give back returns when the lease runs out.
        Without one, Redis is waited for _STOP_WAIT (the give-back) and a little more, failure
        callbacks apart: the calls of the pump, the timer and the heartbeat (a fetch round, the idle
        wait, a beat) give up as soon as stop() begins, so their threads end at once (within
        _IDLE_WAIT + 1 in all, a bound they never reach); a fetch so given up may have run, and
        what it leased goes back with the release, or when the lease runs out."""
        def left(most: float) -> float:
            return most if deadline is None else max(0.0, min(most, deadline - time.monotonic()))

        with section(self._lock):
            if self._closing:
                return
            self._closing = True
            self._changed.notify_all()  # (the pump is the only waiter)
            self._renewal.notify_all()
        self._stopped.set()
        IN_FLIGHT.abandon(self._stopped)  # (their sockets shut down: the reads waiting end at once)
        self._timer_alarm.wake()
        # (the pump's idle wait, as its other calls, gives up at _stopped: no call wakes it, which a
        # frozen server would hold as long as its bound)
        started = [thread for thread in self._threads if thread.is_alive()]
        joined_by = time.monotonic() + left(_IDLE_WAIT + 1.0)  # (one bound for all: not one each)
        for thread in started:
            if thread is not threading.current_thread():
                thread.join(max(0.0, joined_by - time.monotonic()))
        look = self._settings_look  # (after the heartbeat's end: it starts no other one)
        if look is not None:  # a look in a call gives up at _stopped: none goes on past stop(), on a connection
            look.join(max(joined_by - time.monotonic(), _CALL_FLOOR))  # the broker's close() leaves open while lent
        # Failure callbacks still running (or about to, on a reporter) on rows a reply handed
        # this process: released before they end, the rows would go to `reports` and be
        # reported again by another process (at least once: a callback stuck past
        # _REPORT_WAIT does not hold up stop() for ever). A callback that stops the queue
        # does not wait for itself: its row counts as reported.
        me = threading.get_ident()
        reports_by = time.monotonic() + left(_REPORT_WAIT)
        with section(self._lock):
            # (and for successes being counted, whose ops then go with the release: handed back
            # now, one would be counted here for an instant, though its job runs again elsewhere;
            # not for one this thread counts, see below)
            while (any(ident != me for ident in self._reporting)
                   or any(reporter.ident != me for reporter in self._reporters)
                   or any(record.ending not in (0, me) for record in self._attempts.values())):
                remaining = reports_by - time.monotonic()
                if remaining <= 0.0:
                    logger.warning("Redis queue %r: stop() did not wait longer than %gs for failure "
                                   "callbacks still running; another process reports their jobs again",
                                   self.broker.name, left(_REPORT_WAIT))
                    break
                self._reported.wait(remaining)
            # A success this very thread is counting (a stop() the collector ran between its
            # succeeding() and succeeded()): its op comes only once this call returns, so it is
            # not waited for (it was, _REPORT_WAIT, then the job handed back to run again); it is
            # decided, and its op goes with the release, as succeeded() would have queued it
            # (succeeded() then finds it gone, and queues nothing).
            for job, record in list(self._attempts.items()):
                if record.ending == me:
                    del self._attempts[job]
                    self._succeeded(record)
            # From here on an attempt is no longer this process's to end (_decide): a failure
            # decided now would go with the release, whose row another process reports, while
            # its callbacks ran here too (stop() no longer waits for them).
            self._released = True
            # Attempts still running are handed back by the release (or, if it fails, at the
            # reap): each runs again elsewhere, so what it ends as here counts nowhere.
            handed_back = {job: record for job, record in self._attempts.items()
                           if record.state == _STARTED and not record.expired}
            for job in handed_back:
                del self._attempts[job]
            self._disowned.update(handed_back)
            self._handed_back = handed_back
            own = self._reporting.get(me)
            if own is not None:
                self._queue_op(SettleOp("A", own))
        # A round still under way (Redis does not answer; the heartbeat's beat, resent, too) holds
        # the lock: waited for until the deadline (_CALL_FLOOR at least: a healthy round ends well
        # within it), and the release call gets what is left.
        released_by = time.monotonic() + _STOP_WAIT if deadline is None else deadline
        if not self._round_lock.acquire(timeout=max(released_by - time.monotonic(), _CALL_FLOOR)):
            with section(self._lock):
                unstarted = sum(1 for record in self._attempts.values() if record.state == _PENDING)
                outcomes = len(self._ops) + (0 if self._unsent is None else len(self._unsent[3]))
            self._not_given_back(unstarted, outcomes, "a call under way holds it up")
        else:
            try:
                self._release(released_by)
            finally:
                self._round_lock.release()
        connections = self.scripts.connections
        if connections is not None:  # a connect that a call with a bound (the release's too) gave up on: not
            connections.drop_opening(_CALL_FLOOR)  # left to run past stop(), up to the socket timeout

    def _not_given_back(self, unstarted: int, outcomes: int, why: object) -> None:
        """stop() leaves without giving back what this process holds (Redis did not answer)."""
        where = f"Redis queue {self.broker.name!r} at {redacted_url(self.broker.url)}"
        if not unstarted and not outcomes:
            logger.warning("%s: stop() could not unregister this process in time (%s); it held no job, "
                           "and its %gs lease runs out by itself", where, why, self.broker.lease)
            return
        logger.warning("%s: stop() could not give back %d unstarted job(s) and %d outcome(s) in time (%s); "
                       "nothing is lost: Redis hands the jobs this process holds to another process once "
                       "its %gs lease runs out (each counted as a crash; one whose outcome was not sent runs "
                       "again)", where, unstarted, outcomes, why, self.broker.lease)

    def _release(self, deadline: float) -> None:
        """stop()'s last step: give back the unstarted attempts, send the ops left, unregister
        (by ``deadline``, _CALL_FLOOR at least). Called with _round_lock held."""
        with section(self._lock):
            unstarted = [r for r in self._attempts.values() if r.state == _PENDING]
            for record in unstarted:
                record.state = _GIVEN_BACK
            # Running ones as given_back() gives them back, so that the reply names those a
            # cancel mark ended (counted here as cancelled, as there).
            running = [op for job, record in self._handed_back.items() for op in self._giving_back(job, record)]
            # A round that failed (the pump resends it no more once closing): its ops go
            # first, in order; those Redis ran already (its reply was lost) are stale.
            failed = [] if self._unsent is None else self._unsent[3]
            self._unsent = None
            ops = failed + self._ops + running + [SettleOp("B", r.attempt) for r in reversed(unstarted)]
            self._ops = []
            proc, registered = self._proc, self._registered
        if not registered and not ops and self._registering != proc:  # (never registered: nothing to release)
            return
        try:  # (it deletes the wake-up list too)
            reply = self._release_call(proc, ops, deadline)
        except self._redis_error as exc:
            self._not_given_back(len(unstarted), len(ops) - len(unstarted) - len(running), exc)
            return
        with section(self._lock):
            found = self._settled(ops, reply.overruled)
            self._failing = {}  # (their threads are done, or past stop()'s wait: they count as they are)
        self._count_overruled(found)

    def _release_call(self, proc: str, ops: Sequence[SettleOp], deadline: float) -> Any:
        """The release call, tried again (with the pump's backoff) while its connection is
        refused or breaks, until ``deadline``: a Redis being restarted answers within stop()'s
        wait, and what this process holds goes back then, not at its lease's end (counted as
        a crash, an outcome not sent run again). A silent server is not tried again."""
        connection_error = __import__("redis").ConnectionError
        pause = _BACKOFF_MIN
        while True:
            try:
                return self.broker._call_resending(self.scripts.release, proc, ops,
                                                   deadline=_call_deadline(deadline))
            except connection_error:
                if time.monotonic() + pause >= deadline:
                    raise
            time.sleep(pause)
            pause = min(2 * pause, _BACKOFF_MAX)
