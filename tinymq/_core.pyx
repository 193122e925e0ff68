# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False, cdivision=True
"""The compiled core: the same names and behaviour as ``_core_py.py``, which is
its readable specification; read that first.

Where the pure core takes ``self._lock``, this one relies on the GIL: every
critical section below runs with the GIL held and calls no Python code between
a read and the write that depends on it, so no other thread can interleave
(the design of CPython's ``_queue.SimpleQueue``). A job's attributes are read,
and the objects a section stores are made, before it starts: attribute reads
may run Python code, and so may an allocation (the garbage collector). The module is not marked
free-threading compatible, so a free-threaded interpreter keeps the GIL on.
Blocking waits release the GIL inside ``PyThread_acquire_lock_timed`` and stay
interruptible by signals (Ctrl-C reaches the main thread).
"""
cimport cython
from cpython.bool cimport PyBool_Check
from cpython.dict cimport PyDict_Update
from cpython.exc cimport PyErr_CheckSignals, PyErr_Clear, PyErr_Occurred
from cpython.long cimport PyLong_AsLong, PyLong_Check, PyLong_FromVoidPtr
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from cpython.object cimport PyTypeObject, traverseproc, visitproc
from cpython.pyport cimport PY_SSIZE_T_MAX
from cpython.ref cimport Py_DECREF, Py_INCREF, Py_XDECREF, PyObject
from cpython.unicode cimport PyUnicode_CheckExact
from libc.math cimport INFINITY, pow
from libc.stdint cimport uint64_t
from libc.string cimport memcpy, memmove
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

import gc
import operator
import os
import weakref
from collections import deque

from ._shield import DroppedInterruption, let_it_land
from ._unnamed import Unnamed
from .errors import DuplicateJob, JobTimeout, QueueStopped

cdef extern from "pythread.h":
    ctypedef void *PyThread_type_lock
    ctypedef long long PY_TIMEOUT_T
    ctypedef enum PyLockStatus:
        PY_LOCK_FAILURE
        PY_LOCK_ACQUIRED
        PY_LOCK_INTR
    PyThread_type_lock PyThread_allocate_lock()
    void PyThread_free_lock(PyThread_type_lock)
    int PyThread_acquire_lock(PyThread_type_lock, int) nogil
    PyLockStatus PyThread_acquire_lock_timed(PyThread_type_lock, PY_TIMEOUT_T, int) nogil
    void PyThread_release_lock(PyThread_type_lock) nogil
    unsigned long PyThread_get_thread_ident()

cdef extern from "Python.h":
    int PyThreadState_SetAsyncExc(unsigned long, PyObject *)
    bint PyObject_IS_GC(PyObject *)
    bint PyObject_GC_IsTracked(PyObject *)
    void PyObject_GC_Track(void *)
    void PyObject_GC_UnTrack(void *)
    object PyUnicode_FromStringAndSize(const char *, Py_ssize_t)

cdef extern from *:
    """
    /* The pure twin's _awaitable_or_generator: its type has __await__, or it is a generator. */
    static int tinymq_awaitable_or_generator(PyObject *result) {
        PyAsyncMethods *as_async = Py_TYPE(result)->tp_as_async;
        return (as_async != NULL && as_async->am_await != NULL)
            || PyGen_Check(result) || PyAsyncGen_CheckExact(result);
    }
    """
    bint _awaitable_or_generator "tinymq_awaitable_or_generator"(object result)

__all__ = [
    "ReadyQueue", "DelayedHeap", "Alarm", "WorkerSlot", "TypeState",
    "run_worker", "retry_delay", "new_job_id", "first_id", "interrupt_thread",
    "drop_own_interruption", "monotonic",
    "ENQUEUED", "SUCCEEDED", "FAILED", "RETRIED", "TIMED_OUT", "EVICTED", "CANCELLED",
    "THREADS", "LOOP", "CANCEL_UNKNOWN", "CANCEL_REMOVED", "CANCEL_MARKED", "CANCEL_LOST",
    "TYPE_EVENTS", "ATTEMPT_DURATION_BUCKETS",
]

# Lifetime counters, by index into ReadyQueue.counters().
ENQUEUED, SUCCEEDED, FAILED, RETRIED, TIMED_OUT, EVICTED, CANCELLED = range(7)
# Who runs a type's attempts: worker threads, or the queue's event loop (async executors).
THREADS, LOOP = 0, 1
# What ReadyQueue.mark_cancel found (see the pure twin).
CANCEL_UNKNOWN, CANCEL_REMOVED, CANCEL_MARKED, CANCEL_LOST = range(4)
# The events also counted per job type, in the order of the per-type counters ReadyQueue.snapshot() gives.
TYPE_EVENTS = (SUCCEEDED, FAILED, RETRIED, TIMED_OUT, CANCELLED)
cdef int TYPE_EVENT_INDEXES[5]  # TYPE_EVENTS as C values: snapshot() reads them with nothing allocated
TYPE_EVENT_INDEXES[:] = [SUCCEEDED, FAILED, RETRIED, TIMED_OUT, CANCELLED]
cdef enum:
    N_COUNTERS = 7
    N_RUNNERS = 2
    C_ENQUEUED = 0
    C_SUCCEEDED = 1
    C_EVICTED = 5
    C_CANCELLED = 6
    N_BUCKETS = 16  # len(ATTEMPT_DURATION_BUCKETS) + the +inf bucket
    REFRESH_EVERY = 1024  # successes between two looks at the log level, off the per-job path
    REQUESTED = 0  # a cancel mark: asked for, not yet acted on by whoever holds the job
    ENDING = 1  # a cancel mark: the job's end is decided (a cancel took it, or success, or failure)
# Upper bounds (seconds) of the attempt-duration histogram's buckets; a last one is +inf.
cdef double DURATION_BOUNDS[N_BUCKETS - 1]
DURATION_BOUNDS[:] = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                      30.0, 60.0, 300.0]
ATTEMPT_DURATION_BUCKETS = tuple([DURATION_BOUNDS[i] for i in range(N_BUCKETS - 1)])
cdef Py_ssize_t UNLIMITED = (<Py_ssize_t>1) << 62  # the slot limit of a type with no executor yet
cdef Py_ssize_t _MAX_RATE_STARTS = PY_SSIZE_T_MAX // <Py_ssize_t>sizeof(double)  # the ring of a rate limit's latest starts
# Starts a rate limit's ring holds at first: it grows (to max_starts at most) only while its oldest
# start still counts in the window, so its memory follows the starts of one window, not max_starts.
cdef Py_ssize_t _RATE_RING_FIRST = 16
cdef double WAIT_FOREVER = -1.0  # a deadline meaning "no deadline"


# --- clock and blocking waits -------------------------------------------------

cdef inline double _monotonic() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


def monotonic():
    """The clock of every deadline in this core (CLOCK_MONOTONIC, as time.monotonic on Linux)."""
    return _monotonic()


cdef double _deadline(object timeout) except? -2.0:
    """A monotonic deadline for a timeout in seconds; WAIT_FOREVER for None."""
    if timeout is None:
        return WAIT_FOREVER
    cdef double seconds = timeout
    if seconds < 0.0:
        seconds = 0.0
    return _monotonic() + seconds


cdef PyThread_type_lock _held_lock() except NULL:
    """A new lock, already acquired: the next acquire blocks until someone releases it."""
    cdef PyThread_type_lock lock = PyThread_allocate_lock()
    if lock == NULL:
        raise MemoryError("cannot allocate a lock")
    PyThread_acquire_lock(lock, 1)
    return lock


cdef void _free_lock(PyThread_type_lock lock) noexcept:
    """Free ``lock`` unlocked, whoever holds it: no bookkeeping to get wrong."""
    if lock != NULL:
        PyThread_acquire_lock(lock, 0)  # held now, either way...
        PyThread_release_lock(lock)  # ...so this release leaves it unlocked
        PyThread_free_lock(lock)


@cython.final
cdef class _Waiter:
    """One blocked thread: it sleeps on its own lock until a notifier releases it.

    A worker waiting in ``ReadyQueue.pop`` keeps one for all its waits: a
    producer pops the job for it (``job``, ``state``, ``level``) and releases
    the lock, once per job, so nothing is allocated between a wake-up and the job.
    """
    cdef PyThread_type_lock lock
    cdef bint notified  # a notifier took this waiter off its list and released the lock
    cdef object job  # handed by a producer with a slot of ``state``; None otherwise
    cdef object state  # a TypeState
    cdef int level  # the handed job's level, to give it back
    cdef object __weakref__  # (a worker's is in its ReadyQueue's waiters)

    def __cinit__(self):
        self.lock = _held_lock()

    def __dealloc__(self):
        _free_lock(self.lock)  # held again if the waiter woke by taking it, released if not


cdef int _sleep_on(PyThread_type_lock lock, double deadline) except -1:
    """Acquire ``lock`` by ``deadline`` (WAIT_FOREVER: no limit), GIL released: 1 acquired, 0 timed out."""
    cdef PY_TIMEOUT_T microseconds
    cdef PyLockStatus status
    cdef double remaining
    while True:
        if deadline == WAIT_FOREVER:
            microseconds = -1
        else:
            remaining = deadline - _monotonic()
            if remaining <= 0.0:
                microseconds = 0
            elif remaining > 1e9:
                microseconds = <PY_TIMEOUT_T>1e15  # far below PY_TIMEOUT_MAX on every platform
            else:
                microseconds = <PY_TIMEOUT_T>(remaining * 1e6)
        with nogil:
            status = PyThread_acquire_lock_timed(lock, microseconds, 1)
        if status == PY_LOCK_INTR:
            PyErr_CheckSignals()  # raises KeyboardInterrupt & co. in the main thread
            continue
        return status == PY_LOCK_ACQUIRED


cdef int _wait(list waiters, double deadline) except -1:
    """Join ``waiters`` and sleep until notified or ``deadline``: 1 notified, 0 timed out."""
    cdef _Waiter waiter = _Waiter()
    waiters.append(waiter)
    try:
        _sleep_on(waiter.lock, deadline)
    except BaseException:
        if not waiter.notified:
            waiters.remove(waiter)
        elif waiters:
            _notify(waiters)  # pass the wake-up on rather than lose it
        raise
    if not waiter.notified:
        waiters.remove(waiter)
        return 0
    return 1


cdef inline void _notify(list waiters):
    cdef _Waiter waiter
    if waiters:
        waiter = <_Waiter>waiters.pop(0)
        waiter.notified = True
        PyThread_release_lock(waiter.lock)


cdef inline void _notify_all(list waiters):
    while waiters:
        _notify(waiters)


# --- job ids ------------------------------------------------------------------

cdef char _id_buffer[64]  # the random per-process prefix, then room for the counter
cdef Py_ssize_t _id_prefix_length = 0
cdef uint64_t _id_counter = 0
cdef uint64_t _random_state = 0


def _reseed():
    """A fresh random prefix and jitter seed: per process, and again in every forked child."""
    global _id_prefix_length, _id_counter, _random_state
    prefix = (os.urandom(6).hex() + "-").encode("ascii")
    memcpy(_id_buffer, <const char *>prefix, len(prefix))
    _id_prefix_length = len(prefix)
    _id_counter = 0
    _random_state = int.from_bytes(os.urandom(8), "little") | 1


_reseed()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reseed)


def new_job_id():
    """A random per-process prefix plus a counter: unique without urandom per job."""
    return _new_job_id()


def first_id(object job, object job_id=None, object unset=None):
    """``job._id``, set first to ``job_id`` (or a new id) when it is ``unset``: one step (no Python
    code runs), so threads reading a job's first id at once all get the one made first (see the pure twin)."""
    current = job._id
    if current is unset:
        job._id = current = _new_job_id() if job_id is None else job_id
    return current


cdef object _new_job_id():
    global _id_counter
    cdef Py_ssize_t i
    cdef uint64_t value
    _id_counter += 1
    value = _id_counter
    for i in range(15, -1, -1):  # 16 hex digits, fixed width: ids sort by creation
        _id_buffer[_id_prefix_length + i] = b"0123456789abcdef"[value & 15]
        value >>= 4
    return PyUnicode_FromStringAndSize(_id_buffer, _id_prefix_length + 16)


# --- backoff ------------------------------------------------------------------

cdef inline double _random_unit() noexcept:
    """xorshift64*: uniform in [0, 1); jitter needs spread, not secrecy."""
    global _random_state
    _random_state ^= _random_state >> 12
    _random_state ^= _random_state << 25
    _random_state ^= _random_state >> 27
    return ((_random_state * 2685821657736338717ULL) >> 11) * (1.0 / 9007199254740992.0)


cpdef double retry_delay(long k, double initial_delay, double max_delay,
                         double backoff_multiple, double jitter=0.0):
    """Seconds before the k-th retry: min(initial * multiple**(k-1), max), jittered by ±jitter."""
    cdef double delay
    if initial_delay <= 0.0:
        delay = 0.0
    else:
        delay = initial_delay * pow(backoff_multiple, <double>(k - 1))  # overflow gives inf
        if not delay <= max_delay:
            delay = max_delay
    if jitter > 0.0 and delay > 0.0:
        delay = delay * (1.0 + jitter * (2.0 * _random_unit() - 1.0))
        if delay > max_delay:
            delay = max_delay
    return delay


# --- sleeping until a deadline ----------------------------------------------

@cython.final
cdef class Alarm:
    """A latched wake-up for one sleeper.

    ``armed_at`` is when the sleeper will wake on its own (in the clock the
    caller uses), or +inf while it is awake: ``wake_before(t)`` wakes it only
    when ``t`` is earlier, and a wake-up that arrives while it is awake is kept
    for its next ``sleep``.
    """
    cdef readonly double armed_at
    cdef PyThread_type_lock lock  # held unless a wake-up is pending
    cdef bint latched  # a wake-up is pending: the lock is released

    def __cinit__(self):
        self.armed_at = INFINITY
        self.lock = _held_lock()

    def __dealloc__(self):
        _free_lock(self.lock)

    def sleep(self, double timeout, double armed_at):
        cdef bint woken
        self.armed_at = armed_at
        try:
            if timeout == INFINITY:
                woken = _sleep_on(self.lock, WAIT_FOREVER)
            else:
                woken = _sleep_on(self.lock, _monotonic() + (timeout if timeout > 0.0 else 0.0))
            if not woken and self.latched:
                PyThread_acquire_lock(self.lock, 0)  # woken just after the timeout: consume it
        finally:
            self.armed_at = INFINITY
        self.latched = False

    cdef inline void _wake(self):
        if not self.latched:
            self.latched = True
            PyThread_release_lock(self.lock)

    def wake(self):
        self._wake()

    def wake_before(self, double when):
        if when < self.armed_at:
            self._wake()


# --- per-type slots and their FIFOs ------------------------------------------

cdef struct Entry:
    PyObject *job  # an owned reference
    uint64_t seq  # insertion order across the whole ReadyQueue

cdef struct Fifo:  # a growable ring buffer of entries; capacity is a power of two
    Entry *items
    Py_ssize_t head
    Py_ssize_t count
    Py_ssize_t capacity


# A job resting in a FIFO is hidden from the cyclic garbage collector, which would
# otherwise walk every queued job at each young-generation collection: hiding it
# gave 14-19% more no-op jobs/s (bench/builds_ab.py, bench/test_bench_queue.py
# end to end, each against the build before). The FIFO holds it, so it
# is garbage only when its TypeState is too, and then possibly through a cycle that
# passes through the job (a job holding its queue). So that such a cycle is found:
# a TypeState's traversal visits its resting jobs (_traverse_state), and every full
# collection sees them: shown at its start, hidden again at its end
# (_show_resting_jobs, in gc.callbacks); young collections still skip them. Every
# way out of a FIFO (pop, remove, clear) shows the job again, or a cycle through it
# would leak. Only the compiled core does this; the pure one cannot.

cdef inline PyObject *_fifo_at(Fifo *fifo, Py_ssize_t i) noexcept:
    """The job ``i`` places from the head (borrowed)."""
    return fifo.items[(fifo.head + i) & (fifo.capacity - 1)].job


cdef inline void _resting(PyObject *job) noexcept:
    if PyObject_GC_IsTracked(job):
        PyObject_GC_UnTrack(job)


cdef inline void _leaving(PyObject *job) noexcept:
    if PyObject_IS_GC(job) and not PyObject_GC_IsTracked(job):
        PyObject_GC_Track(job)


cdef int _fifo_push(Fifo *fifo, object job, uint64_t seq) except -1:
    cdef Py_ssize_t capacity, i
    cdef Entry *items
    if fifo.count == fifo.capacity:
        capacity = 8 if fifo.capacity == 0 else fifo.capacity * 2
        items = <Entry *>PyMem_Malloc(capacity * sizeof(Entry))
        if items == NULL:
            raise MemoryError()
        for i in range(fifo.count):  # unwrap the ring into the new buffer
            items[i] = fifo.items[(fifo.head + i) & (fifo.capacity - 1)]
        PyMem_Free(fifo.items)
        fifo.items, fifo.head, fifo.capacity = items, 0, capacity
    Py_INCREF(job)
    _resting(<PyObject *>job)
    fifo.items[(fifo.head + fifo.count) & (fifo.capacity - 1)] = Entry(<PyObject *>job, seq)
    fifo.count += 1
    return 0


cdef inline object _fifo_pop(Fifo *fifo):
    """Remove the head; the caller has checked that the FIFO is not empty."""
    cdef PyObject *job = fifo.items[fifo.head].job
    _leaving(job)
    fifo.head = (fifo.head + 1) & (fifo.capacity - 1)
    fifo.count -= 1
    result = <object>job  # a new reference...
    Py_DECREF(result)  # ...so the entry's own reference goes
    if fifo.count == 0 and fifo.capacity > 4096:
        PyMem_Free(fifo.items)  # give a burst's memory back
        fifo.items, fifo.head, fifo.capacity = NULL, 0, 0
    return result


cdef void _fifo_clear(Fifo *fifo):
    cdef Py_ssize_t i
    cdef PyObject *job
    for i in range(fifo.count):
        job = _fifo_at(fifo, i)
        _leaving(job)
        Py_XDECREF(job)
    PyMem_Free(fifo.items)
    fifo.items, fifo.head, fifo.count, fifo.capacity = NULL, 0, 0, 0


cdef Py_ssize_t _fifo_find(Fifo *fifo, object job_id) except -2:
    """The position (from the head) of the job whose ``_id`` is ``job_id``, or -1."""
    cdef Py_ssize_t i
    for i in range(fifo.count):
        if (<object>_fifo_at(fifo, i))._id == job_id:
            return i
    return -1


cdef object _fifo_remove(Fifo *fifo, Py_ssize_t position):
    """Remove the entry ``position`` places from the head; later entries move up by one."""
    cdef Py_ssize_t i, mask = fifo.capacity - 1
    _leaving(_fifo_at(fifo, position))
    result = <object>_fifo_at(fifo, position)
    Py_DECREF(result)  # the entry's reference; ``result`` holds its own
    for i in range(position, fifo.count - 1):
        fifo.items[(fifo.head + i) & mask] = fifo.items[(fifo.head + i + 1) & mask]
    fifo.count -= 1
    return result


# --- two binary min-heaps of types in C arrays: runnable types, and closed rate windows ----

cdef struct Listing:  # in a runnable heap: per level, the types that may run, by their oldest job
    uint64_t key  # insertion order of the type's oldest job at this level
    PyObject *state  # borrowed: a listed type has a waiting job, so ReadyQueue.types keeps it

cdef struct Parked:  # in the heap of closed rate windows: the types waiting for theirs to open
    double key  # when the window opens: the type may start an attempt from then on
    PyObject *state  # borrowed: a type once parked is never dropped from ReadyQueue.types

cdef struct RunnableHeap:
    Listing *items
    Py_ssize_t count
    Py_ssize_t allocated

cdef struct ParkedHeap:
    Parked *items
    Py_ssize_t count
    Py_ssize_t allocated

ctypedef fused HeapItem:  # the heap code below is written once, for both kinds of item
    Listing
    Parked


cdef int _reserve(void **items, Py_ssize_t *allocated, Py_ssize_t needed, size_t item_size) except -1:
    """Room for ``needed`` items in the C array ``items[0]`` (growing by doubling), made before
    any decision: pushing never allocates."""
    cdef Py_ssize_t size
    cdef void *grown
    if needed <= allocated[0]:
        return 0
    size = allocated[0] * 2 if allocated[0] else 16
    while size < needed:
        size *= 2
    grown = PyMem_Realloc(items[0], size * item_size)
    if grown == NULL:
        raise MemoryError()
    items[0], allocated[0] = grown, size
    return 0


cdef inline void _sift_up(HeapItem *items, Py_ssize_t i, HeapItem item) noexcept:
    """Place ``item`` at the hole ``i`` (the end of the heap) and sift it up."""
    cdef Py_ssize_t parent
    while i > 0:
        parent = (i - 1) >> 1
        if items[parent].key <= item.key:
            break
        items[i] = items[parent]
        i = parent
    items[i] = item


cdef inline void _sift_down(HeapItem *items, Py_ssize_t n, HeapItem item) noexcept:
    """Place ``item`` at the root's hole of the heap ``items[:n]`` and sift it down."""
    cdef Py_ssize_t child, i = 0
    while True:
        child = 2 * i + 1
        if child >= n:
            break
        if child + 1 < n and items[child + 1].key < items[child].key:
            child += 1
        if item.key <= items[child].key:
            break
        items[i] = items[child]
        i = child
    items[i] = item


cdef inline int _heap_reserve(RunnableHeap *heap, Py_ssize_t needed) except -1:
    return _reserve(<void **>&heap.items, &heap.allocated, needed, sizeof(Listing))


cdef inline void _heap_push(RunnableHeap *heap, uint64_t seq, PyObject *state) noexcept:
    _sift_up(heap.items, heap.count, Listing(seq, state))
    heap.count += 1


cdef inline void _heap_pop(RunnableHeap *heap) noexcept:
    heap.count -= 1
    if heap.count:
        _sift_down(heap.items, heap.count, heap.items[heap.count])


cdef inline void _heap_replace_top(RunnableHeap *heap, uint64_t seq) noexcept:
    """The top's type, keyed again by its next oldest job."""
    _sift_down(heap.items, heap.count, Listing(seq, heap.items[0].state))


cdef inline int _parked_reserve(ParkedHeap *heap, Py_ssize_t needed) except -1:
    return _reserve(<void **>&heap.items, &heap.allocated, needed, sizeof(Parked))


cdef inline void _parked_push(ParkedHeap *heap, double open_at, PyObject *state) noexcept:
    _sift_up(heap.items, heap.count, Parked(open_at, state))
    heap.count += 1


cdef inline Parked _parked_pop(ParkedHeap *heap) noexcept:
    """Remove and return the top; the caller has checked that the heap is not empty."""
    cdef Parked top = heap.items[0]
    heap.count -= 1
    if heap.count:
        _sift_down(heap.items, heap.count, heap.items[heap.count])
    return top


@cython.final
cdef class TypeState:
    """One job type: its executor, its concurrency slots, its waiting jobs.

    Guarded by the GIL, through the owning ReadyQueue.
    """
    cdef readonly object name
    cdef public object fn  # None: no executor registered
    cdef public Py_ssize_t limit  # at most this many attempts at once
    cdef readonly Py_ssize_t active  # attempts running now (their functions have not returned)
    cdef double timeout_seconds  # < 0: no timeout
    cdef public bint takes_context
    cdef public bint interrupt
    cdef readonly int runner  # whose runnable heaps list it: THREADS, or LOOP for an async executor
    cdef Fifo levels[3]  # LOW, MEDIUM, HIGH
    cdef Py_ssize_t waiting  # jobs in all three levels
    cdef bint listed[3]  # this type has its one entry in the ReadyQueue's runnable heap of that level
    # The rate limit: a ring of the latest rate_size start times (monotonic); NULL without one.
    # A ring smaller than rate_max (max_starts) holds every start that still counts in the window.
    cdef double *rate_starts
    cdef Py_ssize_t rate_size
    cdef Py_ssize_t rate_max
    cdef Py_ssize_t rate_oldest  # index of the oldest start, the next to be replaced
    cdef double rate_per
    cdef double rate_open_at  # the oldest remembered start + per (-inf: always open)
    cdef double rate_parked_until  # the key of its latest entry in the heap of closed windows (+inf: none)
    cdef bint ever_parked  # the heap of closed windows may refer to it: ReadyQueue.types keeps it
    cdef long long counters[N_COUNTERS]  # per-type lifetime counters, by event (TYPE_EVENTS)
    cdef long long durations[N_BUCKETS]  # attempts by duration bucket (not cumulative)
    cdef double duration_sum
    # Borrowed links of the list of every live TypeState (_live_states), newest first.
    cdef PyObject *newer
    cdef PyObject *older

    def __cinit__(self, name):
        global _live_states
        self.name = name
        self.fn = None
        self.limit = UNLIMITED
        self.timeout_seconds = -1.0
        self.rate_open_at = -INFINITY
        self.rate_parked_until = INFINITY
        self.older = _live_states
        if _live_states != NULL:
            (<TypeState>_live_states).newer = <PyObject *>self
        _live_states = <PyObject *>self

    def __dealloc__(self):
        global _live_states
        # Unlinked first: a job freed below may run Python code, and a collection then.
        if self.newer != NULL:
            (<TypeState>self.newer).older = self.older
        elif _live_states == <PyObject *>self:
            _live_states = self.older
        if self.older != NULL:
            (<TypeState>self.older).newer = self.newer
        for level in range(3):
            _fifo_clear(&self.levels[level])
        PyMem_Free(self.rate_starts)

    @property
    def timeout(self):
        return None if self.timeout_seconds < 0.0 else self.timeout_seconds

    @timeout.setter
    def timeout(self, value):
        self.timeout_seconds = -1.0 if value is None else value

    def pending(self):
        return self.waiting

    cdef inline bint admits(self) noexcept:
        """Whether a job of this type may start now: the one admission rule (see the pure twin)."""
        return self.active < self.limit and (self.rate_open_at == -INFINITY
                                             or self.rate_open_at <= _monotonic())

    cdef inline bint held_by_rate_limit(self) noexcept:
        """A free slot and a rate limit: once ``admits()`` said no, its window is what held the type
        (it may have opened since that look at the clock: a second look would miss the type)."""
        return self.active < self.limit and self.rate_open_at != -INFINITY

    cdef void set_rate_limit(self, double *ring, Py_ssize_t size, Py_ssize_t max_starts, double per) noexcept:
        """Take ``ring`` (``size`` doubles, at most max_starts, or NULL: no limit); the latest remembered
        starts still count, as many as it holds."""
        cdef Py_ssize_t i, kept = 0, old = self.rate_size
        cdef double start
        if ring != NULL:
            for i in range(size):
                ring[i] = -INFINITY
            # The newest old starts fill the new ring from its end, oldest first.
            for i in range(old - 1, -1, -1):
                if kept == size:
                    break
                start = self.rate_starts[(self.rate_oldest + i) % old]
                if start == -INFINITY:
                    break
                ring[size - 1 - kept] = start
                kept += 1
        PyMem_Free(self.rate_starts)
        self.rate_starts, self.rate_size, self.rate_max = ring, size, max_starts
        self.rate_oldest, self.rate_per = 0, per
        self.rate_open_at = self._rate_opens_at()

    cdef inline double _rate_opens_at(self) noexcept:
        """The max_starts-th latest start + per; -inf (always open) while the ring is smaller: the
        starts it no longer holds opened their window before the ring forgot them."""
        if self.rate_starts == NULL or self.rate_size < self.rate_max:
            return -INFINITY
        return self.rate_starts[self.rate_oldest] + self.rate_per

    cdef inline void record_start(self, double now) noexcept:
        """An attempt starts now: it replaces the oldest start in the rate limit's ring, or the ring
        grows when that start still counts (and the ring is smaller than max_starts)."""
        cdef Py_ssize_t oldest = self.rate_oldest
        if (self.rate_size < self.rate_max and self.rate_starts[oldest] + self.rate_per > now
                and not self._grow_rate_ring()):
            self.rate_max = self.rate_size  # (out of memory: the limit shrinks to what it remembers)
        oldest = self.rate_oldest
        self.rate_starts[oldest] = now
        oldest += 1
        if oldest == self.rate_size:
            oldest = 0
        self.rate_oldest = oldest
        self.rate_open_at = self._rate_opens_at()

    cdef bint _grow_rate_ring(self) noexcept:
        """Double the ring (to rate_max at most), its new empty slots just before its oldest start
        (the next to be replaced); False when there is no memory for it."""
        cdef Py_ssize_t size = self.rate_size, oldest = self.rate_oldest, i
        cdef Py_ssize_t grown = size * 2 if size <= self.rate_max // 2 else self.rate_max
        cdef double *ring = <double *>PyMem_Realloc(self.rate_starts, grown * sizeof(double))
        if ring == NULL:
            return False
        memmove(&ring[oldest + grown - size], &ring[oldest], (size - oldest) * sizeof(double))
        for i in range(oldest, oldest + grown - size):
            ring[i] = -INFINITY
        self.rate_starts, self.rate_size = ring, grown
        return True

    cdef inline void record_duration(self, double seconds) noexcept:
        """An attempt was decided after ``seconds``: one more in its histogram bucket."""
        cdef int bucket = 0
        while bucket < N_BUCKETS - 1 and seconds > DURATION_BOUNDS[bucket]:
            bucket += 1
        self.durations[bucket] += 1
        self.duration_sum += seconds


cdef PyObject *_live_states = NULL  # the newest live TypeState (borrowed), linked through .older
cdef traverseproc _generated_traverse = (<PyTypeObject *>TypeState).tp_traverse  # its object attributes


cdef int _traverse_state(PyObject *o, visitproc visit, void *arg) except -1:
    """TypeState's traversal: Cython's, then every resting job (one visit per FIFO reference)."""
    cdef int result = _generated_traverse(o, visit, arg)
    cdef TypeState state = <TypeState>o
    cdef Fifo *fifo
    cdef Py_ssize_t i
    cdef int level
    if result:
        return result
    for level in range(3):
        fifo = &state.levels[level]
        for i in range(fifo.count):
            result = visit(_fifo_at(fifo, i), arg)
            if result:
                return result
    return 0


(<PyTypeObject *>TypeState).tp_traverse = _traverse_state


def _show_resting_jobs(phase, info):
    """In gc.callbacks: a full collection sees every resting job; those still resting after it hide again."""
    cdef PyObject *link = _live_states
    cdef TypeState state
    cdef Fifo *fifo
    cdef Py_ssize_t i
    cdef int level
    cdef void (*show)(PyObject *) noexcept
    if info["generation"] != 2:
        return
    show = _leaving if phase == "start" else _resting
    while link != NULL:
        state = <TypeState>link
        for level in range(3):
            fifo = &state.levels[level]
            for i in range(fifo.count):
                show(_fifo_at(fifo, i))
        link = state.older


gc.callbacks.append(_show_resting_jobs)


cdef inline int _level_of(object job) except -1:
    priority = job.priority
    cdef long level = -1
    if PyLong_Check(priority) and not PyBool_Check(priority):  # an IntEnum: compare it as a C long
        level = PyLong_AsLong(priority)
        if level == -1 and PyErr_Occurred():
            PyErr_Clear()
    if not 0 <= level <= 2:
        raise ValueError(f"priority must be a Priority (LOW=0, MEDIUM=1, HIGH=2), got {priority!r}")
    return level


cdef inline int _level_or_invalid(object job):
    """``_level_of(job)``, or -1 for an invalid priority: raises nothing, allocates nothing."""
    priority = job.priority
    cdef long level = -1
    if PyLong_Check(priority) and not PyBool_Check(priority):
        level = PyLong_AsLong(priority)
        if level == -1 and PyErr_Occurred():
            PyErr_Clear()
    return level if 0 <= level <= 2 else -1


cdef object _not_a_str(str what, object value):
    # str.__repr__: a str subclass's own __repr__ is not called
    shown = str.__repr__(value) if isinstance(value, str) else repr(value)
    return TypeError(f"{what} must be a str, got {shown} ({type(value).__qualname__})")


cdef inline object _exact_type(object job_type):
    """``job_type`` if it is exactly a str: a subclass's __hash__/__eq__ never runs in the core."""
    if not PyUnicode_CheckExact(job_type):
        raise _not_a_str("job type", job_type)
    return job_type


cdef inline object _type_of(object job):
    """The job's type, if it is exactly a str: a subclass's __hash__/__eq__ never runs in the core."""
    job_type = job.type
    if not PyUnicode_CheckExact(job_type):
        raise _not_a_str("job type", job_type)
    return job_type


cdef object _UNNAMED = Unnamed


cdef inline object _id_of(object job):
    """The job's id, or None when it has none (yet): exactly a str, like a type."""
    return _as_id(job._id)


cdef inline object _as_id(object job_id):
    """``_id_of`` of a job whose ``_id`` was read as ``job_id``."""
    if job_id is not None and not PyUnicode_CheckExact(job_id):
        if type(job_id) is _UNNAMED:  # queued (here or elsewhere) and not named yet
            return None
        raise _not_a_str("job id", job_id)
    return job_id


cdef object _duplicate(object job_id):
    return DuplicateJob(f"a job with id {job_id!r} is already queued and unfinished")


cdef object _queued_again(object job):
    return DuplicateJob(f"this {job.type!r} job is already queued and unfinished (a Job is enqueued "
                        "once: make a new Job to run the same work again)")


cdef object _given_twice(object job):
    return DuplicateJob(f"this {job.type!r} job is given twice in this batch (a Job is enqueued once: "
                        "make a new Job to run the same work again); none of the batch was enqueued")


cdef tuple _batch_ids(list jobs):
    """``{id: job}`` for the jobs that have an id (None when none has), and an id
    repeated within ``jobs`` (None when none is)."""
    cdef dict batch = None
    repeated = None
    for job in jobs:
        job_id = _id_of(job)
        if job_id is not None:
            if batch is None:
                batch = {}
            elif repeated is None and job_id in batch:
                repeated = job_id
            batch[job_id] = job
    return batch, repeated


# --- the ready queue ----------------------------------------------------------

cdef object _NO_TYPE = object()  # the empty type cache's key: no job type is this object

@cython.final
cdef class ReadyQueue:
    """Ready jobs by priority, per-type slots, and the queue's accounting.

    A worker's ``pop`` takes the oldest job of the highest non-empty level whose
    type has a free slot, and takes that slot; ``release`` gives it back. Per
    level, a heap of the types that may run, keyed by their oldest job there,
    finds it in O(log types): see the pure twin for how the heaps are kept, and
    for how a type whose rate window is closed waits in the heap of parked
    types until the scheduler reopens it.

    The unfinished jobs that have an id are known by it: a second job with the
    same id is refused (DuplicateJob) until ``task_done`` of the first.

    Entry points check in one order: the job's own fields (TypeError,
    ValueError), then QueueStopped, then DuplicateJob, then room (False); any
    refusal leaves everything as it was. The fields are read first, as they may
    run Python code; the decision after them runs none.
    """
    cdef readonly Py_ssize_t capacity
    # All guarded by the GIL (see the module docstring).
    cdef dict types  # job type -> TypeState
    cdef object last_type  # a one-entry cache in front of types: this key...
    cdef TypeState last_state  # ...maps to this state (_NO_TYPE and None when empty)
    cdef uint64_t states_made  # TypeStates made so far: a caller sees whether its calls made one
    cdef Py_ssize_t level_sizes[3]  # ready jobs per level (LOW, MEDIUM, HIGH)
    # Per runner (THREADS, LOOP) and level, at runner * 3 + level: every type with a job waiting
    # there that admits jobs has exactly one listing in its runner's heap, keyed by its oldest job
    # there; listed types that stopped admitting may too (dropped when seen).
    cdef RunnableHeap runnable[6]
    cdef object loop_waker  # the event loop's wake-up (set_loop_waker), or None
    cdef bint loop_idle  # the loop found nothing last time and was not woken since
    # The loop's deque of (job, type, level) it took (hand_to_loop) and has not started, or None: the
    # loop pops from its left (one atomic popleft per job: each job is the loop's or close()'s).
    cdef object loop_handed
    # Every type with jobs waiting whose rate window is closed while it has a free slot has an
    # entry keyed rate_parked_until, no later than its opening; entries with another key are stale.
    cdef ParkedHeap parked
    cdef Alarm alarm  # the scheduler's: woken when a type parks earlier than it is armed for; or None
    cdef Py_ssize_t size  # sum(level_sizes) <= capacity
    cdef object overflow  # deque of (job, type, level): counted jobs owed room; nonempty only when full
    cdef uint64_t seq  # insertion order: FIFO within a level
    cdef bint _closed
    cdef Py_ssize_t _unfinished  # accepted jobs not yet succeeded or failed for good
    # What join() waits for: the base group (jobs accepted while no join was under way, unstamped:
    # _unfinished - _stamped of them) and the generations (see the pure twin).
    cdef Py_ssize_t _joins  # join_begin() calls not yet ended: while nonzero, accepted jobs are stamped
    cdef Py_ssize_t _stamped  # unfinished jobs in stamps
    cdef dict stamps  # id(job) -> its generation, for the unfinished jobs stamped
    cdef long long _generation  # what accepted jobs are stamped with
    cdef Py_ssize_t _generation_size  # unfinished jobs stamped with _generation
    cdef dict older  # older generation -> its unfinished jobs (> 0), oldest first
    cdef dict ids  # id -> the unfinished job registered under it (exact str keys: no Python runs)
    cdef object unnamed  # the _id of unfinished jobs accepted without one (see the pure twin)
    cdef object __weakref__  # (unnamed's reference to this queue)
    # Cancel marks, by id, of registered unfinished jobs outside the ready buffer (dropped with the
    # id): REQUESTED or ENDING, as an int object (see the pure twin).
    cdef dict marks
    cdef long long _counters[N_COUNTERS]
    # _Waiters: idle workers, the latest last. None waits while a job is poppable, except while
    # the worker that freed its slot comes back for it (release_state(hand_off=False)).
    cdef list getters
    # Every waiter of a worker (and of a pop() that waited), a set of weak references (each drops
    # itself as its waiter dies): close() takes back the jobs handed to those that have not
    # returned them yet (_reclaim_handed). Not a WeakSet: its iteration is Python code, which lets
    # a worker that starts meanwhile add to it (RuntimeError, close() half done); a set's copy runs
    # no Python code.
    cdef set waiters
    cdef list putters  # _Waiters: producers waiting for room
    cdef list joiners  # _Waiters: join() callers waiting for the base or an older generation to empty

    def __cinit__(self, Py_ssize_t capacity, Alarm alarm=None):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.alarm = alarm
        self.last_type = _NO_TYPE
        self.types = {}
        self.ids = {}
        self.unnamed = Unnamed(self)
        self.marks = {}
        self.overflow = deque()
        self.getters = []
        self.waiters = set()
        self.putters = []
        self.joiners = []
        self.stamps = {}
        self.older = {}

    def __dealloc__(self):
        for level in range(3 * N_RUNNERS):
            PyMem_Free(self.runnable[level].items)  # borrowed listings: nothing to release
        PyMem_Free(self.parked.items)  # borrowed too

    # executors

    def configure(self, job_type, fn, Py_ssize_t limit, timeout, bint takes_context, bint interrupt,
                  int runner=THREADS, rate_limit=None):
        """Register or replace the executor of ``job_type``; running attempts keep their slots.

        ``runner``: THREADS (worker threads pop its jobs) or LOOP (``hand_to_loop``).
        ``rate_limit``: None, or any object with ``max_starts`` (int >= 1) and
        ``per`` (seconds > 0), such as ``tinymq.RateLimit``; it applies to later
        starts, and the starts the type remembers still count.
        """
        cdef Py_ssize_t max_starts = 0
        cdef double per = 0.0
        cdef double *ring = NULL
        cdef Py_ssize_t size = 0
        cdef TypeState state
        if runner != THREADS and runner != LOOP:
            raise ValueError(f"runner must be THREADS or LOOP, got {runner!r}")
        if rate_limit is not None:  # read, and the ring made, before any decision
            starts, per = rate_limit.max_starts, rate_limit.per
            if starts < 1 or not 0.0 < per < INFINITY:
                raise ValueError(f"rate_limit must allow >= 1 start per finite seconds > 0, got {rate_limit!r}")
            if starts > _MAX_RATE_STARTS:  # max_starts * sizeof(double) must not overflow
                raise ValueError(f"rate_limit must allow at most {_MAX_RATE_STARTS} starts per window "
                                 f"(the latest starts are kept), got {rate_limit!r}")
            max_starts = starts
            # As many as it may remember already (a type registered again), to max_starts at most.
            known = self.types.get(job_type) if PyUnicode_CheckExact(job_type) else None
            size = max(_RATE_RING_FIRST, 0 if known is None else (<TypeState>known).rate_size)
            size = min(size, max_starts)
            ring = <double *>PyMem_Malloc(size * sizeof(double))
            if ring == NULL:
                raise MemoryError(f"no room for the ring of {size} starts of {rate_limit!r}")
        try:
            state = self._type_state(_exact_type(job_type))
            # A limit that opens the window earlier parks the type again: one stale entry more.
            _parked_reserve(&self.parked, self.parked.count + len(self.types) + 1)
        except BaseException:
            PyMem_Free(ring)
            raise
        state.set_rate_limit(ring, size, max_starts, per)
        if state.runner != runner:  # its waiting jobs move to the other runner's heaps
            self._unlist(state)
            state.runner = runner
        state.fn = fn
        state.limit = limit
        state.timeout = timeout
        state.takes_context = takes_context
        state.interrupt = interrupt
        if state.waiting:
            self._readmit(state)  # a higher limit may free jobs
            self._hand_off()
        return state

    def executor_stats(self):
        """``{job_type: (active, limit)}`` for every registered executor."""
        cdef TypeState state
        return {state.name: (state.active, state.limit)
                for state in self.types.values() if state.fn is not None}

    def snapshot(self, *heaps, double now=INFINITY):
        """What ``Queue.get_stats()`` shows of the core and of the delayed ``heaps``, read at one
        moment.

        ``((high, medium, low), counters(), {job_type: (active, limit, succeeded, failed,
        retried, timed_out, cancelled)} per registered executor, overflow_size, delayed jobs)``,
        where delayed jobs are those not due at ``now`` (the heaps' clock). A due job that is
        still in a heap counts where moving it now would put it (``requeue``): ready at its
        level while the buffer has room, else owed room (overflow_size), in the order the
        scheduler moves them (the heaps in the order given, each earliest first); one that moving
        would fail (its type or priority made invalid while it waited) counts as delayed.

        One moment under the GIL: an allocation may run the garbage collector, and Python code
        that lets another thread in, so everything that allocates comes first (the due jobs,
        the executors), then every number is read with nothing allocated, into C values; a
        heap that changed meanwhile (its push count or size) makes it start again.
        """
        cdef TypeState state
        cdef DelayedHeap heap
        cdef Py_ssize_t i, n_heaps = len(heaps), n_states
        cdef Py_ssize_t delayed, waiting_for_room, room
        cdef Py_ssize_t sizes[3]
        cdef long long counters[N_COUNTERS]
        cdef int level
        # Per heap: (push count, size) when its due jobs were read; per executor: its 7 numbers.
        cdef uint64_t *stamps = <uint64_t *>PyMem_Malloc((2 * n_heaps + 1) * sizeof(uint64_t))
        cdef long long *fields = NULL
        if stamps == NULL:
            raise MemoryError()
        try:
            while True:
                for i in range(n_heaps):
                    heap = <DelayedHeap?>heaps[i]
                    stamps[2 * i], stamps[2 * i + 1] = heap.seq, <uint64_t>heap.count
                dues = [(<DelayedHeap>heap)._due(now) for heap in heaps]
                states = [state for state in self.types.values() if state.fn is not None]
                n_states = len(states)
                PyMem_Free(fields)
                fields = <long long *>PyMem_Malloc((7 * n_states + 1) * sizeof(long long))
                if fields == NULL:
                    raise MemoryError()
                # From here on nothing allocates until every number is read.
                for i in range(n_heaps):
                    heap = <DelayedHeap>heaps[i]
                    if heap.seq != stamps[2 * i] or <uint64_t>heap.count != stamps[2 * i + 1]:
                        break
                else:
                    break
            sizes[0], sizes[1], sizes[2] = self.level_sizes[0], self.level_sizes[1], self.level_sizes[2]
            waiting_for_room = len(self.overflow)
            room = 0 if waiting_for_room else self.capacity - (sizes[0] + sizes[1] + sizes[2])
            delayed = 0
            for i in range(n_heaps):
                due = <list>dues[i]
                delayed += (<DelayedHeap>heaps[i]).count - len(due)
                for job in due:
                    level = _level_or_invalid(job)
                    if level < 0 or not PyUnicode_CheckExact(job.type):  # made invalid while it waited:
                        delayed += 1  # moving it fails it, so until then it is where it is
                        continue
                    if room > 0:
                        sizes[level] += 1
                        room -= 1
                    else:
                        waiting_for_room += 1
            for i in range(N_COUNTERS):
                counters[i] = self._counters[i]
            for i in range(n_states):
                state = <TypeState>states[i]
                fields[7 * i], fields[7 * i + 1] = state.active, state.limit
                for level in range(5):
                    fields[7 * i + 2 + level] = state.counters[TYPE_EVENT_INDEXES[level]]
            # Read: now the results are made.
            types = {(<TypeState>states[i]).name: tuple([fields[7 * i + k] for k in range(7)])
                     for i in range(n_states)}
            return ((sizes[2], sizes[1], sizes[0]),
                    tuple([counters[i] for i in range(N_COUNTERS)]), types, waiting_for_room, delayed)
        finally:
            PyMem_Free(stamps)
            PyMem_Free(fields)

    def attempt_durations(self):
        """``{job_type: (attempts per bucket, sum of seconds)}`` per registered executor.

        The buckets are ``ATTEMPT_DURATION_BUCKETS`` then +inf, not cumulative.
        """
        cdef TypeState state
        return {state.name: (tuple([state.durations[i] for i in range(N_BUCKETS)]), state.duration_sum)
                for state in self.types.values() if state.fn is not None}

    cdef TypeState _type_state(self, object job_type):
        if job_type is self.last_type:  # most pushes repeat the previous type: skip the dict
            return self.last_state
        state = self.types.get(job_type)
        if state is None:
            state = TypeState(job_type)
            for level in range(3 * N_RUNNERS):  # every type fits in every heap: listing never allocates
                _heap_reserve(&self.runnable[level], len(self.types) + 1)
            _parked_reserve(&self.parked, self.parked.count + len(self.types) + 1)
            self.types[job_type] = state
            self.states_made += 1
        self.last_type = job_type
        self.last_state = <TypeState>state
        return <TypeState>state

    # pushing

    cdef int _append(self, object job, object job_type, int level) except -1:
        """Place a job; the entry point hands it off afterwards if a worker waits."""
        cdef TypeState state = self._type_state(job_type)
        cdef Fifo *fifo = &state.levels[level]
        _fifo_push(fifo, job, self.seq)
        if fifo.count == 1:  # its oldest job at this level: list the type
            if state.admits():
                self._list(state, level, self.seq)
            else:
                self._wait_for_window(state)
        self.seq += 1
        state.waiting += 1
        self.level_sizes[level] += 1
        self.size += 1
        return 0

    cdef inline void _list(self, TypeState state, int level, uint64_t seq) noexcept:
        if not state.listed[level]:
            state.listed[level] = True
            _heap_push(&self.runnable[state.runner * 3 + level], seq, <PyObject *>state)

    cdef void _unlist(self, TypeState state) noexcept:
        """Take ``state``'s listings out of its runner's heaps (it changes runner, or a head left)."""
        cdef int level
        for level in range(3):
            if state.listed[level]:
                self._unlist_level(state, level)

    cdef void _unlist_level(self, TypeState state, int level) noexcept:
        cdef RunnableHeap *heap = &self.runnable[state.runner * 3 + level]
        cdef Py_ssize_t i, n = heap.count
        cdef Listing item
        heap.count = 0
        for i in range(n):  # re-push the others: a push writes at most at index i, already read
            item = heap.items[i]
            if item.state != <PyObject *>state:
                _heap_push(heap, item.key, item.state)
        state.listed[level] = False

    cdef inline bint _loop_has_work(self) noexcept:
        return (self.runnable[3].count or self.runnable[4].count or self.runnable[5].count) != 0

    cdef void _readmit(self, TypeState state) noexcept:
        """``state``, with jobs waiting, may admit jobs again: list it wherever it is not listed."""
        cdef int level
        cdef Fifo *fifo
        if state.admits():
            for level in range(3):
                fifo = &state.levels[level]
                if fifo.count:
                    self._list(state, level, fifo.items[fifo.head].seq)
        else:
            self._wait_for_window(state)

    cdef void _wait_for_window(self, TypeState state) noexcept:
        """``state`` has jobs waiting and admitted none: if its rate window is what was closed,
        park it until the window opens (the scheduler reopens it then, at once if it opened since)."""
        cdef double open_at = state.rate_open_at
        if open_at < state.rate_parked_until and state.held_by_rate_limit():
            state.rate_parked_until = open_at
            state.ever_parked = True
            _parked_push(&self.parked, open_at, <PyObject *>state)  # room was reserved
            if self.alarm is not None and open_at < self.alarm.armed_at:
                self.alarm._wake()

    def next_rate_opening(self):
        """When (monotonic) the earliest closed rate window of a type with jobs waiting opens."""
        return self.parked.items[0].key if self.parked.count else None

    def reopen_rate_limited(self, double now):
        """Readmit the types whose rate windows opened by ``now``; idle workers (and the idle event
        loop, for an async type) take their jobs."""
        self._reopen_due(now)
        if self.getters or self.loop_idle:
            self._hand_off()

    cdef void _reopen_due(self, double now) noexcept:
        cdef Parked top
        cdef TypeState state
        while self.parked.count and self.parked.items[0].key <= now:
            top = _parked_pop(&self.parked)
            state = <TypeState>top.state
            if top.key != state.rate_parked_until:
                continue  # stale: parked again since, with an earlier opening
            state.rate_parked_until = INFINITY
            if state.waiting:
                self._readmit(state)  # parks it again if starts moved its window meanwhile

    cdef inline int _check_open(self) except -1:
        if self._closed:
            raise QueueStopped("the queue is stopped")
        return 0

    cdef int _check_unregistered(self, dict batch, object repeated) except -1:
        if repeated is not None:
            raise _duplicate(repeated)
        if batch is not None:
            for job_id in batch:
                if job_id in self.ids:
                    raise _duplicate(job_id)
        return 0

    cdef int _mark_unnamed(self, list jobs, dict batch) except -1:
        """Put this queue's ``unnamed`` in each of ``jobs`` that has no id, before any other change
        of an accept: a job found marked already is in ``jobs`` twice (``_named_elsewhere`` refused
        one this queue held before), so the marks are taken back and DuplicateJob raised (the pure
        twin's ``_check_once``). One step under the GIL: no other thread sees these marks."""
        cdef Py_ssize_t i, k, n = len(jobs)
        if batch is not None and len(batch) >= n:
            return 0
        for i in range(n):
            job = jobs[i]
            raw = job._id
            if raw is self.unnamed:
                for k in range(i):
                    if jobs[k]._id is self.unnamed:
                        jobs[k]._id = None
                raise _given_twice(job)
            if _as_id(raw) is None:
                job._id = self.unnamed
        return 0

    cdef inline int _accept(self, list jobs, dict batch) except -1:
        """Count ``jobs`` and register their ids (``_mark_unnamed`` marked the others first)."""
        cdef Py_ssize_t n = len(jobs)
        self._unfinished += n
        self._counters[C_ENQUEUED] += n
        if self._joins:
            for job in jobs:
                self._stamp(job)
        if batch is not None:  # (not ids.update: the call allocates a tuple, and the collector may run)
            PyDict_Update(self.ids, batch)
        return 0

    cdef inline int _accept_one(self, object job, object job_id) except -1:
        self._unfinished += 1
        self._counters[C_ENQUEUED] += 1
        if self._joins:
            self._stamp(job)
        if job_id is not None:
            self.ids[job_id] = job
        else:
            job._id = self.unnamed
        return 0

    cdef int _stamp(self, object job) except -1:
        """``job``, accepted now, joins the current generation: a join under way does not wait for it.
        (Its key and generation are ints: made with no collection, so no Python code runs.)"""
        self.stamps[PyLong_FromVoidPtr(<void *>job)] = self._generation
        self._stamped += 1
        self._generation_size += 1
        return 0

    cdef inline object _named_elsewhere(self, object job):
        """``job._id``, once a job another queue accepted without an id is named there; DuplicateJob for
        one this queue holds unfinished already (see the pure twin)."""
        raw = job._id
        if raw is not None and type(raw) is _UNNAMED:
            if raw is self.unnamed:
                raise _queued_again(job)
            raw.name(job)  # (Python code runs: before this queue's one step)
            raw = job._id
        return raw

    def name(self, object job, object unnamed, object job_id=None):
        """``job.id`` of a job accepted without one: registered as if it had it at enqueue (see the pure twin)."""
        if job_id is None:
            job_id = _new_job_id()
        current = job._id
        if current is unnamed:  # no Python code ran since the read: one step with every move of the job
            if job_id in self.ids:
                raise _duplicate(job_id)
            job._id = job_id
            self.ids[job_id] = job
            return job_id
        if current is None:  # finished meanwhile: named as a job that was never queued
            current = first_id(job, job_id)
        if type(current) is _UNNAMED:  # queued again, in another queue, meanwhile
            return current.name(job, job_id)
        return current

    cpdef bint push(self, object job) except -1:
        """Accept a new ready job; False, with no effect, when the buffer is full."""
        cdef object job_type = _type_of(job)
        cdef int level = _level_of(job)
        cdef object job_id = _as_id(self._named_elsewhere(job))
        self._check_open()
        if job_id is not None and job_id in self.ids:
            raise _duplicate(job_id)
        if self.size >= self.capacity:
            return False
        self._append(job, job_type, level)
        self._accept_one(job, job_id)
        if self.getters or self.loop_idle:
            self._hand_off()
        return True

    def put(self, object job, timeout=None):
        """Accept a new ready job, waiting for room like ``queue.Queue.put``; False on timeout."""
        cdef object job_type = _type_of(job)
        cdef int level = _level_of(job)
        cdef object job_id = _as_id(self._named_elsewhere(job))
        cdef double deadline = _deadline(timeout)
        cdef bint has_room
        while True:
            self._check_open()
            has_room = self.size < self.capacity and not self.overflow
            if job_id is not None and job_id in self.ids:  # again after every wait
                if has_room and self.putters:
                    _notify(self.putters)  # the room we were woken for is the next producer's
                raise _duplicate(job_id)
            if has_room:
                break
            if deadline != WAIT_FOREVER and _monotonic() >= deadline:
                return False
            _wait(self.putters, deadline)
        self._append(job, job_type, level)
        self._accept_one(job, job_id)
        if self.getters or self.loop_idle:
            self._hand_off()
        return True

    def push_many(self, ready_jobs, delayed_jobs=()):
        """Accept every job or none: False, with no effect, when the ready ones do not all fit.

        ``delayed_jobs``, which the caller places itself, are counted and their
        ids registered in the same step; no id may repeat across both lists.
        """
        return self.push_many_delayed(ready_jobs, delayed_jobs, None, ()) is not None

    def push_many_delayed(self, ready_jobs, delayed_jobs, DelayedHeap heap, run_ats):
        """``push_many``, and with ``heap`` each of ``delayed_jobs`` pushed onto it at its
        ``run_ats`` entry in the same step: ``snapshot()`` sees the batch counted and placed, or
        none of it. None, with no effect, when the ready ones do not all fit; else, as
        ``accept_delayed`` gives it, ``(job, counter)`` for each job the pushes evicted."""
        cdef list ready = list(ready_jobs)
        cdef list delayed = list(delayed_jobs)
        cdef list placed = [(job, _type_of(job), _level_of(job)) for job in ready]
        cdef list accepted = ready + delayed
        cdef list times = [float(run_at) for run_at in run_ats] if heap is not None else []
        cdef list pushed_out = [None] * len(times)  # (allocated before the step: see accept_delayed)
        cdef list counted_as = [None] * len(times)
        cdef dict batch
        cdef Py_ssize_t i
        for job in accepted:
            self._named_elsewhere(job)
        batch, repeated = _batch_ids(accepted)
        cdef int level
        cdef uint64_t made = self.states_made - 1
        # The batch's type states, made before the step: allocating may run the collector, and Python
        # code (other threads get in), meanwhile the last attempt of a type with no executor may end,
        # which forgets its state. So again, until a pass makes none.
        while made != self.states_made:
            made = self.states_made
            for job, job_type, level in placed:
                self._type_state(job_type)
        self._check_open()
        self._check_unregistered(batch, repeated)
        if self.size + len(placed) > self.capacity:
            return None
        self._mark_unnamed(accepted, batch)
        for i in range(len(times)):  # (allocates nothing the collector tracks: no other thread gets in)
            pushed_out[i] = heap.push(delayed[i], <double>times[i])
        for job, job_type, level in placed:
            self._append(job, job_type, level)
        self._accept(accepted, batch)  # (first: a job of this batch may be among the evicted)
        for i in range(len(times)):
            if pushed_out[i] is not None:
                counted_as[i] = self._end_evicted(pushed_out[i])  # (a small int: nothing allocated)
        if self.getters or self.loop_idle:
            self._hand_off()
        return [(pushed_out[i], counted_as[i]) for i in range(len(times)) if pushed_out[i] is not None]

    def accept(self, jobs, counter=None):
        """Count ``jobs``, which the caller places itself (delayed, recovered), and register their ids;
        with ``counter``, their ends decided and counted in it in the same step (see the pure twin)."""
        cdef list accepted = list(jobs)
        cdef dict batch
        cdef int ended = -1 if counter is None else counter
        for job in accepted:
            self._named_elsewhere(job)
        batch, repeated = _batch_ids(accepted)
        self._check_open()
        self._check_unregistered(batch, repeated)
        self._mark_unnamed(accepted, batch)
        self._accept(accepted, batch)
        if ended >= 0:
            for job in accepted:
                self._decide_end(job)
                self._count_end(job, ended)

    cdef int _place(self, tuple owed) except -1:
        """Put in an accepted job, ``owed`` = ``(job, type, level)`` (made by the caller before its
        step: allocating may run the garbage collector): in the buffer while it has room and no
        job is owed room before it, else at the end of the overflow line (a pop moves it in)."""
        if self.size >= self.capacity or self.overflow:
            self.overflow.append(owed)
        else:
            self._append(owed[0], owed[1], <int>owed[2])
        return 0

    def accept_ready(self, object job):
        """``accept([job])`` and ``requeue(job)`` in one step, for a recovered job: never refused for
        lack of room (see the pure twin)."""
        cdef object job_type = _type_of(job)
        cdef int level = _level_of(job)
        cdef object job_id = _as_id(self._named_elsewhere(job))
        # Made before the step: allocating may run the garbage collector, and Python code.
        cdef tuple owed = (job, job_type, level)
        self._type_state(job_type)
        self._check_open()
        if job_id is not None and job_id in self.ids:
            raise _duplicate(job_id)
        self._accept_one(job, job_id)
        self._place(owed)
        if self.getters or self.loop_idle:
            self._hand_off()

    def accept_delayed(self, object job, DelayedHeap heap, double run_at):
        """``accept([job])`` and ``heap.push(job, run_at)`` in one step: ``snapshot()`` sees the
        job counted and in the heap, or neither. Returns None, or ``(the job the push evicted,
        the counter it was counted in)``, counted in the same step (``_end_evicted``)."""
        cdef list accepted = [job]
        cdef dict batch
        cdef int counter
        self._named_elsewhere(job)
        batch, repeated = _batch_ids(accepted)
        self._check_open()
        self._check_unregistered(batch, repeated)
        self._mark_unnamed(accepted, batch)
        evicted = heap.push(job, run_at)  # (allocates nothing the collector tracks: no other thread gets in)
        self._accept(accepted, batch)
        if evicted is None:
            return None
        counter = self._end_evicted(evicted)
        return (evicted, counter)

    cdef int _end_evicted(self, object job) except -1:
        """``job`` was pushed out of a full delayed heap: decide its end and count it (see the
        pure twin), allocating nothing the collector tracks."""
        if self._decide_end(job):
            return C_CANCELLED  # (counted as its mark was taken)
        self._counters[C_EVICTED] += 1
        return C_EVICTED

    cdef int _count_end(self, object job, int counter, long long n=1) except -1:
        """Count the end of ``job`` in ``counter``, queue-wide, and per type when its type has an
        executor (see the pure twin); ``n`` -1 takes a count back. No Python code runs."""
        cdef object state = None
        job_type = job.type  # (a slot of Job)
        if PyUnicode_CheckExact(job_type):
            state = self.types.get(job_type)  # exact str keys: no Python code runs
        self._counters[counter] += n
        if state is not None and (<TypeState>state).fn is not None:
            (<TypeState>state).counters[counter] += n
        return 0

    cdef inline int _released_hand_off(self, TypeState state, bint hand_off, int taker) except -1:
        """The hand-off of ``_release(state, hand_off, taker)``, which may run Python code (it may
        wake the event loop): for a caller that freed the slot quietly and ended its step first.
        Without ``hand_off`` the caller (of runner ``taker``) takes the type's next job itself; a
        caller of the other runner (the type was registered again meanwhile) cannot."""
        if state.waiting and (hand_off or state.runner != taker) and (self.getters or self.loop_idle):
            self._hand_off()
        return 0

    cdef inline int _release_quietly(self, TypeState release) except -1:
        """Free a slot without handing off: no Python code runs (the caller hands off last)."""
        if release is not None:
            self._release(release, False, release.runner)
        return 0

    def requeue(self, object job, TypeState release=None):
        """Make an accepted job ready (due, retried, recovered): never refused, never dropped.

        With the buffer full it waits in the overflow line, ahead of blocked
        producers, and moves in as soon as a pop makes room. Its type and level
        are read now: changing them later changes nothing here. False, with the
        job placed nowhere, when a cancel of it was requested on its way here:
        the caller ends it as cancelled (the mark is taken and counted, ``take_cancel``).
        ``release``: the type whose slot the job's attempt held, freed in the same step.
        """
        cdef object job_type = _type_of(job)
        cdef int level = _level_of(job)
        # Made before the decision: allocating may run the garbage collector, and Python code.
        cdef tuple owed = (job, job_type, level)
        self._type_state(job_type)
        self._release_quietly(release)
        if self.marks and self._take_cancel(job):
            if release is not None and (self.getters or self.loop_idle):
                self._hand_off()
            return False
        self._place(owed)
        if self.getters or self.loop_idle:
            self._hand_off()
        return True

    def move_due(self, DelayedHeap heap, double now):
        """Move the jobs of ``heap`` due at ``now`` (its clock) in, earliest first, as ``requeue``
        does, in one step: ``snapshot()`` sees each of them in the heap or placed, never between.

        Returns the due jobs that were placed nowhere, as ``(job, None)`` when a cancel of it
        was requested (the mark is taken: the caller ends it as cancelled), or ``(job, error)``
        when it cannot go (a priority made invalid while it waited: the caller fails it).
        """
        cdef list left = []
        cdef int level
        cdef tuple owed
        while True:
            job = heap._due_root(now)
            if job is None:
                break
            try:
                job_type = _type_of(job)
                level = _level_of(job)
            except Exception as error:
                if heap._due_root(now) is job:
                    heap._pop_root()
                    left.append((job, error))
                continue
            # Made while the job is still in the heap: allocating may run the garbage collector,
            # and Python code, which may let another thread in; from the pop to the placing, none.
            owed = (job, job_type, level)
            self._type_state(job_type)
            if heap._due_root(now) is not job:  # another thread took it out meanwhile (a cancel)
                continue
            heap._pop_root()
            if self.marks and self._take_cancel(job):
                left.append((job, None))
            else:
                self._place(owed)
        if self.getters or self.loop_idle:
            self._hand_off()
        return left

    # popping

    cdef object _take(self, PyObject **taken_state, int *taken_level, int runner=THREADS):
        """Take ``runner``'s next job and a slot of its type, or None.

        ``taken_state`` receives a borrowed reference: a type with a running attempt stays in types.
        """
        cdef int level
        cdef RunnableHeap *runnable
        cdef TypeState state
        cdef Fifo *fifo
        cdef double now
        if self.parked.count:  # a busy worker reopens a window without the scheduler
            now = _monotonic()
            if self.parked.items[0].key <= now:
                self._reopen_due(now)
        for level in range(2, -1, -1):
            runnable = &self.runnable[runner * 3 + level]
            while runnable.count:
                state = <TypeState>runnable.items[0].state
                if not state.admits():  # saturated or rate-limited since it was listed
                    state.listed[level] = False
                    _heap_pop(runnable)
                    self._wait_for_window(state)  # else _readmit lists it again
                    continue
                fifo = &state.levels[level]
                job = _fifo_pop(fifo)
                state.waiting -= 1
                self.level_sizes[level] -= 1
                self.size -= 1
                state.active += 1
                if state.rate_starts != NULL:
                    state.record_start(_monotonic())
                if fifo.count and state.admits():  # keyed by its next oldest job now
                    _heap_replace_top(runnable, fifo.items[fifo.head].seq)
                else:
                    state.listed[level] = False
                    _heap_pop(runnable)
                    if fifo.count:
                        self._wait_for_window(state)
                self._refill()
                taken_state[0] = <PyObject *>state
                taken_level[0] = level
                return job
        return None

    cdef int _refill(self) except -1:
        """One pop made room for one job: the overflow line first, else a blocked producer."""
        cdef int level
        if self.overflow:
            job, job_type, level = self.overflow.popleft()
            self._append(job, job_type, level)  # the caller hands it off if a worker waits
        elif self.putters:
            _notify(self.putters)
        return 0

    cdef int _hand_off(self) except -1:
        """While workers wait and a job is poppable, pop it for the latest idle worker and wake it.

        One lock release per job; the woken worker returns the job as soon as
        it has the GIL back, without looking at the queue again. None once closed: no attempt
        starts after stop, and a job handed to a worker would count as running until it woke
        (a slot freed after close(), or a job given back then).
        """
        cdef PyObject *state
        cdef int level
        cdef _Waiter waiter
        while self.getters and not self._closed:
            job = self._take(&state, &level)
            if job is None:
                break
            waiter = <_Waiter>self.getters.pop()
            waiter.job = job
            waiter.state = <TypeState>state
            waiter.level = level
            PyThread_release_lock(waiter.lock)
        if self.loop_idle and self._loop_has_work():  # the loop's jobs: one wake-up, it drains
            self.loop_idle = False
            self.loop_waker()  # the last step: the state above is complete if it lets others run
        return 0

    cdef int _give_back(self, _Waiter waiter) except -1:
        """Undo a hand-off that its worker will not return (interrupted): like a requeue."""
        self._put_back(waiter)
        if self.getters or self.loop_idle:
            self._hand_off()
        return 0

    cdef int _put_back(self, _Waiter waiter) except -1:
        cdef TypeState state = <TypeState>waiter.state
        job = waiter.job
        owed = (job, state.name, waiter.level)  # made before the decision, as in requeue
        if waiter.job is not job:  # a collection the allocation ran let its worker in, which returned it
            return 0
        waiter.job = waiter.state = None
        return self._untake(owed, state)

    cdef int _untake(self, tuple owed, TypeState state) except -1:
        """A job taken (its type's slot held) and not started is ready again: ``owed`` is its
        (job, type name, level), made by the caller before its decision, as in requeue."""
        state.active -= 1
        self._place(owed)
        self._readmit(state)
        return 0

    def enlist(self, _Waiter waiter):
        """``waiter`` is a worker's, for all its waits: close() takes back a job handed to it."""
        self._enlist(waiter)

    cdef int _enlist(self, _Waiter waiter) except -1:
        self.waiters.add(weakref.ref(waiter, self.waiters.discard))
        return 0

    cdef int _reclaim_handed(self) except -1:
        """close(): take back the jobs handed to workers that have not returned them yet, in this step
        (a worker returns one holding the GIL, in _pop, without a call that could let this one in), so
        that no snapshot from now on counts one as running: its worker would give it back unstarted
        (no attempt starts after stop). A job whose cancel was requested stays: its worker ends it
        as cancelled. Once closed."""
        cdef _Waiter waiter
        for ref in list(self.waiters):  # (copied in C: no Python code runs, no thread comes in)
            referent = ref()
            if referent is None:
                continue
            waiter = <_Waiter>referent
            if waiter.job is not None and not (self.marks and self._cancel_requested(waiter.job)):
                self._put_back(waiter)
        return 0

    cdef int _reclaim_loop_handed(self) except -1:
        """close(): take back, in this step, the jobs handed to the event loop that it has not started
        (still in its deque: hand_to_loop), as _reclaim_handed does a worker's: from now on they count
        as ready, never as running, however long the loop takes to come to them. A job whose cancel
        was requested stays: the loop ends it as cancelled. Once closed."""
        cdef TypeState state
        handed = self.loop_handed
        if handed is None:
            return 0
        kept = []
        while True:
            try:
                one = handed.popleft()  # (atomic: a job the loop pops meanwhile is the loop's)
            except IndexError:
                break
            job = one[0]
            if self.marks and self._cancel_requested(job):
                kept.append(one)
                continue
            state = <TypeState>one[1]
            self._untake((job, state.name, one[2]), state)
        handed.extend(kept)
        return 0

    cdef int _pass_on_close(self) except -1:
        """The queue is closed: wake the latest idle worker, which does the same as it returns None."""
        if self.getters:
            PyThread_release_lock((<_Waiter>self.getters.pop()).lock)
        return 0

    cdef int _leave(self, _Waiter waiter) except -1:
        """``waiter`` stops waiting: off the list, or take the wake-up sent to it."""
        if waiter in self.getters:
            self.getters.remove(waiter)
        else:
            PyThread_acquire_lock(waiter.lock, 0)  # released for it (a job, or close): held again
        return 0

    cdef object _pop(self, double deadline, PyObject **taken_state, _Waiter waiter):
        """Take a job and a slot of its type; wait on ``waiter`` (made here when None)."""
        cdef int level
        cdef int woken
        while not self._closed:
            job = self._take(taken_state, &level)
            if job is not None:
                if self.getters or self.loop_idle:  # _take may have moved an overflow job in
                    self._hand_off()
                return job
            if deadline != WAIT_FOREVER and _monotonic() >= deadline:
                return None
            if waiter is None:
                waiter = _Waiter()
                self._enlist(waiter)
            self.getters.append(waiter)
            try:
                woken = _sleep_on(waiter.lock, deadline)
            except BaseException:  # e.g. KeyboardInterrupt in the main thread
                self._leave(waiter)
                if self._closed:  # (its wake-up may have been close()'s)
                    self._pass_on_close()
                if waiter.job is not None:
                    self._give_back(waiter)
                raise
            if not woken:  # timed out; a hand-off may have come meanwhile
                self._leave(waiter)
            if waiter.job is not None:
                # Once closed, none is handed over, and close() took back in its own step every job
                # handed before but one whose cancel was requested: its worker ends that as
                # cancelled, without calling its function. (The pure core's worker, whose read of
                # its job is not atomic, gives back one that close() came too late for.)
                job = waiter.job
                taken_state[0] = <PyObject *>waiter.state  # borrowed, as from _take
                waiter.job = waiter.state = None  # an idle worker keeps no job or type alive
                return job
            # woken by close(), or timed out: look again
        self._pass_on_close()
        return None

    def pop_with_type(self, timeout=None):
        """Take a job and a slot of its type; None when closed or on timeout."""
        cdef PyObject *state = NULL
        job = self._pop(_deadline(timeout), &state, None)
        return None if job is None else (job, <TypeState>state)

    def pop(self, timeout=None):
        """Take a job and a slot of its type (give it back with ``release``); None when closed or on timeout."""
        cdef PyObject *state = NULL
        return self._pop(_deadline(timeout), &state, None)

    def set_loop_waker(self, waker, handed=None):
        """``waker()`` (cheap, never raising) asks the event loop to call ``hand_to_loop`` soon.

        It is called at most once between two such calls that found nothing,
        so a busy loop is never woken per job. None detaches. ``handed``: the
        deque ``hand_to_loop`` fills, from which the loop pops (``popleft``)
        each job as it starts it; close() takes back what is left in it.
        """
        self.loop_handed = handed
        self.loop_waker = waker
        self.loop_idle = False
        if waker is not None and self._loop_has_work():
            waker()
        else:
            self.loop_idle = waker is not None

    def hand_to_loop(self, Py_ssize_t max_jobs):
        """Take up to ``max_jobs`` of the loop's jobs (and their slots), in priority order, into the
        deque given to ``set_loop_waker``, as ``(job, type, level)``: how many. Until the loop pops
        one (``popleft``, as it starts it), close() may take it back.

        Fewer than ``max_jobs`` means there were no more: the next job the loop
        can take wakes it (``set_loop_waker``). Nothing once closed.
        """
        handed = self.loop_handed
        if handed is None:
            raise RuntimeError("hand_to_loop() needs the deque given to set_loop_waker(waker, handed)")
        return self._take_for_loop(max_jobs, handed)

    def take_back_from_loop(self):
        """Once closed, take back what is left in the loop's deque, as close() did: the loop put a
        job back there that it popped as stop() began (before the close, or after it), counted
        running until this step and ready from it. Before close(), nothing: close() takes it back."""
        if self._closed:
            self._reclaim_loop_handed()

    cdef Py_ssize_t _take_for_loop(self, Py_ssize_t max_jobs, object into) except -1:
        """Append up to ``max_jobs`` of the loop's jobs to ``into``: how many."""
        cdef PyObject *state
        cdef int level
        cdef Py_ssize_t n = 0
        while n < max_jobs and not self._closed:
            job = self._take(&state, &level, LOOP)
            if job is None:
                self.loop_idle = self.loop_waker is not None
                break
            into.append((job, <TypeState>state, level))
            n += 1
        if self.getters:  # _take may have moved a worker thread's job in from the overflow line
            self._hand_off()
        if self._closed:  # a collection the allocation ran let close() in: given back now
            self._reclaim_loop_handed()
        return n

    def remove(self, job_id):
        """Take the ready (or overflow) job with this id out of the queue: the job, or None.

        The job stays unfinished: the caller ends it (``task_done``). Scans
        every waiting job: for a cancel, not for a per-job path.
        """
        if not PyUnicode_CheckExact(job_id):
            raise _not_a_str("job id", job_id)
        return self._remove(job_id)

    cdef object _remove(self, object job_id, int counter=-1, bint mark=True):
        """``remove``; with a ``counter`` (a cancel's), the job's mark is ENDING (unless not ``mark``: a
        job registered under no id) and its end counted there in the step that takes it out: the
        search may allocate (the collector runs Python code, other threads get in), and the hand-off
        after it may wake the event loop, but a snapshot never sees it in two places."""
        cdef TypeState state
        cdef Fifo *fifo
        cdef Py_ssize_t position, index
        cdef int level
        for index, owed in enumerate(self.overflow):
            if owed[0]._id == job_id:
                del self.overflow[index]
                job = owed[0]
                if counter >= 0:
                    if mark:
                        self.marks[job_id] = ENDING
                    self._count_end(job, counter)
                return job
        for state in list(self.types.values()):
            for level in range(3):
                fifo = &state.levels[level]
                position = _fifo_find(fifo, job_id)
                if position < 0:
                    continue
                job = _fifo_remove(fifo, position)
                state.waiting -= 1
                self.level_sizes[level] -= 1
                self.size -= 1
                if counter >= 0:
                    if mark:
                        self.marks[job_id] = ENDING
                    self._count_end(job, counter)
                if position == 0 and state.listed[level]:  # its listing was keyed by this job
                    self._unlist_level(state, level)
                    self._readmit(state)
                self._refill()
                if self.getters or self.loop_idle:
                    self._hand_off()
                return job
        return None

    # cancelling: a job between two places is never missed (see the pure twin)

    def mark_cancel(self, job_id, *heaps):
        """What ``cancel(job_id)`` can decide here, in one step: ``(outcome, job)``; with ``heaps``, a job
        registered under no id is looked for there and in the buffer too (see the pure twin)."""
        if not PyUnicode_CheckExact(job_id):
            raise _not_a_str("job id", job_id)
        job = self.ids.get(job_id)
        if job is None:
            if heaps:
                return self._remove_unregistered(job_id, heaps)
            return CANCEL_UNKNOWN, None
        if job_id in self.marks:
            return CANCEL_LOST, None
        # Requested before _remove, which marks it ENDING and counts it in the step that takes it out:
        # the search may let other threads in (it allocates), and taking a ready job out may wake the
        # event loop (Python code). A cancel meanwhile finds it marked; a holder that decides its end
        # meanwhile takes the cancel (as if it came after this step); a snapshot finds it in its
        # place, or ended. (Marked ENDING, such a holder saw no cancel and counted a success, and
        # the cancel said MARKED too, its mark left behind for the next job with this id.)
        self.marks[job_id] = REQUESTED
        removed = self._remove(job_id, C_CANCELLED)
        if removed is not None:
            return CANCEL_REMOVED, removed
        return CANCEL_MARKED, job

    cdef tuple _remove_unregistered(self, object job_id, tuple heaps):
        """``mark_cancel`` of a job registered under no id: out of the buffer, or out of a heap, and
        counted cancelled in the step that takes it out (nothing the collector tracks is allocated
        in between)."""
        job = self._remove(job_id, C_CANCELLED, False)
        if job is None:
            for heap in heaps:
                job = (<DelayedHeap?>heap).remove(job_id)  # (runs no Python code for an exact str id)
                if job is not None:
                    self._count_end(job, C_CANCELLED)
                    break
        if job is None:
            return CANCEL_UNKNOWN, None
        return CANCEL_REMOVED, job

    @property
    def cancel_marks(self):
        """The marks themselves (never replaced): empty means no cancel waits for a holder."""
        return self.marks

    def cancel_requested(self, object job):
        """Whether a cancel of ``job`` waits for whoever holds it (peek; ``take_cancel`` acts)."""
        return bool(self.marks) and self._cancel_requested(job)

    cdef bint _cancel_requested(self, object job) except -1:
        job_id = job._id  # read first: it may run Python code (a subclass's property)
        if not PyUnicode_CheckExact(job_id):
            return False
        mark = self.marks.get(job_id)
        return mark is not None and <long>mark == REQUESTED and self.ids.get(job_id) is job

    def take_cancel(self, object job, TypeState release=None):
        """The holder of ``job`` takes a cancel requested for it: True once, counted in the same step;
        then it ends the job as cancelled. ``release``: the slot its attempt held, freed in the
        same step when the cancel is taken (else it stays taken)."""
        if not self.marks or not self._take_cancel(job):
            return False
        if release is not None:
            self._release(release)  # (the last step: a hand-off may run Python code)
        return True

    def take_unregistered_cancel(self, object job):
        """A running ``job``'s cancel that ``mark_cancel`` found registered under no id is counted (see
        the pure twin)."""
        return self._take_unregistered_cancel(job)

    cdef bint _take_unregistered_cancel(self, object job) except -1:
        job_id = job._id  # read first: it may run Python code (a subclass's property)
        if PyUnicode_CheckExact(job_id) and self.ids.get(job_id) is job:
            if job_id in self.marks:
                return False
            self.marks[job_id] = ENDING
        self._count_end(job, C_CANCELLED)
        return True

    def take_cancel_from(self, object job, DelayedHeap heap):
        """``job``, with a cancel requested, is taken out of ``heap`` and its mark taken and counted, in
        one step: True, and the caller ends it as cancelled. False, with nothing changed, else."""
        if not self.marks or not self._cancel_requested(job):
            return False
        if heap.remove(job._id, job) is None:  # (runs no Python code for an exact str id)
            return False
        return self._take_cancel(job)

    cdef bint _take_cancel(self, object job) except -1:
        """Take a cancel requested for ``job`` and count its end, in one step (see the pure twin)."""
        if not self._cancel_requested(job):
            return False
        self.marks[job._id] = ENDING
        self._count_end(job, C_CANCELLED)
        return True

    def decide_end(self, object job):
        """The holder of ``job`` decides its end: True when a cancel was requested first (counted: it ends as cancelled)."""
        return self._decide_end(job)

    def end(self, object job, int counter, TypeState release=None):
        """``job`` leaves without success: its end decided and counted in ``counter``, or in CANCELLED
        when a cancel of it was requested first; returns the counter used. ``release``: the slot
        its attempt held, freed in the same step (see the pure twin)."""
        if not 0 <= counter < N_COUNTERS:
            raise ValueError(f"counter must be one of the counter constants, got {counter}")
        self._release_quietly(release)
        if counter != C_CANCELLED and self._decide_end(job):
            counter = C_CANCELLED
        else:
            self._count_end(job, counter)
        if release is not None and (self.getters or self.loop_idle):
            self._hand_off()
        return counter

    def place_delayed(self, object job, DelayedHeap heap, double run_at, TypeState release=None):
        """``heap.push(job, run_at)`` for an accepted job (a retry, a recovered one), with the slot of
        ``release`` freed in the same step. Returns the job the push evicted, or None."""
        pushed_out = heap.push(job, run_at)  # (allocates nothing the collector tracks)
        self._release_quietly(release)
        if release is not None and (self.getters or self.loop_idle):
            self._hand_off()
        return pushed_out

    cdef bint _decide_end(self, object job) except -1:
        if self.marks and self._take_cancel(job):
            return True
        job_id = job._id
        if job_id is self.unnamed:  # never named: named now, held under that id until it finishes (see the pure twin)
            job_id = _new_job_id()
            job._id = job_id
            if job_id in self.ids:
                return False
            self.ids[job_id] = job
        if self.ids and PyUnicode_CheckExact(job_id) and self.ids.get(job_id) is job:
            self.marks[job_id] = ENDING
        return False

    def release(self, job_type):
        """An attempt of ``job_type`` returned: free its slot."""
        if job_type is self.last_type:
            self._release(self.last_state)
        else:
            self._release(<TypeState?>self.types[_exact_type(job_type)])

    def release_state(self, TypeState state, bint hand_off=True, int taker=THREADS):
        """Free a slot of ``state``; ``hand_off=False``: the caller (of runner ``taker``) takes its job itself."""
        self._release(state, hand_off, taker)

    cdef inline int _release(self, TypeState state, bint hand_off=True, int taker=THREADS) except -1:
        state.active -= 1
        if state.waiting:
            self._readmit(state)
            self._released_hand_off(state, hand_off, taker)
        elif state.fn is None and not state.active and not state.ever_parked and not self.overflow:
            # An unregistered type leaves nothing behind; not while jobs are owed room, as one may be
            # of it: moving it in must not make its state again (allocating may run the collector).
            del self.types[state.name]
            if state is self.last_state:
                self.last_type, self.last_state = _NO_TYPE, None
        return 0

    # sizes and lifecycle

    def sizes(self):
        """Ready jobs per level: (high, medium, low)."""
        return self.level_sizes[2], self.level_sizes[1], self.level_sizes[0]

    def __len__(self):
        return self.size

    @property
    def overflow_size(self):
        return len(self.overflow)

    @property
    def closed(self):
        return self._closed

    def close_forked(self):
        """In a fork()ed child of the process whose threads serve this core: refuse every job from
        now on (pushes raise QueueStopped, join returns), touching no lock and waking no one (none
        of those threads is there)."""
        self._closed = True

    def close(self):
        """Stop: pops return None, pushes raise QueueStopped, every waiter wakes.

        The idle workers wake one after another, each as the one before returns
        (``_pass_on_close``): thousands woken at once would all wait for the GIL,
        and their waits would starve the threads holding it.
        """
        self._closed = True
        self._reclaim_handed()
        self._reclaim_loop_handed()
        self._pass_on_close()  # with no job: it sees the queue closed
        _notify_all(self.putters)
        _notify_all(self.joiners)

    # accounting

    def count(self, int event, long long n=1, job_type=None):
        """Count ``n`` events; with ``job_type`` (a registered executor's), per type too. A
        counter never goes down (Prometheus reads that as a reset): ``n`` is 0 or more, and no
        count is ever taken back or moved (an event is counted once it is decided)."""
        if not 0 <= event < N_COUNTERS:
            raise ValueError(f"event must be one of the counter constants, got {event}")
        if n < 0:
            raise ValueError(f"a counter never goes down: n must be 0 or more, got {n}")
        cdef object state = None
        if PyUnicode_CheckExact(job_type):
            state = self.types.get(job_type)  # exact str keys: no Python code runs
        self._counters[event] += n
        if state is not None and (<TypeState>state).fn is not None:
            (<TypeState>state).counters[event] += n

    cdef inline void _succeeded(self, TypeState state, double seconds) noexcept:
        self._counters[C_SUCCEEDED] += 1
        state.counters[C_SUCCEEDED] += 1
        state.record_duration(seconds)

    def attempt_succeeded(self, TypeState state, double seconds, object job=None, bint finish=False,
                          bint release=False, bint hand_off=True):
        """An attempt of ``state`` succeeded after ``seconds``: count it, queue-wide and per type.

        With ``job``: False, with the success not counted, when a cancel of it was
        requested first (counted as cancelled); else its end is decided, and with
        ``finish`` it is finished in the same step. ``release``: the attempt's slot is
        freed in the same step (see the pure twin).
        """
        cdef bint succeeded
        if release:
            self._release_quietly(state)
            succeeded = job is None or self._attempt_succeeded(state, seconds, job, finish)
            if job is None:
                self._succeeded(state, seconds)
            if (hand_off or state.runner != THREADS) and (self.getters or self.loop_idle):
                self._hand_off()
            return succeeded
        if job is None:
            self._succeeded(state, seconds)
            return True
        return self._attempt_succeeded(state, seconds, job, finish)

    cdef inline bint _attempt_succeeded(self, TypeState state, double seconds, object job,
                                        bint finish) except -1:
        if finish:
            if self.marks and self._take_cancel(job):
                state.record_duration(seconds)  # it ran: a decided attempt, counted as cancelled
                return False
        elif self._decide_end(job):
            state.record_duration(seconds)
            return False
        self._succeeded(state, seconds)
        if finish:
            self._task_done(job)
        return True

    def loop_attempt_succeeded(self, TypeState state, double seconds, object job):
        """An event loop's attempt of ``state`` succeeded after ``seconds``, and ``job`` with it.

        ``release_state(state, False, LOOP)`` and ``attempt_succeeded(state,
        seconds, job, finish=True)`` in one step: the loop's per-job path.
        False when a cancel of ``job`` was requested first: only its slot is freed.
        """
        cdef bint succeeded
        self._release_quietly(state)
        succeeded = self._attempt_succeeded(state, seconds, job, True)
        self._released_hand_off(state, False, LOOP)  # last: after the slot and the success in one step
        return succeeded

    def record_duration(self, TypeState state, double seconds):
        """An attempt of ``state`` was decided (failed, timed out, cancelled) after ``seconds``."""
        state.record_duration(seconds)

    def counters(self):
        return tuple([self._counters[i] for i in range(N_COUNTERS)])

    @property
    def unfinished(self):
        return self._unfinished

    def has_id(self, job_id):
        """Whether an unfinished job was accepted with this id."""
        if not PyUnicode_CheckExact(job_id):
            raise _not_a_str("job id", job_id)
        return job_id in self.ids

    def registered(self, object job):
        """Whether ``job`` is the unfinished job accepted with its id (not one whose id came later)."""
        job_id = job._id
        return PyUnicode_CheckExact(job_id) and self.ids.get(job_id) is job

    cdef inline int _task_done(self, object job) except -1:
        cdef object job_id = job._id
        self._unfinished -= 1
        if job_id is self.unnamed:
            job._id = None  # never named: an id read from now on is not this queue's to register
        elif self.ids and PyUnicode_CheckExact(job_id) and self.ids.get(job_id) is job:
            del self.ids[job_id]  # not another job's id
            if self.marks:
                self.marks.pop(job_id, None)
        if self._stamped:
            self._unstamp(job)
        elif self._unfinished <= 0 and self.joiners:
            _notify_all(self.joiners)
        return 0

    cdef int _unstamp(self, object job) except -1:
        """``job`` finished while some unfinished jobs are stamped: out of its group (see the pure twin)."""
        cdef long long generation
        cdef Py_ssize_t left
        stamp = self.stamps.pop(PyLong_FromVoidPtr(<void *>job), None)
        if stamp is None:  # of the base
            if self._unfinished == self._stamped and self.joiners:
                _notify_all(self.joiners)
            return 0
        self._stamped -= 1
        generation = stamp
        if generation == self._generation:  # (no join waits for the current generation)
            self._generation_size -= 1
            return 0
        left = self.older[stamp] - 1
        if left:
            self.older[stamp] = left
        else:
            del self.older[stamp]
            if self.joiners:
                _notify_all(self.joiners)
        return 0

    def task_done(self, object job):
        """``job``, accepted earlier, finished for good: its id is free again."""
        self._task_done(job)

    def join_begin(self):
        """Begin a join: its ticket, or None when no job is unfinished (see the pure twin)."""
        if self._unfinished <= 0:
            return None
        if self._generation_size:  # jobs were stamped with it: they are older than this join
            self.older[self._generation] = self._generation_size
            self._generation += 1
            self._generation_size = 0
        self._joins += 1
        return self._generation - 1

    cdef bint _joined(self, long long ticket) except -1:
        if self._unfinished != self._stamped:
            return False  # the base has jobs, all older than every join under way
        for generation in self.older:  # (oldest first)
            return generation > ticket
        return True

    def join_wait(self, ticket, timeout=None):
        """Wait until every job unfinished at the ``join_begin`` that gave ``ticket`` finished;
        False on timeout, or when closed first."""
        cdef double deadline = _deadline(timeout)
        cdef long long upto
        if ticket is None:
            return True
        upto = ticket
        while not self._joined(upto):
            if self._closed:
                return False
            if deadline != WAIT_FOREVER and _monotonic() >= deadline:
                return False
            _wait(self.joiners, deadline)
        return True

    def join_end(self, ticket):
        """The join that ``join_begin`` gave ``ticket`` is over: once no join is, jobs go unstamped."""
        if ticket is not None:
            self._joins -= 1

    def join(self, timeout=None):
        """Wait until every job accepted before this call finished; jobs accepted meanwhile are not
        waited for. False on timeout or when closed first."""
        ticket = self.join_begin()
        try:
            return self.join_wait(ticket, timeout)
        finally:
            self.join_end(ticket)


# --- the delayed heap ---------------------------------------------------------

_RUN_AT_AND_SEQ = operator.itemgetter(0, 1)


cdef struct HeapEntry:
    double run_at
    uint64_t seq
    PyObject *job  # an owned reference


cdef inline bint _earlier(HeapEntry *a, HeapEntry *b) noexcept nogil:
    return a.run_at < b.run_at or (a.run_at == b.run_at and a.seq < b.seq)


@cython.final
cdef class DelayedHeap:
    """Jobs waiting for their run_at, earliest first; FIFO among equal run_at.

    With ``capacity`` > 0, pushing onto a full heap evicts and returns the job
    with the earliest run_at (the new job is always added).
    """
    cdef readonly Py_ssize_t capacity
    # Always None: an object attribute makes Cython give the heap the collector's support,
    # whose traversal (_traverse_heap) visits its jobs, so a cycle through one is found.
    cdef object _unused
    # Guarded by the GIL: a binary min-heap in a growable C array.
    cdef HeapEntry *entries
    cdef Py_ssize_t count
    cdef Py_ssize_t allocated
    cdef uint64_t seq

    def __cinit__(self, Py_ssize_t capacity=0):
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0 (0 = unlimited), got {capacity}")
        self.capacity = capacity

    def __dealloc__(self):
        cdef Py_ssize_t i
        for i in range(self.count):
            Py_XDECREF(self.entries[i].job)
        PyMem_Free(self.entries)

    cdef void _sift_up(self, Py_ssize_t i) noexcept:
        cdef HeapEntry item = self.entries[i]
        cdef Py_ssize_t parent
        while i > 0:
            parent = (i - 1) >> 1
            if not _earlier(&item, &self.entries[parent]):
                break
            self.entries[i] = self.entries[parent]
            i = parent
        self.entries[i] = item

    cdef void _sift_down(self, Py_ssize_t i) noexcept:
        cdef HeapEntry item = self.entries[i]
        cdef Py_ssize_t child, n = self.count
        while True:
            child = 2 * i + 1
            if child >= n:
                break
            if child + 1 < n and _earlier(&self.entries[child + 1], &self.entries[child]):
                child += 1
            if not _earlier(&self.entries[child], &item):
                break
            self.entries[i] = self.entries[child]
            i = child
        self.entries[i] = item

    def close_forked(self):
        """In a fork()ed child (see ReadyQueue.close_forked): nothing to do, as no lock is taken here."""

    def push(self, object job, double run_at):
        """Add ``job`` due at ``run_at``; return the evicted job, or None."""
        cdef HeapEntry entry
        cdef Py_ssize_t allocated
        cdef HeapEntry *entries
        Py_INCREF(job)
        entry = HeapEntry(run_at, self.seq, <PyObject *>job)
        self.seq += 1
        if self.capacity and self.count >= self.capacity:
            evicted = <object>self.entries[0].job  # the earliest of those already waiting
            Py_DECREF(evicted)
            self.entries[0] = entry
            self._sift_down(0)
            return evicted
        if self.count == self.allocated:
            allocated = 16 if self.allocated == 0 else self.allocated * 2
            entries = <HeapEntry *>PyMem_Realloc(self.entries, allocated * sizeof(HeapEntry))
            if entries == NULL:
                Py_DECREF(job)
                raise MemoryError()
            self.entries, self.allocated = entries, allocated
        self.entries[self.count] = entry
        self.count += 1
        self._sift_up(self.count - 1)
        return None

    cdef object _pop_root(self):
        job = <object>self.entries[0].job
        Py_DECREF(job)
        self.count -= 1
        if self.count:
            self.entries[0] = self.entries[self.count]
            self._sift_down(0)
        return job

    cdef object _due_root(self, double now):
        """The earliest job if it is due at ``now``, left in place; else None."""
        return <object>self.entries[0].job if self.count and self.entries[0].run_at <= now else None

    def pop_due(self, double now):
        """Remove and return, earliest first, every job with run_at <= now."""
        cdef list due = []
        while self.count and self.entries[0].run_at <= now:
            due.append(self._pop_root())
        return due

    def pop_all(self):
        """Remove and return every job, earliest first."""
        cdef list jobs = []
        while self.count:
            jobs.append(self._pop_root())
        return jobs

    def next_run_at(self):
        return self.entries[0].run_at if self.count else None

    cdef int _collect_due(self, Py_ssize_t i, double now, list due) except -1:
        """Append (run_at, seq, job) of the entries with run_at <= now in the subtree at ``i``."""
        if i >= self.count or self.entries[i].run_at > now:
            return 0  # a heap: nothing below a job not due is due
        due.append((self.entries[i].run_at, self.entries[i].seq, <object>self.entries[i].job))
        self._collect_due(2 * i + 1, now, due)
        self._collect_due(2 * i + 2, now, due)
        return 0

    cdef list _due(self, double now):
        """The jobs with run_at <= now, earliest first, left in place."""
        cdef list due = []
        self._collect_due(0, now, due)
        due.sort(key=_RUN_AT_AND_SEQ)  # (never compares the jobs)
        return [entry[2] for entry in due]

    def peek_due(self, double now):
        """``(the jobs with run_at <= now, earliest first, how many are not due)``, read at one
        moment and left in place: only the due entries are visited."""
        due = self._due(now)
        return due, self.count - len(due)

    def remove(self, job_id, object job=None):
        """Take the job whose ``_id`` is ``job_id`` out of the heap: the job, or None.

        With ``job``, only that job (another job may have its id by now).
        """
        cdef Py_ssize_t i
        for i in range(self.count):
            if (<object>self.entries[i].job)._id == job_id and (job is None or <object>self.entries[i].job is job):
                job = <object>self.entries[i].job
                Py_DECREF(job)
                self.count -= 1
                if i < self.count:
                    self.entries[i] = self.entries[self.count]
                    self._sift_down(i)
                    self._sift_up(i)
                return job
        return None

    def __len__(self):
        return self.count


cdef traverseproc _generated_heap_traverse = (<PyTypeObject *>DelayedHeap).tp_traverse


cdef int _traverse_heap(PyObject *o, visitproc visit, void *arg) except -1:
    """DelayedHeap's traversal: Cython's, then every job in the heap."""
    cdef int result = _generated_heap_traverse(o, visit, arg)
    cdef DelayedHeap heap = <DelayedHeap>o
    cdef Py_ssize_t i
    if result:
        return result
    for i in range(heap.count):
        result = visit(heap.entries[i].job, arg)
        if result:
            return result
    return 0


(<PyTypeObject *>DelayedHeap).tp_traverse = _traverse_heap


# --- one worker -------------------------------------------------------------

def interrupt_thread(unsigned long thread_id, exc_type):
    """Raise ``exc_type`` in another thread at its next bytecode.

    None clears it, but not for a thread's own: see drop_own_interruption.
    """
    if exc_type is None:
        return PyThreadState_SetAsyncExc(thread_id, NULL) == 1
    return PyThreadState_SetAsyncExc(thread_id, <PyObject *>exc_type) == 1


def drop_own_interruption():
    """Take back the interruption (JobTimeout) that may still be pending in the calling thread.

    Not by clearing it (``interrupt_thread(thread_id, None)``): on CPython 3.11 that signals
    the interpreter's eval breaker, which only a thread handling an async exception
    unsignals, so it stays set, and from then on every function called under
    ``sys.settrace`` (a debugger, coverage) spins at its first line. The thread raises
    DroppedInterruption into itself instead, replacing a pending JobTimeout, and handles it
    at once (in let_it_land, Python bytecode: compiled code never looks), which unsignals the flag.
    """
    try:
        PyThreadState_SetAsyncExc(PyThread_get_thread_ident(), <PyObject *>DroppedInterruption)
        let_it_land()
    except DroppedInterruption:
        pass


@cython.final
cdef class WorkerSlot:
    """The attempt one worker runs now, as the watchdog sees it.

    ``expire`` (watchdog) and the worker's end of an attempt decide it exactly
    once between them; both decide under the GIL without calling Python code, so
    ``end`` sees ``expired``, ``retired`` and ``interrupted`` all set or none.

    ``with slot:`` (the worker's thread only, see tinymq/_shield.py) shields
    tinymq's own code from an interruption: ``expire`` then defers it, and the
    outermost block raises it as it ends (or ``raise_deferred`` earlier).
    """
    cdef public object job  # the running attempt's job, None between attempts
    cdef public object type_state
    cdef public double started  # monotonic: when the running attempt's function was called (0.0 before)
    cdef public double deadline  # monotonic; +inf until the function is called (the store writes its start first)
    cdef public object context
    cdef public bint expired  # the watchdog decided this attempt: its outcome is ignored
    cdef public bint interrupted  # JobTimeout was raised into the thread
    cdef public bint retired  # the worker leaves after this attempt
    cdef public unsigned long thread_id
    cdef public object on_start  # set by the dispatcher
    # Set by the dispatcher of a broker's queue: called before a success is counted; False when
    # the attempt is no longer this process's (its broker took it back): it counts nowhere.
    cdef public object on_succeeding
    cdef public object on_success  # set by the dispatcher
    # Set by the dispatcher when a store commits a finished job's end and the next job's start
    # together: on_switch(finished, job) replaces on_success(finished) and on_start(job).
    cdef public object on_switch
    cdef public int shielded  # nested ``with slot:`` blocks the worker's thread is in
    cdef public bint deferred  # an interruption came while shielded: JobTimeout is raised as it ends
    # Set in a fork()ed child whose only thread is this worker's (its function forked): see run_worker.
    cdef public bint forked

    def __cinit__(self):
        self.deadline = INFINITY

    cpdef begin(self, job, state, double deadline, context):
        self.job, self.type_state, self.deadline, self.context = job, state, deadline, context
        self.started = 0.0  # until the function is called
        self.expired = self.interrupted = self.deferred = False

    # Entering, leaving and expire() run no Python code in between their reads and writes (the
    # GIL is held throughout), so the watchdog sees the block entered or not, never half.
    def __enter__(self):
        self.shielded += 1
        return self

    def __exit__(self, *exc_info):
        self.shielded -= 1
        if self.deferred and not self.shielded:
            self.deferred = False
            raise JobTimeout()

    def raise_deferred(self):
        """Raise, inside a shielded block, the JobTimeout that an interruption deferred, if one did."""
        if self.deferred:
            self.deferred = False
            raise JobTimeout()

    cpdef bint end(self):
        """The function returned: True when the watchdog had already decided the attempt.

        An expired attempt's record stays for the watchdog, which reads it after
        ``expire`` while this thread may already be here. Called in the worker's
        thread: an interruption still pending there is dropped before any bytecode runs.
        """
        if self.expired:
            if self.interrupted:
                drop_own_interruption()
            return True
        self.job = self.type_state = self.context = None
        self.deadline = INFINITY
        return False

    def expire(self, double now, object job=None, ReadyQueue cancel_in=None, bint unregistered=False):
        """Decide a running attempt past its deadline as timed out: its job, or None.

        With ``job``, only that job's attempt (a cancel: ``now`` is +inf). An
        attempt that cancels itself is not interrupted: ``JobTimeout`` would be
        raised inside the cancel, before it ends the job; its context is cancelled.
        A thread inside ``with slot:`` is interrupted when the block ends.
        ``cancel_in`` (with ``job``): decided only if the cancel requested for ``job`` is
        taken there (counted) in the same step; ``unregistered``: a cancel of a job registered
        under no id, counted there (see the pure twin).
        """
        if self.job is None or self.expired or self.deadline > now or (job is not None and self.job is not job):
            return None
        # The decision runs no Python code, so the worker's end() sees it whole: set by
        # Python code in between, interrupted could come after end() had read it. Nor does
        # taking the cancel (an exact str id, a Job's slots), counted before the worker can end.
        if cancel_in is not None:
            if unregistered:
                if not cancel_in._take_unregistered_cancel(job):
                    return None
            elif not cancel_in.marks or not cancel_in._take_cancel(job):
                return None
        self.expired = True
        self.retired = True
        state = self.type_state
        if state is not None and (<TypeState>state).interrupt and self.thread_id != PyThread_get_thread_ident():
            if self.shielded:
                self.deferred = True  # tinymq's own code must not be cut midway
            else:
                self.interrupted = PyThreadState_SetAsyncExc(self.thread_id, <PyObject *>JobTimeout) == 1
        job, context = self.job, self.context
        if context is not None:  # decided: the context's code may let the worker end meanwhile
            context._cancel("timed out")
        return job


def run_worker(ReadyQueue ready, WorkerSlot slot, Alarm watchdog, dispatcher):
    """Run attempts until the queue closes or the watchdog retires this worker.

    The fast path (success) stays here; everything else goes to ``dispatcher``:
    ``refresh_hooks(slot)``, ``new_context(job)``, ``returned(job, state,
    result, slot)`` (a function returned an awaitable or a generator; True when the rest of the
    attempt, with its slot, went to the event loop: see the pure twin), ``attempt_failed(job,
    state, exc, holding, seconds)`` (it frees the attempt's slot where it places or ends the job,
    and records ``seconds``, the attempt's duration),
    ``no_executor(job, state)``, ``after_expired(slot, exc)`` and
    ``end_cancelled(job)`` (a cancel came on its way to the attempt, or as it succeeded).
    """
    cdef PyObject *taken = NULL
    cdef TypeState state
    cdef double started, ended, deadline
    cdef bint expired, decided, cancelled, finish, succeeded_now, handed_over
    cdef long succeeded = 0
    cdef _Waiter waiter = _Waiter()  # this worker's, for every wait
    ready.enlist(waiter)
    finished = None  # a success whose on_success and task_done wait for the next start (on_switch)
    switch = None
    slot.thread_id = PyThread_get_thread_ident()
    while True:
        if finished is None:
            job = None  # a worker waiting keeps no job alive
            job = ready._pop(WAIT_FOREVER, &taken, waiter)
        else:
            job = ready._pop(0.0, &taken, waiter)  # the next job, if one is ready now
            switch = slot.on_switch
            if job is None or switch is None or (<TypeState>taken).fn is None:
                _settle(ready, slot, finished)
                finished = None
                if job is None:
                    job = ready._pop(WAIT_FOREVER, &taken, waiter)
        if job is None:
            return
        state = <TypeState>taken
        fn = state.fn
        if fn is None:
            dispatcher.no_executor(job, state)
            continue
        context = dispatcher.new_context(job) if state.takes_context else None  # its deadline: at the call
        slot.begin(job, state, INFINITY, context)  # no deadline yet: a slow start write is not the function's time
        error = None
        decided = False  # cancelled while the store wrote its start: fn is not called
        cancelled = False  # a cancel was requested on its way here (after begin: a later one finds the slot)
        started = 0.0  # monotonic: the function's call (0.0 until then)
        handed_over = False  # the rest of the attempt is the event loop's (dispatcher.returned)
        try:
            if ready.marks and ready._cancel_requested(job):
                decided = cancelled = True
                if finished is not None:
                    done, finished = finished, None
                    _settle(ready, slot, done)
                    done = None
            elif finished is not None:
                done, finished = finished, None
                try:
                    switch(done, job)
                finally:
                    ready._task_done(done)
                    done = None
                decided = slot.expired
            elif slot.on_start is not None:
                slot.on_start(job)
                decided = slot.expired
            if not decided:
                # The timeout bounds the function: its clock starts now, after the store wrote the start.
                started = _monotonic()
                slot.started = started
                if state.timeout_seconds >= 0.0:
                    deadline = started + state.timeout_seconds
                    slot.deadline = deadline
                    if context is not None:
                        context.deadline = deadline
                    if deadline < watchdog.armed_at:
                        watchdog._wake()
                if context is None:
                    result = fn(job)
                else:
                    result = fn(job, context)
                if result is not None and _awaitable_or_generator(result):  # a function returning a coroutine
                    handed_over = dispatcher.returned(job, state, result, slot)
                result = None
        except BaseException as exc:  # the attempt's failure, whatever it is
            error = exc
        if slot.forked:  # its function fork()ed and returned in the child: the queue is the parent's
            dispatcher.leave_forked_child(error)  # (ends the child: no lock of the queue is touched)
        if handed_over:  # the loop's attempt holds the type's slot now, and frees it as it ends
            context = None
            continue
        ended = _monotonic()
        if started == 0.0:  # it failed before its function was called: no time of its own
            started = ended
        expired = slot.end()
        if error is None and context is not None and not expired and context.cancelled:
            error = dispatcher.cancelled_return(job)  # stop() cancelled it: no success
        context = None
        if expired:
            ready._release(state)
            dispatcher.after_expired(slot, error)
            return
        if cancelled:
            if ready.take_cancel(job, state):  # (frees the slot in the step that counts the cancel)
                dispatcher.end_cancelled(job)
            else:  # (taken by another: never, while the slot has not expired)
                ready._release(state)
            continue
        if error is None:
            succeeding = slot.on_succeeding
            if succeeding is not None and not succeeding(job):  # not this process's: counted nowhere
                ready._release(state)
                ready._task_done(job)
                continue
            on_success = slot.on_success  # read once: refresh_hooks may change them below
            switch = slot.on_switch
            finish = on_success is None and switch is None
            # The slot freed and the success counted in one step; the hand-off last, as it may wake the
            # event loop (Python code). A worker going straight back to pop takes the job its slot frees itself.
            ready._release_quietly(state)
            succeeded_now = ready._attempt_succeeded(state, ended - started, job, finish)
            ready._released_hand_off(state, on_success is not None and switch is None, THREADS)
            if not succeeded_now:
                dispatcher.end_cancelled(job)  # a cancel came as it ended: it wins
                continue
            succeeded += 1
            if succeeded % REFRESH_EVERY == 0:
                dispatcher.refresh_hooks(slot)
            if switch is not None:
                finished = job  # its end is committed with the next job's start, or alone when none is ready
                continue
            if on_success is not None:
                try:  # finished whatever the store raises
                    on_success(job)
                finally:
                    ready._task_done(job)
        else:
            # It records the duration (unless stop() gave the attempt up) and frees the slot where it
            # places or ends the job.
            dispatcher.attempt_failed(job, state, error, True, ended - started)
            error = None


cdef int _settle(ReadyQueue ready, WorkerSlot slot, object job) except -1:
    """End a success whose end waited for a next start that is not coming now: on_success, task_done."""
    try:
        on_success = slot.on_success
        if on_success is not None:
            on_success(job)
    finally:
        ready._task_done(job)
    return 0
