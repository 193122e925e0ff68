"""SQLitePersistence's group commit: many threads' writes, committed together, each acknowledged only
once committed, each failure raised in its own writer, and the lead of a batch never left unheld."""
import signal
import sqlite3
import threading
import time

import pytest

from tinymq import PersistenceError
from tinymq.job import Job
from tinymq.persistence import SQLitePersistence

from _helpers import WAIT, LockStandIn, save_in_thread, wait_until


class _Killed(BaseException):
    """An exception raised into a writer's thread (as JobTimeout is with interrupt_on_timeout)."""


class _WatchedLock(LockStandIn):
    """The store's commit lock, noting the threads that wait for it (``waiters``) and that take it
    (``takers``), the test's own thread left out; ``before_waiting`` (if set) runs as a thread waits."""

    def __init__(self, lock):
        super().__init__(lock)
        self.waiters = []
        self.takers = []
        self.before_waiting = None

    def acquire(self, blocking=True, timeout=-1):
        if threading.current_thread() is threading.main_thread():  # the test's own thread
            return self.lock.acquire(blocking, timeout)
        name = threading.current_thread().name
        if blocking:
            self.waiters.append(name)
            if self.before_waiting is not None:
                self.before_waiting()
        taken = self.lock.acquire(blocking, timeout)
        if taken:
            self.takers.append(name)
        return taken


def _ids_in_file(path):
    """The ids the file holds, read by a connection of its own after the store was closed."""
    conn = sqlite3.connect(path)
    try:
        return {job_id for (job_id,) in conn.execute("SELECT id FROM tinymq_jobs")}
    finally:
        conn.close()


def _start(name, target):
    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("synchronous", ["NORMAL", "FULL"])
def test_every_acknowledged_write_of_many_threads_is_in_the_file_and_every_failure_raises_in_its_writer(
        path, synchronous):
    """Stress: 8 threads save, save_many, delete and write units SQLite refuses, at once. Each call
    returns only once committed (the reopened file holds every id a returned call saved, and none it
    deleted), and a refused unit raises in its own writer, never in the others of its batch."""
    threads, writes = 8, 120
    acknowledged, deleted, refused, unexpected = set(), set(), [], []
    batches = []
    barrier = threading.Barrier(threads)
    with SQLitePersistence(path, synchronous=synchronous) as store:
        commit = store._commit

        def counted(batch):
            batches.append(len(batch))
            commit(batch)

        store._commit = counted

        def writer(t):
            barrier.wait()
            for i in range(writes):
                job_id = f"{t}-{i}"
                try:
                    if i % 11 == 10:
                        try:
                            store._write([("INSERT INTO no_such_table VALUES (1)", ())])
                        except PersistenceError:
                            refused.append(job_id)
                        else:  # pragma: no cover - reported below
                            unexpected.append(f"{job_id}: a refused unit returned")
                    elif i % 7 == 6:
                        store.save_many([Job("t", id=f"{job_id}-{k}") for k in range(3)])
                        acknowledged.update(f"{job_id}-{k}" for k in range(3))
                    else:
                        store.save(Job("t", id=job_id))
                        acknowledged.add(job_id)
                        if i % 5 == 0:
                            store.delete(job_id)
                            deleted.add(job_id)
                except BaseException as exc:  # pragma: no cover - reported below
                    unexpected.append(f"{job_id}: {exc!r}")

        workers = [_start(f"writer-{t}", lambda t=t: writer(t)) for t in range(threads)]
        for thread in workers:
            thread.join(WAIT * 6)
        assert not any(thread.is_alive() for thread in workers), "a writer is waiting forever"
        assert unexpected == []
        assert len(refused) == threads * len(range(10, writes, 11))
        assert sum(batches) >= threads * writes  # (a refused unit of a batch is committed alone after it)
    assert _ids_in_file(path) == acknowledged - deleted


def _queued(store):
    """Units waiting for a commit: the pending ones, and the one of the writer due to lead them."""
    return len(store._pending) + (getattr(store, "_leader", None) is not None)


def _queue_writers(store, lock, names):
    """Start a saving thread per name while the test holds the store's commit ``lock``: the first
    waits for that lock to lead, the others to be committed by it. Returns the threads and outcomes."""
    outcomes = {}

    def save(name):
        try:
            if name.startswith("bad"):
                store._write([("INSERT INTO no_such_table VALUES (1)", ())])
            else:
                store.save(Job("t", id=name))
            outcomes[name] = "returned"
        except (PersistenceError, _Killed) as exc:
            outcomes[name] = exc

    started = []
    for name in names:
        started.append(_start(name, lambda name=name: save(name)))
        if len(started) == 1:
            assert wait_until(lambda: lock.waiters == [names[0]]), "the first writer did not wait to lead"
        else:
            assert wait_until(lambda: _queued(store) == len(started)), f"{name} did not queue"
    return started, outcomes


def _writers_met_at_a_held_lock(store, names, before_waiting=None, before_release=lambda: None):
    """The store's commit lock, watched (``before_waiting``: see _WatchedLock), held by the test (as
    a read holds it) while a saving thread per name queues (_queue_writers), then released; the
    threads joined. Returns the watched lock, the threads and their outcomes."""
    lock = store._commit_lock = _WatchedLock(store._commit_lock)
    lock.before_waiting = before_waiting
    lock.acquire()
    try:
        threads, outcomes = _queue_writers(store, lock, names)
    finally:
        before_release()
        lock.release()
    for thread in threads:
        thread.join(WAIT)
    return lock, threads, outcomes


def test_writers_a_batch_committed_return_without_taking_the_commit_lock(path):
    """Three writers queue while the commit lock is held: the first commits all three units in one
    transaction, and the other two return then, without ever taking the lock (under synchronous=FULL
    a writer waiting for it could wait through another writer's whole commit, fsync included)."""
    with SQLitePersistence(path, synchronous="FULL") as store:
        batches = []
        commit = store._commit
        store._commit = lambda batch: (batches.append(len(batch)), commit(batch))
        lock, _, outcomes = _writers_met_at_a_held_lock(store, ["first", "second", "third"])
        assert outcomes == dict.fromkeys(["first", "second", "third"], "returned")
        assert batches == [3]
        assert lock.waiters == lock.takers == ["first"]
    assert _ids_in_file(path) == {"first", "second", "third"}


def test_a_refused_unit_of_a_batch_raises_in_its_own_writer_only(path):
    with SQLitePersistence(path, synchronous="FULL") as store:
        _, _, outcomes = _writers_met_at_a_held_lock(store, ["first", "bad", "third"])
        assert outcomes["first"] == outcomes["third"] == "returned"
        assert isinstance(outcomes["bad"], PersistenceError) and "no_such_table" in str(outcomes["bad"])
    assert _ids_in_file(path) == {"first", "third"}


def test_a_writer_interrupted_while_it_waits_to_lead_hands_the_lead_on(path):
    """The writer due to lead the next batch is interrupted while it waits for the commit lock: its
    unit is not written and its call raises; the oldest writer waiting leads instead, and commits
    the others' units (none waits forever), and the store goes on."""
    with SQLitePersistence(path, synchronous="FULL") as store:
        interrupt = threading.Event()

        def interrupted_if_first():
            if threading.current_thread().name == "first":
                assert interrupt.wait(WAIT)
                raise _Killed()

        lock, threads, outcomes = _writers_met_at_a_held_lock(store, ["first", "second", "third"],
                                                              interrupted_if_first, interrupt.set)
        assert not any(thread.is_alive() for thread in threads), "a writer is waiting forever"
        assert isinstance(outcomes["first"], _Killed)
        assert outcomes["second"] == outcomes["third"] == "returned"
        assert lock.waiters == ["first", "second"] and lock.takers == ["second"]
        store.save(Job("t", id="after"))
    assert _ids_in_file(path) == {"second", "third", "after"}


def _as_if_savers_came_back(store, savers, window=WAIT):
    """A FULL store as just after a batch of ``savers`` saves was committed, their writers known to
    come back faster than a commit takes: the first one back may wait ``window`` seconds for the others."""
    now = time.monotonic()
    store._returning = savers
    store._released_at = now
    store._back_by = now + window
    store._commit_time = window
    store._return_time = 0.0


def _no_more_gathering(store):
    """Commits as if instant from now on: nobody waits for the others of its batch (the test's later writes)."""
    store._returning = 0
    store._commit_time = 0.0


def test_savers_of_a_batch_coming_back_share_the_next_commit_the_last_one_back_leading_it(path):
    """Under FULL, the writers of a batch of saves come back with their next saves (producer threads
    enqueueing one job after another): the first one back waits for the others rather than commit its
    save alone while they queue behind it; the last one back commits the three saves in one
    transaction (one fsync), and the other two return then, without taking the commit lock."""
    with SQLitePersistence(path, synchronous="FULL") as store:
        batches = []
        commit = store._commit
        store._commit = lambda batch: (batches.append(len(batch)), commit(batch))
        lock = store._commit_lock = _WatchedLock(store._commit_lock)
        _as_if_savers_came_back(store, 3)
        outcomes = {}
        threads = [save_in_thread(store, "first", outcomes)]
        assert wait_until(lambda: store._gathering is not None), "the first one back did not wait for the others"
        threads.append(save_in_thread(store, "second", outcomes))
        assert wait_until(lambda: len(store._pending) == 1), "second did not queue"
        threads.append(save_in_thread(store, "third", outcomes))
        for thread in threads:
            thread.join(WAIT)
        assert not any(thread.is_alive() for thread in threads), "a writer is waiting forever"
        assert outcomes == dict.fromkeys(["first", "second", "third"], "returned")
        assert batches == [3]
        assert lock.takers == ["third"]
        assert store._gathering is None and store._leader is None
    assert _ids_in_file(path) == {"first", "second", "third"}


def test_a_saver_waits_for_the_others_of_its_batch_only_until_the_window_closes(path):
    """The first one back commits its save alone once the window closes if the others do not come back
    (their threads went on to other work); a write that saves nothing (a worker's delete or running
    mark, whose next write waits for a job to run) waits for nobody."""
    with SQLitePersistence(path, synchronous="FULL") as store:
        store.save(Job("t", id="done"))
        batches = []
        commit = store._commit
        store._commit = lambda batch: (batches.append(len(batch)), commit(batch))
        _as_if_savers_came_back(store, 3, window=WAIT * 3)
        started = time.monotonic()
        store.delete("done")
        assert time.monotonic() - started < WAIT, "a delete waited for the savers of the last batch"
        _as_if_savers_came_back(store, 3, window=0.2)
        store.save(Job("t", id="alone"))
        assert batches == [1, 1]
        assert store._gathering is None and store._leader is None
        _no_more_gathering(store)
        store.save(Job("t", id="after"))
    assert _ids_in_file(path) == {"alone", "after"}


@pytest.mark.skipif(not hasattr(signal, "pthread_kill"), reason="needs signal.pthread_kill")
def test_ctrl_c_in_a_saver_waiting_for_the_others_of_its_batch_hands_the_lead_on(path):
    """Under FULL the main thread, the first one back of a batch of saves, waits for the others; one
    of them queues behind it, and a Ctrl-C lands in the main thread's wait. Its save raises (its job is
    not written), the writer queued behind it leads instead and returns, its job saved (none waits for
    a leader that is gone), and the store goes on."""
    def handler(signum, frame):
        raise _Killed()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        with SQLitePersistence(path, synchronous="FULL") as store:
            _as_if_savers_came_back(store, 3)
            outcomes, threads, main = {}, [], threading.main_thread().ident

            def queue_then_interrupt():
                if wait_until(lambda: store._gathering is not None):
                    threads.append(save_in_thread(store, "second", outcomes))
                    if wait_until(lambda: len(store._pending) == 1):
                        signal.pthread_kill(main, signal.SIGINT)

            helper = _start("helper", queue_then_interrupt)
            with pytest.raises(_Killed):
                store.save(Job("t", id="first"))
            helper.join(WAIT)
            for thread in threads:
                thread.join(WAIT)
            assert not any(thread.is_alive() for thread in threads), "a writer is waiting forever"
            assert outcomes == {"second": "returned"}
            assert store._gathering is None and store._leader is None
            _no_more_gathering(store)
            store.save(Job("t", id="after"))
    finally:
        signal.signal(signal.SIGINT, previous)
    assert _ids_in_file(path) == {"second", "after"}
