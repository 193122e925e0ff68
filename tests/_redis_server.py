"""A real ``redis-server`` for the tests: started as our child, on loopback, in a temp dir.

The server never starts by itself in a container, so the tests own it: they
know its pid, can ``kill -9`` it and start it again on the same directory
(``restart``), which replays its append-only file.

``redis-server`` (Debian's package) and redis-py must be installed. Without
them the Redis tests are skipped, except under ``TINYMQ_REQUIRE_REDIS=1``
(set by ``.ci/run``), where they fail: CI never passes with them skipped.
"""
import os
import shutil
import signal
import socket
import subprocess
import contextlib
import time
from typing import Iterator, List, Optional

import pytest

START_TIMEOUT = 15.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def redis_available() -> Optional[str]:
    """None when the Redis tests can run; otherwise why not."""
    if shutil.which("redis-server") is None:
        return "redis-server is not installed (Debian: apt-get install redis-server)"
    try:
        import redis  # noqa: F401
    except ImportError:
        return "redis-py is not installed (pip install 'tinymq[redis]')"
    return None


def require_redis() -> None:
    """Skip the calling test without Redis, or fail it under TINYMQ_REQUIRE_REDIS=1."""
    why = redis_available()
    if why is None:
        return
    if os.environ.get("TINYMQ_REQUIRE_REDIS", "") not in ("", "0"):
        pytest.fail(f"TINYMQ_REQUIRE_REDIS=1 but {why}", pytrace=False)
    pytest.skip(why)


class RedisServer:
    """One ``redis-server`` process with an append-only file in ``directory``."""

    def __init__(self, directory: str, *, appendfsync: str = "everysec",
                 extra: Optional[List[str]] = None) -> None:
        self.directory = directory
        self.appendfsync = appendfsync
        self.extra = list(extra or [])
        self.port = 0
        self.process: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, loaded: bool = True) -> "RedisServer":
        """Start (or start again, on the same port and directory) and wait until it answers: until it
        has loaded its data, or (``loaded=False``) until it answers at all (LOADING while it loads)."""
        assert self.process is None or self.process.poll() is not None, "already running"
        for _ in range(5):  # another program may take a free port before we bind it
            if not self.port:
                self.port = _free_port()
            self.process = subprocess.Popen(
                ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                 "--dir", self.directory, "--save", "", "--appendonly", "yes",
                 "--appendfsync", self.appendfsync, "--maxmemory-policy", "noeviction",
                 "--daemonize", "no", "--logfile", os.path.join(self.directory, "redis.log"),
                 *self.extra],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            if self._wait_until_up(loaded):
                return self
            self.kill()
            self.port = 0
        raise RuntimeError(f"redis-server did not start; see {self.directory}/redis.log")

    def _wait_until_up(self, loaded: bool = True) -> bool:
        import redis

        from redis.backoff import NoBackoff
        from redis.retry import Retry

        deadline = time.monotonic() + START_TIMEOUT
        # (no retries of redis-py's own: by default redis-py 6+ sends a call answered LOADING again,
        # up to 10 times over about 4 s, which start(loaded=False) is here to see at once)
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1.0, retry=Retry(NoBackoff(), 0))
        try:
            while time.monotonic() < deadline:
                if self.process is None or self.process.poll() is not None:
                    return False  # it exited: port taken, bad option
                try:
                    if client.ping() and client.info("persistence").get("loading", 0) == 0:
                        return True
                except redis.BusyLoadingError:
                    if not loaded:
                        return True
                except (redis.ConnectionError, redis.TimeoutError):
                    pass
                time.sleep(0.01)
            return False
        finally:
            client.close()

    def kill(self) -> None:
        """``kill -9``: whatever the server had not written to its append-only file is gone."""
        process = self.process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGKILL)
            process.wait()

    @contextlib.contextmanager
    def frozen(self) -> Iterator["RedisServer"]:
        """The server SIGSTOPped for the ``with`` block (connected, silent), SIGCONTed after it,
        whatever happens."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)
        try:
            yield self
        finally:
            self.process.send_signal(signal.SIGCONT)

    def restart(self) -> "RedisServer":
        self.kill()
        return self.start()

    def stop(self) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            self.kill()

    def client(self, **options):
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, **options)
