"""The write-behind journal that makes a durable write cost one ``write()`` call.

A committed SQLite transaction survives a crash of the process because its
WAL frames are in the OS page cache; so does a record appended to a plain file
with ``os.write``, at a fraction of the cost (one system call instead of a
transaction's locks and page writes). ``SQLitePersistence`` therefore logs each
write here and returns; a background thread applies the logged operations to
the table in batches, one transaction each, and then deletes the log segments.

Files, next to the database ``DB`` (its real path), for one journal (``TOKEN`` =
pid + random):

    DB-tinymq-TOKEN.lock            held with flock() while the journal's process lives
    DB-tinymq-TOKEN.NNNNNNNNNN.log  segments, numbered; a new one starts at every batch

A record is ``<length><crc32>`` (little-endian uint32 each) and a ``marshal``
body: a tuple ``(kind, argument)`` of plain values (str, int, float, bytes,
None) and nothing else. ``marshal`` never runs code; recovery checks every
value's type and drops a record that has anything else. Every segment starts
with a ``(FORMAT, version)`` record. A process killed during ``write()`` leaves
a short record at the end of a segment: its write never returned, so nothing
was promised, and recovery skips it.

The store applies a batch and records, in the same transaction, the number of
the last segment applied (its "watermark"). Recovery (``orphans``) takes the
lock of every journal whose process died (flock is released by the kernel,
even after SIGKILL); the store applies the segments above that journal's
watermark and then calls ``remove``. So a crash at any point neither loses a
record nor applies one twice.
"""
import atexit
import errno
import glob
import logging
import marshal
import os
import secrets
import struct
import sys
import threading
import weakref
import zlib
from typing import Any, Callable, List, NamedTuple, Optional, Tuple

from .._pick_core import codec
from ..errors import PersistenceError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: the store commits each write instead
    fcntl = None  # type: ignore[assignment]

__all__ = ["Journal", "Orphan", "SUPPORTED", "live_on", "orphans", "tokens", "remove", "release", "read_segment",
           "encode", "utf8", "INT64", "SAVE", "SAVE_MANY", "RUNNING", "DELETE"]

logger = logging.getLogger("tinymq.persistence")

SUPPORTED = fcntl is not None

# Operation kinds, the first item of every record (defined with the code that applies them).
SAVE, SAVE_MANY, RUNNING, DELETE = codec.SAVE, codec.SAVE_MANY, codec.RUNNING, codec.DELETE
FORMAT = "V"  # (FORMAT, VERSION): the first record of every segment
VERSION = 1

Operation = Tuple[str, Any]
Apply = Callable[[List[Operation], str, int], None]  # (operations, token, last segment number)

_HEADER = struct.Struct("<II")  # body length, crc32 of the body (codec.frame writes it)
encode = codec.frame  # one framed record for an operation
_write = codec.write  # keeps the GIL, when compiled: see tinymq/_codec_py.py
utf8 = codec.utf8  # whether SQLite can store a str (no lone surrogates)
INT64 = 1 << 63  # SQLite's integers are in [-INT64, INT64)
_PLAIN = (str, int, float, bytes, type(None))
# Seconds the flusher lets a batch grow after waking. Each batch costs the producers GIL
# hand-offs (context switches): 20 ms batches measured 2x faster than 2 ms ones here.
_LINGER = 0.02

_live: "weakref.WeakSet[Journal]" = weakref.WeakSet()

_FORMAT_RECORD = encode((FORMAT, VERSION))


class Journal:
    """An append-only log of store operations, applied to the table by a background thread.

    ``append`` returns once the record is in the OS (it survives a crash of
    the process). ``apply(operations, token, last_seq)`` is called, from the
    flusher thread or from ``flush()``, with every operation appended since
    the last successful call, in order; it must record ``last_seq`` as this
    journal's watermark in the same transaction. When it returns, those
    operations' segments are deleted; if it raises, the same operations (and
    newer ones) are offered again. ``close()`` calls ``forget(token)`` once
    the journal's files are gone.
    """

    def __init__(self, db_path: str, apply: Apply, forget: Callable[[str], None], max_backlog: int,
                 wait_timeout: float, on_fork: Optional[Callable[[], None]] = None) -> None:
        self._apply = apply
        self._forget = forget  # drops this journal's watermark once its files are gone
        self._on_fork = on_fork  # called in a forked child, where this journal is no longer usable
        self._max_backlog = max_backlog
        self._wait_timeout = wait_timeout
        self.db_path = db_path
        self.token = f"{os.getpid()}-{secrets.token_hex(4)}"
        self._prefix = f"{db_path}-tinymq-{self.token}"
        # Invariant: _lock guards _fd, _seq, _operations, _damaged, _refusal, _backlog, _idle,
        # _closing; every record in the current segment is in _operations, in the same order.
        self._lock = threading.Lock()
        self._fd = self._lock_fd = -1
        self._seq = 0
        self._closing = False
        self._files_closed = False
        # Only a holder of _flush_lock touches _unapplied (segments swapped out, closed, not yet
        # applied: path, number, operations) and _files_closed.
        self._flush_lock = threading.Lock()
        self._unapplied: List[Tuple[str, int, List[Operation]]] = []
        _live.add(self)  # from here on a fork() lets go of these files in the child
        _close_at_multiprocessing_exit()
        try:
            # Lock first, then give the lock file its name: recovery never sees an unlocked one.
            self._lock_fd = os.open(self._prefix + ".lock-new", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.rename(self._prefix + ".lock-new", self._prefix + ".lock")
            self._fd = self._open_segment(0)
        except BaseException:
            _live.discard(self)
            _close(self._lock_fd)
            _unlink(self._prefix + ".lock-new")
            _unlink(self._prefix + ".lock")
            raise
        self._damaged = False  # the current segment has a torn record that could not be cut
        self._refusal: Optional[str] = None  # why append() refuses: closed, forked, damaged
        self._room = threading.Condition(self._lock)  # producers waiting while the backlog is full
        self._operations: List[Operation] = []
        self._backlog = 0  # operations appended and not yet applied
        self._idle = False  # the flusher is blocked on _wake
        self._wake = threading.Lock()  # released to wake the flusher; held while it sleeps
        self._wake.acquire()
        self._stop = threading.Event()
        self._closed = threading.Event()  # close() has finished (successfully or not)
        self._close_error: Optional[BaseException] = None
        self._segment_error_logged = False
        self.last_error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, name=f"tinymq-journal-{os.path.basename(db_path)}",
                                        daemon=True)
        self._thread.start()

    def _segment(self, seq: int) -> str:
        return f"{self._prefix}.{seq:010d}.log"

    def _open_segment(self, seq: int) -> int:
        fd = os.open(self._segment(seq), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, _FORMAT_RECORD)
        except OSError:
            os.close(fd)
            _unlink(self._segment(seq))
            raise
        return fd

    # -- producers ---------------------------------------------------------------

    def append(self, operation: Operation) -> None:
        """Log ``operation``; it is durable when this returns."""
        try:
            record = encode(operation)
        except ValueError as exc:  # too big for one record
            raise PersistenceError(str(exc)) from exc
        with self._lock:  # a with block: an exception raised in a thread (async) cannot leak it
            if self._backlog >= self._max_backlog:
                self._wait_for_room()
            if self._refusal is not None:
                raise PersistenceError(self._refusal)
            fd = self._fd
            try:
                written = _write(fd, record)
            except OSError as exc:
                self._cut(fd, 0)
                raise PersistenceError(f"cannot write the journal {self._segment(self._seq)!r}: {exc}") from exc
            if written != len(record):
                self._cut(fd, written)
                raise PersistenceError(f"short write to the journal {self._segment(self._seq)!r} "
                                       f"({written} of {len(record)} bytes; disk full?)")
            self._operations.append(operation)
            self._backlog += 1
            if self._idle:
                self._idle = False
                self._wake.release()

    def _cut(self, fd: int, written: int) -> None:
        """Remove a partly written record, so that records after it stay readable."""
        try:
            os.ftruncate(fd, os.lseek(fd, 0, os.SEEK_END) - written)
        except OSError as exc:
            # Refuse writes until the flusher starts a fresh segment (recovery skips a torn tail).
            logger.exception("journal segment %s could not be repaired", self._segment(self._seq))
            self._damaged = True
            self._refusal = (f"the journal segment {self._segment(self._seq)!r} is damaged ({exc}) "
                             f"and is being replaced")
            self._wake_flusher()

    def _wake_flusher(self) -> None:
        """Called with _lock held."""
        if self._idle:
            self._idle = False
            self._wake.release()

    def _wait_for_room(self) -> None:
        """Called with _lock held: block until the flusher has applied part of the backlog."""
        self._wake_flusher()
        if not self._room.wait_for(lambda: self._backlog < self._max_backlog or self._closing,
                                   timeout=self._wait_timeout):
            reason = f"last error: {self.last_error}" if self.last_error else "the database is slow"
            raise PersistenceError(
                f"{self._backlog} journaled writes are waiting for the database, and none was "
                f"applied for {self._wait_timeout:g} s ({reason})"
            )

    # -- applying ------------------------------------------------------------------

    def flush(self) -> None:
        """Apply every operation appended before this call; raises if the database refuses them."""
        with self._flush_lock:
            if self._files_closed:
                raise PersistenceError("the journal is closed; its files are left for the next open to recover")
            self._flush_locked(final=False)

    def _flush_locked(self, final: bool) -> None:
        """Swap the current segment out (for good when ``final``) and apply every swapped-out one."""
        with self._lock:
            pending = final or bool(self._operations or self._damaged)
        swap_error: Optional[OSError] = None
        if pending:
            fd = -1
            if not final:
                try:  # outside _lock, so producers keep appending meanwhile
                    fd = self._open_segment(self._seq + 1)
                    self._segment_error_logged = False
                except OSError as exc:
                    if not self._segment_error_logged:  # once per outage
                        self._segment_error_logged = True
                        logger.exception("journal: cannot start a new segment; applying what is swapped out")
                    swap_error, pending = exc, False
        if pending:
            with self._lock:  # only _flush_lock holders change _seq
                full = self._fd
                self._unapplied.append((self._segment(self._seq), self._seq, self._operations))
                self._operations = []
                self._fd = fd
                self._seq += 1
                if self._damaged:
                    self._damaged = False
                    if not self._closing:
                        self._refusal = None
            _close(full)  # nobody writes to it any more: only its path is needed from here on
        if not self._unapplied:
            if swap_error is not None:
                raise PersistenceError(f"cannot start a new journal segment: {swap_error}") from swap_error
            return
        batch = [operation for _, _, operations in self._unapplied for operation in operations]
        try:
            if batch:
                self._apply(batch, self.token, self._unapplied[-1][1])
        except BaseException as exc:
            self.last_error = exc
            with self._lock:
                self._wake_flusher()  # a failed flush() from another thread: the flusher retries
            raise
        # Applied (and the watermark moved past them): never offer these again, whatever follows.
        done, self._unapplied = self._unapplied, []
        self.last_error = None
        with self._lock:
            self._backlog -= len(batch)
            self._room.notify_all()
        for path, _, _ in done:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError:  # recovery skips it by the watermark; log and go on
                logger.exception("journal: cannot remove the applied segment %s", path)
        if swap_error is not None:  # the current segment's writes are not in the table yet
            raise PersistenceError(f"cannot start a new journal segment: {swap_error}") from swap_error

    def _run(self) -> None:
        delay = 0.0
        while True:
            with self._lock:  # after a failure (delay > 0), retry even with nothing new
                idle = not (delay or self._operations or self._damaged or self._unapplied or self._closing)
                self._idle = idle
            if idle:
                self._wake.acquire()
            # Let a batch grow (fewer, larger transactions); back off after a failure.
            if self._stop.wait(delay or _LINGER):
                return  # closing: close() applies the rest itself
            try:
                self.flush()
                if delay:
                    logger.warning("journal: the database took the backlog again")
                delay = 0.0
            except Exception:
                if not delay:  # once per outage, not at every retry
                    logger.exception("journal: applying %d writes to the database failed; retrying "
                                     "until it works (they are safe in the journal)", self._backlog)
                delay = min(max(delay * 2, 0.01), 0.2)

    # -- lifecycle ------------------------------------------------------------------

    def close(self) -> None:
        """Apply the backlog, remove this journal's files, then forget its watermark.

        On failure the files stay and the lock is released: the next store to
        open the database recovers them. A second caller waits for the first,
        and gets its error.
        """
        with self._lock:
            first = not self._closing
            self._closing = True
            self._refusal = "the store is closed"
            self._room.notify_all()
            self._wake_flusher()
        if not first:
            self._closed.wait()
            if self._close_error is not None:
                raise PersistenceError(f"closing the journal failed: {self._close_error}") from self._close_error
            return
        try:
            self._stop.set()
            self._thread.join()
            with self._flush_lock:
                try:
                    self._flush_locked(final=True)
                finally:
                    self._files_closed = True
                    try:
                        if not self._unapplied:
                            _unlink(self._prefix + ".lock")
                    finally:
                        _close(self._lock_fd)  # releases the lock: a leftover journal is now an orphan
                        _live.discard(self)
            self._forget(self.token)
        except BaseException as exc:
            self._close_error = exc
            raise
        finally:
            self._closed.set()

    def abandon_after_fork(self) -> None:
        """In a forked child: let go of the parent's files without touching its journal or threads."""
        _close(self._lock_fd)
        _close(self._fd)
        self._closing = True
        self._files_closed = True
        self._refusal = "the journal belongs to the parent process"
        _live.discard(self)
        closed = getattr(self, "_closed", None)  # None while __init__ runs
        if closed is not None:
            closed.set()  # nothing to wait for in this process: close() returns at once
        if self._on_fork is not None:
            self._on_fork()


def live_on(db_path: str) -> List[Journal]:
    """The journals of this process that write to ``db_path``."""
    return [journal for journal in list(_live) if journal.db_path == db_path and not journal._closing]


def _close(fd: int) -> None:
    if fd < 0:
        return
    try:
        os.close(fd)
    except OSError:
        pass


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _close_all_at_exit() -> None:
    """A normal exit leaves every row in the table and no journal behind."""
    for journal in list(_live):
        try:
            journal.close()
        except Exception:
            logger.exception("journal: could not apply the backlog at exit; the next start recovers it")


atexit.register(_close_all_at_exit)
_exit_hook_pid = 0  # the process whose multiprocessing exit hook is registered


def _close_at_multiprocessing_exit() -> None:
    """A multiprocessing child ends with os._exit(), skipping atexit: close its journals in
    the exit hook multiprocessing runs instead (its registry is per process, so once per pid)."""
    global _exit_hook_pid
    util = sys.modules.get("multiprocessing.util")
    if util is None or _exit_hook_pid == os.getpid():
        return
    util.Finalize(None, _close_all_at_exit, exitpriority=0)  # type: ignore[attr-defined]
    _exit_hook_pid = os.getpid()


def _after_fork_in_child() -> None:
    for journal in list(_live):
        journal.abandon_after_fork()
    _live.clear()


if hasattr(os, "register_at_fork"):
    # A child holding the parent's lock descriptor would keep the parent's journal
    # from being recovered after the parent dies: close it at once, not on first use.
    os.register_at_fork(after_in_child=_after_fork_in_child)


# -- recovery ---------------------------------------------------------------------


class Orphan(NamedTuple):
    """The journal of a process that died, locked by the caller of ``orphans()``."""

    token: str
    lock_path: str
    lock_fd: int
    segments: List[Tuple[int, str]]  # (number, path), in order


def orphans(db_path: str) -> List[Orphan]:
    """Every journal of ``db_path`` whose process is gone, locked, oldest first.

    The locks stay held until ``remove``, so two processes never recover the
    same journal at once.
    """
    found: List[Tuple[float, Orphan]] = []
    if not SUPPORTED:
        return []
    for token, lock_path in _lock_files(db_path):
        try:
            fd = os.open(lock_path, os.O_RDWR)
        except FileNotFoundError:
            continue  # recovered and removed by someone else just now
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            mine = os.fstat(fd)
            named = os.stat(lock_path)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK, errno.ENOENT):
                continue  # its process is alive and owns it, or it was just removed
            raise
        if (mine.st_ino, mine.st_dev) != (named.st_ino, named.st_dev):
            os.close(fd)  # removed and replaced while we opened it: look again next time
            continue
        prefix = lock_path[: -len(".lock")]
        segments = []
        for path in glob.glob(glob.escape(prefix) + ".*.log"):
            number = path[len(prefix) + 1: -len(".log")]
            if number.isdigit():
                segments.append((int(number), path))
        found.append((named.st_mtime, Orphan(token, lock_path, fd, sorted(segments))))
    found.sort(key=lambda item: (item[0], item[1].token))
    return [orphan for _, orphan in found]


def _lock_files(db_path: str) -> List[Tuple[str, str]]:
    """``(token, lock file path)`` of every journal of ``db_path`` that has a lock file, live or not."""
    start = len(db_path) + len("-tinymq-")
    return [(path[start:-len(".lock")], path) for path in glob.glob(glob.escape(db_path) + "-tinymq-*.lock")]


def tokens(db_path: str) -> List[str]:
    """The tokens of every journal of ``db_path`` that still has its lock file, live or not."""
    return [token for token, _ in _lock_files(db_path)]


def remove(orphan: Orphan) -> None:
    """Delete a recovered journal's files (segments before the lock file) and release its lock."""
    for _, path in orphan.segments:
        _unlink(path)
    _unlink(orphan.lock_path)
    _close(orphan.lock_fd)


def release(orphan: Orphan) -> None:
    """Give up recovering ``orphan`` (keep its files) and release its lock."""
    _close(orphan.lock_fd)


def read_segment(path: str, row_length: int) -> List[Operation]:
    """Every valid record of one segment; a torn tail or a damaged record is logged and skipped.

    Raises PersistenceError for a segment of another format version: its
    records are kept on disk rather than misread.
    """
    with open(path, "rb") as f:
        data = f.read()
    operations: List[Operation] = []
    offset, end, first = 0, len(data), True
    while offset < end:
        if end - offset < _HEADER.size:
            logger.warning("journal %s: skipped a torn record at byte %d (a write cut by a crash)", path, offset)
            break
        length, crc = _HEADER.unpack_from(data, offset)
        body = data[offset + _HEADER.size: offset + _HEADER.size + length]
        if len(body) < length:
            logger.warning("journal %s: skipped a torn record at byte %d (a write cut by a crash)", path, offset)
            break
        offset += _HEADER.size + length
        value: Any = None
        if zlib.crc32(body) == crc:
            try:
                value = marshal.loads(body)
            except (ValueError, EOFError, TypeError):
                value = None
        if first:
            first = False
            if type(value) is tuple and len(value) == 2 and value[0] == FORMAT:
                if value[1] != VERSION:
                    raise PersistenceError(
                        f"journal segment {path!r} has format version {value[1]!r}; this tinymq "
                        f"reads version {VERSION}, so the segment was left in place"
                    )
                continue
            logger.error("journal %s: the segment's first record is damaged; reading on", path)
        operation = _checked(value, row_length)
        if operation is None:
            logger.error("journal %s: skipped a damaged record ending at byte %d", path, offset)
            continue
        operations.append(operation)
    return operations


def _checked(value: Any, row_length: int) -> Optional[Operation]:
    """``value`` if it is a well-formed operation of plain values, else None."""
    if type(value) is not tuple or len(value) != 2:
        return None
    kind, argument = value
    if kind in (RUNNING, DELETE):
        return value if type(argument) is str and argument and utf8(argument) else None
    if kind == SAVE:
        return value if _is_row(argument, row_length) else None
    if kind == SAVE_MANY:
        ok = type(argument) is tuple and all(_is_row(row, row_length) for row in argument)
        return value if ok else None
    return None


def _is_row(row: Any, row_length: int) -> bool:
    return (type(row) is tuple and len(row) == row_length and type(row[0]) is str and bool(row[0])
            and type(row[1]) is str and all(type(item) in _PLAIN for item in row)
            and all(-INT64 <= item < INT64 for item in row if type(item) is int)
            and all(utf8(item) for item in row if type(item) is str))

