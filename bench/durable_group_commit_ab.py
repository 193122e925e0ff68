"""A/B in one process: group commit's followers waiting on the commit lock, or on a lock of their own.

    python bench/durable_group_commit_ab.py [--pairs 4] [--variants A,B,C] [--cases one,four,e2e]
                                            [--synchronous NORMAL]

Not a benchmark of its own (pytest does not collect it). Issue #10 asks for 4 producer
threads to enqueue durably at least twice as fast as one. This runs durable cases
of test_bench_durable.py (``synchronous="NORMAL"``), every variant in turn on a
fresh store, in one process, and prints the medians over the rounds of the process's
CPU time per job (all threads; on a shared, noisy machine the steadier figure), wall
time per job, voluntary context switches per job, and units (writers' calls) per commit:

- one: ``enqueue`` 1000 jobs from one producer thread;
- four: the same from 4 producer threads at once;
- e2e: enqueue 10,000 no-op jobs from one thread, run them with 4 workers, ``join()``;
- e2e-busy (not run by default): the same with 2000 jobs of 0.2 ms each, so that
  workers write less often than the producer.

Variants:

- A: the store as shipped. A writer queues its unit, then takes the commit lock;
  the holder commits every unit pending, and each writer woken takes the lock in
  turn, only to find its unit done (a convoy, during which no batch commits).
- B: followers on locks of their own (``_OwnLocks`` below). A writer that finds no
  leader leads: it commits every pending unit in one batch, hands the lead to the
  oldest writer that arrived meanwhile (or steps down), and releases each of its
  batch's writers' locks. Nobody waits on the commit lock.
- C: B, plus a gather window: when the last batch had other writers, a writer that
  finds no leader waits (at most ``GATHER_WINDOW``) for them to come back, and the
  last of them leads with the others' units in its batch. A lone writer never waits.
- D: a next leader (``_NextLeader``). The first writer to arrive while a batch commits
  waits on the commit lock and commits, once it has it, every unit pending; the writers
  after it wait on locks of their own, which that leader releases. A writer whose unit
  was committed never takes the commit lock (no convoy), and no lead is handed to a
  sleeping thread.
- E: a leader that keeps leading (``_KeepLeading``): writers that find a leader wait on
  locks of their own, and the leader commits batch after batch while writers keep coming
  (at most ``KEEP_LEADING``), so their Python runs while it is inside SQLite.
- F: A, but a writer that finds the commit lock taken waits on a Condition the leader
  notifies after its batch (``_DoneReturns``): one whose unit is done returns; the others
  try for the lock again (every waiter wakes after every batch).
- G: the store as shipped: D under ``synchronous="FULL"``, A (``_QueueOnLock``, the
  store's code before) under NORMAL. Since session 35, under FULL, D plus this: writers who
  saved in one batch and are back at once (producers) wait for each other, the last one back
  leading, so that the next commit carries them all (``SQLitePersistence._write``); D here
  is the store before that.
- H: A (the shipped store under NORMAL, ``_Shipped``), but a writer that finds the commit
  lock taken tries it again after each of ``SPINS`` ``time.sleep(0)`` before it waits for it.
- I: G, a single statement run by ``executemany`` with one row of parameters (CPython's
  ``execute`` also releases the GIL around ``sqlite3_last_insert_rowid``).
- J: no group commit: a writer commits its own unit alone once it has the commit lock.
- K: A, but a writer that finds the commit lock taken waits on a Condition that each release
  notifies (one waiter), and takes the lock only while it holds the GIL.

What it showed (2 CPUs shared with other tenants at load 2-5; medians of 12 rounds,
e2e-busy of 6; CPU / wall us per job, units per commit):

    case       A (shipped)          B (own locks)        C (own locks + gather)
    one         43.5 /  69.2  1.00   49.2 /  88.0  1.00    50.2 /  82.8  1.00
    four        47.7 /  48.3  1.12   58.1 /  75.1  1.50    55.7 /  67.0  3.96
    e2e        160.5 / 194.0  1.46  189.2 / 239.2  1.54   160.7 / 184.1  2.95
    e2e-busy   184.1 / 249.7  1.65  146.2 / 321.1  1.26   198.5 / 427.3  2.31

(Earlier runs, on the same machine at other loads, ranked A and C the other way in
four now and then: the CPU per job of every variant stayed within the noise of A's.)
C fills its batches, yet no variant spends clearly less CPU per job than A: a batch
of 4 saves about half of a commit's CPU per job, and each follower pays that back in
its blocking hand-off and its wait for the GIL. B loses in the end to end case (as the
lead hand-off noted in ``SQLitePersistence._write`` did), and C's window stalls the
producer whenever a writer of the last batch (a worker busy with a job) does not come
back at once. The store keeps A.

D and E, later (2 CPUs shared, load about 2; medians of 12 rounds; CPU / wall us per
job, units per commit; ``--synchronous FULL`` four: medians of 6):

    case       A (shipped)          D (next leader)      E (keeps leading)
    one         23.7 /  29.9  1.00   22.4 /  32.3  1.00    23.2 /  28.0  1.00
    four        27.4 /  34.3  1.01   34.8 /  40.8  1.11    35.7 /  37.5  1.37
    e2e         77.6 /  87.7  1.24   95.1 /  99.9  1.44    96.3 / 101.1  1.49
    four FULL  115.3 / 341.2  2.08   87.5 / 218.5  2.47   122.3 / 495.0  1.97

Neither beats A under NORMAL: each batches more only by making more writers block on
a lock of their own (voluntary switches per job, four: A 0.09, D 0.33, E 1.49; e2e: 3.0,
4.8, 6.4), and a blocking hand-off costs about as much CPU as the commit share it saves
(``python bench/durable_bounds.py`` prints both). With four producers under NORMAL the
writers hardly ever meet at the commit lock (durable_bounds.py: a few percent of its
acquisitions wait), so there is next to nothing to group: a commit is shorter than a
sleeping thread takes to wake, and four producers lose their time passing the GIL around
each SQLite call, not at the commit lock. Under FULL (a commit waits for an fsync) writers
do meet, and D's batches are bigger than A's; the FULL figures vary with the disk's fsync
time from round to round, and D costs NORMAL more than it gives FULL. The store keeps A.

Then (session 31; durfull31 had cut FULL's checkpoint interval, so a commit's
fdatasync is ~150 us), FULL four, A's and D's wall us per job in 11 runs of
``--pairs`` 2 to 6 (each the medians of 6-18 rounds; load 1-5):

    135.7/108.5  134.5/83.5  106.7/85.4  122.3/80.4  244.1/108.5  129.6/93.4
    123.7/87.3   122.5/86.1  117.7/83.2  179.6/138.5  119.6/97.5

(the last three: G, which is D under FULL). D runs 4 producers 23-125 % faster than A,
median +41 % (medians of the runs: 87.3 us, 11.5 k jobs/s, against 123.7 us, 8.1 k;
one producer 150-190 us), at 2.47-2.48 units per commit against A's 1.41-2.17, and
4-34 % less CPU per job (median 14 %): in A a writer whose unit was committed waited on the commit
lock, often through the next writer's whole commit, fsync included; in D it never
takes the lock. Under NORMAL D still cost more than it gave: four, in 5 runs of 6,
1.6-3.3x A's voluntary switches per job and 4-20 % more CPU per job (e.g. 2.26
against 1.27, 46 against 40 us); e2e measured either way (D's CPU per job 0.56-1.28x
A's), hence G. Two designs measured and not kept:
F (the same run as D's first: 8.6 k jobs/s against A's 7.4 k and D's 12.0 k, CPU 81 us
per job against 60 and 42: every waiter wakes after every batch), and D with a free
commit lock taken at once, as A does (10.2 k jobs/s against D's 11.6 k, 1.96 units per
commit against 2.47: a writer back from its commit found the lock free before the next
leader woke, and committed with fewer units).

Then (session 35), ``--variants D,G --cases four,one --synchronous FULL --pairs 4`` (load
under 1; medians of 12 rounds): four, D 85.5 us per job (11.7 k jobs/s) at 2.46 units per
commit, G 73.6 us (13.6 k) at 3.98; one, D 165.4 us, G 157.2 us. D's returning writers
split into two groups that took turns at the commit lock; in G the first one back waits
for the others and the last one back leads (see SQLitePersistence._write).

Then (session 36), NORMAL, four. Where the threads sleep, by their native stacks
(``python bench/durable_sleeps.py``, 4 rounds, load 2-3): tinymq 1.42 switches per job,
0.78 asleep on the commit lock, 0.38 woken with it and then asleep for the GIL, 0.00
waiting for the GIL back around a call into sqlite3, 0.24 preempted; persist-queue 1.03
(0.78, 0.12, 0.00, 0.09). So four producers do not lose their time passing the GIL around
each SQLite call (as the paragraph above guessed) but at the commit lock: 0.43 of a job's
acquisitions find it taken (counted), and each of those sleeps about twice (a writer woken
by a release finds the lock taken again by one that came back first), then often once more
for the GIL, holding the lock meanwhile. The same code pinned to one CPU (``taskset -c 0``)
runs four at 30 us per job with 0.09 switches (one producer: 22 us); with both CPUs free,
56-65 us at 1.6-1.8 switches: whether the other tenants leave a CPU free decides the case
(a round's switches per job say which). Variants H-K and the rest, measured first with
stand-ins of them in one process (J's without the store's checks), in the rounds with both
CPUs free (>= 0.5 switches per job; wall / CPU us per job, switches per job):

    A 56.2 / 57.0 1.64   I 57.1 / 58.8 1.80   J 56.0 / 56.8 1.54   G under NORMAL 64.7 / 68.6 2.73
    D 62.9 / 65.4 2.75   H 74.6 / 91.0 3.42 (16 tries: 87.4 / 100.7 4.19; 8 sched_yield: 69.4)
    K 47.7 / 39.0 2.76, but 38 against A's 29 us in rounds with one CPU free

No design here gives a writer that must wait for a commit a cheaper wait than a sleep on a
lock (Python has no wait that spins with the GIL released: sleep(0) and sched_yield take
the GIL back each time, and a woken spinner sleeps on the GIL instead), and each sleep costs
a wake-up of an idle vCPU (tens of us here). With ``--pairs 6`` at load 3 (four's rounds
all with one CPU free): four G 38.3, H 35.4, I 37.5, J 44.0, K 54.5 us per job; e2e G 89.4,
H 98.1, I 85.2, J 74.3, K 95.5. J (and I, less) read faster end to end in every such run
of this script, but not in fresh interpreters taking turns (``durable_trees_ab.py --case e2e``,
the trees G and J or I): 24 pairs each at load 4-5, J -2.1 % wall and +9.9 % CPU per job, I
-1.6 % and +1.6 % (shorter runs before had read -7 % to -27 %: two copies of one tree there read
-50 % to +112 % pair by pair at that load, and rounds in one process 61-199 us per job). Nothing
kept: this script's end to end figures favour some variants by themselves, and J would also
drop group commit under NORMAL, which the README promises.
"""

import argparse
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_bench_durable import _payloads  # noqa: E402

from tinymq import Config, Job, Queue, SQLitePersistence  # noqa: E402
from tinymq._shield import shield  # noqa: E402
from tinymq.errors import PersistenceError  # noqa: E402
from tinymq.persistence import sqlite as module  # noqa: E402

ROUNDS = 3  # per store, after one warm-up round
GATHER_WINDOW = 0.0005  # seconds, variant C
KEEP_LEADING = 8  # batches a leader commits at most before it hands the lead on, variant E
SPINS = 4  # tries of a taken commit lock, each after a time.sleep(0), before a writer waits for it: variant H


_Unit = module._Unit  # (its waker and leads serve variants B to E too)


class _QueueOnLock(SQLitePersistence):
    """Variant A: the store's group commit before variant G replaced it. A writer queues its unit,
    then takes the commit lock; the holder commits every unit pending, and each writer woken takes
    the lock in turn, only to find its unit done."""

    def _write(self, statements: list) -> None:
        if self._pid != os.getpid() or self._closed or self.read_only or self._broken:
            self._check_usable()
        unit = module._Unit(statements)
        with shield():
            self._pending.append(unit)
            with self._commit_lock:
                if not unit.done:
                    pending = self._pending
                    batch = [pending.popleft() for _ in range(len(pending))]
                    if self._closed or self._broken:
                        for waiting in batch:
                            waiting.error = PersistenceError(self._broken or f"{self!r} was closed")
                    elif batch:
                        self._commit(batch)
                        now = time.monotonic()
                        if now >= self._next_wal_check:
                            self._next_wal_check = now + module._WAL_CHECK_INTERVAL
                            self._look_at_files(batch)
        _raise_unless_done(self, unit)


class _OwnLocks(SQLitePersistence):
    """Variants B and C: followers wait on locks of their own, never on the commit lock."""

    gather_window = 0.0  # C: seconds a writer waits for the last batch's other writers to come back

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._gate = threading.RLock()  # guards _pending, _leading, _expected
        self._leading = False  # a thread commits pending units (or was handed the lead): a writer waits
        self._expected = 0  # writers of the last batch not back yet (C)

    def _write(self, statements: list) -> None:
        if self._pid != os.getpid() or self._closed or self.read_only:
            self._check_usable()
        unit = _Unit(statements)
        with shield():
            with self._gate:
                self._pending.append(unit)
                if self._expected:
                    self._expected -= 1
                if self._leading or self._expected:
                    waker = unit.waker = threading.Lock()
                    waker.acquire()
                    window = -1 if self._leading else self.gather_window  # (-1: no time limit)
                else:
                    self._leading = True
                    waker = None
            if waker is not None:
                try:
                    if not waker.acquire(True, window):  # our batch is over, or the lead is ours
                        self._stop_gathering(unit)
                except BaseException:  # Ctrl-C while waiting: no unit may be left without a leader
                    self._abandon(unit)
                    raise
            if waker is None or unit.leads:
                self._lead(unit)
        if not unit.done:
            error = unit.error
            if isinstance(error, PersistenceError):
                raise error
            raise PersistenceError(f"{self!r}: write failed: {error or 'interrupted before its commit'}") from error

    def _lead(self, own: _Unit) -> None:
        """Commit every pending unit in one batch, hand the lead on or step down, wake the batch."""
        pending = self._pending
        batch: List[_Unit] = []
        try:
            with self._commit_lock:
                with self._gate:
                    batch = list(pending)
                    pending.clear()
                if self._closed:
                    for waiting in batch:
                        waiting.error = PersistenceError(f"{self!r} was closed")
                elif batch:
                    self._commit(batch)
                    now = time.monotonic()  # (commits looked at as _write does)
                    if now >= self._next_wal_check:
                        self._next_wal_check = now + module._WAL_CHECK_INTERVAL
                        self._look_at_files(batch)
        finally:
            with self._gate:
                if not batch:  # interrupted before it took any unit, its own included
                    try:
                        pending.remove(own)
                    except ValueError:
                        pass
                self._expected = len(batch) if self.gather_window else 0
                self._hand_on()
            for waiting in batch:
                if waiting is not own:
                    waiting.waker.release()  # type: ignore[union-attr]

    def _hand_on(self) -> None:
        """The lead to the oldest writer waiting, or step down. Caller holds _gate and leads."""
        if self._pending:
            successor = self._pending[0]
            successor.leads = True
            successor.waker.release()
        else:
            self._leading = False

    def _stop_gathering(self, unit: _Unit) -> None:
        """The writers expected did not all come back: lead, unless a leader has our unit or will take it."""
        with self._gate:
            if unit.leads:
                return
            if not self._leading and unit in self._pending:
                self._leading = unit.leads = True
                return
        unit.waker.acquire()  # type: ignore[union-attr]

    def _abandon(self, unit: _Unit) -> None:
        """A writer interrupted while it waited: take its unit back unless a leader has it."""
        with self._gate:
            try:
                self._pending.remove(unit)
            except ValueError:  # being committed: its leader wakes nobody, harmlessly
                return
            if unit.leads:  # handed the lead, which nobody else can take: hand it on
                self._hand_on()


class _OwnLocksGathering(_OwnLocks):
    gather_window = GATHER_WINDOW


class _NextLeader(SQLitePersistence):
    """Variant D: the first writer to arrive while a batch commits waits on the commit lock and
    leads the next batch; the writers after it wait on locks of their own, released by that leader."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._gate = threading.RLock()  # guards _pending and _next
        self._next: Optional[_Unit] = None  # the unit whose writer leads the pending ones (None: the next to come)

    def _write(self, statements: list) -> None:
        if self._pid != os.getpid() or self._closed or self.read_only:
            self._check_usable()
        unit = _Unit(statements)
        with shield():
            with self._gate:
                self._pending.append(unit)
                leads = self._next is None
                if leads:
                    self._next = unit
                else:
                    waker = unit.waker = threading.Lock()
                    waker.acquire()
            if leads:
                batch: List[_Unit] = []
                try:
                    with self._commit_lock:
                        with self._gate:
                            batch = list(self._pending)
                            self._pending.clear()
                            self._next = None
                        self._commit_batch(batch)
                finally:
                    for waiting in batch:
                        if waiting.waker is not None:
                            waiting.waker.release()
            else:
                waker.acquire()
        _raise_unless_done(self, unit)

    def _commit_batch(self, batch: List[Any]) -> None:
        """Commit ``batch`` as ``_write`` does (a closed store fails it). Caller holds _commit_lock."""
        if self._closed:
            for waiting in batch:
                waiting.error = PersistenceError(f"{self!r} was closed")
            return
        self._commit(batch)
        now = time.monotonic()  # (commits looked at as _write does)
        if now >= self._next_wal_check:
            self._next_wal_check = now + module._WAL_CHECK_INTERVAL
            self._look_at_files(batch)


class _KeepLeading(_NextLeader):
    """Variant E: a writer that finds a leader waits on a lock of its own; the leader commits batch
    after batch while writers keep coming (at most KEEP_LEADING batches), then hands the lead on."""

    def _write(self, statements: list) -> None:
        if self._pid != os.getpid() or self._closed or self.read_only:
            self._check_usable()
        unit = _Unit(statements)
        with shield():
            with self._gate:
                self._pending.append(unit)
                leads = self._next is None
                if leads:
                    self._next = unit  # (here: a leader is at work)
                else:
                    waker = unit.waker = threading.Lock()
                    waker.acquire()
            if not leads:
                waker.acquire()  # our batch is over, or the lead is ours
            if leads or unit.leads:
                self._lead()
        _raise_unless_done(self, unit)

    def _lead(self) -> None:
        pending = self._pending
        with self._commit_lock:
            for _ in range(KEEP_LEADING):
                with self._gate:
                    batch = list(pending)
                    pending.clear()
                    if not batch:
                        self._next = None
                        return
                try:
                    self._commit_batch(batch)
                finally:
                    for waiting in batch:
                        if waiting.waker is not None and not waiting.leads:
                            waiting.waker.release()
            with self._gate:
                if pending:  # hand the lead to the oldest writer waiting
                    pending[0].leads = True
                    pending[0].waker.release()  # type: ignore[union-attr]
                else:
                    self._next = None


class _FinishedUnit(module._Unit):
    __slots__ = ("finished",)

    def __init__(self, statements: list) -> None:
        super().__init__(statements)
        self.finished = False  # its batch is over (done and error final): its writer may return


class _DoneReturns(SQLitePersistence):
    """Variant F: as A (whoever finds the commit lock free commits every pending unit; a writer back
    at once takes it again), but a writer that finds a batch being committed waits on a Condition,
    not on the commit lock: the leader wakes the waiting writers after its batch, and a writer whose
    unit that batch committed returns without taking the lock; the others try for the lock again."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._gate = threading.Condition(threading.Lock())
        self._leading = False  # a writer holds the commit lock to commit a batch
        self._waiting = 0  # writers waiting on _gate

    def _write(self, statements: list) -> None:
        if self._pid != os.getpid() or self._closed or self.read_only:
            self._check_usable()
        unit = _FinishedUnit(statements)
        with shield():
            self._pending.append(unit)
            if self._lock_to_lead(unit):
                self._lead()
        _raise_unless_done(self, unit)

    def _lock_to_lead(self, unit: _FinishedUnit) -> bool:
        """Wait until ``unit``'s batch is over (False), or take the commit lock to commit it (True)."""
        lock = self._commit_lock
        while not lock.acquire(False):
            gate = self._gate
            with gate:
                self._waiting += 1
                try:
                    while self._leading and not unit.finished:
                        gate.wait()
                finally:
                    self._waiting -= 1
            if unit.finished:
                return False
            if not self._leading:  # held by no writer (close, a read): wait for it on the lock
                lock.acquire()
                break
        if unit.finished:
            lock.release()
            return False
        return True

    def _lead(self) -> None:
        """Commit every pending unit. Caller holds the commit lock; this releases it."""
        pending = self._pending
        batch: List[Any] = []
        self._leading = True
        try:
            batch = [pending.popleft() for _ in range(len(pending))]
            self._commit_batch(batch)
        finally:
            for waiting in batch:
                waiting.finished = True
            self._leading = False
            self._commit_lock.release()
            if self._waiting:
                with self._gate:
                    self._gate.notify_all()

    _commit_batch = _NextLeader._commit_batch


class _Shipped(SQLitePersistence):
    """The shipped store under NORMAL (writers queue on the commit lock), with its lock taking
    (``_take``) and its unit's batch (``_batch``) for variants H to K to change."""

    def _write(self, statements: list) -> None:
        if self._pid != os.getpid() or self._closed or self.read_only or self._broken:
            self._check_usable()
        unit = _Unit(statements)
        with shield():
            self._take(unit)
            try:
                if not unit.done:
                    self._commit_pending(self._batch(unit))
            finally:
                self._give()
        _raise_unless_done(self, unit)

    def _take(self, unit: _Unit) -> None:
        self._pending.append(unit)
        self._commit_lock.acquire()

    def _give(self) -> None:
        self._commit_lock.release()

    def _batch(self, unit: _Unit) -> List[_Unit]:
        return []  # (_commit_pending adds every unit pending, this one too)


class _Spins(_Shipped):
    """Variant H: a writer that finds the commit lock taken tries it again after each of SPINS
    ``time.sleep(0)`` (the GIL released, the thread not asleep), then waits for it."""

    def _take(self, unit: _Unit) -> None:
        self._pending.append(unit)
        lock = self._commit_lock
        if lock.acquire(False):
            return
        for _ in range(SPINS):
            time.sleep(0)
            if lock.acquire(False):
                return
        lock.acquire()


class _ExecuteMany(SQLitePersistence):
    """Variant I: the shipped store, a single statement run by ``executemany`` with one row of
    parameters (CPython's ``execute`` also releases the GIL around sqlite3_last_insert_rowid)."""

    def _execute(self, statements: list) -> None:
        if len(statements) == 1:
            sql, parameters = statements[0]
            cursor = self._cursor
            cursor.executemany(sql, (parameters,))
            columns = module._SAVES.get(sql)
            if columns is None or cursor.rowcount * columns >= len(parameters):
                return
        super()._execute(statements)


class _Solo(_Shipped):
    """Variant J: no group commit: a writer commits its own unit, alone, once it has the commit lock."""

    def _take(self, unit: _Unit) -> None:
        self._commit_lock.acquire()

    def _batch(self, unit: _Unit) -> List[_Unit]:
        return [unit]


class _WaitsOffTheLock(_Shipped):
    """Variant K: a writer that finds the commit lock taken waits on a Condition, which each release
    notifies (one waiter), and takes the lock only while it holds the GIL: no writer holds the
    commit lock while it waits for the GIL (in the shipped store a writer woken by a release has
    the lock before it has the GIL back)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._released = threading.Condition(threading.Lock())

    def _take(self, unit: _Unit) -> None:
        self._pending.append(unit)
        lock = self._commit_lock
        while not lock.acquire(False):
            with self._released:
                if lock.acquire(False):  # (under the Condition's lock: no release slips by unseen)
                    return
                self._released.wait()

    def _give(self) -> None:
        self._commit_lock.release()
        with self._released:
            self._released.notify()


def _raise_unless_done(store: SQLitePersistence, unit: _Unit) -> None:
    if not unit.done:
        error = unit.error
        if isinstance(error, PersistenceError):
            raise error
        raise PersistenceError(f"{store!r}: write failed: {error or 'interrupted before its commit'}") from error


VARIANTS: Dict[str, Tuple[str, type]] = {
    "A": ("before G: followers on the commit lock", _QueueOnLock),
    "B": ("followers on locks of their own", _OwnLocks),
    "C": (f"B + gather <= {GATHER_WINDOW * 1e6:.0f}us", _OwnLocksGathering),
    "D": ("next leader on the commit lock, others own", _NextLeader),
    "E": (f"leader keeps leading <= {KEEP_LEADING} batches", _KeepLeading),
    "F": ("A, but a writer done returns, lock-free", _DoneReturns),
    "G": ("shipped: D+savers gather (FULL), A (NORMAL)", SQLitePersistence),
    "H": (f"A + {SPINS} sleep(0) tries before it waits", _Spins),
    "I": ("G, one statement by executemany", _ExecuteMany),
    "J": ("no group commit: own unit only", _Solo),
    "K": ("A, waiting off the lock (notify one)", _WaitsOffTheLock),
}
# jobs, producer threads, workers, seconds each job runs
CASES = {"one": (1000, 1, 0, 0.0), "four": (1000, 4, 0, 0.0), "e2e": (10_000, 1, 4, 0.0),
         "e2e-busy": (2000, 1, 4, 0.0002)}


def _no_op(job: Job) -> None:
    return None


def _produce(queue: Queue, payloads: List[dict], producers: int) -> None:
    if producers == 1:
        for payload in payloads:
            queue.enqueue(Job("email", payload))
        return
    barrier = threading.Barrier(producers)

    def produce(share: List[dict]) -> None:
        barrier.wait()
        for payload in share:
            queue.enqueue(Job("email", payload))

    threads = [threading.Thread(target=produce, args=(payloads[k::producers],)) for k in range(producers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def _rounds(variant: str, case: str, synchronous: str) -> List[Tuple[float, ...]]:
    """(cpu us/job, wall us/job, voluntary switches/job, units/commit) of ROUNDS rounds on a fresh store."""
    jobs, producers, workers, job_seconds = CASES[case]
    store_class = VARIANTS[variant][1]
    with tempfile.TemporaryDirectory() as tmp:
        store = store_class(os.path.join(tmp, "ab.db"), synchronous=synchronous)
        queue = Queue(config=Config(buffer_size=10_000_000))
        queue.set_persistence(store)
        if workers:
            queue.register_executor("email", (lambda job: time.sleep(job_seconds)) if job_seconds else _no_op)
            queue.start_dispatcher(workers)
        batches: List[int] = []
        commit = store._commit

        def counted_commit(batch: list) -> None:
            batches.append(len(batch))
            commit(batch)

        store._commit = counted_commit  # type: ignore[method-assign]
        figures = []
        for round_number in range(ROUNDS + 1):
            payloads = _payloads(jobs)
            batches.clear()
            switches = resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw
            cpu, wall = time.process_time(), time.perf_counter()
            _produce(queue, payloads, producers)
            if workers:
                assert queue.join(120)
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            switches = resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw - switches
            if round_number:
                figures.append((cpu / jobs * 1e6, wall / jobs * 1e6, switches / jobs, sum(batches) / len(batches)))
        queue.stop()
        assert sum(store.counts().values()) == (0 if workers else jobs * (ROUNDS + 1))
        store.close()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--pairs", type=int, default=4, help="rounds of every variant, in alternating order")
    parser.add_argument("--variants", default="A,B,C", help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--cases", default="one,four,e2e", help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--synchronous", default="NORMAL", choices=("NORMAL", "FULL"))
    args = parser.parse_args()
    variants, cases = args.variants.split(","), args.cases.split(",")
    results: Dict[Tuple[str, str], List[Tuple[float, ...]]] = {}
    for pair in range(args.pairs):
        for case in cases:
            for variant in variants if pair % 2 == 0 else variants[::-1]:
                results.setdefault((case, variant), []).extend(_rounds(variant, case, args.synchronous))
    print(f"{os.cpu_count()} CPUs; synchronous={args.synchronous}; medians of {ROUNDS * args.pairs} rounds per variant")
    for case in cases:
        jobs, producers, workers, job_seconds = CASES[case]
        print(f"{case}: {jobs} jobs, {producers} producer thread(s), {workers} workers, "
              f"jobs of {job_seconds * 1e3:g} ms")
        for variant in variants:
            rows = results[case, variant]
            cpu, wall, switches, units = (statistics.median(row[i] for row in rows) for i in range(4))
            print(f"  {variant} {VARIANTS[variant][0]:38s} cpu {cpu:6.1f}us/job  wall {wall:6.1f}us/job "
                  f"({1e3 / wall:5.1f}k jobs/s)  voluntary switches {switches:4.2f}/job  units/commit {units:4.2f}")


if __name__ == "__main__":
    main()
