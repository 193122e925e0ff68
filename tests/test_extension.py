"""Which modules run: a default install uses the compiled core and codec;
TINYMQ_NO_EXTENSIONS=1 selects the pure twins; HAS_EXTENSION tells the truth either way."""
import os
import subprocess
import sys

import pytest

import tinymq
import tinymq._pick_core

PURE_CORE = "tinymq._core_py"
COMPILED_CORE = "tinymq._core"
PURE_CODEC = "tinymq._codec_py"
COMPILED_CODEC = "tinymq._codec"


def env_flag(name):
    """The switch convention of setup.py and tinymq._pick_core: set and not "0"."""
    return os.environ.get(name, "") not in ("", "0")


def test_has_extension_tells_which_core_runs():
    expected = (COMPILED_CORE, COMPILED_CODEC) if tinymq.HAS_EXTENSION else (PURE_CORE, PURE_CODEC)
    assert (tinymq._pick_core.core.__name__, tinymq._pick_core.codec.__name__) == expected


@pytest.mark.skipif(not env_flag("TINYMQ_NO_EXTENSIONS"), reason="TINYMQ_NO_EXTENSIONS is not set")
def test_no_extensions_selects_the_pure_core():
    assert tinymq.HAS_EXTENSION is False
    assert tinymq._pick_core.core.__name__ == PURE_CORE
    assert tinymq._pick_core.codec.__name__ == PURE_CODEC


@pytest.mark.skipif(env_flag("TINYMQ_NO_EXTENSIONS"), reason="TINYMQ_NO_EXTENSIONS=1 selects the pure core")
def test_default_install_uses_the_compiled_core():
    if not env_flag("TINYMQ_REQUIRE_EXTENSIONS"):
        pytest.skip("set TINYMQ_REQUIRE_EXTENSIONS=1 (as CI does) to require the compiled core")
    assert tinymq.HAS_EXTENSION is True
    assert tinymq._pick_core.core.__name__ == COMPILED_CORE
    assert tinymq._pick_core.codec.__name__ == COMPILED_CODEC


def _pick_in_subprocess(**env_overrides):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TINYMQ_")}
    env.update(env_overrides, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    code = "import tinymq, tinymq._pick_core as p; print(tinymq.HAS_EXTENSION, p.core.__name__, p.codec.__name__)"
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    return result


def test_the_switch_works_at_import_time():
    """Whatever this process chose, a fresh interpreter with the switch set picks the pure core."""
    result = _pick_in_subprocess(TINYMQ_NO_EXTENSIONS="1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", PURE_CORE, PURE_CODEC]


def test_switch_value_zero_means_unset():
    result = _pick_in_subprocess(TINYMQ_NO_EXTENSIONS="0")
    assert result.returncode == 0, result.stderr
    picked = tuple(result.stdout.split())
    assert picked in (("True", COMPILED_CORE, COMPILED_CODEC), ("False", PURE_CORE, PURE_CODEC))
    if env_flag("TINYMQ_REQUIRE_EXTENSIONS") and not env_flag("TINYMQ_NO_EXTENSIONS"):
        assert picked == ("True", COMPILED_CORE, COMPILED_CODEC)
