"""Where the CPU of a Redis-broker job goes, split by process (issue #12's throughput goals).

    python bench/redis_cpu_split.py e2e  [--jobs N] [--threads M]   # 2 worker processes x M threads
    python bench/redis_cpu_split.py many [--jobs N]                 # enqueue_many(100), no worker
    python bench/redis_cpu_split.py one  [--jobs N]                 # enqueue, one job per call

On this 2-core machine end-to-end throughput is at best 2 cores / (CPU per job of all
processes), so CPU microseconds per job, by process, is the figure to move; wall-clock
rates are printed beside it but are noise on a shared host (compare medians of runs
alternated with the code before a change). Measured over the jobs' run only (start-up
excluded): the producer with ``time.process_time``, each worker process from
``/proc/<pid>/stat``, redis-server with ``INFO cpu``; with ``INFO commandstats`` for the
EVALSHA time, the commands run (those inside scripts included) and the round trips
(``total_writes_processed``; both less this script's own calls: its CONFIG RESETSTAT, INFO
cpu and looks at the outstanding count), with the script calls and the idle waits (BLPOP)
among them. The server is this repo's test server (tests/_redis_server.py:
``appendonly yes``, ``appendfsync everysec``), jobs are no-ops of one type.
Prints one JSON line.
"""
import argparse
import glob
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

from _redis_server import RedisServer  # noqa: E402

QUEUE_NAME = "cpu-split"
LEASE = 5.0  # seconds: long enough that no renewal is late on a busy host
BATCH = 100  # jobs per enqueue_many call
PROCESSES = 2
BUFFER_SIZE = 10_000_000  # never QueueFull
REGISTER_TIMEOUT = 20.0  # seconds for the workers to fetch once
SETTLE_PAUSE = 0.3  # seconds for the workers to reach their idle wait before the run
DRAIN_POLL = 0.002  # seconds between looks at the outstanding count
_US = 1_000_000.0
_TICKS = os.sysconf("SC_CLK_TCK")


def _build_queue(url: str) -> Any:
    from tinymq import Config, Queue
    from tinymq.redis import RedisBroker

    queue = Queue(config=Config(buffer_size=BUFFER_SIZE, max_delayed_jobs=0),
                  broker=RedisBroker(url, name=QUEUE_NAME, lease=LEASE))
    queue.register_executor("noop", lambda job: None)
    return queue


def _worker(url: str, threads: int) -> None:
    queue = _build_queue(url)
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stopping.set())
    queue.start_dispatcher(threads)
    stopping.wait()
    queue.stop()


def _process_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat", encoding="ascii") as file:
        fields = file.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS  # utime + stime


def _context_switches(pid: int) -> int:
    total = 0
    for path in glob.glob(f"/proc/{pid}/task/*/status"):
        try:
            with open(path, encoding="ascii") as file:
                total += sum(int(line.split()[1]) for line in file if "ctxt_switches" in line)
        except OSError:  # a thread that ended meanwhile
            pass
    return total


def _server_cpu(client: Any) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def measure(mode: str, jobs: int, threads: int) -> Dict[str, Any]:
    import redis

    from tinymq import Job

    directory = tempfile.mkdtemp(prefix="tinymq-cpu-split-")
    server = RedisServer(directory).start()
    workers: List[subprocess.Popen] = []
    try:
        client = redis.Redis.from_url(server.url, decode_responses=True)
        producer = _build_queue(server.url)
        if mode == "e2e":
            workers = [subprocess.Popen([sys.executable, __file__, "--worker", server.url, "--threads", str(threads)])
                       for _ in range(PROCESSES)]
            deadline = time.monotonic() + REGISTER_TIMEOUT
            while client.zcard(f"tmq:{{{QUEUE_NAME}}}:procs") < PROCESSES:
                if time.monotonic() > deadline:
                    raise RuntimeError("the worker processes did not register")
                time.sleep(DRAIN_POLL)
            time.sleep(SETTLE_PAUSE)
        batch = [Job("noop", k) for k in range(jobs)]
        client.config_resetstat()
        workers_before = [(_process_cpu(w.pid), _context_switches(w.pid)) for w in workers]
        server_before = _server_cpu(client)
        cpu_before, started = time.process_time(), time.perf_counter()
        if mode == "one":
            for job in batch:
                producer.enqueue(job)
        else:
            for first in range(0, jobs, BATCH):
                producer.enqueue_many(batch[first:first + BATCH])
        producer_cpu, enqueued = time.process_time() - cpu_before, time.perf_counter() - started
        own_calls = 3  # (the reply of CONFIG RESETSTAT, the INFO cpu before and after)
        if mode == "e2e":
            stats_key = f"tmq:{{{QUEUE_NAME}}}:stats"
            while True:
                own_calls += 1
                if int(client.hget(stats_key, "outstanding") or 0) <= 0:
                    break
                time.sleep(DRAIN_POLL)
        wall = time.perf_counter() - started
        workers_after = [(_process_cpu(w.pid), _context_switches(w.pid)) for w in workers]
        server_cpu = _server_cpu(client) - server_before
        stats = client.info("stats")
        commandstats = client.info("commandstats")
        evalsha = commandstats.get("cmdstat_evalsha", {})
        per_job = {
            "producer": producer_cpu / jobs * _US,
            "redis": server_cpu / jobs * _US,
            "workers": [(after[0] - before[0]) / jobs * _US for before, after in zip(workers_before, workers_after)],
        }
        return {
            "mode": mode, "jobs": jobs, "threads": threads if workers else 0,
            "jobs_per_s": jobs / wall, "enqueue_jobs_per_s": jobs / enqueued,
            "cpu_us_per_job": {**per_job, "total": per_job["producer"] + per_job["redis"] + sum(per_job["workers"])},
            "evalsha_us_per_job": evalsha.get("usec", 0) / jobs,
            "evalsha_calls": evalsha.get("calls", 0),
            "blpop_calls": commandstats.get("cmdstat_blpop", {}).get("calls", 0),
            "commands_per_job": (stats["total_commands_processed"] - own_calls) / jobs,
            "round_trips_per_job": (stats["total_writes_processed"] - own_calls) / jobs,
            "worker_context_switches_per_job": [(after[1] - before[1]) / jobs
                                                for before, after in zip(workers_before, workers_after)],
        }
    finally:
        for worker in workers:
            worker.terminate()
        for worker in workers:
            worker.wait(LEASE)
        server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", nargs="?", choices=("e2e", "many", "one"), default="e2e")
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--threads", type=int, default=4, help="worker threads per worker process")
    parser.add_argument("--worker", metavar="URL", help=argparse.SUPPRESS)  # a worker process of the e2e mode
    args = parser.parse_args()
    if args.worker:
        _worker(args.worker, args.threads)
        return 0
    print(json.dumps(measure(args.mode, args.jobs, args.threads)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
