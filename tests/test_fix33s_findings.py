"""Defects taken up by fix33s (left open by attack32s, session 32): a second Ctrl-C (a signal handler
raising in the main thread) inside the SQLite store's recovery from a first one, one between a
batch's COMMIT and its dead-row bookkeeping, and one inside ``close()``."""
import linecache
import signal
import sys
import threading

import pytest

from tinymq.job import Job
from tinymq.persistence import SQLitePersistence

from _helpers import WAIT, LockStandIn, save_in_thread, wait_until
from test_attack32s_findings import _Interrupted, _LockThatLetsWritersQueue
from test_persistence_group_commit import _ids_in_file


def _codes(*names):
    """The code objects of the store's methods ``names`` (those it has): a ``codes`` of _InterruptionAt."""
    return {getattr(SQLitePersistence, name).__code__ for name in names if hasattr(SQLitePersistence, name)}


# Lines where nothing lands: a with line (it is also the line of its block's exit, as that calls
# __exit__), try, else, finally and except lines.
_NO_CALL_OF_ITS_OWN = ("with ", "try:", "else:", "finally:", "except")


class _InterruptionAt:
    """Once ``start()`` is called on the main thread, an interruption lands at the ``n``-th point of
    the functions whose code ``codes`` holds where one can (as one of them begins, or before one of
    their lines; a comprehension of theirs too): ``interrupt()`` runs there (raises, as a SIGINT handler does).
    ``fired`` says where, if it did. (Since Python 3.11 a signal handler runs as a Python function
    begins, as a call returns, or at a loop's jump back: before each line is more often, but for a
    line that makes no call of its own, where nothing lands.)"""

    def __init__(self, n, codes, interrupt):
        self.n, self.codes, self.interrupt = n, codes, interrupt
        self.seen = 0
        self.fired = None
        self.previous = sys.gettrace()

    def start(self):
        sys.settrace(self._call)

    def stop(self):
        sys.settrace(self.previous)

    def _ours(self, frame):
        return frame.f_code in self.codes or (
            frame.f_code.co_name.startswith("<") and frame.f_back is not None and frame.f_back.f_code in self.codes)

    def _call(self, frame, event, arg):
        if not self._ours(frame):
            return None
        self._point(frame)  # as it begins
        return self._line

    def _line(self, frame, event, arg):
        if event == "line" and not linecache.getline(frame.f_code.co_filename, frame.f_lineno).lstrip().startswith(
                _NO_CALL_OF_ITS_OWN):
            self._point(frame)
        return self._line

    def _point(self, frame):
        if self.fired is None:
            self.seen += 1
            if self.seen == self.n:
                self.fired = (frame.f_code.co_name, frame.f_lineno)
                self.interrupt()


def _raise_interrupted():
    raise _Interrupted()


# --- 1. A second Ctrl-C inside the recovery from the first ---------------------------------------
#
# The main thread leads a batch holding two other threads' saves, or is about to lead one with two
# writers waiting, and a first interruption lands there: its recovery (_hand_back, _resign, _wake)
# hands the others' units and the lead on. A second interruption landing at any point of that
# recovery must not strand them: before the fix, one landing between its statements left a unit out
# of the queue and out of the batch (its writer raised PersistenceError "interrupted before its
# commit"), or the lead given to a writer never woken (under FULL it, and every later writer, waited
# for ever).
_RECOVERY = ("_hand_back", "_resign", "_wake", "_hand_on_lead")


def _sweep(run):
    """``run(n)`` for n = 1, 2, ... until its second interruption lands nowhere; how many landed."""
    for n in range(1, 200):
        if run(n).fired is None:
            return n - 1
    raise AssertionError("the recovery has more points than the sweep tries")


def _leader_interrupted_twice(path, synchronous, n, interrupt=_raise_interrupted, interruption=_Interrupted):
    """The main thread's save leads a batch with two other threads' saves queued behind it; its
    commit is interrupted as it begins, and its recovery at point ``n``."""
    outcomes, followers, first = {}, [], []
    second = _InterruptionAt(n, _codes(*_RECOVERY), interrupt)

    def queue_followers():  # the main thread holds the commit lock, its batch not yet taken
        for name in ("second", "third"):
            followers.append(save_in_thread(store, name, outcomes))
        expected = 3 if synchronous == "NORMAL" else 2  # (under FULL the leader's own unit is not pending)
        assert wait_until(lambda: len(store._pending) == expected), "the other writers did not queue"

    def interrupted(statements):
        if threading.current_thread() is threading.main_thread() and not first:
            first.append(True)
            second.start()
            interrupt()
        return execute(statements)

    with SQLitePersistence(path, synchronous=synchronous) as store:
        execute = store._execute
        store._execute = interrupted
        lock = store._commit_lock = _LockThatLetsWritersQueue(store._commit_lock, queue_followers)
        try:
            with pytest.raises(interruption):
                store.save(Job("t", id="first"))
        finally:
            second.stop()
            lock.queued = None
        for thread in followers:
            thread.join(WAIT)
        where = f"second interruption at {second.fired}"
        assert not any(thread.is_alive() for thread in followers), f"a writer waits for ever ({where})"
        assert outcomes == {"second": "returned", "third": "returned"}, where
        store.save(Job("t", id="after"))  # the store goes on
    assert {"second", "third", "after"} <= _ids_in_file(path), where
    return second


@pytest.mark.parametrize("synchronous", ["NORMAL", "FULL"])
def test_a_second_ctrl_c_in_the_leaders_recovery_strands_no_other_writer(tmp_path, synchronous):
    landed = _sweep(lambda n: _leader_interrupted_twice(str(tmp_path / f"jobs-{n}.db"), synchronous, n))
    assert landed >= 5, "the second interruption landed nowhere: the test did not exercise the recovery"


class _GateInterruptedAsTheLeadIsTaken(LockStandIn):
    """The store's gate (FULL): as the main thread lets go of it having taken the lead, two other
    writers queue behind it, then an interruption lands (a Ctrl-C); its recovery is interrupted at
    point ``second``."""

    def __init__(self, lock, queue_followers, second):
        super().__init__(lock)
        self.queue_followers, self.second = queue_followers, second

    def release(self):
        self.lock.release()
        if threading.current_thread() is threading.main_thread() and self.queue_followers is not None:
            queue_followers, self.queue_followers = self.queue_followers, None
            queue_followers()
            self.second.start()
            raise _Interrupted()


def test_a_second_ctrl_c_as_the_lead_is_handed_on_strands_no_writer(tmp_path):
    """Under FULL the main thread takes the lead of the next batch, two writers queue behind it, and
    a Ctrl-C lands as it leaves the gate: _resign hands the lead to the first of them. A second one
    landing at any point of that strands neither (before the fix, one after the lead was given and
    before its writer was woken left both, and every later writer, waiting for ever)."""
    def run(n):
        path = str(tmp_path / f"jobs-{n}.db")
        outcomes, followers = {}, []
        second = _InterruptionAt(n, _codes(*_RECOVERY), _raise_interrupted)
        with SQLitePersistence(path, synchronous="FULL") as store:
            def queue_followers():
                for name in ("second", "third"):
                    followers.append(save_in_thread(store, name, outcomes))
                    assert wait_until(lambda: len(store._pending) == len(followers)), f"{name} did not queue"

            store._gate = _GateInterruptedAsTheLeadIsTaken(store._gate, queue_followers, second)
            try:
                with pytest.raises(_Interrupted):
                    store.save(Job("t", id="first"))
            finally:
                second.stop()
            for thread in followers:
                thread.join(WAIT)
            where = f"second interruption at {second.fired}"
            assert not any(thread.is_alive() for thread in followers), f"a writer waits for ever ({where})"
            assert outcomes == {"second": "returned", "third": "returned"}, where
            store.save(Job("t", id="after"))
        assert {"second", "third", "after"} <= _ids_in_file(path), where
        return second

    assert _sweep(run) >= 3, "the second interruption landed nowhere: the test did not exercise _resign"


@pytest.mark.parametrize("synchronous", ["NORMAL", "FULL"])
def test_two_real_sigints_in_the_leader_strand_no_other_writer(tmp_path, synchronous):
    """As the first test, with real SIGINTs handled by Python's default handler (KeyboardInterrupt):
    each raised with signal.raise_signal, which runs the handler before it returns."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        landed = _sweep(lambda n: _leader_interrupted_twice(
            str(tmp_path / f"jobs-{n}.db"), synchronous, n, lambda: signal.raise_signal(signal.SIGINT),
            KeyboardInterrupt))
    finally:
        signal.signal(signal.SIGINT, previous)
    assert landed >= 5


# --- 2. A Ctrl-C between a batch's COMMIT and its dead-row bookkeeping -----------------------------

class _CursorInterruptedAfterCommit:
    """The store's cursor: the main thread's first COMMIT is interrupted as it returns (a Ctrl-C
    during it, as during the fsync of a FULL commit)."""

    def __init__(self, cursor):
        self.cursor = cursor
        self.fired = False

    @property
    def rowcount(self):
        return self.cursor.rowcount

    def execute(self, sql, parameters=()):
        result = self.cursor.execute(sql, parameters)
        if sql == "COMMIT" and threading.current_thread() is threading.main_thread() and not self.fired:
            self.fired = True
            raise _Interrupted()
        return result


@pytest.mark.parametrize("synchronous", ["NORMAL", "FULL"])
def test_a_dead_job_a_save_replaced_in_an_interrupted_batch_comes_back_at_undo_save(path, synchronous):
    """Another thread saves a new job "x" over the dead job "x", in a batch the main thread commits;
    a Ctrl-C lands just after the batch's COMMIT. That save returns (its unit committed again by the
    next leader), and the queue then refuses the job (QueueFull): undo_save("x") puts the dead job
    back, as after a batch nothing interrupted. Before the fix it deleted the row: the dead row it
    replaced was recorded for undo_save only after the COMMIT, and the commit again found the new
    row there already (nothing replaced)."""
    outcomes, followers = {}, []

    def queue_follower():  # the main thread holds the commit lock, its batch not yet taken
        followers.append(save_in_thread(store, "x", outcomes))
        expected = 2 if synchronous == "NORMAL" else 1  # (under FULL the leader's own unit is not pending)
        assert wait_until(lambda: len(store._pending) == expected), "the other writer did not queue"

    with SQLitePersistence(path, synchronous=synchronous) as store:
        store.mark_dead(Job("t", {"old": True}, id="x"), "retries_exhausted", "boom")
        store._cursor = _CursorInterruptedAfterCommit(store._cursor)
        lock = store._commit_lock = _LockThatLetsWritersQueue(store._commit_lock, queue_follower)
        with pytest.raises(_Interrupted):
            store.save(Job("t", id="first"))
        lock.queued = None
        followers[0].join(WAIT)
        assert outcomes == {"x": "returned"}
        assert store._cursor.fired
        store.undo_save("x")  # the queue refused the new job
        assert [(dead.job.id, dead.job.payload, dead.reason, dead.error) for dead in store.dead_jobs()] == [
            ("x", {"old": True}, "retries_exhausted", "boom")]
        assert "x" not in {job.id for job in store.jobs()}


# --- 3. A Ctrl-C inside close() ----------------------------------------------------------------------

class _CodeOf:
    """The code of the functions of ``modules`` (tinymq's, and those of the standard library that
    close() runs): a ``codes`` of _InterruptionAt."""

    def __init__(self, *modules):
        self.files = {module.__file__ for module in modules}

    def __contains__(self, code):
        return code.co_filename in self.files


@pytest.mark.parametrize("interruption", ["exception", "sigint"])
def test_a_ctrl_c_inside_close_leaves_the_file_to_a_new_store(tmp_path, interruption):
    """An interruption (a signal handler raising, Ctrl-C) lands at each point of close() in turn,
    and of what it runs (a store each time). Either it came before close() began, and the store
    works on; or the store is closed and has given the file up: a new store opens it at once, while
    the old one is still referenced. A second close() does what is left. Before the fix, one landing
    after close() marked the store closed left the file owned (its lock held, the file registered as
    this process's) until the store was garbage-collected, and a second close() did nothing."""
    import weakref
    import _weakrefset
    from tinymq import _sections
    from tinymq.persistence import _ownership, sqlite as sqlite_module

    if interruption == "sigint":
        previous = signal.signal(signal.SIGINT, signal.default_int_handler)
        interrupt, raised = (lambda: signal.raise_signal(signal.SIGINT)), KeyboardInterrupt
    else:
        previous, interrupt, raised = None, _raise_interrupted, _Interrupted
    codes = _CodeOf(sqlite_module, _ownership, _sections, weakref, _weakrefset)
    closed_then = 0
    try:
        for n in range(1, 200):
            path = str(tmp_path / f"jobs-{n}.db")
            store = SQLitePersistence(path)
            store.save(Job("t", id="kept"))
            at = _InterruptionAt(n, codes, interrupt)
            at.start()
            try:
                store.close()
            except raised:
                pass
            finally:
                at.stop()
            where = f"interrupted at {at.fired}"
            if store._closed:
                closed_then += 1
                with SQLitePersistence(path) as new:  # (the old store is still referenced: not collected)
                    assert [job.id for job in new.jobs()] == ["kept"], where
            else:
                store.save(Job("t", id="more"))  # it landed before close() began
            store.close()
            with SQLitePersistence(path) as new:
                assert "kept" in {job.id for job in new.jobs()}, where
            if at.fired is None:
                break
        else:
            raise AssertionError("close() has more points than the test tries")
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    assert closed_then >= 5, "the interruption landed nowhere after close() began"
