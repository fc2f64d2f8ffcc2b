"""The Bridge's in-flight table: every delivered message until its completion arrives."""
from __future__ import annotations

import itertools
from dataclasses import dataclass

from actorbus.actors.messages import Delivery
from actorbus.bridge.inbox import Delivered
from actorbus.bridge.recovery import RecoveredMsg
from actorbus.config import SubscriptionConfig


@dataclass(slots=True)
class InFlight:
    """One delivered, unsettled message."""

    msg: Delivered | RecoveredMsg   # as delivered, or (``recovered``) as read back
    subscription: SubscriptionConfig
    touched_at: float  # monotonic: delivery, or the last in_progress sent for it
    #: What is dispatched (and re-sent after a Router restart): its token is this entry's
    #: key in the table; it holds the delivery count and the stream sequence.
    delivery: Delivery
    #: When it came (monotonic): where its trace's ``wait`` span starts.
    received_at: float
    #: Held back at some point for per-key order (see :mod:`actorbus.bridge.ordering`).
    held_for_order: bool = False
    #: Redeliveries of a recovered message that arrived while it was being handled:
    #: settled by its outcome.
    attached: list[Delivered] | None = None

    @property
    def recovered(self) -> bool:
        """Read back from the stream by recovery: there is nothing to ack for it itself."""
        return isinstance(self.msg, RecoveredMsg)


class InFlightTable:
    """Tokens → in-flight messages. Only the Bridge actor's thread touches it."""

    def __init__(self, first_token: int = 1) -> None:
        self._entries: dict[int, InFlight] = {}
        self._tokens = itertools.count(first_token)

    def next_token(self) -> int:
        """A token no entry had: the next entry's delivery carries it."""
        return next(self._tokens)

    def add(self, entry: InFlight) -> None:
        """Record ``entry`` under its delivery's token (from :meth:`next_token`)."""
        self._entries[entry.delivery.token] = entry

    def renew(self, entry: InFlight) -> Delivery:
        """Record ``entry`` again under a new token (its old one is gone from the table:
        members drop a token at or below the last they saw); return its new delivery."""
        entry.delivery = entry.delivery._replace(token=next(self._tokens))
        self._entries[entry.delivery.token] = entry
        return entry.delivery

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
