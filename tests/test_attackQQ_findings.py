"""Findings of an outsider's attack on rate limits, periodic jobs, per-type stats and metrics.

Each test runs on the core the session picked: run the file once as is and once with
``TINYMQ_NO_EXTENSIONS=1``.
"""
import pytest

pytest.importorskip("croniter")

from tinymq import ExecutorConfig, Queue  # noqa: E402


@pytest.fixture
def queue():
    q = Queue()
    q.register_executor("report", lambda job: None, ExecutorConfig())
    yield q
    q.stop()


@pytest.mark.parametrize("expression", [
    "R * * * *", "r 3 * * *", "0 R * * *", "R(0-29) * * * *", "R/15 * * * *", "0,R * * * *",
    "0 0 R * *", "0 0 * R *", "0 0 * * R",
])
def test_cron_refuses_a_random_field(queue, expression):
    """Symptom: ``q.cron("R * * * *", ...)`` (croniter's random "R" field, meant as "once an
    hour, at a minute drawn at random") was accepted, but the schedule computes each tick with a
    fresh croniter, so the minute was drawn again at every tick: the job ran at 23:22 and again at
    23:37 of one hour, or skipped hours; the "never fires" check at registration read a draw of
    its own; over a broker every process drew its own minutes, so one hour's tick fired once per
    process, not once across all of them.
    Reproduce: call ``cron_next("R * * * *", utc, now)`` three times: three different instants.
    Contract: a cron schedule fires at the instants its expression names, each tick once (across
    processes with a broker); a tick is never made up or doubled.
    Fix: ``cron`` refuses a random field with a ValueError that says to write the value, as it
    refuses a sixth (seconds) field rather than guess; nothing is registered.
    """
    with pytest.raises(ValueError, match="random"):
        queue.cron(expression, "report", name="hourly")
    assert queue.schedules() == []


@pytest.mark.parametrize("expression", [
    "0 0 * mar *", "0 0 * * fri", "0 0 * * MON-FRI", "0 0 * APR,MAR,DEC *", "0 0 L * *",
    "@hourly", "*/15 * * * *",
])
def test_cron_still_takes_names_that_contain_the_letter_r(queue, expression):
    """The refusal above reads whole list items, not letters: month and day names with an "r"
    (mar, apr, fri) are fixed values and still register."""
    assert queue.cron(expression, "report", name=expression) == expression
