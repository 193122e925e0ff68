"""Defects found by attack30r (session 30: the Redis broker and its command line attacked as an outsider
would: URLs and settings a user writes, other programs at the queue's keys, bad input), each with its test.
"""
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

import tinymq
from tinymq import Config, Job, Queue
from tinymq.redis import RedisBroker

from _helpers import WAIT
from test_redis_crash import fleet_factory  # noqa: F401 (a fixture)

ROOT = Path(tinymq.__file__).resolve().parent.parent


def _as_user(url, user, password):
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"{user}:{password}@{parts.hostname}:{parts.port}"))


@pytest.fixture
def acl_user(redis_client):
    """A Redis user of the session server, as a server shared with others would offer: every command
    but the ``@dangerous`` ones (INFO, CONFIG, KEYS, ...), which ``+@all -@dangerous`` leaves out."""
    redis_client.execute_command("ACL", "SETUSER", "attack30r", "on", ">s3cret", "~*", "&*", "+@all", "-@dangerous")
    yield "attack30r", "s3cret"
    redis_client.execute_command("ACL", "DELUSER", "attack30r")


# --- 1. A user denied INFO (+@all -@dangerous) could not use the queue at all -------------------------

# The first look at the server read its version with INFO, which Redis files under @dangerous: for such
# a user enqueue raised "cannot reach Redis ... (is a redis-server running there, and answering?)", the
# workers retried for ever, and `status --redis` failed. HELLO says the version too (Redis >= 6).

@pytest.mark.redis
def test_a_user_denied_info_by_its_acl_runs_jobs_and_reads_the_status(redis_url, acl_user):
    url = _as_user(redis_url, *acl_user)
    broker = RedisBroker(url, name="acl", lease=2.0)
    q = Queue(config=Config(), broker=broker)
    ran = threading.Event()
    q.register_executor("t", lambda job: ran.set())
    q.start_dispatcher(1)
    try:
        q.enqueue(Job("t", {}))
        assert ran.wait(WAIT)
        assert q.join(timeout=WAIT)
    finally:
        q.stop(timeout=WAIT)
        broker.close()
    status = subprocess.run([sys.executable, "-m", "tinymq", "status", "--redis", url, "--name", "acl", "--json"],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stderr
    assert '"jobs_succeeded": 1' in status.stdout


@pytest.mark.redis
def test_a_server_whose_version_no_command_tells_is_refused_saying_so(redis_url, monkeypatch):
    # (a user denied INFO on a Redis without HELLO: older than 6.2)
    import redis as redis_py

    from tinymq.redis import _scripts

    real = _scripts.Scripts.command

    def command(self, *args, **kwargs):
        if args[0] == "INFO":
            raise redis_py.exceptions.NoPermissionError("this user has no permissions to run the 'info' command")
        if args[0] == "HELLO":
            raise redis_py.ResponseError("unknown command 'HELLO'")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(_scripts.Scripts, "command", command)
    with pytest.raises(tinymq.TinyMQError, match=r"needs Redis >= 6.2 .* runs a version it does not tell"):
        RedisBroker(redis_url, name="old", lease=2.0)


# --- 2. A URL with an option redis-py's connections do not take ----------------------------------------

# A typo in a query option (`?socket_timout=3`), or one of another scheme (`?ssl_cert_reqs=none` on
# redis://), raised a TypeError from inside redis-py (AbstractConnection.__init__() got an unexpected
# keyword argument), not naming the URL, where every other unusable URL is a ValueError naming it.

@pytest.mark.redis
@pytest.mark.parametrize("option", ["socket_timout=3", "ssl_cert_reqs=none"])
def test_a_url_with_an_option_no_connection_takes_is_refused_naming_it(redis_url, option):
    url = redis_url.replace("127.0.0.1", "user:s3cret@127.0.0.1") + "?" + option
    with pytest.raises(ValueError, match="is not a usable Redis URL") as refused:
        RedisBroker(url, name="opt", lease=2.0)
    assert option.partition("=")[0] in str(refused.value)
    assert "s3cret" not in str(refused.value) and "***" in str(refused.value)


# --- 3. A wrong password or database was reported as a server that does not run --------------------

# A server that answered the first look with an error (invalid password, DB index out of range) made
# enqueue and cancel say "cannot reach Redis ... (is a redis-server running there, and answering?)",
# sending the user to look for a server that runs fine.

@pytest.mark.redis
@pytest.mark.parametrize("wrong", ["password", "database"])
def test_a_wrong_password_or_database_is_named_as_refused_not_as_unreachable(redis_url, acl_user, wrong):
    url = _as_user(redis_url, acl_user[0], "wrong") if wrong == "password" else redis_url[:-1] + "99"
    broker = RedisBroker(url, name="refused", lease=2.0)
    q = Queue(config=Config(), broker=broker)
    try:
        with pytest.raises(tinymq.TinyMQError) as refused:
            q.enqueue(Job("t", {}))
        assert "refused the connection" in str(refused.value)
        assert "1 job not enqueued" in str(refused.value)
        assert "is a redis-server running there" not in str(refused.value)
        with pytest.raises(tinymq.TinyMQError, match="refused the connection.*job 'x' not cancelled"):
            q.cancel("x")
    finally:
        q.stop(timeout=WAIT)
        broker.close()


# --- 4. A URL naming a read-only replica -----------------------------------------------------------

# enqueue and cancel on a replica said only "they may or may not have been enqueued; enqueue the same
# job(s) again to know", which fails the same way for ever; they say now that the URL names a replica.

@pytest.fixture
def replica_url(redis_server, tmp_path):
    from _redis_server import RedisServer

    import time

    import redis

    replica = RedisServer(str(tmp_path), extra=["--replicaof", "127.0.0.1", str(redis_server.port)]).start()
    with redis.Redis.from_url(replica.url, decode_responses=True) as client:  # (synced: no LOADING reply)
        by = time.monotonic() + WAIT
        while client.info("replication").get("master_link_status") != "up":
            assert time.monotonic() < by, "the replica did not sync with its primary"
            time.sleep(0.02)
    yield replica.url
    replica.stop()


@pytest.mark.redis
def test_enqueue_and_cancel_on_a_read_only_replica_say_to_use_its_primary(redis_url, replica_url):
    broker = RedisBroker(replica_url, name="replica", lease=2.0)
    q = Queue(config=Config(), broker=broker)
    try:
        with pytest.raises(tinymq.TinyMQError, match="is a read-only replica: give the URL of its primary"):
            q.enqueue(Job("t", {}))
        with pytest.raises(tinymq.TinyMQError, match="is a read-only replica: give the URL of its primary"):
            q.cancel("x")
    finally:
        q.stop(timeout=WAIT)
        broker.close()


# --- 5. A job key that another program overwrote with a value of another kind ----------------------

# A string (or a list) at `job:<id>` where a waiting job's hash was made every call that met its id
# fail with WRONGTYPE: the fetch (the pump retried it for ever: no job of the queue ran again), the
# move of a due delayed job (every enqueue and fetch failed), the letting out of a parked one, and a
# cancel of it. Such a job is lost now, as one whose hash was deleted: dropped, logged, counted ended.

def _overwrite(redis_client, q, job_id):
    key = q._link.scripts.key("job:" + job_id)
    redis_client.delete(key)
    redis_client.set(key, "another program's value")


@pytest.mark.redis
@pytest.mark.parametrize("where", ["ready", "delayed", "parked"])
def test_a_waiting_job_whose_key_another_program_overwrote_is_lost_and_holds_up_no_other(
        redis_url, redis_client, where, caplog):
    import time

    from tinymq import ExecutorConfig

    broker = RedisBroker(redis_url, name="overwritten", lease=2.0)
    q = Queue(config=Config(), broker=broker)
    ran, gate, blocking = [], threading.Event(), threading.Event()

    def work(job):
        ran.append(job.id)
        if job.id == "blocker":
            blocking.set()
            gate.wait(WAIT)

    q.register_executor("t", work, ExecutorConfig(max_concurrent_jobs=1))
    try:
        if where == "parked":  # (behind a running job of its type, limited to one at a time)
            q.start_dispatcher(2)
            q.enqueue(Job("t", {}, id="blocker"))
            assert blocking.wait(WAIT)
            q.enqueue(Job("t", {}, id="bad"))
            q.enqueue(Job("t", {}, id="good"))
            wait_parked = time.monotonic() + WAIT
            while not redis_client.exists(q._link.scripts.key("parked:1:t")):
                assert time.monotonic() < wait_parked
                time.sleep(0.01)
            _overwrite(redis_client, q, "bad")
            gate.set()
        else:
            run_at = time.time() + 0.2 if where == "delayed" else None
            q.enqueue(Job("t", {}, id="bad", run_at=run_at))
            _overwrite(redis_client, q, "bad")
            if run_at is not None:
                time.sleep(max(0.0, run_at - time.time()) + 0.05)
            q.enqueue(Job("t", {}, id="good"))  # (it moves the due job first)
            assert q.cancel("bad") is False  # (its id waits for the fetch that drops it)
            q.start_dispatcher(1)
        assert q.join(timeout=WAIT)
        assert "good" in ran and "bad" not in ran
        assert q.get_stats().jobs_enqueued == len(ran) + 1
        if where == "ready":  # (the fetch that dropped it logs it; a call without a reply's room, a beat later)
            by = time.monotonic() + WAIT  # (its reply may reach the pump after join() saw the count)
            while not any("job bad of Redis queue 'overwritten' is lost" in r.getMessage() for r in caplog.records):
                assert time.monotonic() < by
                time.sleep(0.01)
    finally:
        gate.set()
        q.stop(timeout=WAIT)
        broker.close()
    # the value another program wrote stays as it was
    assert redis_client.get(q._link.scripts.key("job:bad")) == "another program's value"


# --- 6. A key of the queue that another program wrote with a value of another kind ------------------

# A string at `stats`, `ready:1`, `procs`... made every call fail with Redis's own "WRONGTYPE Operation
# against a key holding the wrong kind of value script: <sha>, on @user_script:941.", naming no key:
# enqueue, get_stats(), status --redis and every worker's fetch (retried for ever). The error names it now.

@pytest.mark.redis
@pytest.mark.parametrize("suffix, kind", [("stats", "hash"), ("ready:1", "list"), ("delayed", "zset")])
def test_a_key_of_the_queue_holding_another_kind_of_value_is_named_by_the_error(redis_url, redis_client,
                                                                                 suffix, kind):
    broker = RedisBroker(redis_url, name="wrongkind", lease=2.0)
    q = Queue(config=Config(), broker=broker)
    key = broker._scripts.key(suffix)
    redis_client.set(key, "another program's value")
    named = f"Redis key {key!r} holds a string, not a {kind}: another program wrote it"
    try:
        with pytest.raises(tinymq.TinyMQError) as refused:
            q.enqueue(Job("t", {}))
        assert named in str(refused.value)
        with pytest.raises(tinymq.TinyMQError) as refused:
            q.get_stats()
        assert named in str(refused.value)
    finally:
        q.stop(timeout=WAIT)
        broker.close()


# --- 7. rediss:// to a server without TLS ---------------------------------------------------------------

# Its TLS handshake waits for ever on a plain server: enqueue said only "Redis did not answer a new
# connection within 2s ... (is a redis-server running there, and answering?)", while one runs there.

@pytest.mark.redis
def test_a_rediss_url_to_a_server_without_tls_asks_whether_it_speaks_tls(redis_url):
    broker = RedisBroker(redis_url.replace("redis://", "rediss://"), name="tls", lease=2.0)
    q = Queue(config=Config(), broker=broker)
    try:
        with pytest.raises(tinymq.TinyMQError, match=r"answering, with TLS \(rediss://\)\?"):
            q.enqueue(Job("t", {}))
    finally:
        q.stop(timeout=WAIT)
        broker.close()


@pytest.mark.redis
def test_a_dead_job_whose_key_another_program_overwrote_holds_up_no_other_dead_job(redis_url, redis_client):
    from tinymq import PermanentFailure

    broker = RedisBroker(redis_url, name="overwritten-dead", lease=2.0)
    q = Queue(config=Config(), broker=broker)

    def fail(job):
        raise PermanentFailure("no")

    q.register_executor("t", fail)
    q.start_dispatcher(1)
    try:
        for job_id in ("bad", "other"):
            q.enqueue(Job("t", {}, id=job_id))
        assert q.join(timeout=WAIT)
        _overwrite(redis_client, q, "bad")
        assert [dead.job.id for dead in broker.dead_jobs()] == ["other"]
        status = subprocess.run([sys.executable, "-m", "tinymq", "status", "--redis", redis_url,
                                 "--name", "overwritten-dead", "--json"],
                                cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert status.returncode == 0, status.stderr
        assert '"id": "other"' in status.stdout and '"id": "bad"' not in status.stdout
        assert broker.requeue_dead() == 1  # (the other one; "bad" holds no dead job)
        assert q.join(timeout=WAIT)
        assert [dead.job.id for dead in broker.dead_jobs()] == ["other"]
    finally:
        q.stop(timeout=WAIT)
        broker.close()


# --- 8. A value in the queue's bookkeeping that another program wrote --------------------------------

# A field of `stats`, `running`, `limits` that is no number, or a `ratelimits` value that is no
# "max:per", failed every call with "hash value is not an integer" or a Lua error ("user_script:270:
# attempt to perform arithmetic on local 'sep'"), and get_stats(), status and shared_executors() with a
# bare ValueError from int(): none named the key. They name it now.

@pytest.mark.redis
def test_a_counter_another_program_wrote_as_no_number_is_named_by_the_errors(redis_url, redis_client):
    broker = RedisBroker(redis_url, name="badvalue", lease=2.0)
    q = Queue(config=Config(), broker=broker)
    q.enqueue(Job("t", {}))
    redis_client.hset(broker._scripts.key("stats"), "outstanding", "abc")
    redis_client.hset(broker._scripts.key("limits"), "t", "many")
    try:
        with pytest.raises(tinymq.TinyMQError, match=r"'tmq:\{badvalue\}:stats' field 'outstanding' holds 'abc', "
                                                     "not a whole number; .*another program wrote it"):
            q.enqueue(Job("t", {}))
        with pytest.raises(tinymq.TinyMQError, match="field 'outstanding' holds 'abc'"):
            q.get_stats()
        with pytest.raises(tinymq.TinyMQError, match="field 't' holds 'many'"):
            broker.shared_executors()
    finally:
        q.stop(timeout=WAIT)
        broker.close()


@pytest.mark.redis
def test_a_rate_limit_another_program_wrote_is_named_by_the_worker_calls_that_fail_on_it(redis_url, redis_client, caplog):
    from tinymq import ExecutorConfig, RateLimit

    broker = RedisBroker(redis_url, name="badrate", lease=2.0)
    q = Queue(config=Config(), broker=broker)
    ran = threading.Event()
    q.register_executor("t", lambda job: ran.set(), ExecutorConfig(rate_limit=RateLimit(5, 1.0)))
    named = "'tmq:{badrate}:ratelimits' field 't' holds 'garbage', not a rate limit: another program wrote it"
    try:
        q.start_dispatcher(1)
        q.enqueue(Job("t", {}))
        assert ran.wait(WAIT)  # (its limit registered: sent with the first fetch)
        redis_client.hset(broker._scripts.key("ratelimits"), "t", "garbage")
        with pytest.raises(tinymq.TinyMQError) as refused:
            broker.shared_rate_limits()
        assert named in str(refused.value)
        q.enqueue(Job("t", {}))
        import time

        by = time.monotonic() + WAIT
        while not any(named in r.getMessage() for r in caplog.records):  # (the fetch's, or a settle's)
            assert time.monotonic() < by, [r.getMessage() for r in caplog.records]
            time.sleep(0.05)
    finally:
        q.stop(timeout=WAIT)
        broker.close()


# --- 9. A URL that names two databases ----------------------------------------------------------------

# redis://host/1?db=2 put the queue in database 2, silently (redis-py takes the query's), where the
# user read 1: its workers on redis://host/1 would never see its jobs.

@pytest.mark.redis
@pytest.mark.parametrize("tail", ["/1?db=2", "/?db=2&db=3"])
def test_a_url_that_names_two_databases_is_refused(redis_url, tail):
    base = redis_url.rsplit("/", 1)[0]
    with pytest.raises(ValueError, match="is not a usable Redis URL.*names more than one database"):
        RedisBroker(base + tail, name="twodb", lease=2.0)
    RedisBroker(base + "/2?db=2", name="twodb", lease=2.0).close()  # (the same one twice: no doubt)


@pytest.mark.redis
def test_status_and_the_broker_name_a_wrong_password_as_refused_not_as_unreachable(redis_url, acl_user, caplog):
    url = _as_user(redis_url, acl_user[0], "wrong")
    RedisBroker(url, name="refused", lease=2.0).close()
    assert any("refused the connection" in r.getMessage() and "not reachable" not in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]
    status = subprocess.run([sys.executable, "-m", "tinymq", "status", "--redis", url, "--name", "refused"],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert status.returncode == 1
    assert "refused the connection" in status.stderr and "cannot reach" not in status.stderr, status.stderr


# A job whose key another program overwrote while its attempt ran: the settle of its retry or of its
# failure for good failed with WRONGTYPE, and was sent again with every fetch of its process, for ever:
# no other job ran there (the reap of a dead process holding such an attempt failed alike, and with it
# every fetch of every process). Such a job is lost now.

@pytest.mark.redis
@pytest.mark.parametrize("max_retries", [1, 0], ids=["retry", "failure"])
def test_a_running_job_whose_key_another_program_overwrote_is_lost_at_its_settle(redis_url, redis_client,
                                                                                  max_retries):
    from tinymq import RetryConfig

    broker = RedisBroker(redis_url, name="overwritten-running", lease=2.0)
    q = Queue(config=Config(), broker=broker)
    ran, started, go = [], threading.Event(), threading.Event()

    def work(job):
        ran.append(job.id)
        if job.id == "bad":
            started.set()
            go.wait(WAIT)
            raise RuntimeError("it fails")

    q.register_executor("t", work)
    q.start_dispatcher(2)
    try:
        q.enqueue(Job("t", {}, id="bad", retry_config=RetryConfig(max_retries=max_retries, initial_delay=0.01)))
        assert started.wait(WAIT)
        _overwrite(redis_client, q, "bad")
        go.set()
        q.enqueue(Job("t", {}, id="good"))
        assert q.join(timeout=WAIT)
        assert ran == ["bad", "good"]
    finally:
        go.set()
        q.stop(timeout=WAIT)
        broker.close()


@pytest.mark.redis
def test_a_killed_workers_job_whose_key_another_program_overwrote_is_lost_at_the_reap(redis_url, redis_client,
                                                                                      fleet_factory):
    import time

    from test_redis_crash import producer_queue

    fleet = fleet_factory(redis_url, "overwritten-reaped", lease=1.0, max_crashes=3)
    first = fleet.start()
    q = producer_queue(redis_url, "overwritten-reaped", 1.0, 3)
    try:
        q.enqueue(Job("a", 60_000.0, id="bad"))  # (it sleeps a minute)
        by = time.monotonic() + WAIT
        while not any(line.kind == "S" and line.id == "bad" for line in fleet.lines()):
            assert time.monotonic() < by
            time.sleep(0.02)
        _overwrite(redis_client, q, "bad")
        fleet.kill(first)
        fleet.start()
        q.enqueue(Job("a", 1.0, id="good"))
        assert q.join(timeout=3 * WAIT)  # (the reap of the killed worker failed: every fetch with it)
        assert any(line.kind == "E" and line.id == "good" for line in fleet.lines())
        fleet.stop()
    finally:
        q.stop(timeout=WAIT)
