"""Durable enqueue: tinymq with SQLitePersistence against huey and persist-queue, same run.

Run:  pytest bench/test_bench_durable.py --benchmark-only

Groups (one producer thread, fresh temporary files, the same JSON-able payloads):

- ``durable enqueue, synchronous=NORMAL``: ``Queue.enqueue`` one job at a time, and
  ``Queue.enqueue_many`` in batches of 100, against huey's ``SqliteHuey`` task
  enqueue (WAL) and persist-queue's ``SQLiteAckQueue.put``
  (auto_commit). Neither baseline has a batch API, so the batch case compares
  with what their users would call instead. A job is durable (it survives kill -9)
  when its enqueue returns, in every contender: tinymq's is in the store's journal,
  and the journal's thread moves it into the table meanwhile. Two more tinymq rows
  show the cost of that choice: "rows in the table" ends each round with
  ``store.flush()``, so the round pays for every row reaching the table;
  "journal=False" commits each job to the table before enqueue returns.
- ``durable enqueue, synchronous=FULL``: the same with an fsync per commit (no journal:
  FULL commits every write, with group commit across producer threads).

Both baselines get the same ``PRAGMA synchronous`` as tinymq on their connections
(huey's own knob knows only OFF and FULL; persist-queue has none).

No dispatcher runs: the Queue only accepts, so the figure is the cost of
making a job durable, not of running it.
"""
import itertools
import os
from typing import Any, Callable, List, Tuple

import pytest

from conftest import contender
from tinymq import Config, Job, Queue, SQLitePersistence

JOBS = 1000  # jobs per round
BATCH = 100
_counter = itertools.count()


def _payloads(n: int) -> List[dict]:
    base = next(_counter) * n
    return [{"to": f"user{base + i}@example.com", "template": "welcome", "n": base + i} for i in range(n)]


def _tinymq_queue(tmp_path: Any, synchronous: str, journal: bool = True) -> Tuple[Queue, SQLitePersistence]:
    store = SQLitePersistence(str(tmp_path / f"tinymq-{synchronous}.db"), synchronous=synchronous,
                              journal=journal and synchronous == "NORMAL")
    q = Queue(config=Config(buffer_size=10_000_000))
    q.set_persistence(store)
    return q, store


def _run(benchmark: Any, round_fn: Callable[[List[dict]], None], rounds: int) -> None:
    benchmark.pedantic(round_fn, setup=lambda: ((_payloads(JOBS),), {}), rounds=rounds, warmup_rounds=1)


_MODES = ["enqueue", "enqueue_many(100)"]
_NORMAL_ONLY = ["enqueue, rows in the table", "enqueue, journal=False"]


@pytest.mark.parametrize("synchronous, rounds, mode", [
    ("NORMAL", 30, mode) for mode in _MODES + _NORMAL_ONLY] + [("FULL", 8, mode) for mode in _MODES])
def test_tinymq(benchmark: Any, tmp_path: Any, synchronous: str, rounds: int, mode: str) -> None:
    benchmark.group = f"durable enqueue, synchronous={synchronous}"
    q, store = _tinymq_queue(tmp_path, synchronous, journal=mode != "enqueue, journal=False")
    contender(benchmark, f"tinymq {mode}", is_tinymq=True, ops=JOBS, op="job")
    enqueue, enqueue_many = q.enqueue, q.enqueue_many

    def one_by_one(payloads: List[dict]) -> None:
        for payload in payloads:
            enqueue(Job("email", payload))

    def into_the_table(payloads: List[dict]) -> None:
        one_by_one(payloads)
        store.flush()

    def batched(payloads: List[dict]) -> None:
        for start in range(0, len(payloads), BATCH):
            enqueue_many([Job("email", p) for p in payloads[start:start + BATCH]])

    round_fn = {"enqueue_many(100)": batched, "enqueue, rows in the table": into_the_table}.get(mode, one_by_one)
    _run(benchmark, round_fn, rounds)
    q.stop(wait=False)
    store.close()
    assert store.journal is (synchronous == "NORMAL" and mode != "enqueue, journal=False")


@pytest.mark.parametrize("synchronous, rounds", [("NORMAL", 30), ("FULL", 8)])
def test_huey_sqlite(benchmark: Any, tmp_path: Any, synchronous: str, rounds: int) -> None:
    huey_module = pytest.importorskip("huey")
    benchmark.group = f"durable enqueue, synchronous={synchronous}"
    huey = huey_module.SqliteHuey(filename=str(tmp_path / "huey.db"), results=False)
    # huey's fsync knob offers only OFF (0) or FULL (2): set the same level as tinymq's on
    # every connection it opens, for a like-for-like run.
    storage, create = huey.storage, huey.storage._create_connection

    def create_connection() -> Any:
        conn = create()
        conn.execute(f"PRAGMA synchronous={synchronous}")
        return conn

    storage._create_connection = create_connection
    storage.close()  # drop the connection opened at construction

    @huey.task()
    def email(payload: dict) -> None:  # pragma: no cover - never consumed
        pass

    contender(benchmark, "huey SqliteHuey task()", is_tinymq=False, ops=JOBS, op="job")

    def round_fn(payloads: List[dict]) -> None:
        for payload in payloads:
            email(payload)

    _run(benchmark, round_fn, rounds)
    assert len(huey) >= JOBS
    level = storage.conn.execute("PRAGMA synchronous").fetchone()[0]
    assert level == {"NORMAL": 1, "FULL": 2}[synchronous], level


@pytest.mark.parametrize("synchronous, rounds", [("NORMAL", 30), ("FULL", 8)])
def test_persist_queue_ack(benchmark: Any, tmp_path: Any, synchronous: str, rounds: int) -> None:
    persistqueue = pytest.importorskip("persistqueue")
    benchmark.group = f"durable enqueue, synchronous={synchronous}"
    queue = persistqueue.SQLiteAckQueue(str(tmp_path / f"pq-{synchronous}"), auto_commit=True,
                                        multithreading=True)
    # persist-queue has no synchronous option; set it on its connections for a like-for-like run.
    for conn in (queue._conn, queue._putter):
        conn.execute(f"PRAGMA synchronous={synchronous}")
    contender(benchmark, "persist-queue SQLiteAckQueue.put", is_tinymq=False, ops=JOBS, op="job")

    def round_fn(payloads: List[dict]) -> None:
        for payload in payloads:
            queue.put(payload)

    _run(benchmark, round_fn, rounds)
    assert queue.size >= JOBS
