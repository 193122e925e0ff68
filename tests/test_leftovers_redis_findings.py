"""Findings left open by the last review of the Redis broker, each reproduced against a real
redis-server before its fix.

Each test's docstring says the symptom, how to reproduce it, and what the docs promise.
"""
import json
import logging

from tinymq import Queue

from _helpers import WAIT

_BODY = '["t",1,null,1.0,1.0,null,null]'  # what encode_job writes for Job("t")


def _client(url):
    import redis as redis_py

    return redis_py.Redis.from_url(url, decode_responses=True)


def _prefix(name):
    return f"tmq:{{{name}}}:"


# --- 2. a row that trips its reporter ---------------------------------------------------------

def test_a_handed_row_that_trips_the_reporter_is_reported_once_not_once_per_lease(redis_url, caplog):
    """Symptom: a row handed to a process to report (reporting:<proc>) whose report raised in
    the reporter thread (here: retries "²" in Redis, a digit to str.isdigit() that int()
    refuses, so the stand-in job of undecodable_job raised ValueError) killed the reporter;
    the process let its id go as if killed (_crashed), the row went with it to whoever
    reaped it, whose reporter died on it in turn: once per lease, for ever, and join() never
    returned. Reproduce: a dead process's reporting hash holding such a row; start a worker.
    docs/redis.md: a report is repeated only when its process was killed after its callbacks
    ran; a failure callback that raises is logged and the queue goes on (API.md).
    Fix: the stand-in takes only ASCII digits as retries; and a row no job can be made of is
    logged as an ERROR naming it and acknowledged, never left to kill its reporter."""
    from tinymq.redis import RedisBroker

    name = "trips-reporter"
    prefix = _prefix(name)
    client = _client(redis_url)
    key = "odd|crashed|gone|f1|1"
    client.hset(prefix + "reporting:gone", key, json.dumps(["odd", _BODY, "²", "", "crashed", key, 1]))
    client.zadd(prefix + "procs", {"gone": 1})  # its lease ran out long ago
    client.hset(prefix + "stats", "outstanding", 1)  # (the row holds join() until acknowledged)
    q = Queue(broker=RedisBroker(redis_url, name=name, lease=0.5))
    reported = []
    q.register_executor("t", lambda job: None)
    q.on_failure(lambda job, reason, exc: reported.append((job.id, reason, job.retries)))
    try:
        with caplog.at_level(logging.ERROR, logger="tinymq"):
            q.start_dispatcher(1)
            assert q.join(WAIT)
        assert reported == [("odd", "crashed", 0)]
        assert not [r for r in caplog.records if "crashed" in r.getMessage() and "lets its id" in r.getMessage()]
        assert client.hgetall(prefix + "reporting:gone") == {}
    finally:
        q.stop()
        client.close()
