"""Findings of a newcomer following README.md from a fresh venv: the mistakes a first user makes."""
import os
import re
import subprocess
import sys

import pytest

import tinymq
from tinymq import Config, ExecutorConfig, Queue

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- a config or a function where the queue expects something else ----------------------------

# Fixed: a bare `@q.executor` (no parentheses) took the function as the job type and returned a
# decorator in its place: nothing was registered, and the mistake showed only when the jobs
# failed with "no_executor". `Queue(ExecutorConfig(...))` and `Queue(Config(...))` said
# "buffer_size must be an int, got ...". Each is now a TypeError naming the value and saying
# what to write instead.


def test_a_bare_executor_decorator_is_refused_saying_to_give_the_job_type():
    q = Queue(10)
    try:
        def send_email(job):
            pass

        with pytest.raises(TypeError, match=r"^q\.executor takes the job type first, got <function .*send_email"
                                            r".*>; write @q\.executor\(\"email\"\)"):
            q.executor(send_email)
        assert q.get_stats().executor_stats == {}
    finally:
        q.stop()


def test_an_executor_config_given_as_the_job_type_is_refused_saying_to_pass_config():
    q = Queue(10)
    try:
        config = ExecutorConfig(max_concurrent_jobs=2)
        with pytest.raises(TypeError, match=r"^q\.executor takes the job type first, got "
                                            + re.escape(repr(config)) + r"; write @q\.executor\(\"email\", config=\.\.\.\)$"):
            q.executor(config)
    finally:
        q.stop()


@pytest.mark.parametrize("job_type", [5, None, b"email"])
def test_an_executor_type_that_is_not_a_str_is_refused_at_once(job_type):
    q = Queue(10)
    try:
        with pytest.raises(TypeError, match=r"^job type must be a str, got " + re.escape(repr(job_type)) + "$"):
            q.executor(job_type)
    finally:
        q.stop()


@pytest.mark.parametrize("config, instead", [
    (Config(buffer_size=5), "pass a Config as Queue(config=...)"),
    (ExecutorConfig(max_concurrent_jobs=2),
     "an ExecutorConfig is per job type: q.register_executor(job_type, fn, config)"),
])
def test_a_config_as_the_queues_first_argument_is_refused_saying_where_it_goes(config, instead):
    with pytest.raises(TypeError, match="^" + re.escape(
            f"Queue's first argument is buffer_size (an int), got {config!r}; {instead}") + "$"):
        Queue(config)


def test_the_right_spellings_still_work():
    q = Queue(config=Config(buffer_size=5))
    try:
        @q.executor("email", config=ExecutorConfig(max_concurrent_jobs=2))
        def send_email(job):
            pass

        assert q.get_stats().executor_stats["email"].max_jobs == 2
    finally:
        q.stop()


def test_a_broker_as_the_queues_first_argument_is_refused_saying_to_pass_broker():
    class Broker:
        def _attach(self, config, dispatcher):
            raise AssertionError("not attached")

        def __repr__(self):
            return "<Broker>"

    with pytest.raises(TypeError, match=r"^Queue's first argument is buffer_size \(an int\), got <Broker>; "
                                        r"pass a broker as Queue\(broker=\.\.\.\)$"):
        Queue(Broker())


# --- the command line shows only its public commands -----------------------------------------

# Fixed: `python -m tinymq` with a mistyped command answered "invalid choice: 'statu' (choose from
# 'demo', 'status', 'requeue-dead', 'purge-dead', 'worker', '_worker-child')", offering the
# internal command that `worker` runs in each worker process. It is now parsed apart.


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "tinymq", *args], env=cli_env(), stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=60)


def cli_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    return env


@pytest.mark.parametrize("args", [["statu"], ["--help"], ["worker", "--help"], []])
def test_no_help_or_usage_error_offers_the_internal_worker_child(monkeypatch, capsys, args):
    from tinymq import __main__

    monkeypatch.setattr(__main__, "run_demo", lambda: 0)  # (no command runs the demo)
    try:
        __main__.main(args)
    except SystemExit:
        pass
    captured = capsys.readouterr()
    assert "worker-child" not in captured.out + captured.err
    if args == ["statu"]:
        assert "invalid choice: 'statu' (choose from 'demo', 'status', 'requeue-dead', 'purge-dead', 'worker')" \
            in captured.err


def test_the_worker_child_command_still_parses_its_own_arguments():
    result = run_cli("_worker-child", "--help")
    assert result.returncode == 0 and "usage: python -m tinymq _worker-child" in result.stdout, result
    result = run_cli("_worker-child", "app:queue")
    assert result.returncode == 2 and "the following arguments are required: --workers" in result.stderr, result


# --- requeue_dead / purge_dead name a bad ids argument ---------------------------------------

# Fixed: on a RedisBroker, purge_dead(5) raised "'int' object is not iterable" and
# purge_dead(b"dead-1") "job ids must be str, got 100" (its first byte), naming neither value;
# SQLitePersistence said it better. Both now check ids with one function, and a single str
# says how to give one job.

BAD_IDS = [
    (5, "ids must be an iterable of job ids, got 5"),
    (3.5, "ids must be an iterable of job ids, got 3.5"),
    (b"dead-1", "ids must be an iterable of job ids, not one bytes: b'dead-1'"),
    ("dead-1", "ids must be an iterable of job ids, not one str: 'dead-1' (for one job: ['dead-1'])"),
    ([5], "job ids must be str, got 5"),
    (("dead-1", b"x"), "job ids must be str, got b'x'"),
]


@pytest.mark.parametrize("ids, message", BAD_IDS)
def test_sqlite_requeue_and_purge_dead_name_bad_ids(tmp_path, ids, message):
    with tinymq.SQLitePersistence(str(tmp_path / "jobs.db")) as store:
        store.mark_dead(tinymq.Job("t", id="dead-1"), "retries_exhausted", None)
        for method in (store.requeue_dead, store.purge_dead):
            with pytest.raises(TypeError, match="^" + re.escape(message) + "$"):
                method(ids)
        assert [dead.job.id for dead in store.dead_jobs()] == ["dead-1"]
        assert store.purge_dead(["dead-1"]) == 1


@pytest.mark.redis
@pytest.mark.parametrize("ids, message", BAD_IDS)
def test_redis_requeue_and_purge_dead_name_bad_ids(redis_backend, ids, message):
    broker = redis_backend.broker()  # (closed by the fixture)
    for method in (broker.requeue_dead, broker.purge_dead):
        with pytest.raises(TypeError, match="^" + re.escape(message) + "$"):
            method(ids)
    assert broker.purge_dead(["dead-1"]) == 0


# --- a name that is not a str is a TypeError -------------------------------------------------

# Fixed: q.every(..., name=5), q.cron(..., name=5) and RedisBroker(url, name=5) raised ValueError
# ("must be a non-empty str, got 5") where q.unschedule(5) raises TypeError: a value of the wrong
# type is a TypeError, as everywhere else; an empty name stays a ValueError.

BAD_NAMES = [5, b"emails", ["emails"]]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_every_refuses_a_name_that_is_not_a_str_with_a_type_error(name):
    q = Queue(10)
    try:
        with pytest.raises(TypeError, match="^" + re.escape(f"schedule name must be a str, got {name!r}") + "$"):
            q.every(60, "heartbeat", name=name)
        with pytest.raises(ValueError, match="^schedule name must be a non-empty str, got ''$"):
            q.every(60, "heartbeat", name="")
        assert q.schedules() == []
    finally:
        q.stop()


@pytest.mark.parametrize("name", BAD_NAMES)
def test_cron_refuses_a_name_that_is_not_a_str_with_a_type_error(name):
    pytest.importorskip("croniter")
    q = Queue(10)
    try:
        with pytest.raises(TypeError, match="^" + re.escape(f"schedule name must be a str, got {name!r}") + "$"):
            q.cron("0 3 * * *", "cleanup", name=name)
        assert q.schedules() == []
    finally:
        q.stop()


@pytest.mark.parametrize("name", BAD_NAMES)
def test_redis_broker_refuses_a_name_that_is_not_a_str_with_a_type_error(name):
    pytest.importorskip("redis")
    from tinymq.redis import RedisBroker

    # (refused before any connection: no server is needed)
    with pytest.raises(TypeError, match="^" + re.escape(f"broker name must be a str, got {name!r}") + "$"):
        RedisBroker("redis://127.0.0.1:1/0", name=name)
    with pytest.raises(ValueError, match="^broker name must be a non-empty str, got ''$"):
        RedisBroker("redis://127.0.0.1:1/0", name="")


# --- examples/fastapi_app.py explains the warning it prints ---------------------------------

# Fixed: with a recent Starlette, `python examples/fastapi_app.py` printed a
# StarletteDeprecationWarning about httpx before its output, and nothing told a newcomer whether
# the example was broken. Its docstring now says what the warning means and how to avoid it.


def test_every_warning_the_fastapi_example_prints_is_explained_in_its_docstring():
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    import ast

    path = os.path.join(ROOT, "examples", "fastapi_app.py")
    with open(path, encoding="utf-8") as file:
        docstring = " ".join(ast.get_docstring(ast.parse(file.read())).split())
    result = subprocess.run([sys.executable, path], env=cli_env(), cwd=ROOT, stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result
    warnings = re.findall(r"^.*?(\w+Warning): (.*)$", result.stderr, re.MULTILINE)
    for category, message in warnings:
        assert f"{category}: {message}" in docstring, (category, message, docstring)


# --- status --redis with Redis unreachable: one error ------------------------------------------

# Fixed: `python -m tinymq status --redis URL --name NAME` with no Redis at URL logged the broker's
# WARNING "Redis at URL is not reachable yet (...); tinymq will keep trying" (the command keeps
# trying nothing), then its error, which named the queue but not the URL. It is now one error
# naming the URL; a long-lived RedisBroker still warns and waits.


def unreachable_url():
    import socket

    with socket.socket() as probe:  # a loopback port that nothing listens on (taken, then freed)
        probe.bind(("127.0.0.1", 0))
        return f"redis://127.0.0.1:{probe.getsockname()[1]}/0"


@pytest.mark.parametrize("command", [["status"], ["purge-dead", "--all"], ["requeue-dead", "--all"]])
def test_a_command_on_an_unreachable_redis_prints_one_error_naming_the_url(command):
    pytest.importorskip("redis")
    url = unreachable_url()
    result = run_cli(*command, "--redis", url, "--name", "emails")
    assert result.returncode == 1 and result.stdout == "", result
    [line] = result.stderr.splitlines()  # one line: no warning before the error
    assert line.startswith(f"python -m tinymq {command[0]}: error: cannot reach Redis at {url} (queue 'emails'): "), line
    assert "Connection refused" in line


def test_a_redis_broker_in_a_program_still_warns_that_redis_is_not_reachable_yet(caplog):
    pytest.importorskip("redis")
    from tinymq.redis import RedisBroker

    url = unreachable_url()
    with caplog.at_level("WARNING", logger="tinymq"):
        broker = RedisBroker(url, name="emails")
    broker.close()
    assert f"Redis at {url} is not reachable yet" in caplog.text and "tinymq will keep trying" in caplog.text


def test_a_command_on_a_redis_too_old_prints_one_error(monkeypatch, capsys):
    pytest.importorskip("redis")
    from tinymq import __main__
    from tinymq.redis import RedisBroker

    def too_old(self, deadline=None):
        raise tinymq.TinyMQError(f"tinymq needs Redis >= 6.2 (or Valkey); {self.url} runs 5.0.7")

    monkeypatch.setattr(RedisBroker, "_check_server", too_old)
    url = unreachable_url()
    assert __main__.main(["status", "--redis", url, "--name", "emails"]) == 1
    captured = capsys.readouterr()
    assert captured.err == (f"python -m tinymq status: error: cannot use Redis queue 'emails' at {url}: "
                            f"tinymq needs Redis >= 6.2 (or Valkey); {url} runs 5.0.7\n")


# --- tests/test_cli.py: alive() of a process that exits while it looks -----------------------

# Fixed: alive(pid) caught FileNotFoundError only, but reading /proc/PID/stat of a process reaped
# between the open and the read raises ProcessLookupError (ESRCH), so
# test_worker_processes_stop_when_the_supervisor_dies failed now and then (most often on the
# pure core, whose children take longer to exit) instead of seeing the process gone.


@pytest.mark.parametrize("error", [FileNotFoundError, ProcessLookupError])
def test_alive_counts_a_process_that_vanishes_while_it_is_read_as_gone(monkeypatch, error):
    import builtins

    import test_cli

    real_open = builtins.open

    def vanishing(path, *args, **kwargs):
        if str(path).startswith("/proc/") and str(path).endswith("/stat"):
            raise error(3, "No such process")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", vanishing)
    assert test_cli.alive(os.getpid()) is False
    monkeypatch.undo()
    assert test_cli.alive(os.getpid()) is True


# --- join() before start_dispatcher() says why it waits ---------------------------------------

# Fixed: a newcomer who forgets q.start_dispatcher() sees q.join() hang, silently, forever (or
# return False at its timeout): nothing runs the jobs. join() now logs a WARNING, once per queue,
# when it waits for jobs of a queue that was never started (not with a broker, where a producer
# joins while other processes run the jobs).


def join_warnings(caplog):
    return [record.getMessage() for record in caplog.records
            if record.levelname == "WARNING" and "start_dispatcher" in record.getMessage()]


def test_join_before_start_dispatcher_warns_once_that_nothing_runs_the_jobs(caplog):
    q = Queue(10)
    try:
        q.register_executor("email", lambda job: None)
        q.enqueue(tinymq.Job("email"))
        q.enqueue(tinymq.Job("email"))
        with caplog.at_level("WARNING", logger="tinymq"):
            assert q.join(timeout=0.01) is False
            assert q.join(timeout=0.01) is False
        assert join_warnings(caplog) == [
            "join() called before start_dispatcher(): nothing runs the queue's 2 unfinished jobs until "
            "start_dispatcher() is called"]
        q.start_dispatcher(1)
        assert q.join(timeout=30)
    finally:
        q.stop()


def test_join_says_nothing_when_started_or_when_there_is_nothing_to_wait_for(caplog):
    q = Queue(10)
    try:
        with caplog.at_level("WARNING", logger="tinymq"):
            assert q.join(timeout=0.01) is True  # nothing enqueued
            q.register_executor("email", lambda job: None)
            q.start_dispatcher(1)
            q.enqueue(tinymq.Job("email"))
            assert q.join(timeout=30)
        assert join_warnings(caplog) == []
    finally:
        q.stop()


# --- "1 accepted job not run" -------------------------------------------------------------------

# Fixed: stopping a queue with one job left logged "queue stopped with 1 accepted jobs not run".


@pytest.mark.parametrize("left, text", [(1, "1 accepted job not run"), (2, "2 accepted jobs not run")])
def test_the_jobs_left_at_stop_are_counted_in_good_english(caplog, left, text):
    q = Queue(10)
    for _ in range(left):
        q.enqueue(tinymq.Job("email"))
    with caplog.at_level("INFO", logger="tinymq"):
        q.stop()
    [message] = [record.getMessage() for record in caplog.records if "not run" in record.getMessage()]
    assert message == f"queue stopped with {text} (they are lost: the queue has no persistence store)"


# --- worker TARGET given as a file path ---------------------------------------------------------

# Fixed: `python -m tinymq worker myapp/jobs.py:queue` (a file path, as a newcomer types it) and
# `worker myapp.jobs` (no attribute) answered only "the target must look like
# 'package.module:queue'", and `worker myapp.jobs.py:queue` "no module named 'myapp.jobs.py'".
# Each now also says what to write.


@pytest.mark.parametrize("target, hint", [
    ("myapp/jobs.py:queue", "; write 'myapp.jobs:queue' (a module name, as for `python -m`, not a file path)"),
    ("./myapp/jobs.py:app.queue", "; write 'myapp.jobs:app.queue' (a module name, as for `python -m`, not a file path)"),
    ("myapp.jobs", "; write 'myapp.jobs:queue', with the name of the Queue in that module after the colon"),
    ("myapp/jobs.py", "; write 'myapp.jobs:queue', with the name of the Queue in that module after the colon"),
    ("my-app/jobs.py:queue", ""),
    ("myapp/jobs.py:que-ue", ""),
    ("myapp.jobs:", ""),
])
def test_a_worker_target_given_as_a_path_says_which_module_name_to_write(target, hint):
    from tinymq._worker import split_target

    with pytest.raises(ValueError) as refused:
        split_target(target)
    assert str(refused.value) == f"the target must look like 'package.module:queue', got {target!r}{hint}"


def test_a_worker_target_with_py_says_to_drop_it(tmp_path):
    (tmp_path / "myapp").mkdir()
    (tmp_path / "myapp" / "__init__.py").write_text("")
    (tmp_path / "myapp" / "jobs.py").write_text("")
    result = subprocess.run([sys.executable, "-m", "tinymq", "worker", "myapp.jobs.py:queue", "--workers", "1"],
                            cwd=str(tmp_path), env=cli_env(), stdin=subprocess.DEVNULL, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 1, result
    assert result.stderr.rstrip("\n").endswith("; write 'myapp.jobs' (a module name, without .py)"), result.stderr


@pytest.mark.parametrize("enqueued, text", [(1, "1 job was"), (2, "2 jobs were")])
def test_set_persistence_after_enqueue_counts_the_jobs_in_good_english(tmp_path, enqueued, text):
    q = Queue(10)
    try:
        for _ in range(enqueued):
            q.enqueue(tinymq.Job("email"))
        with tinymq.SQLitePersistence(str(tmp_path / "jobs.db")) as store:
            with pytest.raises(RuntimeError, match="^" + re.escape(
                    f"set_persistence() must be called before the first enqueue; {text} enqueued without a store")
                    + "$"):
                q.set_persistence(store)
    finally:
        q.stop()


# --- on_failure refuses a callback that cannot take (job, reason, exc) ----------------------------

# Fixed: q.on_failure(lambda job, reason: ...) was accepted, then failed at every failure it was
# meant to report, with an ERROR on the tinymq logger (which prints nothing until logging is
# configured): the failures went unseen. It is now refused at registration, as an executor
# that cannot be called with (job) or (job, ctx) is.


def two(job, reason):
    pass


def three(job, reason, exc):
    pass


def any_args(*args):
    pass


def with_default(job, reason, exc, extra=None):
    pass


@pytest.mark.parametrize("callback", [two, lambda: None, lambda job, reason, exc, extra: None])
def test_on_failure_refuses_a_callback_that_cannot_take_job_reason_exc(callback):
    import inspect

    q = Queue(10)
    try:
        with pytest.raises(TypeError, match="^" + re.escape(
                f"failure callback must be callable as fn(job, reason, exc); {callback!r} has the signature "
                f"{inspect.signature(callback)}") + "$"):
            q.on_failure(callback)
    finally:
        q.stop()


@pytest.mark.parametrize("callback", [three, any_args, with_default, print])
def test_on_failure_takes_what_can_be_called_with_job_reason_exc(callback):
    q = Queue(10)
    try:
        assert q.on_failure(callback) is callback
    finally:
        q.stop()
