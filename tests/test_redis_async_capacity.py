"""Async executors over Redis hold no worker thread: API.md "Async executors and cancellation"
("they do not occupy worker threads, so ``workers`` bounds only thread executors") and
"Scale-out" (everything holds over a broker). A process fetches the jobs of its async types up
to their limits beyond its free worker threads (docs/redis.md, "What holds across processes").
"""
import asyncio
import threading
import time

from tinymq import ExecutorConfig, Job

from _helpers import WAIT, Recorder

SLEEP = 0.2


def test_many_sleeping_coroutines_share_one_worker_process(redis_backend):
    """N async jobs sleeping SLEEP each, in one process with workers=1, end in about one SLEEP,
    not in N / 2 of them (a process held at most workers + 1 jobs, its coroutines' included)."""
    count = 20
    q = redis_backend.queue(buffer_size=100)

    async def nap(job):
        await asyncio.sleep(SLEEP)

    q.register_executor("nap", nap, ExecutorConfig(max_concurrent_jobs=count))
    q.enqueue_many([Job("nap", i) for i in range(count)])
    began = time.monotonic()
    q.start_dispatcher(workers=1)
    assert q.join(WAIT)
    took = time.monotonic() - began
    assert took < count / 2 * SLEEP / 2, f"{count} jobs sleeping {SLEEP}s took {took:.2f}s with one worker"
    assert q.get_stats().jobs_succeeded == count


def test_coroutines_run_while_a_thread_job_holds_the_only_worker(redis_backend):
    """A thread job holds the only worker thread; the async jobs queued after it (behind the one
    job fetched ahead for the worker) all run meanwhile, each type to its own limit."""
    q = redis_backend.queue(buffer_size=100)
    holding, release = threading.Event(), threading.Event()
    inside = Recorder()
    all_in = threading.Event()
    count = 6

    def hold(job):
        holding.set()
        release.wait(WAIT)

    async def wait(job):
        inside.add(job.payload)
        if len(inside) == count:
            all_in.set()
        while not release.is_set():
            await asyncio.sleep(0.01)

    q.register_executor("hold", hold)
    q.register_executor("a", wait, ExecutorConfig(max_concurrent_jobs=count // 2))
    q.register_executor("b", wait, ExecutorConfig(max_concurrent_jobs=count // 2))
    q.enqueue_many([Job("hold"), Job("hold")] + [Job("ab"[i % 2], i) for i in range(count)])
    q.start_dispatcher(workers=1)
    try:
        assert holding.wait(WAIT)
        assert all_in.wait(WAIT), f"only {inside.snapshot()} of {count} async jobs run beside the thread job"
        stats = q.get_stats().executor_stats
        assert (stats["a"].active_jobs, stats["b"].active_jobs) == (count // 2, count // 2)
    finally:
        release.set()
    assert q.join(WAIT)
    assert q.get_stats().jobs_succeeded == count + 2


# --- fetch.lua through its low-level API: n thread jobs and m loop jobs, strictly in order ---------

LEASE_MS = 60_000


def _scripts(redis_client):
    from tinymq.redis._scripts import Scripts

    return Scripts(redis_client, "s")


def _ready(scripts, level=1):
    return scripts.client.lrange(scripts.key(f"ready:{level}"), 0, -1)


def _rows(*typed_ids, priority=1):
    return [(job_id, job_type, priority, 0, f"body-{job_id}") for job_type, job_id in typed_ids]


def test_a_fetch_takes_loop_jobs_beyond_n_and_stops_at_the_first_job_it_has_no_place_for(redis_client):
    """With n=1, the second thread job stops the call: the loop job behind it stays for any process
    (at most one buffered job may start ahead of a later, higher-priority one)."""
    scripts = _scripts(redis_client)
    scripts.enqueue("tok", 100, 0, _rows(("a", "a1"), ("t", "t1"), ("a", "a2"), ("t", "t2"), ("a", "a3")))
    reply = scripts.fetch("p1", "1", 1, LEASE_MS, 3, False, loop_room=10, loop_types=("a",))
    assert [j.id for j in reply.jobs] == ["a1", "t1", "a2"]
    assert reply.stopped
    assert _ready(scripts) == ["t2", "a3"]
    # Without a loop type, a fetch of n jobs looks at no job beyond them, as before.
    reply = scripts.fetch("p2", "1", 1, LEASE_MS, 3, False)
    assert [j.id for j in reply.jobs] == ["t2"] and not reply.stopped
    assert _ready(scripts) == ["a3"]


def test_a_fetch_for_the_loop_only_stops_at_a_thread_job_and_parks_a_saturated_loop_type(redis_client):
    """n=0 (every worker busy): loop jobs are taken up to m, a saturated loop type's job is parked
    (it holds up nothing), and the first thread job stops the call, at any level below it too."""
    scripts = _scripts(redis_client)
    scripts.set_limits({"a": 1})
    scripts.enqueue("tok", 100, 0, _rows(("a", "a1"), ("a", "a2"), ("b", "b1"), ("t", "t1"), ("b", "b2")))
    scripts.enqueue("tok2", 100, 0, _rows(("b", "low"), priority=0))
    reply = scripts.fetch("p1", "1", 0, LEASE_MS, 3, False, loop_room=10, loop_types=("a", "b"))
    assert [j.id for j in reply.jobs] == ["a1", "b1"]
    assert reply.stopped
    assert _ready(scripts) == ["t1", "b2"]
    assert _ready(scripts, 0) == ["low"]
    assert scripts.client.lrange(scripts.key("parked:1:a"), 0, -1) == ["a2"]
    # m bounds the loop jobs too: the one beyond it stops the call, before the thread job behind it.
    scripts.enqueue("tok3", 100, 0, _rows(("b", "b3"), ("b", "b4"), ("t", "t2")))
    reply = scripts.fetch("p2", "1", 1, LEASE_MS, 3, False, loop_room=1, loop_types=("b",))
    assert [j.id for j in reply.jobs] == ["t1", "b2"] and not reply.stopped  # (both filled: it looked no further)
    reply = scripts.fetch("p3", "1", 1, LEASE_MS, 3, False, loop_room=1, loop_types=("b",))
    assert [j.id for j in reply.jobs] == ["b3"] and reply.stopped
    assert _ready(scripts) == ["b4", "t2"]
