"""SQLitePersistence: the embedded durable store, on the standard library's sqlite3.

One row per job, keyed by its id, in a WAL-mode database. A row's ``state``
tells recovery what to do with it:

    ready    saved and waiting (``run_at`` in the future for a delayed job)
    running  an attempt started; still "running" at load time means the
             process died during the attempt, so the crash counts as one
    dead     failed permanently; kept with ``reason`` until purged
    corrupt  could not be decoded at load time; quarantined, never run

With ``synchronous`` OFF or NORMAL (the default), a write is appended to a
journal (``_journal.py``: one ``write()`` call, durable through a crash of the
process, like a WAL commit under NORMAL) and a background thread applies the
journal to the table in batches, one transaction each (it waits 20 ms to gather a
batch), so a row reaches the table shortly after the call, or at once with ``flush()``.

With FULL or EXTRA (or ``journal=False``) every write is committed before the
call returns. Writes from all threads then go through one connection and one
commit lock, with group commit: a thread that finds the lock taken queues its
statements, and the next lock holder commits everyone's in one transaction, so
many producers do not pay one fsync each.
"""
import json
import logging
import os
import sqlite3
import threading
import time
from collections import deque
from typing import Any, Callable, Iterable, List, NamedTuple, Optional, Sequence, Tuple, Union

from .._pick_core import codec
from ..config import RetryConfig
from ..errors import PersistenceError
from ..job import _DEFAULT_RETRY_CONFIG, Job
from . import _journal
from ._journal import DELETE, RUNNING, SAVE, SAVE_MANY
from ._protocol import Serializer
from .serializers import JSONSerializer

__all__ = ["SQLitePersistence", "DeadJob"]

logger = logging.getLogger("tinymq.persistence")

_TABLE = "tinymq_jobs"
_SCHEMA_VERSION = 1
# The order of a row tuple (the journal's format too), named in every statement: the
# columns that are NULL for most jobs come last, so a row can skip them (see _LEAN).
_COLUMNS = (
    "id", "state", "type", "priority", "run_at", "timestamp", "retries", "payload",
    "retry_config", "tags", "last_error", "reason",
)
_LEAN = codec.LEAN  # rows whose last four values are NULL insert only the first eight: ~1 us/row less
_CREATE = f"""
CREATE TABLE IF NOT EXISTS {_TABLE} (
    id           TEXT PRIMARY KEY NOT NULL,
    state        TEXT NOT NULL,      -- ready | running | dead | corrupt
    type         TEXT,
    priority     INTEGER,
    run_at       REAL,               -- Unix epoch seconds (wall clock)
    timestamp    REAL,
    retries      INTEGER,            -- failed attempts so far
    retry_config TEXT,               -- JSON object of RetryConfig fields; NULL: RetryConfig()
    tags         TEXT,               -- JSON object, NULL when empty
    last_error   TEXT,
    reason       TEXT,               -- why dead or corrupt
    payload      BLOB                -- serializer output, NULL for None
) WITHOUT ROWID
"""
# WITHOUT ROWID: the id is the key, so a save writes one b-tree instead of two.

# Each journal's watermark: written in the transaction that applies its segments, so
# recovery knows which of a dead journal's segments are already in the table.
_JOURNALS = "tinymq_journal_applied"
_CREATE_JOURNALS = f"""
CREATE TABLE IF NOT EXISTS {_JOURNALS} (
    journal TEXT PRIMARY KEY NOT NULL,  -- a journal's token (see _journal.py)
    applied INTEGER NOT NULL            -- its segments up to this number are in the table
) WITHOUT ROWID
"""
_SET_APPLIED = f"INSERT OR REPLACE INTO {_JOURNALS} VALUES (?, ?)"
_UPSERT = f"INSERT OR REPLACE INTO {_TABLE} ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})"
_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM {_TABLE}"
_DELETE = f"DELETE FROM {_TABLE} WHERE id = ?"
_MARK_RUNNING = f"UPDATE {_TABLE} SET state = 'running' WHERE id = ?"
_SYNCHRONOUS_MODES = ("OFF", "NORMAL", "FULL", "EXTRA")
# Rows per multi-row INSERT: a power of two, and smaller statements for the rest of a
# batch halve down to 1 row, so a dozen statements serve every batch size from
# sqlite3's statement cache: preparing a new 1,000-row INSERT costs as much as running
# it. Large statements also mean fewer GIL hand-offs between the journal's flusher and
# producers. Stay under SQLite's bound-variable limit (32766; 999 before 3.32).
_ROWS_PER_INSERT = 1024 if sqlite3.sqlite_version_info >= (3, 32) else 64
_RETRY_FIELDS = ("max_retries", "initial_delay", "max_delay", "backoff_multiple", "jitter")

_ready_row = codec.ready_row  # the row of a plain job in one codec call; None for any other
_MAX_BACKLOG = 100_000  # journaled writes not yet in the table, before writers wait

Statement = Tuple[str, Any, bool]  # (sql, parameters, executemany?)
Operation = Tuple[str, Any]  # a journal record: (SAVE, row), (DELETE, job_id), ...


class DeadJob(NamedTuple):
    """A job kept after failing permanently, as ``SQLitePersistence.dead_jobs()`` lists it."""

    job: Job
    reason: str  # retries_exhausted | no_executor | evicted | crashed
    error: Optional[str]


class _Unit:
    """Statements one caller needs committed together, and how that went."""

    __slots__ = ("statements", "done", "error")

    def __init__(self, statements: List[Statement]) -> None:
        self.statements = statements
        self.done = False
        self.error: Optional[BaseException] = None


def _check_id(job_id: object) -> None:
    if job_id.__class__ is not str or not job_id or not _journal.utf8(job_id):  # type: ignore[arg-type]
        raise PersistenceError(f"a job id must be a non-empty str SQLite can store, got {job_id!r}")


def _error_text(error: object) -> Optional[str]:
    if error is None or isinstance(error, str):
        return error
    if isinstance(error, BaseException):
        return f"{type(error).__name__}: {error}"
    return str(error)


class SQLitePersistence:
    """A durable job store in one SQLite file.

    ``synchronous="NORMAL"`` (the default) survives a crash of the process:
    a write is in the OS page cache when the call returns, in the journal
    (``DB-tinymq-*.log`` files beside the database) and then in the table.
    ``"FULL"`` also survives power loss, at an fsync per commit, shared by
    concurrent producers through group commit. ``journal`` defaults to on
    wherever it can keep that promise (OFF or NORMAL, a file path, ``flock()``);
    ``journal=False`` commits every write to the table before returning, for
    readers of the table that cannot wait for ``flush()``; it is several times
    slower (see bench/test_bench_durable.py).

    Several stores, in one process or in several, may open the same file;
    delivery stays at-least-once (each ``load_all`` returns every unfinished
    row in the file, and replays the journal of any process that died; so does
    opening a store). Keep the file on a local filesystem: the journal relies
    on ``flock()``, which network filesystems may only emulate.

    ``serializer`` turns payloads into stored bytes/text (JSON by default;
    see ``PickleSerializer`` for the opt-in alternative).
    """

    def __init__(
        self,
        path: Union[str, "os.PathLike[str]"],
        *,
        synchronous: str = "NORMAL",
        serializer: Optional[Serializer] = None,
        busy_timeout: float = 5.0,
        journal: Optional[bool] = None,
    ) -> None:
        if not isinstance(synchronous, str) or synchronous.upper() not in _SYNCHRONOUS_MODES:
            raise ValueError(f"synchronous must be one of {_SYNCHRONOUS_MODES}, got {synchronous!r}")
        if isinstance(busy_timeout, bool) or not isinstance(busy_timeout, (int, float)):
            raise TypeError(f"busy_timeout must be seconds (float), got {busy_timeout!r}")
        if not 0 <= busy_timeout < float("inf"):
            raise ValueError(f"busy_timeout must be a finite number >= 0, got {busy_timeout!r}")
        if serializer is None:
            serializer = JSONSerializer()
        elif not (callable(getattr(serializer, "dumps", None)) and callable(getattr(serializer, "loads", None))):
            raise TypeError(f"serializer must have dumps() and loads(), got {serializer!r}")
        self.path = os.fspath(path)
        self.synchronous = synchronous.upper()
        self._plain_file = self.path != ":memory:" and not self.path.startswith("file:")
        # Journals are named after the real path: a chdir() or a symlinked name finds the same ones.
        self._journal_base = os.path.realpath(self.path) if self._plain_file else ""
        journal_possible = self._plain_file and self.synchronous in ("OFF", "NORMAL") and _journal.SUPPORTED
        if journal is None:
            journal = journal_possible
        elif not isinstance(journal, bool):
            raise TypeError(f"journal must be True, False or None, got {journal!r}")
        elif journal and not journal_possible:
            raise ValueError(
                f"journal=True needs synchronous OFF or NORMAL, a file path and flock(); "
                f"got synchronous={self.synchronous!r}, path={self.path!r}"
            )
        self.journal = journal
        self.serializer = serializer
        self.busy_timeout = float(busy_timeout)
        self._dumps = serializer.dumps
        self._plain_json = type(serializer) is JSONSerializer  # then ready_row calls codec.json_text itself
        self._tags_json = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
        self._retry_json: dict = {}  # id(config) -> (config, json): configs are frozen and shared
        self._retry_configs: dict = {}  # json -> RetryConfig, so loading 100k jobs builds a handful
        self._insert_sql: dict = {}  # (columns, rows) -> "INSERT ... VALUES (...), (...)"
        self._closed = False
        self._abandoned: List[sqlite3.Connection] = []  # inherited across fork(): never touched again
        self._journal: Optional[_journal.Journal] = None
        self._open()

    # -- connection lifecycle ------------------------------------------------

    def _open(self) -> None:
        """(Re)build the connection, the locks and the journal for the current process.

        All or nothing: on failure the store keeps its old state (in a forked
        child, the parent's), so the next call tries again.
        """
        if self._plain_file:
            try:  # create it 0600 ourselves: sqlite3 would use 0644 (less umask)
                os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
            except OSError as exc:
                raise PersistenceError(f"cannot create persistence file {self.path!r}: {exc}") from exc
        try:
            conn = sqlite3.connect(
                self.path,
                timeout=self.busy_timeout,
                isolation_level=None,  # we issue BEGIN/COMMIT ourselves
                check_same_thread=False,  # guarded by _commit_lock instead
                uri=self.path.startswith("file:"),
            )
        except sqlite3.Error as exc:
            raise PersistenceError(f"cannot open persistence file {self.path!r}: {exc}") from exc
        try:
            try:
                # Rows are small: 1 KiB pages make each commit append a quarter of the WAL
                # bytes of the default 4 KiB (ignored for an existing file).
                conn.execute("PRAGMA page_size=1024")
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA wal_autocheckpoint=10000")  # checkpoint every ~10 MiB of WAL
                conn.execute(f"PRAGMA synchronous={self.synchronous}")
                conn.execute(_CREATE)
                conn.execute(_CREATE_JOURNALS)
                if conn.execute("PRAGMA user_version").fetchone()[0] == 0:
                    conn.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")
            except sqlite3.Error as exc:
                raise PersistenceError(f"cannot open persistence file {self.path!r}: {exc}") from exc
            self._replay_dead_journals(conn, None, "replaying the journal of a process that died")
            journal = None
            if self.journal:
                try:
                    # A writer facing a full backlog waits out two of the flusher's attempts.
                    journal = _journal.Journal(self._journal_base, self._apply, self._forget_applied,
                                               _MAX_BACKLOG, 2 * self.busy_timeout + 0.5, self._forget_journal)
                except OSError as exc:
                    raise PersistenceError(f"cannot create the journal of {self.path!r}: {exc}") from exc
        except BaseException:
            conn.close()
            raise
        # Invariant: only the holder of _commit_lock uses _conn.
        self._commit_lock = threading.Lock()
        self._pending: "deque[_Unit]" = deque()  # units waiting for the next committer
        self._conn = conn
        self._cursor = conn.cursor()  # reused by the single-statement fast path
        self._journal = journal
        self._pid = os.getpid()

    def _connection(self) -> sqlite3.Connection:
        if self._pid != os.getpid():
            # A forked child: the parent's connection (and any lock a parent
            # thread held) must never be used here. Keep it referenced so that
            # garbage collection never closes it from the child either.
            self._abandoned.append(self._conn)
            self._open()
        if self._closed:
            raise PersistenceError(f"SQLitePersistence({self.path!r}) is closed")
        return self._conn

    def close(self) -> None:
        """Apply the journal and close the connection; later calls raise PersistenceError. Idempotent.

        If the journal cannot be applied (the database refuses it), it stays on
        disk for the next ``load_all`` and this raises PersistenceError.
        """
        if self._closed:
            return
        if self._pid != os.getpid():
            self._closed = True  # the parent's connection is the parent's to close
            return
        try:
            if self._journal is not None:
                self._journal.close()
        finally:
            with self._commit_lock:
                self._closed = True
                self._conn.close()

    def flush(self) -> None:
        """Return once every write made before the call is in the table (a no-op without journal)."""
        self._connection()
        if self._journal is not None:
            self._journal.flush()

    def __enter__(self) -> "SQLitePersistence":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SQLitePersistence({self.path!r}, synchronous={self.synchronous!r}, journal={self.journal})"

    # -- rows ------------------------------------------------------------------

    def _row(self, job: Job, state: str = "ready", reason: Optional[str] = None,
             last_error: Optional[str] = None) -> tuple:
        """The row for ``job``: plain values only, checked here so that no bad row is ever accepted."""
        if state == "ready":  # most rows: a plain job's, built in one codec call
            row = _ready_row(job, self._dumps, self._plain_json, _DEFAULT_RETRY_CONFIG)
            if row is not None:
                return row
        return self._general_row(job, state, reason, last_error)

    def _general_row(self, job: Job, state: str = "ready", reason: Optional[str] = None,
                     last_error: Optional[str] = None) -> tuple:
        """The row for any job, in Python (``codec.ready_row`` declines all but plain ones)."""
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
        if config is _DEFAULT_RETRY_CONFIG:
            config_text = None  # most jobs: a shorter row to log, bind and store
        else:
            cached = self._retry_json.get(id(config))
            if cached is None or cached[0] is not config:
                cached = self._remember_retry_config(config)
            config_text = cached[1]
        tags = job._tags  # not job.tags: that would give every job a dict
        tags_text: Optional[str] = None
        if tags:
            try:
                tags_text = self._tags_json(tags)
            except (TypeError, ValueError) as exc:
                raise PersistenceError(f"cannot serialise the tags of job {job.id!r}: {exc}") from exc
        job_type, run_at, timestamp, retries = job.type, job.run_at, job.timestamp, job.retries
        if last_error is None:
            last_error = job.last_error
        if (job_type.__class__ is not str or run_at.__class__ is not float or timestamp.__class__ is not float
                or retries.__class__ is not int or not 0 <= retries < _journal.INT64
                or (last_error is not None and last_error.__class__ is not str)):
            job_type, run_at, timestamp, retries, last_error = self._plain_fields(job, last_error)
        job_id = job.id
        if not (job_id.isascii() and job_type.isascii() and (payload.__class__ is not str or payload.isascii())
                and (tags_text is None or tags_text.isascii()) and (last_error is None or last_error.isascii())):
            for name, text in (("id", job_id), ("type", job_type), ("payload", payload),
                               ("tags", tags_text), ("last_error", last_error)):
                if text.__class__ is str and not _journal.utf8(text):
                    raise PersistenceError(f"job {job_id!r} cannot be stored: its {name} has text that is "
                                           f"not valid Unicode (a lone surrogate?): {text!r:.80}")
        return (
            job_id, state, job_type, int(job.priority), run_at, timestamp, retries,
            payload, config_text, tags_text, last_error, reason,
        )

    @staticmethod
    def _plain_fields(job: Job, last_error: object) -> Tuple[str, float, float, int, Optional[str]]:
        """Job fields someone set to another type, as the plain values a row holds (or PersistenceError)."""
        try:
            job_type = str.__str__(job.type)  # a str subclass (a str Enum, say): its text
            run_at, timestamp = float(job.run_at), float(job.timestamp)
        except (TypeError, ValueError) as exc:
            raise PersistenceError(f"job {job.id!r} cannot be stored: {exc}") from exc
        retries = job.retries
        if retries.__class__ is not int or not 0 <= retries < _journal.INT64:
            raise PersistenceError(f"job {job.id!r} cannot be stored: retries must be an int >= 0, got {retries!r}")
        return job_type, run_at, timestamp, retries, None if last_error is None else str(last_error)

    def _remember_retry_config(self, config: RetryConfig) -> Tuple[RetryConfig, str]:
        if len(self._retry_json) > 256:
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
        job.retries = retries
        job.last_error = last_error
        return job

    def _load_retry_config(self, text: object) -> RetryConfig:
        if text is None:
            return _DEFAULT_RETRY_CONFIG
        fields = json.loads(text)  # type: ignore[arg-type]
        if not isinstance(fields, dict) or set(fields) - set(_RETRY_FIELDS):
            raise ValueError(f"retry_config must be a JSON object of {_RETRY_FIELDS}, got {text!r}")
        config = RetryConfig(**fields)
        if len(self._retry_configs) > 256:
            self._retry_configs.clear()
        self._retry_configs[text] = config
        return config

    # -- writing, with group commit --------------------------------------------

    def _write_one(self, sql: str, parameters: Any) -> None:
        """One statement, committed before this returns (possibly with other threads' writes)."""
        self._write([(sql, parameters, False)])

    def _write(self, statements: List[Statement]) -> None:
        """Commit ``statements`` atomically, possibly in one transaction with other threads' units."""
        unit = _Unit(statements)
        self._connection()  # fork check before touching the queue or the lock
        self._pending.append(unit)
        with self._commit_lock:
            if not unit.done:  # nobody committed it for us while we waited: lead a batch
                conn = self._connection()
                pending = self._pending
                batch = [pending.popleft() for _ in range(len(pending))]
                self._commit(conn, batch)
        if unit.error is not None:
            raise PersistenceError(f"{self!r}: write failed: {unit.error}") from unit.error

    def _commit(self, conn: sqlite3.Connection, batch: List[_Unit]) -> None:
        try:
            self._execute(conn, [s for unit in batch for s in unit.statements])
        except BaseException as exc:
            if len(batch) == 1 or not isinstance(exc, sqlite3.Error):
                for unit in batch:
                    unit.error = exc
                    unit.done = True
                if not isinstance(exc, sqlite3.Error):
                    raise
                return
            for unit in batch:  # one bad unit must not fail the others: retry each alone
                try:
                    self._execute(conn, unit.statements)
                except sqlite3.Error as unit_exc:
                    unit.error = unit_exc
                unit.done = True
            return
        for unit in batch:
            unit.done = True

    @staticmethod
    def _execute(conn: sqlite3.Connection, statements: List[Statement]) -> None:
        if len(statements) == 1 and not statements[0][2]:
            conn.execute(statements[0][0], statements[0][1])  # autocommit: its own transaction
            return
        conn.execute("BEGIN IMMEDIATE")  # take the write lock now: no deadlock on upgrade
        try:
            for sql, parameters, many in statements:
                if many:
                    conn.executemany(sql, parameters)
                else:
                    conn.execute(sql, parameters)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    # -- the Persistence protocol ------------------------------------------------

    def save(self, job: Job) -> None:
        """Insert or overwrite ``job`` as ready (or delayed, by its ``run_at``)."""
        row = self._row(job)
        journal = self._journal
        if journal is not None:  # the hot path: one record (None in a forked child until reopened)
            journal.append((SAVE, row))
        elif self.journal:
            self._log((SAVE, row))
        else:
            self._write_one(_UPSERT, row)

    def save_many(self, jobs: Iterable[Job]) -> None:
        """Save every job in one transaction (or one journal record): all of them are stored, or none."""
        rows = tuple(map(self._row, jobs))
        if not rows:
            return
        if self.journal:
            self._log((SAVE_MANY, rows))
            return
        lean, full, _, _ = codec.net_effect([(SAVE_MANY, rows)])  # each id once: the last row wins
        self._write(self._insert_statements(lean, full))

    def delete(self, job_id: str) -> None:
        """Forget a finished job; an unknown id is not an error."""
        _check_id(job_id)
        self._log((DELETE, job_id)) if self.journal else self._write_one(_DELETE, (job_id,))

    def mark_running(self, job: Job) -> None:
        """An attempt starts: if the process dies now, reloading counts it as failed."""
        _check_id(job.id)
        self._log((RUNNING, job.id)) if self.journal else self._write_one(_MARK_RUNNING, (job.id,))

    def mark_dead(self, job: Job, reason: str, error: object = None) -> None:
        """Keep a permanently failed job, with why, for ``dead_jobs()``."""
        row = self._row(job, "dead", reason, _error_text(error))
        self._log((SAVE, row)) if self.journal else self._write_one(_UPSERT, row)

    # -- the journal ---------------------------------------------------------------

    def _log(self, operation: Operation) -> None:
        """Journal one operation: durable when this returns, in the table soon after."""
        journal = self._journal
        if journal is None:  # a forked child: its own connection and journal
            self._connection()
            journal = self._journal
            if journal is None:
                raise PersistenceError(f"{self!r} has no journal in this process")
        journal.append(operation)

    def _forget_journal(self) -> None:
        """In a forked child (at fork): the parent's journal is unusable; the next write reopens."""
        self._journal = None

    def _apply(self, operations: List[Operation], token: str, last_segment: int) -> None:
        """The journal's flusher: put ``operations`` into the table, and its watermark, in one transaction."""
        statements = self._statements(operations)
        statements.append((_SET_APPLIED, (token, last_segment), False))
        with self._commit_lock:
            conn = self._conn  # the journal is per process: never a parent's connection
            try:
                self._execute(conn, statements)
            except (sqlite3.Error, ValueError, TypeError, OverflowError) as exc:
                raise PersistenceError(f"{self!r}: applying the journal failed: {exc}") from exc

    def _forget_applied(self, token: str) -> None:
        """A journal's files are gone: its watermark is no longer needed."""
        with self._commit_lock:
            try:
                self._conn.execute(f"DELETE FROM {_JOURNALS} WHERE journal = ?", (token,))
            except sqlite3.Error as exc:  # a leftover row is harmless: the next replay sweeps it
                logger.warning("persistence %s: could not drop journal %s's watermark: %s", self.path, token, exc)

    def _statements(self, operations: List[Operation]) -> List[Statement]:
        """SQL for the net effect of ``operations``: one statement group per kind, each row once.

        A job saved and deleted within the batch costs one no-op DELETE, however
        many times it was written.
        """
        lean, full, deleted, running = codec.net_effect(operations)
        statements: List[Statement] = []
        if deleted:
            statements.append((_DELETE, deleted, True))
        statements.extend(self._insert_statements(lean, full))
        if running:
            statements.append((_MARK_RUNNING, running, True))
        return statements

    def _insert_statements(self, lean: list, full: list) -> List[Statement]:
        """Multi-row INSERTs of power-of-two sizes (faster than executemany, always cached).

        ``lean`` and ``full`` are flat parameter lists: rows of their first
        eight columns (the others NULL), and rows of all twelve.
        """
        statements: List[Statement] = []
        for columns, parameters in ((_LEAN, lean), (len(_COLUMNS), full)):
            rows = len(parameters) // columns
            start, size = 0, _ROWS_PER_INSERT
            while start < rows:
                while size > rows - start:
                    size >>= 1
                sql = self._insert_sql.get((columns, size))
                if sql is None:
                    values = ", ".join(["(" + ", ".join("?" * columns) + ")"] * size)
                    sql = self._insert_sql[columns, size] = (
                        f"INSERT OR REPLACE INTO {_TABLE} ({', '.join(_COLUMNS[:columns])}) VALUES {values}"
                    )
                statements.append((sql, parameters[start * columns:(start + size) * columns], False))
                start += size
        return statements

    def _replay_dead_journals(self, conn: sqlite3.Connection,
                              work: Optional[Callable[[sqlite3.Connection], Any]], what: str) -> Any:
        """One write transaction: first the journals of dead processes, then ``work(conn)``.

        A journal's segments above its watermark are applied and the watermark
        moved past them in the same transaction; the files are removed after
        the commit, so a crash at any point neither loses nor repeats a write.
        Only this thread uses ``conn``. Without ``work``, no journal to replay
        means no transaction.
        """
        found = _journal.orphans(self._journal_base) if self._plain_file else []
        if not found and work is None:
            return None
        operations: List[Operation] = []
        marks: List[Tuple[str, int]] = []
        readable = []
        for orphan in found:  # locked by us: nobody else moves these watermarks meanwhile
            try:
                row = conn.execute(f"SELECT applied FROM {_JOURNALS} WHERE journal = ?", (orphan.token,)).fetchone()
                applied = -1 if row is None else row[0]
                records = [op for number, path in orphan.segments if number > applied
                           for op in _journal.read_segment(path, len(_COLUMNS))]
            except (PersistenceError, OSError, sqlite3.Error) as exc:
                logger.error("persistence %s: journal %s left in place, not replayed: %s", self.path, orphan.token, exc)
                _journal.release(orphan)
                continue
            readable.append(orphan)
            operations.extend(records)
            if orphan.segments:
                marks.append((orphan.token, max(applied, orphan.segments[-1][0])))
        if operations:
            logger.warning("persistence %s: replaying %d journaled writes of %d process(es) that died",
                           self.path, len(operations), len(readable))

        def replay_then_work(conn: sqlite3.Connection) -> Any:
            for sql, parameters, many in self._statements(operations):
                (conn.executemany if many else conn.execute)(sql, parameters)
            conn.executemany(_SET_APPLIED, marks)
            return None if work is None else work(conn)

        try:
            result = self._in_transaction(conn, replay_then_work, what)
        except BaseException:
            for orphan in readable:
                _journal.release(orphan)  # keep the files for the next attempt
            raise
        for orphan in readable:
            _journal.remove(orphan)
        if readable:
            self._sweep_watermarks(conn)
        return result

    def _sweep_watermarks(self, conn: sqlite3.Connection) -> None:
        """Drop the watermarks of journals whose files are all gone (a crash's leftovers included).

        The lock files are listed inside the write transaction: a journal names
        its lock file before its first apply, and that apply needs this lock.
        """
        def sweep(conn: sqlite3.Connection) -> None:
            live = _journal.tokens(self._journal_base)
            conn.execute(f"DELETE FROM {_JOURNALS} WHERE journal NOT IN ({', '.join('?' * len(live))})", live)

        try:
            self._in_transaction(conn, sweep, "dropping old journal watermarks")
        except PersistenceError as exc:  # harmless leftovers: the next replay tries again
            logger.warning("persistence %s: %s", self.path, exc)

    def _in_transaction(self, conn: sqlite3.Connection, work: Callable[[sqlite3.Connection], Any],
                        what: str) -> Any:
        """Run ``work(conn)`` in one write transaction; the caller holds _commit_lock."""
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = work(conn)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise PersistenceError(f"{self!r}: {what} failed: {exc}") from exc
        return result

    def load_all(self) -> List[Job]:
        """Every job to run, oldest first; recovers crashed attempts and quarantines bad rows.

        In one write transaction: a row still "running" (its process died
        during an attempt) has the crash counted as a failed attempt, and
        becomes dead (reason "crashed") once that uses up its retries. A row
        that cannot be decoded becomes "corrupt", is logged, and is skipped.
        """
        self.flush()
        for journal in _journal.live_on(self._journal_base):  # other stores of this process, same file
            if journal is not self._journal:
                journal.flush()
        with self._commit_lock:
            return self._replay_dead_journals(self._connection(), self._recover, "load_all")  # type: ignore[no-any-return]

    def _recover(self, conn: sqlite3.Connection) -> List[Job]:
        rows = conn.execute(
            f"{_SELECT} WHERE state NOT IN ('dead', 'corrupt') ORDER BY timestamp"
        ).fetchall()
        jobs: List[Job] = []
        corrupt: List[Tuple[str, Any]] = []
        crashed: List[Tuple[Any, ...]] = []
        for row in rows:
            state = row[1]
            try:
                if state not in ("ready", "running"):
                    raise ValueError(f"unknown state {state!r}")
                job = self._job(row)
            except Exception as exc:
                logger.error(
                    "persistence %s: quarantined corrupt job row %r: %s: %s",
                    self.path, row[0], type(exc).__name__, exc,
                )
                corrupt.append((f"corrupt: {type(exc).__name__}: {exc}", row[0]))
                continue
            if state == "running":
                job.retries += 1
                job.last_error = (
                    f"the process died during an attempt (recovered by pid {os.getpid()} "
                    f"at {time.strftime('%Y-%m-%dT%H:%M:%S%z')})"
                )
                if job.retries > job.retry_config.max_retries:
                    logger.error(
                        "persistence %s: job %r (type %r) crashed its process %d times; "
                        "kept as dead with reason 'crashed'", self.path, job.id, job.type, job.retries,
                    )
                    crashed.append(("dead", "crashed", job.retries, job.last_error, job.id))
                    continue
                crashed.append(("ready", None, job.retries, job.last_error, job.id))
            jobs.append(job)
        if corrupt:
            conn.executemany(f"UPDATE {_TABLE} SET state = 'corrupt', reason = ? WHERE id = ?", corrupt)
        if crashed:
            conn.executemany(
                f"UPDATE {_TABLE} SET state = ?, reason = ?, retries = ?, last_error = ? WHERE id = ?",
                crashed,
            )
        return jobs

    # -- dead and quarantined rows ---------------------------------------------------

    def dead_jobs(self) -> List[DeadJob]:
        """Permanently failed jobs, oldest first, with their reason and last error."""
        rows = self._read(f"{_SELECT} WHERE state = 'dead' ORDER BY timestamp")
        dead = []
        for row in rows:
            try:
                dead.append(DeadJob(self._job(row), row[11], row[10]))
            except Exception as exc:
                logger.error("persistence %s: dead job row %r cannot be decoded: %s", self.path, row[0], exc)
        return dead

    def purge_dead(self) -> int:
        """Delete every dead row; returns how many."""
        return self._purge("dead")

    def quarantined(self) -> List[Tuple[str, str]]:
        """``(job id, why)`` for every row quarantined as corrupt."""
        return [tuple(row) for row in self._read(f"SELECT id, reason FROM {_TABLE} WHERE state = 'corrupt'")]

    def purge_quarantined(self) -> int:
        """Delete every quarantined (corrupt) row; returns how many."""
        return self._purge("corrupt")

    def _read(self, sql: str) -> list:
        self.flush()
        with self._commit_lock:
            conn = self._connection()
            try:
                return conn.execute(sql).fetchall()
            except sqlite3.Error as exc:
                raise PersistenceError(f"{self!r}: read failed: {exc}") from exc

    def _purge(self, state: str) -> int:
        self.flush()
        with self._commit_lock:
            conn = self._connection()
            try:
                return conn.execute(f"DELETE FROM {_TABLE} WHERE state = ?", (state,)).rowcount
            except sqlite3.Error as exc:
                raise PersistenceError(f"{self!r}: purge of {state} rows failed: {exc}") from exc
