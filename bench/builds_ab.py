"""A/B of two builds of tinymq: the no-op end-to-end rate, the builds taking turns.

    python bench/builds_ab.py DIR_A DIR_B [--rounds 5] [--runs 5] [--jobs 200000]

Not a benchmark of its own (pytest does not collect it). Each DIR is a source tree with
its compiled core built in place, for instance:

    git archive a342bfb^ | tar -x -C /tmp/before
    (cd /tmp/before && python setup.py build_ext --inplace)

Each round runs each build in a fresh interpreter (``PYTHONPATH=DIR``; the child checks
that it imported that tree's compiled core): ``--jobs`` no-op jobs enqueued one by one
into a queue with 4 worker threads, then ``join()``, ``--runs`` times, and reports the
median rate. Taking turns keeps the machine's mood from deciding the comparison. This is
how the per-type counters' cost (issue #14: "≥ 95% of the rate before them") and
the garbage-collector change of the compiled core were measured.
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from typing import Dict, List

CHILD = """
import statistics, sys, time
import tinymq
from tinymq import Config, Job, Queue
tree, n, runs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
if not (tinymq.HAS_EXTENSION and tinymq.__file__.startswith(tree)):
    sys.exit(f"{tree}: its compiled core was not imported ({tinymq.__file__}, HAS_EXTENSION={tinymq.HAS_EXTENSION})")
rates = []
for _ in range(runs):
    q = Queue(config=Config(buffer_size=10**7))
    q.register_executor("noop", lambda job: None)
    q.start_dispatcher(4)
    began = time.perf_counter()
    for i in range(n):
        q.enqueue(Job("noop", i))
    assert q.join(300)
    rates.append(n / (time.perf_counter() - began))
    q.stop()
print(statistics.median(rates))
"""


def _rate(tree: str, jobs: int, runs: int) -> float:
    env = dict(os.environ, PYTHONPATH=tree)
    env.pop("TINYMQ_NO_EXTENSIONS", None)
    with tempfile.TemporaryDirectory() as cwd:  # not the checkout's tinymq, via sys.path[0]
        done = subprocess.run([sys.executable, "-c", CHILD, tree, str(jobs), str(runs)], env=env, cwd=cwd,
                              capture_output=True, text=True, check=False)
    if done.returncode:
        sys.exit(done.stderr.strip())
    return float(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("trees", nargs=2, metavar="DIR")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--jobs", type=int, default=200_000)
    args = parser.parse_args()
    trees = [os.path.abspath(tree) + os.sep for tree in args.trees]
    rates: Dict[str, List[float]] = {tree: [] for tree in trees}
    for round_ in range(1, args.rounds + 1):
        for tree in trees:
            rates[tree].append(_rate(tree, args.jobs, args.runs))
        print(f"round {round_}: " + "  ".join(f"{rates[t][-1] / 1e3:.0f}k/s" for t in trees), flush=True)
    medians = [statistics.median(rates[tree]) for tree in trees]
    for tree, median in zip(trees, medians):
        print(f"{tree}: median {median / 1e3:.1f}k jobs/s")
    print(f"B / A: {medians[1] / medians[0]:.3f}")


if __name__ == "__main__":
    main()
