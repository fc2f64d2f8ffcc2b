"""The delivery contract as one decision: given an outcome, ack, nak or term."""
from __future__ import annotations

from dataclasses import dataclass

from actorbus.actors.messages import FAILED, SUCCEEDED, UNDELIVERED

ACK = "ack"
NAK = "nak"
TERM = "term"

ENVELOPE_FAILED = "Envelope message processing failed, will be redelivered"
REGULAR_FAILED = "Regular message processing failed, marking as processed"
ENVELOPE_UNDELIVERED = "Envelope message could not be handed to the pool, will be redelivered"
REGULAR_UNDELIVERED = "Regular message could not be handed to the pool, marking as processed"


@dataclass(frozen=True, slots=True)
class Settlement:
    """What to tell JetStream about one message, and the warning to log, if any."""

    action: str
    delay: float | None = None
    warning: str | None = None


def settle(kind: str, *, envelope: bool, nak_delay: float) -> Settlement:
    """Envelopes are redelivered after a failure (at-least-once); plain messages are not."""
    if kind == SUCCEEDED:
        return Settlement(ACK)
    if kind == FAILED:
        return Settlement(NAK, nak_delay, ENVELOPE_FAILED) if envelope else \
            Settlement(ACK, None, REGULAR_FAILED)
    if kind == UNDELIVERED:
        return Settlement(NAK, nak_delay, ENVELOPE_UNDELIVERED) if envelope else \
            Settlement(ACK, None, REGULAR_UNDELIVERED)
    raise ValueError(f"unknown outcome kind {kind!r}")
