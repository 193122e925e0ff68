"""tinymq's exceptions, defined once and raised by both cores and the façade."""
import queue

__all__ = [
    "TinyMQError", "QueueFull", "QueueStopped", "PersistenceError", "JobTimeout", "DuplicateJob",
]


class TinyMQError(Exception):
    """Base class of every exception tinymq raises on its own account."""


class QueueFull(TinyMQError, queue.Full):
    """The ready buffer is full and the caller did not choose to wait for room."""


class QueueStopped(TinyMQError):
    """The queue was stopped: it accepts no more jobs."""


class PersistenceError(TinyMQError):
    """The persistence store failed; the store's own exception is the __cause__."""


class JobTimeout(TinyMQError, TimeoutError):
    """An attempt ran past its executor's timeout."""


class DuplicateJob(TinyMQError, ValueError):
    """A job with this id is already in the queue and unfinished."""
