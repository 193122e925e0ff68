"""Periodic jobs at scale (sched29): thousands of schedules on one timer.

Every wake of the timer was a pass over all schedules, and every registration after
the start woke it: registering n schedules cost O(n²), and an ``every`` schedule beside
thousands of cron ones missed ticks. The timer now keeps its schedules in a heap: a
model test checks the order it looks at them in against a plain list.
"""
import math
import threading
import time

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from tinymq import Priority
from tinymq._periodic import _BEGIN_RETRY, Periodic

from _helpers import WAIT, make_queue

pytest.importorskip("croniter")

MANY_CRON_SCHEDULES = 20_000
REGISTRATION_BOUND = 15.0  # seconds to register them all after the start (it took several times that)
NEIGHBOUR_INTERVAL = 0.05
NEIGHBOUR_TICKS = 40  # the every schedule's ticks watched after the registrations
NEIGHBOUR_SHARE = 0.7  # of the ticks due meanwhile, the share it must fire


def test_thousands_of_cron_schedules_registered_after_the_start_keep_the_timer_on_time():
    ticks = []
    enough = threading.Event()

    def tick(job):
        ticks.append(time.monotonic())
        if len(ticks) >= NEIGHBOUR_TICKS:
            enough.set()

    with make_queue() as q:
        q.register_executor("tick", tick)
        q.register_executor("yearly", lambda job: None)
        q.start_dispatcher()
        started = time.monotonic()
        for number in range(MANY_CRON_SCHEDULES):
            q.cron("0 0 1 1 *", "yearly", name=f"yearly {number}")
        registering = time.monotonic() - started
        assert registering < REGISTRATION_BOUND, \
            f"registering {MANY_CRON_SCHEDULES} cron schedules took {registering:.1f}s"
        q.every(NEIGHBOUR_INTERVAL, "tick", name="neighbour")
        begun = time.monotonic()
        assert enough.wait(WAIT + NEIGHBOUR_TICKS * NEIGHBOUR_INTERVAL)
        due = (ticks[NEIGHBOUR_TICKS - 1] - begun) / NEIGHBOUR_INTERVAL
        assert NEIGHBOUR_TICKS >= NEIGHBOUR_SHARE * due, \
            f"the every({NEIGHBOUR_INTERVAL}) schedule fired {NEIGHBOUR_TICKS} of {due:.0f} ticks"
        q.stop(wait=False)


def test_every_refuses_an_interval_whose_first_tick_falls_after_year_9999():
    with make_queue() as q:
        with pytest.raises(ValueError, match="1e\\+300"):
            q.every(1e300, "t")
        with pytest.raises(ValueError, match="interval"):
            q.every(300 * 365 * 86400.0 * 30, "t")
        q.every(365 * 86400.0, "t")  # a year is fine
        assert q.unschedule("t")


# --- the timer's order, against a model ------------------------------------------------------

NAMES = st.sampled_from(["a", "b", "c", "d"])
INTERVALS = st.integers(min_value=1, max_value=4).map(float)


class _Clock:
    def __init__(self, now):
        self.now = now

    def __call__(self):
        return self.now


class _Owner:
    """What Periodic holds a weak reference to (no queue: the test drives the timer by hand)."""


class _Backend:
    """Places every first tick as given unless told to fail once; every tick fires."""

    def __init__(self):
        self.fail_once = set()

    def begin(self, schedule, first, rejoin):
        if schedule.name in self.fail_once:
            self.fail_once.discard(schedule.name)
            return None
        return first

    def fire(self, schedule, tick):
        return "fired"

    def check(self, schedule):
        pass

    def unfinished(self, job_id):
        return False


class TimerOrder(RuleBasedStateMachine):
    """The model: each schedule's next look, [monotonic time, "begin" or "fire", interval, first tick],
    in a plain dict; the timer must hand out exactly the ones due by the earliest time."""

    def __init__(self):
        super().__init__()
        self.owner = _Owner()
        self.mono = _Clock(1000.0)
        self.periodic = Periodic(self.owner, monotonic=self.mono, wall=lambda: self.mono.now + 1e9)
        self.periodic.backend = self.backend = _Backend()
        self.periodic._ensure_thread = lambda: None  # (no timer thread: the test is the timer)
        self.periodic.start()
        self.model = {}  # name -> [time, "begin" or "fire", interval, first tick]

    @rule(name=NAMES, interval=INTERVALS)
    def register(self, name, interval):
        if name in self.model:
            with pytest.raises(ValueError):
                self.periodic.every(interval, "t", None, name, Priority.MEDIUM, None)
            return
        self.periodic.every(interval, "t", None, name, Priority.MEDIUM, None)
        self.model[name] = [self.mono.now, "begin", interval, self.mono.now + interval]

    @rule(name=NAMES)
    def unschedule(self, name):
        assert self.periodic.unschedule(name) == (name in self.model)
        self.model.pop(name, None)

    @rule(name=NAMES)
    def fail_next_begin(self, name):
        self.backend.fail_once.add(name)

    @precondition(lambda self: self.model)
    @rule()
    def advance_to_the_next_look(self):
        self.mono.now = max(self.mono.now, min(when for when, _, _, _ in self.model.values()))
        to_begin, due = self.periodic._wait_for_work()
        expected = {kind: sorted(name for name, (when, k, _, _) in self.model.items()
                                 if when <= self.mono.now and k == kind) for kind in ("begin", "fire")}
        assert sorted(schedule.name for schedule, _ in to_begin) == expected["begin"]
        assert sorted(schedule.name for schedule in due) == expected["fire"]
        for schedule, first in to_begin:
            failing = schedule.name in self.backend.fail_once
            self.periodic._place_first_tick(schedule, first)
            _, _, interval, first_tick = self.model[schedule.name]
            # (a first tick placed late, after a failed begin, is due at once)
            self.model[schedule.name] = ([self.mono.now + _BEGIN_RETRY, "begin", interval, first_tick] if failing
                                         else [first_tick, "fire", interval, first_tick])
        for schedule in due:
            self.periodic._fire(schedule)
            when, _, interval, _ = model = self.model[schedule.name]
            model[0] = when + max(1, math.floor((self.mono.now - when) / interval) + 1) * interval  # (missed: merged)

    @invariant()
    def each_schedule_has_one_live_entry_and_stale_ones_are_counted(self):
        heap = self.periodic._heap
        live = [schedule.name for _, entry, schedule in heap if entry == schedule.entry]
        assert sorted(live) == sorted(self.model)
        assert self.periodic._stale == sum(1 for _, entry, schedule in heap if not schedule.active)
        assert len(heap) <= 2 * len(self.model) + 1

    def teardown(self):
        self.periodic.stop()


def test_the_timer_looks_at_schedules_in_the_order_of_a_sorted_list():
    TimerOrder.TestCase.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)
    TimerOrder.TestCase().runTest()
