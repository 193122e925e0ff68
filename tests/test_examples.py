"""Every script in examples/ runs, exits 0, and prints what it claims.

Each example runs in its own interpreter (sys.executable, the environment
inherited, so TINYMQ_NO_EXTENSIONS picks the core as for the rest of the
suite) and its output is checked for the one thing it demonstrates.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
TIMEOUT = 60


def run_example(name):
    env = dict(os.environ)
    # Run against this checkout, whatever the example's own directory is.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name)],
        cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=TIMEOUT,
    )
    assert result.returncode == 0, (
        f"{name} exited {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
    )
    assert "Traceback" not in result.stderr, result.stderr
    return result.stdout


def lines_starting(output, prefixes):
    """The index of the first line starting with each prefix (all must be present)."""
    lines = output.splitlines()
    found = []
    for prefix in prefixes:
        matches = [i for i, line in enumerate(lines) if line.startswith(prefix)]
        assert matches, f"no line starts with {prefix!r} in:\n{output}"
        found.append(matches[0])
    return found


def check_quick_start(out):  # (the README's quick start shows this output)
    assert out.splitlines() == ["Sending email: Password reset", "Sending email: Welcome email",
                                "all emails sent"]


def check_priorities(out):
    payloads = [line.split(None, 2)[2] for line in out.splitlines()]
    assert payloads == [
        "Critical alert", "data", "Regular task", "Another regular task", "Cleanup task",
    ], out


def check_delayed_jobs(out):
    assert "delayed jobs waiting: 5" in out
    order = lines_starting(out, [
        "new_delayed_job(..., 0.1)", "enqueue_delayed(job, 300 ms)",
        "run_at = aware datetime (+0.5 s)", "run_at = now + 0.6 s", "enqueue_delayed(job, 0.9)",
    ])
    assert order == sorted(order), f"delayed jobs ran out of run_at order:\n{out}"
    lateness = [float(ms) for ms in re.findall(r"started (-?[\d.]+) ms late", out)]
    assert len(lateness) == 5, out
    # Never early; generously bounded lateness (the point is "not on the next poll").
    assert all(0 <= late < 250 for late in lateness), out


def check_executor_config(out):
    assert "queue: buffer_size=200, scheduler_interval=0.05, max_delayed_jobs=1000" in out
    assert "executor processor: at most 5 at once" in out
    assert "executor resize: at most 2 at once" in out
    assert "processed 11 jobs" in out
    assert "ValueError: max_concurrent_jobs must be >= 1, got 0" in out


def check_retries(out):
    assert "succeeded on attempt 4 after 3 failures; jobs_retried=3, jobs_succeeded=1" in out
    offsets = [int(ms) for ms in re.findall(r"^attempt \d at \+\s*(\d+) ms", out, re.MULTILINE)]
    assert len(offsets) == 4, out
    gaps = [later - earlier for earlier, later in zip(offsets, offsets[1:])]
    # Retry k waits 50 * 2**(k-1) ms after the failed attempt ended (1 ms of rounding): no load
    # makes a gap shorter. The upper bound catches a backoff in the wrong unit or scale; a loaded
    # machine delayed a print by over 250 ms now and then.
    for gap, planned in zip(gaps, (50, 100, 200)):
        assert planned - 1 <= gap < planned + 2000, f"backoff gaps {gaps}:\n{out}"


def check_monitoring(out):
    before, running, after = out.split("-- ")[1:4]
    assert before.startswith("before start_dispatcher()")
    for line in ("High priority jobs: 3", "Medium priority jobs: 1", "Low priority jobs: 1",
                 "Delayed jobs: 2/10000", "Executor report: 0/2 active"):
        assert line in before, before
    assert "Executor report: 1/2 active" in running, running
    assert "Delayed jobs: 0/10000" in after, after
    assert "enqueued=7 succeeded=7 failed=0 retried=0 timed_out=0 evicted=0" in after, after


def check_tags(out):
    assert "processing 'data' tagged priority=urgent, user=123" in out
    assert "processing 'more data' tagged source=import, user=456" in out


def check_concurrency_control(out):
    most = int(re.search(r"max transcodes running at once: (\d+) \(limit 3\)", out).group(1))
    assert most == 3, out
    # The saturated type did not hold up the other one.
    assert "pings done while transcodes were running: 5 of 5" in out


def check_error_handling(out):
    for line in (
        "QueueFull: the ready buffer is full (2 jobs)",
        "on_failure: orphan job -> no_executor",
        "on_failure: order #1 -> retries_exhausted (RuntimeError: card declined)",
        "export job enqueued with block=True once a worker made room",
        "on_failure: nightly export -> retries_exhausted (JobTimeout: ",
        "export noticed its timeout and returns",
        "on_failure: reminder due in 0.1 s -> evicted",
        "ran reminder due in 0.2 s",
        "ran reminder due in 0.3 s",
        "failed=3 retried=1 timed_out=1 evicted=1",
    ):
        assert line in out, f"missing {line!r} in:\n{out}"
    assert "ran reminder due in 0.1 s" not in out
    # Failures are logged too, not only passed to callbacks.
    assert re.search(r"log: job \S+ \(nobody-handles-this\) failed permanently \(no_executor\)", out), out


def check_persistence(out):
    assert "PersistenceError: cannot serialise the payload" in out
    assert "run 1 stopped with 3 jobs accepted and none run" in out
    assert "second store refused: " in out and "is owned by a live store (pid" in out
    assert "stored between the runs: {'ready': 2, 'delayed': 1, 'running': 0, 'dead': 0, 'corrupt': 0}" in out
    assert "run 2 recovered 3 jobs" in out
    for message in ("Welcome email", "Password reset", "Follow-up"):
        assert f"ran {message!r} (saved by run 1)" in out, out
    assert out.count("(saved by run 1)") == 3, out  # each recovered job ran exactly once
    assert "left in the store after join(): 0" in out
    assert "ran 'Custom store' (saved by run 3)" in out
    assert "custom store holds 0 jobs after join()" in out


def check_fastapi_app(out):
    for line in ("cancel slow: cancelled", "cancel again: 404", "ok: delivered", "gone: permanent_failure",
                 "busy: delivered", "slow: cancelled", "cancelled: 1"):
        assert line in out.splitlines(), out


NEEDS = {"fastapi_app.py": ("fastapi", "httpx")}  # examples that need packages outside the test extra

CHECKS = {
    "quick_start.py": check_quick_start,
    "priorities.py": check_priorities,
    "delayed_jobs.py": check_delayed_jobs,
    "executor_config.py": check_executor_config,
    "retries.py": check_retries,
    "monitoring.py": check_monitoring,
    "tags.py": check_tags,
    "concurrency_control.py": check_concurrency_control,
    "error_handling.py": check_error_handling,
    "persistence.py": check_persistence,
    "fastapi_app.py": check_fastapi_app,
}


def test_every_example_is_checked():
    on_disk = sorted(path.name for path in EXAMPLES.glob("*.py"))
    assert on_disk == sorted(CHECKS), "every examples/*.py needs an entry in CHECKS"


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_example(name):
    for module in NEEDS.get(name, ()):
        pytest.importorskip(module)
    CHECKS[name](run_example(name))
