"""Job and Priority: the plain data every other module passes around.

``Job`` is a ``__slots__`` class shared by both cores. Its id and its tags dict
are made on first use, so a job that never needs them costs neither. Its id may
change while no queue of this process holds the job: it names the job in its queue
(``cancel``, ``DuplicateJob``) and its store row while the job is unfinished there.
"""
import dataclasses
import sys
import time
from datetime import datetime, timedelta
from enum import IntEnum
from typing import Any, Dict, Mapping, Optional, Union

from ._pick_core import core
from ._unnamed import Unnamed, held
from .config import RetryConfig, _seconds

__all__ = [
    "Priority", "Job", "RunAt",
    "new_job", "new_high_priority_job", "new_low_priority_job", "new_delayed_job",
]

RunAt = Union[float, int, datetime]


class Priority(IntEnum):
    """Strict scheduling order: every HIGH job is taken before any MEDIUM one."""

    LOW = 0
    MEDIUM = 1
    HIGH = 2


_DEFAULT_RETRY_CONFIG = RetryConfig()  # frozen, so every job may share it
_PRIORITIES = {int(p): p for p in Priority}
_now = time.time


def _as_priority(value: object) -> Priority:
    priority = _PRIORITIES.get(value) if isinstance(value, int) and not isinstance(value, bool) else None
    if priority is None:
        raise ValueError(f"priority must be a Priority (LOW=0, MEDIUM=1, HIGH=2), got {value!r}")
    return priority


def _is_utf8(text: str) -> bool:
    """Whether ``text`` can be stored as UTF-8 (SQLite, Redis): it has no lone surrogates, which
    ``os.fsdecode`` makes of a file name that is not UTF-8, for one."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _utf8_text(text: str) -> str:
    """``text`` as SQLite and Redis can store it: each lone surrogate (what ``os.fsdecode`` makes of
    a file name that is not UTF-8, in an OSError's text) escaped as ``\\udcff``; other text as is."""
    return text if _is_utf8(text) else text.encode("utf-8", "backslashreplace").decode("utf-8")


def _exact_hint(value: object) -> str:
    """For an error about a job id: a ``str`` subclass (a str enum member) is refused, which says so."""
    if isinstance(value, str) and type(value) is not str:
        return (f" (a {type(value).__name__}, a str subclass: an id is an exact str; pass str.__str__(value) "
                "or its .value)")
    return ""


def _as_run_at(value: object, name: str = "run_at") -> float:
    """A point in time as Unix epoch seconds: a number, or an aware datetime (``name`` names it in errors)."""
    if isinstance(value, datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"{name} must be an aware datetime (with tzinfo), got {value!r}")
        return value.timestamp()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            run_at = float(value)
        except OverflowError:  # an int beyond any float
            raise ValueError(f"{name} must be a finite number, got {value!r:.40}") from None
        if run_at - run_at != 0.0:  # NaN or infinite: a job that would never (or always) be due
            raise ValueError(f"{name} must be a finite number, got {value!r}")
        return run_at
    raise TypeError(f"{name} must be Unix epoch seconds (float) or an aware datetime, got {value!r}")


def _as_type(job_type: object) -> str:
    """A job type as an exact, non-empty ``str`` (the text of a ``str`` subclass, e.g. a str Enum)."""
    if not isinstance(job_type, str):
        raise TypeError(f"job type must be a str, got {job_type!r}")
    if not job_type:
        raise ValueError("job type must be a non-empty str, got ''")
    # The core hashes types with no Python code of a subclass's __hash__/__eq__ running.
    return str.__str__(job_type)


def _as_tags(tags: object) -> Optional[Dict[str, str]]:
    """Tags as a fresh ``str -> str`` dict (None stays None)."""
    if tags is None:
        return None
    try:
        items = dict(tags)  # type: ignore[call-overload]  # any value: what dict() refuses is the TypeError below
    except (TypeError, ValueError) as exc:
        raise TypeError(f"tags must be a mapping of str to str, got {tags!r}") from exc
    for key, value in items.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"tags must map str to str, got {key!r}: {value!r}")
    return {str.__str__(key): str.__str__(value) for key, value in items.items()}


def _as_retry_config(retry_config: object) -> RetryConfig:
    if not isinstance(retry_config, RetryConfig):
        raise TypeError(f"retry_config must be a RetryConfig, got {retry_config!r}")
    return retry_config


def _as_retries(retries: object) -> int:
    if not isinstance(retries, int) or isinstance(retries, bool):
        raise TypeError(f"retries must be an int (failed attempts so far), got {retries!r}")
    if not 0 <= retries <= sys.maxsize:
        raise ValueError(f"retries must be from 0 to sys.maxsize, got {retries!r}")
    return int(retries)


def _unmarked(state: Any, nested: bool = False) -> Any:
    """A job's copy state without its queue's ``Unnamed``: itself, in a dict of attributes, or in a
    tuple of those (``object``'s ``(__dict__, slots)``)."""
    if state.__class__ is Unnamed:
        return None
    if state.__class__ is tuple and not nested:
        return tuple([_unmarked(part, True) for part in state])
    if isinstance(state, dict) and any(value.__class__ is Unnamed for value in state.values()):
        return {name: None if value.__class__ is Unnamed else value for name, value in state.items()}
    return state


def _validate(job: "Job") -> float:
    """Check (and normalise) every attribute the queue relies on, however it was set; returns run_at.

    Called by ``Queue.enqueue`` for any job that is not plainly valid already.
    """
    job.type = _as_type(job.type)
    job.priority = _as_priority(job.priority)
    run_at = job.run_at = _as_run_at(job.run_at)
    job._tags = _as_tags(job._tags)
    job.retry_config = _as_retry_config(job.retry_config)
    job.retries = _as_retries(job.retries)
    return run_at


class Job:
    """One unit of work: ``type`` names the executor that runs it.

    Attributes are plain and writable. ``retries`` counts failed attempts so
    far; ``last_error`` describes the latest failure. ``run_at`` defaults to
    the creation time ``timestamp`` (Unix epoch seconds).
    """

    __slots__ = (
        "_id", "type", "payload", "priority", "_tags", "timestamp", "run_at",
        "retries", "retry_config", "last_error",
    )

    def __init__(
        self,
        type: str,
        payload: Any = None,
        *,
        priority: Priority = Priority.MEDIUM,
        tags: Optional[Mapping[str, str]] = None,
        run_at: Optional[RunAt] = None,
        retry_config: Optional[RetryConfig] = None,
        id: Optional[str] = None,
    ) -> None:
        if type.__class__ is not str or not type:
            type = _as_type(type)
        if id is not None and (id.__class__ is not str or not id):
            raise ValueError(f"id must be a non-empty str or None, got {id!r}{_exact_hint(id)}")
        self._id: Union[str, Unnamed, None] = id  # an Unnamed while queued without one (see _unnamed)
        self.type = type
        self.payload = payload
        self.priority = priority if priority.__class__ is Priority else _as_priority(priority)
        self._tags = None if tags is None else _as_tags(tags)
        now = _now()
        self.timestamp = now
        self.run_at = now if run_at is None else _as_run_at(run_at)
        self.retries = 0
        self.retry_config = _DEFAULT_RETRY_CONFIG if retry_config is None else _as_retry_config(retry_config)
        self.last_error: Optional[str] = None

    @property
    def id(self) -> str:
        """Unique across threads, processes and restarts; made on first use. It may be set while no
        queue holds the job (never enqueued, or finished)."""
        job_id = self._id
        if isinstance(job_id, str):  # (never a subclass: the setter and __init__ refuse one)
            return job_id
        if job_id is None:  # (made in one step: threads reading it at once get one id)
            job_id = core.first_id(self)
            if isinstance(job_id, str):
                return job_id
        return job_id.name(self)  # queued without one: see _unnamed

    @id.setter
    def id(self, value: str) -> None:
        if value.__class__ is not str or not value:
            raise ValueError(f"id must be a non-empty str, got {value!r}{_exact_hint(value)}")
        job_id = self._id
        if job_id is None:
            job_id = core.first_id(self, value)
        if isinstance(job_id, Unnamed):  # queued without an id: named in its queue (DuplicateJob if taken)
            job_id = job_id.name(self, value)
        if job_id == value:
            return
        # While the job is unfinished somewhere, its id names it there (cancel, DuplicateJob, its store row).
        if held(self):
            raise ValueError(f"job id {job_id!r} cannot change to {value!r}: its queue holds the job unfinished "
                             "(queued, delayed or running) under this id, which "
                             "cancel() and DuplicateJob go by; set the id before enqueue or once the job has "
                             f"finished, or enqueue a new Job(..., id={value!r}) instead")
        self._id = value

    def __reduce_ex__(self, protocol: Any) -> Any:
        # A copy (or a pickle) is a new job: the id its queue would make for this one is not its.
        # (A deep copy or a pickle of the marker itself is None; a shallow copy keeps the state's
        # values, whatever shape a subclass's __getstate__ gives it.)
        reduced = super().__reduce_ex__(protocol)
        if not isinstance(reduced, tuple) or len(reduced) < 3:
            return reduced
        return (*reduced[:2], _unmarked(reduced[2]), *reduced[3:])

    @property
    def tags(self) -> Dict[str, str]:
        tags = self._tags
        if tags is None:
            tags = self._tags = {}
        return tags

    @tags.setter
    def tags(self, value: Mapping[str, str]) -> None:
        tags = _as_tags(value)
        self._tags = {} if tags is None else tags

    # Fluent setters: each returns the job itself, so they chain.

    def with_priority(self, priority: Priority) -> "Job":
        self.priority = _as_priority(priority)
        return self

    def with_high_priority(self) -> "Job":
        self.priority = Priority.HIGH
        return self

    def with_low_priority(self) -> "Job":
        self.priority = Priority.LOW
        return self

    def with_retry_config(self, retry_config: RetryConfig) -> "Job":
        self.retry_config = _as_retry_config(retry_config)
        return self

    def with_max_retries(self, max_retries: int) -> "Job":
        self.retry_config = dataclasses.replace(self.retry_config, max_retries=max_retries)
        return self

    def __repr__(self) -> str:
        priority = self.priority
        name = priority.name if isinstance(priority, Priority) else repr(priority)
        return (
            f"Job(id={self.id!r}, type={self.type!r}, priority={name}, "
            f"run_at={self.run_at!r}, retries={self.retries!r})"
        )


def new_job(type: str, payload: Any = None) -> Job:
    """A MEDIUM-priority job that is ready now."""
    return Job(type, payload)


def new_high_priority_job(type: str, payload: Any = None) -> Job:
    """A HIGH-priority job that is ready now."""
    return Job(type, payload, priority=Priority.HIGH)


def new_low_priority_job(type: str, payload: Any = None) -> Job:
    """A LOW-priority job that is ready now."""
    return Job(type, payload, priority=Priority.LOW)


def new_delayed_job(type: str, payload: Any, delay: Union[float, timedelta]) -> Job:
    """A MEDIUM-priority job whose ``run_at`` is ``delay`` seconds from now."""
    seconds = _seconds("delay", delay)
    job = Job(type, payload)
    job.run_at = job.timestamp + seconds
    return job
