"""Two threads stopping one queue: API.md "Queue" says stop() is idempotent.

A stop() that comes while another thread's stop() runs returns when that one has,
not before: a caller that stops a queue and then looks at what it left (threads,
the store, a broker's keys) must find it stopped. Whichever stop() cancels the
running attempts, neither goes on waiting for them. Called from the queue's own
threads, stop() waits for neither (it would wait for itself).
"""
import asyncio
import threading

from tinymq import ExecutorConfig, Job, Queue, RetryConfig

from _helpers import WAIT


def test_a_second_stop_returns_only_after_the_first_has_stopped_the_event_loop():
    started = threading.Event()
    swallowed = threading.Event()
    finish = threading.Event()

    async def stubborn(job):
        # It swallows the stop's CancelledError and keeps its slot until the test lets it
        # go: the first stop() then waits (at most a second) for it to unwind.
        started.set()
        while not finish.is_set():
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                swallowed.set()

    q = Queue()
    q.register_executor("a", stubborn, ExecutorConfig(timeout=None))
    q.start_dispatcher(1)
    first = threading.Thread(target=q.stop, kwargs={"wait": False})
    try:
        q.enqueue(Job("a"))
        assert started.wait(WAIT)  # a stop() before the attempt starts would leave it unrun
        first.start()
        assert swallowed.wait(WAIT)  # the first stop() cancelled it and now waits for it
        q.stop()
        # The first stop() has done its work (it may still be on its way out of its thread,
        # so first.is_alive() could be True for a moment: that flaked once on 3.13).
        assert q._dispatcher._stopped.is_set(), "the second stop() returned while the first was stopping"
    finally:
        finish.set()
        first.join(WAIT)
        q.stop()


def test_a_stop_that_cancels_frees_an_earlier_stop_waiting_for_the_same_attempt():
    running = threading.Event()
    release = threading.Event()
    cancelled = threading.Event()

    def deaf(job, ctx):  # a thread executor that does not look at its context until let go
        running.set()
        release.wait(3 * WAIT)
        if ctx.cancelled:
            cancelled.set()

    q = Queue()
    q.register_executor("a", deaf, ExecutorConfig(timeout=None))
    q.start_dispatcher(1)
    patient = threading.Thread(target=q.stop)  # wait=True, no limit
    try:
        q.enqueue(Job("a"))
        assert running.wait(WAIT)
        patient.start()
        q.stop(wait=False)  # cancels the attempt: no stop() waits for it any longer
        patient.join(WAIT)
        assert not patient.is_alive(), "stop(wait=True) kept waiting for an attempt stop() cancelled"
        assert not release.is_set()  # both returned while the attempt still runs
    finally:
        release.set()
        patient.join(WAIT)
    assert cancelled.wait(WAIT)  # its context said so when it looked


def test_stop_from_a_failure_callback_during_another_stop_does_not_wait_for_it():
    in_callback = threading.Event()
    callback_returned = threading.Event()
    go_on = threading.Event()

    def fail(job):
        raise ValueError("no")

    def callback(job, reason, exc):
        in_callback.set()
        go_on.wait(WAIT)
        q.stop()  # the outer stop() waits for this callback's worker: this one must not wait for it
        callback_returned.set()

    q = Queue()
    q.register_executor("f", fail)
    q.on_failure(callback)
    q.start_dispatcher(1)
    outer = threading.Thread(target=q.stop)
    try:
        q.enqueue(Job("f", retry_config=RetryConfig(max_retries=0)))
        assert in_callback.wait(WAIT)
        outer.start()
        go_on.set()
        assert callback_returned.wait(WAIT)
        outer.join(WAIT)
        assert not outer.is_alive()
    finally:
        go_on.set()
        outer.join(WAIT)


def test_redis_a_second_stop_returns_only_after_the_first_gave_back_what_it_held(redis_url):
    import redis

    from tinymq.redis import RedisBroker

    name = "stop-twice"
    q = Queue(broker=RedisBroker(redis_url, name=name, lease=30.0))
    q.register_executor("a", lambda job: None)
    q.start_dispatcher(1)
    control = redis.Redis.from_url(redis_url)
    procs = f"tmq:{{{name}}}:procs"
    first = threading.Thread(target=q.stop)
    try:
        q.enqueue(Job("a"))
        assert q.join(WAIT)
        assert control.zcard(procs) == 1  # this process holds a lease
        # Redis holds every command for a while: the first stop() cannot give back its lease
        # until then, and a second stop() must not return before it has.
        control.execute_command("CLIENT", "PAUSE", 1500, "ALL")
        first.start()
        while not q._link._closing:  # (the first stop() is giving back)
            first.join(0.001)
        q.stop()
        # (what the first stop() promised is done; its thread may still be on its way out of stop())
        assert control.zcard(procs) == 0, "the second stop() returned while the first was giving back"
        first.join(WAIT)
        assert not first.is_alive()
    finally:
        first.join(WAIT)
        q.stop()
        control.close()
