"""Findings of attack35g on the FULL store's savers who wait for each other (tinymq/persistence/sqlite.py,
_write): a write from code that ran inside a write of the same thread (a signal handler) is refused,
never left waiting for a leader that cannot go on until it returns."""
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

import tinymq.persistence.sqlite as sqlite_store
from tinymq.persistence import SQLitePersistence

from _helpers import WAIT, save_in_thread, wait_until

ROOT = pathlib.Path(__file__).resolve().parent.parent

# The main thread saves under FULL; a signal handler saves too, while that save is under way. ``gather``:
# the main thread is the first one back of a batch of savers, waiting for the others (who never come).
# ``lead``: it leads, waiting for the commit lock another thread holds. The handler's save is refused
# (RuntimeError), and the main thread's save returns, committed; the store goes on.
SAVE_IN_A_HANDLER = r"""
import sqlite3, sys, threading, time, signal
from tinymq.job import Job
from tinymq.persistence import SQLitePersistence

mode, path = sys.argv[1], sys.argv[2]
store = SQLitePersistence(path, synchronous="FULL")
outcomes = []

def handler(signum, frame):
    try:
        store.save(Job("t", id="from-handler"))
        outcomes.append("returned")
    except RuntimeError as exc:
        outcomes.append("refused" if "refused" in str(exc) else repr(exc))

signal.signal(signal.SIGALRM, handler)
if mode == "gather":
    now = time.monotonic()  # as just after a batch of 3 savers' commit, their writers quick to come back
    store._returning, store._released_at, store._back_by = 3, now, now + 1.0
    store._commit_time, store._return_time = 1.0, 0.0
    waiting = lambda: store._gathering is not None
else:
    held, release = threading.Event(), threading.Event()

    def hold():
        with store._commit_lock:
            held.set()
            release.wait()

    threading.Thread(target=hold, daemon=True).start()
    held.wait()
    waiting = lambda: store._leader is not None

def interrupt_once_waiting():
    while not waiting():
        time.sleep(0.001)
    signal.pthread_kill(threading.main_thread().ident, signal.SIGALRM)
    while not outcomes:
        time.sleep(0.001)
    if mode == "lead":
        release.set()

threading.Thread(target=interrupt_once_waiting, daemon=True).start()
store.save(Job("t", id="main"))
store._returning = store._commit_time = 0
store.save(Job("t", id="after"))
store.close()
conn = sqlite3.connect(path)
print(outcomes, sorted(job_id for (job_id,) in conn.execute("SELECT id FROM tinymq_jobs")))
"""


@pytest.mark.skipif(not hasattr(signal, "pthread_kill"), reason="needs signal.pthread_kill")
@pytest.mark.parametrize("mode", ["gather", "lead"])
def test_a_save_in_a_signal_handler_during_a_full_save_of_its_thread_is_refused_not_left_waiting(tmp_path, mode):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    try:
        done = subprocess.run([sys.executable, "-c", SAVE_IN_A_HANDLER, mode, str(tmp_path / "jobs.db")], env=env,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=WAIT * 3)
    except subprocess.TimeoutExpired:
        pytest.fail("the handler's save waits forever for its own thread's save")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['refused'] ['after', 'main']", done.stdout + done.stderr


class _Clock:
    """The store module's ``time``, its monotonic clock moved on by ``offset`` seconds."""

    def __init__(self):
        self.offset = 0.0

    def monotonic(self):
        return time.monotonic() + self.offset

    def __getattr__(self, name):
        return getattr(time, name)


def test_a_commit_that_took_an_hour_does_not_make_savers_wait_for_each_other_for_minutes(tmp_path, monkeypatch):
    """Under FULL, a commit of a batch of 3 savers' jobs takes an hour by the store's clock (the process
    was stopped during it: Ctrl-Z, a debugger, a stalled disk). Then one of them is back, the others not
    (their threads went on to other work): its save waits for them only a moment, as after any commit,
    not half of that hour (twice the moving average of the commits' times, an hour weighing 1/8)."""
    clock = _Clock()
    monkeypatch.setattr(sqlite_store, "time", clock)
    with SQLitePersistence(str(tmp_path / "jobs.db"), synchronous="FULL") as store:
        commit = store._commit

        def an_hour_long(batch):
            commit(batch)
            if len(batch) > 1:
                clock.offset += 3600.0

        store._commit = an_hour_long
        now = clock.monotonic()  # as just after a batch of 3 savers' commit, their writers quick to come back
        store._returning, store._released_at, store._back_by = 3, now, now + WAIT
        store._commit_time, store._return_time = 0.001, 0.0
        outcomes = {}
        threads = [save_in_thread(store, "first", outcomes)]
        assert wait_until(lambda: store._gathering is not None), "the first one back did not wait for the others"
        threads.append(save_in_thread(store, "second", outcomes))
        assert wait_until(lambda: len(store._pending) == 1), "second did not queue"
        threads.append(save_in_thread(store, "third", outcomes))  # the last one back: the three in one commit
        for thread in threads:
            thread.join(WAIT)
        assert outcomes == dict.fromkeys(["first", "second", "third"], "returned")
        alone = save_in_thread(store, "alone", outcomes)
        try:
            alone.join(WAIT)
            assert outcomes.get("alone") == "returned", "a saver waits for minutes for the others of its batch"
        finally:
            with store._gate:  # (before the fix: the saver left waiting leads now)
                store._hand_on_lead()
            alone.join(WAIT)
