"""``python -m tinymq`` runs, exits 0, and shows each feature working.

The demo runs once per core: with the environment inherited (the default
core) and with TINYMQ_NO_EXTENSIONS=1 (the pure twin); its first line must
name the core that really ran.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 60


def run(args, no_extensions):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    if no_extensions:
        env["TINYMQ_NO_EXTENSIONS"] = "1"
    else:
        env.pop("TINYMQ_NO_EXTENSIONS", None)
    return subprocess.run(
        [sys.executable, *args], cwd=str(ROOT), env=env,
        capture_output=True, text=True, timeout=TIMEOUT,
    )


@pytest.fixture(scope="module", params=["default core", "pure core"])
def demo(request):
    no_extensions = request.param == "pure core"
    result = run(["-m", "tinymq"], no_extensions)
    assert result.returncode == 0, f"--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    probe = run(["-c", "import tinymq; print(tinymq.__version__, tinymq.HAS_EXTENSION)"], no_extensions)
    version, has_extension = probe.stdout.split()
    return result.stdout, version, has_extension == "True", no_extensions


def section(output, number):
    """The lines of section ``number`` ("3. ..." up to the next heading)."""
    match = re.search(rf"^{number}\. .*?(?=^\d\. |\Z)", output, re.MULTILINE | re.DOTALL)
    assert match, f"no section {number} in:\n{output}"
    return match.group(0).splitlines()


def test_header_names_the_core(demo):
    out, version, has_extension, no_extensions = demo
    core = "compiled core" if has_extension else "pure-Python core"
    assert out.splitlines()[0] == f"tinymq {version} ({core})"
    if no_extensions:
        assert core == "pure-Python core"


def test_priority_order(demo):
    emails = [line.split("Sending email: ")[1] for line in section(demo[0], 1) if "Sending email" in line]
    assert emails == [
        "Password reset", "Security alert",          # HIGH, FIFO
        "Welcome email", "Weekly digest",             # MEDIUM
        "Monthly newsletter", "Cleanup reminder",     # LOW
    ], demo[0]


def test_delayed_jobs_start_on_time(demo):
    lines = [line for line in section(demo[0], 2) if "planned" in line]
    # In the order they started: each job stamps its start, then prints, and on a loaded machine
    # a worker thread can be preempted between the two while another job starts and prints.
    lines.sort(key=lambda line: float(re.search(r"started\s+([-+]?[\d.]+) ms", line).group(1)))
    assert [line.split()[0] for line in lines] == [
        "enqueue_delayed(0.2)", "run_at=now+0.4", "enqueue_delayed(0.6)",
    ]
    for line in lines:
        late = float(re.search(r"late\s+(-?[\d.]+) ms", line).group(1))
        assert 0 <= late < 250, line


def test_retry_backoff(demo):
    lines = section(demo[0], 3)
    offsets = [float(m.group(1)) for m in
               (re.search(r"attempt \d at\s+\+([\d.]+) ms", line) for line in lines) if m]
    assert len(offsets) == 4, lines
    gaps = [later - earlier for earlier, later in zip(offsets, offsets[1:])]
    for gap, planned in zip(gaps, (100, 200, 400)):
        assert planned <= gap < planned + 250, gaps
    attempts = [line for line in lines if "attempt" in line]
    assert [line.rsplit(": ", 1)[1] for line in attempts] == ["fails"] * 3 + ["succeeds"], attempts


def test_concurrency_limit(demo):
    text = "\n".join(section(demo[0], 4))
    match = re.search(r"max running at once: (\d+) \(limit 2; get_stats\(\) saw at most (\d+) active\)", text)
    assert match, text
    assert match.group(1) == "2" and match.group(2) == "2", text


def test_timeout(demo):
    text = "\n".join(section(demo[0], 5))
    assert "small export: all 2 chunks done" in text
    assert re.search(r"huge export: cancelled after \d+ chunks; returning", text), text
    assert "on_failure('huge export', 'retries_exhausted', JobTimeout: " in text


def test_stats_table(demo):
    lines = section(demo[0], 6)
    counters = {}
    for line in lines:
        match = re.fullmatch(r"   (jobs_\w+|workers)\s+(\d+)", line)
        if match:
            counters[match.group(1)] = int(match.group(2))
    assert counters == {
        "workers": 4, "jobs_enqueued": 18, "jobs_succeeded": 17, "jobs_failed": 1,
        "jobs_retried": 3, "jobs_timed_out": 1, "jobs_evicted": 0,
    }, lines
    # Aligned: the nine counter rows (right after the heading) share one width.
    rows = [line for line in lines[1:] if line.strip()][:9]
    assert len({len(line) for line in rows}) == 1, rows
    executors = {}
    for line in lines:
        match = re.fullmatch(r"   (\w+)\s+(\d+)\s+(\d+)", line)
        if match:
            executors[match.group(1)] = (int(match.group(2)), int(match.group(3)))
    assert executors == {
        "email": (0, 1), "export": (0, 10), "flaky": (0, 10), "reminder": (0, 10), "thumbnail": (0, 2),
    }, lines
