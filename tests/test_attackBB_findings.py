"""attackBB: async executors and cancellation (API.md "Async executors and cancellation",
"Failures are never silent"). Defects found by attacking them; each test runs on the core
selected by the environment (TINYMQ_NO_EXTENSIONS=1: the pure one).

Every wait here is on an event, a future or a condition, with a generous deadline.
"""
import asyncio
import concurrent.futures
import math
import threading

import pytest

import tinymq

from tinymq import ExecutorConfig, Job, Queue, RetryConfig, SQLitePersistence

from _helpers import WAIT, Recorder

NO_RETRY = RetryConfig(max_retries=0)


class _SeenExecutor(concurrent.futures.ThreadPoolExecutor):
    """A loop's default executor with one thread that says when a call has started in it."""

    def __init__(self):
        super().__init__(max_workers=1)
        self.started = threading.Event()

    def submit(self, fn, /, *args, **kwargs):
        def run():
            self.started.set()
            return fn(*args, **kwargs)
        return super().submit(run)


async def _until(event):
    while not event.is_set():
        await asyncio.sleep(0.001)


def _on_a_loop(coroutine_fn):
    """Run ``coroutine_fn(executor)`` on a new loop whose default executor is a _SeenExecutor."""
    loop = asyncio.new_event_loop()
    executor = _SeenExecutor()
    loop.set_default_executor(executor)
    try:
        return loop.run_until_complete(coroutine_fn(executor))
    finally:
        executor.shutdown(wait=False, cancel_futures=True)
        loop.close()


def _stuck_queue():
    """A started queue whose only job blocks a worker until ``gate`` is set: join() cannot return."""
    q = Queue(10)
    gate = threading.Event()
    started = threading.Event()

    @q.executor("stuck")
    def stuck(job):
        started.set()
        gate.wait(2 * WAIT)

    q.start_dispatcher(1)
    q.enqueue(Job("stuck"))
    assert started.wait(WAIT)
    return q, gate


# Fixed: a cancelled `await q.ajoin()` left a thread of the loop's default executor blocked in
# join() until the queue was idle: asyncio.run() hung at its exit (shutdown_default_executor),
# and each cancelled ajoin took one more of the executor's threads.
def test_a_cancelled_ajoin_gives_its_thread_back():
    q, gate = _stuck_queue()

    async def scenario(executor):
        waiter = asyncio.ensure_future(q.ajoin())
        await asyncio.wait_for(_until(executor.started), WAIT)  # join() is running in the thread
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        # The executor's one thread must be free again (asyncio.run's exit needs it too).
        loop = asyncio.get_running_loop()
        try:
            return await asyncio.wait_for(loop.run_in_executor(None, lambda: "free"), WAIT)
        except asyncio.TimeoutError:
            return "still in join()"

    try:
        assert _on_a_loop(scenario) == "free"
    finally:
        gate.set()
        q.stop()


# Fixed: a cancelled `await q.aenqueue(job, block=True)` left its enqueue waiting for room in a
# thread: the job the caller was told was not enqueued (CancelledError) was enqueued and run once
# room freed (and asyncio.run's exit waited for that thread until then).
def test_a_cancelled_aenqueue_that_waits_for_room_enqueues_nothing():
    q = Queue(1)
    ran = Recorder()

    @q.executor("t")
    def run(job):
        ran.add(job.id)

    q.enqueue(Job("t", id="first"))  # the buffer is full; nothing runs before start_dispatcher

    async def scenario(executor):
        putter = asyncio.ensure_future(q.aenqueue(Job("t", id="second"), block=True))
        await asyncio.wait_for(_until(executor.started), WAIT)  # the enqueue waits in the thread
        putter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await putter

    try:
        _on_a_loop(scenario)
        q.start_dispatcher(1)
        assert ran.wait_for(1)
        assert q.join(WAIT)
        assert ran.snapshot() == ["first"]
        assert q.get_stats().jobs_enqueued == 1
    finally:
        q.stop()


class _SlowStore:
    """An in-memory store whose save waits until ``release`` is set (``saving`` says it began)."""

    def __init__(self):
        self.rows = {}
        self.saving = threading.Event()
        self.release = threading.Event()

    def save(self, job):
        self.saving.set()
        assert self.release.wait(WAIT)
        self.rows[job.id] = job

    def delete(self, job_id):
        self.rows.pop(job_id, None)

    def load_all(self):
        return []


# Fixed with the one above: an aenqueue cancelled while its store's save ran went on to enqueue
# the job, though the caller was told it was not. The job is taken back (reported "cancelled").
def test_an_aenqueue_cancelled_during_its_save_takes_the_job_back():
    q = Queue(10)
    store = _SlowStore()
    q.set_persistence(store)
    ended = Recorder()
    q.on_failure(lambda job, reason, exc: ended.add((job.id, reason)))

    @q.executor("t")
    def run(job):
        pass

    async def scenario(executor):
        putter = asyncio.ensure_future(q.aenqueue(Job("t", id="x")))
        await asyncio.wait_for(_until(store.saving), WAIT)
        putter.cancel()
        await asyncio.sleep(0)
        store.release.set()  # the save ends after the caller gave up
        with pytest.raises(asyncio.CancelledError):
            await putter

    try:
        _on_a_loop(scenario)
        assert ended.snapshot() == [("x", "cancelled")]
        assert q.get_stats().jobs_cancelled == 1
        assert store.rows == {}
        assert q.join(WAIT)
    finally:
        q.stop()


async def _raise_in_a_child_task(exc_class):
    async def child():
        await asyncio.sleep(0)
        raise exc_class()
    await asyncio.gather(child())


async def _stop_the_loop(exc_class):
    asyncio.get_running_loop().stop()
    await asyncio.sleep(0)


# Fixed: a SystemExit or KeyboardInterrupt raised in a task an async executor awaits
# (asyncio.gather, create_task; asyncio lets those two out of run_forever), or loop.stop()
# called by one, ended the queue's event loop: the attempt was written off as cancelled by
# stop() (INFO, not counted, not reported), every later async job was accepted and never run,
# join() never returned, and nothing on the tinymq logger said why. The loop runs on now.
@pytest.mark.parametrize("how,exc_class", [
    (_raise_in_a_child_task, SystemExit),
    (_raise_in_a_child_task, KeyboardInterrupt),
    (_stop_the_loop, None),
], ids=["child-SystemExit", "child-KeyboardInterrupt", "loop.stop"])
def test_an_executor_cannot_end_the_queues_event_loop(how, exc_class, caplog):
    q = Queue(10)
    ended = Recorder()
    q.on_failure(lambda job, reason, exc: ended.add((job.id, reason, type(exc))))
    ran = threading.Event()

    @q.executor("bad")
    async def bad(job):
        await how(exc_class)

    @q.executor("later")
    async def later(job):
        ran.set()

    q.start_dispatcher(1)
    try:
        q.enqueue(Job("bad", id="bad", retry_config=NO_RETRY))
        if exc_class is not None:  # the attempt failed, as when it raises that itself
            assert ended.wait_for(1)
            assert ended.snapshot() == [("bad", "permanent_failure", exc_class)]
        q.enqueue(Job("later"))
        assert ran.wait(WAIT)  # the loop runs on
        assert q.join(WAIT)
        assert any(record.levelname == "ERROR" and "event loop" in record.getMessage()
                   for record in caplog.records)  # and it says what happened
    finally:
        q.stop()


# Fixed: `await ctx.sleep(nan)` slept until some other timer of the queue's loop fired (here the
# attempt's own deadline: it timed out), since asyncio.sleep(nan) plants a NaN timer; ctx.wait(nan)
# raised the lock's ValueError. Both raise ValueError naming the value now.
def test_ctx_sleep_refuses_nan_like_ctx_wait():
    q = Queue(10)
    outcomes = Recorder()

    @q.executor("async", max_concurrent_jobs=1, timeout=WAIT)
    async def sleeper(job, ctx):
        try:
            outcomes.add(("async", await ctx.sleep(math.nan)))
        except Exception as exc:
            outcomes.add(("async", type(exc)))

    @q.executor("thread", max_concurrent_jobs=1, timeout=WAIT)
    def waiter(job, ctx):
        try:
            outcomes.add(("thread", ctx.wait(math.nan)))
        except Exception as exc:
            outcomes.add(("thread", type(exc)))

    q.start_dispatcher(1)
    try:
        q.enqueue(Job("async", retry_config=NO_RETRY))
        q.enqueue(Job("thread", retry_config=NO_RETRY))
        assert outcomes.wait_for(2)
        assert dict(outcomes.snapshot()) == {"async": ValueError, "thread": ValueError}
    finally:
        q.stop()


# Fixed: with a store, the queue's own loop wrote each async attempt's start and outcome through
# that loop's default executor, which its coroutines share: while they held its threads (await
# q.aenqueue(job, block=True) from async executors fanning out, any run_in_executor call waiting on
# the queue), no async attempt could start or be reported: the queue deadlocked.
def test_coroutines_holding_the_loops_default_executor_do_not_stop_other_attempts(tmp_path):
    q = Queue(10)
    store = SQLitePersistence(str(tmp_path / "jobs.db"))
    q.set_persistence(store)
    holding = threading.Event()
    gate = threading.Event()
    ran = threading.Event()

    def hold():
        holding.set()
        gate.wait(2 * WAIT)

    @q.executor("hog")
    async def hog(job):
        loop = asyncio.get_running_loop()
        loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(max_workers=1))
        await loop.run_in_executor(None, hold)  # the default executor's one thread is taken

    @q.executor("other")
    async def other(job):
        ran.set()

    q.start_dispatcher(1)
    try:
        q.enqueue(Job("hog"))
        assert holding.wait(WAIT)
        q.enqueue(Job("other"))
        assert ran.wait(WAIT)
    finally:
        gate.set()
        q.stop()
        store.close()


# Fixed: a plain function that returns a coroutine (an async executor registration cannot tell)
# and returned it after stop(wait=False) closed the loop failed its job for good ("Event loop is
# closed", kept dead), though the coroutine never ran and stop() is no failure of the job's.
def test_an_awaitable_returned_after_stop_closed_the_loop_is_given_back_not_failed(tmp_path):
    q = Queue(10)
    store = SQLitePersistence(str(tmp_path / "jobs.db"))
    q.set_persistence(store)
    ended = Recorder()
    q.on_failure(lambda job, reason, exc: ended.add((job.id, reason, exc)))
    inside = threading.Event()
    go = threading.Event()
    returned = threading.Event()

    async def work(job):
        pass

    def sneaky(job):  # plain: registered as a thread executor
        inside.set()
        assert go.wait(WAIT)
        try:
            return work(job)
        finally:
            returned.set()

    q.register_executor("s", sneaky)
    q.start_dispatcher(1)
    try:
        q.enqueue(Job("s", id="x", retry_config=NO_RETRY))
        assert inside.wait(WAIT)
        q.stop(wait=False)  # stops the loop: the worker runs on, as it cannot be killed
        go.set()
        assert returned.wait(WAIT)
        q.stop()  # waits for the worker to have handled its attempt
        assert ended.snapshot() == []
        assert q.get_stats().jobs_failed == 0
        assert [job.id for job in store.jobs()] == ["x"]  # kept as ready for the next start
        assert store.dead_jobs() == []
    finally:
        go.set()
        store.close()


def _loop_blocker(q, hold):
    """An async executor "block" that blocks the queue's loop (a sync wait, no await) until ``hold``
    is set, with a 0.2 s timeout; returns the event it sets when it has begun."""
    inside = threading.Event()

    @q.executor("block", timeout=0.2)
    async def block(job):
        inside.set()
        hold.wait(3 * WAIT)  # a blocking call by mistake (requests.get, time.sleep...)

    return inside


# Fixed: a coroutine that blocked the queue's loop past its timeout was never decided while it
# blocked (only the loop's own timer decided async deadlines): stop(wait=True), and so leaving
# `with Queue() as q:`, waited for it however long it blocked.
def test_stop_does_not_wait_for_a_coroutine_blocking_the_loop_past_its_timeout():
    q = Queue(10)
    hold = threading.Event()
    inside = _loop_blocker(q, hold)
    q.start_dispatcher(1)
    stopped = threading.Event()
    try:
        q.enqueue(Job("block", retry_config=NO_RETRY))
        assert inside.wait(WAIT)
        stopper = threading.Thread(target=lambda: (q.stop(), stopped.set()), daemon=True)
        stopper.start()
        # 0.2 s timeout, then stop()'s brief waits for unwinding (1 s) and for the loop thread (2 s)
        assert stopped.wait(WAIT)
    finally:
        hold.set()
        q.stop()


# Fixed: ... nor was its job failed with JobTimeout or retried, and join() waited as long as it
# blocked (a thread executor past its deadline is decided by the watchdog whatever it does).
def test_a_coroutine_blocking_the_loop_past_its_timeout_times_out():
    q = Queue(10)
    hold = threading.Event()
    inside = _loop_blocker(q, hold)
    ended = Recorder()
    q.on_failure(lambda job, reason, exc: ended.add((reason, type(exc))))
    q.start_dispatcher(1)
    try:
        q.enqueue(Job("block", retry_config=NO_RETRY))
        assert inside.wait(WAIT)
        assert ended.wait_for(1)
        assert ended.snapshot() == [("retries_exhausted", tinymq.JobTimeout)]
        assert q.join(WAIT)
        assert q.get_stats().jobs_timed_out == 1
        assert not hold.is_set()  # all of it while the loop is still blocked
    finally:
        hold.set()
        q.stop()


def test_redis_a_cancel_settled_by_a_stop_is_reported_before_join_returns(redis_url):
    """Over Redis, a job cancelled while leased whose worker stops before hearing of the mark:
    the give-back (op B at the release) ends it as cancelled in Redis, and its row waits in
    the shared 'reports' list for another worker's heartbeat. It counted as finished for
    join() at once before the fix, though no callback had run anywhere (API.md: callbacks
    run before the job counts as finished for join()); now the row holds it until reported.

    Deterministic: the worker is made deaf to the mark (its fetch and beat replies name it,
    and it does nothing), so it learns of it only at the give-back of its stop, the way it
    does when the stop comes first (which way a real run goes is a race). Its pump sends no
    round once the job started, so the give-back goes with the release, not with a fetch
    whose reply would hand the row back to the worker itself (the other race)."""
    from tinymq.redis import RedisBroker

    from _helpers import wait_until

    name = "attackBB-join"
    lease = 30.0  # the worker's heartbeat (lease / 4) does not run meanwhile
    worker = Queue(broker=RedisBroker(redis_url, name=name, lease=lease))
    producer = Queue(broker=RedisBroker(redis_url, name=name, lease=lease))
    reporter = None
    started = threading.Event()
    in_callback = threading.Event()
    release_callback = threading.Event()
    reported = []

    def work(job, ctx):
        started.set()
        ctx.wait(3 * WAIT)

    def report(job, reason, exc):
        reported.append((job.id, reason))
        in_callback.set()
        release_callback.wait(3 * WAIT)

    worker.on_failure(report)
    worker.register_executor("work", work)
    worker.start_dispatcher(1)
    worker._link._cancel_marked = lambda attempts: None  # deaf: it hears of the mark only at its stop
    reports = producer._link.scripts.key("reports")
    try:
        producer.enqueue(Job("work", id="a"))
        assert started.wait(WAIT)
        worker._link._round = lambda unless_sent=None: 0  # its ops wait for the release
        assert producer.cancel("a")  # marked: the worker holds it
        worker.stop(wait=False)  # gives it back: the release ends it as cancelled, nobody left reports it
        assert producer._link.client.llen(reports) == 1 and not reported
        assert not producer.join(0.5)  # (before the fix: True)
        # Another worker process's heartbeat hands it out, and its callbacks report it.
        reporter = Queue(broker=RedisBroker(redis_url, name=name, lease=2.0))
        reporter.on_failure(report)
        reporter.register_executor("work", work)
        reporter.start_dispatcher(1)
        assert in_callback.wait(WAIT)
        assert reported == [("a", "cancelled")]
        assert not producer.join(0.5)  # its callback is still running
        release_callback.set()
        assert producer.join(WAIT)
        assert wait_until(lambda: producer._link.client.llen(reports) == 0)
    finally:
        release_callback.set()
        worker.stop()
        producer.stop()
        if reporter is not None:
            reporter.stop()
