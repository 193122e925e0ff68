"""Findings of an outsider's attack on rate limits, periodic jobs, per-type stats and metrics.

Each test runs on the core the session picked: run the file once as is and once with
``TINYMQ_NO_EXTENSIONS=1``.
"""
from datetime import tzinfo

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


def test_a_scrape_survives_a_job_type_that_is_not_utf8(queue):
    """Symptom: a job type holding a lone surrogate (what ``os.fsdecode`` makes of a file name
    byte that is not UTF-8, e.g. ``"thumb-\\udcff"``; a broker reads such text from Redis the
    same way) is a valid type: its executor registers and its jobs run. But
    ``generate_latest`` on a registry holding ``PrometheusCollector(q)`` then raised
    UnicodeEncodeError: the whole scrape failed, so every metric of the process (other
    collectors' too) was lost and the target showed as down.
    Reproduce: register an executor for ``"thumb-\\udcff"``, scrape.
    Contract: ``tinymq.metrics`` exposes counters by type and outcome for every registered type.
    Fix: label values are written as UTF-8 text, a lone surrogate escaped as ``\\udcff``
    (as the SQLite store writes such error texts).
    """
    prometheus_client = pytest.importorskip("prometheus_client")
    from prometheus_client.parser import text_string_to_metric_families
    from tinymq import Job
    from tinymq.metrics import PrometheusCollector

    odd = "thumb-\udcff"
    queue.register_executor(odd, lambda job: None, ExecutorConfig())
    queue.start_dispatcher()
    queue.enqueue(Job(odd))
    queue.enqueue(Job("report"))
    assert queue.join(30)
    registry = prometheus_client.CollectorRegistry()
    registry.register(PrometheusCollector({"thumbs-\udcfe": queue}))

    text = prometheus_client.generate_latest(registry).decode("utf-8")

    succeeded = {(sample.labels["queue"], sample.labels["type"]): sample.value
                 for family in text_string_to_metric_families(text) if family.name == "tinymq_jobs"
                 for sample in family.samples if sample.labels["outcome"] == "succeeded"}
    assert succeeded == {("thumbs-\\udcfe", "thumb-\\udcff"): 1, ("thumbs-\\udcfe", "report"): 1}


class _NoOffset(tzinfo):
    """A tzinfo whose utcoffset is None: a naive zone, with no instant for a wall time."""

    def utcoffset(self, dt):
        return None

    def dst(self, dt):
        return None


@pytest.mark.parametrize("zone", [tzinfo(), _NoOffset()], ids=["bare-tzinfo", "no-offset"])
def test_cron_names_a_tz_that_cannot_convert_times(queue, zone):
    """Symptom: ``q.cron("0 * * * *", "report", tz=tzinfo())`` raised NotImplementedError ("a
    tzinfo subclass must implement utcoffset()"), and a tzinfo whose ``utcoffset`` is None raised
    ``ValueError("fromutc: non-None utcoffset() result required")``: neither names ``tz``, and
    the first is not the TypeError/ValueError bad values raise.
    Reproduce: pass such a tzinfo to ``cron``.
    Contract: bad values raise TypeError/ValueError naming them.
    Fix: ``cron`` converts the current time into ``tz`` once, and a failure raises ValueError
    naming ``tz`` (the failure as its cause); nothing is registered.
    """
    with pytest.raises(ValueError, match="^tz must"):
        queue.cron("0 * * * *", "report", tz=zone)
    assert queue.schedules() == []
