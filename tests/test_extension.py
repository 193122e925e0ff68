"""Which core runs: a default install uses the compiled one; TINYMQ_NO_EXTENSIONS=1
selects the pure twin; HAS_EXTENSION tells the truth either way."""
import os
import subprocess
import sys

import pytest

import tinymq
import tinymq._pick_core

PURE_CORE = "tinymq._core_py"
COMPILED_CORE = "tinymq._core"


def env_flag(name):
    """The switch convention of setup.py and tinymq._pick_core: set and not "0"."""
    return os.environ.get(name, "") not in ("", "0")


def test_has_extension_tells_which_core_runs():
    expected = COMPILED_CORE if tinymq.HAS_EXTENSION else PURE_CORE
    assert tinymq._pick_core.core.__name__ == expected
    assert not hasattr(tinymq._pick_core, "codec")


@pytest.mark.skipif(not env_flag("TINYMQ_NO_EXTENSIONS"), reason="TINYMQ_NO_EXTENSIONS is not set")
def test_no_extensions_selects_the_pure_core():
    assert tinymq.HAS_EXTENSION is False
    assert tinymq._pick_core.core.__name__ == PURE_CORE


@pytest.mark.skipif(env_flag("TINYMQ_NO_EXTENSIONS"), reason="TINYMQ_NO_EXTENSIONS=1 selects the pure core")
def test_default_install_uses_the_compiled_core():
    if not env_flag("TINYMQ_REQUIRE_EXTENSIONS"):
        pytest.skip("set TINYMQ_REQUIRE_EXTENSIONS=1 (as CI does) to require the compiled core")
    assert tinymq.HAS_EXTENSION is True
    assert tinymq._pick_core.core.__name__ == COMPILED_CORE


def _pick_in_subprocess(**env_overrides):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TINYMQ_")}
    env.update(env_overrides, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    code = "import tinymq, tinymq._pick_core as p; print(tinymq.HAS_EXTENSION, p.core.__name__)"
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    return result


def test_the_switch_works_at_import_time():
    """Whatever this process chose, a fresh interpreter with the switch set picks the pure core."""
    result = _pick_in_subprocess(TINYMQ_NO_EXTENSIONS="1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", PURE_CORE]


def test_switch_value_zero_means_unset():
    result = _pick_in_subprocess(TINYMQ_NO_EXTENSIONS="0")
    assert result.returncode == 0, result.stderr
    picked = tuple(result.stdout.split())
    assert picked in (("True", COMPILED_CORE), ("False", PURE_CORE))
    if env_flag("TINYMQ_REQUIRE_EXTENSIONS") and not env_flag("TINYMQ_NO_EXTENSIONS"):
        assert picked == ("True", COMPILED_CORE)
