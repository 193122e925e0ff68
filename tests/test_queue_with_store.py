"""The Queue driven with a recording store: what it asks of a store, and when.

API.md "Persistence", "Failures are never silent", "Stats", "Queue" (stop) and
"Clocks and validation" (DuplicateJob). The store below keeps its records in
memory and logs every call in order, with a copy of the job's fields at call
time, so each test states what a user relies on: a job is stored before a
worker can see it, stays stored until it has finished, and a stop() never
costs it an attempt.

``RecordingStore`` has every optional hook (``save_many``, ``mark_running``,
``mark_dead``); ``MinimalStore`` has only ``save``, ``delete`` and ``load_all``,
for the paths where the Queue falls back.
"""
import asyncio
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Tuple

import pytest

from tinymq import (
    Config,
    ExecutorConfig,
    Job,
    PersistenceError,
    Priority,
    Queue,
    QueueFull,
    QueueStopped,
    RetryConfig,
    TinyMQError,
)

from tinymq.queue import _WAIT_SLICE

from _helpers import WAIT, FailureLog, Recorder, make_queue, wait_until


class Boom(Exception):
    pass


def no_retries():
    return RetryConfig(max_retries=0)


def fast_retries(max_retries, initial_delay=0.01):
    return RetryConfig(max_retries=max_retries, initial_delay=initial_delay, max_delay=1.0)


def duplicate_job_class():
    """``tinymq.DuplicateJob``, imported where a test needs it (one missing name fails only those)."""
    from tinymq import DuplicateJob

    return DuplicateJob


# --- the stores -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Snap:
    """A job's fields as a store call saw them; ``state`` is the store's record after the call."""

    id: str
    retries: int
    run_at: float
    state: Optional[str]  # "ready", "running", "dead", or None (not stored)


@dataclass(frozen=True)
class Call:
    method: str
    job: Optional[Snap] = None  # save, mark_running, mark_dead
    job_id: Optional[str] = None  # delete
    batch: Tuple[Snap, ...] = ()  # save_many
    reason: Optional[str] = None  # mark_dead
    exc: Any = None  # mark_dead
    thread: Any = field(default=None, compare=False)

    def concerns(self, job_id):
        if self.job is not None:
            return self.job.id == job_id
        if self.job_id is not None:
            return self.job_id == job_id
        return any(snap.id == job_id for snap in self.batch)


def clone(job):
    """A detached copy, as a real store would read it back."""
    copy = Job(job.type, job.payload, priority=job.priority, tags=job.tags, run_at=job.run_at,
               retry_config=job.retry_config, id=job.id)
    copy.timestamp = job.timestamp
    copy.retries = job.retries
    copy.last_error = job.last_error
    return copy


class MinimalStore:
    """In memory, thread-safe, only the three required methods; every call is logged in order.

    ``fail_save``: an exception that ``save`` raises (nothing is stored then).
    ``slow``: {method: seconds} a method takes, to widen the windows a race needs.
    """

    def __init__(self, jobs=(), fail_save=None, slow=None):
        self._cond = threading.Condition()
        self._calls = []
        self.records = {}  # id -> [Job copy, state]; guarded by _cond
        for job in jobs:
            self.records[job.id] = [clone(job), "ready"]
        self.fail_save = fail_save
        self.slow = dict(slow or {})

    # recording

    def _pause(self, method):
        seconds = self.slow.get(method)
        if seconds:
            threading.Event().wait(seconds)  # a slow disk, to widen a race window

    def _snap(self, job):
        record = self.records.get(job.id)
        return Snap(job.id, job.retries, job.run_at, None if record is None else record[1])

    def _log(self, call):
        self._calls.append(call)
        self._cond.notify_all()

    # the protocol

    def save(self, job):
        self._pause("save")
        with self._cond:
            if self.fail_save is not None:
                self._log(Call("save", job=Snap(job.id, job.retries, job.run_at, None),
                               thread=threading.current_thread()))
                raise self.fail_save
            self.records[job.id] = [clone(job), "ready"]
            self._log(Call("save", job=self._snap(job), thread=threading.current_thread()))

    def delete(self, job_id):
        self._pause("delete")
        with self._cond:
            self.records.pop(job_id, None)
            self._log(Call("delete", job_id=job_id, thread=threading.current_thread()))

    def load_all(self):
        with self._cond:
            self._log(Call("load_all", thread=threading.current_thread()))
            return [clone(job) for job, state in self.records.values() if state != "dead"]

    # what the tests read

    @property
    def calls(self):
        with self._cond:
            return list(self._calls)

    def calls_for(self, job_id):
        with self._cond:
            return [call for call in self._calls if call.concerns(job_id)]

    def methods_for(self, job_id):
        return [call.method for call in self.calls_for(job_id)]

    def state_of(self, job_id):
        with self._cond:
            record = self.records.get(job_id)
            return None if record is None else record[1]

    def stored(self, job_id):
        with self._cond:
            record = self.records.get(job_id)
            return None if record is None else clone(record[0])

    def wait_for(self, predicate, timeout=WAIT):
        """True once ``predicate(calls)`` holds."""
        with self._cond:
            return self._cond.wait_for(lambda: predicate(list(self._calls)), timeout)


class RecordingStore(MinimalStore):
    """MinimalStore plus every optional hook: save_many, mark_running, mark_dead."""

    def __init__(self, jobs=(), fail_save=None, fail_save_many=None, slow=None):
        super().__init__(jobs, fail_save, slow)
        self.fail_save_many = fail_save_many

    def save_many(self, jobs):
        jobs = list(jobs)
        self._pause("save_many")
        with self._cond:
            if self.fail_save_many is not None:  # all or nothing: nothing stored
                self._log(Call("save_many", batch=tuple(Snap(j.id, j.retries, j.run_at, None) for j in jobs),
                               thread=threading.current_thread()))
                raise self.fail_save_many
            for job in jobs:
                self.records[job.id] = [clone(job), "ready"]
            self._log(Call("save_many", batch=tuple(self._snap(job) for job in jobs),
                           thread=threading.current_thread()))

    def mark_running(self, job):
        self._pause("mark_running")
        with self._cond:
            record = self.records.get(job.id)
            if record is not None:
                record[1] = "running"
            self._log(Call("mark_running", job=self._snap(job), thread=threading.current_thread()))

    def mark_dead(self, job, reason, exc):
        self._pause("mark_dead")
        with self._cond:
            self.records[job.id] = [clone(job), "dead"]
            self._log(Call("mark_dead", job=self._snap(job), reason=reason, exc=exc,
                           thread=threading.current_thread()))


BOTH_STORES = pytest.mark.parametrize("store_class", [RecordingStore, MinimalStore],
                                      ids=["full-store", "minimal-store"])


def finishing_calls(store, job_id):
    """The calls that end a job's life in the store: delete and mark_dead."""
    return [call for call in store.calls_for(job_id) if call.method in ("delete", "mark_dead")]


# --- save before visible ------------------------------------------------------------------

@pytest.mark.parametrize("delayed", [False, True], ids=["ready", "delayed"])
def test_a_job_is_saved_before_a_worker_can_see_it(delayed):
    # A slow save: a job made visible before its save returns runs first. For a delayed job
    # the save outlasts the delay, so one put in the delayed set before its save comes due first.
    store = RecordingStore(slow={"save": 0.1 if delayed else 0.01})
    seen = Recorder()  # (job id, its store calls as the executor sees them)

    def executor(job):
        seen.add((job.id, store.calls_for(job.id)))

    with Queue(10) as q:
        q.set_persistence(store)
        q.register_executor("t", executor)
        q.start_dispatcher(2)
        jobs = [Job("t", i) for i in range(5)]
        for job in jobs:
            if delayed:
                q.enqueue_delayed(job, 0.05)
            else:
                q.enqueue(job)
        assert q.join(WAIT)
    assert len(seen) == 5
    for job_id, calls in seen.items:
        assert calls, f"job {job_id} ran before anything was stored"
        assert calls[0].method == "save" and calls[0].job.retries == 0, calls


@BOTH_STORES
@pytest.mark.parametrize("delayed", [False, True], ids=["ready", "delayed"])
def test_a_failing_save_makes_enqueue_raise_and_the_job_is_neither_run_nor_counted(store_class, delayed):
    disk_full = OSError("disk full")
    store = store_class(fail_save=disk_full)
    ran = Recorder()
    with Queue(10) as q:
        failures = FailureLog(q)
        q.on_failure(failures.callback)
        q.set_persistence(store)
        q.register_executor("t", lambda job: ran.add(job.payload))
        q.start_dispatcher(1)
        job = Job("t", "unsaved")
        with pytest.raises(PersistenceError) as raised:
            if delayed:
                q.enqueue_delayed(job, 0.01)
            else:
                q.enqueue(job)
        assert raised.value.__cause__ is disk_full
        stats = q.get_stats()
        assert stats.jobs_enqueued == 0
        assert stats.delayed_jobs_count == 0
        assert (stats.high_queue_size, stats.medium_queue_size, stats.low_queue_size) == (0, 0, 0)
        assert q.join(0) is True, "a job whose save failed counts as unfinished"
        # a job saved afterwards runs alone: the unsaved one never reaches a worker
        store.fail_save = None
        q.enqueue_delayed(Job("t", "saved"), 0.05) if delayed else q.enqueue(Job("t", "saved"))
        assert q.join(WAIT)
        assert q.get_stats().jobs_enqueued == 1
    assert ran.items == ["saved"]
    assert failures.entries == []
    assert store.state_of(job.id) is None
    assert finishing_calls(store, job.id) == []


# --- waiting for room -----------------------------------------------------------------------

def _enqueue_waiting(q, job, how, timeout):
    """``q.enqueue(job, block=True)``, or the same awaited as ``aenqueue`` on a loop of its own."""
    if how == "enqueue":
        return q.enqueue(job, block=True, timeout=timeout)
    return asyncio.run(q.aenqueue(job, block=True, timeout=timeout))


# Fixed (smallfix): aenqueue(block=True) waited for room in slices that each called enqueue again:
# every slice saved the job, found no room and deleted it, while enqueue(block=True) saves once.
@pytest.mark.parametrize("how", ["enqueue", "aenqueue"])
def test_a_job_that_waits_for_room_in_vain_is_saved_once_and_deleted_once(how):
    store = RecordingStore()
    with Queue(1) as q:
        q.set_persistence(store)
        q.enqueue(Job("t", id="first"))  # the buffer is full; nothing runs before start_dispatcher
        with pytest.raises(QueueFull):  # a wait that spans several of aenqueue's slices
            _enqueue_waiting(q, Job("t", id="second"), how, 3 * _WAIT_SLICE)
        assert store.methods_for("second") == ["save", "delete"]
        assert q.get_stats().jobs_enqueued == 1


class UndoingStore(RecordingStore):
    """RecordingStore plus ``undo_save``: a save taken back puts back what it replaced."""

    def __init__(self):
        super().__init__()
        self.replaced = {}  # id -> the record its last save replaced

    def save(self, job):
        with self._cond:
            self.replaced[job.id] = self.records.get(job.id)
        super().save(job)

    def save_many(self, jobs):
        jobs = list(jobs)
        with self._cond:
            self.replaced.update((job.id, self.records.get(job.id)) for job in jobs)
        super().save_many(jobs)

    def undo_save(self, job_id):
        with self._cond:
            replaced = self.replaced.pop(job_id, None)
            if replaced is not None:
                self.records[job_id] = replaced
            else:
                self.records.pop(job_id, None)
            self._log(Call("undo_save", job_id=job_id, thread=threading.current_thread()))


@pytest.mark.parametrize("store_class", [UndoingStore, RecordingStore, MinimalStore],
                         ids=["undo_save", "full-store", "minimal-store"])
@pytest.mark.parametrize("how", ["enqueue", "enqueue_many", "enqueue-blocking", "aenqueue-blocking"])
def test_a_refused_job_s_save_is_taken_back_with_undo_save_or_else_delete(store_class, how):
    """A job saved and then refused (QueueFull) is taken back with the store's undo_save, which can put
    back a dead job's row of the same id; a store without it gets the delete it always got."""
    dead = Job("t", "dead one", id="second")
    store = store_class()
    store.records["second"] = [clone(dead), "dead"]
    with Queue(1) as q:
        q.set_persistence(store)
        q.enqueue(Job("t", id="first"))  # the buffer is full; nothing runs before start_dispatcher
        with pytest.raises(QueueFull):
            job = Job("t", "new one", id="second")
            if how == "enqueue":
                q.enqueue(job)
            elif how == "enqueue_many":
                q.enqueue_many([job])
            else:
                _enqueue_waiting(q, job, how.split("-")[0], _WAIT_SLICE)
    saved = "save_many" if how == "enqueue_many" and store_class is not MinimalStore else "save"
    undone = "undo_save" if store_class is UndoingStore else "delete"
    assert store.methods_for("second") == [saved, undone]
    if store_class is UndoingStore:
        assert store.state_of("second") == "dead" and store.stored("second").payload == "dead one"


@pytest.mark.parametrize("how", ["enqueue", "aenqueue"])
def test_a_job_that_waits_for_room_keeps_its_row_until_it_is_placed(how):
    store = RecordingStore()
    ran = Recorder()
    with Queue(1) as q:
        q.set_persistence(store)
        q.register_executor("t", lambda job: ran.add(job.id))
        q.enqueue(Job("t", id="first"))
        placed = Recorder()
        producer = threading.Thread(
            target=lambda: placed.add(_enqueue_waiting(q, Job("t", id="second"), how, WAIT).id))
        producer.start()
        assert store.wait_for(lambda calls: any(call.concerns("second") for call in calls))
        assert store.state_of("second") == "ready"  # stored before the wait, kept through it
        q.start_dispatcher(1)  # "first" runs: room for "second"
        producer.join(WAIT)
        assert placed.snapshot() == ["second"]
        assert q.join(WAIT)
    assert ran.snapshot() == ["first", "second"]
    assert store.methods_for("second") == ["save", "mark_running", "delete"]


# --- retries --------------------------------------------------------------------------------

def test_a_scheduled_retry_is_saved_with_more_retries_and_a_later_run_at_before_it_runs():
    store = RecordingStore()
    failed_at = []  # wall-clock time of the failed attempt's end
    seen_by_retry = []

    def flaky(job):
        if job.retries == 0:
            failed_at.append(time.time())
            raise Boom("first attempt")
        seen_by_retry.append(store.calls_for(job.id))

    with Queue(10) as q:
        q.set_persistence(store)
        q.register_executor("t", flaky)
        q.start_dispatcher(1)
        job = q.enqueue(Job("t", retry_config=fast_retries(1, initial_delay=0.1)))
        first_run_at = job.run_at
        assert q.join(WAIT)
    assert len(seen_by_retry) == 1
    saves = [call for call in seen_by_retry[0] if call.method == "save"]
    assert [call.job.retries for call in saves] == [0, 1], "the retry was not saved before it ran"
    retry_save = saves[1]
    assert retry_save.job.run_at > first_run_at
    assert retry_save.job.run_at >= failed_at[0] + 0.1 * 0.9, "the saved run_at is not the backoff's"
    assert store.methods_for(job.id) == ["save", "mark_running", "save", "mark_running", "delete"]


def test_mark_running_is_called_as_each_attempt_starts():
    store = RecordingStore()
    at_start = []  # (retries, the last store call for the job) as each attempt starts

    def flaky(job):
        calls = store.calls_for(job.id)
        at_start.append((job.retries, calls[-1].method, calls[-1].job.retries, store.state_of(job.id)))
        if job.retries < 2:
            raise Boom(job.retries)

    with Queue(10) as q:
        q.set_persistence(store)
        q.register_executor("t", flaky)
        q.start_dispatcher(1)
        job = q.enqueue(Job("t", retry_config=fast_retries(2)))
        assert q.join(WAIT)
    assert at_start == [(0, "mark_running", 0, "running"),
                        (1, "mark_running", 1, "running"),
                        (2, "mark_running", 2, "running")]
    assert store.methods_for(job.id) == [
        "save", "mark_running", "save", "mark_running", "save", "mark_running", "delete"]


@pytest.mark.parametrize("kind", ["thread", "async"])
def test_a_slow_start_write_is_not_the_attempts_time(kind):
    """docs/api.md: "The timeout is the function's time": a store slow to record an attempt's
    start (mark_running) never times out an attempt whose function has not been called."""
    timeout, held_for = 0.2, 1.0  # the write is held for many timeouts
    writing, written = threading.Event(), threading.Event()

    class SlowStartStore(RecordingStore):
        def mark_running(self, job):
            writing.set()
            written.wait(WAIT)  # SQLite waiting for its lock
            super().mark_running(job)

    ran = []
    if kind == "thread":
        def run(job):
            ran.append(job.id)
    else:
        async def run(job):
            ran.append(job.id)

    with Queue(10) as q:
        q.set_persistence(SlowStartStore())
        q.register_executor("t", run, ExecutorConfig(timeout=timeout))
        q.start_dispatcher(1)
        job = q.enqueue(Job("t", retry_config=no_retries()))
        assert writing.wait(WAIT)
        since = time.monotonic()
        while q.get_stats().jobs_timed_out == 0 and time.monotonic() - since < held_for:
            time.sleep(0.01)  # (counted from before the write, the timeout would have come by now)
        written.set()
        assert q.join(WAIT)
        stats = q.get_stats()
    assert ran == [job.id]
    assert (stats.jobs_succeeded, stats.jobs_timed_out, stats.jobs_failed) == (1, 0, 0)


# --- success --------------------------------------------------------------------------------

@BOTH_STORES
def test_a_succeeded_job_is_deleted_before_join_returns(store_class):
    store = store_class(slow={"delete": 0.01})  # a slow delete widens the window join must not slip through
    with Queue(100) as q:
        failures = FailureLog(q)
        q.on_failure(failures.callback)
        q.set_persistence(store)
        q.register_executor("t", lambda job: None)
        q.start_dispatcher(2)
        jobs = [q.enqueue(Job("t", i)) for i in range(20)]
        assert q.join(WAIT)
        deleted = [job.id for job in jobs if [c.method for c in finishing_calls(store, job.id)] == ["delete"]]
        assert len(deleted) == 20, f"join() returned before {20 - len(deleted)} deletes"
        assert q.get_stats().jobs_succeeded == 20
    assert all(store.state_of(job.id) is None for job in jobs)
    assert failures.entries == []


class SwitchingStore(RecordingStore):
    """RecordingStore plus ``delete_and_mark_running``: a worker's finished job and its next, in one call."""

    def delete_and_mark_running(self, job_id, job):
        with self._cond:
            self.records.pop(job_id, None)
            record = self.records.get(job.id)
            if record is not None:
                record[1] = "running"
            self._log(Call("delete_and_mark_running", job=self._snap(job), job_id=job_id,
                           thread=threading.current_thread()))


def test_a_store_with_delete_and_mark_running_ends_each_success_with_the_next_start():
    store = SwitchingStore()
    gate = threading.Event()
    at_start = []  # (payload, its own row's state, the previous job's row's state) as each attempt starts

    def fn(job):
        previous = jobs[job.payload - 1].id if job.payload else None
        at_start.append((job.payload, store.state_of(job.id), previous and store.state_of(previous)))
        if job.payload == 0:
            gate.wait(WAIT)  # the others queue up behind it

    with Queue(100) as q:
        q.set_persistence(store)
        q.register_executor("t", fn)
        q.start_dispatcher(1)
        jobs = [q.enqueue(Job("t", i)) for i in range(4)]
        gate.set()
        assert q.join(WAIT)
        assert [store.state_of(job.id) for job in jobs] == [None] * 4  # each deleted before join returned
        assert q.get_stats().jobs_succeeded == 4
    assert at_start == [(0, "running", None), (1, "running", None), (2, "running", None), (3, "running", None)]
    ending = [(call.method, call.job_id, call.job and call.job.id) for call in store.calls
              if call.method in ("mark_running", "delete_and_mark_running", "delete")]
    assert ending == [
        ("mark_running", None, jobs[0].id),
        ("delete_and_mark_running", jobs[0].id, jobs[1].id),
        ("delete_and_mark_running", jobs[1].id, jobs[2].id),
        ("delete_and_mark_running", jobs[2].id, jobs[3].id),
        ("delete", jobs[3].id, None),  # nothing ready next: deleted on its own
    ]


# --- permanent failures ------------------------------------------------------------------------

@BOTH_STORES
def test_a_permanently_failed_job_is_marked_dead_or_deleted_after_callbacks_and_before_join(store_class):
    store = store_class(slow={"delete": 0.05, "mark_dead": 0.05})
    error = Boom("always")
    finished_in_callback = []

    def always_fails(job):
        raise error

    with Queue(10) as q:
        failures = FailureLog(q)
        q.on_failure(failures.callback)
        q.on_failure(lambda job, reason, exc: finished_in_callback.append(finishing_calls(store, job.id)))
        q.set_persistence(store)
        q.register_executor("t", always_fails)
        q.start_dispatcher(1)
        job = q.enqueue(Job("t", retry_config=fast_retries(1)))
        assert q.join(WAIT)
        finished = finishing_calls(store, job.id)  # right after join returned
        stats = q.get_stats()
    assert failures.reasons() == ["retries_exhausted"]
    assert failures.entries[0][2] is error
    assert finished_in_callback == [[]], "the store finished the job before the failure callbacks ran"
    assert stats.jobs_failed == 1 and stats.jobs_retried == 1
    if store_class is RecordingStore:
        assert [(c.method, c.reason, c.exc) for c in finished] == [("mark_dead", "retries_exhausted", error)]
        assert finished[0].job.retries == 2
        assert store.state_of(job.id) == "dead"
    else:
        assert [(c.method, c.job_id) for c in finished] == [("delete", job.id)]
        assert store.state_of(job.id) is None


@BOTH_STORES
def test_a_job_without_an_executor_is_marked_dead_or_deleted(store_class):
    store = store_class(slow={"delete": 0.05, "mark_dead": 0.05})
    with Queue(10) as q:
        failures = FailureLog(q)
        q.on_failure(failures.callback)
        q.set_persistence(store)
        q.start_dispatcher(1)
        job = q.enqueue(Job("nobody-runs-this"))
        assert q.join(WAIT)
        finished = finishing_calls(store, job.id)
    assert failures.reasons() == ["no_executor"]
    if store_class is RecordingStore:
        assert [(c.method, c.reason, c.exc) for c in finished] == [("mark_dead", "no_executor", None)]
    else:
        assert [(c.method, c.job_id) for c in finished] == [("delete", job.id)]


@BOTH_STORES
def test_an_evicted_job_is_marked_dead_or_deleted_before_the_evicting_enqueue_returns(store_class):
    store = store_class()
    with make_queue(max_delayed_jobs=1) as q:
        failures = FailureLog(q)
        q.on_failure(failures.callback)
        q.set_persistence(store)
        q.register_executor("t", lambda job: None)
        first = q.enqueue_delayed(Job("t", "first"), 60)
        second = q.enqueue_delayed(Job("t", "second"), 120)
        finished = finishing_calls(store, first.id)  # right after the evicting enqueue returned
        stats = q.get_stats()
    assert failures.reasons() == ["evicted"]
    assert failures.entries[0][0] is first
    assert stats.jobs_evicted == 1 and stats.delayed_jobs_count == 1
    if store_class is RecordingStore:
        assert [(c.method, c.reason, c.exc) for c in finished] == [("mark_dead", "evicted", None)]
        assert store.state_of(first.id) == "dead"
    else:
        assert [(c.method, c.job_id) for c in finished] == [("delete", first.id)]
    assert finishing_calls(store, second.id) == []
    assert store.state_of(second.id) == "ready"  # stop() leaves it stored


# --- enqueue_many ---------------------------------------------------------------------------

def batch_of_jobs():
    now = time.time()
    return [Job("t", 0), Job("t", 1), Job("t", 2, run_at=now + 0.05), Job("t", 3)]


@BOTH_STORES
def test_enqueue_many_saves_the_batch_before_any_of_it_runs(store_class):
    store = store_class()
    seen = Recorder()

    def executor(job):
        seen.add([call.method for call in store.calls_for(job.id)])

    with Queue(10) as q:
        q.set_persistence(store)
        q.register_executor("t", executor)
        q.start_dispatcher(2)
        jobs = q.enqueue_many(batch_of_jobs())
        assert q.join(WAIT)
    ids = [job.id for job in jobs]
    saving = [call for call in store.calls if call.method in ("save", "save_many")]
    if store_class is RecordingStore:
        assert len(saving) == 1 and saving[0].method == "save_many", "not one save_many for the batch"
        assert [snap.id for snap in saving[0].batch] == ids
        for methods in seen.items:
            assert methods[0] == "save_many", methods
    else:
        assert [call.job.id for call in saving] == ids, "not one save per job, in order"
        for methods in seen.items:
            assert methods[0] == "save", methods
    assert len(seen) == 4
    assert all(store.state_of(job_id) is None for job_id in ids)


def test_a_failing_save_many_enqueues_nothing():
    broken = OSError("transaction aborted")
    store = RecordingStore(fail_save_many=broken)
    ran = Recorder()
    with Queue(10) as q:
        failures = FailureLog(q)
        q.on_failure(failures.callback)
        q.set_persistence(store)
        q.register_executor("t", lambda job: ran.add(job.payload))
        q.start_dispatcher(1)
        batch = batch_of_jobs()
        with pytest.raises(PersistenceError) as raised:
            q.enqueue_many(batch)
        assert raised.value.__cause__ is broken
        stats = q.get_stats()
        assert stats.jobs_enqueued == 0 and stats.delayed_jobs_count == 0
        assert (stats.high_queue_size, stats.medium_queue_size, stats.low_queue_size) == (0, 0, 0)
        assert q.join(0) is True
        q.enqueue(Job("t", "after"))
        assert q.join(WAIT)
    assert ran.items == ["after"]
    assert failures.entries == []
    for job in batch:
        assert store.methods_for(job.id) == ["save_many"], "a job of the refused batch was saved alone"
        assert store.state_of(job.id) is None


# --- stop -------------------------------------------------------------------------------------

def cooperative(entered, cancel_seen, finished):
    """An executor that waits for its cancellation, then says so with ctx.check()."""

    def fn(job, ctx):
        entered.add(threading.current_thread())
        try:
            if ctx.wait(WAIT):
                cancel_seen.append(ctx.cancelled)
            ctx.check()
        finally:
            finished.set()

    return fn


@pytest.mark.parametrize("stop_kwargs", [{"wait": False}, {"timeout": 0.2}], ids=["wait=False", "timeout=0.2"])
def test_an_attempt_cancelled_by_stop_is_not_a_failure_and_stays_stored(stop_kwargs):
    store = RecordingStore()
    entered, cancel_seen, finished = Recorder(), [], threading.Event()
    q = Queue(10)
    try:
        failures = FailureLog(q)
        q.on_failure(failures.callback)
        q.set_persistence(store)
        q.register_executor("t", cooperative(entered, cancel_seen, finished),
                            ExecutorConfig(max_concurrent_jobs=1, timeout=None))
        q.start_dispatcher(1)
        running = q.enqueue(Job("t", "running", retry_config=fast_retries(3)))
        assert entered.wait_for(1)
        queued = [q.enqueue(Job("t", f"queued-{i}")) for i in range(2)]
        delayed = q.enqueue_delayed(Job("t", "delayed"), 60)
        started = time.monotonic()
        before_stop = len(store.calls)  # the cancel happens after this point
    finally:
        q.stop(**stop_kwargs)
    assert time.monotonic() - started < WAIT / 2
    worker = entered.items[0]
    worker.join(WAIT)  # the worker finishes handling the cancelled attempt, then exits
    assert not worker.is_alive()
    assert finished.is_set() and cancel_seen, "stop() did not cancel the attempt's context"
    stats = q.get_stats()

    # not a failure: not counted, not retried, not reported
    assert failures.entries == []
    assert stats.jobs_failed == 0
    assert stats.jobs_retried == 0
    assert stats.jobs_timed_out == 0
    assert stats.jobs_succeeded == 0
    assert running.retries == 0
    # it stays stored, ready again (a save after the cancel), so a restart does not count a crash
    assert finishing_calls(store, running.id) == []
    after_cancel = [call for call in store.calls[before_stop:] if call.concerns(running.id)]
    assert [call.method for call in after_cancel] == ["save"], after_cancel
    assert after_cancel[0].job.retries == 0
    assert store.state_of(running.id) == "ready"
    assert store.stored(running.id).retries == 0
    # the jobs still queued are neither run, deleted nor marked dead
    assert len(entered) == 1
    for job in queued + [delayed]:
        assert store.methods_for(job.id) == ["save"], job.payload
        assert store.state_of(job.id) == "ready"


def test_stop_with_wait_and_no_timeout_lets_a_cooperative_attempt_finish():
    store = RecordingStore()
    entered = threading.Event()
    stop_called = threading.Event()
    outcome = {}

    def fn(job, ctx):
        entered.set()
        assert stop_called.wait(WAIT)
        # stop() is under way: it must not cancel us (it cancels at once when it does)
        outcome["cancelled"] = ctx.wait(0.5)
        ctx.check()

    q = Queue(10)
    stopper = threading.Thread(target=lambda: (stop_called.set(), q.stop(wait=True)))
    try:
        failures = FailureLog(q)
        q.on_failure(failures.callback)
        q.set_persistence(store)
        q.register_executor("t", fn, ExecutorConfig(timeout=None))
        q.start_dispatcher(1)
        job = q.enqueue(Job("t", retry_config=fast_retries(3)))
        assert entered.wait(WAIT)
        stopper.start()
        stopper.join(WAIT)
        assert not stopper.is_alive(), "stop(wait=True) did not return"
    finally:
        stop_called.set()
        q.stop(wait=False)
    stats = q.get_stats()
    assert outcome == {"cancelled": False}, "stop(wait=True) cancelled a running attempt"
    assert stats.jobs_succeeded == 1
    assert stats.jobs_failed == stats.jobs_retried == 0
    assert failures.entries == []
    assert [call.method for call in finishing_calls(store, job.id)] == ["delete"]
    assert store.state_of(job.id) is None


def test_stop_leaves_queued_and_delayed_jobs_stored():
    store = MinimalStore()
    with Queue(10) as q:
        q.set_persistence(store)
        q.register_executor("t", lambda job: None)
        jobs = [q.enqueue(Job("t", i)) for i in range(3)] + [q.enqueue_delayed(Job("t", "later"), 60)]
    with pytest.raises(QueueStopped):
        q.enqueue(Job("t"))
    for job in jobs:
        assert store.methods_for(job.id) == ["save"]
        assert store.state_of(job.id) == "ready"


# --- set_persistence ------------------------------------------------------------------------

def test_set_persistence_recovers_every_stored_job_and_delayed_ones_keep_their_run_at():
    now = time.time()
    stored = [
        Job("t", "ready-1", run_at=now - 5),
        Job("t", "ready-2"),
        Job("t", "delayed-1", run_at=now + 0.3),
        Job("t", "delayed-2", run_at=now + 0.5),
    ]
    store = RecordingStore(jobs=stored)
    started = {}  # payload -> (wall-clock start, run_at the executor sees)
    lock = threading.Lock()

    def executor(job):
        with lock:
            started[job.payload] = (time.time(), job.run_at)

    with make_queue(max_delayed_jobs=1) as q:
        failures = FailureLog(q)
        q.on_failure(failures.callback)
        q.register_executor("t", executor)
        q.set_persistence(store)
        stats = q.get_stats()
        assert stats.jobs_enqueued == 4
        assert stats.delayed_jobs_count == 2, "a recovered delayed job was dropped or run early"
        assert stats.jobs_evicted == 0
        # a new delayed job after recovery does not push a recovered one out either
        q.enqueue_delayed(Job("t", "new-delayed"), 0.2)
        assert q.get_stats().jobs_evicted == 0
        q.start_dispatcher(2)
        assert q.join(WAIT)
        stats = q.get_stats()
    assert failures.entries == []
    assert stats.jobs_succeeded == 5 and stats.jobs_evicted == 0
    assert [call.method for call in store.calls].count("mark_dead") == 0
    for job in stored:
        start, seen_run_at = started[job.payload]
        assert seen_run_at == pytest.approx(job.run_at, abs=1e-6), "recovery changed a run_at"
        if job.payload.startswith("delayed"):
            assert start >= job.run_at - 0.02, f"{job.payload} ran {job.run_at - start:.3f}s early"
        assert store.state_of(job.id) is None  # deleted once it succeeded


def test_set_persistence_twice_raises_and_changes_nothing():
    first = RecordingStore(jobs=[Job("t", "from-first", run_at=time.time() + 60)])
    second = RecordingStore(jobs=[Job("t", "from-second")])
    with Queue(10) as q:
        q.set_persistence(first)
        before = q.get_stats()
        with pytest.raises(RuntimeError):
            q.set_persistence(second)
        after = q.get_stats()
        job = q.enqueue(Job("t", "new"))
    assert before.jobs_enqueued == after.jobs_enqueued == 1
    assert (after.medium_queue_size, after.delayed_jobs_count) == (before.medium_queue_size, 1)
    assert [call.method for call in second.calls if call.method != "load_all"] == []
    assert first.methods_for(job.id) == ["save"], "the first store is no longer the one in use"


def test_set_persistence_of_an_empty_store_twice_raises():
    with Queue(10) as q:
        q.set_persistence(MinimalStore())
        with pytest.raises(RuntimeError):
            q.set_persistence(MinimalStore())


@pytest.mark.parametrize("delayed", [False, True], ids=["ready", "delayed"])
def test_set_persistence_after_a_job_was_enqueued_raises_and_changes_nothing(delayed):
    store = RecordingStore(jobs=[Job("t", "stored")])
    with Queue(10) as q:
        if delayed:
            q.enqueue_delayed(Job("t", "early"), 60)
        else:
            q.enqueue(Job("t", "early"))
        with pytest.raises(RuntimeError):
            q.set_persistence(store)
        stats = q.get_stats()
        later = q.enqueue(Job("t", "later"))
    assert stats.jobs_enqueued == 1, "the store's jobs were enqueued anyway"
    assert store.calls_for(later.id) == [], "the queue uses the store it refused"
    assert [call.method for call in store.calls if call.method != "load_all"] == []


# --- DuplicateJob ---------------------------------------------------------------------------

def test_duplicate_job_is_a_tinymq_error_and_a_value_error():
    DuplicateJob = duplicate_job_class()
    assert issubclass(DuplicateJob, TinyMQError)
    assert issubclass(DuplicateJob, ValueError)


@pytest.mark.parametrize("delayed", [False, True], ids=["ready", "delayed"])
def test_a_second_job_with_an_unfinished_id_raises_duplicate_job_and_saves_nothing(delayed):
    DuplicateJob = duplicate_job_class()
    store = RecordingStore()
    with Queue(10) as q:  # no dispatcher: the first job stays unfinished
        q.set_persistence(store)
        first = Job("t", "first", id="report-2026-12")
        if delayed:
            q.enqueue_delayed(first, 60)
        else:
            q.enqueue(first)
        before = q.get_stats()
        with pytest.raises(DuplicateJob) as raised:
            q.enqueue(Job("t", "second", id="report-2026-12"))
        assert isinstance(raised.value, TinyMQError) and isinstance(raised.value, ValueError)
        with pytest.raises(DuplicateJob):
            q.enqueue_delayed(Job("t", "third", id="report-2026-12"), 30)
        after = q.get_stats()
    assert after == before, "a refused duplicate changed the queue"
    assert store.methods_for("report-2026-12") == ["save"], "the duplicate was saved"
    assert store.stored("report-2026-12").payload == "first"


def test_an_id_can_be_used_again_once_its_job_has_finished():
    duplicate_job_class()
    store = RecordingStore()
    ran = Recorder()

    def executor(job):
        ran.add(job.payload)
        if job.payload == "fails":
            raise Boom()

    with Queue(10) as q:
        q.set_persistence(store)
        q.register_executor("t", executor)
        q.start_dispatcher(1)
        for payload in ("succeeds", "fails", "again"):
            q.enqueue(Job("t", payload, id="unique", retry_config=no_retries()))
            assert q.join(WAIT)
    assert ran.items == ["succeeds", "fails", "again"]


def test_a_recovered_job_id_counts_as_unfinished():
    DuplicateJob = duplicate_job_class()
    store = RecordingStore(jobs=[Job("t", "recovered", id="r1")])
    with Queue(10) as q:
        q.set_persistence(store)
        with pytest.raises(DuplicateJob):
            q.enqueue(Job("t", "new", id="r1"))
        assert q.get_stats().jobs_enqueued == 1
    assert store.methods_for("r1") == []
    assert store.stored("r1").payload == "recovered"


@pytest.mark.parametrize("clash", ["with-an-unfinished-job", "within-the-batch"])
def test_enqueue_many_with_a_duplicate_id_enqueues_nothing(clash):
    DuplicateJob = duplicate_job_class()
    store = RecordingStore()
    with Queue(10) as q:
        q.set_persistence(store)
        if clash == "with-an-unfinished-job":
            q.enqueue(Job("t", "first", id="dup"))
            batch = [Job("t", "a"), Job("t", "b", id="dup")]
        else:
            batch = [Job("t", "a"), Job("t", "b", id="dup"), Job("t", "c", id="dup")]
        before = q.get_stats()
        with pytest.raises(DuplicateJob):
            q.enqueue_many(batch)
        after = q.get_stats()
    assert after == before
    assert not any(call.method == "save_many" for call in store.calls), "the refused batch was saved"
    assert all(store.calls_for(job.id) == [] for job in batch if job.id != "dup")


@pytest.mark.parametrize(
    "attribute, value, error",
    [("priority", 7, ValueError), ("priority", True, ValueError), ("run_at", math.nan, ValueError),
     ("type", "", ValueError), ("retry_config", {"max_retries": 1}, TypeError)],
)
def test_enqueue_many_refuses_a_bad_attribute_before_the_store_sees_the_batch(attribute, value, error):
    """A bad attribute set after construction fails the whole batch before save_many, not after it."""
    store = RecordingStore()
    with Queue(10) as q:
        q.set_persistence(store)
        bad = Job("t")
        setattr(bad, attribute, value)
        with pytest.raises(error):
            q.enqueue_many([Job("t"), bad])
        assert [call.method for call in store.calls] == ["load_all"]
        assert q.get_stats().jobs_enqueued == 0


def test_enqueue_many_stores_and_runs_a_plain_int_priority_and_a_str_subclass_type_as_plain_values():
    class Kind(str):
        pass

    store = RecordingStore()
    with Queue(10) as q:
        q.set_persistence(store)
        job = Job("t")
        job.priority = 2
        job.type = Kind("t")
        q.enqueue_many([job])
        assert job.priority is Priority.HIGH and job.type.__class__ is str
        assert [call.method for call in store.calls] == ["load_all", "save_many"]
