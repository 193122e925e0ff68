"""Attack on the changes of session 23 (attackSS): what an outsider found, each with its test.

API.md "Stats": get_stats() sees every unfinished job in exactly one place, or ended; join() returns
once every job has ended.
"""
import time

import pytest

from tinymq import DuplicateJob, Job, PermanentFailure

from _helpers import WAIT, all_accounted, make_queue, record_failures, wait_until


def due_and_broken(q, payload):
    """A delayed job, due almost at once, whose priority is made invalid while it waits (moving it
    in fails it), waited for until it is due (no dispatcher: the scheduler does not move it)."""
    job = q.enqueue_delayed(Job("t", payload), 0.01)
    job.priority = 7
    due = time.time() + 0.05
    assert wait_until(lambda: time.time() > due)
    return job


@pytest.mark.parametrize("how", ["enqueue_delayed", "enqueue_many"])
def test_a_refused_delayed_enqueue_on_a_full_heap_still_ends_the_due_jobs_it_moved(how):
    """On a full delayed heap an enqueue moves the due jobs in first; one that cannot go in is
    taken out of the heap, its end left to the caller. The enqueue then refused as a duplicate id:
    that end was dropped, so the job was counted nowhere and join() never returned."""
    q = make_queue(max_delayed_jobs=2)
    try:
        failures = record_failures(q, key=lambda job: job.payload)
        q.register_executor("t", lambda job: None)
        waiting = q.enqueue_delayed(Job("t", "waiting", id="taken"), 60.0)
        due_and_broken(q, "broken")
        again = Job("t", "again", id="taken")
        with pytest.raises(DuplicateJob):
            if how == "enqueue_delayed":
                q.enqueue_delayed(again, 60.0)
            else:
                q.enqueue_many([Job("t", "again", id="taken", run_at=time.time() + 60.0)])
        assert [payload for payload, _, _ in failures.snapshot()] == ["broken"]
        stats = q.get_stats()
        assert stats.jobs_failed == 1 and all_accounted(stats), stats
        assert q.cancel(waiting.id)
        assert q.join(WAIT), "the due job the refused enqueue took out of the heap never ended"
    finally:
        q.stop(wait=False)


@pytest.mark.redis
def test_a_job_whose_id_is_not_utf8_in_redis_can_be_cancelled_by_the_id_it_reads_as(redis_url):
    """docs/redis.md: an id that is not UTF-8 in Redis (another program wrote it) reads as lone
    surrogates and goes back as the same bytes: requeue_dead and purge_dead take it so, and its job
    runs and settles under it. cancel() of that id returned False ("no job can have it") and left
    the job to run; now it cancels the job, as for any id. An id no bytes read as is still False."""
    import redis

    from tinymq import Queue, RetryConfig
    from tinymq.redis import RedisBroker
    from tinymq.redis._scripts import Scripts

    body = b'["t",1,null,1.0,1.0,null,null]'
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    q = Queue(broker=RedisBroker(redis_url, name="foreign-id"))
    try:
        failures = record_failures(q, key=lambda job: job.id)
        q.register_executor("t", lambda job: None)
        assert Scripts(client, "foreign-id").enqueue("tok", 100, 0, [(b"id-\xff", "t", 1, 60_000, body)]).status == "ok"
        assert q.cancel("id-\ud800") is False  # (no bytes read so: surrogateescape makes \udc80-\udcff only)
        assert q.cancel("id-\udcfe") is False  # (no job has those bytes)
        assert q.cancel("id-\udcff") is True, "the job whose id is b'id-\\xff' in Redis was not cancelled"
        assert q.join(WAIT)
        assert failures.snapshot() == [("id-\udcff", "cancelled", None)]
        assert q.get_stats().jobs_cancelled == 1
    finally:
        q.stop()
        client.close()


@pytest.mark.redis
def test_an_executor_for_a_type_that_is_not_utf8_in_redis_runs_its_jobs_and_one_redis_cannot_take_is_refused(redis_url):
    """register_executor of a type holding a lone surrogate, on a RedisBroker queue: its limits
    could not be sent (UnicodeEncodeError), so the pump crashed at every round, let its id go and
    started again, and no job of the queue ran, of any type. Now a type sends as a job reads it
    (b't\\xff' in Redis is 't\\udcff'), so its jobs run; one that no bytes read as ('\\ud800') is
    refused by register_executor with a ValueError naming it."""
    import redis

    from tinymq import Queue, RetryConfig
    from tinymq.redis import RedisBroker
    from tinymq.redis._scripts import Scripts

    client = redis.Redis.from_url(redis_url, decode_responses=True)
    rows = [("foreign", b"t\xff", 1, 0, b'["t\xff",1,null,1.0,1.0,null,null]'),
            ("plain", "u", 1, 0, b'["u",1,null,1.0,1.0,null,null]')]
    assert Scripts(client, "foreign-type").enqueue("tok", 100, 0, rows).status == "ok"
    q = Queue(broker=RedisBroker(redis_url, name="foreign-type"))
    try:
        ran = []
        failures = record_failures(q, key=lambda job: job.id)
        with pytest.raises(ValueError, match=r"job type 'x\\ud800' cannot be sent to Redis"):
            q.register_executor("x\ud800", lambda job: None)
        assert "x\ud800" not in q.get_stats().executor_stats
        q.register_executor("t\udcff", lambda job: ran.append((job.id, job.type)))
        q.register_executor("u", lambda job: ran.append((job.id, job.type)))
        q.start_dispatcher(1)
        assert q.join(WAIT), "no job ran"
        assert sorted(ran) == [("foreign", "t\udcff"), ("plain", "u")] and failures.snapshot() == []
    finally:
        q.stop()
        client.close()


@pytest.mark.parametrize("name", ["jobs-\udcff", "\ud800"])
def test_a_broker_name_redis_cannot_take_is_refused_naming_it(name):
    """RedisBroker(name=...) with a lone surrogate was taken: every call naming one of its keys then
    failed with a bare UnicodeEncodeError (enqueue), and the pump crashed at every round. Refused
    at construction now, naming it, as a name with '{' is (the CLI's --name says it as its error)."""
    pytest.importorskip("redis")
    from tinymq.redis import RedisBroker

    with pytest.raises(ValueError, match="broker name must be text Redis can take") as info:
        RedisBroker("redis://127.0.0.1:1/0", name=name)
    assert repr(name) in str(info.value)


@pytest.mark.parametrize("inside", [True, False])
def test_a_worker_target_given_as_an_absolute_path_is_named_from_the_current_directory(inside, tmp_path, monkeypatch):
    """`worker /home/me/proj/myapp/jobs.py:queue` was told to write 'home.me.proj.myapp.jobs:queue',
    a module name from the root, which imports from nowhere but '/'. Now the name is the path's
    from the current directory (where the worker imports from), and none is offered for a file
    outside it."""
    from tinymq._worker import split_target

    monkeypatch.chdir(tmp_path if inside else tmp_path / "..")
    target = f"{tmp_path}/myapp/jobs.py:queue" if inside else "/elsewhere/myapp/jobs.py:queue"
    hint = "; write 'myapp.jobs:queue' (a module name, as for `python -m`, not a file path)" if inside else ""
    with pytest.raises(ValueError) as refused:
        split_target(target)
    assert str(refused.value) == f"the target must look like 'package.module:queue', got {target!r}{hint}"


class RetrySaveInterrupted:
    """An in-memory store whose second save (the first retry's) raises KeyboardInterrupt."""

    def __init__(self):
        self.rows, self.saves = {}, 0

    def save(self, job):
        self.saves += 1
        if self.saves == 2:
            raise KeyboardInterrupt("store gone")
        self.rows[job.id] = job

    def delete(self, job_id):
        self.rows.pop(job_id, None)

    def load_all(self):
        return []


@pytest.mark.parametrize("delay", [0.0, 0.05])
def test_a_retry_whose_save_raises_keyboardinterrupt_is_still_placed(delay):
    """docs/api.md "Persistence": a store's KeyboardInterrupt goes on up once the job is looked
    after. At a retry's save it went up before the retry was placed: the job was in no place and
    never ended, and join() hung. Now the retry is placed, runs, and the error goes on up after
    (the worker thread it ends is logged and replaced)."""
    from tinymq import Queue, RetryConfig

    store = RetrySaveInterrupted()
    q = Queue(10)
    try:
        q.set_persistence(store)
        attempts = []

        def fails_once(job):
            attempts.append(job.retries)
            if len(attempts) == 1:
                raise RuntimeError("first attempt fails")

        q.register_executor("t", fails_once)
        job = q.enqueue(Job("t", 1, retry_config=RetryConfig(max_retries=2, initial_delay=delay)))
        q.start_dispatcher(1)
        assert q.join(WAIT), "the retry whose save raised was never placed"
        stats = q.get_stats()
        assert attempts == [0, 1] and (stats.jobs_retried, stats.jobs_succeeded) == (1, 1)
        assert all_accounted(stats) and job.id not in store.rows
    finally:
        q.stop(wait=False)


def test_on_failure_takes_a_wrapper_by_its_own_parameters_not_those_of_the_function_it_wraps():
    """on_failure's signature check read through functools.wraps: an adapter `wrapper(job, reason,
    exc)` that calls a one-argument `notify(job)` was refused as having the signature (job), though
    the queue calls the wrapper. A wrapper that cannot take the three is still refused."""
    import functools

    from tinymq import Queue, RetryConfig

    def adapter(fn):
        @functools.wraps(fn)
        def wrapper(job, reason, exc):
            fn(job)
        return wrapper

    notified = []

    def notify(job):
        notified.append(job.payload)

    q = Queue()
    try:
        assert q.on_failure(adapter(notify)) is not None
        with pytest.raises(TypeError, match=r"callable as fn\(job, reason, exc\).* signature \(job\)"):
            q.on_failure(functools.wraps(notify)(lambda job: None))
        def fails(job):
            raise PermanentFailure("no")

        q.register_executor("t", fails)
        q.enqueue(Job("t", "failing"))
        q.start_dispatcher(1)
        assert q.join(WAIT) and notified == ["failing"]
    finally:
        q.stop(wait=False)


def test_an_executor_wrapper_is_called_as_its_own_parameters_say():
    """An executor `wrapper(job, ctx)` made with functools.wraps around `work(payload)` was called
    as fn(job): its signature was read through to work's one parameter, and every job failed with
    "missing 1 required positional argument: 'ctx'". Its own parameters decide now; a generic
    wrapper(*args, **kwargs) is still called as the function it wraps takes."""
    import functools

    from tinymq import Queue, RetryConfig

    done = []

    def with_context(fn):
        @functools.wraps(fn)
        def wrapper(job, ctx):
            return fn((job.payload, ctx.job is job))
        return wrapper

    def generic(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            return fn(*args, **kwargs)
        return wrapper

    def work(payload):
        done.append(payload)

    def work_with_context(job, ctx):
        done.append((job.payload, ctx.job is job))

    q = Queue()
    try:
        q.register_executor("adapted", with_context(work))
        q.register_executor("generic", generic(work_with_context))
        q.enqueue(Job("adapted", "a", retry_config=RetryConfig(max_retries=0)))
        q.enqueue(Job("generic", "g"))
        q.start_dispatcher(1)
        assert q.join(WAIT)
        assert sorted(done) == [("a", True), ("g", True)] and q.get_stats().jobs_failed == 0
    finally:
        q.stop(wait=False)
