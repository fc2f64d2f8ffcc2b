"""The fetch window: how many messages a Bridge may have requested or unsettled at once.

A slow pool must hold fetching back rather than grow queues. The window
counts what was delivered and is not yet settled (confirmed by the
server) and leaves the rest to pull requests, shared among the consumers.
Messages the Bridge holds back for per-key order stay un-acked until an
older message of their key comes back, and that one must still be
fetched: held messages do not use up the window (up to one window of
them). In an elastic group a partition moves only once what its durable
delivered here is settled: the window also counts by durable.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Protocol, TypeVar

from actorbus.bridge.inbox import Delivered
from actorbus.bridge.metadata import consumer_of


class Requesting(Protocol):
    """What the window needs of a pull consumer to share out requests."""

    @property
    def pending(self) -> int:
        """Messages requested and not yet delivered."""

    @property
    def batch_size(self) -> int:
        """The most one request of this consumer asks for."""

    @property
    def recovering(self) -> bool:
        """True while its un-acked gap is read back: it asks for nothing meanwhile."""


C = TypeVar("C", bound=Requesting)


class FetchWindow:
    """Unsettled messages against the window, and the requests that fit in what is left."""

    def __init__(self, size: int, by_durable: bool = False) -> None:
        self.size = size
        self.unsettled = 0   # delivered here, not yet settled (or forgotten)
        self.held = 0        # of those, held back by the Bridge for per-key order
        #: Unsettled by durable, where partitions move (else None).
        self.by_durable: Counter[str] | None = Counter() if by_durable else None

    def arrived(self, count: int, durable: str | None = None) -> None:
        """``count`` messages were delivered (of ``durable``, where that is counted)."""
        self.unsettled += count
        if self.by_durable is not None and durable is not None:
            self.by_durable[durable] += count

    def settled(self, count: int, durables: Counter[str] | None = None) -> None:
        """``count`` messages were settled, or will not be here (``durables``: of which)."""
        self.unsettled -= count
        if self.by_durable is not None and durables is not None:
            self.by_durable.subtract(durables)

    def by_durable_of(self, msgs: Sequence[Delivered]) -> Counter[str] | None:
        """How many of ``msgs`` each durable delivered (by their ack subjects), where the
        window counts by durable; None elsewhere (a split of each ack subject per message)."""
        if self.by_durable is None:
            return None
        return Counter(consumer_of(msg.reply) or "" for msg in msgs)

    def unsettled_of(self, durable: str) -> int:
        """What ``durable`` delivered here that is not settled yet."""
        return 0 if self.by_durable is None else max(0, self.by_durable[durable])

    def requests(self, consumers: Sequence[C]) -> list[tuple[C, int]]:
        """How many more messages each consumer should ask for now: each up to its share of
        the window and its batch size, in runs of at least half of that (fewer, larger
        requests), within the room the unsettled and already requested messages leave."""
        if not consumers:
            return []
        room = self.size - self.unsettled + min(self.held, self.size) - \
            sum(c.pending for c in consumers)
        share = max(1, self.size // len(consumers))
        asks: list[tuple[C, int]] = []
        for consumer in consumers:
            if consumer.recovering:
                continue
            limit = max(1, min(consumer.batch_size, share))
            wanted = min(limit - consumer.pending, room)
            if wanted >= max(1, limit // 2):
                room -= wanted
                asks.append((consumer, wanted))
        return asks
