"""Where the durable cases' time goes, and the ceilings it implies (issue #10).

    python bench/durable_bounds.py

Not a benchmark of its own (pytest does not collect it): it runs the cases of
test_bench_durable.py with the store instrumented and prints, per job:

- wall: the measured time per job;
- cpu: the process's CPU time per job, all threads (on a shared, noisy machine the
  steadier figure: wall time counts the other tenants too);
- held: how long SQLite's one writer (our commit lock) was held. Writes are
  serial in SQLite, so 1 / held is a ceiling no thread layout can pass, short
  of committing more jobs per transaction;
- sqlite: the part of ``held`` spent inside sqlite3 calls (the GIL is released there);
- commits, units/commit: transactions per job, and callers' writes per transaction
  (group commit's batch size);
- blocked: the share of the commit lock's acquisitions that found it taken (writers that
  met at the lock: group commit can only batch those), and gap: the commit lock's idle time
  per job while a writer that was waiting for it wakes up to take it (a lock convoy);
- switches: context switches per job (voluntary + involuntary, all threads);
- writes: in the end to end cases, callers' writes per job by kind: save (enqueue),
  mark (an attempt starts), delete (a job succeeded), switch (a worker's delete and its
  next job's mark in one write).

Then the costs that bound what group commit can win on this machine: a
blocking hand-off between two threads (what each follower of a batch pays to
wait and be woken, in wall and in CPU time), the CPU time per job of the
commits themselves in batches of 1 and of PRODUCERS units (what a batch can
save, at most, per job: group commit pays only when that is more than a
hand-off's CPU), and the GIL-held Python time of one durable enqueue with
SQLite taken out (no number of producer threads can beat 1 / that).
"""
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Dict, List, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_bench_durable import PRODUCERS, WORKERS, _payloads  # noqa: E402

from tinymq import Config, Job, Queue, SQLitePersistence  # noqa: E402
from tinymq.persistence import sqlite as module  # noqa: E402

ROUNDS = 5
perf_counter = time.perf_counter


class _TimedLock:
    """The commit lock, timing how long it is held, counting the acquisitions that wait for it,
    and the time it stays free while a writer that waited for it wakes up to take it."""

    def __init__(self, figures: Dict[str, float]) -> None:
        self._lock = threading.RLock()  # (the store's is an RLock: _sections.owned asks it)
        self._figures = figures
        self._since = 0.0
        self._released = 0.0

    def __enter__(self) -> None:
        figures = self._figures
        figures["acquisitions"] += 1
        if not self._lock.acquire(False):
            waiting = perf_counter()
            self._lock.acquire()
            self._since = perf_counter()
            figures["blocked"] += 1
            if self._released > waiting:  # released while we waited: free until we got it
                figures["gap"] += self._since - self._released
            return
        self._since = perf_counter()

    def __exit__(self, *exc_info: object) -> None:
        self._released = perf_counter()
        self._figures["held"] += self._released - self._since
        self._lock.release()

    def _is_owned(self) -> bool:
        return bool(self._lock._is_owned())  # type: ignore[attr-defined]


_KINDS = {(module._SAVE_LEAN,): "save", (module._SAVE,): "save", (module._MARK_RUNNING,): "mark",
          (module._DELETE,): "delete", (module._DELETE, module._MARK_RUNNING): "switch"}


def _instrument(store: SQLitePersistence) -> Dict[str, float]:
    figures = dict.fromkeys(("held", "sqlite", "commits", "units", "acquisitions", "blocked", "gap")
                            + tuple(_KINDS.values()), 0.0)
    store._commit_lock = _TimedLock(figures)  # type: ignore[assignment]
    execute, commit = store._execute, store._commit

    def timed_execute(statements: Any) -> None:
        start = perf_counter()
        try:
            execute(statements)
        finally:
            figures["sqlite"] += perf_counter() - start

    def counted_commit(batch: List[Any]) -> None:
        figures["commits"] += 1
        figures["units"] += len(batch)
        for unit in batch:
            kind = _KINDS.get(tuple(sql for sql, _ in unit.statements))
            if kind is not None:
                figures[kind] += 1
        commit(batch)

    store._execute = timed_execute  # type: ignore[method-assign]
    store._commit = counted_commit  # type: ignore[method-assign]
    return figures


def _switches() -> int:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # every thread's, ended ones too
    return usage.ru_nvcsw + usage.ru_nivcsw


def _case(name: str, jobs: int, workers: int, producers: int, synchronous: str = "NORMAL") -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store = SQLitePersistence(os.path.join(tmp, "bounds.db"), synchronous=synchronous)
        queue = Queue(config=Config(buffer_size=10_000_000))
        queue.set_persistence(store)
        if workers:
            queue.register_executor("email", lambda job: None)
            queue.start_dispatcher(workers)
        figures = _instrument(store)
        rows = []
        for round_number in range(ROUNDS + 1):  # the first round warms up
            payloads = _payloads(jobs)
            for key in figures:
                figures[key] = 0.0
            switches, start, cpu = _switches(), perf_counter(), time.process_time()
            _produce(queue, payloads, producers)
            if workers:
                assert queue.join(120)
            wall = perf_counter() - start
            cpu = time.process_time() - cpu
            if round_number:
                rows.append((wall, cpu, dict(figures), _switches() - switches))
        queue.stop(wait=bool(workers))
        store.close()
    wall, _, figures, switches = sorted(rows, key=lambda row: row[0])[len(rows) // 2]  # the median round
    cpu = statistics.median(row[1] for row in rows)
    per_job = 1e6 / jobs
    print(f"{name:44s} {jobs / wall / 1e3:6.1f}k/s  wall {wall * per_job:5.1f}us  cpu {cpu * per_job:5.1f}us  "
          f"held {figures['held'] * per_job:5.1f}us (ceiling {jobs / figures['held'] / 1e3:5.1f}k/s)  "
          f"sqlite {figures['sqlite'] * per_job:5.1f}us  commits {figures['commits'] / jobs:4.2f}  "
          f"units/commit {figures['units'] / max(figures['commits'], 1):4.2f}  "
          f"blocked {figures['blocked'] / max(figures['acquisitions'], 1):4.0%}  "
          f"gap {figures['gap'] * per_job:4.1f}us  "
          f"switches {switches / jobs:4.2f}")
    if workers:
        print(" " * 46 + "writes per job: " + "  ".join(f"{kind} {figures[kind] / jobs:4.2f}"
                                                       for kind in dict.fromkeys(_KINDS.values())))


def _produce(queue: Queue, payloads: List[dict], producers: int) -> None:
    enqueue = queue.enqueue
    if producers == 1:
        for payload in payloads:
            enqueue(Job("email", payload))
        return
    barrier = threading.Barrier(producers)

    def produce(share: List[dict]) -> None:
        barrier.wait()
        for payload in share:
            enqueue(Job("email", payload))

    threads = [threading.Thread(target=produce, args=(payloads[k::producers],)) for k in range(producers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def _hand_off_cost(rounds: int = 20_000) -> Tuple[float, float]:
    """Microseconds of wall and of CPU time (both threads) per blocking hand-off between two
    threads (a Lock ping-pong, one way)."""
    ping, pong = threading.Lock(), threading.Lock()
    ping.acquire()
    pong.acquire()

    def other() -> None:
        for _ in range(rounds):
            ping.acquire()
            pong.release()

    thread = threading.Thread(target=other)
    thread.start()
    start, cpu = perf_counter(), time.process_time()
    for _ in range(rounds):
        ping.release()
        pong.acquire()
    elapsed, cpu = perf_counter() - start, time.process_time() - cpu
    thread.join()
    return elapsed / (2 * rounds) * 1e6, cpu / (2 * rounds) * 1e6


def _commit_cpu(batch: int, jobs: int = 4000) -> float:
    """CPU microseconds per job of the store's commits alone (no Queue, no other thread), ``batch``
    saves per transaction, as group commit merges them."""
    with tempfile.TemporaryDirectory() as tmp:
        store = SQLitePersistence(os.path.join(tmp, "commits.db"))
        times = []
        for _ in range(3):
            units = [module._Unit([store._upsert(Job("email", payload))]) for payload in _payloads(jobs)]
            cpu = time.process_time()
            with store._commit_lock:
                for start in range(0, jobs, batch):
                    store._commit(units[start:start + batch])
            times.append(time.process_time() - cpu)
        store.close()
    return statistics.median(times) / jobs * 1e6


def _python_only_enqueue(jobs: int = 20_000) -> float:
    """Microseconds per durable enqueue with SQLite's calls taken out: the GIL-held part."""
    with tempfile.TemporaryDirectory() as tmp:
        store = SQLitePersistence(os.path.join(tmp, "python-only.db"))
        store._execute = lambda statements: None  # type: ignore[method-assign]
        queue = Queue(config=Config(buffer_size=10_000_000))
        queue.set_persistence(store)
        times = []
        for _ in range(3):
            payloads = _payloads(jobs)
            start = perf_counter()
            _produce(queue, payloads, 1)
            times.append(perf_counter() - start)
        queue.stop(wait=False)
        store.close()
    return statistics.median(times) / jobs * 1e6


def main() -> None:
    print(f"{os.cpu_count()} CPUs; per job, median of {ROUNDS} rounds")
    _case("durable enqueue, one producer", 1000, 0, 1)
    _case(f"durable enqueue, {PRODUCERS} producer threads", 1000, 0, PRODUCERS)
    _case(f"durable enqueue, {PRODUCERS} producer threads, 10k/round", 10_000, 0, PRODUCERS)
    _case("durable enqueue, one producer, FULL", 1000, 0, 1, "FULL")
    _case(f"durable enqueue, {PRODUCERS} producer threads, FULL", 1000, 0, PRODUCERS, "FULL")
    for workers in sorted({1, 2, WORKERS}):
        _case(f"durable end to end, {workers} workers", 10_000, workers, 1)
    wall, cpu = _hand_off_cost()
    print(f"blocking hand-off between two threads: {wall:.1f}us, CPU {cpu:.1f}us")
    one, grouped = _commit_cpu(1), _commit_cpu(PRODUCERS)
    print(f"commit CPU per job: {one:.1f}us alone, {grouped:.1f}us in batches of {PRODUCERS} "
          f"(a batch saves at most {one - grouped:.1f}us per job, its followers each pay a hand-off)")
    python_only = _python_only_enqueue()
    print(f"durable enqueue with SQLite taken out (GIL-held): {python_only:.1f}us "
          f"(ceiling {1e3 / python_only:.0f}k/s for any number of producer threads)")


if __name__ == "__main__":
    main()
