"""Reproducers for defects found by the second outside attack (branch ``attack2``).

Each test states the promised behaviour and failed before its fix; one that is
still ``xfail(strict=True)`` names a defect not fixed yet.
"""
import asyncio
import subprocess
import sys
import threading

import pytest

from tinymq import ExecutorConfig, Job, JobTimeout, Queue, RetryConfig

from _helpers import WAIT, Recorder

NO_RETRY = RetryConfig(max_retries=0)


# -- 1. silent non-run: a plain function that returns a coroutine -------------------------

def test_a_plain_function_returning_a_coroutine_has_it_run_on_the_queues_loop():
    """API.md accepts "callables that return an awaitable": the awaitable must be run.

    It was called in a worker thread, its coroutine dropped unawaited, and the job
    reported as succeeded: a silent non-run.
    """
    ran = Recorder()

    async def send(job):
        await asyncio.sleep(0)
        ran.add((job.payload, threading.current_thread().name))

    q = Queue(100)
    failed = Recorder()
    q.on_failure(lambda job, reason, exc: failed.add((job.payload, reason, exc)))
    q.register_executor("t", lambda job: send(job))  # not an async def: found out when called
    q.start_dispatcher(workers=2)
    try:
        for i in range(5):
            q.enqueue(Job("t", i))
        assert q.join(WAIT)
        assert sorted(payload for payload, _ in ran.snapshot()) == list(range(5))
        assert {thread for _, thread in ran.snapshot()} == {"tinymq-loop"}
        assert failed.snapshot() == []
        assert q.get_stats().jobs_succeeded == 5
        # once found out, its jobs no longer take a worker thread: they run like async def ones
        q.enqueue(Job("t", "later"))
        assert q.join(WAIT)
        assert ran.snapshot()[-1] == ("later", "tinymq-loop")
    finally:
        q.stop()


def test_a_plain_function_returning_a_coroutine_keeps_its_timeout_and_failures():
    unwound = Recorder()

    async def hang(job):
        try:
            await asyncio.sleep(WAIT * 10)
        finally:
            unwound.add(job.payload)

    async def fail(job):
        raise ConnectionError(f"down {job.payload}")

    q = Queue(100)
    failed = Recorder()
    q.on_failure(lambda job, reason, exc: failed.add((job.payload, reason, type(exc))))
    q.register_executor("hang", lambda job: hang(job), ExecutorConfig(timeout=0.2))
    q.register_executor("fail", lambda job: fail(job))
    q.start_dispatcher(workers=1)
    try:
        q.enqueue(Job("hang", "first", retry_config=NO_RETRY))  # found out in a worker thread
        q.enqueue(Job("fail", "f", retry_config=NO_RETRY))
        assert failed.wait_for(2)
        q.enqueue(Job("hang", "second", retry_config=NO_RETRY))  # run on the loop
        assert q.join(WAIT)
        assert sorted(failed.snapshot()) == [("f", "retries_exhausted", ConnectionError),
                                             ("first", "retries_exhausted", JobTimeout),
                                             ("second", "retries_exhausted", JobTimeout)]
        assert unwound.wait_for(2), "a timed-out coroutine was not cancelled"
        stats = q.get_stats()
        assert (stats.jobs_succeeded, stats.jobs_failed, stats.jobs_timed_out) == (0, 3, 2)
    finally:
        q.stop()


def test_stop_without_waiting_gives_back_a_plain_functions_coroutine_uncounted(tmp_path):
    """stop(wait=False) during the attempt in which the function is found out: not a failure,
    the job stays stored, and a new queue on the file runs it."""
    from tinymq import SQLitePersistence

    path = str(tmp_path / "jobs.db")
    started = threading.Event()

    async def hang(job):
        started.set()
        await asyncio.sleep(WAIT * 10)

    store = SQLitePersistence(path)
    q = Queue(100)
    q.set_persistence(store)
    failed = Recorder()
    q.on_failure(lambda job, reason, exc: failed.add((job.id, reason)))
    q.register_executor("t", lambda job: hang(job))
    q.start_dispatcher(workers=1)
    q.enqueue(Job("t", id="kept", retry_config=NO_RETRY))
    assert started.wait(WAIT)
    q.stop(wait=False)
    stats = q.get_stats()
    assert (stats.jobs_failed, stats.jobs_retried, stats.jobs_succeeded) == (0, 0, 0)
    assert failed.snapshot() == []
    store.close()

    ran = Recorder()
    with SQLitePersistence(path) as store, Queue(100) as again:
        again.set_persistence(store)

        async def done(job):
            ran.add(job.id)

        again.register_executor("t", done)
        again.start_dispatcher(workers=1)
        assert again.join(WAIT)
        assert ran.snapshot() == ["kept"]


def test_a_function_found_to_return_coroutines_may_still_return_none():
    """Once its jobs run on the loop, a None return is the success it was in a worker thread."""
    ran = Recorder()

    async def later(job):
        ran.add(("awaited", job.payload))

    def sometimes(job):
        if job.payload % 2:
            ran.add(("at once", job.payload))
            return None
        return later(job)

    q = Queue(100)
    failed = Recorder()
    q.on_failure(lambda job, reason, exc: failed.add((job.payload, reason, exc)))
    q.register_executor("t", sometimes)
    q.start_dispatcher(workers=1)
    try:
        for i in range(6):
            q.enqueue(Job("t", i))
        assert q.join(WAIT)
        assert sorted(ran.snapshot()) == sorted(
            [("awaited", i) for i in (0, 2, 4)] + [("at once", i) for i in (1, 3, 5)])
        assert failed.snapshot() == []
        assert q.get_stats().jobs_succeeded == 6
    finally:
        q.stop()


# -- 2. a coroutine that blocks the loop past its timeout was reported as succeeded -----------

def test_an_async_attempt_that_blocks_the_loop_past_its_timeout_times_out_like_a_thread():
    """A thread executor that sleeps past its timeout fails with JobTimeout; an async def that
    blocks the loop (time.sleep) just as long must not be reported as a success."""
    import time

    async def blocks_the_loop(job):
        time.sleep(0.5)  # the mistake the docs warn about; the timeout still holds

    def blocks_its_thread(job):
        time.sleep(0.5)

    q = Queue(100)
    failed = Recorder()
    q.on_failure(lambda job, reason, exc: failed.add((job.payload, reason, type(exc))))
    q.register_executor("async", blocks_the_loop, ExecutorConfig(timeout=0.1))
    q.register_executor("thread", blocks_its_thread, ExecutorConfig(timeout=0.1))
    q.start_dispatcher(workers=1)
    try:
        q.enqueue(Job("async", "async", retry_config=NO_RETRY))
        q.enqueue(Job("thread", "thread", retry_config=NO_RETRY))
        assert q.join(WAIT)
        assert sorted(failed.snapshot()) == [("async", "retries_exhausted", JobTimeout),
                                             ("thread", "retries_exhausted", JobTimeout)]
        stats = q.get_stats()
        assert (stats.jobs_succeeded, stats.jobs_timed_out) == (0, 2)
    finally:
        q.stop()


# -- 3. the command line printed tinymq's traceback for an empty --db -------------------------

@pytest.mark.parametrize("command", [["status"], ["requeue-dead", "--all"], ["purge-dead", "--all"]])
def test_an_empty_db_path_is_a_usage_error_without_a_traceback(command, tmp_path):
    import os
    import tinymq
    root = os.path.dirname(os.path.dirname(tinymq.__file__))
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, "-m", "tinymq", command[0], "--db", "", *command[1:]],
                            cwd=str(tmp_path), env=environment, stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, (result.returncode, result.stderr)  # bad usage, as docs/cli.md says
    assert "Traceback" not in result.stderr, result.stderr
    assert "--db" in result.stderr and "''" in result.stderr, result.stderr
    assert list(tmp_path.iterdir()) == []  # nothing created


# -- 4. SIGTERM while the worker supervisor checks its target left the check running ----------

def _alive(pid):
    import os
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_while_the_target_is_still_importing_stops_everything(tmp_path):
    import os
    import signal
    import tinymq
    from _helpers import wait_until

    marker = tmp_path / "importing"
    (tmp_path / "hangs_at_import.py").write_text(
        "import os, time\n"
        f"with open({str(marker)!r} + '.tmp', 'w') as f:\n"
        "    f.write(str(os.getpid()))\n"
        f"os.rename({str(marker)!r} + '.tmp', {str(marker)!r})\n"
        "time.sleep(600)\n")
    root = os.path.dirname(os.path.dirname(tinymq.__file__))
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    supervisor = subprocess.Popen([sys.executable, "-m", "tinymq", "worker", "hangs_at_import:queue"],
                                  cwd=str(tmp_path), env=environment, stdin=subprocess.DEVNULL,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    check_pid = None
    try:
        assert wait_until(marker.exists, timeout=60), "the target's import never began"
        check_pid = int(marker.read_text())
        supervisor.send_signal(signal.SIGTERM)
        out, err = supervisor.communicate(timeout=60)
        assert "Traceback" not in err, err
        assert wait_until(lambda: not _alive(check_pid), timeout=30), \
            "the process importing the target was left running"
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
            supervisor.communicate()
        if check_pid is not None and _alive(check_pid):
            os.kill(check_pid, signal.SIGKILL)


# -- 5. cancel() while a failed attempt's retry is being scheduled answered False ------------

class _SlowRetrySaves:
    """A store whose save of a retry waits until the test lets it go (a slow disk, an fsync)."""

    def __init__(self):
        self.saving_retry = threading.Event()
        self.go_on = threading.Event()
        self.rows = {}
        self.lock = threading.Lock()

    def save(self, job):
        if job.retries > 0:
            self.saving_retry.set()
            assert self.go_on.wait(WAIT)
        with self.lock:
            self.rows[job.id] = job.retries

    def delete(self, job_id):
        with self.lock:
            self.rows.pop(job_id, None)

    def load_all(self):
        return []


def test_cancel_while_the_retry_is_being_saved_cancels_the_job():
    store = _SlowRetrySaves()
    q = Queue(10)
    q.set_persistence(store)
    failed = Recorder()
    q.on_failure(lambda job, reason, exc: failed.add((job.id, reason)))
    attempts = Recorder()

    def fails(job):
        attempts.add(job.retries)
        raise ConnectionError("down")

    q.register_executor("t", fails)
    q.start_dispatcher(workers=1)
    try:
        q.enqueue(Job("t", id="J", retry_config=RetryConfig(max_retries=3, initial_delay=0.0)))
        assert store.saving_retry.wait(WAIT)
        # "J" is unfinished (its retry is being scheduled): cancel must find it
        assert q.cancel("J") is True
        assert q.cancel("J") is False  # cancelled already
        store.go_on.set()
        assert q.join(WAIT)
        assert failed.snapshot() == [("J", "cancelled")]
        assert attempts.snapshot() == [0], "a cancelled job ran again"
        assert store.rows == {}, "a cancelled job's row was left (or saved back) in the store"
        assert q.get_stats().jobs_cancelled == 1
    finally:
        store.go_on.set()
        q.stop()


# -- 6. a plain function that returns a generator was reported as succeeded ------------------

def test_a_plain_function_returning_a_generator_fails_instead_of_succeeding():
    """Registering a generator function is refused (its body would never run); a plain
    function that returns a generator (or an async generator) is found out when called."""
    body_ran = Recorder()

    def steps(job):
        body_ran.add(job.payload)
        yield

    async def async_steps(job):
        body_ran.add(job.payload)
        yield

    q = Queue(100)
    failed = Recorder()
    q.on_failure(lambda job, reason, exc: failed.add((job.payload, reason, exc)))
    q.register_executor("gen", lambda job: steps(job))
    q.register_executor("agen", lambda job: async_steps(job))
    q.start_dispatcher(workers=1)
    try:
        q.enqueue(Job("gen", "gen", retry_config=NO_RETRY))
        q.enqueue(Job("agen", "agen", retry_config=NO_RETRY))
        assert q.join(WAIT)
        assert sorted((payload, reason, type(exc)) for payload, reason, exc in failed.snapshot()) == [
            ("agen", "retries_exhausted", TypeError), ("gen", "retries_exhausted", TypeError)]
        for payload, _, exc in failed.snapshot():
            assert "generator" in str(exc) and repr(payload) in str(exc), str(exc)
        assert body_ran.snapshot() == []
        assert q.get_stats().jobs_succeeded == 0
    finally:
        q.stop()


# -- 7. re-registering a saturated type for the other runner stranded its waiting jobs --------

@pytest.mark.parametrize("first", ["thread", "async"])
def test_re_registering_a_saturated_type_for_the_other_runner_strands_no_job(first):
    """A type re-registered from a thread executor to an async one (or back) while its only
    slot is taken: when that attempt ends, its waiting jobs must go to the new runner.

    A worker thread ending an attempt freed its slot for itself only (it goes straight
    back to pop), and it can no longer take that type's jobs: they waited for ever. A plain function found to return
    coroutines (it moves to the loop at its first return) hit the same hang.
    """
    release = threading.Event()
    started = threading.Event()
    ran = Recorder()

    def blocks_a_thread(job):
        started.set()
        assert release.wait(WAIT)
        ran.add(job.payload)

    async def blocks_a_coroutine(job):
        started.set()
        assert await asyncio.get_running_loop().run_in_executor(None, release.wait, WAIT)
        ran.add(job.payload)

    def then_thread(job):
        ran.add(job.payload)

    async def then_async(job):
        ran.add(job.payload)

    q = Queue(100)
    one = ExecutorConfig(max_concurrent_jobs=1)
    q.register_executor("t", blocks_a_thread if first == "thread" else blocks_a_coroutine, one)
    q.start_dispatcher(workers=2)
    try:
        for i in range(3):
            q.enqueue(Job("t", i))
        assert started.wait(WAIT)
        q.register_executor("t", then_async if first == "thread" else then_thread, one)
        release.set()
        assert q.join(WAIT), f"jobs stranded: {q.get_stats()}"
        assert sorted(ran.snapshot()) == [0, 1, 2]
    finally:
        release.set()
        q.stop()


def test_a_saturated_plain_function_found_to_return_coroutines_strands_no_job():
    ran = Recorder()

    async def body(job):
        await asyncio.sleep(0)
        ran.add(job.payload)

    q = Queue(1000)
    q.register_executor("t", lambda job: body(job), ExecutorConfig(max_concurrent_jobs=2))
    for i in range(50):
        q.enqueue(Job("t", i))
    q.start_dispatcher(workers=4)
    try:
        assert q.join(WAIT), f"jobs stranded: {q.get_stats()}"
        assert sorted(ran.snapshot()) == list(range(50))
    finally:
        q.stop()


# -- 8. async executors' per-type counters missed successes and timeouts ----------------------

def test_an_async_types_own_counters_count_its_successes_and_timeouts():
    """API.md: ExecutorStats has per-type lifetime counters; an async type's must count too."""
    running = threading.Event()

    async def work(job):
        if job.payload == "fail":
            raise ValueError("boom")
        if job.payload in ("hang", "cancel"):
            if job.payload == "cancel":
                running.set()
            await asyncio.sleep(WAIT * 10)

    q = Queue(100)
    q.register_executor("a", work, ExecutorConfig(timeout=WAIT / 4))
    q.start_dispatcher(workers=1)
    try:
        for payload in ("ok", "ok", "ok", "fail", "hang"):
            q.enqueue(Job("a", payload, retry_config=NO_RETRY))
        assert q.join(WAIT)
        q.enqueue(Job("a", "cancel", id="to-cancel", retry_config=NO_RETRY))
        assert running.wait(WAIT)
        assert q.cancel("to-cancel")
        assert q.join(WAIT)
        mine = q.get_stats().executor_stats["a"]
        assert (mine.succeeded, mine.failed, mine.retried, mine.timed_out, mine.cancelled) == (3, 2, 0, 1, 1)
    finally:
        q.stop()
