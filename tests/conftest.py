"""The ``core`` fixture: every core test runs against both twins.

``pure`` is ``tinymq._core_py`` (the specification); ``compiled`` is
``tinymq._core``. The compiled param is skipped when TINYMQ_NO_EXTENSIONS=1,
or when the extension cannot be imported (not built) -- except under
TINYMQ_REQUIRE_EXTENSIONS=1, where a missing extension is a test failure.
"""
import importlib
import logging
import os
import signal
import sys
import threading

import pytest

PURE_CORE = "tinymq._core_py"
COMPILED_CORE = "tinymq._core"


def env_flag(name):
    """The switch convention of setup.py and tinymq._pick_core: set and not "0"."""
    return os.environ.get(name, "") not in ("", "0")


def load_twin(name):
    """Import core module ``name``, or skip/fail the calling test as the environment asks."""
    if name == COMPILED_CORE:
        if env_flag("TINYMQ_NO_EXTENSIONS"):
            pytest.skip("TINYMQ_NO_EXTENSIONS=1: the compiled core is not in use")
        try:
            return importlib.import_module(name)
        except ImportError as exc:
            if env_flag("TINYMQ_REQUIRE_EXTENSIONS"):
                pytest.fail(
                    f"TINYMQ_REQUIRE_EXTENSIONS=1 but {name} cannot be imported: {exc!r}",
                    pytrace=False,
                )
            pytest.skip(f"{name} is not built ({exc}); set TINYMQ_REQUIRE_EXTENSIONS=1 to fail instead")
    return importlib.import_module(name)


@pytest.fixture(
    params=[pytest.param(PURE_CORE, id="pure"), pytest.param(COMPILED_CORE, id="compiled")]
)
def core(request):
    """The core module under test: ``tinymq._core_py`` or ``tinymq._core``."""
    return load_twin(request.param)



# --- a real redis-server (tests/_redis_server.py) ------------------------------------------

@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """One ``redis-server`` for the session, our child on a loopback port (skip/fail without it)."""
    from _redis_server import RedisServer, require_redis

    require_redis()
    server = RedisServer(str(tmp_path_factory.mktemp("redis"))).start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server):
    """The session server's URL, emptied (FLUSHALL) before the test."""
    with redis_server.client() as client:
        client.flushall()
    return redis_server.url


@pytest.fixture
def redis_client(redis_url):
    """A client of the session server (emptied before the test) that decodes replies to str."""
    import redis

    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


@pytest.fixture
def redis_backend(redis_url):
    """A fresh queue name on the shared server: ``.queue()``, ``.pair()`` (see _backends.Redis)."""
    from _backends import Redis

    made = Redis(redis_url)
    yield made
    made.close()


@pytest.fixture
def path(tmp_path):
    """A database path in the test's own directory (not created)."""
    return str(tmp_path / "jobs.db")


@pytest.fixture
def own_redis_server(tmp_path):
    """A server of the test's own, with ``appendfsync always``, that it may kill and restart."""
    from _redis_server import RedisServer, require_redis

    require_redis()
    server = RedisServer(str(tmp_path / "redis"), appendfsync="always")
    os.makedirs(server.directory)
    server.start()
    yield server
    server.stop()


def pytest_collection_modifyitems(config, items):
    """Mark every test that uses a Redis server ``redis`` (.ci/run checks that some ran)."""
    for item in items:
        if {"redis_server", "own_redis_server"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.redis)


@pytest.fixture
def tiny_switch_interval():
    """Threads switch as often as the interpreter allows: races show up within a test's run."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(old)


@pytest.fixture
def warnings_seen():
    """The messages of the WARNINGs (and worse) the ``tinymq`` logger emits during the test (a Recorder)."""
    from _helpers import Recorder

    class Seen(logging.Handler):
        def __init__(self) -> None:
            super().__init__(logging.WARNING)
            self.messages = Recorder()

        def emit(self, record: logging.LogRecord) -> None:
            self.messages.add(record.getMessage())

    handler = Seen()
    logger = logging.getLogger("tinymq")
    logger.addHandler(handler)
    yield handler.messages
    logger.removeHandler(handler)


# --- pytest-timeout's signal, past hypothesis ----------------------------------------------

class TestTimedOut(BaseException):
    """A test ran past pytest-timeout's limit (the signal method).

    pytest-timeout's own handler raises pytest's ``Failed``, which hypothesis catches as the
    test failing: it shrinks and replays the test with no timer left armed, for minutes, and the
    run hangs. Hypothesis lets a BaseException that is not ``Failed`` through at once, and pytest
    reports it as the test's failure: the run goes on to the next test.
    """

    __test__ = False  # not a test class, whatever its name


@pytest.hookimpl(tryfirst=True)
def pytest_timeout_set_timer(item, settings):
    """pytest-timeout's signal timer, raising ``TestTimedOut``; the thread method is its own."""
    if settings.method != "signal" or threading.current_thread() is not threading.main_thread():
        return None
    from pytest_timeout import dump_stacks

    def handler(signum, frame):
        __tracebackhide__ = True
        terminal = item.config.get_terminal_writer()
        terminal.sep("+", title="Timeout")
        dump_stacks(terminal)
        terminal.sep("+", title="Timeout")
        raise TestTimedOut(f"Timeout (>{settings.timeout}s) from pytest-timeout.")

    def cancel():
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)

    item.cancel_timeout = cancel  # pytest-timeout's pytest_timeout_cancel_timer calls it
    signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, settings.timeout)
    return True
