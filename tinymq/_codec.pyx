# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False, cdivision=True
"""The durable write path's per-job steps, compiled; ``_codec_py.py`` is their specification.

``json_text`` writes plain values (exact dict, list, tuple, str, int, float,
bool and None; str keys) straight into one buffer, as ``json.dumps`` with
``separators=(",", ":")`` and ``ensure_ascii=False`` would (the standard
library's C encoder builds a list of small strings and joins them). Anything
else (subclasses, other key types, big ints, lone surrogates, deep nesting) is
declined with None, and the caller's full encoder handles it. No Python code runs while a value is written, so the
containers cannot change under us.

``ready_row`` reads a job's fields and builds its row in one call, and
``net_effect`` coalesces a journal batch with C-level dict and list calls:
both replace Python that ran once per job (see _codec_py.py, their specification).

``frame`` writes a journal record in one buffer: the marshal bytes of plain
tuples (str, int, float, bytes, None) are written here, and checked against
``marshal`` by the tests; anything else goes through ``marshal`` itself.
``write`` keeps the GIL during the system call (why: see ``_codec_py.py``).
"""
cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.exc cimport PyErr_CheckSignals
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from cpython.ref cimport PyObject
from libc.math cimport isfinite
from libc.errno cimport EINTR, errno
from libc.stdint cimport uint32_t, uint64_t
from libc.string cimport memcpy
from posix.unistd cimport write as c_write

import os

cdef extern from "Python.h":
    int PyDict_Next(object, Py_ssize_t *, PyObject **, PyObject **)
    void PyObject_GC_UnTrack(PyObject *)
    Py_ssize_t PyList_GET_SIZE(object)
    PyObject *PyList_GET_ITEM(object, Py_ssize_t)
    Py_ssize_t PyTuple_GET_SIZE(object)
    PyObject *PyTuple_GET_ITEM(object, Py_ssize_t)
    double PyFloat_AS_DOUBLE(object)
    long long PyLong_AsLongLongAndOverflow(object, int *) except? -1
    Py_ssize_t PyUnicode_GET_LENGTH(object)
    bint PyUnicode_IS_ASCII(object)
    int PyUnicode_KIND(object)
    void *PyUnicode_DATA(object)
    enum:
        PyUnicode_1BYTE_KIND
    unsigned int PyUnicode_READ(int, void *, Py_ssize_t)  # a code point (Py_UCS4, as a C int)
    char *PyOS_double_to_string(double, char, int, int, int *) except NULL
    object PyUnicode_DecodeUTF8(const char *, Py_ssize_t, const char *)
    enum:
        Py_DTSF_ADD_DOT_0

cdef extern from "marshal.h":
    object PyMarshal_WriteObjectToString(object, int)

cdef extern from *:
    """
    #if PY_VERSION_HEX < 0x030C0000
    #define TINYMQ_UNICODE_READY(o) PyUnicode_READY(o)
    #else
    #define TINYMQ_UNICODE_READY(o) 0
    #endif
    """
    int TINYMQ_UNICODE_READY(object) except -1

__all__ = ["json_text", "ready_row", "utf8", "net_effect", "frame", "write", "MARSHAL_VERSION", "MAX_RECORD_BYTES",
           "SAVE", "SAVE_MANY", "RUNNING", "DELETE", "LEAN"]

MARSHAL_VERSION = 2
MAX_RECORD_BYTES = 1 << 30  # a record is one write(), which Linux caps just under 2 GiB
SAVE, SAVE_MANY, RUNNING, DELETE = "S", "M", "R", "D"  # journal operation kinds
LEAN = 8

cdef enum:
    DONE = 0
    DECLINED = 1  # not a plain value: the caller's full encoder takes over
    MAX_DEPTH = 64  # deeper values are declined (the full encoder detects cycles)
    STACK_BYTES = 512

cdef const char *HEX = b"0123456789abcdef"


cdef struct Buffer:
    char *data
    Py_ssize_t size
    Py_ssize_t capacity
    bint on_heap


cdef int grow(Buffer *out, Py_ssize_t extra) except -1:
    cdef Py_ssize_t capacity = max(out.size + extra, 2 * out.capacity)
    cdef char *data
    if out.on_heap:
        data = <char *>PyMem_Realloc(out.data, capacity)
    else:
        data = <char *>PyMem_Malloc(capacity)
        if data != NULL:
            memcpy(data, out.data, out.size)
    if data == NULL:
        raise MemoryError()
    out.data, out.capacity, out.on_heap = data, capacity, True
    return 0


cdef inline int put(Buffer *out, const char *text, Py_ssize_t length) except -1:
    if out.size + length > out.capacity:
        grow(out, length)
    memcpy(out.data + out.size, text, length)
    out.size += length
    return 0


cdef inline int put_char(Buffer *out, char c) except -1:
    if out.size + 1 > out.capacity:
        grow(out, 1)
    out.data[out.size] = c
    out.size += 1
    return 0


cdef inline char *put_escape(char *p, unsigned int c) noexcept:
    """json's escape of ``c`` (``"``, ``\\`` or a control character) at ``p``; returns the end."""
    p[0] = b'\\'
    if c == 0x22 or c == 0x5c:
        p[1] = <char>c
    elif c == 0x08:
        p[1] = b'b'
    elif c == 0x0c:
        p[1] = b'f'
    elif c == 0x0a:
        p[1] = b'n'
    elif c == 0x0d:
        p[1] = b'r'
    elif c == 0x09:
        p[1] = b't'
    else:
        p[1], p[2], p[3], p[4] = b'u', b'0', b'0', <char>(48 + (c >> 4))
        p[5] = HEX[c & 0xf]
        return p + 6
    return p + 2


cdef inline Py_ssize_t escaped_size(unsigned int c) noexcept:
    """Bytes json writes for the ASCII character ``c``."""
    if c >= 0x20 and c != 0x22 and c != 0x5c:
        return 1
    return 2 if c == 0x22 or c == 0x5c or c == 0x08 or c == 0x0c or c == 0x0a or c == 0x0d or c == 0x09 else 6


cdef int put_text(Buffer *out, str text, bint json) except -1:
    """``text`` as UTF-8; with ``json``, quoted, with json's escapes for ``"``, ``\\`` and controls.

    Room is reserved for exactly what is written (a payload may be large).
    """
    TINYMQ_UNICODE_READY(text)
    cdef Py_ssize_t i, size, written, length = PyUnicode_GET_LENGTH(text)
    cdef int kind = PyUnicode_KIND(text)
    cdef void *data = PyUnicode_DATA(text)
    cdef const unsigned char *ascii_data = <const unsigned char *>data
    cdef unsigned int c
    cdef char *p
    cdef Py_ssize_t plain = 0  # ASCII text: where the run of characters to copy as they are starts
    if PyUnicode_IS_ASCII(text):
        if not json:
            return put(out, <const char *>data, length)  # ASCII is its own UTF-8
        if out.size + length + 2 > out.capacity:
            grow(out, length + 2)
        p = out.data + out.size
        p[0] = b'"'
        p += 1
        for i in range(length):  # copy runs, escape what json escapes (more room as needed)
            if ascii_data[i] < 0x20 or ascii_data[i] == 0x22 or ascii_data[i] == 0x5c:
                memcpy(p, ascii_data + plain, i - plain)
                p += i - plain
                plain = i + 1
                written = p - out.data
                if written + 6 + (length - i) + 1 > out.capacity:
                    out.size = written
                    grow(out, 6 + (length - i) + 1)
                    p = out.data + written
                p = put_escape(p, ascii_data[i])
        memcpy(p, ascii_data + plain, length - plain)
        p[length - plain] = b'"'
        out.size = p + length - plain + 1 - out.data
        return DONE
    size = 2 if json else 0  # any other text: measure first (a lone surrogate declines here)
    for i in range(length):
        c = PyUnicode_READ(kind, data, i)
        if c < 0x80:
            size += escaped_size(c) if json else 1
        elif c < 0x800:
            size += 2
        elif c < 0x10000:
            if 0xd800 <= c <= 0xdfff:
                return DECLINED  # not UTF-8 (the row check refuses it)
            size += 3
        else:
            size += 4
    if out.size + size > out.capacity:
        grow(out, size)
    p = out.data + out.size
    if json:
        p[0] = b'"'
        p += 1
    for i in range(length):  # then write, a character at a time
        c = PyUnicode_READ(kind, data, i)
        if c < 0x80:
            if json and escaped_size(c) > 1:
                p = put_escape(p, c)
            else:
                p[0] = <char>c
                p += 1
        elif c < 0x800:
            p[0] = <char>(0xc0 | (c >> 6))
            p[1] = <char>(0x80 | (c & 0x3f))
            p += 2
        elif c < 0x10000:
            p[0] = <char>(0xe0 | (c >> 12))
            p[1] = <char>(0x80 | ((c >> 6) & 0x3f))
            p[2] = <char>(0x80 | (c & 0x3f))
            p += 3
        else:
            p[0] = <char>(0xf0 | (c >> 18))
            p[1] = <char>(0x80 | ((c >> 12) & 0x3f))
            p[2] = <char>(0x80 | ((c >> 6) & 0x3f))
            p[3] = <char>(0x80 | (c & 0x3f))
            p += 4
    if json:
        p[0] = b'"'
        p += 1
    out.size = p - out.data
    return DONE


cdef int put_int(Buffer *out, object value) except -1:
    cdef int overflow = 0
    cdef long long number = PyLong_AsLongLongAndOverflow(value, &overflow)
    cdef unsigned long long magnitude
    cdef char digits[24]
    cdef int start = 24
    if overflow:
        return DECLINED  # int.__repr__ of a big int: the full encoder
    magnitude = <unsigned long long>(-(number + 1)) + 1 if number < 0 else <unsigned long long>number
    while True:
        start -= 1
        digits[start] = <char>(48 + magnitude % 10)  # '0' + digit
        magnitude //= 10
        if magnitude == 0:
            break
    if number < 0:
        start -= 1
        digits[start] = b'-'
    return put(out, digits + start, 24 - start)


cdef int put_float(Buffer *out, double number) except -1:
    cdef char *text
    if not isfinite(number):  # json's allow_nan=True spellings
        if number != number:
            return put(out, b"NaN", 3)
        return put(out, b"Infinity", 8) if number > 0 else put(out, b"-Infinity", 9)
    text = PyOS_double_to_string(number, b'r', 0, Py_DTSF_ADD_DOT_0, NULL)  # float.__repr__
    try:
        put(out, text, len(text))
    finally:
        PyMem_Free(text)
    return DONE


cdef int put_value(Buffer *out, object value, int depth) except -1:
    cdef type kind = type(value)
    cdef Py_ssize_t i, size, position = 0
    cdef bint first = True
    cdef PyObject *key
    cdef PyObject *item
    if kind is str:
        return put_text(out, <str>value, True)
    if kind is int:
        return put_int(out, value)
    if kind is float:
        return put_float(out, PyFloat_AS_DOUBLE(value))
    if value is None:
        return put(out, b"null", 4)
    if value is True:
        return put(out, b"true", 4)
    if value is False:
        return put(out, b"false", 5)
    if depth >= MAX_DEPTH:
        return DECLINED
    if kind is dict:
        put_char(out, b'{')
        while PyDict_Next(value, &position, &key, &item):
            if type(<object>key) is not str:
                return DECLINED  # json turns int, float, bool and None keys into text
            if not first:
                put_char(out, b',')
            first = False
            if put_text(out, <str>key, True) == DECLINED:
                return DECLINED
            put_char(out, b':')
            if put_value(out, <object>item, depth + 1) == DECLINED:
                return DECLINED
        return put_char(out, b'}')
    if kind is list or kind is tuple:
        put_char(out, b'[')
        size = PyList_GET_SIZE(value) if kind is list else PyTuple_GET_SIZE(value)
        for i in range(size):
            if i:
                put_char(out, b',')
            item = PyList_GET_ITEM(value, i) if kind is list else PyTuple_GET_ITEM(value, i)
            if put_value(out, <object>item, depth + 1) == DECLINED:
                return DECLINED
        return put_char(out, b']')
    return DECLINED


def json_text(value):
    """``value`` as compact JSON text, or None: then the full encoder must encode it."""
    cdef char stack[STACK_BYTES]
    cdef Buffer out
    out.data, out.size, out.capacity, out.on_heap = stack, 0, STACK_BYTES, False
    try:
        if put_value(&out, value, 0) == DECLINED:
            return None
        return PyUnicode_DecodeUTF8(out.data, out.size, NULL)
    finally:
        if out.on_heap:
            PyMem_Free(out.data)


# -- store rows -------------------------------------------------------------------------

cdef bint has_surrogate(str text) noexcept:
    """Whether ``text`` holds a lone surrogate, which UTF-8 (and so SQLite) cannot hold."""
    cdef int kind = PyUnicode_KIND(text)
    cdef void *data = PyUnicode_DATA(text)
    cdef Py_ssize_t i
    cdef unsigned int c
    if PyUnicode_IS_ASCII(text) or kind == PyUnicode_1BYTE_KIND:
        return False
    for i in range(PyUnicode_GET_LENGTH(text)):
        c = PyUnicode_READ(kind, data, i)
        if 0xd800 <= c <= 0xdfff:
            return True
    return False


def utf8(str text not None):
    """Whether SQLite can store ``text`` (no lone surrogates)."""
    TINYMQ_UNICODE_READY(text)
    return not has_surrogate(text)


def ready_row(job, dumps, bint plain_json, default_retry_config):
    """The row of ``job`` (state "ready"), or None for a job the store's ``_general_row`` must build."""
    cdef int overflow = 0
    if job.retry_config is not default_retry_config or job._tags or job.last_error is not None:
        return None
    job_id, job_type, run_at, timestamp, retries = job.id, job.type, job.run_at, job.timestamp, job.retries
    if (type(job_id) is not str or type(job_type) is not str or type(run_at) is not float
            or type(timestamp) is not float or type(retries) is not int
            or PyLong_AsLongLongAndOverflow(retries, &overflow) < 0 or overflow):
        return None  # (retries: SQLite's integers are int64)
    TINYMQ_UNICODE_READY(job_id)
    TINYMQ_UNICODE_READY(job_type)
    if not PyUnicode_IS_ASCII(job_id) or not PyUnicode_IS_ASCII(job_type):
        return None
    payload = job.payload
    if payload is not None:
        text = json_text(payload) if plain_json else None  # which never writes a lone surrogate
        if text is None:
            try:
                text = dumps(payload)
            except Exception:
                return None  # _general_row serialises again, to raise the error that names the job
            if type(text) is str:
                TINYMQ_UNICODE_READY(text)
                if has_surrogate(<str>text):
                    return None  # _general_row raises the error
            elif type(text) is not bytes:
                return None
        payload = text
    row = (job_id, "ready", job_type, int(job.priority), run_at, timestamp, retries, payload,
           None, None, None, None)
    PyObject_GC_UnTrack(<PyObject *>row)  # plain values only: it can never be part of a cycle
    return row


# -- applying a batch ---------------------------------------------------------------------

@cython.boundscheck(True)  # operations come from a file too: a bad one raises, as in the pure twin
def net_effect(list operations):
    """``(lean, full, deleted, running)``: flat INSERT parameters, then ``(job_id,)`` lists."""
    cdef dict final = {}  # job id -> its last row, DELETE or RUNNING
    cdef list lean = [], full = [], deleted = [], running = []
    cdef tuple operation, row
    cdef Py_ssize_t i, position = 0
    cdef PyObject *key
    cdef PyObject *item
    for operation in operations:
        kind, argument = operation
        if kind == SAVE:
            final[(<tuple?>argument)[0]] = argument
        elif kind == SAVE_MANY:
            for row in <tuple?>argument:
                final[row[0]] = row
        elif kind == DELETE:
            final[argument] = DELETE
        else:  # RUNNING: an update of the row, wherever it is
            current = final.get(argument)
            if type(current) is tuple:
                final[argument] = (current[0], "running") + (<tuple?>current)[2:]
            elif current is None:
                final[argument] = RUNNING
    while PyDict_Next(final, &position, &key, &item):
        value = <object>item
        if type(value) is tuple:
            row = <tuple>value
            if (PyTuple_GET_SIZE(row) == 12 and row[8] is None and row[9] is None and row[10] is None
                    and row[11] is None):
                for i in range(LEAN):
                    lean.append(row[i])
            else:
                full.extend(row)
        elif value is DELETE:
            deleted.append((<object>key,))
        else:
            running.append((<object>key,))
    return lean, full, deleted, running


# -- journal records ------------------------------------------------------------------

cdef uint32_t CRC_TABLE[4][256]  # zlib's CRC-32 (reflected polynomial 0xedb88320), 4 bytes a step


cdef void fill_crc_table() noexcept:
    cdef uint32_t n, k, c
    for n in range(256):
        c = n
        for k in range(8):
            c = (0xedb88320U ^ (c >> 1)) if c & 1 else c >> 1
        CRC_TABLE[0][n] = c
    for n in range(256):  # table k: the CRC of byte n followed by k zero bytes
        for k in range(1, 4):
            CRC_TABLE[k][n] = (CRC_TABLE[k - 1][n] >> 8) ^ CRC_TABLE[0][CRC_TABLE[k - 1][n] & 0xff]


fill_crc_table()


cdef uint32_t crc32_of(const unsigned char *data, Py_ssize_t size) noexcept:
    cdef uint32_t c = 0xffffffffU
    cdef Py_ssize_t i = 0
    while i + 4 <= size:
        c ^= data[i] | (<uint32_t>data[i + 1] << 8) | (<uint32_t>data[i + 2] << 16) | (<uint32_t>data[i + 3] << 24)
        c = (CRC_TABLE[3][c & 0xff] ^ CRC_TABLE[2][(c >> 8) & 0xff]
             ^ CRC_TABLE[1][(c >> 16) & 0xff] ^ CRC_TABLE[0][c >> 24])
        i += 4
    while i < size:
        c = CRC_TABLE[0][(c ^ data[i]) & 0xff] ^ (c >> 8)
        i += 1
    return c ^ 0xffffffffU


cdef inline void set_le32(char *at, uint32_t value) noexcept:
    cdef int i
    for i in range(4):  # little-endian, whatever the machine's byte order
        at[i] = <char>((value >> (8 * i)) & 0xff)


cdef inline int put_le32(Buffer *out, uint32_t value) except -1:
    if out.size + 4 > out.capacity:
        grow(out, 4)
    set_le32(out.data + out.size, value)
    out.size += 4
    return DONE


cdef int put_marshal(Buffer *out, object value, int depth) except -1:
    """``value`` as ``marshal.dumps(value, 2)`` writes it, for plain values; others are declined."""
    cdef type kind = type(value)
    cdef Py_ssize_t i, start, size
    cdef int overflow = 0
    cdef long long number
    cdef double real
    cdef uint64_t bits
    if kind is str:
        TINYMQ_UNICODE_READY(value)
        if PyUnicode_GET_LENGTH(value) > 0x1fffffff:
            return DECLINED  # its UTF-8 might not fit marshal's 32-bit size: marshal decides
        put_char(out, b'u')  # TYPE_UNICODE: size, then UTF-8
        start = out.size
        put_le32(out, 0)
        if put_text(out, <str>value, False) == DECLINED:
            return DECLINED
        set_le32(out.data + start, <uint32_t>(out.size - start - 4))
        return DONE
    if kind is int:
        number = PyLong_AsLongLongAndOverflow(value, &overflow)
        if overflow or number > 0x7fffffff or number < -0x7fffffff - 1:
            return DECLINED  # TYPE_LONG, marshal's own digits
        put_char(out, b'i')
        return put_le32(out, <uint32_t>(number & 0xffffffffLL))
    if kind is float:
        real = PyFloat_AS_DOUBLE(value)
        memcpy(&bits, &real, 8)
        put_char(out, b'g')  # TYPE_BINARY_FLOAT: IEEE 754, little-endian
        put_le32(out, <uint32_t>(bits & 0xffffffffULL))
        return put_le32(out, <uint32_t>(bits >> 32))
    if value is None:
        return put_char(out, b'N')
    if value is True:
        return put_char(out, b'T')
    if value is False:
        return put_char(out, b'F')
    if kind is bytes:
        size = PyBytes_GET_SIZE(value)
        if size > 0x7fffffff:
            return DECLINED
        put_char(out, b's')
        put_le32(out, <uint32_t>size)
        return put(out, PyBytes_AS_STRING(value), size)
    if kind is tuple and depth < MAX_DEPTH:
        size = PyTuple_GET_SIZE(value)
        put_char(out, b'(')
        put_le32(out, <uint32_t>size)
        for i in range(size):
            if put_marshal(out, <object>PyTuple_GET_ITEM(value, i), depth + 1) == DECLINED:
                return DECLINED
        return DONE
    return DECLINED


def frame(operation):
    """One framed journal record for ``operation``, a tuple of plain values (ValueError if too big)."""
    cdef char stack[STACK_BYTES]
    cdef Buffer out
    cdef bytes body
    out.data, out.size, out.capacity, out.on_heap = stack, 8, STACK_BYTES, False  # the header comes last
    try:
        if put_marshal(&out, operation, 0) == DECLINED:
            body = PyMarshal_WriteObjectToString(operation, MARSHAL_VERSION)
            out.size = 8
            put(&out, PyBytes_AS_STRING(body), PyBytes_GET_SIZE(body))
        if out.size - 8 > MAX_RECORD_BYTES:
            raise ValueError(f"a journal record of {out.size - 8} bytes is over the limit of "
                             f"{MAX_RECORD_BYTES} bytes (one write() call)")
        set_le32(out.data, <uint32_t>(out.size - 8))
        set_le32(out.data + 4, crc32_of(<const unsigned char *>out.data + 8, out.size - 8))
        return PyBytes_FromStringAndSize(out.data, out.size)
    finally:
        if out.on_heap:
            PyMem_Free(out.data)


def write(int fd, bytes data not None):
    """One write() of ``data`` to ``fd``, the GIL held; the number of bytes written."""
    cdef Py_ssize_t written
    while True:
        written = c_write(fd, PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))
        if written >= 0:
            return written
        if errno != EINTR:
            error = errno
            raise OSError(error, os.strerror(error))
        PyErr_CheckSignals()  # as os.write does (PEP 475): a handler may raise, else retry
