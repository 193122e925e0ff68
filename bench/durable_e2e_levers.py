"""A/B in one process: the durable end to end case with the store changed in one way or another.

    python bench/durable_e2e_levers.py [--variants shipped,nomark,...] [--passes 4] [--rounds 3]
                                       [--jobs 10000] [--workers 4]

Not a benchmark of its own (pytest does not collect it). Issue #10 asks the durable
end to end case (enqueue, run, delete; 4 workers; ``synchronous="NORMAL"``) for 5x
huey's SqliteHuey and persist-queue. This runs tinymq's side of it in one process,
in passes: each pass starts a queue on a fresh store per variant, then runs one round
of each in turn, a few times (the order reversed every other turn; an idle queue's
threads sleep), so that the machine's mood hits every variant alike. It prints per
variant the medians over the rounds of wall time, the process's CPU time (all
threads) and context switches (voluntary and involuntary), per job, and the median
over the turns of each one's ratio to shipped's round of the same turn. ``shipped2``
is shipped again: how far two runs of one store differ.

Levers (each keeps the store's durability and its file format):

- shipped: the store as it is;
- switch2: a worker's delete and its next job's running mark as two autocommit
  statements (no BEGIN and COMMIT: 2 calls into SQLite instead of 4, but 2 commits);
- trigger: the same two writes as one statement, an INSERT into a TEMP view whose
  INSTEAD OF trigger deletes and marks (one call, one commit; nothing on disk);
- piggyback: a worker's write waits (at most ``PIGGYBACK_WINDOW``) for the next commit of
  any thread, the producer's, to carry it, and leads one itself when none came;
- checkpoint1k, checkpoint100k: ``PRAGMA wal_autocheckpoint`` at 1,000 or 100,000
  pages instead of the store's 10,000;
- cache: ``PRAGMA cache_size`` of 16 MiB instead of 2 MiB;
- mmap: ``PRAGMA mmap_size`` of 64 MiB.

Bounds (each breaks something: they say what a part costs, never what to ship):

- nomark: no running mark (a crash would no longer be counted: "crashed" needs it);
- exclusive: ``PRAGMA locking_mode=EXCLUSIVE``, SQLite's file locks held between
  transactions (read_only inspection by another process, ``status --db``, breaks);
- noworkerwrites: the workers write nothing (no delete, no mark);
- nosqlite: the store's statements are never run (the Queue's and store's Python only).

What it showed (2 CPUs shared with other tenants at load 5-6; 4 passes of 3 rounds;
medians of wall / CPU us per job, switches per job, and the turns' ratios to shipped):

    shipped          82 /  63   6.0
    shipped2         85 /  67   6.1   0.97 / 1.04   (the noise: two runs of one store)
    switch2          75 /  66   5.3   0.99 / 1.04
    trigger          83 /  71   6.5   1.02 / 0.98
    piggyback        89 /  75   7.6   1.09 / 1.20
    checkpoint1k     80 /  66   5.3   0.94 / 0.97
    checkpoint100k   98 /  80   5.7   1.08 / 1.14
    cache            87 /  75   5.7   1.02 / 1.00
    mmap            107 /  73   6.5   1.11 / 1.10
    nomark           73 /  60   8.3   0.83 / 0.99
    exclusive        87 /  70   7.0   0.88 / 0.96
    noworkerwrites   51 /  42   5.4   0.59 / 0.65
    nosqlite         10 /   9   0.0   0.12 / 0.14

(Earlier runs at load 1-2, shipped at 62-73 us per job, ranked them alike.) No lever
beats shipped by more than two runs of shipped differ, and piggyback loses: the
store keeps its design. Taking the running mark, or SQLite's file locks, out
altogether (the store cannot: see the bounds) would save a sixth of the wall time at
most and hardly any CPU; taking the workers' writes out altogether saves a third to
two fifths: what those writes cost is less their statements than the
hand-offs around them (a worker holds the commit lock while the producer waits for
it, and the GIL changes hands at every call into SQLite), and on this machine a
blocking hand-off costs about as much CPU as a commit (``python bench/durable_bounds.py``
prints both), so waiting to share a commit (piggyback) costs more than it saves.
"""
import argparse
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Dict, List, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_bench_durable import _payloads  # noqa: E402

from tinymq import Config, Job, Queue, SQLitePersistence  # noqa: E402
from tinymq.errors import PersistenceError  # noqa: E402
from tinymq.persistence import sqlite as module  # noqa: E402

PIGGYBACK_WINDOW = 0.0005  # seconds a worker's write waits for another thread's commit
_SWITCH_VIEW = f"""
CREATE TEMP VIEW IF NOT EXISTS tinymq_switch (finished, started) AS SELECT NULL, NULL;
CREATE TEMP TRIGGER IF NOT EXISTS tinymq_switch_do INSTEAD OF INSERT ON tinymq_switch BEGIN
  DELETE FROM {module._TABLE} WHERE id = NEW.finished;
  UPDATE {module._TABLE} SET state = 'running' WHERE id = NEW.started;
END;
"""
_SWITCH_INSERT = "INSERT INTO temp.tinymq_switch VALUES (?, ?)"


def _shipped(store: SQLitePersistence) -> None:
    pass


def _switch2(store: SQLitePersistence) -> None:
    execute = store._execute

    def two_autocommits(statements: List[Any]) -> None:
        if [sql for sql, _ in statements] == [module._DELETE, module._MARK_RUNNING]:
            for sql, parameters in statements:
                store._cursor.execute(sql, parameters)
            return
        execute(statements)

    store._execute = two_autocommits  # type: ignore[method-assign]


def _trigger(store: SQLitePersistence) -> None:
    with store._commit_lock:
        store._conn.execute("PRAGMA temp_store=MEMORY")
        store._conn.executescript(_SWITCH_VIEW)
    store.delete_and_mark_running = (  # type: ignore[method-assign]
        lambda job_id, job: store._write([(_SWITCH_INSERT, (job_id, job.id))]))


class _WaitingUnit(module._Unit):
    __slots__ = ("committed",)  # held until a batch with this unit committed


def _piggyback(store: SQLitePersistence) -> None:
    producer = threading.main_thread().ident
    write, commit = store._write, store._commit

    def commit_and_wake(batch: List[Any]) -> None:
        commit(batch)
        for unit in batch:
            if isinstance(unit, _WaitingUnit):
                unit.committed.release()

    def waiting_write(statements: List[Any]) -> None:
        if threading.get_ident() == producer:
            write(statements)
            return
        unit = _WaitingUnit(statements)
        unit.committed = threading.Lock()
        unit.committed.acquire()
        store._pending.append(unit)
        if not unit.committed.acquire(True, PIGGYBACK_WINDOW):
            with store._commit_lock:
                if not unit.done:
                    pending = store._pending
                    store._commit([pending.popleft() for _ in range(len(pending))])
        if not unit.done:
            raise PersistenceError(f"write failed: {unit.error}")

    store._commit = commit_and_wake  # type: ignore[method-assign]
    store._write = waiting_write  # type: ignore[method-assign]


def _pragma(sql: str) -> Callable[[SQLitePersistence], None]:
    def apply(store: SQLitePersistence) -> None:
        with store._commit_lock:
            store._conn.execute(sql)
    return apply


def _nomark(store: SQLitePersistence) -> None:
    store.delete_and_mark_running = lambda job_id, job: store.delete(job_id)  # type: ignore[method-assign]
    store.mark_running = lambda job: None  # type: ignore[method-assign]


def _exclusive(store: SQLitePersistence) -> None:
    with store._commit_lock:
        store._conn.execute("PRAGMA locking_mode=EXCLUSIVE")
        store._conn.execute(f"UPDATE {module._OWNER} SET pid = pid")  # takes the locks, kept from now on


def _no_worker_writes(store: SQLitePersistence) -> None:
    store.delete_and_mark_running = lambda job_id, job: None  # type: ignore[method-assign]
    store.mark_running = lambda job: None  # type: ignore[method-assign]
    store.delete = lambda job_id: None  # type: ignore[method-assign]


def _no_sqlite(store: SQLitePersistence) -> None:
    store._execute = lambda statements: None  # type: ignore[method-assign]


VARIANTS: Dict[str, Callable[[SQLitePersistence], None]] = {
    "shipped": _shipped,
    "shipped2": _shipped,
    "switch2": _switch2,
    "trigger": _trigger,
    "piggyback": _piggyback,
    "checkpoint1k": _pragma("PRAGMA wal_autocheckpoint=1000"),
    "checkpoint100k": _pragma("PRAGMA wal_autocheckpoint=100000"),
    "cache": _pragma("PRAGMA cache_size=-16000"),
    "mmap": _pragma("PRAGMA mmap_size=67108864"),
    "nomark": _nomark,
    "exclusive": _exclusive,
    "noworkerwrites": _no_worker_writes,
    "nosqlite": _no_sqlite,
}


def _switches() -> int:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # every thread's
    return usage.ru_nvcsw + usage.ru_nivcsw


class _Contender:
    """A started queue on a fresh store changed by one variant; idle between its rounds."""

    def __init__(self, variant: str, directory: str, workers: int) -> None:
        self.store = SQLitePersistence(os.path.join(directory, f"{variant}.db"))
        VARIANTS[variant](self.store)
        self.queue = Queue(config=Config(buffer_size=10_000_000))
        self.queue.set_persistence(self.store)
        self.queue.register_executor("email", lambda job: None)
        self.queue.start_dispatcher(workers)

    def round(self, jobs: int) -> Tuple[float, float, float]:
        """(wall us/job, cpu us/job, switches/job) of one round."""
        payloads = _payloads(jobs)
        enqueue = self.queue.enqueue
        switches, cpu, wall = _switches(), time.process_time(), time.perf_counter()
        for payload in payloads:
            enqueue(Job("email", payload))
        assert self.queue.join(120)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        return wall / jobs * 1e6, cpu / jobs * 1e6, (_switches() - switches) / jobs

    def close(self) -> None:
        self.queue.stop()
        self.store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"of {', '.join(VARIANTS)}")
    parser.add_argument("--passes", type=int, default=4, help="fresh stores for every variant, each pass")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per variant and pass, after a warm-up")
    parser.add_argument("--jobs", type=int, default=10_000, help="jobs per round")
    parser.add_argument("--workers", type=int, default=4)
    args = parser.parse_args()
    names = args.variants.split(",")
    unknown = set(names) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; known: {', '.join(VARIANTS)}")
    if "shipped" not in names:
        names.insert(0, "shipped")
    results: Dict[str, List[Tuple[float, float, float]]] = {name: [] for name in names}
    for number in range(args.passes):
        # Two queues of one variant differ by several percent on a shared machine: each pass
        # measures new ones, and the variants take turns, round by round, the order reversed.
        with tempfile.TemporaryDirectory() as tmp:
            contenders = {name: _Contender(name, tmp, args.workers) for name in names}
            try:
                for contender in contenders.values():
                    contender.round(args.jobs)  # warm-up
                for turn in range(args.rounds):
                    for name in names if (number + turn) % 2 == 0 else names[::-1]:
                        results[name].append(contenders[name].round(args.jobs))
            finally:
                for contender in contenders.values():
                    contender.close()
    print(f"{os.cpu_count()} CPUs; durable end to end, {args.workers} workers, {args.jobs} jobs per round; "
          f"medians of {args.passes * args.rounds} rounds per variant; vs shipped: the median of the turns' ratios")
    shipped = results["shipped"]
    for name in names:
        rows = results[name]
        wall, cpu, switches = (statistics.median(row[i] for row in rows) for i in range(3))
        wall_ratio, cpu_ratio = (statistics.median(row[i] / base[i] for row, base in zip(rows, shipped))
                                 for i in range(2))
        print(f"{name:15s} wall {wall:6.1f}us/job ({1e3 / wall:5.1f}k jobs/s)  cpu {cpu:6.1f}us/job  "
              f"switches {switches:4.2f}/job  vs shipped: wall {wall_ratio:5.2f}  cpu {cpu_ratio:5.2f}")


if __name__ == "__main__":
    main()
