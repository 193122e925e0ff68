"""Defects found by an outside attack (session 29) on the last session's join(), writable Job.id,
counters that never go down, lost Redis hashes and the SQLite store's serializer record."""
import logging
import warnings

import pytest

from tinymq import Config, Job, PersistenceError, Queue, SQLitePersistence
from tinymq.persistence import PickleSerializer

from _helpers import WAIT, wait_until


def pickle_serializer():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its warning about loading untrusted files
        return PickleSerializer()


# --- a read-only look opened before the file held a job --------------------------------------------

# A read-only store checked the file's serializer record only when it was opened. Opened with another
# serializer while the file held no job (allowed: nothing to misread), it went on reading after the
# owner had saved jobs, and misread each one: jobs() said [] and logged every job as a row that cannot
# be decoded. Each look now refuses, as opening the file then would.
@pytest.mark.parametrize("look", ["jobs", "dead_jobs", "counts", "quarantined"])
def test_a_read_only_look_opened_on_an_empty_file_refuses_once_it_holds_jobs_of_another_serializer(
        path, caplog, look):
    with SQLitePersistence(path) as owner, \
            SQLitePersistence(path, read_only=True, serializer=pickle_serializer()) as view:
        assert view.jobs() == []
        owner.save(Job("t", {"x": 1}, id="a"))
        with caplog.at_level(logging.ERROR, logger="tinymq"):
            with pytest.raises(PersistenceError, match=r"written with the serializer .*JSONSerializer.*given "
                                                       r".*PickleSerializer"):
                getattr(view, look)()
        assert not caplog.records  # no job read as undecodable
        assert [job.id for job in SQLitePersistence(path, read_only=True).jobs()] == ["a"]


# --- an evicting enqueue over Redis that meets a delayed job whose hash is gone ---------------------

# docs/redis.md: a job whose hash Redis lost is dropped by the call that meets its id, counted in no
# counter but the unfinished one, named in an ERROR ("is lost"), and handed to no on_failure. An
# enqueue that evicted such a job from a full delayed set did none of that: it reported the job
# "evicted" to on_failure as a stand-in of type "undecodable" (an ERROR said its body "cannot be
# decoded"), counted it in jobs_evicted, and wrote a dead hash of its reason alone (dead_jobs() listed
# it). The lost job leaves the set as it is met, which is room enough: nothing else is evicted.
@pytest.mark.redis
def test_an_enqueue_that_would_evict_a_delayed_job_whose_hash_is_gone_drops_it_as_lost(
        redis_url, redis_client, caplog):
    from tinymq.redis import RedisBroker

    q = Queue(config=Config(max_delayed_jobs=2), broker=RedisBroker(redis_url, name="evictlost", lease=1.0))
    failures = []
    q.on_failure(lambda job, reason, exc: failures.append((job.id, job.type, reason)))
    q.register_executor("t", lambda job: None)
    try:
        q.enqueue_delayed(Job("t", id="first"), 100)
        q.enqueue_delayed(Job("t", id="second"), 200)
        redis_client.delete("tmq:{evictlost}:job:first")  # behind the queue's back
        with caplog.at_level(logging.ERROR, logger="tinymq"):
            q.enqueue_delayed(Job("t", id="third"), 300)
            q.start_dispatcher(1)  # (a worker process's heartbeat names the lost job)
            assert wait_until(lambda: any("job first of Redis queue 'evictlost' is lost" in record.getMessage()
                                          for record in caplog.records))
        assert failures == []
        assert not [record for record in caplog.records if "decoded" in record.getMessage()]
        stats = q.get_stats()
        assert (stats.delayed_jobs_count, stats.jobs_evicted, stats.jobs_failed) == (2, 0, 0)
        assert sorted(redis_client.zrange("tmq:{evictlost}:delayed", 0, -1)) == ["second", "third"]
        assert q.broker.dead_jobs() == []
        assert not redis_client.exists("tmq:{evictlost}:job:first")
        assert int(redis_client.hget("tmq:{evictlost}:stats", "outstanding")) == 2
    finally:
        q.stop()


# --- a new job given the id of a job whose hash Redis lost while its id waited -----------------------

# The id of a lost job stays where it waited (a ready list, the delayed set) until a call meets it, and
# its job counts unfinished until then. An enqueue of a new job with that id (the "one report-2026-12 at
# a time" idiom: no unfinished job has it, as far as Redis can tell) is accepted, and the waiting id then
# stood for the new job: in a ready list the new job was there twice, and one fetch that took both made
# one attempt of them (the same attempt key), which ran twice and ended once, so the unfinished count
# never came back to 0 and join() waited for ever; in the delayed set the two became one member, which
# ended once (and with max_delayed_jobs, an enqueue that evicted the waiting id evicted the new job).
# Now the add to the delayed set that finds the id there already (ZADD's reply), and a fetch that meets
# an id twice, drop the lost job's id as lost: the new job runs once and join() returns. (Met by two
# fetches, the new job may still run twice: docs/redis.md, Dead jobs.)
@pytest.mark.redis
@pytest.mark.parametrize("where", ["ready", "delayed", "delayed-capped"])
def test_a_new_job_with_the_id_of_a_lost_one_runs_once_and_join_returns(redis_url, redis_client, where):
    from tinymq.redis import RedisBroker

    name = f"reused-{where}"
    config = Config(max_delayed_jobs=1) if where == "delayed-capped" else Config()
    q = Queue(config=config, broker=RedisBroker(redis_url, name=name, lease=1.0))
    runs, failures = [], []
    q.register_executor("t", lambda job: runs.append(job.payload))
    q.on_failure(lambda job, reason, exc: failures.append((job.payload, reason)))
    try:
        for payload in ("lost", "new"):
            if where == "ready":
                q.enqueue(Job("t", payload, id="report"))
            else:
                q.enqueue_delayed(Job("t", payload, id="report"), 0.05)
            if payload == "lost":
                redis_client.delete(f"tmq:{{{name}}}:job:report")  # behind the queue's back
        q.start_dispatcher(2)
        assert q.join(WAIT)
        assert runs == ["new"]
        assert failures == []
        stats = q.get_stats()
        assert (stats.jobs_succeeded, stats.jobs_evicted, stats.jobs_failed) == (1, 0, 0)
    finally:
        q.stop()
