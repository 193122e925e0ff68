"""The queue's locked sections, and code the garbage collector runs inside one.

A section that allocates may run the garbage collector, and with it Python code: a gc
callback, a ``__del__``, a weakref callback (a signal handler may run there too). Such
code that calls the queue on the same thread would wait for a lock its own thread holds,
forever. So the dispatcher's and the event loop's locks, the SQLite store's and the Redis
link's are RLocks taken through ``section``, which refuses that call (RuntimeError saying
why) instead: the section it interrupted is half done, and re-entering it would act on
that state. The pure-Python core refuses a call back into its own steps alike
(``_core_py._step``).

The calls a user makes from such code most (``get_stats``, ``cancel``) need no section of
the dispatcher's, or take none before ``refuse_reentry`` has looked: they are either
answered, or refused before anything is done.

In a fork()ed child the same locks may be held by a thread of the parent, which is not
there to release them: ``reinit_after_fork`` makes one free again.
"""
from typing import Any, NoReturn

__all__ = ["section", "owned", "refuse", "reinit_after_fork"]


def refuse(what: str) -> NoReturn:
    """Raise the RuntimeError of a call, ``what``, made inside one of the queue's own sections."""
    raise RuntimeError(
        f"{what} was called from code that ran inside one of tinymq's own locked sections on this thread "
        "(a gc callback, __del__ or weakref callback the garbage collector ran there, or a signal "
        "handler): refused, as the section is half done; hand such work to another thread")


def owned(lock: Any) -> bool:
    """Whether this thread is inside a section of ``lock`` (an RLock)."""
    return bool(lock._is_owned())


def section(lock: Any, what: str = "the queue") -> Any:
    """``lock`` (an RLock), to take for one locked section: ``with section(self._lock):``; refused
    (RuntimeError: ``what`` was called from such code) on a thread inside a section of that lock already."""
    if lock._is_owned():
        refuse(what)
    return lock


def reinit_after_fork(lock: Any) -> None:
    """In a fork()ed child: make ``lock`` (a Lock, an RLock or a Condition, whose waiters it forgets)
    free again, as ``threading`` does for its own locks. One held at the fork by a thread of the
    parent would never be released: that thread is not in the child."""
    getattr(lock, "_at_fork_reinit")()
