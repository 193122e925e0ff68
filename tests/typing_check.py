"""Typical user code, as docs/api.md shows it: mypy must accept it as it is.

Never run or imported (its functions are not called): tests/test_typing.py runs mypy on
it with --warn-unused-ignores. The lines marked ``# type: ignore[<code>]`` are mistakes
that mypy must reject with that code: were one accepted, its ignore would be unused,
which fails the test too.
"""
import asyncio
from datetime import datetime, timedelta, timezone
from typing import Any, Dict, Iterable, List, Optional

import tinymq
from tinymq import (Config, DuplicateJob, ExecutorConfig, ExecutorStats, Job, JobContext, PermanentFailure,
                    Persistence, Priority, Queue, QueueFull, QueueStats, RateLimit, RetryAfter, RetryConfig,
                    SQLitePersistence, TinyMQError, new_delayed_job, new_high_priority_job, new_job,
                    new_low_priority_job)
from tinymq.redis import RedisBroker


def jobs_and_configs() -> None:
    job = Job("email", {"to": "a@example.com"}, priority=Priority.HIGH, tags={"user": "123"},
              run_at=datetime.now(timezone.utc) + timedelta(minutes=5),
              retry_config=RetryConfig(max_retries=5, initial_delay=timedelta(seconds=2), max_delay=60,
                                       backoff_multiple=3.0, jitter=0.1),
              id="report-2026-12")
    job.tags["user"] = "456"
    job.payload = [1, 2, 3]
    job_id: str = job.id
    retries: int = job.retries
    last_error: Optional[str] = job.last_error
    run_at: float = job.run_at
    chained: Job = job.with_priority(Priority.LOW).with_high_priority().with_low_priority().with_max_retries(2)
    chained = chained.with_retry_config(RetryConfig())
    low: int = Priority.LOW
    helpers: List[Job] = [new_job("a", 1), new_high_priority_job("b", None), new_low_priority_job("c", "x"),
                          new_delayed_job("d", {}, 2.5), new_delayed_job("e", None, timedelta(hours=1))]
    Config(buffer_size=1000, scheduler_interval=0.05, max_delayed_jobs=0)
    ExecutorConfig(max_concurrent_jobs=5, timeout=None)
    ExecutorConfig(timeout=timedelta(seconds=10), interrupt_on_timeout=True, retry_on=(ConnectionError, TimeoutError),
                   rate_limit=RateLimit(100, per=60.0))
    version: str = tinymq.__version__
    compiled: bool = tinymq.HAS_EXTENSION
    print(job_id, retries, last_error, run_at, low, helpers, version, compiled)

    Job(1)  # type: ignore[arg-type]
    Job("email", priority="high")  # type: ignore[arg-type]
    Job("email", tags={"user": 123})  # type: ignore[dict-item]
    Job("email", id=42)  # type: ignore[arg-type]
    Job("email", run_at="tomorrow")  # type: ignore[arg-type]
    job.with_max_retries("3")  # type: ignore[arg-type]
    Priority.URGENT  # type: ignore[attr-defined]
    RetryConfig(max_retries=1.5)  # type: ignore[arg-type]
    Config(buffer_size="100")  # type: ignore[arg-type]
    ExecutorConfig(timeout="10s")  # type: ignore[arg-type]
    ExecutorConfig(rate_limit=100)  # type: ignore[arg-type]


def send_email(job: Job) -> None:
    if job.payload is None:
        raise PermanentFailure("no address")
    raise RetryAfter(30.0)


def resize(job: Job, ctx: JobContext) -> None:
    deadline: Optional[float] = ctx.deadline
    left: Optional[float] = ctx.remaining()
    while not ctx.cancelled and not ctx.wait(0.5):
        ctx.check()
    print(deadline, left)


async def fetch(job: Job, ctx: JobContext) -> None:
    cancelled: bool = await ctx.sleep(timedelta(seconds=1))
    print(cancelled)


def queue_in_process(store_path: str) -> None:
    with Queue(100) as q:
        q.register_executor("email", send_email)
        q.register_executor("resize", resize, ExecutorConfig(max_concurrent_jobs=2, timeout=10))
        q.register_executor("fetch", fetch)

        @q.executor("report", max_concurrent_jobs=5, timeout=10)
        def report(job: Job) -> int:
            return len(job.type)

        @q.executor("async-report", config=ExecutorConfig(timeout=5.0))
        async def async_report(job: Job) -> None:
            await asyncio.sleep(0)

        @q.on_failure
        def alert(job: Job, reason: str, exc: Optional[BaseException]) -> None:
            print(job.id, reason, exc)

        length: int = report(Job("report"))  # the decorators keep the function's type
        alert(Job("email"), "cancelled", None)
        store = SQLitePersistence(store_path, synchronous="FULL", busy_timeout=timedelta(seconds=5))
        durable: Persistence = store
        q.set_persistence(store)
        q.start_dispatcher(workers=4)
        try:
            placed: Job = q.enqueue(Job("email"), block=True, timeout=timedelta(seconds=1))
        except QueueFull:
            pass
        except (DuplicateJob, TinyMQError):
            raise
        later: Job = q.enqueue_delayed(Job("email"), 5)
        batch: List[Job] = q.enqueue_many([Job("email"), Job("resize")])
        name: str = q.every(60, "report", {"kind": "daily"}, name="daily", first_at=datetime.now(timezone.utc))
        nightly: str = q.cron("0 3 * * *", "report", tz="Europe/Paris")
        removed: bool = q.unschedule(name)
        cancelled: bool = q.cancel("report-2026-12")
        stats: QueueStats = q.get_stats()
        sizes: List[int] = [stats.high_queue_size, stats.medium_queue_size, stats.low_queue_size,
                            stats.delayed_jobs_count, stats.max_delayed_jobs, stats.worker_count]
        counters: List[int] = [stats.jobs_enqueued, stats.jobs_succeeded, stats.jobs_failed, stats.jobs_retried,
                               stats.jobs_timed_out, stats.jobs_evicted, stats.jobs_cancelled]
        executors: Dict[str, ExecutorStats] = stats.executor_stats
        email = executors["email"]
        per_type: List[int] = [email.active_jobs, email.max_jobs, email.succeeded, email.failed, email.retried,
                               email.timed_out, email.cancelled]
        finished: bool = q.join(timeout=30)
        q.stop(wait=True, timeout=10.0)
        print(length, durable, placed, later, batch, nightly, removed, cancelled, sizes, counters, per_type,
              finished, async_report)

        Queue("100")  # type: ignore[arg-type]
        Queue(config=ExecutorConfig())  # type: ignore[arg-type]
        q.enqueue("email")  # type: ignore[arg-type]
        q.enqueue_delayed(Job("email"), "5s")  # type: ignore[arg-type]
        q.register_executor("email", "send_email")  # type: ignore[arg-type]
        q.register_executor("email", send_email, ExecutorConfig)  # type: ignore[arg-type]
        q.join(timeout="soon")  # type: ignore[arg-type]
        q.set_persistence("jobs.db")  # type: ignore[arg-type]
        wrong: str = q.get_stats()  # type: ignore[assignment]
        stats.jobs_enqueued = 0  # type: ignore[misc]
        q.start_dispatcher(workers="4")  # type: ignore[arg-type]


async def queue_from_async_code(q: Queue) -> None:
    job: Job = await q.aenqueue(Job("email"), block=True, timeout=2.0)
    done: bool = await q.ajoin(timeout=timedelta(seconds=30))
    await q.astop(wait=True)
    print(job, done)

    wrong: str = await q.ajoin()  # type: ignore[assignment]


class MemoryStore:
    """A store of one's own: the Persistence protocol, structurally."""

    def __init__(self) -> None:
        self.jobs: Dict[str, Job] = {}

    def save(self, job: Job) -> None:
        self.jobs[job.id] = job

    def delete(self, job_id: str) -> None:
        self.jobs.pop(job_id, None)

    def load_all(self) -> Iterable[Job]:
        return list(self.jobs.values())


def stores() -> None:
    Queue(config=Config(buffer_size=10)).set_persistence(MemoryStore())
    store = SQLitePersistence.claim("jobs-{}.db", slots=8)
    with SQLitePersistence("jobs-0.db", read_only=True) as view:
        stored: List[Job] = view.jobs()
        dead = view.dead_jobs()
        print(stored, dead)
    requeued: int = store.requeue_dead()
    purged: int = store.purge_dead(["a", "b"])
    store.close()
    print(requeued, purged)

    SQLitePersistence("jobs.db", read_only="yes")  # type: ignore[arg-type]
    SQLitePersistence.claim("jobs-{}.db", slots="8")  # type: ignore[arg-type]


def redis_broker(on_failure: Any) -> None:
    broker = RedisBroker("redis://localhost:6379/0", name="emails", lease=30.0, max_crash_recoveries=3)
    q = Queue(config=Config(buffer_size=100_000), broker=broker)
    q.on_failure(on_failure)
    shared: Optional[RedisBroker] = q.broker
    print(shared)
    dead = broker.dead_jobs()
    requeued: int = broker.requeue_dead([entry.job.id for entry in dead])
    purged: int = broker.purge_dead()
    print(requeued, purged)

    RedisBroker("redis://localhost:6379/0")  # type: ignore[call-arg]
    Queue(broker="redis://localhost:6379/0")  # type: ignore[arg-type]
    RedisBroker("redis://localhost:6379/0", name="emails", lease="30s")  # type: ignore[arg-type]
