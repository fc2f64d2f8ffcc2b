"""The one stable hash: FNV-1a 32, as nats-server's ``partition()`` transform computes it.

The pool routes a key with it and a partitioned stream places the key's
subject with it, so both agree in every process and run (Python's own
``hash()`` of a str is salted per process).
"""
from __future__ import annotations

_FNV_OFFSET = 0x811C9DC5
_FNV_PRIME = 0x01000193


def fnv1a_32(key: str) -> int:
    """FNV-1a 32 of ``key``'s UTF-8 bytes."""
    value = _FNV_OFFSET
    for byte in key.encode("utf-8"):
        value = ((value ^ byte) * _FNV_PRIME) & 0xFFFFFFFF
    return value
