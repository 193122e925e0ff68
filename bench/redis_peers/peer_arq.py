"""arq: the job, the worker settings and the producer (runs in arq's own venv).

Workers: ``arq peer_arq.WorkerSettings``. arq polls Redis every ``poll_delay``
(default 0.5 s, which caps it near 200 jobs/s); the bench runs it at the fast
setting its docs offer, 0.01 s, unless ``BENCH_ARQ_POLL_DELAY`` says otherwise.
``max_jobs`` is arq's concurrency per process; results are not kept.
"""
import asyncio
import os
from typing import Any

from arq import create_pool
from arq.connections import RedisSettings

from producer import AsyncProducer
from record import record


POLL_DELAY = float(os.environ.get("BENCH_ARQ_POLL_DELAY", "0.01"))
MAX_JOBS = int(os.environ.get("BENCH_CONCURRENCY", "10"))


async def noop(ctx: Any, index: int) -> None:
    record(index)


# ``arq --custom-log-dict peer_arq.LOG_CONFIG``: arq's own handler at WARNING, so no line per
# job (arq logs two at INFO by default); tinymq logs none per job at its default level.
LOG_CONFIG = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"arq.standard": {"level": "WARNING", "class": "logging.StreamHandler"}},
    "loggers": {"arq": {"handlers": ["arq.standard"], "level": "WARNING"}},
}


class WorkerSettings:
    functions = [noop]
    redis_settings = RedisSettings.from_dsn(os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"))
    max_jobs = MAX_JOBS
    poll_delay = POLL_DELAY
    keep_result = 0


class Producer(AsyncProducer):
    def __init__(self, url: str) -> None:
        self.url = url
        self.pool: Any = None

    async def connect(self) -> None:
        if self.pool is None:
            self.pool = await create_pool(RedisSettings.from_dsn(self.url))

    def send(self, index: int) -> Any:
        return self.pool.enqueue_job("noop", index)

    def send_batch(self, indices: range) -> Any:
        """No bulk enqueue in arq: a user gathers ``enqueue_job`` coroutines."""
        return asyncio.gather(*(self.pool.enqueue_job("noop", index) for index in indices))

    def send_in(self, index: int, delay: float) -> Any:
        return self.pool.enqueue_job("noop", index, _defer_by=delay)
