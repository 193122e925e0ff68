"""Defects taken up by fix36q (session 36), each with its test."""
import asyncio
import math
import threading
import time

import pytest

import tinymq
from tinymq import ExecutorConfig, Job

from _helpers import WAIT, wait_until


def _new_tinymq_threads(before, but=()):
    """The threads named tinymq-* alive now that were not in ``before``, but for those in ``but``."""
    return sorted(thread.name for thread in threading.enumerate()
                  if thread.name.startswith("tinymq") and thread.is_alive()
                  and thread not in before and thread not in but)


def _spin(seconds):
    """Python bytecode for ``seconds`` (or until interrupted): a thread interrupt_on_timeout reaches."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


# --- 1. stop() returned with the queue's watchdog (and scheduler) still alive ---------------------

# stop(wait=True) only woke the watchdog, the scheduler and the loop's thread: each left by itself a
# moment later, or, on a loaded machine, seconds later (a CI run saw the watchdog alive as stop()
# returned). A program that checks threading.enumerate() after stop(), or forks then, found them.
# And an attempt that timed out during stop() had its failure reported by the watchdog after stop()
# had returned. stop(wait=True) now waits for the queue's own threads to leave (not for a worker still
# in an attempt it gave up on, or one retired by a timeout: those are never waited for).

@pytest.mark.parametrize("callback_stops", [False, True])
def test_stop_returns_once_the_watchdog_has_reported_a_timeout_decided_meanwhile(callback_stops):
    before = set(threading.enumerate())
    stuck = []
    reported = []

    def spin(job):
        stuck.append(threading.current_thread())
        _spin(WAIT)

    def on_failure(job, reason, exc):
        time.sleep(0.3)  # (a report that takes a moment: a store, a log shipper)
        if callback_stops:  # on the watchdog's thread: it cannot wait for itself
            q.stop()
        reported.append((job.id, reason, threading.current_thread().name))

    q = tinymq.Queue()
    q.register_executor("spin", spin, ExecutorConfig(timeout=0.3, interrupt_on_timeout=True, retry_on=()))
    q.on_failure(on_failure)
    try:
        q.start_dispatcher(1)
        q.enqueue(Job("spin", id="spinning"))
        assert wait_until(lambda: stuck), "the job never started"
        q.stop()  # (waits for the attempt: the watchdog decides it at its deadline, and reports it)
        assert reported == [("spinning", "permanent_failure", "tinymq-watchdog")]
        assert _new_tinymq_threads(before, but=stuck) == []
        stuck[0].join(WAIT)  # (its interruption ends the retired worker: never waited for by stop())
        assert not stuck[0].is_alive()
    finally:
        q.stop(wait=False)


@pytest.mark.parametrize("executors", ["threads", "async"])
def test_no_thread_of_the_queue_is_left_after_stop_with_timed_out_and_interrupted_attempts(executors):
    before = set(threading.enumerate())
    retired = []  # worker threads whose attempt timed out (None: a coroutine's), never waited for by stop()

    def quick(job):
        pass

    def interrupted(job):
        retired.append(threading.current_thread())
        _spin(WAIT)  # (interrupted at its deadline)

    async def async_quick(job):
        pass

    async def async_timing_out(job):
        retired.append(None)
        await asyncio.sleep(WAIT)  # (cancelled at its deadline)

    timing_out = async_timing_out if executors == "async" else interrupted
    for cycle in range(40):
        q = tinymq.Queue()
        q.register_executor("timing_out", timing_out,
                            ExecutorConfig(timeout=0.02, interrupt_on_timeout=True, retry_on=()))
        q.register_executor("quick", async_quick if executors == "async" else quick)
        failed = []
        q.on_failure(lambda job, reason, exc: failed.append(job.id))
        try:
            q.start_dispatcher(3)
            q.enqueue_many([Job("quick") for _ in range(5)])
            q.enqueue(Job("timing_out"))
            assert wait_until(lambda: retired), "the attempt never started"
            if cycle % 2:  # half of them stopped after the timeout, the others as it is decided
                assert wait_until(lambda: failed), "the attempt never timed out"
            q.stop(timeout=WAIT if cycle % 4 == 1 else None)
            assert _new_tinymq_threads(before, but=retired) == [], f"cycle {cycle}"
            assert len(failed) == 1, f"cycle {cycle}"
            for thread in retired:
                if thread is not None:
                    thread.join(WAIT)
            assert _new_tinymq_threads(before) == [], f"cycle {cycle}"
            del retired[:]
        finally:
            q.stop(wait=False)


# --- 2. Over Redis, a cron tick "ahead" of the server's clock logged at every tick ------------------

# A process whose wall clock is more than 3 h ahead of the Redis server's claims none of its cron
# ticks, and said so in a WARNING at every tick of every cron schedule, for as long as the clock stays
# wrong (days, on a host booted without NTP). Now logged as the ticks the queue refuses are: the
# first at once, then at most every _LOG_EVERY with the count since, and at INFO once a tick is
# claimed again. (Only cron ticks are ever "ahead": an `every` grid is on the server's clock.)

DAY = 86400.0


@pytest.mark.redis
def test_cron_ticks_ahead_of_the_redis_clock_are_logged_at_most_every_log_period(
        redis_backend, monkeypatch, caplog):
    pytest.importorskip("croniter")
    import logging

    import tinymq._periodic
    import tinymq.redis._schedules
    from test_periodic import held_just_before_a_minute, just_before_a_minute, schedule_of

    monkeypatch.setattr(tinymq._periodic, "_WALL_CLOCK_RECHECK", 0.2)  # (a cron tick's wall clock, rechecked)
    monkeypatch.setattr(tinymq.redis._schedules, "_LOG_EVERY", 3600.0)  # (none passes during the test)
    caplog.set_level(logging.INFO, logger="tinymq")

    def ahead_records():
        return [record for record in caplog.records if "ahead of the Redis server's clock" in record.getMessage()]

    runs = []
    clock = held_just_before_a_minute(ahead=DAY)
    q = redis_backend.queue()
    try:
        q._periodic._wall = clock
        q.register_executor("minutely", runs.append)
        q.cron("* * * * *", "minutely", name="m")
        q.start_dispatcher()
        clock.release()
        for skipped in range(1, 5):  # the ticks of four minutes, a day ahead, each refused by Redis's clock
            if skipped > 1:
                clock.hold(schedule_of(q, "m").next_run_at + 0.01)
                clock.release()
            assert wait_until(lambda: schedule_of(q, "m").skipped == skipped), schedule_of(q, "m")
        assert [record.levelname for record in ahead_records()] == ["WARNING"]
        monkeypatch.setattr(tinymq.redis._schedules, "_LOG_EVERY", 0.0)  # (the period has passed)
        clock.hold(schedule_of(q, "m").next_run_at + 0.01)
        clock.release()
        assert wait_until(lambda: schedule_of(q, "m").skipped == 5)
        assert len(ahead_records()) == 2
        assert "(4 cron ticks not claimed since the last log record, this one included)" in \
            ahead_records()[1].getMessage()
        clock.hold(just_before_a_minute())  # corrected (held until the timer has seen it: as test_attack24)
        corrected_minute = math.ceil(clock() / 60.0) * 60.0
        assert wait_until(lambda: schedule_of(q, "m").next_run_at == corrected_minute), schedule_of(q, "m")
        clock.release()
        assert wait_until(lambda: runs), "no tick was claimed once the clock was corrected"
        claimed = [record for record in caplog.records if "no longer ahead" in record.getMessage()]
        assert [record.levelname for record in claimed] == ["INFO"]
        assert "after 5 that were not claimed (0 since the last log record)" in claimed[0].getMessage()
        assert schedule_of(q, "m").skipped == 5
    finally:
        q.stop()


# --- 3. The jobs of schedules a store gave back, held for as long as the queue lived --------------

# set_persistence() noted each schedule's latest stored job (its previous job, and its tick fired
# last, for the schedule registered under that name): the Job itself, payload and all, kept for the
# queue's lifetime, though read only as its schedule begins. Now its id is noted, and dropped as the
# schedule of that name begins.

def test_the_recovered_jobs_of_schedules_are_not_held_once_served(tmp_path):
    import gc

    from tinymq import SQLitePersistence
    from tinymq._periodic import SCHEDULE_TAG, tick_job_id

    path = str(tmp_path / "jobs.db")
    now = time.time()
    stored = {name: tick_job_id(name, now - 60) for name in ("early", "late", "gone")}
    with SQLitePersistence(path) as store:
        q = tinymq.Queue()
        q.set_persistence(store)
        for name, job_id in stored.items():
            q.enqueue(Job("t", {"big": "x" * 1000}, id=job_id, tags={SCHEDULE_TAG: name}))
        q.stop()
    ran = []
    with SQLitePersistence(path) as store:
        q = tinymq.Queue()
        q.register_executor("t", lambda job: ran.append(job.id))
        q.every(3600, "t", name="early")  # registered before the store gives its job back
        q.set_persistence(store)
        try:
            periodic = q._periodic
            assert sorted(periodic._recovered) == ["early", "gone", "late"]
            q.start_dispatcher()
            assert sorted(periodic._recovered) == ["gone", "late"]  # "early" began
            q.every(3600, "t", name="late")
            assert sorted(periodic._recovered) == ["gone"]
            assert {stats.name: stats.last_job_id for stats in q.schedules()} == \
                {"early": stored["early"], "late": stored["late"]}
            assert q.join(WAIT)
            assert sorted(ran) == sorted(stored.values())
            gc.collect()  # ("gone": no schedule of that name here)
            assert [job for job in gc.get_objects() if isinstance(job, Job) and job.id in ran] == []
        finally:
            q.stop()


# --- 4. A scrape held by a frozen Redis for the socket timeout -----------------------------------

# A scrape of a PrometheusCollector read each queue's get_stats(): against a frozen Redis server
# (SIGSTOP, a stalled VM: connected, silent) it waited redis-py's socket timeout, 10 s, per queue on
# it, as long as Prometheus's whole default scrape timeout (the scrape is then lost whole, the
# registry's other collectors with it), and then left the queue out, its process's own figures too.
# A scrape now waits for Redis _SCRAPE_WAIT in all; the shared figures it could not read are left
# out (tinymq_broker_up 0, a WARNING), the process's own per-type figures are still reported.

@pytest.mark.redis
def test_a_scrape_over_a_frozen_redis_answers_within_its_bound_with_the_local_figures(own_redis_server, caplog):
    pytest.importorskip("prometheus_client")
    from prometheus_client import CollectorRegistry, Gauge, generate_latest

    from tinymq.metrics import PrometheusCollector
    from tinymq.redis import RedisBroker

    q = tinymq.Queue(broker=RedisBroker(own_redis_server.url, name="scraped"))
    registry = CollectorRegistry()
    registry.register(PrometheusCollector(q))
    Gauge("app_up", "Another collector of the same registry.", registry=registry).set(1)
    try:
        q.register_executor("t", lambda job: None)
        q.start_dispatcher(1)
        q.enqueue(Job("t"))
        assert q.join(WAIT)
        assert wait_until(lambda: q.get_stats().executor_stats["t"].succeeded == 1)
        text = generate_latest(registry).decode("utf-8")
        assert "tinymq_broker_up 1.0" in text and 'tinymq_queue_events_total{event="succeeded"} 1.0' in text
        with own_redis_server.frozen():
            began = time.monotonic()
            text = generate_latest(registry).decode("utf-8")
            took = time.monotonic() - began
        assert took < 4.0, f"the scrape took {took:.1f} s"  # (its bound: 2 s)
        assert 'tinymq_jobs_total{outcome="succeeded",type="t"} 1.0' in text  # this process's own
        assert 'tinymq_max_concurrent_jobs{type="t"} 10.0' in text
        assert "tinymq_broker_up 0.0" in text
        assert "tinymq_queue_events_total{" not in text and "tinymq_queue_size{" not in text
        assert "app_up 1.0" in text
        assert any("shared figures of the queue are left out" in record.getMessage()
                   and record.levelname == "WARNING" for record in caplog.records)
        assert wait_until(lambda: "tinymq_broker_up 1.0" in generate_latest(registry).decode("utf-8"))
    finally:
        q.stop()
        q.broker.close()


# --- 5. Over Redis, no thread left for the broker link's threads at start_dispatcher -------------

# start_dispatcher stopped the queue and raised NoThreadLeft when the system had no thread for its
# workers, scheduler, watchdog or loop, or for the periodic timer (two except blocks saying the same),
# but not for the Redis link's pump, timer or heartbeat: the RuntimeError went out with the queue half
# started (workers and a pump fetching jobs, no heartbeat renewing their leases), and the thread that
# never started was kept among those stop() joins: "cannot join thread before it is started".

@pytest.mark.redis
def test_start_dispatcher_over_redis_without_a_thread_for_the_heartbeat_stops_the_queue(redis_url, monkeypatch):
    from tinymq import QueueStopped
    from tinymq.redis import RedisBroker

    before = set(threading.enumerate())
    real_start = threading.Thread.start

    def start(thread):
        if thread.name == "tinymq-redis-heartbeat":
            raise RuntimeError("can't start new thread")
        real_start(thread)

    q = tinymq.Queue(broker=RedisBroker(redis_url, name="fix36q-nothread"))
    q.register_executor("t", lambda job: None)
    monkeypatch.setattr(threading.Thread, "start", start)
    try:
        with pytest.raises(RuntimeError, match=r"start_dispatcher\(workers=2\).*can't start new thread"):
            q.start_dispatcher(2)
        monkeypatch.undo()
        with pytest.raises(QueueStopped):  # not half started
            q.enqueue(Job("t"))
        q.stop()  # (returns: it joins the threads that started only)
        assert _new_tinymq_threads(before) == []
    finally:
        monkeypatch.undo()
        q.stop(wait=False)
        q.broker.close()
