"""Where an idle Redis fleet's enqueue->start latency goes, step by step (issue #12's latency goal).

    python bench/redis_idle_latency_split.py [--jobs 1500] [--gap 0.001] [--processes 2] [--threads 4] [--no-slowlog]

Not a benchmark (pytest does not collect it). It runs the shape of test_bench_redis.py's
"enqueue->start latency, idle" case (worker processes of ``--threads`` threads each, the
bench's Config and lease, one job every ``--gap`` seconds from this process) against a test
redis-server of its own (tests/_redis_server.py), its slow log taking every command (unless
``--no-slowlog``), and
times each job's way on one clock (``time.perf_counter``: CLOCK_MONOTONIC, one for all the
processes of a machine), the workers' link patched to note when things happen:

- enqueue: the producer's Python before its EVALSHA is handed to the socket (``pre``), that send
  (``send``), the wait for its reply (``wait``), its Python after it (``post``);
- wake: from the enqueue's send until the pump of the process that takes the job has read the
  BLPOP reply (the script's run, Redis serving the blocked client, the reply's way, the pump
  thread waking up and hiredis reading it); ``wake - producer`` compares that read with the
  producer's read of its own reply, which Redis writes in the same pass;
- pump: from that read until the fetch is sent (the pump's Python), split into the BLPOP
  call's return (``pop_exit``), the pump's loop until ``_round`` (``loop``), the round's
  preparation until the fetch is called (``round``), the call until its EVALSHA is packed and
  handed to the socket (``call``), and that send (``send``: on loopback the syscall delivers the
  bytes and wakes Redis itself);
- fetch: the fetch's wait for its reply (sent to read), the reply parsed into a FetchReply
  (``parse``), and from there until the job is in the core (``take``: the round's bookkeeping,
  the job decoded and pushed to the ReadyQueue);
- hand-off: from there until the worker thread calls ``link.started`` (``wake``: a worker
  thread woken, the GIL, the core's pop) and until the executor starts (``start``);
- the server's own time (slow log): the enqueue and the fetch scripts, and the BLPOP;
- beside them, the round trips under it all: redis-py ``PING`` back to back and one every
  ``--gap`` (on a VM whose idle vCPUs halt, waking a process on an idle CPU costs far more than
  on a busy one: each hop of a job's way pays it), and a raw EVALSHA of ``return 1``.

Jobs taken by another way than a woken pump (a worker thread's flush round, the timer, a pump
round that found it without waiting) are counted apart and left out of the step medians.
Prints a table of medians (microseconds), then one JSON line.
"""
import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

from _redis_server import RedisServer  # noqa: E402

QUEUE_NAME = "idle-split"
LEASE = 30.0  # the bench's (test_bench_redis.LEASE)
BUFFER_SIZE = 10_000_000
REGISTER_TIMEOUT = 20.0
SETTLE_PAUSE = 0.3  # seconds for the workers to reach their idle wait
WARMUP = 50  # jobs sent (and left out) before the measured ones
DONE_TIMEOUT = 30.0
FLOOR_CALLS = 2000
_US = 1_000_000.0


def _build_queue(url: str, executor: Any) -> Any:
    from tinymq import Config, Queue
    from tinymq.redis import RedisBroker

    queue = Queue(config=Config(buffer_size=BUFFER_SIZE, max_delayed_jobs=0),
                  broker=RedisBroker(url, name=QUEUE_NAME, lease=LEASE))
    queue.register_executor("noop", executor)
    return queue


def _patch_wire(stamps: threading.local) -> None:
    """Note, per thread, when the last command was sent and its reply read."""
    from tinymq.redis import _scripts

    send, reply = _scripts._send, _scripts._reply

    def timed_send(connection: Any, command: Any) -> None:
        stamps.sending = time.perf_counter()
        send(connection, command)
        stamps.sent = time.perf_counter()

    def timed_reply(connection: Any, by: Any) -> Any:
        got = reply(connection, by)
        stamps.replied = time.perf_counter()
        return got

    _scripts._send = timed_send
    _scripts._reply = timed_reply


def _worker(url: str, threads: int, out: str) -> None:
    from tinymq.redis import _link, _scripts

    stamps = threading.local()
    events: List[Tuple[Any, ...]] = []  # list.append is atomic under the GIL
    _patch_wire(stamps)

    def pop(self: Any, *args: Any, **kwargs: Any) -> Any:
        entered = time.perf_counter()
        got = blocking_pop(self, *args, **kwargs)
        events.append(("pop", entered, stamps.sent, stamps.replied, time.perf_counter(), got is not None))
        return got

    def fetch(self: Any, *args: Any, **kwargs: Any) -> Any:
        entered = time.perf_counter()
        reply = fetch_of(self, *args, **kwargs)
        events.append(("fetch", threading.current_thread().name, entered, stamps.sent, stamps.replied,
                       time.perf_counter(), [item.attempt.split(":", 1)[1] for item in reply.jobs],
                       getattr(stamps, "round", entered), stamps.sending))
        return reply

    def round_(self: Any, *args: Any, **kwargs: Any) -> Any:
        stamps.round = time.perf_counter()
        return round_of(self, *args, **kwargs)

    def take(self: Any, fetched: Any) -> Any:
        got = take_of(self, fetched)
        if fetched:
            events.append(("take", threading.current_thread().name, time.perf_counter()))
        return got

    def started(self: Any, job: Any) -> None:
        events.append(("started", job.id, time.perf_counter()))
        started_of(self, job)

    blocking_pop, fetch_of = _scripts.Scripts.blocking_pop, _scripts.Scripts.fetch
    take_of, started_of, round_of = _link.QueueLink._take, _link.QueueLink.started, _link.QueueLink._round
    _scripts.Scripts.blocking_pop = pop  # type: ignore[method-assign]
    _scripts.Scripts.fetch = fetch  # type: ignore[method-assign]
    _link.QueueLink._take = take  # type: ignore[method-assign]
    _link.QueueLink.started = started  # type: ignore[method-assign]
    _link.QueueLink._round = round_  # type: ignore[method-assign]

    queue = _build_queue(url, lambda job: events.append(("start", job.id, time.perf_counter())))
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stopping.set())
    queue.start_dispatcher(threads)
    stopping.wait()
    queue.stop()
    with open(out, "w", encoding="utf-8") as file:
        json.dump(events, file)


def _median(values: List[float]) -> Optional[float]:
    return statistics.median(values) * _US if values else None


def _floors(client: Any, gap: float) -> Dict[str, Optional[float]]:
    """Median round trips: redis-py PING back to back and one every ``gap`` (as the jobs come: each
    process sleeps in between, and so may the CPUs), and a raw EVALSHA of ``return 1`` on a tinymq
    connection, back to back."""
    from tinymq.redis._scripts import Connections, _reply, _send

    pings = []
    for _ in range(FLOOR_CALLS):
        began = time.perf_counter()
        client.ping()
        pings.append(time.perf_counter() - began)
    paced = []
    for _ in range(FLOOR_CALLS // 4):
        began = time.perf_counter()
        client.ping()
        paced.append(time.perf_counter() - began)
        time.sleep(gap)
    sha = client.script_load("return 1")
    connections = Connections(lambda: client.connection_pool.connection_class(
        **client.connection_pool.connection_kwargs), 1, 1.0)
    connection = connections.acquire()
    calls = []
    for _ in range(FLOOR_CALLS):
        began = time.perf_counter()
        _send(connection, ("EVALSHA", sha, 0))
        _reply(connection, None)
        calls.append(time.perf_counter() - began)
    connection.disconnect()
    return {"ping": _median(pings), "ping_paced": _median(paced), "evalsha_return_1": _median(calls)}


def measure(jobs: int, gap: float, processes: int, threads: int, slowlog: bool = True) -> Dict[str, Any]:
    import redis

    from tinymq import Job

    directory = tempfile.mkdtemp(prefix="tinymq-idle-split-")
    server = RedisServer(directory).start()
    workers: List[Tuple[subprocess.Popen, str]] = []
    try:
        client = redis.Redis.from_url(server.url, decode_responses=True)
        stamps = threading.local()
        _patch_wire(stamps)
        producer = _build_queue(server.url, lambda job: None)
        for k in range(processes):
            out = os.path.join(directory, f"events-{k}.json")
            workers.append((subprocess.Popen([sys.executable, __file__, "--worker", server.url, "--out", out,
                                              "--threads", str(threads)]), out))
        deadline = time.monotonic() + REGISTER_TIMEOUT
        while client.zcard(f"tmq:{{{QUEUE_NAME}}}:procs") < processes:
            if time.monotonic() > deadline:
                raise RuntimeError("the worker processes did not register")
            time.sleep(0.01)
        time.sleep(SETTLE_PAUSE)
        floors = _floors(client, gap)
        stats_key = f"tmq:{{{QUEUE_NAME}}}:stats"
        # id -> before, sent, replied, returned, sending (handed to the socket)
        sent: Dict[str, Tuple[float, float, float, float, float]] = {}
        for index in range(WARMUP + jobs):
            if index == WARMUP and slowlog:
                client.config_set("slowlog-log-slower-than", 0)
                client.config_set("slowlog-max-len", 100 * jobs)
                client.slowlog_reset()
            job = Job("noop", index, id=f"j{index}")
            before = time.perf_counter()
            producer.enqueue(job)
            returned = time.perf_counter()
            if index >= WARMUP:
                sent[job.id] = (before, stamps.sent, stamps.replied, returned, stamps.sending)
            time.sleep(gap)
        deadline = time.monotonic() + DONE_TIMEOUT
        while int(client.hget(stats_key, "outstanding") or 0) > 0:
            if time.monotonic() > deadline:
                raise RuntimeError("the jobs did not all finish")
            time.sleep(0.01)
        slow = []
        if slowlog:
            client.config_set("slowlog-log-slower-than", -1)
            slow = client.slowlog_get(100 * jobs + 1000)
        shas = {script.sha: name for name, script in producer._broker._scripts._script.items()}
        for worker, _ in workers:
            worker.terminate()
        events = []
        for worker, out in workers:
            worker.wait(LEASE)
            with open(out, encoding="utf-8") as file:
                events.append(json.load(file))
        return _report(jobs, sent, events, slow, shas, floors)
    finally:
        for worker, _ in workers:
            if worker.poll() is None:
                worker.kill()
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


def _report(jobs: int, sent: Dict[str, Tuple[float, float, float, float, float]], events: List[List[Any]],
            slow: List[Dict[str, Any]], shas: Dict[str, str], floors: Dict[str, Optional[float]]) -> Dict[str, Any]:
    steps: Dict[str, List[float]] = {k: [] for k in (
        "total", "enqueue_pre", "enqueue_send", "enqueue_wait", "enqueue_post", "wake", "wake_minus_producer_read",
        "pump", "pump_pop_exit", "pump_loop", "pump_round", "pump_call", "pump_send", "fetch_wait",
        "fetch_parse", "take", "handoff_wake", "handoff_start")}
    ways = {"woken pump": 0, "pump without a wait": 0, "another thread": 0, "not found": 0}
    totals = []
    for proc_events in events:
        pops = [e for e in proc_events if e[0] == "pop"]
        takes: Dict[str, List[float]] = {}
        for e in proc_events:
            if e[0] == "take":
                takes.setdefault(e[1], []).append(e[2])
        started = {e[1]: e[2] for e in proc_events if e[0] == "started"}
        start = {e[1]: e[2] for e in proc_events if e[0] == "start"}
        totals.extend(at - sent[job_id][0] for job_id, at in start.items() if job_id in sent)
        for e in proc_events:
            if e[0] != "fetch" or not e[6]:
                continue
            _, thread, entered, f_sent, f_replied, returned, ids, rounded, f_sending = e
            took = next((t for t in takes.get(thread, []) if t >= returned), None)
            for job_id in ids:
                if job_id not in sent or job_id not in start:
                    continue
                before, p_sent, p_replied, p_returned, p_sending = sent[job_id]
                if thread != "tinymq-redis-pump":
                    ways["another thread"] += 1
                    continue
                pop = max((p for p in pops if p[4] <= entered), key=lambda p: p[4], default=None)
                if pop is None or not pop[5] or pop[3] < p_sent:
                    ways["pump without a wait"] += 1
                    continue
                ways["woken pump"] += 1
                steps["total"].append(start[job_id] - before)
                steps["enqueue_pre"].append(p_sending - before)
                steps["enqueue_send"].append(p_sent - p_sending)
                steps["enqueue_wait"].append(p_replied - p_sent)
                steps["enqueue_post"].append(p_returned - p_replied)
                steps["wake"].append(pop[3] - p_sent)
                steps["wake_minus_producer_read"].append(pop[3] - p_replied)
                steps["pump"].append(f_sent - pop[3])
                steps["pump_pop_exit"].append(pop[4] - pop[3])
                steps["pump_loop"].append(rounded - pop[4])
                steps["pump_round"].append(entered - rounded)
                steps["pump_call"].append(f_sending - entered)
                steps["pump_send"].append(f_sent - f_sending)
                steps["fetch_wait"].append(f_replied - f_sent)
                steps["fetch_parse"].append(returned - f_replied)
                if took is not None:
                    steps["take"].append(took - returned)
                    if job_id in started:
                        steps["handoff_wake"].append(started[job_id] - took)
                        steps["handoff_start"].append(start[job_id] - took)
    ways["not found"] = jobs - sum(ways.values())
    server: Dict[str, List[float]] = {}
    for entry in slow:
        command = entry["command"]
        command = (command.decode("utf-8", "replace") if isinstance(command, bytes) else command).split()
        name = command[0].upper()
        if name not in ("EVALSHA", "BLPOP"):  # (the slow log has the commands scripts run too)
            continue
        if name == "EVALSHA" and len(command) > 1:
            name = "EVALSHA " + shas.get(command[1], command[1][:8])
        server.setdefault(name, []).append(entry["duration"])
    server_us = {name: {"calls": len(d), "median_us": statistics.median(d)} for name, d in server.items()}
    medians = {name: _median(values) for name, values in steps.items()}
    return {"jobs": jobs, "p50_all_us": _median(totals), "ways": ways, "steps_us": medians,
            "server_us": server_us, "floors_us": floors}


def _print(report: Dict[str, Any]) -> None:
    print(f"jobs {report['jobs']}, enqueue->start p50 over all {report['p50_all_us']:.1f} us; taken by: "
          + ", ".join(f"{k} {v}" for k, v in report["ways"].items()))
    print("medians over the jobs a woken pump took (us):")
    for name, value in report["steps_us"].items():
        print(f"  {name:26} {'-' if value is None else format(value, '8.1f')}")
    print("server (slow log, us per call):")
    for name, row in sorted(report["server_us"].items(), key=lambda kv: -kv[1]["calls"]):
        print(f"  {name:26} {row['median_us']:8.1f}  ({row['calls']} calls)")
    print("round trips (us): " + ", ".join(f"{k} {v:.1f}" for k, v in report["floors_us"].items()))
    print(json.dumps(report))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1500)
    parser.add_argument("--gap", type=float, default=0.001, help="seconds between two enqueues")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=4, help="worker threads per worker process")
    parser.add_argument("--no-slowlog", action="store_true",
                        help="no server split: the slow log, taking every command, slows Redis down a little")
    parser.add_argument("--worker", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args.worker, args.threads, args.out)
        return 0
    _print(measure(args.jobs, args.gap, args.processes, args.threads, not args.no_slowlog))
    return 0


if __name__ == "__main__":
    sys.exit(main())
