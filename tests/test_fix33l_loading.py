"""A Redis that loads its data after a restart answers every call LOADING (redis-py's BusyLoadingError,
a redis.ConnectionError) having run nothing, until it is done (session 33, helper fix33l; found by an
outside kill -9 attack). A call answered so was taken for one whose reply was lost: resent twice at
once, then "did not answer ...: they may or may not have been enqueued". Now any send answered LOADING
is sent again until the caller's deadline, and an enqueue that Redis only ever answered LOADING is
"not enqueued". The servers here load a large data set slowly (key-load-delay, Redis 7)."""
import contextlib
import os
import shutil

import pytest

from tinymq import Job
from tinymq.errors import TinyMQError

from _backends import Redis
from _redis_server import RedisServer, require_redis

KEYS = 40_000  # keys Redis loads at a restart, each after key-load-delay
# microseconds a key (40,000 sleeps at least, each a little longer): the loads measured here
QUICK_LOAD = ["--key-load-delay", "50"]  # about 6 s
SLOW_LOAD = ["--key-load-delay", "300"]  # about 16 s: more than an enqueue waits
SLOWER_LOAD = ["--key-load-delay", "1000"]  # about 45 s: more than a cancel waits (10 s)
EVENTS = ["--loading-process-events-interval-bytes", "1024"]  # (it answers, LOADING, while it loads)
TIMEOUT = 60.0  # seconds an enqueue may wait for the quick load: generous


@pytest.fixture(scope="module")
def loaded_dir(tmp_path_factory):
    """A Redis directory whose append-only data (an RDB base) holds KEYS keys."""
    require_redis()
    directory = str(tmp_path_factory.mktemp("loading-template"))
    server = RedisServer(directory).start()
    try:
        client = server.client()
        client.eval("for i = 1, tonumber(ARGV[1]) do redis.call('SET', 'filler:' .. i, redis.sha1hex(i) .. "
                    "redis.sha1hex(-i)) end", 0, KEYS)  # (values that do not compress: LOADING answered often)
        client.bgrewriteaof()
        while any(client.info("persistence")[name] for name in ("aof_rewrite_in_progress", "aof_rewrite_scheduled")):
            client.ping()  # (waits on the server, briefly)
        client.close()
    finally:
        server.stop()
    return directory


@contextlib.contextmanager
def _loading_server(loaded_dir, tmp_path, load, appendfsync="everysec"):
    """A redis-server on a copy of ``loaded_dir``, started with ``load`` (QUICK_LOAD...) and
    yielded as soon as it answers (LOADING); killed at the end."""
    directory = str(tmp_path / "redis")
    shutil.copytree(loaded_dir, directory)
    os.remove(os.path.join(directory, "redis.log"))
    server = RedisServer(directory, appendfsync=appendfsync, extra=[*load, *EVENTS])
    try:
        yield server.start(loaded=False)
    finally:
        server.kill()


def _loading(server):
    return server.client().info("persistence")["loading"] == 1


def _sends(scripts, name):
    """Wrap ``scripts.<name>``: yields the list of what each send got (a reply, or the error's class name)."""
    real = getattr(scripts, name)
    seen = []

    def call(*args, **kwargs):
        try:
            reply = real(*args, **kwargs)
        except Exception as exc:
            seen.append(type(exc).__name__)
            raise
        seen.append(reply)
        return reply

    setattr(scripts, name, call)
    return seen


@pytest.mark.redis
def test_an_enqueue_while_redis_loads_waits_for_it_and_gets_in(loaded_dir, tmp_path):
    # (SLOW_LOAD: on a loaded CI lane a quick load was over before the queue was built)
    with _loading_server(loaded_dir, tmp_path, SLOW_LOAD) as server:
        backend = Redis(server.url)
        try:
            q = backend.queue()  # (built while Redis loads: its first look at the server is answered)
            assert _loading(server)
            seen = _sends(q._link.scripts, "enqueue")
            q.enqueue(Job("t", id="one"), timeout=TIMEOUT)
            assert seen[0] == "BusyLoadingError" and seen[-1].status == "ok", seen
            assert q.get_stats().jobs_enqueued == 1
        finally:
            backend.close()


@pytest.mark.redis
def test_an_enqueue_that_redis_answers_loading_until_its_timeout_is_not_enqueued(loaded_dir, tmp_path):
    with _loading_server(loaded_dir, tmp_path, SLOW_LOAD) as server:
        backend = Redis(server.url)
        try:
            q = backend.queue()
            seen = _sends(q._link.scripts, "enqueue")
            with pytest.raises(TinyMQError) as raised:
                q.enqueue(Job("t", id="one"), timeout=1.5)
            assert len(seen) > 1 and set(seen) == {"BusyLoadingError"}, seen  # (sent again, never run)
            message = str(raised.value)
            assert "1 job not enqueued" in message and "may or may not" not in message, message
            assert "loading" in message, message
            assert _loading(server)
        finally:
            backend.close()


@pytest.mark.redis
def test_a_cancel_that_redis_answers_loading_until_its_deadline_is_not_cancelled(loaded_dir, tmp_path):
    with _loading_server(loaded_dir, tmp_path, SLOWER_LOAD) as server:
        backend = Redis(server.url)
        try:
            q = backend.queue()
            seen = _sends(q._link.scripts, "cancel")
            with pytest.raises(TinyMQError) as raised:
                q.cancel("one")
            assert set(seen) == {"BusyLoadingError"}, seen
            message = str(raised.value)
            assert "job 'one' not cancelled" in message and "may or may not" not in message, message
        finally:
            backend.close()


@pytest.mark.redis
def test_an_enqueue_whose_reply_was_lost_to_a_restart_is_sent_again_until_redis_has_loaded(loaded_dir, tmp_path):
    """kill -9 after Redis ran the enqueue (appendfsync always: it is in the append-only file), before
    its reply came; Redis restarts and loads: the resend, answered LOADING a while, gets in once
    loaded, and finds the first send applied ("again")."""
    import redis

    with _loading_server(loaded_dir, tmp_path, QUICK_LOAD, appendfsync="always") as server:
        backend = Redis(server.url)
        try:
            server.restart()  # (until loaded: the first send runs)
            server.extra = [*SLOW_LOAD, *EVENTS]  # (the reload: a quick one was over before the resends on a loaded CI lane)
            q = backend.queue()
            real = q._link.scripts.enqueue
            seen = []

            def call(*args, **kwargs):
                if not seen:
                    seen.append(("ran", real(*args, **kwargs)))
                    server.kill()
                    server.start(loaded=False)
                    raise redis.ConnectionError("Connection closed by server (the reply was lost)")
                try:
                    reply = real(*args, **kwargs)
                except redis.RedisError as exc:
                    seen.append((type(exc).__name__, None))
                    raise
                seen.append(("reply", reply))
                return reply

            q._link.scripts.enqueue = call
            q.enqueue(Job("t", id="one"), timeout=TIMEOUT)
            kinds = [kind for kind, _ in seen]
            # (the first resend may find its pooled connection broken by the kill: a lost reply again)
            assert kinds[0] == "ran" and kinds[-1] == "reply" and "TimeoutError" not in kinds, kinds
            assert kinds.count("BusyLoadingError") > 2 and kinds.count("ConnectionError") <= 1, kinds
            assert seen[-1][1].status == "again", seen  # (the first send had run)
            q._link.scripts.enqueue = real
            stats = q.get_stats()
            assert (stats.jobs_enqueued, stats.medium_queue_size) == (1, 1)
        finally:
            backend.close()


@pytest.mark.redis
def test_an_enqueue_whose_reply_was_lost_and_that_redis_then_answers_loading_to_its_timeout_may_have_got_in(
        loaded_dir, tmp_path):
    """As above, with Redis loading past the enqueue's timeout: its first send ran, so the error does
    not say "not enqueued" (a guard of the bookkeeping: only sends answered LOADING/BUSY ran nothing)."""
    import redis

    with _loading_server(loaded_dir, tmp_path, QUICK_LOAD, appendfsync="always") as server:
        backend = Redis(server.url)
        try:
            server.restart()  # (until loaded: the first send runs)
            server.extra = [*SLOWER_LOAD, *EVENTS]
            q = backend.queue()
            real = q._link.scripts.enqueue
            seen = []

            def call(*args, **kwargs):
                if not seen:
                    seen.append(real(*args, **kwargs))
                    server.kill()
                    server.start(loaded=False)
                    raise redis.ConnectionError("Connection closed by server (the reply was lost)")
                try:
                    return real(*args, **kwargs)
                except redis.RedisError as exc:
                    seen.append(type(exc).__name__)
                    raise

            q._link.scripts.enqueue = call
            with pytest.raises(TinyMQError) as raised:
                q.enqueue(Job("t", id="one"), timeout=6.0)  # (past the restart, within the load)
            assert "BusyLoadingError" in seen, seen
            message = str(raised.value)
            assert "may or may not" in message and "not enqueued" not in message, message
        finally:
            backend.close()
