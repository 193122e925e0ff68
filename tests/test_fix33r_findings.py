"""Defects of the Redis broker left open by earlier outside attacks (session 33, helper fix33r), each
with its test against a real redis-server (tests/conftest.py's fixtures), failing before its fix."""
import contextlib
import gc
import threading
import time

import pytest

from tinymq import Job

from _backends import Redis
from _helpers import WAIT



# --- 1. get_stats() in a loop starved a producer waiting for room -----------------------------------

# A producer's enqueue(block=True) waits while the buffer is full, and while due delayed jobs wait
# for room before it (they keep their FIFO place: docs/redis.md). Those pile up while the buffer is
# full, and every get_stats() read each of them in Redis (stats.lua's queue_sizes: one read per due
# job, 60 ms for 20,000): a thread calling get_stats() in a loop kept Redis busy, each fetch that
# makes room waited behind one such call, and the producer waited some 30 times as long (96 s here,
# against 3 s without the loop). Now get_stats() reads only the due jobs the buffer's room takes
# and counts the rest (one ZCOUNT).

DUE = 20_000
ROOM_WAIT = 60.0  # seconds: about 3 s here, either way, now; 96 s before the fix


@pytest.mark.redis
def test_get_stats_in_a_loop_does_not_starve_a_producer_waiting_for_room(redis_url):
    backend = Redis(redis_url)
    try:
        q = backend.queue(buffer_size=10, max_delayed_jobs=DUE)
        due_at = time.time() + 3.0  # (not due before the last batch is in: a due one would need room)
        for first in range(0, DUE, 1000):
            q.enqueue_many([Job("t", n, id=f"due-{n}", run_at=due_at) for n in range(first, first + 1000)])
        by = time.monotonic() + 3.0 + WAIT
        while q.get_stats().waiting_for_room < DUE - 10:  # (10: the buffer's room)
            assert time.monotonic() < by
            time.sleep(0.01)
        q.register_executor("t", lambda job: None)
        q.start_dispatcher(2)
        entered = threading.Event()
        looks = []

        def looking():
            while not entered.is_set():
                q.get_stats()
                looks.append(1)

        looker = threading.Thread(target=looking)
        looker.start()
        try:
            began = time.monotonic()
            q.enqueue(Job("t", "after", id="after"), block=True, timeout=ROOM_WAIT)  # (QueueFull: starved)
            waited = time.monotonic() - began
        finally:
            entered.set()
            looker.join()
        assert looks, "get_stats() was not called while the producer waited"
        assert q.join(WAIT), f"the producer got in after {waited:.1f}s"
        stats = q.get_stats()
        assert (stats.jobs_enqueued, stats.jobs_succeeded, stats.waiting_for_room) == (DUE + 1, DUE + 1, 0)
    finally:
        backend.close()

# --- 2. A cancel the collector runs between succeeding() and succeeded() of the same job ----------

# Over Redis, a process's own cancel() first sends the outcome it decided for its attempt of the job
# (a success being counted waits for its op: attack32's _send_decided), so that the cancel, sent
# ahead of that op, cannot end as cancelled a job counted here as a success. A cancel run by the
# garbage collector (a __del__ that calls q.cancel) on the very thread that counts the success,
# between its succeeding() and its succeeded(), waited there for that thread's own op: a whole lease,
# with the worker (or the event loop) held up. Its success is decided (in-process such a cancel finds
# the job ended): cancel() now returns False at once, and the success stands.

LEASE = 10.0


@pytest.mark.redis
@pytest.mark.parametrize("kind", ["thread", "coroutine"])
def test_a_cancel_the_collector_runs_as_the_same_thread_counts_the_jobs_success_returns_at_once(redis_url, kind):
    backend = Redis(redis_url, lease=LEASE)
    try:
        q = backend.queue()
        reported = []
        q.on_failure(lambda job, reason, exc: reported.append((job.id, reason)))
        if kind == "thread":
            def run(job):
                pass
        else:
            async def run(job):
                pass
        q.register_executor("t", run)
        link = q._link
        outcomes = []

        class CancelsTheJob:
            """Garbage whose __del__ cancels the job, as a user's finalizer may."""

            def __init__(self, job_id):
                self.job_id = job_id
                self.cycle = self  # (freed by the collector only)

            def __del__(self):
                began = time.monotonic()
                try:
                    outcomes.append((q.cancel(self.job_id), time.monotonic() - began))
                except Exception as error:
                    outcomes.append((error, time.monotonic() - began))

        succeeding = link.succeeding

        def collected_as_it_succeeds(job):  # (the dispatcher reads the ledger's hooks at start_dispatcher)
            decided = succeeding(job)
            if decided and job.id == "done":
                CancelsTheJob(job.id)
                gc.collect()  # the collector runs the __del__ here, on the thread that counts the success
            return decided

        link.succeeding = collected_as_it_succeeds
        q.start_dispatcher(1)
        q.enqueue(Job("t", id="done"))
        assert q.join(WAIT + LEASE)
        assert len(outcomes) == 1, outcomes
        cancelled, took = outcomes[0]
        assert cancelled is False, outcomes
        assert took < LEASE / 2, f"the cancel waited {took:.1f}s (the lease is {LEASE:g}s)"
        stats = q.get_stats()
        executor = stats.executor_stats["t"]
        assert (stats.jobs_succeeded, stats.jobs_cancelled) == (1, 0)
        assert (executor.succeeded, executor.cancelled) == (1, 0)
        assert reported == []
    finally:
        backend.close()


# --- 3. A BUSY reply to a resend ---------------------------------------------------------------------

# A call whose reply was lost (its connection broke after the send) is sent again, with the same
# token: every script is idempotent against a resend. While a script runs past Redis's
# busy-reply-threshold (another program's slow script), Redis answers every other call BUSY without
# running it. Answering the first send, that says the call did not run (test_redisstop31_findings);
# answering a resend, it says nothing of the first send, which may have run: the call raised at once
# ("they may or may not have been enqueued", "it may or may not have been cancelled"), and a caller
# that enqueued again to find out met its own job (DuplicateJob) or left it out. Such a resend is now
# sent again once Redis answers (within the call's bound): the call returns its outcome, applied once.

BUSY_ANSWERS = 2  # BUSY replies to the resends before the busy script is killed


@contextlib.contextmanager
def _lost_then_busy(server, scripts, name, runs=True):
    """For the ``with`` block, make ``scripts.<name>`` lose the reply of its first call
    (redis.ConnectionError, as a connection that broke), which ran in Redis (``runs``) or never
    reached it, with Redis busy in a script from then on; after BUSY_ANSWERS BUSY replies to the
    resends, the script is killed (at the block's end at the latest). Yields the replies seen."""
    import redis

    from test_redisstop31_findings import _busy

    real = getattr(scripts, name)
    busy = _busy(server)
    seen = []
    killed = []

    def kill():
        if seen and not killed:
            killed.append(True)
            busy.__exit__(None, None, None)  # Redis answers again

    def call(*args, **kwargs):
        if not seen:
            seen.append(("ran", real(*args, **kwargs)) if runs else ("lost", None))
            busy.__enter__()  # (from now on, until it is killed, every call is answered BUSY)
            raise redis.ConnectionError("Connection closed by server (the reply was lost)")
        try:
            reply = real(*args, **kwargs)
        except redis.ResponseError as exc:
            seen.append(("error", str(exc)))
            if str(exc).startswith("BUSY") and sum(kind == "error" for kind, _ in seen) == BUSY_ANSWERS:
                kill()
            raise
        seen.append(("reply", reply))
        return reply

    setattr(scripts, name, call)
    try:
        yield seen
    finally:
        kill()
        setattr(scripts, name, real)


@pytest.mark.redis
@pytest.mark.parametrize("call", ["enqueue", "enqueue_many"])
def test_an_enqueue_whose_resend_redis_answers_busy_is_sent_again_and_applied_once(redis_server, redis_url, call):
    backend = Redis(redis_url)
    try:
        q = backend.queue()  # (producer only: no beat meanwhile)
        with _lost_then_busy(redis_server, q._link.scripts, "enqueue") as seen:
            if call == "enqueue":
                q.enqueue(Job("t", id="one"))
            else:
                q.enqueue_many([Job("t", id="one"), Job("t", id="two")])
        kinds = [kind for kind, _ in seen]
        assert kinds[:1 + BUSY_ANSWERS] == ["ran"] + ["error"] * BUSY_ANSWERS, seen
        assert all(text.startswith("BUSY") for kind, text in seen if kind == "error"), seen
        assert kinds[-1] == "reply" and seen[-1][1].status == "again", seen  # (the first send had run)
        stats = q.get_stats()
        jobs = 1 if call == "enqueue" else 2
        assert (stats.jobs_enqueued, stats.medium_queue_size) == (jobs, jobs)
    finally:
        backend.close()


@pytest.mark.redis
def test_a_cancel_whose_resend_redis_answers_busy_is_sent_again_and_applied_once(redis_server, redis_url):
    backend = Redis(redis_url)
    try:
        q = backend.queue()
        reported = []
        q.on_failure(lambda job, reason, exc: reported.append((job.id, reason)))
        q.enqueue(Job("t", id="waiting"))
        with _lost_then_busy(redis_server, q._link.scripts, "cancel") as seen:
            assert q.cancel("waiting") is True
        assert [kind for kind, _ in seen][:1 + BUSY_ANSWERS] == ["ran"] + ["error"] * BUSY_ANSWERS, seen
        assert seen[-1][0] == "reply", seen
        assert reported == [("waiting", "cancelled")]
        assert q.join(WAIT)
        stats = q.get_stats()
        assert (stats.jobs_enqueued, stats.jobs_cancelled, stats.medium_queue_size) == (1, 1, 0)
    finally:
        backend.close()


@pytest.mark.redis
def test_a_release_at_stop_whose_resend_redis_answers_busy_is_sent_again_and_gives_back_what_it_held(
        redis_server, redis_url):
    """stop()'s release (settle the ops left, give back the buffered jobs, unregister), its first
    send lost before Redis ran it and its resend answered BUSY: stop() gave up ("could not give
    back"), and what the process held came back only once its lease ran out, each job counted as
    a crash, the process counted live meanwhile. Now the release is sent again once Redis answers."""
    backend = Redis(redis_url, lease=30.0)
    try:
        producer, worker = backend.pair(buffer_size=10)
        running, finish = threading.Event(), threading.Event()

        def run(job):
            running.set()
            finish.wait(WAIT)

        worker.register_executor("t", run)
        worker.start_dispatcher(1)
        producer.enqueue(Job("t", id="running"))
        assert running.wait(WAIT)
        with _lost_then_busy(redis_server, worker._link.scripts, "release", runs=False) as seen:
            stopping = threading.Thread(target=worker.stop, kwargs={"timeout": WAIT})
            stopping.start()
            finish.set()  # (its success is settled by the release)
            stopping.join(WAIT + 5)
            assert not stopping.is_alive()
        assert producer.broker.shared_executors()[1] == 0  # (unregistered: no live worker process)
        assert producer.join(WAIT)
        stats = producer.get_stats()
        assert (stats.jobs_enqueued, stats.jobs_succeeded) == (1, 1)
        kinds = [kind for kind, _ in seen]
        assert kinds[:1 + BUSY_ANSWERS] == ["lost"] + ["error"] * BUSY_ANSWERS and kinds[-1] == "reply", seen
    finally:
        backend.close()
