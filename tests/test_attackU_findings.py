"""attackU: q.cancel() of a waiting job by a worker process (e551019: the row waits in
reporting:<proc> until acknowledged, op A). Defects found by attacking it."""
import threading

import pytest

from tinymq.redis._scripts import SettleOp

from test_redis_reports import a_worker_and_two_waiting_jobs, expire, scripts  # noqa: F401 (a fixture)


def test_cancel_in_a_failure_callback_keeps_stop_waiting_for_the_outer_callback(redis_url):
    worker, producer, client, keys = a_worker_and_two_waiting_jobs(redis_url, "attackU-nested")
    reported = []
    inner_done, go = threading.Event(), threading.Event()

    @worker.on_failure
    def report(job, reason, exc):
        reported.append((job.id, reason))
        if job.id == "a":
            assert worker.cancel("b")  # nested: its own row, reported and acknowledged
            inner_done.set()
            go.wait(10)  # the outer callback is still running

    try:
        canceller = threading.Thread(target=worker.cancel, args=("a",))
        canceller.start()
        assert inner_done.wait(10)
        stopper = threading.Thread(target=worker.stop)
        stopper.start()
        stopper.join(1.5)
        waited = stopper.is_alive()  # stop() must wait for the running callback of "a"
        go.set()
        stopper.join(15)
        canceller.join(15)
        left = client.lrange(keys.key("reports"), 0, -1)
        assert waited and left == [] and client.keys(keys.key("reporting:*")) == [], (waited, left)
        assert reported == [("a", "cancelled"), ("b", "cancelled")]
    finally:
        go.set()
        worker.stop()
        producer.stop()
        client.close()


def test_stop_between_a_cancel_reply_and_its_callbacks_does_not_skip_them(redis_url):
    worker, producer, client, keys = a_worker_and_two_waiting_jobs(redis_url, "attackU-stoprace")
    reported = []

    @worker.on_failure
    def report(job, reason, exc):
        reported.append((job.id, reason))

    link = worker._link
    real_cancel = link.scripts.cancel

    stoppers = []

    def cancel_then_stop_elsewhere(*args):
        reply = real_cancel(*args)  # Redis removed the job, kept the row; the reply is back
        stopper = threading.Thread(target=worker.stop)  # stop() runs now on another thread
        stoppers.append(stopper)
        stopper.start()
        stopper.join(1.5)
        return reply

    link.scripts.cancel = cancel_then_stop_elsewhere
    try:
        assert worker.cancel("a")
        link.scripts.cancel = real_cancel
        stoppers[0].join(15)  # its release (a second stop() from here returns while it runs)
        assert not stoppers[0].is_alive()
        left = client.lrange(keys.key("reports"), 0, -1)
        assert reported == [("a", "cancelled")], (reported, left)
        assert left == [] and client.keys(keys.key("reporting:*")) == []
    finally:
        link.scripts.cancel = real_cancel
        worker.stop()
        producer.stop()
        client.close()


def test_an_acknowledgement_of_an_earlier_cancel_of_the_same_id_keeps_the_newer_row(scripts):
    assert scripts.heartbeat("p1", 60_000, 3, False, "b0").alive  # p1 holds a lease
    scripts.enqueue("e1", 100, 0, [("a", "t", 1, 60_000, "body-1")])
    assert scripts.cancel("c1", "a", "p1").kept
    scripts.enqueue("e2", 100, 0, [("a", "t", 1, 60_000, "body-2")])  # the id is free again
    assert scripts.cancel("c2", "a", "p1").kept
    # p1's callbacks for the first cancel ran; their A goes with its next call, before the
    # callbacks of the second one ran. Then p1 is killed.
    scripts.settle("p1", [SettleOp("A", "a|cancelled|c1")])
    expire(scripts, "p1")
    alive, _, crashed = scripts.beat("reaper", 60_000, 3, False, "b1")
    assert [(c.id, c.body) for c in crashed] == [("a", "body-2")]  # reported at least once


def test_a_reaper_keeps_both_cancel_rows_of_one_id_until_each_is_acknowledged(scripts):
    """Two cancel rows of one id, handed on to a reaper, wait under two fields: its
    acknowledgement of the first leaves the second (once, they collapsed into one field)."""
    assert scripts.heartbeat("p1", 60_000, 3, False, "b0").alive
    scripts.enqueue("e1", 100, 0, [("a", "t", 1, 60_000, "body-1")])
    assert scripts.cancel("c1", "a", "p1").kept
    scripts.enqueue("e2", 100, 0, [("a", "t", 1, 60_000, "body-2")])
    assert scripts.cancel("c2", "a", "p1").kept
    expire(scripts, "p1")  # p1 killed before either callback ran
    alive, _, crashed = scripts.beat("reaper", 60_000, 3, False, "b1")
    assert sorted(c.body for c in crashed) == ["body-1", "body-2"]
    assert len({c.key for c in crashed}) == 2 and all(c.key for c in crashed)
    first = next(c for c in crashed if c.body == "body-1")
    scripts.settle("reaper", [SettleOp("A", first.key)])  # it reported the first one
    expire(scripts, "reaper")  # and was killed
    alive, _, crashed = scripts.beat("next", 60_000, 3, False, "b1")
    assert [c.body for c in crashed] == ["body-2"]  # the second one is reported, the first not again
