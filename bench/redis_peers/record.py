"""What every benchmark job does, in every contender: write one record to the controller.

The controller (bench/test_bench_redis.py) creates a FIFO and names it in
``BENCH_RECORDS_FIFO``; a job writes ``(index, pid, time.perf_counter())`` when it
starts. Records are smaller than PIPE_BUF, so writes from many processes and threads
never interleave; at 16 bytes each, a 1 MiB pipe buffers 65,536 of them. Every
contender pays the same one ``write(2)`` per job and no Redis command, so completions
are counted without touching the server measured.
``perf_counter`` is CLOCK_MONOTONIC on Linux: comparable across processes of one machine.
"""
import os
import struct
import threading
import time
from typing import Optional

RECORD = struct.Struct("<iid")  # job index, pid, time.perf_counter() at the start
FIFO_ENV = "BENCH_RECORDS_FIFO"

_fd: Optional[int] = None
_open_lock = threading.Lock()


def _open() -> int:
    global _fd
    with _open_lock:
        if _fd is None:
            _fd = os.open(os.environ[FIFO_ENV], os.O_WRONLY)
        return _fd


def record(index: int) -> None:
    """Tell the controller that job ``index`` started, here and now."""
    fd = _fd if _fd is not None else _open()
    os.write(fd, RECORD.pack(index, os.getpid(), time.perf_counter()))
