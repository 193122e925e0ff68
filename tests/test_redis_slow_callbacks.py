"""A failure callback slower than the lease never gets a live process declared dead.

Over Redis, a process is handed rows to report by its fetch and beat replies (a job
crashed with another process, cancelled while another process leased it, ...), and hears
of its own attempts that q.cancel() marked. Their failure callbacks ran on the thread
that got the reply. When that was the heartbeat, a callback slower than the lease kept
the lease from being renewed: another process reaped the live one, counted a crash for
each job it held and ran them again (at least once still held, but nothing had died).
Now the heartbeat only renews and hands them on: a reporter thread runs the callbacks.

The process here runs a long job and has a second one buffered, so its pump sends no
fetch (which renews the lease too) while the callback runs: only its heartbeat keeps the
lease. The test itself plays another worker process, beating every lease / 4: it reaps a
process whose lease ran out, as any worker would.
"""
import threading
import time

import pytest

from tinymq import ExecutorConfig, Job
from tinymq.redis._scripts import Scripts, SettleOp

from _backends import Redis
from _helpers import WAIT

LEASE = 1.0  # seconds
LEASE_MS = int(LEASE * 1000)
SLOW = 3 * LEASE  # how long the failure callback takes


@pytest.fixture
def made(redis_url):
    made = Redis(redis_url, lease=LEASE)
    yield made
    made.close()


@pytest.fixture
def scripts(made):
    import redis as redis_py

    client = redis_py.Redis.from_url(made.url, decode_responses=True)
    yield Scripts(client, made.queue_name)
    client.close()


class Busy:
    """A queue whose one worker runs job "long" until ``finish`` is set, with job "next"
    buffered behind it; its failure callback takes SLOW seconds for the job ``slow_for``."""

    def __init__(self, made, slow_for):
        self.q = made.queue()
        self.runs = []
        self.reports = []
        self.long_started = threading.Event()
        self.finish = threading.Event()
        self.in_callback = threading.Event()
        self.observed = threading.Event()  # the other process watched for SLOW seconds

        def long(job):
            self.runs.append(job.id)
            self.long_started.set()
            self.finish.wait(6 * WAIT)

        def work(job):
            self.runs.append(job.id)

        def slow(job, reason, exc):
            self.reports.append((job.id, reason))
            if job.id == slow_for:
                self.in_callback.set()
                self.observed.wait(3 * WAIT)

        self.q.register_executor("long", long, ExecutorConfig(timeout=None))
        self.q.register_executor("work", work)
        self.q.on_failure(slow)

    def start(self):
        self.q.enqueue(Job("long", id="long"))
        self.q.enqueue(Job("work", id="next"))
        self.q.start_dispatcher(1)  # its first fetch takes both: "next" waits in its buffer
        assert self.long_started.wait(WAIT)
        self.proc = self.q._link._proc

    def watch_while_the_callback_runs(self, scripts):
        """Beat as another worker process every lease / 4 for SLOW seconds, then let the
        callback return: the jobs it reaped meanwhile, if any."""
        assert self.in_callback.wait(WAIT)
        reaped = []
        try:
            until = time.monotonic() + SLOW
            while time.monotonic() < until:
                alive, _, crashed = scripts.beat("other", LEASE_MS, 3, False)
                reaped += [(row.id, row.reason) for row in crashed]
                time.sleep(LEASE / 4)
        finally:
            self.observed.set()
            scripts.release("other")
        return reaped


def crashes_counted(scripts, *ids):
    return {job_id: scripts.client.hget(scripts.key("job:" + job_id), "c") for job_id in ids}


def test_a_slow_callback_on_a_row_the_heartbeat_hands_out_does_not_get_its_process_reaped(made, scripts):
    busy = Busy(made, slow_for="v")
    # Job "v" is leased by a process that q.cancel() marks, and that leaves (stop()) before
    # hearing of it: its give-back ends "v" as cancelled, and the row waits in `reports`,
    # which only a heartbeat hands out.
    busy.q.enqueue(Job("work", id="v"))
    attempt = scripts.fetch("leaving", "1", 1, 60_000, 3, False).jobs[0].attempt
    assert busy.q.cancel("v")  # marked: "leaving" holds it
    busy.start()
    scripts.release("leaving", [SettleOp("B", attempt)])
    assert scripts.client.llen(scripts.key("reports")) == 1
    reaped = busy.watch_while_the_callback_runs(scripts)
    assert reaped == []
    assert scripts.client.zscore(scripts.key("procs"), busy.proc) is not None, "the busy process was reaped"
    assert crashes_counted(scripts, "long", "next") == {"long": None, "next": None}
    busy.finish.set()
    assert busy.q.join(WAIT)
    assert busy.runs == ["long", "next"]  # neither ran again
    assert busy.reports == [("v", "cancelled")]
    assert busy.q._link._proc == busy.proc


def test_a_slow_callback_of_a_cancel_the_heartbeat_hears_of_does_not_get_its_process_reaped(made, scripts):
    """(A cancel from another process marks the running attempt; the heartbeat's reply names
    it, and cancelling it here runs its failure callbacks.)"""
    busy = Busy(made, slow_for="long")
    busy.start()
    assert scripts.cancel("c1", "long").status == "marked"
    reaped = busy.watch_while_the_callback_runs(scripts)
    assert reaped == []
    assert scripts.client.zscore(scripts.key("procs"), busy.proc) is not None, "the busy process was reaped"
    assert crashes_counted(scripts, "next") == {"next": None}
    busy.finish.set()
    assert busy.q.join(WAIT)
    assert busy.runs == ["long", "next"]
    assert busy.reports == [("long", "cancelled")]
    assert busy.q._link._proc == busy.proc
