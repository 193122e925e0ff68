"""The durable write path's per-job steps, in plain Python: the specification of ``_codec.pyx``.

``json_text(value)`` gives the JSON text that ``JSONSerializer`` stores for
``value`` (``json.dumps`` with ``separators=(",", ":")`` and
``ensure_ascii=False``), or None when it leaves ``value`` to that full
encoder, which then raises the error the user sees. Either twin may decline
any value; text it does return is always the full encoder's, byte for byte.
This one runs the standard library's C encoder, built once (``json.dumps``
builds one per call); the compiled twin writes plain values itself.

``frame(operation)`` is one journal record: ``<length><crc32>`` (little-endian
uint32 each) and a marshal (version 2) body. ``write(fd, data)`` is one
``write()`` system call. The compiled twin keeps the GIL during that call, which
takes about a microsecond into the page cache: releasing it hands the GIL to the
journal's flusher thread at every job, which made a durable enqueue 1.7x slower
in an A/B run here. The price: if the kernel makes that write wait (a full disk
cache being written back), the process's other threads wait for the GIL meanwhile.
"""
import json
import marshal
import os
import struct
import zlib
from typing import Any, Optional, Tuple

__all__ = ["json_text", "frame", "write", "MARSHAL_VERSION"]

MARSHAL_VERSION = 2  # no back-references: half the cost of version 4 for these flat tuples
_HEADER = struct.Struct("<II")  # body length, crc32 of the body


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


def frame(operation: Tuple[str, Any]) -> bytes:
    """One framed journal record for ``operation``, a tuple of plain values."""
    body = marshal.dumps(operation, MARSHAL_VERSION)
    return _HEADER.pack(len(body), zlib.crc32(body)) + body


write = os.write
