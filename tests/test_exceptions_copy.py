"""Every exception tinymq raises survives pickle and copy, as the standard library's do.

concurrent.futures.ProcessPoolExecutor sends an executor's exception back by pickling it;
an on_failure callback may hand its ``exc`` to another process or copy it.
"""
import copy
import pickle
from datetime import timedelta

import pytest

import tinymq
from tinymq import (DuplicateJob, JobTimeout, PermanentFailure, PersistenceError, QueueFull, QueueStopped,
                    RetryAfter, TinyMQError)
from tinymq.persistence._ownership import OwnedError  # what SQLitePersistence raises for an owned file

EXCEPTIONS = [
    TinyMQError("broken"),
    QueueFull("the ready buffer is full"),
    QueueStopped("the queue is stopped"),
    PersistenceError("write failed"),
    JobTimeout(),  # as an interruption raises it
    JobTimeout("job 1 ran past its 1s timeout"),
    DuplicateJob("a job with id 'x' is already queued"),
    PermanentFailure("HTTP 404"),
    RetryAfter(30),
    RetryAfter(timedelta(minutes=1), "rate limited"),
    OwnedError("/tmp/jobs.db", 1234, ", whose lock file was removed"),
    OwnedError("/tmp/jobs.db", None),
]
COPIES = {
    "pickle": lambda exc: pickle.loads(pickle.dumps(exc)),
    "copy": copy.copy,
    "deepcopy": copy.deepcopy,
}


def test_every_public_exception_class_is_checked():
    public = {name for name in tinymq.__all__ if isinstance(getattr(tinymq, name), type)
              and issubclass(getattr(tinymq, name), BaseException)}
    assert public <= {type(exc).__name__ for exc in EXCEPTIONS}


@pytest.mark.parametrize("how", sorted(COPIES))
@pytest.mark.parametrize("original", EXCEPTIONS, ids=[f"{type(exc).__name__}-{n}" for n, exc in enumerate(EXCEPTIONS)])
def test_an_exception_survives_pickle_and_copy(original, how):
    again = COPIES[how](original)
    assert type(again) is type(original)
    assert (str(again), again.args) == (str(original), original.args)
    assert vars(again) == vars(original)  # seconds, pid...
