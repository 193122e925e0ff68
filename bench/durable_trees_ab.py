"""A/B of two checkouts of tinymq on the durable cases, each run in a fresh interpreter, taking turns.

    python bench/durable_trees_ab.py OLD_TREE NEW_TREE [--pairs 8]
                                     [--synchronous NORMAL|FULL] [--case enqueue|four|e2e|both]

Not a benchmark of its own (pytest does not collect it). Each turn starts a new
interpreter with ``PYTHONPATH`` set to one tree (its compiled core, if built,
is used) and runs one case of test_bench_durable.py on a fresh store:

- enqueue: ``Queue.enqueue`` of 1,000 no-op jobs one by one, one producer thread,
  no worker (the cost of making a job durable);
- four: the same 1,000 enqueues from 4 producer threads at once (group commit);
- e2e: enqueue 10,000 jobs and run them with 4 workers, ``join()``.

The store runs at ``--synchronous`` (NORMAL by default; FULL: an fsync per
commit). A turn reports the medians of its rounds (after one warm-up round) of
wall time and of the process's CPU time per job, and its wall time per job over
every round, the warm-up too ("all": what the first rounds after an open cost
shows there, such as the -wal's first fill); the trees alternate (A B, B A, ...) so
that the other tenants of a shared machine weigh on both alike. The report
gives, per tree and case, the median over the turns, and B's change against A (and
each pair's, to see whether it holds from pair to pair).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
from typing import Dict, List

CHILD = r"""
import json, os, statistics, sys, tempfile, threading, time
from tinymq import Config, Job, Queue, SQLitePersistence
case, rounds, synchronous = sys.argv[1], int(sys.argv[2]), sys.argv[3]
jobs = 10_000 if case == "e2e" else 1000
with tempfile.TemporaryDirectory() as tmp:
    store = SQLitePersistence(os.path.join(tmp, "ab.db"), synchronous=synchronous)
    queue = Queue(config=Config(buffer_size=10_000_000))
    queue.set_persistence(store)
    if case == "e2e":
        queue.register_executor("email", lambda job: None)
        queue.start_dispatcher(4)
    walls, cpus, every = [], [], []
    for number in range(rounds + 1):
        payloads = [{"to": f"user{number}-{i}@example.com", "template": "welcome", "n": i} for i in range(jobs)]
        cpu, wall = time.process_time(), time.perf_counter()
        if case == "four":
            barrier = threading.Barrier(4)
            def produce(share):
                barrier.wait()
                for payload in share:
                    queue.enqueue(Job("email", payload))
            threads = [threading.Thread(target=produce, args=(payloads[k::4],)) for k in range(4)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        else:
            for payload in payloads:
                queue.enqueue(Job("email", payload))
        if case == "e2e":
            assert queue.join(120)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        every.append(wall)
        if number:
            walls.append(wall / jobs * 1e6)
            cpus.append(cpu / jobs * 1e6)
    queue.stop(wait=False)
    store.close()
print(json.dumps({"wall": statistics.median(walls), "cpu": statistics.median(cpus),
                  "all": sum(every) / (jobs * len(every)) * 1e6}))
"""
ROUNDS = {"enqueue": 10, "four": 10, "e2e": 3}


def _turn(tree: str, case: str, synchronous: str) -> Dict[str, float]:
    env = dict(os.environ, PYTHONPATH=os.path.abspath(tree))
    done = subprocess.run([sys.executable, "-c", CHILD, case, str(ROUNDS[case]), synchronous], env=env,
                          cwd=os.path.abspath(tree),
                          capture_output=True, text=True, check=True, timeout=600)
    figures: Dict[str, float] = json.loads(done.stdout)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--pairs", type=int, default=8, help="A/B pairs per case, in alternating order")
    parser.add_argument("--case", choices=("enqueue", "four", "e2e", "both"), default="both")
    parser.add_argument("--synchronous", choices=("NORMAL", "FULL"), default="NORMAL",
                        help="the stores' PRAGMA synchronous")
    args = parser.parse_args()
    cases = ["enqueue", "e2e"] if args.case == "both" else [args.case]
    print(f"{os.cpu_count()} CPUs; A = {args.old}, B = {args.new}; synchronous={args.synchronous}; medians of "
          f"{args.pairs} turns each, each turn the median of its rounds (all: the mean of every round), per job")
    for case in cases:
        results: Dict[str, List[Dict[str, float]]] = {"A": [], "B": []}
        for pair in range(args.pairs):
            for tree in ("A", "B") if pair % 2 == 0 else ("B", "A"):
                results[tree].append(_turn(args.old if tree == "A" else args.new, case, args.synchronous))
        kinds = ("wall", "cpu", "all")
        medians = {tree: {kind: statistics.median(turn[kind] for turn in turns) for kind in kinds}
                   for tree, turns in results.items()}
        for kind in kinds:
            a, b = medians["A"][kind], medians["B"][kind]
            pairs = " ".join(f"{tb[kind] / ta[kind] - 1:+.0%}" for ta, tb in zip(results["A"], results["B"]))
            print(f"{case:8s} {kind:4s}  A {a:7.2f} us  B {b:7.2f} us  B/A {b / a - 1:+6.1%}   pairs: {pairs}")


if __name__ == "__main__":
    main()
