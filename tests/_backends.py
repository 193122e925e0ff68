"""Queues over each backend, for tests of the API contract that must hold on every one.

``InProcess`` makes plain Queues; ``Redis`` makes Queues on one RedisBroker
name, each with its own broker object, as separate processes would. A test
asks ``backend.pair(**config)`` for a (producer, worker) pair: one Queue
in-process, two Queue objects sharing the queue through Redis.
"""
import itertools
import os

from tinymq import Config, Queue

_names = itertools.count(1)


class InProcess:
    name = "inprocess"

    def __init__(self):
        self.queues = []

    def queue(self, **config):
        q = Queue(config=Config(**config))
        self.queues.append(q)
        return q

    def pair(self, **config):
        q = self.queue(**config)
        return q, q

    def close(self):
        for q in self.queues:
            q.stop(wait=False)


class Redis:
    name = "redis"

    def __init__(self, url, lease=2.0, max_crash_recoveries=3):
        from tinymq.redis import RedisBroker

        self.url = url
        self.lease = lease
        self.max_crash_recoveries = max_crash_recoveries
        self.queue_name = f"test-{os.getpid()}-{next(_names)}"
        self._broker_class = RedisBroker
        self.queues = []
        self.brokers = []

    def broker(self):
        broker = self._broker_class(self.url, name=self.queue_name, lease=self.lease,
                                    max_crash_recoveries=self.max_crash_recoveries)
        self.brokers.append(broker)
        return broker

    def queue(self, **config):
        q = Queue(config=Config(**config), broker=self.broker())
        self.queues.append(q)
        return q

    def pair(self, **config):
        return self.queue(**config), self.queue(**config)

    def close(self):
        for q in self.queues:
            q.stop(wait=False)
        for broker in self.brokers:
            broker.close()
