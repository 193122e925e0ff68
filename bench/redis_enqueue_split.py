"""Where the time of one Redis enqueue goes (issue #12's producer goals), part by part.

    python bench/redis_enqueue_split.py [--calls N] [--repeat R] [--no-aof]

No benchmark: it splits the two producer cases of ``test_bench_redis.py`` (``enqueue`` of one
job, ``enqueue_many(100)``), one thread, no worker, against this repo's test server
(tests/_redis_server.py: ``appendonly yes``, ``appendfsync everysec``; its directory in
``/dev/shm`` when there is one, so that a shared disk's fsync stalls stay out of the figures):

- the client, per call, median over the calls: its Python before the EVALSHA is packed
  (``Queue.enqueue`` down to the connection), the packing and sending, the wait for the reply
  and its reading, and its Python after it; each call stamped where ``_scripts._send`` and
  ``_scripts._reply`` begin and end;
- the round trip under it: ``PING``, and an EVALSHA of ``return 1`` given the enqueue's
  arguments, on a raw connection (median per call);
- the server: the enqueue script's own run (``INFO commandstats``: usec_per_call of
  ``evalsha``) and the main thread's CPU per call (``INFO cpu``: with the arguments' parsing,
  the writes' propagation to the append-only file, the reply), for 1, 10 and 100 jobs a call,
  beside the same for ``return 1`` and for the floor (``FLOOR``: the least a script does that
  leaves the jobs in Redis as enqueue does): what a call costs, and what each job adds. With
  ``--no-aof`` the server runs with its append-only file off (``extra``): what the writes'
  propagation to it costs.

Medians per call keep a busy host's preemptions out; sums of them are not the mean a
benchmark round measures. Prints one JSON object.
"""
import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from _redis_server import RedisServer  # noqa: E402

QUEUE_NAME = "enqueue-split"
BATCH = 100
BUFFER_SIZE = 10_000_000  # never QueueFull
WARM_CALLS = 500
SCRIPT_BATCHES = (1, 10, BATCH)  # jobs per script call in the server's split
BODY = '["noop",1,%d,1733356800.123456,1733356800.123456,null,null]'  # as encode_job writes a job
# The least a script can do that takes the enqueue's arguments and leaves its jobs as enqueue.lua
# leaves new ready jobs (a hash of 6 fields each, the ids pushed to their ready list in one RPUSH):
# no resend record, no duplicate or room check, no counts. What enqueue's per job figures have
# above it is what enqueue.lua itself adds; the floor's own is what the queue's layout costs.
FLOOR = """
local n, ids = tonumber(ARGV[4]), {}
for i = 7, 6 + n * 7, 7 do
  redis.call('HSET', KEYS[1] .. 'job:' .. ARGV[i], 't', ARGV[i + 1], 'p', ARGV[i + 2], 'b', ARGV[i + 4],
             'r', ARGV[i + 5], 'k', ARGV[1], 'o', i)
  ids[#ids + 1] = ARGV[i]
end
redis.call('RPUSH', KEYS[1] .. 'ready:1', unpack(ids))
return {'ok', {}}
"""
_NS_PER_US = 1000.0
_US = 1_000_000.0


def _median_us(values: List[float]) -> float:
    return round(statistics.median(values) / _NS_PER_US, 2)


def client_parts(queue: Any, calls: int, batch: int) -> Dict[str, float]:
    """Per call (ns stamps, medians in us): before the send, the send, the reply, after it."""
    from tinymq import Job
    from tinymq.redis import _scripts

    stamps: List[int] = []
    clock = time.perf_counter_ns
    send, reply = _scripts._send, _scripts._reply

    def stamped_send(connection: Any, command: Any) -> None:
        stamps.append(clock())
        send(connection, command)
        stamps.append(clock())

    def stamped_reply(connection: Any, by: Any) -> Any:
        value = reply(connection, by)
        stamps.append(clock())
        return value

    parts: Dict[str, List[float]] = {"before_send": [], "send": [], "reply": [], "after_reply": [], "total": []}
    _scripts._send, _scripts._reply = stamped_send, stamped_reply
    try:
        for call in range(calls):
            jobs = [Job("noop", call * BATCH + index) for index in range(max(batch, 1))]
            stamps.clear()
            start = clock()
            if batch:
                queue.enqueue_many(jobs)
            else:
                queue.enqueue(jobs[0])
            end = clock()
            sent, packed_and_sent, replied = stamps
            for name, value in (("before_send", sent - start), ("send", packed_and_sent - sent),
                                ("reply", replied - packed_and_sent), ("after_reply", end - replied),
                                ("total", end - start)):
                parts[name].append(value)
    finally:
        _scripts._send, _scripts._reply = send, reply
    return {name: _median_us(values) for name, values in parts.items()}


def _rows(batch: int, tag: str) -> List[Any]:
    return [field for index in range(batch)
            for field in (f"{tag}-{index}", "noop", 1, 0, BODY % index, 0, "")]


def round_trips(url: str, calls: int) -> Dict[str, float]:
    """Median us per call on a raw connection: PING, and ``return 1`` with 1 and BATCH jobs' arguments."""
    import redis

    from tinymq.redis import _scripts
    from tinymq.redis._scripts import key_prefix

    client = redis.Redis.from_url(url)
    nothing = client.script_load("return 1")
    options = redis.ConnectionPool.from_url(url)  # (a raw connection, as the broker's Connections make them)
    connection = options.connection_class(**options.connection_kwargs)
    prefix = key_prefix(QUEUE_NAME)

    def timed(command: Callable[[int], Any]) -> float:
        spent = []
        for call in range(calls):
            arguments = command(call)
            start = time.perf_counter_ns()
            _scripts._send(connection, arguments)
            connection.read_response()
            spent.append(time.perf_counter_ns() - start)
        return _median_us(spent)

    try:
        return {
            "ping": timed(lambda call: ("PING",)),
            "return_1_with_1_job": timed(lambda call: ("EVALSHA", nothing, 1, prefix, "t", BUFFER_SIZE, 0, 1, "", 0,
                                                       *_rows(1, f"rt{call}"))),
            f"return_1_with_{BATCH}_jobs": timed(lambda call: ("EVALSHA", nothing, 1, prefix, "t", BUFFER_SIZE, 0, BATCH,
                                                               "", 0, *_rows(BATCH, f"rt{call}"))),
        }
    finally:
        connection.disconnect()
        client.close()


def server_split(url: str, calls: int, repeat: int) -> Dict[str, Any]:
    """Per script call, medians over ``repeat`` runs: the script's run and the server's CPU."""
    import redis

    from tinymq.redis._scripts import _script_texts, key_prefix

    client = redis.Redis.from_url(url)
    shas = {"enqueue": client.script_load(_script_texts()["enqueue"]), "floor": client.script_load(FLOOR),
            "return_1": client.script_load("return 1")}
    prefix = key_prefix(QUEUE_NAME)

    def main_thread_cpu() -> float:
        info = client.info("cpu")
        return info["used_cpu_user_main_thread"] + info["used_cpu_sys_main_thread"]

    out: Dict[str, Any] = {}
    try:
        for batch in SCRIPT_BATCHES:
            script_us: Dict[str, List[float]] = {name: [] for name in shas}
            cpu_us: Dict[str, List[float]] = {name: [] for name in shas}
            n = max(30, calls // batch)
            for run in range(repeat):
                for name, sha in shas.items():
                    client.flushall()
                    client.config_resetstat()
                    before = main_thread_cpu()
                    for call in range(n):
                        client.evalsha(sha, 1, prefix, os.urandom(8).hex(), BUFFER_SIZE, 0, batch, "", 0,
                                       *_rows(batch, f"{run}-{call}"))
                    cpu_us[name].append((main_thread_cpu() - before) * _US / n)
                    script_us[name].append(client.info("commandstats")["cmdstat_evalsha"]["usec_per_call"])
            out[f"{batch}_jobs"] = {f"{name}_{what}": round(statistics.median(values[name]), 1)
                                   for what, values in (("script_us", script_us), ("server_cpu_us", cpu_us))
                                   for name in shas}
        first, last = out[f"{SCRIPT_BATCHES[0]}_jobs"], out[f"{BATCH}_jobs"]
        for script, prefix in (("enqueue", ""), ("floor", "floor_")):
            for what in ("script_us", "server_cpu_us"):
                per_job = (last[f"{script}_{what}"] - first[f"{script}_{what}"]) / (BATCH - SCRIPT_BATCHES[0])
                out[f"{prefix}per_job_{what}"] = round(per_job, 2)
                out[f"{prefix}per_call_{what}"] = round(first[f"{script}_{what}"] - per_job, 1)
        return out
    finally:
        client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=3000, help="enqueue calls per measurement (default 3000)")
    parser.add_argument("--repeat", type=int, default=5, help="runs of the server's split (default 5)")
    parser.add_argument("--no-aof", action="store_true", help="the server without its append-only file")
    args = parser.parse_args()
    from tinymq import Config, Job, Queue
    from tinymq.redis import RedisBroker

    directory = tempfile.mkdtemp(prefix="tinymq-enqueue-split-",
                                 dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    server = RedisServer(directory, extra=["--appendonly", "no"] if args.no_aof else None).start()
    try:
        queue = Queue(config=Config(buffer_size=BUFFER_SIZE, max_delayed_jobs=0),
                      broker=RedisBroker(server.url, name=QUEUE_NAME))
        queue.register_executor("noop", lambda job: None)
        for index in range(WARM_CALLS):
            queue.enqueue(Job("noop", -1 - index))
        report = {
            "client_enqueue_us": client_parts(queue, args.calls, 0),
            f"client_enqueue_many_{BATCH}_us": client_parts(queue, max(30, args.calls // 10), BATCH),
            "round_trip_us": round_trips(server.url, args.calls),
            "server": server_split(server.url, args.calls, args.repeat),
        }
        queue.stop(wait=False)
        print(json.dumps(report, indent=1))
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
