"""What holds while an idle worker process waits in Redis for a job.

When Redis has nothing for it, a process's pump blocks in BLPOP (the queue's signal list
and its own wake list). Everything else must not wait for that wait to end: a finished
attempt is settled by its worker thread, a due delayed job is fetched by the timer, limits
registered meanwhile apply to the next fetch, a lost reply or a server that lost its
scripts costs no job. These tests make the wait long (30 s) so that anything that waited
for it would show. And a process frozen in its wait is leased nothing.
"""
import logging
import os
import signal
import subprocess
import sys
import time

import pytest

from tinymq import ExecutorConfig, Job, Queue
from tinymq.redis import RedisBroker
from tinymq.redis import _link

from _backends import Redis
from _helpers import WAIT, Recorder, wait_until
from test_redis_resend import LossyProxy, assert_each_ran_once

LONG_WAIT = 30.0  # seconds an idle pump waits in Redis in these tests
HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "_redis_worker.py")


@pytest.fixture
def shared(redis_url, monkeypatch):
    monkeypatch.setattr(_link, "_IDLE_WAIT", LONG_WAIT)
    made = Redis(redis_url, lease=4 * LONG_WAIT)  # (the wait is at most lease / 4)
    yield made
    made.close()


def waiting_in_redis(q):
    assert wait_until(lambda: q._link._pump_idle), "the pump did not go to wait in Redis"


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


def test_a_wait_whose_reply_is_lost_costs_no_job(redis_server, redis_url):
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
        assert_each_ran_once(producer, ran, [0, 1, 2])
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
    producer.broker._client.script_flush()  # as a restarted server: the next EVALSHA finds no script
    with caplog.at_level(logging.WARNING, logger="tinymq"):
        producer.enqueue(Job("t", 1))
        assert ran.wait_until(lambda items: items == [1])
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


CHILD = """
import sys
from tinymq.redis import _link
_link._IDLE_WAIT = 30.0  # its wait in Redis outlasts the test: no timing race with it
sys.argv[0] = {worker!r}
exec(compile(open({worker!r}).read(), {worker!r}, "exec"))
"""


def blocked(client):
    return sum(1 for c in client.client_list() if "b" in c["flags"] and c["cmd"] == "blpop")


def test_a_job_enqueued_while_an_idle_process_is_frozen_runs_elsewhere(redis_url):
    """A process frozen in its wait (SIGSTOP, a debugger, a VM pause) is leased no job: Redis
    leases a job only to a process that is running a fetch at that moment. (attackT's
    finding against a fetch pipelined behind the wait, which Redis ran for the frozen
    process: the job waited for its lease and, with max_crash_recoveries=0, failed.)"""
    shared = Redis(redis_url, lease=2.0, max_crash_recoveries=0)
    code = CHILD.format(worker=WORKER)
    child = subprocess.Popen([sys.executable, "-c", code, redis_url, shared.queue_name, "120", "0"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=HERE,
                             env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    producer = shared.queue()
    scripts = producer.broker._scripts
    client = scripts.client
    worker = None
    try:
        assert child.stdout.readline().strip() == b"ready"
        procs = wait_until(lambda: client.zrange(scripts.key("procs"), 0, -1))
        assert procs, "the child did not take a lease"
        proc = procs[0]
        proc = proc.decode() if isinstance(proc, bytes) else proc
        assert wait_until(lambda: blocked(client) == 1), "the child did not wait in Redis"
        os.kill(child.pid, signal.SIGSTOP)  # frozen (a debugger, a VM pause), its wait still in Redis
        assert blocked(client) == 1
        # Another idle process (a short lease: it looks every 0.5 s), waiting behind the child.
        worker = Queue(broker=RedisBroker(redis_url, name=shared.queue_name, lease=2.0,
                                          max_crash_recoveries=0))
        ran = Recorder()
        worker.register_executor("record", lambda job: ran.add(job.payload))
        worker.start_dispatcher(1)
        assert wait_until(lambda: blocked(client) == 2), "the other process did not wait in Redis"
        producer.enqueue(Job("record", 1))
        assert ran.wait_until(lambda items: items == [1])  # (the child is never resumed)
        assert producer.join(WAIT)
        assert client.hlen(scripts.key("inflight:" + proc)) == 0
        assert producer.get_stats().jobs_failed == 0
    finally:
        os.kill(child.pid, signal.SIGCONT)
        child.kill()
        child.wait()
        if worker is not None:
            worker.stop()
        shared.close()
