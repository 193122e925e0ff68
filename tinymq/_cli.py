"""What the command-line modules share: the user-error exception, logging set-up, argument types.

``__main__.py`` builds the parser and runs a command; ``_status.py`` and
``_worker.py`` implement them. Logging is configured here, for the command
line only: the library itself never configures logging.
"""
import argparse
import logging

from ._dispatch import MAX_WORKERS

__all__ = ["CommandError", "LOG_LEVELS", "MAX_PROCESSES", "MAX_WORKERS", "configure_logging", "counted", "positive_int",
           "process_count", "whole_number"]

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
_LOG_FORMAT = "%(asctime)s %(levelname)s [pid %(process)d] %(name)s: %(message)s"


class CommandError(Exception):
    """A user error: the command prints the message (no traceback) and exits 1."""


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


def _one_to(maximum: int, text: str, what: str, more: str) -> int:
    value = _at_least(1, text)
    if value > maximum:
        raise argparse.ArgumentTypeError(f"expected at most {maximum} {what} ({more}), got {value}")
    return value


def process_count(text: str) -> int:
    """An argparse ``type``: 1 .. MAX_PROCESSES."""
    return _one_to(MAX_PROCESSES, text, "worker processes per supervisor", "start more supervisors for more")


def worker_count(text: str) -> int:
    """An argparse ``type``: 1 .. MAX_WORKERS (more would exhaust the system's threads, slowly)."""
    return _one_to(MAX_WORKERS, text, "worker threads per process", "use more --processes for more")


def whole_number(text: str) -> int:
    """An argparse ``type``: an int >= 0."""
    return _at_least(0, text)
