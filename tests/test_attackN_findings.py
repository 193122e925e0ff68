"""Round-8 attack (attackN) from outside: ids made after enqueue (tinymq/_unnamed.py, issue #13).

Each test reproduces a defect that the attack found; its fix is in the commit that removed
the test's xfail mark.
"""
import copy
import gc
import pickle
import threading
import time

import pytest

from tinymq import DuplicateJob, Job, PermanentFailure
from tinymq._pick_core import core as picked_core

from _helpers import WAIT, make_queue, wait_until
from conftest import load_twin
from test_core_run_worker import configure

# --- a cancel after the job's end was decided ------------------------------------------------


def test_an_id_first_read_after_the_end_was_decided_cannot_be_cancelled_in_the_core(core):
    ready = core.ReadyQueue(10)
    configure(ready, "t", lambda job: None)
    job = Job("t")
    assert ready.push(job)
    taken, state = ready.pop_with_type(0.0)
    assert taken is job
    ready.release_state(state)
    assert ready.decide_end(job) is False  # it fails for good, say: a cancel from now on loses
    outcome, _ = ready.mark_cancel(job.id)  # a failure callback reads the id, a cancel follows
    assert outcome == core.CANCEL_LOST  # (named as its end was decided, as if it had its id at enqueue)
    ready.task_done(job)
    assert ready.unfinished == 0 and not ready.has_id(job.id) and not ready.cancel_marks


def _fails_for_good(job):
    raise PermanentFailure(f"job {job.payload} cannot succeed")


# (what the queue does to the job, how to enqueue it, the reason it is reported with)
ENDS = [
    pytest.param({}, "t", 0.0, "permanent_failure", id="permanent_failure"),
    pytest.param({}, "nobody", 0.0, "no_executor", id="no_executor"),
    pytest.param({"max_delayed_jobs": 1}, "t", 30.0, "evicted", id="evicted"),
]


@pytest.mark.parametrize("config, job_type, delay, reason", ENDS)
def test_a_failure_callback_cancelling_its_own_job_by_id_gets_false(config, job_type, delay, reason):
    """The job's end is decided before the callbacks run: a cancel of it must lose (False), as it does
    for a job given its id at enqueue, and not return True for a job never reported "cancelled"."""
    with make_queue(**config) as q:
        seen = []

        def callback(job, why, exc):
            seen.append((job.payload, why, q.cancel(job.id)))

        q.on_failure(callback)
        q.register_executor("t", _fails_for_good)
        now = time.time()
        first = q.enqueue(Job(job_type, "first", run_at=now + delay))
        # The contract, for a job given its id at enqueue (with max_delayed_jobs=1: it evicts the first).
        q.enqueue(Job(job_type, "given", id="given-" + reason, run_at=now + 2 * delay))
        filler = q.enqueue(Job(job_type, "filler", run_at=now + 3 * delay)) if delay else None  # evicts it
        q.start_dispatcher(1)
        assert wait_until(lambda: len(seen) == 2)
        assert seen == [("first", reason, False), ("given", reason, False)]
        if filler is not None:
            assert q.cancel(filler.id) is True  # (an id read after enqueue: found, issue #13)
        assert q.join(WAIT)
        assert q.get_stats().jobs_cancelled == (0 if filler is None else 1)
        q.enqueue(Job(job_type, id=first.id))  # its id is free again
        assert q.cancel(first.id) is True


# --- copies of a queued job of a Job subclass ------------------------------------------------

class StatefulJob(Job):
    """A Job subclass with its own pickling state (a dict of every slot), as users write them."""

    __slots__ = ("attempt_log",)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.attempt_log = []

    def __getstate__(self):
        return {name: getattr(self, name) for name in Job.__slots__ + StatefulJob.__slots__}

    def __setstate__(self, state):
        for name, value in state.items():
            setattr(self, name, value)


@pytest.mark.parametrize("make_copy", [
    pytest.param(copy.copy, id="copy"),
    pytest.param(copy.deepcopy, id="deepcopy"),
    pytest.param(lambda job: pickle.loads(pickle.dumps(job)), id="pickle"),
])
def test_a_copy_of_a_queued_job_of_a_subclass_with_its_own_state_is_a_new_job(make_copy):
    with make_queue() as q:
        queued = q.enqueue(StatefulJob("t", "original"))
        twin = make_copy(queued)
        twin_id = twin.id  # the copy was never enqueued: its id is nobody's in the queue
        assert twin_id != queued.id
        assert q.cancel(twin_id) is False  # not True for a job that will never be reported
        q.enqueue(Job("t", id=twin_id))  # the id is free: no DuplicateJob
        q.register_executor("t", lambda job: None)
        q.start_dispatcher(1)
        assert q.join(WAIT)
        stats = q.get_stats()
        assert stats.jobs_succeeded == 2 and stats.jobs_cancelled == 0
        q.enqueue(Job("t", id=twin_id))  # and free again after that job ended
        assert q.join(WAIT)


# --- threads reading a job's first id at once -------------------------------------------------

def _kept_after_its_queue_is_gone():
    queue = make_queue()
    kept = queue.enqueue(Job("t"))
    del queue
    gc.collect()
    return kept


@pytest.mark.parametrize("make_job", [lambda: Job("t"), _kept_after_its_queue_is_gone],
                         ids=["new", "kept-after-its-queue"])
def test_threads_reading_a_jobs_first_id_at_once_all_get_the_one_id(monkeypatch, make_job):
    """"Made on first use, then fixed": two threads that read a job's id at once (each inside the
    making of an id, as a thread switch can leave them) must get the same id, the job's."""
    job = make_job()
    both_inside = threading.Barrier(2, timeout=0.5)
    make_id = picked_core.new_job_id

    def new_job_id():
        try:
            both_inside.wait()  # the other reader is inside too (or, when it cannot be, 0.5 s passed)
        except threading.BrokenBarrierError:
            pass
        return make_id()

    monkeypatch.setattr(picked_core, "new_job_id", new_job_id)
    seen = []
    readers = [threading.Thread(target=lambda: seen.append(job.id)) for _ in range(2)]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join(WAIT)
    assert len(seen) == 2 and seen[0] == seen[1] == job.id



@pytest.mark.parametrize("accept", ["push", "put", "push_many", "accept"])
def test_an_id_first_read_while_the_pure_core_accepts_the_job_stays_its_id(accept):
    """The pure core reads a job's id, then takes its lock to accept it: an id first read on another
    thread in between is the job's id, registered (the compiled core does it all in one step)."""
    core = load_twin("tinymq._core_py")
    ready = core.ReadyQueue(10)
    configure(ready, "t", lambda job: None)
    job = Job("t")
    accepting = threading.Thread(target=lambda: getattr(ready, accept)(
        [job] if accept in ("push_many", "accept") else job))
    with ready._lock:  # (held as by a pop on another thread)
        accepting.start()
        assert wait_until(lambda: job._id is not None or not accepting.is_alive(), timeout=0.5) is False
        job_id = job.id  # first read: made now, before the core writes anything in the job
    accepting.join(WAIT)
    assert job.id == job_id
    assert ready.has_id(job_id) and ready.registered(job)  # a cancel by it finds the job anywhere
    ready.task_done(job)
    assert not ready.has_id(job_id) and ready.unfinished == 0


# --- one job in two queues -------------------------------------------------------------------

@pytest.mark.parametrize("second", ["push", "put", "push_many", "accept"])
def test_a_job_queued_in_two_queues_without_an_id_is_registered_in_both_when_named(core, second):
    """Each queue must find the job by the id it has (a cancel between two places), not only the queue
    that accepted it last; and each end frees the id in that queue alone."""
    first_queue, second_queue = core.ReadyQueue(10), core.ReadyQueue(10)
    for ready in (first_queue, second_queue):
        configure(ready, "t", lambda job: None)
    job = Job("t")
    assert first_queue.push(job)
    getattr(second_queue, second)([job] if second in ("push_many", "accept") else job)
    job_id = job.id
    for ready in (first_queue, second_queue):
        assert ready.has_id(job_id) and ready.registered(job)
    first_queue.task_done(job)
    assert not first_queue.has_id(job_id) and second_queue.registered(job)
    second_queue.task_done(job)
    assert not second_queue.has_id(job_id) and first_queue.unfinished == second_queue.unfinished == 0

# --- the same unfinished Job object enqueued again ---

def test_a_job_unfinished_in_its_queue_is_refused_again_whether_or_not_its_id_was_read():
    """Once its id is read, enqueuing the unfinished job again raises DuplicateJob; before, it is
    accepted a second time. Then the first end frees the id while the job is still queued: a new job
    with that id is accepted, and a cancel by the id finds the new job, not this one."""
    with make_queue() as q:
        job = q.enqueue(Job("t", "twice"))
        with pytest.raises(DuplicateJob, match="is already queued and unfinished"):
            q.enqueue(job)  # as it is once job.id was read (below)
        job_id = job.id
        with pytest.raises(DuplicateJob, match=repr(job_id)):
            q.enqueue(job)
        ran = []
        q.register_executor("t", lambda job: ran.append(job.payload))
        q.start_dispatcher(1)
        assert q.join(WAIT)
        assert ran == ["twice"]


# --- what a queue that never reads ids pays for them ------------------------------------------

def test_jobs_whose_ids_nobody_reads_are_never_named_on_their_way_through_the_queue():
    """Nothing on the per-job path (thread and async executors, the debug log off) reads ``job.id``:
    no id is made or registered for a job nobody asks it of, and each leaves without one."""
    ids_at_run = []

    async def run_async(job):
        ids_at_run.append(job._id)

    with make_queue() as q:
        q.register_executor("t", lambda job: ids_at_run.append(job._id))
        q.register_executor("a", run_async)
        q.start_dispatcher(2)
        jobs = [q.enqueue(Job("t" if n % 2 else "a", n), block=True) for n in range(200)]
        assert q.join(WAIT)
        jobs += q.enqueue_many([Job("t", n) for n in range(50)])
        assert q.join(WAIT)
        assert len(ids_at_run) == 250
        assert not any(job_id.__class__ is str for job_id in ids_at_run)  # (the queue's marker, unnamed)
        assert all(job._id is None for job in jobs)
        assert q.get_stats().jobs_succeeded == 250
