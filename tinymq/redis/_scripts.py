"""The stable low-level API over tinymq's Lua scripts: one method per script.

Each method is one EVALSHA (redis-py's ``Script`` reloads the script on
NOSCRIPT, after a server restart) and returns the script's reply as plain
Python values. The scripts themselves (``*.lua`` beside this file, each with
the definitions of ``lib.lua`` it uses in front: see _script_text) document
their keys, arguments, replies and invariants.

Every script is idempotent against a resend of the same call (the client sends
a call again when the connection failed before its reply came): enqueue by its
token, settle ops by attempt id, fetch by (process, fetch id); beat, reap and
release leave nothing to do twice.
"""
import contextlib
import functools
import math
import os
import queue
import re
import socket
import threading
import time
from typing import Any, Callable, Dict, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Set, Tuple, Union

from ..job import _is_utf8

__all__ = ["Scripts", "Connections", "SettleOp", "Crashed", "Fetched", "FetchReply", "EnqueueReply",
           "BeatReply", "CancelReply", "ReleaseReply", "StatusReply", "key_prefix"]

_HERE = os.path.dirname(os.path.abspath(__file__))
_SCRIPT_NAMES = ("enqueue", "fetch", "settle", "beat", "reap", "release", "limits",
                 "requeue_dead", "purge_dead", "schedule_begin", "schedule_tick", "cancel", "hold", "stats",
                 "status", "unfinished")


def key_prefix(name: str) -> str:
    """``tmq:{<name>}:``: every key of the queue shares this hash tag (one Cluster slot)."""
    if not isinstance(name, str):
        raise TypeError(f"broker name must be a str, got {name!r}")
    if not name:
        raise ValueError(f"broker name must be a non-empty str, got {name!r}")
    if "{" in name or "}" in name:
        raise ValueError(f"broker name must not contain '{{' or '}}' (it is a hash tag), got {name!r}")
    if not _is_utf8(name):  # (else every call naming a key would fail, in the pump's thread too)
        raise ValueError(f"broker name must be text Redis can take, without a lone surrogate, got {name!r}")
    return f"tmq:{{{str.__str__(name)}}}:"  # (the text of a str subclass, as RedisBroker keeps its name)


# Seconds between two looks at whether a wait for a lock or a connection (see _waited) was abandoned.
_ABANDON_POLL = 0.05
# Seconds by which a call's bound may pass the socket timeout's and be left to it (see _reply).
_BOUND_SLACK = 0.5
# Seconds close() waits for the connects it abandons (drop_opening) to end: their sockets closed, they end at once.
_DROP_WAIT = 1.0


def _source(name: str) -> str:
    with open(os.path.join(_HERE, f"{name}.lua"), encoding="utf-8") as file:
        return file.read()


_DEFINITION_START = re.compile(r"^(?=local )", re.MULTILINE)  # each top-level definition of lib.lua
_DEFINED_NAME = re.compile(r"local (?:function )?(\w+)")
_NAME_OUTSIDE_STRINGS_AND_COMMENTS = re.compile(
    r"""--\[\[.*?\]\]|--[^\n]*|'(?:[^'\\\n]|\\.)*'|"(?:[^"\\\n]|\\.)*"|([A-Za-z_]\w*)""", re.DOTALL)


def _names_in(code: str) -> Set[str]:
    """The names that Lua ``code`` mentions, outside its strings and comments."""
    return set(_NAME_OUTSIDE_STRINGS_AND_COMMENTS.findall(code)) - {""}  # ("": a string or a comment)


def _defined_name(definition: str) -> str:
    """The name a top-level definition of lib.lua defines (it starts with ``local``: _DEFINITION_START)."""
    match = _DEFINED_NAME.match(definition)
    if match is None:
        raise ValueError(f"lib.lua: a definition that names nothing: {definition[:40]!r}")
    return match.group(1)


def _script_text(lib: str, script: str) -> str:
    """``script`` with ``lib`` (lib.lua's text) in front, one chunk, keeping of ``lib`` its header
    and the top-level definitions (each from a line that starts with ``local`` to the next one)
    that the script uses, itself or through a definition it keeps: Redis runs the whole chunk
    on every call, each ``local function`` a closure made anew. A definition left out leaves its
    lines blank, so that the line numbers in Redis's errors stay those of lib.lua + the script."""
    header, *definitions = _DEFINITION_START.split(lib)
    names = [_defined_name(text) for text in definitions]
    used = _names_in(script)
    for name, text in zip(reversed(names), reversed(definitions)):  # (in Lua, each uses only those above it)
        if name in used:
            used |= _names_in(text)
    kept = [text if name in used else "\n" * text.count("\n") for name, text in zip(names, definitions)]
    return header + "".join(kept) + "\n" + script


@functools.lru_cache(maxsize=None)
def _script_texts() -> Dict[str, str]:
    """Every script's text (``_script_text``), made once."""
    lib = _source("lib")
    return {script: _script_text(lib, _source(script)) for script in _SCRIPT_NAMES}


class SettleOp(NamedTuple):
    """One attempt's outcome, as lib.lua's ``settle`` takes it.

    ``op``: "S" success, "Y" retry after ``delay_ms``, "Z" dead for ``reason``;
    "y"/"z" the same decided at the deadline (the attempt keeps its slot until
    "E", its late return); "B" give back (not counted); "T" started (a
    rate-limited type's attempt: its start counts from now in the rate window);
    "A" with a row's key as the attempt: a row a reply handed to this process
    to report (a ``Crashed``, its ``key``) was reported.
    """

    op: str
    attempt: str
    retries: int = 0
    delay_ms: float = 0
    reason: str = ""
    error: str = ""


class Crashed(NamedTuple):
    """A job that left the queue without a process to report it: it died with its process
    once too often (now dead, reason "crashed"), or it ended as "cancelled" after its
    attempt ended on its own (or with its process) once q.cancel() had marked it."""

    id: str
    body: str
    retries: Union[int, str]  # as Redis holds it: decode_job reads it (a foreign write may hold anything)
    error: str
    reason: str = "crashed"
    key: str = ""  # its field in reporting:<proc>, acknowledged by op A (see lib.lua's handed)


class Fetched(NamedTuple):
    """One attempt handed to a process."""

    attempt: str
    body: str
    retries: Union[int, str]  # as Redis holds it: decode_job reads it (a foreign write may hold anything)
    error: str

    @property
    def id(self) -> str:
        return self.attempt.split(":", 1)[1]


class FetchReply(NamedTuple):
    reaped: bool  # this process was declared dead: nothing was done
    now_ms: int  # the server clock
    next_due_ms: Optional[float]  # the earliest delayed job's due time, if any
    stale: int  # settle ops that changed nothing
    crashed: List[Crashed]
    jobs: List[Fetched]
    now_us: int = 0  # the server clock in microseconds (now_ms is it floored)
    cancels: Sequence[str] = ()  # attempts of this process that q.cancel() marked
    # (attempt, type) of each op of the call that a mark made a cancel (not this process's own)
    overruled: Sequence[Tuple[str, str]] = ()
    lost: bool = False  # reaped because Redis lost the queue's state since this process registered
    gone: Sequence[str] = ()  # ids of jobs whose hash Redis lost, dropped (lib.lua's job_gone)
    stopped: bool = False  # it stopped at a job this process could not take: Redis has more


class BeatReply(NamedTuple):
    alive: bool  # False: this process was reaped (nothing was renewed)
    now_ms: int
    crashed: List[Crashed]
    cancels: Sequence[str]  # attempts of this process that q.cancel() marked
    lost: bool = False  # not alive because Redis lost the queue's state since this process registered
    gone: Sequence[str] = ()  # as FetchReply's, with those other calls found (lib.lua's job_gone)


class CancelReply(NamedTuple):
    status: str  # "none" (no unfinished job has the id), "removed" (it was waiting), "marked" (leased)
    removed: Optional[Crashed] = None  # with "removed": the job (id, body, retries, error) to report
    proc: str = ""  # with "marked": the process that holds the attempt
    attempt: str = ""
    kept: bool = False  # with "removed": the row waits in the caller's reporting hash until acknowledged


class ReleaseReply(NamedTuple):
    stale: int  # settle ops that changed nothing
    overruled: Sequence[Tuple[str, str]] = ()  # as FetchReply's


class StatusReply(NamedTuple):
    """Every figure of ``status --redis``, read at one instant (status.lua)."""

    sizes: Tuple[int, int, int]  # ready (parked, and due that the buffer's room takes, included): high, medium, low
    delayed: int  # delayed jobs not due yet
    counters: Dict[str, int]  # the stats hash
    executors: Dict[str, Tuple[int, int]]  # type -> (attempts holding a slot, max_concurrent_jobs)
    processes: int  # live worker processes
    rate_limits: Dict[str, Tuple[int, float, int]]  # type -> (max_starts, per seconds, starts in the window)
    dead_count: int  # every dead job
    dead: List[Tuple[str, str, Any, str, str]]  # the newest read: (id, body, retries, error, reason), oldest first
    waiting: int  # due jobs beyond the buffer's room (while it is unknown, beyond the first unknown_room)
    buffer_size: Optional[int]  # the one the worker processes' fetches keep (None: no fetch has kept one)


class EnqueueReply(NamedTuple):
    status: str  # "ok", "again" (a resend of an accepted batch), "dup", "full"
    evicted: List[Crashed]  # jobs evicted from the delayed set (by the first call, with "again"); a key: kept
    duplicate_id: Optional[str] = None
    ready: int = 0  # with "full": ready jobs already there


_ROW_FIELDS = 7  # an enqueue row: id, type, priority, delay ms, body, retries, last error
_ROW_DEFAULTS = (0, "")  # what an older, shorter row (5 fields: no retries; 6: no last error) brings


def _full_row(row: Sequence[Any]) -> Sequence[Any]:
    """An enqueue row with its retries and last error (0 and '' when it has none)."""
    missing = _ROW_FIELDS - len(row)
    return (*row, *_ROW_DEFAULTS[len(_ROW_DEFAULTS) - missing:]) if missing > 0 else row

_SHORT_OPS = frozenset("SEBTA")  # sent as (op, attempt) only


def _ops_args(ops: Iterable[SettleOp]) -> List[Any]:
    flat: List[Any] = []
    for op in ops:
        flat += (op.op, _wire(op.attempt))  # (an attempt names its job's id, as Redis holds it)
        if op.op not in _SHORT_OPS:
            flat.extend(op[2:])
    return flat


def readable_id(job_id: str) -> bool:
    """Whether ``job_id`` (or a job type) is what some bytes in Redis read as: UTF-8 text, or with the lone
    surrogates (\\udc80-\\udcff) that stand for bytes that are not UTF-8 (see _wire)."""
    try:
        _wire(job_id)
    except UnicodeEncodeError:
        return False
    return True


def _wire(text: str) -> bytes:
    """Text read from Redis as the bytes Redis holds: the connections decode what is not UTF-8
    (another program wrote it: a binary body, an id) as lone surrogates ("surrogateescape", as
    ``os.fsdecode`` does), so that an id read there goes back to Redis as the same bytes."""
    return text.encode("utf-8", "surrogateescape")


def retries_of(text: Any) -> Union[int, str]:
    """A job's retries as Redis holds them: an int, or the text itself when it is none (another
    program wrote it), which decode_job refuses (the job is undecodable): never an error here, in
    the thread that reads a reply."""
    try:
        return int(text or 0)
    except (TypeError, ValueError):
        kept: str = text  # (a reply's text: what int() refuses)
        return kept


def _crashed(rows: Sequence[Sequence[Any]]) -> List[Crashed]:
    return [Crashed(row[0], row[1], retries_of(row[2]), row[3] or "", row[4] if len(row) > 4 else "crashed",
                    (row[5] if len(row) > 5 else "") or "")  # (no key: a row nothing keeps)
            for row in rows]


_pack_command: Optional[Callable[[Tuple[Any, ...]], bytes]]
try:  # redis-py's own packing looks at every argument in Python first; hiredis packs in C
    import hiredis
except ImportError:  # pragma: no cover - hiredis is optional
    _pack_command = None
else:
    _pack_command = hiredis.pack_command


def _send(connection: Any, command: Tuple[Any, ...]) -> None:
    """Send ``command``, its text as strict UTF-8 (UnicodeEncodeError for a lone surrogate, as
    hiredis packs it): the connection's encoder would escape some, since it decodes so (see _wire)."""
    if _pack_command is None:
        connection.send_command(*[arg.encode() if arg.__class__ is str else arg for arg in command])
    else:
        connection.send_packed_command([_pack_command(command)])


def _read_timed_out(exc: Exception) -> Exception:
    """The redis.TimeoutError that a ConnectionError raised by a read's timeout stands for: redis-py's
    hiredis parser raises the builtin TimeoutError, which on Python 3.9 is not socket.timeout, so
    redis-py reports it as a broken connection, one that a resend would wait for again."""
    import redis

    timed_out: Exception = redis.TimeoutError(str(exc))  # (redis is Any to a checker without redis-py)
    return timed_out


def _reply(connection: Any, by: Optional[float]) -> Any:
    """The reply to the command just sent; with ``by`` (monotonic), redis.TimeoutError when none
    begins by then (the connection's own socket timeout, 10 s, bounds it otherwise): a caller's
    bound, for a server that holds the connection open but answers nothing (frozen). A bound that
    the socket timeout keeps as well (within _BOUND_SLACK) costs no look first (a poll of the
    socket through redis-py: on every fetch it was +7 % of the workers' CPU per job end to end,
    bench/redis_cpu_split_ab.py --mode e2e)."""
    if by is not None and by - time.monotonic() < (connection.socket_timeout or math.inf) - _BOUND_SLACK:
        if not connection.can_read(max(0.0, by - time.monotonic())):
            import redis

            raise redis.TimeoutError("no reply from Redis in time")
    return connection.read_response()


class _InFlight:
    """The connections of calls under way that may be abandoned, each with its caller's event. A
    call blocked reading its reply gives up when ``abandon(event)`` shuts its socket down (the read
    ends at once, redis.ConnectionError), which costs the call a registration, not a look at its
    socket in slices while it waits (see _waited, for waits on a lock or a pool)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: Dict[int, Tuple[Any, threading.Event, List[bool]]] = {}

    def enter(self, connection: Any, abandoned: threading.Event) -> List[bool]:
        """Register the call on ``connection``; redis.ConnectionError if ``abandoned`` is set already.
        Returns its mark: ``[True]`` once abandon() shut its socket down (never to be lent again open)."""
        shut: List[bool] = []
        with self._lock:
            self._calls[id(connection)] = (connection, abandoned, shut)
        if abandoned.is_set():  # (set before it was registered: abandon() may not have seen it)
            import redis

            raise redis.ConnectionError("the call was abandoned (its queue stops)")
        return shut

    def leave(self, connection: Any) -> None:
        with self._lock:
            self._calls.pop(id(connection), None)

    def abandon(self, abandoned: threading.Event) -> None:
        """Make every call registered with ``abandoned`` (set by the caller first) give up now."""
        with self._lock:
            for connection, event, shut in self._calls.values():
                if event is abandoned:
                    shut.append(True)
                    sock = connection._sock
                    if sock is not None:
                        with contextlib.suppress(OSError):
                            sock.shutdown(socket.SHUT_RDWR)


# Calls under way that stop() may abandon, in every queue of the process.
IN_FLIGHT = _InFlight()


def _waited(wait: Callable[[float], bool], by: float, abandoned: Optional[threading.Event]) -> bool:
    """``wait(seconds)`` until it is True, or False by ``by`` (monotonic); with ``abandoned``, in
    slices of _ABANDON_POLL, and redis.ConnectionError once it is set: a caller that gives up
    (stop() ends a look at the settings) is not held until ``by``."""
    if abandoned is None:
        return wait(max(0.0, by - time.monotonic()))
    while True:
        left = by - time.monotonic()
        if wait(max(0.0, min(left, _ABANDON_POLL))):
            return True
        if abandoned.is_set():
            import redis

            raise redis.ConnectionError("the call was abandoned (its queue stops)")
        if left <= _ABANDON_POLL:
            return False


class Connections:
    """``size`` raw redis-py connections, made by ``connect()``, lent one at a time; made with
    ``decode_responses=True, encoding_errors="surrogateescape"``, their parser (hiredis's, or
    redis-py's own) reads replies as text as ``_wire`` expects.

    A thread waits for a free one, as with redis-py's BlockingConnectionPool; a
    script call is then one packed send and one ``read_response``, without the
    client's per-call path. Measured on a local server (one thread, a script
    that does nothing): a call costs ~35 us this way, ~45 us through
    BlockingConnectionPool's ``get_connection``/``release`` (a lock, a queue and
    a poll of the socket on every loan), ~70 us through redis-py's ``Script``.
    redis-py connections open their socket at first use, and again after
    ``disconnect()``: a broken one goes back to be reconnected when next lent.
    """

    def __init__(self, connect: Callable[[], Any], size: int, wait: float) -> None:
        self._wait = wait
        self._free: "queue.LifoQueue[Any]" = queue.LifoQueue()  # last used first: its socket is open
        for _ in range(size):
            self._free.put(connect())
        self._open: Set[int] = set()  # ids of the connections whose last call ended well: open
        # Connects still under way whose caller gave up (open_within): id -> (connection, thread, dropped)
        self._opening: Dict[int, Tuple[Any, threading.Thread, List[bool]]] = {}
        self._opening_lock = threading.Lock()
        # drop_opening() calls begun so far (under _opening_lock): a caller that gives up once one
        # began since its connect started is dropped at once, as that call would have dropped it
        self._drops = 0

    def acquire(self, timeout: Optional[float] = None, abandoned: Optional[threading.Event] = None) -> Any:
        """A free connection, waited for at most ``timeout`` (else the pool's wait); ``abandoned``: see _waited."""
        wait = self._wait if timeout is None else max(0.0, min(timeout, self._wait))
        lent: List[Any] = []

        def lend(seconds: float) -> bool:
            try:
                lent.append(self._free.get(True, seconds))
            except queue.Empty:
                return False
            return True

        if _waited(lend, time.monotonic() + wait, abandoned):
            return lent[0]
        import redis

        raise redis.ConnectionError(f"no Redis connection became free within {wait:.3g}s") from None

    def release(self, connection: Any, broken: bool) -> None:
        if broken:  # a reply may be half read: never reuse the socket
            connection.disconnect()
            self._open.discard(id(connection))
        else:
            self._open.add(id(connection))
        self._free.put(connection)

    def open_within(self, connection: Any, timeout: float, abandoned: Optional[threading.Event] = None) -> bool:
        """For a call bounded by ``timeout``: open ``connection`` first unless it is known open,
        on a thread of its own, since redis-py's connect waits for the server's handshake replies
        up to the socket timeout (10 s), however soon the call must end. True: the connect ended
        (a failed one fails again, with its error, at the call's send), and the connection is
        the caller's. False: it did not end within ``timeout`` (a silent server), or ``abandoned``
        was set (see _waited); the connection is then the opening thread's, which gives it back
        once its connect ends (closed, if drop_opening() abandoned it meanwhile)."""
        if id(connection) in self._open:
            return True
        lock = threading.Lock()
        ended = threading.Event()
        given_up: List[bool] = []  # (the caller left: the opening thread releases the connection)
        dropped: List[bool] = []  # (drop_opening() closed its socket: it goes back closed)
        drops = self._drops
        handshake = connection.redis_connect_func  # (None: redis-py's own, on_connect)

        def handshake_unless_dropped(opened: Any) -> None:
            # Its socket is set by now, and every drop closes it after marking `dropped`: a drop
            # either is seen here or closes the socket the handshake waits on. Never a handshake
            # (up to the socket timeout) after a drop, whose disconnect came too soon to close it.
            if dropped:
                import redis

                raise redis.ConnectionError("the connect was abandoned (its pool closes)")
            if handshake is None:
                opened.on_connect()
            else:
                handshake(opened)

        def open_it() -> None:
            connection.redis_connect_func = handshake_unless_dropped
            try:
                connection.connect()
                broken = False
            except Exception:
                broken = True
            finally:
                connection.redis_connect_func = handshake
            with lock:
                ended.set()
                if not given_up:
                    return
            with self._opening_lock:
                self._opening.pop(id(connection), None)
                self.release(connection, broken or bool(dropped))

        opening = threading.Thread(target=open_it, name="tinymq-redis-connect", daemon=True)
        opening.start()
        import redis

        try:
            _waited(ended.wait, time.monotonic() + timeout, abandoned)
        except redis.ConnectionError:  # abandoned: as when it did not end in time
            pass
        with lock:
            if ended.is_set():
                return True
            given_up.append(True)
            with self._opening_lock:
                self._opening[id(connection)] = (connection, opening, dropped)
                if self._drops != drops:  # a drop began after this connect did: it missed it
                    dropped.append(True)
                    connection.disconnect()
            return False

    def drop_opening(self, wait: float) -> None:
        """Abandon the connects under way whose callers gave up (open_within): their sockets closed,
        so that each fails at once, and their threads waited for (``wait`` at most in all); a
        connection goes back closed. A silent server holds such a connect up to the socket
        timeout otherwise, past stop() and close(), and it gave back an open connection then.
        One still opening its TCP connection (its socket not set yet, out of reach: a host that
        drops it holds it up to the connect timeout) is not waited for: marked dropped, it sends
        nothing once that ends, its handshake never begun, and goes back closed (its thread ends
        then, sending nothing); so does one whose caller gives up only after this call began (it
        was not under way here yet)."""
        with self._opening_lock:
            self._drops += 1
            opening = list(self._opening.values())
            for _, _, dropped in opening:
                dropped.append(True)
        by = time.monotonic() + wait
        for connection, thread, _ in opening:
            while thread.is_alive() and time.monotonic() < by:  # (again: a socket made after a close)
                with self._opening_lock:  # (once it is given back, it may be lent: left alone)
                    opened = self._opening.get(id(connection))
                    if opened is not None and opened[0] is connection:
                        if connection._sock is None:  # still opening its TCP connection: not waited for
                            break
                        connection.disconnect()
                thread.join(_ABANDON_POLL)

    def close(self) -> None:
        """Close the sockets of the connections not lent now (they reopen if used again), and of
        the connects under way that no caller waits for (drop_opening)."""
        self.drop_opening(_DROP_WAIT)
        idle = []  # taken out while closed, so that no thread is lent one meanwhile
        while True:
            try:
                idle.append(self._free.get_nowait())
            except queue.Empty:
                break
        for connection in idle:
            connection.disconnect()
            self._open.discard(id(connection))
            self._free.put(connection)


# The queue's keys of a fixed name, with the kind of value tinymq keeps at each (lib.lua's header):
# an error of a call that met a value of another kind (WRONGTYPE) names those another program wrote.
_KINDS = {"ready:2": "list", "ready:1": "list", "ready:0": "list", "delayed": "zset", "capped": "zset",
          "seq": "string", "clock": "hash", "procs": "zset", "fetched": "hash", "beaten": "hash",
          "limits": "hash", "running": "hash", "parkedn": "hash", "ratelimits": "hash", "rateopen": "zset",
          "signal": "list", "dead": "zset", "gone": "list", "reports": "list", "stats": "hash"}
# The fixed keys whose values (every field's, for a hash) are whole numbers; ratelimits' are "max:per".
_WHOLE = ("stats", "running", "limits", "parkedn", "seq")
_WHOLE_NUMBER = re.compile(r"-?\d+\Z")
# An error of a script that met data tinymq did not write: a value of another kind (WRONGTYPE), a
# number that is none (HINCRBY, INCR), a Lua error on such a value ("user_script:270: attempt to...").
_FOREIGN_DATA = re.compile(r"^WRONGTYPE|is not an integer|is not a valid float|user_script:\d+: ")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


class Scripts:
    """The scripts of the queue ``name``, called through ``client`` (a redis-py client
    created with ``decode_responses=True``), or through ``connections`` when given
    (the same client then serves only reads, e.g. ``key()``'s users)."""

    def __init__(self, client: Any, name: str, connections: Optional[Connections] = None) -> None:
        self.prefix = key_prefix(name)
        self._keys = [self.prefix]
        self.client = client
        self.connections = connections
        self._script = {script: client.register_script(text) for script, text in _script_texts().items()}

    def key(self, suffix: str) -> str:
        return self.prefix + suffix

    def _call(self, script: str, args: List[Any], timeout: Optional[float] = None,
              abandoned: Optional[threading.Event] = None) -> Any:
        """Run ``script``; with ``timeout`` (and ``connections``), redis.TimeoutError when no
        reply begins within it (see _reply), the connection then closed: the script may have run.
        ``abandoned``: as for ``command`` (given up, the script may have run as well)."""
        connections = self.connections
        if connections is None:
            return self._script[script](keys=self._keys, args=args)
        registered = self._script[script]
        return self._on_connection(connections, ("EVALSHA", registered.sha, 1, self.prefix, *args), timeout,
                                   registered.script, abandoned)

    def command(self, *command: Any, timeout: Optional[float] = None,
                abandoned: Optional[threading.Event] = None) -> Any:
        """One plain command (``RPUSH``, ``DEL``, ...), bounded by ``timeout`` as ``_call`` is. With
        ``abandoned``, given up once it is set and IN_FLIGHT.abandon() called for it:
        redis.ConnectionError, the connection closed (see _InFlight; with ``timeout``, the waits for
        a free connection and for its connect too: see _waited)."""
        connections = self.connections
        if connections is None:
            return self.client.execute_command(*command)
        return self._on_connection(connections, command, timeout, None, abandoned)

    def blocking_pop(self, connections: Connections, keys: Sequence[str], wait: float, timeout: float,
                     abandoned: threading.Event) -> Any:
        """BLPOP of ``keys`` for ``wait`` seconds at most, on ``connections`` (a caller's own: it
        blocks), its reply waited for ``timeout`` at most; given up once ``abandoned`` is set,
        redis.ConnectionError, its connection closed (as ``command``)."""
        return self._on_connection(connections, ("BLPOP", *keys, wait), timeout, None, abandoned)

    def _on_connection(self, connections: Connections, command: Tuple[Any, ...], timeout: Optional[float],
                       script: Optional[str], abandoned: Optional[threading.Event] = None) -> Any:
        """``command`` on a connection lent by ``connections`` (EVALSHA of ``script``, loaded again if the
        server lost it)."""
        import redis

        by = None if timeout is None else time.monotonic() + timeout  # (each step gets what is left)
        connection = connections.acquire(timeout, None if by is None else abandoned)
        if by is not None and not connections.open_within(connection, max(0.0, by - time.monotonic()), abandoned):
            raise redis.TimeoutError(f"Redis did not answer a new connection within {timeout:.3g}s")
        broken = True
        shut: List[bool] = []
        try:
            try:
                if abandoned is not None:  # (given up, its socket shut down, once it is set)
                    shut = IN_FLIGHT.enter(connection, abandoned)
                _send(connection, command)
                reply = _reply(connection, by)
            except redis.exceptions.NoScriptError:  # a restarted server: load it, call it again
                if script is None:
                    raise
                connection.send_command("SCRIPT", "LOAD", script)
                _reply(connection, by)
                _send(connection, command)
                reply = _reply(connection, by)
            broken = False
            return reply
        except (redis.exceptions.ResponseError, UnicodeEncodeError) as exc:
            broken = False  # the server answered with an error, or the text was refused before it went
            if isinstance(exc, redis.exceptions.ResponseError) and _FOREIGN_DATA.search(str(exc)):
                named = self.wrong_kinds(str(exc).startswith("WRONGTYPE"))
                if named:
                    raise type(exc)(f"{exc} ({named})") from exc
            raise
        except redis.ConnectionError as exc:
            if isinstance(exc.__context__, TimeoutError):  # a read that timed out: see _read_timed_out
                raise _read_timed_out(exc) from exc
            raise
        finally:
            if abandoned is not None:
                IN_FLIGHT.leave(connection)
            connections.release(connection, broken or bool(shut))

    def wrong_kinds(self, certain: bool) -> str:
        """Which keys of the queue hold a value of another kind than tinymq keeps there, or a value it
        never writes there (another program wrote them), for the error of a call that met one (see
        _FOREIGN_DATA): what to do about it. None found: "" (the error may be of something else), or
        with ``certain`` (WRONGTYPE: a key whose name is not fixed, a job's) that some key is such."""
        import redis

        try:
            pipe = self.client.pipeline(transaction=False)
            for suffix in _KINDS:
                pipe.type(self.key(suffix))
            found = pipe.execute()
            wrong = [f"{self.key(suffix)!r} holds a {kind}, not a {_KINDS[suffix]}"
                     for suffix, kind in zip(_KINDS, found) if kind not in ("none", _KINDS[suffix])]
            if not wrong:
                wrong = self._wrong_values()
        except redis.RedisError:
            wrong = []
        if not wrong:
            return (f"a key under {self.prefix!r} holds a value of another kind than tinymq writes there: "
                    "another program wrote it") if certain else ""
        return (f"Redis key {'; '.join(wrong)}: another program wrote it; delete it, or give the "
                "queue another name")

    def _wrong_values(self) -> List[str]:
        """The fixed keys of the queue (of the right kind) holding a value that tinymq never writes there."""
        pipe = self.client.pipeline(transaction=False)
        for suffix in _WHOLE:
            (pipe.get if suffix == "seq" else pipe.hgetall)(self.key(suffix))
        pipe.hgetall(self.key("ratelimits"))
        *whole, rates = pipe.execute()
        wrong = []
        for suffix, value in zip(_WHOLE, whole):
            fields = ({} if value is None else {"": value}) if suffix == "seq" else value  # (None: no seq yet)
            for field, text in (fields or {}).items():
                if not _WHOLE_NUMBER.match(str(text)):
                    where = repr(self.key(suffix)) + ("" if suffix == "seq" else f" field {field!r}")
                    wrong.append(f"{where} holds {text!r}, not a whole number")
        for field, text in rates.items():
            max_starts, _, per = text.partition(":")
            if not (_WHOLE_NUMBER.match(max_starts) and _is_number(per)):
                wrong.append(f"{self.key('ratelimits')!r} field {field!r} holds {text!r}, not a rate limit")
        return wrong

    def enqueue(self, token: str, buffer_size: int, max_delayed_jobs: int,
                jobs: Sequence[Tuple[Any, ...]], caller: str = "", lease_ms: int = 0,
                timeout: Optional[float] = None) -> EnqueueReply:
        """Enqueue ``(id, type, priority, delay_ms, body, retries, last_error)`` rows, all or none
        (delay_ms may be fractional; a row without its retries, or last error, brings none).

        The jobs it evicts wait in ``caller``'s reporting hash until it acknowledges
        them (their ``key``, op A) when it is registered, or registers with ``lease_ms``."""
        args: List[Any] = [token, buffer_size, max_delayed_jobs, len(jobs), caller, lease_ms]
        for row in jobs:
            args.extend(_full_row(row))
        reply = self._call("enqueue", args, timeout)
        status = reply[0]
        if status in ("ok", "again"):
            return EnqueueReply(status, _crashed(reply[1]))
        if status == "dup":
            return EnqueueReply("dup", [], duplicate_id=reply[1])
        if status == "full":
            return EnqueueReply("full", [], ready=int(reply[1]))
        return EnqueueReply(status, [])

    def fetch(self, proc: str, fetch_id: str, n: int, lease_ms: int, max_crash_recoveries: int,
              registered: int, ops: Sequence[SettleOp] = (), buffer_size: int = 0, loop_room: int = 0,
              loop_types: Sequence[str] = (), timeout: Optional[float] = None,
              abandoned: Optional[threading.Event] = None) -> FetchReply:
        """Settle ``ops``, renew, reap, promote, and take up to ``n`` jobs for ``proc``'s worker
        threads and up to ``loop_room`` of ``loop_types`` (run on its event loop), strictly in
        order: the first job it cannot take stops the call (``FetchReply.stopped``).
        ``registered``: the server time (ms) at which ``proc`` registered, or 0 (a bool: True for
        "registered", when that time does not matter). ``buffer_size``: the queue's, kept in
        Redis for the scripts called without it (0: the one kept; none kept: no cap).
        ``timeout`` and ``abandoned``: as ``_call``'s."""
        reply = self._call("fetch", [proc, fetch_id, n, lease_ms, max_crash_recoveries,
                                     int(registered), buffer_size, loop_room, len(loop_types),
                                     *map(_wire, loop_types), len(ops), *_ops_args(ops)], timeout, abandoned)
        due = float(reply[2])
        status = int(reply[0])
        return FetchReply(
            reaped=status <= 0, lost=status < 0, now_ms=int(reply[1]), next_due_ms=None if due < 0 else due,
            stale=int(reply[3]), crashed=_crashed(reply[4]),
            jobs=[Fetched(row[0], row[1], retries_of(row[2]), row[3] or "") for row in reply[5]],
            now_us=int(reply[6]), cancels=reply[7], overruled=[(row[0], row[1]) for row in reply[8]],
            gone=reply[9], stopped=bool(reply[10]),
        )

    def settle(self, proc: str, ops: Sequence[SettleOp]) -> int:
        """Record ``ops`` for ``proc``; returns how many were stale."""
        return int(self._call("settle", [proc, len(ops), *_ops_args(ops)]))

    def beat(self, proc: str, lease_ms: int, max_crash_recoveries: int,
             registered: int, beat_id: str = "") -> Tuple[bool, int, List[Crashed]]:
        """Renew ``proc``'s lease and reap; ``(alive, server now ms, crashed)``.

        With a ``beat_id``, the same call sent again (its reply was lost) returns the
        jobs the first found crashed, and reaps nothing more.
        """
        reply = self.heartbeat(proc, lease_ms, max_crash_recoveries, registered, beat_id)
        return reply.alive, reply.now_ms, reply.crashed

    def heartbeat(self, proc: str, lease_ms: int, max_crash_recoveries: int,
                  registered: int, beat_id: str = "", timeout: Optional[float] = None,
                  abandoned: Optional[threading.Event] = None) -> BeatReply:
        """``beat``, with the attempts of ``proc`` that q.cancel() marked (``registered``: as fetch's)."""
        reply = self._call("beat", [proc, lease_ms, max_crash_recoveries, int(registered), beat_id], timeout,
                           abandoned)
        status = int(reply[0])
        return BeatReply(status == 1, int(reply[1]), _crashed(reply[2]), reply[3], lost=status < 0, gone=reply[4])

    def cancel(self, token: str, job_id: str, caller: str = "", lease_ms: int = 0, take_back: str = "",
               timeout: Optional[float] = None) -> CancelReply:
        """End the unfinished job ``job_id`` as cancelled, or mark its leased attempt (cancel.lua).

        ``caller``: this process's id once registered: a waiting job it removes waits in
        its ``reporting`` hash until it acknowledges the report (op A). With ``lease_ms``,
        a caller not registered registers with that lease for the report (a reporter).
        ``take_back``: the token of the enqueue whose job this takes back (only that job is
        cancelled, and the dead job its enqueue replaced comes back)."""
        reply = self._call("cancel", [token, _wire(job_id), caller, lease_ms, take_back], timeout)
        status = int(reply[0])
        if status == 1:
            return CancelReply("removed", removed=_crashed([reply[1]])[0],
                               kept=int(reply[2]) == 1)
        if status == 2:
            return CancelReply("marked", proc=reply[1], attempt=reply[2])
        return CancelReply("none")

    def reap(self, max_crash_recoveries: int) -> Tuple[int, List[Crashed]]:
        """Reap up to two processes whose lease expired; ``(reaped, crashed)``."""
        reply = self._call("reap", [max_crash_recoveries])
        return int(reply[0]), _crashed(reply[1])

    def release(self, proc: str, ops: Sequence[SettleOp] = (), timeout: Optional[float] = None) -> ReleaseReply:
        """Settle ``ops`` and unregister ``proc``, handing back what it still holds."""
        reply = self._call("release", [proc, len(ops), *_ops_args(ops)], timeout)
        return ReleaseReply(int(reply[0]), [(row[0], row[1]) for row in reply[1]])

    def unfinished(self, timeout: Optional[float] = None) -> Tuple[bool, str]:
        """Whether join() waits on (a job is unfinished, or waits in Redis), and when the queue's
        state began ('' before a worker process registered): see unfinished.lua."""
        waits, began = self._call("unfinished", [], timeout)
        return int(waits) == 1, began

    def hold(self, reporters: Sequence[str], lease_ms: int) -> int:
        """Renew the leases of ``reporters`` (see cancel), in one call: how many are still registered."""
        return int(self._call("hold", [lease_ms, *reporters]))

    def set_limits(self, limits: Dict[str, Union[int, Tuple[int, int, float]]], only_missing: bool = False,
                   timeout: Optional[float] = None, abandoned: Optional[threading.Event] = None) -> int:
        """Set global per-type limits; returns how many parked jobs were released.

        A value is ``max_concurrent_jobs``, or ``(max_concurrent_jobs, max_starts,
        per seconds)`` for a type with a rate limit; a type given without one has none.
        ``only_missing``: only for the types Redis holds no limits for (sent again).
        ``timeout`` and ``abandoned``: as ``_call``'s.
        """
        if not limits:
            return 0
        args: List[Any] = ["1" if only_missing else "0"]
        for job_type, value in limits.items():
            if isinstance(value, tuple):
                limit, max_starts, per = value
                args.extend((_wire(job_type), limit, max_starts, round(per * 1000.0, 3)))
            else:
                args.extend((_wire(job_type), value, 0, 0))  # (a type as a job reads it: see _wire)
        return int(self._call("limits", args, timeout, abandoned))

    def stats(self, buffer_size: int = 0, timeout: Optional[float] = None
              ) -> Tuple[Tuple[int, int, int], int, Dict[str, int], int]:
        """``((high, medium, low), delayed, counters, waiting for room)`` read at one instant
        (stats.lua): a delayed job due on the server's clock counts at its priority while the
        buffer (``buffer_size``; 0: the one fetch kept) has room for it, else as waiting for room.
        ``timeout``: as ``_call``'s."""
        high, medium, low, delayed, flat, waiting = self._call("stats", [buffer_size], timeout)
        with self.read_as_numbers():
            counters = {flat[i]: int(flat[i + 1]) for i in range(0, len(flat), 2)}
        return (int(high), int(medium), int(low)), int(delayed), counters, int(waiting)

    @contextlib.contextmanager
    def read_as_numbers(self) -> Iterator[None]:
        """Where a reply's numbers are read: one that is none (another program wrote it) is a
        redis.ResponseError naming its key (wrong_kinds), not a ValueError from deep inside."""
        try:
            yield
        except ValueError as exc:
            import redis

            named = self.wrong_kinds(False)
            raise redis.ResponseError(f"{exc} ({named})" if named else str(exc)) from exc

    def status(self, shown: int, unknown_room: int) -> StatusReply:
        """What ``status --redis`` prints, read at one instant (status.lua), so that its figures agree;
        of the dead jobs, the newest ``shown`` (all are counted); of the due jobs, at most the buffer's
        room are placed at their priority (``unknown_room`` while no fetch has kept a buffer_size)."""
        (high, medium, low, delayed, flat, limits, running, processes, rates, dead_count, dead, waiting,
         buffer_size) = self._call("status", [shown, unknown_room])
        with self.read_as_numbers():
            counters = {flat[i]: int(flat[i + 1]) for i in range(0, len(flat), 2)}
            taken = {running[i]: int(running[i + 1]) for i in range(0, len(running), 2)}
            executors = {limits[i]: (taken.get(limits[i], 0), int(limits[i + 1])) for i in range(0, len(limits), 2)}
            rate_limits = {}
            for i in range(0, len(rates), 3):
                max_starts, _, per_ms = rates[i + 1].partition(":")  # as limits.lua writes it
                rate_limits[rates[i]] = (int(max_starts), float(per_ms) / 1000.0, int(rates[i + 2]))
        return StatusReply((int(high), int(medium), int(low)), int(delayed), counters, dict(sorted(executors.items())),
                           int(processes), dict(sorted(rate_limits.items())), int(dead_count),
                           [(row[0], row[1], retries_of(row[2]), row[3], row[4]) for row in dead],
                           int(waiting), int(buffer_size) or None)

    def requeue_dead(self, ids: Sequence[str]) -> int:
        return int(self._call("requeue_dead", [_wire(job_id) for job_id in ids])) if ids else 0

    def purge_dead(self, ids: Sequence[str]) -> int:
        return int(self._call("purge_dead", [_wire(job_id) for job_id in ids])) if ids else 0

    def schedule_begin(self, name: str, interval_us: int, first_delay_us: int, definition: str,
                       rejoin: bool, first_at_us: Optional[int] = None) -> Tuple[int, int, int]:
        """Join (or start) the tick grid of the ``every`` schedule ``name``:
        ``(anchor us, interval us, server now us)``. ``definition``: its first_at (see
        tinymq/redis/_schedules.py); ``rejoin``: join a grid of the interval whatever it was set for;
        ``first_at_us``: its first_at (epoch us), placed on the server's clock by a new grid."""
        anchor_us, interval_us, now_us = self._call("schedule_begin", [
            name, interval_us, first_delay_us, definition, "1" if rejoin else "0",
            "" if first_at_us is None else first_at_us])
        return int(anchor_us), int(interval_us), int(now_us)

    def schedule_tick(self, name: str, tick: int, token: str, buffer_size: int, max_delayed_jobs: int,
                      job: Tuple[Any, ...], caller: str = "", lease_ms: int = 0,
                      grid: Optional[Tuple[int, int, str]] = None) -> Tuple[str, List[Crashed]]:
        """Claim ``tick`` (its time in us) of schedule ``name`` for this call, once across processes, and enqueue
        its ``job`` row (as ``enqueue``'s) in the same call: ``(outcome, evicted)``, the outcome
        "fire", "busy", "full", "taken", "regrid" or "ahead", the evicted rows only with "fire" (see
        schedule_tick.lua; ``caller`` and ``lease_ms`` as ``enqueue``'s; ``grid``: the (anchor us,
        interval us, definition) of an ``every`` tick)."""
        reply = self._call("schedule_tick", [name, tick, token, buffer_size, max_delayed_jobs, caller, lease_ms,
                                             *_full_row(job), *(grid or ())])
        if reply[0] == "fire":
            return "fire", _crashed(reply[1])
        return str(reply[0]), []
