"""The Persistence protocol: what a durable store must offer the Queue.

A store needs only ``save``, ``delete`` and ``load_all``. The Queue also calls
the optional hooks below when a store has them (looked up with ``getattr``),
so a minimal store stays minimal and a richer one gets better guarantees:

``save_many(jobs)``
    Save a batch all-or-nothing (one transaction). ``Queue.enqueue_many`` uses
    it; without it the Queue calls ``save`` per job.
``mark_running(job)``
    An attempt is starting. A store that records this can count a process
    crash during the attempt as a failed attempt when it reloads, so a job
    that kills its process cannot loop forever.
``delete_and_mark_running(job_id, job)``
    ``delete(job_id)`` and ``mark_running(job)`` in one commit (used only with
    ``mark_running``): a worker whose job succeeded while its next job is ready
    ends the one and starts the other with a single write. The finished job
    counts as finished, and the next one runs, once it returned.
``give_back(job)``
    ``stop()`` gave up a running attempt of ``job`` (not a failure): store it as
    ready again, as ``save`` does, but where it was in the order ``load_all``
    returns (it was not retried). Without it the Queue calls ``save``.
``undo_save(job_id)``
    The job last saved under ``job_id`` was not accepted after all (QueueFull,
    a wait for room that ran out): take that save back, putting back whatever
    it overwrote (a dead job of the same id). Without it the Queue calls
    ``delete``.
``take_crashed()``
    After ``load_all``: the jobs it found crashed too often (their process
    died during more of their attempts than the store allows), each returned once,
    instead of among the jobs ``load_all`` returns. The Queue reports them as
    failures with reason "crashed", then marks each dead (``mark_dead``) or
    deletes it, as any failure. Until then the store keeps their rows as they
    were found: a process that dies in between has them found again by the
    next ``load_all``, with the same crash counted (not one more), and reported
    then (at least once).
``mark_dead(job, reason, error)``
    The job failed permanently (``reason`` is "retries_exhausted",
    "permanent_failure", "no_executor", "evicted" or "crashed"; ``error`` the last
    exception or None). The store keeps it for inspection instead of deleting it.
    A cancelled job is deleted, never kept.
"""
from typing import Iterable, Optional, Protocol, Sequence, runtime_checkable

from ..job import Job

__all__ = ["Persistence", "Serializer"]


@runtime_checkable
class Persistence(Protocol):
    """A durable store of the jobs a Queue has accepted and not yet finished."""

    def save(self, job: Job) -> None:
        """Store ``job`` (insert or overwrite by ``job.id``) before it is visible to workers."""

    def delete(self, job_id: str) -> None:
        """Forget a job that finished; deleting an unknown id is not an error."""

    def load_all(self) -> Iterable[Job]:
        """Every stored job still to run, ready and delayed (``run_at`` kept).

        A store with ``take_crashed`` leaves out the jobs it found crashed too often
        and hands them to ``take_crashed``; it keeps them stored, unfinished, until the
        Queue has reported them and called ``mark_dead`` (or ``delete``) for them."""


@runtime_checkable
class Serializer(Protocol):
    """Turns a payload into ``bytes`` or ``str`` and back.

    Whatever ``loads`` does with stored data is the only code a store ever
    runs on the file's behalf, so it must not execute anything (JSON doesn't).
    """

    def dumps(self, obj: object) -> "bytes | str": ...

    def loads(self, data: "bytes | str") -> object: ...


# Documented for type checkers; the Queue duck-types these hooks.
class _OptionalHooks(Protocol):
    def save_many(self, jobs: Sequence[Job]) -> None: ...

    def mark_running(self, job: Job) -> None: ...

    def delete_and_mark_running(self, job_id: str, job: Job) -> None: ...

    def mark_dead(self, job: Job, reason: str, error: Optional[BaseException]) -> None: ...

    def take_crashed(self) -> Iterable[Job]: ...

    def give_back(self, job: Job) -> None: ...

    def undo_save(self, job_id: str) -> None: ...
