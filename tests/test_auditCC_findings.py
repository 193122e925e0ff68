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
