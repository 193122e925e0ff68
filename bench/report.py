"""Turn pytest-benchmark JSON files into docs/benchmarks.md and docs/benchmarks.svg.

    python bench/report.py .benchmarks/run.json [more.json ...] [--md PATH] [--svg PATH]

Benchmarks are grouped by their pytest-benchmark ``group``; in each group the
tinymq contenders are compared with every baseline measured in the same run.
The ``extra_info`` keys are described in bench/conftest.py; a benchmark without
them still shows up (its name is the contender, "tinymq" in it marks tinymq).
"""
import argparse
import datetime
import html
import json
import math
import os
import statistics
import sys
from typing import Any, Callable, Dict, List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
E2E_GROUP = "queue: end-to-end no-op jobs, 4 workers"
TYPES_GROUP = "queue: end-to-end no-op jobs by number of job types, 4 workers"
REGISTER_GROUP = "queue: register 10,000 job types"
INTERLEAVED_GROUP = "queue: enqueue->start latency, idle pool, interleaved with ThreadPoolExecutor"
RATE_GROUP = "queue: a type limited to 1,000 starts/s beside a full-speed type, 4 workers"
REDIS_E2E = "redis: end to end, 2 worker processes, no-op jobs"
REDIS_ENQUEUE = "redis: enqueue, one thread"
REDIS_MANY = "redis: enqueue_many(100)"
REDIS_LATENCY = "redis: enqueue->start latency, idle"
REDIS_LATENESS = "redis: delayed-job lateness"
REDIS_KILL = "redis: restart after a worker's SIGKILL"
ASYNC_SLEEP_GROUP = "async: 10,000 jobs awaiting sleep(5 ms), concurrency 500"
ASYNC_NOOP_GROUP = "async: end-to-end no-op jobs"
ASYNC_LATENCY_GROUP = "async: enqueue->start latency, idle queue"
SHORT = {  # chart labels
    "core: ready-queue push+pop": "core push+pop",
    "core: delayed heap, push 1M": "delayed push (1M)",
    "core: delayed heap, pop 1M": "delayed pop (1M)",
    "core: bytes per queued entry (beyond the job)": "core bytes/entry",
    E2E_GROUP: "end-to-end jobs/s",
    "queue: enqueue->start latency, idle pool": "enqueue→start p50",
    "queue: delayed-job lateness": "lateness p99",
    "queue: bytes per queued job (job included)": "bytes/queued job",
    TYPES_GROUP: "jobs/s by types",
    REGISTER_GROUP: "register 10k types",
    INTERLEAVED_GROUP: "enqueue→start p50, interleaved",
    RATE_GROUP: "full speed beside a rate limit",
    "durable enqueue, synchronous=NORMAL": "durable NORMAL",
    "durable enqueue, synchronous=FULL": "durable FULL",
    "durable enqueue, 4 producer threads, synchronous=NORMAL": "durable 4 producers",
    "durable enqueue, 4 producer threads, synchronous=FULL": "durable 4 producers FULL",
    "durable end to end, 4 workers, synchronous=NORMAL": "durable end to end",
    REDIS_E2E: "redis end to end",
    REDIS_ENQUEUE: "redis enqueue",
    REDIS_MANY: "redis enqueue_many(100)",
    REDIS_LATENCY: "redis enqueue→start p50",
    REDIS_LATENESS: "redis lateness p99",
    REDIS_KILL: "redis restart after kill",
    ASYNC_SLEEP_GROUP: "async 10k × sleep(5 ms)",
    ASYNC_NOOP_GROUP: "async end-to-end jobs/s",
    ASYNC_LATENCY_GROUP: "async enqueue→start p50",
}
GROUP_ORDER = [
    "core: ready-queue push+pop",
    "core: delayed heap, push 1M",
    "core: delayed heap, pop 1M",
    "core: bytes per queued entry (beyond the job)",
    E2E_GROUP,
    "queue: enqueue->start latency, idle pool",
    "queue: delayed-job lateness",
    "queue: bytes per queued job (job included)",
    TYPES_GROUP,
    REGISTER_GROUP,
    INTERLEAVED_GROUP,
    RATE_GROUP,
    REDIS_E2E,
    REDIS_ENQUEUE,
    REDIS_MANY,
    REDIS_LATENCY,
    REDIS_LATENESS,
    REDIS_KILL,
]


class Bench:
    """One benchmark of the run, with the figures the report needs."""

    def __init__(self, raw: Dict[str, Any]) -> None:
        info = raw.get("extra_info") or {}
        self.raw = raw
        self.group = raw.get("group") or "ungrouped"
        self.name = info.get("contender") or raw.get("param") or raw.get("name", "?")
        self.is_tinymq = bool(info["tinymq"]) if "tinymq" in info else "tinymq" in self.name.lower()
        self.is_floor = bool(info.get("floor"))  # a bound measured beside the contenders, not one
        self.ops = info.get("ops") or 1
        self.op = info.get("op") or "round"
        self.kind = info.get("kind") or "time"
        self.metrics: Dict[str, float] = dict(info.get("metrics") or {})
        stats = raw.get("stats") or {}
        self.median = stats.get("median", float("nan"))
        self.rounds = stats.get("rounds", 0)
        self.runs = 1  # how many runs the figures are the median of

    @property
    def per_op(self) -> float:
        return self.median / self.ops

    @property
    def rate(self) -> float:
        return self.ops / self.median if self.median else float("nan")

    def value(self) -> Tuple[str, float]:
        """The figure that ranks this contender (lower is better) and its name."""
        if self.kind == "metric" and self.metrics:
            key = next(iter(self.metrics))
            for preferred in ("bytes_per_entry", "bytes_per_job", "p99_ms", "p50_us"):
                if preferred in self.metrics:
                    key = preferred
                    break
            return key, self.metrics[key]
        return "time per " + self.op, self.per_op


# --- loading ----------------------------------------------------------------------

def load(paths: List[str]) -> Tuple[List[Bench], Dict[str, Any], List[str], List[str]]:
    """Read one or more runs; a case seen in several runs gets the median of its medians.

    Several runs tame a noisy machine: each figure (time median, latency
    percentile, bytes) is the median of that figure over the runs.
    """
    runs: Dict[str, List[Bench]] = {}
    machine: Dict[str, Any] = {}
    commands: List[str] = []
    dates: List[str] = []
    for path in paths:
        with open(path) as handle:
            data = json.load(handle)
        machine = machine or data.get("machine_info", {})
        command = data.get("command") or f"(command not recorded in {path})"
        if command not in commands:
            commands.append(command)
        if data.get("datetime"):
            dates.append(data["datetime"])
        for raw in data.get("benchmarks", []):
            runs.setdefault(raw.get("fullname", raw.get("name")), []).append(Bench(raw))
    benches = []
    for seen in runs.values():
        bench = seen[0]
        bench.runs = len(seen)
        bench.median = statistics.median(b.median for b in seen)
        bench.rounds = sum(b.rounds for b in seen)
        bench.metrics = {key: statistics.median(b.metrics[key] for b in seen if key in b.metrics)
                         for key in bench.metrics}
        benches.append(bench)
    return benches, machine, commands, dates


def by_group(benches: List[Bench]) -> Dict[str, List[Bench]]:
    groups: Dict[str, List[Bench]] = {}
    for bench in benches:
        groups.setdefault(bench.group, []).append(bench)
    order = {name: i for i, name in enumerate(GROUP_ORDER)}
    return dict(sorted(groups.items(), key=lambda item: (order.get(item[0], len(order)), item[0])))


def primary(benches: List[Bench]) -> Optional[Bench]:
    """The tinymq contender a group's ratios are about: compiled when measured, else the first."""
    ours = [b for b in benches if b.is_tinymq]
    for bench in ours:
        if "compiled" in bench.name:
            return bench
    return ours[0] if ours else None


def find(groups: Dict[str, List[Bench]], group: str, contains: str) -> Optional[Bench]:
    for bench in groups.get(group, []):
        if contains.lower() in bench.name.lower():
            return bench
    return None


# --- formatting ---------------------------------------------------------------------

def fmt_time(seconds: float) -> str:
    if seconds != seconds:
        return "n/a"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6), ("ns", 1e-9)):
        if seconds >= scale or unit == "ns":
            return f"{seconds / scale:.3g} {unit}" if seconds / scale < 100 else f"{seconds / scale:.0f} {unit}"
    return str(seconds)


def fmt_rate(rate: float) -> str:
    if rate != rate:
        return "n/a"
    if rate >= 1e6:
        return f"{rate / 1e6:.2f} M/s"
    if rate >= 1e3:
        return f"{rate / 1e3:.1f} k/s"
    return f"{rate:.1f} /s"


def fmt_ratio(ratio: float) -> str:
    if ratio != ratio or ratio in (math.inf, -math.inf):
        return "n/a"
    return f"{ratio:.1f}×" if ratio >= 10 else f"{ratio:.2f}×"


def ratio(baseline: Bench, ours: Bench) -> float:
    """How many times better ``ours`` is than ``baseline`` on their ranking figure (> 1: better)."""
    _, theirs = baseline.value()
    _, mine = ours.value()
    return theirs / mine if mine > 0 else float("nan")


def group_table(benches: List[Bench]) -> List[str]:
    ours = [b for b in benches if b.is_tinymq]
    ordered = ours + sorted((b for b in benches if not b.is_tinymq), key=lambda b: b.value()[1])
    lines: List[str] = []
    metric_keys: List[str] = []
    for bench in ordered:
        for key in bench.metrics:
            if key not in metric_keys:
                metric_keys.append(key)
    timed = all(b.kind == "time" for b in ordered)
    header = ["Contender"]
    if timed:
        header += [f"median per {ordered[0].op}", "rate", "rounds"]
    header += metric_keys
    header += [f"{b.name} is … better" for b in ours]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|")
    for bench in ordered:
        row = [("**" + bench.name + "**") if bench.is_tinymq else bench.name]
        if timed:
            row += [fmt_time(bench.per_op), fmt_rate(bench.rate), str(bench.rounds)]
        row += [f"{bench.metrics[k]:g}" if k in bench.metrics else "" for k in metric_keys]
        row += ["—" if mine is bench else fmt_ratio(ratio(bench, mine)) for mine in ours]
        lines.append("| " + " | ".join(row) + " |")
    return lines


# --- goals ----------------------------------------------------------------------------

Goal = Tuple[str, Callable[[Dict[str, List[Bench]]], Optional[Tuple[str, bool]]]]


def _speedup(group: str, baseline: str, at_least: float) -> Callable[..., Optional[Tuple[str, bool]]]:
    def check(groups: Dict[str, List[Bench]]) -> Optional[Tuple[str, bool]]:
        ours, theirs = primary(groups.get(group, [])), find(groups, group, baseline)
        if ours is None or theirs is None:
            return None
        r = ratio(theirs, ours)
        return f"{fmt_ratio(r)} ({ours.name})", r >= at_least
    return check


def _within(group: str, baseline: str, factor: float) -> Callable[..., Optional[Tuple[str, bool]]]:
    def check(groups: Dict[str, List[Bench]]) -> Optional[Tuple[str, bool]]:
        ours, theirs = primary(groups.get(group, [])), find(groups, group, baseline)
        if ours is None or theirs is None:
            return None
        slower = ours.per_op / theirs.per_op
        return (f"{fmt_ratio(slower)} slower: {fmt_time(ours.per_op)} vs {fmt_time(theirs.per_op)}"
                f" ({ours.name})", slower <= factor)
    return check


def _at_most(group: str, key: str, limit: float, unit: str,
             contains: str = "") -> Callable[..., Optional[Tuple[str, bool]]]:
    def check(groups: Dict[str, List[Bench]]) -> Optional[Tuple[str, bool]]:
        candidates = [b for b in groups.get(group, []) if b.is_tinymq and key in b.metrics
                      and contains.lower() in b.name.lower()]
        compiled = [b for b in candidates if "compiled" in b.name]
        picked = compiled or candidates
        if not picked:
            return None
        worst = max(picked, key=lambda b: b.metrics[key])
        shown = ", ".join(f"{b.metrics[key]:g} {unit} ({b.name})" for b in picked)
        return shown, worst.metrics[key] <= limit
    return check


DURABLE = "durable enqueue, synchronous={}"
DURABLE_THREADS = "durable enqueue, 4 producer threads, synchronous={}"
DURABLE_E2E = "durable end to end, 4 workers, synchronous=NORMAL"


def _tinymq_named(groups: Dict[str, List[Bench]], group: str, contender: str) -> Optional[Bench]:
    return next((b for b in groups.get(group, []) if b.is_tinymq and b.name == contender), None)


def _threads_vs_one(at_least: float, synchronous: str = "NORMAL") -> Callable[..., Optional[Tuple[str, bool]]]:
    """tinymq's rate with 4 producer threads against its rate with one, both at ``synchronous``."""
    def check(groups: Dict[str, List[Bench]]) -> Optional[Tuple[str, bool]]:
        one = _tinymq_named(groups, DURABLE.format(synchronous), "tinymq enqueue")
        four = primary(groups.get(DURABLE_THREADS.format(synchronous), []))
        if one is None or four is None:
            return None
        r = four.rate / one.rate
        return f"{fmt_ratio(r)}: {fmt_rate(four.rate)} vs {fmt_rate(one.rate)}", r >= at_least
    return check


def _types_vs_one(types: str, at_least: float) -> Callable[..., Optional[Tuple[str, bool]]]:
    """The end-to-end rate with ``types`` job types against the rate with one (compiled core)."""
    def check(groups: Dict[str, List[Bench]]) -> Optional[Tuple[str, bool]]:
        many = _tinymq_named(groups, TYPES_GROUP, f"tinymq (compiled), {types} types")
        one = _tinymq_named(groups, TYPES_GROUP, "tinymq (compiled), 1 type")
        if many is None or one is None:
            return None
        r = many.rate / one.rate
        return f"{fmt_ratio(r)}: {fmt_rate(many.rate)} vs {fmt_rate(one.rate)}", r >= at_least
    return check


def _round_under(group: str, seconds: float) -> Callable[..., Optional[Tuple[str, bool]]]:
    """The compiled tinymq contender's median round time."""
    def check(groups: Dict[str, List[Bench]]) -> Optional[Tuple[str, bool]]:
        ours = _tinymq_named(groups, group, "tinymq (compiled)")
        if ours is None:
            return None
        return f"{fmt_time(ours.median)} ({ours.name})", ours.median < seconds
    return check


def _metric_vs(group: str, key: str, baseline: str, factor: float) -> Callable[..., Optional[Tuple[str, bool]]]:
    """The compiled tinymq contender's ``key`` against the baseline's, measured in the same run."""
    def check(groups: Dict[str, List[Bench]]) -> Optional[Tuple[str, bool]]:
        ours = _tinymq_named(groups, group, "tinymq (compiled)")
        theirs = find(groups, group, baseline)
        if ours is None or theirs is None or key not in ours.metrics or key not in theirs.metrics:
            return None
        r = ours.metrics[key] / theirs.metrics[key]
        return (f"{fmt_ratio(r)}: {ours.metrics[key]:g} vs {theirs.metrics[key]:g} ({theirs.name})",
                r <= factor)
    return check


def _rate_held(percent: float) -> Callable[..., Optional[Tuple[str, bool]]]:
    """The compiled core's rate-limited type: its measured starts/s against its 1,000/s limit."""
    def check(groups: Dict[str, List[Bench]]) -> Optional[Tuple[str, bool]]:
        ours = _tinymq_named(groups, RATE_GROUP, "tinymq (compiled), 1,000/s type + full-speed type")
        if ours is None or "rate_error_pct" not in ours.metrics:
            return None
        error = ours.metrics["rate_error_pct"]
        return f"{ours.metrics['limited_starts_per_s']:g} starts/s ({error:g}% off)", error <= percent
    return check


def _full_speed_kept(at_least: float) -> Callable[..., Optional[Tuple[str, bool]]]:
    """The full-speed type's jobs/s beside the rate-limited one against its jobs/s alone (compiled)."""
    def check(groups: Dict[str, List[Bench]]) -> Optional[Tuple[str, bool]]:
        beside = _tinymq_named(groups, RATE_GROUP, "tinymq (compiled), 1,000/s type + full-speed type")
        alone = find(groups, RATE_GROUP, "tinymq (compiled), full-speed type alone")
        if beside is None or alone is None:
            return None
        r = beside.metrics["fast_jobs_per_s"] / alone.metrics["fast_jobs_per_s"]
        return (f"{fmt_ratio(r)}: {fmt_rate(beside.metrics['fast_jobs_per_s'])} vs "
                f"{fmt_rate(alone.metrics['fast_jobs_per_s'])} alone", r >= at_least)
    return check


def _ours(groups: Dict[str, List[Bench]], group: str, contender: str) -> Optional[Bench]:
    """The tinymq contender named ``contender`` in ``group``; without a name, the group's primary."""
    return _tinymq_named(groups, group, contender) if contender else primary(groups.get(group, []))


def _rate(group: str, at_least: float, contender: str = "",
          beside: str = "") -> Callable[..., Optional[Tuple[str, bool]]]:
    """A tinymq contender's rate (jobs/s) in ``group`` (see ``_ours``); and that of the row whose
    name contains ``beside`` (a floor measured in the same run), if any."""
    def check(groups: Dict[str, List[Bench]]) -> Optional[Tuple[str, bool]]:
        ours = _ours(groups, group, contender)
        if ours is None:
            return None
        floor = find(groups, group, beside) if beside else None
        also = f"; {floor.name}: {fmt_rate(floor.rate)}" if floor is not None else ""
        if "other_programs_cpus" in ours.metrics:  # (the host's load meanwhile: test_bench_redis.py)
            also += f"; other programs busy meanwhile: {ours.metrics['other_programs_cpus']:g} CPUs"
        return f"{fmt_rate(ours.rate)} ({ours.name}{also})", ours.rate >= at_least
    return check


def _vs_fastest_peer(group: str, at_least: float, contender: str = "",
                     peers: Tuple[str, ...] = ()) -> Callable[..., Optional[Tuple[str, bool]]]:
    """A tinymq contender's rate (see ``_ours``) against the fastest baseline's in ``group``:
    of every baseline, or of the first whose name contains each of ``peers``."""
    def check(groups: Dict[str, List[Bench]]) -> Optional[Tuple[str, bool]]:
        ours = _ours(groups, group, contender)
        if peers:
            baselines = [b for b in (find(groups, group, peer) for peer in peers) if b]
        else:
            baselines = [b for b in groups.get(group, []) if not b.is_tinymq and not b.is_floor]
        if ours is None or not baselines:
            return None
        fastest = max(baselines, key=lambda b: b.rate)
        r = ratio(fastest, ours)
        return f"{fmt_ratio(r)}: {fmt_rate(ours.rate)} vs {fastest.name} {fmt_rate(fastest.rate)}", r >= at_least
    return check


def _restart_within_lease(extra: float) -> Callable[..., Optional[Tuple[str, bool]]]:
    """Restart time of a SIGKILLed worker's jobs against lease × (1 + extra)."""
    def check(groups: Dict[str, List[Bench]]) -> Optional[Tuple[str, bool]]:
        ours = primary(groups.get(REDIS_KILL, []))
        if ours is None or "restart_s" not in ours.metrics or "lease_s" not in ours.metrics:
            return None
        limit = ours.metrics["lease_s"] * (1 + extra)
        return (f"{ours.metrics['restart_s']:g} s (lease {ours.metrics['lease_s']:g} s, limit {limit:g} s)",
                ours.metrics["restart_s"] <= limit)
    return check


GOALS: List[Goal] = [
    ("core: ready-queue push+pop ≥ 20× faster than queue.PriorityQueue put+get",
     _speedup("core: ready-queue push+pop", "queue.PriorityQueue", 20)),
    ("core: ready-queue push+pop within 3× of bare deque append+popleft",
     _within("core: ready-queue push+pop", "collections.deque", 3)),
    ("core: delayed-heap pop at 1M entries ≥ 4× faster than heapq tuples",
     _speedup("core: delayed heap, pop 1M", "heapq tuples", 4)),
    ("core: ≤ 40 B per queued entry beyond the job (ReadyQueue, DelayedHeap)",
     _at_most("core: bytes per queued entry (beyond the job)", "bytes_per_entry", 40, "B")),
    ("queue: end-to-end jobs/s ≥ 5× ThreadPoolExecutor", _speedup(E2E_GROUP, "ThreadPoolExecutor", 5)),
    ("queue: end-to-end jobs/s ≥ 20× huey", _speedup(E2E_GROUP, "huey", 20)),
    ("queue: delayed-job lateness p99 ≤ 1 ms",
     _at_most("queue: delayed-job lateness", "p99_ms", 1.0, "ms")),
    ("queue: enqueue→start p50 ≤ 20 µs, idle pool",
     _at_most("queue: enqueue->start latency, idle pool", "p50_us", 20.0, "µs")),
    ("queue: ≤ 200 B per queued job, job included",
     _at_most("queue: bytes per queued job (job included)", "bytes_per_job", 200, "B")),
    ("queue: 10,000 job types ≥ 0.5× the 1-type jobs/s (4 workers, limits 1–4, round robin)",
     _types_vs_one("10,000", 0.5)),
    ("queue: 1,000 job types ≥ 0.8× the 1-type jobs/s", _types_vs_one("1,000", 0.8)),
    ("queue: registering 10,000 job types < 50 ms", _round_under(REGISTER_GROUP, 0.050)),
    ("queue: enqueue→start p50 ≤ 0.8× ThreadPoolExecutor's, interleaved in one run",
     _metric_vs(INTERLEAVED_GROUP, "p50_us", "ThreadPoolExecutor", 0.8)),
    ("async: 10,000 jobs awaiting sleep(5 ms) at concurrency 500 ≥ 0.8× asyncio.gather + Semaphore(500)",
     _speedup(ASYNC_SLEEP_GROUP, "asyncio.gather", 0.8)),
    ("async: the same ≥ 5× ThreadPoolExecutor(64) running time.sleep(5 ms)",
     _speedup(ASYNC_SLEEP_GROUP, "ThreadPoolExecutor(64)", 5)),
    ("async: end-to-end no-op jobs/s (job creation included) ≥ 1× an asyncio.Queue drained by consumer tasks",
     _speedup(ASYNC_NOOP_GROUP, "asyncio.Queue", 1)),
    ("async: enqueue→start p50 ≤ 50 µs, idle queue",
     _at_most(ASYNC_LATENCY_GROUP, "p50_us", 50.0, "µs")),
    ("durable: one producer's enqueue ≥ 1.5× the faster of huey SqliteHuey / persist-queue (NORMAL)",
     _vs_fastest_peer(DURABLE.format("NORMAL"), 1.5, "tinymq enqueue", peers=("huey", "persist-queue"))),
    ("durable: 4 producer threads ≥ 2× one producer's enqueue rate (group commit)", _threads_vs_one(2)),
    ("durable: 4 producer threads ≥ 2× one producer's enqueue rate under synchronous=FULL (group commit "
     "shares each commit's fsync)", _threads_vs_one(2, "FULL")),
    ("durable: enqueue_many in batches of 100 ≥ 150k jobs/s",
     _rate(DURABLE.format("NORMAL"), 150_000, "tinymq enqueue_many(100)")),
    ("durable end to end (enqueue, run, delete; 4 workers) ≥ 5× huey SqliteHuey + consumer",
     _speedup(DURABLE_E2E, "huey", 5)),
    ("durable end to end (enqueue, run, delete; 4 workers) ≥ 5× persist-queue get/ack",
     _speedup(DURABLE_E2E, "persist-queue", 5)),
    ("rate limit: a type limited to 1,000 starts/s holds its rate within 1% over 3 s",
     _rate_held(1.0)),
    ("rate limit: a full-speed type beside it keeps ≥ 0.9× its jobs/s alone", _full_speed_kept(0.9)),
    ("redis: end to end ≥ 20k jobs/s (2 worker processes × 4 threads, enqueue_many(100))",
     _rate(REDIS_E2E, 20_000)),
    ("redis: end to end ≥ 8× the fastest peer (RQ, arq, saq, dramatiq, huey)", _vs_fastest_peer(REDIS_E2E, 8)),
    ("redis: enqueue from one thread ≥ 10k jobs/s", _rate(REDIS_ENQUEUE, 10_000, beside="PING")),
    ("redis: enqueue_many(100) ≥ 150k jobs/s", _rate(REDIS_MANY, 150_000)),
    ("redis: enqueue→start p50 ≤ 0.5 ms, idle workers", _at_most(REDIS_LATENCY, "p50_us", 500, "µs")),
    ("redis: delayed-job lateness p99 ≤ 5 ms", _at_most(REDIS_LATENESS, "p99_ms", 5, "ms")),
    ("redis: ≤ 15 Redis commands per job (those inside Lua included), enqueue + run",
     _at_most(REDIS_E2E, "commands_per_job", 15, "")),
    ("redis: ≤ 0.1 round trips per job, enqueue + run", _at_most(REDIS_E2E, "round_trips_per_job", 0.1, "")),
    ("redis: a SIGKILLed worker's jobs start again within lease + lease/4", _restart_within_lease(0.25)),
]


def goal_lines(groups: Dict[str, List[Bench]]) -> List[str]:
    lines = ["| Goal | Measured | Met |", "|---|---|:---:|"]
    for text, check in GOALS:
        result = check(groups)
        if result is None:
            lines.append(f"| {text} | not measured | — |")
        else:
            measured, met = result
            lines.append(f"| {text} | {measured} | {'yes' if met else '**no**'} |")
    return lines


# --- markdown ---------------------------------------------------------------------------

def markdown(benches: List[Bench], machine: Dict[str, Any], commands: List[str], dates: List[str],
             svg_name: Optional[str]) -> str:
    groups = by_group(benches)
    tinymq = machine.get("tinymq", {})
    peers = machine.get("peers", {})
    cpu = machine.get("cpu_model") or (machine.get("cpu") or {}).get("brand_raw", "?")
    core = ("compiled (Cython)" if tinymq.get("compiled_core_built") and not tinymq.get("TINYMQ_NO_EXTENSIONS")
            else "pure Python only")
    out = [
        "# tinymq benchmarks",
        "",
        "Every case runs tinymq and the thing a Python user would use instead in the same run, "
        "on the same machine; ratios are medians against medians. "
        "“is … better” columns read: how many times better that tinymq contender is than the row "
        "(faster, or fewer bytes / less latency); below 1× means the row wins.",
        "",
    ]
    if svg_name:
        out += [f"![tinymq benchmarks]({svg_name})", ""]
    out += ["## Goals", ""] + goal_lines(groups) + [""]
    out += [
        "## Machine",
        "",
        f"- CPU: {cpu}, {machine.get('cores', '?')} cores; {machine.get('system', '')} "
        f"{machine.get('release', '')}",
        f"- Python {machine.get('python_version', '?')} ({machine.get('python_implementation', '?')})",
        f"- tinymq {tinymq.get('version', '?')}, core measured: {core} "
        f"(the pure-Python twin is measured in the same run)",
        "- peers: " + ", ".join(f"{k} {v}" for k, v in peers.items()),
        f"- date: {', '.join(sorted(set(d[:19] for d in dates))) or datetime.date.today().isoformat()}",
        "- command:",
        "",
        "```",
        *commands,
        f"python bench/report.py {' '.join(sys.argv[1:]) if sys.argv[1:] else '...'}",
        "```",
        "",
        f"The machine is shared and noisy (2 cores). Every figure is the median over "
        f"{max((b.runs for b in benches), default=1)} run(s) of the whole suite (each run's figure "
        "being itself a median over rounds); compare ratios, not absolute numbers across machines.",
        "",
        "## Results",
        "",
    ]
    for name, members in groups.items():
        out += [f"### {name}", ""] + group_table(members) + [""]
    out += [
        "## Method",
        "",
        "- Times are pytest-benchmark medians over rounds; *per op* divides a round by the "
        "operations in it (push+pop pairs, pushes, jobs).",
        "- Core push+pop: one push then one pop per pair, 10,000 pairs per round, through the "
        "core's fastest public path (`push`, `pop`, `release(type)`, the type registered as a "
        "running queue has it), each pair with a new job, as enqueue gets (a job the queue holds "
        "unfinished is refused); baselines use `put`/`get`, `heappush`/`heappop` each under a "
        "`Lock`, and `append`/`popleft`.",
        "- Delayed heap: 1,000,000 pushes at random run_at; the pop case drains the filled heap with "
        "1,000 `pop_due(now)` calls (how the scheduler's move_due takes them off the heap); the baseline pops `(run_at, seq, job)` "
        "tuples with `heapq` the same way, without a lock.",
        "- Bytes: measured in a fresh interpreter, two ways: the resident-set growth "
        "(`/proc/self/statm`, sees C `malloc` of the compiled core) and `tracemalloc` (exact for "
        "Python objects, blind to raw `malloc`); the table's headline is the larger. Core entries hold "
        "one shared job, so only the container's cost is counted; the queue case creates a job per entry.",
        "- End to end: a round enqueues N fresh jobs (job creation included) into an idle, started "
        "pool of 4 worker threads and waits until all ran; N differs per contender so rounds last "
        "about 0.3–2 s; the rate is N / median. huey runs a real consumer with 4 worker threads "
        "(idle back-off shortened to 1–10 ms so it does not measure sleeping); dramatiq uses its "
        "default middleware.",
        "- Latency: 1,000 jobs, the producer sleeps 1 ms between them, the job records "
        "`perf_counter()` when it starts. Lateness: 2,000 jobs due at random times over 2 s, "
        "lateness = start − run_at; baselines are the Go seed's design, a thread waking every "
        "50 / 100 ms that moves due jobs to the workers, and the careful stdlib design (heapq + "
        "Condition, sleeping until the earliest run_at), which shows how much of the tail is the "
        "machine. Both run 3 rounds; the table gives the median of the rounds' percentiles and "
        "the worst round's p99.",
        "- Job types: a round enqueues N no-op jobs round robin over 1, 100, 1,000 or 10,000 "
        "registered types (type i may run 1 + i % 4 jobs at once) into a started pool of 4 workers "
        "and waits for all; ThreadPoolExecutor runs the same no-op jobs (it has no types). "
        "Registering: 10,000 `register_executor` calls on a new Queue, against a dict of "
        "(function, `BoundedSemaphore`). Interleaved latency: tinymq and ThreadPoolExecutor take "
        "turns, 5 rounds of 1,000 jobs each, with one method (stamp `perf_counter()`, call "
        "`enqueue`/`submit`, sleep 1 ms; the executor's first line takes the difference); the "
        "table gives the median of the rounds' percentiles. See `bench/test_bench_scale.py`.",
        "- Durable enqueue: 1,000 jobs per round, every contender on a fresh file with the same "
        "`PRAGMA synchronous`; a job is committed to SQLite when its enqueue returns, in every "
        "contender, each in WAL mode (checked on its connections), under FULL with one fdatasync "
        "of its -wal per commit. One producer thread, or 4 at once (tinymq commits concurrent "
        "producers' writes together, under FULL one fsync for them all). End to end: enqueue N jobs and run them to completion with 4 worker threads, "
        "every step durable (tinymq: enqueue, a running mark, a delete; huey: its consumer; "
        "persist-queue: get and ack). See `bench/test_bench_durable.py`.",
        "- Redis: the bench starts its own `redis-server` (loopback, temp dir, `appendonly yes`, "
        "`appendfsync everysec`) and empties it before each contender's cases. Each peer (RQ, arq, "
        "saq, dramatiq's RedisBroker, huey's RedisHuey) runs from its own venv with pinned versions "
        "(`bench/redis_peers/setup.sh`), its producer in a subprocess, its workers from its own "
        "worker CLI; every job writes its start to a FIFO the bench reads, the same cost for all. "
        "End to end: 2 worker processes × 4 threads (RQ: 8 SimpleWorker processes; arq and saq: their "
        "default 10 jobs in flight per process), one producer enqueueing in batches of 100 (bulk APIs "
        "where they exist; what a user writes instead where not, named in the row), time from the "
        "first enqueue until every job started. The cases without workers (`enqueue`, "
        "`enqueue_many(100)`, the PING floor) run the producer and the server's main thread on one "
        "CPU (this host's idle vCPUs halt: a reply that wakes the other CPU costs ~40-50 µs more, and "
        "the scheduler's choice of one CPU or two, left to it, read 7k or 14k/s for one build); "
        "`other_programs_cpus` is how many CPUs other programs kept busy meanwhile. "
        "Commands per job count those run inside Lua and "
        "MULTI (`total_commands_processed`); round trips per job count the server's reply writes "
        "(`total_writes_processed`: one per client call, whether one command, a pipeline or a "
        "script; checked by a calibration at start). tinymq's have a floor in the end to end case: "
        "a worker process asks for at most its free worker threads plus one job a call (strict "
        "priority across processes, docs/redis.md), its settles riding in the same call, so 4 "
        "threads take at most 5 jobs a round trip: 1/5 + 1/100 for `enqueue_many(100)` = 0.21 (the "
        "jobs' type limit, 10 by default and global, also leaves the 2 processes 5 each). "
        "Latency: one job every ~1 ms into idle workers. Lateness: jobs due at random times over 2 s. "
        "Restart: a worker holding 4 running jobs is SIGKILLed; the time until the last of them "
        "starts again in the other worker. "
        "See `bench/test_bench_redis.py`; alone: `python -m pytest bench/test_bench_redis.py "
        "--benchmark-only` (it runs `bench/redis_peers/setup.sh` to make the peers' venvs).",
        "",
    ]
    return "\n".join(out)


# --- svg ---------------------------------------------------------------------------------

def svg(benches: List[Bench]) -> str:
    """Two panels: end-to-end jobs/s per contender, and tinymq's advantage over each baseline."""
    groups = by_group(benches)
    width, left, right = 900, 300, 90
    plot = width - left - right
    parts: List[str] = []
    y = 20

    def text(x: float, y: float, s: str, anchor: str = "start", size: int = 12, weight: str = "normal") -> None:
        parts.append(f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" '
                     f'font-weight="{weight}">{html.escape(s)}</text>')

    def bar(y: float, length: float, colour: str) -> None:
        parts.append(f'<rect x="{left}" y="{y:.1f}" width="{max(length, 1):.1f}" height="16" '
                     f'fill="{colour}" rx="2"/>')

    e2e = sorted(groups.get(E2E_GROUP, []), key=lambda b: -b.rate)
    if e2e:
        text(10, y + 4, "End-to-end no-op jobs/s, 4 worker threads (higher is better)", size=15, weight="bold")
        y += 22
        top = max(b.rate for b in e2e)
        for bench in e2e:
            text(left - 8, y + 12, bench.name, anchor="end")
            bar(y, plot * bench.rate / top, "#2b6cb0" if bench.is_tinymq else "#a0aec0")
            text(left + plot * bench.rate / top + 6, y + 12, fmt_rate(bench.rate).replace(" /s", "/s"))
            y += 22
        y += 18

    rows: List[Tuple[str, float]] = []
    for name, members in groups.items():
        ours = primary(members)
        if ours is None:
            continue
        for bench in sorted((b for b in members if not b.is_tinymq and not b.is_floor), key=lambda b: b.value()[1]):
            r = ratio(bench, ours)
            if r == r and r > 0:
                short = SHORT.get(name, name.split(": ", 1)[-1])
                rows.append((f"{short}: vs {bench.name.split(' (')[0]}", r))
    if rows:
        text(10, y + 4, "tinymq (compiled when built) vs each baseline: × better, log scale", size=15,
             weight="bold")
        y += 18
        text(10, y + 4, "green: tinymq better (faster, fewer bytes, less latency); red: the baseline "
             "is better", size=11)
        y += 16
        low = min(0.5, min(r for _, r in rows))
        high = max(2.0, max(r for _, r in rows))
        lo, hi = math.log10(low), math.log10(high)

        def xpos(r: float) -> float:
            return left + plot * (math.log10(r) - lo) / (hi - lo)

        top_y = y
        for label, r in rows:
            text(left - 8, y + 12, label if len(label) < 46 else label[:44] + "…", anchor="end", size=11)
            x0, x1 = xpos(1.0), xpos(r)
            colour = "#2f855a" if r >= 1 else "#c53030"
            parts.append(f'<rect x="{min(x0, x1):.1f}" y="{y:.1f}" width="{max(abs(x1 - x0), 1):.1f}" '
                         f'height="16" fill="{colour}" rx="2"/>')
            text(max(x0, x1) + 6, y + 12, fmt_ratio(r), size=11)
            y += 20
        x1 = xpos(1.0)
        parts.append(f'<line x1="{x1:.1f}" y1="{top_y - 4:.1f}" x2="{x1:.1f}" y2="{y:.1f}" '
                     f'stroke="#1a202c" stroke-width="1"/>')
        text(x1, y + 14, "1×", anchor="middle", size=11)
        y += 24
    height = y + 10
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" font-family="Helvetica, Arial, sans-serif">\n'
            f'<rect width="100%" height="100%" fill="white"/>\n' + "\n".join(parts) + "\n</svg>\n")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", nargs="+", help="pytest-benchmark --benchmark-json files")
    parser.add_argument("--md", default=os.path.join(ROOT, "docs", "benchmarks.md"))
    parser.add_argument("--svg", default=os.path.join(ROOT, "docs", "benchmarks.svg"))
    args = parser.parse_args(argv)
    benches, machine, commands, dates = load(args.json)
    if not benches:
        parser.error("no benchmarks in " + ", ".join(args.json))
    for path in (args.md, args.svg):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    svg_name = os.path.relpath(args.svg, os.path.dirname(os.path.abspath(args.md)))
    with open(args.svg, "w") as handle:
        handle.write(svg(benches))
    with open(args.md, "w") as handle:
        handle.write(markdown(benches, machine, commands, dates, svg_name))
    print(f"wrote {args.md} and {args.svg} from {len(benches)} benchmarks")
    groups = by_group(benches)
    for line in goal_lines(groups)[2:]:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
