"""A/B of two source trees: the per-job cost of async no-op executors, in fresh interpreters.

    python bench/async_noop_ab.py OLD_TREE NEW_TREE [--pairs 15] [--jobs 20000] [--pure]

Not a benchmark of its own (pytest does not collect it). Each round is a fresh
interpreter with one tree first on ``sys.path`` (its compiled core, unless
``--pure``): a queue of 2 workers, ``async def`` no-op executors, N jobs enqueued
one by one then ``join()``, twice (the first round warms up); then the same with
a plain callable that returns the coroutine (``lambda job: noop(job)``, whose
later attempts are called on the loop). The trees take turns, so the other
tenants of a shared machine load both alike. It prints, per tree and case, the
median of the rounds' CPU time per job (all threads) and wall time per job, and
the ratio of medians NEW / OLD.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

_ROUND = r"""
import json, sys, time
from tinymq import Config, Job, Queue
jobs = int(sys.argv[1])

async def noop(job):
    pass

figures = {}
for case, fn in (("async def", noop), ("callable returning a coroutine", lambda job: noop(job))):
    queue = Queue(config=Config(buffer_size=10_000_000))
    queue.register_executor("t", fn)
    queue.start_dispatcher(2)
    for round_number in range(2):
        cpu, wall = time.process_time(), time.perf_counter()
        for _ in range(jobs):
            queue.enqueue(Job("t"))
        assert queue.join(120)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    queue.stop()
    figures[case] = (cpu / jobs * 1e6, wall / jobs * 1e6)
print(json.dumps(figures))
"""


def _round(tree: str, jobs: int, pure: bool) -> dict:
    env = dict(os.environ, PYTHONPATH=tree)
    env.pop("TINYMQ_NO_EXTENSIONS", None)
    if pure:
        env["TINYMQ_NO_EXTENSIONS"] = "1"
    out = subprocess.run([sys.executable, "-c", _ROUND, str(jobs)], env=env, cwd=tree, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--pairs", type=int, default=15)
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--pure", action="store_true")
    args = parser.parse_args()
    trees = {"old": os.path.abspath(args.old), "new": os.path.abspath(args.new)}
    rounds: dict = {name: [] for name in trees}
    for pair in range(args.pairs):
        for name in (("old", "new") if pair % 2 == 0 else ("new", "old")):
            rounds[name].append(_round(trees[name], args.jobs, args.pure))
    for case in rounds["old"][0]:
        medians = {}
        for name in trees:
            cpu = statistics.median(r[case][0] for r in rounds[name])
            wall = statistics.median(r[case][1] for r in rounds[name])
            medians[name] = (cpu, wall)
            print(f"{case:32} {name}: cpu {cpu:6.2f} us/job  wall {wall:6.2f} us/job")
        print(f"{case:32} new/old: cpu {medians['new'][0] / medians['old'][0]:.3f}  "
              f"wall {medians['new'][1] / medians['old'][1]:.3f}")


if __name__ == "__main__":
    main()
