"""Benchmarks: actorbus against a plain nats-py pull loop and a FastStream subscriber.

Run with ``actorbus bench`` (see :mod:`actorbus.benchmarks.run`). Each variant runs
in a fresh Python process (:mod:`actorbus.benchmarks.worker`) so that its peak RSS
is its own.
"""
