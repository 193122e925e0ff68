"""Bad input gets a clear error at the call that brought it, never a silent failure later.

API.md "Clocks and validation": every Job attribute the queue relies on is validated
again at enqueue, however it was set; run_at must be finite; generator and wrongly
shaped executors are refused at registration; explicit ids are unique among the
queue's unfinished jobs.
"""
import enum
import functools
import math

import pytest

from tinymq import DuplicateJob, Job, Priority, Queue, RetryConfig, TinyMQError

from _helpers import WAIT, Recorder


def _stats_untouched(q):
    stats = q.get_stats()
    return (stats.jobs_enqueued, stats.high_queue_size + stats.medium_queue_size + stats.low_queue_size,
            stats.delayed_jobs_count) == (0, 0, 0)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_job_refuses_a_run_at_that_is_not_finite(bad):
    with pytest.raises(ValueError, match="run_at"):
        Job("t", run_at=bad)


@pytest.mark.parametrize("enqueue", ["enqueue", "enqueue_many"])
@pytest.mark.parametrize(
    "attribute, value, error",
    [
        ("run_at", math.nan, ValueError),
        ("run_at", math.inf, ValueError),
        ("run_at", "tomorrow", TypeError),
        ("type", 5, TypeError),
        ("type", "", ValueError),
        ("priority", 7, ValueError),
        ("priority", "HIGH", ValueError),
        ("retry_config", {"max_retries": 1}, TypeError),
        ("_tags", {"user": 123}, TypeError),
        ("_tags", {1: "x"}, TypeError),
    ],
)
def test_enqueue_revalidates_attributes_set_after_construction(enqueue, attribute, value, error):
    with Queue(10) as q:
        job = Job("t")
        setattr(job, attribute, value)
        with pytest.raises(error) as raised:
            q.enqueue(job) if enqueue == "enqueue" else q.enqueue_many([job])
        assert attribute.lstrip("_").split("_")[0] in str(raised.value)  # the message names it
        assert _stats_untouched(q)


def test_tags_set_through_the_dict_are_checked_at_enqueue():
    with Queue(10) as q:
        job = Job("t")
        job.tags["attempt"] = 3  # the dict itself cannot check what goes in
        with pytest.raises(TypeError, match="tags"):
            q.enqueue(job)
        assert _stats_untouched(q)
        with pytest.raises(TypeError, match="tags"):
            job.tags = {"attempt": 3}


def test_a_str_subclass_as_type_is_kept_as_an_exact_str():
    class Kind(str, enum.Enum):
        EMAIL = "email"

    ran = Recorder()
    with Queue(10) as q:
        q.register_executor(Kind.EMAIL, ran.add)
        job = Job(Kind.EMAIL)
        assert type(job.type) is str and job.type == "email"
        later = Job("email")
        later.type = Kind.EMAIL  # set as an attribute: normalised at enqueue
        q.start_dispatcher(1)
        q.enqueue(job)
        q.enqueue(later)
        assert q.join(WAIT)
        assert type(later.type) is str
        assert ran.wait_for(2)
        assert set(q.get_stats().executor_stats) == {"email"}


def test_an_int_priority_set_as_an_attribute_is_normalised():
    with Queue(10) as q:
        job = Job("t", run_at=10**10)
        job.priority = 2
        q.enqueue(job)
        assert job.priority is Priority.HIGH


def _generator(job):
    yield job


class _CallableGenerator:
    def __call__(self, job):
        yield job


@pytest.mark.parametrize(
    "fn, words",
    [
        (_generator, "generator"),
        (_CallableGenerator(), "generator"),
        (functools.partial(_generator), "generator"),
        (lambda: None, "fn(job)"),
        (lambda job, ctx, extra: None, "fn(job)"),
        (lambda *, job: None, "fn(job)"),
    ],
)
def test_register_refuses_executors_that_could_never_run_a_job(fn, words):
    q = Queue(10)
    with pytest.raises(TypeError, match=words.replace("(", r"\(").replace(")", r"\)")):
        q.register_executor("t", fn)
    assert "t" not in q.get_stats().executor_stats


def _registered_with_context(q, job_type):
    """Whether the queue will call ``job_type``'s executor with a context (queue not started)."""
    q.enqueue(Job(job_type))
    job, state = q._ready.pop_with_type(timeout=0)
    q._ready.release_state(state)
    q._ready.task_done(job)
    return state.takes_context


def test_a_function_registered_again_is_judged_by_its_shape_now():
    """One function for many types is inspected once, unless its code or defaults changed."""
    def handler(job, ctx):
        pass

    q = Queue(10)
    for i in range(3):
        q.register_executor(f"tenant-{i}", handler)
    assert _registered_with_context(q, "tenant-2")
    handler.__code__ = (lambda job: None).__code__
    q.register_executor("tenant-3", handler)
    assert not _registered_with_context(q, "tenant-3")
    handler.__code__ = (lambda job, ctx, extra: None).__code__
    with pytest.raises(TypeError, match=r"fn\(job\)"):
        q.register_executor("tenant-4", handler)
    handler.__defaults__ = (None,)  # extra=None: callable as fn(job, ctx) again
    q.register_executor("tenant-4", handler)
    assert _registered_with_context(q, "tenant-4")


def test_register_calls_each_accepted_shape_as_it_can_be_called():
    calls = Recorder()
    with Queue(10) as q:
        q.register_executor("one", lambda job: calls.add(("one", job.type)))
        q.register_executor("two", lambda job, ctx: calls.add(("two", type(ctx).__name__)))
        q.register_executor("optional", lambda job, ctx=None: calls.add(("optional", ctx)))
        q.register_executor("star", lambda *args: calls.add(("star", len(args))))
        q.start_dispatcher(2)
        for job_type in ("one", "two", "optional", "star"):
            q.enqueue(Job(job_type))
        assert q.join(WAIT)
    assert sorted(calls.snapshot()) == [
        ("one", "one"), ("optional", None), ("star", 1), ("two", "JobContext")]


def test_an_explicit_id_is_unique_among_unfinished_jobs():
    with Queue(10) as q:
        first = q.enqueue(Job("report", id="report-2026-12"))
        with pytest.raises(DuplicateJob, match="report-2026-12"):
            q.enqueue(Job("report", id="report-2026-12"))
        with pytest.raises(DuplicateJob, match="report-2026-12"):
            q.enqueue(Job("report", id="report-2026-12", run_at=10**10))
        with pytest.raises(DuplicateJob):
            q.enqueue_many([Job("report", id="other"), Job("report", id="report-2026-12")])
        with pytest.raises(DuplicateJob):
            q.enqueue_many([Job("report", id="twice"), Job("report", id="twice")])
        assert q.get_stats().jobs_enqueued == 1
        assert q.get_stats().medium_queue_size == 1  # the refused batches left nothing behind
        ran = Recorder()
        q.register_executor("report", ran.add)
        q.start_dispatcher(1)
        assert q.join(WAIT)
        assert ran.snapshot() == [first]
        again = q.enqueue(Job("report", id="report-2026-12"))  # finished: the id is free again
        assert q.join(WAIT)
        assert ran.snapshot() == [first, again]


def test_jobs_without_an_explicit_id_never_collide():
    with Queue(1000) as q:
        q.enqueue_many([Job("t") for _ in range(500)])
        assert q.get_stats().jobs_enqueued == 500


def test_retry_config_is_checked_at_construction_too():
    with pytest.raises(TypeError, match="retry_config"):
        Job("t", retry_config={"max_retries": 1})
    assert Job("t", retry_config=RetryConfig(max_retries=1)).retry_config.max_retries == 1
