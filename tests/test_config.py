"""RetryConfig, Config and ExecutorConfig: defaults, immutability, units and validation."""
import dataclasses
from datetime import timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinymq import Config, ExecutorConfig, RetryConfig

from _helpers import examples


# --- defaults -----------------------------------------------------------------------------

def test_retry_config_defaults():
    cfg = RetryConfig()
    assert (cfg.max_retries, cfg.initial_delay, cfg.max_delay, cfg.backoff_multiple) == (3, 1.0, 300.0, 2.0)


def test_config_defaults():
    cfg = Config()
    assert (cfg.buffer_size, cfg.scheduler_interval, cfg.max_delayed_jobs) == (100, 0.1, 10000)


def test_executor_config_defaults():
    cfg = ExecutorConfig()
    assert (cfg.max_concurrent_jobs, cfg.timeout) == (10, 30.0)


def test_positional_order_matches_the_contract():
    assert RetryConfig(5, 0.5, 10.0, 3.0) == RetryConfig(
        max_retries=5, initial_delay=0.5, max_delay=10.0, backoff_multiple=3.0)
    assert Config(7, 0.2, 9) == Config(buffer_size=7, scheduler_interval=0.2, max_delayed_jobs=9)
    assert ExecutorConfig(4, 2.0) == ExecutorConfig(max_concurrent_jobs=4, timeout=2.0)


# --- immutability -------------------------------------------------------------------------

@pytest.mark.parametrize("cfg, field", [
    (RetryConfig(), "max_retries"),
    (Config(), "buffer_size"),
    (ExecutorConfig(), "timeout"),
])
def test_configs_are_immutable(cfg, field):
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(cfg, field, 1)


def test_configs_are_hashable_and_compare_by_value():
    assert RetryConfig(max_retries=2) == RetryConfig(max_retries=2)
    assert hash(Config(buffer_size=5)) == hash(Config(buffer_size=5))
    assert ExecutorConfig(timeout=None) != ExecutorConfig()


# --- units: seconds as float, timedelta accepted -------------------------------------------

def test_durations_accept_timedelta_as_seconds():
    retry = RetryConfig(initial_delay=timedelta(milliseconds=250), max_delay=timedelta(minutes=2))
    assert retry.initial_delay == 0.25
    assert retry.max_delay == 120.0
    assert Config(scheduler_interval=timedelta(milliseconds=50)).scheduler_interval == 0.05
    assert ExecutorConfig(timeout=timedelta(seconds=10)).timeout == 10.0
    # a config built from a timedelta equals the one built from the float
    assert RetryConfig(initial_delay=timedelta(seconds=2)) == RetryConfig(initial_delay=2.0)


def test_special_values_allowed_by_the_contract():
    assert Config(max_delayed_jobs=0).max_delayed_jobs == 0  # unlimited
    assert ExecutorConfig(timeout=None).timeout is None  # no timeout
    assert Config(buffer_size=1).buffer_size == 1
    assert ExecutorConfig(max_concurrent_jobs=1).max_concurrent_jobs == 1
    assert RetryConfig(max_retries=0).max_retries == 0


# --- validation: bad values raise ValueError/TypeError naming the value --------------------

VALUE_ERRORS = [
    (Config, "buffer_size", 0),
    (Config, "buffer_size", -5),
    (Config, "scheduler_interval", -0.1),
    (Config, "scheduler_interval", timedelta(seconds=-1)),
    (Config, "max_delayed_jobs", -1),
    (ExecutorConfig, "max_concurrent_jobs", 0),
    (ExecutorConfig, "max_concurrent_jobs", -3),
    (ExecutorConfig, "timeout", -1.0),
    (ExecutorConfig, "timeout", timedelta(seconds=-2)),
    (RetryConfig, "max_retries", -1),
    (RetryConfig, "initial_delay", -0.5),
    (RetryConfig, "max_delay", -300.0),
    (RetryConfig, "backoff_multiple", -2.0),
    (RetryConfig, "initial_delay", float("nan")),
]


@pytest.mark.parametrize("cls, field, bad", VALUE_ERRORS)
def test_bad_values_raise_value_error_naming_field_and_value(cls, field, bad):
    with pytest.raises(ValueError) as info:
        cls(**{field: bad})
    message = str(info.value)
    assert field in message
    assert repr(bad) in message or str(bad) in message


TYPE_ERRORS = [
    (Config, "buffer_size", "100"),
    (Config, "buffer_size", 10.5),
    (Config, "scheduler_interval", "fast"),
    (Config, "max_delayed_jobs", None),
    (ExecutorConfig, "max_concurrent_jobs", "5"),
    (ExecutorConfig, "timeout", "30s"),
    (RetryConfig, "max_retries", 2.5),
    (RetryConfig, "initial_delay", "1"),
    (RetryConfig, "max_delay", [1]),
    (RetryConfig, "backoff_multiple", "2"),
]


@pytest.mark.parametrize("cls, field, bad", TYPE_ERRORS)
def test_wrong_types_raise_type_error_naming_field_and_value(cls, field, bad):
    with pytest.raises(TypeError) as info:
        cls(**{field: bad})
    message = str(info.value)
    assert field in message
    assert repr(bad) in message


# --- backoff formula ----------------------------------------------------------------------
# RetryConfig.retry_delay(k) is the implementation's helper (not in API.md); the queue-level
# gaps are tested in test_queue_retries.py. With the default jitter of 0 it must be the
# contract's formula exactly.

@settings(max_examples=examples(100), deadline=None)
@given(
    initial=st.floats(0.0, 100.0, allow_nan=False),
    maximum=st.floats(0.0, 1000.0, allow_nan=False),
    multiple=st.floats(1.0, 10.0, allow_nan=False),
    k=st.integers(1, 20),
)
def test_retry_delay_matches_the_contract_formula(initial, maximum, multiple, k):
    cfg = RetryConfig(max_retries=20, initial_delay=initial, max_delay=maximum, backoff_multiple=multiple)
    expected = min(initial * multiple ** (k - 1), maximum)
    assert cfg.retry_delay(k) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_retry_delay_examples():
    cfg = RetryConfig(initial_delay=1.0, max_delay=5.0, backoff_multiple=2.0)
    assert [cfg.retry_delay(k) for k in (1, 2, 3, 4, 5)] == [1.0, 2.0, 4.0, 5.0, 5.0]
