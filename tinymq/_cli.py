"""What the command-line modules share: the user-error exception, logging set-up, argument types.

``__main__.py`` builds the parser and runs a command; ``_status.py`` and
``_worker.py`` implement them. Logging is configured here, for the command
line only: the library itself never configures logging.
"""
import argparse
import logging

__all__ = ["CommandError", "LOG_LEVELS", "MAX_PROCESSES", "MAX_WORKERS", "configure_logging", "counted", "positive_int",
           "process_count", "whole_number"]

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
_LOG_FORMAT = "%(asctime)s %(levelname)s [pid %(process)d] %(name)s: %(message)s"


class CommandError(Exception):
    """A user error: the command prints the message (no traceback) and exits 1."""


def counted(number: int, noun: str, plural: str = "") -> str:
    """``counted(1, "job")`` is "1 job", ``counted(2, "job")`` "2 jobs" (or ``plural`` when given)."""
    return f"{number} {noun if number == 1 else plural or noun + 's'}"


def configure_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level), format=_LOG_FORMAT)


def _at_least(minimum: int, text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, got {value}")
    return value


def positive_int(text: str) -> int:
    """An argparse ``type``: an int >= 1 (anything else is a usage error, exit 2)."""
    return _at_least(1, text)


MAX_PROCESSES = 1024  # worker processes one supervisor runs (each is a Python process of its own)


def process_count(text: str) -> int:
    """An argparse ``type``: 1 .. MAX_PROCESSES."""
    value = _at_least(1, text)
    if value > MAX_PROCESSES:
        raise argparse.ArgumentTypeError(f"expected at most {MAX_PROCESSES} worker processes per supervisor "
                                         f"(start more supervisors for more), got {value}")
    return value


MAX_WORKERS = 10_000  # worker threads one worker process starts (each a thread of the OS's)


def worker_count(text: str) -> int:
    """An argparse ``type``: 1 .. MAX_WORKERS (more would exhaust the system's threads, slowly)."""
    value = _at_least(1, text)
    if value > MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"expected at most {MAX_WORKERS} worker threads per process "
                                         f"(use more --processes for more), got {value}")
    return value


def whole_number(text: str) -> int:
    """An argparse ``type``: an int >= 0."""
    return _at_least(0, text)
