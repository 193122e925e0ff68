"""auditCC: what a newcomer found where the code and its own docs (docs/, README.md, the
docstrings) or /work/shared/API.md disagree. Each test names the statement it checks.
Run on both cores (the pure twin with TINYMQ_NO_EXTENSIONS=1).
"""
import typing
from datetime import timedelta
from typing import Optional

import pytest

from tinymq import Config, ExecutorConfig, RateLimit, RetryConfig, SQLitePersistence


def test_busy_timeout_takes_a_timedelta(tmp_path):
    """docs/api.md (intro): "Durations are seconds as a float (a datetime.timedelta works
    too)"; API.md "Units": every duration also accepts ``datetime.timedelta``. The store's
    ``busy_timeout`` (docs/persistence.md: "seconds to wait for a database lock") is one."""
    with SQLitePersistence(tmp_path / "jobs.db", busy_timeout=timedelta(seconds=2)) as store:
        assert store.busy_timeout == 2.0
    with SQLitePersistence.claim(str(tmp_path / "jobs-{}.db"), busy_timeout=timedelta(milliseconds=1500)) as store:
        assert store.busy_timeout == 1.5
    with pytest.raises(ValueError, match="busy_timeout"):
        SQLitePersistence(tmp_path / "bad.db", busy_timeout=timedelta(seconds=-1))


def test_config_durations_are_floats_to_a_type_checker():
    """docs/api.md: "Durations are seconds as a float (a datetime.timedelta works too)"; config.py:
    each config normalises its durations to float at construction. A type checker reading the
    fields (py.typed ships) must see what they hold: ``mypy --strict`` refused
    ``per: float = RateLimit(5, per=1.0).per`` (float | int | timedelta is not float), so every
    user reading a config's duration needed a cast. The constructors still take a timedelta."""
    assert typing.get_type_hints(RetryConfig)["initial_delay"] is float
    assert typing.get_type_hints(RetryConfig)["max_delay"] is float
    assert typing.get_type_hints(Config)["scheduler_interval"] is float
    assert typing.get_type_hints(RateLimit)["per"] is float
    assert typing.get_type_hints(ExecutorConfig)["timeout"] == Optional[float]
    assert RetryConfig(initial_delay=timedelta(seconds=2)).initial_delay == 2.0
    assert RateLimit(1, per=timedelta(minutes=1)).per == 60.0
    assert ExecutorConfig(timeout=timedelta(seconds=3)).timeout == 3.0
    assert Config(scheduler_interval=timedelta(milliseconds=50)).scheduler_interval == 0.05


@pytest.mark.parametrize("delay", [0.0, 0.05], ids=["ready", "delayed"])
def test_one_job_twice_in_a_batch_is_refused(delay):
    """docs/api.md, Job: "A Job object stands for one enqueue: enqueuing a job that its queue
    holds unfinished raises DuplicateJob, whether or not it has an id"; enqueue_many: "all or
    none ... DuplicateJob when an id is taken or appears twice in the batch". ``q.enqueue(job)``
    twice is refused, and so is the batch with a store (the save names the job first), or with
    an explicit id; without a store, one Job object without an id given twice in one
    ``enqueue_many`` was accepted twice: counted twice in jobs_enqueued, and run twice."""
    import time

    from tinymq import DuplicateJob, Job, Queue

    runs = []
    q = Queue(10)
    q.register_executor("t", lambda job: runs.append(job))
    job = Job("t")
    if delay:
        job.run_at = time.time() + delay
    try:
        with pytest.raises(DuplicateJob):
            q.enqueue_many([job, job])
        assert q.get_stats().jobs_enqueued == 0  # nothing of the batch was enqueued
        q.start_dispatcher(2)
        assert q.join(5)
        assert runs == []
    finally:
        q.stop()


def test_an_id_twice_in_a_batch_is_refused_as_such():
    """docs/api.md, enqueue_many: "DuplicateJob when an id is taken or appears twice in the
    batch". With a store, and over Redis, the message says which: "an id is given twice in this
    batch of 2 jobs; none of the batch was enqueued". Without a store it said "a job with id 'd'
    is already queued and unfinished", of an id that no job of the queue had."""
    from tinymq import DuplicateJob, Job, Queue

    q = Queue(10)
    try:
        with pytest.raises(DuplicateJob, match="given twice in this batch"):
            q.enqueue_many([Job("t", id="d"), Job("t", id="d")])
        assert q.get_stats().jobs_enqueued == 0
    finally:
        q.stop()
