"""Findings of the attack25 session (an outside tester of the luacalls, cancelsettle and seen25 work)."""
import os
import subprocess
import sys
import time

import pytest

from test_cli import env, project  # noqa: F401 (a fixture)

# --- python -m tinymq worker: a module that starts a helper process by fork at import -----------

# Found: the supervisor read what the check's import printed until both its pipes closed; a
# process that importing the module forked (a helper that runs on: a metrics sidecar, a watcher)
# keeps them open, so `python -m tinymq worker` waited, silent, as long as that helper lived,
# and started no worker process (or, as here, did not say the target was unusable).

FORKS_A_HELPER_WITHOUT_A_BROKER = """
import os
if os.fork() == 0:  # a helper that runs until its stdin closes (the worker command's end)
    os.read(0, 1)
    os._exit(0)
from tinymq import Queue
queue = Queue()
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX: fork")
def test_worker_is_not_held_up_by_a_helper_process_that_the_import_forked(project):
    (project / "app" / "helper.py").write_text(FORKS_A_HELPER_WITHOUT_A_BROKER)
    began = time.monotonic()
    try:
        result = subprocess.run([sys.executable, "-m", "tinymq", "worker", "app.helper:queue"], cwd=project,
                                env=env(), stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:  # (killed: its end closes the helper's stdin, which ends the helper)
        pytest.fail("python -m tinymq worker waited for the helper process its target's import forked")
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert "is a tinymq.Queue without a broker" in result.stderr, result.stderr
    assert time.monotonic() - began < 15


# --- Redis: buffer_size once the stats hash is deleted ---------------------------------------------

# Found: since enqueue reads stats.outstanding (the unfinished jobs) to skip counting the ready
# lists while it leaves room, a stats hash that was deleted (an operator resetting the counters
# with DEL) lets buffer_size in as many jobs again as were waiting: outstanding starts again from
# the next enqueue and does not count them. Fixed by counting the ready lists every time again
# (b6b1be9 reverted): the cap holds whatever the stats hash says. docs/redis.md says only that
# join() may return early then.


@pytest.mark.redis
def test_buffer_size_holds_after_the_stats_hash_was_deleted(redis_url):
    import redis as redis_py

    from tinymq import Config, Job, Queue, QueueFull
    from tinymq.redis import RedisBroker
    from tinymq.redis._scripts import key_prefix

    name = f"attack25-stats-{os.getpid()}-{time.monotonic_ns()}"
    q = Queue(config=Config(buffer_size=10), broker=RedisBroker(redis_url, name=name))
    try:
        for i in range(10):
            q.enqueue(Job("t", i))
        with pytest.raises(QueueFull):
            q.enqueue(Job("t", 10))
        client = redis_py.Redis.from_url(redis_url)
        client.delete(key_prefix(name) + "stats")  # (the counters reset by hand)
        client.close()
        with pytest.raises(QueueFull):
            q.enqueue(Job("t", 11))  # the 10 jobs still wait: no room
    finally:
        q.stop()
