"""Findings of an outsider's attack on rate limits, per-type stats and metrics (attackW).

Each test is a reproducer of a defect a demanding user would meet; a fixed one
runs as a plain test, an open one is marked xfail(strict=True).
"""
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import COMPILED_CORE, PURE_CORE, env_flag

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(code, core_name):
    """Run ``code`` in a fresh interpreter on the core ``core_name``: (returncode, stdout, stderr)."""
    if core_name == COMPILED_CORE and env_flag("TINYMQ_NO_EXTENSIONS"):
        pytest.skip("TINYMQ_NO_EXTENSIONS=1: the compiled core is not in use")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env["TINYMQ_NO_EXTENSIONS"] = "1" if core_name == PURE_CORE else "0"
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=120)
    return done.returncode, done.stdout, done.stderr


# --- a huge max_starts -------------------------------------------------------------------------

@pytest.mark.parametrize("core_name", [PURE_CORE, COMPILED_CORE], ids=["pure", "compiled"])
@pytest.mark.parametrize("max_starts", [2**61, 2**62, 2**63, 2**64])
def test_a_rate_limit_too_large_to_hold_is_refused_naming_it(core_name, max_starts):
    """RateLimit(max_starts) takes any int >= 1; one whose ring of start times cannot exist must be
    refused at registration with an exception naming the value, never crash the interpreter.

    Was: the compiled core sized the ring as ``max_starts * sizeof(double)`` in a Py_ssize_t, so
    2**61 and 2**62 wrapped to a 0-byte ring and the first write segfaulted; the pure core raised
    a bare MemoryError or OverflowError."""
    rc, out, err = run_python(f"""
        from tinymq import ExecutorConfig, Queue, RateLimit
        q = Queue(10)
        try:
            q.register_executor("t", lambda job: None,
                                ExecutorConfig(rate_limit=RateLimit({max_starts}, per=1.0)))
        except Exception as exc:
            print("refused", type(exc).__name__, exc)
        else:
            print("accepted")
        q.stop()
    """, core_name)
    assert rc == 0, (rc, err[-2000:])
    assert out.startswith("refused") and str(max_starts) in out, out
