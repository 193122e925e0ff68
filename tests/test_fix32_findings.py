"""Defects taken up by fix32 (session 32: left open by session 31), each with its test.

(1. ``active_jobs`` of a job handed to a worker as stop() closes the queue is in
tests/test_core_run_worker.py, beside the worker loop it is about.)
"""
import os

import pytest

from test_attack30d_findings import WAIT_FOR_CHILD, run_python

# --- 2. A child forked while a thread of the parent holds one of the queue's other locks -----------
#
# The core's, the dispatcher's and the loop's locks are made free again in a fork()ed child
# (_sections.reinit_after_fork), as a thread of the parent that held one at the fork is not there to
# release it. The Queue's claim lock (an enqueue with an id and a store), its schedules' locks
# (stop() takes one), the lock of the registry of the stores queues use (set_persistence) and the
# one of the registry of queue cores (every new Queue) were not: a child forked while a thread of the
# parent was inside one of those sections hung on its next call that takes it. The test holds each
# lock in a thread of the parent, standing for one inside that section at the fork, forks, and in
# the child makes the calls that take it, under a bound (the parent kills a child that hangs). The
# SQLite store's own locks are there too: a store used in a child refuses (PersistenceError naming
# the pids) before it takes any of them, and its close() there only marks it closed.
FORK_WHILE_A_LOCK_IS_HELD = r"""
import os, sys, threading, time
import tinymq, tinymq.queue, tinymq._unnamed
from tinymq import Job, PersistenceError, Queue, QueueStopped, SQLitePersistence

path, held = sys.argv[1], sys.argv[2]
store = SQLitePersistence(path + ".parent.db")
q = Queue()
q.set_persistence(store)
q.register_executor("t", lambda job: None)
q.every(3600, "t", None, name="hourly")
q.start_dispatcher(1)
lock = {
    "the queue's claim lock": lambda: q._claim_lock,
    "its schedules' lock": lambda: q._periodic._lock,
    "its schedules' firing lock": lambda: q._periodic._firing,
    "the store users' lock": lambda: tinymq.queue._store_users_lock,
    "the queue cores' lock": lambda: tinymq._unnamed._cores_lock,
    "the store's commit lock": lambda: store._commit_lock,
    "the store's gate": lambda: store._gate,
}[held]()
holding, release = threading.Event(), threading.Event()
def hold():
    with lock:
        holding.set()
        release.wait(60)
holder = threading.Thread(target=hold)
holder.start()
assert holding.wait(60)
pid = os.fork()
if pid == 0:
    try:
        try:
            q.enqueue(Job("t", id="in-the-child"))
        except QueueStopped:
            print("copy refused", flush=True)
        print("stats", q.get_stats().executor_stats["t"].max_jobs, flush=True)
        try:
            store.save(Job("t", id="saved-in-the-child"))
        except PersistenceError:
            print("store refused", flush=True)
        store.close()
        own = Queue()
        own.set_persistence(SQLitePersistence(path + ".child.db"))
        ran = []
        own.register_executor("t", ran.append)
        own.start_dispatcher(1)
        own.enqueue(Job("t", id="own"))
        print("own joined", own.join(timeout=20), len(ran), flush=True)
        own.stop()
        q.stop()
        print("copy stopped", flush=True)
    except BaseException as error:
        print("child failed", repr(error), flush=True)
        os._exit(1)
    os._exit(0)
child = pid
""" + WAIT_FOR_CHILD + r"""release.set()
holder.join()
q.enqueue(Job("t", id="in-the-parent"))
print("parent joined", q.join(timeout=20), flush=True)
q.stop()
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
@pytest.mark.parametrize("held", ["the queue's claim lock", "its schedules' lock", "its schedules' firing lock",
                                  "the store users' lock", "the queue cores' lock", "the store's commit lock",
                                  "the store's gate"])
def test_a_child_forked_while_a_thread_holds_a_lock_of_the_queue_or_its_store_does_not_hang(tmp_path, held):
    done = run_python(FORK_WHILE_A_LOCK_IS_HELD, tmp_path / "jobs", held)
    lines = done.stdout.splitlines()
    assert done.returncode == 0, (done.stdout, done.stderr[-3000:])
    assert lines == ["copy refused", "stats 10", "store refused", "own joined True 1", "copy stopped",
                     "child exited 0", "parent joined True"], (done.stdout, done.stderr[-3000:])


# --- 3. Code the collector runs inside a section of the SQLite store's or the Redis link's -----------
#
# The dispatcher's and the loop's locks refuse a call from code the garbage collector runs inside one
# of their sections on the same thread (a __del__, a weakref callback; gclock31). The SQLite store's
# commit lock and gate, and the Redis link's lock, were plain locks held across code that allocates:
# such code that cancelled a job, stopped the queue or saved to the store waited for its own thread's
# lock for good. Now those calls are refused with the same RuntimeError, before they do anything. The
# scripts hold the lock in a thread, as a commit or a round holds it, and drop there the last
# reference to an object whose __del__ calls the queue, as the collector would run it there.
REFUSED = "was called from code that ran inside one of tinymq's own locked sections"

CALLED_INSIDE_A_SECTION = r"""
import os, sys, threading
import tinymq
from tinymq import Config, Job, Queue, SQLitePersistence

REFUSED, backend, held, where = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
if backend == "redis":
    from tinymq.redis import RedisBroker
    q = Queue(broker=RedisBroker(where, name="fix32-sections", lease=2.0))
    store = None
else:
    store = SQLitePersistence(where, synchronous=backend)
    q = Queue()
    q.set_persistence(store)
q.register_executor("t", lambda job: None)
q.start_dispatcher(1)
q.enqueue_delayed(Job("t", id="waiting"), 3600)
lock = {"commit lock": lambda: store._commit_lock, "gate": lambda: store._gate, "link": lambda: q._link._lock}[held]()
calls = [("get_stats", lambda: q.get_stats().delayed_jobs_count), ("cancel", lambda: q.cancel("waiting")),
         ("enqueue", lambda: q.enqueue(Job("t", id="inside"))), ("stop", lambda: q.stop(wait=False))]
if store is not None:
    calls.append(("save", lambda: store.save(Job("t", id="saved"))))
outcomes = []

class CallsTheQueue:
    def __del__(self):
        for name, call in calls:
            try:
                result = call()
                outcomes.append(f"{name} {result.id if isinstance(result, Job) else result}")
            except Exception as error:
                outcomes.append(f"{name} refused" if REFUSED in str(error) else f"{name} {error!r}")

holder = [CallsTheQueue()]
def inside_the_section():
    with lock:
        holder.clear()  # its __del__ runs here, as the collector would run it there
thread = threading.Thread(target=inside_the_section, daemon=True)
thread.start()
thread.join(30)
if thread.is_alive():
    print("deadlocked", flush=True)
    os._exit(3)
print(*outcomes, sep="\n", flush=True)
print("stopping", q._dispatcher.stopping, flush=True)
if store is not None:
    print("stored", sorted(job.id for job in store.jobs()), flush=True)
print("cancelled", q.cancel("waiting"), flush=True)
print("enqueued", q.enqueue(Job("t", id="after")).id, "joined", q.join(timeout=20), flush=True)
q.stop()
"""


def _called_inside_a_section(backend, held, where):
    done = run_python(CALLED_INSIDE_A_SECTION, REFUSED, backend, held, where)
    lines = done.stdout.splitlines()
    assert done.returncode == 0 and "deadlocked" not in lines, (done.stdout, done.stderr[-3000:])
    return lines


@pytest.mark.parametrize("synchronous, held", [("NORMAL", "commit lock"), ("FULL", "commit lock"), ("FULL", "gate")])
def test_inside_a_section_of_the_sqlite_stores_calls_are_refused_having_done_nothing(path, synchronous, held):
    lines = _called_inside_a_section(synchronous, held, path)
    assert lines == ["get_stats 1", "cancel refused", "enqueue refused", "stop refused", "save refused",
                     "stopping False", "stored ['waiting']", "cancelled True", "enqueued after joined True"], lines


def test_inside_a_section_of_the_redis_links_calls_are_refused_having_done_nothing(redis_url):
    lines = _called_inside_a_section("redis", "link", redis_url)
    assert lines == ["get_stats 1", "cancel refused", "enqueue inside", "stop refused",
                     "stopping False", "cancelled True", "enqueued after joined True"], lines
