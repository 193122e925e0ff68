"""Shared pieces of the benchmark suite: which cores to measure, machine info, helpers.

Every case measures tinymq and what a user would use instead in the same run,
under one pytest-benchmark ``group``. Each benchmark records in ``extra_info``:

- ``contender``: the name shown in the report ("tinymq (compiled)", "ThreadPoolExecutor", ...);
- ``tinymq``: True for tinymq itself, False for a baseline;
- ``ops``: operations per round (jobs, push+pop pairs, ...), so the report can
  show time per op and ops/s; ``op`` names the operation;
- ``metrics``: figures that are not a time per round (latency percentiles,
  bytes per entry), lower is better; ``kind`` is "metric" when the round time
  itself means nothing.
"""
import contextlib
import importlib
import os
import platform
import subprocess
import sys
from typing import Any, Dict, Iterator, List

import pytest

import tinymq

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
PURE_ONLY = os.environ.get("TINYMQ_NO_EXTENSIONS", "") not in ("", "0")
CORE_NAMES = ("compiled", "pure")


def load_core(name: str) -> Any:
    """The core module named ``name``; skips the test when the compiled one is unavailable."""
    if name == "pure":
        return importlib.import_module("tinymq._core_py")
    if PURE_ONLY:
        pytest.skip("TINYMQ_NO_EXTENSIONS=1: the compiled core is not measured")
    try:
        return importlib.import_module("tinymq._core")
    except ImportError as exc:
        pytest.skip(f"the compiled core is not built ({exc})")


@contextlib.contextmanager
def queue_core(name: str) -> Iterator[Any]:
    """Make Queues built inside the block use core ``name`` (both cores in one run)."""
    core = load_core(name) if name == "compiled" else importlib.import_module("tinymq._core_py")
    import tinymq._dispatch as dispatch
    import tinymq.config as config
    import tinymq.job as job

    saved = dispatch.core, config.core, job.core
    dispatch.core = config.core = job.core = core
    try:
        yield core
    finally:
        dispatch.core, config.core, job.core = saved


def assert_queue_core(queue: Any, core: Any) -> None:
    """Guard against a façade change that would silently measure the wrong core."""
    module = type(queue._ready).__module__
    assert module == core.__name__, f"the Queue uses {module}, expected {core.__name__}"


def contender(benchmark: Any, name: str, *, is_tinymq: bool, ops: int = 1, op: str = "round",
              kind: str = "time", **metrics: float) -> None:
    info = benchmark.extra_info
    info["contender"] = name
    info["tinymq"] = is_tinymq
    info["ops"] = ops
    info["op"] = op
    info["kind"] = kind
    if metrics:
        info.setdefault("metrics", {}).update(metrics)


def percentile(samples: List[float], q: float) -> float:
    """The q-th percentile (0..100), nearest rank."""
    ordered = sorted(samples)
    if not ordered:
        return float("nan")
    rank = max(0, min(len(ordered) - 1, int(round(q / 100.0 * len(ordered) + 0.5)) - 1))
    return ordered[rank]


def run_in_subprocess(module: str, function: str, *args: Any) -> Dict[str, Any]:
    """Run ``module.function(*args)`` in a fresh interpreter; it prints one JSON object.

    Memory is measured there: a process that already freed memory would reuse
    it, and an RSS delta would read low.
    """
    import json

    code = (
        f"import sys, json; sys.path.insert(0, {BENCH_DIR!r}); import {module} as m; "
        f"print(json.dumps(m.{function}(*{args!r})))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True, env=dict(os.environ))
    return json.loads(out.stdout.strip().splitlines()[-1])


def rss_bytes() -> int:
    """Resident set size of this process, from /proc/self/statm (all allocations, C ones too)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(dist: str) -> str:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:
        return "not installed"


def pytest_collection_modifyitems(items: List[Any]) -> None:
    for item in items:  # the ini's 120 s suits tests, not a 1M-entry benchmark
        item.add_marker(pytest.mark.timeout(900))


def pytest_benchmark_update_machine_info(config: Any, machine_info: Dict[str, Any]) -> None:
    try:
        importlib.import_module("tinymq._core")
        built = True
    except ImportError:
        built = False
    machine_info["tinymq"] = {
        "version": tinymq.__version__,
        "HAS_EXTENSION": tinymq.HAS_EXTENSION,
        "compiled_core_built": built,
        "TINYMQ_NO_EXTENSIONS": os.environ.get("TINYMQ_NO_EXTENSIONS", ""),
    }
    machine_info["cpu_model"] = cpu_model()
    machine_info["cores"] = os.cpu_count()
    machine_info["peers"] = {name: _version(name) for name in
                             ("huey", "dramatiq", "persist-queue", "redis", "hiredis",
                              "pytest-benchmark", "Cython")}


def pytest_benchmark_update_json(config: Any, benchmarks: Any, output_json: Dict[str, Any]) -> None:
    env = " ".join(f"{k}={os.environ[k]}" for k in ("PYTHONPATH", "TINYMQ_NO_EXTENSIONS")
                   if os.environ.get(k))
    argv = " ".join(["python -m pytest"] + sys.argv[1:])
    output_json["command"] = (env + " " + argv).strip()
