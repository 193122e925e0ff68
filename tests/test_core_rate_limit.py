"""Rate limits in ReadyQueue, on both cores (#14).

A rate-limited type admits a job while fewer than ``max_starts`` of its starts
happened in the last ``per`` seconds (an exact sliding window on the monotonic
clock). A type whose window is closed is passed over like a saturated one,
keeps its place, and is parked until the window opens: ``next_rate_opening()``
says when, and ``reopen_rate_limited(now)`` (the scheduler's call) readmits it.

The checks are exact, with no slack: a test driving the core from one thread
reads the clock just before and just after each pop, so the core's own record
of a start lies between the two, and ``after[i + max_starts] - before[i] >= per``
must hold for every i.
"""
import threading
import time
from collections import deque

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tinymq import RateLimit

from _helpers import examples, loop_takes
from test_core_ready import HIGH, LOW, MEDIUM, QUIET, WAIT, Item, noop, start

PER = 0.05  # a short window keeps these tests quick; every bound below is exact or generous


def limited(core, capacity=64, alarm=None, **types):
    """A ReadyQueue with an executor per keyword: ``name=RateLimit(...)`` (or None), limit unlimited."""
    q = core.ReadyQueue(capacity, alarm) if alarm is not None else core.ReadyQueue(capacity)
    for job_type, rate_limit in types.items():
        q.configure(job_type, noop, 1000, None, False, False, rate_limit=rate_limit)
    return q


def timed_pop(q, core):
    """(job, state, before, after): the core recorded the start between before and after."""
    before = core.monotonic()
    taken = q.pop_with_type(timeout=0)
    after = core.monotonic()
    if taken is None:
        return None
    return taken[0], taken[1], before, after


def sleep_until(core, when):
    """Sleep until the monotonic time ``when`` (a known deadline, not a guess)."""
    remaining = when - core.monotonic()
    if remaining > 0.0:
        time.sleep(remaining)


def drive(q, core, total, budget=WAIT):
    """Pop (and release at once) until ``total`` jobs started, as the scheduler would reopen types.

    Returns ``[(job, before, after)]`` in start order, and how many jobs had
    started at each moment it found nothing to pop. Fails when jobs wait and no
    window is due to open (a type lost), or when the budget runs out.
    """
    starts = []
    idle_at = []
    give_up = core.monotonic() + budget
    while len(starts) < total:
        assert core.monotonic() < give_up, f"only {len(starts)} of {total} jobs started in {budget}s"
        q.reopen_rate_limited(core.monotonic())
        taken = timed_pop(q, core)
        if taken is None:
            opening = q.next_rate_opening()
            assert opening is not None, "jobs wait, yet no closed rate window is due to open"
            idle_at.append(len(starts))
            sleep_until(core, opening)
            continue
        job, state, before, after = taken
        q.release_state(state)
        starts.append((job, before, after))
    return starts, idle_at


def assert_windows_hold(starts, limits):
    """No window of ``per`` seconds holds more than ``max_starts`` starts of one type (exact)."""
    by_type = {}
    for job, before, after in starts:
        by_type.setdefault(job.type, []).append((before, after))
    for job_type, times in by_type.items():
        rate_limit = limits[job_type]
        if rate_limit is None:
            continue
        m = rate_limit.max_starts
        for i in range(len(times) - m):
            gap = times[i + m][1] - times[i][0]
            assert gap >= rate_limit.per, (
                f"{job_type}: starts {i} and {i + m} are {gap:.6f}s apart, under per={rate_limit.per}")


# --- admission --------------------------------------------------------------------------------


def test_a_type_starts_max_starts_then_waits_for_its_window(core):
    q = limited(core, r=RateLimit(3, per=PER))
    jobs = [Item("r", name=i) for i in range(7)]
    for job in jobs:
        q.push(job)
    first = [timed_pop(q, core) for _ in range(3)]
    assert [t[0] for t in first] == jobs[:3]
    assert q.pop(timeout=0) is None  # closed: the fourth start would make 4 within per
    opening = q.next_rate_opening()
    assert opening is not None and opening >= first[0][2] + PER
    q.reopen_rate_limited(opening - PER / 2)  # not yet open: nothing happens
    assert q.pop(timeout=0) is None
    starts = [(t[0], t[2], t[3]) for t in first] + drive(q, core, 4)[0]
    assert [job for job, _, _ in starts] == jobs  # FIFO throughout
    assert_windows_hold(starts, {"r": RateLimit(3, per=PER)})
    assert q.next_rate_opening() is None  # nothing waits: nothing parked


def test_running_attempts_do_not_matter_only_starts_do(core):
    q = limited(core, r=RateLimit(2, per=PER))
    for i in range(3):
        q.push(Item("r", name=i))
    taken = [q.pop_with_type(timeout=0) for _ in range(2)]
    for _, state in taken:
        q.release_state(state)  # both attempts are over at once...
    assert q.pop(timeout=0) is None  # ...and still the window is closed


def test_a_closed_type_does_not_hold_up_other_types(core):
    q = limited(core, r=RateLimit(1, per=60.0), other=None)
    r_jobs = [Item("r", HIGH, name=i) for i in range(5)]
    for job in r_jobs:
        q.push(job)
    others = [Item("other", LOW, name=i) for i in range(3)]
    for job in others:
        q.push(job)
    assert q.pop(timeout=0) is r_jobs[0]
    assert [q.pop(timeout=0) for _ in range(3)] == others  # the HIGH backlog waits, LOW runs
    assert q.pop(timeout=0) is None
    assert q.sizes() == (4, 0, 0)  # the rate-limited jobs are still queued, in place


def test_a_reopened_type_keeps_its_place_among_types(core):
    q = limited(core, r=RateLimit(1, per=PER), other=None)
    a1, a2 = Item("r", name="a1"), Item("r", name="a2")
    b1, b2 = Item("other", name="b1"), Item("other", name="b2")
    for job in (a1, a2, b1, b2):  # a2 is older than b1
        q.push(job)
    assert q.pop(timeout=0) is a1
    assert q.pop(timeout=0) is b1  # a2 waits for r's window
    sleep_until(core, q.next_rate_opening())
    q.reopen_rate_limited(core.monotonic())
    assert q.pop(timeout=0) is a2  # back in front of the younger b2
    assert q.pop(timeout=0) is b2


def test_a_type_both_saturated_and_rate_limited_waits_for_both(core):
    q = core.ReadyQueue(16)
    q.configure("r", noop, 1, None, False, False, rate_limit=RateLimit(2, per=PER))
    for i in range(4):
        q.push(Item("r", name=i))
    job, state = q.pop_with_type(timeout=0)
    assert q.pop(timeout=0) is None  # saturated (1 running)
    q.release_state(state)
    job, state = q.pop_with_type(timeout=0)  # the second start in the window
    q.release_state(state)  # a free slot, but the window is closed now
    assert q.pop(timeout=0) is None
    opening = q.next_rate_opening()
    assert opening is not None
    sleep_until(core, opening)
    q.reopen_rate_limited(core.monotonic())
    assert q.pop(timeout=0) is not None


def test_an_idle_worker_gets_the_job_when_the_window_opens(core):
    per = 0.5  # longer than QUIET: the popper is (nearly always) idle in the core before it opens
    q = limited(core, r=RateLimit(1, per=per))
    q.push(Item("r", name=0))
    job, state = q.pop_with_type(timeout=0)
    q.release_state(state)
    waiting = Item("r", name=1)
    q.push(waiting)
    opening = q.next_rate_opening()

    def pop_and_time():
        return q.pop(WAIT), core.monotonic()

    popper, box = start(pop_and_time)
    popper.join(QUIET)
    if popper.is_alive():  # idle in the core: the scheduler's reopen must wake it
        sleep_until(core, opening)
        q.reopen_rate_limited(core.monotonic())
        popper.join(WAIT)
    # (else the thread came to pop only after the opening, on a loaded machine: it took the job itself)
    taken, taken_at = box["result"]
    assert taken is waiting
    assert taken_at >= opening, "a worker took a job from a closed window"


def test_the_idle_event_loop_is_woken_when_the_window_of_its_type_opens(core):
    """The compiled core's reopen_rate_limited handed off only to idle worker threads: with none (all
    busy), an async type's window reopened by the scheduler did not wake the idle event loop, and
    its jobs waited for some other wake-up."""
    q = core.ReadyQueue(64)
    q.configure("r", noop, 1000, None, False, False, core.LOOP, RateLimit(1, per=PER))
    woken = []
    handed = deque()
    q.set_loop_waker(lambda: woken.append(core.monotonic()), handed)
    q.push(Item("r", name=0))
    waiting = Item("r", name=1)
    q.push(waiting)
    assert [job for job, _ in loop_takes(q, 8, handed)] != [waiting]
    assert loop_takes(q, 8, handed) == []  # the window is closed: the loop waits for a wake-up
    woken.clear()
    opening = q.next_rate_opening()
    sleep_until(core, opening)
    q.reopen_rate_limited(core.monotonic())
    assert len(woken) == 1
    assert [job for job, _ in loop_takes(q, 8, handed)] == [waiting]


def test_a_popping_worker_reopens_a_due_window_itself(core):
    """Busy workers never wait for the scheduler: a pop after the opening takes the job."""
    q = limited(core, r=RateLimit(1, per=PER))
    q.push(Item("r", name=0))
    waiting = Item("r", name=1)
    q.push(waiting)
    assert q.pop(timeout=0) is not None
    assert q.pop(timeout=0) is None
    sleep_until(core, q.next_rate_opening())
    assert q.pop(timeout=0) is waiting  # no reopen_rate_limited() call
    assert q.next_rate_opening() is None


def test_parking_wakes_the_alarm_armed_for_later(core):
    alarm = core.Alarm()
    q = limited(core, alarm=alarm, r=RateLimit(1, per=PER))
    woken = threading.Event()

    def scheduler():
        alarm.sleep(WAIT * 6, core.monotonic() + WAIT * 6)  # armed far later than the window
        woken.set()

    thread = threading.Thread(target=scheduler, daemon=True)
    thread.start()
    q.push(Item("r"))
    q.push(Item("r"))
    assert q.pop(timeout=0) is not None  # closes the window: the second job parks
    assert woken.wait(WAIT), "the scheduler was not woken for the window's opening"
    thread.join(WAIT)


def test_no_alarm_for_a_type_that_is_only_saturated(core):
    alarm = core.Alarm()
    q = core.ReadyQueue(8, alarm)
    q.configure("s", noop, 1, None, False, False, rate_limit=None)
    q.push(Item("s"))
    q.push(Item("s"))
    assert q.pop(timeout=0) is not None
    assert q.pop(timeout=0) is None
    assert q.next_rate_opening() is None
    began = core.monotonic()
    alarm.sleep(QUIET, began + QUIET)  # no wake-up was latched: it sleeps its whole timeout
    assert core.monotonic() - began >= QUIET * 0.9


# --- configuration ----------------------------------------------------------------------------


class _Fields:
    def __init__(self, max_starts, per):
        self.max_starts, self.per = max_starts, per

    def __repr__(self):
        return f"_Fields({self.max_starts!r}, {self.per!r})"


@pytest.mark.parametrize("max_starts, per", [(0, 1.0), (1, 0.0), (1, -1.0), (1, float("inf")),
                                             (1, float("nan"))])
def test_configure_refuses_a_rate_limit_that_allows_nothing(core, max_starts, per):
    q = core.ReadyQueue(4)
    with pytest.raises(ValueError, match="rate_limit"):
        q.configure("t", noop, 1, None, False, False, rate_limit=_Fields(max_starts, per))
    assert q.executor_stats() == {}


def test_raising_the_limit_applies_to_later_starts(core):
    q = limited(core, r=RateLimit(1, per=60.0))
    jobs = [Item("r", name=i) for i in range(7)]
    for job in jobs:
        q.push(job)
    assert q.pop(timeout=0) is jobs[0]
    assert q.pop(timeout=0) is None
    q.configure("r", noop, 1000, None, False, False, rate_limit=RateLimit(5, per=60.0))
    assert [q.pop(timeout=0) for _ in range(4)] == jobs[1:5]  # the remembered start counts
    assert q.pop(timeout=0) is None
    q.configure("r", noop, 1000, None, False, False, rate_limit=None)  # no limit any more
    assert [q.pop(timeout=0) for _ in range(2)] == jobs[5:]


def test_lowering_the_limit_keeps_the_latest_starts(core):
    q = limited(core, r=RateLimit(5, per=60.0))
    for i in range(6):
        q.push(Item("r", name=i))
    for _ in range(3):
        assert q.pop(timeout=0) is not None
    q.configure("r", noop, 1000, None, False, False, rate_limit=RateLimit(2, per=60.0))
    assert q.pop(timeout=0) is None  # 3 starts in the window already: over the new 2


def test_a_shorter_window_reopens_a_parked_type_sooner(core):
    q = limited(core, r=RateLimit(1, per=60.0))
    q.push(Item("r", name=0))
    waiting = Item("r", name=1)
    q.push(waiting)
    assert q.pop(timeout=0) is not None
    assert q.pop(timeout=0) is None  # parked for a minute
    q.configure("r", noop, 1000, None, False, False, rate_limit=RateLimit(1, per=PER))
    opening = q.next_rate_opening()
    assert opening is not None and opening < core.monotonic() + PER * 2  # parked again, earlier
    starts, _ = drive(q, core, 1)
    assert starts[0][0] is waiting


# --- the rule, over many limits ---------------------------------------------------------------

type_specs = st.lists(
    st.tuples(st.integers(1, 4), st.sampled_from([0.005, 0.01, 0.02]),  # max_starts, per
              st.lists(st.sampled_from([LOW, MEDIUM, HIGH]), max_size=10)),  # its jobs
    min_size=1, max_size=4)


@settings(max_examples=examples(15), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(specs=type_specs, unlimited_jobs=st.integers(0, 10))
def test_no_window_ever_sees_more_than_max_starts(core, specs, unlimited_jobs):
    limits = {f"t{i}": RateLimit(m, per=per) for i, (m, per, _) in enumerate(specs)}
    limits["free"] = None
    q = limited(core, capacity=100, **limits)
    jobs = [Item(f"t{i}", priority) for i, (_, _, priorities) in enumerate(specs)
            for priority in priorities]
    jobs += [Item("free", LOW) for _ in range(unlimited_jobs)]
    for job in jobs:
        assert q.push(job)
    begun = core.monotonic()
    starts, idle_at = drive(q, core, len(jobs))
    assert sorted(id(job) for job, _, _ in starts) == sorted(id(job) for job in jobs)
    assert_windows_hold(starts, limits)
    # Liveness: every type finishes within its own windows (plus generous slack).
    longest = max(((len(p) - 1) // m) * per for m, per, p in specs if p) if any(p for *_, p in specs) else 0
    assert core.monotonic() - begun < longest + 2.0
    # The free type never waited for a rate-limited one: all its jobs ran before the first idle pop.
    free_starts = [i for i, (job, _, _) in enumerate(starts) if job.type == "free"]
    if free_starts and idle_at:
        assert free_starts[-1] < idle_at[0], "a job of an unlimited type waited for a rate window"


def test_retried_and_requeued_jobs_count_as_starts(core):
    """Every start counts, whatever brought the job back (a retry is a requeue)."""
    q = limited(core, r=RateLimit(2, per=PER))
    job = Item("r")
    q.push(job)
    starts = []
    for _ in range(5):
        taken = timed_pop(q, core)
        while taken is None:
            sleep_until(core, q.next_rate_opening())
            q.reopen_rate_limited(core.monotonic())
            taken = timed_pop(q, core)
        got, state, before, after = taken
        assert got is job
        q.release_state(state)
        starts.append((got, before, after))
        q.requeue(job)  # failed: back it comes
    assert_windows_hold(starts, {"r": RateLimit(2, per=PER)})


def assert_windows_hold_concurrently(starts, limits):
    """The exact rule when starts come from many threads, each bracketing its own pops.

    For any m + 1 starts of a type, their core times lie within [min before, max after]
    and span at least ``per``. Going through the starts by ``after``, the m + 1 largest
    ``before`` so far form the tightest such set ending there.
    """
    import heapq

    by_type = {}
    for job, before, after in starts:
        by_type.setdefault(job.type, []).append((after, before))
    for job_type, brackets in by_type.items():
        rate_limit = limits[job_type]
        if rate_limit is None:
            continue
        latest_befores = []  # a min-heap of the m + 1 largest befores so far
        for after, before in sorted(brackets):
            heapq.heappush(latest_befores, before)
            if len(latest_befores) > rate_limit.max_starts + 1:
                heapq.heappop(latest_befores)
            if len(latest_befores) == rate_limit.max_starts + 1:
                span = after - latest_befores[0]
                assert span >= rate_limit.per, (
                    f"{job_type}: {rate_limit.max_starts + 1} starts within {span:.6f}s, "
                    f"limit {rate_limit.max_starts} per {rate_limit.per}s")


def test_stress_poppers_and_a_scheduler_keep_every_window(core):
    """Four popping threads and a scheduler thread, as the dispatcher runs them."""
    limits = {"a": RateLimit(1, per=0.02), "b": RateLimit(3, per=0.03), "c": RateLimit(2, per=0.01),
              "free": None}
    alarm = core.Alarm()
    q = limited(core, capacity=500, alarm=alarm, **limits)
    jobs = [Item(job_type, (i % 3)) for i in range(30) for job_type in limits]
    starts, lock = [], threading.Lock()
    done = threading.Event()

    def popper():
        while not done.is_set():
            before = core.monotonic()
            taken = q.pop_with_type(timeout=0.05)
            after = core.monotonic()
            if taken is None:
                continue
            q.release_state(taken[1])
            with lock:
                starts.append((taken[0], before, after))
                if len(starts) == len(jobs):
                    done.set()

    def scheduler():
        while not done.is_set():
            q.reopen_rate_limited(core.monotonic())
            opening = q.next_rate_opening()
            wake_at = core.monotonic() + 0.1 if opening is None else opening
            alarm.sleep(wake_at - core.monotonic(), wake_at)

    threads = [threading.Thread(target=popper, daemon=True) for _ in range(4)]
    threads.append(threading.Thread(target=scheduler, daemon=True))
    for thread in threads:
        thread.start()
    for job in jobs:
        assert q.push(job)
    assert done.wait(WAIT), f"only {len(starts)} of {len(jobs)} jobs started"
    alarm.wake()
    for thread in threads:
        thread.join(WAIT)
    assert sorted(id(job) for job, _, _ in starts) == sorted(id(job) for job in jobs)
    assert_windows_hold_concurrently(starts, limits)
