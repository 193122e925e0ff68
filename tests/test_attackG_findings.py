"""Reference cycles through jobs that rest in the compiled core's ready FIFOs.

The compiled core hides a resting job from the cyclic garbage collector (see
``_resting`` in ``tinymq/_core.pyx``). Whatever it does, a cycle through a job
must be freed by ``gc.collect()`` once nothing outside the cycle holds it, on
both cores, as the pure core (a deque the collector walks) frees it.
"""

import gc
import weakref

import pytest

from conftest import COMPILED_CORE, PURE_CORE, load_twin

MEDIUM = 1


class Job:
    """The smallest job the core accepts, with a back-reference a cycle can go through."""

    __slots__ = ("type", "priority", "_id", "back", "__weakref__")

    def __init__(self, id=None, priority=MEDIUM, back=None):
        self.type = "a"
        self.priority = priority
        self._id = id
        self.back = back


def collected(ref):
    gc.collect()
    return ref() is None


@pytest.mark.parametrize("core_name", [PURE_CORE, COMPILED_CORE], ids=["pure", "compiled"])
@pytest.mark.parametrize("job_id", [None, "x"], ids=["unnamed", "named"])
@pytest.mark.parametrize("priority", [0, 1, 2])
def test_a_ready_queue_in_a_cycle_with_its_resting_job_is_collected(core_name, job_id, priority):
    # A job holding the queue it waits in (a job that enqueues follow-ups there):
    # dropped without being popped, the queue and the job are one cyclic garbage.
    core = load_twin(core_name)
    q = core.ReadyQueue(10)
    job = Job(job_id, priority, back=q)
    assert q.push(job)
    ref = weakref.ref(job)
    del job
    assert not collected(ref)  # the queue holds it
    del q
    assert collected(ref)
