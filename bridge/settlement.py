"""The delivery contract as one decision: given an outcome, ack, nak or term."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from actorbus.actors.messages import FAILED, SUCCEEDED, UNDELIVERED

ACK = "ack"
NAK = "nak"
TERM = "term"
DEAD_LETTER = "dead_letter"  #: publish to the dead-letter subject, then term

ENVELOPE_FAILED = "Envelope message processing failed, will be redelivered"
REGULAR_FAILED = "Regular message processing failed, marking as processed"
ENVELOPE_UNDELIVERED = "Envelope message could not be handed to the pool, will be redelivered"
REGULAR_UNDELIVERED = "Regular message could not be handed to the pool, marking as processed"
ENVELOPE_EXHAUSTED = "Envelope message failed on its last allowed delivery, dead-lettering it"


@dataclass(frozen=True, slots=True)
class Settlement:
    """What to tell JetStream about one message, and the warning to log, if any."""

    action: str
    delay: float | None = None
    warning: str | None = None


def settle(kind: str, *, envelope: bool, nak_delay: float, last_delivery: bool = False) -> Settlement:
    """Envelopes are redelivered after a failure (at-least-once); plain messages are not.

    An envelope failing on its last allowed delivery (``max_deliver``) is
    dead-lettered: JetStream would never deliver it again, nor drop it.
    """
    if kind == SUCCEEDED:
        return Settlement(ACK)
    if envelope and last_delivery and kind in (FAILED, UNDELIVERED):
        return Settlement(DEAD_LETTER, None, ENVELOPE_EXHAUSTED)
    if kind == FAILED:
        return Settlement(NAK, nak_delay, ENVELOPE_FAILED) if envelope else \
            Settlement(ACK, None, REGULAR_FAILED)
    if kind == UNDELIVERED:
        return Settlement(NAK, nak_delay, ENVELOPE_UNDELIVERED) if envelope else \
            Settlement(ACK, None, REGULAR_UNDELIVERED)
    raise ValueError(f"unknown outcome kind {kind!r}")


class Order(NamedTuple):
    """One message to settle, as the Bridge hands it to its NATS link (one per message: a tuple)."""

    msg: Any  # nats.aio.msg.Msg
    action: str
    delay: float | None = None
    dead_letter_subject: str | None = None
    dead_letter_headers: dict[str, str] | None = None


def dead_letter_headers(msg: Any, stream: str, stream_sequence: int, delivery_count: int,
                        error: str | None) -> dict[str, str]:
    """The original message's headers plus where it came from and why it failed."""
    reason = " ".join((error or "unknown").split())[:1000]  # header values are one line
    return {**(msg.headers or {}),
            "Actorbus-Original-Subject": msg.subject,
            "Actorbus-Stream": stream,
            "Actorbus-Stream-Sequence": str(stream_sequence),
            "Actorbus-Delivery-Count": str(delivery_count),
            "Actorbus-Error": reason}
