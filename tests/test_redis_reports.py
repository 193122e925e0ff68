"""A job that Redis ended is reported to a failure callback at least once, even when the
process it was handed to for reporting dies first (API.md "Failures are never silent" and
"Scale-out": at-least-once through kill -9 of any process).

A fetch or beat reply hands its caller rows to report: a job a settle ended as cancelled
(its attempt was marked), or one a reap found crashed too often. Redis has counted the
job's end by then. Before the fix, a process killed between the reply and its callbacks
took the report with it: the counters said failed or cancelled, and no callback ever ran
(found by the cancel fleet test in CI). The rows now wait in Redis until the process
acknowledges them (op A, after its callbacks), and whoever reaps it reports them.

A process "dies" here by having its lease set in the past, as time would.
"""
import json
import threading

import pytest

from tinymq.redis._scripts import Scripts, SettleOp

from _helpers import wait_until

LEASE_MS = 60_000


@pytest.fixture
def scripts(redis_url):
    import redis as redis_py

    client = redis_py.Redis.from_url(redis_url, decode_responses=True)
    yield Scripts(client, "reports")
    client.close()


def expire(scripts, proc):
    scripts.client.zadd(scripts.key("procs"), {proc: 0})


def rows(*ids):
    return [(job_id, "t", 1, 0, f"body-{job_id}") for job_id in ids]


def ended_by_its_own_settle(scripts, proc="p1"):
    """Job "a" is leased to ``proc`` and marked by a cancel; proc's success settle ends it as
    cancelled, and the reply hands proc the row to report."""
    scripts.enqueue("tok", 100, 0, rows("a"))
    attempt = scripts.fetch(proc, "1", 1, LEASE_MS, 3, False).jobs[0].attempt
    assert scripts.cancel("c1", "a").status == "marked"
    reply = scripts.fetch(proc, "2", 1, LEASE_MS, 3, True, [SettleOp("S", attempt)])
    assert [(c.id, c.reason) for c in reply.crashed] == [("a", "cancelled")]
    return reply


def test_a_row_its_process_died_before_reporting_goes_to_the_reaper(scripts):
    ended_by_its_own_settle(scripts)
    expire(scripts, "p1")  # killed before its callbacks ran: no acknowledgement
    alive, _, crashed = scripts.beat("reaper", LEASE_MS, 3, False, "b1")
    assert alive
    assert [(c.id, c.reason, c.body) for c in crashed] == [("a", "cancelled", "body-a")]
    # The reaper is now the one to report it: until it acknowledges, a reaper of the
    # reaper gets it again.
    expire(scripts, "reaper")
    alive, _, crashed = scripts.beat("second", LEASE_MS, 3, False, "b1")
    assert [(c.id, c.reason) for c in crashed] == [("a", "cancelled")]
    scripts.settle("second", [SettleOp("A", crashed[0].key)])
    expire(scripts, "second")
    assert scripts.beat("third", LEASE_MS, 3, False, "b1")[2] == []
    assert scripts.client.keys(scripts.key("reporting:*")) == []
    stats = scripts.client.hgetall(scripts.key("stats"))
    assert int(stats["cancelled"]) == 1 and int(stats["outstanding"]) == 0  # counted once


def test_a_row_acknowledged_before_its_process_died_is_not_reported_again(scripts):
    (row,) = ended_by_its_own_settle(scripts).crashed
    scripts.fetch("p1", "3", 1, LEASE_MS, 3, True, [SettleOp("A", row.key)])
    expire(scripts, "p1")
    alive, _, crashed = scripts.beat("reaper", LEASE_MS, 3, False, "b1")
    assert alive and crashed == []


def test_two_rows_of_one_id_handed_to_one_process_are_acknowledged_one_at_a_time(scripts):
    """Job "a" ends cancelled, a new job takes the id and ends cancelled too, both handed to p1
    before it acknowledged either: its acknowledgement of the first leaves the second for its
    reaper (once, both waited under "a|cancelled", and the first A removed the second)."""
    first = ended_by_its_own_settle(scripts).crashed[0]
    scripts.enqueue("tok2", 100, 0, [("a", "t", 1, 0, "body-a2")])  # the id is free again
    attempt = scripts.fetch("p1", "3", 1, LEASE_MS, 3, True).jobs[0].attempt
    assert scripts.cancel("c2", "a").status == "marked"
    (second,) = scripts.fetch("p1", "4", 1, LEASE_MS, 3, True, [SettleOp("S", attempt)]).crashed
    assert (second.id, second.body) == ("a", "body-a2") and second.key != first.key
    scripts.settle("p1", [SettleOp("A", first.key)])  # its callbacks for the first ran, then it died
    expire(scripts, "p1")
    alive, _, crashed = scripts.beat("reaper", LEASE_MS, 3, False, "b1")
    assert [(c.id, c.body) for c in crashed] == [("a", "body-a2")]


def test_a_crashed_row_handed_to_a_reaper_that_dies_goes_to_the_next_reaper(scripts):
    scripts.enqueue("tok", 100, 0, rows("poison"))
    assert [j.id for j in scripts.fetch("p1", "1", 1, LEASE_MS, 0, False).jobs] == ["poison"]
    expire(scripts, "p1")
    reply = scripts.fetch("reaper", "1", 1, LEASE_MS, 0, False)  # max_crash_recoveries 0: dead
    assert [(c.id, c.reason) for c in reply.crashed] == [("poison", "crashed")]
    expire(scripts, "reaper")
    reply = scripts.fetch("next", "1", 1, LEASE_MS, 0, False)
    assert [(c.id, c.reason) for c in reply.crashed] == [("poison", "crashed")]
    assert int(scripts.client.hget(scripts.key("stats"), "failed")) == 1  # counted once


def test_a_resent_fetch_hands_the_same_rows_and_one_acknowledgement_clears_them(scripts):
    first = ended_by_its_own_settle(scripts)
    again = scripts.fetch("p1", "2", 1, LEASE_MS, 3, True, [])  # its reply was lost: resent
    assert again.crashed == first.crashed  # keys included
    scripts.settle("p1", [SettleOp("A", first.crashed[0].key)])
    assert scripts.client.hgetall(scripts.key("reporting:p1")) == {}


def test_rows_a_leaving_process_did_not_acknowledge_are_reported_by_a_beat(scripts):
    ended_by_its_own_settle(scripts)
    scripts.release("p1")  # it left without acknowledging (its callbacks did not finish)
    alive, _, crashed = scripts.beat("other", LEASE_MS, 3, False, "b1")
    assert [(c.id, c.reason) for c in crashed] == [("a", "cancelled")]
    assert [json.loads(v)[0] for v in scripts.client.hvals(scripts.key("reporting:other"))] == ["a"]


def test_a_worker_reports_what_its_fetch_found_crashed_and_acknowledges_it(redis_url):
    """End to end: a live queue reaps a dead process whose job is past its crash recoveries;
    its callbacks report the job once, and it acknowledges the row (with its next call, or
    with its release at stop), so nothing is left for anyone to report again."""
    import redis as redis_py

    from tinymq import Job, Queue
    from tinymq.redis import RedisBroker

    name = "reports-e2e"
    q = Queue(broker=RedisBroker(redis_url, name=name, lease=2.0, max_crash_recoveries=0))
    reported = []
    q.on_failure(lambda job, reason, exc: reported.append((job.id, reason)))
    q.register_executor("work", lambda job: None)
    job = Job("work", {})
    q.enqueue(job)
    client = redis_py.Redis.from_url(redis_url, decode_responses=True)
    try:
        ghost = Scripts(client, name)
        assert [j.id for j in ghost.fetch("ghost", "1", 1, LEASE_MS, 0, False).jobs] == [job.id]
        expire(ghost, "ghost")  # it died holding the job
        q.start_dispatcher(1)
        assert q.join(10)
        q.stop()
        assert reported == [(job.id, "crashed")]
        assert client.keys(ghost.key("reporting:*")) == []
        assert client.llen(ghost.key("reports")) == 0  # not left for another process either
    finally:
        q.stop()
        client.close()


@pytest.mark.parametrize("call, expected", [
    ("q.cancel('b')", ("b", "cancelled")),
    ("q.enqueue_delayed(Job('work', None, id='c'), 120.0)", ("a", "evicted")),  # the earliest due goes
])
def test_a_producer_only_process_killed_before_its_callbacks_leaves_the_report_to_a_worker(
        redis_url, tmp_path, call, expected):
    """kill -9 of a producer-only process between the reply of a call that ended a job (its
    cancel, or its enqueue that evicted a delayed job) and its callbacks: the job is reported
    once, by a worker process that reaps the reporter the call registered."""
    import subprocess
    import sys

    name = f"reports-killed-{expected[1]}"
    worker, producer, client, keys = a_worker_and_two_waiting_jobs(redis_url, name)
    reported = []
    worker.on_failure(lambda job, reason, exc: reported.append((job.id, reason)))
    script = tmp_path / "producer.py"
    script.write_text(
        "import os, signal, sys\n"
        "from tinymq import Config, Job, Queue\n"
        "from tinymq.redis import RedisBroker\n"
        "q = Queue(config=Config(max_delayed_jobs=2), broker=RedisBroker(sys.argv[1], name=sys.argv[2], lease=2.0))\n"
        "q.on_failure(lambda job, reason, exc: os.kill(os.getpid(), signal.SIGKILL))\n"
        f"{call}\n"
        "print('survived', flush=True)\n")
    try:
        done = subprocess.run([sys.executable, str(script), redis_url, name],
                              capture_output=True, text=True, timeout=60, env=_env_with_tests_path())
        assert done.returncode == -9, (done.stdout, done.stderr)  # killed in its callback: it reported nothing
        assert wait_until(lambda: reported, timeout=30), "no process reported the job"
        assert wait_until(lambda: not client.keys(keys.key("reporting:*")))  # acknowledged
        assert reported == [expected]
        assert int(client.hget(keys.key("stats"), expected[1])) == 1
    finally:
        worker.stop()
        producer.stop()
        client.close()


def _env_with_tests_path():
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))


def a_worker_and_two_waiting_jobs(redis_url, name):
    """A registered worker process (it holds a lease), a producer-only one, and jobs "a" and
    "b" waiting in Redis (delayed); with a client and the queue's Scripts for its keys."""
    import redis as redis_py

    from tinymq import Job, Queue
    from tinymq.redis import RedisBroker

    worker = Queue(broker=RedisBroker(redis_url, name=name, lease=2.0))
    producer = Queue(broker=RedisBroker(redis_url, name=name, lease=2.0))
    client = redis_py.Redis.from_url(redis_url, decode_responses=True)
    keys = Scripts(client, name)
    worker.register_executor("work", lambda job: None)
    worker.start_dispatcher(1)
    assert wait_until(lambda: worker._link._registered)
    for job_id in ("a", "b"):
        producer.enqueue_delayed(Job("work", None, id=job_id), 60.0)  # they wait in Redis
    return worker, producer, client, keys


def test_a_worker_that_cancels_a_waiting_job_reports_it_once_and_acknowledges_it(redis_url):
    """A worker process (registered: it holds a lease) cancels a job that waits in Redis: its
    callbacks report it once, the row it kept in Redis meanwhile is acknowledged with its
    next call. A producer-only process (no lease) registers a reporter for its cancel's row
    while its callbacks run, and releases it after them."""
    worker, producer, client, keys = a_worker_and_two_waiting_jobs(redis_url, "reports-cancel")
    reporting = keys.key("reporting:" + worker._link._proc)
    reported, kept, kept_by_producer = [], [], []

    @worker.on_failure
    def report(job, reason, exc):
        reported.append((job.id, reason))
        # While its callbacks run, the row waits in Redis for the worker's reaper, should it die.
        kept.append(any(field.startswith(f"{job.id}|{reason}|")  # (by "<id>|cancelled|<token>")
                        for field in client.hkeys(reporting)))

    @producer.on_failure
    def producer_report(job, reason, exc):
        reporters = [proc for proc in client.zrange(keys.key("procs"), 0, -1) if "~" in proc]
        kept_by_producer.append((job.id, reason, [
            field.split("|")[:2] for proc in reporters for field in client.hkeys(keys.key("reporting:" + proc))]))

    try:
        assert worker.cancel("a")
        assert reported == [("a", "cancelled")] and kept == [True]
        assert wait_until(lambda: not client.exists(reporting)), client.hgetall(reporting)  # acknowledged
        assert producer.cancel("b")
        assert kept_by_producer == [("b", "cancelled", [["b", "cancelled"]])]
        assert client.keys(keys.key("reporting:*")) == []  # released after its callbacks
        assert [proc for proc in client.zrange(keys.key("procs"), 0, -1) if "~" in proc] == []
        assert producer._link.broker.shared_executors()[1] == 1  # a reporter is no worker process
        worker.stop()
        assert reported == [("a", "cancelled")]
        assert client.llen(keys.key("reports")) == 0  # nothing left to report again
        assert producer.get_stats().jobs_cancelled == 2
    finally:
        worker.stop()
        producer.stop()
        client.close()


# --- a failure for good that a worker decides: counted before its callbacks, reported through kill -9

def test_a_failure_for_good_is_counted_before_its_callbacks_and_the_job_is_unfinished_until_they_ran(redis_url):
    """API.md "Stats": counters before any callback for the same event; "Failures are never
    silent": callbacks before the job counts as finished for join(), across processes."""
    from tinymq import Job, PermanentFailure, Queue
    from tinymq.redis import RedisBroker

    name = "reports-failing"
    worker = Queue(broker=RedisBroker(redis_url, name=name, lease=2.0))
    producer = Queue(broker=RedisBroker(redis_url, name=name, lease=2.0))
    in_callback, let_go = threading.Event(), threading.Event()
    seen = []

    def callback(job, reason, exc):
        seen.append((reason, worker.get_stats().jobs_failed, producer.get_stats().jobs_failed))
        in_callback.set()
        let_go.wait(30)

    def fail(job):
        raise PermanentFailure("HTTP 404")

    worker.on_failure(callback)
    worker.register_executor("t", fail)
    try:
        producer.enqueue(Job("t"))
        worker.start_dispatcher(1)
        assert in_callback.wait(30)
        assert seen == [("permanent_failure", 1, 1)]  # counted, as any process sees it
        assert not producer.join(0.3)  # its callbacks are running: not finished yet
        let_go.set()
        assert producer.join(10)
        assert wait_until(lambda: not worker.broker._client.keys(f"tmq:{{{name}}}:reporting:*"))
    finally:
        let_go.set()
        worker.stop()
        producer.stop()


def test_a_worker_killed_in_its_failure_callback_leaves_the_report_to_another_without_running_it_again(
        redis_url, tmp_path):
    """kill -9 of the worker process that decided a failure for good, inside its callback:
    Redis counted the failure already; the job is not run again (its end was decided), and
    a worker that reaps the dead one reports it, once, with its reason."""
    import subprocess
    import sys

    import redis as redis_py

    from tinymq import Job, Queue
    from tinymq.redis import RedisBroker

    name = "reports-killed-failing"
    script = tmp_path / "worker.py"
    script.write_text(
        "import os, signal, sys\n"
        "from tinymq import Job, PermanentFailure, Queue\n"
        "from tinymq.redis import RedisBroker\n"
        "q = Queue(broker=RedisBroker(sys.argv[1], name=sys.argv[2], lease=2.0))\n"
        "q.on_failure(lambda job, reason, exc: os.kill(os.getpid(), signal.SIGKILL))\n"
        "def fail(job):\n"
        "    raise PermanentFailure('HTTP 404')\n"
        "q.register_executor('t', fail)\n"
        "q.enqueue(Job('t', id='doomed'))\n"
        "q.start_dispatcher(1)\n"
        "q.join(60)\n"
        "print('survived', flush=True)\n")
    client = redis_py.Redis.from_url(redis_url, decode_responses=True)
    stats_key = f"tmq:{{{name}}}:stats"
    try:
        done = subprocess.run([sys.executable, str(script), redis_url, name],
                              capture_output=True, text=True, timeout=60, env=_env_with_tests_path())
        assert done.returncode == -9, (done.stdout, done.stderr)  # killed in its callback
        assert client.hget(stats_key, "failed") == "1"  # counted before the callback ran
        assert client.hget(stats_key, "outstanding") == "1"  # not finished: nobody reported it yet
        ran, reported = [], []
        q = Queue(broker=RedisBroker(redis_url, name=name, lease=2.0))
        q.on_failure(lambda job, reason, exc: reported.append((job.id, reason, job.last_error)))
        q.register_executor("t", lambda job: ran.append(job.id))
        q.start_dispatcher(1)
        try:
            assert q.join(30)  # once the dead worker's lease ran out and its report was made
        finally:
            q.stop()
        assert reported == [("doomed", "permanent_failure", "PermanentFailure: HTTP 404")]
        assert ran == []
        assert (client.hget(stats_key, "failed"), client.hget(stats_key, "outstanding")) == ("1", "0")
        assert client.keys(f"tmq:{{{name}}}:reporting:*") == []
    finally:
        client.close()


def test_a_job_no_process_can_decode_is_dead_and_finished_without_a_report_left_waiting(redis_url):
    """A body written by another program (not tinymq's JSON) never runs: its worker keeps it
    dead and, with no failure callback to wait for, acknowledges the kept report, so join() returns."""
    import redis as redis_py

    from tinymq import Queue
    from tinymq.redis import RedisBroker

    name = "reports-undecodable"
    client = redis_py.Redis.from_url(redis_url, decode_responses=True)
    q = Queue(broker=RedisBroker(redis_url, name=name, lease=2.0))
    q.register_executor("t", lambda job: None)
    try:
        assert Scripts(client, name).enqueue("tok", 100, 0, [("junk", "t", 1, 0, "{not json")]).status == "ok"
        q.start_dispatcher(1)
        assert q.join(10)
        keys = Scripts(client, name)
        assert client.zrange(keys.key("dead"), 0, -1) == ["junk"]
        assert client.hget(keys.key("job:junk"), "e").startswith("cannot decode")
        assert (client.hget(keys.key("stats"), "failed"), client.hget(keys.key("stats"), "outstanding")) == ("1", "0")
        assert client.keys(keys.key("reporting:*")) == []
    finally:
        q.stop()
        client.close()


@pytest.mark.parametrize("body", ['["import",1,null,"yesterday",1.0,null,null]', "{not json",
                                  '["import",1,null,1.0,1.0,null,null] []'])  # (a value, then extra data)
def test_a_job_no_process_can_decode_is_reported_and_listed_dead_with_its_body(redis_url, body):
    """A job that leaves without success is handed to every on_failure callback and kept dead
    (api.md), also one whose body no tinymq can decode (another program wrote it, or a tinymq
    that let an odd timestamp through): never run, it is failed as a permanent failure, counted
    before its callbacks run, and reported and listed with a stand-in job (its body as the
    payload). Before the fix it died with an ERROR log only, left out of dead_jobs()."""
    import redis as redis_py

    from tinymq import Queue
    from tinymq.redis import RedisBroker

    name = "reports-undecodable-reported"
    client = redis_py.Redis.from_url(redis_url, decode_responses=True)
    q = Queue(broker=RedisBroker(redis_url, name=name, lease=2.0))
    ran, reported = [], []
    q.register_executor("import", lambda job: ran.append(job.id))
    q.on_failure(lambda job, reason, exc: reported.append(
        (job.id, job.payload, reason, (job.last_error or "").startswith("cannot decode"), q.get_stats().jobs_failed)))
    try:
        assert Scripts(client, name).enqueue("tok", 100, 0, [("odd", "import", 1, 0, body)]).status == "ok"
        q.start_dispatcher(1)
        assert q.join(10)
        assert ran == []
        assert reported == [("odd", body, "permanent_failure", True, 1)]
        (dead,) = q.broker.dead_jobs()
        assert (dead.job.id, dead.job.payload, dead.reason) == ("odd", body, "permanent_failure")
        assert dead.job.type == ("import" if body.endswith("null]") else "undecodable")
        assert dead.job.last_error == f"cannot decode: {_decode_error(body)}"
        assert client.keys(f"tmq:{{{name}}}:reporting:*") == []
    finally:
        q.stop()
        client.close()


def _decode_error(body):
    """How decoding ``body`` fails, as the JSON decoder and Job() say it (decode_job's errors)."""
    from tinymq import Job

    try:
        job_type, priority, payload, timestamp, run_at, retry_fields, tags = json.loads(body)
        Job(job_type, payload, priority=priority, tags=tags, run_at=run_at).timestamp = float(timestamp)
    except Exception as exc:
        return f"{exc.__class__.__name__}: {exc}"
    return None


_BODY = '["t",1,{"k":[1,2.5]},1.0,2.0,null,null]'  # as encode_job writes it


@pytest.mark.parametrize("body", [
    _BODY, f" {_BODY}\n", f"{_BODY} []", f"{_BODY}]", _BODY[:-1], "", "  ", "{not json", "null", "42", '"t"',
    '["t",1]', '["t",1,null,1.0,1.0,null,null,null]', '["t",1,null,1.0,NaN,null,null]', "[1e999]", '["\\ud800"]',
    '["t",9,null,1.0,1.0,null,null]', '["t",1,null,1.0,1.0,{"max_retries":2},["x"]]', "\udcff[]", "[\x00]",
])
def test_decode_job_reads_a_body_as_the_json_decoder_does_and_fails_with_its_error(monkeypatch, body):
    """decode_job reads the body's JSON without JSONDecoder.decode's whitespace look-ups (a
    fetch decodes every job): every body gives the Job, or the error (class and text, which
    the worker puts in the dead job's last_error and its log), that decoding it with the
    store's JSONSerializer gives."""
    from tinymq.redis import _codec

    def outcome():
        try:
            job = _codec.decode_job("id-1", body, "2", "boom")
        except Exception as exc:
            return exc.__class__, str(exc)
        return job.id, job.type, job.payload, job.priority, job.timestamp, job.run_at, job.retry_config, \
            job.tags, job.retries, job.last_error

    fast = outcome()
    monkeypatch.setattr(_codec, "_fields", _codec._serializer.loads)  # the decoder's decode(), in full
    assert fast == outcome()


def test_without_failure_callbacks_a_failure_for_good_waits_for_no_round_trip_and_leaves_nothing_kept(redis_url):
    """Nothing can observe the order when no callback is registered: the failure goes with
    the next call, acknowledged in the same one; join() returns and no row stays kept."""
    from tinymq import Job, PermanentFailure, Queue
    from tinymq.redis import RedisBroker

    name = "reports-no-callbacks"
    q = Queue(broker=RedisBroker(redis_url, name=name, lease=2.0))

    def fail(job):
        raise PermanentFailure("HTTP 404")

    q.register_executor("t", fail)
    sent = []
    real_send = q._link._send
    try:
        q._link._send = lambda op: sent.append(op) or real_send(op)
        q.enqueue_many([Job("t") for _ in range(20)])
        q.start_dispatcher(4)
        assert q.join(10)
        stats = q.get_stats()
        assert stats.jobs_failed == 20
        assert q.broker._client.keys(f"tmq:{{{name}}}:reporting:*") == []
        assert sent == []  # no thread waited for a round trip of its own
    finally:
        q.stop()


# --- every row waiting to be reported holds join(): crashed, evicted, cancelled (lib.lua's held_row)

NOT_YET = 0.3  # seconds join() is given while a failure callback is held: it must not return


class _HeldCallback:
    """An on_failure callback that records (id, reason) and holds its thread until let go."""

    def __init__(self):
        self.seen = []
        self.inside = threading.Event()
        self.let_go = threading.Event()

    def __call__(self, job, reason, exc):
        self.seen.append((job.id, reason))
        self.inside.set()
        self.let_go.wait(30)


def _queue(redis_url, name, lease=2.0, **config):
    from tinymq import Config, Queue
    from tinymq.redis import RedisBroker

    return Queue(config=Config(**config), broker=RedisBroker(redis_url, name=name, lease=lease,
                                                            max_crash_recoveries=0))


def _a_reporter_reports(redis_url, name, callback, expected, producer):
    """A worker process started now reports ``expected`` through ``callback`` (its heartbeat,
    every lease / 4, hands it the row): ``producer.join`` waits for the callback, and
    returns after it. Returns the worker, to stop."""
    worker = _queue(redis_url, name, lease=2.0)
    worker.on_failure(callback)
    worker.register_executor("work", lambda job: None)
    worker.start_dispatcher(1)
    assert callback.inside.wait(30), "no process reported the job"
    assert callback.seen == [expected]
    assert not producer.join(NOT_YET)  # its callback still runs: not finished for join()
    callback.let_go.set()
    assert producer.join(30)
    return worker


def test_a_crashed_row_holds_join_until_its_reaper_ran_the_callbacks(redis_url):
    """kill -9 of the process holding a job past its crash recoveries: the reap ends it
    (dead, "crashed") and hands the row to the reaper; join() returns only after the
    reaper's callbacks ran (before the fix, at the reap)."""
    from tinymq import Job

    name = "reports-held-crashed"
    producer = _queue(redis_url, name)
    ghost = Scripts(producer._link.client, name)
    callback, worker = _HeldCallback(), None
    try:
        producer.enqueue(Job("work", None, id="a"))
        assert [j.id for j in ghost.fetch("ghost", "1", 1, LEASE_MS, 0, False).jobs] == ["a"]
        expire(ghost, "ghost")  # killed holding it
        assert not producer.join(NOT_YET)
        worker = _a_reporter_reports(redis_url, name, callback, ("a", "crashed"), producer)
        assert producer.get_stats().jobs_failed == 1
    finally:
        callback.let_go.set()
        for q in (worker, producer):
            if q is not None:
                q.stop()


def test_a_crashed_row_of_a_killed_worker_process_holds_join_until_reported(redis_url, tmp_path):
    """The real kill path: a worker process dies (os._exit, as a kill -9) running a job that
    has no crash recovery left; a worker process here reaps it once its lease ran out, and
    join() returns only after that worker's callbacks reported the job."""
    import os
    import subprocess
    import sys

    from tinymq import Job

    name = "reports-held-killed"
    child = subprocess.Popen(
        [sys.executable, os.path.join(os.path.dirname(__file__), "_redis_crash_worker.py"), redis_url, name,
         "1.0", "0", str(tmp_path / "log"), "1"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=_env_with_tests_path())
    producer = _queue(redis_url, name)
    callback, worker = _HeldCallback(), None
    try:
        assert child.stdout.readline().strip() == "ready"
        producer.enqueue(Job("poison", None, id="p"))
        assert child.wait(30) == 3  # _redis_crash_worker.POISON_EXIT: it died holding the job
        assert not producer.join(NOT_YET)
        worker = _a_reporter_reports(redis_url, name, callback, ("p", "crashed"), producer)
        assert producer.get_stats().jobs_failed == 1
    finally:
        callback.let_go.set()
        if child.poll() is None:
            child.kill()
            child.wait()
        for q in (worker, producer):
            if q is not None:
                q.stop()


def test_a_cancelled_row_a_release_left_in_reports_holds_join_until_reported(redis_url):
    """A job cancelled while leased whose process gave it back at its stop before it heard of
    the mark: the release ends it as cancelled and leaves its row in `reports`; join() waits
    until another process's heartbeat handed it out and its callbacks ran (attackBB)."""
    from tinymq import Job

    name = "reports-held-cancelled"
    producer = _queue(redis_url, name)
    ghost = Scripts(producer._link.client, name)
    callback, worker = _HeldCallback(), None
    try:
        producer.enqueue(Job("work", None, id="a"))
        attempt = ghost.fetch("ghost", "1", 1, LEASE_MS, 0, False).jobs[0].attempt
        assert producer.cancel("a")  # marked: the ghost holds it
        assert ghost.release("ghost", [SettleOp("B", attempt)]).stale == 0  # its stop, before it heard
        assert ghost.client.llen(ghost.key("reports")) == 1
        assert not producer.join(NOT_YET)  # (before the fix: True, no callback had run anywhere)
        worker = _a_reporter_reports(redis_url, name, callback, ("a", "cancelled"), producer)
        assert producer.get_stats().jobs_cancelled == 1
    finally:
        callback.let_go.set()
        for q in (worker, producer):
            if q is not None:
                q.stop()


def test_an_evicted_row_holds_join_until_its_enqueuer_ran_the_callbacks(redis_url):
    """The delayed job an enqueue evicts (max_delayed_jobs) was accepted by an enqueue that
    returned: its eviction is a failure reported by on_failure, and join() waits for it."""
    from tinymq import Job

    name = "reports-held-evicted"
    producer = _queue(redis_url, name, max_delayed_jobs=1)
    observer = _queue(redis_url, name)
    callback = _HeldCallback()
    producer.on_failure(callback)
    try:
        producer.enqueue_delayed(Job("work", None, id="a"), 60.0)
        evicting = threading.Thread(
            target=lambda: producer.enqueue_delayed(Job("work", None, id="b"), 60.0), daemon=True)
        evicting.start()  # its callbacks run in the enqueuing call
        assert callback.inside.wait(30)
        assert callback.seen == [("a", "evicted")]
        assert observer.cancel("b")  # b is finished: only a's report is left
        assert not observer.join(NOT_YET)
        callback.let_go.set()
        evicting.join(30)
        assert observer.join(30)
        assert observer.get_stats().jobs_evicted == 1
    finally:
        callback.let_go.set()
        producer.stop()
        observer.stop()


def test_a_cancel_of_a_waiting_job_holds_join_until_its_canceller_ran_the_callbacks(redis_url):
    """q.cancel() of a job waiting in Redis, from a producer-only process: the row waits for
    the canceller (a reporter) and holds join() until its callbacks ran."""
    from tinymq import Job

    name = "reports-held-removed"
    producer = _queue(redis_url, name)
    observer = _queue(redis_url, name)
    callback = _HeldCallback()
    producer.on_failure(callback)
    try:
        producer.enqueue_delayed(Job("work", None, id="a"), 60.0)
        cancelling = threading.Thread(target=lambda: producer.cancel("a"), daemon=True)
        cancelling.start()
        assert callback.inside.wait(30)
        assert callback.seen == [("a", "cancelled")]
        assert not observer.join(NOT_YET)
        callback.let_go.set()
        cancelling.join(30)
        assert observer.join(30)
    finally:
        callback.let_go.set()
        producer.stop()
        observer.stop()


@pytest.mark.parametrize("call", ["cancel", "enqueue"])
def test_a_call_whose_reply_is_lost_has_its_rows_reported_by_the_next_heartbeat(redis_url, call):
    """A worker's cancel() of a waiting job (or its enqueue that evicts a delayed job) runs in
    Redis, and its reply, and its two resends', are lost (Redis restarting): the call raises,
    and the row it kept in reporting:<proc> waits there. Before the fix nothing handed it
    out while the process lived: never reported, and join() never returned (the row holds
    it). The heartbeat now looks for the rows of calls without a reply, reports them and
    acknowledges them."""
    import redis as redis_py

    from tinymq import Job, TinyMQError

    name = f"reports-lost-{call}"
    worker = _queue(redis_url, name, lease=2.0, max_delayed_jobs=1)
    producer = _queue(redis_url, name)
    reported = []
    worker.on_failure(lambda job, reason, exc: reported.append((job.id, reason)))
    worker.register_executor("work", lambda job: None)
    scripts = worker._link.scripts
    script = getattr(scripts, call)

    def without_reply(*args):
        script(*args)  # it ran in Redis (a resend gets the same reply, by its token)
        raise redis_py.ConnectionError("the reply was lost")

    try:
        worker.start_dispatcher(1)
        assert wait_until(lambda: worker._link._registered)
        producer.enqueue_delayed(Job("work", None, id="a"), 60.0)
        setattr(scripts, call, without_reply)
        with pytest.raises(TinyMQError):
            if call == "cancel":
                worker.cancel("a")
            else:
                worker.enqueue_delayed(Job("work", None, id="b"), 60.0)  # evicts a
        delattr(scripts, call)
        assert wait_until(lambda: reported, timeout=30), "the job was never reported"
        assert reported == [("a", "cancelled" if call == "cancel" else "evicted")]
        if call == "enqueue":
            assert producer.cancel("b")  # (enqueued, though the call raised)
        assert producer.join(30)
        assert wait_until(lambda: not scripts.client.keys(scripts.key("reporting:*")))
    finally:
        worker.stop()
        producer.stop()
