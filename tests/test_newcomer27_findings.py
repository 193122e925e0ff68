"""Findings of a newcomer (session 27) who follows README.md on a fresh machine and checks the
docs against the public contract and the code."""
import pytest

from tinymq import Config, Job, Queue, QueueFull


# --- q.config -------------------------------------------------------------------------------------

# Fixed: q.config (read by examples/executor_config.py) was a plain attribute. Assigning another
# Config changed nothing the queue enforces (its core keeps the first one's buffer_size and
# max_delayed_jobs), yet get_stats().max_delayed_jobs and QueueFull's message showed the new one.
# It is read-only now, as the docs say.


def test_the_config_of_a_queue_can_be_read_but_not_replaced():
    with Queue(config=Config(buffer_size=1, max_delayed_jobs=7)) as q:
        assert q.config == Config(buffer_size=1, max_delayed_jobs=7)
        with pytest.raises(AttributeError):
            q.config = Config(buffer_size=5, max_delayed_jobs=3)
        q.enqueue(Job("x"))
        with pytest.raises(QueueFull, match=r"\(1 job\)"):
            q.enqueue(Job("x"))
        assert q.get_stats().max_delayed_jobs == 7
