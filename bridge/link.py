"""The Bridge's seam to NATS: what a link does, whether it is the real one or a test's.

The Bridge calls these methods, each of which returns at once or after a
bounded wait; it turns the link when its descriptor is readable, after each
actor message and when the link's next timer is due, and reads what
arrived from its :class:`~actorbus.bridge.mailbox.Mailbox` after each turn.
:class:`~actorbus.bridge.nats_link.NatsLink` is the real link; the Bridge's
unit tests give a fake through ``StartBridge.link_factory``.
"""
from __future__ import annotations

from typing import Protocol
from collections.abc import Callable, Mapping

from actorbus.bridge.inbox import Delivered
from actorbus.bridge.layout import ConsumerLayout
from actorbus.bridge.mailbox import Mailbox
from actorbus.bridge.settlement import Order
from actorbus.config import BusConfig, SubscriptionConfig


class BridgeLink(Protocol):
    """A Bridge's connection to JetStream."""

    def fileno(self) -> int:
        """A descriptor that is readable while the link has I/O for :meth:`turn`."""

    def turn(self, io: bool) -> float | None:
        """Do the link's work that is ready (with ``io`` False: only what was handed
        over); return the seconds until it next needs a turn, or None."""

    def connect(self) -> None:
        """Connect; raise ``ConnectionError`` naming the servers and the reason."""

    def subscribe(self, sub: SubscriptionConfig) -> None:
        """Ensure ``sub``'s stream and this Bridge's consumers of it, and start fetching."""

    def settle(self, actions: list[Order]) -> None:
        """Ack, nak, term or dead-letter these messages; returns at once."""

    def touch(self, msgs: list[Delivered]) -> None:
        """Tell JetStream these messages are still being worked on."""

    def forget(self, msgs: list[Delivered]) -> None:
        """These delivered messages will not be settled here (another bus handles them)."""

    def set_held(self, held: int) -> None:
        """How many of the delivered messages the Bridge holds back for per-key order."""

    def claim_pins(self, pins: Mapping[str, str]) -> None:
        """Pull with these pin ids (by durable), a restarted Bridge's predecessor's."""

    def pins(self) -> dict[str, str]:
        """The pin id of each durable this link is pinned on now."""

    def lag(self) -> dict[str, dict[str, float]]:
        """Each durable's last lag reading (pending, ack_pending, redelivered,
        oldest_unacked_seconds, read_at)."""

    def counts(self) -> dict[str, int]:
        """The link's own counters (acked, naked, pins, ...)."""

    def ownership_changes(self) -> int:
        """Times what this link reads changed hands: pins lost, a group's partitions
        rebalanced (cheap: asked before each round of dispatches)."""

    def stop_fetching(self) -> None:
        """Ask for nothing more; what is delivered may still be settled."""

    def close(self, timeout: float) -> None:
        """Flush what was settled and disconnect, within ``timeout`` seconds."""


#: Builds a Bridge's link: its configuration, its mailbox, the consumers it reads.
LinkFactory = Callable[[BusConfig, Mailbox, ConsumerLayout], BridgeLink]
