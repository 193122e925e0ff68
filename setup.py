"""Build tinymq's compiled core.

TINYMQ_NO_EXTENSIONS=1 skips the compiled core (the pure-Python twin is used).
TINYMQ_REQUIRE_EXTENSIONS=1 turns a failed compile into a build error; without
it, a machine with no C compiler still installs tinymq with the pure core.
TINYMQ_CYTHON_TRACE=1 builds with line tracing, for profiling and coverage.
"""
import os
import platform

from setuptools import setup


def _flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


def _extensions():
    if _flag("TINYMQ_NO_EXTENSIONS") or platform.python_implementation() != "CPython":
        return []
    from Cython.Build import cythonize

    trace = _flag("TINYMQ_CYTHON_TRACE")
    extensions = cythonize(
        ["tinymq/_core.pyx"],
        language_level=3,
        compiler_directives={"linetrace": trace, "binding": trace},
    )
    required = _flag("TINYMQ_REQUIRE_EXTENSIONS")
    for extension in extensions:
        # cythonize() drops Extension(optional=...), so it is set on what it returns.
        extension.optional = not required
        if trace:
            extension.define_macros.append(("CYTHON_TRACE_NOGIL", "1"))
    return extensions


setup(ext_modules=_extensions())
