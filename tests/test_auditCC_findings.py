"""auditCC: what a newcomer found where the code and its own docs (docs/, README.md, the
docstrings) or /work/shared/API.md disagree. Each test names the statement it checks.
Run on both cores (the pure twin with TINYMQ_NO_EXTENSIONS=1).
"""
from datetime import timedelta

import pytest

from tinymq import SQLitePersistence


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
