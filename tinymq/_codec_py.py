"""The durable write path's per-job steps, in plain Python: the specification of ``_codec.pyx``.

``json_text(value)`` gives the JSON text that ``JSONSerializer`` stores for
``value`` (``json.dumps`` with ``separators=(",", ":")`` and
``ensure_ascii=False``), or None when it leaves ``value`` to that full
encoder, which then raises the error the user sees. Either twin may decline
any value; text it does return is always the full encoder's, byte for byte.
This one runs the standard library's C encoder, built once (``json.dumps``
builds one per call); the compiled twin writes plain values itself.

``ready_row(job, dumps, plain_json, default_retry_config)`` is the store row
of a ready (or delayed) job in the common case: the default retry config, no
tags, no last error, plain field types, ASCII id and type. For any other job
it returns None before serialising anything, and the store's
``_general_row`` builds the row (and raises its errors): a payload is never
serialised twice, except to report an error.

``net_effect(operations)`` is what a batch of journal operations leaves in
the table: each job id once, with its last row, or deleted, or marked running.
Rows come as flat parameter lists for multi-row INSERTs, the rows whose four
mostly-NULL columns are NULL apart, with their first eight values only.

``frame(operation)`` is one journal record: ``<length><crc32>`` (little-endian
uint32 each) and a marshal (version 2) body. ``write(fd, data)`` is one
``write()`` system call. The compiled twin keeps the GIL during that call, a copy
into the page cache: releasing it hands the GIL to the journal's flusher thread
at every job, which made a durable enqueue 1.7x slower in an A/B script during
development (not part of bench/). The price: if the kernel makes that write wait
(a full disk cache being written back), the process's other threads wait for the
GIL meanwhile.
"""
import json
import marshal
import os
import struct
import zlib
from typing import Any, Callable, List, Optional, Tuple

__all__ = ["json_text", "ready_row", "utf8", "net_effect", "frame", "write", "MARSHAL_VERSION", "MAX_RECORD_BYTES",
           "SAVE", "SAVE_MANY", "RUNNING", "DELETE", "LEAN"]

MARSHAL_VERSION = 2  # no back-references: half the cost of version 4 for these flat tuples
MAX_RECORD_BYTES = 1 << 30  # a record is one write(), which Linux caps just under 2 GiB
_HEADER = struct.Struct("<II")  # body length, crc32 of the body
_INT64 = 1 << 63  # SQLite's integers

# Journal operation kinds, the first item of every operation (see persistence/_journal.py).
SAVE = "S"  # (SAVE, row): insert or overwrite the row
SAVE_MANY = "M"  # (SAVE_MANY, (row, ...)): several rows, all-or-nothing
RUNNING = "R"  # (RUNNING, job_id): the job's attempt started
DELETE = "D"  # (DELETE, job_id): the job finished
LEAN = 8  # a row's columns before the four that are NULL for most jobs
_NULLS = (None,) * 4


def _c_encoder() -> Any:
    """json's C encoder with JSONSerializer's settings, or None where it is not available."""
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        return None
    try:
        encode = make(None, _refuse, json.encoder.encode_basestring, None, ":", ",", False, False, True)
        sample = {"a": [1, 2.5, None, True, "é\n"], "b": {"c": "d"}}
        if "".join(encode(sample, 0)) != json.dumps(sample, separators=(",", ":"), ensure_ascii=False):
            return None  # a Python whose C encoder takes other arguments
    except TypeError:
        return None
    return encode


def _refuse(value: object) -> Any:
    raise TypeError  # not plain JSON: the full encoder says why


_encode = _c_encoder()


def json_text(value: object) -> Optional[str]:
    """``value`` as compact JSON text, or None: then the full encoder must encode it."""
    if _encode is None:
        return None
    try:
        # No circular-reference markers: a cycle ends in RecursionError, and is declined.
        return "".join(_encode(value, 0))
    except Exception:
        return None


def ready_row(job: Any, dumps: Callable[[Any], Any], plain_json: bool, default_retry_config: object) -> Optional[tuple]:
    """The row of ``job`` (state "ready"), or None for a job the store's ``_general_row`` must build.

    ``plain_json``: ``dumps`` is JSONSerializer's, so ``json_text`` may stand in for it.
    """
    if job.retry_config is not default_retry_config or job._tags or job.last_error is not None:
        return None
    job_id, job_type, run_at, timestamp, retries = job.id, job.type, job.run_at, job.timestamp, job.retries
    if (job_id.__class__ is not str or not job_id.isascii() or job_type.__class__ is not str
            or not job_type.isascii() or run_at.__class__ is not float or timestamp.__class__ is not float
            or retries.__class__ is not int or not 0 <= retries < _INT64):
        return None
    payload = job.payload
    if payload is not None:
        text = json_text(payload) if plain_json else None
        if text is None:
            try:
                text = dumps(payload)
            except Exception:
                return None  # _general_row serialises again, to raise the error that names the job
        if text.__class__ is str:
            if not utf8(text):
                return None  # _general_row raises the error
        elif text.__class__ is not bytes:
            return None
        payload = text
    return (job_id, "ready", job_type, int(job.priority), run_at, timestamp, retries, payload,
            None, None, None, None)


def utf8(text: str) -> bool:
    """Whether SQLite can store ``text`` (no lone surrogates)."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def net_effect(operations: List[Tuple[str, Any]]) -> Tuple[list, list, list, list]:
    """``(lean, full, deleted, running)``: flat INSERT parameters, then ``(job_id,)`` lists."""
    final: dict = {}  # job id -> its last row, DELETE or RUNNING
    for kind, argument in operations:
        if kind == SAVE:
            final[argument[0]] = argument
        elif kind == SAVE_MANY:
            for row in argument:
                final[row[0]] = row
        elif kind == DELETE:
            final[argument] = DELETE
        else:  # RUNNING: an update of the row, wherever it is
            current = final.get(argument)
            if type(current) is tuple:
                final[argument] = (current[0], "running") + current[2:]
            elif current is None:
                final[argument] = RUNNING
    lean: list = []
    full: list = []
    deleted, running = [], []
    for job_id, value in final.items():
        if type(value) is tuple:
            if value[LEAN:] == _NULLS:
                lean.extend(value[:LEAN])
            else:
                full.extend(value)
        elif value is DELETE:
            deleted.append((job_id,))
        else:
            running.append((job_id,))
    return lean, full, deleted, running


def frame(operation: Tuple[str, Any]) -> bytes:
    """One framed journal record for ``operation``, a tuple of plain values (ValueError if too big)."""
    body = marshal.dumps(operation, MARSHAL_VERSION)
    if len(body) > MAX_RECORD_BYTES:
        raise ValueError(f"a journal record of {len(body)} bytes is over the limit of "
                         f"{MAX_RECORD_BYTES} bytes (one write() call)")
    return _HEADER.pack(len(body), zlib.crc32(body)) + body


write = os.write
