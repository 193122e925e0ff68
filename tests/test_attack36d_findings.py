"""attack36d: "a job whose enqueue (or enqueue_many) returned is never lost", attacked from outside on
the SQLite store and over Redis (session 36).

One defect was found and fixed, and one of its kind left open (below). What held, tried by hand
(scripts of the session's report): a disk that fills up under enqueue, enqueue_many and 4
producers' group commits (NORMAL and FULL), and under the workers' running marks and deletes,
then freed; kill -9 during the first open, a take-over, close()
and enqueue_many of 3,000-job batches; three processes opening a new file at once; read_only and
``status --db`` racing an owner's writes and checkpoints, and its first open; retries and delayed
jobs across a kill; a poison job whose on_failure callback kills its process; an interpreter exit
with producers mid-enqueue; recovery of more jobs than the buffer and the delayed cap hold; odd and
huge ids; explicit ids colliding from two processes over Redis (enqueue and enqueue_many); Redis
killed under producers and worker processes with ``appendfsync everysec`` (test_redis_crash's (c)
run so); a FLUSHALL, or a restart without the AOF, under busy and idle workers (each logs the
ERROR docs/redis.md promises).

The first test here keeps the first of these: the file-size limit of its process (RLIMIT_FSIZE, what
a full disk is to SQLite: every write past it fails) stands in for a full disk, which earlier tests
only imitated by making one call raise.

Finding (fixed):

1. A payload holding an int of more digits than ``sys.get_int_max_str_digits()`` (4300 by default,
   Python 3.11 and the fixes of 3.7-3.10) was accepted by a process that had raised that limit
   (``sys.set_int_max_str_digits(0)``, ``PYTHONINTMAXSTRDIGITS``, ``-X int_max_str_digits``), and
   then never ran where the limit was the default: after a restart the SQLite store quarantined the
   job ("corrupt: ValueError: Exceeds the limit (4300 digits) for integer string conversion"), and
   over Redis the worker process that fetched it failed it for good as undecodable. A process that
   keeps the default refuses such a payload at enqueue (its JSON cannot be written), so the job the
   enqueue of another took was lost to every reader but one with the limit raised as well (the
   ``status``/``requeue-dead`` commands, a worker started without the setting, a Python upgrade).
   JSON text that the default decoder refuses for that alone is now decoded again with ints of any
   length (JSONSerializer.loads, which the Redis codec falls back to).

Open (strict xfail):

2. The same with the recursion limit, on Python 3.9 to 3.11 (where it bounds how deep json's C
   decoder nests): a process that raised it (``sys.setrecursionlimit(20000)``) stores a payload
   nested 3,000 levels deep (its check that the value decodes again runs under that limit), and a
   process with the default limit quarantines the job at the next start ("corrupt: RecursionError"),
   even on the decode thread of its own. From 3.12 the C recursion limit bounds both, the same in
   every process (3.12.1 refuses that payload at the save, 3.13 reads it). Not fixed: refusing at the
   save what the default limit cannot decode would refuse what an application that raises its limit
   at every start reads back today; a decoder that needs no recursion is more than a small change.
"""
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import tinymq
from tinymq import Job, Queue, SQLitePersistence

from _helpers import WAIT

ROOT = Path(tinymq.__file__).resolve().parent.parent
TIMEOUT = 120  # seconds for the child; it takes a few

resource = pytest.importorskip("resource")

# The child fills its disk (a file-size limit of 300 kB) with 4 producer threads, two enqueueing
# one job at a time and two enqueue_many of 20, each until its 5th refusal. Then, nothing at all
# writable (a limit of 0), its workers run every job accepted: their running marks and deletes
# fail. Then the limit is lifted: the store takes a (delayed) job again. It ends as kill -9 ends it.
CHILD = r"""
import json, os, resource, signal, sys, threading, time
from tinymq import Job, PersistenceError, Queue, SQLitePersistence

path, synchronous = sys.argv[1], sys.argv[2]
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead of killing us
store = SQLitePersistence(path, synchronous=synchronous)
q = Queue(1_000_000)
ran, lock = [], threading.Lock()
q.register_executor("t", lambda job: ran.append(job.id))
q.set_persistence(store)
resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, resource.RLIM_INFINITY))
acknowledged, refused, unexpected = [], [], []

def produce(name, many):
    refusals = 0
    for i in range(5000):
        ids = [f"{name}-{i}-{k}" for k in range(20)] if many else [f"{name}-{i}"]
        try:
            if many:
                q.enqueue_many([Job("t", "x" * 1000, id=job_id) for job_id in ids])
            else:
                q.enqueue(Job("t", "x" * 1000, id=ids[0]))
        except PersistenceError:
            refusals += 1
            with lock:
                refused.extend(ids)
            if refusals == 5:
                return
        except BaseException as exc:
            with lock:
                unexpected.append(repr(exc))
            return
        else:
            with lock:
                acknowledged.extend(ids)

producers = [threading.Thread(target=produce, args=(f"p{n}", n % 2 == 1)) for n in range(4)]
for thread in producers:
    thread.start()
for thread in producers:
    thread.join()
resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.RLIM_INFINITY))
q.start_dispatcher(2)
joined = q.join(timeout=60)
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
try:
    q.enqueue(Job("t", "x", id="after", run_at=time.time() + 3600))  # (kept: no worker runs it)
    after = "accepted"
except BaseException as exc:
    after = repr(exc)
print(json.dumps({"acknowledged": acknowledged, "refused": refused, "unexpected": unexpected,
                  "joined": joined, "ran": ran, "after": after}), flush=True)
os._exit(9)
"""


@pytest.mark.parametrize("synchronous", ["NORMAL", "FULL"])
def test_a_full_disk_loses_no_acknowledged_job_and_the_store_works_again_once_it_has_room(tmp_path,
                                                                                         synchronous):
    path = tmp_path / "jobs.db"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    child = subprocess.run([sys.executable, "-c", CHILD, str(path), synchronous], env=env, capture_output=True,
                           text=True, timeout=TIMEOUT)  # (pipes: the limit is on files only)
    assert child.stdout, child.stderr[-3000:]
    seen = json.loads(child.stdout)
    acknowledged = set(seen["acknowledged"])
    assert seen["unexpected"] == []  # a refused write raised PersistenceError to its caller, nothing else
    assert len(seen["refused"]) >= 4 * 5 and len(acknowledged) >= 20  # the disk did fill, after a while
    assert acknowledged.isdisjoint(seen["refused"])
    assert seen["joined"] and sorted(seen["ran"]) == sorted(acknowledged)  # marks and deletes failing stop no job
    assert seen["after"] == "accepted"  # space freed: the store takes jobs again
    with SQLitePersistence(path) as store:  # after the kill: nothing deleted, so every job is there
        stored = {job.id for job in store.load_all()}
        assert store.quarantined() == []
    assert acknowledged | {"after"} <= stored
    assert stored == acknowledged | {"after"}  # and no job whose enqueue raised


# --- 1. A payload's long int, written where the int digits limit was raised ------------------

BIG = 7 * 10 ** 5000  # 5001 digits: past the default limit of int() on text (4300)
needs_the_limit = pytest.mark.skipif(not hasattr(sys, "set_int_max_str_digits"), reason="a Python without the limit")


class raised_int_digits_limit:
    """The process's limit on int <-> text conversions lifted (as the writing process had it) for a ``with``."""

    def __enter__(self):
        self.before = sys.get_int_max_str_digits()
        sys.set_int_max_str_digits(0)

    def __exit__(self, *exc_info):
        sys.set_int_max_str_digits(self.before)


@needs_the_limit
def test_a_long_int_a_process_with_the_limit_raised_stored_runs_after_a_restart(path):
    with raised_int_digits_limit(), SQLitePersistence(path) as store:  # the process that enqueued it
        store.save(Job("t", {"n": BIG, "tail": [1, -2]}, id="big"))
    ran = []
    with SQLitePersistence(path) as store:  # the next start, with the default limit
        q = Queue(10)
        q.register_executor("t", lambda job: ran.append(job.payload))
        q.set_persistence(store)
        q.start_dispatcher(1)
        assert q.join(timeout=WAIT)
        q.stop()
        assert store.quarantined() == []
    assert [payload == {"n": BIG, "tail": [1, -2]} for payload in ran] == [True]  # (no repr: its digits)


@needs_the_limit
def test_a_long_int_a_producer_with_the_limit_raised_sent_runs_in_a_worker_process_over_redis(redis_backend):
    producer, worker = redis_backend.queue(), redis_backend.queue()
    with raised_int_digits_limit():
        producer.enqueue(Job("t", {"n": -BIG}, id="big"))
    ran, failed, done = [], [], threading.Event()
    worker.register_executor("t", lambda job: (ran.append(job.payload), done.set()))
    worker.on_failure(lambda job, *details: (failed.append(details), done.set()))
    worker.start_dispatcher(1)
    assert done.wait(WAIT)
    assert failed == []
    assert [payload == {"n": -BIG} for payload in ran] == [True]


# --- 2. A payload nested deeper than the default recursion limit decodes ----------------------

def nested(depth):
    value = []
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="from 3.12 the C recursion limit bounds json's depth, "
                                                        "the same in every process")
@pytest.mark.xfail(strict=True, reason="a payload nested past what the default recursion limit decodes, saved "
                                       "by a process that raised that limit, is quarantined by one that did not")
def test_a_deep_payload_a_process_with_the_recursion_limit_raised_stored_runs_after_a_restart(path):
    before = sys.getrecursionlimit()
    sys.setrecursionlimit(20_000)
    try:
        with SQLitePersistence(path) as store:  # the process that enqueued it (its check passes under its limit)
            store.save(Job("t", nested(3000), id="deep"))
    finally:
        sys.setrecursionlimit(before)
    with SQLitePersistence(path) as store:  # the next start, with the default limit
        assert [job.id for job in store.load_all()] == ["deep"]
        assert store.quarantined() == []
