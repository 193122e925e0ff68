"""Why the threads of a durable case sleep: each context switch, classified by its native stack.

    python bench/durable_sleeps.py [--contender tinymq|persist-queue] [--producers 4]
                                   [--workers 0] [--rounds 4] [--synchronous NORMAL|FULL]

Not a benchmark of its own (pytest does not collect it). It runs the durable enqueue
case of test_bench_durable.py (1,000 single enqueues a round from ``--producers``
threads, no worker; persist-queue's ``SQLiteAckQueue.put`` for ``--contender
persist-queue``; with ``--workers N``, tinymq only, the end to end case's shape: the
jobs run by N workers, ``join()`` ending the round) under ``perf record -e sched:sched_switch --call-graph dwarf``
(Linux perf, allowed to trace: root, or ``kernel.perf_event_paranoid`` low enough),
and sorts every switch away from one of the case's threads by what the thread was
doing (switches per job):

- lock: asleep in a ``threading`` lock's acquire (tinymq's commit lock, an RLock;
  persist-queue's transaction lock); a writer woken by a release that finds the lock
  taken again (by a thread that came back first) sleeps once more, so a blocked
  acquisition can cost more than one;
- GIL after a lock: woken with the lock, asleep again waiting for the GIL;
- GIL around SQLite: waiting for the GIL back after a call into sqlite3 that released it;
- GIL after other: after another call that released it (thread start, join);
- preempted, I/O, other: the scheduler took the CPU, a write waited for the disk, the rest.

Each sleep costs a wake-up, and on a VM whose idle vCPUs halt a wake-up from another
CPU costs tens of microseconds (``python bench/durable_bounds.py`` prints a blocking
hand-off's cost): this says which waits a design should avoid.
"""
import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Dict, List, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_bench_durable import _payloads  # noqa: E402

JOBS = 1000


def _enqueuer(contender: str, directory: str, synchronous: str, workers: int) -> Tuple[Callable[[dict], Any],
                                                                                     Callable[[], Any]]:
    """(enqueue one payload, wait until the round's jobs are done)."""
    if contender == "tinymq":
        from tinymq import Config, Job, Queue, SQLitePersistence
        store = SQLitePersistence(os.path.join(directory, "sleeps.db"), synchronous=synchronous)
        queue = Queue(config=Config(buffer_size=10_000_000))
        queue.set_persistence(store)
        if workers:
            queue.register_executor("email", lambda job: None)
            queue.start_dispatcher(workers)
        return (lambda payload: queue.enqueue(Job("email", payload))), (lambda: workers and queue.join(120))
    import persistqueue
    pq = persistqueue.SQLiteAckQueue(os.path.join(directory, "pq"), auto_commit=True, multithreading=True)
    for conn in (pq._getter, pq._putter):  # as test_bench_durable.py sets it
        conn.execute(f"PRAGMA synchronous={synchronous}")
    return pq.put, lambda: None


def _child(contender: str, producers: int, workers: int, rounds: int, synchronous: str) -> None:
    with tempfile.TemporaryDirectory() as directory:
        enqueue, finish = _enqueuer(contender, directory, synchronous, workers)
        walls = []
        for _ in range(rounds):
            payloads = _payloads(JOBS)
            barrier = threading.Barrier(producers)

            def produce(share: List[dict]) -> None:
                barrier.wait()
                for payload in share:
                    enqueue(payload)

            threads = [threading.Thread(target=produce, args=(payloads[k::producers],)) for k in range(producers)]
            start = time.perf_counter()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            finish()
            walls.append((time.perf_counter() - start) / JOBS * 1e6)
        print(f"wall per job under perf (slower than without): {', '.join(f'{w:.0f}' for w in walls)} us",
              file=sys.stderr)


def _kind(frames: List[str]) -> str:
    if "take_gil" in frames:
        after = frames[frames.index("take_gil") + 1:]
        if "acquire_timed" in after[:6]:
            return "GIL after a lock"
        if any("sqlite" in frame or frame == "stmt_step" for frame in after[:6]):
            return "GIL around SQLite"
        return "GIL after other"
    if "PyThread_acquire_lock_timed" in frames:
        return "lock"
    if any(frame in ("exit_to_user_mode_loop", "irqentry_exit_to_user_mode") for frame in frames[:6]):
        return "preempted"
    if any(frame.startswith("io_schedule") for frame in frames[:6]):
        return "I/O"
    return "other"


def _classify(data: str) -> Dict[str, int]:
    script = subprocess.run(["perf", "script", "-i", data, "-F", "comm,event,trace,ip,sym"],
                            capture_output=True, text=True, check=True).stdout
    counts: Dict[str, int] = collections.Counter()
    for block in script.split("\n\n"):
        lines = block.strip().splitlines()
        if not lines or "prev_comm=python" not in lines[0]:
            continue
        frames = [line.split(None, 1)[1].split(" (")[0].split("+")[0] for line in lines[1:] if " " in line.strip()]
        counts[_kind(frames)] += 1
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--contender", choices=("tinymq", "persist-queue"), default="tinymq")
    parser.add_argument("--producers", type=int, default=4)
    parser.add_argument("--workers", type=int, default=0, help="tinymq only: workers that run the jobs")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--synchronous", choices=("NORMAL", "FULL"), default="NORMAL")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.workers and args.contender != "tinymq":
        sys.exit("--workers runs tinymq's end to end case only")
    if args.child:
        _child(args.contender, args.producers, args.workers, args.rounds, args.synchronous)
        return
    if shutil.which("perf") is None:
        sys.exit("durable_sleeps.py needs Linux perf (the perf command)")
    with tempfile.TemporaryDirectory() as directory:
        data = os.path.join(directory, "sched.data")
        child = [sys.executable, os.path.abspath(__file__), "--child", "--contender", args.contender,
                 "--producers", str(args.producers), "--workers", str(args.workers), "--rounds", str(args.rounds),
                 "--synchronous", args.synchronous]
        subprocess.run(["perf", "record", "-q", "-e", "sched:sched_switch", "--call-graph", "dwarf",
                        "-o", data, "--"] + child, check=True)
        counts = _classify(data)
    jobs = JOBS * args.rounds
    total = sum(counts.values())
    print(f"{args.contender}, {args.producers} producer threads, {args.workers} workers, "
          f"synchronous={args.synchronous}: "
          f"{total / jobs:.2f} switches per job")
    for kind in ("lock", "GIL after a lock", "GIL around SQLite", "GIL after other", "preempted", "I/O", "other"):
        print(f"  {kind:18s} {counts.get(kind, 0) / jobs:5.2f}")


if __name__ == "__main__":
    main()
