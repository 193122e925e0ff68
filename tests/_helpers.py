"""Shared helpers for the Queue-level tests.

Everything here synchronises on events and conditions, never on sleeps: a test
waits for the thing it needs to have happened, with a generous deadline, and
fails with a clear message when it does not happen.

Executors are plain functions (closures), not bound methods or callable
instances, so that the single-argument ``fn(job)`` form is what the queue sees.
"""
import contextlib
import gc
import os
import sqlite3
import threading
import time

from hypothesis import HealthCheck, settings
from hypothesis.stateful import run_state_machine_as_test

from tinymq import Config, Job, Queue, SQLitePersistence

# Generous upper bound for "this should happen soon" on a noisy 2-core machine.
WAIT = 10.0
# How long to watch for something that must NOT happen (a bounded Event.wait).
QUIET = 0.25
# TINYMQ_EXAMPLES_DIVISOR=4: each hypothesis test tries a quarter of its examples (CI's runs on the
# oldest and newest Pythons; the runs on the main one try them all).
EXAMPLES_DIVISOR = int(os.environ.get("TINYMQ_EXAMPLES_DIVISOR", "1"))


def examples(count):
    """How many examples a hypothesis test that asks for ``count`` tries in this run (see EXAMPLES_DIVISOR)."""
    return max(1, count // EXAMPLES_DIVISOR)


def make_queue(**config):
    """A Queue with the given Config fields (use as a context manager)."""
    return Queue(config=Config(**config))


# The ``backend`` params of a test that runs with and without a SQLite store.
STORES = ["memory", "sqlite"]


@contextlib.contextmanager
def queue_with_store(backend, directory, **config):
    """A Queue of ``Config(**config)``, with a SQLite store in ``directory`` when ``backend`` is "sqlite".

    ``q.store`` is the store (None in memory). At the end the queue is stopped
    without waiting and the store closed.
    """
    q = Queue(config=Config(**config))
    store = None
    if backend == "sqlite":
        store = SQLitePersistence(os.path.join(str(directory), "jobs.db"))
        q.set_persistence(store)
    q.store = store
    try:
        yield q
    finally:
        q.stop(wait=False)
        if store is not None:
            store.close()


def record_failures(q, key=lambda job: job):
    """A Recorder of ``(key(job), reason, exc)`` for every ``on_failure`` call of ``q``."""
    failed = Recorder()
    q.on_failure(lambda job, reason, exc: failed.add((key(job), reason, exc)))
    return failed


def worker_threads():
    """The tinymq worker threads alive now, of every queue in the process: snapshot them before
    a test's ``start_dispatcher`` to tell its own from those another test's queue still ends."""
    return {thread for thread in threading.enumerate() if thread.name.startswith("tinymq-worker")}


def timed_stop(q, thread_name):
    """``q.stop()``'s duration in seconds; fails unless the Redis link's thread named ``thread_name``
    ("pump", "heartbeat") was running before it and has ended when it returns."""
    threads = [thread for thread in q._link._threads if thread_name in thread.name]
    assert threads and threads[0].is_alive()
    began = time.monotonic()
    q.stop()
    took = time.monotonic() - began
    assert not threads[0].is_alive(), f"the {thread_name} runs on after stop() returned"
    return took


class LockStandIn:
    """A stand-in for one of the library's locks that a test puts in its place: it passes every call
    on to ``lock`` (``_is_owned`` too: the library takes its RLocks with _sections.section, which
    asks it); a test's subclass overrides ``acquire`` or ``release`` to watch or interrupt."""

    def __init__(self, lock):
        self.lock = lock

    def acquire(self, blocking=True, timeout=-1):
        return self.lock.acquire(blocking, timeout)

    def release(self):
        self.lock.release()

    def _is_owned(self):
        return self.lock._is_owned()

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc_info):
        self.release()


def held_elsewhere(lock):
    """Whether another thread holds ``lock`` (an RLock, which has no locked() before Python 3.14)."""
    if lock.acquire(blocking=False):
        lock.release()
        return False
    return True


def wait_until(predicate, timeout=WAIT, interval=0.002):
    """Poll ``predicate`` until it is true or ``timeout`` passes; return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


class Recorder:
    """A thread-safe log of events that tests can wait on."""

    def __init__(self):
        self._cond = threading.Condition()
        self.items = []

    def add(self, item):
        with self._cond:
            self.items.append(item)
            self._cond.notify_all()

    def wait_for(self, count, timeout=WAIT):
        """True once at least ``count`` items have been recorded."""
        with self._cond:
            return self._cond.wait_for(lambda: len(self.items) >= count, timeout)

    def wait_until(self, predicate, timeout=WAIT):
        """True once ``predicate(items)`` holds."""
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self.items), timeout)

    def snapshot(self):
        with self._cond:
            return list(self.items)

    def __len__(self):
        with self._cond:
            return len(self.items)


class Blocker:
    """An executor that records each attempt and blocks until released.

    ``blocker.fn`` is the executor; it tracks how many attempts run at once
    (``active``/``max_active``) under a lock. Use ``with blocker:`` so that it
    is always released, even when an assertion fails, and the queue can stop.
    """

    def __init__(self, hold=WAIT, name="blocker"):
        self._cond = threading.Condition()
        self._release = threading.Event()
        self.hold = hold
        self.name = name
        self.started = []
        self.finished = []
        self.threads = []
        self.active = 0
        self.max_active = 0

        def fn(job):
            with self._cond:
                self.started.append(job)
                self.threads.append(threading.current_thread())
                self.active += 1
                self.max_active = max(self.max_active, self.active)
                self._cond.notify_all()
            try:
                if not self._release.wait(self.hold):
                    raise RuntimeError(f"{self.name} was never released")
            finally:
                with self._cond:
                    self.active -= 1
                    self.finished.append(job)
                    self._cond.notify_all()

        self.fn = fn

    def release(self):
        self._release.set()

    def wait_started(self, count, timeout=WAIT):
        with self._cond:
            return self._cond.wait_for(lambda: len(self.started) >= count, timeout)

    def wait_finished(self, count, timeout=WAIT):
        with self._cond:
            return self._cond.wait_for(lambda: len(self.finished) >= count, timeout)

    def started_payloads(self):
        with self._cond:
            return [job.payload for job in self.started]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()
        return False


class FailureLog:
    """An ``on_failure`` callback that records (job, reason, exc, thread, stats)."""

    def __init__(self, queue=None):
        self._recorder = Recorder()
        self.queue = queue

        def callback(job, reason, exc):
            stats = self.queue.get_stats() if self.queue is not None else None
            self._recorder.add((job, reason, exc, threading.current_thread(), stats))

        self.callback = callback

    @property
    def entries(self):
        return self._recorder.snapshot()

    def reasons(self):
        return [entry[1] for entry in self.entries]

    def wait_for(self, count, timeout=WAIT):
        return self._recorder.wait_for(count, timeout)

    def __len__(self):
        return len(self._recorder)


def run_model_test(machine_class, core, max_examples, steps):
    """Run the hypothesis state machine ``machine_class`` against ``core`` (a class per twin)."""
    machine = type(f"{machine_class.__name__}[{core.__name__}]", (machine_class,), {"core": core})
    run_state_machine_as_test(machine, settings=settings(
        max_examples=examples(max_examples), stateful_step_count=steps, deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]))


def loop_takes(ready, max_jobs, handed):
    """What the event loop takes from a core: ``ready.hand_to_loop(max_jobs)`` into ``handed`` (the
    deque given to ``set_loop_waker``, empty before), each job popped from it as a runner starting
    it does: [(job, type)], in the order the core handed them."""
    count = ready.hand_to_loop(max_jobs)
    assert count == len(handed), (count, len(handed))
    return [handed.popleft()[:2] for _ in range(count)]


def handed_to_loop(core, jobs):
    """A core whose type "a" (at most 5 at once) runs on the event loop, with ``jobs`` jobs ``a0``,
    ``a1``, ... (payload i) pushed and all handed to the loop: (the ReadyQueue, its deque)."""
    from collections import deque

    from tinymq import Job

    ready = core.ReadyQueue(10)
    ready.configure("a", lambda job: None, 5, None, False, False, core.LOOP)
    handed = deque()
    ready.set_loop_waker(lambda: None, handed)
    for i in range(jobs):
        assert ready.push(Job("a", i, id=f"a{i}"))
    assert ready.hand_to_loop(8) == jobs
    return ready, handed


def places(stats):
    """Where get_stats() puts the unfinished jobs: each one in exactly one place."""
    running = sum(executor.active_jobs for executor in stats.executor_stats.values())
    return (stats.high_queue_size + stats.medium_queue_size + stats.low_queue_size
            + stats.waiting_for_room + stats.delayed_jobs_count + running)


def ended(stats):
    """The accepted jobs that have ended: succeeded, failed for good (``no_executor`` and ``crashed``
    included), cancelled, or evicted. Each counter counts jobs here (retries and timeouts count
    attempts and are not among them)."""
    return stats.jobs_succeeded + stats.jobs_failed + stats.jobs_cancelled + stats.jobs_evicted


def all_accounted(stats):
    """Every accepted job is counted exactly once: in a place or among the ended.

    Exact until stop(), while no attempt that was decided before its function returned (timed out,
    or cancelled while running) still runs: such an attempt keeps its type's slot (active_jobs)
    while its job is placed again or ended.
    """
    return stats.jobs_enqueued == places(stats) + ended(stats)


def all_accounted_in_type(stats, job_type):
    """``all_accounted`` read through the type's own counters: for a queue whose jobs are all of
    ``job_type`` (which has an executor), its succeeded, failed and cancelled are the queue's."""
    executor = stats.executor_stats[job_type]
    return (all_accounted(stats) and executor.succeeded == stats.jobs_succeeded
            and executor.failed == stats.jobs_failed and executor.cancelled == stats.jobs_cancelled)


@contextlib.contextmanager
def stats_watched(q, holds):
    """Call ``q.get_stats()`` from another thread for as long as the block runs; yields the
    list of the snapshots for which ``holds(stats)`` was false (filled as they come)."""
    until, wrong = threading.Event(), []

    def watch():
        while not until.is_set():
            stats = q.get_stats()
            if not holds(stats):
                wrong.append(stats)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        yield wrong
    finally:
        until.set()
        watcher.join()


class LockedStore:
    """Another connection that holds SQLite's write lock of the store file ``path`` while the
    block runs (a migration, a backup tool): the store's own writes wait for it meanwhile."""

    def __init__(self, path):
        self.path = path

    def __enter__(self):
        self.conn = sqlite3.connect(self.path, timeout=0, isolation_level=None)
        self.conn.execute("BEGIN IMMEDIATE")
        return self

    def __exit__(self, *exc_info):
        self.conn.execute("ROLLBACK")
        self.conn.close()


def stored_payloads(path, read_only=False):
    """The payloads (as str, sorted) of the jobs a SQLite store at ``path`` keeps: loaded as a
    queue would at its start, or with ``read_only`` inspected (every row, dead ones included)."""
    with SQLitePersistence(path, read_only=read_only) as store:
        return sorted(str(job.payload) for job in (store.jobs() if read_only else store.load_all()))


class GatedStore(SQLitePersistence):
    """A SQLite store whose saves, once ``armed``, wait for ``release`` (``saving`` says one began)."""

    def __init__(self, path):
        super().__init__(path)
        self.armed = False
        self.saving = threading.Event()
        self.release = threading.Event()

    def save(self, job):
        if self.armed:
            self.saving.set()
            assert self.release.wait(WAIT)
        super().save(job)


def per_type_counts(q, job_type="t"):
    """This process's counters of ``job_type`` (its ExecutorStats), as a dict."""
    s = q.get_stats().executor_stats[job_type]
    return {"succeeded": s.succeeded, "failed": s.failed, "retried": s.retried, "timed_out": s.timed_out,
            "cancelled": s.cancelled}


def shared_counts(q):
    """The queue-wide counters (with a broker: Redis's, the fleet's), as a dict."""
    s = q.get_stats()
    return {"succeeded": s.jobs_succeeded, "failed": s.jobs_failed, "retried": s.jobs_retried,
            "timed_out": s.jobs_timed_out, "cancelled": s.jobs_cancelled}


def signal_after(owner, name):
    """An event set after each call of ``owner.<name>`` (replaced by a wrapper that calls it and
    then sets the event, even if it raised): a test waits on it, clearing it first, to know that
    the call happened."""
    called = threading.Event()
    wrapped = getattr(owner, name)

    def call(*args, **kwargs):
        try:
            return wrapped(*args, **kwargs)
        finally:
            called.set()

    setattr(owner, name, call)
    return called


def watch_join_looks(q):
    """An event set after each look of ``q``'s join() at Redis (the unfinished script)."""
    return signal_after(q.broker._scripts, "unfinished")


def another_programs_database(path, tables=("users",), version=0):
    """A SQLite file of another program at ``path`` (mode 0600): ``tables`` of one column, ``user_version``."""
    connection = sqlite3.connect(path)
    for table in tables:
        connection.execute(f"CREATE TABLE {table} (id TEXT)")
    connection.execute(f"PRAGMA user_version={version}")
    connection.commit()
    connection.close()
    os.chmod(path, 0o600)


def collect_garbage_that(call):
    """Run ``call()`` as the garbage collector runs a user's finalizer: from the ``__del__`` of
    a reference cycle, collected here, on the calling thread."""

    class Finalized:
        def __init__(self):
            self.cycle = self  # (freed by the collector only)

        def __del__(self):
            call()

    Finalized()
    gc.collect()


def save_in_thread(store, name, outcomes):
    """Start a thread (named ``name``) that saves job ``name`` in ``store``; ``outcomes[name]`` is then
    "returned" or what the save raised. Returns the thread."""

    def save():
        try:
            store.save(Job("t", id=name))
            outcomes[name] = "returned"
        except BaseException as exc:  # pragma: no cover - reported by the assertion
            outcomes[name] = exc

    thread = threading.Thread(target=save, name=name, daemon=True)
    thread.start()
    return thread
