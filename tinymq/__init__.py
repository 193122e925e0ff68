"""tinymq: a fast in-process job queue with strict priorities, delayed jobs,
per-type concurrency limits, retries with backoff, timeouts and durable
persistence. The hot structures live in a Cython core; ``HAS_EXTENSION`` says
whether it is the one in use (``TINYMQ_NO_EXTENSIONS=1`` selects the pure twin).
"""
import logging

from ._pick_core import HAS_EXTENSION
from .config import Config, ExecutorConfig, RateLimit, RetryConfig
from .context import JobContext
from .errors import (DuplicateJob, JobTimeout, PermanentFailure, PersistenceError, QueueFull, QueueStopped,
                     RetryAfter, TinyMQError)
from .job import Job, Priority, new_delayed_job, new_high_priority_job, new_job, new_low_priority_job
from .persistence import Persistence, SQLitePersistence
from .queue import Queue
from .stats import ExecutorStats, QueueStats

__version__ = "0.1.0"

logging.getLogger("tinymq").addHandler(logging.NullHandler())

__all__ = [
    "Queue", "Job", "Priority", "Config", "ExecutorConfig", "RetryConfig", "RateLimit",
    "QueueStats", "ExecutorStats", "Persistence", "SQLitePersistence", "JobContext",
    "TinyMQError", "QueueFull", "QueueStopped", "PersistenceError", "JobTimeout", "DuplicateJob",
    "PermanentFailure", "RetryAfter",
    "new_job", "new_high_priority_job", "new_low_priority_job", "new_delayed_job",
    "HAS_EXTENSION", "__version__",
]
