"""A worker process that the crash tests kill: ``python _redis_crash_worker.py URL NAME LEASE MAX_CRASHES LOG THREADS``.

It runs a Queue on the RedisBroker ``NAME`` with ``THREADS`` worker threads
until its stdin closes, then stops gracefully. Every line it logs is one
``os.write`` on an O_APPEND descriptor of ``LOG`` (so a SIGKILL never leaves
half a line), stamped with ``time.monotonic()`` (one clock for every process
on the host):

    S <id> <pid> <t>           an attempt starts (its type slot is taken)
    E <id> <pid> <t>           it ends (before its slot is freed)
    F <id> <pid> <t> <reason>  on_failure ran in this process

Executors: "a", "b", "c" and "d" ("d" limited to ``LIMIT_D`` attempts at a
time, across all processes) sleep ``job.payload`` milliseconds between S and E;
"poison" logs S and kills its process (``os._exit``). The ``tinymq`` logger's
warnings go to stderr, which the tests read, each line as ``<pid> <t> <LEVEL> <message>``
(``t`` on the same clock as the log's lines).
"""
import logging
import os
import sys
import time

from tinymq import ExecutorConfig, Queue
from tinymq.redis import RedisBroker

LIMIT_D = 2
POISON_EXIT = 3
MS = 1000.0


def main() -> None:
    url, name, lease, max_crashes, log_path, threads = sys.argv[1:7]
    logging.basicConfig(level=logging.WARNING, format="%(process)d %(monotonic).6f %(levelname)s %(message)s")

    def stamped(record: logging.LogRecord) -> bool:
        record.monotonic = time.monotonic()
        return True

    for handler in logging.getLogger().handlers:
        handler.addFilter(stamped)
    pid = os.getpid()
    log = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def line(kind: str, job_id: str, extra: str = "") -> None:
        os.write(log, f"{kind} {job_id} {pid} {time.monotonic():.6f}{extra}\n".encode())

    def work(job) -> None:
        line("S", job.id)
        time.sleep(job.payload / MS)
        line("E", job.id)

    def poison(job) -> None:
        line("S", job.id)
        os._exit(POISON_EXIT)

    queue = Queue(broker=RedisBroker(url, name=name, lease=float(lease), max_crash_recoveries=int(max_crashes)))
    for job_type in "abc":
        queue.register_executor(job_type, work)
    queue.register_executor("d", work, ExecutorConfig(max_concurrent_jobs=LIMIT_D))
    queue.register_executor("poison", poison)
    queue.on_failure(lambda job, reason, exc: line("F", job.id, f" {reason}"))
    queue.start_dispatcher(int(threads))
    print("ready", flush=True)
    sys.stdin.read()
    queue.stop()


if __name__ == "__main__":
    main()
