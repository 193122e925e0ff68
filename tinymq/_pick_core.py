"""Choose the compiled core or its pure-Python twin, once, at import.

``_core`` / ``_core_py``: the queue's structures. TINYMQ_NO_EXTENSIONS=1 (read
here and at build time) selects the pure twin; so does any interpreter other
than CPython, or an install where the compiled core was not built (a machine
without a C compiler).
"""
import importlib
import os
import platform
import warnings

__all__ = ["core", "HAS_EXTENSION"]

if os.environ.get("TINYMQ_NO_EXTENSIONS", "") not in ("", "0") or (
    platform.python_implementation() != "CPython"
):
    from . import _core_py as core

    HAS_EXTENSION = False
else:
    try:
        # (not "from . import _core": a missing one would be told as a circular import of tinymq)
        core = importlib.import_module(f"{__package__}._core")  # (the checker reads _core_py: see _core.pyi)

        HAS_EXTENSION = True
    except ImportError as exc:  # not built: no compiler at install time
        if os.environ.get("TINYMQ_REQUIRE_EXTENSIONS", "") not in ("", "0"):
            raise
        from . import _core_py as core

        HAS_EXTENSION = False
        warnings.warn(
            f"tinymq's compiled core is not available ({exc}); using the pure-Python core, "
            "which behaves the same but is several times slower. Reinstall with a C compiler, "
            "or set TINYMQ_NO_EXTENSIONS=1 to choose the pure core and silence this warning.",
            RuntimeWarning,
            stacklevel=2,
        )
