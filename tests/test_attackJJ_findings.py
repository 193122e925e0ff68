"""Attack JJ: periodic jobs, rate limits, per-type stats and metrics, async producers, the
worker CLI, a store handed over after stop().

Findings (each test failed because of its defect until its fix, session 18; the in-process
ones on both cores, with and without TINYMQ_NO_EXTENSIONS=1):

- ``asyncio.run(q.ajoin())`` in a thread executor or a failure callback waits for itself
  instead of raising RuntimeError as ``join()`` there does (in-process and over a broker);
- ``asyncio.run(q.astop())`` in a thread executor (or a failure callback) waits for its own
  attempt, for ever without a timeout, while ``stop()`` there returns at once;
- ``q.every``/``q.cron`` on a queue with a SQLite store accept a payload the store cannot
  serialise: every tick then fails to enqueue (logged), never a clear error at registration
  as over a broker;
- a running attempt ended by ``q.cancel`` is missing from the attempt-duration histogram
  (one that ``stop()`` cancels is in it);
- ``aenqueue`` on a queue without a store accepts a bad ``timeout`` that ``enqueue`` refuses;
- a worker CLI target module that sets SIGTERM to SIG_IGN/SIG_DFL at import: the supervisor's
  SIGTERM never stops its worker process (hang), or kills the running attempt midway;
- a new queue may take a store over from a queue whose ``stop(timeout=...)`` returned while an
  attempt still runs, and runs that job a second time at the same moment.

Attacks that held (no test added: already guarded elsewhere) are listed in the report.
"""
import asyncio
import os
import signal
import subprocess
import threading
import time

import pytest

from tinymq import ExecutorConfig, Job, Queue, RetryConfig, SQLitePersistence, TinyMQError

from _helpers import WAIT
from test_cli import pop, producer, project, record, shared_project  # noqa: F401 (fixtures)

NO_TIMEOUT = ExecutorConfig(timeout=None)


def test_ajoin_run_in_a_thread_executor_refuses_to_wait_for_itself():
    """Symptom: an executor (a thread) that runs ``asyncio.run(q.ajoin())`` waits for its own
    job: without a timeout it hangs for ever (here: ``ajoin(timeout=2)`` returns False after
    2 s). ``q.join()`` at the same place raises RuntimeError, and so does ``ajoin`` awaited in
    an async executor.
    Reproduce: a thread executor calling ``asyncio.run(q.ajoin(timeout=2))``.
    Promise (API.md "Clocks and validation"): calling join() where it would wait for itself
    (inside an executor or a failure callback) raises RuntimeError instead of deadlocking;
    ``ajoin`` is join for async code.
    Likely cause: queue.py ajoin checks only ``loop is runner.loop`` and then runs
    ``self.join`` in the loop's default executor, a thread where ``waits_for_itself()`` is
    False."""
    q = Queue(10)
    outcome = []
    done = threading.Event()

    def executor(job):
        try:
            outcome.append(asyncio.run(q.ajoin(timeout=2.0)))
        except RuntimeError as exc:
            outcome.append(exc)
        finally:
            done.set()

    q.register_executor("t", executor, NO_TIMEOUT)
    q.start_dispatcher(1)
    q.enqueue(Job("t"))
    try:
        assert done.wait(WAIT)
        assert len(outcome) == 1 and isinstance(outcome[0], RuntimeError), outcome
    finally:
        q.stop(wait=False)


def test_ajoin_run_in_a_failure_callback_refuses_to_wait_for_itself():
    """As above, from a failure callback (API.md: "inside an executor or a failure callback"):
    the callback runs before its job counts as finished, so an ``ajoin`` there waits for
    itself; it must raise RuntimeError as ``join()`` does there."""
    q = Queue(10)
    outcome = []
    done = threading.Event()

    def executor(job):
        raise ValueError("boom")

    @q.on_failure
    def report(job, reason, exc):
        try:
            outcome.append(asyncio.run(q.ajoin(timeout=2.0)))
        except RuntimeError as exc:
            outcome.append(exc)
        finally:
            done.set()

    q.register_executor("t", executor, NO_TIMEOUT)
    q.start_dispatcher(1)
    q.enqueue(Job("t", retry_config=RetryConfig(max_retries=0)))
    try:
        assert done.wait(WAIT)
        assert len(outcome) == 1 and isinstance(outcome[0], RuntimeError), outcome
    finally:
        q.stop(wait=False)


def test_astop_run_in_a_thread_executor_does_not_wait_for_its_own_attempt():
    """Symptom: an executor (a thread) that runs ``asyncio.run(q.astop())`` never returns:
    astop waits for every running attempt, its own included (here ``astop(timeout=3)``, so it
    returns after 3 s instead of at once). ``q.stop()`` at the same place returns at once, and
    so does ``astop`` awaited in an async executor of the queue.
    Reproduce: a thread executor with timeout=None calling ``asyncio.run(q.astop())``.
    Promise (queue.py astop docstring, docs/api.md): awaited in one of the queue's executors it
    does not wait for running attempts, like ``stop`` in an executor; API.md: astop is stop
    for async code, and stop from any thread is safe (stop() in an executor does not hang).
    Likely cause: queue.py astop passes only ``on_own_loop`` and runs ``_stop`` in the loop's
    default executor, a thread where ``waits_for_itself()`` is False, so
    _dispatch.py stop() (own_thread) waits for the caller's own attempt."""
    q = Queue(10)
    took = []
    done = threading.Event()

    def executor(job):
        started = time.monotonic()
        try:
            asyncio.run(q.astop(timeout=3.0))
        finally:
            took.append(time.monotonic() - started)
            done.set()

    q.register_executor("t", executor, NO_TIMEOUT)
    q.start_dispatcher(1)
    q.enqueue(Job("t"))
    try:
        assert done.wait(WAIT)
        assert took[0] < 1.0, f"astop() in an executor waited {took[0]:.2f}s for its own attempt"
    finally:
        q.stop(wait=False)


@pytest.mark.parametrize("kind", ["every", "cron"])
def test_a_schedule_whose_payload_the_store_cannot_save_is_refused_at_registration(tmp_path, kind):
    """Symptom: on a queue with a SQLite store, ``q.every(0.05, "report", {"when": object()})``
    is accepted; then every tick's enqueue raises PersistenceError, which the timer logs and
    counts as a skipped tick, for ever: the schedule never runs a job and the caller was never
    told. Over a broker the same call raises TypeError naming the schedule (attack R's fix).
    Reproduce: SQLitePersistence set, then every/cron with a payload JSON cannot take.
    Promise (API.md Persistence): a payload that cannot be serialised makes ``enqueue`` raise
    PersistenceError with a clear message; "bad input anywhere ... raises naming it" (Clocks
    and validation). A schedule is an enqueue at each tick: its payload is known at registration.
    Likely cause: _periodic.py _LocalTicks.check is a no-op ("any payload that can be copied
    can be enqueued"), which is not true once the queue has a store."""
    if kind == "cron":
        pytest.importorskip("croniter")
    store = SQLitePersistence(str(tmp_path / "jobs.db"))
    q = Queue(10)
    q.set_persistence(store)
    try:
        with pytest.raises((TypeError, ValueError, TinyMQError)) as raised:
            if kind == "every":
                q.every(60.0, "report", {"when": object()}, name="nightly")
            else:
                q.cron("0 3 * * *", "report", {"when": object()}, name="nightly")
        assert "nightly" in str(raised.value)
    finally:
        q.stop(wait=False)
        store.close()


@pytest.mark.parametrize("kind", ["thread", "async"])
def test_a_running_attempt_cancelled_by_cancel_is_in_the_duration_histogram(kind):
    """Symptom: an attempt that ran and was cancelled with ``q.cancel(job_id)`` is counted in
    ``ExecutorStats.cancelled`` (and ``tinymq_jobs_total{outcome="cancelled"}``) but never in
    ``tinymq_attempt_duration_seconds``: after one success and one cancelled attempt the
    histogram's _count is 1, not 2, so the histogram no longer counts the attempts that ran
    (a type whose attempts are all cancelled shows no durations at all). Oddly, an attempt
    that ``stop()`` cancels, which is "not counted" anywhere, is in the histogram.
    Reproduce: an executor that waits for its cancellation, ``q.cancel`` while it runs.
    Promise (docs/api.md Prometheus): attempt durations are "recorded when the attempt's
    outcome is decided" (tests/test_metrics.py: "+Inf == _count == every decided attempt");
    a cancel decides the attempt's outcome, and API.md counts it as a per-type outcome.
    Likely cause: _core_py.py run_worker's ``if cancelled:`` branch (and its twin in
    _core.pyx, and _event_loop.py's cancelled path) ends the job without record_duration."""
    q = Queue(10)
    entered = threading.Event()

    if kind == "thread":
        def executor(job, ctx):
            if job.payload == "cancel me":
                entered.set()
                ctx.wait(WAIT)
    else:
        async def executor(job, ctx):
            if job.payload == "cancel me":
                entered.set()
                await asyncio.sleep(WAIT)

    q.register_executor("t", executor, NO_TIMEOUT)
    q.start_dispatcher(1)
    try:
        q.enqueue(Job("t", "ok"))
        q.enqueue(Job("t", "cancel me", id="victim"))
        assert entered.wait(WAIT)
        assert q.cancel("victim")
        assert q.join(WAIT)
        stats = q.get_stats().executor_stats["t"]
        assert (stats.succeeded, stats.cancelled) == (1, 1)
        counts, _ = q._attempt_durations()["t"]
        assert sum(counts) == 2, f"the histogram counts {sum(counts)} of the 2 attempts that ran"
    finally:
        q.stop(wait=False)


@pytest.mark.parametrize("timeout, error", [("soon", TypeError), (float("nan"), ValueError), (-1.0, ValueError)])
def test_aenqueue_refuses_a_bad_timeout_as_enqueue_does(timeout, error):
    """Symptom: on a queue without a store, ``await q.aenqueue(job, timeout="soon")`` (or NaN,
    or -1) enqueues the job and returns it, while ``q.enqueue(job, timeout="soon")`` raises
    TypeError/ValueError naming the value; the bad value is only looked at when the buffer
    happens to be full (or with a store or a broker).
    Reproduce: ``asyncio.run(q.aenqueue(Job("t"), timeout="soon"))`` on ``Queue(10)``.
    Promise (API.md "Clocks and validation", and aenqueue = enqueue for async code): a bad
    value raises TypeError/ValueError naming it, whatever the queue's state.
    Likely cause: queue.py aenqueue's no-store fast path (``return self.enqueue(job)``)
    runs before ``_optional_seconds("timeout", timeout)``."""
    q = Queue(10)
    try:
        with pytest.raises(error, match="timeout"):
            q.enqueue(Job("t"), timeout=timeout)
        with pytest.raises(error, match="timeout"):
            asyncio.run(q.aenqueue(Job("t"), timeout=timeout))
        assert q.get_stats().jobs_enqueued == 0
    finally:
        q.stop(wait=False)


@pytest.mark.redis
def test_over_a_broker_astop_and_ajoin_run_in_a_thread_executor_do_not_wait_for_themselves(redis_backend):
    """The two findings above hold over a broker too (same queue.py code): in a thread
    executor of a Queue on a RedisBroker, ``asyncio.run(q.ajoin(timeout=2))`` returns False
    after 2 s instead of raising RuntimeError, and ``asyncio.run(q.astop(timeout=3))`` waits
    3 s for its own attempt instead of returning at once (without the timeouts: hangs)."""
    q = redis_backend.queue()
    outcome = []
    done = threading.Event()

    def executor(job):
        try:
            if job.payload == "join":
                try:
                    outcome.append(asyncio.run(q.ajoin(timeout=2.0)))
                except RuntimeError as exc:
                    outcome.append(exc)
            else:
                started = time.monotonic()
                asyncio.run(q.astop(timeout=3.0))
                outcome.append(time.monotonic() - started)
        finally:
            done.set()

    q.register_executor("t", executor, NO_TIMEOUT)
    q.start_dispatcher(1)
    q.enqueue(Job("t", "join"))
    assert done.wait(WAIT)
    done.clear()
    q.enqueue(Job("t", "stop"))
    assert done.wait(WAIT)
    assert isinstance(outcome[0], RuntimeError), outcome
    assert outcome[1] < 1.0, f"astop() in an executor waited {outcome[1]:.2f}s for its own attempt"


# --- the worker CLI: a target module that changes the SIGTERM disposition at import ---------

SIGNAL_RESETTING = """
import signal, sys
from app.shared import queue

signal.signal(signal.SIGTERM, {disposition})
"""


@pytest.mark.redis
# "handler": the module's own Python handler (sys.exit) -- this one holds today (a guard).
@pytest.mark.parametrize("disposition", ["signal.SIG_IGN", "signal.SIG_DFL", "lambda number, frame: sys.exit(0)"],
                         ids=["SIG_IGN", "SIG_DFL", "handler"])
def test_worker_stops_gracefully_when_the_target_module_reset_sigterm_at_import(
        project, shared_project, producer, record, disposition):
    """Symptom: a target module that sets SIGTERM's disposition at import (``SIG_IGN``, or
    ``SIG_DFL``, as some libraries and frameworks do) breaks the documented graceful stop:
    with SIG_IGN the worker process ignores the SIGTERM the supervisor forwards, so the
    supervisor never exits (only a second SIGTERM, a hard stop, ends it); with SIG_DFL the
    worker process dies at once, killing its running attempt midway (the supervisor even exits
    0: it takes a death by SIGTERM for a process that was still starting), and the job runs
    again only after its lease.
    Reproduce: ``app/sigreset.py`` = ``from app.shared import queue`` plus
    ``signal.signal(signal.SIGTERM, signal.SIG_IGN)``; ``python -m tinymq worker
    app.sigreset:queue``; a job running; SIGTERM to the supervisor.
    Promise (docs/cli.md "Stopping", API.md Scale-out): SIGTERM to the supervisor is forwarded
    to every worker process, which stops gracefully (running attempts finish) and exits 0; the
    supervisor exits 0 when all have.
    Likely cause: the child sets its handlers before importing the target (tinymq/_worker.py
    _SignalWakeup) and never takes them back after the import; the supervisor tells its
    children to stop only by a signal they may no longer handle (_worker.py:450), and counts
    a child's death by SIGTERM as a clean stop (_worker.py:413)."""
    (project / "app" / "sigreset.py").write_text(SIGNAL_RESETTING.format(disposition=disposition))
    cli = shared_project("app.sigreset:queue", "--processes", 1, "--workers", 1)
    cli.wait_for(r"worker process started: 1 worker thread ", timeout=WAIT)
    producer.enqueue(Job("record", {"seconds": 1.5}, id="held"))
    assert pop(record, "started", 1)[0][0] == "held"
    cli.signal(signal.SIGTERM)
    try:
        code = cli.process.wait(6.0)
    except subprocess.TimeoutExpired:
        code = "still running 6 s after SIGTERM"
    finished = [entry.split()[0] for entry in record.lrange("finished", 0, -1)]
    assert (code, finished) == (0, ["held"]), f"supervisor: {code}, finished: {finished}; log:\n{cli.log()}"


def test_a_store_taken_over_after_stop_does_not_rerun_a_job_whose_attempt_still_runs(tmp_path):
    """Symptom: ``q1.stop(timeout=0.2)`` returns while an attempt that does not watch its
    context still runs in q1's worker thread (Python cannot kill it); its job is given back
    to the store. A new queue on the same store (``q2.set_persistence(store)``, allowed as q1
    "has stopped") reloads the job and starts it again at once: the same job, here with a
    unique id ("one report-2026-12 at a time"), runs twice at the same moment in one process.
    Reproduce: thread executor ``release.wait()``; q1.stop(timeout=0.2); q2 takes the store,
    starts; the second attempt starts while the first is still inside the executor.
    Promise (docs/persistence.md): while a queue runs, set_persistence(store) on another queue
    raises RuntimeError, because "its reload would ... run the jobs a second time"; API.md: an
    id is unique among the queue's unfinished jobs. A given-back attempt still running is
    exactly that case: the store should stay refused (or the job held back) until the
    attempt has returned, as a stop(wait=True) without timeout would ensure.
    Likely cause: queue.py _take_store lets a store go as soon as the other queue is
    ``_dispatcher.stopping`` (set when stop() begins), not when its last attempt returned."""
    store = SQLitePersistence(str(tmp_path / "jobs.db"))
    first_running, release = threading.Event(), threading.Event()
    second_started = threading.Event()
    starts = []

    def report(job):
        starts.append(job.id)
        if len(starts) == 1:
            first_running.set()
            release.wait(WAIT)
        else:
            second_started.set()

    q1 = Queue(10)
    q1.set_persistence(store)
    q1.register_executor("report", report, NO_TIMEOUT)
    q1.start_dispatcher(1)
    q1.enqueue(Job("report", id="report-2026-12"))
    assert first_running.wait(WAIT)
    q1.stop(timeout=0.2)  # the attempt ignores its context: it keeps running
    q2 = Queue(10)
    try:
        try:
            q2.set_persistence(store)
        except RuntimeError:
            return  # refused while the first attempt runs: fine
        q2.register_executor("report", report, NO_TIMEOUT)
        q2.start_dispatcher(1)
        overlapped = second_started.wait(1.0)
        assert not overlapped, "report-2026-12 started again while its first attempt was still running"
    finally:
        release.set()
        q2.stop()
        store.close()


SLOW_SIGNAL_IGNORING = """
import os, signal, sys, time
from app.shared import queue

if "--check" not in sys.argv:  # the worker process, not the supervisor's check of the target
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    open(os.path.join(os.path.dirname(__file__), "importing"), "w").close()
    time.sleep(2.0)  # the supervisor's SIGTERM comes now, and is ignored
"""


@pytest.mark.redis
def test_a_stop_signal_ignored_by_a_module_still_importing_is_sent_again_once_it_loaded(
        project, shared_project):
    """Symptom: a target module that sets SIGTERM to SIG_IGN at import, then takes a while to import:
    SIGTERM to the supervisor then is forwarded to the worker process, which ignores it (the
    module's SIG_IGN is in force until the import ends); the process then loads the target, starts
    its workers and runs for ever, and the supervisor waits for it for ever (only a second signal,
    a hard stop, ends them). Found as an edge by the session that put the CLI's handlers back after
    the import (attackJJ). Promise (docs/cli.md "Stopping"): SIGTERM to the supervisor stops every
    worker process gracefully, and the supervisor exits 0. Fix: a child sent SIGTERM before it
    said it loaded the target is sent it again when it says so (its own handler is then in place)."""
    (project / "app" / "slow_sigign.py").write_text(SLOW_SIGNAL_IGNORING)
    cli = shared_project("app.slow_sigign:queue", "--processes", 1, "--workers", 1)
    marker = project / "app" / "importing"
    deadline = time.monotonic() + WAIT
    while not marker.exists():
        assert time.monotonic() < deadline, f"the worker process never imported the module; log:\n{cli.log()}"
        time.sleep(0.01)
    cli.signal(signal.SIGTERM)
    try:
        code = cli.process.wait(WAIT)
    except subprocess.TimeoutExpired:
        code = f"still running {WAIT} s after SIGTERM"
    assert code == 0, f"supervisor: {code}; log:\n{cli.log()}"
