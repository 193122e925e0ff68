"""Where the server's time of one Redis fetch goes (issue #12's scale-out goal), part by part.

    python bench/redis_fetch_split.py [--calls N] [--repeat R]

No benchmark: one process's fetch calls against this repo's test server (tests/_redis_server.py:
``appendonly yes``, ``appendfsync everysec``; its directory in ``/dev/shm`` when there is one),
each call settling (op S) the jobs the call before it took and taking ``k`` no-op jobs anew,
the end to end case's steady state (a worker process of 4 threads asks for 5 a call), for
k = 0, 1, 5 and 20; beside them an EVALSHA of ``return 1`` and one of fetch's prelude alone
(the definitions of lib.lua that ``_scripts._script_text`` puts in front of fetch.lua, then
``return 1``: the closures, tables and key names every fetch makes before its first line).
Per call, medians over R runs (the variants taking turns): the script's run (``INFO
commandstats``: usec_per_call of ``evalsha``), the commands it ran inside (their count, and
their own usec summed), and the main thread's CPU (``INFO cpu``: with the arguments' parsing,
the writes' propagation to the append-only file, the reply). What a call costs whatever it
carries, against what each job adds (k = 5 to 20), says which of the two a change to the
scripts must cut to be seen end to end. Prints one JSON object.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
from typing import Any, Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from _redis_server import RedisServer  # noqa: E402

QUEUE_NAME = "fetch-split"
PER_CALL = (0, 1, 5, 20)  # jobs taken (and settled) per fetch call
BATCH = 100  # jobs per enqueue call while filling the queue
BUFFER_SIZE = 10_000_000  # never QueueFull
LEASE_MS = 60_000
MAX_CRASHES = 3
BODY = '["noop",1,%d,1733356800.123456,1733356800.123456,null,null]'  # as encode_job writes a job
_US = 1_000_000.0
_SCRIPT_OWN = ("cmdstat_evalsha", "cmdstat_info", "cmdstat_config|resetstat", "cmdstat_config")


def _main_thread_cpu(client: Any) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user_main_thread"]) + float(info["used_cpu_sys_main_thread"])


def _fill(client: Any, enqueue: str, prefix: str, jobs: int) -> None:
    for first in range(0, jobs, BATCH):
        rows = [field for index in range(first, first + BATCH)
                for field in (f"j{index}", "noop", 1, 0, BODY % index, 0, "")]
        client.evalsha(enqueue, 1, prefix, f"fill-{first}", BUFFER_SIZE, 0, BATCH, "", 0, *rows)


def _measured(client: Any, calls: int, call: Any) -> Dict[str, float]:
    """Per call of ``call()`` (``calls`` of them): the script's run, its commands, the main thread's CPU."""
    client.config_resetstat()
    before = _main_thread_cpu(client)
    for _ in range(calls):
        call()
    cpu = (_main_thread_cpu(client) - before) * _US / calls
    stats = client.info("commandstats")
    inner = [value for name, value in stats.items() if name not in _SCRIPT_OWN]
    return {"script_us": float(stats["cmdstat_evalsha"]["usec_per_call"]),
            "commands_us": sum(float(value["usec"]) for value in inner) / calls,
            "commands": sum(int(value["calls"]) for value in inner) / calls,
            "server_cpu_us": cpu}


def fetch_run(client: Any, shas: Dict[str, str], prefix: str, k: int, calls: int) -> Dict[str, float]:
    """``calls`` fetches of one process, each settling the jobs of the one before and taking ``k``."""
    client.flushall()
    _fill(client, shas["enqueue"], prefix, (calls + 1) * k + BATCH)
    fid, registered = 0, 0
    held: List[str] = []  # the attempts the last call took: the next one settles them

    def fetch() -> None:
        nonlocal fid, registered, held
        fid += 1
        ops = [field for attempt in held for field in ("S", attempt)]
        reply = client.evalsha(shas["fetch"], 1, prefix, "p1", f"f{fid}", k, LEASE_MS, MAX_CRASHES, registered,
                               BUFFER_SIZE, 0, 0, len(held), *ops)
        if int(reply[0]) != 1 or len(reply[5]) != k:
            raise RuntimeError(f"fetch {fid} did not take {k} jobs: {reply!r}")
        registered = registered or int(reply[1])
        held = [row[0] for row in reply[5]]

    fetch()  # (registers p1)
    return _measured(client, calls, fetch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000, help="script calls per measurement (default 2000)")
    parser.add_argument("--repeat", type=int, default=5, help="runs of each variant (default 5)")
    args = parser.parse_args()
    import redis

    from tinymq.redis._scripts import _script_texts, _source, key_prefix

    fetch_text = _script_texts()["fetch"]
    prelude = fetch_text[:len(fetch_text) - len(_source("fetch"))] + "return 1"  # (_script_text ends with it)
    directory = tempfile.mkdtemp(prefix="tinymq-fetch-split-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    server = RedisServer(directory).start()
    try:
        client = redis.Redis.from_url(server.url, decode_responses=True)
        prefix = key_prefix(QUEUE_NAME)
        runs: Dict[str, List[Dict[str, float]]] = {}
        for _ in range(args.repeat):
            shas = {name: client.script_load(text) for name, text in (
                ("enqueue", _script_texts()["enqueue"]), ("fetch", fetch_text),
                ("return_1", "return 1"), ("prelude", prelude))}
            for name in ("return_1", "prelude"):
                runs.setdefault(name, []).append(
                    _measured(client, args.calls, lambda sha=shas[name]: client.evalsha(sha, 1, prefix)))
            for k in PER_CALL:
                runs.setdefault(f"fetch_{k}_jobs", []).append(fetch_run(client, shas, prefix, k, args.calls))
        report: Dict[str, Any] = {name: {what: round(statistics.median(run[what] for run in values), 2)
                                         for what in values[0]}
                                  for name, values in runs.items()}
        for what in ("script_us", "server_cpu_us", "commands"):
            per_job = (report["fetch_20_jobs"][what] - report["fetch_5_jobs"][what]) / 15
            report[f"per_job_{what}"] = round(per_job, 2)
            report[f"per_call_{what}"] = round(report["fetch_5_jobs"][what] - 5 * per_job, 2)
        print(json.dumps(report))
    finally:
        server.stop()


if __name__ == "__main__":
    main()
