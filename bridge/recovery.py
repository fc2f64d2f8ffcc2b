"""Recovery: the messages a durable consumer delivered and never had acked, read back in order.

Everything at or below a consumer's ack floor is acked; everything above
its delivered sequence was never delivered. What lies between may be
un-acked work of a Bridge that died, or of a connection that a server
restart cut: JetStream redelivers it only after AckWait, *after* newer
messages of the same keys. So before the Bridge pulls anything new it
reads that gap from the stream itself (by sequence, filtered as the
consumer is) and hands it over first; the Bridge handles it in stream
order and acks the later redeliveries of what it already handled without
handling them again. Reading never changes the consumer's position: a
crash in the middle just means the next start reads the gap again.
"""
from __future__ import annotations

import logging
import time
from typing import Any, NamedTuple
from collections.abc import Callable, Collection, Mapping

from nats.js.errors import NotFoundError

from actorbus.bridge.layout import ConsumerSpec

log = logging.getLogger("actorbus.bridge")


class RecoveredMsg(NamedTuple):
    """A message read back from the stream: what a delivery carries, without an ack subject."""

    subject: str
    data: bytes
    headers: Mapping[str, str] | None
    sequence: int


class Gap(NamedTuple):
    """What a consumer's state said, and the messages read back from between its marks."""

    ack_floor: int
    delivered: int
    messages: list[RecoveredMsg]
    seconds: float


async def read_gap(js: Any, spec: ConsumerSpec,
                   have: Callable[[], Collection[int]] = frozenset) -> Gap:
    """The messages of ``spec``'s consumer between its ack floor and its delivered sequence,
    but for the sequences ``have()`` names once the consumer's state is known (first
    deliveries to this bus: newer than the gap, they are handled as deliveries)."""
    started = time.perf_counter()
    info = await js.consumer_info(spec.stream, spec.durable)
    floor, delivered = info.ack_floor.stream_seq or 0, info.delivered.stream_seq or 0
    found: dict[int, RecoveredMsg] = {}
    if delivered > floor:
        for subject in spec.filter_subjects:
            await _read_subject(js, spec.stream, subject, floor + 1, delivered, found)
    delivered_here = have()
    messages = [found[seq] for seq in sorted(found) if seq not in delivered_here]
    return Gap(floor, delivered, messages, time.perf_counter() - started)


async def _read_subject(js: Any, stream: str, subject: str, first: int, last: int,
                        found: dict[int, RecoveredMsg]) -> None:
    sequence = first
    while sequence <= last:
        try:
            raw = await js.get_msg(stream, seq=sequence, subject=subject, next=True)
        except NotFoundError:
            return   # nothing more of this subject in the stream
        if raw.seq is None or raw.seq > last:
            return
        found[raw.seq] = RecoveredMsg(raw.subject or subject, raw.data or b"", raw.headers,
                                      raw.seq)
        sequence = raw.seq + 1
