"""The demo that ``python -m tinymq`` runs: the seed README's Quick Start, live, in about three seconds.

One default in-memory Queue shows, section by section: strict priorities,
delayed jobs starting on time, a retry with exponential backoff, a
concurrency limit at work, a timeout observed through the job context, and
the queue's own statistics at the end. Every section waits with ``q.join()``.
"""
import os
import sys
import threading
import time
from typing import List, Optional

import tinymq
from tinymq import ExecutorConfig, Job, JobContext, Queue, QueueStats, RetryConfig

from ._cli import CommandError

_print_lock = threading.Lock()
_unwritable: List[str] = []  # why stdout took no more, once it did (guarded by _print_lock)


def say(text: str = "") -> None:
    """print() from several worker threads without interleaving lines. A stdout that takes no
    more (a full disk) ends the demo with one clear error, as it ends the other commands (a closed
    pipe, ``| head``, goes on up: it ends the demo quietly)."""
    with _print_lock:
        if not _unwritable:
            try:
                print(text, flush=True)
            except BrokenPipeError:
                raise
            except OSError as exc:
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (no second error at exit)
                _unwritable.append(str(exc))
        if _unwritable:  # (a worker thread's say() fails its job; the main thread's next one ends the demo)
            raise CommandError(f"could not write to stdout ({_unwritable[0]})")


def heading(number: int, title: str) -> None:
    say()
    say(f"{number}. {title}")


def ms(seconds: float) -> str:
    return f"{seconds * 1000:+7.1f} ms"


# --- sections ----------------------------------------------------------------------------


def show_priorities(q: Queue) -> None:
    heading(1, "Priorities: HIGH, then MEDIUM, then LOW; FIFO within a priority")
    say("   6 emails enqueued before start_dispatcher(); one email at a time")

    @q.executor("email", max_concurrent_jobs=1, timeout=5)
    def send_email(job: Job) -> None:
        say(f"   {job.priority.name:<6} Sending email: {job.payload}")
        time.sleep(0.05)

    q.enqueue(tinymq.new_low_priority_job("email", "Monthly newsletter"))
    q.enqueue(tinymq.new_job("email", "Welcome email"))
    q.enqueue(tinymq.new_high_priority_job("email", "Password reset"))
    q.enqueue(tinymq.new_low_priority_job("email", "Cleanup reminder"))
    q.enqueue(tinymq.new_job("email", "Weekly digest"))
    q.enqueue(tinymq.new_high_priority_job("email", "Security alert"))
    q.start_dispatcher(4)
    q.join()


def show_delayed_jobs(q: Queue) -> None:
    heading(2, "Delayed jobs start on time (the scheduler sleeps until the earliest run_at)")
    started = time.time()

    @q.executor("reminder", timeout=5)
    def remind(job: Job) -> None:
        now = time.time()
        say(f"   {job.payload:<20} planned {ms(job.run_at - started)}   "
            f"started {ms(now - started)}   late {(now - job.run_at) * 1000:5.2f} ms")

    # Enqueued out of order on purpose: they run in run_at order.
    q.enqueue_delayed(Job("reminder", "enqueue_delayed(0.6)"), 0.6)
    q.enqueue_delayed(Job("reminder", "enqueue_delayed(0.2)"), 0.2)
    q.enqueue(Job("reminder", "run_at=now+0.4", run_at=started + 0.4))
    q.join()


def show_retries(q: Queue) -> None:
    heading(3, "Retry with exponential backoff (initial_delay=0.1 s, backoff_multiple=2)")
    first_attempt: List[float] = []

    @q.executor("flaky", timeout=5)
    def flaky(job: Job) -> None:
        now = time.monotonic()
        if not first_attempt:
            first_attempt.append(now)
        attempt = job.retries + 1
        planned = sum(job.retry_config.retry_delay(k) for k in range(1, attempt))
        outcome = "fails" if attempt <= 3 else "succeeds"
        say(f"   attempt {attempt} at {ms(now - first_attempt[0])} "
            f"(backoff so far {planned * 1000:5.0f} ms): {outcome}")
        if attempt <= 3:
            raise ConnectionError("upstream unavailable")

    retry_config = RetryConfig(max_retries=4, initial_delay=0.1, max_delay=1.0, backoff_multiple=2.0)
    q.enqueue(Job("flaky", "sync account", retry_config=retry_config))
    q.join()


def show_concurrency_limit(q: Queue) -> None:
    heading(4, "Concurrency limit: 6 thumbnails, max_concurrent_jobs=2, 4 workers")
    lock = threading.Lock()
    running = [0]
    seen = {"by_executor": 0, "by_stats": 0}

    def thumbnail(job: Job) -> None:
        with lock:
            running[0] += 1
            seen["by_executor"] = max(seen["by_executor"], running[0])
        # Stats are safe to read from inside an executor.
        active = q.get_stats().executor_stats["thumbnail"].active_jobs
        with lock:
            seen["by_stats"] = max(seen["by_stats"], active)
        time.sleep(0.25)
        with lock:
            running[0] -= 1

    q.register_executor("thumbnail", thumbnail, ExecutorConfig(max_concurrent_jobs=2, timeout=5))
    began = time.monotonic()
    for number in range(6):
        q.enqueue(Job("thumbnail", f"photo-{number}.jpg"))
    q.join()
    elapsed = time.monotonic() - began
    say(f"   max running at once: {seen['by_executor']} (limit 2; "
        f"get_stats() saw at most {seen['by_stats']} active)")
    say(f"   6 jobs x 250 ms in {elapsed * 1000:.0f} ms: three waves of two")


def show_timeout(q: Queue) -> None:
    heading(5, "Timeout: executor(job, ctx) sees its deadline and stops when cancelled")
    returned = threading.Event()

    @q.on_failure
    def report_failure(job: Job, reason: str, exc: Optional[BaseException]) -> None:
        say(f"   on_failure({job.payload['name']!r}, {reason!r}, {type(exc).__name__}: {exc})")

    @q.executor("export", timeout=0.5)  # (2 chunks fit, with room for a loaded machine)
    def export(job: Job, ctx: JobContext) -> None:
        try:
            chunks = job.payload["chunks"]
            say(f"   {job.payload['name']}: {chunks} chunks x 100 ms, "
                f"{ctx.remaining():.2f} s before the deadline")
            for done in range(1, chunks + 1):
                if ctx.wait(0.1):  # returns True at once when the attempt is cancelled
                    say(f"   {job.payload['name']}: cancelled after {done - 1} chunks; returning")
                    return
            say(f"   {job.payload['name']}: all {chunks} chunks done")
        finally:
            if job.payload["chunks"] > 2:
                returned.set()

    q.enqueue(Job("export", {"name": "small export", "chunks": 2}))
    q.enqueue(Job("export", {"name": "huge export", "chunks": 50}).with_max_retries(0))
    q.join()
    returned.wait(5)  # the slot stays taken until the function really returns


def show_stats(stats: QueueStats) -> None:
    heading(6, "q.get_stats()")
    rows = [
        ("ready (high/medium/low)",
         f"{stats.high_queue_size}/{stats.medium_queue_size}/{stats.low_queue_size}"),
        ("delayed", f"{stats.delayed_jobs_count}/{stats.max_delayed_jobs}"),
        ("workers", stats.worker_count),
        ("jobs_enqueued", stats.jobs_enqueued),
        ("jobs_succeeded", stats.jobs_succeeded),
        ("jobs_failed", stats.jobs_failed),
        ("jobs_retried", stats.jobs_retried),
        ("jobs_timed_out", stats.jobs_timed_out),
        ("jobs_evicted", stats.jobs_evicted),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        say(f"   {name:<{width}}  {value:>7}")
    say()
    type_width = max([len("executor")] + [len(t) for t in stats.executor_stats])
    say(f"   {'executor':<{type_width}}  {'active':>6}  {'max':>4}")
    say(f"   {'-' * type_width}  {'-' * 6}  {'-' * 4}")
    for job_type, executor in sorted(stats.executor_stats.items()):
        say(f"   {job_type:<{type_width}}  {executor.active_jobs:>6}  {executor.max_jobs:>4}")


DESCRIPTION = ("A live tour of tinymq (about three seconds): priorities, delayed jobs, "
               "retries, concurrency limits, timeouts and stats.")


def run_demo() -> int:
    core = "compiled core" if tinymq.HAS_EXTENSION else "pure-Python core"
    say(f"tinymq {tinymq.__version__} ({core})")
    began = time.monotonic()
    with Queue(100) as q:
        show_priorities(q)
        show_delayed_jobs(q)
        show_retries(q)
        show_concurrency_limit(q)
        show_timeout(q)
        show_stats(q.get_stats())
    say()
    say(f"done in {time.monotonic() - began:.1f} s")
    return 0
