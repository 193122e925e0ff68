"""Bytes that are not UTF-8 in Redis (another program wrote them), read by a worker, and text
Redis cannot take, sent by one: ``python _redis_foreign_bytes.py URL NAME [--no-hiredis]``
prints what ``outcome(URL, NAME)`` returns, as JSON; ``--no-hiredis`` runs it as without
hiredis installed (redis-py's own parser and packing).
"""
import json
import os
import sys

WAIT = 10.0
GOOD = b'["t",1,null,1.0,1.0,null,null]'
ROWS = [  # (id, type, priority, delay ms, body), as enqueue.lua takes them
    ("good", "t", 1, 0, GOOD),
    ("binary", "t", 1, 0, b"\xff\xfe\x00["),  # a body no tinymq wrote: dead, reported with it as payload
    (b"id-\xff", "t", 1, 0, GOOD),  # an id that is not UTF-8: runs, settled under the same bytes
    ("latin-1", "t", 1, 0, b'["t",1,"caf\xe9",1.0,1.0,null,null]'),  # a payload that is not UTF-8: runs
]


def outcome(url: str, name: str) -> dict:
    import redis

    from tinymq import Job, Queue
    from tinymq.redis import RedisBroker
    from tinymq.redis._scripts import Scripts

    client = redis.Redis.from_url(url, decode_responses=True)
    queue = Queue(broker=RedisBroker(url, name=name, lease=2.0))
    ran, reported = [], []
    queue.register_executor("t", lambda job: ran.append([job.id, job.payload]))
    queue.on_failure(lambda job, reason, exc: reported.append([job.id, job.payload, reason]))
    try:
        assert Scripts(client, name).enqueue("tok", 100, 0, ROWS).status == "ok"
        client.set(f"tmq:{{{name}}}:odd", b"\xff\xfe")
        queue.start_dispatcher(2)
        assert queue.join(WAIT)
        try:
            queue.enqueue(Job("t", "report-\udcff.csv", id="surrogate"))
            refused = None
        except ValueError as exc:
            refused = str(exc)
        scripts = queue.broker._scripts
        connection = scripts.connections.acquire()
        parser = type(connection._parser).__name__
        scripts.connections.release(connection, False)
        return {
            "ran": sorted(ran), "reported": reported[:],
            "dead": [[dead.job.id, dead.job.payload, dead.reason] for dead in queue.broker.dead_jobs()],
            "command": scripts.command("GET", scripts.key("odd")),
            "cancel": queue.cancel("report-\udcff.csv"),  # (no job can have it: Redis cannot take it)
            "refused": refused,
            "requeued": queue.broker.requeue_dead(["binary"]),
            "parser": parser,
        }
    finally:
        queue.stop()
        client.close()


if __name__ == "__main__":
    if "--no-hiredis" in sys.argv:
        sys.modules["hiredis"] = None  # (import hiredis: ImportError, as when it is not installed)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this repo's tinymq
    print(json.dumps(outcome(sys.argv[1], sys.argv[2])))
