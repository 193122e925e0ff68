"""The ``_id`` of an accepted job that has no id yet.

A job's id is made on first use (``Job.id``), so a job that never needs one costs
nothing for it. But ``cancel(job_id)`` must find every unfinished job with that id,
also one between two places (taken by a worker, not yet running), which only a job
registered with its queue's core under its id can be. So when a core accepts a job
without an id, it puts its ``Unnamed`` (one per queue, not one per job) in the job's
``_id``; reading ``job.id`` then asks that core to make the id and register it, in
one step with whatever moves the job. When the job finishes (succeeds) unnamed, the core
puts None back: an id read later is made as for a job that was never queued. One whose end
without success is decided is named then, and held under that id until it finishes (its
failure callbacks, which run before that, read the id; it may change only once it finished).

Every queue core makes one ``Unnamed``, so the live cores are known here too: ``Job.id``'s
setter asks them whether one holds a job under the id it has (``held``) before it changes.
"""
import os
import threading
import weakref
from typing import TYPE_CHECKING, Any, Callable, List, Optional

if TYPE_CHECKING:  # (imports that would be circular at run time)
    from ._core_py import ReadyQueue
    from .job import Job

__all__ = ["Unnamed", "held"]

# Every live queue core of this process (either twin): made in Unnamed(core), guarded by _cores_lock.
_cores: "weakref.WeakSet[ReadyQueue]" = weakref.WeakSet()
_cores_lock = threading.Lock()


def _forget_lock_after_fork() -> None:
    """In a fork()ed child: no thread of the parent holds _cores_lock any more (a Queue made, or a
    job named, as it forked); one left held would never be released there."""
    global _cores_lock
    _cores_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_lock_after_fork)


def held(job: "Job") -> bool:
    """Whether a queue core of this process holds ``job`` unfinished under the id it has (a str):
    queued, delayed, running, or ending (its failure callbacks run). Asks each live core."""
    with _cores_lock:
        cores: List[ReadyQueue] = list(_cores)
    return any(core.registered(job) for core in cores)


class Unnamed:
    """Stands for an id not made yet, in the jobs one queue core accepted without one."""

    __slots__ = ("_core",)

    def __init__(self, core: "ReadyQueue") -> None:
        self._core: Callable[[], Optional[ReadyQueue]] = weakref.ref(core)  # a kept job never keeps its queue alive
        with _cores_lock:
            _cores.add(core)

    def name(self, job: "Job", job_id: Optional[str] = None) -> str:
        """``job``'s id (``job_id``, or a new one), registered with the core while the job is in it."""
        core = self._core()
        if core is not None:
            return core.name(job, self, job_id)
        from ._pick_core import core as any_core  # the queue is gone: so is the job from it

        any_core.first_id(job, job_id, self)  # unless another thread named it, or queued it again, first
        return job.id

    def __reduce__(self) -> Any:
        return type(None), ()  # a copy or a pickle of a queued job is a new job: it has no id

    def __repr__(self) -> str:
        return "<id not made yet>"
