"""The harness: a hypothesis test that runs past pytest-timeout's limit fails, and the run goes on.

pytest-timeout's signal handler raises pytest's ``Failed``, which hypothesis takes for a failing
example: it shrank and replayed the test with no timer armed, and a run hung for minutes.
tests/conftest.py raises ``TestTimedOut`` instead, which hypothesis lets through.
"""
import os

pytest_plugins = ["pytester"]

CONFTEST = os.path.join(os.path.dirname(__file__), "conftest.py")

# Every example sleeps past the limit; each of the others would too, were any replayed.
SLOW_PROPERTY = """
import time
from hypothesis import given, settings, strategies as st

CALLS = []

@settings(max_examples=50, deadline=None, database=None)
@given(st.lists(st.integers(0, 1000), min_size=5, max_size=20))
def test_slow_property(xs):
    CALLS.append(xs)
    time.sleep(0.4)

def test_next():
    assert len(CALLS) < 10, f"hypothesis went on after the timeout: {len(CALLS)} examples"
"""
LIMIT = 1  # seconds: pytest-timeout's limit for the inner run


def test_a_hypothesis_test_past_the_timeout_fails_at_once_and_the_run_goes_on(pytester):
    with open(CONFTEST) as conftest:
        pytester.makeconftest(conftest.read())
    pytester.makepyfile(test_slow=SLOW_PROPERTY)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", f"--timeout={LIMIT}",
                                           "--timeout-method=signal")
    result.assert_outcomes(failed=1, passed=1)
    result.stdout.fnmatch_lines(["*TestTimedOut: Timeout (>1.0s) from pytest-timeout.*"])
