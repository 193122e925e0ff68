"""Attack LL: findings against the fixes of session 18 (each test failed before its fix)."""
import asyncio
import threading
import time

import pytest

import tinymq
from tinymq import Job
from tinymq.persistence import SQLitePersistence


@pytest.mark.parametrize("how", ["stop", "astop"])
def test_a_store_is_handed_on_while_the_queue_that_stopped_itself_still_runs_its_attempt(tmp_path, how):
    """Symptom: a queue stopped from its own thread executor (``q.stop()``, or ``await q.astop()``
    through ``asyncio.run`` there) returns at once without waiting for its running attempts, as
    docs/api.md says; a new queue's ``set_persistence(store)`` is then accepted although that
    attempt still runs: its reload counts the row still "running" as a crash and runs the job a
    second time, at the same moment as the first attempt.

    Reproduction: one job whose executor calls stop()/astop() on its own queue, then blocks; a
    second queue takes the store and is started.

    Promise: docs/persistence.md: "A store serves one queue at a time ... while it runs,
    set_persistence(store) on another queue raises RuntimeError (its reload would count the
    running attempts as crashes and run the jobs a second time)", and so while an attempt the
    stopped queue gave up on still runs. Cause: queue.py _take_store only asks
    Dispatcher.gave_up_attempts(), which counts attempts stop() cancelled (_cancel_for_stop); a
    stop(wait=True) from the queue's own thread cancels none (_dispatch.py:432 `if not (wait and
    own_thread)`) and leaves them running, counted nowhere.
    """
    store = SQLitePersistence(str(tmp_path / "s.db"))
    q1 = tinymq.Queue(10)
    q1.set_persistence(store)
    stopped, release, second = threading.Event(), threading.Event(), threading.Event()
    runs = []

    def report(job):
        runs.append(("q1", job.id))
        if how == "stop":
            q1.stop()
        else:
            asyncio.run(q1.astop())
        stopped.set()
        release.wait(10.0)

    def report2(job):
        runs.append(("q2", job.id))
        second.set()

    q1.register_executor("report", report, tinymq.ExecutorConfig(timeout=None))
    q1.start_dispatcher(1)
    q2 = tinymq.Queue(10)
    q2.register_executor("report", report2, tinymq.ExecutorConfig(timeout=None))
    try:
        q1.enqueue(Job("report", id="report-1"))
        assert stopped.wait(10.0)
        try:
            q2.set_persistence(store)
        except RuntimeError:
            return  # what the docs promise: the store is still q1's
        q2.start_dispatcher(1)
        ran_twice = second.wait(2.0)
        assert not ran_twice, f"job run a second time while its first attempt still runs: {runs}"
        pytest.fail("set_persistence took the store of a queue whose attempt still runs")
    finally:
        release.set()
        q1.stop()
        q2.stop()
        store.close()


def test_every_registered_while_set_persistence_loads_takes_a_payload_the_store_refuses(tmp_path):
    """Symptom: ``q.every(...)`` called while another thread's ``set_persistence(store)`` loads the
    store accepts a payload the SQLite store cannot save (a set, not JSON); it is refused neither
    at ``every`` nor at ``set_persistence``, and every tick then fails to enqueue (logged, counted
    as skipped) for the queue's whole life.

    Reproduction: a SQLitePersistence whose load_all waits on an event (a large file's load);
    ``every`` with payload ``{1, 2}`` while it waits; then the same call after the load raises
    TypeError, as it should have the first time.

    Promise: docs/api.md "Periodic jobs": a payload the queue's store could not save raises
    TypeError/ValueError "at every/cron, or at set_persistence for a schedule registered before
    it ... instead of every tick failing to enqueue". Cause: queue.py set_persistence runs
    self._periodic.check_store(store) (queue.py:533) before it sets self._store = _StoreLoading();
    _periodic.py _LocalTicks.check then checks queue._store, the _StoreLoading placeholder,
    which has no _check_storable: nothing checks a schedule registered in between.
    """
    loading, go = threading.Event(), threading.Event()

    class SlowLoad(SQLitePersistence):
        def load_all(self):
            loading.set()
            go.wait(10.0)
            return super().load_all()

    store = SlowLoad(str(tmp_path / "s.db"))
    q = tinymq.Queue(10)
    q.register_executor("t", lambda job: None)
    loader = threading.Thread(target=q.set_persistence, args=(store,))
    loader.start()
    try:
        assert loading.wait(10.0)
        refused = None
        try:
            q.every(60.0, "t", payload={1, 2}, name="during-load")
        except (TypeError, ValueError) as exc:
            refused = exc
        go.set()
        loader.join(10.0)
        with pytest.raises(TypeError):  # the same schedule after the load: refused
            q.every(60.0, "t", payload={1, 2}, name="after-load")
        assert refused is not None, ("every() during set_persistence's load accepted a payload the "
                                     "store cannot save: each of its ticks will fail")
    finally:
        go.set()
        loader.join(10.0)
        q.stop()
        store.close()


@pytest.mark.parametrize("how", ["astop", "stop"])
def test_astop_in_the_awaitable_a_plain_executor_returned_cancels_its_own_attempt(how):
    """Symptom: a plain function that returns a coroutine (``lambda job: work(job)``), whose
    coroutine runs on the queue's loop (HandedOver), awaits ``q.astop()`` (or calls ``q.stop()``):
    the loop stops at once and cancels that very coroutine, which never gets past the call. Its
    job is neither succeeded nor failed (nothing reported; without a store it is silently lost,
    with one it would run again at the next start). The same code as an ``async def`` executor
    carries on after astop() and succeeds.

    Reproduction: register ``plain = lambda job: co(job)`` where co awaits q.astop() then sets an
    event; enqueue one job.

    Promise: docs/api.md "Async executors": astop awaited in one of the queue's own coroutines
    "does not wait for the running attempts, as stop there does not (in its coroutines, the loop
    stops after the last one)"; stop() from an executor with wait=True cancels no running
    attempt. Cause: Dispatcher._stop with own_thread calls runner.stop(when_idle=True);
    LoopRunner._stop_loop (_event_loop.py:728) halts when self._attempts is empty, but a handed-over
    awaitable's task is not among _attempts, so the loop halts and _end_tasks cancels it.
    """
    done = threading.Event()
    after = []
    q = tinymq.Queue(10)

    async def work(job):
        if how == "astop":
            await q.astop()
        else:
            q.stop()
        after.append("stop returned")
        await asyncio.sleep(0.05)
        done.set()

    def plain(job):
        return work(job)

    q.register_executor("t", plain, tinymq.ExecutorConfig(timeout=None))
    try:
        q.start_dispatcher(1)
        q.enqueue(Job("t", id="j"))
        assert done.wait(3.0), (f"its own {how}() cancelled the attempt that called it: {after}, "
                                f"stats {q.get_stats()}")
        # The worker thread reports the success once the coroutine's task has ended, just after
        # done.set(): and join() on a queue whose stop() has returned does not wait for it.
        deadline = time.monotonic() + 5.0
        while q.get_stats().jobs_succeeded != 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert q.get_stats().jobs_succeeded == 1, f"never succeeded: {q.get_stats()}"
    finally:
        q.stop(wait=False)


def test_stop_in_a_thread_executor_cancels_another_worker_s_handed_over_awaitable():
    """Symptom: ``q.stop()`` (wait=True) called in a thread executor, where it cancels no running
    attempt and waits for none, still cancels the coroutine that another worker's plain function
    returned (running on the loop, HandedOver): that attempt is killed midway and its job is
    neither succeeded nor failed. A thread attempt or an ``async def`` attempt in its place runs
    to its end.

    Reproduction: 2 workers; job A's plain function returns a coroutine that waits for an event,
    then finishes; job B's thread executor calls q.stop() once A's coroutine runs, then sets
    that event.

    Promise: docs/api.md q.stop: "Called from an executor or a failure callback, stop() waits for
    neither the others nor another stop()": it cancels them only with wait=False/timeout. Cause:
    as in the astop test above: Dispatcher._stop (own_thread, wait) -> LoopRunner.stop(when_idle=
    True) -> _stop_loop halts the loop when no *async* attempt runs (_event_loop.py:730), and the
    loop's shutdown (_end_tasks) cancels the handed-over task.
    """
    running, go, done = threading.Event(), threading.Event(), threading.Event()
    q = tinymq.Queue(10)

    async def work():
        running.set()
        while not go.is_set():
            await asyncio.sleep(0.01)
        done.set()

    def plain(job):
        return work()

    def stopper(job):
        assert running.wait(5.0)
        q.stop()  # from an executor: waits for no attempt, cancels none
        go.set()

    q.register_executor("a", plain, tinymq.ExecutorConfig(timeout=None))
    q.register_executor("b", stopper, tinymq.ExecutorConfig(timeout=None))
    try:
        q.start_dispatcher(2)
        q.enqueue(Job("a", id="a"))
        assert running.wait(5.0)
        q.enqueue(Job("b", id="b"))
        assert done.wait(3.0), f"stop() in an executor killed another attempt midway: {q.get_stats()}"
    finally:
        go.set()
        q.stop(wait=False)


def _two_queues(store):
    """q1 on ``store``, running: its "report" attempts hold until ``release``; q2, not started, whose
    "report" attempts set ``second``. ``runs`` records (queue, job id) of every attempt."""
    q1 = tinymq.Queue(10)
    q1.set_persistence(store)
    running, release, second = threading.Event(), threading.Event(), threading.Event()
    runs = []

    def report(job):
        runs.append(("q1", job.id))
        running.set()
        release.wait(10.0)

    def report2(job):
        runs.append(("q2", job.id))
        second.set()

    q1.register_executor("report", report, tinymq.ExecutorConfig(timeout=None))
    q1.start_dispatcher(1)
    q2 = tinymq.Queue(10)
    q2.register_executor("report", report2, tinymq.ExecutorConfig(timeout=None))
    return q1, q2, running, release, second, runs


def test_a_store_is_handed_on_while_stop_still_waits_for_the_attempt(tmp_path):
    """Symptom: while ``q1.stop()`` (wait=True, no timeout) waits for q1's running attempt, another
    queue's ``set_persistence(store)`` is accepted: its reload counts the row still "running" as a
    crash and runs the job a second time, at the same moment as q1's attempt, which stop() is
    still waiting for (and which then succeeds too).

    Reproduction: q1 runs one blocking job; another thread calls q1.stop(); once q1 is stopping,
    q2.set_persistence(store) and q2.start_dispatcher(1).

    Promise: docs/persistence.md: "once that queue has stopped, a new queue may take it over, but
    while it runs, set_persistence(store) on another queue raises RuntimeError (its reload would
    count the running attempts as crashes and run the jobs a second time)". Cause: queue.py
    _take_store lets the store go as soon as other._dispatcher.stopping (set when stop() begins)
    and gave_up_attempts() counts only attempts stop() has given up on, not those it still waits for.
    """
    store = SQLitePersistence(str(tmp_path / "s.db"))
    q1, q2, running, release, second, runs = _two_queues(store)
    stopper = threading.Thread(target=q1.stop)
    try:
        q1.enqueue(Job("report", id="report-1"))
        assert running.wait(10.0)
        stopper.start()
        deadline = time.monotonic() + 10.0
        while not q1._dispatcher.stopping:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        try:
            q2.set_persistence(store)
        except RuntimeError:
            return  # what the docs promise
        q2.start_dispatcher(1)
        assert not second.wait(2.0), f"job run a second time while q1's stop() waits for it: {runs}"
        pytest.fail("set_persistence took the store while q1's stop() still waited for its attempt")
    finally:
        release.set()
        stopper.join(10.0)
        q2.stop()
        store.close()


# --- Redis: text Redis cannot take in a job's last error ----------------------------------------

def test_redis_enqueue_of_a_last_error_with_a_lone_surrogate_raises_a_raw_encode_error(redis_backend):
    """Symptom: over a RedisBroker, ``enqueue`` of a job whose ``last_error`` holds a lone
    surrogate (the text of an OSError naming a file whose name is not UTF-8, as os.fsdecode
    makes it: say a job handed on from another queue's on_failure) raises redis-py's
    ``UnicodeEncodeError`` from deep inside its encoder. Before today's change (last_error sent
    at enqueue, 7-field rows) such a job was enqueued.

    Reproduction: Job("t", 1) with last_error = "OSError: no file '\\udcff.txt'"; enqueue it.

    Promise: docs/redis.md "Text Redis cannot take": a job whose text Redis cannot take is
    refused by enqueue "with a ValueError naming the attribute" (id, type, payload, tags); the
    last error is not among them, so it should be sent (escaped) or named. Cause:
    redis/_link.py job_row sends job.last_error as is; redis/_codec.py unsendable() does not
    look at last_error, so the send's encode error goes out raw.
    """
    q = redis_backend.queue(buffer_size=10)
    job = Job("t", 1)
    job.last_error = "OSError: [Errno 2] No such file or directory: '\udcff.txt'"
    try:
        q.enqueue(job)
    except ValueError as exc:
        assert "last_error" in str(exc) or "last error" in str(exc), exc
    except UnicodeEncodeError as exc:  # (a ValueError subclass, but not a message naming anything)
        pytest.fail(f"enqueue raised redis-py's raw encode error: {exc!r}")


def test_redis_attempt_failing_with_a_lone_surrogate_in_its_error_crashes_the_pump(redis_backend):
    """Symptom (not from today's diff, found attacking the last-error change): over a RedisBroker,
    an attempt that raises an exception whose text holds a lone surrogate (OSError for a file
    name that is not UTF-8) crashes the worker's Redis pump ("tinymq Redis pump crashed",
    UnicodeEncodeError): the retry is never sent, the job stays leased to a live process,
    join() never returns True, and stop() raises UnicodeEncodeError.

    Reproduction: a worker whose executor raises OSError("no file '\\udcff.txt'") on its first
    attempt and succeeds on its retry (max_retries=2, initial_delay=0.01).

    Promise: API.md/docs: a failed attempt is retried per its RetryConfig; docs/redis.md says text
    Redis cannot take is refused at enqueue with a clear ValueError: nothing says a failure's own
    text can stop the queue. Cause: redis/_link.py retry()/fail ops carry _describe(exc) as is
    into the pump's fetch call (_scripts.py _send), where redis-py cannot encode it.
    """
    p, w = redis_backend.pair(buffer_size=10)
    seen = []

    def ex(job):
        seen.append(job.retries)
        if len(seen) == 1:
            raise OSError("no such file: '\udcff.txt'")

    w.register_executor("t", ex, tinymq.ExecutorConfig(timeout=None))
    try:
        p.enqueue(Job("t", 1, retry_config=tinymq.RetryConfig(max_retries=2, initial_delay=0.01)))
        w.start_dispatcher(1)
        assert p.join(3.0), f"the retry never ran or ended: attempts {seen}"
        assert len(seen) == 2
    finally:
        for q in (w, p):
            try:
                q.stop(wait=False)
            except Exception:  # (stop() raises UnicodeEncodeError too)
                pass


def test_a_given_up_attempt_s_job_runs_again_through_a_new_store_on_the_same_file(tmp_path):
    """Symptom: q1.stop(timeout=0.1) gives up on a running attempt (its job saved back as ready),
    then, as docs/persistence.md's own example does, ``store.close()``; a new
    ``SQLitePersistence(path)`` on the same file in the same process is opened and a new queue's
    set_persistence takes it at once: the job runs a second time while q1's attempt still runs.
    The same store object would be refused ("attempt(s) that its stop() gave up on still run").

    Reproduction: as above with one blocking plain fn(job) attempt.

    Promise: docs/persistence.md: set_persistence raises RuntimeError "while an attempt that the
    stopped queue's stop(timeout=...) ... gave up on still runs ...: its job, saved back as
    ready, would run again at once"; the file's job is the same whichever store object opens
    it. Cause: queue.py _take_store keys the hand-over (_store_users, _store_dispatchers) by
    id(store), the object, not by the file; closing the store frees the file's owner lock
    while the given-up attempt still runs.
    """
    path = str(tmp_path / "s.db")
    store = SQLitePersistence(path)
    q1, q2, running, release, second, runs = _two_queues(store)
    store2 = None
    try:
        q1.enqueue(Job("report", id="report-1"))
        assert running.wait(10.0)
        q1.stop(timeout=0.1)
        store.close()
        try:
            store2 = SQLitePersistence(path)
            q2.set_persistence(store2)
        except (RuntimeError, tinymq.PersistenceError):
            return  # refused while the given-up attempt runs: what the docs promise
        q2.start_dispatcher(1)
        assert not second.wait(2.0), f"job run a second time while its given-up attempt still runs: {runs}"
        pytest.fail("a new store on the file handed the given-up attempt's job to another queue")
    finally:
        release.set()
        q2.stop()
        if store2 is not None:
            store2.close()
