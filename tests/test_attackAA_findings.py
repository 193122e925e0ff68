"""attackAA: the command line (``python -m tinymq worker``/``status``) and periodic jobs.

Each test is one defect found by the attack; a fixed one has lost its xfail mark.
"""
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from tinymq import Job
from tinymq._periodic import _Tick

from _helpers import WAIT, Recorder, wait_until
from test_cli import producer, project, record, shared_project  # noqa: F401 (fixtures)

pytest.importorskip("croniter")


# --- periodic jobs over a broker -------------------------------------------------------------------

def test_an_every_schedule_fires_after_a_cron_schedule_of_the_same_name(redis_backend):
    # A deploy moves schedule "report" from every() to cron() and back (a rollback): the every
    # schedule's grid is still in Redis with its interval, so schedule_begin kept it, and the
    # cron tick's claim (its time in ms, 1.7e12) was "later" than any grid index: each tick was
    # "taken". (Ticks of both kinds are claimed by their time in us now.)
    runs = Recorder()
    first = redis_backend.queue()
    first.register_executor("report", lambda job: runs.add(job.id))
    first.every(0.05, "report", name="report")
    first.start_dispatcher()
    assert runs.wait_for(1)
    first.stop()

    second = redis_backend.queue()  # the cron deploy (yearly: its one tick fires by hand)
    second.cron("0 0 1 1 *", "report", name="report")
    schedule = second._periodic._schedules["report"]
    second.start_dispatcher()
    assert wait_until(lambda: schedule.begun)
    assert second._periodic.backend.fire(schedule, _Tick(time.monotonic(), time.time(), -1)) == "fired"
    cron_job = schedule.last_job_id
    second.stop(wait=False)

    third = redis_backend.queue()  # the rollback
    third.register_executor("report", lambda job: runs.add(job.id))
    third.every(0.05, "report", name="report")
    before = len(runs.items)  # nothing runs the cron tick's job before this start
    third.start_dispatcher()
    assert runs.wait_until(lambda ids: len([i for i in ids[before:] if i != cron_job]) >= 2), \
        third.schedules()


# --- python -m tinymq worker --------------------------------------------------------------------

# A job that ends its worker process with exit code 3 (os._exit(3): a C library's exit(3), a
# job's own os._exit): a crash, which the supervisor restarts.
EXITING = textwrap.dedent("""
    import os
    from app.shared import queue

    @queue.executor("exit")
    def leave(job):
        os._exit(job.payload)
""")


def test_a_job_that_exits_its_worker_process_with_code_3_is_a_crash(shared_project, producer, project):
    from test_cli import TIMEOUT

    (project / "app" / "exiting.py").write_text(EXITING)
    worker = shared_project("app.exiting:queue", "--processes", 2, "--workers", 1)
    worker.wait_for(r"worker process started", count=2)
    producer.enqueue(Job("exit", 3, id="exit-3"))
    worker.wait_for(r"worker process \d \(pid \d+\) exited with code 3; starting it again in 0.5 s")
    worker.wait_for(r"started worker process \d \(pid \d+\)", count=3)
    worker.signal(signal.SIGTERM)
    assert worker.wait(TIMEOUT) == 0, worker.log()


# Loads for the supervisor's check, then cannot be imported in a worker process (broken code
# deployed meanwhile): that is no crash to restart.
BROKEN_LATER = textwrap.dedent("""
    import sys
    from app.shared import queue

    if "--check" not in sys.argv:
        raise RuntimeError("deployed broken")
""")


def test_a_worker_process_that_cannot_load_the_target_still_stops_them_all(shared_project, project):
    # The guard of the fix above: exit code 3 before the target loaded is still a bad target.
    from test_cli import TIMEOUT

    (project / "app" / "broken_later.py").write_text(BROKEN_LATER)
    worker = shared_project("app.broken_later:queue", "--processes", 2, "--workers", 1)
    assert worker.wait(TIMEOUT) == 1, worker.log()
    assert "RuntimeError: deployed broken" in worker.log()
    assert re.search(r"worker process \d \(pid \d+\) could not load 'app.broken_later:queue'", worker.log())
    assert "starting it again" not in worker.log()


# --- a worker process whose start_dispatcher fails ---------------------------------------------

@pytest.mark.parametrize("started", [0, 2])
def test_stop_returns_after_start_dispatcher_failed_to_start_a_thread(monkeypatch, started):
    # `worker --workers 100000`, or a container's pids limit: the thread after `started` cannot
    # start. The worker process then exits through the exit hook's stop(wait=True), which hung,
    # SIGTERM-proof: the supervisor waited for it forever.
    import threading

    from tinymq import Queue

    q = Queue()
    q.register_executor("x", lambda job: None)
    real_start = threading.Thread.start
    starts = []

    def start(thread):
        starts.append(thread.name)
        if len(starts) > started:
            raise RuntimeError("can't start new thread")
        real_start(thread)

    monkeypatch.setattr(threading.Thread, "start", start)
    with pytest.raises(RuntimeError, match="can't start new thread"):
        q.start_dispatcher(4)
    monkeypatch.setattr(threading.Thread, "start", real_start)
    stopper = threading.Thread(target=q.stop, daemon=True)
    stopper.start()
    stopper.join(WAIT)
    assert not stopper.is_alive(), "stop() hangs"


# Loads at once for the supervisor's check; a worker process's import then hangs (a resource
# it waits for at import went away): it says so in Redis list "importing" first.
HANGING = textwrap.dedent("""
    import os, sys, threading
    import redis
    from app.shared import queue

    if "--check" not in sys.argv:
        redis.Redis.from_url(os.environ["TINYMQ_TEST_REDIS"]).rpush("importing", os.getpid())
        threading.Event().wait()
""")


def test_sigterm_stops_a_worker_process_whose_import_hangs(shared_project, project, record):
    from test_cli import TIMEOUT

    (project / "app" / "hanging.py").write_text(HANGING)
    worker = shared_project("app.hanging:queue", "--processes", 1, "--workers", 1)
    assert record.blpop(["importing"], timeout=TIMEOUT) is not None
    worker.signal(signal.SIGTERM)  # nothing of the queue started in it: nothing to wait for
    try:
        code = worker.wait(20)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the supervisor still waits 20 s after SIGTERM; log:\n{worker.log()}")
    assert code == 0, worker.log()
    assert "stopping (SIGTERM) while loading the target" in worker.log()


# The user's module handles a signal of its own (a debug dump, a log reopen on SIGHUP...).
OWN_SIGNAL = textwrap.dedent("""
    import os, signal
    import redis
    from app.shared import queue

    record = redis.Redis.from_url(os.environ["TINYMQ_TEST_REDIS"])
    signal.signal(signal.SIGUSR1, lambda number, frame: record.rpush("usr1", os.getpid()))
""")


def test_a_signal_that_the_users_module_handles_does_not_stop_a_worker_process(shared_project, project,
                                                                                 producer, record):
    from test_cli import TIMEOUT, pop

    (project / "app" / "own_signal.py").write_text(OWN_SIGNAL)
    worker = shared_project("app.own_signal:queue", "--processes", 1, "--workers", 1)
    worker.wait_for(r"worker process started")
    child = worker.children()[0]
    os.kill(child, signal.SIGUSR1)
    assert record.blpop(["usr1"], timeout=TIMEOUT)[1] == str(child)  # the module's handler ran
    producer.enqueue(Job("record", {}, id="after-usr1"))
    assert pop(record, "finished", 1) == [("after-usr1", child)]  # the same process, still running
    assert "stopping" not in worker.log() and "starting it again" not in worker.log(), worker.log()
    worker.signal(signal.SIGTERM)
    assert worker.wait(TIMEOUT) == 0, worker.log()


# The user's module starts a thread of its own at import, not a daemon, that nothing ever stops.
NON_DAEMON = textwrap.dedent("""
    import threading
    from app.shared import queue

    threading.Thread(target=threading.Event().wait, name="user-poller").start()
""")


@pytest.mark.parametrize("how", ["sigterm", "supervisor killed"])
def test_a_worker_process_exits_after_its_stop_whatever_threads_its_module_started(shared_project, project,
                                                                                   how):
    from test_cli import TIMEOUT, alive, eventually

    (project / "app" / "non_daemon.py").write_text(NON_DAEMON)
    worker = shared_project("app.non_daemon:queue", "--processes", 1, "--workers", 1)
    worker.wait_for(r"worker process started")
    child = worker.children()[0]
    if how == "sigterm":
        worker.signal(signal.SIGTERM)
        try:
            code = worker.wait(20)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the supervisor still waits 20 s after SIGTERM; log:\n{worker.log()}")
        assert code == 0, worker.log()
    else:  # kill -9: the worker process stops by itself, and must not stay behind for ever
        worker.process.kill()
        worker.wait_for(r"worker process stopped")
        eventually(lambda: not alive(child), "exited", timeout=20)
    worker.wait_for(r"exiting without waiting for thread\(s\) 'user-poller'")  # said why


# --- python -m tinymq status ---------------------------------------------------------------------

def test_status_tables_show_one_line_per_job_and_no_control_characters(tmp_path):
    # Ids and types come from whoever enqueues (say, "report-<user input>"); the tables are for a
    # terminal: what is not printable is shown escaped, as the last error is shown on one line.
    from test_cli import cli

    from tinymq import Queue, SQLitePersistence

    path = tmp_path / "jobs.db"
    store = SQLitePersistence(str(path))
    q = Queue()
    q.set_persistence(store)
    q.enqueue(Job("t\x1b[31mred", 1, id="line1\nline2"))
    q.enqueue(Job("tab\tbed", 1, id="bell\x07\x1b[2Jclear"))
    q.start_dispatcher()
    assert q.join(WAIT)  # both dead: no executor
    q.stop()
    store.close()
    result = cli("status", "--db", path)
    assert result.returncode == 0, result.stderr
    assert not any(not char.isprintable() for char in result.stdout.replace("\n", "")), repr(result.stdout)
    rows = result.stdout.split("dead jobs: 2\n")[1].splitlines()
    assert len(rows) == 2 + 2, rows  # header, rule, one line per dead job
    assert "line1\\nline2" in rows[2] + rows[3] and "\\x1b[2J" in rows[2] + rows[3]


def test_a_worker_process_that_cannot_be_started_is_tried_again_later(shared_project, monkeypatch):
    # Each worker process costs the supervisor two descriptors: with a low limit on open files,
    # some cannot start (as when the system runs out of processes or memory for a fork).
    import resource

    import test_cli
    from test_cli import TIMEOUT

    real_popen = subprocess.Popen

    def low_file_limit(*args, **kwargs):
        kwargs["preexec_fn"] = lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (24, 24))
        return real_popen(*args, **kwargs)

    monkeypatch.setattr(test_cli.subprocess, "Popen", low_file_limit)
    worker = shared_project("app.shared:queue", "--processes", 12, "--workers", 1)
    monkeypatch.setattr(test_cli.subprocess, "Popen", real_popen)
    worker.wait_for(r"could not start worker process \d+ \(.*Too many open files.*\); trying again in 0.5 s")
    worker.wait_for(r"worker process started")  # those that could start run
    worker.signal(signal.SIGTERM)
    assert worker.wait(TIMEOUT) == 0, worker.log()
    assert "Traceback" not in worker.log()


def test_status_of_a_redis_queue_claims_no_delayed_cap_it_cannot_know(redis_url):
    """It reported max_delayed_jobs from the default Config of its own never-started Queue
    (10000, while the shared queue evicted at 5); the shared queue's is nowhere in Redis
    (each enqueuing process's Config sets it): the report says null, the text nothing."""
    import json

    from test_cli import cli

    from tinymq import Config, Queue
    from tinymq.redis import RedisBroker

    q = Queue(config=Config(max_delayed_jobs=5), broker=RedisBroker(redis_url, name="capped"))
    try:
        q.register_executor("x", lambda job: None)
        q.start_dispatcher()
        for number in range(7):  # the cap evicts two
            q.enqueue(Job("x", number, run_at=time.time() + 3600))
        assert q.get_stats().delayed_jobs_count == 5
        result = cli("status", "--redis", redis_url, "--name", "capped", "--json")
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert report["counts"]["delayed"] == 5 and report["counts"]["dead"] == 2
        assert report["max_delayed_jobs"] is None  # it said 10000: 5 delayed jobs evict already
        text = cli("status", "--redis", redis_url, "--name", "capped")
        assert text.returncode == 0 and "at most" not in text.stdout, text.stdout
    finally:
        q.stop()
        q.broker.close()


def test_an_every_schedule_keeps_firing_after_a_cron_process_of_the_same_name_claimed_a_tick(redis_backend):
    # A rolling rollback from cron to every: for a moment old (cron) and new (every) processes run
    # together. Once the old ones are gone, the every schedule must fire.
    runs = Recorder()
    every = redis_backend.queue()
    every.register_executor("report", lambda job: runs.add(job.id))
    every.every(0.05, "report", name="report")
    every.start_dispatcher()
    assert runs.wait_for(1)

    cron = redis_backend.queue()  # an old process, still running: one of its ticks (by hand)
    cron.cron("0 0 1 1 *", "report", name="report")
    schedule = cron._periodic._schedules["report"]
    cron.start_dispatcher()
    assert wait_until(lambda: schedule.begun)
    # "busy" while the every schedule's last job is unfinished (its ticks come every 50 ms): a tick
    # skipped as it should be; the next one by hand gets in once that job has ended.
    assert wait_until(lambda: cron._periodic.backend.fire(
        schedule, _Tick(time.monotonic(), time.time(), -1)) == "fired")
    cron_job = schedule.last_job_id
    cron.stop()

    before = len(runs.items)
    assert runs.wait_until(lambda ids: len([i for i in ids[before:] if i != cron_job]) >= 2), every.schedules()
