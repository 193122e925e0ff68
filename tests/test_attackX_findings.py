"""Findings of an outsider's attack on cancel (attackX): each a reproducer of a defect, then its fix.

Every test checks what a user relies on: cancel returns True exactly when the
job is reported "cancelled" exactly once, jobs_cancelled matches, join()
returns, and the queue goes on running other jobs.
"""
import threading

import pytest

from tinymq import ExecutorConfig, Job

from _helpers import WAIT, Recorder, make_queue, record_failures


def test_a_thread_job_that_cancels_itself_with_interrupt_on_timeout_ends_cancelled_once():
    """cancel() of the calling attempt raised JobTimeout inside cancel() itself (the interrupt of
    its own thread landed before the cancel was finished): the job was never reported, join()
    hung, and its worker was not replaced, so no later job ran."""
    returned, ran = Recorder(), Recorder()
    with make_queue() as q:
        failures = record_failures(q, key=lambda job: job.id)

        def cancels_itself(job):
            try:
                returned.add(q.cancel(job.id))
            except BaseException as exc:  # what cancel() raised into its caller
                returned.add(type(exc).__name__)
                raise

        q.register_executor("self", cancels_itself, ExecutorConfig(interrupt_on_timeout=True))
        q.register_executor("next", lambda job: ran.add(job.id))
        q.start_dispatcher(workers=1)
        q.enqueue(Job("self", id="me"))
        assert returned.wait_for(1)
        q.enqueue(Job("next", id="after"))
        assert q.join(WAIT)
        assert returned.snapshot() == [True]
        assert failures.snapshot() == [("me", "cancelled", None)]
        assert ran.snapshot() == ["after"]
        stats = q.get_stats()
        assert (stats.jobs_cancelled, stats.jobs_failed, stats.jobs_succeeded) == (1, 0, 1)
