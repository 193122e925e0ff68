"""Findings of redisfix (session 28): defects of the Redis broker found earlier and left unfixed.

Each test failed on the code before its fix; its docstring says the symptom, how to
reproduce it, and what the docs promise.
"""
import logging
import threading

import pytest

from tinymq import ExecutorConfig, Job, Queue

from _helpers import WAIT, wait_until

pytestmark = pytest.mark.redis

LEASE_MS = 60_000


@pytest.fixture
def scripts(redis_client):
    from tinymq.redis._scripts import Scripts

    return Scripts(redis_client, "s")


def _outstanding(client, name):
    return int(client.hget(f"tmq:{{{name}}}:stats", "outstanding") or 0)


def _gone_errors(caplog, job_id):
    return [r for r in caplog.records if r.levelno == logging.ERROR and f"job {job_id} " in r.getMessage()
            and "data" in r.getMessage() and "on_failure" in r.getMessage()]


def _rows(*ids, delay_ms=0):
    return [(job_id, "t", 1, delay_ms, f'{{"id": "{job_id}"}}') for job_id in ids]


# --- 1. a job whose hash Redis lost ------------------------------------------------


def test_a_ready_job_whose_hash_redis_lost_is_logged_and_join_returns(redis_url, redis_client, caplog):
    """Symptom: a job whose hash (job:<id>) Redis lost while its id waited in a ready list (an
    evicting maxmemory-policy, another program deleting it) was dropped by the fetch without a
    word, and join() waited for it for ever: it still counted as unfinished.
    Reproduce: enqueue three jobs, delete the middle one's hash, start a worker, join().
    docs/redis.md: nothing is dropped without the caller or a failure callback hearing of it.
    Fix: the fetch that meets such an id counts the job finished and names it in its reply; the
    worker logs an ERROR naming the job, saying its data is gone (no on_failure can run)."""
    from tinymq.redis import RedisBroker

    q = Queue(broker=RedisBroker(redis_url, name="lost", lease=2.0))
    ran = []
    q.register_executor("t", lambda job: ran.append(job.id))
    try:
        q.enqueue_many([Job("t", id="a"), Job("t", id="lost-one"), Job("t", id="b")])
        redis_client.delete("tmq:{lost}:job:lost-one")  # behind the queue's back
        with caplog.at_level(logging.ERROR, logger="tinymq"):
            q.start_dispatcher(1)
            assert q.join(WAIT)
            assert wait_until(lambda: _gone_errors(caplog, "lost-one"))
        assert sorted(ran) == ["a", "b"]
        stats = q.get_stats()
        assert (stats.jobs_enqueued, stats.jobs_succeeded, stats.jobs_failed) == (3, 2, 0)
        assert _outstanding(redis_client, "lost") == 0
        q.enqueue(Job("t", id="after"))  # the queue goes on
        assert q.join(WAIT) and "after" in ran
    finally:
        q.stop()


def test_a_delayed_job_whose_hash_redis_lost_is_logged_and_join_returns(redis_url, redis_client, caplog):
    """As above, for a delayed job: the call that promotes it when it comes due (here a producer's
    enqueue, whose reply has no room for it) drops it; the next heartbeat's reply names it."""
    from tinymq.redis import RedisBroker

    q = Queue(broker=RedisBroker(redis_url, name="lostd", lease=1.0))
    ran = []
    q.register_executor("t", lambda job: ran.append(job.id))
    try:
        q.enqueue_delayed(Job("t", id="later"), 0.05)
        redis_client.delete("tmq:{lostd}:job:later")
        assert wait_until(lambda: redis_client.zscore("tmq:{lostd}:delayed", "later") is not None)
        with caplog.at_level(logging.ERROR, logger="tinymq"):
            threading.Event().wait(0.1)  # (due by now on the server's clock)
            q.enqueue(Job("t", id="now"))  # promotes the due job first: its hash is gone
            assert redis_client.zcard("tmq:{lostd}:delayed") == 0
            q.start_dispatcher(1)
            assert q.join(WAIT)
            assert wait_until(lambda: _gone_errors(caplog, "later"))
        assert ran == ["now"]
        assert _outstanding(redis_client, "lostd") == 0
    finally:
        q.stop()


def test_a_parked_job_whose_hash_redis_lost_is_logged_and_join_returns(redis_url, redis_client, caplog):
    """As above, for a job parked behind its saturated type: let out as the slot frees, the fetch
    that meets it drops it and says so."""
    from tinymq.redis import RedisBroker

    q = Queue(broker=RedisBroker(redis_url, name="lostp", lease=2.0))
    running, release = threading.Event(), threading.Event()
    ran = []

    def work(job):
        ran.append(job.id)
        if job.id == "first":
            running.set()
            release.wait(WAIT)

    q.register_executor("t", work, ExecutorConfig(max_concurrent_jobs=1))
    try:
        q.enqueue(Job("t", id="first"))
        q.start_dispatcher(2)
        assert running.wait(WAIT)
        q.enqueue_many([Job("t", id="parked"), Job("t", id="next")])
        assert wait_until(lambda: redis_client.llen("tmq:{lostp}:parked:1:t") == 2)
        redis_client.delete("tmq:{lostp}:job:parked")
        with caplog.at_level(logging.ERROR, logger="tinymq"):
            release.set()
            assert q.join(WAIT)
            assert wait_until(lambda: _gone_errors(caplog, "parked"))
        assert ran == ["first", "next"]
        assert _outstanding(redis_client, "lostp") == 0
    finally:
        release.set()
        q.stop()


def test_the_scripts_drop_every_id_without_its_hash_and_name_it(scripts):
    """Every script that reads a job's hash by an id from a ready list, the delayed set, a parked
    list or an in-flight attempt (fetch, promotion, a give-back, a retry, a reap) counts a job
    whose hash is gone finished, once, and names it: in its reply (fetch, beat) or for the next
    beat (the `gone` list)."""
    client = scripts.client
    key = scripts.key
    assert scripts.enqueue("e1", 100, 0, _rows("r1", "r2", "y1", "b1", "c1")).status == "ok"
    assert scripts.enqueue("e2", 100, 0, _rows("d1", delay_ms=1)).status == "ok"
    jobs = scripts.fetch("P", "1", 4, LEASE_MS, 3, False).jobs
    assert [j.id for j in jobs] == ["r1", "r2", "y1", "b1"]
    attempts = {j.id: j.attempt for j in jobs}
    threading.Event().wait(0.01)  # (d1 due)
    client.delete(*(key(f"job:{i}") for i in ("y1", "b1", "c1", "d1", "r1")))
    from tinymq.redis._scripts import SettleOp

    # A retry and a give-back of attempts whose job is gone; a ready id and a due one without a hash.
    reply = scripts.fetch("P", "2", 5, LEASE_MS, 3, True, [
        SettleOp("Y", attempts["y1"], 1, 0, "", "E"), SettleOp("B", attempts["b1"])])
    assert reply.jobs == []
    assert sorted(reply.gone) == ["b1", "c1", "d1", "y1"]
    assert int(client.hget(key("stats"), "outstanding")) == 2  # r1 and r2, still in flight
    assert int(client.hget(key("stats"), "retried") or 0) == 0  # y1's retry: of a job that is gone
    # A reap of P: r1's hash is gone too.
    client.zadd(key("procs"), {"P": 0})
    beat = scripts.heartbeat("Q", LEASE_MS, 3, False, "b1")
    assert beat.gone == ["r1"]
    assert scripts.heartbeat("Q", LEASE_MS, 3, True, "b1").gone == ["r1"]  # a resend: the same
    assert int(client.hget(key("stats"), "outstanding")) == 1  # r2, back in ready:1
    # A settle's give-back (its reply has no room): the next beat hands it out.
    assert scripts.enqueue("e3", 100, 0, _rows("s1")).status == "ok"
    taken = scripts.fetch("Q", "3", 5, LEASE_MS, 3, True).jobs
    assert sorted(j.id for j in taken) == ["r2", "s1"]
    client.delete(key("job:s1"))
    assert scripts.settle("Q", [SettleOp("B", j.attempt) for j in taken if j.id == "s1"]) == 0
    assert scripts.heartbeat("Q", LEASE_MS, 3, True, "b2").gone == ["s1"]
    assert scripts.heartbeat("Q", LEASE_MS, 3, True, "b3").gone == []  # handed out once
    assert int(client.hget(key("stats"), "outstanding")) == 1  # r2
    assert client.keys(key("job:*")) == [key("job:r2")]


# --- 2. per-type counters never go down ----------------------------------------------


@pytest.mark.parametrize("raises", [False, True], ids=["returns", "raises"])
def test_a_per_type_counter_never_goes_down_when_the_process_learns_it_was_reaped(redis_url, raises):
    """Symptom: an outcome counted here (ExecutorStats, which PrometheusCollector exports as
    counters) whose op went in the call whose reply said this process was reaped (Redis ran none
    of it) was taken back: the counter went down, and Prometheus read a reset.
    Reproduce: a worker's attempt ends while no round runs, its process reaped meanwhile; read
    its per-type counters before and after the round that tells it so.
    Fix: what a process counted stays counted (docs/redis.md, ExecutorStats): the attempts that
    end once it learnt of the reap count nowhere, as before."""
    from tinymq import RetryConfig

    from _backends import Redis
    from _helpers import per_type_counts

    backend = Redis(redis_url, lease=40.0)  # no heartbeat during the test
    try:
        producer, worker = backend.pair()
        started, let_go, again = threading.Event(), threading.Event(), threading.Event()
        runs = []

        def work(job):
            runs.append(job.id)
            if len(runs) == 1:
                started.set()
                assert let_go.wait(WAIT)
                if raises:
                    raise ValueError("boom")
            else:  # its run again, in the worker's second life: after the read below
                assert again.wait(WAIT)

        worker.register_executor("t", work)
        producer.enqueue(Job("t", "x", retry_config=RetryConfig(max_retries=2, initial_delay=0.0)))
        worker.start_dispatcher(1)
        assert started.wait(WAIT)
        link = worker._link
        proc = link._proc
        seen = []
        with link._round_lock:  # no round meanwhile: the outcome waits to be sent
            scripts = producer.broker._scripts
            with scripts.client.pipeline(transaction=True) as pipe:
                pipe.zadd(scripts.key("procs"), {proc: 0})
                scripts._script["reap"](keys=[scripts.prefix], args=[1], client=pipe)
                assert pipe.execute()[1][0] == 1
            let_go.set()
            assert wait_until(lambda: link._ops and any(per_type_counts(worker).values()))
            seen.append(per_type_counts(worker))
        assert wait_until(lambda: link._proc != proc)  # the round's reply said it was reaped
        seen.append(per_type_counts(worker))
        again.set()
        assert producer.join(WAIT)
        seen.append(per_type_counts(worker))
        for before, after in zip(seen, seen[1:]):
            assert all(after[k] >= before[k] for k in before), seen
    finally:
        backend.close()


# --- 3. a late timeout is recorded in the histogram only where it counts ---------------


def test_an_async_attempt_timing_out_after_its_process_was_reaped_is_not_recorded(redis_url):
    """Symptom: an async attempt whose deadline came after its process learnt it was reaped
    counted nowhere (its timeout not counted, as a thread attempt's), but its duration was
    recorded in the attempt-duration histogram all the same; a thread attempt's was not.
    Reproduce: an async attempt running; its process reaped (and told so by its heartbeat);
    its deadline comes; the job runs again in the process's second life.
    docs/api.md: an attempt is recorded once its outcome is counted here.
    Fix: async_timed_out records the duration only where it counts the timeout."""
    import asyncio

    from tinymq import ExecutorConfig, RetryConfig

    from _backends import Redis
    from _helpers import per_type_counts, signal_after

    backend = Redis(redis_url, lease=1.0)  # its heartbeat (every lease / 4) learns of the reap at once
    try:
        producer, worker = backend.pair()
        runs = []
        started = threading.Event()

        async def work(job):
            runs.append(job.id)
            if len(runs) == 1:
                started.set()
                await asyncio.sleep(WAIT)  # (cancelled at its deadline)

        worker.register_executor("t", work, ExecutorConfig(timeout=2.0))
        decided = signal_after(worker._link, "expired")
        producer.enqueue(Job("t", "x", retry_config=RetryConfig(max_retries=2, initial_delay=0.0)))
        worker.start_dispatcher(1)
        assert started.wait(WAIT)
        link = worker._link
        proc = link._proc
        scripts = producer.broker._scripts
        with scripts.client.pipeline(transaction=True) as pipe:
            pipe.zadd(scripts.key("procs"), {proc: 0})
            scripts._script["reap"](keys=[scripts.prefix], args=[1], client=pipe)
            assert pipe.execute()[1][0] == 1
        assert wait_until(lambda: link._proc != proc)  # learnt well within the attempt's timeout
        assert decided.wait(WAIT)  # its deadline came, under the id it let go
        assert producer.join(WAIT)  # it ran again in the worker's second life
        assert wait_until(lambda: per_type_counts(worker)["succeeded"] == 1)
        assert per_type_counts(worker)["timed_out"] == 0
        counts, _ = worker._attempt_durations()["t"]
        assert sum(counts) == 1  # the success only (before: 2, the uncounted timeout too)
    finally:
        backend.close()


# --- 4. the look at Redis's settings never holds a beat ------------------------------


def test_a_server_slow_to_answer_config_does_not_delay_the_heartbeat(redis_url, monkeypatch):
    """Symptom: a worker process's look at Redis's settings (CONFIG GET maxmemory-policy and
    appendonly, every minute) ran on its heartbeat thread: a server slow only on CONFIG held
    the beat meanwhile, up to half a lease (two calls of a quarter lease each).
    Reproduce: CONFIG answered only once the test lets it (a wrapper around the CONFIG call
    alone); count the beats meanwhile. docs/redis.md: a live process renews its lease every
    lease / 4.
    Fix: the look runs on a short-lived thread of its own (tinymq-redis-settings)."""
    from tinymq.redis import RedisBroker, _link

    monkeypatch.setattr(_link, "_SETTINGS_LOOK", 0.2)
    q = Queue(broker=RedisBroker(redis_url, name="slowconfig", lease=1.0))
    scripts = q.broker._scripts
    command, heartbeat = scripts.command, scripts.heartbeat
    in_config, answer = threading.Event(), threading.Event()
    beats = []

    def slow_config(*args, **kwargs):
        if args and args[0] == "CONFIG":
            in_config.set()
            answer.wait(3 * WAIT)
        return command(*args, **kwargs)

    def counted_beat(*args, **kwargs):
        reply = heartbeat(*args, **kwargs)
        beats.append(reply.alive)
        return reply

    scripts.command = slow_config
    scripts.heartbeat = counted_beat
    q.register_executor("t", lambda job: None)
    try:
        q.start_dispatcher(1)
        assert in_config.wait(WAIT)
        seen = len(beats)
        assert wait_until(lambda: len(beats) >= seen + 4, timeout=WAIT), beats  # one each 0.25 s
        assert all(beats)
    finally:
        answer.set()
        q.stop()


def test_a_resent_fetch_leaves_out_an_attempt_whose_hash_is_gone_since(scripts):
    """A fetch resent (its reply was lost) returns the attempts the first call took: one whose
    job's hash is gone since is left out (its row would be cut short), and the release that
    gives it back finds it gone."""
    from tinymq.redis._scripts import SettleOp

    assert scripts.enqueue("e1", 100, 0, _rows("a", "b")).status == "ok"
    first = scripts.fetch("P", "1", 2, LEASE_MS, 3, False)
    scripts.client.delete(scripts.key("job:a"))
    again = scripts.fetch("P", "1", 2, LEASE_MS, 3, True)
    assert [j.id for j in again.jobs] == ["b"]
    assert scripts.release("P", [SettleOp("B", j.attempt) for j in first.jobs]).stale == 0
    assert scripts.heartbeat("Q", LEASE_MS, 3, False, "b1").gone == ["a"]
    assert int(scripts.client.hget(scripts.key("stats"), "outstanding")) == 1  # b, back in ready:1
