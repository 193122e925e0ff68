"""Durable jobs: tinymq with SQLitePersistence against huey and persist-queue, same run.

Run:  pytest bench/test_bench_durable.py --benchmark-only

Every contender works on a fresh temporary SQLite file with the same JSON-able
payloads and the same ``PRAGMA synchronous`` (huey's own knob knows only OFF
and FULL, persist-queue has none: it is set on their connections, and each
contender's connections are checked to run at it, in WAL mode). A job is
durable (it survives kill -9, or power loss under FULL) when its enqueue
returns, in every contender: each commits it to SQLite first (under FULL, one
fdatasync of its -wal per commit in each: strace shows it).

Groups:

- ``durable enqueue, synchronous=NORMAL`` / ``=FULL``, one producer thread:
  ``Queue.enqueue`` one job at a time, and ``Queue.enqueue_many`` in batches of
  100, against huey's ``SqliteHuey`` task enqueue and persist-queue's
  ``SQLiteAckQueue.put`` (auto_commit). Neither baseline has a batch API, so the
  batch case compares with what their users would call instead. No worker runs:
  the figure is the cost of making a job durable.
- ``durable enqueue, 4 producer threads, synchronous=NORMAL`` / ``=FULL``: the
  same single enqueues from 4 threads at once; tinymq's store commits the
  writes of concurrent producers together (group commit), which under FULL
  shares each commit's fsync among them.
- ``durable end to end, 4 workers, synchronous=NORMAL``: enqueue N jobs and run
  them to completion with 4 worker threads, every step durable: tinymq's
  ``enqueue`` + workers (the store marks each attempt running and deletes the
  job when it succeeds) + ``join()``; huey's consumer (4 threads, idle back-off
  shortened to 1-10 ms so it does not measure sleeping); persist-queue with 4
  consumer threads calling ``get()`` then ``ack()``.
"""
import itertools
import signal
import threading
from typing import Any, Callable, List, Tuple

import pytest

from conftest import contender
from tinymq import Config, Job, Queue, SQLitePersistence

JOBS = 1000  # jobs per round, enqueue groups
BATCH = 100
PRODUCERS = 4
WORKERS = 4
# End to end: jobs per round, so a round lasts about 0.3-2 s on a 2-core machine.
E2E_JOBS = {"tinymq": 10_000, "huey": 2_000, "persist-queue": 2_000}
E2E_ROUNDS = 3
GROUP_ONE = "durable enqueue, synchronous={}"
GROUP_THREADS = f"durable enqueue, {PRODUCERS} producer threads, synchronous={{}}"
GROUP_E2E = f"durable end to end, {WORKERS} workers, synchronous=NORMAL"
_counter = itertools.count()


def _payloads(n: int) -> List[dict]:
    base = next(_counter) * n
    return [{"to": f"user{base + i}@example.com", "template": "welcome", "n": base + i} for i in range(n)]


def _run(benchmark: Any, round_fn: Callable[[List[dict]], None], rounds: int, jobs: int = JOBS) -> None:
    benchmark.pedantic(round_fn, setup=lambda: ((_payloads(jobs),), {}), rounds=rounds, warmup_rounds=1)


def _in_threads(payloads: List[dict], enqueue_one: Callable[[dict], Any]) -> None:
    """Enqueue ``payloads`` from PRODUCERS threads at once, each its share."""
    barrier = threading.Barrier(PRODUCERS)

    def produce(share: List[dict]) -> None:
        barrier.wait()
        for payload in share:
            enqueue_one(payload)

    threads = [threading.Thread(target=produce, args=(payloads[k::PRODUCERS],)) for k in range(PRODUCERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


# --- contenders' set-up ---------------------------------------------------------------

def _tinymq(tmp_path: Any, synchronous: str, name: str = "tinymq") -> Tuple[Queue, SQLitePersistence]:
    store = SQLitePersistence(str(tmp_path / f"{name}-{synchronous}.db"), synchronous=synchronous)
    q = Queue(config=Config(buffer_size=10_000_000))
    q.set_persistence(store)
    return q, store


def _huey(tmp_path: Any, synchronous: str) -> Any:
    huey_module = pytest.importorskip("huey")
    huey = huey_module.SqliteHuey(filename=str(tmp_path / f"huey-{synchronous}.db"), results=False)
    # huey's fsync knob offers only OFF (0) or FULL (2): set the same level as tinymq's on
    # every connection it opens (each thread has its own), for a like-for-like run.
    storage, create = huey.storage, huey.storage._create_connection

    def create_connection() -> Any:
        conn = create()
        conn.execute(f"PRAGMA synchronous={synchronous}")
        return conn

    storage._create_connection = create_connection
    storage.close()  # drop the connection opened at construction
    return huey


def _check_level(conn: Any, synchronous: str) -> None:
    """That ``conn`` runs in WAL mode at ``synchronous``: the contenders compare like for like."""
    mode, level = (conn.execute(f"PRAGMA {name}").fetchone()[0] for name in ("journal_mode", "synchronous"))
    assert (mode, level) == ("wal", {"NORMAL": 1, "FULL": 2}[synchronous]), (mode, level)


def _check_huey_level(huey: Any, synchronous: str) -> None:
    _check_level(huey.storage.conn, synchronous)


def _persist_queue(tmp_path: Any, synchronous: str) -> Any:
    persistqueue = pytest.importorskip("persistqueue")
    queue = persistqueue.SQLiteAckQueue(str(tmp_path / f"pq-{synchronous}"), auto_commit=True,
                                        multithreading=True)
    # persist-queue has no synchronous option; set it on its connections for a like-for-like run.
    for conn in (queue._conn, queue._putter):
        conn.execute(f"PRAGMA synchronous={synchronous}")
        _check_level(conn, synchronous)
    return queue


# --- one producer, and four -----------------------------------------------------------------

_ONE = [("NORMAL", 30, "enqueue"), ("NORMAL", 30, "enqueue_many(100)"),
        ("FULL", 8, "enqueue"), ("FULL", 8, "enqueue_many(100)")]


_THREADED = [("NORMAL", 30, True), ("FULL", 8, True)]


@pytest.mark.parametrize("synchronous, rounds, mode",
                         _ONE + [(sync, rounds, f"enqueue, {PRODUCERS} threads") for sync, rounds, _ in _THREADED])
def test_tinymq(benchmark: Any, tmp_path: Any, synchronous: str, rounds: int, mode: str) -> None:
    threaded = mode.endswith("threads")
    benchmark.group = (GROUP_THREADS if threaded else GROUP_ONE).format(synchronous)
    q, store = _tinymq(tmp_path, synchronous)
    _check_level(store._conn, synchronous)
    contender(benchmark, f"tinymq {mode}", is_tinymq=True, ops=JOBS, op="job")
    enqueue, enqueue_many = q.enqueue, q.enqueue_many

    def one_by_one(payloads: List[dict]) -> None:
        for payload in payloads:
            enqueue(Job("email", payload))

    def batched(payloads: List[dict]) -> None:
        for start in range(0, len(payloads), BATCH):
            enqueue_many([Job("email", p) for p in payloads[start:start + BATCH]])

    def threads(payloads: List[dict]) -> None:
        _in_threads(payloads, lambda payload: enqueue(Job("email", payload)))

    _run(benchmark, threads if threaded else batched if mode.startswith("enqueue_many") else one_by_one, rounds)
    q.stop(wait=False)
    assert len(store.jobs()) == JOBS * (rounds + 1)
    store.close()


@pytest.mark.parametrize("synchronous, rounds, threaded", [("NORMAL", 30, False), ("FULL", 8, False)] + _THREADED)
def test_huey_sqlite(benchmark: Any, tmp_path: Any, synchronous: str, rounds: int, threaded: bool) -> None:
    huey = _huey(tmp_path, synchronous)
    benchmark.group = (GROUP_THREADS if threaded else GROUP_ONE).format(synchronous)

    @huey.task()
    def email(payload: dict) -> None:  # pragma: no cover - never consumed
        pass

    suffix = f", {PRODUCERS} threads" if threaded else ""
    contender(benchmark, f"huey SqliteHuey task(){suffix}", is_tinymq=False, ops=JOBS, op="job")

    def round_fn(payloads: List[dict]) -> None:
        if threaded:
            _in_threads(payloads, email)
        else:
            for payload in payloads:
                email(payload)

    _run(benchmark, round_fn, rounds)
    assert len(huey) >= JOBS
    _check_huey_level(huey, synchronous)


@pytest.mark.parametrize("synchronous, rounds, threaded", [("NORMAL", 30, False), ("FULL", 8, False)] + _THREADED)
def test_persist_queue_ack(benchmark: Any, tmp_path: Any, synchronous: str, rounds: int, threaded: bool) -> None:
    queue = _persist_queue(tmp_path, synchronous)
    benchmark.group = (GROUP_THREADS if threaded else GROUP_ONE).format(synchronous)
    suffix = f", {PRODUCERS} threads" if threaded else ""
    contender(benchmark, f"persist-queue SQLiteAckQueue.put{suffix}", is_tinymq=False, ops=JOBS, op="job")

    def round_fn(payloads: List[dict]) -> None:
        if threaded:
            _in_threads(payloads, queue.put)
        else:
            for payload in payloads:
                queue.put(payload)

    _run(benchmark, round_fn, rounds)
    assert queue.size >= JOBS


# --- end to end ---------------------------------------------------------------------------------

class _Countdown:
    """Sets ``done`` when called ``n`` times (from any thread)."""

    def __init__(self, n: int) -> None:
        self.left = itertools.count(n - 1, -1)
        self.done = threading.Event()

    def __call__(self) -> None:
        if next(self.left) == 0:
            self.done.set()


def _e2e_tinymq(tmp_path: Any) -> Tuple[Callable[[List[dict]], None], Callable[[], None]]:
    q, store = _tinymq(tmp_path, "NORMAL", "tinymq-e2e")
    q.register_executor("email", lambda job: None)
    q.start_dispatcher(WORKERS)
    enqueue = q.enqueue

    def round_fn(payloads: List[dict]) -> None:
        for payload in payloads:
            enqueue(Job("email", payload))
        assert q.join(120)

    def stop() -> None:
        q.stop()
        assert store.counts() == dict.fromkeys(("ready", "delayed", "running", "dead", "corrupt"), 0)
        store.close()

    return round_fn, stop


def _e2e_huey(tmp_path: Any) -> Tuple[Callable[[List[dict]], None], Callable[[], None]]:
    huey = _huey(tmp_path, "NORMAL")
    state = {"countdown": _Countdown(1)}

    @huey.task()
    def email(payload: dict) -> None:
        state["countdown"]()

    consumer = huey.create_consumer(workers=WORKERS, worker_type="thread", periodic=False,
                                    initial_delay=0.001, backoff=1.15, max_delay=0.01,
                                    check_worker_health=False)
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    consumer.start()
    for sig, handler in saved.items():  # the consumer installs its own; keep pytest's
        signal.signal(sig, handler)

    def round_fn(payloads: List[dict]) -> None:
        countdown = state["countdown"] = _Countdown(len(payloads))
        for payload in payloads:
            email(payload)
        assert countdown.done.wait(120)

    def stop() -> None:
        consumer.stop(graceful=True)
        _check_huey_level(huey, "NORMAL")

    return round_fn, stop


def _e2e_persist_queue(tmp_path: Any) -> Tuple[Callable[[List[dict]], None], Callable[[], None]]:
    queue = _persist_queue(tmp_path, "NORMAL")
    state = {"countdown": _Countdown(1)}
    stopping = threading.Event()

    def consume() -> None:
        while not stopping.is_set():
            try:
                item = queue.get(block=True, timeout=0.01)
            except Exception:  # persistqueue.Empty
                continue
            queue.ack(item)
            state["countdown"]()

    threads = [threading.Thread(target=consume, daemon=True) for _ in range(WORKERS)]
    for thread in threads:
        thread.start()

    def round_fn(payloads: List[dict]) -> None:
        countdown = state["countdown"] = _Countdown(len(payloads))
        for payload in payloads:
            queue.put(payload)
        assert countdown.done.wait(120)

    def stop() -> None:
        stopping.set()
        for thread in threads:
            thread.join()

    return round_fn, stop


@pytest.mark.parametrize("name", list(E2E_JOBS))
def test_end_to_end(benchmark: Any, tmp_path: Any, name: str) -> None:
    benchmark.group = GROUP_E2E
    display = {"tinymq": "tinymq enqueue + workers + join()",
               "huey": "huey SqliteHuey + consumer",
               "persist-queue": "persist-queue SQLiteAckQueue + get/ack threads"}[name]
    jobs = E2E_JOBS[name]
    contender(benchmark, display, is_tinymq=name == "tinymq", ops=jobs, op="job")
    round_fn, stop = {"tinymq": _e2e_tinymq, "huey": _e2e_huey, "persist-queue": _e2e_persist_queue}[name](tmp_path)
    try:
        _run(benchmark, round_fn, E2E_ROUNDS, jobs)
    finally:
        stop()
