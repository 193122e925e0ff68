"""Payload serialisers: JSON by default, pickle only when asked for by name.

A serialiser is any object with ``dumps(obj) -> bytes | str`` and
``loads(data) -> obj``. Stores call nothing else on stored data, so the
serialiser decides what a file's author can make this process do: JSON can
only build plain data; pickle can run arbitrary code.
"""
import json
import pickle
import warnings
from typing import Any, Union

from .._pick_core import codec

__all__ = ["JSONSerializer", "PickleSerializer"]

json_text = codec.json_text


def _reject(value: object) -> Any:
    type_name = type(value).__qualname__
    module = type(value).__module__
    if module not in ("builtins", None):
        type_name = f"{module}.{type_name}"
    raise TypeError(f"a value of type {type_name} ({value!r:.80}) is not JSON-serialisable")


class JSONSerializer:
    """Compact JSON text (UTF-8, no ASCII escaping); the default, and safe to load."""

    def __init__(self) -> None:
        # One encoder, built once: json.dumps with arguments builds a new one per call.
        self._encode = json.JSONEncoder(
            separators=(",", ":"), ensure_ascii=False, default=_reject, check_circular=True
        ).encode
        self._decode = json.JSONDecoder().decode

    def dumps(self, obj: object) -> str:
        text = json_text(obj)  # plain values, fast; the encoder above for the rest, and for errors
        return self._encode(obj) if text is None else text

    def loads(self, data: Union[bytes, str]) -> object:
        if isinstance(data, (bytes, bytearray, memoryview)):
            data = bytes(data).decode("utf-8")
        return self._decode(data)

    def __repr__(self) -> str:
        return "JSONSerializer()"


class PickleSerializer:
    """Pickle, for payloads JSON cannot hold. Opt-in, and it warns.

    Loading a pickle runs code chosen by whoever wrote the data: anyone who
    can write the store's file can then run code in this process.
    """

    def __init__(self, protocol: int = pickle.HIGHEST_PROTOCOL) -> None:
        warnings.warn(
            "PickleSerializer: anyone who can write the persistence file can run "
            "arbitrary code in this process when it loads; use it only with a "
            "file nobody else can write",
            UserWarning,
            stacklevel=2,
        )
        self._protocol = protocol

    def dumps(self, obj: object) -> bytes:
        return pickle.dumps(obj, self._protocol)

    def loads(self, data: Union[bytes, str]) -> object:
        if isinstance(data, str):
            raise TypeError(f"pickled data must be bytes, got str {data[:40]!r}")
        return pickle.loads(data)

    def __repr__(self) -> str:
        return f"PickleSerializer(protocol={self._protocol})"
