"""Job, Priority and the new_* helpers, as API.md's "Priority" and "Job" sections state them."""
import time
from datetime import datetime, timedelta, timezone
from enum import IntEnum

import pytest

from tinymq import (
    Job,
    Priority,
    RetryConfig,
    new_delayed_job,
    new_high_priority_job,
    new_job,
    new_low_priority_job,
)


# --- Priority -----------------------------------------------------------------------------

def test_priority_is_an_intenum_with_the_seed_values():
    assert issubclass(Priority, IntEnum)
    assert (Priority.LOW, Priority.MEDIUM, Priority.HIGH) == (0, 1, 2)
    assert [p.name for p in sorted(Priority)] == ["LOW", "MEDIUM", "HIGH"]


# --- Construction and defaults ------------------------------------------------------------

def test_defaults():
    before = time.time()
    job = Job("email")
    after = time.time()
    assert job.type == "email"
    assert job.payload is None
    assert job.priority is Priority.MEDIUM
    assert job.tags == {}
    assert isinstance(job.tags, dict)
    assert isinstance(job.timestamp, float)
    assert before <= job.timestamp <= after
    assert job.run_at == job.timestamp  # run_at defaults to creation time
    assert isinstance(job.run_at, float)
    assert job.retries == 0
    assert job.retry_config == RetryConfig()
    assert job.last_error is None
    assert isinstance(job.id, str) and job.id


def test_all_keyword_arguments_are_kept():
    cfg = RetryConfig(max_retries=7)
    run_at = time.time() + 60
    job = Job("email", {"to": "a@b"}, priority=Priority.HIGH, tags={"user": "1"},
              run_at=run_at, retry_config=cfg, id="job-1")
    assert job.payload == {"to": "a@b"}
    assert job.priority is Priority.HIGH
    assert job.tags == {"user": "1"}
    assert job.run_at == run_at
    assert job.retry_config is cfg
    assert job.id == "job-1"


def test_payload_is_positional_and_options_are_keyword_only():
    assert Job("t", 42).payload == 42
    with pytest.raises(TypeError):
        Job("t", 42, Priority.HIGH)  # priority is keyword-only


def test_ids_are_unique_and_stable():
    jobs = [Job("t") for _ in range(5000)]
    ids = [job.id for job in jobs]
    assert len(set(ids)) == len(ids)
    assert all(isinstance(i, str) and i for i in ids)
    assert [job.id for job in jobs] == ids  # reading again gives the same id


def test_tags_work_on_a_fresh_job():
    job = Job("t")
    job.tags["user"] = "123"
    assert job.tags == {"user": "123"}
    assert Job("t").tags == {}  # not shared between jobs


def test_tags_mapping_is_copied_into_a_dict():
    source = {"a": "1"}
    job = Job("t", tags=source)
    assert isinstance(job.tags, dict)
    job.tags["b"] = "2"
    assert source == {"a": "1"}


def test_attributes_are_writable():
    job = Job("t")
    job.id = "custom"
    job.type = "other"
    job.payload = [1]
    job.priority = Priority.LOW
    job.tags = {"k": "v"}
    job.timestamp = 1.0
    job.run_at = 2.0
    job.retries = 3
    job.retry_config = RetryConfig(max_retries=1)
    job.last_error = "boom"
    assert (job.id, job.type, job.payload, job.priority) == ("custom", "other", [1], Priority.LOW)
    assert job.tags == {"k": "v"}
    assert (job.timestamp, job.run_at, job.retries, job.last_error) == (1.0, 2.0, 3, "boom")
    assert job.retry_config.max_retries == 1


# --- run_at: epoch seconds or an aware datetime ------------------------------------------

def test_run_at_accepts_an_aware_datetime_as_epoch_seconds():
    when = datetime.now(timezone.utc) + timedelta(minutes=5)
    job = Job("t", run_at=when)
    assert isinstance(job.run_at, float)
    assert job.run_at == pytest.approx(when.timestamp(), abs=1e-6)


def test_run_at_aware_datetime_in_another_timezone():
    tz = timezone(timedelta(hours=-5))
    when = datetime(2030, 1, 2, 3, 4, 5, tzinfo=tz)
    assert Job("t", run_at=when).run_at == pytest.approx(when.timestamp(), abs=1e-6)


def test_run_at_accepts_epoch_numbers():
    assert Job("t", run_at=1_900_000_000).run_at == 1_900_000_000.0
    assert Job("t", run_at=1_900_000_000.5).run_at == 1_900_000_000.5


def test_run_at_naive_datetime_is_rejected():
    # API.md: run_at "also accepts an aware datetime"; a naive one is ambiguous.
    naive = datetime.now() + timedelta(minutes=5)
    with pytest.raises((ValueError, TypeError)):
        Job("t", run_at=naive)


@pytest.mark.parametrize("bad", ["tomorrow", [1.0], object(), timedelta(seconds=5)])
def test_run_at_of_the_wrong_type_raises_naming_it(bad):
    with pytest.raises(TypeError) as info:
        Job("t", run_at=bad)
    assert repr(bad) in str(info.value) or str(bad) in str(info.value)


# --- validation ---------------------------------------------------------------------------

def test_empty_job_type_is_rejected():
    with pytest.raises(ValueError):
        Job("")


@pytest.mark.parametrize("bad", [None, 3, b"email"])
def test_non_string_job_type_is_rejected(bad):
    with pytest.raises(TypeError) as info:
        Job(bad)
    assert repr(bad) in str(info.value)


@pytest.mark.parametrize("bad", [5, -1, 3])
def test_bad_priority_raises_naming_it(bad):
    with pytest.raises(ValueError) as info:
        Job("t", priority=bad)
    assert str(bad) in str(info.value)


@pytest.mark.parametrize("bad", ["HIGH", None, 1.5])
def test_priority_of_wrong_type_is_rejected(bad):
    with pytest.raises((ValueError, TypeError)) as info:
        Job("t", priority=bad)
    assert repr(bad) in str(info.value)


def test_retry_config_must_be_a_retry_config():
    with pytest.raises(TypeError):
        Job("t", retry_config={"max_retries": 3})


# --- fluent setters -----------------------------------------------------------------------

def test_fluent_setters_return_the_same_job_and_chain():
    job = Job("t")
    cfg = RetryConfig(max_retries=9, initial_delay=0.5)
    assert job.with_priority(Priority.LOW) is job
    assert job.priority is Priority.LOW
    assert job.with_high_priority() is job
    assert job.priority is Priority.HIGH
    assert job.with_low_priority() is job
    assert job.priority is Priority.LOW
    assert job.with_retry_config(cfg) is job
    assert job.retry_config is cfg
    assert job.with_max_retries(5) is job
    assert job.retry_config.max_retries == 5

    chained = Job("t").with_high_priority().with_max_retries(5)
    assert chained.priority is Priority.HIGH
    assert chained.retry_config.max_retries == 5


def test_with_max_retries_keeps_the_other_retry_settings():
    cfg = RetryConfig(max_retries=1, initial_delay=0.25, max_delay=9.0, backoff_multiple=3.0)
    job = Job("t", retry_config=cfg).with_max_retries(4)
    assert job.retry_config.max_retries == 4
    assert job.retry_config.initial_delay == 0.25
    assert job.retry_config.max_delay == 9.0
    assert job.retry_config.backoff_multiple == 3.0
    assert cfg.max_retries == 1  # the original config is immutable and untouched


def test_with_max_retries_does_not_affect_other_jobs():
    a, b = Job("t"), Job("t")
    a.with_max_retries(8)
    assert b.retry_config.max_retries == RetryConfig().max_retries


def test_fluent_setters_validate():
    with pytest.raises(ValueError) as info:
        Job("t").with_priority(7)
    assert "7" in str(info.value)
    with pytest.raises(TypeError):
        Job("t").with_retry_config("fast")
    with pytest.raises(ValueError) as info:
        Job("t").with_max_retries(-1)
    assert "-1" in str(info.value)


def test_with_priority_accepts_every_priority():
    for p in Priority:
        assert Job("t").with_priority(p).priority is p


# --- module helpers -----------------------------------------------------------------------

def test_new_job_helpers():
    job = new_job("email", "hi")
    assert (job.type, job.payload, job.priority) == ("email", "hi", Priority.MEDIUM)
    assert job.run_at == job.timestamp
    high = new_high_priority_job("email", "urgent")
    assert (high.type, high.payload, high.priority) == ("email", "urgent", Priority.HIGH)
    low = new_low_priority_job("email", "later")
    assert (low.type, low.payload, low.priority) == ("email", "later", Priority.LOW)
    assert len({job.id, high.id, low.id}) == 3


@pytest.mark.parametrize("delay, seconds", [(2.5, 2.5), (timedelta(minutes=1), 60.0), (0, 0.0)])
def test_new_delayed_job(delay, seconds):
    before = time.time()
    job = new_delayed_job("report", {"n": 1}, delay)
    after = time.time()
    assert (job.type, job.payload, job.priority) == ("report", {"n": 1}, Priority.MEDIUM)
    assert isinstance(job.run_at, float)
    assert before + seconds <= job.run_at <= after + seconds


@pytest.mark.parametrize("bad", [-1, -0.5, timedelta(seconds=-1)])
def test_new_delayed_job_rejects_negative_delay(bad):
    with pytest.raises(ValueError):
        new_delayed_job("t", None, bad)


def test_new_delayed_job_rejects_a_delay_of_the_wrong_type():
    with pytest.raises(TypeError) as info:
        new_delayed_job("t", None, "5s")
    assert "'5s'" in str(info.value)
