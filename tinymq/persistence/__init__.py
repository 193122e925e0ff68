"""Durable storage for jobs: the Persistence protocol and the built-in SQLite store.

``Queue.set_persistence(store)`` accepts any object with ``save``, ``delete``
and ``load_all`` (see ``Persistence`` for the optional hooks the Queue also
uses when present). ``SQLitePersistence`` is the embedded default.
"""
from ._protocol import Persistence, Serializer
from .serializers import JSONSerializer, PickleSerializer
from .sqlite import DeadJob, SQLitePersistence

__all__ = [
    "Persistence", "Serializer", "SQLitePersistence", "DeadJob",
    "JSONSerializer", "PickleSerializer",
]
