"""Routing keys onto the pool: a stable hash for ids, strict round-robin for the rest."""
from __future__ import annotations

import itertools

from actorbus.hashing import fnv1a_32

# The one piece of process-wide mutable state the spec names: keyless
# messages take the next number, so they spread strictly round-robin.
_keyless_counter = itertools.count()


def stable_hash(key: str) -> int:
    """The key's FNV-1a 32: the same in every process and run, unlike Python's salted
    ``hash()``."""
    return fnv1a_32(key)


def next_keyless_slot() -> int:
    """The next round-robin number for a message without an aggregate id."""
    return next(_keyless_counter)


def keyless_routing_key(slot: int) -> str:
    """The routing key a keyless message carries: ``rr-<n>``."""
    return f"rr-{slot}"


def pool_index(routing_key: str, keyless_slot: int | None, pool_size: int) -> int:
    """Which pool member handles a message: ``slot % N`` when keyless, else the hash."""
    if keyless_slot is not None:
        return keyless_slot % pool_size
    return stable_hash(routing_key) % pool_size
