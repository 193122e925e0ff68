"""Keeping an interruption out of tinymq's own code.

``ExecutorConfig(interrupt_on_timeout=True)`` raises JobTimeout inside a worker
thread at its next bytecode. Landing in tinymq's own code run by that thread (an
executor's ``enqueue`` between its save and its placement, a store's transaction
that may hold other threads' saves) it would leave things half done. Such code
runs ``with shield():``. In a worker thread, that is the thread's WorkerSlot:
the watchdog then defers the interruption, and the outermost block raises it as
it ends. Anywhere else nothing can interrupt the thread, and it does nothing.
"""
import threading
from typing import Any

__all__ = ["shield", "set_worker_slot", "interrupting", "DroppedInterruption", "let_it_land"]

_worker = threading.local()  # .slot: the WorkerSlot of a worker thread, set as the thread starts
# An executor with interrupt_on_timeout=True was registered (in any queue): until then no thread
# can be interrupted, and shield() costs one look at this flag.
interrupting = False


class _NoShield:
    """The shield of a thread that nothing interrupts."""

    def __enter__(self) -> "_NoShield":
        return self

    def __exit__(self, *exc_info: object) -> None:
        return None

    def raise_deferred(self) -> None:
        return None


_NO_SHIELD = _NoShield()


def shield() -> Any:
    """What ``with`` takes around code an interruption must not cut: the worker's slot, or a no-op.

    Inside, ``shield().raise_deferred()`` raises at once the JobTimeout the block
    would raise at its end: at the last point where the block can still undo its work.
    """
    if interrupting:
        return getattr(_worker, "slot", _NO_SHIELD)
    return _NO_SHIELD


def set_worker_slot(slot: Any) -> None:
    """Called by a worker thread as it starts: its shield is ``slot``."""
    _worker.slot = slot


class DroppedInterruption(BaseException):
    """What a worker thread raises into itself to drop its own pending interruption.

    Both cores' ``drop_own_interruption`` raise it (never seen outside them): it replaces a
    JobTimeout still pending, lands at once in ``let_it_land`` and is caught there.
    """


def let_it_land() -> None:
    """Run a little Python bytecode, so that an exception pending in this thread lands here.

    It must stay in a .py module: CPython looks for one as a Python function starts (3.11+)
    and at a loop's backward jump (every version); compiled code never looks.
    """
    for _ in range(2):
        pass
