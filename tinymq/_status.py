"""``python -m tinymq status``, ``requeue-dead`` and ``purge-dead``: look at a queue, fix its dead jobs.

Each command works on a SQLite store (``--db``) or a shared Redis queue
(``--redis URL --name NAME``). ``status`` builds one report (a plain dict),
which ``--json`` prints as it is and the default prints as tables.

``status --db`` opens the file read-only: it works while a live queue owns the
file, and changes nothing. ``requeue-dead`` and ``purge-dead --db`` change the
file, so they take ownership of it for the moment they need, and refuse, naming
the owner's pid, while a live queue owns it.

``--redis`` goes through a Queue built on the broker, which is never started:
it registers no worker process and fetches nothing.
"""
import json
import math
import os
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple, TypeVar

from ._cli import CommandError
from .errors import PersistenceError, TinyMQError, counted
from .job import Job, Priority
from .persistence._ownership import OwnedError
from .persistence.sqlite import DeadJob, SQLitePersistence
from .queue import Queue
from .redis.broker import redacted_url, refused

__all__ = ["db_status", "redis_status", "render_status", "change_dead_in_db", "change_dead_in_redis"]

T = TypeVar("T")

_PRIORITIES = (Priority.HIGH, Priority.MEDIUM, Priority.LOW)  # the order of the tables
# The counters of the Redis stats hash that status prints (as QueueStats' jobs_* fields, in order).
_REDIS_COUNTERS = ("enqueued", "succeeded", "failed", "retried", "timed_out", "evicted", "cancelled")
_ERROR_WIDTH = 60  # characters of a last error shown in the text table (--json has it whole)
# The most dead jobs status --redis reads, the newest: its one script call blocks Redis while it
# runs (broker.dead_jobs() reads them all, page by page).
_REDIS_DEAD_MAX = 1000
# The most due jobs (delayed jobs come due, not yet moved to the ready buffer) status --redis places at
# their priority while no worker process has fetched, which tells Redis the buffer_size: the rest count
# as waiting for room. Once one has, it places those the buffer's room takes, as get_stats() does.
_REDIS_DUE_MAX = 1000


class _CommandStore(SQLitePersistence):
    """The commands' store: it saves no payload, and decodes one with JSON only to show it, so it opens a
    file whatever serializer wrote it (a payload JSON cannot decode is logged) and records none."""

    _checks_serializer = False


# --- reports ----------------------------------------------------------------------------


def _job_fields(job: Job) -> Dict[str, Any]:
    return {
        "id": job.id, "type": job.type, "priority": Priority(job.priority).name,
        "retries": job.retries, "timestamp": job.timestamp, "run_at": job.run_at,
        "tags": dict(job.tags), "payload": job.payload,
    }


def _dead_fields(dead: Iterable[DeadJob]) -> List[Dict[str, Any]]:
    return [dict(_job_fields(entry.job), reason=entry.reason, error=entry.error) for entry in dead]


def db_status(path: str) -> Dict[str, Any]:
    """The report of ``status --db``, read through a read-only store."""
    try:
        store = _CommandStore(path, read_only=True)
        with store:  # (one read of the file: the counts and the tables agree while a queue writes)
            counts, jobs, dead, quarantined = store._inspection()
    except PersistenceError as exc:
        raise CommandError(str(exc)) from None
    now = time.time()
    # jobs() does not say which are running: "due" is ready or running, "delayed" waits for run_at.
    # A job due at its creation (run_at is its timestamp) is due whatever the clock did since, as
    # counts() and a queue loading it see it.
    priorities = {priority.name: {"due": 0, "delayed": 0} for priority in _PRIORITIES}
    types: Dict[str, Dict[str, int]] = {}
    for job in jobs:
        column = "delayed" if job.run_at is not job.timestamp and job.run_at > now else "due"
        priorities[Priority(job.priority).name][column] += 1
        types.setdefault(job.type, {"due": 0, "delayed": 0})[column] += 1
    return {
        "backend": "sqlite",
        "db": os.path.abspath(path),
        "counts": counts,
        "priorities": priorities,
        "types": dict(sorted(types.items())),
        "dead_jobs": _dead_fields(dead),
        "quarantined": [{"id": job_id, "reason": reason} for job_id, reason in quarantined],
    }


def _command_broker(url: str, name: str) -> Any:
    """``RedisBroker(url, name=name)`` that keeps, in ``unreachable``, why Redis did not answer."""
    from .redis import RedisBroker

    class CommandBroker(RedisBroker):
        unreachable: Optional[Exception] = None

        def _not_reachable_yet(self, exc: Exception) -> None:
            self.unreachable = exc

    return CommandBroker(url, name=name)


def _with_redis_queue(url: str, name: str, work: Callable[[Queue], T]) -> T:
    """``work(queue)`` on a Queue over ``RedisBroker(url, name=name)``, never started; closed after."""
    try:
        broker = _command_broker(url, name)
    except (ImportError, ValueError, TypeError, TinyMQError) as exc:
        raise CommandError(f"cannot use Redis queue {name!r} at {redacted_url(url)}: {exc}") from None
    if broker.unreachable is not None:  # one error, not a warning that "tinymq will keep trying" first
        broker.close()
        if refused(broker.unreachable):
            raise CommandError(f"Redis at {redacted_url(url)} (queue {name!r}) refused the connection: "
                               f"{broker.unreachable} (are the URL's user, password and database right?)")
        raise CommandError(f"cannot reach Redis at {redacted_url(url)} (queue {name!r}): {broker.unreachable}")
    try:
        if not broker.in_use():  # a mistyped --name would otherwise show an empty queue
            others = broker.names_in_use()
            raise CommandError(
                f"Redis at {redacted_url(url)} holds no tinymq queue named {name!r} (no job, counter, "
                "worker or limit of it); " + (f"queues there: {', '.join(others)}" if others
                                              else "it holds no tinymq queue"))
        return work(Queue(broker=broker))
    except TinyMQError as exc:
        raise CommandError(str(exc)) from None
    finally:
        broker.close()


def redis_status(url: str, name: str, dead_limit: int = 0) -> Dict[str, Any]:
    """The report of ``status --redis URL --name NAME``: its figures are read by one script call,
    at one instant, so that they agree (each job counted once: ready, waiting for room, delayed, taken or dead).
    Every dead job is counted; the newest ``dead_limit`` are read (0: all), at most _REDIS_DEAD_MAX.
    Every due job is counted; those the buffer's room takes (at most _REDIS_DUE_MAX while the room is
    unknown) at their priority, the rest in waiting_for_room, their priorities not read."""
    shown = _REDIS_DEAD_MAX if dead_limit == 0 else min(dead_limit, _REDIS_DEAD_MAX)

    def read(queue: Queue) -> Dict[str, Any]:
        broker = queue.broker
        assert broker is not None  # (the queue _with_redis_queue built on it)
        reply, dead = broker._status(shown, _REDIS_DUE_MAX)
        executors = {}
        for job_type, (taken, limit) in reply.executors.items():
            rate = reply.rate_limits.get(job_type)
            executors[job_type] = {"taken": taken, "max_jobs": limit,
                                   "rate_limit": None if rate is None else
                                   {"max_starts": rate[0], "per": rate[1], "starts": rate[2]}}
        counters = {f"jobs_{counter}": reply.counters.get(counter, 0) for counter in _REDIS_COUNTERS}
        ready = dict(zip(("HIGH", "MEDIUM", "LOW"), reply.sizes))
        return {
            "backend": "redis",
            "redis": redacted_url(url),
            "name": name,
            "counts": {"ready": sum(ready.values()), "waiting_for_room": reply.waiting, "delayed": reply.delayed,
                       "taken": sum(executor["taken"] for executor in executors.values()),
                       "dead": reply.dead_count},
            "priorities": {level: {"ready": size} for level, size in ready.items()},
            # What the worker processes' fetches keep (null before any has fetched): the room that
            # decides which due jobs count as ready and which wait for room.
            "buffer_size": reply.buffer_size,
            # Each enqueuing process's Config sets it (the same everywhere, by contract); Redis does
            # not hold it, and this process's own default would be a guess.
            "max_delayed_jobs": None,
            "worker_processes": reply.processes,
            "executors": executors,
            "counters": counters,
            "dead_jobs": _dead_fields(dead),  # the newest, at most _REDIS_DEAD_MAX
        }

    return _with_redis_queue(url, name, read)


def change_dead_in_redis(url: str, name: str, action: str, ids: Optional[Sequence[str]]) -> str:
    """Requeue or purge dead jobs of a Redis queue; an id that is not a dead job changes nothing."""

    def change(queue: Queue) -> str:
        where = f"Redis queue {name!r}"
        broker = queue.broker
        assert broker is not None  # (the queue _with_redis_queue built on it)
        return _change_dead(broker, action, ids, where, where, "workers take them at once",
                            lambda: {entry.job.id for entry in broker.dead_jobs()})

    return _with_redis_queue(url, name, change)


def change_dead_in_db(path: str, action: str, ids: Optional[Sequence[str]]) -> str:
    """Requeue or purge dead jobs (all, or those of ``ids``); returns what to tell the user.

    All or nothing: an id that is not a dead job changes nothing. The store is
    opened read-only first, so a missing or foreign file is refused instead of
    being created by taking ownership.
    """
    try:
        _CommandStore(path, read_only=True).close()
        store = _CommandStore(path)
    except OwnedError as exc:
        raise CommandError(f"{path!r} is owned by a live store in pid {exc.pid}: {action}-dead changes "
                           "the file, which only its owner may do; stop that process first (`status` "
                           "reads the file at any time)") from None
    except PersistenceError as exc:
        raise CommandError(str(exc)) from None
    with store:
        # (the ids of every dead row: one the default serializer cannot decode is a dead job all the same)
        return _change_dead(store, action, ids, repr(path), path, "the next queue to open the file runs them",
                            store._dead_ids)


def _change_dead(store: Any, action: str, ids: Optional[Sequence[str]], named: str, where: str,
                 then: str, dead_ids: Callable[[], Set[str]]) -> str:
    """Requeue or purge the dead jobs of ``store`` (a RedisBroker or SQLitePersistence: the
    same two calls), all or nothing; ``named``/``where`` name it in an error/the result,
    ``dead_ids()`` says which ids are dead jobs in it."""
    if ids is not None:
        dead = dead_ids()
        missing = [job_id for job_id in ids if job_id not in dead]
        if missing:
            raise CommandError(f"no dead job with id {', '.join(map(repr, missing))} in {named}; nothing changed")
    if action == "requeue":
        return f"requeued {counted(store.requeue_dead(ids), 'dead job')} in {where}, retries reset; {then}"
    return f"purged {counted(store.purge_dead(ids), 'dead job')} from {where}"


# --- printing ---------------------------------------------------------------------------


def _printable(text: str) -> str:
    """``text`` with what a terminal would act on (newline, tab, escape...) escaped as Python does:
    ids, types and errors come from whoever enqueued, and a table row is one line."""
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> List[str]:
    """Aligned columns: numbers to the right, text to the left."""
    cells = [[_printable(str(value)) for value in row] for row in rows]
    numeric = [all(isinstance(row[column], int) for row in rows) and bool(rows)
               for column in range(len(headers))]
    widths = [max([len(header)] + [len(row[column]) for row in cells])
              for column, header in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(value.rjust(width) if right else value.ljust(width)
                         for value, width, right in zip(values, widths, numeric)).rstrip()

    return [line(headers), line(["-" * width for width in widths])] + [line(row) for row in cells]


def _shortened(text: Optional[str]) -> str:
    if not text:
        return ""
    text = " ".join(text.split())  # one line per job
    return text if len(text) <= _ERROR_WIDTH else text[:_ERROR_WIDTH - 3] + "..."


def _dead_lines(dead: List[Dict[str, Any]], total: int, limit: int, read_at_most: int = 0) -> List[str]:
    """The dead jobs table: the newest ``limit`` (0: all) of ``dead``, the newest of ``total`` dead
    jobs; ``read_at_most``: the report holds at most that many (0: all of them)."""
    lines = [f"dead jobs: {total}"]
    if not dead:
        return lines
    shown = dead if limit == 0 else dead[-limit:]  # the newest
    rows = [(entry["id"], entry["type"], entry["priority"], entry["retries"], entry["reason"] or "",
             _shortened(entry["error"])) for entry in shown]
    lines += _table(("id", "type", "priority", "retries", "reason", "last error"), rows)
    if len(shown) < total:
        more = "--limit 0 lists all, --json has every field"
        if read_at_most and total > read_at_most:
            more = (f"status --redis reads at most the newest {read_at_most} (--limit 0, --json); "
                    "broker.dead_jobs() lists them all")
        lines.append(f"(the newest {len(shown)} of {total}; {more})")
    return lines


def _db_lines(report: Dict[str, Any], limit: int) -> List[str]:
    counts = report["counts"]
    lines = [f"tinymq store {report['db']}", ""]
    lines += _table(("ready", "delayed", "running", "dead", "corrupt"),
                    [[counts[state] for state in ("ready", "delayed", "running", "dead", "corrupt")]])
    lines.append("")
    lines += _table(("priority", "due", "delayed"),
                    [(name, sizes["due"], sizes["delayed"]) for name, sizes in report["priorities"].items()])
    if report["types"]:
        lines.append("")
        lines += _table(("type", "due", "delayed"),
                        [(name, sizes["due"], sizes["delayed"]) for name, sizes in report["types"].items()])
    lines.append("(due: ready or running now; delayed: waiting for its run_at)")
    lines.append("")
    lines += _dead_lines(report["dead_jobs"], len(report["dead_jobs"]), limit)
    if report["quarantined"]:
        lines.append("")
        lines.append(f"quarantined (corrupt) rows: {len(report['quarantined'])}")
        lines += _table(("id", "why"),
                        [(row["id"], _shortened(row["reason"])) for row in report["quarantined"]])
    return lines


def _redis_lines(report: Dict[str, Any], limit: int) -> List[str]:
    counts = report["counts"]
    lines = [f"tinymq queue {report['name']!r} on {report['redis']}", ""]
    lines += _table(("ready", "waiting for room", "delayed", "taken", "dead", "worker processes"),
                    [[counts["ready"], counts["waiting_for_room"], counts["delayed"], counts["taken"],
                      counts["dead"], report["worker_processes"]]])
    if counts["waiting_for_room"]:
        buffer_size = report["buffer_size"]
        lines.append("(waiting for room: due jobs beyond the ready buffer's room, "
                     + (f"buffer_size {buffer_size}" if buffer_size is not None else
                        f"no worker process has fetched yet: the first {_REDIS_DUE_MAX} due count as ready")
                     + "; the fetches that make room move them in due order; by priority: not read)")
    lines.append("")
    lines += _table(("priority", "ready"),
                    [(name, sizes["ready"]) for name, sizes in report["priorities"].items()])
    lines.append("")
    lines += _table(("counter", "events"), list(report["counters"].items()))
    lines.append("")
    executors = report["executors"]
    if executors:
        headers: Tuple[str, ...] = ("executor", "taken", "max")
        rows = [[job_type, executor["taken"], executor["max_jobs"]] for job_type, executor in executors.items()]
        rated = any(executor["rate_limit"] for executor in executors.values())
        if rated:  # (the columns only when some type has a rate limit)
            headers += ("rate limit", "starts")
            for row, executor in zip(rows, executors.values()):
                rate = executor["rate_limit"]
                row += ["-", "-"] if rate is None else [f"{rate['max_starts']} per {rate['per']:g}s",
                                                        rate["starts"]]
        lines += _table(headers, rows)
        lines.append("(taken: attempts that worker processes hold, running or next in line; "
                     "max: the global limit)")
        if rated:
            lines.append("(rate limit: at most that many starts in any window of that length, over all "
                         "processes; starts: those in the window now, attempts handed out to start included)")
    else:
        lines.append("executors: none registered yet (a worker process registers its executors)")
    lines.append("")
    lines += _dead_lines(report["dead_jobs"], counts["dead"], limit, _REDIS_DEAD_MAX)
    return lines


def _standard_json(value: Any) -> Any:
    """``value`` with every NaN or infinite float (a payload may hold them) as the string Python's json
    writes for it: "NaN", "Infinity", "-Infinity" are not JSON, and strict parsers refuse them."""
    if isinstance(value, float) and not math.isfinite(value):
        return json.dumps(value)
    if isinstance(value, dict):
        return {key: _standard_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_standard_json(item) for item in value]
    return value


def _printable_as_json(payload: Any) -> bool:
    try:
        json.dumps(_standard_json(payload), indent=2, default=repr)
    except RecursionError:
        return False
    return True


def render_status(report: Dict[str, Any], *, as_json: bool, limit: int) -> str:
    """The text ``status`` prints: one JSON document, or readable tables."""
    if as_json:
        try:
            return json.dumps(_standard_json(report), indent=2, default=repr, allow_nan=False)
        except RecursionError:  # (both walk a payload level by level, in Python)
            deep = [entry["id"] for entry in report["dead_jobs"] if not _printable_as_json(entry["payload"])]
            ids = ", ".join(map(repr, deep[:3])) + (" ..." if len(deep) > 3 else "")
            jobs = f"dead job{'s' if len(deep) > 1 else ''} {ids}"
            raise CommandError(f"the payload of {jobs} is nested too deeply to print as JSON; "
                               "status without --json lists it") from None
    lines = _db_lines(report, limit) if report["backend"] == "sqlite" else _redis_lines(report, limit)
    return "\n".join(lines)
