"""A rate-limited type beside a full-speed one (#14), against the full-speed type alone.

One type is limited to 1,000 starts/s (``RateLimit(1000, per=1.0)``) and has a backlog
of ``3 × 1,000 + 1`` jobs; another type (no limit) is fed by a producer as fast as the
queue takes it for ``SECONDS``. The issue asks for 10 s; 3 s keeps a bench run short and
holds three full windows, which is what the rate is measured over:

- ``limited_starts_per_s``: (starts − 1) / (last start − first start), from the times the
  executor records (``rate_error_pct``: how far that is from 1,000);
- ``fast_jobs_per_s``: the full-speed type's successes per second over the run
  (its per-type counter), and ``fast_us_per_job``, its inverse, ranks the contenders.

The baseline, in the same run, is the same producer and full-speed type with no
rate-limited type at all: the ratio says what the parked backlog and the windows'
wake-ups cost the other type.
"""
import time
from typing import Any, List, Tuple

import pytest

from conftest import CORE_NAMES, assert_queue_core, contender, queue_core
from tinymq import Config, ExecutorConfig, Job, Queue, RateLimit

WORKERS = 4
RATE = 1_000  # starts per second
SECONDS = 3  # full windows of one second each (the 10 s, shortened)
LIMITED_JOBS = RATE * SECONDS + 1  # the last one starts when the fourth window opens
PRODUCER_BATCH = 100
FAST_BUFFER = 20_000


def noop(job: Any) -> None:
    pass


def _run(core_name: str, with_limited: bool) -> Tuple[float, float]:
    """(limited starts/s or nan, fast jobs/s) of one run."""
    starts: List[float] = []
    clock = time.monotonic
    with queue_core(core_name) as core:
        q = Queue(config=Config(buffer_size=LIMITED_JOBS + FAST_BUFFER))
        q.register_executor("limited", lambda job: starts.append(clock()),
                            ExecutorConfig(rate_limit=RateLimit(RATE, per=1.0)))
        q.register_executor("fast", noop)
        q.start_dispatcher(WORKERS)
        assert_queue_core(q, core)
        try:
            if with_limited:
                q.enqueue_many([Job("limited") for _ in range(LIMITED_JOBS)])
            enqueue = q.enqueue
            began = clock()
            before = q.get_stats().executor_stats["fast"].succeeded
            while clock() - began < SECONDS:
                for _ in range(PRODUCER_BATCH):
                    enqueue(Job("fast"), block=True)
            after = q.get_stats().executor_stats["fast"].succeeded
            ended = clock()
            assert q.join(SECONDS + 30.0)
        finally:
            q.stop()
    fast_rate = (after - before) / (ended - began)
    if not with_limited:
        return float("nan"), fast_rate
    assert len(starts) == LIMITED_JOBS
    starts.sort()
    return (len(starts) - 1) / (starts[-1] - starts[0]), fast_rate


@pytest.mark.benchmark(group="queue: a type limited to 1,000 starts/s beside a full-speed type, 4 workers")
@pytest.mark.parametrize("with_limited", [True, False], ids=["limited+fast", "fast alone"])
@pytest.mark.parametrize("core_name", CORE_NAMES)
def test_rate_limited_beside_full_speed(benchmark: Any, core_name: str, with_limited: bool) -> None:
    with queue_core(core_name):
        pass  # skips when the compiled core is unavailable
    figures = {}

    def run() -> None:
        figures["limited"], figures["fast"] = _run(core_name, with_limited)

    benchmark.pedantic(run, rounds=1, iterations=1)
    metrics = {"fast_us_per_job": 1e6 / figures["fast"], "fast_jobs_per_s": round(figures["fast"])}
    if with_limited:
        name = f"tinymq ({core_name}), 1,000/s type + full-speed type"
        metrics["limited_starts_per_s"] = round(figures["limited"], 2)
        metrics["rate_error_pct"] = round(abs(figures["limited"] - RATE) / RATE * 100, 3)
    else:
        name = f"tinymq ({core_name}), full-speed type alone"
    contender(benchmark, name, is_tinymq=with_limited, kind="metric", **metrics)
