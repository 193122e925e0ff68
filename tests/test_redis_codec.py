"""encode_job's own writing of a common job's body (its fast path) against the serializer's."""
import math
import time

import pytest

from tinymq import Job, Priority, RetryConfig
from tinymq.redis._codec import _retry_fields, _serializer, decode_job, encode_job


def _serializers_body(job: Job) -> str:
    """The body as JSONSerializer writes it: what every process decodes, and what encode_job wrote
    for every job before it wrote the common ones itself."""
    return _serializer.dumps([job.type, int(job.priority), job.payload, float(job.timestamp), job.run_at,
                              _retry_fields(job.retry_config), job._tags or None])


def _jobs() -> list:
    later = time.time() + 5.25
    jobs = [Job("noop", 5), Job("noop", -7), Job("noop", 10**40), Job("t"), Job("t", ""),
            Job("type é\n\"\\\t\x00", "payload é\u2028\n\"\\\x1f"), Job("t", "\U0001f600"),
            Job("t", 1, run_at=later), Job("t", 1, run_at=1.0), Job("t", True), Job("t", False), Job("t", 2.5),
            Job("t", [1, "a", None]), Job("t", {"k": [1, 2.5]}), Job("t", 1, tags={"a": "b"}),
            Job("t", 1, retry_config=RetryConfig(max_retries=7)), Job("t", math.inf)]
    for priority in Priority:
        jobs.append(Job("t", 3, priority=priority))
    odd_stamp = Job("t", 1)
    odd_stamp.timestamp = 1.5  # (set by hand: run_at is not the timestamp any more)
    jobs.append(odd_stamp)
    return jobs


@pytest.mark.parametrize("job", _jobs(), ids=lambda job: repr((job.type, job.payload))[:40])
def test_encode_job_writes_what_the_serializer_writes(job: Job) -> None:
    body = encode_job(job)
    assert body == _serializers_body(job)
    back = decode_job(job.id, body)
    assert (back.type, back.payload, back.priority, back.timestamp, back.run_at) == (
        job.type, job.payload, job.priority, job.timestamp, job.run_at)


def test_encode_job_refuses_what_the_serializer_refuses() -> None:
    with pytest.raises(TypeError, match="must be JSON-serialisable"):
        encode_job(Job("t", object()))
    huge = Job("t", 10 ** 5000)  # (an int's text has a bounded length on the Pythons that bound it)
    try:
        expected = _serializers_body(huge)
    except ValueError:
        with pytest.raises(TypeError, match="must be JSON-serialisable"):
            encode_job(huge)
    else:
        assert encode_job(huge) == expected
