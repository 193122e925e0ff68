"""Over a broker, a job that fails for good is counted in this process's per-type counters
before join() can see it finished (api.md "Stats": counters are updated before join()
returns; docs/redis.md: per-type counters are this process's).

Was: with no failure callback registered, the settle op that ends the job (Z) and its
acknowledgement (A, which lets join() count the job finished) were queued together, and a
round could send both before the worker counted the failure: join() returned while
executor_stats[t].failed was still 0 (attackW's metrics test failed under load).
"""
import pytest

from tinymq import Job, RetryConfig

from _backends import Redis
from _helpers import WAIT

FAILED = 3  # (active, limit, succeeded, failed, ...) in ReadyQueue.snapshot()'s per-type tuples


def _raise(job):
    raise ValueError("bad")


@pytest.mark.parametrize("with_callback", [False, True])
def test_a_failure_is_counted_here_before_its_acknowledgement_is_queued(redis_url, with_callback):
    shared = Redis(redis_url, lease=2.0)
    try:
        q = shared.queue()
        q.register_executor("t", _raise)
        reported = []
        if with_callback:
            q.on_failure(lambda job, reason, exc: reported.append(reason))
        link = q._link
        queue_op = link._queue_op
        failed_when_acknowledged = []

        def spy(op):
            if op.op == "A":  # what lets join() elsewhere count the job finished
                failed_when_acknowledged.append(q._ready.snapshot()[2]["t"][FAILED])
            queue_op(op)

        link._queue_op = spy
        q.start_dispatcher(2)
        q.enqueue_many([Job("t", i, retry_config=RetryConfig(max_retries=0)) for i in range(5)])
        assert q.join(WAIT)
        stats = q.get_stats()
    finally:
        shared.close()
    assert stats.executor_stats["t"].failed == 5
    # The k-th acknowledgement comes after the k-th failure was counted here.
    assert len(failed_when_acknowledged) == 5, failed_when_acknowledged
    assert all(n >= k for k, n in enumerate(failed_when_acknowledged, 1)), failed_when_acknowledged
    assert reported == (["retries_exhausted"] * 5 if with_callback else [])
