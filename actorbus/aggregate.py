"""Stateful aggregates: one object per aggregate id, inside the pool actor that owns the id."""
from __future__ import annotations

from typing import Any

from actorbus.errors import ConfigurationError
from actorbus.message import Message


class Aggregate:
    """Subclass it and subscribe the class as the handler.

    The pool actor that owns an aggregate id makes one instance for it on
    its first message (``cls(aggregate_id)``) and calls :meth:`handle` for
    every message of that id, in order. State never crosses ids: each id has
    its own instance, and an id is always handled by the same actor.

    An instance idle for ``idle_timeout`` seconds, or the least recently
    used one past ``max_instances`` per actor, is passivated: :meth:`passivate`
    runs, then it is dropped. The next message makes a new instance.

    Without snapshots, ``__init__`` is where state is rebuilt, and after an
    actor restart instances start from nothing. With ``snapshot_every`` set,
    the aggregate is durable: the bus keeps its :meth:`snapshot` in JetStream
    KV and, on the id's first message in a pool actor, restores it and applies
    the events after it from the stream, so each event is applied to the state
    once (see Durable aggregates in the docs).
    """

    #: Seconds without a message before an instance is passivated (None: never).
    idle_timeout: float | None = 600.0
    #: Most instances of this class one pool actor keeps.
    max_instances: int = 10_000
    #: Applied events between two snapshots; None: no snapshots (the state lives in memory only).
    snapshot_every: int | None = None
    #: The version of the snapshot's shape; a stored snapshot of another version goes
    #: through :meth:`migrate`.
    snapshot_version: int = 1

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        every, version = cls.snapshot_every, cls.snapshot_version
        if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
            raise ConfigurationError(f"{cls.__qualname__}.snapshot_every must be an int >= 1 or None, "
                                     f"got {every!r}")
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise ConfigurationError(f"{cls.__qualname__}.snapshot_version must be an int >= 0, "
                                     f"got {version!r}")

    def __init__(self, aggregate_id: str) -> None:
        self.aggregate_id = aggregate_id

    def handle(self, msg: Message) -> Any:
        """Handle one message of this aggregate; raise to fail. May be ``async def``.

        On a durable aggregate, a ``handle`` that raises must leave the state as
        it found it: the message is retried, and a state changed halfway would
        count it twice.
        """
        raise NotImplementedError(f"{type(self).__name__}.handle")

    def passivate(self) -> None:
        """Called before the instance is dropped; save what must survive."""

    def snapshot(self) -> Any:
        """The state to store, msgpack-encodable: by default every attribute but
        ``aggregate_id``, as a dict."""
        return {name: value for name, value in vars(self).items() if name != "aggregate_id"}

    def restore(self, state: Any) -> None:
        """Take ``state`` (what :meth:`snapshot` returned, through msgpack: tuples come back
        as lists) as this instance's; by default sets the dict's items as attributes."""
        vars(self).update(state)

    @classmethod
    def migrate(cls, state: Any, version: int) -> Any | None:
        """The state of a snapshot written by ``snapshot_version`` ``version``, in this
        version's shape, or None to rebuild the aggregate from the stream instead
        (the default)."""
        return None
