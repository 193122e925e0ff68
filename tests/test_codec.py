"""The codec twins: the per-job steps of a durable write.

``json_text``'s contract: the text of ``json.dumps(value, separators=(",", ":"),
ensure_ascii=False)``, byte for byte, or None (the serializer's full encoder
then takes over). Plain values must never be declined, or the fast path
would be dead weight. ``ready_row`` is the store's own row, or declines;
``frame`` is the journal's record format; ``write`` behaves as ``os.write``.
"""
import enum
import errno
import json
import marshal
import math
import os
import select
import signal
import sqlite3
import struct
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tinymq import Job, PersistenceError, Priority, RetryConfig
from tinymq.job import _DEFAULT_RETRY_CONFIG
from tinymq.persistence import JSONSerializer, PickleSerializer, SQLitePersistence, _journal


STATELESS = [HealthCheck.function_scoped_fixture]  # the codec fixture is a module: nothing to reset


def reference(value):
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


plain_text = st.text(st.characters(exclude_categories=("Cs",)))  # no lone surrogates
plain_scalars = (
    st.none() | st.booleans() | st.integers(-(2 ** 63), 2 ** 63 - 1)
    | st.floats(allow_nan=True, allow_infinity=True) | plain_text
)
plain_values = st.recursive(
    plain_scalars,
    lambda children: st.lists(children, max_size=5) | st.tuples(children, children)
    | st.dictionaries(plain_text, children, max_size=5),
    max_leaves=40,
)
any_scalars = plain_scalars | st.integers() | st.text()  # big ints, lone surrogates
any_values = st.recursive(
    any_scalars,
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(any_scalars.filter(lambda key: not isinstance(key, float) or not math.isnan(key)),
                      children, max_size=5),  # int, bool, None keys: json turns them into text
    max_leaves=40,
)


@settings(max_examples=500, suppress_health_check=STATELESS)
@given(plain_values)
def test_plain_values_are_encoded_as_json_dumps_does(codec, value):
    assert codec.json_text(value) == reference(value)


@settings(max_examples=500, suppress_health_check=STATELESS)
@given(any_values)
def test_any_value_is_encoded_as_json_dumps_does_or_declined(codec, value):
    try:
        expected = reference(value)
    except (TypeError, ValueError, RecursionError):
        expected = None
    text = codec.json_text(value)
    assert text is None or text == expected


def test_control_characters_quotes_and_non_ascii(codec):
    value = {"k\"ey": "\x00\x01\x08\x09\x0a\x0c\x0d\x1f\x7f \\ / é \u2028 中 \U0001f600"}
    assert codec.json_text(value) == reference(value)


def test_int_and_float_edges(codec):
    value = [0, -1, 2 ** 63 - 1, -(2 ** 63), 0.0, -0.0, 1e16, 1e-7, 5e-324, 1.7976931348623157e308,
             0.1 + 0.2, math.nan, math.inf, -math.inf]
    assert codec.json_text(value) == reference(value)


def test_large_payload_grows_past_the_first_buffer(codec):
    value = {"text": "é\n\"😀" * 50_000, "items": list(range(20_000)), "nested": [[{"a": 1.5}]] * 1000}
    assert codec.json_text(value) == reference(value)


@pytest.mark.parametrize("prefix", ["", "é", "中", "😀"])
@pytest.mark.parametrize("character", ["\x00", '"', "a", "\n"])
@pytest.mark.parametrize("count", [0, 1, 84, 85, 86, 511, 512, 513, 10_000])
def test_text_at_every_buffer_boundary(codec, prefix, character, count):
    """Escapes (up to six bytes each) and UTF-8 around the sizes where the first buffer ends."""
    text = prefix + character * count
    assert codec.json_text(text) == reference(text)
    assert codec.json_text([text, {text: text}]) == reference([text, {text: text}])
    assert codec.frame(("S", (text, text)))[8:] == marshal.dumps(("S", (text, text)), 2)


@pytest.mark.parametrize("depth", [62, 63, 64, 65, 200])
def test_deep_nesting_is_encoded_exactly_or_declined(codec, depth):
    value: object = "leaf"
    nested_tuple: object = ("leaf",)
    for _ in range(depth):
        value, nested_tuple = [value], (nested_tuple,)
    assert codec.json_text(value) in (None, reference(value))
    assert codec.frame(("S", nested_tuple))[8:] == marshal.dumps(("S", nested_tuple), 2)


@pytest.mark.parametrize("operations", [
    [("S", ())], [("S", "abc")], [("S", ["a", "b"])], [("M", ((),))], [("M", [("a",) * 12])], [("S",)], [()],
])
def test_malformed_operations_raise_or_return_never_crash(codec, operations):
    try:
        codec.net_effect(operations)
    except (TypeError, ValueError, IndexError):
        pass


def test_none_is_refused_not_read(codec, tmp_path):
    with pytest.raises((TypeError, AttributeError)):
        codec.utf8(None)
    fd = os.open(tmp_path / "segment", os.O_WRONLY | os.O_CREAT)
    try:
        with pytest.raises(TypeError):
            codec.write(fd, None)
    finally:
        os.close(fd)
    assert (tmp_path / "segment").read_bytes() == b""


def test_a_record_over_the_size_limit_is_refused_and_the_store_says_so(codec, monkeypatch, tmp_path):
    monkeypatch.setattr(codec, "MAX_RECORD_BYTES", 1000)
    with pytest.raises(ValueError, match="over the limit of 1000 bytes"):
        codec.frame(("S", ("x" * 1000,)))
    assert len(codec.frame(("S", ("x" * 900,)))) < 1000
    monkeypatch.setattr(_journal, "encode", codec.frame)
    store = SQLitePersistence(str(tmp_path / "jobs.db"), journal=_journal.SUPPORTED)
    try:
        with pytest.raises(PersistenceError, match="over the limit"):
            store.save(Job("t", "x" * 2000))
    finally:
        store.close()


class Color(enum.IntEnum):
    RED = 1


class Text(str):
    pass


@pytest.mark.parametrize("value", [
    {1: "int key"}, {None: 1, True: 2}, 2 ** 64, -(2 ** 70), Color.RED, Text("sub"), {"k": Text("v")},
    "lone \ud800 surrogate", [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]],
])
def test_the_serializer_stores_what_json_dumps_would_for_anything_it_accepts(value):
    """Values the fast path may decline still store the same text, through the full encoder."""
    assert JSONSerializer().dumps(value) == reference(value)


def test_the_serializer_refuses_what_json_refuses():
    cyclic: list = []
    cyclic.append(cyclic)
    with pytest.raises(ValueError, match="Circular reference"):
        JSONSerializer().dumps({"a": cyclic})
    with pytest.raises(TypeError, match="set"):
        JSONSerializer().dumps({"a": {1, 2}})


journal_values = st.none() | st.integers(-(2 ** 63), 2 ** 63 - 1) | st.floats(allow_nan=False) | st.text() | st.binary()


@settings(suppress_health_check=STATELESS)
@given(st.tuples(st.sampled_from("SMRDV"), journal_values | st.tuples(*[journal_values] * 12)))
def test_frame_is_length_crc_and_marshal(codec, operation):
    record = codec.frame(operation)
    length, crc = struct.unpack_from("<II", record)
    body = record[8:]
    assert (length, crc) == (len(body), zlib.crc32(body))
    assert marshal.loads(body) == operation
    assert body == marshal.dumps(operation, 2)  # what recovery of older journals reads too


@pytest.mark.parametrize("operation", [
    ("S", ("id", "ready", "t", 2 ** 31 - 1, -0.0, math.inf, -(2 ** 31), "é中😀" * 5000, None, b"\x00" * 600, None, "x")),
    ("S", ("id", "ready", "t", 2 ** 31, math.nan, 1e-310, -(2 ** 31) - 1, "lone \ud800", True, False, "", b"")),
    ("M", tuple(("id%d" % i, "ready", "t", i, 1.5, 2.5, 0, "{}", None, None, None, None) for i in range(300))),
])
def test_frame_of_edge_values_and_records_larger_than_the_first_buffer(codec, operation):
    record = codec.frame(operation)
    assert record[8:] == marshal.dumps(operation, 2)
    assert struct.unpack_from("<II", record) == (len(record) - 8, zlib.crc32(record[8:]))


def test_write_writes_and_reports_errors_by_errno(codec, tmp_path):
    fd = os.open(tmp_path / "segment", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        assert codec.write(fd, b"record") == 6
        assert (tmp_path / "segment").read_bytes() == b"record"
    finally:
        os.close(fd)
    with pytest.raises(OSError) as caught:
        codec.write(fd, b"closed")
    assert caught.value.errno == errno.EBADF


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="needs setitimer")
@pytest.mark.parametrize("handler_raises", [False, True])
def test_write_interrupted_by_a_signal_retries_or_raises_what_the_handler_raised(codec, handler_raises):
    """As os.write (PEP 475): after EINTR, run the handlers; retry unless one raised."""
    reader, writer = os.pipe()
    os.set_blocking(writer, False)
    try:
        while True:  # fill the pipe, so that the next write blocks
            os.write(writer, b"x" * 4096)
    except BlockingIOError:
        pass
    os.set_blocking(writer, True)

    def on_alarm(signum, frame):
        if handler_raises:
            raise KeyboardInterrupt
        while os.read(reader, 65536):  # make room: the retried write goes through
            if not select.select([reader], [], [], 0)[0]:
                break

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, 0.05)
    try:
        if handler_raises:
            with pytest.raises(KeyboardInterrupt):
                codec.write(writer, b"0123456789")
        else:
            assert codec.write(writer, b"0123456789") == 10
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        os.close(reader)
        os.close(writer)


class _Serializer:
    """A user's serializer: whatever ``dumps`` returns or raises, the row matches the store's own."""

    def __init__(self, result):
        self.result = result

    def dumps(self, obj):
        if isinstance(self.result, Exception):
            raise self.result
        return self.result

    def loads(self, data):  # pragma: no cover - rows are built, not loaded, here
        return data


ids = st.none() | st.sampled_from(["job-1", "jöb-2", "job\ud800"])
job_types = st.sampled_from(["email", "émail"])
serializers = st.sampled_from([None, "pickle"]) | st.builds(
    _Serializer, st.sampled_from(["text", "tëxt", "lone \udc00", b"bytes", 42, ValueError("no")]))


@st.composite
def jobs(draw):
    job = Job(draw(job_types), draw(any_values | st.builds(set) | st.just(["lone \ud800"])), id=draw(ids),
              priority=draw(st.sampled_from(list(Priority)) | st.integers(0, 2)),
              tags=draw(st.none() | st.just({}) | st.just({"k": "v"})),
              retry_config=draw(st.none() | st.just(RetryConfig(max_retries=1))))
    job.retries = draw(st.integers(0, 3) | st.integers(2 ** 63 - 1, 2 ** 64) | st.just(-1) | st.just("2"))
    job.last_error = draw(st.none() | st.just("boom"))
    job.run_at = draw(st.just(job.run_at) | st.just(5) | st.just(1e300))
    return job


@settings(max_examples=400, deadline=None, suppress_health_check=STATELESS)
@given(job=jobs(), serializer=serializers)
def test_ready_row_is_the_stores_row_or_declines(codec, job, serializer):
    """A store's ``_row`` is ``ready_row(job)``, or its general ``_general_row(job)`` when that declines:
    the first must never differ from the second."""
    if serializer == "pickle":
        with pytest.warns(UserWarning):
            serializer = PickleSerializer()
    store = SQLitePersistence(":memory:", **({} if serializer is None else {"serializer": serializer}))
    try:
        row = codec.ready_row(job, store._dumps, serializer is None, _DEFAULT_RETRY_CONFIG)
        try:
            expected = store._general_row(job)
        except PersistenceError:
            assert row is None  # the store raises; the codec must not have built a row
            return
        assert row is None or row == expected
        assert row is None or [type(value) for value in row] == [type(value) for value in expected]
        plain = (job._tags in (None, {}) and job.retry_config is _DEFAULT_RETRY_CONFIG
                 and job.last_error is None and job.id.isascii() and job.type.isascii()
                 and type(job.run_at) is float and type(job.retries) is int)
        if plain:
            assert row == expected  # the fast path is taken for every plain job
    finally:
        store.close()


def _apply_one_by_one(conn, operations):
    for kind, argument in operations:
        if kind in ("S", "M"):
            for row in (argument,) if kind == "S" else argument:
                conn.execute(f"INSERT OR REPLACE INTO t VALUES ({', '.join('?' * 12)})", row)
        elif kind == "D":
            conn.execute("DELETE FROM t WHERE id = ?", (argument,))
        else:
            conn.execute("UPDATE t SET state = 'running' WHERE id = ?", (argument,))


def _apply_net_effect(conn, net):
    lean, full, deleted, running = net
    conn.executemany("DELETE FROM t WHERE id = ?", deleted)
    for columns, parameters in ((8, lean), (12, full)):
        assert len(parameters) % columns == 0
        for start in range(0, len(parameters), columns):
            values = parameters[start:start + columns] + [None] * (12 - columns)
            conn.execute(f"INSERT OR REPLACE INTO t VALUES ({', '.join('?' * 12)})", values)
    conn.executemany("UPDATE t SET state = 'running' WHERE id = ?", running)


job_ids = st.sampled_from(["a", "b", "c", "d"])
rows_ = st.builds(lambda job_id, n, tail: (job_id, "ready", "t", n, 1.5, 2.5, 0, "{}") + tail,
                  job_ids, st.integers(0, 2), st.sampled_from([(None,) * 4, (None, '{"k":"v"}', None, None),
                                                               (None, None, "boom", "why")]))
operations_ = st.lists(
    st.tuples(st.just("S"), rows_) | st.tuples(st.just("M"), st.lists(rows_, max_size=4).map(tuple))
    | st.tuples(st.sampled_from("DR"), job_ids), max_size=30)


@settings(max_examples=300, deadline=None, suppress_health_check=STATELESS)
@given(before=st.lists(rows_, max_size=4), operations=operations_)
def test_net_effect_leaves_the_table_as_the_operations_one_by_one(codec, before, operations):
    tables = []
    for apply in (lambda conn: _apply_one_by_one(conn, operations),
                  lambda conn: _apply_net_effect(conn, codec.net_effect(operations))):
        conn = sqlite3.connect(":memory:")
        conn.execute("CREATE TABLE t (id PRIMARY KEY, state, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11)")
        _apply_one_by_one(conn, [("M", tuple(before))])
        apply(conn)
        tables.append(conn.execute("SELECT * FROM t ORDER BY id").fetchall())
    assert tables[0] == tables[1]
    lean, full, deleted, running = codec.net_effect(operations)
    ids = [job_id for (job_id,) in deleted + running] + lean[::8] + full[::12]
    assert len(ids) == len(set(ids))  # each job once: one statement per row, whatever the batch
