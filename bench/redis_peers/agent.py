"""The producer side of one peer, driven by the controller over stdin/stdout.

    BENCH_REDIS_URL=redis://... python agent.py rq

It runs in the peer's own venv (setup.sh) and imports ``peer_<name>.Producer``
(its operations are producer.py's loops, the same for every contender).
Each stdin line is one JSON request ``{"op": ..., "args": [...]}``; each reply is
one JSON line ``{"ok": true, "result": ...}`` or ``{"ok": false, "error": "..."}``.
Ops: ``enqueue(start, n)``, ``enqueue_many(start, n, batch)``,
``paced(start, n, gap)`` (returns the perf_counter stamp taken just before each
enqueue), ``delayed(start, delays)`` (returns each job's due time on the perf_counter
clock: the stamp just before its enqueue plus its delay), and
``hello()`` (the versions in use). The controller times whole requests; a request
lasts far longer than the pipe's round trip.
"""
import asyncio
import importlib
import inspect
import json
import os
import sys
import traceback
from importlib.metadata import version
from typing import Any, Dict

DISTRIBUTIONS = {"rq": "rq", "arq": "arq", "saq": "saq", "dramatiq": "dramatiq", "huey": "huey"}


def main() -> int:
    peer = sys.argv[1]
    if peer not in DISTRIBUTIONS:
        raise SystemExit(f"unknown peer {peer!r}; expected one of {sorted(DISTRIBUTIONS)}")
    url = os.environ["BENCH_REDIS_URL"]
    module = importlib.import_module(f"peer_{peer}")
    producer = module.Producer(url)
    loop = asyncio.new_event_loop()
    out = sys.stdout
    for line in sys.stdin:
        request: Dict[str, Any] = json.loads(line)
        op = request["op"]
        try:
            if op == "hello":
                result: Any = {"peer": version(DISTRIBUTIONS[peer]), "redis-py": version("redis"),
                               "hiredis": version("hiredis")}
            else:
                result = getattr(producer, op)(*request.get("args", ()))
                if inspect.isawaitable(result):
                    result = loop.run_until_complete(result)
            reply = {"ok": True, "result": result}
        except Exception as exc:  # reported to the controller, which fails the case
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"}
        out.write(json.dumps(reply) + "\n")
        out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
