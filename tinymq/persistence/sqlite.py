"""SQLitePersistence: the embedded durable store, plain SQLite through the standard library.

One row per job, keyed by its id, in a WAL-mode database. A row's ``state``
tells recovery what to do with it:

    ready    saved and waiting (``run_at`` in the future for a delayed job)
    running  an attempt started; still "running" at load time means the
             process died during the attempt: the crash is counted in
             ``crashes`` and the job runs again (one crash past
             ``max_crash_recoveries`` stays "running" until the queue has
             reported the job failed, "crashed", and marked it dead)
    dead     failed permanently; kept with ``reason`` until requeued or purged,
             or replaced by a new job of its id that the queue accepts
    corrupt  could not be decoded at load time; quarantined, never run

Every write is committed before the call returns. Writes from all threads go
through one connection and one commit lock, with group commit: a thread that
finds a commit under way queues its statements, and the next committer commits
everyone's in one transaction (if that fails, each caller's statements are
retried alone, so one bad write fails only its own call; if the committer is
interrupted, by a signal handler raising in the main thread, the others' units
go to the next committer: see _hand_back); under FULL a writer whose statements
another committed returns without taking the lock, and writers who saved in one
commit and are back at once with their next saves wait a little for each other,
to share the next commit too (see _write).

A file has one live owner (see ``_ownership.py``); ``read_only=True`` opens a
file for inspection without owning it, and writes nothing.
"""
import io
import itertools
import json
import logging
import operator
import os
import sqlite3
import struct
import sys
import threading
import time
import urllib.parse
import weakref
from collections import deque
from datetime import timedelta
from typing import Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence, Set, Tuple, TypeVar, Union

from .._sections import owned, refuse, section
from .._shield import shield
from ..config import RetryConfig, _count, _seconds
from ..errors import PersistenceError, _describe
from ..job import _DEFAULT_RETRY_CONFIG, Job, Priority, _as_priority, _as_tags, _utf8_text
from ..job import _is_utf8 as _storable  # (SQLite stores text as UTF-8)
from . import _ownership
from ._ownership import LOCK_SUFFIX, OwnedError
from ._protocol import Serializer
from .serializers import JSONSerializer, PickleSerializer

__all__ = ["SQLitePersistence", "DeadJob"]

logger = logging.getLogger("tinymq.persistence")
_T = TypeVar("_T")

_TABLE = "tinymq_jobs"
# The jobs table. What later versions add beside it, an older tinymq ignores, so it keeps
# version 1: the owner and settings tables (created when missing), the seq and crashes columns
# (added when missing).
_SCHEMA_VERSION = 1
# The columns that are NULL for most jobs come last, so a "lean" row can leave them out.
_COLUMNS = (
    "id", "state", "type", "priority", "run_at", "timestamp", "retries", "payload", "seq",
    "retry_config", "tags", "last_error", "reason",
)
_LEAN = 9  # a lean row's columns: the rest are NULL
_NULLS = (None,) * (len(_COLUMNS) - _LEAN)
_READ_COLUMNS = tuple(name for name in _COLUMNS if name != "seq")  # what a Job is made of
_CREATE = f"""
CREATE TABLE IF NOT EXISTS {_TABLE} (
    id           TEXT PRIMARY KEY NOT NULL,
    state        TEXT NOT NULL,      -- ready | running | dead | corrupt
    type         TEXT,
    priority     INTEGER,
    run_at       REAL,               -- Unix epoch seconds (wall clock)
    timestamp    REAL,
    retries      INTEGER,            -- failed attempts so far
    payload      BLOB,               -- serializer output, NULL for None
    retry_config TEXT,               -- JSON object of RetryConfig fields; NULL: RetryConfig()
    tags         TEXT,               -- JSON object, NULL when empty
    last_error   TEXT,
    reason       TEXT,               -- why dead or corrupt
    seq          INTEGER,            -- the order of saves: FIFO within a priority (NULL: saved before it existed)
    crashes      INTEGER             -- deaths of its process during its attempts (NULL: none): counted by load_all,
                                     -- kept by saves and give-backs, reset by requeue_dead
) WITHOUT ROWID
"""
# WITHOUT ROWID: the id is the key, so a save writes one b-tree instead of two.
# The columns of the first schema, which every tinymq wrote (later ones are added when missing).
_FIRST_COLUMNS = ("id", "state", "type", "priority", "run_at", "timestamp", "retries", "payload",
                  "retry_config", "tags", "last_error", "reason")

# The owner of the file (one row): see _ownership.py for why a lock file is not enough.
_OWNER = "tinymq_owner"
_CREATE_OWNER = f"""
CREATE TABLE IF NOT EXISTS {_OWNER} (
    slot    INTEGER PRIMARY KEY CHECK (slot = 0),
    pid     INTEGER NOT NULL,
    started TEXT,                    -- the process's start time (clock ticks since boot)
    host    TEXT NOT NULL,           -- host name and boot id
    lock    TEXT NOT NULL,           -- "st_dev:st_ino" of the lock file it holds
    since   REAL NOT NULL            -- Unix epoch seconds
)
"""

# What the file says about itself, one row per name. "serializer": the serializer its payloads are
# written with (see _serializer_name); a file of an older tinymq has none until a store owns it.
_SETTINGS = "tinymq_settings"
_CREATE_SETTINGS = f"""
CREATE TABLE IF NOT EXISTS {_SETTINGS} (
    name    TEXT PRIMARY KEY NOT NULL,
    value   TEXT NOT NULL
)
"""


def _give_back_sql() -> str:
    """The INSERT of a full row that keeps the seq of the row it replaces, whatever it is (NULL: a row
    an older tinymq saved), or takes a new one when there is none, and keeps its crashes."""
    values = ["?"] * len(_COLUMNS)
    values[_COLUMNS.index("seq")] = f"(SELECT CASE WHEN count(*) THEN max(seq) ELSE ? END FROM {_TABLE} WHERE id = ?)"
    values.append(f"(SELECT crashes FROM {_TABLE} WHERE id = ?)")
    return f"INSERT OR REPLACE INTO {_TABLE} ({', '.join(_COLUMNS)}, crashes) SELECT {', '.join(values)}"


def _insert(columns: int, rows: int = 1, verb: str = "INSERT OR REPLACE") -> str:
    values = ", ".join(["(" + ", ".join("?" * columns) + ")"] * rows)
    return f"{verb} INTO {_TABLE} ({', '.join(_COLUMNS[:columns])}) VALUES {values}"


# A save overwrites the row of an unfinished job (a retry's save), and leaves any other row of its
# id (a dead job's, a quarantined one's) for _save_over_kept_rows, which keeps it for undo_save.
# One statement still: what it left shows in its row count. (Upsert needs SQLite 3.24; before,
# INSERT OR IGNORE leaves every existing row to that slower path.)
_UPSERT_SUPPORTED = sqlite3.sqlite_version_info >= (3, 24)
_SAVES: Dict[str, int] = {}  # every save statement made -> the columns of each of its rows


def _save_sql(columns: int, rows: int = 1) -> str:
    """The INSERT of ``rows`` saves (lean or full), registered in _SAVES."""
    if not _UPSERT_SUPPORTED:
        sql = _insert(columns, rows, "INSERT OR IGNORE")
    else:
        updates = ", ".join(f"{name} = excluded.{name}" if index < columns else f"{name} = NULL"
                            for index, name in enumerate(_COLUMNS) if name != "id")
        sql = (_insert(columns, rows, "INSERT") +
               f" ON CONFLICT (id) DO UPDATE SET {updates} WHERE state IN ('ready', 'running')")
    _SAVES[sql] = columns
    return sql


def _same_save(stored: Any, seq: int) -> bool:
    """Whether a row's stored ``seq`` is that of the save numbered ``seq`` (an int: 5.0 is not 5)."""
    return stored.__class__ is int and stored == seq


_REPLACE_LEAN = _insert(_LEAN)  # mark_dead: whatever the row was
_REPLACE = _insert(len(_COLUMNS))
_SAVE_LEAN = _save_sql(_LEAN)
_SAVE = _save_sql(len(_COLUMNS))
_SELECT = f"SELECT {', '.join(_READ_COLUMNS)} FROM {_TABLE}"
_DELETE = f"DELETE FROM {_TABLE} WHERE id = ?"
_MARK_RUNNING = f"UPDATE {_TABLE} SET state = 'running' WHERE id = ?"
_MARK_DEAD_AS_SAVED = f"UPDATE {_TABLE} SET state = 'dead', reason = ?, last_error = ? WHERE id = ?"
_GIVE_BACK_AS_SAVED = f"UPDATE {_TABLE} SET state = 'ready' WHERE id = ?"
_GIVE_BACK = _give_back_sql()
_SEQ = _COLUMNS.index("seq")
_MERGED_DELETE = f"DELETE FROM {_TABLE} WHERE id IN ({{}})"
_MERGED_MARK_RUNNING = f"UPDATE {_TABLE} SET state = 'running' WHERE id IN ({{}})"
_MERGEABLE = (_SAVE_LEAN, _SAVE, _REPLACE_LEAN, _REPLACE, _DELETE, _MARK_RUNNING)
_SELECT_UNFINISHED = f"{_SELECT} WHERE state IN ('ready', 'running') ORDER BY timestamp"
_SELECT_DEAD = f"{_SELECT} WHERE state = 'dead' ORDER BY timestamp"
_SELECT_QUARANTINED = f"SELECT id, reason FROM {_TABLE} WHERE state = 'corrupt'"
# Rows per state, a ready row whose run_at is ahead (and not its creation time) as delayed.
_COUNT_STATES = (f"SELECT CASE WHEN state = 'ready' AND run_at > ? AND run_at <> timestamp "
                 f"THEN 'delayed' ELSE state END, count(*) FROM {_TABLE} GROUP BY 1")
_SELECT_ROWS = f"SELECT {', '.join(_COLUMNS)} FROM {_TABLE} WHERE id IN ({{}})"
_SYNCHRONOUS_MODES = ("NORMAL", "FULL")
# Rows per multi-row INSERT of save_many: powers of two, halving down to 1 for the rest of
# a batch, so a dozen statements serve every batch size from the statement cache. Stay
# under SQLite's bound-variable limit (32766; 999 before 3.32).
_ROWS_PER_INSERT = 512 if sqlite3.sqlite_version_info >= (3, 32) else 64
# Seconds between looks by path at whether our database or -wal was removed or replaced under us
# (see _look_at_files): a commit in that time after it is acknowledged unchecked.
_WAL_CHECK_INTERVAL = 0.05
_SIDE_FILES = ("-wal", "-shm", "-journal")  # what SQLite reads beside a database, besides our lock
_READ_ONLY_SETTLE = 0.5  # seconds a read-only look tries again while an owner opens or closes the file
_WAL_HEADER = 32  # bytes of a -wal's header (SQLite's WAL format): its frames, the commits, follow it
_WAL_MAGIC = 0x377F0682  # a -wal header's first word (its low bit: the byte order of its checksums)
_DEFAULT_MAX_LENGTH = 1_000_000_000  # SQLITE_MAX_LENGTH's default, where getlimit() is missing
_ROW_OVERHEAD = 512  # bytes a row's header and numbers may add to its text and blobs
_INT64 = 1 << 63
_MAX_BUSY_TIMEOUT = ((1 << 31) - 1) / 1000  # seconds: sqlite3_busy_timeout() takes a C int of milliseconds
_SEQ_LIMIT = 1 << 62  # the seq a store starts counting from is below this
_RETRY_FIELDS = ("max_retries", "initial_delay", "max_delay", "backoff_multiple", "jitter")
_CACHE_LIMIT = 256  # retry configs remembered by identity / by text
_STATEMENT_CACHE = 512  # prepared statements per connection: merged ones come in many sizes
# WAL pages between checkpoints, by synchronous mode. NORMAL: about 10 MiB of WAL with 1 KiB pages, as a
# checkpoint is then the only fsync (two). FULL: SQLite's 1,000, as every commit already waits for an
# fsync, which costs more while it appends to a growing -wal (the filesystem commits the file's new size
# too: on ext4 here, a median 1.6-1.9x the wait of one that overwrites earlier frames in place), and a -wal
# reused after ~1 MiB grows for the first ~400 single-job commits after an open, not ~4,000.
_CHECKPOINT_PAGES = {"NORMAL": 10_000, "FULL": 1_000}
# A commit that took longer counts as this long in the moving average of a commit's time (see
# _shared): a process stopped during it (Ctrl-Z, a debugger) or a disk that stalled once says nothing
# of the next commits, and savers wait for each other for at most twice that average.
_LONGEST_COMMIT = 0.1
_MAX_MERGED_ROWS = 256  # rows per merged statement, well under the bound-variable limit
_PICKLE_PROTOCOL_OPCODE = b"\x80"  # how a pickle of protocol 2 or later begins

Statement = Tuple[str, Any]  # (sql, parameters)


class DeadJob(NamedTuple):
    """A job kept after failing permanently, as ``SQLitePersistence.dead_jobs()`` lists it."""

    job: Job
    reason: str  # retries_exhausted | no_executor | evicted | cancelled | permanent_failure | crashed
    error: Optional[str]


class _Unit:
    """Statements one caller needs committed together, and how that went."""

    __slots__ = ("statements", "done", "error", "waker", "leads", "thread")

    def __init__(self, statements: List[Statement]) -> None:
        self.statements = statements
        self.thread = 0  # its writer's ident, under FULL only (see _waits_here)
        self.done = False  # committed
        self.error: Optional[BaseException] = None
        self.waker: Optional[threading.Lock] = None  # a follower's, held until its batch is over or it leads
        self.leads = False  # its writer was handed the lead (by a leader interrupted before its batch)




def _saves(statements: List[Statement]) -> bool:
    """Whether a unit's statements save jobs (save, save_many), as an enqueue's do."""
    return bool(statements) and statements[0][0] in _SAVES


def _dead_job_ids(ids: Iterable[str]) -> List[str]:
    """The ``ids`` given to ``requeue_dead`` or ``purge_dead`` (not None) as a list, or a TypeError naming
    the bad value (RedisBroker's too: a bad argument, not a store failure)."""
    if isinstance(ids, str):
        raise TypeError(f"ids must be an iterable of job ids, not one str: {ids!r} (for one job: [{ids!r}])")
    if isinstance(ids, (bytes, bytearray)):
        raise TypeError(f"ids must be an iterable of job ids, not one {type(ids).__name__}: {ids!r}")
    try:
        each = iter(ids)
    except TypeError:
        raise TypeError(f"ids must be an iterable of job ids, got {ids!r}") from None
    chosen = list(each)
    for job_id in chosen:
        if not isinstance(job_id, str):
            raise TypeError(f"job ids must be str, got {job_id!r}")
    return chosen


def _check_id(job_id: object) -> None:
    if type(job_id) is not str or not job_id or not _storable(job_id):
        raise PersistenceError(f"a job id must be a non-empty str SQLite can store, got {job_id!r}")


def _error_text(error: object) -> Optional[str]:
    if error is None or isinstance(error, str):
        return error
    if isinstance(error, BaseException):
        return _describe(error)
    return str(error)


def _utf8_length(value: Union[str, bytes, None]) -> int:
    if value is None:
        return 0
    if type(value) is str:
        return len(value) if value.isascii() else len(value.encode("utf-8"))
    return len(value)


_live_stores: "weakref.WeakSet[SQLitePersistence]" = weakref.WeakSet()
# Connections a forked child inherited: referenced forever, so the child never closes them.
_inherited: List[sqlite3.Connection] = []


def _after_fork_in_child() -> None:
    for store in list(_live_stores):
        store._inherited_by_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _valid_wal_header(header: bytes) -> bool:
    """Whether SQLite would read the frames after this -wal header (else it ignores them all).

    Its recovery (walIndexRecover in SQLite's wal.c) ignores a -wal whose magic
    number, page size or header checksum is wrong: the checksum is SQLite's
    Fibonacci-weighted sum of the first six 32-bit words, read in the byte
    order the magic number's low bit names, stored big-endian after them.
    """
    magic, _, page_size = struct.unpack(">III", header[:12])
    if magic & ~1 != _WAL_MAGIC or page_size & (page_size - 1) or not 512 <= page_size <= 65536:
        return False
    words = struct.unpack(">6I" if magic & 1 else "<6I", header[:24])
    first = second = 0
    for i in range(0, 6, 2):
        first = (first + words[i] + second) & 0xFFFFFFFF
        second = (second + words[i + 1] + first) & 0xFFFFFFFF
    return struct.unpack(">II", header[24:32]) == (first, second)


def _serializer_name(serializer: object) -> str:
    """How a file records the serializer that writes its payloads: its class's module and qualified name."""
    return _class_name(type(serializer))


def _class_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _written_with(payload: object) -> Optional[str]:
    """The built-in serializer a stored payload looks written with (never unpickled to tell), or None."""
    if isinstance(payload, bytes) and payload[:1] == _PICKLE_PROTOCOL_OPCODE:
        return _class_name(PickleSerializer)
    try:
        json.loads(payload)  # type: ignore[arg-type]  # (a str or bytes: what sqlite3 returns)
    except Exception:  # (RecursionError too: a guess only)
        return None
    return _class_name(JSONSerializer)


def _checkpointed(conn: sqlite3.Connection, mode: str) -> bool:
    """Whether ``PRAGMA wal_checkpoint(mode)`` copied every frame of the WAL into the database file."""
    busy, frames, copied = conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
    return not busy and frames == copied


def _release(held: List[Any], pid: int) -> None:
    """Give up ownership (close() or garbage collection), in the process that took it only; called again
    (after an interruption, say), it finishes what is left. ``held``: the database file's identity
    (changed by _rescue_database), and the lock file open (an io.FileIO: closing it releases the lock)."""
    if os.getpid() != pid or held[1].closed:
        return
    _ownership.unregister(held[0])  # (done again, harmless: nobody registers it while we hold the lock)
    try:
        held[1].close()
    except OSError:
        pass


class SQLitePersistence:
    """A durable job store in one SQLite file, owned by one live store at a time.

    ``synchronous="NORMAL"`` (the default) survives a crash of the process: a
    write is committed to the WAL when the call returns. ``"FULL"`` also
    survives power loss, at an fsync per commit, shared by concurrent
    producers through group commit.

    Opening a file that a live store owns, in this process or another, raises
    PersistenceError naming the owner's pid; a file whose owner exited or died
    is taken over (``load_all`` then brings its running jobs back, each crash
    counted: a job whose process died during more than ``max_crash_recoveries``
    of its attempts fails, "crashed"). ``claim("jobs-{}.db", slots=8)`` opens the first free one of
    several files. ``read_only=True`` inspects a file at any time, owned or
    not, without taking ownership or writing anything.

    The database and the files beside it (``-wal``, ``-shm``, ``-tinymq.lock``)
    are mode 0600; a symlink or another user's file is refused. Keep the file
    on a local filesystem (ownership relies on ``flock()`` and process ids).

    ``serializer`` turns payloads into stored bytes/text (JSON by default;
    see ``PickleSerializer`` for the opt-in alternative). The file records
    which one (by its class's module and qualified name): a store given another one
    is refused while the file holds a job, before it reads or changes anything.
    """

    _checks_serializer = True  # False: a store that writes no payload (the commands) opens any file

    def __init__(
        self,
        path: Union[str, bytes, "os.PathLike[str]", "os.PathLike[bytes]"],
        *,
        synchronous: str = "NORMAL",
        serializer: Optional[Serializer] = None,
        busy_timeout: Union[float, timedelta] = 5.0,
        read_only: bool = False,
        max_crash_recoveries: int = 3,
    ) -> None:
        if not isinstance(synchronous, str) or synchronous.upper() not in _SYNCHRONOUS_MODES:
            raise ValueError(f"synchronous must be one of {_SYNCHRONOUS_MODES}, got {synchronous!r}")
        busy_seconds = _seconds("busy_timeout", busy_timeout)  # a timedelta too, as every duration
        if busy_seconds > _MAX_BUSY_TIMEOUT:  # sqlite3 would wrap it around to "never wait"
            raise ValueError(f"busy_timeout must be at most {_MAX_BUSY_TIMEOUT} seconds (SQLite takes "
                             f"whole milliseconds as a C int), got {busy_timeout!r}")
        if not isinstance(read_only, bool):
            raise TypeError(f"read_only must be True or False, got {read_only!r}")
        if serializer is None:
            serializer = JSONSerializer()
        elif isinstance(serializer, type):  # its methods would take each payload as self
            raise TypeError(f"serializer must be an instance, such as {serializer.__name__}(), "
                            f"not the class {serializer!r}")
        elif not (callable(getattr(serializer, "dumps", None)) and callable(getattr(serializer, "loads", None))):
            raise TypeError(f"serializer must have dumps() and loads(), got {serializer!r}")
        try:
            name = os.fspath(path)
        except TypeError:
            raise TypeError(f"path must be a str, bytes or os.PathLike, got {path!r}") from None
        if isinstance(name, bytes):
            name = os.fsdecode(name)  # as open() takes it: bytes no encoding decodes survive (see _connect)
        # "jobs/" or "jobs/.." names a directory: never a file made under another name.
        if not name or name == ":memory:" or "\x00" in name or os.path.basename(name) in ("", ".", ".."):
            raise ValueError(f"path must name a file, got {path!r}")
        self.path = name
        self.synchronous = synchronous.upper()
        self.read_only = read_only
        self.serializer = serializer
        self.busy_timeout = busy_seconds
        self.max_crash_recoveries = int(_count("max_crash_recoveries", max_crash_recoveries, 0))
        self._dumps = serializer.dumps
        self._serializer_name = _serializer_name(serializer)
        self._file = os.path.abspath(self.path)  # a chdir() later does not move the store
        self._tags_json = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
        self._retry_json: Dict[int, Tuple[RetryConfig, str]] = {}  # id(config) -> (config, json)
        self._retry_configs: Dict[Optional[str], RetryConfig] = {}  # json -> config, for loading
        self._insert_sql: Dict[Tuple[int, int], str] = {}  # (columns, rows) -> multi-row INSERT
        self._merged_sql: Dict[Tuple[str, int], str] = {}  # (single-row statement, rows) -> merged
        self._closed = False
        self._broken: Optional[str] = None  # why nothing more is acknowledged (the database was removed)
        # id -> (seq of the save, the row it replaced): a dead or quarantined row a save replaced, for
        # undo_save. Added by the holder of _commit_lock, before that save's COMMIT (see
        # _save_over_kept_rows); dropped (one dict call) when the job ends.
        self._replaced: Dict[str, Tuple[Any, Tuple[Any, ...]]] = {}
        self._crashed: List[Job] = []  # crashed too often, found by load_all, not yet taken by the Queue
        self._pid = os.getpid()
        self._seq = itertools.count(1).__next__  # each row's place in the order of saves (see _prepare)
        if read_only:
            refusal = self._reading(self._check_schema)  # fail now if it cannot be read
            if refusal is not None:
                raise refusal
            return
        # Invariant: only the holder of _commit_lock uses _conn and _cursor. It and _gate are RLocks:
        # a call into the store from code the garbage collector runs inside one of their sections on
        # the same thread is refused (see tinymq/_sections.py), not left waiting for its own thread.
        # Taken with section(), except in _write and the calls it makes, which refuses it as it
        # enters, before it does anything (the lock per write is all the per-job cost).
        self._commit_lock = threading.RLock()
        self._hand_off = self.synchronous == "FULL"  # writers that meet wait on locks of their own (_write)
        self._gate = threading.RLock()  # guards _pending and _leader
        self._pending: "deque[_Unit]" = deque()  # units waiting for the next committer
        self._leader: Optional[_Unit] = None  # the unit whose writer commits the pending ones next
        self._returning = 0  # under FULL: writers who saved in the last batch, not back yet (see _back)
        self._gathering: Optional[_Unit] = None  # the leader, while it waits for them
        self._released_at = 0.0  # time.monotonic() when the last batch was committed
        self._back_by = 0.0  # ... and by when its writers count as returning
        self._commit_time = 0.0  # seconds a commit takes (a moving average)
        self._return_time = 0.0  # seconds the writers of a batch take to be back, all of them (a moving average)
        self._owner_row_in_wal_only = False  # a reader kept the open's checkpoint from copying it (_take_over)
        self._conn, lock_fd, self._key = self._open_owned()
        # (for _release: what is owned now) The lock file is held open as a file object: closed once,
        # however often its close() is called, where a descriptor's number may be another file's by then.
        self._held: List[Any] = [self._key, io.FileIO(lock_fd, "r")]
        self._cursor = self._conn.cursor()
        self._wal_path = self._file + "-wal"
        self._wal = _ownership.identity(self._wal_path)  # the -wal our connection writes
        self._shm = _ownership.identity(self._file + "-shm")  # and its index
        self._next_wal_check = 0.0  # time.monotonic() of the next look by path (see _look_at_files)
        if sys.version_info >= (3, 11) and hasattr(self._conn, "getlimit"):
            self._max_length = self._conn.getlimit(sqlite3.SQLITE_LIMIT_LENGTH)
        else:
            self._max_length = _DEFAULT_MAX_LENGTH
        weakref.finalize(self, _release, self._held, self._pid)
        _live_stores.add(self)

    @classmethod
    def claim(cls, pattern: Union[str, bytes, "os.PathLike[str]", "os.PathLike[bytes]"], slots: int = 8,
              **kwargs: Any) -> "SQLitePersistence":
        """Open the first of ``pattern.format(0)`` .. ``pattern.format(slots - 1)`` no live store owns.

        For several processes of one app: each claims a file of its own, and a
        restarted process takes over the file (and the jobs) of one that died.
        Raises PersistenceError when every slot is owned.
        """
        try:
            template = os.fspath(pattern)
        except TypeError:
            raise TypeError(f"pattern must be a str or os.PathLike with '{{}}' for the slot number, "
                            f"got {pattern!r}") from None
        if isinstance(template, bytes):
            template = os.fsdecode(template)
        try:  # "{}{}" or "{name}" would fail in the loop; "{{}}" would give every slot one file
            distinct = template.format(0) != template.format(1)
        except (IndexError, KeyError, ValueError, AttributeError):
            distinct = False
        if not distinct:
            raise ValueError(f"pattern must have one '{{}}' for the slot number, got {pattern!r}")
        if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
            raise ValueError(f"slots must be an int >= 1, got {slots!r}")
        if kwargs.get("read_only"):
            raise ValueError("claim() takes ownership: open a file with read_only=True directly")
        owners = []
        for slot in range(slots):
            try:
                return cls(template.format(slot), **kwargs)
            except OwnedError as exc:
                owners.append(exc.pid)
        raise PersistenceError(f"every one of the {slots} slots of {pattern!r} is owned by a live store "
                               f"(pids {', '.join(str(pid) for pid in owners)})")

    # -- opening: ownership, files, connection ----------------------------------

    def _open_owned(self) -> Tuple[sqlite3.Connection, int, Tuple[int, int]]:
        """Lock, check and open the file, and record this process as its owner; all or nothing."""
        db = self._file
        found = _ownership.check_file(db, mode="keep")  # a look, changing nothing: not ours yet
        if found is not None:
            _ownership.owned_here((found.st_dev, found.st_ino), self.path)
            self._refuse_second_name(found)
        lock_fd, lock_held = _ownership.lock(db + LOCK_SUFFIX)
        checked: List[Tuple[str, Optional[os.stat_result]]] = []  # each file as found: a refusal puts its mode back
        try:
            found = _ownership.check_file(db, mode="tighten")
            checked.append((db, found))
            if found is not None:
                self._refuse_second_name(found)
            # A -journal too: SQLite rolls a hot one back into the database when it opens it.
            beside = []
            for suffix in _SIDE_FILES:
                beside.append(_ownership.check_file(db + suffix, mode="tighten", side=True))
                checked.append((db + suffix, beside[-1]))
            made_database = found is None
            if found is None:
                if any(beside):
                    beside = self._drop_orphans(beside)
                found = _ownership.create_private(db)
            key = (found.st_dev, found.st_ino)
            made = self._make_side_files(beside)
            _ownership.register(key, self.path)
            try:
                conn = self._connect("mode=rw")
                try:
                    again = _ownership.check_file(db, mode="keep")
                    if again is None or (again.st_dev, again.st_ino) != key:
                        raise PersistenceError(f"{db!r} was replaced while it was being opened")
                    self._prepare(conn)
                    self._drop_empty(made, ("-journal",))
                    lock_stat = os.fstat(lock_fd)
                    self._take_over(conn, f"{lock_stat.st_dev}:{lock_stat.st_ino}")
                except BaseException:
                    conn.close()
                    raise
            except BaseException:
                _ownership.unregister(key)
                self._drop_empty(made, _SIDE_FILES)
                if made_database and _ownership.identity(db) == key:  # (a refused open leaves nothing it made)
                    try:
                        os.unlink(db)
                    except OSError:
                        pass
                raise
        except BaseException:
            _ownership.loosen_again(checked)  # a file refused is left as it was: another program's, its mode too
            if lock_held is None:  # made by this open: removed
                _ownership.discard(db + LOCK_SUFFIX, lock_fd)
            else:  # found: it names its last owner again
                _ownership.give_back(lock_fd, lock_held)
            raise
        return conn, lock_fd, key

    def _refuse_second_name(self, found: os.stat_result) -> None:
        """PersistenceError if the database has another name (a hard link): its lock file and its -wal
        are named after the name it is opened by, so two stores opened by two names would both own it,
        each committing to a -wal of its own that the other never reads."""
        if found.st_nlink > 1:
            raise PersistenceError(f"{self.path!r} has {found.st_nlink} names (hard links): refused, as SQLite "
                                   "advises: its lock file and -wal go by the name it is opened by, so stores "
                                   "opened by two names would both own it and lose each other's commits; "
                                   "remove the other names")

    def _drop_orphans(self, found: Sequence[Optional[os.stat_result]]) -> List[Optional[os.stat_result]]:
        """Remove the side files of a database that does not exist, if they hold nothing (else refuse).

        An empty -wal, or one with a valid header alone, holds no commit; an
        empty -journal nothing to roll back; a -shm only indexes the -wal. They
        are what a store leaves beside a database removed under it if it is
        killed as it removes them (or what an older tinymq left). Anything else
        may be all that is left of a database moved away, or not SQLite's at
        all: kept, and refused. Caller holds the lock file.
        """
        wal, _, journal = found
        if not ((wal is None or self._holds_no_commit(wal)) and (journal is None or journal.st_size == 0)):
            raise PersistenceError(f"{self._file!r} does not exist but its -wal, -shm or -journal file does: "
                                   "refused (they belong to another database); remove them")
        for suffix, st in zip(_SIDE_FILES, found):
            if st is not None and _ownership.identity(self._file + suffix) == (st.st_dev, st.st_ino):
                try:
                    os.unlink(self._file + suffix)
                except OSError as exc:
                    raise PersistenceError(f"{self._file!r} does not exist and its {suffix} file cannot be "
                                           f"removed: {exc}") from exc
        return [None for _ in found]  # (none is there now)

    def _holds_no_commit(self, wal: os.stat_result) -> bool:
        """Whether the -wal ``check_file`` found is empty, or SQLite's header of one and nothing else."""
        if wal.st_size == 0:
            return True
        if wal.st_size != _WAL_HEADER:
            return False
        header = _ownership.head(self._file + "-wal", wal, _WAL_HEADER + 1)
        return header is not None and len(header) == _WAL_HEADER and _valid_wal_header(header)

    def _make_side_files(self, found: Sequence[Optional[os.stat_result]]) -> Dict[str, os.stat_result]:
        """Create, empty and 0600, each side file that was not there (O_EXCL): the one SQLite opens is ours.

        Checking them is not enough: in a directory others may write (/tmp),
        another user could create one between the check and SQLite's open (a
        hot -journal is rolled back into the database). An empty -journal is
        never hot; it is removed once the connection reads the file in WAL mode
        (from then on SQLite never looks for one). Caller holds the lock file.
        """
        made = {}
        for suffix, st in zip(_SIDE_FILES, found):
            if st is None:
                made[suffix] = _ownership.create_private(self._file + suffix)
        return made

    def _drop_empty(self, made: Dict[str, os.stat_result], suffixes: Sequence[str]) -> None:
        """Remove the side files we made that are still ours and empty."""
        for suffix in suffixes:
            st = made.get(suffix)
            if st is not None and _ownership.identity(self._file + suffix) == (st.st_dev, st.st_ino):
                try:
                    if os.lstat(self._file + suffix).st_size == 0:
                        os.unlink(self._file + suffix)
                except OSError:
                    pass

    def _connect(self, mode: str) -> sqlite3.Connection:
        # The name's bytes, each escaped as needed: a name that is not valid UTF-8 opens the same file.
        uri = f"file:{urllib.parse.quote(os.fsencode(self._file))}?{mode}"
        try:
            return sqlite3.connect(
                uri, uri=True, timeout=self.busy_timeout,
                isolation_level=None,  # autocommit; group commits issue BEGIN/COMMIT themselves
                check_same_thread=False,  # guarded by _commit_lock instead
                cached_statements=_STATEMENT_CACHE,
            )
        except sqlite3.Error as exc:
            raise PersistenceError(f"cannot open persistence file {self.path!r}: {exc}") from exc

    def _prepare(self, conn: sqlite3.Connection) -> None:
        try:
            # A look before any write: a file refused here is left as it was (its journal mode too).
            names = [row[0] for row in conn.execute("SELECT name FROM sqlite_master")]
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if names and _TABLE not in names:  # another program's database: not ours to change
                raise PersistenceError(f"{self.path!r} is not a tinymq store: it is an SQLite database that holds "
                                       f"{', '.join(map(repr, names[:3]))}{' ...' if len(names) > 3 else ''} and no "
                                       f"{_TABLE} table; refused, and left as it was (a store needs a file of its own)")
            if version > _SCHEMA_VERSION:
                raise self._newer_schema(version)
            if names:
                self._check_columns(conn)
            refusal = self._serializer_refusal(conn)
            if refusal is not None:  # each row would be quarantined as corrupt at load_all
                raise refusal
            # Rows are small: 1 KiB pages make each commit append a quarter of the WAL
            # bytes of the default 4 KiB (ignored for an existing file).
            conn.execute("PRAGMA page_size=1024")
            conn.execute("PRAGMA journal_mode=WAL")
            # A checkpoint (two fsyncs) every _CHECKPOINT_PAGES pages of WAL: see there.
            conn.execute(f"PRAGMA wal_autocheckpoint={_CHECKPOINT_PAGES[self.synchronous]}")
            # A -wal that one large write grew (an enqueue_many of many jobs) is cut back to twice that
            # as it is written again from its start: else it keeps that size until the store is closed.
            page_size = conn.execute("PRAGMA page_size").fetchone()[0]
            conn.execute(f"PRAGMA journal_size_limit={2 * _CHECKPOINT_PAGES[self.synchronous] * page_size}")
            conn.execute(f"PRAGMA synchronous={self.synchronous}")
            conn.execute(_CREATE)
            conn.execute(_CREATE_OWNER)
            conn.execute(_CREATE_SETTINGS)
            columns = {row[1] for row in conn.execute(f"PRAGMA table_info({_TABLE})")}
            for added in ("seq", "crashes"):  # a file of an older tinymq
                if added not in columns:
                    conn.execute(f"ALTER TABLE {_TABLE} ADD COLUMN {added} INTEGER")
            # (A seq that is no int, or that leaves no room to count on, was not written by
            # this store: it only moves its row to the end of the order.)
            last = conn.execute(f"SELECT max(seq) FROM {_TABLE} WHERE typeof(seq) = 'integer' "
                                f"AND seq < {_SEQ_LIMIT}").fetchone()[0]
            self._seq = itertools.count((last or 0) + 1).__next__
            if version == 0:
                conn.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")
        except sqlite3.Error as exc:
            raise PersistenceError(f"cannot open persistence file {self.path!r}: {exc}") from exc

    def _take_over(self, conn: sqlite3.Connection, lock_id: str) -> None:
        """Record this process as the owner (and its serializer), unless a live owner of another lock
        file is recorded.

        We hold the lock file, so a recorded owner of *this* lock file is gone.
        A recorded owner of another one had its lock file deleted under it:
        refuse while it lives.
        """
        pid, started, host = _ownership.this_process()

        def claim(conn: sqlite3.Connection) -> None:
            row = conn.execute(f"SELECT pid, started, host, lock FROM {_OWNER}").fetchone()
            if row is not None and row[3] != lock_id and _ownership.is_alive(row[0], row[1], row[2]):
                raise OwnedError(self.path, row[0], ", whose lock file was removed or replaced")
            conn.execute(f"INSERT OR REPLACE INTO {_OWNER} VALUES (0, ?, ?, ?, ?, ?)",
                         (pid, started, host, lock_id, time.time()))
            if self._checks_serializer:  # (_prepare refused a file of another one that holds a job: the
                # record is ours, or the file is new, an older tinymq's (its rows taken as written with ours,
                # as it did), or one with no job)
                conn.execute(f"INSERT OR REPLACE INTO {_SETTINGS} VALUES ('serializer', ?)", (self._serializer_name,))

        self._in_transaction(conn, claim, "taking ownership")
        try:  # into the database file itself: the owner row must outlive a removed -wal. (FULL: a reader
            # of an older state, whose frames a checkpoint cannot copy, is waited for up to busy_timeout.)
            self._owner_row_in_wal_only = not _checkpointed(conn, "FULL")
        except sqlite3.Error as exc:
            raise PersistenceError(f"cannot open persistence file {self.path!r}: {exc}") from exc

    def _reading(self, work: Callable[[sqlite3.Connection], _T]) -> _T:
        """``work(conn)`` on a read-only connection, looked at again for a moment if it fails.

        An owner opening or closing the file passes through states a look can
        fall into (SQLite removes the -shm, then the -wal; files appear one by
        one): they last microseconds. What a crash left stays, and is refused
        once _READ_ONLY_SETTLE has passed. A read of the database file alone
        counts only if no owner began writing during it (see _unwritten).
        """
        deadline = time.monotonic() + _READ_ONLY_SETTLE
        while True:
            try:
                conn, unwritten = self._read_only_connection()
                try:
                    result = work(conn)
                finally:
                    conn.close()
                if unwritten is None or self._unwritten() == unwritten:
                    return result
                if time.monotonic() >= deadline:
                    raise PersistenceError(f"cannot read {self.path!r} read-only: an owner began writing "
                                           "it during each look at the database file alone")
            except PersistenceError:
                if time.monotonic() >= deadline or not os.path.lexists(self._file):
                    raise
            time.sleep(0.005)

    def _read_only_connection(self) -> Tuple[sqlite3.Connection, Optional[Tuple[Any, ...]]]:
        """A connection that can neither write nor create anything, opened for one inspection,
        and what ``_unwritten()`` must still say after the read when it reads the database alone.

        A WAL reader needs the -shm index: with both -wal and -shm present it
        uses them read-only (``readonly_shm``), so it works while another
        process owns and writes the file, and in a read-only directory. With
        no -wal, or one without a frame, the database file alone is the whole
        content (``immutable``: no lock, no -shm).
        """
        unwritten = self._unwritten()
        shm, _ = (_ownership.check_file(self._file + suffix, mode="refuse", side=True)
                  for suffix in ("-shm", "-journal"))
        if unwritten is not None:
            return self._connect("mode=ro&immutable=1"), unwritten
        if shm is None:
            raise PersistenceError(f"cannot open {self.path!r} read-only: its -wal has no -shm "
                                   "beside it (reading it would create one); open it for writing "
                                   "once to recover it")
        return self._connect("mode=ro&readonly_shm=1"), None

    def _unwritten(self) -> Optional[Tuple[Any, ...]]:
        """The database's and -wal's state when the -wal holds no commit, else None.

        No -wal, one no longer than its header (an owner killed as it began
        it), or one whose header SQLite would ignore (garbage: see
        _valid_wal_header) holds no commit: the database file alone is the content. SQLite
        cannot read a header-only -wal read-only: the index it rebuilds in
        memory lacks the header's salts, so every look fails, up to "locking
        protocol". An owner that starts writing changes this state (a -wal
        appears, or gets a new header and frames) before it writes the database
        file (a checkpoint, which changes its size or mtime): a read of the
        database alone holds if this is the same after it. The -wal is read,
        never the database, through a descriptor of our own (see _ownership.head).
        """
        db = _ownership.check_file(self._file, mode="refuse")
        if db is None:
            raise PersistenceError(f"cannot open {self.path!r} read-only: it does not exist")
        wal_path = self._file + "-wal"
        wal = _ownership.check_file(wal_path, mode="refuse", side=True)
        database = (db.st_dev, db.st_ino, db.st_size, db.st_mtime_ns)
        if wal is None:
            return database, None
        header = _ownership.head(wal_path, wal, _WAL_HEADER + 1)
        if header is None or (len(header) > _WAL_HEADER and _valid_wal_header(header)):
            return None  # frames after a header SQLite reads (or replaced since the look): the WAL way
        return database, (wal.st_dev, wal.st_ino, wal.st_size, wal.st_mtime_ns, header)

    def _check_schema(self, conn: sqlite3.Connection) -> Optional[PersistenceError]:
        """PersistenceError if ``conn`` is no store this one reads; else ``_serializer_refusal(conn)``."""
        try:
            found = conn.execute("SELECT count(*) FROM sqlite_master WHERE name = ?", (_TABLE,)).fetchone()[0]
            version = conn.execute("PRAGMA user_version").fetchone()[0]
        except sqlite3.Error as exc:
            raise PersistenceError(f"cannot read {self.path!r}: {exc}") from exc
        if not found:
            raise PersistenceError(f"{self.path!r} is not a tinymq store (no {_TABLE} table)")
        if version > _SCHEMA_VERSION:  # as the owner refuses it: its rows may mean other things
            raise self._newer_schema(version)
        try:
            self._check_columns(conn)
            return self._serializer_refusal(conn)
        except sqlite3.Error as exc:
            raise PersistenceError(f"cannot read {self.path!r}: {exc}") from exc

    def _check_columns(self, conn: sqlite3.Connection) -> None:
        """PersistenceError if the file's jobs table lacks a column every tinymq wrote (another
        program's table of that name): its first read would fail with "no such column"."""
        columns = [row[1] for row in conn.execute(f"PRAGMA table_info({_TABLE})")]
        missing = [column for column in _FIRST_COLUMNS if column not in columns]
        if missing:
            raise PersistenceError(f"{self.path!r} is not a tinymq store: its {_TABLE} table has no "
                                   f"{', '.join(missing)} column{'s' if len(missing) > 1 else ''} (another "
                                   "program's table of that name?); refused, and left as it was")

    def _serializer_refusal(self, conn: sqlite3.Connection) -> Optional[PersistenceError]:
        """Why this store's serializer would misread the file's rows, or None. Reads, changes nothing.

        The file records another serializer and holds a job row; or it records
        none (an older tinymq's) and its first row with a payload does not
        decode with ours. A new file, or one with no row, can be written with any.
        """
        if not self._checks_serializer:
            return None
        recorded = None
        if conn.execute("SELECT count(*) FROM sqlite_master WHERE name = ?", (_SETTINGS,)).fetchone()[0]:
            recorded = conn.execute(f"SELECT value FROM {_SETTINGS} WHERE name = 'serializer'").fetchone()
        if recorded is not None:
            if recorded[0] == self._serializer_name or not conn.execute(
                    f"SELECT EXISTS (SELECT 1 FROM {_TABLE})").fetchone()[0]:
                return None
            return self._other_serializer(str(recorded[0]))
        if not conn.execute("SELECT count(*) FROM sqlite_master WHERE name = ?", (_TABLE,)).fetchone()[0]:
            return None  # a new file
        first = conn.execute(f"SELECT id, payload FROM {_TABLE} WHERE payload IS NOT NULL AND state <> 'corrupt' "
                             "ORDER BY timestamp LIMIT 1").fetchone()
        if first is None:
            return None
        try:
            self.serializer.loads(first[1])
        except Exception as exc:
            return self._unrecorded_serializer(first[0], first[1], exc)
        return None

    def _other_serializer(self, recorded: str) -> PersistenceError:
        return PersistenceError(
            f"{self.path!r} holds jobs written with the serializer {recorded}, and this store was given "
            f"{self._serializer_name} ({self.serializer!r}), which would misread them: refused, the file is "
            f"left as it was; open it with a {recorded.rpartition('.')[2]} (a serializer is known by its "
            "class's module and qualified name)")

    def _unrecorded_serializer(self, job_id: object, payload: object, error: Exception) -> PersistenceError:
        guess = _written_with(payload)
        looks = "" if guess is None or guess == self._serializer_name else f"; its rows look written with {guess}"
        return PersistenceError(
            f"{self.path!r} records no serializer (an older tinymq wrote it), and its first job row {job_id!r} "
            f"does not decode with {self._serializer_name} ({self.serializer!r}): {type(error).__name__}: "
            f"{error}{looks}. Refused, nothing quarantined, the file is left as it was: open it with the "
            "serializer that wrote it (it is recorded then)")

    def _newer_schema(self, version: int) -> PersistenceError:
        return PersistenceError(f"{self.path!r} has schema version {version}, written by a newer tinymq; "
                                f"this one reads version {_SCHEMA_VERSION}")

    # -- lifecycle ------------------------------------------------------------

    def _inherited_by_fork(self) -> None:
        """In a forked child (at fork): never close the parent's connection, nor pin its lock."""
        _live_stores.discard(self)  # done once: a grandchild must not close this descriptor number again
        _inherited.append(self._conn)  # garbage collection would close it from the child
        try:
            self._held[1].close()  # our copy only: the parent's flock stays held by its own descriptor
        except OSError:
            pass

    def _held_here(self) -> bool:
        """Whether this thread is inside a section of the store's locks (see tinymq/_sections.py): a
        call from code the garbage collector runs there is refused (Dispatcher.in_section too)."""
        return not self.read_only and (owned(self._commit_lock) or owned(self._gate))

    def _check_usable(self) -> None:
        if self._pid != os.getpid():
            raise PersistenceError(
                f"SQLitePersistence({self.path!r}) was opened in pid {self._pid}, used in forked "
                f"child pid {os.getpid()}: open a new store in the child"
            )
        if self._closed:
            raise PersistenceError(f"SQLitePersistence({self.path!r}) is closed")
        if self.read_only:
            raise PersistenceError(f"SQLitePersistence({self.path!r}) is read-only")
        if self._broken:
            raise PersistenceError(self._broken)

    def close(self) -> None:
        """Give up the file: later calls raise PersistenceError. Idempotent.

        In a forked child, it only marks this store closed: the connection
        and the lock are the parent's. A Ctrl-C (a signal handler raising)
        landing in it once it has begun, a second one too, leaves the store
        closed and the file given up; one landing before, open (call it again).
        """
        if self.read_only or self._pid != os.getpid():
            self._closed = True
            return
        if self._held[1].closed:  # closed, and the file given up
            return
        with section(self._commit_lock, "the store"):
            # (Closed already: by a close() a Ctrl-C cut short, or by _rescue_wal. A stale owner row is
            # harmless: the lock file decides. Broken: the DELETE would write a frame for the -wal, emptied
            # for whatever file is put in its place.)
            clear_owner_row = not self._closed and not self._broken
            self._closed = True
            try:
                if clear_owner_row:
                    self._conn.execute(f"DELETE FROM {_OWNER} WHERE pid = ?", (self._pid,))
            except sqlite3.Error as exc:
                logger.warning("persistence %s: could not clear the owner row: %s", self.path, exc)
            finally:
                try:  # (inline, as at each recovery below: a helper's call would be a point before its try)
                    self._give_up()
                except BaseException:  # a Ctrl-C again: this pass finishes what that one began
                    self._give_up()
                    raise

    def _give_up(self) -> None:
        """close()'s last steps, each harmless done again: the connection closed, the file given up."""
        try:
            self._conn.close()
        finally:
            _release(self._held, self._pid)
            # Only now: a child forked until then closes its copy of the lock's descriptor, which would
            # hold the lock for as long as it lives (closing the file object again is nothing).
            _live_stores.discard(self)

    def __enter__(self) -> "SQLitePersistence":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        mode = ", read_only=True" if self.read_only else ""
        return f"SQLitePersistence({self.path!r}, synchronous={self.synchronous!r}{mode})"

    # -- rows ------------------------------------------------------------------

    def _upsert(self, job: Job, state: str = "ready", reason: Optional[str] = None,
                last_error: Optional[str] = None) -> Statement:
        """The INSERT for ``job``'s row (a save, or a replace when not ready), checked here so that no
        row SQLite would refuse is accepted."""
        row = self._row(job, state, reason, last_error)
        if row[_LEAN:] == _NULLS:
            return (_SAVE_LEAN if state == "ready" else _REPLACE_LEAN), row[:_LEAN]
        return (_SAVE if state == "ready" else _REPLACE), row

    def _check_storable(self, job: Job) -> None:
        """Raise the PersistenceError ``save(job)`` would raise for the job itself (a payload the
        serializer refuses, text SQLite cannot store, a row over its size limit); writes nothing.
        (A schedule's payload is checked so at registration: tinymq/_periodic.py.)"""
        self._row(job)

    def _row(self, job: Job, state: str = "ready", reason: Optional[str] = None,
             last_error: Optional[str] = None) -> Tuple[Any, ...]:
        payload = job.payload
        if payload is not None:
            try:
                payload = self._dumps(payload)
            except Exception as exc:
                raise PersistenceError(
                    f"cannot serialise the payload of job {job.id!r} (type {job.type!r}, "
                    f"payload type {type(payload).__name__}) with {self.serializer!r}: {exc}"
                ) from exc
            if payload.__class__ is not str and payload.__class__ is not bytes:
                raise PersistenceError(f"{self.serializer!r} returned {type(payload).__name__} for job "
                                       f"{job.id!r}; a serializer must return str or bytes")
        config = job.retry_config
        config_text: Optional[str] = None  # the default config: most jobs
        if config is not _DEFAULT_RETRY_CONFIG:
            cached = self._retry_json.get(id(config))
            if cached is None or cached[0] is not config:
                if not isinstance(config, RetryConfig):  # (set by its executor since enqueue checked it)
                    raise PersistenceError(f"job {job.id!r} cannot be stored: its retry_config must be a "
                                           f"RetryConfig, got {config!r:.80}")
                cached = self._remember_retry_config(config)
            config_text = cached[1]
        tags = job._tags  # not job.tags: that would give every job a dict
        tags_text: Optional[str] = None
        if tags:
            try:
                tags_text = self._tags_json(_as_tags(tags))  # str -> str, as load_all reads them back
            except (TypeError, ValueError) as exc:
                raise PersistenceError(f"cannot serialise the tags of job {job.id!r}: {exc}") from exc
        job_id, job_type, run_at, timestamp, retries = job.id, job.type, job.run_at, job.timestamp, job.retries
        if last_error is None:
            last_error = job.last_error
        if (job_type.__class__ is not str or run_at.__class__ is not float or timestamp.__class__ is not float
                or run_at != run_at or timestamp != timestamp  # NaN: SQLite would store NULL
                or retries.__class__ is not int or not 0 <= retries < _INT64
                or (last_error is not None and last_error.__class__ is not str)):
            job_type, run_at, timestamp, retries, last_error = self._plain_fields(job, last_error)
        if last_error is not None and not last_error.isascii():
            last_error = _utf8_text(last_error)  # an error naming a file that is not UTF-8: kept, escaped
        texts = (job_id, job_type, payload, tags_text, last_error)
        if not (job_id.isascii() and job_type.isascii() and (payload.__class__ is not str or payload.isascii())
                and (tags_text is None or tags_text.isascii()) and (last_error is None or last_error.isascii())):
            for name, text in zip(("id", "type", "payload", "tags", "last_error"), texts):
                if text.__class__ is str and not _storable(text):
                    raise PersistenceError(f"job {job_id!r} cannot be stored: its {name} has text that is "
                                           f"not valid Unicode (a lone surrogate?): {text!r:.80}")
        # SQLite refuses a value or row over SQLITE_LIMIT_LENGTH bytes: refuse it here, for this call only.
        if payload is not None and len(payload) > (self._max_length >> 3):
            size = sum(map(_utf8_length, texts)) + _ROW_OVERHEAD
            if size > self._max_length:
                raise PersistenceError(f"job {job_id!r} cannot be stored: its row would be {size} bytes, "
                                       f"over SQLite's limit of {self._max_length} bytes")
        priority = job.priority
        if priority.__class__ is not Priority:  # (an int, or a value set since enqueue): checked as there
            try:
                priority = _as_priority(priority)
            except ValueError as exc:  # (set by its executor since: a row load_all would refuse)
                raise PersistenceError(f"job {job_id!r} cannot be stored: {exc}") from exc
        return (job_id, state, job_type, int(priority), run_at, timestamp, retries, payload,
                self._seq(), config_text, tags_text, last_error, reason)

    @staticmethod
    def _plain_fields(job: Job, last_error: object) -> Tuple[str, float, float, int, Optional[str]]:
        """Job fields someone set to another type, as the plain values a row holds (or PersistenceError)."""
        try:
            job_type = str.__str__(job.type)  # a str subclass (a str Enum, say): its text
        except TypeError as exc:
            raise PersistenceError(f"job {job.id!r} cannot be stored: {exc}") from exc
        times = []
        for name, given in (("run_at", job.run_at), ("timestamp", job.timestamp)):
            try:
                value = float(given)
            except (TypeError, ValueError) as exc:
                raise PersistenceError(f"job {job.id!r} cannot be stored: its {name} must be a number, "
                                       f"got {given!r}") from exc
            if value != value:  # SQLite stores a NaN as NULL: the row would load as corrupt
                raise PersistenceError(f"job {job.id!r} cannot be stored: its {name} must be a number, got {value!r}")
            times.append(value)
        run_at, timestamp = times
        retries = job.retries
        if retries.__class__ is not int or not 0 <= retries < _INT64:
            raise PersistenceError(f"job {job.id!r} cannot be stored: retries must be an int >= 0, got {retries!r}")
        return job_type, run_at, timestamp, retries, None if last_error is None else str(last_error)

    def _remember_retry_config(self, config: RetryConfig) -> Tuple[RetryConfig, str]:
        if len(self._retry_json) > _CACHE_LIMIT:
            self._retry_json.clear()  # callers making a config per job: don't grow forever
        text = json.dumps({name: getattr(config, name) for name in _RETRY_FIELDS}, separators=(",", ":"))
        entry = self._retry_json[id(config)] = (config, text)
        return entry

    def _job(self, row: Sequence[Any]) -> Job:
        """Rebuild a Job from a row; raises (ValueError, TypeError, ...) on any inconsistency."""
        (job_id, _state, job_type, priority, run_at, timestamp, retries,
         payload, retry_text, tags_text, last_error, _reason) = row
        retry_config = self._retry_configs.get(retry_text)
        if retry_config is None:
            retry_config = self._load_retry_config(retry_text)
        tags = None if tags_text is None else json.loads(tags_text)
        if tags is not None and not isinstance(tags, dict):
            raise ValueError(f"tags must be a JSON object, got {tags_text!r}")
        for name, value in (("run_at", run_at), ("timestamp", timestamp)):
            if not isinstance(value, (int, float)):
                raise ValueError(f"{name} must be a number, got {value!r}")
        if not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries must be an int >= 0, got {retries!r}")
        if last_error is not None and not isinstance(last_error, str):
            raise ValueError(f"last_error must be text, got {last_error!r}")
        job = Job(
            job_type,
            None if payload is None else self.serializer.loads(payload),
            priority=priority,
            tags=tags,
            run_at=run_at,
            retry_config=retry_config,
            id=job_id,
        )
        job.timestamp = float(timestamp)
        if run_at == timestamp:  # due at its creation: due now, whatever the wall clock did since
            job.run_at = job.timestamp  # (the same float, as Job() makes it: see Queue.enqueue)
        job.retries = retries
        job.last_error = last_error
        return job

    def _load_retry_config(self, text: Optional[str]) -> RetryConfig:
        if text is None:
            return _DEFAULT_RETRY_CONFIG
        fields = json.loads(text)
        if not isinstance(fields, dict) or set(fields) - set(_RETRY_FIELDS):
            raise ValueError(f"retry_config must be a JSON object of {_RETRY_FIELDS}, got {text!r}")
        config = RetryConfig(**fields)
        if len(self._retry_configs) > _CACHE_LIMIT:
            self._retry_configs.clear()
        self._retry_configs[text] = config
        return config

    # -- writing, with group commit --------------------------------------------

    def _write(self, statements: List[Statement]) -> None:
        """Commit ``statements`` atomically, possibly in one transaction with other threads' units.

        Returns only once they are committed; raises PersistenceError otherwise.
        Under NORMAL, writers queue on the commit lock itself: the one that gets
        it commits every unit pending then, and a writer back at once may take it
        again (no thread wakes for that). Under FULL (an fdatasync per commit) the
        first writer to find no leader waits for the commit lock and, once it has
        it, commits its unit and every unit pending then; the writers that come
        meanwhile wait on locks of their own, which that leader releases once
        their batch is over, so a writer whose unit was committed never takes the
        commit lock. Queued on it as under NORMAL, such a writer often waited
        through the next writer's whole commit, fsync included, before it learnt
        its unit was done. Measured with bench/durable_group_commit_ab.py (4
        producer threads, 11 runs, medians): FULL, 11.5 k jobs/s at 2.5 units per
        commit against 8.1 k at 1.4-2.2 units (+23 % to +125 %, median +41 %; one
        producer about 6.6 k). Under NORMAL, where a commit is shorter than a
        thread takes to wake, the same hand-off made 4 producers block 1.6-3.3x
        as often and cost 4-20 % more CPU per job in 5 runs of 6 (end to end it
        measured either way), so NORMAL keeps the queue on the commit lock. Other
        designs measured and not kept are described there.

        Under FULL, writers who saved in one batch and are back at once with their
        next saves (producer threads enqueueing one job after another) split into
        two groups that took turns at the commit lock, each commit carrying about
        half of them (2.5 units per commit from 4 producers) while the other half
        came back. Instead, the first of them back leads but waits, on its own
        lock, for the others, and the last one back leads in its place, with their
        units in its batch: one commit, one fsync, for them all (see _back). It
        waits only while they have come back faster than a commit takes (moving
        averages of both, measured as the store runs: on a machine where a thread
        takes long to wake against its fsync, the groups take turns as before),
        never past twice a commit's time after their batch's commit (a commit counting
        for at most _LONGEST_COMMIT there), and only for
        savers: a worker's running mark or delete is back only once its job ran,
        and waiting for those made the FULL end to end case (one producer, 4
        workers) 17 % slower (8 pairs). See bench/durable_trees_ab.py ``--case
        four`` for what it gives 4 producers.
        """
        if self._pid != os.getpid() or self._closed or self.read_only or self._broken:
            self._check_usable()
        if self._held_here():  # before its unit is pending: a refused write leaves nothing to commit
            refuse("the store")
        unit = _Unit(statements)
        # A worker thread's interruption (interrupt_on_timeout) waits: this thread may commit other threads' units.
        with shield():
            if not self._hand_off:
                self._pending.append(unit)
                with self._commit_lock:  # (here and below, a re-entry is refused above, as it enters)
                    if not unit.done:  # nobody committed it for us while we waited: lead a batch
                        batch: List[_Unit] = []
                        try:
                            self._commit_pending(batch)
                        except BaseException:
                            try:
                                self._hand_back(unit, batch)
                            except BaseException:  # a Ctrl-C again: this pass finishes what that one began
                                self._hand_back(unit, batch)
                                raise
                            raise
            else:
                unit.thread = threading.get_ident()  # (not under NORMAL: nothing there asks, per write)
                try:  # (from before the gate: an interruption as it leaves it must not leave _leader set)
                    with self._gate:
                        if self._waits_here(unit):  # (before its unit is pending: _resign finds nothing of it)
                            refuse("the store")
                        wait = self._back(statements) if self._returning else -1.0
                        leads = self._leader is None
                        gathers = leads and wait > 0
                        if leads:
                            self._leader = unit  # (its unit is not pending: only its writer commits it)
                            if gathers:
                                self._gathering = unit
                        elif wait == 0 and self._gathering is not None:  # the last one back leads, with its unit
                            self._pending.appendleft(self._gathering)
                            self._gathering = None
                            self._leader = unit
                            leads = True
                        else:
                            self._pending.append(unit)
                        if not leads or gathers:
                            waker = unit.waker = threading.Lock()
                            waker.acquire()
                    if gathers:  # the first one back: the last one back leads, or this one once the window closes
                        leads = False
                        if not waker.acquire(True, wait):
                            with self._gate:
                                leads = self._gathering is unit
                                if leads:
                                    self._gathering = None
                                    unit.waker = None
                            if not leads:
                                waker.acquire()
                    elif not leads:
                        waker.acquire()  # our batch is over, or the lead was handed to us
                    if leads or unit.leads:
                        self._lead(unit)
                except BaseException:  # (Ctrl-C) no unit may be left pending without a writer to lead it
                    try:
                        self._resign(unit)
                    except BaseException:  # a Ctrl-C again: this pass finishes what that one began
                        self._resign(unit)
                        raise
                    raise
        if not unit.done:
            error = unit.error
            if isinstance(error, PersistenceError):
                raise error
            raise PersistenceError(f"{self!r}: write failed: {error or 'interrupted before its commit'}") from error

    def _waits_here(self, unit: _Unit) -> bool:
        """Under FULL, caller holds the gate: whether ``unit``'s thread has a write under way already, its
        unit leading (waiting for the commit lock, or for the others of its batch) or pending. Only from
        code that ran inside that write on its thread (a signal handler, the garbage collector): a unit of
        it would wait for a leader who cannot go on until it returns, maybe forever (see _held_here)."""
        leader = self._leader
        if leader is not None and leader.thread == unit.thread:
            return True
        for waiting in self._pending:
            if waiting.thread == unit.thread:
                return True
        return False

    def _back(self, statements: List[Statement]) -> float:
        """Under FULL, caller holds the gate and writers who saved in the last batch are not all back
        (_returning): a writer who saves counts as one of them. Returns the seconds it may wait for the
        others (> 0), 0.0 if it is the last one back (or they are late), else -1.0 (see _write)."""
        if not _saves(statements):
            return -1.0
        now = time.monotonic()
        if now >= self._back_by:  # late: none of them is waited for
            self._returning = 0
            self._return_time += (self._back_by - self._released_at - self._return_time) / 8
            return 0.0
        self._returning -= 1
        if not self._returning:
            self._return_time += (now - self._released_at - self._return_time) / 8
            return 0.0
        return self._back_by - now if self._return_time < self._commit_time else -1.0

    def _lead(self, unit: _Unit) -> None:
        """Under FULL: take the commit lock, commit ``unit`` and every unit pending, then release their writers."""
        batch = [unit]
        try:
            with self._commit_lock:
                try:
                    self._commit_pending(batch)
                except BaseException:
                    try:
                        self._hand_back(unit, batch)
                    except BaseException:  # a Ctrl-C again: this pass finishes what that one began
                        self._hand_back(unit, batch)
                        raise
                    raise
        finally:
            try:
                self._wake(batch)
            except BaseException:  # interrupted halfway (Ctrl-C): the writers not woken yet must be
                self._wake(batch)
                raise

    @staticmethod
    def _wake(batch: List[_Unit]) -> None:
        """Release the writers of ``batch`` waiting on their wakers. Again after an interrupted pass: a
        waker released already is left as it is (its writer's, or unlocked: each is used once)."""
        for waiting in batch:
            if waiting.waker is not None:
                try:
                    waiting.waker.release()
                except RuntimeError:  # (released by the interrupted pass, its writer not awake yet)
                    pass

    def _commit_pending(self, batch: List[_Unit]) -> None:
        """Commit ``batch`` and every unit pending (``batch`` then holds them all). Caller holds the commit lock."""
        if self._hand_off:
            with self._gate:
                batch.extend(self._pending)
                self._pending.clear()
                self._leader = None  # the next writer to come leads the next batch
        else:  # (each copied, then taken out: an interruption leaves each unit in one or both, see _hand_back)
            # One at a time, never by iterating the deque: writers append to it without the commit
            # lock, and an iterator over a deque that grows raises "deque mutated during iteration".
            pending = self._pending
            for _ in range(len(pending)):
                batch.append(pending[0])
                pending.popleft()
        if self._closed or self._broken:
            for waiting in batch:
                waiting.error = PersistenceError(self._broken or f"{self!r} was closed")
        elif batch:
            shared = self._hand_off and len(batch) > 1
            began = time.monotonic() if shared else 0.0
            self._commit(batch)
            # Before any of it is acknowledged, now and then: a look per commit (an lstat
            # of each file) made one producer's durable enqueue about a third slower, and
            # a poll of an inotify watch per commit durable end to end about 8 % slower.
            now = time.monotonic()
            if shared:
                self._shared(batch, now - began, now)
            if now >= self._next_wal_check:
                self._next_wal_check = now + _WAL_CHECK_INTERVAL
                self._look_at_files(batch)

    def _shared(self, batch: List[_Unit], took: float, now: float) -> None:
        """Under FULL, ``batch``, of several writers' units, was committed in ``took`` seconds: those of
        them who saved may be back at once with their next saves (see _back). Caller holds the commit lock."""
        savers = 0
        for waiting in batch:
            if _saves(waiting.statements):
                savers += 1
        with self._gate:
            self._commit_time += (min(took, _LONGEST_COMMIT) - self._commit_time) / 8
            self._returning = savers if savers > 1 else 0
            self._released_at = now
            self._back_by = now + 2 * self._commit_time

    def _hand_back(self, unit: _Unit, batch: List[_Unit]) -> None:
        """``unit``'s writer was interrupted leading ``batch`` (a signal handler raising in the main
        thread, Ctrl-C): the interruption is its own. The other units of the batch it did not see
        committed or refused go back to the front of the queue, taken out of ``batch`` (their writers
        wait on), for the next leader; under FULL the lead goes to the first if nobody has it (else
        _resign hands it on). Such a unit may have been committed already (an interruption lands after
        a C call returns: under FULL, a Ctrl-C during the commit's fsync lands just after the COMMIT):
        committed again, each statement writes the same row or deletes the same one, so the file ends
        as after one commit. Caller holds the commit lock.

        Called again if a second interruption (Ctrl-C again) cuts it short: each step is one call, or
        finds what a pass before it did, so a second pass finishes what the first began. (Its lists
        are built by plain loops: on CPython 3.12 and 3.13 an exception that a trace function raises
        inside an inlined list comprehension can skip the enclosing ``with``'s exit, leaving the gate
        held; the tests interrupt every line of this recovery so. A signal handler's exception does
        not: some 660-690 real SIGINTs in 5 s in such a comprehension, on each of 3.11, 3.12 and 3.13,
        left no lock held.)"""
        with self._gate:
            back: List[_Unit] = []  # (plain loops, not comprehensions: see below)
            kept: List[_Unit] = []
            for waiting in batch:
                if waiting is unit or waiting.done or waiting.error is not None:
                    kept.append(waiting)
                elif waiting not in self._pending:
                    back.append(waiting)
            self._pending.extendleft(reversed(back))
            batch[:] = kept
            if self._hand_off:
                self._hand_on_lead()

    def _resign(self, unit: _Unit) -> None:
        """``unit``'s writer was interrupted: take its unit back unless a batch has it, and if the
        writer was to lead, hand the lead to the oldest writer waiting (its own lock wakes it).
        Called again if a second interruption cuts it short, as _hand_back."""
        with self._gate:
            if unit in self._pending:
                self._pending.remove(unit)
            if self._leader is unit:
                self._leader = None
            if self._gathering is unit:
                self._gathering = None
            self._hand_on_lead()

    def _hand_on_lead(self) -> None:
        """Under FULL, caller holds the gate: if nobody leads while writers wait, the first of them is
        given the lead, and a writer given it is woken (by its own lock). A leader whose waker is set
        was given the lead and not woken yet (a pass again after an interruption wakes it), or waits
        for the others of its batch (_gathering): it is woken to lead now."""
        if self._leader is None and self._pending:
            self._leader = self._pending[0]
        leader = self._leader
        if leader is not None and leader.waker is not None:
            self._gathering = None
            if leader in self._pending:
                self._pending.remove(leader)
            leader.leads = True
            self._wake([leader])
            leader.waker = None  # (woken: the batch that commits its unit must not release it again)

    def _look_at_files(self, batch: List[_Unit]) -> None:
        """Whether the database and -wal at the path are still those our connection writes; what to do
        if not. Caller holds _commit_lock, and has just committed ``batch``, not acknowledged yet."""
        database = _ownership.identity(self._file)
        if database is None:
            self._rescue_database(batch)
        elif database != self._key:
            self._refuse_writes(batch, "replaced")
        elif _ownership.identity(self._wal_path) != self._wal:
            self._rescue_wal(batch)
        elif self._owner_row_in_wal_only:  # a reader held it out at the open: again
            self._checkpoint_owner_row()

    def _checkpoint_owner_row(self) -> None:
        """Copy the WAL, and so the owner row, into the database file, if no reader keeps it out now."""
        try:
            self._owner_row_in_wal_only = not _checkpointed(self._conn, "PASSIVE")
        except sqlite3.Error as exc:  # the commits stand; the next look tries again
            logger.warning("persistence %s: could not checkpoint the owner row: %s", self.path, exc)

    def _rescue_database(self, batch: List[_Unit]) -> None:
        """Our database file was removed (a cleaner, ``rm jobs.db*``): what it holds would end with this store.

        Found by a look after a commit (at most every _WAL_CHECK_INTERVAL), before that commit is
        acknowledged (see _look_at_files). SQLite still reads the removed file
        through its open descriptor: copy it, with every commit so far, into a
        new file at the path (``VACUUM INTO`` a file we create, 0600, never over
        one put there meanwhile), close our connection (SQLite empties and
        removes the old -wal and -shm; what it leaves of ours is removed), and
        go on in the new file with a new connection and -wal. If the copy
        fails, nothing more is acknowledged, as for a replaced file. Caller
        holds _commit_lock.
        """
        logger.error("persistence %s: its database file was removed under this store; writing what the "
                     "store holds into a new file at the path", self.path)
        try:
            made = _ownership.create_private(self._file)  # (O_EXCL: a file put there meanwhile is not ours)
        except PersistenceError as exc:
            logger.error("persistence %s: cannot make a new database file: %s", self.path, exc)
            self._refuse_writes(batch, "replaced" if os.path.lexists(self._file) else "removed")
            return
        key = (made.st_dev, made.st_ino)
        try:
            self._conn.execute("VACUUM INTO ?", (f"file:{urllib.parse.quote(os.fsencode(self._file))}?mode=rw",))
            if _ownership.identity(self._file) != key:
                raise PersistenceError(f"{self._file!r} was replaced while the store wrote it")
        except (sqlite3.Error, PersistenceError) as exc:
            logger.error("persistence %s: cannot write what the store holds into a new file: %s", self.path, exc)
            if _ownership.identity(self._file) == key:
                try:
                    os.unlink(self._file)
                except OSError:
                    pass
            self._refuse_writes(batch, "removed")
            return
        # From here the path holds every commit: what fails now fails later writes, not this batch.
        try:
            old_wal, old_shm = self._wal, self._shm
            self._conn.close()
            for side, ours in ((self._wal_path, old_wal), (self._file + "-shm", old_shm)):
                if ours is not None and _ownership.identity(side) == ours:
                    os.unlink(side)
            _ownership.unregister(self._key)
            self._key = self._held[0] = key
            _ownership.register(key, self.path)
            self._reconnect()
        except (OSError, sqlite3.Error, PersistenceError) as exc:
            self._broken = (f"{self!r}: its database file was removed under this store and written anew at "
                            f"the path, with every job it held, but the store could not go on there ({exc}): "
                            "open a new store")
            logger.error("persistence %s: %s", self.path, self._broken)
            return
        logger.warning("persistence %s: the new database file holds every job the store held; the store goes "
                       "on there", self.path)

    def _reconnect(self) -> None:
        """Go on at the path with a new connection, -wal and -shm, after the old connection was closed
        (_rescue_database, _rescue_wal). Caller holds _commit_lock."""
        made = self._make_side_files([_ownership.check_file(self._file + suffix, mode="tighten", side=True)
                                      for suffix in _SIDE_FILES])
        self._conn = self._connect("mode=rw")
        self._prepare(self._conn)
        self._drop_empty(made, ("-journal",))
        self._cursor = self._conn.cursor()
        self._conn.execute(f"UPDATE {_OWNER} SET pid = pid")  # a first commit creates the new -wal
        self._wal = _ownership.identity(self._wal_path)
        self._shm = _ownership.identity(self._file + "-shm")
        self._next_wal_check = 0.0  # the next commit looks again

    def _refuse_writes(self, batch: List[_Unit], what: str) -> None:
        """Our database file was removed or replaced: every commit is now in a file nobody will open again.

        Found by a look after a commit (at most every _WAL_CHECK_INTERVAL), before that commit is
        acknowledged (see _look_at_files). SQLite reads the old file only
        through its open descriptor, so what it holds ends with this store:
        nothing more is acknowledged, from this batch on. Its -wal is emptied
        into it, and then the -wal and -shm are removed from beside the path
        (our connection keeps them open, for its reads): a -wal without its
        database must never be read into a file put in its place, and a new
        store at the path starts clean. Caller holds _commit_lock.
        """
        self._broken = (f"{self!r}: its database file was {what} under this store: what the store held is "
                        "lost when it is closed or the process ends, and no write is saved any more (this "
                        "one neither)")
        logger.error("persistence %s: its database file was %s under this store; every later write fails",
                      self.path, what)
        try:
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:
            logger.warning("persistence %s: could not empty the -wal of the %s file: %s", self.path, what, exc)
        # (SQLite leaves them: it neither checkpoints nor removes them when it closes a moved database.)
        for side, ours in ((self._wal_path, self._wal), (self._file + "-shm", self._shm)):
            if ours is not None and _ownership.identity(side) == ours:
                try:
                    os.unlink(side)
                except OSError as exc:
                    logger.warning("persistence %s: could not remove %s of the %s file: %s", self.path, side,
                                   what, exc)
        for unit in batch:
            if unit.done:
                unit.done = False
                unit.error = PersistenceError(self._broken)

    def _rescue_wal(self, batch: List[_Unit]) -> None:
        """Our -wal was removed or replaced (a cleaner, ``rm jobs.db-*``): what it holds would die with us.

        Found by a look after a commit (at most every _WAL_CHECK_INTERVAL), before that commit is
        acknowledged (see _look_at_files). Copy the WAL into the database file
        (a checkpoint reads it through SQLite's open descriptor), then continue
        on a new connection and a new -wal. If that fails, nothing more is
        acknowledged. Caller holds _commit_lock.
        """
        logger.error("persistence %s: its -wal file was removed or replaced under this store; "
                     "checkpointing into the database and reopening", self.path)
        try:
            busy, _, _ = self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            if busy:
                raise sqlite3.OperationalError("a reader kept the checkpoint from finishing")
            self._conn.close()
            self._reconnect()
            self._owner_row_in_wal_only = False  # (the TRUNCATE checkpoint copied it)
        except (sqlite3.Error, PersistenceError) as exc:
            self._closed = True  # every later call refuses: nothing more can be made durable here
            for unit in batch:
                if unit.done:
                    unit.done = False
                    unit.error = PersistenceError(
                        f"{self!r}: its -wal file was removed or replaced, and what it held could not "
                        f"be saved into the database ({exc}); this store is closed: open a new one")

    def _commit(self, batch: List[_Unit]) -> None:
        """One transaction for the whole batch; if it fails, each unit alone. Caller holds _commit_lock."""
        try:
            if len(batch) == 1:
                self._execute(batch[0].statements)
            else:
                self._execute(self._merged([s for unit in batch for s in unit.statements]))
        except Exception as exc:
            if len(batch) == 1:
                batch[0].error = exc
                return
            for unit in batch:  # one bad unit must not fail the others
                try:
                    self._execute(unit.statements)
                except Exception as unit_exc:
                    unit.error = unit_exc
                else:
                    unit.done = True
            return
        for unit in batch:
            unit.done = True

    def _merged(self, statements: List[Statement]) -> List[Statement]:
        """Runs of one single-row statement (upserts, deletes, marks) as one multi-row statement each.

        The same effect in the same order (a multi-row INSERT OR REPLACE applies
        its rows in order), in fewer calls into SQLite: a batch of other
        threads' saves becomes one statement, committed on its own.
        """
        merged: List[Statement] = []
        for sql, run in itertools.groupby(statements, key=operator.itemgetter(0)):
            parameters = [p for _, p in run]
            if len(parameters) == 1 or sql not in _MERGEABLE:
                merged.extend((sql, p) for p in parameters)
                continue
            for start in range(0, len(parameters), _MAX_MERGED_ROWS):
                merged.append(self._merged_statement(sql, parameters[start:start + _MAX_MERGED_ROWS]))
        return merged

    def _merged_statement(self, sql: str, run: List[Any]) -> Statement:
        merged_sql = self._merged_sql.get((sql, len(run)))
        if merged_sql is None:
            if sql in (_SAVE_LEAN, _SAVE):
                merged_sql = _save_sql(_LEAN if sql == _SAVE_LEAN else len(_COLUMNS), len(run))
            elif sql in (_REPLACE_LEAN, _REPLACE):
                merged_sql = _insert(_LEAN if sql == _REPLACE_LEAN else len(_COLUMNS), len(run))
            else:
                template = _MERGED_DELETE if sql == _DELETE else _MERGED_MARK_RUNNING
                merged_sql = template.format(", ".join("?" * len(run)))
            self._merged_sql[sql, len(run)] = merged_sql
        return merged_sql, [value for parameters in run for value in parameters]

    def _execute(self, statements: List[Statement]) -> None:
        cursor = self._cursor
        if len(statements) == 1:
            sql, parameters = statements[0]
            cursor.execute(sql, parameters)  # autocommit: its own transaction
            columns = _SAVES.get(sql)
            if columns is None or cursor.rowcount * columns >= len(parameters):
                return
            # A save left a row of its id (a dead job's): again, in a transaction that replaces it.
        try:  # (BEGIN inside: whatever ends this call, the connection never stays in the transaction)
            cursor.execute("BEGIN IMMEDIATE")  # take the write lock now: no deadlock on upgrade
            for sql, parameters in statements:
                cursor.execute(sql, parameters)
                columns = _SAVES.get(sql)
                if columns is not None and cursor.rowcount * columns < len(parameters):
                    self._save_over_kept_rows(columns, parameters)
            cursor.execute("COMMIT")
        except BaseException:
            if self._conn.in_transaction:
                cursor.execute("ROLLBACK")
            raise

    def _save_over_kept_rows(self, columns: int, parameters: Sequence[Any]) -> None:
        """The rows of one save statement that it left (a dead or quarantined row had the id): replace
        them, and remember each row replaced (in _replaced) so that ``undo_save`` can put it back. Saves
        only repeat a statement: a row saved already is written again as it is (the statement is idempotent).

        Remembered before the COMMIT: a Ctrl-C as the COMMIT returns leaves the save committed, and
        committed again by the next leader (see _hand_back), which finds no row left to replace. One
        remembered for a save whose transaction rolls back is never used: undo_save restores only over
        the row that save wrote (its seq), and its save committed again later remembers the same."""
        cursor = self._cursor
        padding = _NULLS[:len(_COLUMNS) - columns]
        last = {}  # each id's last row, as saves one by one would leave it
        for start in range(0, len(parameters), columns):
            row = tuple(parameters[start:start + columns]) + padding
            last[row[0]] = row
        found = {row[0]: row for row in cursor.execute(_SELECT_ROWS.format(", ".join("?" * len(last))),
                                                       list(last))}
        for job_id, row in last.items():
            now = found.get(job_id)
            if now is not None and _same_save(now[_SEQ], row[_SEQ]):
                continue  # saved by the statement
            if now is not None and now[1] not in ("ready", "running"):
                self._replaced[job_id] = (row[_SEQ], now)
            cursor.execute(_REPLACE, row)

    def _in_transaction(self, conn: sqlite3.Connection, work: Callable[[sqlite3.Connection], _T], what: str) -> _T:
        """Run ``work(conn)`` in one write transaction (the caller holds _commit_lock, or is opening)."""
        try:
            try:  # (BEGIN inside: whatever ends this call, the connection never stays in the transaction)
                conn.execute("BEGIN IMMEDIATE")
                result = work(conn)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise PersistenceError(f"{self!r}: {what} failed: {exc}") from exc
        return result

    # -- the Persistence protocol ------------------------------------------------

    def save(self, job: Job) -> None:
        """Insert or overwrite ``job`` as ready (or delayed, by its ``run_at``); committed on return.

        A dead job's row of the same id is overwritten too, and kept aside until
        the new job ends, for ``undo_save``.
        """
        self._write([self._upsert(job)])

    def save_many(self, jobs: Iterable[Job]) -> None:
        """Save every job in one transaction: all of them are stored, or none (PersistenceError)."""
        last: Dict[str, Tuple[Any, ...]] = {}  # each id once: the last row wins, as with one save each
        for job in jobs:
            row = self._row(job)
            last[row[0]] = row
        if not last:
            return
        lean: List[Any] = []
        full: List[Any] = []
        for row in last.values():
            if row[_LEAN:] == _NULLS:
                lean.extend(row[:_LEAN])
            else:
                full.extend(row)
        self._write(self._insert_statements(lean, full))

    def _insert_statements(self, lean: List[Any], full: List[Any]) -> List[Statement]:
        """Multi-row INSERTs of power-of-two sizes (faster than executemany, always cached)."""
        statements: List[Statement] = []
        for columns, parameters in ((_LEAN, lean), (len(_COLUMNS), full)):
            rows = len(parameters) // columns
            start, size = 0, _ROWS_PER_INSERT
            while start < rows:
                while size > rows - start:
                    size >>= 1
                sql = self._insert_sql.get((columns, size))
                if sql is None:
                    sql = self._insert_sql[columns, size] = _save_sql(columns, size)
                statements.append((sql, parameters[start * columns:(start + size) * columns]))
                start += size
        return statements

    def give_back(self, job: Job) -> None:
        """Save ``job`` as ready, keeping its place in the load order: an attempt ``stop()`` gave up.

        Like ``save``, except that a row already stored keeps its seq: the job
        runs after a restart where it was (no retry moved it back).
        """
        try:
            row = self._row(job)
        except PersistenceError as exc:  # changed since its last save (its executor set a payload
            _check_id(job.id)            # JSON cannot hold, say): ready again as it was saved
            logger.warning("job %r is given back as it was last saved: %s", job.id, exc)
            self._write([(_GIVE_BACK_AS_SAVED, (job.id,))])
            return
        self._write([(_GIVE_BACK, row[:_SEQ + 1] + (row[0],) + row[_SEQ + 1:] + (row[0],))])

    def delete(self, job_id: str) -> None:
        """Forget a finished job; an unknown id is not an error."""
        _check_id(job_id)
        self._write([(_DELETE, (job_id,))])
        if self._replaced:
            self._replaced.pop(job_id, None)

    def undo_save(self, job_id: str) -> None:
        """Take back the last save of ``job_id``: the queue did not accept that job after all (QueueFull).

        The row that save replaced, a dead (or quarantined) job of the same id,
        is put back as it was; else the row is deleted, as ``delete`` does.
        """
        _check_id(job_id)
        entry = self._replaced.get(job_id)
        if entry is None:  # the save replaced nothing that must stay
            self._write([(_DELETE, (job_id,))])
            return
        seq, kept = entry

        def restore(conn: sqlite3.Connection) -> int:
            now = conn.execute(f"SELECT seq FROM {_TABLE} WHERE id = ?", (job_id,)).fetchone()
            if now is not None and _same_save(now[0], seq):  # still that save's row
                conn.execute(_REPLACE, kept)
            else:
                conn.execute(_DELETE, (job_id,))
            return 0

        self._check_usable()
        with shield(), section(self._commit_lock, "the store"):
            self._check_usable()
            self._in_transaction(self._conn, restore, f"undoing the save of job {job_id!r}")
            if self._replaced.get(job_id) is entry:
                del self._replaced[job_id]

    def mark_running(self, job: Job) -> None:
        """An attempt starts: if the process dies now, reloading counts a crash (not a failed attempt)."""
        _check_id(job.id)
        self._write([(_MARK_RUNNING, (job.id,))])

    def delete_and_mark_running(self, job_id: str, job: Job) -> None:
        """``delete(job_id)`` and ``mark_running(job)`` in one commit: a worker's finished job and its next."""
        _check_id(job_id)
        _check_id(job.id)
        self._write([(_DELETE, (job_id,)), (_MARK_RUNNING, (job.id,))])
        if self._replaced:
            self._replaced.pop(job_id, None)

    def mark_dead(self, job: Job, reason: str, error: object = None) -> None:
        """Keep a permanently failed job, with why, for ``dead_jobs()``."""
        error_text = _error_text(error)
        try:
            statement = self._upsert(job, "dead", reason, error_text)
        except PersistenceError as exc:  # changed since its last save (its executor set a payload
            _check_id(job.id)            # JSON cannot hold, say): kept dead as it was saved
            logger.warning("job %r is kept dead as it was last saved: %s", job.id, exc)
            statement = (_MARK_DEAD_AS_SAVED, (reason, error_text and _utf8_text(error_text), job.id))
        self._write([statement])
        if self._replaced:
            self._replaced.pop(job.id, None)

    def load_all(self) -> List[Job]:
        """Every job to run, in the order of their saves; recovers crashed attempts and quarantines bad rows.

        In one write transaction: a row still "running" (its process died
        during an attempt) comes back ready, the crash counted in its row (not
        in ``retries``: the attempt did not fail, its process died). One whose
        process died during more than ``max_crash_recoveries`` of its attempts
        is not returned: it is handed to the Queue by
        ``take_crashed``, and its row is left as it was ("running") until the
        Queue has reported it and marked it dead (``mark_dead``, reason
        "crashed"), so a process that dies in between leaves it for the next
        load, which counts the same crash again (not one more) and hands it on
        again: reported at least once. A row that cannot be decoded becomes
        "corrupt", is logged, and is skipped.
        """
        self._check_usable()
        with section(self._commit_lock, "the store"):
            self._check_usable()
            jobs, crashed = self._in_transaction(self._conn, self._recover, "load_all")
            self._crashed = crashed  # (a second load finds the same rows, still "running")
            return jobs

    def take_crashed(self) -> List[Job]:
        """The jobs the last ``load_all`` found crashed too often (more than ``max_crash_recoveries``
        times), each returned once.

        The Queue reports them to its failure callbacks (reason "crashed") after
        ``load_all``, then marks each dead (``mark_dead``); until then its row
        stays "running", as it was found.
        """
        crashed, self._crashed = self._crashed, []
        return crashed

    def _recover(self, conn: sqlite3.Connection) -> Tuple[List[Job], List[Job]]:
        # In the order they were saved (rows an older tinymq saved, without a seq, first, by creation).
        rows = conn.execute(f"SELECT {', '.join(_READ_COLUMNS)}, crashes FROM {_TABLE} "
                            "WHERE state IN ('ready', 'running') ORDER BY seq, timestamp").fetchall()
        jobs: List[Job] = []
        dead: List[Job] = []
        corrupt: List[Tuple[str, Any]] = []
        recovered: List[Tuple[Any, ...]] = []  # crashes counted: ready again
        for row in conn.execute(f"SELECT id, state FROM {_TABLE} WHERE state NOT IN "
                                "('ready', 'running', 'dead', 'corrupt')"):
            logger.error("persistence %s: quarantined job row %r: unknown state %r", self.path, row[0], row[1])
            corrupt.append((f"corrupt: unknown state {row[1]!r}", row[0]))
        for row in rows:
            try:
                job = self._job(row[:-1])
            except Exception as exc:
                logger.error("persistence %s: quarantined corrupt job row %r: %s: %s",
                             self.path, row[0], type(exc).__name__, exc)
                corrupt.append((f"corrupt: {type(exc).__name__}: {exc}", row[0]))
                continue
            if row[1] == "running":
                crashes = row[-1] if row[-1].__class__ is int and row[-1] > 0 else 0  # (NULL: none)
                crashes = min(crashes + 1, _INT64 - 1)  # a count SQLite can store: one row fails no load
                job.last_error = (f"the process died during an attempt (recovered by pid {os.getpid()} "
                                  f"at {time.strftime('%Y-%m-%dT%H:%M:%S%z')})")
                if crashes > self.max_crash_recoveries:  # its row is left as it is: see load_all
                    logger.error("persistence %s: job %r (type %r) crashed its process %d times; "
                                 "handed to the queue to fail with reason 'crashed'", self.path, job.id,
                                 job.type, crashes)
                    dead.append(job)
                    continue
                recovered.append((crashes, job.last_error, job.id))
            jobs.append(job)
        if corrupt:
            conn.executemany(f"UPDATE {_TABLE} SET state = 'corrupt', reason = ? WHERE id = ?", corrupt)
        if recovered:
            conn.executemany(f"UPDATE {_TABLE} SET state = 'ready', reason = NULL, crashes = ?, last_error = ? "
                             "WHERE id = ?", recovered)
        return jobs, dead

    # -- inspection (read-only stores too) ---------------------------------------------

    def _read(self, sql: str, parameters: Sequence[Any] = ()) -> List[Any]:
        return self._read_together([(sql, parameters)])[0]

    def _read_together(self, queries: Sequence[Tuple[str, Sequence[Any]]]) -> List[List[Any]]:
        """The rows of each query, all read from one state of the file (one read transaction;
        an owner's own connection, which only its commit lock's holder writes through)."""
        if self.read_only:
            if self._closed:
                raise PersistenceError(f"SQLitePersistence({self.path!r}) is closed")

            def read(conn: sqlite3.Connection) -> Tuple[Optional[PersistenceError], List[List[Any]]]:
                try:
                    conn.execute("BEGIN")
                    try:
                        # (opened while the file held no job, it may hold another serializer's jobs since)
                        refusal = self._serializer_refusal(conn)
                        if refusal is not None:
                            return refusal, []
                        return None, [conn.execute(sql, parameters).fetchall() for sql, parameters in queries]
                    finally:
                        conn.rollback()
                except sqlite3.Error as exc:
                    raise PersistenceError(f"{self!r}: read failed: {exc}") from exc
            refusal, found = self._reading(read)
            if refusal is not None:
                raise refusal
            return found
        if self._pid != os.getpid() or self._closed:
            self._check_usable()
        with section(self._commit_lock, "the store"):
            if self._closed:
                self._check_usable()
            try:
                return [self._conn.execute(sql, parameters).fetchall() for sql, parameters in queries]
            except sqlite3.Error as exc:
                raise PersistenceError(f"{self!r}: read failed: {exc}") from exc

    def _decoded(self, rows: List[Any], what: str) -> List[Job]:
        jobs = []
        for row in rows:
            try:
                jobs.append(self._job(row))
            except Exception as exc:
                logger.error("persistence %s: %s row %r cannot be decoded: %s", self.path, what, row[0], exc)
        return jobs

    def jobs(self) -> List[Job]:
        """Every unfinished job (ready, delayed or running), oldest first, as stored; changes nothing."""
        return self._decoded(self._read(_SELECT_UNFINISHED), "job")

    def dead_jobs(self) -> List[DeadJob]:
        """Permanently failed jobs, oldest job (``timestamp``) first, with their reason and last error."""
        return self._dead_entries(self._read(_SELECT_DEAD))

    def _dead_ids(self) -> Set[str]:
        """The id of every dead row, decoded or not (``dead_jobs()`` leaves out one it cannot decode)."""
        return {row[0] for row in self._read(f"SELECT id FROM {_TABLE} WHERE state = 'dead'")}

    def _dead_entries(self, rows: List[Any]) -> List[DeadJob]:
        reasons = {row[0]: (row[11], row[10]) for row in rows}
        return [DeadJob(job, *reasons[job.id]) for job in self._decoded(rows, "dead job")]

    def quarantined(self) -> List[Tuple[str, str]]:
        """``(job id, why)`` for every row quarantined as corrupt."""
        return [tuple(row) for row in self._read(_SELECT_QUARANTINED)]

    def counts(self) -> Dict[str, int]:
        """How many rows are in each state: ready (due now), delayed, running, dead, corrupt."""
        return self._counted(self._read(_COUNT_STATES, (time.time(),)))

    @staticmethod
    def _counted(rows: List[Any]) -> Dict[str, int]:
        counts = dict.fromkeys(("ready", "delayed", "running", "dead", "corrupt"), 0)
        for state, number in rows:
            counts[state] = number
        return counts

    def _inspection(self) -> Tuple[Dict[str, int], List[Job], List[DeadJob], List[Tuple[str, str]]]:
        """``(counts(), jobs(), dead_jobs(), quarantined())`` read from one state of the file, so that
        they agree while an owner writes (``status --db`` prints them side by side)."""
        counts, unfinished, dead, quarantined = self._read_together([
            (_COUNT_STATES, (time.time(),)), (_SELECT_UNFINISHED, ()), (_SELECT_DEAD, ()),
            (_SELECT_QUARANTINED, ())])
        return (self._counted(counts), self._decoded(unfinished, "job"), self._dead_entries(dead),
                [tuple(row) for row in quarantined])

    # -- dead and quarantined rows ----------------------------------------------------

    def requeue_dead(self, ids: Optional[Iterable[str]] = None) -> int:
        """Dead jobs (all, or those of ``ids``) back to ready with retries and crashes reset; returns how many.

        They run after the next ``load_all`` (the next start of a queue on this file).
        """
        return self._change_dead(f"UPDATE {_TABLE} SET state = 'ready', retries = 0, crashes = NULL, "
                                 "reason = NULL WHERE state = 'dead'", ids)

    def purge_dead(self, ids: Optional[Iterable[str]] = None) -> int:
        """Delete dead rows (all, or those of ``ids``); returns how many."""
        return self._change_dead(f"DELETE FROM {_TABLE} WHERE state = 'dead'", ids)

    def purge_quarantined(self) -> int:
        """Delete every quarantined (corrupt) row; returns how many."""
        return self._change(lambda conn: conn.execute(f"DELETE FROM {_TABLE} WHERE state = 'corrupt'").rowcount)

    def _change_dead(self, sql: str, ids: Optional[Iterable[str]]) -> int:
        if ids is None:
            return self._change(lambda conn: conn.execute(sql).rowcount)
        # An id no stored job can have counts 0, as an unknown id.
        chosen = [(job_id,) for job_id in _dead_job_ids(ids) if job_id and _storable(job_id)]
        return self._change(lambda conn: conn.executemany(sql + " AND id = ?", chosen).rowcount)

    def _change(self, work: Callable[[sqlite3.Connection], int]) -> int:
        self._check_usable()
        with shield(), section(self._commit_lock, "the store"):
            self._check_usable()
            return self._in_transaction(self._conn, work, "changing dead rows")
