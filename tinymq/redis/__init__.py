"""tinymq.redis: one queue shared by many processes and hosts, its state in Redis.

``_scripts`` is the low-level API over the Lua scripts (``*.lua`` here, one per
script, ``lib.lua`` shared by all of them).
"""
from .broker import RedisBroker

__all__ = ["RedisBroker"]
