# The checker's view of the compiled core (_core.pyx): the names of its pure twin, _core_py.py,
# with their types. Both cores offer the same names with the same behaviour (the suite runs on
# each, and tests/test_typing.py checks that the compiled one has every name the twin has).
from ._core_py import *
from ._core_py import __all__ as __all__
