"""join() waits for the jobs enqueued before it was called, not for those enqueued meanwhile.

API.md: "block until every job enqueued so far, its retries and delayed jobs included, has
finished". Until this change join() returned only at a moment when no job at all was unfinished
(as ``queue.Queue.join``), so producers that never paused, a schedule, or a job that enqueues its
successor kept it waiting for ever. The core test checks the rule against a model over both cores;
the Queue tests run on whichever core the suite runs with.
"""
import asyncio
import threading
import time

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from tinymq import Config, ExecutorConfig, Job, Queue, RetryConfig

from _helpers import WAIT, Recorder, run_model_test, signal_after

# --- the core, against a model ---------------------------------------------------------------


class JoinMachine(RuleBasedStateMachine):
    """Jobs accepted every way the core accepts them, taken, retried, cancelled and finished, and
    joins begun and ended in any order between. Model: a join is done when every job unfinished
    at its begin has finished, whatever was accepted since (join_begin's snapshot)."""

    core = None  # set per twin by run_model_test

    def __init__(self):
        super().__init__()
        self.queue = self.core.ReadyQueue(10_000)
        self.state = self.queue.configure("t", lambda job: None, 10_000, None, False, False)
        self.heap = self.core.DelayedHeap()
        self.ready = []  # accepted, in the buffer
        self.delayed = []  # accepted, in the heap
        self.held = []  # accepted, held by the caller (running, or placed elsewhere)
        self.joins = []  # (ticket, ids of the jobs unfinished at its begin)
        self.made = 0

    def _unfinished_ids(self):
        return {job.payload for job in self.ready + self.delayed + self.held}  # (ids of dead jobs are reused)

    def _new_jobs(self, n):
        jobs = [Job("t", self.made + i) for i in range(n)]
        self.made += n
        return jobs

    @rule(how=st.sampled_from(["push", "put", "push_many", "accept", "accept_ready", "accept_delayed",
                               "push_many_delayed"]),
          n=st.integers(1, 3))
    def enqueue(self, how, n):
        jobs = self._new_jobs(n)
        if how == "push":
            assert self.queue.push(jobs[0])
            self.ready.append(jobs[0])
        elif how == "put":
            assert self.queue.put(jobs[0], 0)
            self.ready.append(jobs[0])
        elif how == "push_many":
            assert self.queue.push_many(jobs[:-1], jobs[-1:])  # the last one placed by the caller
            self.ready += jobs[:-1]
            self.held.append(jobs[-1])
        elif how == "accept":
            self.queue.accept(jobs)
            self.held += jobs
        elif how == "accept_ready":
            self.queue.accept_ready(jobs[0])
            self.ready.append(jobs[0])
        elif how == "accept_delayed":
            assert self.queue.accept_delayed(jobs[0], self.heap, 1e9) is None
            self.delayed.append(jobs[0])
        else:
            assert self.queue.push_many_delayed(jobs[:1], jobs[1:], self.heap, [1e9] * (n - 1)) == []
            self.ready.append(jobs[0])
            self.delayed += jobs[1:]

    @precondition(lambda self: self.ready)
    @rule()
    def take(self):
        job, state = self.queue.pop_with_type(timeout=0)
        self.queue.release_state(state)
        self.ready.remove(job)
        self.held.append(job)

    @precondition(lambda self: self.held)
    @rule(data=st.data(), delayed=st.booleans())
    def retry(self, data, delayed):
        """A retry (or a recovery) keeps the job's place in the joins: it is the same job."""
        job = self.held.pop(data.draw(st.integers(0, len(self.held) - 1)))
        if delayed:
            assert self.queue.place_delayed(job, self.heap, 1e9) is None
            self.delayed.append(job)
        else:
            assert self.queue.requeue(job)
            self.ready.append(job)

    @precondition(lambda self: self.delayed)
    @rule()
    def due(self):
        """The delayed jobs come due (their run_at set back to now: a move, not an accept)."""
        assert self.queue.move_due(self.heap, 2e9) == []
        self.ready += self.delayed
        self.delayed = []

    @precondition(lambda self: self.held)
    @rule(data=st.data(), succeeded=st.booleans())
    def finish(self, data, succeeded):
        job = self.held.pop(data.draw(st.integers(0, len(self.held) - 1)))
        if succeeded:  # (the workers' and the event loop's way)
            assert self.queue.attempt_succeeded(self.state, 0.0, job, finish=True)
        else:
            self.queue.task_done(job)

    @precondition(lambda self: self.ready)
    @rule(data=st.data())
    def cancel_ready(self, data):
        job = self.ready[data.draw(st.integers(0, len(self.ready) - 1))]
        assert self.queue.remove(job.id) is job
        self.ready.remove(job)
        self.queue.task_done(job)

    @precondition(lambda self: self.delayed)
    @rule(data=st.data())
    def evict_or_cancel_delayed(self, data):
        job = self.delayed.pop(data.draw(st.integers(0, len(self.delayed) - 1)))
        assert self.heap.remove(job.id) is job
        self.queue.task_done(job)

    @rule()
    def join_begin(self):
        ticket = self.queue.join_begin()
        snapshot = self._unfinished_ids()
        assert (ticket is None) == (not snapshot)
        self.joins.append((ticket, snapshot))

    @precondition(lambda self: self.joins)
    @rule(data=st.data())
    def join_end(self, data):
        ticket, _ = self.joins.pop(data.draw(st.integers(0, len(self.joins) - 1)))
        self.queue.join_end(ticket)

    @invariant()
    def joins_match_the_model(self):
        unfinished = self._unfinished_ids()
        assert self.queue.unfinished == len(unfinished)
        for ticket, snapshot in self.joins:
            assert self.queue.join_wait(ticket, 0) == snapshot.isdisjoint(unfinished)

    def teardown(self):
        self.queue.close()


def test_join_waits_exactly_for_the_jobs_unfinished_when_it_began(core):
    run_model_test(JoinMachine, core, max_examples=150, steps=50)


# --- the Queue ---------------------------------------------------------------------------------


def _chained_producers(q, count, stop):
    """``count`` threads enqueueing without a pause, each job held unfinished until its producer's
    next job is accepted: from the first job on, some job is always unfinished."""
    accepted = [[] for _ in range(count)]

    def produce(mine):
        previous = None
        while not stop.is_set():
            released = threading.Event()
            job = q.enqueue(Job("chain", released), block=True, timeout=WAIT)
            mine.append(job)
            if previous is not None:
                previous.set()
            previous = released
        if previous is not None:
            previous.set()

    threads = [threading.Thread(target=produce, args=(mine,)) for mine in accepted]
    for thread in threads:
        thread.start()
    return accepted, threads


@pytest.mark.parametrize("how", ["join", "ajoin"])
def test_join_returns_while_producers_enqueue_without_a_pause(how):
    finished = set()

    def run(job):
        assert job.payload.wait(WAIT), "a producer never enqueued the next job"
        finished.add(id(job))

    stop = threading.Event()
    with Queue(config=Config(buffer_size=100_000)) as q:
        q.register_executor("chain", run, ExecutorConfig(max_concurrent_jobs=4))
        q.start_dispatcher(4)
        accepted, producers = _chained_producers(q, 2, stop)
        try:
            for _ in range(3):
                while sum(map(len, accepted)) < 50:
                    time.sleep(0.001)
                before = [job for mine in accepted for job in list(mine)]  # accepted before the call
                began = time.monotonic()
                if how == "join":
                    returned = q.join(WAIT)
                else:
                    returned = asyncio.run(q.ajoin(WAIT))
                took = time.monotonic() - began
                assert returned is True, f"{how}() timed out while producers enqueued"
                assert all(id(job) in finished for job in before), "it returned before a job it waited for"
                assert took < WAIT / 2
                # Some job is unfinished at every moment, so a join() that waited for the queue to be
                # idle never returned. (Not ``join(0) is False``: the jobs it began with may all finish
                # before it looks, as the producers go on.) get_stats() reads its counters at one moment.
                stats = q.get_stats()
                assert stats.jobs_enqueued > stats.jobs_succeeded + stats.jobs_failed
        finally:
            stop.set()
            for thread in producers:
                thread.join(WAIT)
        assert q.join(WAIT)


def test_ajoin_decides_what_it_waits_for_when_called_not_at_each_slice():
    """ajoin() waits in slices of a thread: a job enqueued after it was called, and unfinished for
    longer than a slice, is not waited for (and some job is unfinished at every moment)."""
    first_may_end = threading.Event()
    release = threading.Event()
    with Queue(100) as q:
        q.register_executor("first", lambda job: first_may_end.wait(WAIT))
        q.register_executor("slow", lambda job: release.wait(WAIT))
        q.start_dispatcher(2)

        async def scenario():
            q.enqueue(Job("first"))
            joining = asyncio.ensure_future(q.ajoin(WAIT))
            await asyncio.sleep(0)  # ajoin() began: what it waits for is decided
            q.enqueue(Job("slow"))
            first_may_end.set()
            return await joining

        try:
            assert asyncio.run(scenario()) is True
            assert q.join(0) is False  # the slow job is still unfinished
        finally:
            first_may_end.set()
            release.set()
        assert q.join(WAIT)


def _join_in_a_thread(q):
    """Start ``q.join(WAIT)`` in a thread and return once what it waits for is decided: the thread,
    and the list its result goes to."""
    began = signal_after(q, "_join_begin")
    outcome = []
    joining = threading.Thread(target=lambda: outcome.append(q.join(WAIT)))
    joining.start()
    assert began.wait(WAIT)
    return joining, outcome


def test_fan_out_children_enqueued_after_the_call_are_not_waited_for_and_join_again_waits_for_them():
    """docs/api.md: a job's children enqueued after join() was called are not waited for; they
    were enqueued before their parent finished, so a second join() waits for them."""
    parent_running = threading.Event()
    go_on = threading.Event()
    children_may_end = threading.Event()
    children = Recorder()
    with Queue(100) as q:
        def parent(job):
            parent_running.set()
            assert go_on.wait(WAIT)
            for i in range(3):
                q.enqueue(Job("child", i))

        def child(job):
            assert children_may_end.wait(WAIT)
            children.add(job.payload)

        q.register_executor("parent", parent)
        q.register_executor("child", child, ExecutorConfig(max_concurrent_jobs=3))
        q.start_dispatcher(4)
        q.enqueue(Job("parent"))
        assert parent_running.wait(WAIT)
        try:
            joining, outcome = _join_in_a_thread(q)
            go_on.set()
            joining.join(WAIT)
            assert outcome == [True]  # the parent finished; its children are unfinished
            assert len(children) == 0
        finally:
            go_on.set()
            children_may_end.set()
        assert q.join(WAIT)  # the idiom: join again
        assert sorted(children.items) == [0, 1, 2]


def test_the_documented_loop_waits_for_a_fan_out_of_any_depth():
    """docs/api.md's idiom: join() again until nothing was enqueued while it waited."""
    ran = Recorder()
    with Queue(1000) as q:
        def node(job):
            depth = job.payload
            ran.add(depth)
            if depth < 4:
                for _ in range(2):
                    q.enqueue(Job("node", depth + 1))

        q.register_executor("node", node)
        q.start_dispatcher(3)
        q.enqueue(Job("node", 0))
        while True:
            enqueued = q.get_stats().jobs_enqueued
            assert q.join(WAIT)
            if q.get_stats().jobs_enqueued == enqueued:
                break  # nothing was enqueued while it waited: the whole tree has finished
        assert len(ran) == 31


def test_join_waits_for_retries_and_delayed_jobs_enqueued_before_while_new_jobs_keep_coming():
    """A retry keeps its job's place: join() waits for the last attempt of a job enqueued before it,
    and for a delayed one, not for the jobs enqueued meanwhile (one of them held to the end)."""
    attempts = []
    delayed_ran = Recorder()
    held = threading.Event()
    stop = threading.Event()
    with Queue(10_000) as q:
        def flaky(job):
            attempts.append(job.payload)
            if len(attempts) < 3:
                raise ConnectionError("not yet")

        q.register_executor("flaky", flaky)
        q.register_executor("delayed", lambda job: delayed_ran.add(job.payload))
        q.register_executor("later", lambda job: held.wait(WAIT), ExecutorConfig(max_concurrent_jobs=1))
        q.start_dispatcher(3)
        q.enqueue(Job("flaky", "flaky", retry_config=RetryConfig(max_retries=5, initial_delay=0.25, jitter=0.0)))
        q.enqueue_delayed(Job("delayed", "delayed"), 0.8)

        def keep_enqueueing():
            while not stop.is_set():
                q.enqueue(Job("later"), block=True, timeout=WAIT)
                time.sleep(0.001)

        producer = threading.Thread(target=keep_enqueueing)
        try:
            joining, outcome = _join_in_a_thread(q)
            producer.start()  # its first job is held until the end
            joining.join(WAIT * 2)
            assert outcome == [True]
            assert attempts == ["flaky"] * 3  # its third attempt succeeded before join() returned
            assert delayed_ran.items == ["delayed"]
            assert q.join(0) is False  # the jobs enqueued since are unfinished
        finally:
            held.set()
            stop.set()
            producer.join(WAIT)
        assert q.join(WAIT)


def test_async_executors_jobs_count_as_thread_executors_jobs_do():
    """Jobs run by async executors are waited for, and a job enqueued after the call is not."""
    held = threading.Event()
    may_end = threading.Event()
    ran = Recorder()
    with Queue(100) as q:
        async def run(job):
            assert await asyncio.get_running_loop().run_in_executor(None, may_end.wait, WAIT)
            ran.add(job.payload)

        q.register_executor("async", run)
        q.register_executor("held", lambda job: held.wait(WAIT))
        q.start_dispatcher(2)
        for i in range(20):
            q.enqueue(Job("async", i))
        try:
            joining, outcome = _join_in_a_thread(q)
            q.enqueue(Job("held"))
            may_end.set()  # (so some job is unfinished at every moment)
            joining.join(WAIT)
            assert outcome == [True]
            assert sorted(ran.items) == list(range(20))
            assert q.join(0) is False
        finally:
            may_end.set()
            held.set()
        assert q.join(WAIT)


def test_evicted_and_cancelled_jobs_count_as_finished_and_later_ones_are_not_waited_for(caplog):
    """Nothing runs (no start_dispatcher(): join() says so in a WARNING): the jobs enqueued before
    the call end only by a cancel and an eviction, and join() returns then."""
    with Queue(config=Config(buffer_size=100, max_delayed_jobs=1)) as q:
        cancelled = q.enqueue(Job("t", "cancelled"))
        evicted = q.enqueue_delayed(Job("t", "evicted"), 3600)
        with caplog.at_level("WARNING", logger="tinymq"):
            joining, outcome = _join_in_a_thread(q)
        assert "join() called before start_dispatcher()" in caplog.text
        q.enqueue(Job("t", "after"))  # not waited for
        assert q.cancel(cancelled.id)
        q.enqueue_delayed(Job("t", "after, delayed"), 3600)  # evicts the one enqueued before
        joining.join(WAIT)
        assert outcome == [True]
        assert q.get_stats().jobs_evicted == 1 and q.get_stats().jobs_cancelled == 1
        assert q.join(0) is False  # the two enqueued after the call are unfinished
        assert evicted.id
