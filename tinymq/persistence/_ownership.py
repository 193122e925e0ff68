"""Files beside a store, and who owns a database file.

A store that writes owns its file alone. Three things make that so:

- the lock file ``DB-tinymq.lock`` beside the database, held with ``flock()``
  for the store's life (the kernel releases it when the process dies, even by
  SIGKILL), with the owner's pid written inside for error messages. ``flock``
  and not ``fcntl``: POSIX record locks belong to the process and vanish when
  *any* descriptor of the file is closed, while a flock belongs to its own open
  file, so nothing else the process does can drop it;
- the owner row in the database (pid, process start time, host and boot, and
  the identity of the lock file it holds): if someone deletes the lock file
  while the owner runs, a newcomer gets a lock on a new file, but finds a live
  owner of another lock file recorded, and refuses;
- a registry of the database files this process owns, by (st_dev, st_ino), so a
  second store in this process is refused before it opens anything.

Every file is checked with ``lstat`` or opened with ``O_NOFOLLOW`` first: a
symlink, a file of another uid or anything but a regular file is refused, so
nothing another local user plants beside the database is ever used.
"""
import errno
import os
import socket
import stat
import threading
import time
from typing import Any, Dict, Optional, Sequence, Tuple

from ..errors import PersistenceError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no flock()
    fcntl = None  # type: ignore[assignment]  # (a module or None: every use checks first)

__all__ = ["OwnedError", "LOCK_SUFFIX", "check_file", "identity", "head", "create_private", "lock", "unlock",
           "give_back", "discard", "loosen_again", "this_process", "is_alive", "register", "unregister",
           "owned_here"]

LOCK_SUFFIX = "-tinymq.lock"
PRIVATE_MODE = 0o600
_LOCK_ATTEMPTS = 10  # the lock file was replaced between open and flock this often: give up
_PID_BYTES = 32
_PID_WAIT = 0.25  # seconds a refused opener waits for a new owner to write its pid


class OwnedError(PersistenceError):
    """The database file has a live owner (the store ``claim`` moves on from)."""

    def __init__(self, path: str, pid: Optional[int], detail: str = "") -> None:
        self.path, self.pid, self.detail = path, pid, detail
        owner = f"pid {pid}" if pid is not None else "a process whose pid the lock file does not show (yet)"
        super().__init__(f"{path!r} is owned by a live store ({owner}{detail}); a file has one "
                         f"owner at a time: use another file (see SQLitePersistence.claim), or "
                         f"read_only=True to inspect it")

    def __reduce__(self) -> Tuple[Any, ...]:
        # copy and pickle call the class again: with its arguments, not the message that args holds
        return type(self), (self.path, self.pid, self.detail), self.__dict__


def check_file(path: str, *, mode: str, side: bool = False) -> Optional[os.stat_result]:
    """``os.lstat(path)`` of a regular file of ours, or None when it does not exist.

    A symlink, a special file or another uid's file raises PersistenceError; so
    does a ``side`` file (-wal, -shm, -journal) with a second name: SQLite never
    makes one, and it would overwrite the other file (a hard link to any file
    of ours that someone put there).
    ``mode`` says what to do with a mode looser than 0600: "tighten" it,
    "refuse" it when others may write the file, or "keep" it (a look before
    the file is ours). ``chmod`` goes by path, never through a descriptor:
    closing any descriptor of the database would drop the process's SQLite
    locks on it.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise PersistenceError(f"cannot check {path!r}: {exc}") from exc
    if stat.S_ISLNK(st.st_mode):
        raise PersistenceError(f"{path!r} is a symlink: refused (a store never follows one)")
    if not stat.S_ISREG(st.st_mode):
        raise PersistenceError(f"{path!r} is not a regular file: refused")
    if st.st_uid != os.getuid():
        raise PersistenceError(f"{path!r} belongs to uid {st.st_uid}, not to this process's uid "
                               f"{os.getuid()}: refused (another user may have planted it)")
    if side and st.st_nlink > 1:
        raise PersistenceError(f"{path!r} has {st.st_nlink} names (a hard link to another file?): refused, "
                               "that file is left as it is")
    bits = stat.S_IMODE(st.st_mode)
    if bits & 0o077 and mode == "tighten":
        try:
            os.chmod(path, bits & 0o700)
        except OSError as exc:
            raise PersistenceError(f"{path!r} has mode {bits:o} and cannot be made 0600: {exc}") from exc
    elif bits & 0o022 and mode == "refuse":
        raise PersistenceError(f"{path!r} has mode {bits:o}: others may write it, so it is not "
                               "read; open it once for writing to make it 0600")
    return st


def loosen_again(checked: Sequence[Tuple[str, Optional[os.stat_result]]]) -> None:
    """Give each file ``check_file`` tightened its mode back (a refused open), if it is still that file."""
    for path, st in checked:
        if st is None or not stat.S_IMODE(st.st_mode) & 0o077:
            continue  # (not there, or not tightened)
        try:
            now = os.lstat(path)
            if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino) and stat.S_ISREG(now.st_mode):
                os.chmod(path, stat.S_IMODE(st.st_mode))
        except OSError:
            pass


def identity(path: str) -> Optional[Tuple[int, int]]:
    """(st_dev, st_ino) of the file at ``path`` (never followed), or None when there is none."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def head(path: str, checked: os.stat_result, length: int) -> Optional[bytes]:
    """The first ``length`` bytes of the file ``check_file`` found at ``path``; None if it is not there now.

    Opened without following a symlink or blocking (on a FIFO put there since).
    For a side file only, never the database: closing any descriptor of the
    database would drop the process's SQLite locks on it.
    """
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return None  # a symlink now: not the file checked (the next check refuses it)
        raise PersistenceError(f"cannot read {path!r}: {exc}") from exc
    try:
        opened = os.fstat(fd)
        same = (opened.st_dev, opened.st_ino, opened.st_uid) == (checked.st_dev, checked.st_ino, checked.st_uid)
        if not (same and stat.S_ISREG(opened.st_mode)):
            return None  # another file since the check (a new one may reuse its inode number)
        return os.read(fd, length)
    except OSError as exc:
        raise PersistenceError(f"cannot read {path!r}: {exc}") from exc
    finally:
        os.close(fd)


def create_private(path: str) -> os.stat_result:
    """Create ``path`` empty, mode 0600 (a new inode: closing our descriptor drops nobody's lock)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, PRIVATE_MODE)
    except OSError as exc:
        raise PersistenceError(f"cannot create {path!r}: {exc}") from exc
    try:
        return os.fstat(fd)
    finally:
        os.close(fd)


def lock(path: str) -> Tuple[int, Optional[bytes]]:
    """Open and flock the lock file ``path``; returns its descriptor, and what the file held before
    this call wrote its pid there (None: this call created it). OwnedError if it is held.

    The standard protocol: create it exclusively (0600, no symlink followed) or
    open the existing one without following a symlink and check it is ours;
    after locking, check that the path still names the file we locked (someone
    may have removed or replaced it meanwhile), else try again.
    """
    if fcntl is None:  # pragma: no cover
        raise PersistenceError("SQLitePersistence needs flock() (POSIX) to own a file")
    flags = os.O_RDWR | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0) | os.O_NONBLOCK
    for _ in range(_LOCK_ATTEMPTS):
        created = True
        try:
            fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, PRIVATE_MODE)
        except FileExistsError:
            created = False
            try:
                fd = os.open(path, flags)
            except FileNotFoundError:
                continue  # removed meanwhile: create it
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise PersistenceError(f"{path!r} is a symlink: refused (a store never follows one)") from exc
                raise PersistenceError(f"cannot open the lock file {path!r}: {exc}") from exc
        except OSError as exc:
            raise PersistenceError(f"cannot create the lock file {path!r}: {exc}") from exc
        try:
            _check_lock_file(path, fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise OwnedError(path[:-len(LOCK_SUFFIX)], _holder(fd)) from None
            locked = os.fstat(fd)
            try:
                current = os.lstat(path)
            except FileNotFoundError:
                current = None
            if current is None or (current.st_dev, current.st_ino) != (locked.st_dev, locked.st_ino):
                os.close(fd)
                continue  # we locked a file that is no longer the lock file
            previous = None if created else os.pread(fd, _PID_BYTES + 1, 0)  # (its last owner's pid)
            # One write: an opener refused meanwhile reads the previous text or ours, never none.
            os.pwrite(fd, f"{os.getpid()}\n".encode().ljust(_PID_BYTES), 0)
            os.ftruncate(fd, _PID_BYTES)
            return fd, previous
        except BaseException as exc:
            if created and not isinstance(exc, OwnedError):  # a file we made, that nobody holds: not left behind
                discard(path, fd)
            else:
                try:
                    os.close(fd)
                except OSError:
                    pass
            if isinstance(exc, OSError):  # a full disk (the pid's write), a filesystem without flock()
                raise PersistenceError(f"cannot lock the lock file {path!r}: {exc}") from exc
            raise
    raise PersistenceError(f"the lock file {path!r} kept being replaced while it was being locked")


def _check_lock_file(path: str, fd: int) -> None:
    """A regular file of ours, mode 0600 (tightened through its descriptor: it is not the database)."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise PersistenceError(f"the lock file {path!r} is not a regular file: refused")
    if st.st_uid != os.getuid():
        raise PersistenceError(f"the lock file {path!r} belongs to uid {st.st_uid}, not to this "
                               f"process's uid {os.getuid()}: refused")
    # Its owner truncates and writes it: it must hold nothing but a pid, and be no other file's name.
    if st.st_nlink > 1:
        raise PersistenceError(f"the lock file {path!r} has {st.st_nlink} names (a hard link to another "
                               "file?): refused, that file is left as it is")
    text = os.pread(fd, _PID_BYTES + 1, 0)
    if len(text) > _PID_BYTES or not (text.strip() == b"" or text.strip().isdigit()):
        raise PersistenceError(f"the lock file {path!r} holds something else than a pid (another store's "
                               f"database? {text[:16]!r}): refused, it is left as it is")
    if stat.S_IMODE(st.st_mode) & 0o077:
        os.fchmod(fd, PRIVATE_MODE)


def _holder(fd: int) -> Optional[int]:
    """The pid of the live process holding the lock file ``fd``, or None if none shows in time.

    The holder writes its pid just after its ``flock()``: a look in between
    finds the previous (dead) owner's pid, so look again for a moment.
    """
    deadline = time.monotonic() + _PID_WAIT
    while True:
        pid = _read_pid(fd)
        if pid is not None and _exists(pid):
            return pid
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.002)


def _exists(pid: int) -> bool:
    if pid <= 0:  # kill(0) or kill(-n) would ask about a process group
        return False
    try:
        os.kill(pid, 0)
    except PermissionError:
        return True  # it exists, as another user
    except OSError:
        return False
    return True


def _read_pid(fd: int) -> Optional[int]:
    try:
        return int(os.pread(fd, _PID_BYTES, 0).decode("ascii").strip())
    except (OSError, ValueError):
        return None


def unlock(fd: int) -> None:
    """Release the lock (the file stays: removing it would race with the next owner)."""
    os.close(fd)


def give_back(fd: int, previous: bytes) -> None:
    """Put back what the lock file ``fd`` held before ``lock`` wrote our pid there, then release it.

    For an open refused before it owned anything, of a lock file it found: the
    file names its last owner again, not a process that never owned the
    database. Written while locked: nobody else writes it meanwhile.
    """
    try:
        os.pwrite(fd, previous, 0)
        os.ftruncate(fd, len(previous))
    except OSError:
        pass  # our pid stays: harmless, the next owner writes its own
    finally:
        unlock(fd)


def discard(path: str, fd: int) -> None:
    """Remove the lock file ``path`` that ``lock`` created and that ``fd`` holds, then release it.

    For an open refused before it owned anything: the directory is left as it
    was found. Removed while locked, so no race: an opener that opened this
    file meanwhile finds, once it has the lock, that the path no longer names
    it, and tries again (see ``lock``).
    """
    try:
        held = os.fstat(fd)
        if identity(path) == (held.st_dev, held.st_ino):
            os.unlink(path)
    except OSError:
        pass  # left behind: harmless, the next owner takes it
    finally:
        try:
            os.close(fd)
        except OSError:
            pass


# -- who is alive ------------------------------------------------------------------

def _boot() -> str:
    """This machine and boot: a pid recorded under another one says nothing here."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()} {boot}".strip()


def _proc_stat(pid: int) -> Optional[Tuple[str, str]]:
    """(state letter, start time in clock ticks since boot) of ``pid``, from /proc; None without it."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], fields[19]


def this_process() -> Tuple[int, Optional[str], str]:
    """(pid, start time, host and boot) of this process, as the owner row records them."""
    pid = os.getpid()
    proc = _proc_stat(pid)
    return pid, None if proc is None else proc[1], _boot()


def is_alive(pid: int, started: Optional[str], host: str) -> bool:
    """Whether the process recorded as (pid, started, host) still runs on this machine.

    Another host or boot: it cannot be seen from here (False). This process:
    False as well, since the registry already vouches for our own stores.
    """
    if host != _boot() or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, as another user
    proc = _proc_stat(pid)
    if proc is None:
        return True  # no /proc: the pid exists, assume it is the owner
    state, start = proc
    return state != "Z" and (started is None or start == started)  # a zombie, or a reused pid: gone


# -- the stores this process owns -------------------------------------------------

_registry_lock = threading.Lock()
_registry: Dict[Tuple[int, int], str] = {}  # (st_dev, st_ino) of a database -> its path; guarded by _registry_lock


def register(key: Tuple[int, int], path: str) -> None:
    """Record that this process owns the database ``key``; OwnedError if it already does."""
    with _registry_lock:
        if key in _registry:
            raise OwnedError(path, os.getpid(), ", another store in this process")
        _registry[key] = path


def unregister(key: Tuple[int, int]) -> None:
    with _registry_lock:
        _registry.pop(key, None)


def owned_here(key: Tuple[int, int], path: str) -> None:
    """OwnedError if a store of this process owns the database ``key``."""
    with _registry_lock:
        if key in _registry:
            raise OwnedError(path, os.getpid(), ", another store in this process")


def _forget_after_fork() -> None:
    """In a forked child: it owns nothing (its parent does), and no parent thread holds our lock."""
    global _registry_lock
    _registry_lock = threading.Lock()
    _registry.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)
