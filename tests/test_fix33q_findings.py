"""Defects an outside attack found and session 32 left open (fixed by fix33q), one test each or more.

Each test failed before its fix. The queue-level tests run on the core in use (run the file with
TINYMQ_NO_EXTENSIONS=1 too); the core tests run against both twins (the ``core`` fixture).
"""
import asyncio
import os
import threading

import pytest

from _helpers import WAIT, handed_to_loop


# --- 1. A job the event loop took, not started as stop() comes, counts as ready, not running --------
#
# The loop takes a batch of its jobs from the core (their slots with them) and starts them one after
# another; a coroutine that blocks the loop (a call that does not await) keeps the rest of the batch
# taken and unstarted. stop() gave them back only once the loop came to them: until then (after
# stop() returned too) get_stats() counted them as attempts running (active_jobs), which they never
# are. close() now takes them back in its own step, as it does a worker thread's handed job.
@pytest.mark.parametrize("with_store", [False, True])
def test_jobs_the_loop_took_and_had_not_started_at_stop_count_as_ready_and_stay_unrun(tmp_path, with_store):
    from tinymq import ExecutorConfig, Job, Queue, SQLitePersistence

    holding, release = threading.Event(), threading.Event()
    loop_thread = []
    ran = []

    async def hold(job):
        loop_thread.append(threading.current_thread())
        q.enqueue_many([Job("t", 1, id="j1"), Job("t", 2, id="j2")])  # the loop is woken to take them
        await asyncio.sleep(0)  # back after that wake-up (FIFO): the loop has taken them, their runners not begun
        holding.set()
        release.wait(WAIT)  # blocks the loop (no await): they wait, taken and unstarted

    async def work(job):
        ran.append(job.payload)

    path = str(tmp_path / "jobs.db")
    q = Queue(100)
    q.register_executor("hold", hold)
    q.register_executor("t", work, ExecutorConfig(max_concurrent_jobs=5))
    store = None
    if with_store:
        store = SQLitePersistence(path)
        q.set_persistence(store)
    q.enqueue(Job("hold", 0, id="h"))
    q.start_dispatcher(1)
    try:
        assert holding.wait(WAIT)
        taken = q.get_stats()
        assert taken.executor_stats["t"].active_jobs == 2 and taken.medium_queue_size == 0, taken
        q.stop(timeout=0.1)  # "hold" ignores its cancellation: stop() returns with the loop still held
        stopped = q.get_stats()
    finally:
        release.set()
    assert loop_thread and loop_thread[0].join(WAIT) is None and not loop_thread[0].is_alive()
    assert stopped.executor_stats["t"].active_jobs == 0, (
        "after stop() the jobs the loop took and never started count as running")
    assert stopped.medium_queue_size == 2
    after = q.get_stats()  # the loop has ended: they never ran, and are still ready
    assert ran == []
    assert after.executor_stats["t"].active_jobs == 0 and after.medium_queue_size == 2
    assert after.jobs_succeeded == after.jobs_failed == after.jobs_cancelled == 0
    if store is not None:  # stored as ready: a queue taking the store over runs each once
        again = Queue(100)
        again.register_executor("hold", lambda job: None)
        again.register_executor("t", lambda job: ran.append(job.payload))
        again.set_persistence(store)
        again.start_dispatcher(1)
        assert again.join(timeout=WAIT)
        again.stop()
        store.close()
        assert sorted(ran) == [1, 2]


def test_over_redis_jobs_the_loop_took_and_had_not_started_at_stop_go_back_and_run_once_elsewhere(redis_backend):
    """The same over a broker: the jobs stop() takes back from the loop are given back to Redis with
    the rest of what the process holds unstarted, and another process runs each once."""
    from tinymq import ExecutorConfig, Job

    holding, release = threading.Event(), threading.Event()
    loop_thread = []
    ran = []
    q = redis_backend.queue(buffer_size=100)

    async def hold(job):
        loop_thread.append(threading.current_thread())
        q.enqueue_many([Job("t", 1, id="j1"), Job("t", 2, id="j2")])
        while q._ready.executor_stats()["t"][0] < 2:  # (fetched by the pump, then taken by the loop)
            await asyncio.sleep(0)  # back after the loop took them, their runners not begun
        holding.set()
        release.wait(WAIT)  # blocks the loop (no await): they wait, taken and unstarted

    async def work(job):
        ran.append(job.payload)

    q.register_executor("hold", hold)
    q.register_executor("t", work, ExecutorConfig(max_concurrent_jobs=5))
    q.enqueue(Job("hold", 0, id="h"))
    q.start_dispatcher(1)
    try:
        assert holding.wait(WAIT)
        q.stop(timeout=0.1)
        stopped = q.get_stats()
    finally:
        release.set()
    assert loop_thread and loop_thread[0].join(WAIT) is None and not loop_thread[0].is_alive()
    assert stopped.executor_stats["t"].active_jobs == 0, (
        "after stop() the jobs the loop took and never started count as running")
    assert ran == []
    other = redis_backend.queue(buffer_size=100)
    other.register_executor("hold", lambda job: None)
    other.register_executor("t", lambda job: ran.append(job.payload))
    other.start_dispatcher(1)
    assert other.join(timeout=WAIT)
    other.stop()
    assert sorted(ran) == [1, 2]


def test_a_job_handed_to_the_loop_as_the_core_closes_counts_as_ready_not_running(core):
    """The core's side: close() takes back, in its own step, what is left in the loop's deque
    (hand_to_loop); a job the loop popped before is the loop's; one whose cancel was requested stays
    for the loop to end as cancelled."""
    ready, handed = handed_to_loop(core, 4)
    assert [job.payload for job, _, _ in handed] == [0, 1, 2, 3]
    started = handed.popleft()  # the loop starts this one: it is the loop's
    assert ready.mark_cancel("a3")[0] == core.CANCEL_MARKED  # in the loop's hands: marked
    assert ready.executor_stats() == {"a": (4, 5)} and ready.sizes() == (0, 0, 0)
    ready.close()
    assert ready.executor_stats() == {"a": (2, 5)}, "close() left the loop's unstarted jobs counted running"
    assert ready.sizes() == (0, 2, 0)
    assert [job.payload for job, _, _ in handed] == [3]  # the cancelled one: the loop ends it
    assert started[0].payload == 0
    assert ready.hand_to_loop(8) == 0  # nothing is handed once closed
    assert ready.unfinished == 4


# --- 3. --version (and --help) to a full stdout ------------------------------------------------------
#
# docs/cli.md: a command whose stdout takes no more (a full disk) is an error, one clear message on
# stderr and exit 1. argparse writes --version and --help itself, ignores a failed write and exits
# 0: `python -m tinymq --version >/dev/full` said it had shown the version.

@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full here")
@pytest.mark.parametrize("args, prog", [(["--version"], "python -m tinymq"), (["--help"], "python -m tinymq"),
                                        (["status", "--help"], "python -m tinymq status")])
def test_version_and_help_to_a_full_stdout_fail_in_one_line(args, prog):
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    with open("/dev/full", "w") as full:
        result = subprocess.run([sys.executable, "-m", "tinymq", *args], stdout=full, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL, env=environment, text=True, timeout=60)
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert result.stderr == f"{prog}: error: could not write to stdout ([Errno 28] No space left on device)\n"


# --- 2. The pure core's pop() interrupted after the wake-up gives its job back ----------------------
#
# A KeyboardInterrupt that a signal handler raises in the main thread lands at any line the thread
# runs. The pure core's pop() gave back a job handed to it only if the interruption came while it
# slept: one that came after the wake-up (as it read the job, or returned it through pop()) lost
# the job, its type's slot held for good. Workers never call it so; a user of the core, or a test,
# may. A trace function raises it here at each line the core runs after the wake-up in turn: the
# job must be back in the queue, its slot free. (The compiled core runs no Python line there.)
#
# In a fresh interpreter: CPython 3.11 spins for good at a traced function's first line while an
# asynchronous exception set for another thread is pending (an earlier test's interrupt_on_timeout
# may leave one, its thread gone).

_POP_INTERRUPTED = r"""
import linecache, sys, threading
sys.path.insert(0, sys.argv[2])
from _helpers import WAIT, wait_until
from tinymq import Job
from tinymq import _core_py as core

how = sys.argv[1]


def pop_interrupted(ready, after, at):
    # ready.pop(timeout=WAIT), a KeyboardInterrupt raised at the at-th line (from 0; None: none)
    # that the core runs once `after` (a function of the core) has returned.
    seen = []
    armed = False

    def local(frame, event, arg):
        nonlocal armed
        if event == "return" and frame.f_code is after.__code__:
            armed = True
        elif event == "line" and armed:
            if linecache.getline(frame.f_code.co_filename, frame.f_lineno).lstrip().startswith("with "):
                # A `with` line as its block ends: traced before its __exit__ runs, where no signal is
                # ever checked (one that comes there is raised as __exit__ returns, the lock released).
                return local
            seen.append((frame.f_code.co_name, frame.f_lineno))
            if len(seen) - 1 == at:
                raise KeyboardInterrupt
        return local

    def trace(frame, event, arg):
        return local if frame.f_code.co_filename == core.__file__ else None

    sys.settrace(trace)
    try:
        outcome = ready.pop(timeout=WAIT)
    except KeyboardInterrupt as interrupt:
        outcome = interrupt
    finally:
        sys.settrace(None)
    return seen, outcome


def run(at):
    ready = core.ReadyQueue(10)
    ready.configure("t", lambda job: None, 1, None, False, False)
    job = Job("t", "the job")
    pusher = None
    if how == "handed":  # pushed as pop() waits: handed to it, which wakes up
        def push_once_waiting():
            assert wait_until(lambda: len(ready._getters) == 1)
            assert ready.push(job)

        pusher = threading.Thread(target=push_once_waiting)
        pusher.start()
        after = core._Waiter.sleep
    else:  # ready already: pop() takes it at once
        assert ready.push(job)
        after = core.ReadyQueue._take
    seen, outcome = pop_interrupted(ready, after, at)
    if pusher is not None:
        pusher.join(WAIT)
    return ready, job, seen, outcome


ready, job, lines, outcome = run(None)
assert outcome is job and len(lines) >= 2, lines
for at in range(len(lines)):
    ready, job, seen, outcome = run(at)
    assert isinstance(outcome, KeyboardInterrupt), (at, lines, outcome)
    assert (ready.sizes(), ready.executor_stats()) == ((0, 1, 0), {"t": (0, 1)}), (
        f"interrupted at {seen[-1]} of {lines}, pop() lost its job")
    assert ready.pop(timeout=0) is job  # given back, and poppable again
    assert ready.unfinished == 1
print("interrupted at", lines)
"""


@pytest.mark.parametrize("how", ["handed", "ready"])
def test_the_pure_cores_pop_interrupted_after_the_wake_up_gives_its_job_back(how):
    import subprocess
    import sys

    tests = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(tests)
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, "-c", _POP_INTERRUPTED, how, tests], env=environment,
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("interrupted at"), result.stdout


# --- 4. Prometheus: two job types never share a label -------------------------------------------------
#
# A label is the type's (or queue's) text as UTF-8: a lone surrogate was written escaped (``\udcff``),
# so a type holding that very text (backslash, u, d, c, f, f) got the same label: two types' samples
# under one label set, the metrics wrong (and the exposition invalid). Now a name holding a lone
# surrogate or the two characters ``\u`` has each backslash doubled as well (docs/api.md).

def test_a_type_named_like_an_escaped_surrogate_and_the_surrogate_get_different_labels():
    pytest.importorskip("prometheus_client")
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from tinymq import ExecutorConfig, Queue
    from tinymq.metrics import PrometheusCollector

    text, surrogate = "\\udcff", "\udcff"
    q = Queue(10)
    q.register_executor(text, lambda job: None, ExecutorConfig(max_concurrent_jobs=3))
    q.register_executor(surrogate, lambda job: None, ExecutorConfig(max_concurrent_jobs=5))
    registry = CollectorRegistry()
    registry.register(PrometheusCollector({"q\\u": q, "q\udcfe": Queue(10)}))
    exposed = generate_latest(registry).decode("utf-8")
    limits = {sample.labels["type"]: sample.value
              for family in text_string_to_metric_families(exposed) for sample in family.samples
              if sample.name == "tinymq_max_concurrent_jobs"}
    assert limits == {"\\\\udcff": 3, "\\udcff": 5}, limits
    queues = {sample.labels["queue"] for family in text_string_to_metric_families(exposed)
              for sample in family.samples}
    assert queues == {"q\\\\u", "q\\udcfe"}


def test_labels_are_one_to_one_and_names_without_a_surrogate_or_backslash_u_are_their_own():
    pytest.importorskip("prometheus_client")
    import itertools

    from tinymq.metrics import _label

    alphabet = ["\\", "u", "d", "c", "f", "\udcff", "\ud800", "x"]
    seen = {}
    for length in range(6):
        for letters in itertools.product(alphabet, repeat=length):
            name = "".join(letters)
            label = _label(name)
            label.encode("utf-8")  # (a label always goes out)
            assert seen.setdefault(label, name) == name, f"{name!r} and {seen[label]!r} share {label!r}"
            if "\\u" not in name and "\udcff" not in name and "\ud800" not in name:
                assert label == name
