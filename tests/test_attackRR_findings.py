"""attackRR: an outsider's attack on this session's changes (frozen Redis bounds, cancel in the
deciding step, crashed rows until reported, store BaseExceptions, cron's next tick).

Each test's docstring says the symptom, how to reproduce it, and what the docs promise.
"""
import base64
import logging
import os
import threading
import time
import zlib

from tinymq import DuplicateJob, Job, Queue, TinyMQError


# --- 1. a Redis frozen before the broker's first look at it -----------------------------------

def test_enqueue_with_a_timeout_keeps_it_when_redis_froze_before_the_first_reply(own_redis_server):
    """Symptom: a RedisBroker made while Redis was down (its version check put off to the first
    use), then Redis frozen (SIGSTOP) once back: enqueue(block=True, timeout=1) raised after
    10 s, the socket timeout of the version check (INFO) that every call makes first until one
    answers; three producers at once raised after 10, 20 and 30 s (the check's lock). Against a
    server that accepts TCP but never answers, the same.
    docs/redis.md: enqueue raises after its own timeout (half a second at least).
    Fix: the first look at the server (INFO, CONFIG GET) is bounded by the caller's deadline,
    and so is the wait for another thread's look under way."""
    from tinymq.redis import RedisBroker

    own_redis_server.kill()  # down: the broker's check fails at once (refused) and is put off
    q = Queue(broker=RedisBroker(own_redis_server.url, name="frozen-first", lease=2.0))
    own_redis_server.start()
    try:
        with own_redis_server.frozen():
            took = {}

            def produce(job_id):
                began = time.monotonic()
                try:
                    q.enqueue(Job("t", id=job_id), block=True, timeout=1.0)
                except TinyMQError as exc:
                    # (the first look at the server, or the enqueue itself, got no reply in time)
                    assert "may or may not have been enqueued" in str(exc) or " not enqueued" in str(exc), exc
                took[job_id] = time.monotonic() - began

            threads = [threading.Thread(target=produce, args=(f"p{i}",)) for i in range(3)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(40)
            assert len(took) == 3
            assert max(took.values()) < 5.0, took
        for job_id in ("p0", "p1", "p2"):  # each got in once, whatever the frozen calls did
            try:
                q.enqueue(Job("t", id=job_id))
            except DuplicateJob:
                pass
        assert q.get_stats().jobs_enqueued == 3
    finally:
        q.stop(timeout=5)


def test_the_put_off_look_at_redis_still_warns_of_an_evicting_policy(own_redis_server, caplog):
    """The first look made by a bounded enqueue (see above) reads CONFIG GET on a raw connection
    (a RESP3 map there): it still warns of a maxmemory-policy that may evict tinymq's keys."""
    import redis as redis_py

    from tinymq.redis import RedisBroker

    own_redis_server.kill()
    q = Queue(broker=RedisBroker(own_redis_server.url, name="policy-first", lease=2.0))
    own_redis_server.start()
    client = redis_py.Redis.from_url(own_redis_server.url)
    try:
        client.config_set("maxmemory-policy", "allkeys-lru")
        with caplog.at_level(logging.WARNING, logger="tinymq"):
            q.enqueue(Job("t"), block=True, timeout=5.0)
        assert [record for record in caplog.records if "'allkeys-lru'" in record.getMessage()]
        assert q.get_stats().jobs_enqueued == 1
    finally:
        client.close()
        q.stop(timeout=5)


# --- 3. read_only=True after a kill -9 of the owner ---------------------------------------------

# The three files a store left when its process was SIGKILLed as a queue loaded it (found once in
# about 100 kills; the -wal holds its header only, the -shm its index): zlib, then base64.
_KILLED_OWNER_FILES = {
    "j.db": (
        "eNrtmM9vG0UUx/dHghOXtPwOJaR6aqiwpQYlbUqLK6Q6rtOaGJs6jkq5ROvdcbytvePsTOIaIYGE1HKAE5wAIZBA"
        "qQBRqPgRVEAIUgQSAnGjXLnCH4C4MLvrcXa3ScpUQQi0T46+u7PzPvNr35udzJzImxRBFdsNjcJ+qUdSFOkIgCRJ"
        "Cvvrk9bMue/x3cudv81MkR7Q5V6novqnc9/rSWSRRfbvW4/sBLWiWs5Nn/qJdxFZZJH9QxY7uv3Y0I7+WMzbWmWt"
        "cmDCGNd1fUKvjo75TTcMe9GyTGuepn9ZfW5a/eIy10HmeZMAaF8Q9M5FrjcPSN6url6KliayyP4TVtg61ID7Eb8i"
        "sd/7W4Bzc9G5rBwbHBmRnz9BtUodUdNqNxbmTuMK2bp+b9yG71LJlLLpchbK6cl8FnwPIBEHZqYBa1bOPl6Gx0q5"
        "R9OlUzCdPQWFYhkKs/n8XrcuoRo7J/nrdp97ZaOjYCPNaMNT0Mm27MpgJUx0bNuLTeqCaLuJAo16/KZtYtukbbc4"
        "Vyhnj2VL3hNGm2NnM8/YgHiDXWMtz1rmWUBNrNeAIB1bBhtiS6vXQa9j/UzSa9hsIDaKRrPL8fCI2iYiEGg4hK9q"
        "Zh0ZoFGKGk1KgGBWZHv91tp1rHUmcjJfnFyndwTZplY3n0Q24EXaXKR73YlzTp1QwBbq9qM9x/peNee9ebkW9MhM"
        "sQC4chrpFHAVSo5LxvOomqhukMMuOOV/kuiMXpsnwWnfFN/pYauGLHDG3HYhdY3QOWTbrN/+tWPrTrC1ObtVa3tv"
        "A/P1vw4ELazV60x/2JfWEHMznOmrAtGWEEnBVG6qCC2T1kwLtLW3J+GN36lkQAWxGUZgUkBnTUKRkYwn4WSufLw4"
        "W4ZS8WTuaNyNf2VKYr/IIrtBe/agEhvcs0c+N+7PxrhlIdt/ra6Xj90nnYRM6pj648CfjjPHs5lpSLhVHoaxZCdt"
        "dnI497gmadvstV83Jv3B1bSxjgi5n3gebqqEhJs72bV+hpWblo6ggjH10kkNE7rRTsDJbh1LYyjNMlxftuN4ecQB"
        "X8d7N0s1BlpKMTEtvNsJfaerrmuVpWMnrGuY5TxvpG7/vLzeJV53k4gn42z1tslxSf1Mban7lN+VC4qu7JKvyi/J"
        "RVZ8RXpGOrzxuv/4P3qHBY5T48Hj1NtPcN0mABkLQi58zTX+9yF6NQhZTnPtF4CgIOStZa59ApDQWfXN+7gKHHh1"
        "PQh5Y4WrwGFXrwQhrw9w7RWAaEHIa+e59ghAHgpCXr3KVRWAHApCXv6Sq5IJQPo3gxwMQs7PcHXiPy4XJPln+UW5"
        "oF5Wl9Rx5TdlWakow3K/tCo9LaU2ihj512jnu+EcciC4Ihdf4bpDADIRhLx3hOt2Acj+IOTdP7gOCEBCkfv5Tq53"
        "CUBCkfvpKtc7BSChyF1Jcr1DABKK3I8vcb1dABKK3I9e4HqbACQUuR+OcL1VAPJgEPJBiestTvzHlGEpGPlRJEcm"
        "lM5QKBP9VOa6SwASykQ/pLgOC0BC/+v+nnC9VwAS+sL7boHrkAAk9IX3zbdc7xEI3dAX3pVDXHcKQEJfeF8Ncb37"
        "L6r02eA="
    ),
    "j.db-wal": (
        "eNozr2drYtB9JMHAwMIAAq67D7YnFl3eFjNhX8RpB444AI5MCoE="
    ),
    "j.db-shm": (
        "eNrtyqENgDAQQNHDQLrBLYFs0j0Zr45FqCKpQdQh3pM/P+8zXlt8a0fu9eolF/+5PZMAAAAAAAAAAAAAAAAAAAAA"
        "AAAAAAAAAAAAAAAAAAAAgB8ZazMSVw=="
    ),
}


def test_a_read_only_store_reads_the_files_a_killed_owner_left(tmp_path):
    """Symptom: after the owner was killed (kill -9) at some moments of its load (here: its
    -wal holds only its header), SQLitePersistence(path, read_only=True).counts() and
    ``python -m tinymq status --db`` fail with PersistenceError "cannot read ...: locking
    protocol" (SQLITE_PROTOCOL from the readonly_shm connection), for good, until a process
    opens the file for writing. docs/persistence.md: a read-only store can be opened at any
    time; it refuses only a -wal without its -shm (and says how to recover).
    Reproduce: kill a process in set_persistence at random moments, open read-only after each
    (about 1 in 100). Cause: SQLite's read-only index of a -wal that holds only its header
    lacks the header's salts, so every look is retried until SQLITE_PROTOCOL.
    Fix: such a -wal holds no commit, so the database file alone is read (immutable), and the
    read is kept only if no owner began writing during it (tests/test_persistence_ownership.py)."""
    from tinymq.persistence import SQLitePersistence

    path = tmp_path / "j.db"
    for name, chunks in _KILLED_OWNER_FILES.items():
        (tmp_path / name).write_bytes(zlib.decompress(base64.b64decode("".join(chunks))))
        os.chmod(tmp_path / name, 0o600)
    with SQLitePersistence(str(path), read_only=True) as view:
        assert sum(view.counts().values()) == 30
