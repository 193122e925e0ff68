"""The stable low-level API over tinymq's Lua scripts: one method per script.

Each method is one EVALSHA (redis-py's ``Script`` reloads the script on
NOSCRIPT, after a server restart) and returns the script's reply as plain
Python values. The scripts themselves (``*.lua`` beside this file, each with
``lib.lua`` in front) document their keys, arguments, replies and invariants.

Every script is idempotent against a resend of the same call (the client sends
a call again when the connection failed before its reply came): enqueue by its
token, settle ops by attempt id, fetch by (process, fetch id); beat, reap and
release leave nothing to do twice.
"""
import os
from typing import Any, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

__all__ = ["Scripts", "SettleOp", "Crashed", "Fetched", "FetchReply", "EnqueueReply", "key_prefix"]

_HERE = os.path.dirname(os.path.abspath(__file__))
_SCRIPT_NAMES = ("enqueue", "fetch", "settle", "beat", "reap", "release", "limits",
                 "requeue_dead", "purge_dead")


def key_prefix(name: str) -> str:
    """``tmq:{<name>}:``: every key of the queue shares this hash tag (one Cluster slot)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"broker name must be a non-empty str, got {name!r}")
    if "{" in name or "}" in name:
        raise ValueError(f"broker name must not contain '{{' or '}}' (it is a hash tag), got {name!r}")
    return f"tmq:{{{name}}}:"


def _source(name: str) -> str:
    with open(os.path.join(_HERE, f"{name}.lua"), encoding="utf-8") as file:
        return file.read()


class SettleOp(NamedTuple):
    """One attempt's outcome, as lib.lua's ``settle`` takes it.

    ``op``: "S" success, "Y" retry after ``delay_ms``, "Z" dead for ``reason``;
    "y"/"z" the same decided at the deadline (the attempt keeps its slot until
    "E", its late return); "B" give back (not counted).
    """

    op: str
    attempt: str
    retries: int = 0
    delay_ms: float = 0
    reason: str = ""
    error: str = ""


class Crashed(NamedTuple):
    """A job that died with its process once too often (now dead, reason "crashed")."""

    id: str
    body: str
    retries: int
    error: str


class Fetched(NamedTuple):
    """One attempt handed to a process."""

    attempt: str
    body: str
    retries: int
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


class EnqueueReply(NamedTuple):
    status: str  # "ok", "again" (a resend of an accepted batch), "dup", "full"
    evicted: List[Tuple[str, str]]  # (id, body) of jobs evicted from the delayed set
    duplicate_id: Optional[str] = None
    ready: int = 0  # with "full": ready jobs already there


_SHORT_OPS = frozenset("SEB")  # sent as (op, attempt) only


def _ops_args(ops: Iterable[SettleOp]) -> List[Any]:
    flat: List[Any] = []
    for op in ops:
        if op.op in _SHORT_OPS:
            flat += op[:2]
        else:
            flat.extend(op)
    return flat


def _crashed(rows: Sequence[Sequence[Any]]) -> List[Crashed]:
    return [Crashed(row[0], row[1], int(row[2] or 0), row[3] or "") for row in rows]


class Scripts:
    """The scripts of the queue ``name``, called through ``client`` (a redis-py client
    created with ``decode_responses=True``)."""

    def __init__(self, client: Any, name: str) -> None:
        self.prefix = key_prefix(name)
        self._keys = [self.prefix]
        self.client = client
        lib = _source("lib")
        self._script = {script: client.register_script(lib + "\n" + _source(script))
                        for script in _SCRIPT_NAMES}

    def key(self, suffix: str) -> str:
        return self.prefix + suffix

    def _call(self, script: str, args: List[Any]) -> Any:
        return self._script[script](keys=self._keys, args=args)

    def enqueue(self, token: str, buffer_size: int, max_delayed_jobs: int,
                jobs: Sequence[Tuple[str, str, int, float, str]]) -> EnqueueReply:
        """Enqueue ``(id, type, priority, delay_ms, body)`` rows, all or none (delay_ms may be fractional)."""
        args: List[Any] = [token, buffer_size, max_delayed_jobs, len(jobs)]
        for row in jobs:
            args.extend(row)
        reply = self._call("enqueue", args)
        status = reply[0]
        if status == "ok":
            return EnqueueReply("ok", [(row[0], row[1]) for row in reply[1]])
        if status == "dup":
            return EnqueueReply("dup", [], duplicate_id=reply[1])
        if status == "full":
            return EnqueueReply("full", [], ready=int(reply[1]))
        return EnqueueReply(status, [])

    def fetch(self, proc: str, fetch_id: str, n: int, lease_ms: int, max_crash_recoveries: int,
              registered: bool, ops: Sequence[SettleOp] = ()) -> FetchReply:
        """Settle ``ops``, renew, reap, promote, and take up to ``n`` jobs for ``proc``."""
        reply = self._call("fetch", [proc, fetch_id, n, lease_ms, max_crash_recoveries,
                                     "1" if registered else "0", len(ops), *_ops_args(ops)])
        due = float(reply[2])
        return FetchReply(
            reaped=int(reply[0]) == 0, now_ms=int(reply[1]), next_due_ms=None if due < 0 else due,
            stale=int(reply[3]), crashed=_crashed(reply[4]),
            jobs=[Fetched(row[0], row[1], int(row[2] or 0), row[3] or "") for row in reply[5]],
            now_us=int(reply[6]),
        )

    def settle(self, proc: str, ops: Sequence[SettleOp]) -> int:
        """Record ``ops`` for ``proc``; returns how many were stale."""
        return int(self._call("settle", [proc, len(ops), *_ops_args(ops)]))

    def beat(self, proc: str, lease_ms: int, max_crash_recoveries: int,
             registered: bool) -> Tuple[bool, int, List[Crashed]]:
        """Renew ``proc``'s lease and reap; ``(alive, server now ms, crashed)``."""
        reply = self._call("beat", [proc, lease_ms, max_crash_recoveries, "1" if registered else "0"])
        return int(reply[0]) == 1, int(reply[1]), _crashed(reply[2])

    def reap(self, max_crash_recoveries: int) -> Tuple[int, List[Crashed]]:
        """Reap up to two processes whose lease expired; ``(reaped, crashed)``."""
        reply = self._call("reap", [max_crash_recoveries])
        return int(reply[0]), _crashed(reply[1])

    def release(self, proc: str, ops: Sequence[SettleOp] = ()) -> int:
        """Settle ``ops`` and unregister ``proc``, handing back what it still holds."""
        return int(self._call("release", [proc, len(ops), *_ops_args(ops)]))

    def set_limits(self, limits: Dict[str, int]) -> int:
        """Set global per-type limits; returns how many parked jobs were released."""
        if not limits:
            return 0
        args: List[Any] = []
        for job_type, limit in limits.items():
            args.extend((job_type, limit))
        return int(self._call("limits", args))

    def requeue_dead(self, ids: Sequence[str]) -> int:
        return int(self._call("requeue_dead", list(ids))) if ids else 0

    def purge_dead(self, ids: Sequence[str]) -> int:
        return int(self._call("purge_dead", list(ids))) if ids else 0
