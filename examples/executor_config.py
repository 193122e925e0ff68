"""Configuration: queue-wide settings (Config) and per-type settings (ExecutorConfig).

Configs are immutable and validated when built: a bad value raises
ValueError or TypeError naming it. Durations are seconds (float) or timedelta.

Run: python examples/executor_config.py
"""
import threading
import time

from tinymq import Config, ExecutorConfig, Job, Queue

# Queue configuration.
config = Config(
    buffer_size=200,           # ready jobs of all priorities together
    scheduler_interval=0.05,   # the longest the delayed-job scheduler sleeps without looking
    max_delayed_jobs=1000,     # cap on delayed jobs (0 = unlimited)
)

# Executor configuration.
exec_config = ExecutorConfig(
    max_concurrent_jobs=5,     # at most 5 attempts of this type at once
    timeout=30.0,              # each attempt fails with JobTimeout after 30 s (None: no limit)
)

with Queue(config=config) as q:
    processed = []
    lock = threading.Lock()

    def process(job: Job) -> None:
        time.sleep(0.01)  # your job logic here
        with lock:
            processed.append(job.payload)

    q.register_executor("processor", process, exec_config)

    # The same thing as a decorator; keyword arguments build the ExecutorConfig.
    @q.executor("resize", max_concurrent_jobs=2, timeout=10)
    def resize(job: Job) -> None:
        with lock:
            processed.append(job.payload)

    q.start_dispatcher(4)
    for number in range(10):
        q.enqueue(Job("processor", f"record-{number}"))
    q.enqueue(Job("resize", "photo.jpg"))
    q.join()

    print(f"queue: buffer_size={q.config.buffer_size}, "
          f"scheduler_interval={q.config.scheduler_interval}, "
          f"max_delayed_jobs={q.config.max_delayed_jobs}")
    for job_type, executor in sorted(q.get_stats().executor_stats.items()):
        print(f"executor {job_type}: at most {executor.max_jobs} at once")
    print(f"processed {len(processed)} jobs")

# Bad values are refused at construction.
try:
    ExecutorConfig(max_concurrent_jobs=0)
except ValueError as exc:
    print(f"ValueError: {exc}")
