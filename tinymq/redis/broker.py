"""RedisBroker: where a Queue's state lives when many processes share it.

A broker object belongs to one Queue (``Queue(..., broker=broker)``); every
process builds its own with the same ``name``. It owns the connections: a small
pool for the scripts, and the one connection a worker process blocks on while
idle (made by ``_link``). It also offers the dead-job admin calls.
"""
import logging
import math
import re
import threading
import time
import urllib.parse
from datetime import timedelta
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Union

from ..config import _count, _seconds
from ..errors import TinyMQError
from ..persistence.sqlite import DeadJob, _dead_job_ids
from ._codec import decode_job, undecodable_job
from ._scripts import Connections, Scripts, StatusReply, _waited, key_prefix

__all__ = ["RedisBroker"]

logger = logging.getLogger("tinymq")

_MIN_VERSION = (6, 2)
_POOL_SIZE = 16  # connections shared by the pump, heartbeat, timer, producers and flushing workers
_POOL_WAIT = 20.0  # seconds a thread waits for a pooled connection before it is an error
_SOCKET_TIMEOUT = 10.0  # a reply slower than this is a dead connection
_CONNECT_TIMEOUT = 2.0  # seconds to open a connection (a host that drops it: a firewall, a wrong address)
# Seconds the constructor waits for the first reply (it checks again at the first use if none came): a
# server that takes the connection and never answers (a wrong port forwarded to nothing, a frozen Redis)
# must not hold the program that builds the broker (an import) for the socket timeout.
_FIRST_LOOK_WAIT = _CONNECT_TIMEOUT
_RESENDS = 2  # tinymq resends a call whose reply was lost this often (every script is idempotent)
_RESEND_PAUSE = 0.02  # seconds before the first resend, doubling
_BUSY_PAUSE_MAX = 0.25  # seconds between two sends that Redis answered BUSY or LOADING, at most (see _call_resending)
_PAGE = 500  # ids per admin script call: bounded work in Redis
# The keys of a queue that say it is in use: counters, workers' leases, limits (a queue whose workers
# ran and that has no job or counter yet has only these last).
_IN_USE_KEYS = ("stats", "procs", "limits", "ratelimits")
# Reads: what is not UTF-8 in Redis (another program wrote it) as lone surrogates, and back as the same
# bytes; never a UnicodeDecodeError (no RedisError) in a thread that reads (see _scripts._wire).
_ENCODING_ERRORS = "surrogateescape"


def _redis() -> Any:
    try:
        import redis
    except ImportError as exc:  # pragma: no cover - the extra is missing
        raise ImportError("tinymq.redis needs redis-py: pip install 'tinymq[redis]'") from exc
    return redis


MIN_LEASE = 0.1  # seconds


class RedisBroker:
    """One queue's state in Redis (>= 6.2, or Valkey), shared by every Queue built on ``name``.

    ``lease``: seconds a process may go silent before its attempts are given
    to others (it renews every ``lease / 4``). ``max_crash_recoveries``: a job
    whose process died during it more often than this is dead ("crashed").
    """

    def __init__(self, url: str = "redis://localhost:6379/0", *, name: str,
                 lease: Union[float, timedelta] = 30.0, max_crash_recoveries: int = 3) -> None:
        redis = _redis()
        if not isinstance(url, str):
            raise TypeError(f"url must be a str, got {url!r}")
        key_prefix(name)  # checks the name
        name = str.__str__(name)  # its text: a str Enum member names the queue its value names, in every process
        lease = _seconds("lease", lease)
        if not lease >= MIN_LEASE:  # renewed every lease / 4: shorter would keep Redis busy beating
            raise ValueError(f"lease must be >= {MIN_LEASE} seconds, got {lease!r}")
        if (not isinstance(max_crash_recoveries, int) or isinstance(max_crash_recoveries, bool)):
            raise TypeError(f"max_crash_recoveries must be an int, got {max_crash_recoveries!r}")
        if max_crash_recoveries < 0:
            raise ValueError(f"max_crash_recoveries must be >= 0, got {max_crash_recoveries}")
        self.url = url
        self.name = name
        self.lease = lease
        self.max_crash_recoveries = int(max_crash_recoveries)  # (an IntEnum member: its value; scripts take ints)
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        # redis-py resends nothing by itself: tinymq resends (_call_resending), the same call with
        # the same token or fetch id, which is what makes a resend safe.
        self._no_retry: Callable[[], Any] = lambda: Retry(NoBackoff(), 0)
        try:
            parts = urllib.parse.urlsplit(url)
            database = parts.path.strip("/")
            if url.startswith(("redis://", "rediss://")) and database and not database.isdigit():
                raise ValueError(f"its database {database!r} is not a number")  # (redis-py: db 0)
            named = [database] if url.startswith(("redis://", "rediss://")) and database else []
            named += urllib.parse.parse_qs(parts.query).get("db", [])  # (redis-py takes the query's, silently)
            if len({int(db) if db.isdigit() else db for db in named}) > 1:
                raise ValueError(f"it names more than one database: {', '.join(map(repr, named))}")
            self._pool = redis.BlockingConnectionPool.from_url(
                url, max_connections=_POOL_SIZE, timeout=_POOL_WAIT, decode_responses=True,
                encoding_errors=_ENCODING_ERRORS,
                socket_timeout=_SOCKET_TIMEOUT, socket_connect_timeout=_CONNECT_TIMEOUT, retry=self._no_retry())
            connections = self._connections(_POOL_SIZE, _SOCKET_TIMEOUT)  # (made now: an option they refuse)
        except (ValueError, TypeError) as exc:  # (TypeError: a query option no connection takes, a typo)
            raise ValueError(f"url {redacted_url(url)!r} is not a usable Redis URL "
                             f"(redis://[:password@]host[:port][/db], rediss://..., unix://path): {exc}") from exc
        self._client = redis.Redis(connection_pool=self._pool)  # reads (stats, join, dead jobs)
        self._scripts = Scripts(self._client, name, connections)
        self._checked = False
        self._check_lock = threading.Lock()
        self._settings_seen: Dict[str, Optional[str]] = {}  # (see _look_at_settings)
        self._queue: Any = None  # the one Queue link this broker serves
        self._closed = False
        try:
            self._check_server(time.monotonic() + _FIRST_LOOK_WAIT)
        except redis.RedisError as exc:  # checked again at the first use that reaches it
            self._not_reachable_yet(exc)

    def _not_reachable_yet(self, exc: Exception) -> None:
        """Redis did not answer at construction: a long-lived process waits for it (the command line,
        which stops at once, reports it as its error instead)."""
        if refused(exc):
            logger.warning("Redis at %s refused the connection (%s); tinymq will keep trying (are the URL's user, "
                           "password and database right?)", redacted_url(self.url), exc)
        else:
            logger.warning("Redis at %s is not reachable yet (%s); tinymq will keep trying",
                           redacted_url(self.url), exc)

    def __repr__(self) -> str:
        return f"RedisBroker({redacted_url(self.url)!r}, name={self.name!r}, lease={self.lease!r})"

    # --- connecting ------------------------------------------------------------

    def _check_server(self, deadline: Optional[float] = None, abandoned: Optional[threading.Event] = None) -> None:
        """Once, at the first reply: refuse Redis < 6.2, warn unless maxmemory-policy is noeviction
        and appendonly is on (the jobs a server without it accepted die with it).
        ``deadline`` (monotonic; math.inf: the socket timeout's): a caller with a bound of its own
        (see _call_resending) gets redis.TimeoutError by then, were Redis silent or another
        thread's check under way, rather than waiting for it (socket timeout after socket timeout).
        ``abandoned``: once it is set, a wait under way gives up (redis.ConnectionError: see _scripts._waited)."""
        if self._checked:
            return
        wait = None if deadline is None else min(max(0.0, deadline - time.monotonic()), _SOCKET_TIMEOUT)
        if abandoned is None:
            locked = self._check_lock.acquire(timeout=-1 if wait is None else wait)
        else:  # (its wait sliced: given up once abandoned is set)
            locked = _waited(lambda seconds: self._check_lock.acquire(timeout=seconds),
                             time.monotonic() + (_SOCKET_TIMEOUT if wait is None else wait), abandoned)
        if not locked:
            raise _redis().TimeoutError("Redis has not answered the first look at its version in time")
        try:
            if self._checked:
                return
            timeout = None if deadline is None else reply_wait(deadline)
            if abandoned is not None and timeout is None:  # (its waits for a free connection and for its
                timeout = _SOCKET_TIMEOUT                 # connect are given up only with a bound: see _waited)
            version = self._server_version(timeout, abandoned)
            parts = tuple(int(x) for x in re.findall(r"\d+", version)[:2])
            if parts < _MIN_VERSION:
                raise TinyMQError(f"tinymq needs Redis >= 6.2 (or Valkey); {redacted_url(self.url)} runs {version}")
            self._look_at_settings(timeout, abandoned)
            self._checked = True
        finally:
            self._check_lock.release()

    def _server_version(self, timeout: Optional[float], abandoned: Optional[threading.Event] = None) -> str:
        """The server's version: from ``INFO``, or from ``HELLO`` (Redis >= 6) for an ACL user denied
        ``INFO`` (in the ``@dangerous`` category, which ``+@all -@dangerous`` leaves out); text without a
        number when neither says (such a user on a Redis without HELLO without arguments: older than 6.2). Any
        other error (a wrong password, a database out of range) is raised. ``abandoned``: as _check_server's."""
        redis = _redis()
        try:
            info = self._scripts.command("INFO", "server", timeout=timeout, abandoned=abandoned)
        except redis.exceptions.NoPermissionError:
            try:
                hello = self._scripts.command("HELLO", timeout=timeout, abandoned=abandoned)
            except redis.ResponseError:
                return "a version it does not tell (INFO and HELLO refused)"
            if not isinstance(hello, dict):  # (RESP2: a flat list of names and values; RESP3: a map)
                hello = dict(zip(hello[::2], hello[1::2]))
            return str(hello.get("version", "0"))
        found = re.search(r"redis_version:([^\r\n]*)", str(info))
        return found.group(1) if found else "0"

    def _look_at_settings(self, timeout: Optional[float] = None, abandoned: Optional[threading.Event] = None) -> None:
        """Warn of a setting that loses jobs (an evicting maxmemory-policy, appendonly no): at the first
        reply, and again whenever a later look (a worker process's, every _SETTINGS_LOOK, on a thread of
        its own: QueueLink._look_at_settings)
        finds it changed to such a value (a CONFIG SET, a restart with another configuration).
        ``abandoned``: once it is set, a call under way gives up (redis.ConnectionError)."""
        policy = self._config("maxmemory-policy", timeout, abandoned)
        if policy is not None and policy != "noeviction" and policy != self._settings_seen.get("maxmemory-policy"):
            logger.warning(
                "Redis at %s has maxmemory-policy %r: under memory pressure it may evict "
                "tinymq's keys and lose jobs; set maxmemory-policy noeviction", redacted_url(self.url), policy)
        appendonly = self._config("appendonly", timeout, abandoned)
        if appendonly == "no" and self._settings_seen.get("appendonly") != "no":
            logger.warning(
                "Redis at %s runs with appendonly no: if it stops or dies, the jobs it accepted since "
                "its last snapshot are lost; set appendonly yes", redacted_url(self.url))
        self._settings_seen = {"maxmemory-policy": policy, "appendonly": appendonly}

    def _config(self, name: str, timeout: Optional[float], abandoned: Optional[threading.Event] = None
                ) -> Optional[str]:
        """The server's setting ``name``; None where CONFIG is disabled (some managed services)."""
        try:
            reply = self._scripts.command("CONFIG", "GET", name, timeout=timeout, abandoned=abandoned)
        except _redis().ResponseError:
            return None
        pair = [*next(iter(reply.items()))] if isinstance(reply, dict) and reply else reply  # (RESP3: a map)
        return pair[1] if len(pair) > 1 else None  # (text: the connections decode replies)

    def _connections(self, size: int, timeout: float) -> Connections:
        """Raw connections for script calls (see Connections), set up as the pool's are."""
        redis = _redis()
        options = redis.ConnectionPool.from_url(
            self.url, decode_responses=True, encoding_errors=_ENCODING_ERRORS, socket_timeout=timeout,
            socket_connect_timeout=_CONNECT_TIMEOUT, retry=self._no_retry())
        return Connections(lambda: options.connection_class(**options.connection_kwargs), size, _POOL_WAIT)

    def _call_resending(self, call: Any, *args: Any, deadline: Optional[float] = None,
                        abandoned: Optional[threading.Event] = None) -> Any:
        """``call(*args)``, sent again (up to _RESENDS times) when the connection failed: its
        reply may have been lost after the server ran it, and every script is idempotent.
        With a ``deadline`` (monotonic; math.inf: the socket timeout's own), for a caller that
        waits: its reply is waited for until then at most (``call`` takes ``timeout=``, see
        reply_wait), and a call that got no reply in time (a frozen server) is not sent again.
        With ``abandoned`` (``call`` takes ``abandoned=``): given up once it is set (stop() began),
        redis.ConnectionError, and not sent again.

        A resend that Redis answers BUSY (busy running a script past its busy-reply-threshold:
        another program's) ran nothing, but the send before it may have: only an answer tells, so it
        is sent again once Redis answers, until the ``deadline`` (without one, or with math.inf, for
        _SOCKET_TIMEOUT from the first BUSY, as a silent server's call waits); then the BUSY error is
        raised. A first send answered BUSY is raised at once: that call certainly did not run.
        Any send that Redis answers LOADING (redis.exceptions.BusyLoadingError: it loads its data after a
        restart, for a while) ran nothing either, and loading ends by itself: it is sent again, as a
        resend answered BUSY is, whether it was the first send or not. Neither uses up a resend."""
        redis = _redis()
        pause = _RESEND_PAUSE
        resends_left = _RESENDS
        busy_by: Optional[float] = None  # (monotonic) until when a send answered BUSY or LOADING is sent again
        while True:
            try:
                wait = None if deadline is None else reply_wait(deadline)
                if abandoned is not None:  # (its waits sliced: see _scripts._waited)
                    return call(*args, timeout=_SOCKET_TIMEOUT if wait is None else wait, abandoned=abandoned)
                if wait is None:  # (the socket timeout bounds it)
                    return call(*args)
                return call(*args, timeout=wait)
            except (redis.exceptions.BusyLoadingError, redis.ResponseError) as exc:  # (before ConnectionError)
                if not isinstance(exc, redis.exceptions.BusyLoadingError) and (
                        resends_left == _RESENDS or not str(exc).startswith("BUSY")):  # (a first send: it did not run)
                    raise
                if busy_by is None:
                    busy_by = (deadline if deadline is not None and deadline < math.inf
                               else time.monotonic() + _SOCKET_TIMEOUT)
                if time.monotonic() + pause >= busy_by or (abandoned is not None and abandoned.is_set()):
                    raise
                if abandoned is None:
                    time.sleep(pause)
                elif abandoned.wait(pause):
                    raise
                pause = min(pause * 2, _BUSY_PAUSE_MAX)
                continue  # (not a lost reply: no resend of its own is used up)
            except redis.TimeoutError:
                if not resends_left or deadline is not None:
                    raise
            except redis.ConnectionError:
                if (not resends_left or (deadline is not None and time.monotonic() + pause >= deadline)
                        or (abandoned is not None and abandoned.is_set())):
                    raise
            resends_left -= 1
            time.sleep(pause)
            pause *= 2

    def _attach(self, config: Any, dispatcher: Any) -> Any:
        from ._link import QueueLink

        if self._closed:
            raise TinyMQError(f"{self!r} is closed")
        if self._queue is not None:
            raise ValueError(f"{self!r} already serves a Queue; build one RedisBroker per Queue")
        self._queue = QueueLink(self, config, dispatcher)
        return self._queue

    # --- dead jobs -------------------------------------------------------------

    def _dead_ids(self, ids: Optional[Iterable[str]]) -> List[str]:
        if ids is None:
            return list(self._client.zrange(self._scripts.key("dead"), 0, -1))
        return _dead_job_ids(ids)

    def _admin(self, what: str, call: Any, ids: Optional[Iterable[str]]) -> int:
        given = None if ids is None else _dead_job_ids(ids)  # (bad ids: TypeError, before any call)
        try:
            dead = self._dead_ids(None) if given is None else given  # (read from Redis: inside the try)
            return sum(self._call_resending(call, dead[i:i + _PAGE]) for i in range(0, len(dead), _PAGE))
        except _redis().RedisError as exc:
            raise TinyMQError(f"could not {what} on {redacted_url(self.url)}: {exc}") from exc

    def dead_jobs(self) -> List[DeadJob]:
        """Permanently failed jobs, oldest death first, with their reason and last error."""
        try:
            ids = self._dead_ids(None)
            rows: List[Any] = []
            for i in range(0, len(ids), _PAGE):
                pipe = self._client.pipeline(transaction=False)
                for job_id in ids[i:i + _PAGE]:
                    pipe.hmget(self._scripts.key("job:" + job_id), "b", "r", "e", "x")
                # (an error in a row: another program wrote a value of another kind at its key, which
                # holds no dead job, as a key without a hash does; status.lua leaves it out alike)
                rows.extend(pipe.execute(raise_on_error=False))
            for row in rows:
                if isinstance(row, Exception) and not str(row).startswith("WRONGTYPE"):
                    raise row
        except _redis().RedisError as exc:
            raise TinyMQError(f"could not list dead jobs on {redacted_url(self.url)}: {exc}") from exc
        return _dead_entries((job_id, row[0], row[1], row[2], row[3]) for job_id, row in zip(ids, rows)
                             if not isinstance(row, Exception) and row[0] is not None)

    def requeue_dead(self, ids: Optional[Iterable[str]] = None) -> int:
        """Dead jobs (all, or those of ``ids``) back to ready with retries and crashes reset; returns how many."""
        return self._admin("requeue dead jobs", self._scripts.requeue_dead, ids)

    def purge_dead(self, ids: Optional[Iterable[str]] = None) -> int:
        """Delete dead jobs (all, or those of ``ids``); returns how many."""
        return self._admin("purge dead jobs", self._scripts.purge_dead, ids)

    # --- the fleet -------------------------------------------------------------

    def in_use(self) -> bool:
        """Whether Redis holds anything of this queue name: a job or counter, a worker's lease, a limit."""
        key = self._scripts.key
        try:
            return bool(self._client.exists(*map(key, _IN_USE_KEYS)))
        except _redis().RedisError as exc:
            raise TinyMQError(f"could not read Redis queue {self.name!r}: {exc}") from exc

    def names_in_use(self, limit: int = 10) -> List[str]:
        """Up to ``limit`` names of tinymq queues on this server (sorted): those that ``in_use()`` would
        say are in use (a queue whose workers ran and that has no job or counter yet is one)."""
        if _count("limit", limit, 0) == 0:
            return []
        names = set()
        try:
            # (every key in _IN_USE_KEYS ends with "s": one scan of the keyspace, not one per key)
            for key in self._client.scan_iter(match="tmq:{*}:*s", count=1000):
                text = key.decode() if isinstance(key, bytes) else key
                name, _, suffix = text[len("tmq:{"):].partition("}:")  # (a name holds no brace)
                if suffix in _IN_USE_KEYS:
                    names.add(name)
                    if len(names) >= limit:
                        break
        except _redis().RedisError as exc:
            raise TinyMQError(f"could not list the queues at {redacted_url(self.url)}: {exc}") from exc
        return sorted(names)

    def shared_executors(self) -> Tuple[Dict[str, Tuple[int, int]], int]:
        """What every process on this name holds: ``({type: (taken, limit)}, live worker processes)``.

        ``taken``: attempts of the type holding one of its global slots (fetched to run,
        or buffered to run next, until their outcome is settled); ``limit``: its
        ``max_concurrent_jobs`` (the types some process registered). Live worker
        processes: those whose lease has not run out. ``get_stats()`` shows only this
        process's executors; this is the fleet's view (``status --redis`` prints it).
        """
        key = self._scripts.key
        try:
            pipe = self._client.pipeline(transaction=False)
            pipe.hgetall(key("limits"))
            pipe.hgetall(key("running"))
            pipe.time()
            limits, running, (seconds, microseconds) = pipe.execute()
            now_ms = seconds * 1000 + microseconds // 1000
            live = self._client.zrangebyscore(key("procs"), now_ms, "+inf")
            processes = sum("~" not in proc for proc in live)  # (not a cancel's reporter: see QueueLink.cancel)
            with self._scripts.read_as_numbers():
                executors = {job_type: (int(running.get(job_type, 0)), int(limit))
                             for job_type, limit in sorted(limits.items())}
        except _redis().RedisError as exc:
            raise TinyMQError(f"could not read the executors of Redis queue {self.name!r}: {exc}") from exc
        return executors, processes

    def shared_rate_limits(self) -> Dict[str, Tuple[int, float, int]]:
        """The global rate limits: ``{type: (max_starts, per seconds, starts in the window now)}``.

        For the types some process registered with a ``rate_limit``. The starts are
        those that count in the type's window at the server's time now: attempts that
        started less than ``per`` ago, and attempts handed out whose start is not yet
        reported (they may start any moment, so they hold their place). A type may
        start another attempt while its starts are below ``max_starts``.
        """
        key = self._scripts.key
        try:
            pipe = self._client.pipeline(transaction=False)
            pipe.hgetall(key("ratelimits"))
            pipe.time()
            limits, (seconds, microseconds) = pipe.execute()
            now_ms = seconds * 1000 + microseconds / 1000.0  # (window ends are fractional ms)
            types = sorted(limits)
            pipe = self._client.pipeline(transaction=False)
            for job_type in types:
                pipe.zcount(key("rate:" + job_type), f"({now_ms!r}", "+inf")
            starts = pipe.execute()
            rate_limits = {}
            with self._scripts.read_as_numbers():
                for job_type, counted in zip(types, starts):
                    max_starts, _, per_ms = limits[job_type].partition(":")  # as limits.lua writes it
                    rate_limits[job_type] = (int(max_starts), float(per_ms) / 1000.0, int(counted))
        except _redis().RedisError as exc:
            raise TinyMQError(f"could not read the rate limits of Redis queue {self.name!r}: {exc}") from exc
        return rate_limits

    def _status(self, shown: int, unknown_room: int) -> Tuple[StatusReply, List[DeadJob]]:
        """Every figure ``status --redis`` prints, read by one script call so that they agree
        (the separate reads above may each see another moment): the reply, and the newest ``shown``
        dead jobs decoded (all are counted). Of the due jobs, those the buffer's room takes are placed at
        their priority, the first ``unknown_room`` while no fetch has kept a buffer_size (Scripts.status)."""
        try:
            reply = self._call_resending(self._scripts.status, shown, unknown_room)
        except _redis().RedisError as exc:
            raise TinyMQError(f"could not read the status of Redis queue {self.name!r}: {exc}") from exc
        return reply, _dead_entries(reply.dead)

    # --- lifecycle ---------------------------------------------------------------

    def close(self) -> None:
        """Stop the Queue it serves (if running) and close its connections. Idempotent."""
        if self._closed:
            return
        self._closed = True
        queue = self._queue
        if queue is not None:
            queue.dispatcher.stop(True, None)
        self._pool.disconnect()
        if self._scripts.connections is not None:
            self._scripts.connections.close()

    def __enter__(self) -> "RedisBroker":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def refused(exc: BaseException) -> bool:
    """Whether a server answered the connection with an error (a wrong password, a database out of
    range): it runs, unlike one that did not answer. (Not one busy with a long script: it answers
    BUSY to all but a few commands, for now.)"""
    redis = _redis()
    return (isinstance(exc, redis.AuthenticationError)
            or isinstance(exc, redis.ResponseError) and not str(exc).startswith("BUSY"))


def reply_wait(deadline: float) -> Optional[float]:
    """How long a call may wait for its reply to be back by ``deadline`` (monotonic): None when
    the socket timeout comes first (the connection's own bound, with no extra look at the socket)."""
    left = deadline - time.monotonic()
    return None if left >= _SOCKET_TIMEOUT else max(0.0, left)


def _dead_entries(rows: Iterable[Tuple[str, str, Any, Optional[str], Optional[str]]]) -> List[DeadJob]:
    """``DeadJob`` entries of ``(id, body, retries, error, reason)`` rows; a row that cannot be decoded
    is listed with a stand-in job (undecodable_job: its body as the payload)."""
    dead = []
    for job_id, body, retries, error, reason in rows:
        try:
            job = decode_job(job_id, body, retries, error)
        except Exception:
            job = undecodable_job(job_id, body, retries, error)
        dead.append(DeadJob(job, reason or "", error or None))
    return dead


def redacted_url(url: str) -> str:
    """``url`` without its password, fit to print (messages here, and the CLI's output): the one
    before the host, and a ``password=`` in the query string, which redis-py reads as well. A URL
    that urllib cannot split (an IPv6 host's bracket left open) shows no user or password at all."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:  # (the messages that name such a URL say it is not usable: never raise here)
        scheme, separator, rest = url.partition("://")
        _, at, host = rest.rpartition("@")
        if at:
            url = f"{scheme}{separator}***@{host}"
    else:
        if parts.password is not None:
            hidden = parts.netloc.replace(f":{parts.password}@", ":***@")
            url = urllib.parse.urlunsplit(parts._replace(netloc=hidden))
    head, mark, query = url.partition("?")
    return head + mark + re.sub(r"(^|[&;])(password=)[^&;#]*", r"\1\2***", query)
