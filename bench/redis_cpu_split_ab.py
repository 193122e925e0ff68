"""A/B of two builds of tinymq on redis_cpu_split.py's CPU per job, the builds taking turns.

    python bench/redis_cpu_split_ab.py DIR_A DIR_B [--pairs 15] [--mode e2e] [--jobs 20000] [--threads 4]

Not a benchmark of its own (pytest does not collect it). Each DIR is a source tree with its
compiled core in place (see builds_ab.py); each run is ``DIR/bench/redis_cpu_split.py`` with
``PYTHONPATH=DIR``, its worker processes too. A pair runs A then B, the next pair B then A,
so that neither build always runs first on a shared host. Prints, per process kind, the
median CPU microseconds per job of each build and the median of the pairs' B/A ratios (and
so for the script calls per job), then one JSON line with every run.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from typing import Any, Dict, List


def _run(tree: str, mode: str, jobs: int, threads: int) -> Dict[str, float]:
    env = dict(os.environ, PYTHONPATH=tree)
    env.pop("TINYMQ_NO_EXTENSIONS", None)
    with tempfile.TemporaryDirectory() as cwd:  # not a checkout's tinymq, via the current directory
        done = subprocess.run([sys.executable, os.path.join(tree, "bench", "redis_cpu_split.py"), mode,
                               "--jobs", str(jobs), "--threads", str(threads)],
                              env=env, cwd=cwd, capture_output=True, text=True, check=False)
    if done.returncode:
        sys.exit(done.stderr.strip())
    measured = json.loads(done.stdout)
    cpu = measured["cpu_us_per_job"]
    return {"workers": sum(cpu["workers"]), "redis": cpu["redis"], "producer": cpu["producer"],
            "total": cpu["total"], "evalsha_per_job": measured["evalsha_calls"] / jobs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--pairs", type=int, default=15)
    parser.add_argument("--mode", choices=("e2e", "many", "one"), default="e2e")
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--threads", type=int, default=4)
    args = parser.parse_args()
    runs: Dict[str, List[Dict[str, float]]] = {"a": [], "b": []}
    for pair in range(args.pairs):
        for side in ("ab" if pair % 2 == 0 else "ba"):
            runs[side].append(_run(getattr(args, side), args.mode, args.jobs, args.threads))
    report: Dict[str, Any] = {}
    for kind in ("workers", "redis", "producer", "total", "evalsha_per_job"):
        a = [run[kind] for run in runs["a"]]
        b = [run[kind] for run in runs["b"]]
        ratios = [y / x for x, y in zip(a, b) if x]
        report[kind] = {"a": statistics.median(a), "b": statistics.median(b),
                        "b_over_a": statistics.median(ratios) if ratios else None}
        ratio = report[kind]["b_over_a"]  # (None: A measured none of it, as workers in --mode one)
        print(f"{kind:15} A {report[kind]['a']:8.3f}  B {report[kind]['b']:8.3f}   "
              f"B/A median of pairs {'-' if ratio is None else format(ratio, '.3f')}")
    print(json.dumps({"args": vars(args), "report": report, "runs": runs}))


if __name__ == "__main__":
    main()
