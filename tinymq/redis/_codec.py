"""A job's body in Redis: JSON text, with the payload through the stores' JSONSerializer.

The body holds what never changes while the job waits: type, priority, payload,
timestamp, run_at, retry config and tags. The scripts keep the fields that do
change (retries, last error, crash count) beside it in the job's hash.
The retry config is written as the SQLite store writes it: an object of
RetryConfig's fields, or null for the default one.
"""
import json
from typing import Any, Callable, Dict, Iterable, Optional

from ..config import RetryConfig
from ..job import _DEFAULT_RETRY_CONFIG, Job, Priority, _as_run_at
from ..job import _is_utf8 as is_utf8  # (what Redis can take)
from ..job import _utf8_text as sendable_text  # (an error's text as Redis can take it)
from ..persistence.serializers import JSONSerializer
from ..persistence.sqlite import _RETRY_FIELDS

__all__ = ["encode_job", "decode_job", "undecodable_job", "is_utf8", "sendable_text", "unsendable"]

_serializer = JSONSerializer()
_retry_configs: Dict[str, RetryConfig] = {}  # decoded config text -> config, shared by jobs
_CACHE_LIMIT = 256  # distinct retry configs remembered
_PRIORITIES = {int(p): p for p in Priority}
_UNDECODABLE_TYPE = "undecodable"  # the type of undecodable_job's stand-in when its body names none
_new_job = object.__new__
# What JSONSerializer's decoder runs at the first character (the same default options), without
# decode()'s look-ups for whitespace around the value: _fields.
_scan_value = json.JSONDecoder().scan_once  # type: ignore[attr-defined]  # set by __init__, not in typeshed


_text: Callable[[str], str] = json.encoder.encode_basestring  # (as the serializer's)
# The payloads encode_job writes itself, each as JSON text exactly as the serializer writes it:
# None, an int (not a bool: its class is not int) and a str.
_PLAIN_PAYLOADS: Dict[type, Callable[[Any], str]] = {type(None): lambda payload: "null", int: int.__repr__, str: _text}
_PRIORITY_TEXT = {int(p): str(int(p)) for p in Priority}  # (looked up by a Priority too: an int)


def _retry_fields(config: RetryConfig) -> Optional[Dict[str, Any]]:
    if config is _DEFAULT_RETRY_CONFIG:
        return None
    return {name: getattr(config, name) for name in _RETRY_FIELDS}


def encode_job(job: Job) -> str:
    """The JSON body of ``job`` (TypeError naming the job when its payload is not JSON, or its
    timestamp not a point in time: a body every process can decode)."""
    timestamp = job.timestamp
    if timestamp.__class__ is not float:  # (set by hand)
        try:
            timestamp = _as_run_at(timestamp, "timestamp")
        except (TypeError, ValueError) as exc:
            raise exc.__class__(f"job {job.id!r} ({job.type!r}) cannot be sent to Redis: {exc}") from None
    job_type, run_at, payload, priority = job.type, job.run_at, job.payload, _PRIORITY_TEXT.get(job.priority)
    try:
        if (priority is not None and job.retry_config is _DEFAULT_RETRY_CONFIG and job._tags is None
                and job_type.__class__ is str and payload.__class__ in _PLAIN_PAYLOADS
                and timestamp - timestamp == 0.0 and run_at.__class__ is float and run_at - run_at == 0.0):
            # The common job, as the serializer writes the list below, at half its cost (a float
            # written once when run_at is the timestamp): tests/test_redis_codec.py compares them.
            stamp = float.__repr__(timestamp)
            return (f"[{_text(job_type)},{priority},"
                    f"{_PLAIN_PAYLOADS[payload.__class__](payload)},{stamp},"
                    f"{stamp if run_at is timestamp else float.__repr__(run_at)},null,null]")
        return _serializer.dumps([job_type, int(job.priority), payload, timestamp, run_at,
                                  _retry_fields(job.retry_config), job._tags or None])
    except (TypeError, ValueError, RecursionError) as exc:
        raise TypeError(f"job {job.id!r} ({job.type!r}) cannot be sent to Redis: its payload "
                        f"must be JSON-serialisable ({exc})") from exc


def unsendable(jobs: Iterable[Job]) -> Optional[ValueError]:
    """The error naming the first job and attribute (id, type, payload, tags) whose text Redis
    cannot take (not ``is_utf8``), or None. Looked for only once a send failed on such text."""
    for job in jobs:
        for name, value in (("id", job.id), ("type", job.type), ("payload", job.payload), ("tags", job._tags)):
            if not is_utf8(value if type(value) is str else _serializer.dumps(value)):
                return ValueError(f"job {job.id!r} ({job.type!r}) cannot be sent to Redis: its {name} has "
                                  "text that is not valid Unicode (a lone surrogate?)")
    return None


def _retry_config(fields: Optional[Dict[str, Any]]) -> RetryConfig:
    if fields is None:
        return _DEFAULT_RETRY_CONFIG
    key = json.dumps(fields, sort_keys=True)
    config = _retry_configs.get(key)
    if config is None:
        if len(_retry_configs) > _CACHE_LIMIT:
            _retry_configs.clear()
        config = _retry_configs[key] = RetryConfig(**fields)
    return config


def _fields(body: str) -> Any:
    """``_serializer.loads(body)``, the same value or the same error, cheaper for a body as
    ``encode_job`` writes it: one JSON value filling the text. Anything else (whitespace around
    it, no value, extra data, no str) goes through ``loads``, which raises its own error."""
    if body.__class__ is str:
        try:
            value, end = _scan_value(body, 0)
        except (StopIteration, ValueError, RecursionError):  # (loads decodes a deep one however deep we are)
            pass
        else:
            if end == len(body):
                return value
    return _serializer.loads(body)


def decode_job(job_id: str, body: str, retries: Any = 0, last_error: Optional[str] = None) -> Job:
    """The Job that ``encode_job`` wrote, with the retries and last error Redis kept.

    A body as ``encode_job`` writes it is taken as it is; anything else goes
    through ``Job()``, which checks every field (ValueError/TypeError).
    """
    job_type, priority, payload, timestamp, run_at, retry_fields, tags = _fields(body)
    if (job_type.__class__ is str and job_type and priority.__class__ is int and priority in _PRIORITIES
            and run_at.__class__ is float and run_at - run_at == 0.0 and timestamp.__class__ is float
            and tags is None and retry_fields is None):
        job = _new_job(Job)  # the common case, without Job()'s checks: they all hold
        job._id, job.type, job.payload, job.priority, job._tags = job_id, job_type, payload, _PRIORITIES[priority], None
        job.timestamp, job.run_at, job.retry_config = timestamp, run_at, _DEFAULT_RETRY_CONFIG
    else:
        job = Job(job_type, payload, priority=priority, tags=tags, run_at=run_at,
                  retry_config=_retry_config(retry_fields), id=job_id)
        job.timestamp = float(timestamp)
    job.retries = int(retries or 0)
    job.last_error = last_error or None
    return job


def undecodable_job(job_id: str, body: str, retries: Any = 0, last_error: Optional[str] = None) -> Job:
    """A stand-in for a job whose body ``decode_job`` cannot read (written by another program,
    or by a tinymq that let an odd field through), so that its failure is still reported and
    it is still listed dead: its id, the type its body names (if it can be read), the body's
    text as its payload, its retries and last error."""
    try:
        fields = _serializer.loads(body)
    except Exception:
        fields = None
    job_type = fields[0] if isinstance(fields, list) and fields else None
    job = Job(job_type if isinstance(job_type, str) and job_type else _UNDECODABLE_TYPE, body)
    job._id = job_id  # (whatever id it has in Redis, even one Job() refuses: '', written by another program)
    text = str(retries)
    job.retries = int(text) if text.isascii() and text.isdigit() else 0  # ("²" is a digit int() refuses)
    job.last_error = last_error or None
    return job
