"""Failures are logged on the `tinymq` logger, which is quiet by default.

API.md "Failures are never silent".
"""
import logging
import time

import pytest

from tinymq import Config, ExecutorConfig, Job, Queue, RetryConfig

from _helpers import WAIT, Blocker, make_queue


def tinymq_records(caplog, min_level=logging.WARNING):
    return [r for r in caplog.records
            if (r.name == "tinymq" or r.name.startswith("tinymq.")) and r.levelno >= min_level]


def mentions(record, job):
    text = record.getMessage()
    return job.id in text or job.type in text


def test_the_tinymq_logger_has_a_null_handler():
    logger = logging.getLogger("tinymq")
    assert any(isinstance(h, logging.NullHandler) for h in logger.handlers)


def test_exhausted_retries_are_logged(caplog):
    caplog.set_level(logging.DEBUG, logger="tinymq")

    def fails(job):
        raise ValueError("the executor said no")

    with Queue(10) as q:
        q.register_executor("payments", fails)
        q.start_dispatcher(1)
        job = q.enqueue(Job("payments", retry_config=RetryConfig(max_retries=1, initial_delay=0.01)))
        assert q.join(WAIT)
    records = [r for r in tinymq_records(caplog) if mentions(r, job)]
    assert records, "a permanently failed job was not logged at WARNING or above"
    text = " ".join(r.getMessage() for r in records) + " ".join(
        str(r.exc_info[1]) for r in records if r.exc_info)
    assert "retries_exhausted" in text or "the executor said no" in text


def test_no_executor_is_logged(caplog):
    caplog.set_level(logging.DEBUG, logger="tinymq")
    with Queue(10) as q:
        q.start_dispatcher(1)
        job = q.enqueue(Job("unregistered-type"))
        assert q.join(WAIT)
    assert [r for r in tinymq_records(caplog) if mentions(r, job)]


def test_eviction_is_logged_before_enqueue_returns(caplog):
    caplog.set_level(logging.DEBUG, logger="tinymq")
    with make_queue(max_delayed_jobs=1) as q:
        first = q.enqueue(Job("reports", run_at=time.time() + 60))
        q.enqueue(Job("reports", run_at=time.time() + 120))
        assert [r for r in tinymq_records(caplog) if mentions(r, first)]


def test_timeouts_are_logged(caplog):
    caplog.set_level(logging.DEBUG, logger="tinymq")
    blocker = Blocker()
    with Queue(10) as q, blocker:
        q.register_executor("slow", blocker.fn, ExecutorConfig(timeout=0.1))
        q.start_dispatcher(1)
        job = q.enqueue(Job("slow", retry_config=RetryConfig(max_retries=0)))
        assert q.join(WAIT)
        assert [r for r in tinymq_records(caplog) if mentions(r, job)]


def test_callback_exception_is_logged_with_its_traceback(caplog):
    caplog.set_level(logging.DEBUG, logger="tinymq")

    class CallbackBug(Exception):
        pass

    with Queue(10) as q:
        @q.on_failure
        def broken(job, reason, exc):
            raise CallbackBug("in the callback")

        q.start_dispatcher(1)
        q.enqueue(Job("nobody"))
        assert q.join(WAIT)
    logged = [r for r in tinymq_records(caplog, logging.ERROR)
              if r.exc_info and isinstance(r.exc_info[1], CallbackBug)]
    assert logged, "the callback's exception was not logged (with exc_info) at ERROR"


def test_successful_jobs_log_nothing_above_debug(caplog):
    caplog.set_level(logging.DEBUG, logger="tinymq")
    with Queue(100) as q:
        q.register_executor("t", lambda job: None)
        q.start_dispatcher(2)
        for _ in range(20):
            q.enqueue(Job("t"))
        assert q.join(WAIT)
    assert tinymq_records(caplog, logging.WARNING) == []


def test_failures_are_logged_even_with_callbacks(caplog):
    caplog.set_level(logging.DEBUG, logger="tinymq")
    with Queue(10) as q:
        q.on_failure(lambda job, reason, exc: None)
        q.start_dispatcher(1)
        job = q.enqueue(Job("nobody"))
        assert q.join(WAIT)
    assert [r for r in tinymq_records(caplog) if mentions(r, job)]


def test_success_debug_lines_appear_within_1024_jobs_of_enabling_debug(caplog):
    """The README's promise: per-job debug lines cost nothing when off, and start soon when on."""
    logger = logging.getLogger("tinymq")
    with Queue(config=Config(buffer_size=3000)) as q:
        q.register_executor("t", lambda job: None)
        q.start_dispatcher(1)
        for _ in range(10):
            q.enqueue(Job("t"))
        assert q.join(WAIT)
        with caplog.at_level(logging.DEBUG, logger="tinymq"):
            assert logger.isEnabledFor(logging.DEBUG)
            for _ in range(2100):
                q.enqueue(Job("t"))
            assert q.join(WAIT)
        successes = [r for r in caplog.records if r.levelno == logging.DEBUG and "succeeded" in r.getMessage()]
    assert successes, "no debug line for successful jobs after enabling DEBUG"
    assert len(successes) >= 2100 - 1024
