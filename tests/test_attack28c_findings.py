"""Findings of attack28c (an outside attack on ``python -m tinymq worker`` and ``status``, run as a
deployment runs them).

1. ``status --redis URL --name NAME`` with a mistyped name, on a server whose queue had worker
   processes and no job yet (a fresh deployment, checked before the first enqueue), said that
   the server "holds no tinymq queue": ``broker.names_in_use()`` listed only queues with
   counters, while ``in_use()`` (and docs/cli.md, "the queue names the server does hold") count
   a worker's lease and a limit too.
"""
import pytest

import tinymq
from tinymq._cli import CommandError
from tinymq._status import redis_status
from tinymq.redis import RedisBroker

pytestmark = pytest.mark.redis


def test_status_of_a_mistyped_name_lists_a_queue_whose_workers_ran_before_any_job(redis_url):
    queue = tinymq.Queue(broker=RedisBroker(redis_url, name="emails"))

    @queue.executor("email", max_concurrent_jobs=5)
    def send(job):
        pass

    queue.start_dispatcher(1)
    queue.stop()  # (its limit stays: what a worker process leaves before the first job)
    try:
        assert queue.broker.in_use()
        assert queue.broker.names_in_use() == ["emails"]
        with pytest.raises(CommandError, match=r"holds no tinymq queue named 'emial'.*queues there: emails$"):
            redis_status(redis_url, "emial", 0)
    finally:
        queue.broker.close()
