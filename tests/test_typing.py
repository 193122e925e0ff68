"""tinymq ships py.typed: mypy --strict, run as a user runs it, accepts the package and typical user
code written against its public API (tests/typing_check.py), and rejects each mistake marked there."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_package_and_typical_user_code_type_check(tmp_path):
    pytest.importorskip("mypy", reason="mypy is not installed (it is in the test extra: pip install -e '.[test]')")
    # The project's mypy settings (pyproject.toml), a fresh cache of this run's own, --strict (as
    # there: no Any returned, every generic given its arguments, ...) and --warn-unused-ignores: a
    # mistake in typing_check.py that mypy stops rejecting fails too.
    command = [sys.executable, "-m", "mypy", "--config-file", os.path.join(ROOT, "pyproject.toml"),
               "--cache-dir", str(tmp_path / "mypy-cache"), "--strict", "--warn-unused-ignores",
               "tinymq", os.path.join("tests", "typing_check.py")]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
