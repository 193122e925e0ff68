"""Findings of attack29a (an outside attack on periodic jobs, rate limits, per-type stats and
the Prometheus exporter).

1. A scrape of a ``PrometheusCollector`` raised as soon as one of its queues could not be read
   (its Redis unreachable): prometheus_client then fails the whole exposition, so the other
   queues of the collector, and every other collector of the registry (the process's own
   metrics), were lost with it, just while Redis was down. Such a queue is now left out of
   that scrape (logged as a WARNING), and the rest is scraped as usual.
"""
import socket

import pytest

from tinymq import Config, Job, Queue


def closed_port():
    """A loopback port that nothing listens on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_queue_whose_redis_is_unreachable_is_left_out_of_the_scrape_not_the_rest(warnings_seen):
    pytest.importorskip("prometheus_client")
    pytest.importorskip("redis")
    from prometheus_client import CollectorRegistry, Gauge, generate_latest

    from tinymq.metrics import PrometheusCollector
    from tinymq.redis import RedisBroker

    unreachable = Queue(config=Config(buffer_size=10),
                        broker=RedisBroker(f"redis://127.0.0.1:{closed_port()}/0", name="gone"))
    local = Queue(10)
    local.enqueue(Job("t"))
    registry = CollectorRegistry()
    registry.register(PrometheusCollector({"gone": unreachable, "local": local}))
    Gauge("app_up", "Another collector of the same registry.", registry=registry).set(1)
    try:
        text = generate_latest(registry).decode("utf-8")
    finally:
        unreachable.stop()
        local.stop()
    assert 'tinymq_queue_events_total{event="enqueued",queue="local"} 1.0' in text
    assert 'tinymq_queue_size{priority="medium",queue="local"} 1.0' in text
    assert 'queue="gone"' not in text
    assert "app_up 1.0" in text
    assert any("'gone'" in message and "left out" in message for message in warnings_seen.snapshot())
