"""tinymq's exceptions, defined once and raised by both cores and the façade."""
import math
import queue
from datetime import timedelta
from typing import Any, Optional, Tuple, Union

__all__ = [
    "TinyMQError", "QueueFull", "QueueStopped", "PersistenceError", "JobTimeout", "DuplicateJob",
    "PermanentFailure", "RetryAfter",
]


_STR_FAILED = "<exception str() failed>"  # what traceback prints for such an exception
# Seconds between two log records of one condition that lasts (a Redis outage, a schedule's ticks
# the queue refuses, a wall clock ahead of Redis's): the first at once, then at most one per this,
# with the count since, so a schedule ticking every 10 ms into it floods no log.
_LOG_EVERY = 30.0


class _LastingCondition:
    """A condition that lasts (a schedule's ticks refused, a clock ahead of the server's), logged the
    _LOG_EVERY way. Not thread-safe: its owner serialises it."""

    __slots__ = ("in_row", "unlogged", "logged")

    def __init__(self) -> None:
        self.in_row = 0  # times in a row, since it last ended
        self.unlogged = 0  # times since the last log record
        self.logged = -math.inf  # monotonic time of the last log record

    def seen(self, now: float, every: float) -> Optional[int]:
        """One more time: the count a record written now gives (since the last one, this one
        included), or None when none is due (the first in a row at once, then one per ``every``
        seconds: the caller's _LOG_EVERY, which its records name)."""
        self.in_row += 1
        self.unlogged += 1
        if self.in_row > 1 and now - self.logged < every:
            return None
        count, self.unlogged, self.logged = self.unlogged, 0, now
        return count

    def reset(self) -> None:
        """It ended (the caller logs that, from ``in_row`` and ``unlogged``, first)."""
        self.in_row = self.unlogged = 0


def _exception_text(exc: BaseException) -> str:
    """``str(exc)``, or a fallback text when its ``__str__`` raises (a bug in a user's exception)."""
    try:
        return str(exc)
    except Exception:
        return _STR_FAILED


def counted(number: int, noun: str, plural: str = "") -> str:
    """``counted(1, "job")`` is "1 job", ``counted(2, "job")`` "2 jobs" (or ``plural`` when given)."""
    return f"{number} {noun if number == 1 else plural or noun + 's'}"


def _describe(exc: BaseException) -> str:
    """``"ClassName: text"``: how a job's ``last_error`` and the logs show an exception."""
    return f"{exc.__class__.__name__}: {_exception_text(exc)}"


class TinyMQError(Exception):
    """Base class of every exception tinymq raises on its own account."""


class QueueFull(TinyMQError, queue.Full):
    """The ready buffer is full and the caller did not choose to wait for room."""


def _buffer_full(buffer_size: int, job_id: str, job_type: str) -> QueueFull:
    """The QueueFull of one job that the full ready buffer refused (in-process, over Redis, a schedule's tick)."""
    return QueueFull(f"the ready buffer is full ({counted(buffer_size, 'job')}); job {job_id} ({job_type!r}) "
                     "was not enqueued")


class QueueStopped(TinyMQError):
    """The queue was stopped: it accepts no more jobs."""


class PersistenceError(TinyMQError):
    """The persistence store failed; the store's own exception is the __cause__."""


class JobTimeout(TinyMQError, TimeoutError):
    """An attempt ran past its executor's timeout."""


class DuplicateJob(TinyMQError, ValueError):
    """A job with this id is already in the queue and unfinished."""


class PermanentFailure(TinyMQError):
    """Raised by an executor: the job fails now, without retries (reason ``"permanent_failure"``).

    ``raise PermanentFailure("HTTP 404") from exc`` keeps ``exc`` as its cause.
    """


class RetryAfter(TinyMQError):
    """Raised by an executor: this attempt failed; retry after ``seconds`` instead of the backoff.

    The retry still counts against ``max_retries``.
    """

    def __init__(self, seconds: Union[float, int, timedelta], message: Optional[str] = None) -> None:
        from .config import _seconds  # here: config imports the core, which imports this module

        self.seconds = _seconds("RetryAfter seconds", seconds)
        super().__init__(message if message is not None else f"retry after {self.seconds:g}s")

    def __reduce__(self) -> Tuple[Any, ...]:
        # copy and pickle call the class again: with the seconds, not only the message that args holds
        return type(self), (self.seconds, self.args[0] if self.args else None), self.__dict__
