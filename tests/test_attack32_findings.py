"""An outside attack on rate limits, periodic jobs, per-type stats, metrics and the CLI (session 32):
each test is a defect found, failing before its fix. Real redis-server (tests/conftest.py's fixtures)."""
import enum
import os
import threading
import subprocess
import sys
import time

import pytest

from tinymq import Config, ExecutorConfig, Job, Queue, RateLimit, RetryConfig
from tinymq.redis import RedisBroker

from _backends import Redis
from _helpers import WAIT

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- 1. a process's own cancel of a job whose success it counted already --------------------------

# Over Redis, q.cancel(id) of a job whose success this process had counted already (its
# ExecutorStats.succeeded showed it) could reach Redis before the success's settle op, which waits
# for the pump's next round: cancel() returned True, the job was reported "cancelled" to on_failure
# and counted in jobs_cancelled, though its executor had succeeded and this process counted it so
# (one time in ten here, under load one in two). In-process such a cancel finds the job ended and
# returns False; and the one Queue on the name ran every attempt, so its per-type counters must add
# up to the shared ones (docs/redis.md names two exceptions: another process's cancel, a reap). Now
# the cancel sends this process's decided outcome of the job first.

@pytest.mark.redis
@pytest.mark.parametrize("kind", ["thread", "coroutine"])
def test_own_cancel_of_a_job_whose_success_was_counted_finds_it_ended(redis_url, kind):
    backend = Redis(redis_url)
    try:
        q = backend.queue()
        reported = []
        q.on_failure(lambda job, reason, exc: reported.append((job.id, reason)))
        if kind == "thread":
            def run(job):
                pass
        else:
            async def run(job):
                pass
        q.register_executor("t", run)
        q.start_dispatcher(1)
        for n in range(1, 61):
            job = q.enqueue(Job("t"))
            by = time.monotonic() + WAIT
            while q.get_stats().executor_stats["t"].succeeded != n:  # its success is counted here
                assert time.monotonic() < by
            assert q.cancel(job.id) is False, f"attempt {n}: cancelled after its success was counted"
            assert q.join(WAIT)
        stats = q.get_stats()
        executor = stats.executor_stats["t"]
        assert (stats.jobs_succeeded, stats.jobs_cancelled, executor.cancelled) == (60, 0, 0)
        assert reported == []
    finally:
        backend.close()


# --- 2. the demo, its stdout full -----------------------------------------------------------------

# docs/cli.md: a command that prints its outcome, the demo among them, whose stdout takes no more (a
# full disk) is an error, one clear message on stderr and exit 1, never a traceback of tinymq's.
# `status` was (test_redis29b_findings.py); the demo died with a traceback of OSError [Errno 28].

@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full here")
def test_the_demo_to_a_full_stdout_fails_in_one_line():
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    with open("/dev/full", "w") as full:
        result = subprocess.run([sys.executable, "-m", "tinymq"], stdout=full, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL, env=environment, text=True, timeout=60)
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "python -m tinymq: error: could not write to stdout" in result.stderr, result.stderr


# --- 3. a schedule named by a str subclass (a str Enum) --------------------------------------------

# A job type given as a str subclass is taken as its text (job._as_type); a schedule's name was kept
# as given. Named by a ``(str, Enum)`` member, its ticks' job ids read "Schedules.CLEANUP@..." (the
# member's format()), not "<name>@<tick time>" as docs/api.md says, while their tag (JSON, SQLite,
# Redis) read "cleanup"; ScheduleStats.name was the member. Now the name is its text, as a type is.

class Schedules(str, enum.Enum):
    CLEANUP = "cleanup"
    CRON = "cron-cleanup"


def test_a_schedule_named_by_a_str_enum_member_is_named_by_its_text():
    ran = []
    fired = threading.Event()

    def run(job):
        ran.append((job.id, job.tags["tinymq.schedule"]))
        fired.set()

    q = Queue()
    try:
        q.register_executor("t", run)
        assert q.every(0.01, "t", name=Schedules.CLEANUP) == "cleanup"
        assert q.cron("* * * * *", "t", name=Schedules.CRON) == "cron-cleanup"
        assert [(type(stats.name), stats.name) for stats in q.schedules()] == [(str, "cleanup"),
                                                                               (str, "cron-cleanup")]
        q.start_dispatcher(1)
        assert fired.wait(WAIT)
        job_id, tag = ran[0]
        assert job_id.startswith("cleanup@") and tag == "cleanup", ran[0]
        assert type(q.schedules()[0].last_job_id) is str
        assert q.unschedule(Schedules.CLEANUP) and not q.unschedule("cleanup")
    finally:
        q.stop()


# --- 4. a broker named by a str subclass (a str Enum) ----------------------------------------------

# RedisBroker(url, name=Queues.MAIL), a ``(str, Enum)`` member whose value is "mail", kept its keys
# under tmq:{Queues.MAIL}: (the member's format()), not tmq:{mail}:, so it shared nothing with the
# processes (and `status --redis URL --name mail`) that named the queue "mail": the jobs one
# enqueued never reached the other's workers, silently. Now the name is its text, as a job type is.

class Queues(str, enum.Enum):
    MAIL = "attack32-mail"


@pytest.mark.redis
def test_a_broker_named_by_a_str_enum_member_is_the_queue_of_its_text(redis_url):
    by_member = Queue(broker=RedisBroker(redis_url, name=Queues.MAIL, lease=2.0))
    by_text = Queue(broker=RedisBroker(redis_url, name="attack32-mail", lease=2.0))
    try:
        assert type(by_member.broker.name) is str and by_member.broker.name == "attack32-mail"
        by_member.enqueue(Job("t", id="from-the-member"))
        assert by_text.get_stats().medium_queue_size == 1
        assert by_text.cancel("from-the-member")
    finally:
        by_member.stop(wait=False)
        by_text.stop(wait=False)
        by_member.broker.close()
        by_text.broker.close()


# --- 5. counts given as int subclasses (an IntEnum) -----------------------------------------------

# The configs take an int subclass (an IntEnum member; a bool is refused) for their counts, and kept
# it as given. Over Redis those counts go into script calls, whose packing refuses anything but an
# exact int: enqueue raised TypeError ("A tuple item must be str, int, float or bytes") and the pump
# thread crashed at each round (as if killed: its id let go, its buffer dropped), so no job ever ran.
# Now every count is kept as an exact int, as every duration is kept as a float.

class Limits(enum.IntEnum):
    TWO = 2
    FIVE = 5


def test_configs_keep_their_counts_as_exact_ints():
    assert type(Config(buffer_size=Limits.FIVE, max_delayed_jobs=Limits.TWO).buffer_size) is int
    assert type(Config(buffer_size=Limits.FIVE, max_delayed_jobs=Limits.TWO).max_delayed_jobs) is int
    assert type(ExecutorConfig(max_concurrent_jobs=Limits.FIVE).max_concurrent_jobs) is int
    assert type(RateLimit(Limits.TWO, per=1.0).max_starts) is int
    assert type(RetryConfig(max_retries=Limits.TWO).max_retries) is int
    assert ExecutorConfig(max_concurrent_jobs=Limits.FIVE) == ExecutorConfig(max_concurrent_jobs=5)


@pytest.mark.redis
def test_intenum_counts_work_over_redis(redis_url):
    broker = RedisBroker(redis_url, name="attack32-intenum", lease=2.0, max_crash_recoveries=Limits.TWO)
    q = Queue(config=Config(buffer_size=Limits.FIVE, max_delayed_jobs=Limits.TWO), broker=broker)
    ran = []
    try:
        q.register_executor("t", lambda job: ran.append(job.id), ExecutorConfig(
            max_concurrent_jobs=Limits.FIVE, rate_limit=RateLimit(Limits.FIVE, per=1.0)))
        q.start_dispatcher(2)
        for n in range(4):
            q.enqueue(Job("t", retry_config=RetryConfig(max_retries=Limits.TWO)))
        assert q.join(WAIT)
        assert len(ran) == 4
        assert type(broker.max_crash_recoveries) is int
    finally:
        q.stop(wait=False)
        broker.close()


# --- 6. a schedule's payload, changed by its caller after every() -----------------------------------

# docs/api.md: a schedule enqueues a job "with a copy of payload" at each tick, and a payload the
# queue could not enqueue is refused at every()/cron() "instead of every tick failing". The schedule
# kept the caller's object and copied it at each tick: a dict reused to register several schedules
# (one per region, say) made all of them send the last region, and a value put in it afterwards that
# cannot be copied (or stored) made every tick fail, logged, and skip. It is copied at registration now.

def test_a_schedule_keeps_the_payload_it_was_registered_with():
    got = {}
    both = threading.Event()

    def run(job):
        got.setdefault(job.tags["tinymq.schedule"], job.payload)
        if len(got) == 2:
            both.set()

    q = Queue()
    try:
        q.register_executor("report", run)
        params = {}
        for region in ("eu", "us"):
            params["region"] = region
            q.every(0.01, "report", payload=params, name=f"report-{region}")
        params["lock"] = threading.Lock()  # (cannot be copied: no tick could enqueue it)
        q.start_dispatcher(1)
        assert both.wait(WAIT)
        assert got == {"report-eu": {"region": "eu"}, "report-us": {"region": "us"}}
    finally:
        q.stop()


# --- 7. `worker` on a target whose attribute raises ----------------------------------------------

# `worker module:app.queue` where reading an attribute of the path raises (a property, a module
# __getattr__ of lazy settings) printed a traceback through tinymq's own frames (runpy,
# tinymq/__main__.py, tinymq/_worker.py), then "the process that checked it exited with code 1".
# docs/cli.md: a mistake of yours never prints a traceback of tinymq's; an import that raises is
# reported as one error with the user's own frames. Reading the target is now reported the same way.

LAZY = """\
class App:
    @property
    def queue(self):
        return configure()


def configure():
    raise RuntimeError("settings not configured")


app = App()
"""


def test_worker_shows_where_reading_the_users_target_raised(tmp_path):
    (tmp_path / "lazy32.py").write_text(LAZY)
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, "-m", "tinymq", "worker", "lazy32:app.queue"], cwd=tmp_path,
                            env=environment, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith("python -m tinymq worker: error: reading 'lazy32:app.queue' raised an "
                                    "exception:\n"), result.stderr
    assert 'lazy32.py", line 4, in queue' in result.stderr and 'lazy32.py", line 8, in configure' in result.stderr
    assert result.stderr.rstrip().endswith("RuntimeError: settings not configured"), result.stderr
    assert "_worker.py" not in result.stderr and "__main__.py" not in result.stderr, result.stderr


# --- 8. a job id given as a str subclass: the error says why ---------------------------------------

# A job id must be an exact str (a str subclass is refused, unlike a job type, which is taken as its
# text). Refused, a str enum member was told "id must be a non-empty str ..., got <Ids.REPORT:
# 'report-2026-12'>", which it is: the error now says that a subclass is refused, and what to pass.

class Ids(str, enum.Enum):
    REPORT = "report-2026-12"


def test_a_str_subclass_job_id_is_refused_saying_why():
    with pytest.raises(ValueError, match=r"id must be a non-empty str or None, got <Ids.REPORT: 'report-2026-12'> "
                                         r"\(a Ids, a str subclass: an id is an exact str"):
        Job("t", id=Ids.REPORT)
    job = Job("t")
    with pytest.raises(ValueError, match=r"a str subclass: an id is an exact str"):
        job.id = Ids.REPORT
    with Queue() as q:
        with pytest.raises(TypeError, match=r"job_id must be a str, got .* a str subclass: an id is an exact str"):
            q.cancel(Ids.REPORT)
    with pytest.raises(ValueError, match=r"got ''$"):  # (no hint for an exact str)
        Job("t", id="")
