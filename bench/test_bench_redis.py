"""tinymq's Redis broker against RQ, arq, saq, dramatiq and huey, in one run (issue #12).

Run:  python -m pytest bench/test_bench_redis.py --benchmark-only

The bench starts its own ``redis-server`` (tests/_redis_server.py: a loopback port,
a temp dir, ``appendonly yes``, ``appendfsync everysec``) and empties it (FLUSHALL)
before each contender's cases. Each peer runs from its own venv under
``.bench-venvs/``, made from pinned requirements by ``bench/redis_peers/setup.sh``
(run here when a venv is missing or stale); its producer runs in a subprocess
(``redis_peers/agent.py``) that the bench drives over a pipe, and its workers are
its own worker CLI. tinymq uses its public API only (``redis_peers/tinymq_app.py``):
the producer is this process, the workers are ``redis_peers/tinymq_worker.py``
processes calling ``start_dispatcher(4)``.

Every job, in every contender, writes one record ``(index, pid, perf_counter())`` to a
FIFO that this process reads (``redis_peers/record.py``): completions are counted
without a Redis command, at the same small cost for all.

Groups (no-op jobs, 2 worker processes, this machine's 2 cores):

- ``redis: end to end``: 2 worker processes × 4 threads (or the peer's equivalent
  concurrency), one producer enqueueing N jobs in batches of 100 where the peer has a
  bulk API (tinymq ``enqueue_many``, RQ ``enqueue_many``) and one by one where it has
  none (arq, saq: ``asyncio.gather`` of 100 enqueues, as saq's own ``map`` does;
  dramatiq ``group().run()``; huey ``Task.map``); time from the first enqueue until
  every job has started (a no-op ends as it starts). Also Redis commands per job (those
  run inside Lua scripts and MULTI included: ``total_commands_processed``) and round
  trips per job (the server's reply writes, ``total_writes_processed``: one per client
  call, whether it carries one command, a pipeline or a script; checked against a
  calibration when the server starts), both over the whole round: enqueue and run.
- ``redis: enqueue, one thread``: one job per call, no worker running; beside them, the
  floor under any such call: one redis-py ``PING`` per call (not a contender).
- ``redis: enqueue_many(100)``: tinymq ``enqueue_many`` and RQ ``enqueue_many``; the
  peers without a bulk API with what their users would write instead (named in the row).
- ``redis: enqueue->start latency, idle``: one job every ~1 ms into an idle fleet;
  start (in the worker) minus the moment just before the enqueue call.
- ``redis: delayed-job lateness``: jobs due at random times over 2 s; start minus due
  time, the due time being the moment just before the enqueue call plus the delay.
- ``redis: restart after a worker's SIGKILL`` (tinymq only): worker A holds 4
  running jobs, worker B idles, A is SIGKILLed; the time until the last of A's jobs
  starts again in B, against the lease. The peers are not run here: by default they give
  a dead worker's jobs back after a minute or more (saq's sweep runs every 60 s after the
  job's timeout, dramatiq waits for a 60-s heartbeat, arq for the job timeout + 10 s,
  RQ for its maintenance pass), and huey's Redis consumer pops jobs without redelivery.

In the cases without workers (enqueue, enqueue_many, the floor) the producer (this
process's thread for tinymq and the floor, the agent's process for a peer) and the server's
main thread run on one CPU, the same for every contender (``one_cpu``): the two take turns,
one call at a time, and on this host, whose idle vCPUs halt, a reply that wakes a process on
the other CPU costs ~40-50 us more. Left to the scheduler, the placement changed run by run
and with it the figures: tinymq's one-job enqueue 7.0k or 14k/s, the floor 10k or 47k/s, for
one build (session 35). Each of their rows also records ``other_programs_cpus``: how many
CPUs programs other than the bench's (this process, the server, the agent) kept busy while
it ran, the host's load that the rate alone does not show.
"""
import contextlib
import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import pytest

from conftest import BENCH_DIR, contender, percentile

ROOT = os.path.dirname(BENCH_DIR)
PEERS_DIR = os.path.join(BENCH_DIR, "redis_peers")
VENVS = os.environ.get("BENCH_VENVS", os.path.join(ROOT, ".bench-venvs"))
sys.path.insert(0, PEERS_DIR)  # record.py and tinymq_app.py, shared with the worker processes
sys.path.insert(0, os.path.join(ROOT, "tests"))
try:  # the tests' server helper; tests/ leaves sys.path again (it has a conftest of its own)
    from _redis_server import RedisServer, require_redis
finally:
    sys.path.remove(os.path.join(ROOT, "tests"))

from producer import SyncProducer  # noqa: E402
from record import FIFO_ENV, RECORD  # noqa: E402
from tinymq import Job  # noqa: E402

QUEUE_NAME = "bench"
PROCESSES = 2
THREADS = 4
ASYNC_CONCURRENCY = 10  # arq max_jobs and saq concurrency: both libraries' default
RQ_WORKERS = PROCESSES * THREADS  # RQ runs one job at a time per worker process
BATCH = 100
LEASE = 30.0  # tinymq's fleets for throughput and latency: the broker's default lease
KILL_LEASE = 2.0  # the restart case: a short lease, as the crash tests use
START_TIMEOUT = 60.0  # seconds for a fleet to answer its warm-up jobs
WARM_WAIT = 1.0  # seconds to wait for one warm-up batch before sending the next
ROUND_TIMEOUT = 120.0
SETTLE = 0.1  # seconds after a round's last start before its Redis counters are read

# Jobs per round and rounds, per contender: each round lasts about 0.2-3 s here.
E2E_JOBS = {"tinymq": 40_000, "rq": 1_000, "arq": 2_000, "arq-default": 400, "saq": 4_000,
            "dramatiq": 4_000, "huey": 4_000}
E2E_ROUNDS = 3
ENQUEUE_JOBS = {"tinymq": 2_000}
ENQUEUE_JOBS_PEER = 1_000
MANY_JOBS = {"tinymq": 20_000, "rq": 5_000}
MANY_JOBS_PEER = 2_000
ENQUEUE_ROUNDS = 5
LATENCY_JOBS = {"tinymq": 500}  # per round, one every LATENCY_GAP
LATENCY_JOBS_PEER = 200
LATENCY_GAP = 0.001
LATE_JOBS = {"tinymq": 1_000}  # per round, due at random times over LATE_SPAN
LATE_JOBS_PEER = 200
LATE_SPAN = 2.0
LATE_LEAD = 0.2  # the earliest due time, seconds after the round starts
SAMPLE_ROUNDS = {"tinymq": 3}  # latency and lateness rounds; the peers get one
KILL_ROUNDS = 3
RESTART_TIMEOUT = 10 * KILL_LEASE

GROUP_E2E = f"redis: end to end, {PROCESSES} worker processes, no-op jobs"
GROUP_ENQUEUE = "redis: enqueue, one thread"
GROUP_MANY = f"redis: enqueue_many({BATCH})"
GROUP_LATENCY = "redis: enqueue->start latency, idle"
GROUP_LATENESS = "redis: delayed-job lateness"
GROUP_KILL = "redis: restart after a worker's SIGKILL"

CONTENDERS = ["tinymq", "rq", "arq", "saq", "dramatiq", "huey"]
PEERS = CONTENDERS[1:]
VENV_OF = {"arq-default": "arq"}


# --- the contenders' names and workers -----------------------------------------------------------

def _peer_version(name: str) -> str:
    """The pinned version of a peer (its requirements file), for the contender's name."""
    dist = VENV_OF.get(name, name)
    with open(os.path.join(PEERS_DIR, "requirements", f"{dist}.txt")) as pins:
        for line in pins:
            pkg, _, version = line.strip().partition("==")
            if pkg.lower() == dist:
                return version
    raise AssertionError(f"{dist} is not pinned in redis_peers/requirements/{dist}.txt")


def tinymq_version() -> str:
    import tinymq

    return tinymq.__version__


def _distribution_version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


def _core_name() -> str:
    """The core the workers run: they inherit this process's interpreter and environment."""
    import tinymq

    return "compiled" if tinymq.HAS_EXTENSION else "pure"


def fleet_label(name: str) -> str:
    """The contender as the end-to-end and latency tables show it: library and workers."""
    if name == "tinymq":
        return f"tinymq RedisBroker ({PROCESSES} processes × {THREADS} threads, {_core_name()} core)"
    version = _peer_version(name)
    return {
        "rq": f"RQ {version} ({RQ_WORKERS} SimpleWorker processes)",
        "arq": f"arq {version} ({PROCESSES} processes × max_jobs {ASYNC_CONCURRENCY}, poll_delay 0.01 s)",
        "arq-default": f"arq {version} ({PROCESSES} processes × max_jobs {ASYNC_CONCURRENCY}, "
                       "default poll_delay 0.5 s)",
        "saq": f"saq {version} ({PROCESSES} processes × concurrency {ASYNC_CONCURRENCY})",
        "dramatiq": f"dramatiq {version} RedisBroker ({PROCESSES} processes × {THREADS} threads)",
        "huey": f"huey {version} RedisHuey ({PROCESSES} consumers × {THREADS} threads)",
    }[name]


def enqueue_label(name: str) -> str:
    if name == "tinymq":
        return f"tinymq Queue.enqueue ({_core_name()} core)"
    version = _peer_version(name)
    return {"rq": f"RQ {version} Queue.enqueue", "arq": f"arq {version} enqueue_job (awaited one by one)",
            "saq": f"saq {version} Queue.enqueue (awaited one by one)",
            "dramatiq": f"dramatiq {version} actor.send", "huey": f"huey {version} task()"}[name]


def many_label(name: str) -> str:
    if name == "tinymq":
        return f"tinymq Queue.enqueue_many({BATCH}) ({_core_name()} core)"
    version = _peer_version(name)
    return {"rq": f"RQ {version} Queue.enqueue_many({BATCH}) (one pipeline)",
            "arq": f"arq {version}: no bulk API; asyncio.gather of {BATCH} enqueue_job",
            "saq": f"saq {version}: no bulk API; asyncio.gather of {BATCH} enqueue (as its map())",
            "dramatiq": f"dramatiq {version}: no bulk API; group({BATCH}).run()",
            "huey": f"huey {version}: no bulk API; Task.map({BATCH})"}[name]


def worker_commands(name: str, url: str, lease: float) -> Tuple[List[List[str]], int]:
    """The command lines of a contender's worker processes, and how many processes run jobs."""
    if name == "tinymq":
        command = [sys.executable, os.path.join(PEERS_DIR, "tinymq_worker.py"), url, QUEUE_NAME,
                   repr(lease), str(THREADS)]
        return [command] * PROCESSES, PROCESSES
    bin_dir = os.path.join(VENVS, VENV_OF.get(name, name), "bin")
    if name == "rq":
        command = [os.path.join(bin_dir, "rq"), "worker", "--worker-class", "rq.worker.SimpleWorker",
                   "--url", url, "--quiet", QUEUE_NAME]
        # One of them runs RQ's scheduler (for enqueue_in); RQ elects one scheduler anyway.
        return [command[:-1] + ["--with-scheduler", QUEUE_NAME]] + [command] * (RQ_WORKERS - 1), RQ_WORKERS
    if name in ("arq", "arq-default"):
        command = [os.path.join(bin_dir, "arq"), "--custom-log-dict", "peer_arq.LOG_CONFIG",
                   "peer_arq.WorkerSettings"]
        return [command] * PROCESSES, PROCESSES
    if name == "saq":  # saq's CLI starts the other processes itself
        return [[os.path.join(bin_dir, "saq"), "peer_saq.settings", "--workers", str(PROCESSES)]], PROCESSES
    if name == "dramatiq":
        return [[os.path.join(bin_dir, "dramatiq"), "peer_dramatiq", "--processes", str(PROCESSES),
                 "--threads", str(THREADS)]], PROCESSES
    if name == "huey":
        command = [os.path.join(bin_dir, "huey_consumer"), "peer_huey.huey", "--workers", str(THREADS),
                   "--worker-type", "thread", "--quiet"]
        return [command] * PROCESSES, PROCESSES
    raise AssertionError(f"unknown contender {name!r}")


def peer_env(url: str, records: "Records", name: str) -> Dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # a peer's venv must not see this venv's packages
    if name == "tinymq":
        env["PYTHONPATH"] = os.pathsep.join([PEERS_DIR, ROOT])
    else:
        env["PYTHONPATH"] = PEERS_DIR
    env["BENCH_REDIS_URL"] = url
    env[FIFO_ENV] = records.path
    env["BENCH_ARQ_POLL_DELAY"] = "0.5" if name == "arq-default" else "0.01"
    env["BENCH_CONCURRENCY"] = str(ASYNC_CONCURRENCY)
    return env


# --- the job records ---------------------------------------------------------------------------

F_SETPIPE_SZ = 1031  # fcntl.F_SETPIPE_SZ (Linux), named in the fcntl module only from Python 3.10
PIPE_SIZE = 1 << 20  # the default /proc/sys/fs/pipe-max-size: ~32k records buffered


class Records:
    """The FIFO the jobs write their start records to, read by this process."""

    def __init__(self, directory: str) -> None:
        import fcntl

        self.path = os.path.join(directory, "records.fifo")
        os.mkfifo(self.path, 0o600)
        self.fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
        # Our own writer end: with no worker alive, the FIFO reads as empty, not at EOF.
        self.keepalive = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)
        with contextlib.suppress(OSError):
            fcntl.fcntl(self.fd, F_SETPIPE_SZ, PIPE_SIZE)
        self.pending = bytearray()
        self.repeats = 0  # records that collect() did not use: repeated or late starts

    def _read(self, timeout: float) -> List[Tuple[int, int, float]]:
        ready, _, _ = select.select([self.fd], [], [], max(0.0, timeout))
        if ready:
            with contextlib.suppress(BlockingIOError):
                self.pending += os.read(self.fd, PIPE_SIZE)
        whole = len(self.pending) - len(self.pending) % RECORD.size
        got = [RECORD.unpack_from(self.pending, offset) for offset in range(0, whole, RECORD.size)]
        del self.pending[:whole]
        return got

    def until(self, done: Callable[[List[Tuple[int, int, float]]], bool],
              timeout: float) -> List[Tuple[int, int, float]]:
        """Records (index, pid, perf_counter) read until ``done(records)`` or ``timeout`` seconds."""
        got: List[Tuple[int, int, float]] = []
        deadline = time.monotonic() + timeout
        while not done(got):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            got += self._read(min(left, 0.5))
        return got

    def collect(self, start: int, n: int, timeout: float = ROUND_TIMEOUT) -> Dict[int, Tuple[int, float]]:
        """The first start (pid, perf_counter) of each job ``start`` .. ``start + n - 1``.

        A record of any other job (a late repeat of an earlier case's job: every contender
        delivers at least once) and a second start of one of these are counted, not used.
        Fails after ``timeout`` seconds.
        """
        got: Dict[int, Tuple[int, float]] = {}
        stop = start + n
        deadline = time.monotonic() + timeout
        while len(got) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"only {len(got)} of {n} jobs started within {timeout} s")
            for index, pid, perf in self._read(min(left, 0.5)):
                if start <= index < stop and index not in got:
                    got[index] = (pid, perf)
                else:
                    self.repeats += 1
        return got

    def discard(self) -> None:
        """Drop whatever is buffered (records of an earlier case)."""
        while self._read(0.0):
            pass

    def close(self) -> None:
        os.close(self.keepalive)
        os.close(self.fd)


# --- the host's other load ---------------------------------------------------------------------

_BUSY_FIELDS = (0, 1, 2, 5, 6, 7)  # /proc/stat's cpu line: user nice system (idle iowait) irq softirq steal


def _busy_ticks() -> int:
    """Clock ticks every CPU of the host has spent busy so far (/proc/stat)."""
    with open("/proc/stat") as stat:
        fields = stat.readline().split()[1:]
    return sum(int(fields[i]) for i in _BUSY_FIELDS)


def _process_ticks(pid: Any) -> int:
    """Clock ticks of CPU (user + system, all its threads) process ``pid`` ("self") has used; 0 once gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rpartition(")")[2].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])  # utime, stime (the 14th and 15th fields)


@contextlib.contextmanager
def other_programs_load(benchmark: Any, pids: List[int]) -> Iterator[None]:
    """Record in the row's metrics how many CPUs programs other than this process and ``pids``
    (the server, the contender's agent) kept busy, on average, while the block ran
    (``other_programs_cpus``, of this host's 2): another program's load, which the rate alone
    does not tell from the case's own slowness. Not recorded where /proc is missing."""
    try:
        busy, own = _busy_ticks(), sum(_process_ticks(pid) for pid in ["self", *pids])
    except OSError:
        yield
        return
    start = time.perf_counter()
    yield
    wall = time.perf_counter() - start
    others = _busy_ticks() - busy - (sum(_process_ticks(pid) for pid in ["self", *pids]) - own)
    cpus = max(0.0, others / os.sysconf("SC_CLK_TCK") / wall)
    benchmark.extra_info.setdefault("metrics", {})["other_programs_cpus"] = round(cpus, 2)


@contextlib.contextmanager
def one_cpu(benchmark: Any, pids: List[int]) -> Iterator[None]:
    """Run the threads ``pids`` (0: the calling thread) on one CPU, the first this process may use,
    for the block; then on the CPUs each had before.

    For the cases without workers (one producer and the server taking turns, one call at a
    time, so neither waits for a CPU the other holds): this host's idle vCPUs halt (cpuidle
    haltpoll, guest_halt_poll_ns 0), and a reply that wakes a process on the other CPU costs
    ~40-50 us more than one on the same CPU. Left free, the scheduler puts the two on one CPU
    or on two, run by run: tinymq's one-job enqueue read 7.0k or 14k/s and the PING floor 10k
    or 47k/s (the same build, the same minute); pinned to two CPUs 3.4-7.1k and 5-11k/s, to one
    13k and 48k/s (median of 4). Recorded in the row (``cpu_placement``)."""
    if not hasattr(os, "sched_setaffinity"):
        benchmark.extra_info["cpu_placement"] = "free (no sched_setaffinity here)"
        yield
        return
    saved = {pid: os.sched_getaffinity(pid) for pid in pids}
    cpu = min(os.sched_getaffinity(0))
    for pid in pids:
        os.sched_setaffinity(pid, {cpu})
    benchmark.extra_info["cpu_placement"] = f"producer and redis-server on CPU {cpu}"
    try:
        yield
    finally:
        for pid, cpus in saved.items():
            with contextlib.suppress(OSError):  # (a process that ended meanwhile)
                os.sched_setaffinity(pid, cpus)


# --- Redis counters ----------------------------------------------------------------------------

def redis_counters(client: Any) -> Tuple[int, int]:
    """(commands processed, reply writes) so far; this INFO call shows up in the next reading."""
    stats = client.info("stats")
    return int(stats["total_commands_processed"]), int(stats["total_writes_processed"])


def counters_delta(before: Tuple[int, int], after: Tuple[int, int]) -> Tuple[int, int]:
    """Commands and round trips between two readings, less the first reading's own INFO."""
    return after[0] - before[0] - 1, after[1] - before[1] - 1


def calibrate(client: Any) -> None:
    """Check that the counters mean what the report says, on this server version.

    Commands run inside a script or a MULTI count one each; a client call (one command,
    a pipeline, one script call) counts one reply write.
    """
    def measure(action: Callable[[], Any]) -> Tuple[int, int]:
        before = redis_counters(client)
        action()
        return counters_delta(before, redis_counters(client))

    def pipeline() -> None:
        pipe = client.pipeline(transaction=False)
        for _ in range(100):
            pipe.rpush("calibration", 1)
        pipe.execute()

    script = client.register_script("for i = 1, 10 do redis.call('RPUSH', KEYS[1], i) end return 1")
    script(keys=["calibration"])  # loads it: the measured call is one EVALSHA
    checks = {
        "100 single commands": (lambda: [client.rpush("calibration", 1) for _ in range(100)], (100, 100)),
        "a pipeline of 100": (pipeline, (100, 1)),
        "a script running 10 commands": (lambda: script(keys=["calibration"]), (11, 1)),
    }
    for what, (action, expected) in checks.items():
        got = measure(action)
        assert got == expected, (f"Redis counts {what} as {got} (commands, round trips), expected "
                                 f"{expected}: the commands/round-trip figures would be wrong")
    client.delete("calibration")


# --- producers -----------------------------------------------------------------------------------

class TinymqProducer(SyncProducer):
    """tinymq's producer, in this process, with the same operations as a peer's agent."""

    def __init__(self, url: str, lease: float = LEASE) -> None:
        from tinymq_app import build_queue

        self.queue = build_queue(url, QUEUE_NAME, lease)
        self.versions = {"tinymq": tinymq_version(), "redis-py": _distribution_version("redis"),
                         "core": _core_name()}

    def call(self, op: str, *args: Any) -> Any:
        return getattr(self, op)(*args)

    def send(self, index: int) -> None:
        self.queue.enqueue(Job("noop", index))

    def send_batch(self, indices: range) -> None:
        self.queue.enqueue_many([Job("noop", index) for index in indices])

    def send_in(self, index: int, delay: float) -> None:
        self.queue.enqueue_delayed(Job("noop", index), delay)

    def hold(self, start: int, n: int) -> None:
        self.queue.enqueue_many([Job("hold", index) for index in range(start, start + n)])

    def close(self) -> None:
        self.queue.stop(wait=False)


class PeerAgent:
    """A peer's producer: ``redis_peers/agent.py`` in the peer's venv, one JSON line per call."""

    def __init__(self, name: str, url: str, records: "Records", log_dir: str) -> None:
        venv = VENV_OF.get(name, name)
        self.log_path = os.path.join(log_dir, f"agent-{name}.log")
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [os.path.join(VENVS, venv, "bin", "python"), os.path.join(PEERS_DIR, "agent.py"), venv],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, cwd=PEERS_DIR,
                env=peer_env(url, records, name), text=True, bufsize=1)
        self.versions = self.call("hello")
        pinned = _peer_version(name)
        assert self.versions["peer"] == pinned, (f"{venv} venv runs {self.versions['peer']}, pinned {pinned}: "
                                                 "run bench/redis_peers/setup.sh")

    def call(self, op: str, *args: Any) -> Any:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps({"op": op, "args": list(args)}) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise AssertionError(f"the agent exited ({self.process.poll()}); see {self.log_path}:\n"
                                 + _tail(self.log_path))
        reply = json.loads(line)
        if not reply["ok"]:
            raise AssertionError(f"agent {op}: {reply['error']}")
        return reply["result"]

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _tail(path: str, lines: int = 30) -> str:
    with contextlib.suppress(OSError), open(path, errors="replace") as handle:
        return "".join(handle.readlines()[-lines:])
    return ""


# --- worker fleets ----------------------------------------------------------------------------------

class Fleet:
    """A contender's worker processes, each in its own session so that a stop reaches its children."""

    def __init__(self, name: str, url: str, records: Records, log_dir: str, lease: float = LEASE,
                 commands: Optional[List[List[str]]] = None) -> None:
        self.name = name
        default_commands, self.job_processes = worker_commands(name, url, lease)
        self.commands = commands if commands is not None else default_commands
        self.env = peer_env(url, records, name)
        self.log_path = os.path.join(log_dir, f"workers-{name}.log")
        self.processes: List[subprocess.Popen] = []

    def start(self) -> "Fleet":
        with open(self.log_path, "ab") as log:
            for command in self.commands:
                self.processes.append(subprocess.Popen(
                    command, cwd=PEERS_DIR, env=self.env, stdin=subprocess.DEVNULL, stdout=log,
                    stderr=subprocess.STDOUT, start_new_session=True))
        return self

    def check_alive(self) -> None:
        for process in self.processes:
            if process.poll() is not None:
                raise AssertionError(f"a {self.name} worker exited ({process.returncode}); "
                                     f"{self.log_path}:\n{_tail(self.log_path)}")

    def stop(self) -> None:
        for process in self.processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15.0
        for process in self.processes:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            with contextlib.suppress(ProcessLookupError):  # children that outlived their parent
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        self.processes = []


# --- the environment shared by the cases --------------------------------------------------------------

class Bench:
    """The server, the records FIFO, the producers and at most one running fleet."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.server = RedisServer(os.path.join(directory, "redis"), appendfsync="everysec")
        os.makedirs(self.server.directory)
        self.server.start()
        self.client = self.server.client()
        calibrate(self.client)
        self.server_version = str(self.client.info("server")["redis_version"])
        self.records = Records(directory)
        self.agents: Dict[str, Any] = {}
        self.fleet: Optional[Fleet] = None
        self.next_index = 0

    @property
    def url(self) -> str:
        return self.server.url

    def indices(self, n: int) -> int:
        """The first of ``n`` fresh job indices."""
        start, self.next_index = self.next_index, self.next_index + n
        return start

    def fresh(self) -> None:
        """No fleet, an empty server, no stray record: the start of a contender's case."""
        self.stop_fleet()
        self.client.flushall()
        self.records.discard()
        producer = self.agents.pop("tinymq", None)
        if producer is not None:  # its queue was built on the data just flushed
            producer.close()

    def producer(self, name: str) -> Any:
        if name not in self.agents:
            if name == "tinymq":
                self.agents[name] = TinymqProducer(self.url)
            else:
                self.agents[name] = PeerAgent(name, self.url, self.records, self.directory)
        return self.agents[name]

    @contextlib.contextmanager
    def producer_alone(self, benchmark: Any, name: str = "") -> Iterator[None]:
        """A case without workers: the producer (this thread for tinymq and the PING floor, the
        agent's process for a peer) and the server's main thread on one CPU (one_cpu), and the
        CPUs other programs used meanwhile recorded (other_programs_load)."""
        agent = self.agents.get(name)
        producer = agent.process.pid if isinstance(agent, PeerAgent) else 0
        assert self.server.process is not None
        server = self.server.process.pid
        with one_cpu(benchmark, [producer, server]):
            with other_programs_load(benchmark, [pid for pid in (producer, server) if pid]):
                yield

    def stop_fleet(self) -> None:
        if self.fleet is not None:
            self.fleet.stop()
            self.fleet = None

    def use_fleet(self, name: str) -> Fleet:
        """The running fleet of ``name``: started (on an empty server) and warmed unless it runs."""
        if self.fleet is not None and self.fleet.name == name:
            self.fleet.check_alive()
            return self.fleet
        self.fresh()
        self.fleet = Fleet(name, self.url, self.records, self.directory).start()
        self.warm(self.fleet, self.producer(name))
        return self.fleet

    def warm(self, fleet: Fleet, producer: Any, batch: int = 20, drain: bool = True) -> None:
        """Enqueue small batches until every job-running process of the fleet has run one.

        A batch's jobs may stay buffered in a busy process: the loop goes on without them.
        With ``drain``, it then waits for every warm-up job, so that none starts during the
        case that follows.
        """
        pids: set = set()
        sent: List[int] = []
        seen: set = set()
        deadline = time.monotonic() + START_TIMEOUT

        def check_time() -> None:
            fleet.check_alive()
            if time.monotonic() > deadline:
                raise AssertionError(f"{fleet.name}: {len(pids)} of {fleet.job_processes} worker processes "
                                     f"ran a job, {len(seen)} of {len(sent)} warm-up jobs started within "
                                     f"{START_TIMEOUT} s; {fleet.log_path}:\n{_tail(fleet.log_path)}")

        while len(pids) < fleet.job_processes:
            check_time()
            start = self.indices(batch)
            producer.call("enqueue", start, batch)
            sent.extend(range(start, start + batch))
            got = self.records.until(lambda got: len(got) >= batch, WARM_WAIT)
            pids.update(pid for _, pid, _ in got)
            seen.update(index for index, _, _ in got)
        while drain and not seen.issuperset(sent):
            check_time()
            seen.update(index for index, _, _ in self.records.until(lambda got: bool(got), WARM_WAIT))

    def close(self) -> None:
        self.stop_fleet()
        for agent in self.agents.values():
            agent.close()
        self.records.close()
        self.client.close()
        self.server.stop()


def _setup_peer_venvs() -> None:
    """Run setup.sh once per bench run: it (re)creates only missing or stale venvs."""
    base = getattr(sys, "_base_executable", None) or sys.executable
    env = dict(os.environ, PYTHON=base, BENCH_VENVS=VENVS)
    subprocess.run(["bash", os.path.join(PEERS_DIR, "setup.sh"), *PEERS], check=True, env=env)


@pytest.fixture(scope="module")
def bench() -> Iterator[Bench]:
    require_redis()
    _setup_peer_venvs()
    directory = tempfile.mkdtemp(prefix="tinymq-bench-redis-")
    env = Bench(directory)
    try:
        yield env
    finally:
        env.close()
        shutil.rmtree(directory, ignore_errors=True)


def describe(benchmark: Any, bench: Bench, producer: Any) -> None:
    """Record the versions measured: the contender's (its agent says) and the server's."""
    benchmark.extra_info["versions"] = dict(producer.versions, redis_server=bench.server_version)


# --- enqueue without workers -------------------------------------------------------------------------

@pytest.mark.parametrize("name", CONTENDERS)
def test_enqueue(benchmark: Any, bench: Bench, name: str) -> None:
    benchmark.group = GROUP_ENQUEUE
    bench.fresh()
    producer = bench.producer(name)
    n = ENQUEUE_JOBS.get(name, ENQUEUE_JOBS_PEER)
    contender(benchmark, enqueue_label(name), is_tinymq=name == "tinymq", ops=n, op="job")
    describe(benchmark, bench, producer)
    with bench.producer_alone(benchmark, name):
        benchmark.pedantic(lambda start: producer.call("enqueue", start, n),
                           setup=lambda: ((bench.indices(n),), {}), rounds=ENQUEUE_ROUNDS, warmup_rounds=1)


def test_round_trip_floor(benchmark: Any, bench: Bench) -> None:
    """Not a contender: one redis-py PING per call, from this process. An enqueue of one job
    per call costs at least one round trip, so this is the ceiling any of them can reach on
    this host (its client's CPU per call included), shown beside them."""
    benchmark.group = GROUP_ENQUEUE
    bench.fresh()
    n = ENQUEUE_JOBS["tinymq"]
    client = bench.client
    contender(benchmark, f"redis-py {_distribution_version('redis')} PING, one per call (the round-trip floor)",
              is_tinymq=False, ops=n, op="call")
    benchmark.extra_info["floor"] = True  # (the report leaves it out of "the fastest peer")
    with bench.producer_alone(benchmark):
        benchmark.pedantic(lambda: [client.ping() for _ in range(n)], rounds=ENQUEUE_ROUNDS, warmup_rounds=1)


@pytest.mark.parametrize("name", CONTENDERS)
def test_enqueue_many(benchmark: Any, bench: Bench, name: str) -> None:
    benchmark.group = GROUP_MANY
    bench.fresh()
    producer = bench.producer(name)
    n = MANY_JOBS.get(name, MANY_JOBS_PEER)
    contender(benchmark, many_label(name), is_tinymq=name == "tinymq", ops=n, op="job")
    describe(benchmark, bench, producer)
    with bench.producer_alone(benchmark, name):
        benchmark.pedantic(lambda start: producer.call("enqueue_many", start, n, BATCH),
                           setup=lambda: ((bench.indices(n),), {}), rounds=ENQUEUE_ROUNDS, warmup_rounds=1)


# --- with workers: end to end, latency, lateness ----------------------------------------------------

def _end_to_end(benchmark: Any, bench: Bench, name: str) -> None:
    benchmark.group = GROUP_E2E
    producer = bench.producer(name)
    n = E2E_JOBS[name]
    counted: List[Tuple[int, int]] = []
    before: List[Tuple[int, int]] = []

    def setup() -> Tuple[Tuple[int], Dict[str, Any]]:
        start = bench.indices(n)
        before.append(redis_counters(bench.client))
        return (start,), {}

    def one_round(start: int) -> None:
        producer.call("enqueue_many", start, n, BATCH)
        bench.records.collect(start, n)

    def teardown(start: int) -> None:
        time.sleep(SETTLE)  # the last jobs' acknowledgements reach Redis after their start
        counted.append(counters_delta(before[-1], redis_counters(bench.client)))

    benchmark.pedantic(one_round, setup=setup, teardown=teardown, rounds=E2E_ROUNDS)
    contender(benchmark, fleet_label(name), is_tinymq=name == "tinymq", ops=n, op="job",
              commands_per_job=round(percentile([c / n for c, _ in counted], 50), 2),
              round_trips_per_job=round(percentile([r / n for _, r in counted], 50), 3))


def _start_delays(bench: Bench, producer: Any, n: int, op: str, *args: Any) -> List[float]:
    """One round of ``n`` fresh jobs: ``producer.call(op, start, *args)`` returns each job's
    reference time (its enqueue stamp, its due time); each job's first start minus it."""
    start = bench.indices(n)
    reference = producer.call(op, start, *args)
    got = bench.records.collect(start, n)
    return [perf - reference[index - start] for index, (_, perf) in got.items()]


def _latency(benchmark: Any, bench: Bench, name: str) -> None:
    benchmark.group = GROUP_LATENCY
    producer = bench.producer(name)
    n = LATENCY_JOBS.get(name, LATENCY_JOBS_PEER)
    rounds: List[List[float]] = []

    def one_round() -> None:
        rounds.append(_start_delays(bench, producer, n, "paced", n, LATENCY_GAP))

    benchmark.pedantic(one_round, rounds=SAMPLE_ROUNDS.get(name, 1), iterations=1)
    p50s = [percentile(delays, 50) * 1e6 for delays in rounds]
    p99s = [percentile(delays, 99) * 1e6 for delays in rounds]
    contender(benchmark, fleet_label(name), is_tinymq=name == "tinymq", ops=n, op="job", kind="metric",
              p50_us=round(percentile(p50s, 50), 1), p99_us=round(percentile(p99s, 50), 1),
              worst_round_p99_us=round(max(p99s), 1))


def _lateness(benchmark: Any, bench: Bench, name: str) -> None:
    benchmark.group = GROUP_LATENESS
    producer = bench.producer(name)
    n = LATE_JOBS.get(name, LATE_JOBS_PEER)
    rng = random.Random(7)
    rounds: List[List[float]] = []

    def one_round() -> None:
        delays = sorted(LATE_LEAD + rng.random() * LATE_SPAN for _ in range(n))
        rng.shuffle(delays)
        rounds.append(_start_delays(bench, producer, n, "delayed", delays))

    benchmark.pedantic(one_round, rounds=SAMPLE_ROUNDS.get(name, 1), iterations=1)
    p99s = [percentile(lateness, 99) * 1e3 for lateness in rounds]
    contender(benchmark, fleet_label(name), is_tinymq=name == "tinymq", ops=n, op="job", kind="metric",
              p50_ms=round(percentile([percentile(x, 50) * 1e3 for x in rounds], 50), 3),
              p99_ms=round(percentile(p99s, 50), 3), worst_round_p99_ms=round(max(p99s), 3),
              min_ms=round(min(min(x) for x in rounds) * 1e3, 3))


CASES = {"end to end": _end_to_end, "latency": _latency, "lateness": _lateness}
# One fleet per contender serves all its cases: the parameters run contender by contender.
WITH_WORKERS = [(name, case) for name in CONTENDERS for case in CASES]
WITH_WORKERS.insert(WITH_WORKERS.index(("arq", "lateness")) + 1, ("arq-default", "end to end"))


@pytest.mark.parametrize("name, case", WITH_WORKERS, ids=[f"{n}-{c.replace(' ', '-')}" for n, c in WITH_WORKERS])
def test_with_workers(benchmark: Any, bench: Bench, name: str, case: str) -> None:
    fleet = bench.use_fleet(name)
    repeats = bench.records.repeats
    CASES[case](benchmark, bench, name)
    fleet.check_alive()
    describe(benchmark, bench, bench.producer(name))
    # Starts read during this case that were not first starts of its jobs (at-least-once repeats).
    benchmark.extra_info["repeated_starts"] = bench.records.repeats - repeats


# --- tinymq: restart after a worker's SIGKILL ---------------------------------------------------------

def test_restart_after_kill(benchmark: Any, bench: Bench) -> None:
    """Worker A runs THREADS held jobs; B idles; A is SIGKILLed: how long until B runs them."""
    benchmark.group = GROUP_KILL
    bench.fresh()
    hold_file = os.path.join(bench.directory, "hold")
    restarts: List[float] = []

    def one_round() -> None:
        bench.fresh()
        producer = TinymqProducer(bench.url, KILL_LEASE)
        command = worker_commands("tinymq", bench.url, KILL_LEASE)[0][0]
        a = Fleet("tinymq", bench.url, bench.records, bench.directory, commands=[command])
        b = Fleet("tinymq", bench.url, bench.records, bench.directory, commands=[command])
        a.env = b.env = dict(a.env, BENCH_HOLD_FILE=hold_file)
        a.job_processes = b.job_processes = 1
        open(hold_file, "w").close()
        try:
            bench.warm(a.start(), producer, batch=1)
            start = bench.indices(THREADS)
            producer.hold(start, THREADS)
            held = bench.records.collect(start, THREADS)
            victim = a.processes[0].pid
            assert {pid for pid, _ in held.values()} == {victim}, held
            bench.warm(b.start(), producer, batch=1, drain=False)  # A may hold one, until it dies
            killed_at = time.perf_counter()
            os.kill(victim, signal.SIGKILL)
            wanted = set(range(start, start + THREADS))
            again = bench.records.until(lambda got: {i for i, pid, _ in got if pid != victim} >= wanted,
                                        RESTART_TIMEOUT)
            starts = {index: perf for index, pid, perf in again if pid != victim and index in wanted}
            assert set(starts) == wanted, f"restarted within {RESTART_TIMEOUT} s: {sorted(starts)} of {sorted(wanted)}"
            restarts.append(max(starts.values()) - killed_at)
        finally:
            os.remove(hold_file)
            a.stop()
            b.stop()
            producer.close()

    benchmark.pedantic(one_round, rounds=KILL_ROUNDS, iterations=1)
    contender(benchmark, f"tinymq RedisBroker, lease {KILL_LEASE:g} s ({_core_name()} core)", is_tinymq=True,
              ops=THREADS, op="job", kind="metric", restart_s=round(percentile(restarts, 50), 3),
              worst_round_restart_s=round(max(restarts), 3), lease_s=KILL_LEASE)
    benchmark.extra_info["versions"] = {"tinymq": tinymq_version(), "core": _core_name(),
                                        "redis_server": bench.server_version}
