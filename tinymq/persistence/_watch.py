"""Whether a file of a live store may have lost its name, asked once per commit at the cost of a poll.

A store must not acknowledge a commit written into a ``-wal`` (or a database)
that no longer has its name: a kill would lose it. A look by path (an
``lstat`` of each file) after every commit costs a share of a durable enqueue
users would see; so does an ``fstat``. On Linux, inotify tells the same for
less: the kernel queues an event for a watched file as it loses a name (its
link count changes: ``IN_ATTRIB``) or is renamed (``IN_MOVE_SELF``), before
the ``unlink()`` or ``rename()`` returns, so one ``poll(0)`` after a commit
finds every such change made before it. The store then looks by path, as it
always did, to tell what happened (an event may be harmless: a ``chmod``).

Where inotify cannot be had (not Linux, or its per-user limits are reached),
``changed`` is always true: the store looks by path after every commit.
"""
import ctypes
import logging
import os
import select
import sys
from typing import Any, Callable, List, Optional, Tuple

__all__ = ["FileWatch"]

logger = logging.getLogger("tinymq.persistence")

# inotify(7): the events that a watched file lost a name, was renamed or is gone; and never follow a symlink.
_IN_ATTRIB = 0x00000004
_IN_DELETE_SELF = 0x00000400
_IN_MOVE_SELF = 0x00000800
_IN_DONT_FOLLOW = 0x02000000
_MASK = _IN_ATTRIB | _IN_DELETE_SELF | _IN_MOVE_SELF | _IN_DONT_FOLLOW
_READ_SIZE = 4096  # bytes of events read at a time when draining


def _always(timeout: int) -> List[Tuple[int, int]]:
    return [(-1, 0)]  # "something may have changed": look by path


def _inotify() -> Optional[Tuple[Callable[..., int], Callable[..., int]]]:
    """libc's ``inotify_init1`` and ``inotify_add_watch``, or None where there are none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        init, add = libc.inotify_init1, libc.inotify_add_watch
    except (OSError, AttributeError):  # pragma: no cover - a libc without inotify
        return None
    init.argtypes, init.restype = [ctypes.c_int], ctypes.c_int
    add.argtypes, add.restype = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32], ctypes.c_int
    return init, add


_INOTIFY = _inotify()


class FileWatch:
    """Watches files for losing their name; ``changed(0)`` is true when one may have since ``drain()``.

    ``changed`` is the bound ``poll`` of a ``select.poll`` object (one system
    call), or ``_always`` without inotify.
    Not thread-safe: the store's commit lock guards it.
    """

    def __init__(self) -> None:
        self._fd = -1
        self.changed: Callable[[int], List[Any]] = _always
        if _INOTIFY is None:
            return
        fd = _INOTIFY[0](os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            logger.warning("persistence: no inotify instance (%s; see fs.inotify.max_user_instances): this "
                           "store looks at its files by path after every commit, a slower check",
                           os.strerror(ctypes.get_errno()))
            return
        self._fd = fd
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        self.changed = poller.poll

    def watch(self, path: str) -> None:
        """Watch the file ``path`` names now (never through a symlink); else look by path from now on."""
        if self._fd < 0:
            return
        if _INOTIFY is None or _INOTIFY[1](self._fd, os.fsencode(path), _MASK) < 0:
            logger.warning("persistence: cannot watch %r (%s; see fs.inotify.max_user_watches): its store "
                           "looks at its files by path after every commit, a slower check", path,
                           os.strerror(ctypes.get_errno()))
            self.close()

    def drain(self) -> None:
        """Forget the events so far (before a look by path: a change after it is found again)."""
        while self._fd >= 0:
            try:
                os.read(self._fd, _READ_SIZE)  # until none is left
            except BlockingIOError:
                return
            except OSError:
                self.close()
                return

    def close(self) -> None:
        """Stop watching (idempotent); ``changed`` is always true from now on."""
        fd, self._fd = self._fd, -1
        self.changed = _always
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass
