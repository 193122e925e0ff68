"""A/B of two builds of tinymq on test_bench_redis.py's "enqueue->start latency, idle" case.

    python bench/redis_latency_ab.py DIR_A DIR_B [--pairs 8]

Not a benchmark of its own (pytest does not collect it). Each DIR is a source tree with its
compiled core in place (see builds_ab.py); each run is that tree's own case, tinymq's row only
(``pytest DIR/bench/test_bench_redis.py -k tinymq-latency``, ``PYTHONPATH=DIR``, its worker
processes too), against a fresh redis-server of its own (the bench starts one per run). A pair
runs A then B, the next pair B then A, so that neither build always runs first on a shared
host. Prints each run's p50 and p99 (each the median of the case's rounds), the median of each
build's, the median of the pairs' B/A ratios and how many pairs B was faster in, then one JSON
line with every run. The peers' venvs are looked for where the bench looks (``BENCH_VENVS``,
else DIR/.bench-venvs): only tinymq's row runs, but the bench's fixture checks them first.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from typing import Any, Dict, List


def _run(tree: str) -> Dict[str, float]:
    env = dict(os.environ, PYTHONPATH=tree)
    env.pop("TINYMQ_NO_EXTENSIONS", None)
    with tempfile.TemporaryDirectory() as cwd:  # not a checkout's tinymq, via the current directory
        out = os.path.join(cwd, "run.json")
        done = subprocess.run([sys.executable, "-m", "pytest", os.path.join(tree, "bench", "test_bench_redis.py"),
                               "-k", "tinymq-latency", "--benchmark-only", "-q", "-p", "no:cacheprovider",
                               f"--benchmark-json={out}"], env=env, cwd=cwd, capture_output=True, text=True,
                              check=False)
        if done.returncode:
            sys.exit(done.stdout[-3000:] + done.stderr[-3000:])
        with open(out, encoding="utf-8") as file:
            (row,) = json.load(file)["benchmarks"]
    metrics = row["extra_info"]["metrics"]
    return {"p50_us": metrics["p50_us"], "p99_us": metrics["p99_us"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--pairs", type=int, default=8)
    args = parser.parse_args()
    runs: Dict[str, List[Dict[str, float]]] = {"a": [], "b": []}
    for pair in range(args.pairs):
        for side in ("ab" if pair % 2 == 0 else "ba"):
            runs[side].append(_run(getattr(args, side)))
        a, b = runs["a"][-1], runs["b"][-1]
        print(f"pair {pair + 1}: p50 A {a['p50_us']:7.1f}  B {b['p50_us']:7.1f}   "
              f"p99 A {a['p99_us']:7.1f}  B {b['p99_us']:7.1f}", flush=True)
    report: Dict[str, Any] = {}
    for kind in ("p50_us", "p99_us"):
        a = [run[kind] for run in runs["a"]]
        b = [run[kind] for run in runs["b"]]
        report[kind] = {"a": statistics.median(a), "b": statistics.median(b),
                        "b_over_a": statistics.median([y / x for x, y in zip(a, b)]),
                        "pairs_b_lower": sum(y < x for x, y in zip(a, b))}
        row = report[kind]
        print(f"{kind:7} A {row['a']:8.1f}  B {row['b']:8.1f}   B/A median of pairs {row['b_over_a']:.3f}, "
              f"B lower in {row['pairs_b_lower']} of {args.pairs} pairs")
    print(json.dumps({"args": vars(args), "report": report, "runs": runs}))


if __name__ == "__main__":
    main()
