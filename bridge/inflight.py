"""The Bridge's in-flight table: every delivered message until its completion arrives."""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)
class InFlight:
    """One delivered, unsettled message."""

    msg: Any  # nats.aio.msg.Msg
    subscription: Any  # actorbus.config.SubscriptionConfig
    touched_at: float  # monotonic: delivery, or the last in_progress sent for it
    # Its Delivery (set once the token is known): what is dispatched, and
    # re-sent after a Router restart; it holds the delivery count and sequence.
    delivery: Any = None
    #: Held back for per-key order (see :mod:`actorbus.bridge.ordering`), not dispatched.
    held: bool = False
    #: Read back from the stream by recovery: there is nothing to ack for it itself.
    recovered: bool = False
    #: Redeliveries of a recovered message that arrived while it was being handled:
    #: settled by its outcome.
    attached: list[Any] | None = None


class InFlightTable:
    """Tokens → in-flight messages. Only the Bridge actor's thread touches it."""

    def __init__(self, first_token: int = 1) -> None:
        self._entries: dict[int, InFlight] = {}
        self._tokens = itertools.count(first_token)

    def add(self, entry: InFlight) -> int:
        """Record ``entry``; return its token."""
        token = next(self._tokens)
        self._entries[token] = entry
        return token

    def get(self, token: int) -> InFlight | None:
        """The entry of ``token``, or None if it was already settled."""
        return self._entries.get(token)

    def pop(self, token: int) -> InFlight | None:
        """Remove and return the entry, or None if it was already settled."""
        return self._entries.pop(token, None)

    def __len__(self) -> int:
        return len(self._entries)

    def entries(self) -> list[InFlight]:
        """Every entry, in the order they were added."""
        return list(self._entries.values())

    def due_for_progress(self, now: float) -> list[InFlight]:
        """Entries halfway to their AckWait since last touched; marks them touched now."""
        due = [e for e in self._entries.values()
               if now - e.touched_at >= e.subscription.ack_wait / 2]
        for entry in due:
            entry.touched_at = now
        return due
