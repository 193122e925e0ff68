"""One tinymq worker process for the bench: ``start_dispatcher(workers)`` until SIGTERM.

    python tinymq_worker.py URL NAME LEASE WORKERS
"""
import signal
import sys
import threading

from tinymq_app import build_queue


def main() -> int:
    url, name, lease, workers = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
    queue = build_queue(url, name, lease)
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stopping.set())
    signal.signal(signal.SIGINT, lambda signum, frame: stopping.set())
    queue.start_dispatcher(workers)
    stopping.wait()
    queue.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
