"""What a Bridge keeps of one subscription, in one place, with its verbs.

A subscription's configuration, the per-key order of its deliveries, what
recovery read back, its tally and its warning clock belong together: the
Bridge keeps one :class:`SubscriptionBook` per subscription, not a dict of
each keyed by the subscription's name. The in-flight table, the pool and
the link are the Bridge's, shared by all its subscriptions.
"""
from __future__ import annotations

import logging
import time
from typing import Any

from actorbus.actors.messages import Delivery
from actorbus.bridge.inbox import Delivered
from actorbus.bridge.extraction import invalid_id_header, subscription_key
from actorbus.bridge.inflight import InFlight
from actorbus.bridge.ordering import KeyOrder
from actorbus.bridge.settlement import ACK, NAK, Action, Order
from actorbus.bridge.tally import SubscriptionTally
from actorbus.config import SubscriptionConfig

log = logging.getLogger("actorbus.bridge")

#: Seconds past two AckWaits after which a recovered message's redelivery is no longer
#: expected (it was acked after all): its record is dropped.
RECOVERED_RECORD_GRACE = 5.0

#: Seconds between two warnings about invalid aggregate-id headers on one subscription:
#: a publisher that gets the header wrong gets it wrong on every message.
INVALID_KEY_WARNING_INTERVAL = 60.0


class SubscriptionBook:
    """One subscription as its Bridge sees it.

    ``order`` holds, by key, the open, waiting and held sequences (per-key
    order under redelivery); ``recovered`` what recovery read back: sequence
    → its in-flight entry while it is handled, then the time it was handled
    (its redelivery is acked without handling). ``reads`` is True when this
    Bridge reads a durable of it (of several Bridges, only one reads a
    subscription that is not partitioned).
    """

    def __init__(self, config: SubscriptionConfig, reads: bool = True) -> None:
        self.config = config
        self.reads = reads
        self.order: KeyOrder[Delivery] = KeyOrder()
        self.recovered: dict[int, InFlight | float] = {}
        self.tally = SubscriptionTally("envelope" if config.envelope else "plain")
        self._invalid_key_warned: float | None = None

    @property
    def name(self) -> str:
        """The subscription's name (its durable)."""
        return self.config.name

    @property
    def held(self) -> int:
        """Deliveries held back for per-key order."""
        return self.order.held

    def routing_key(self, subject: str, data: bytes, headers: Any) -> str | None:
        """The aggregate id a message of this subscription is routed by, or None (keyless)."""
        return subscription_key(self.config, subject, data, headers)

    def redelivered_after_recovery(self, msg: Delivered, sequence: int) -> Order | None:
        """A redelivery of a message recovery read back: settled by that handling, not handled
        again (the ack now, or, while it is still being handled, with its outcome: None)."""
        state = self.recovered[sequence]
        if isinstance(state, InFlight):
            state.attached = [*(state.attached or ()), msg]
            return None
        del self.recovered[sequence]
        self.tally.counts["duplicates_skipped"] += 1
        return Order(msg, ACK)

    def recovered_done(self, entry: InFlight, action: Action, delay: float | None) -> list[Order]:
        """A recovered message was handled: how its redeliveries are settled."""
        sequence = entry.delivery.stream_sequence
        done = action == ACK
        if done:
            # Its redelivery is acked without handling (unless it came already).
            self.recovered[sequence] = time.monotonic()
        else:
            self.recovered.pop(sequence, None)   # its redelivery is handled as any other
        orders = []
        for msg in entry.attached or ():
            if done:
                self.recovered.pop(sequence, None)
                self.tally.counts["duplicates_skipped"] += 1
                orders.append(Order(msg, ACK))
            else:
                orders.append(Order(msg, NAK, delay))
        return orders

    def forget_recovered(self, now: float) -> None:
        """Drop the records of handled recovered messages whose redelivery has not come: a
        redelivery comes within an AckWait of the first delivery, or never (it was acked)."""
        if not self.recovered:
            return
        horizon = 2 * self.config.ack_wait + RECOVERED_RECORD_GRACE
        stale = [seq for seq, state in self.recovered.items()
                 if not isinstance(state, InFlight) and now - state > horizon]
        for seq in stale:
            del self.recovered[seq]

    def note_invalid_key(self, msg: Delivered, now: float) -> None:
        """Count a message whose aggregate-id header is not a valid id; warn now and then."""
        bad = invalid_id_header(msg.headers)
        if bad is None:
            return
        self.tally.counts["invalid_keys"] += 1
        last = self._invalid_key_warned
        if last is None or now - last >= INVALID_KEY_WARNING_INTERVAL:
            self._invalid_key_warned = now
            log.warning("invalid aggregate id in header %s=%r on %s (subscription %s): not a valid "
                        "id (1-256 bytes of [A-Za-z0-9:_-./]); the message goes round-robin as a "
                        "keyless one (warned at most once a minute per subscription, counted in "
                        "stats()['invalid_keys'])", bad[0], bad[1], msg.subject, self.name)

    def snapshot(self) -> dict[str, Any]:
        """Its tally for a Stats message, and how many Bridges read it (this one: 0 or 1)."""
        return {**self.tally.snapshot(), "bridges": int(self.reads)}
