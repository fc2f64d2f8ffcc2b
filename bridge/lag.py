"""Consumer lag: what each durable has waiting, awaiting an ack and redelivered, and how old
its oldest un-acked message is, read from JetStream at a bounded rate.

Read every :data:`LAG_INTERVAL` seconds on the link's loop (two API requests per
durable at most), not at each scrape: however often Prometheus or ``stats()``
asks, the server sees the same few requests. ``stats()["lag"]`` and the
``actorbus_consumer_*`` gauges show the last reading.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import datetime, UTC
from typing import Any

from actorbus.bridge.layout import ConsumerSpec

log = logging.getLogger("actorbus.bridge")

#: Seconds between two readings of every durable's consumer info.
LAG_INTERVAL = 5.0
#: Seconds between two warnings that a durable's lag still cannot be read: one at every
#: reading would fill the log while the server is away.
WARN_INTERVAL = 60.0


@dataclass(frozen=True)
class ConsumerLag:
    """One durable's lag, as JetStream reported it at ``read_at`` (Unix time)."""

    pending: int           #: matching messages not yet delivered
    ack_pending: int       #: delivered, not yet acked
    redelivered: int       #: delivered more than once, not yet acked
    #: Seconds since the oldest un-acked message was stored (0 with nothing un-acked). For a
    #: durable with several filter subjects, the stream's first message after the ack floor
    #: is taken: an upper bound.
    oldest_unacked_seconds: float
    read_at: float


class LagWatch:
    """The last lag reading of each durable, refreshed when due."""

    def __init__(self, interval: float | None = None) -> None:
        self._interval = LAG_INTERVAL if interval is None else interval
        self._next_at = 0.0   # monotonic
        self._lags: dict[str, ConsumerLag] = {}
        self._warned_at: dict[str, float] = {}   # durable → when its failure was last said

    def due(self, now: float) -> bool:
        """True when the next reading is due (``now``: monotonic)."""
        return now >= self._next_at

    async def read(self, js: Any, specs: Iterable[ConsumerSpec], now: float) -> None:
        """Read the lag of each of ``specs`` (``js``: nats-py's JetStream context)."""
        self._next_at = now + self._interval
        lags: dict[str, ConsumerLag] = {}
        for spec in specs:
            try:
                lags[spec.durable] = await _read_one(js, spec)
            except Exception as exc:   # kept out of the way of the work: said, and tried again
                self._failed(spec.durable, exc, now)
                if spec.durable in self._lags:
                    lags[spec.durable] = self._lags[spec.durable]
                continue
            if self._warned_at.pop(spec.durable, None) is not None:
                log.info("reading the lag of durable %s works again", spec.durable)
        self._lags = lags

    def _failed(self, durable: str, exc: Exception, now: float) -> None:
        """Say that a reading failed: at once, then at most every :data:`WARN_INTERVAL`."""
        warned_at = self._warned_at.get(durable)
        level = logging.WARNING
        if warned_at is not None and now - warned_at < WARN_INTERVAL:
            level = logging.DEBUG
        else:
            self._warned_at[durable] = now
        log.log(level, "reading the lag of durable %s failed: %s: %s%s", durable,
                type(exc).__name__, exc, "" if warned_at is None else
                f" (still; said again at most every {WARN_INTERVAL:g} s)")

    def snapshot(self) -> dict[str, dict[str, float]]:
        """The last reading, by durable, as plain numbers."""
        return {durable: asdict(lag) for durable, lag in self._lags.items()}


async def _read_one(js: Any, spec: ConsumerSpec) -> ConsumerLag:
    info = await js.consumer_info(spec.stream, spec.durable)
    read_at = time.time()
    oldest = 0.0
    if info.num_ack_pending:
        # The first message after the ack floor that the durable reads (of any subject,
        # with several filters: the upper bound).
        subject = spec.filter_subjects[0] if len(spec.filter_subjects) == 1 else ">"
        msg = await js.get_msg(spec.stream, seq=info.ack_floor.stream_seq + 1, subject=subject,
                               next=True)
        stored = _as_datetime(msg.time)
        if stored is not None:
            oldest = max(0.0, read_at - stored.timestamp())
    return ConsumerLag(pending=info.num_pending or 0, ack_pending=info.num_ack_pending or 0,
                       redelivered=info.num_redelivered or 0, oldest_unacked_seconds=oldest,
                       read_at=read_at)


def _as_datetime(value: datetime | str | None) -> datetime | None:
    if value is None or isinstance(value, datetime):
        return value
    # Older nats-py left the server's RFC 3339 time a str (nanoseconds, a trailing Z).
    text = value.rstrip("Z")
    whole, _, fraction = text.partition(".")
    return datetime.fromisoformat(f"{whole}.{fraction[:6] or '0'}").replace(tzinfo=UTC)
