"""Stateful aggregates: one object per aggregate id, inside the pool actor that owns the id."""
from __future__ import annotations

from typing import Any

from actorbus.message import Message


class Aggregate:
    """Subclass it and subscribe the class as the handler.

    The pool actor that owns an aggregate id makes one instance for it on
    its first message (``cls(aggregate_id)``) and calls :meth:`handle` for
    every message of that id, in order. State never crosses ids: each id has
    its own instance, and an id is always handled by the same actor.

    An instance idle for ``idle_timeout`` seconds, or the least recently
    used one past ``max_instances`` per actor, is passivated: :meth:`passivate`
    runs, then it is dropped. The next message makes a new instance, so
    ``__init__`` is where state is rebuilt (from a snapshot saved in
    ``passivate``, or by replaying events). After an actor restart, instances
    are rebuilt the same way.
    """

    #: Seconds without a message before an instance is passivated (None: never).
    idle_timeout: float | None = 600.0
    #: Most instances of this class one pool actor keeps.
    max_instances: int = 10_000

    def __init__(self, aggregate_id: str) -> None:
        self.aggregate_id = aggregate_id

    def handle(self, msg: Message) -> Any:
        """Handle one message of this aggregate; raise to fail. May be ``async def``."""
        raise NotImplementedError(f"{type(self).__name__}.handle")

    def passivate(self) -> None:
        """Called before the instance is dropped; save what must survive."""
