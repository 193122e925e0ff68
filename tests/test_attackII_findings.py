"""Attack II on today's changes (shield, deadline from the function's call, exact stats).

Three defects were found, each fixed since with its test here: the worker CLI's check
accepted a target whose import daemonises (the fork inherited --loaded-fd and said "loaded");
on_failure accepted a functools.wraps wrapper of an async def; and docs/api.md said the
interruption "never lands inside tinymq's own code", while an executor's other_queue.stop()
was cut midway, leaving that queue's event loop thread running (stop() is shielded now).

The other tests pass today (both cores) and guard what was attacked: an interrupted enqueue into
another queue's store, a killed process right after an interrupted enqueue, an executor that
catches the deferred JobTimeout and enqueues on, a deferred interruption whose block waits for
room, cancel/stop during a slow start or switch write (thread and async executors), the watchdog
with deadlines set after it slept, retries of jobs made unusable, cancel/stop during a retry's
save, recovery into a small buffer.
"""
import functools
import threading
import time

import pytest

from tinymq import Config, ExecutorConfig, JobTimeout, Job, Queue, RetryAfter, RetryConfig, SQLitePersistence

from _helpers import WAIT, LockedStore, all_accounted, stored_payloads, wait_until
from test_cli import project, shared_project  # noqa: F401 (fixtures)

INTERRUPTING = ExecutorConfig(timeout=0.3, interrupt_on_timeout=True)
LATER = 3600.0


def _tbs(exc):
    tb = exc.__traceback__
    while tb is not None:
        yield tb
        tb = tb.tb_next


def test_retry_after_a_huge_delay_with_a_store_keeps_stats_whole_and_frees_the_slot(tmp_path):
    store = SQLitePersistence(str(tmp_path / "jobs.db"))
    q = Queue(10)
    q.set_persistence(store)
    calls = []

    def flaky(job):
        calls.append(job.payload)
        if job.payload == "huge":
            raise RetryAfter(1e300)

    q.register_executor("t", flaky, ExecutorConfig(max_concurrent_jobs=1))
    q.start_dispatcher(1)
    q.enqueue(Job("t", "huge", retry_config=RetryConfig(max_retries=1)))
    assert wait_until(lambda: q.get_stats().jobs_retried + q.get_stats().jobs_failed >= 1)
    q.enqueue(Job("t", "next"))
    assert wait_until(lambda: "next" in calls), "the type's only slot was never freed"
    stats = q.get_stats()
    assert all_accounted(stats), stats
    q.stop()
    store.close()


def test_on_failure_refuses_a_wrapped_async_callback():
    q = Queue(10)

    async def report(job, reason, exc):
        pass

    @functools.wraps(report)
    def wrapper(job, reason, exc):
        return report(job, reason, exc)

    with pytest.raises(TypeError):
        q.on_failure(wrapper)


def test_an_executor_enqueue_into_another_queues_store_is_all_or_nothing(tmp_path):
    path = str(tmp_path / "b.db")
    store_b = SQLitePersistence(path)
    b = Queue(100)
    b.set_persistence(store_b)
    a = Queue(100)
    entered, locked, done = threading.Event(), threading.Event(), threading.Event()
    outcome = []

    def executor(job):
        entered.set()
        locked.wait(WAIT)
        try:
            b.enqueue(Job("report", "follow-up"))
            outcome.append("returned")
        except JobTimeout:
            outcome.append("JobTimeout")
        finally:
            done.set()

    a.register_executor("import", executor, INTERRUPTING)
    a.start_dispatcher(1)
    a.enqueue(Job("import", None, retry_config=RetryConfig(max_retries=0)))
    assert entered.wait(WAIT)
    with LockedStore(path):
        locked.set()
        assert wait_until(lambda: a.get_stats().jobs_timed_out >= 1)
    assert done.wait(WAIT)
    stats = b.get_stats()
    a.stop()
    b.stop()
    store_b.close()
    assert outcome in (["returned"], ["JobTimeout"])
    if outcome == ["returned"]:
        assert (stored_payloads(path), stats.jobs_enqueued) == (["follow-up"], 1)
    else:
        assert (stored_payloads(path), stats.jobs_enqueued) == ([], 0)


def test_an_executor_stopping_another_queue_is_not_cut_midway(tmp_path):
    """docs/api.md: the interruption waits until an executor's stop() of another queue has ended,
    as for enqueue and cancel: it is raised as stop() returns, the other queue is stopped whole
    (its threads gone: a stop() cut midway left its event loop thread running), and its stats
    and store keep every job."""
    path = str(tmp_path / "b.db")
    store_b = SQLitePersistence(path)
    b = Queue(100)
    b.set_persistence(store_b)
    b_running, b_release = threading.Event(), threading.Event()

    def slow_b(job):
        b_running.set()
        b_release.wait(WAIT)

    b.register_executor("b", slow_b)
    b.start_dispatcher(1)
    b.enqueue(Job("b", "running"))
    b.enqueue(Job("b", "waiting"))
    assert b_running.wait(WAIT)
    a = Queue(100)
    entered, done = threading.Event(), threading.Event()
    outcome, frames = [], []

    def executor(job):
        entered.set()
        try:
            b.stop(wait=True)
            outcome.append("returned")
        except JobTimeout as exc:
            outcome.append("JobTimeout")
            frames.extend(f"{tb.tb_frame.f_code.co_filename}:{tb.tb_frame.f_code.co_name}" for tb in _tbs(exc))
        finally:
            done.set()

    a.register_executor("stopper", executor, INTERRUPTING)
    a.start_dispatcher(1)
    a.enqueue(Job("stopper", None, retry_config=RetryConfig(max_retries=0)))
    assert entered.wait(WAIT)
    assert wait_until(lambda: a.get_stats().jobs_timed_out >= 1)
    b_release.set()
    assert done.wait(WAIT)
    a.stop()
    b.stop()  # whatever the executor's stop() left, this one finishes it
    stats = b.get_stats()
    store_b.close()
    assert all_accounted(stats), stats
    assert outcome == ["JobTimeout"], outcome
    assert not [f for f in frames if "tinymq/_dispatch.py" in f], frames  # raised after stop() ended
    assert not [t for t in threading.enumerate() if t.name == "tinymq-loop" and t.is_alive()]
    assert stored_payloads(path) == ["waiting"]


class SlowStartStore(SQLitePersistence):
    """mark_running waits (in the worker thread) until released."""

    def __init__(self, path):
        super().__init__(path)
        self.writing, self.release = threading.Event(), threading.Event()

    def mark_running(self, job):
        if job.payload == "slow":
            self.writing.set()
            self.release.wait(WAIT)
        return super().mark_running(job)


@pytest.mark.parametrize("interrupt", [False, True])
def test_a_cancel_during_the_start_write_ends_the_job_once_and_frees_its_slot(tmp_path, interrupt):
    store = SlowStartStore(str(tmp_path / "jobs.db"))
    q = Queue(10)
    q.set_persistence(store)
    ran, failures = [], []
    q.on_failure(lambda job, reason, exc: failures.append((job.payload, reason)))
    q.register_executor("t", lambda job: ran.append(job.payload),
                        ExecutorConfig(timeout=0.2, interrupt_on_timeout=interrupt, max_concurrent_jobs=1))
    q.start_dispatcher(1)
    q.enqueue(Job("t", "slow", id="slow"))
    assert store.writing.wait(WAIT)
    active = q.get_stats().executor_stats["t"].active_jobs
    assert q.cancel("slow") is True
    store.release.set()
    q.enqueue(Job("t", "next"))
    assert q.join(WAIT)
    stats = q.get_stats()
    q.stop()
    store.close()
    assert active == 1
    assert (ran, failures) == (["next"], [("slow", "cancelled")])
    assert all_accounted(stats) and stats.jobs_cancelled == 1, stats


@pytest.mark.parametrize("interrupt", [False, True])
def test_stop_while_a_start_write_is_slow_leaves_the_job_stored_or_run(tmp_path, interrupt, wait=True):
    path = str(tmp_path / "jobs.db")
    store = SlowStartStore(path)
    q = Queue(10)
    q.set_persistence(store)
    ran, failures = [], []
    q.on_failure(lambda job, reason, exc: failures.append((job.payload, reason)))
    q.register_executor("t", lambda job: ran.append(job.payload),
                        ExecutorConfig(timeout=0.2, interrupt_on_timeout=interrupt))
    q.start_dispatcher(1)
    q.enqueue(Job("t", "slow", id="slow"))
    assert store.writing.wait(WAIT)
    stopper = threading.Thread(target=q.stop, kwargs={"wait": wait, "timeout": 5.0})
    stopper.start()
    store.release.set()
    stopper.join(WAIT)
    assert not stopper.is_alive()
    stats = q.get_stats()
    store.close()
    assert all_accounted(stats), stats
    assert failures == []
    assert (ran == ["slow"]) != (stored_payloads(path) == ["slow"]), (ran, stored_payloads(path))


@pytest.mark.parametrize("delay", [0.0, 0.05])
@pytest.mark.parametrize("mutation", ["type_other", "type_int", "priority_bad", "retry_config_bad", "retries_bad"])
def test_a_retry_of_a_job_made_unusable_frees_the_slot_and_is_counted_once(mutation, delay):
    q = Queue(10)
    ran, failures = [], []
    q.on_failure(lambda job, reason, exc: failures.append((job.payload, reason)))

    def executor(job):
        ran.append(job.payload)
        if job.payload == "bad":
            if mutation == "type_other":
                job.type = "other"
            elif mutation == "type_int":
                job.type = 5
            elif mutation == "priority_bad":
                job.priority = "bogus"
            elif mutation == "retry_config_bad":
                job.retry_config = "bogus"
            else:
                job.retries = "bogus"
            raise RetryAfter(delay)

    q.register_executor("t", executor, ExecutorConfig(max_concurrent_jobs=1))
    q.start_dispatcher(2)
    q.enqueue(Job("t", "bad", retry_config=RetryConfig(max_retries=1)))
    assert wait_until(lambda: len(failures) >= 1 or q.get_stats().jobs_retried >= 1)
    q.enqueue(Job("t", "next"))
    assert wait_until(lambda: "next" in ran), "the type's only slot was never freed"
    joined = q.join(WAIT)
    stats = q.get_stats()
    q.stop()
    assert joined and all_accounted(stats), stats
    assert stats.executor_stats["t"].active_jobs == 0
    assert len([f for f in failures if f[0] == "bad"]) == 1, failures


class SlowSwitchStore(SQLitePersistence):
    """delete_and_mark_running (the previous job's end with the next one's start) waits until released."""

    def __init__(self, path):
        super().__init__(path)
        self.writing, self.release = threading.Event(), threading.Event()

    def delete_and_mark_running(self, job_id, job):
        if job.payload == "slow":
            self.writing.set()
            self.release.wait(WAIT)
        return super().delete_and_mark_running(job_id, job)


@pytest.mark.parametrize("interrupt", [False, True])
def test_a_cancel_during_the_switch_write_ends_the_job_once_and_frees_its_slot(tmp_path, interrupt):
    path = str(tmp_path / "jobs.db")
    store = SlowSwitchStore(path)
    q = Queue(10)
    q.set_persistence(store)
    ran, failures = [], []
    q.on_failure(lambda job, reason, exc: failures.append((job.payload, reason)))
    gate = threading.Event()

    def executor(job):
        if job.payload == "first":
            gate.wait(WAIT)
        ran.append(job.payload)

    q.register_executor("t", executor,
                        ExecutorConfig(timeout=0.2, interrupt_on_timeout=interrupt, max_concurrent_jobs=1))
    q.start_dispatcher(1)
    q.enqueue(Job("t", "first"))
    q.enqueue(Job("t", "slow", id="slow"))
    gate.set()
    if not store.writing.wait(WAIT):
        pytest.skip("this store took no switch path")
    assert q.cancel("slow") is True
    store.release.set()
    q.enqueue(Job("t", "next"))
    assert q.join(WAIT)
    stats = q.get_stats()
    q.stop()
    store.close()
    assert (ran, failures) == (["first", "next"], [("slow", "cancelled")])
    assert all_accounted(stats) and stats.jobs_cancelled == 1, stats
    assert stored_payloads(path) == []


_CHILD = r'''
import sys, threading, time
from tinymq import ExecutorConfig, JobTimeout, Job, Queue, RetryConfig, SQLitePersistence
path, kind = sys.argv[1], sys.argv[2]
store = SQLitePersistence(path)
q = Queue(100)
q.set_persistence(store)
def executor(job):
    print("entered", flush=True)
    sys.stdin.readline()
    try:
        if kind == "many":
            q.enqueue_many([Job("report", "follow-up-1"), Job("report", "follow-up-2")])
        else:
            q.enqueue(Job("report", "follow-up-1"))
        print("returned", flush=True)
    except JobTimeout:
        print("JobTimeout", flush=True)
    time.sleep(3600)
q.register_executor("import", executor, ExecutorConfig(timeout=0.3, interrupt_on_timeout=True))
q.start_dispatcher(1)
q.enqueue(Job("import", "import", retry_config=RetryConfig(max_retries=0)))
while q.get_stats().jobs_timed_out < 1:
    time.sleep(0.01)
print("timedout", flush=True)
time.sleep(3600)
'''


@pytest.mark.parametrize("kind", ["one", "many"])
def test_kill_9_right_after_an_interrupted_enqueue_keeps_exactly_what_it_acknowledged(tmp_path, kind):
    import os
    import signal
    import subprocess
    import sys

    path = str(tmp_path / "jobs.db")
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    child = subprocess.Popen([sys.executable, str(script), path, kind], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert child.stdout.readline().strip() == "entered"
        with LockedStore(path):
            child.stdin.write("go\n")
            child.stdin.flush()
            assert child.stdout.readline().strip() == "timedout"
        outcome = child.stdout.readline().strip()
        os.kill(child.pid, signal.SIGKILL)
    finally:
        if child.poll() is None:
            child.kill()
        child.wait(WAIT)
    stored = [p for p in stored_payloads(path) if p.startswith("follow-up")]
    assert outcome in ("returned", "JobTimeout")
    if outcome == "returned":
        assert stored == (["follow-up-1", "follow-up-2"] if kind == "many" else ["follow-up-1"])
    else:
        assert stored == []


# --- worker CLI: a target whose import daemonises (fork, the parent exits 0, the child goes on) ---

DAEMONISES_AT_IMPORT = """
import os
if os.fork():
    os._exit(0)  # the parent exits, as a daemonising module does; the child goes on importing
with open(os.path.join(os.path.dirname(__file__), "daemon_pids"), "a") as pids:
    pids.write(f"{os.getpid()}\\n")
from app.shared import queue
"""


def test_worker_refuses_a_target_whose_import_daemonises(shared_project, project):
    """docs/cli.md: 'A module whose import ends its process (os._exit(0), a fork whose parent exits to
    daemonise) is refused the same way' (exit 1, before any worker process starts)."""
    import os
    import signal

    (project / "app" / "daemonises.py").write_text(DAEMONISES_AT_IMPORT)
    worker = shared_project("app.daemonises:queue", "--processes", 1, "--workers", 1)
    try:
        with worker.changed:
            worker.changed.wait_for(lambda: None in worker.lines or "started worker process" in worker.log(), WAIT)
        log = worker.log()
        code = None if "started worker process" in log else worker.wait(WAIT)
    finally:
        worker.kill()
        pids = project / "app" / "daemon_pids"
        for pid in (pids.read_text().split() if pids.exists() else []):
            try:
                os.kill(int(pid), signal.SIGKILL)  # the daemonised children this test's module made
            except ProcessLookupError:
                pass
    assert "started worker process" not in log, log
    assert code == 1, log


def test_stop_with_a_timeout_returns_while_an_interrupted_executor_waits_in_a_shielded_enqueue():
    """A deferred interruption whose block does not end (a blocking enqueue into a full queue nobody
    drains): stop(wait=True, timeout=...) still returns within its timeout (api.md: running attempts
    get at most ``timeout`` seconds)."""
    b = Queue(1)  # never started: nobody drains it
    b.enqueue(Job("x", "filler"))
    a = Queue(10)
    entered, outcome = threading.Event(), []

    def executor(job):
        entered.set()
        try:
            b.enqueue(Job("x", "blocked"), block=True)
            outcome.append("returned")
        except BaseException as exc:
            outcome.append(type(exc).__name__)

    a.register_executor("t", executor, INTERRUPTING)
    a.start_dispatcher(1)
    a.enqueue(Job("t", None, retry_config=RetryConfig(max_retries=0)))
    assert entered.wait(WAIT)
    assert wait_until(lambda: a.get_stats().jobs_timed_out >= 1)
    stopper = threading.Thread(target=a.stop, kwargs={"wait": True, "timeout": 1.0}, daemon=True)
    started = time.monotonic()
    stopper.start()
    stopper.join(WAIT)
    stuck = stopper.is_alive()
    b.stop(wait=False)  # frees the blocked enqueue (QueueStopped)
    stopper.join(WAIT)
    assert not stuck, "a.stop(timeout=1.0) waited for the thread stuck in its shielded enqueue"
    assert time.monotonic() - started < 5.0


@pytest.mark.parametrize("action", ["cancel", "stop"])
def test_an_async_attempt_whose_start_write_is_slow_is_cancelled_or_stopped_cleanly(tmp_path, action):
    path = str(tmp_path / "jobs.db")
    store = SlowStartStore(path)
    q = Queue(10)
    q.set_persistence(store)
    ran, failures = [], []
    q.on_failure(lambda job, reason, exc: failures.append((job.payload, reason)))

    async def executor(job):
        ran.append(job.payload)

    q.register_executor("t", executor, ExecutorConfig(timeout=0.2, max_concurrent_jobs=1))
    q.start_dispatcher(1)
    q.enqueue(Job("t", "slow", id="slow", retry_config=RetryConfig(max_retries=0)))
    assert store.writing.wait(WAIT)
    active = q.get_stats().executor_stats["t"].active_jobs
    if action == "cancel":
        assert q.cancel("slow") is True
        store.release.set()
        q.enqueue(Job("t", "next"))
        assert q.join(WAIT)
        stats = q.get_stats()
        q.stop()
        store.close()
        assert (ran, failures) == (["next"], [("slow", "cancelled")])
        assert all_accounted(stats) and stats.jobs_cancelled == 1, stats
    else:
        stopper = threading.Thread(target=q.stop, kwargs={"wait": True, "timeout": 5.0})
        stopper.start()
        store.release.set()
        stopper.join(WAIT)
        assert not stopper.is_alive()
        stats = q.get_stats()
        store.close()
        assert all_accounted(stats), stats
        assert (ran == ["slow"]) != (stored_payloads(path) == ["slow"]), (ran, stored_payloads(path))
        assert failures == []
    assert active == 1


class SlowRetrySaveStore(SQLitePersistence):
    """The save of a retry (job.retries > 0) waits until released."""

    def __init__(self, path):
        super().__init__(path)
        self.writing, self.release = threading.Event(), threading.Event()

    def save(self, job):
        if job.retries > 0 and job.payload == "flaky":
            self.writing.set()
            self.release.wait(WAIT)
        return super().save(job)


@pytest.mark.parametrize("action", ["cancel", "stop"])
@pytest.mark.parametrize("delay", [0.0, 0.05])
def test_a_cancel_or_stop_during_a_retrys_save_frees_the_slot_and_counts_once(tmp_path, action, delay):
    path = str(tmp_path / "jobs.db")
    store = SlowRetrySaveStore(path)
    q = Queue(10)
    q.set_persistence(store)
    ran, failures = [], []
    q.on_failure(lambda job, reason, exc: failures.append((job.payload, reason)))

    def executor(job):
        ran.append(job.payload)
        if job.payload == "flaky":
            raise RetryAfter(delay)

    q.register_executor("t", executor, ExecutorConfig(max_concurrent_jobs=1))
    q.start_dispatcher(2)
    q.enqueue(Job("t", "flaky", id="flaky", retry_config=RetryConfig(max_retries=1)))
    assert store.writing.wait(WAIT)
    active = q.get_stats().executor_stats["t"].active_jobs
    if action == "cancel":
        cancelled = q.cancel("flaky")
        store.release.set()
        q.enqueue(Job("t", "next"))
        assert q.join(WAIT)
        stats = q.get_stats()
        q.stop()
        store.close()
        assert cancelled is True
        assert (ran, failures) == (["flaky", "next"], [("flaky", "cancelled")])
        assert all_accounted(stats) and stats.jobs_cancelled == 1, stats
        assert stats.executor_stats["t"].active_jobs == 0
        assert stored_payloads(path) == []
    else:
        stopper = threading.Thread(target=q.stop, kwargs={"wait": True, "timeout": 5.0})
        stopper.start()
        store.release.set()
        stopper.join(WAIT)
        assert not stopper.is_alive()
        stats = q.get_stats()
        store.close()
        assert all_accounted(stats), stats
        assert failures == []
        assert stored_payloads(path) == ["flaky"]  # the retry is kept for the next start
    assert active == 1


def test_the_watchdog_times_out_every_worker_whose_start_write_came_after_it_slept(tmp_path):
    """Each attempt's deadline is set at its function's call, after the start write: the watchdog,
    asleep on earlier (or no) deadlines, must still time every one of them out."""
    store = SlowStartStore(str(tmp_path / "jobs.db"))
    q = Queue(20)
    q.set_persistence(store)
    release = threading.Event()
    q.register_executor("t", lambda job: release.wait(WAIT), ExecutorConfig(timeout=0.3))
    q.start_dispatcher(4)
    for i in range(3):
        q.enqueue(Job("t", f"fast-{i}", retry_config=RetryConfig(max_retries=0)))
    q.enqueue(Job("t", "slow", retry_config=RetryConfig(max_retries=0)))
    assert store.writing.wait(WAIT)
    assert wait_until(lambda: q.get_stats().jobs_timed_out >= 3, timeout=5.0)
    store.release.set()  # its deadline comes now, long after the others'
    assert wait_until(lambda: q.get_stats().jobs_timed_out >= 4, timeout=5.0), q.get_stats()
    release.set()
    q.stop()
    store.close()


@pytest.mark.parametrize("registered", [True, False])
def test_recovery_into_a_small_buffer_is_counted_whole(tmp_path, registered):
    path = str(tmp_path / "jobs.db")
    with SQLitePersistence(path) as store:
        jobs = [Job("t", f"ready-{i}") for i in range(5)]
        for job in jobs:
            store.save(job)
        store.save(Job("t", "delayed", run_at=time.time() + LATER))
        running = Job("t", "running", retry_config=RetryConfig(max_retries=0))
        store.save(running)
        store.mark_running(running)
    ran, failures = [], []
    q = Queue(2)
    q.on_failure(lambda job, reason, exc: failures.append((job.payload, reason)))
    if registered:
        q.register_executor("t", lambda job: ran.append(job.payload))
    store = SQLitePersistence(path, max_crash_recoveries=0)  # its crash: past the limit
    q.set_persistence(store)
    before = q.get_stats()
    if not registered:
        q.register_executor("t", lambda job: ran.append(job.payload))
    q.start_dispatcher(1)
    assert wait_until(lambda: len(ran) == 5), (ran, failures, q.get_stats())
    after = q.get_stats()
    q.stop()
    store.close()
    assert all_accounted(before), before
    assert all_accounted(after), after
    assert before.jobs_enqueued == 7 and after.jobs_enqueued == 7, (before, after)
    assert sorted(ran) == [f"ready-{i}" for i in range(5)]
    assert [f[0] for f in failures] == ["running"], failures


def test_an_executor_that_catches_the_deferred_timeout_and_enqueues_on_loses_and_doubles_nothing(tmp_path):
    path = str(tmp_path / "jobs.db")
    store = SQLitePersistence(path)
    q = Queue(100)
    q.set_persistence(store)
    entered, locked, done = threading.Event(), threading.Event(), threading.Event()
    outcome, ran = [], []

    def importer(job):
        entered.set()
        locked.wait(WAIT)
        for i in range(4):
            try:
                q.enqueue(Job("report", f"r{i}", id=f"r{i}"))
                outcome.append(("returned", i))
            except JobTimeout:
                outcome.append(("JobTimeout", i))
        done.set()

    q.register_executor("import", importer, INTERRUPTING)
    q.register_executor("report", lambda job: ran.append(job.payload))
    q.start_dispatcher(2)
    q.enqueue(Job("import", "import", retry_config=RetryConfig(max_retries=0)))
    assert entered.wait(WAIT)
    with LockedStore(path):
        locked.set()
        assert wait_until(lambda: q.get_stats().jobs_timed_out >= 1)
    assert done.wait(WAIT)
    assert q.join(WAIT)
    # (exact once the timed-out attempt's function has returned and freed its slot)
    assert wait_until(lambda: all_accounted(q.get_stats())), q.get_stats()
    stats = q.get_stats()
    q.stop()
    store.close()
    returned = [f"r{i}" for kind, i in outcome if kind == "returned"]
    assert [kind for kind, _ in outcome].count("JobTimeout") == 1, outcome
    assert sorted(ran) == returned, (ran, outcome)
    assert all_accounted(stats) and stats.jobs_timed_out == 1 and stats.jobs_failed == 1, stats
    assert stored_payloads(path) == []


def test_an_executor_blocked_in_a_shielded_enqueue_into_its_own_full_queue_is_replaced():
    """The deferred interruption's block waits for room only a replacement worker can make."""
    q = Queue(1)
    ran, outcome = [], []
    started, filled, done = threading.Event(), threading.Event(), threading.Event()
    frames = []

    def producer(job):
        started.set()
        filled.wait(WAIT)
        try:
            q.enqueue(Job("t", "blocked"), block=True)
            outcome.append("returned")
        except JobTimeout as exc:
            outcome.append("JobTimeout")
            frames.extend(f"{tb.tb_frame.f_code.co_name}:{tb.tb_lineno}" for tb in _tbs(exc))
        finally:
            done.set()

    q.register_executor("p", producer, INTERRUPTING)
    q.register_executor("t", lambda job: ran.append(job.payload))
    q.enqueue(Job("p", None, retry_config=RetryConfig(max_retries=0)))
    q.start_dispatcher(1)
    assert started.wait(WAIT)
    q.enqueue(Job("t", "filler"))  # fills the buffer: only a new worker can take it
    filled.set()
    assert done.wait(WAIT)  # (join() waits only for jobs enqueued when it is called)
    assert q.join(WAIT), q.get_stats()
    # (exact once the timed-out attempt's function has returned and freed its slot)
    assert wait_until(lambda: all_accounted(q.get_stats())), q.get_stats()
    stats = q.get_stats()
    q.stop()
    assert sorted(ran) == ["blocked", "filler"], (ran, outcome, frames)
    assert outcome == ["JobTimeout"]  # enqueued, then the deferred interruption at the call's end
    assert all_accounted(stats) and stats.jobs_timed_out == 1, stats


def test_a_job_that_ran_after_stop_wait_false_cancelled_its_start_write_is_not_kept_to_run_again(tmp_path):
    """stop(wait=False) while the worker writes a plain fn(job) attempt's start: api.md, "a plain
    fn(job) attempt too: it has no context and runs on ... only its success removes the job"."""
    path = str(tmp_path / "jobs.db")
    store = SlowStartStore(path)
    q = Queue(10)
    q.set_persistence(store)
    ran = threading.Event()
    q.register_executor("t", lambda job: ran.set(), ExecutorConfig(timeout=5.0))
    q.start_dispatcher(1)
    q.enqueue(Job("t", "slow", id="slow"))
    assert store.writing.wait(WAIT)
    stopper = threading.Thread(target=q.stop, kwargs={"wait": False})
    stopper.start()
    stopper.join(2.0)
    store.release.set()
    stopper.join(WAIT)
    try:
        if ran.wait(5.0):  # it ran: its success must remove its row (the store is still open)
            assert wait_until(lambda: stored_payloads(path, True) == [], timeout=5.0), stored_payloads(path, True)
        else:  # not run: kept for the next start
            assert stored_payloads(path, True) == ["slow"]
    finally:
        store.close()


class FailingSlowStartStore(SlowStartStore):
    """mark_running waits until released, then fails."""

    def mark_running(self, job):
        if job.payload == "slow":
            self.writing.set()
            self.release.wait(WAIT)
            raise OSError("disk I/O error")
        return super().mark_running(job)


@pytest.mark.parametrize("interrupt", [False, True])
def test_a_cancel_deferred_while_a_failing_start_write_runs_ends_the_job_once(tmp_path, interrupt):
    store = FailingSlowStartStore(str(tmp_path / "jobs.db"))
    q = Queue(10)
    q.set_persistence(store)
    ran, failures = [], []
    q.on_failure(lambda job, reason, exc: failures.append((job.payload, reason)))
    q.register_executor("t", lambda job: ran.append(job.payload),
                        ExecutorConfig(timeout=0.2, interrupt_on_timeout=interrupt, max_concurrent_jobs=1))
    q.start_dispatcher(1)
    q.enqueue(Job("t", "slow", id="slow"))
    assert store.writing.wait(WAIT)
    assert q.cancel("slow") is True
    store.release.set()
    q.enqueue(Job("t", "next"))
    assert q.join(WAIT)
    stats = q.get_stats()
    q.stop()
    store.close()
    assert (ran, failures) == (["next"], [("slow", "cancelled")])
    assert all_accounted(stats) and stats.jobs_cancelled == 1, stats
    assert stats.executor_stats["t"].active_jobs == 0


def test_a_failing_start_write_ends_or_runs_the_job_once_and_frees_its_slot(tmp_path):
    store = FailingSlowStartStore(str(tmp_path / "jobs.db"))
    q = Queue(10)
    q.set_persistence(store)
    ran, failures = [], []
    q.on_failure(lambda job, reason, exc: failures.append((job.payload, reason)))
    q.register_executor("t", lambda job: ran.append(job.payload),
                        ExecutorConfig(timeout=0.2, max_concurrent_jobs=1))
    q.start_dispatcher(1)
    q.enqueue(Job("t", "slow", id="slow", retry_config=RetryConfig(max_retries=0)))
    assert store.writing.wait(WAIT)
    store.release.set()
    q.enqueue(Job("t", "next"))
    assert q.join(WAIT)
    stats = q.get_stats()
    q.stop()
    store.close()
    assert ran.count("next") == 1 and (ran.count("slow") + len(failures)) == 1, (ran, failures)
    assert all_accounted(stats), stats
    assert stats.executor_stats["t"].active_jobs == 0


def test_an_executor_joining_another_queue_cut_by_its_timeout_leaves_that_queue_joinable():
    b = Queue(10)
    release = threading.Event()
    b.register_executor("b", lambda job: release.wait(WAIT))
    b.start_dispatcher(1)
    b.enqueue(Job("b", None))
    a = Queue(10)
    outcome, done = [], threading.Event()

    def joiner(job):
        try:
            outcome.append(b.join())
        except JobTimeout:
            outcome.append("JobTimeout")
        finally:
            done.set()

    a.register_executor("j", joiner, INTERRUPTING)
    a.start_dispatcher(1)
    a.enqueue(Job("j", None, retry_config=RetryConfig(max_retries=0)))
    assert wait_until(lambda: a.get_stats().jobs_timed_out >= 1)
    release.set()
    assert done.wait(WAIT)
    b.enqueue(Job("b", None))
    assert b.join(WAIT)
    a.stop()
    b.stop()
    assert outcome in (["JobTimeout"], [True])
