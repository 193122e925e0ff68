"""Process-level crash tests of the Redis broker (API.md "Scale-out", issue #12).

Real worker processes (``_redis_crash_worker.py``), a real ``redis-server``,
real signals: SIGKILL and SIGSTOP/SIGCONT of workers, SIGKILL of the server.
Each worker appends ``S``/``E``/``F`` lines (start, end, on_failure) to a log
of its own, stamped with ``time.monotonic()``, which is one clock for every
process on the host; the tests compare those lines with the kill times, with
what Redis held at each kill, and with the shared counters.

What "in flight at a kill" means: the attempts in the killed process's
``inflight`` hash, read from Redis right after the kill (nothing changes them
until the lease runs out and another process reaps them).
"""
import os
import random
import select
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from typing import Dict, List, NamedTuple, Optional

import pytest

from tinymq import Job, Priority, Queue, TinyMQError
from tinymq.redis import RedisBroker

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "_redis_crash_worker.py")
LIMIT_D = 2  # _redis_crash_worker.LIMIT_D
# Seconds a worker process may take to start on a busy machine (a bound on liveness only): the
# CPU its start takes (interpreter, imports, first connection) stretches with the load.
START_WAIT = 180.0
DRAIN_WAIT = 60.0  # seconds join() may take after the last kill
# Each test may wait START_WAIT for a worker more than once, and the suite's default bound
# (pyproject's pytest timeout, 120 s) is shorter than one such wait: each test gets room for
# two, and the drain. Reached only when the host is starved; a hang still ends the test.
pytestmark = pytest.mark.timeout(2 * START_WAIT + DRAIN_WAIT)
PRIORITIES = (Priority.LOW, Priority.MEDIUM, Priority.HIGH)
SCAN_COUNT = 1000  # keys per SCAN step: the keyspace holds a hash per unfinished job


class Line(NamedTuple):
    kind: str  # S, E or F
    id: str
    pid: int
    t: float
    reason: str  # F lines only


class Worker:
    def __init__(self, process: subprocess.Popen, log: str) -> None:
        self.process = process
        self.pid = process.pid
        self.log = log
        self.killed_at: Optional[float] = None
        self.ready = False  # it said "ready": its dispatcher runs


class Fleet:
    """Worker processes on one broker name; whatever is left running is killed by close()."""

    def __init__(self, url: str, name: str, directory: str, *, lease: float, max_crashes: int,
                 threads: int = 4) -> None:
        self.url, self.name, self.directory = url, name, directory
        self.lease, self.max_crashes, self.threads = lease, max_crashes, threads
        self.workers: List[Worker] = []

    def start(self, wait: bool = True) -> Worker:
        n = len(self.workers)
        log = os.path.join(self.directory, f"worker-{n}.log")
        with open(os.path.join(self.directory, f"worker-{n}.err"), "w") as err:
            process = subprocess.Popen(
                [sys.executable, WORKER, self.url, self.name, str(self.lease), str(self.max_crashes),
                 log, str(self.threads)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True)
        worker = Worker(process, log)
        self.workers.append(worker)
        if wait:
            self.wait_ready(worker)
        return worker

    @staticmethod
    def wait_ready(worker: Worker, timeout: float = START_WAIT) -> bool:
        """Whether ``worker`` said "ready" within ``timeout`` (it must not die before)."""
        if not worker.ready:
            readable, _, _ = select.select([worker.process.stdout], [], [], timeout)
            if not readable:
                assert timeout < START_WAIT, f"worker {worker.pid} did not start within {START_WAIT}s"
                return False
            assert worker.process.stdout.readline().strip() == "ready", f"worker {worker.pid} died at start"
            worker.ready = True
        return True

    def alive(self) -> List[Worker]:
        return [w for w in self.workers if w.process.poll() is None]

    def kill(self, worker: Worker) -> float:
        """SIGKILL ``worker``; returns the moment it was certainly dead."""
        worker.process.send_signal(signal.SIGKILL)
        worker.process.wait()
        worker.killed_at = time.monotonic()
        return worker.killed_at

    def stop(self) -> None:
        """Stop the live workers gracefully (stdin closed): each gives back what it holds."""
        for worker in self.alive():
            worker.process.stdin.close()
        for worker in self.workers:
            assert worker.process.wait(START_WAIT) in (0, -signal.SIGKILL, 3), \
                f"worker {worker.pid} failed; see {self.directory}"

    def close(self) -> None:
        for worker in self.workers:
            if worker.process.poll() is None:
                worker.process.send_signal(signal.SIGKILL)
                worker.process.wait()
            for stream in (worker.process.stdin, worker.process.stdout):
                if stream is not None and not stream.closed:
                    stream.close()

    def lines(self) -> List[Line]:
        out = []
        for worker in self.workers:
            if not os.path.exists(worker.log):
                continue
            with open(worker.log) as log:
                for text in log:
                    kind, job_id, pid, t, *rest = text.split()
                    out.append(Line(kind, job_id, int(pid), float(t), rest[0] if rest else ""))
        return sorted(out, key=lambda line: line.t)

    def taken_for_dead(self) -> Dict[int, List[float]]:
        """pid -> when (``time.monotonic()``) that worker learned it had been taken for dead: silent
        past its lease, its attempts given to others (its WARNING, see _redis_crash_worker)."""
        found: Dict[int, List[float]] = defaultdict(list)
        for text in self.stderr().splitlines():
            if "was silent past its" in text:
                pid, t, *_ = text.split()
                found[int(pid)].append(float(t))
        return found

    def stderr(self) -> str:
        texts = []
        for n in range(len(self.workers)):
            with open(os.path.join(self.directory, f"worker-{n}.err")) as err:
                texts.append(err.read())
        return "\n".join(texts)


def procs_of(client, prefix: str, pid: int) -> List[str]:
    """The registrations (process ids in ``procs``) that worker ``pid`` holds now."""
    return [p for p in client.zrange(prefix + "procs", 0, -1) if p.split(":")[1] == str(pid)]


def in_flight(client, prefix: str, pid: int) -> Dict[str, str]:
    """Job id -> attempt state of every attempt worker ``pid``'s registrations hold in Redis."""
    held = {}
    for proc in procs_of(client, prefix, pid):
        for attempt, value in client.hgetall(f"{prefix}inflight:{proc}").items():
            held[attempt.split(":", 1)[1]] = value[0]
    return held


def leftovers(client, prefix: str) -> Dict[str, object]:
    """What Redis still holds for unfinished work: all of it must be empty after a drain."""
    held = {key: client.hgetall(key) for key in client.scan_iter(match=f"{prefix}inflight:*", count=SCAN_COUNT)}
    return {
        "inflight": {k: v for k, v in held.items() if v},
        "running": {t: n for t, n in client.hgetall(prefix + "running").items() if int(n)},
        "ready": sum(client.llen(f"{prefix}ready:{p}") for p in (0, 1, 2)),
        "delayed": client.zcard(prefix + "delayed"),
        "parked": sorted(client.scan_iter(match=f"{prefix}parked:*", count=SCAN_COUNT)),
        "outstanding": int(client.hget(prefix + "stats", "outstanding") or 0),
    }


def drained(queue, fleet, client, prefix: str):
    """Wait until ``queue``'s shared queue is drained, then stop the fleet: ``(stats, leftovers)``."""
    assert queue.join(DRAIN_WAIT), f"not drained: {leftovers(client, prefix)}"
    fleet.stop()
    return queue.get_stats(), leftovers(client, prefix)


NOTHING_LEFT = {"inflight": {}, "running": {}, "ready": 0, "delayed": 0, "parked": [], "outstanding": 0}


def intervals(lines: List[Line], ids, killed_at: Dict[int, float]):
    """(start, end) of every attempt of ``ids``: S to the E of the same id in the same process,
    or to the kill of that process when it never ended."""
    open_at: Dict[tuple, List[float]] = defaultdict(list)
    spans = []
    for line in lines:
        if line.id not in ids:
            continue
        if line.kind == "S":
            open_at[line.id, line.pid].append(line.t)
        elif line.kind == "E":
            spans.append((open_at[line.id, line.pid].pop(0), line.t))
    for (job_id, pid), starts in open_at.items():
        for start in starts:
            assert pid in killed_at, f"attempt of {job_id} in live process {pid} never ended"
            spans.append((start, killed_at[pid]))
    return spans


def max_overlap(spans) -> int:
    """The largest number of spans open at once (an end at the same instant as a start comes first)."""
    events = sorted([(end, -1) for _, end in spans] + [(start, 1) for start, _ in spans])
    now = peak = 0
    for _, step in events:
        now += step
        peak = max(peak, now)
    return peak


def make_jobs(rng: random.Random, first: int, count: int, types: Dict[str, str]) -> List[Job]:
    """``count`` jobs across 3 priorities and 4 types ("d" is the limited one, and slower)."""
    jobs = []
    for i in range(first, first + count):
        job_type = rng.choices("abcd", weights=(3, 3, 3, 1))[0]
        work_ms = rng.uniform(10.0, 20.0) if job_type == "d" else rng.uniform(0.0, 4.0)
        jobs.append(Job(job_type, round(work_ms, 3), id=f"j{i}", priority=rng.choice(PRIORITIES)))
        types[f"j{i}"] = job_type
    return jobs


@pytest.fixture
def fleet_factory(tmp_path):
    fleets = []

    def make(url, name, **options):
        directory = tmp_path / f"fleet-{len(fleets)}"
        directory.mkdir()
        fleet = Fleet(url, name, str(directory), **options)
        fleets.append(fleet)
        return fleet

    yield make
    for fleet in fleets:
        fleet.close()


def producer_queue(url: str, name: str, lease: float, max_crashes: int) -> Queue:
    from tinymq import Config

    return Queue(config=Config(buffer_size=100_000),
                 broker=RedisBroker(url, name=name, lease=lease, max_crash_recoveries=max_crashes))


# --- (a) SIGKILL of random workers at random moments ------------------------------------------

KILLS = 20
LEASE_A = 2.0
FIRST_BATCH = 3000
TOP_UP = 500  # jobs added before a kill when the queue runs low, so that every kill lands mid-work
LOW_WATER = 500


def test_sigkill_random_workers_loses_nothing_and_never_exceeds_a_limit(redis_url, fleet_factory):
    name = "crash-a"
    rng = random.Random(os.environ.get("TINYMQ_CRASH_SEED", "12"))
    fleet = fleet_factory(redis_url, name, lease=LEASE_A, max_crashes=KILLS + 1)
    producer = producer_queue(redis_url, name, LEASE_A, KILLS + 1)
    client = producer.broker._client
    prefix = producer.broker._scripts.prefix
    types: Dict[str, str] = {}
    kills = []  # (pid, time of death, {job id: state} it held, outstanding jobs then)
    try:
        producer.enqueue_many(make_jobs(rng, 0, FIRST_BATCH, types))
        for _ in range(3):
            fleet.start()
        while len(kills) < KILLS:
            if int(client.hget(prefix + "stats", "outstanding")) < LOW_WATER:
                producer.enqueue_many(make_jobs(rng, len(types), TOP_UP, types))
            time.sleep(rng.uniform(0.05, 0.35))
            running = [w for w in fleet.alive() if fleet.wait_ready(w, 0.0)]
            if not running:  # every one is still starting (replacements start while the others work)
                continue
            victim = rng.choice(running)
            died = fleet.kill(victim)
            held = in_flight(client, prefix, victim.pid)
            outstanding = int(client.hget(prefix + "stats", "outstanding"))
            kills.append((victim.pid, died, held, outstanding))
            fleet.start(wait=False)
        stats, left = drained(producer, fleet, client, prefix)
    finally:
        producer.stop()
        producer.broker.close()
        fleet.close()

    lines = fleet.lines()
    killed_at = {pid: died for pid, died, _, _ in kills}
    starts = Counter(line.id for line in lines if line.kind == "S")
    ended = {line.id for line in lines if line.kind == "E"}
    accepted = set(types)
    assert all(outstanding > 0 for _, _, _, outstanding in kills), "a kill landed after the work was done"
    # 0 accepted jobs without an E, and nothing ran that was not accepted
    assert sorted(accepted - ended) == []
    assert set(starts) == accepted
    # every job that ran more than once was in flight at a kill, once per extra start at most
    held_at_kills = Counter(job_id for _, _, held, _ in kills for job_id, state in held.items() if state in "LR")
    over = {job_id: (n, held_at_kills[job_id]) for job_id, n in starts.items() if n - 1 > held_at_kills[job_id]}
    assert over == {}, f"(starts, times in flight at a kill) of jobs started too often: {over}"
    duplicates = sum(starts.values()) - len(starts)
    in_flight_total = sum(held_at_kills.values())
    assert duplicates <= in_flight_total
    # the attempts a kill interrupted ran again in another process, after the kill
    for pid, died, held, _ in kills:
        for job_id in held:
            assert any(l.kind == "E" and l.id == job_id and l.pid != pid and l.t > died for l in lines), \
                f"job {job_id}, in flight in {pid} when it was killed, never ended elsewhere after"
    # the limited type: computed from intervals, it reaches its limit and never exceeds it
    limited = {job_id for job_id, job_type in types.items() if job_type == "d"}
    assert max_overlap(intervals(lines, limited, killed_at)) == LIMIT_D
    # crash counters: every success counted once, no job failed, nothing left held
    assert (stats.jobs_enqueued, stats.jobs_succeeded) == (len(accepted), len(accepted))
    assert (stats.jobs_failed, stats.jobs_retried, stats.jobs_timed_out) == (0, 0, 0)
    assert not [line for line in lines if line.kind == "F"]
    assert left == NOTHING_LEFT
    assert "silent past its" not in fleet.stderr(), "a live worker was taken for dead (a stall past the lease)"
    first, last = recovery_delays(lines, kills)
    print(f"\n(a) {len(accepted)} jobs, {KILLS} kills, lease {LEASE_A}s: {duplicates} duplicate starts, "
          f"{in_flight_total} attempts in flight at the kills; after a kill, the first of its started jobs "
          f"started again after median {median(first):.3f}s, max {max(first):.3f}s; the last after median "
          f"{median(last):.3f}s, max {max(last):.3f}s (busy workers, priorities and the limit delay them)")


def median(values: List[float]) -> float:
    return sorted(values)[len(values) // 2]


def recovery_delays(lines: List[Line], kills):
    """Per kill that interrupted started attempts: seconds until the first and the last of them
    started again elsewhere."""
    first, last = [], []
    for pid, died, held, _ in kills:
        started_here = {l.id for l in lines if l.kind == "S" and l.pid == pid and l.id in held}
        if started_here:
            again = [min(l.t for l in lines if l.kind == "S" and l.id == job_id and l.t > died)
                     for job_id in started_here]
            first.append(min(again) - died)
            last.append(max(again) - died)
    return first, last


# --- (b) a worker stopped (SIGSTOP) past its lease, then resumed -------------------------------

LEASE_B = 1.0
ZOMBIE_JOBS = 400
ZOMBIE_WORK_MS = 40.0


def test_a_worker_stopped_past_its_lease_is_fenced_and_registers_again(redis_url, fleet_factory):
    name = "crash-b"
    fleet = fleet_factory(redis_url, name, lease=LEASE_B, max_crashes=3)
    producer = producer_queue(redis_url, name, LEASE_B, 3)
    client = producer.broker._client
    prefix = producer.broker._scripts.prefix
    ids = [f"z{i}" for i in range(ZOMBIE_JOBS)]
    try:
        zombie, other = fleet.start(), fleet.start()
        producer.enqueue_many([Job("a", ZOMBIE_WORK_MS, id=job_id) for job_id in ids])
        deadline = time.monotonic() + START_WAIT
        while len(running_in(fleet.lines(), zombie.pid)) < fleet.threads:
            assert time.monotonic() < deadline, "the worker never ran all its threads at once"
            time.sleep(0.005)
        zombie.process.send_signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        try:
            (registration,) = procs_of(client, prefix, zombie.pid)
            held = in_flight(client, prefix, zombie.pid)
            running_at_stop = running_in(fleet.lines(), zombie.pid)
            assert running_at_stop <= set(held)
            # the others reap it once its lease has run out, and run what it held
            assert wait_for(lambda: not procs_of(client, prefix, zombie.pid), 3 * LEASE_B)
            reaped_after = time.monotonic() - stopped_at
            assert wait_for(lambda: all(started_elsewhere(fleet.lines(), job_id, zombie.pid, stopped_at)
                                        for job_id in held), START_WAIT)
        finally:
            resumed_at = time.monotonic()  # (before: it may run on the other core at once)
            zombie.process.send_signal(signal.SIGCONT)
        # it learns it was reaped and registers again under a new id
        assert wait_for(lambda: procs_of(client, prefix, zombie.pid) not in ([], [registration]), START_WAIT)
        stats, left = drained(producer, fleet, client, prefix)
    finally:
        producer.stop()
        producer.broker.close()
        fleet.close()

    lines = fleet.lines()
    ends = Counter(line.id for line in lines if line.kind == "E")
    starts = Counter(line.id for line in lines if line.kind == "S")
    assert sorted(set(ids) - set(ends)) == []  # 0 lost
    # its running attempts finished late, after it resumed; those results were fenced off
    late = {l.id for l in lines if l.kind == "E" and l.pid == zombie.pid and l.t > resumed_at} & running_at_stop
    assert late == running_at_stop
    assert sum(ends.values()) > len(ids)
    assert (stats.jobs_enqueued, stats.jobs_succeeded) == (len(ids), len(ids))  # a success counts once
    assert (stats.jobs_failed, stats.jobs_retried) == (0, 0)
    duplicates = sum(starts.values()) - len(starts)
    assert duplicates <= len(held)
    # it carried on under its new registration
    assert any(l.kind == "S" and l.pid == zombie.pid and l.t > resumed_at and l.id not in held for l in lines)
    assert "silent past its" in fleet.stderr()
    assert left == NOTHING_LEFT
    print(f"\n(b) lease {LEASE_B}s: reaped {reaped_after:.3f}s after SIGSTOP; {len(held)} attempts held, "
          f"{len(running_at_stop)} running; {duplicates} duplicate starts")


def running_in(lines: List[Line], pid: int) -> set:
    """Ids of the attempts that process ``pid`` has started and not ended."""
    running = set()
    for line in lines:
        if line.pid == pid and line.kind == "S":
            running.add(line.id)
        elif line.pid == pid and line.kind == "E":
            running.discard(line.id)
    return running


def started_elsewhere(lines: List[Line], job_id: str, pid: int, after: float) -> bool:
    return any(l.kind == "S" and l.id == job_id and l.pid != pid and l.t > after for l in lines)


def wait_for(predicate, timeout: float, interval: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
    return True


# --- (c) SIGKILL of redis-server (appendfsync always) during enqueue and during work -----------

SERVER_KILLS_PRODUCING = 4  # while the producer enqueues (single jobs and batches) and workers run
SERVER_KILLS_WORKING = 2  # after the producer stopped, while workers run
LEASE_C = 2.0
BATCH = 10
PRODUCE_MAX = 20_000  # jobs the producer offers at most (it is stopped long before)
PRODUCE_PAUSE = 0.002  # seconds between two enqueue calls
WORK_JOBS = 3000  # enqueued for the kills during work
WORK_MS = 3.0


class Producer(threading.Thread):
    """Enqueues single jobs and batches alternately; records what was acknowledged and what raised."""

    def __init__(self, queue: Queue, rng: random.Random) -> None:
        super().__init__(name="crash-producer", daemon=True)
        self.queue = queue
        self.rng = rng
        self.acknowledged: List[str] = []
        self.raised: List[List[str]] = []  # the ids of each call that raised TinyMQError
        self.unexpected: List[BaseException] = []
        self.done = threading.Event()
        self.offered = 0

    def run(self) -> None:
        calls = 0
        while not self.done.is_set() and self.offered < PRODUCE_MAX:
            size = 1 if calls % 2 == 0 else BATCH
            ids = [f"p{self.offered + k}" for k in range(size)]
            self.offered += size
            calls += 1
            jobs = [Job(self.rng.choice("abc"), round(self.rng.uniform(0.0, 2.0), 3), id=job_id,
                        priority=self.rng.choice(PRIORITIES)) for job_id in ids]
            try:
                if size == 1:
                    self.queue.enqueue(jobs[0])
                else:
                    self.queue.enqueue_many(jobs)
            except TinyMQError:
                self.raised.append(ids)
                time.sleep(0.01)
            except BaseException as exc:  # reported by the test
                self.unexpected.append(exc)
                return
            else:
                self.acknowledged.extend(ids)
            time.sleep(PRODUCE_PAUSE)


def test_sigkill_of_redis_loses_no_acknowledged_job(own_redis_server, fleet_factory):
    server = own_redis_server
    name = "crash-c"
    rng = random.Random(os.environ.get("TINYMQ_CRASH_SEED", "12"))
    fleet = fleet_factory(server.url, name, lease=LEASE_C, max_crashes=3)
    queue = producer_queue(server.url, name, LEASE_C, 3)
    client = queue.broker._client
    prefix = queue.broker._scripts.prefix
    producer = Producer(queue, rng)
    kills = []  # (during, jobs accepted so far, outstanding jobs then)
    try:
        fleet.start()
        fleet.start()
        producer.start()
        for k in range(SERVER_KILLS_PRODUCING + SERVER_KILLS_WORKING):
            if k == SERVER_KILLS_PRODUCING:
                producer.done.set()
                producer.join(START_WAIT)
                assert not producer.is_alive()
                work = [Job("a", WORK_MS, id=f"w{i}") for i in range(WORK_JOBS)]
                queue.enqueue_many(work)  # enough that the kills below land while it runs
                producer.acknowledged.extend(job.id for job in work)
            time.sleep(rng.uniform(0.2, 0.5) if k < SERVER_KILLS_PRODUCING else rng.uniform(0.0, 0.1))
            outstanding = int(client.hget(prefix + "stats", "outstanding") or 0)
            while k >= SERVER_KILLS_PRODUCING and outstanding == 0:
                # The fleet ran all the work while this process waited for a CPU (a loaded
                # machine): more, so that this kill too lands while workers run.
                work = [Job("a", WORK_MS, id=f"w{k}-{i}") for i in range(WORK_JOBS)]
                queue.enqueue_many(work)
                producer.acknowledged.extend(job.id for job in work)
                outstanding = int(client.hget(prefix + "stats", "outstanding") or 0)
            server.kill()
            kills.append(("enqueue" if producer.is_alive() else "work", producer.offered, outstanding))
            for attempt in (lambda: queue.enqueue(Job("a", 0.0, id="never")),
                            lambda: queue.enqueue_many([Job("a", 0.0, id="never-1"), Job("a", 0.0, id="never-2")])):
                with pytest.raises(TinyMQError) as raised:
                    attempt()
                assert raised.value.__cause__ is not None
            time.sleep(rng.uniform(0.1, 0.4))
            server.start()
        assert producer.unexpected == []
        stats, left = drained(queue, fleet, client, prefix)
    finally:
        producer.done.set()
        queue.stop()
        queue.broker.close()
        fleet.close()

    lines = fleet.lines()
    ran = Counter(line.id for line in lines if line.kind == "E")
    starts = Counter(line.id for line in lines if line.kind == "S")
    acknowledged = set(producer.acknowledged)
    unknown = {job_id for ids in producer.raised for job_id in ids}
    assert [kind for kind, _, _ in kills] == ["enqueue"] * SERVER_KILLS_PRODUCING + ["work"] * SERVER_KILLS_WORKING
    assert all(n > 0 for kind, _, n in kills if kind == "work"), f"a kill landed with no work left: {kills}"
    assert len(producer.raised) >= SERVER_KILLS_PRODUCING  # each kill during enqueue failed a call
    assert sorted(acknowledged - set(ran)) == []  # every acknowledged job ran
    assert set(ran) <= acknowledged | unknown  # nothing else ran ("never*" were refused)
    for ids in producer.raised:  # a batch whose call failed is all there or not at all
        assert len({job_id in ran for job_id in ids}) == 1, f"batch split by a kill: {ids}"
    recovered_unacknowledged = len(set(ran) - acknowledged)
    # Exactly once: each job ran once and counted once, unless a worker that started it was taken for
    # dead (its lease ran out: a loaded machine, CI's four lanes on two cores, may starve a worker past
    # its lease around a restart, of which the server's downtime up to half a lease counts, see
    # mind_the_gap in lib.lua), as that worker says once it hears of it: then the job ran again
    # elsewhere (at least once), and each earlier start was in a worker that heard so after it. Any
    # other second start (a fetch's writes lost or run twice by a restart) is a defect.
    reaped = fleet.taken_for_dead()
    again = {job_id: [line for line in lines if line.kind == "S" and line.id == job_id]
             for job_id, n in starts.items() if n > 1}
    unexplained = {job_id: [(line.pid, line.t) for line in started] for job_id, started in again.items()
                   if not all(any(t > line.t for t in reaped.get(line.pid, ())) for line in started[:-1])}
    assert unexplained == {}, f"jobs started again with no worker taken for dead: {unexplained}; {dict(reaped)}"
    assert (stats.jobs_enqueued, stats.jobs_succeeded) == (len(ran), len(ran))
    assert (stats.jobs_failed, stats.jobs_retried) == (0, 0)
    assert left == NOTHING_LEFT  # nothing stays in flight
    print(f"\n(c) {len(kills)} server kills: {len(acknowledged)} acknowledged, {len(producer.raised)} calls "
          f"raised, of whose jobs {recovered_unacknowledged} were nevertheless enqueued and ran; "
          f"{sum(map(len, reaped.values()))} times a worker was taken for dead, {len(again)} jobs started again")


# --- (d) a poison job that kills its worker process --------------------------------------------

LEASE_D = 1.0
MAX_CRASHES_D = 2
INNOCENT_JOBS = 1200


def test_a_job_that_kills_its_process_dies_crashed_once_and_spares_the_others(redis_url, fleet_factory):
    name = "crash-d"
    rng = random.Random(os.environ.get("TINYMQ_CRASH_SEED", "12"))
    fleet = fleet_factory(redis_url, name, lease=LEASE_D, max_crashes=MAX_CRASHES_D)
    queue = producer_queue(redis_url, name, LEASE_D, MAX_CRASHES_D)
    client = queue.broker._client
    prefix = queue.broker._scripts.prefix
    innocent = [Job(rng.choice("abc"), round(rng.uniform(5.0, 15.0), 3), id=f"n{i}",
                    priority=rng.choice((Priority.LOW, Priority.MEDIUM))) for i in range(INNOCENT_JOBS)]
    held_at_crashes: Counter = Counter()  # job id -> crashes of a process that held it
    try:
        queue.enqueue(Job("poison", 0.0, id="poison", priority=Priority.HIGH))
        queue.enqueue_many(innocent)
        fleet.start(wait=False)  # (not waiting for "ready": the poison may kill it before it says so)
        fleet.start(wait=False)
        deadline = time.monotonic() + DRAIN_WAIT
        while not queue.join(0.05):  # a supervisor: a worker that died is replaced
            assert time.monotonic() < deadline, f"not drained: {leftovers(client, prefix)}"
            for worker in fleet.workers:
                if worker.process.poll() is not None and worker.killed_at is None:
                    assert worker.process.returncode == 3, f"worker {worker.pid} exited {worker.process.returncode}"
                    worker.killed_at = time.monotonic()  # (after the fact: only marks it handled)
                    held_at_crashes.update(list(in_flight(client, prefix, worker.pid)))  # reaped only after a lease
                    fleet.start(wait=False)
        fleet.stop()
        stats = queue.get_stats()
        dead = {d.job.id: d.reason for d in queue.broker.dead_jobs()}
    finally:
        queue.stop()
        queue.broker.close()
        fleet.close()

    lines = fleet.lines()
    poison_starts = [line for line in lines if line.kind == "S" and line.id == "poison"]
    failures = [(line.id, line.reason) for line in lines if line.kind == "F"]
    crashed_workers = [w for w in fleet.workers if w.process.returncode == 3]
    assert 1 <= len(poison_starts) <= MAX_CRASHES_D + 1
    assert len(crashed_workers) == len(poison_starts)  # each start killed its process, nothing else did
    assert held_at_crashes["poison"] == MAX_CRASHES_D + 1
    # reported once, by a process that reaped it (not one that ran it), and kept dead
    assert failures.count(("poison", "crashed")) == 1
    (reported,) = [line for line in lines if line.kind == "F" and line.id == "poison"]
    assert reported.pid not in {line.pid for line in poison_starts}
    assert dead.get("poison") == "crashed"
    # every other job ran, except the ones held by a process that the poison killed more than
    # max_crash_recoveries times: those die too (every attempt a dead process held counts a crash:
    # Redis cannot tell a started one from one waiting for a thread, and API.md bounds the poison's starts)
    ended = {line.id for line in lines if line.kind == "E"}
    collateral = {job_id for job_id in dead if job_id != "poison"}
    assert sorted({job.id for job in innocent} - ended - collateral) == []
    assert all(held_at_crashes[job_id] == MAX_CRASHES_D + 1 and dead[job_id] == "crashed" for job_id in collateral)
    assert sorted(failures) == sorted((job_id, "crashed") for job_id in dead)  # each reported once
    assert (stats.jobs_succeeded, stats.jobs_failed) == (INNOCENT_JOBS - len(collateral), 1 + len(collateral))
    print(f"\n(d) the poison job started {len(poison_starts)} times (max_crash_recoveries={MAX_CRASHES_D}); "
          f"{len(collateral)} other jobs died with it ({len(collateral & ended)} of them had ended)")


# --- (e) how soon a killed worker's jobs start again -------------------------------------------

LEASE_E = 1.0
RECOVERY_ROUNDS = 4
HELD_JOBS = 3
NEVER_ENDS_MS = 60_000.0  # the held jobs outlive the test: their workers are killed
RECOVERY_SLACK = 1.0  # seconds allowed beyond lease + lease/4 on a noisy machine


def test_a_killed_workers_jobs_start_again_within_the_lease_and_a_quarter(redis_url, fleet_factory):
    name = "crash-e"
    fleet = fleet_factory(redis_url, name, lease=LEASE_E, max_crashes=RECOVERY_ROUNDS + 1)
    queue = producer_queue(redis_url, name, LEASE_E, RECOVERY_ROUNDS + 1)
    ids = {f"h{i}" for i in range(HELD_JOBS)}
    rng = random.Random(os.environ.get("TINYMQ_CRASH_SEED", "12"))
    delays = []
    try:
        holder = fleet.start()
        queue.enqueue_many([Job("a", NEVER_ENDS_MS, id=job_id) for job_id in sorted(ids)])
        for _ in range(RECOVERY_ROUNDS):
            assert wait_for(lambda: running_in(fleet.lines(), holder.pid) == ids, START_WAIT)
            idle = fleet.start()  # it has free threads: a job given back starts at once
            time.sleep(rng.uniform(0.0, LEASE_E))  # at a random phase of both heartbeats
            died = fleet.kill(holder)
            assert wait_for(lambda: running_in(fleet.lines(), idle.pid) == ids, START_WAIT)
            delays.append(max(l.t for l in fleet.lines() if l.pid == idle.pid and l.kind == "S") - died)
            holder = idle
    finally:
        queue.stop()
        queue.broker.close()
        fleet.close()
    print(f"\n(e) lease {LEASE_E}s: a killed worker's jobs started again after "
          f"{', '.join(f'{d:.3f}' for d in delays)}s (lease + lease/4 = {LEASE_E * 1.25:.2f}s)")
    assert all(LEASE_E / 2 <= d <= LEASE_E * 1.25 + RECOVERY_SLACK for d in delays), delays


# --- defects found: strict-xfail reproducers ---------------------------------------------------

PAUSE_MS = 500  # CLIENT PAUSE: Redis answers no client for this long


def test_a_resumed_zombie_starts_no_buffered_job_before_it_can_renew(redis_url, fleet_factory):
    name = "zombie-buffer"
    fleet = fleet_factory(redis_url, name, lease=LEASE_B, max_crashes=3, threads=1)
    queue = producer_queue(redis_url, name, LEASE_B, 3)
    client = queue.broker._client
    prefix = queue.broker._scripts.prefix
    try:
        zombie = fleet.start()
        queue.enqueue_many([Job("a", 300.0, id="running"), Job("a", 10.0, id="buffered")])
        assert wait_for(lambda: running_in(fleet.lines(), zombie.pid) == {"running"}, START_WAIT)
        assert set(in_flight(client, prefix, zombie.pid)) == {"running", "buffered"}
        zombie.process.send_signal(signal.SIGSTOP)
        try:
            other = fleet.start()
            assert wait_for(lambda: not procs_of(client, prefix, zombie.pid), 3 * LEASE_B)
            assert wait_for(lambda: {l.id for l in fleet.lines() if l.pid == other.pid and l.kind == "E"}
                            == {"running", "buffered"}, START_WAIT)
            # Redis is slow to answer as the zombie wakes (a loaded server, a flaky link): it cannot
            # renew, so it cannot know it still holds anything
            import redis

            with redis.Redis.from_url(redis_url, socket_timeout=START_WAIT) as pauser:
                pauser.execute_command("CLIENT", "PAUSE", PAUSE_MS, "ALL")
        finally:
            zombie.process.send_signal(signal.SIGCONT)
        assert wait_for(lambda: procs_of(client, prefix, zombie.pid) != [], START_WAIT)
        assert queue.join(DRAIN_WAIT)
    finally:
        queue.stop()
        queue.broker.close()
        fleet.close()
    assert [l.id for l in fleet.lines() if l.pid == zombie.pid and l.kind == "S"] == ["running"]


OUTAGE_LEASES = 2.5  # the Redis outage, in leases
LONG_MS = 4000.0


def test_a_redis_outage_longer_than_the_lease_reaps_no_live_worker(own_redis_server, fleet_factory):
    server = own_redis_server
    name = "outage"
    fleet = fleet_factory(server.url, name, lease=LEASE_D, max_crashes=0)
    queue = producer_queue(server.url, name, LEASE_D, 0)
    client = queue.broker._client
    prefix = queue.broker._scripts.prefix
    per_worker = fleet.threads + 1  # what one worker takes: its threads and one buffered job
    try:
        first = fleet.start()
        queue.enqueue_many([Job("a", LONG_MS, id=f"x{i}") for i in range(per_worker)])
        assert wait_for(lambda: len(in_flight(client, prefix, first.pid)) == per_worker, START_WAIT)
        second = fleet.start()
        queue.enqueue_many([Job("a", LONG_MS, id=f"y{i}") for i in range(per_worker)])
        assert wait_for(lambda: len(in_flight(client, prefix, second.pid)) == per_worker, START_WAIT)
        server.kill()
        time.sleep(OUTAGE_LEASES * LEASE_D)
        server.start()
        assert queue.join(DRAIN_WAIT)
        stats = queue.get_stats()
    finally:
        queue.stop()
        queue.broker.close()
        fleet.close()
    lines = fleet.lines()
    assert [l for l in lines if l.kind == "F"] == []
    assert (stats.jobs_succeeded, stats.jobs_failed) == (2 * per_worker, 0)
    assert max(Counter(l.id for l in lines if l.kind == "S").values()) == 1
