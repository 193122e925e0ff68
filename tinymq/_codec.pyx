# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False, cdivision=True
"""The durable write path's per-job steps, compiled; ``_codec_py.py`` is their specification.

``json_text`` writes plain values (exact dict, list, tuple, str, int, float,
bool and None; str keys) straight into one buffer, as ``json.dumps`` with
``separators=(",", ":")`` and ``ensure_ascii=False`` would: the standard
library's C encoder builds a list of small strings and joins them, five times
slower on a typical payload. Anything else (subclasses, other key types, big
ints, lone surrogates, deep nesting) is declined with None, and the caller's
full encoder handles it. No Python code runs while a value is written, so the
containers cannot change under us.

``frame`` builds a journal record in one buffer; ``write`` keeps the GIL
during the system call (why: see ``_codec_py.py``).
"""
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.exc cimport PyErr_CheckSignals
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from cpython.ref cimport PyObject
from libc.math cimport isfinite
from libc.errno cimport EINTR, errno
from libc.stdint cimport uint32_t
from libc.string cimport memcpy
from posix.unistd cimport write as c_write

import os
import zlib

cdef extern from "Python.h":
    int PyDict_Next(object, Py_ssize_t *, PyObject **, PyObject **)
    Py_ssize_t PyList_GET_SIZE(object)
    PyObject *PyList_GET_ITEM(object, Py_ssize_t)
    Py_ssize_t PyTuple_GET_SIZE(object)
    PyObject *PyTuple_GET_ITEM(object, Py_ssize_t)
    double PyFloat_AS_DOUBLE(object)
    long long PyLong_AsLongLongAndOverflow(object, int *) except? -1
    Py_ssize_t PyUnicode_GET_LENGTH(object)
    int PyUnicode_KIND(object)
    void *PyUnicode_DATA(object)
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

__all__ = ["json_text", "frame", "write", "MARSHAL_VERSION"]

MARSHAL_VERSION = 2
cdef object crc32 = zlib.crc32

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


cdef int put_str(Buffer *out, str text) except -1:
    """A JSON string, UTF-8: json's escapes for ``"``, ``\\`` and control characters only."""
    TINYMQ_UNICODE_READY(text)
    cdef Py_ssize_t i, length = PyUnicode_GET_LENGTH(text)
    cdef int kind = PyUnicode_KIND(text)
    cdef void *data = PyUnicode_DATA(text)
    cdef unsigned int c
    cdef char *p
    if out.size + 6 * length + 2 > out.capacity:  # the longest escape is 6 bytes per character
        grow(out, 6 * length + 2)
    p = out.data + out.size
    p[0] = b'"'
    p += 1
    for i in range(length):
        c = PyUnicode_READ(kind, data, i)
        if c >= 0x20 and c != 0x22 and c != 0x5c:
            if c < 0x80:
                p[0] = <char>c
                p += 1
            elif c < 0x800:
                p[0] = <char>(0xc0 | (c >> 6))
                p[1] = <char>(0x80 | (c & 0x3f))
                p += 2
            elif c < 0x10000:
                if 0xd800 <= c <= 0xdfff:
                    return DECLINED  # a lone surrogate: not UTF-8 (the row check refuses it)
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
            continue
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
            p += 4
        p += 2
    p[0] = b'"'
    out.size = p + 1 - out.data
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
        return put_str(out, <str>value)
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
            if put_str(out, <str>key) == DECLINED:
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


def frame(operation):
    """One framed journal record for ``operation``, a tuple of plain values."""
    cdef bytes body = PyMarshal_WriteObjectToString(operation, MARSHAL_VERSION)
    cdef Py_ssize_t size = PyBytes_GET_SIZE(body)
    cdef uint32_t checksum = <uint32_t>crc32(body)
    cdef bytes record = PyBytes_FromStringAndSize(NULL, size + 8)
    cdef unsigned char *data = <unsigned char *>PyBytes_AS_STRING(record)
    cdef int i
    for i in range(4):  # little-endian, whatever the machine's byte order
        data[i] = (<uint32_t>size >> (8 * i)) & 0xff
        data[4 + i] = (checksum >> (8 * i)) & 0xff
    memcpy(data + 8, PyBytes_AS_STRING(body), size)
    return record


def write(int fd, bytes data):
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
