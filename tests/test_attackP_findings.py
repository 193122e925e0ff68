"""Round-6 attack (attackP): the in-process changes (event loop rework, switch commit, idle watchdog) and cancel.

Each test is a reproducer of a defect found, or a property that held under attack and is kept
as a guard.
"""
import asyncio
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, deque

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import tinymq
from tinymq import ExecutorConfig, Job, Queue, RetryConfig, SQLitePersistence

from _helpers import STORES, WAIT, loop_takes, queue_with_store, run_model_test


@pytest.mark.parametrize("backend", STORES)
def test_cancel_of_a_job_in_transit_between_places_is_never_missed(backend, tmp_path):
    """Jobs that never finish on their own (every attempt fails, retried at once or after a tiny delay,
    on worker threads and on the event loop) are cancelled from several threads at random moments,
    each by two threads: exactly one cancel returns True (an unfinished job is never missed while it
    moves between ready, delayed, the loop's hand-over, a worker and its retry), the job is reported
    "cancelled" exactly once, and no attempt of it starts after the winning cancel returned (the
    attempt it decided may enter its function just after: at most one start comes later)."""
    rng = random.Random(6)
    sequence = iter(range(10 ** 9))  # next() under the GIL: a global order of starts and cancels
    order_lock = threading.Lock()
    starts = {}  # job id -> sequence numbers of its attempts' starts

    def started(job):
        with order_lock:
            starts.setdefault(job.id, []).append(next(sequence))

    def fail_thread(job):
        started(job)
        raise RuntimeError("again")

    async def fail_async(job):
        started(job)
        if job.payload % 2:
            await asyncio.sleep(0)
        raise RuntimeError("again")

    retry_now = RetryConfig(max_retries=10 ** 6, initial_delay=0.0, max_delay=0.0)
    retry_soon = RetryConfig(max_retries=10 ** 6, initial_delay=0.001, max_delay=0.002)
    with queue_with_store(backend, tmp_path, buffer_size=10000) as q:
        reported = Counter()
        other = []
        q.on_failure(lambda job, reason, exc: reported.update([job.id]) if reason == "cancelled"
                     else other.append((job.id, reason)))
        q.register_executor("t", fail_thread)
        q.register_executor("a", fail_async)
        q.start_dispatcher(workers=4)
        jobs = [Job("t" if i % 2 else "a", i, retry_config=retry_now if i % 3 else retry_soon, id=f"job-{i}")
                for i in range(400)]
        for i, job in enumerate(jobs):
            if i % 5:
                q.enqueue(job)
            else:
                q.enqueue_delayed(job, 0.002)
        ids = [job.id for job in jobs] * 2
        rng.shuffle(ids)
        won = Counter()
        cancelled_at = {}
        errors = []
        go = threading.Barrier(4)

        def canceller(share):
            try:
                go.wait(WAIT)
                for job_id in share:
                    if rng.random() < 0.3:
                        time.sleep(0.0005)
                    if q.cancel(job_id):
                        at = next(sequence)
                        with order_lock:
                            won[job_id] += 1
                            cancelled_at[job_id] = at
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=canceller, args=(ids[k::4],)) for k in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WAIT * 6)
        assert not errors
        assert other == []
        missed = [job.id for job in jobs if won[job.id] != 1]
        assert not missed, f"{len(missed)} of {len(jobs)} jobs: cancel returned True {[won[i] for i in missed[:5]]} times"
        assert q.join(WAIT), "a job was neither cancelled nor finished"
        assert all(reported[job.id] == 1 for job in jobs), "reported 'cancelled' other than once"
        late = [job_id for job_id, at in cancelled_at.items() if sum(s > at for s in starts.get(job_id, ())) > 1]
        assert not late, f"attempts started after their job's cancel returned True: {late[:5]}"
        assert q.get_stats().jobs_cancelled == len(jobs)


@pytest.mark.parametrize("switch", [False, True], ids=["first_start", "switch"])
def test_stop_without_wait_while_a_start_is_being_marked_running_leaves_the_job_ready(tmp_path, switch):
    """stop(wait=False) saves a running attempt's job back as ready before it returns, and the
    cancelled attempt is not a failure. When the stop comes while the worker is writing that
    attempt's start (mark_running, or with a switch delete_and_mark_running), the start must not
    land after the save-back: the job would be stored "running", and the next start would count
    a crash that never happened."""
    path = str(tmp_path / "jobs.db")
    entered, stopped = threading.Event(), threading.Event()

    class SlowStartStore(SQLitePersistence):
        def mark_running(self, job):
            if job.payload == "b":
                entered.set()
                stopped.wait(WAIT)
            super().mark_running(job)

        def delete_and_mark_running(self, job_id, job):
            if job.payload == "b":
                entered.set()
                stopped.wait(WAIT)
            super().delete_and_mark_running(job_id, job)

    store = SlowStartStore(path)
    q = Queue()
    q.set_persistence(store)
    ran = threading.Event()

    def fn(job, ctx):
        if job.payload == "b":
            ran.set()
            ctx.check()  # raises: stop() cancelled the attempt

    q.register_executor("x", fn)
    if switch:
        q.enqueue(Job("x", "a"))  # the same worker ends it and starts "b" in one store call
    b = q.enqueue(Job("x", "b"))
    q.start_dispatcher(workers=1)
    try:
        assert entered.wait(WAIT)
        q.stop(wait=False)
    finally:
        stopped.set()
    assert ran.wait(WAIT)
    q.stop(wait=True, timeout=WAIT)  # the worker has left: nothing more is written
    store.close()
    again = SQLitePersistence(path)
    try:
        jobs = again.load_all()
        assert [(job.id, job.retries) for job in jobs] == [(b.id, 0)]
        assert again.take_crashed() == []
    finally:
        again.close()


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_sigkill_of_four_switching_workers_counts_each_crash_once_and_reruns_at_most_a_job_per_worker(tmp_path):
    """kill -9 at random moments of a durable queue whose 4 workers end a success and start their next
    job in one commit: every acknowledged job ends; each later attempt of a job comes from a later
    process and has its crash counted (the row was "running" at every kill that interrupted or
    followed its start, and never left "running" after its end was committed), at most once per
    process; a process reruns at most one finished job per worker."""
    total, workers, kills = 1500, 4, 10
    db, acked, log = (str(tmp_path / name) for name in ("jobs.db", "acked", "log"))
    child_path = os.path.join(os.path.dirname(__file__), "_switch_crash_child.py")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [
        os.path.dirname(os.path.dirname(tinymq.__file__)), os.environ.get("PYTHONPATH")])))
    command = [sys.executable, child_path, db, acked, log, str(total), str(workers)]
    rng = random.Random(11)

    def lines(path):
        try:
            with open(path) as f:
                return f.read().splitlines()
        except FileNotFoundError:
            return []

    killed = 0
    deadline = time.monotonic() + 120
    for _ in range(kills):
        target = len(lines(log)) + rng.randint(1, 300)
        child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        while child.poll() is None and len(lines(log)) < target and time.monotonic() < deadline:
            time.sleep(0.0005)  # polling a file another process writes; not a synchronisation sleep
        if child.poll() is None:
            child.send_signal(signal.SIGKILL)
            killed += 1
        _, stderr = child.communicate()
        assert child.returncode in (0, -signal.SIGKILL), stderr.decode()
    final = subprocess.run(command, env=env, capture_output=True, timeout=120)
    assert final.returncode == 0 and b"done" in final.stdout, final.stderr.decode()
    assert killed >= kills // 2, "the child finished before most kills: test did not test"

    starts, ends = {}, {}
    for line in lines(log):
        kind, job_id, crashes, pid = line.split()
        (starts if kind == "start" else ends).setdefault(job_id, []).append((int(crashes), pid))
    accepted = set(lines(acked))
    assert len(accepted) == total
    assert all(job_id in ends for job_id in accepted), "a job whose enqueue returned never ended"
    processes = killed + 1 + 1  # the killed ones, the final one, and one that may have exited on its own
    for job_id in accepted:
        attempts = starts[job_id]
        for (crashes, pid), (next_crashes, next_pid) in zip(attempts, attempts[1:]):
            # A later attempt comes from a later process, with the crash counted: more than once when
            # a process in between was killed after marking the job running but before its function
            # wrote its start line.
            assert next_pid != pid and next_crashes > crashes, (job_id, attempts)
        assert attempts[-1][0] < processes, (job_id, attempts)  # at most one crash per process
    reruns = Counter(pid for job_id in accepted for _, pid in ends[job_id][:-1])
    assert max(reruns.values(), default=0) <= workers, reruns


@pytest.mark.parametrize("kind", ["thread", "async"])
@pytest.mark.parametrize("switch", [False, True], ids=["first_start", "switch"])
def test_an_attempt_cancelled_while_its_start_is_written_never_calls_its_function(tmp_path, kind, switch):
    """cancel() of an attempt whose start the store is still writing (mark_running, or a switch's
    delete_and_mark_running) returns True and reports it "cancelled": its function must then never
    be called, on a worker thread as on the event loop (where the task is cancelled before it)."""
    entered, cancelled = threading.Event(), threading.Event()

    class SlowStartStore(SQLitePersistence):
        def mark_running(self, job):
            if job.payload == "b":
                entered.set()
                cancelled.wait(WAIT)
            super().mark_running(job)

        def delete_and_mark_running(self, job_id, job):
            if job.payload == "b":
                entered.set()
                cancelled.wait(WAIT)
            super().delete_and_mark_running(job_id, job)

    store = SlowStartStore(str(tmp_path / "jobs.db"))
    q = Queue()
    q.set_persistence(store)
    called, reasons = [], []
    q.on_failure(lambda job, reason, exc: reasons.append((job.payload, reason)))
    if kind == "thread":
        def fn(job):
            called.append(job.payload)
    else:
        async def fn(job):
            called.append(job.payload)
    q.register_executor("x", fn)
    try:
        if switch:
            q.enqueue(Job("x", "a"))  # the same worker ends it and starts "b" in one store call
        b = q.enqueue(Job("x", "b"))
        q.start_dispatcher(workers=1)
        assert entered.wait(WAIT)
        workers = [t for t in threading.enumerate() if t.name.startswith("tinymq-worker")]
        try:
            assert q.cancel(b.id) is True
        finally:
            cancelled.set()
        assert q.join(WAIT)
        q.stop(wait=True, timeout=WAIT)
        for thread in workers:  # the cancelled attempt's worker was retired: stop() does not wait for it
            thread.join(WAIT)
            assert not thread.is_alive()
        assert reasons == [("b", "cancelled")]
        assert "b" not in called
    finally:
        q.stop(wait=False)
        store.close()


# --- max_concurrent_jobs and priority with thread and loop types mixed: the core against a model ---

class _Item:
    """What the core reads of a job: type, priority, _id."""

    __slots__ = ("type", "priority", "_id", "seq")

    def __init__(self, job_type, priority, seq):
        self.type, self.priority, self._id, self.seq = job_type, priority, f"id-{seq}", seq

    def __repr__(self):
        return f"_Item({self.type!r}, {self.priority}, {self.seq})"


def _noop(job):
    pass


_TYPES = ["t1", "t2", "a1", "a2"]  # t*: worker threads' types, a*: the event loop's


class MixedRunnersMachine(RuleBasedStateMachine):
    """ReadyQueue with thread and loop types, their limits changing, slots freed with and without a
    hand-off (a worker or runner going straight back for the next job, a loop success in one call):
    every pop and take is the model's (strict priority, then age, among types under their limit)."""

    core = None

    def __init__(self):
        super().__init__()
        self.queue = self.core.ReadyQueue(1000)
        self.handed = deque()  # the loop's (hand_to_loop)
        self.queue.set_loop_waker(None, self.handed)
        self.limits = {}
        for job_type in _TYPES:
            self.limits[job_type] = 2
            self.queue.configure(job_type, _noop, 2, None, False, False,
                                 self.core.LOOP if job_type[0] == "a" else self.core.THREADS)
        self.waiting = []  # the model: jobs waiting, in arrival order
        self.active = dict.fromkeys(_TYPES, 0)
        self.held = []  # (job, state) taken and not released
        self.made = 0

    def expected(self, loop):
        """The job the model gives next to a worker (or the loop), or None."""
        admissible = [job for job in self.waiting if (job.type[0] == "a") == loop
                      and self.active[job.type] < self.limits[job.type]]
        return min(admissible, key=lambda job: (-job.priority, job.seq)) if admissible else None

    def took(self, job, state):
        expected = self.expected(job.type[0] == "a")
        assert job is expected, (job, expected)
        assert state.name == job.type
        self.waiting.remove(job)
        self.active[job.type] += 1
        self.held.append((job, state))

    @rule(job_type=st.sampled_from(_TYPES), priority=st.integers(0, 2))
    def push(self, job_type, priority):
        self.made += 1
        job = _Item(job_type, priority, self.made)
        assert self.queue.push(job)
        self.waiting.append(job)

    @rule()
    def pop(self):
        taken = self.queue.pop_with_type(0)
        if taken is None:
            assert self.expected(False) is None
        else:
            self.took(*taken)

    @rule(n=st.integers(1, 4))
    def loop_take(self, n):
        taken = loop_takes(self.queue, n, self.handed)
        for job, state in taken:
            self.took(job, state)
        if len(taken) < n:
            assert self.expected(True) is None

    @precondition(lambda self: self.held)
    @rule(data=st.data(), hand_off=st.booleans(), straight_back=st.booleans())
    def release(self, data, hand_off, straight_back):
        job, state = self.held.pop(data.draw(st.integers(0, len(self.held) - 1)))
        loop = job.type[0] == "a"
        self.queue.release_state(state, hand_off, self.core.LOOP if loop else self.core.THREADS)
        self.active[job.type] -= 1
        self.queue.task_done(job)
        if straight_back:  # the releaser takes its next job at once
            if loop:
                self.loop_take(1)
            else:
                self.pop()

    @precondition(lambda self: any(job.type[0] == "a" for job, _ in self.held))
    @rule(data=st.data())
    def loop_success(self, data):
        loops = [i for i, (job, _) in enumerate(self.held) if job.type[0] == "a"]
        job, state = self.held.pop(data.draw(st.sampled_from(loops)))
        self.queue.loop_attempt_succeeded(state, 0.001, job)
        self.active[job.type] -= 1
        self.loop_take(1)

    @rule(job_type=st.sampled_from(_TYPES), limit=st.integers(1, 3))
    def configure(self, job_type, limit):
        self.queue.configure(job_type, _noop, limit, None, False, False,
                             self.core.LOOP if job_type[0] == "a" else self.core.THREADS)
        self.limits[job_type] = limit

    @precondition(lambda self: self.waiting)
    @rule(data=st.data())
    def remove(self, data):
        job = data.draw(st.sampled_from(self.waiting))
        assert self.queue.remove(job._id) is job
        self.waiting.remove(job)
        self.queue.task_done(job)

    @invariant()
    def counts(self):
        stats = self.queue.executor_stats()
        for job_type in _TYPES:
            assert stats[job_type][0] == self.active[job_type]
        assert len(self.queue) == len(self.waiting)


def test_max_concurrent_jobs_and_priority_with_thread_and_loop_types_match_the_model(core):
    run_model_test(MixedRunnersMachine, core, max_examples=150, steps=60)


def test_a_switch_interrupted_by_a_cancel_of_the_next_attempt_still_deletes_the_finished_job(tmp_path):
    """With interrupt_on_timeout, a cancel of the next job interrupts the worker's thread; during a
    switch that thread is inside the store call that also ends the finished job, so the interruption
    waits until that call has returned (tinymq's own code is never cut). The finished job succeeded:
    its row must still be deleted (else a clean restart runs it again). (The next job's own timeout
    cannot come there: it counts from its function's call.)"""
    switching, cancelled = threading.Event(), threading.Event()

    class SlowSwitchStore(SQLitePersistence):
        def delete_and_mark_running(self, job_id, job):
            if job.payload == "b":
                switching.set()
                cancelled.wait(WAIT)  # the cancel's interruption comes while the store call runs
            super().delete_and_mark_running(job_id, job)

    store = SlowSwitchStore(str(tmp_path / "jobs.db"))
    q = Queue()
    q.set_persistence(store)
    reasons = []
    q.on_failure(lambda job, reason, exc: reasons.append((job.payload, reason, exc)))
    q.register_executor("x", _noop, ExecutorConfig(timeout=0.2, interrupt_on_timeout=True))
    try:
        a = q.enqueue(Job("x", "a"))
        b = q.enqueue(Job("x", "b", retry_config=RetryConfig(max_retries=0)))
        q.start_dispatcher(workers=1)
        assert switching.wait(WAIT)
        assert q.cancel(b.id)
        cancelled.set()
        assert q.join(WAIT)
        assert reasons == [("b", "cancelled", None)]
        assert a.id not in [job.id for job in store.jobs()]
    finally:
        q.stop(wait=False)
        store.close()


def test_stop_waiting_does_not_wait_for_an_async_attempt_that_timed_out_meanwhile(tmp_path):
    """stop(wait=True) waits for running attempts, their timeouts still applying, and never for
    attempts that already timed out: an async attempt whose timeout comes during the wait, and
    whose coroutine ignores its cancellation, must not hold stop() until the coroutine ends."""
    released, started = threading.Event(), threading.Event()

    async def stubborn(job):
        started.set()
        end = time.monotonic() + 1.5 * WAIT
        while time.monotonic() < end and not released.is_set():
            try:
                await asyncio.sleep(0.02)
            except asyncio.CancelledError:
                pass  # ignores its cancellation

    with queue_with_store("memory", tmp_path) as q:
        q.register_executor("s", stubborn, ExecutorConfig(timeout=0.3))
        q.start_dispatcher(workers=1)
        q.enqueue(Job("s", retry_config=RetryConfig(max_retries=0)))
        assert started.wait(WAIT)
        began = time.monotonic()
        try:
            q.stop(wait=True)
            took = time.monotonic() - began
        finally:
            released.set()
        assert took < WAIT, f"stop(wait=True) took {took:.1f}s: it waited for the timed-out coroutine"
