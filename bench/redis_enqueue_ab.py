"""A/B of two builds of tinymq on issue #12's producer cases, the builds taking turns.

    python bench/redis_enqueue_ab.py DIR_A DIR_B [--pairs 10] [--jobs 2000] [--many-jobs 20000] [--rounds 5]
                                     [--hide-hiredis a|b] [--placement one-cpu|two-cpus|free]

Not a benchmark of its own (pytest does not collect it). Each DIR is a source tree with its
compiled core in place (see builds_ab.py). A run is this file in ``--child`` mode with
``PYTHONPATH=DIR``: a fresh interpreter that starts its own test redis-server (DIR's
tests/_redis_server.py: ``appendonly yes``, ``appendfsync everysec``, in ``/dev/shm`` when there
is one) and measures, as ``test_bench_redis.py`` does (the same Queue: buffer_size 10,000,000,
max_delayed_jobs 0, one thread, no worker, the jobs made inside the timed loop), ``--rounds``
rounds of each case after one warm-up round: ``enqueue`` of one job per call (``--jobs`` a round)
and ``enqueue_many(100)`` (``--many-jobs`` a round); a run's figures are its median round's
jobs/s (wall clock) and, less hit by other programs' load, CPU microseconds per job: the
producer's (``time.process_time``) plus the server's (``INFO cpu``, its threads and all). A
pair runs A then B, the next pair B then A, so that neither build always runs first on a
shared host. Prints, per figure, the median of each build and the median of the pairs' B/A
ratios, then one JSON line with every run. ``--hide-hiredis a`` (or ``b``) runs that side as if
hiredis were not installed (a ``hiredis`` package that raises ImportError, first on its path):
redis-py's own packing and parsing, as a user without it gets (DIR_A and DIR_B may be one tree).
``--placement`` (``one-cpu`` by default) puts the run's producer thread and its server's main
thread on one CPU, as ``test_bench_redis.py`` does for these cases (its ``one_cpu``: on this
host, whose idle vCPUs halt, a reply to the other CPU costs ~40-50 us more, and left free the
scheduler picks one CPU or two run by run: 7k or 14k/s for one build); ``two-cpus`` on two,
``free`` leaves them to the scheduler.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Tuple

BATCH = 100
BUFFER_SIZE = 10_000_000  # never QueueFull
LEASE = 30.0  # as the bench's producer
CASES = ("enqueue", f"enqueue_many_{BATCH}")


def _place(server_pid: int, placement: str) -> None:
    """This thread and the server's main thread on one CPU, on two, or left free (see --placement)."""
    if placement == "free":
        return
    cpus = sorted(os.sched_getaffinity(0))
    if placement == "two-cpus" and len(cpus) < 2:
        sys.exit(f"--placement two-cpus: this process may use only CPU {cpus[0]}")
    os.sched_setaffinity(0, {cpus[0]})
    os.sched_setaffinity(server_pid, {cpus[1] if placement == "two-cpus" else cpus[0]})


def _child(jobs: int, many_jobs: int, rounds: int, placement: str) -> None:
    sys.path.insert(0, os.path.join(os.environ["TINYMQ_AB_TREE"], "tests"))
    import redis
    from _redis_server import RedisServer

    from tinymq import Config, Job, Queue
    from tinymq.redis import RedisBroker

    directory = tempfile.mkdtemp(prefix="tinymq-enqueue-ab-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    server = RedisServer(directory).start()
    try:
        assert server.process is not None
        _place(server.process.pid, placement)
        queue = Queue(config=Config(buffer_size=BUFFER_SIZE, max_delayed_jobs=0),
                      broker=RedisBroker(server.url, name="enqueue-ab", lease=LEASE))
        queue.register_executor("noop", lambda job: None)
        client = redis.Redis.from_url(server.url)
        next_index = [0]

        def server_cpu() -> float:
            info = client.info("cpu")
            return float(info["used_cpu_user"] + info["used_cpu_sys"])

        def one_by_one(start_index: int) -> None:
            for index in range(start_index, start_index + jobs):
                queue.enqueue(Job("noop", index))

        def in_batches(start_index: int) -> None:
            for first in range(start_index, start_index + many_jobs, BATCH):
                queue.enqueue_many([Job("noop", index) for index in range(first, first + BATCH)])

        def measure(send: Callable[[int], None], n: int) -> Tuple[float, float]:
            start_index = next_index[0]
            next_index[0] += n
            cpu = time.process_time() + server_cpu()
            start = time.perf_counter()
            send(start_index)
            wall = time.perf_counter() - start
            return n / wall, (time.process_time() + server_cpu() - cpu) * 1e6 / n

        figures = {}
        for case, send, n in zip(CASES, (one_by_one, in_batches), (jobs, many_jobs)):
            measure(send, n)  # warm-up round
            measured = [measure(send, n) for _ in range(rounds)]
            figures[case] = statistics.median(rate for rate, _ in measured)
            figures[f"{case}_cpu_us"] = statistics.median(cpu for _, cpu in measured)
        client.close()
        from tinymq.redis import _scripts

        figures["hiredis"] = float(getattr(_scripts, "_pack_command", None) is not None)  # (which path ran)
        queue.stop(wait=False)
        print(json.dumps(figures))
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


def _run(tree: str, args: argparse.Namespace, hidden: str) -> Dict[str, float]:
    tree = os.path.abspath(tree)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (hidden, tree))), TINYMQ_AB_TREE=tree)
    env.pop("TINYMQ_NO_EXTENSIONS", None)
    with tempfile.TemporaryDirectory() as cwd:  # not a checkout's tinymq, via the current directory
        done = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", "--jobs", str(args.jobs),
                               "--many-jobs", str(args.many_jobs), "--rounds", str(args.rounds),
                               "--placement", args.placement],
                              env=env, cwd=cwd, capture_output=True, text=True, check=False)
    if done.returncode:
        sys.exit(done.stderr.strip())
    figures: Dict[str, float] = json.loads(done.stdout)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("a", nargs="?")
    parser.add_argument("b", nargs="?")
    parser.add_argument("--pairs", type=int, default=10)
    parser.add_argument("--jobs", type=int, default=2_000, help="enqueue: jobs a round (default 2000, as the bench)")
    parser.add_argument("--many-jobs", type=int, default=20_000,
                        help=f"enqueue_many({BATCH}): jobs a round (default 20000, as the bench)")
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds a run (default 5)")
    parser.add_argument("--hide-hiredis", choices=("a", "b"), help="run that side without hiredis")
    parser.add_argument("--placement", choices=("one-cpu", "two-cpus", "free"), default="one-cpu",
                        help="the producer and the server on one CPU (default), on two, or left to the scheduler")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.many_jobs % BATCH:
        parser.error(f"--many-jobs must be a multiple of {BATCH}")
    if args.child:
        _child(args.jobs, args.many_jobs, args.rounds, args.placement)
        return
    if not (args.a and args.b):
        parser.error("give two source trees, DIR_A and DIR_B")
    runs: Dict[str, List[Dict[str, float]]] = {"a": [], "b": []}
    with tempfile.TemporaryDirectory() as hidden:
        os.mkdir(os.path.join(hidden, "hiredis"))
        with open(os.path.join(hidden, "hiredis", "__init__.py"), "w", encoding="utf-8") as stub:
            stub.write('raise ImportError("hidden by redis_enqueue_ab.py --hide-hiredis")\n')
        for pair in range(args.pairs):
            for side in ("ab" if pair % 2 == 0 else "ba"):
                runs[side].append(_run(getattr(args, side), args, hidden if args.hide_hiredis == side else ""))
    report: Dict[str, Any] = {}
    for case in (figure for case in CASES for figure in (case, f"{case}_cpu_us")):
        a = [run[case] for run in runs["a"]]
        b = [run[case] for run in runs["b"]]
        report[case] = {"a": statistics.median(a), "b": statistics.median(b),
                        "b_over_a": statistics.median(y / x for x, y in zip(a, b))}
        unit = "CPU us/job" if case.endswith("_cpu_us") else "jobs/s"
        print(f"{case:25} A {report[case]['a']:10.2f}  B {report[case]['b']:10.2f} {unit:10}  "
              f"B/A median of pairs {report[case]['b_over_a']:.3f}")
    print(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "child"}, "report": report, "runs": runs}))


if __name__ == "__main__":
    main()
