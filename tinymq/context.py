"""JobContext: how an executor observes its deadline and its cancellation.

An executor whose function takes two required positional parameters is called
as ``fn(job, ctx)``. Python cannot kill a thread, so a long-running executor
that wants to stop on time polls ``ctx.cancelled`` or ``ctx.check()``, or
sleeps with ``ctx.wait(seconds)``, which returns early when cancelled. An async
executor's task is cancelled for real (``asyncio.CancelledError`` at its next
``await``); it may also ``await ctx.sleep(seconds)``.
"""
import asyncio
import threading
from datetime import timedelta
from typing import Any, Optional, Union

from ._pick_core import core
from .errors import JobTimeout

__all__ = ["JobContext"]


def _as_seconds(seconds: Any) -> float:
    """A wait's length as float seconds: a number as is (a negative one waits not at all), or a timedelta.

    NaN is refused (ValueError): a NaN timer on the queue's event loop would fire
    whenever some other timer does, and a lock's wait refuses it anyway.
    """
    if isinstance(seconds, timedelta):
        return seconds.total_seconds()
    if isinstance(seconds, (int, float)) and not isinstance(seconds, bool):
        try:
            value = float(seconds)
        except OverflowError:  # an int beyond any float: as long as the largest
            return float("inf") if seconds > 0 else float("-inf")
        if value != value:
            raise ValueError(f"seconds must be a number or a timedelta, got {seconds!r}")
        return value
    raise TypeError(f"seconds must be a float or a timedelta, got {seconds!r}")


class JobContext:
    """One attempt of one job: its deadline and whether it was cancelled.

    ``cancelled`` becomes True when the attempt times out, is cancelled
    (``Queue.cancel``) or the queue stops.
    """

    __slots__ = ("job", "deadline", "_cancelled", "_not_cancelled", "_reason")

    def __init__(self, job: Any, deadline: Optional[float]) -> None:
        self.job = job
        self.deadline = deadline  # core.monotonic() seconds (time.monotonic's clock), or None without a timeout
        self._cancelled = False
        # A raw lock, held until cancelled: cancelling is one C call, so an interruption
        # landing in the executor can never leave it half done (as it could an Event).
        self._not_cancelled = threading.Lock()
        self._not_cancelled.acquire()
        self._reason = ""

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def remaining(self) -> Optional[float]:
        """Seconds left before the deadline (never negative), or None without a timeout."""
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - core.monotonic())

    def wait(self, seconds: Union[float, timedelta]) -> bool:
        """Sleep up to ``seconds`` (a float or a timedelta); True as soon as the attempt is cancelled."""
        if self._cancelled:
            return True
        if type(seconds) is not float or seconds != seconds:  # (NaN)
            seconds = _as_seconds(seconds)
        if self._not_cancelled.acquire(True, min(max(seconds, 0.0), threading.TIMEOUT_MAX)):
            self._not_cancelled.release()  # let every other waiter see it too
        return self._cancelled

    async def sleep(self, seconds: Union[float, timedelta]) -> bool:
        """For coroutines: sleep ``seconds`` (a float or a timedelta); True when the attempt is cancelled.

        A cancelled async attempt's task is cancelled too, so a sleep under way
        raises ``asyncio.CancelledError`` (let it propagate); a sleep begun
        after the cancellation (in cleanup code) returns True at once.
        """
        if self._cancelled:
            return True
        if type(seconds) is not float or seconds != seconds:  # (NaN)
            seconds = _as_seconds(seconds)
        await asyncio.sleep(max(seconds, 0.0))
        return self._cancelled

    def check(self) -> None:
        """Raise JobTimeout if the attempt was cancelled."""
        if self._cancelled:
            raise JobTimeout(f"job {self.job.id} was cancelled: {self._reason}")

    def _cancel(self, reason: str) -> None:
        if self._cancelled:
            return
        self._reason = reason
        self._cancelled = True
        try:
            self._not_cancelled.release()
        except RuntimeError:
            pass  # released already

    def __repr__(self) -> str:
        return f"JobContext(job={self.job!r}, deadline={self.deadline!r}, cancelled={self.cancelled})"
