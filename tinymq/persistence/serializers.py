"""Payload serialisers: JSON by default, pickle only when asked for by name.

A serialiser is any object with ``dumps(obj) -> bytes | str`` and
``loads(data) -> obj``. Stores call nothing else on stored data, so the
serialiser decides what a file's author can make this process do: JSON can
only build plain data; pickle can run arbitrary code.
"""
import json
import operator
import os
import pickle
import sys
import threading
import warnings
from typing import Any, Callable, List, Optional, SupportsIndex, Tuple, Union

__all__ = ["JSONSerializer", "PickleSerializer"]


def _reject(value: object) -> Any:
    type_name = type(value).__qualname__
    module = type(value).__module__
    if module not in ("builtins", None):
        type_name = f"{module}.{type_name}"
    raise TypeError(f"a value of type {type_name} ({value!r:.80}) is not JSON-serialisable")


def _refuse(value: object) -> Any:
    raise TypeError  # not plain JSON: the full encoder says why


_FRAMES_MARGIN = 100  # recursion levels a loader's stack may use on top of a payload's nesting
_SHORTEST_DEEP = 2 * _FRAMES_MARGIN  # characters: a shorter text nests less than _FRAMES_MARGIN levels
# The C stack of a decode thread: many times what the deepest payload dumps() accepts takes (the C
# recursion limit bounds it from Python 3.12, the recursion limit before), whatever the application
# set with threading.stack_size() for its own threads (small stacks for many threads) ...
_DECODE_STACK = 16 * 1024 * 1024
_DECODE_STACK_PER_LEVEL = 512  # ... and more for a recursion limit raised past what that covers
_stack_size_lock = threading.Lock()  # one decode thread at a time sets and restores the process's stack size


def _forget_after_fork() -> None:
    """In a forked child: no thread of the parent holds the lock any more."""
    global _stack_size_lock
    _stack_size_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)


def _decode_stack_size() -> int:
    return max(_DECODE_STACK, sys.getrecursionlimit() * _DECODE_STACK_PER_LEVEL)


def _decoded_on_a_new_thread(decode: Callable[[str], Any], text: str) -> Any:
    """``decode(text)`` on a thread of its own, whose recursion depth starts from none: what it
    reads does not depend on how deep in its caller's stack a load runs (or raises as it raises)."""
    outcome: List[Tuple[bool, Any]] = []

    def run() -> None:
        try:
            outcome.append((True, decode(text)))
        except BaseException as exc:
            outcome.append((False, exc))

    thread = threading.Thread(target=run, name="tinymq-json-decode", daemon=True)
    with _stack_size_lock:  # (a stack size applies to the threads started while it is set)
        try:
            previous: Optional[int] = threading.stack_size(_decode_stack_size())
        except (ValueError, RuntimeError):  # a platform that cannot set it: its default
            previous = None
        try:
            thread.start()
        finally:
            if previous is not None:
                threading.stack_size(previous)
    thread.join()
    ok, value = outcome[0]
    if not ok:
        raise value
    return value


_DIGITS_PER_STEP = 500  # under the lowest limit sys.set_int_max_str_digits() takes (640)


def _int_of_any_length(text: str) -> int:
    """``int(text)`` for the text of a JSON int, however many digits it has: ``int()`` refuses more
    than ``sys.get_int_max_str_digits()`` (4300 by default from Python 3.11, and in the fixes of
    3.7-3.10), a limit the process that wrote the text may have raised. In steps under any limit."""
    negative = text.startswith("-")
    digits = text[1:] if negative else text
    value = 0
    for start in range(0, len(digits), _DIGITS_PER_STEP):
        step = digits[start:start + _DIGITS_PER_STEP]
        value = value * 10 ** len(step) + int(step)
    return -value if negative else value


def _one_shot_encoder() -> Optional[Callable[[object, int], Any]]:
    """json's C encoder with JSONSerializer's settings, built once, or None where there is none.

    ``JSONEncoder.encode`` builds this object again on every call; most of a
    small payload's cost is that. No circular-reference markers: a cycle ends
    in RecursionError, and the full encoder then reports it.
    """
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        return None
    try:
        encode: Callable[[object, int], Any] = make(None, _refuse, json.encoder.encode_basestring, None, ":", ",",
                                                    False, False, True)
        sample = {"a": [1, 2.5, None, True, "é\n"], "b": {"c": "d"}}
        if "".join(encode(sample, 0)) != json.dumps(sample, separators=(",", ":"), ensure_ascii=False):
            return None  # a Python whose C encoder takes other arguments
    except TypeError:
        return None
    return encode


class JSONSerializer:
    """Compact JSON text (UTF-8, no ASCII escaping); the default, and safe to load."""

    def __init__(self) -> None:
        # The full encoder (built once: json.dumps with arguments builds one per call)
        # encodes what the fast one declines, and words the errors.
        self._encode = json.JSONEncoder(
            separators=(",", ":"), ensure_ascii=False, default=_reject, check_circular=True
        ).encode
        self._fast = _one_shot_encoder()
        self._decode = json.JSONDecoder().decode
        self._decode_long_ints = json.JSONDecoder(parse_int=_int_of_any_length).decode

    def dumps(self, obj: object) -> str:
        fast = self._fast
        text = None
        if fast is not None:
            try:
                text = "".join(fast(obj, 0))
            except Exception:
                pass  # not plain JSON, or a cycle: the full encoder raises the error to show
            else:
                if len(text) < _SHORTEST_DEEP:  # (nesting N takes 2N characters)
                    return text
        if text is None:
            text = self._encode(obj)
        self._check_decodable(obj, text)
        return text

    def _check_decodable(self, obj: object, text: str) -> None:
        """A value nested about as deep as the recursion limit lets the encoder go from a shallow
        stack could not be decoded again, not even on a new thread: refused now (ValueError), not
        quarantined at the next start."""
        deepest = sys.getrecursionlimit() - _FRAMES_MARGIN
        if len(text) >= 2 * deepest and text.count("[") + text.count("{") >= deepest:
            try:
                _decoded_on_a_new_thread(self._decode_whole, text)  # (as loads decodes it there)
            except RecursionError:
                raise ValueError(f"a value of type {type(obj).__name__} is nested too deeply for JSON to "
                                 f"decode it again (more than about {deepest} levels)") from None

    def loads(self, data: Union[bytes, str]) -> object:
        if isinstance(data, (bytes, bytearray, memoryview)):
            data = bytes(data).decode("utf-8")
        try:
            return self._decode(data)
        except RecursionError:  # a caller deep in its stack: anything dumps() made decodes on a new thread
            return _decoded_on_a_new_thread(self._decode_whole, data)
        except json.JSONDecodeError:
            raise
        except ValueError:  # an int past the int digits limit (anything else raises again, as it did)
            try:
                return self._decode_long_ints(data)
            except RecursionError:
                return _decoded_on_a_new_thread(self._decode_long_ints, data)

    def _decode_whole(self, text: str) -> object:
        """The value of ``text``, with its ints of any length. A process with the int digits limit raised
        (``sys.set_int_max_str_digits``) writes ints that ``int()`` refuses here: such a text is decoded
        again, each int in steps (only such a text: a Python call per int would cost every decode)."""
        try:
            return self._decode(text)
        except json.JSONDecodeError:
            raise
        except ValueError:
            return self._decode_long_ints(text)

    def __repr__(self) -> str:
        return "JSONSerializer()"


class PickleSerializer:
    """Pickle, for payloads JSON cannot hold. Opt-in, and it warns.

    Loading a pickle runs code chosen by whoever wrote the data: anyone who
    can write the store's file can then run code in this process.

    ``protocol``: the pickle protocol ``dumps`` writes, as ``pickle.dumps`` takes it
    (None: its default; a negative one: its highest; an integer, or an object with
    ``__index__`` such as a numpy integer); above ``pickle.HIGHEST_PROTOCOL``, or not an
    integer (a bool neither), it is refused here.
    """

    def __init__(self, protocol: Optional[SupportsIndex] = pickle.HIGHEST_PROTOCOL) -> None:
        # Checked here, as pickle takes it (None: its default; a negative one: its highest), so
        # that a bad one is refused where it comes in, not by every save that would use it.
        chosen: Optional[int] = None
        if protocol is not None:
            if isinstance(protocol, bool) or not hasattr(type(protocol), "__index__"):
                raise TypeError(f"PickleSerializer protocol must be an integer or None, got {protocol!r}")
            chosen = operator.index(protocol)  # (pickle takes any __index__: a numpy integer too)
            if chosen > pickle.HIGHEST_PROTOCOL:
                raise ValueError(f"PickleSerializer protocol must be at most pickle.HIGHEST_PROTOCOL "
                                 f"({pickle.HIGHEST_PROTOCOL}), got {protocol!r}")
        warnings.warn(
            "PickleSerializer: anyone who can write the persistence file can run "
            "arbitrary code in this process when it loads; use it only with a "
            "file nobody else can write",
            UserWarning,
            stacklevel=2,
        )
        self._protocol = chosen

    def dumps(self, obj: object) -> bytes:
        return pickle.dumps(obj, self._protocol)

    def loads(self, data: Union[bytes, str]) -> object:
        if isinstance(data, str):
            raise TypeError(f"pickled data must be bytes, got str {data[:40]!r}")
        return pickle.loads(data)

    def __repr__(self) -> str:
        return f"PickleSerializer(protocol={self._protocol!r})"
