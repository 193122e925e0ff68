"""A/B in one process: durable end to end with and without ``delete_and_mark_running``.

    python bench/durable_switch_ab.py [--workers 4] [--pairs 4] [--jobs 10000]

Not a benchmark of its own (pytest does not collect it). Runs tinymq's durable end
to end case of test_bench_durable.py (enqueue N no-op jobs one by one, 4 workers,
``join()``, ``synchronous="NORMAL"``) alternately in two variants, in one process:

- A: the store's ``delete_and_mark_running`` hidden, so a worker deletes a finished
  job and marks its next one running in two commits;
- B: the store as shipped: one commit for both when the worker has a next job ready.

It prints, per variant, the medians over the rounds of the process's CPU time per
job (all threads; on a shared machine the steadier figure), wall time per job and
voluntary context switches per job. Alternating the variants, and quoting CPU
time, keeps the other tenants of a noisy machine from deciding the comparison.
"""
import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from typing import Dict, List, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_bench_durable import _payloads  # noqa: E402

from tinymq import Config, Job, Queue, SQLitePersistence  # noqa: E402

ROUNDS = 3  # per queue, after one warm-up round
_SWITCH = SQLitePersistence.delete_and_mark_running


def _rounds(variant: str, workers: int, jobs: int) -> List[Tuple[float, float, float]]:
    """(cpu us/job, wall us/job, voluntary switches/job) of ROUNDS rounds on a fresh store."""
    if variant == "A":
        del SQLitePersistence.delete_and_mark_running  # the dispatcher looks for it at set_persistence
    try:
        with tempfile.TemporaryDirectory() as tmp:
            store = SQLitePersistence(os.path.join(tmp, "ab.db"))
            queue = Queue(config=Config(buffer_size=10_000_000))
            queue.set_persistence(store)
            queue.register_executor("email", lambda job: None)
            queue.start_dispatcher(workers)
            figures = []
            for round_number in range(ROUNDS + 1):
                payloads = _payloads(jobs)
                switches = resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw
                cpu, wall = time.process_time(), time.perf_counter()
                for payload in payloads:
                    queue.enqueue(Job("email", payload))
                assert queue.join(120)
                cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
                switches = resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw - switches
                if round_number:
                    figures.append((cpu / jobs * 1e6, wall / jobs * 1e6, switches / jobs))
            queue.stop()
            assert sum(store.counts().values()) == 0
            store.close()
    finally:
        SQLitePersistence.delete_and_mark_running = _SWITCH  # type: ignore[method-assign]
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--pairs", type=int, default=4, help="A/B pairs, in alternating order")
    parser.add_argument("--jobs", type=int, default=10_000, help="jobs per round")
    args = parser.parse_args()
    results: Dict[str, List[Tuple[float, float, float]]] = {"A": [], "B": []}
    for pair in range(args.pairs):
        for variant in ("A", "B") if pair % 2 == 0 else ("B", "A"):
            results[variant] += _rounds(variant, args.workers, args.jobs)
    print(f"{os.cpu_count()} CPUs; durable end to end, {args.workers} workers, {args.jobs} jobs per round; "
          f"medians of {ROUNDS * args.pairs} rounds per variant")
    for variant, name in (("A", "delete and mark_running apart"), ("B", "delete_and_mark_running")):
        cpu, wall, switches = (statistics.median(row[i] for row in results[variant]) for i in range(3))
        print(f"{variant} {name:32s} cpu {cpu:6.1f}us/job  wall {wall:6.1f}us/job ({1e3 / wall:5.1f}k jobs/s)  "
              f"voluntary switches {switches:4.2f}/job")


if __name__ == "__main__":
    main()
