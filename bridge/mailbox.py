"""Where the Bridge's link leaves what arrived, for the Bridge to take after a turn.

The link's callbacks run inside a turn of its loop, where the Bridge
cannot act on them (it would re-enter the loop to settle): they leave
arrivals here, and the Bridge drains them once the turn is over.
"""
from __future__ import annotations

from collections import deque
from typing import NamedTuple, TypeAlias

from actorbus.bridge.inbox import Delivered
from actorbus.bridge.recovery import RecoveredMsg


class Arrival(NamedTuple):
    """Messages of one subscription that its consumer delivered together."""

    subscription: str
    messages: list[Delivered]


class Recovery(NamedTuple):
    """Messages of one subscription read back from the stream (between its ack floor and
    what was last delivered), to be handled before anything newer of their keys."""

    subscription: str
    messages: list[RecoveredMsg]


class Released(NamedTuple):
    """The link gave a durable up (its partition moved to another bus), or lost its
    pin to another bus: what the Bridge holds back of it for per-key order is dropped,
    neither handled nor settled, for the new owner reads it back in order. ``filters``:
    the durable's subject filters."""

    subscription: str
    filters: tuple[str, ...]


class PinsChanged(NamedTuple):
    """The link was pinned on a durable, or lost a pin: the Bridge tells the Supervisor
    its pins."""


#: Anything the link leaves for the Bridge.
MailboxItem: TypeAlias = "Arrival | Recovery | Released | PinsChanged"


class Mailbox:
    """What the link left for the Bridge, in arrival order (both on the actor's thread)."""

    def __init__(self) -> None:
        self._items: deque[MailboxItem] = deque()

    def __bool__(self) -> bool:
        return bool(self._items)

    def put(self, item: MailboxItem) -> None:
        """Leave ``item`` for the Bridge."""
        self._items.append(item)

    def drain(self) -> list[MailboxItem]:
        """Take everything left so far."""
        items = list(self._items)
        self._items.clear()
        return items
