"""Immutable, validated configuration: RetryConfig, Config, ExecutorConfig.

Every duration is seconds as a float and also accepts ``datetime.timedelta``.
Bad values raise ValueError or TypeError naming the value, at construction.

Each config turns its durations into float seconds (and its counts into exact ints) when it is built, so its fields
are annotated ``float``; the ``__init__`` declared under ``TYPE_CHECKING`` tells type
checkers that the constructor also takes a ``Duration`` (at run time the dataclass
makes ``__init__`` from the fields, as always).
"""
import math
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Optional, Tuple, Type, Union

from ._pick_core import core

__all__ = ["RetryConfig", "Config", "ExecutorConfig", "RateLimit", "Duration"]

Duration = Union[float, int, timedelta]


def _seconds(name: str, value: object, *, expected: str = "seconds (float) or a timedelta") -> float:
    """Return ``value`` as non-negative float seconds, or raise naming it."""
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            seconds = float(value)
        except OverflowError:  # an int beyond any float: refused below as not finite
            seconds = math.inf if value > 0 else -math.inf
    else:
        raise TypeError(f"{name} must be {expected}, got {value!r}")
    if not seconds >= 0.0 or seconds == float("inf"):  # also rejects NaN
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return seconds


def _positive_seconds(name: str, value: object) -> float:
    """Like ``_seconds``, and more than 0."""
    seconds = _seconds(name, value)
    if seconds == 0.0:
        raise ValueError(f"{name} must be > 0 seconds, got {value!r}")
    return seconds


def _optional_seconds(name: str, value: object) -> Optional[float]:
    """Like ``_seconds``, where None means "no limit"."""
    if value is None:
        return None
    return _seconds(name, value, expected="seconds (float), a timedelta or None")


def _count(name: str, value: object, minimum: int) -> int:
    """Return ``value`` as an exact int (an IntEnum member: its value), from ``minimum`` to
    ``sys.maxsize`` (the compiled core keeps counts as C integers), or raise naming it."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    if value > sys.maxsize:
        raise ValueError(f"{name} must be <= sys.maxsize ({sys.maxsize}), got {value!r}")
    return int(value)  # (a broker's script calls take exact ints only)


# The most starts a RateLimit allows per window: the in-process core keeps up to max_starts start times
# of 8 bytes each (its ring's size in bytes must fit in a Py_ssize_t); a broker takes the same.
_MAX_RATE_STARTS = sys.maxsize // 8


def _set(instance: object, name: str, value: object) -> None:
    object.__setattr__(instance, name, value)  # frozen dataclass: normalise once, here


@dataclass(frozen=True)
class RetryConfig:
    """How often a failed job is retried, and how long to wait before each retry.

    The k-th retry (k = 1 .. max_retries) runs
    ``min(initial_delay * backoff_multiple**(k-1), max_delay)`` seconds after the
    failed attempt ended. ``jitter`` (0 .. 1) spreads each delay uniformly over
    ``delay * (1 ± jitter)``, still capped at ``max_delay``.
    """

    max_retries: int = 3
    initial_delay: float = 1.0
    max_delay: float = 300.0
    backoff_multiple: float = 2.0
    jitter: float = 0.0

    if TYPE_CHECKING:
        def __init__(self, max_retries: int = 3, initial_delay: Duration = 1.0, max_delay: Duration = 300.0,
                     backoff_multiple: float = 2.0, jitter: float = 0.0) -> None: ...

    def __post_init__(self) -> None:
        _set(self, "max_retries", _count("max_retries", self.max_retries, 0))
        _set(self, "initial_delay", _seconds("initial_delay", self.initial_delay))
        _set(self, "max_delay", _seconds("max_delay", self.max_delay))
        multiple = self.backoff_multiple
        if not isinstance(multiple, (int, float)) or isinstance(multiple, bool):
            raise TypeError(f"backoff_multiple must be a number, got {multiple!r}")
        if not 1.0 <= multiple < float("inf"):
            raise ValueError(f"backoff_multiple must be a finite number >= 1, got {multiple!r}")
        _set(self, "backoff_multiple", float(multiple))
        jitter = self.jitter
        if not isinstance(jitter, (int, float)) or isinstance(jitter, bool):
            raise TypeError(f"jitter must be a number, got {jitter!r}")
        if not 0.0 <= jitter <= 1.0:
            raise ValueError(f"jitter must be between 0 and 1, got {jitter!r}")
        _set(self, "jitter", float(jitter))

    def retry_delay(self, k: int) -> float:
        """Seconds to wait before the k-th retry (k >= 1)."""
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= sys.maxsize:
            raise ValueError(f"retry number k must be an int from 1 to sys.maxsize, got {k!r}")
        return core.retry_delay(k, self.initial_delay, self.max_delay, self.backoff_multiple, self.jitter)


@dataclass(frozen=True)
class Config:
    """Queue-wide settings.

    ``buffer_size`` caps the ready jobs of all priorities together;
    ``scheduler_interval`` is the longest the delayed-job scheduler sleeps
    without looking; ``max_delayed_jobs`` caps the delayed set (0 = unlimited).
    """

    buffer_size: int = 100
    scheduler_interval: float = 0.1
    max_delayed_jobs: int = 10000

    if TYPE_CHECKING:
        def __init__(self, buffer_size: int = 100, scheduler_interval: Duration = 0.1,
                     max_delayed_jobs: int = 10000) -> None: ...

    def __post_init__(self) -> None:
        _set(self, "buffer_size", _count("buffer_size", self.buffer_size, 1))
        interval = _seconds("scheduler_interval", self.scheduler_interval)
        if interval == 0.0:
            raise ValueError(f"scheduler_interval must be > 0, got {self.scheduler_interval!r}")
        _set(self, "scheduler_interval", interval)
        _set(self, "max_delayed_jobs", _count("max_delayed_jobs", self.max_delayed_jobs, 0))


@dataclass(frozen=True)
class RateLimit:
    """At most ``max_starts`` attempts of a job type start in any window of ``per`` seconds.

    An exact sliding window: a type may start an attempt when its
    ``max_starts``-th latest start is at least ``per`` seconds ago (monotonic
    clock). Every attempt counts, retries and attempts that time out included.
    ``RateLimit(100, per=60.0)``: at most 100 starts a minute. ``per`` also
    accepts a ``timedelta``. The in-process core and a broker read the same
    two fields. ``max_starts`` is at most ``sys.maxsize // 8``.
    """

    max_starts: int
    per: float

    if TYPE_CHECKING:
        def __init__(self, max_starts: int, per: Duration) -> None: ...

    def __post_init__(self) -> None:
        max_starts = _count("max_starts", self.max_starts, 1)
        if max_starts > _MAX_RATE_STARTS:
            raise ValueError(f"max_starts must be <= sys.maxsize // 8 ({_MAX_RATE_STARTS}: a queue keeps up to "
                             f"max_starts start times of 8 bytes each), got {self.max_starts!r}")
        _set(self, "max_starts", max_starts)
        _set(self, "per", _positive_seconds("per", self.per))


@dataclass(frozen=True)
class ExecutorConfig:
    """Per job type: how many attempts may run at once, and for how long.

    ``timeout=None`` means no timeout. At the deadline the attempt counts as
    failed with JobTimeout; Python cannot kill a thread, so the function is told
    cooperatively (its JobContext is cancelled) and, with
    ``interrupt_on_timeout=True``, JobTimeout is also raised inside its thread at
    the next Python bytecode outside tinymq's own code (an ``enqueue`` or ``cancel``
    it makes ends first: all or nothing). The type's slot stays taken until the function
    really returns, so ``max_concurrent_jobs`` is never exceeded. An async
    executor's task is cancelled at the deadline instead.

    ``retry_on``: only exceptions of these classes are retried; any other fails
    the job at once (reason ``"permanent_failure"``), as ``PermanentFailure``
    always does. ``RetryAfter`` is always retried, after its own delay.

    ``rate_limit=RateLimit(max_starts, per=seconds)`` also caps how many
    attempts start in any window of ``per`` seconds; None means no rate limit.
    """

    max_concurrent_jobs: int = 10
    timeout: Optional[float] = 30.0
    interrupt_on_timeout: bool = False
    retry_on: Tuple[Type[BaseException], ...] = (Exception,)
    rate_limit: Optional[RateLimit] = None

    if TYPE_CHECKING:
        def __init__(self, max_concurrent_jobs: int = 10, timeout: Optional[Duration] = 30.0,
                     interrupt_on_timeout: bool = False,
                     retry_on: Tuple[Type[BaseException], ...] = (Exception,),
                     rate_limit: Optional[RateLimit] = None) -> None: ...

    def __post_init__(self) -> None:
        _set(self, "max_concurrent_jobs", _count("max_concurrent_jobs", self.max_concurrent_jobs, 1))
        timeout = _optional_seconds("timeout", self.timeout)
        if timeout == 0.0:
            raise ValueError(f"timeout must be > 0 or None, got {self.timeout!r}")
        _set(self, "timeout", timeout)
        if not isinstance(self.interrupt_on_timeout, bool):
            raise TypeError(f"interrupt_on_timeout must be a bool, got {self.interrupt_on_timeout!r}")
        retry_on = self.retry_on
        if not isinstance(retry_on, tuple) or not all(
                isinstance(kind, type) and issubclass(kind, BaseException) for kind in retry_on):
            raise TypeError(f"retry_on must be a tuple of exception classes, got {retry_on!r}")
        if self.rate_limit is not None and not isinstance(self.rate_limit, RateLimit):
            raise TypeError(f"rate_limit must be a tinymq.RateLimit or None, got {self.rate_limit!r}")
