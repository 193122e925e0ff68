"""Findings of an outsider's attack on rate limits, per-type stats and metrics (attackW).

Each test is a reproducer of a defect a demanding user would meet; a fixed one
runs as a plain test, an open one is marked xfail(strict=True).
"""
import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from tinymq import Config, ExecutorConfig, Job, RateLimit, RetryConfig

from _helpers import Blocker, make_queue, wait_until
from conftest import COMPILED_CORE, PURE_CORE, env_flag

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(code, core_name):
    """Run ``code`` in a fresh interpreter on the core ``core_name``: (returncode, stdout, stderr)."""
    if core_name == COMPILED_CORE and env_flag("TINYMQ_NO_EXTENSIONS"):
        pytest.skip("TINYMQ_NO_EXTENSIONS=1: the compiled core is not in use")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env["TINYMQ_NO_EXTENSIONS"] = "1" if core_name == PURE_CORE else "0"
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=120)
    return done.returncode, done.stdout, done.stderr


# --- a huge max_starts -------------------------------------------------------------------------

@pytest.mark.parametrize("core_name", [PURE_CORE, COMPILED_CORE], ids=["pure", "compiled"])
@pytest.mark.parametrize("max_starts", [2**61, 2**62, 2**63, 2**64])
def test_a_rate_limit_too_large_to_hold_is_refused_naming_it(core_name, max_starts):
    """RateLimit(max_starts) takes any int >= 1; one whose ring of start times cannot exist must be
    refused (since session 35 by RateLimit itself, before registration) with an exception naming the
    value, never crash the interpreter.

    Was: the compiled core sized the ring as ``max_starts * sizeof(double)`` in a Py_ssize_t, so
    2**61 and 2**62 wrapped to a 0-byte ring and the first write segfaulted; the pure core raised
    a bare MemoryError or OverflowError."""
    rc, out, err = run_python(f"""
        from tinymq import ExecutorConfig, Queue, RateLimit
        q = Queue(10)
        try:
            q.register_executor("t", lambda job: None,
                                ExecutorConfig(rate_limit=RateLimit({max_starts}, per=1.0)))
        except Exception as exc:
            print("refused", type(exc).__name__, exc)
        else:
            print("accepted")
        q.stop()
    """, core_name)
    assert rc == 0, (rc, err[-2000:])
    assert out.startswith("refused") and str(max_starts) in out, out


# --- one get_stats() is one snapshot ------------------------------------------------------------

class _FinishAfterARead:
    """Stands in for a queue's core in ``get_stats()``: right after its ``nth`` read there, one
    running attempt (held by ``blocker``) returns and is counted, before the next read."""

    def __init__(self, real, blocker, nth):
        self._real, self._blocker, self._reads_left = real, blocker, nth

    def _after_a_read(self):
        self._reads_left -= 1
        if self._reads_left == 0:
            self._blocker.release()
            assert self._blocker.wait_finished(1)
            assert wait_until(lambda: self._real.counters()[1] == 1)  # succeeded, as the core counts

    def __getattr__(self, name):
        value = getattr(self._real, name)
        if not callable(value):
            self._after_a_read()
            return value

        def read(*args, **kwargs):
            result = value(*args, **kwargs)
            self._after_a_read()
            return result
        return read


@pytest.mark.parametrize("nth", [1, 2, 3])
def test_an_attempt_ending_while_get_stats_reads_never_splits_the_snapshot(nth):
    """QueueStats is documented as "a consistent snapshot": the per-type counters add up to the
    queue-wide ones (every job here has an executor), and active attempts + succeeded jobs stay
    the one job, whichever moment the attempt ends at.

    Was: get_stats() read the sizes, the counters, the per-type counters and the active attempts
    in separate core calls, so an attempt ending after the second read showed jobs_succeeded=0
    beside a type with succeeded=1 (and, after the third, neither running nor succeeded)."""
    with make_queue(buffer_size=10) as q, Blocker() as blocker:
        q.register_executor("a", blocker.fn)
        q.start_dispatcher(workers=1)
        q.enqueue(Job("a"))
        assert blocker.wait_started(1)
        q._ready = _FinishAfterARead(q._ready, blocker, nth)
        stats = q.get_stats()
        a = stats.executor_stats["a"]
        blocker.release()
        assert (stats.jobs_succeeded, a.succeeded, a.active_jobs + a.succeeded) in ((0, 0, 1), (1, 1, 1)), stats


# --- several queues, one registry -----------------------------------------------------------------

def test_two_queues_can_be_scraped_from_one_registry():
    """A process with two queues (say one for e-mail, one for thumbnails) registers a collector
    for each in the one registry its /metrics endpoint serves, and the scrape shows both."""
    prometheus_client = pytest.importorskip("prometheus_client")
    from prometheus_client.parser import text_string_to_metric_families
    from tinymq.metrics import PrometheusCollector

    registry = prometheus_client.CollectorRegistry()
    with make_queue(buffer_size=10) as first, make_queue(buffer_size=10) as second:
        first.enqueue(Job("mail"))
        for _ in range(2):
            second.enqueue(Job("thumbnail"))
        # One collector over both (a registry refuses two of the same metric names): by name.
        registry.register(PrometheusCollector({"mail": first, "thumbnails": second}))
        text = prometheus_client.generate_latest(registry).decode("utf-8")
    enqueued = sorted((sample.labels["queue"], sample.value) for family in text_string_to_metric_families(text)
                      for sample in family.samples
                      if sample.name == "tinymq_queue_events_total" and sample.labels.get("event") == "enqueued")
    assert enqueued == [("mail", 1.0), ("thumbnails", 2.0)]


# --- a duration too large for a float ---------------------------------------------------------------

HUGE = 10 ** 400  # an int: a valid Python number of seconds that no float can hold


@pytest.mark.parametrize("name, make", [
    ("per", lambda: RateLimit(1, per=HUGE)),
    ("timeout", lambda: ExecutorConfig(timeout=HUGE)),
    ("initial_delay", lambda: RetryConfig(initial_delay=HUGE)),
    ("max_delay", lambda: RetryConfig(max_delay=HUGE)),
    ("scheduler_interval", lambda: Config(scheduler_interval=HUGE)),
], ids=["per", "timeout", "initial_delay", "max_delay", "scheduler_interval"])
def test_a_duration_too_large_for_a_float_is_a_value_error_naming_it(name, make):
    """Was: a bare OverflowError 'int too large to convert to float', naming neither the parameter
    nor the value, where config.py promises a ValueError or TypeError naming it."""
    with pytest.raises(ValueError, match=name) as raised:
        make()
    assert str(HUGE)[:20] in str(raised.value)


@pytest.mark.parametrize("call", ["enqueue_delayed", "join", "stop", "enqueue"])
def test_a_queue_call_with_a_duration_too_large_for_a_float_names_it(call):
    """Was: the same bare OverflowError from every Queue method that takes a duration."""
    with make_queue(buffer_size=10) as q:
        with pytest.raises(ValueError) as raised:
            if call == "enqueue_delayed":
                q.enqueue_delayed(Job("x"), HUGE)
            elif call == "enqueue":
                q.enqueue(Job("x"), block=True, timeout=HUGE)
            else:
                getattr(q, call)(timeout=HUGE)
        assert str(HUGE)[:20] in str(raised.value)


# --- a rate limit lifted in a process that waits in Redis ---------------------------------------

@pytest.mark.parametrize("new_limit", [None, RateLimit(3, per=60.0)], ids=["lifted", "raised"])
def test_a_rate_limit_lifted_while_its_process_waits_in_redis_lets_the_parked_jobs_out(
        redis_url, monkeypatch, new_limit):
    """docs/redis.md: "a registration without rate_limit lifts it and lets the waiting jobs out"
    (a raised one lets out as many as it allows). The jobs parked in Redis wait for the window
    only, not for the registering process's next look at Redis.

    Was: set_limit() only queued the new limits for the next fetch; with nothing but rate-parked
    jobs nobody signalled the idle pump, so the lift reached Redis at the pump's idle look
    (_IDLE_WAIT: 1 s, 30 s here) and the waiting jobs waited for it."""
    from tinymq.redis import _link

    from _backends import Redis
    from _helpers import QUIET, Recorder, WAIT

    monkeypatch.setattr(_link, "_IDLE_WAIT", 30.0)  # an idle look never comes during the test
    shared = Redis(redis_url, lease=120.0)
    try:
        producer, worker = shared.pair()
        ran = Recorder()
        worker.register_executor("r", lambda job: ran.add(job.payload),
                                 ExecutorConfig(rate_limit=RateLimit(1, per=60.0)))
        worker.start_dispatcher(2)
        producer.enqueue_many([Job("r", i) for i in range(3)])
        assert ran.wait_until(lambda items: len(items) == 1)
        # Its outcome reached Redis, the signal its start report raised was taken, and the pump
        # waits in Redis with nothing to send: no round of the worker's is still to come.
        scripts = producer.broker._scripts

        def quiet():
            return (producer.get_stats().jobs_succeeded == 1 and worker._link._pump_idle
                    and not worker._link._ops and scripts.client.llen(scripts.key("signal")) == 0)
        assert wait_until(quiet), "the worker did not go to wait in Redis"
        time.sleep(QUIET)
        assert quiet()
        worker.register_executor("r", lambda job: ran.add(job.payload),
                                 ExecutorConfig(rate_limit=new_limit))
        assert producer.join(WAIT), ran.items
        assert sorted(ran.items) == [0, 1, 2]
    finally:
        shared.close()


# --- per-type stats and metrics of a queue on a Redis broker ---------------------------------------

def test_per_type_counters_and_their_metrics_count_the_jobs_of_a_queue_on_a_broker(redis_url):
    """One process on a Redis broker: its type's counters add up to the queue-wide ones (api.md:
    "jobs_failed is the sum of the types' failed plus" no_executor jobs), and the scrape's
    tinymq_jobs_total shows them.

    Was: with a broker get_stats() built each ExecutorStats from (active, limit) alone, so every
    per-type counter was 0 whatever ran, and tinymq_jobs_total exported zeros beside a histogram
    that counted the attempts. Now they are this process's (docs/redis.md)."""
    prometheus_client = pytest.importorskip("prometheus_client")
    from prometheus_client.parser import text_string_to_metric_families
    from tinymq import RetryConfig
    from tinymq.metrics import PrometheusCollector

    from _backends import Redis
    from _helpers import WAIT

    def fn(job):
        if job.payload == "bad":
            raise ValueError("bad")

    shared = Redis(redis_url, lease=2.0)
    try:
        q = shared.queue()
        q.register_executor("t", fn)
        q.start_dispatcher(2)
        q.enqueue_many([Job("t", i) for i in range(3)]
                       + [Job("t", "bad", retry_config=RetryConfig(max_retries=1, initial_delay=0))])
        assert q.join(WAIT)
        stats = q.get_stats()
        registry = prometheus_client.CollectorRegistry()
        registry.register(PrometheusCollector(q))
        text = prometheus_client.generate_latest(registry).decode("utf-8")
    finally:
        shared.close()
    assert (stats.jobs_succeeded, stats.jobs_failed, stats.jobs_retried) == (3, 1, 1)
    t = stats.executor_stats["t"]
    assert (t.succeeded, t.failed, t.retried) == (3, 1, 1), t
    exported = {sample.labels["outcome"]: sample.value for family in text_string_to_metric_families(text)
                for sample in family.samples if sample.name == "tinymq_jobs_total"}
    assert (exported["succeeded"], exported["failed"], exported["retried"]) == (3, 1, 1), exported


# --- shared_rate_limits() of a large max_starts ------------------------------------------------------

@pytest.mark.parametrize("max_starts", [10 ** 14, 2 ** 53 + 1, sys.maxsize // 8])  # (RateLimit's largest)
def test_shared_rate_limits_reads_back_a_large_max_starts(redis_url, max_starts):
    """Was: limits.lua stored max_starts through Lua's number-to-string (%.14g), so 10**14 became
    '1e+14', which shared_rate_limits() (and status --redis) could not read back: ValueError."""
    from _backends import Redis

    shared = Redis(redis_url, lease=2.0)
    try:
        q = shared.queue()
        q.register_executor("t", lambda job: None, ExecutorConfig(rate_limit=RateLimit(max_starts, per=1.5)))
        q.start_dispatcher(1)  # its first fetch sends the limits
        scripts = q.broker._scripts
        assert wait_until(lambda: scripts.client.hexists(scripts.key("ratelimits"), "t"))
        assert q.broker.shared_rate_limits() == {"t": (max_starts, 1.5, 0)}
    finally:
        shared.close()


class _RetryAfterTheRead:
    """Stands in for a queue's core in ``get_stats()``: right after its first read there, the held
    attempt fails, and its retry is waiting in the delayed set before the next read."""

    def __init__(self, real, queue, release):
        self._real, self._queue, self._release, self._armed = real, queue, release, True

    def __getattr__(self, name):
        value = getattr(self._real, name)
        if not callable(value):
            return value

        def read(*args, **kwargs):
            result = value(*args, **kwargs)
            if self._armed:
                self._armed = False
                self._release.set()
                assert wait_until(lambda: self._queue._dispatcher.delayed_count() == 1)
            return result
        return read


def test_a_retry_scheduled_while_get_stats_reads_is_not_counted_twice():
    """Every unfinished job is in one place at a time (ready, delayed, running or waiting for room),
    so one snapshot never shows more of them than enqueued minus ended.

    Was: get_stats() read delayed_jobs_count from the dispatcher's heaps after the core's
    snapshot, so an attempt that failed meanwhile was counted both running and delayed."""
    release = threading.Event()

    def fail_first(job):
        if job.retries == 0:
            release.wait(10)
            raise ValueError("first attempt")

    with make_queue(buffer_size=10) as q:
        q.register_executor("a", fail_first)
        q.start_dispatcher(workers=1)
        q.enqueue(Job("a", retry_config=RetryConfig(max_retries=1, initial_delay=60)))
        assert wait_until(lambda: q.get_stats().executor_stats["a"].active_jobs == 1)
        q._ready = _RetryAfterTheRead(q._ready, q, release)
        stats = q.get_stats()
        q._ready = q._dispatcher.ready
    placed = (stats.high_queue_size + stats.medium_queue_size + stats.low_queue_size
              + stats.delayed_jobs_count + stats.waiting_for_room
              + sum(e.active_jobs for e in stats.executor_stats.values()))
    unfinished = (stats.jobs_enqueued - stats.jobs_succeeded - stats.jobs_failed - stats.jobs_cancelled
                  - stats.jobs_evicted)
    assert placed <= unfinished == 1, stats
