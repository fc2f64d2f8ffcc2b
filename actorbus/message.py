"""What a handler receives."""
from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Mapping

from actorbus.envelope import Envelope


@dataclass(frozen=True, slots=True)
class Message:
    """One message, as given to a handler.

    ``data`` is the envelope's payload on an envelope subscription and the
    raw bytes otherwise. ``delivery_count`` is JetStream's (1 on first
    delivery); ``attempt`` counts in-place retries within this delivery.
    """

    subject: str
    data: bytes
    headers: Mapping[str, str] | None
    envelope: Envelope | None
    aggregate_id: str | None
    routing_key: str
    delivery_count: int
    stream_sequence: int
    attempt: int = 1
