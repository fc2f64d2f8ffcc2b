"""The delivery contract as one decision: given an outcome, ack, nak or term."""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, NamedTuple

from actorbus.actors.messages import FAILED, SUCCEEDED, UNDELIVERED, OutcomeKind
from actorbus.bridge.inbox import Delivered
from actorbus.config import SettlementPolicy


class Action(enum.StrEnum):
    """What the Bridge tells JetStream about one message."""

    ACK = "ack"
    NAK = "nak"
    TERM = "term"
    DEAD_LETTER = "dead_letter"  #: publish to the dead-letter subject, then term


ACK = Action.ACK
NAK = Action.NAK
TERM = Action.TERM
DEAD_LETTER = Action.DEAD_LETTER

ENVELOPE_FAILED = "Envelope message processing failed, will be redelivered"
REGULAR_FAILED = "Regular message processing failed, marking as processed"
ENVELOPE_UNDELIVERED = "Envelope message could not be handed to the pool, will be redelivered"
REGULAR_UNDELIVERED = "Regular message could not be handed to the pool, marking as processed"
ENVELOPE_EXHAUSTED = "Envelope message failed on its last allowed delivery, dead-lettering it"


@dataclass(frozen=True, slots=True)
class Decision:
    """What to tell JetStream about one message, and the warning to log, if any."""

    action: Action
    delay: float | None = None
    warning: str | None = None


def decide(kind: OutcomeKind, policy: SettlementPolicy, *, nak_delay: float,
           last_delivery: bool = False) -> Decision:
    """The delivery contract: under ``NACK_ON_ERROR`` (envelopes) a failure is
    redelivered (at-least-once); under ``ACK`` (plain messages) it is not.

    A redelivered message failing on its last allowed delivery (``max_deliver``)
    is dead-lettered: JetStream would never deliver it again, nor drop it.
    """
    if kind == SUCCEEDED:
        return Decision(ACK)
    redeliver = policy.redelivers
    if redeliver and last_delivery and kind in (FAILED, UNDELIVERED):
        return Decision(DEAD_LETTER, None, ENVELOPE_EXHAUSTED)
    if kind == FAILED:
        return Decision(NAK, nak_delay, ENVELOPE_FAILED) if redeliver else \
            Decision(ACK, None, REGULAR_FAILED)
    if kind == UNDELIVERED:
        return Decision(NAK, nak_delay, ENVELOPE_UNDELIVERED) if redeliver else \
            Decision(ACK, None, REGULAR_UNDELIVERED)
    raise ValueError(f"unknown outcome kind {kind!r}")


class Order(NamedTuple):
    """One message to settle, as the Bridge hands it to its NATS link (one per message: a tuple)."""

    msg: Delivered   # what recovery read back is settled through its redeliveries
    action: Action
    delay: float | None = None
    dead_letter_subject: str | None = None
    dead_letter_headers: dict[str, str] | None = None
    #: The ``settle`` span of a traced message (see :mod:`actorbus.tracing`), ended by the
    #: settler once the server confirmed it.
    span: Any = None


def dead_letter_headers(msg: Delivered, stream: str, stream_sequence: int, delivery_count: int,
                        error: str | None) -> dict[str, str]:
    """The original message's headers plus where it came from and why it failed.

    The dead letter's ``Nats-Msg-Id`` is its original's place in its stream, not the
    original's id: with that, the dead-letter stream would take a second message carrying
    the same id (published twice outside the source stream's duplicate window, or
    republished by hand) for a duplicate and drop it, and the original would still be
    termed. A dead-letter publish tried again is still stored once. The original's id is
    kept as ``Actorbus-Original-Msg-Id``; its ``Nats-Expected-*`` were about its own stream.
    """
    reason = " ".join((error or "unknown").split())[:1000]  # header values are one line
    original = dict(msg.headers or {})
    kept = {name: value for name, value in original.items()
            if name != _MSG_ID and not name.startswith("Nats-Expected-")}
    if _MSG_ID in original:
        kept["Actorbus-Original-Msg-Id"] = original[_MSG_ID]
    return {**kept,
            _MSG_ID: f"actorbus-dead-letter-{stream}-{stream_sequence}",
            "Actorbus-Original-Subject": msg.subject,
            "Actorbus-Stream": stream,
            "Actorbus-Stream-Sequence": str(stream_sequence),
            "Actorbus-Delivery-Count": str(delivery_count),
            "Actorbus-Error": reason}


_MSG_ID = "Nats-Msg-Id"
