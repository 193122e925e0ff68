"""What holds while an idle worker process waits in Redis for a job.

When Redis has nothing for it, a process's pump blocks in BLPOP (the queue's signal list
and its own wake list). Everything else must not wait for that wait to end: a finished
attempt is settled by its worker thread, a due delayed job is fetched by the timer, limits
registered meanwhile apply to the next fetch, a lost reply or a server that lost its
scripts costs no job. These tests make the wait long (30 s) so that anything that waited
for it would show.
"""
import logging
import time

import pytest

from tinymq import ExecutorConfig, Job, Queue
from tinymq.redis import RedisBroker
from tinymq.redis import _link

from _backends import Redis
from _helpers import WAIT, Recorder
from test_redis_resend import LossyProxy

LONG_WAIT = 30.0  # seconds an idle pump waits in Redis in these tests


@pytest.fixture
def shared(redis_url, monkeypatch):
    monkeypatch.setattr(_link, "_IDLE_WAIT", LONG_WAIT)
    made = Redis(redis_url, lease=4 * LONG_WAIT)  # (the wait is at most lease / 4)
    yield made
    made.close()


def waiting_in_redis(q):
    deadline = time.monotonic() + WAIT
    while not q._link._pump_idle:
        assert time.monotonic() < deadline, "the pump did not go to wait in Redis"
        time.sleep(0.005)


def test_an_attempt_that_ends_while_its_process_waits_is_settled_at_once(shared):
    producer, worker = shared.pair()
    ran = Recorder()
    worker.register_executor("t", lambda job: ran.add(job.payload))
    worker.start_dispatcher(2)
    producer.enqueue(Job("t", 1))
    assert ran.wait_until(lambda items: items == [1])
    began = time.monotonic()
    assert producer.join(WAIT)  # its success reached Redis without the wait's end
    assert time.monotonic() - began < LONG_WAIT / 3
    assert producer.get_stats().jobs_succeeded == 1


def test_a_delayed_job_due_while_its_process_waits_starts_on_time(shared):
    producer, worker = shared.pair()
    started = Recorder()
    worker.register_executor("t", lambda job: started.add(time.monotonic()))
    worker.start_dispatcher(1)
    waiting_in_redis(worker)
    enqueued = time.monotonic()
    producer.enqueue_delayed(Job("t"), 0.3)
    assert started.wait_until(lambda items: len(items) == 1)
    assert 0.3 - 0.05 <= started.items[0] - enqueued < 0.3 + 2.0


def test_a_limit_registered_while_its_process_waits_applies_to_its_next_fetch(shared):
    producer, worker = shared.pair()
    ran = Recorder()
    worker.register_executor("t", lambda job: ran.add(job.payload))
    worker.start_dispatcher(4)
    waiting_in_redis(worker)
    hold = Recorder()

    def held(job):
        hold.add(job.payload)
        time.sleep(0.3)

    worker.register_executor("one", held, ExecutorConfig(max_concurrent_jobs=1))
    producer.enqueue_many([Job("one", i) for i in range(2)])
    scripts = producer.broker._scripts
    deadline = time.monotonic() + WAIT
    while len(hold) < 2:  # (each holds its slot 0.3 s)
        running = int(scripts.client.hget(scripts.key("running"), "one") or 0)
        assert running <= 1, running  # the fetch after the wait knew the limit
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert producer.join(WAIT)


def test_a_wait_whose_fetch_reply_is_lost_hands_out_its_jobs_once(redis_server, redis_url):
    shared = Redis(redis_url)
    proxy = LossyProxy(redis_server.port)
    worker = Queue(broker=RedisBroker(proxy.url, name=shared.queue_name))
    ran = Recorder()
    worker.register_executor("t", lambda job: ran.add(job.payload))
    try:
        producer = shared.queue()
        worker.start_dispatcher(2)
        waiting_in_redis(worker)
        signal = worker._link.scripts.key("signal").encode()
        # The wait's reply (the signal list's name and "1") is lost, and the connection with it.
        proxy.drop_reply(b"*2\r\n$%d\r\n%s" % (len(signal), signal))
        producer.enqueue_many([Job("t", i) for i in range(3)])
        assert proxy.dropped.wait(WAIT)
        assert producer.join(WAIT)
        assert sorted(ran.snapshot()) == [0, 1, 2]
        stats = producer.get_stats()
        assert (stats.jobs_succeeded, stats.jobs_failed) == (3, 0)
        scripts = producer.broker._scripts
        assert scripts.client.hlen(scripts.key("running")) == 0  # no slot leaked
    finally:
        worker.stop()
        proxy.close()
        shared.close()


def test_a_server_that_lost_its_scripts_while_a_process_waits_hands_it_the_job_at_once(shared, caplog):
    producer, worker = shared.pair()
    ran = Recorder()
    worker.register_executor("t", lambda job: ran.add(job.payload))
    worker.start_dispatcher(1)
    waiting_in_redis(worker)
    producer.broker.client.script_flush()  # as a restarted server: the next EVALSHA finds no script
    with caplog.at_level(logging.WARNING, logger="tinymq"):
        producer.enqueue(Job("t", 1))
        assert ran.wait_until(lambda items: items == [1])
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
