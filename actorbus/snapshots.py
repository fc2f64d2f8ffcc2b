"""Snapshots of durable aggregates: their encoding, where they are kept, and the seams to the store.

A leaf of the import graph: values, the msgpack encoding and the
:class:`SnapshotStore` seam; the JetStream KV store is
:mod:`actorbus.bridge.snapshot_store`, and :class:`MemorySnapshots` keeps
everything in memory for tests.

A snapshot is the state of one aggregate, the ``snapshot_version`` of the
class that wrote it, and the stream sequence of the last event applied to
that state. The state alone is never enough: events after that sequence
may have been acked already, so a restore reads them back from the stream
(:meth:`SnapshotStore.events`) and applies them before the message at hand.
"""
from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol
from collections.abc import Mapping, Sequence

import msgpack

from actorbus.config import SubscriptionConfig

#: The prefix of every snapshot bucket's name; the subscription's durable follows it.
BUCKET_PREFIX = "actorbus-snapshots-"
#: Aggregate ids that are valid KV keys as they are; others are encoded (see :func:`snapshot_key`).
_PLAIN_KEY = re.compile(r"[-/_a-zA-Z0-9]+(\.[-/_a-zA-Z0-9]+)*")
#: Marks an encoded key: ``=`` is no character of an aggregate id, so no plain key starts with it.
_ENCODED = "="
_FIELDS = ("version", "sequence", "state")


class SnapshotError(ValueError):
    """Bytes that are not a snapshot; the message says what they were."""


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The state of one aggregate after the event at stream ``sequence``, as class version
    ``version`` wrote it."""

    state: Any
    version: int
    sequence: int


def encode_snapshot(snapshot: Snapshot) -> bytes:
    """The stored form of ``snapshot``: a msgpack map of ``version``, ``sequence`` and ``state``.

    Raises :class:`SnapshotError` when the state is not msgpack-encodable (the
    error names the type msgpack refused).
    """
    try:
        packed: bytes = msgpack.packb({"version": snapshot.version, "sequence": snapshot.sequence,
                                       "state": snapshot.state}, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise SnapshotError(f"the state is not msgpack-encodable: {exc}") from None
    return packed


def decode_snapshot(data: bytes) -> Snapshot:
    """The snapshot stored in ``data``; :class:`SnapshotError` naming what is wrong otherwise."""
    try:
        fields = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:   # msgpack raises several types for bad bytes
        raise SnapshotError(f"not msgpack ({type(exc).__name__}: {exc}; {len(data)} bytes)") from None
    if not isinstance(fields, dict) or not all(name in fields for name in _FIELDS):
        raise SnapshotError(f"not a snapshot map with {', '.join(_FIELDS)}: got "
                            f"{type(fields).__name__}")
    version, sequence = fields["version"], fields["sequence"]
    for name, value in (("version", version), ("sequence", sequence)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise SnapshotError(f"its {name} must be an int >= 0, got {value!r}")
    return Snapshot(fields["state"], version, sequence)


def snapshot_key(aggregate_id: str) -> str:
    """The KV key of ``aggregate_id``'s snapshot.

    KV keys are ``[-/_=.a-zA-Z0-9]`` with no empty ``.`` token; an id of that
    kind is its own key. Any other id (one with ``:``, a leading, trailing or
    doubled ``.``) is ``=`` followed by its UTF-8 bytes in unpadded URL-safe
    base64: ``=`` never occurs in an aggregate id, so the two kinds never collide.
    """
    if _PLAIN_KEY.fullmatch(aggregate_id):
        return aggregate_id
    encoded = base64.urlsafe_b64encode(aggregate_id.encode()).rstrip(b"=").decode("ascii")
    return _ENCODED + encoded


def aggregate_of_key(key: str) -> str:
    """The aggregate id whose snapshot is stored under ``key`` (the inverse of :func:`snapshot_key`)."""
    if not key.startswith(_ENCODED):
        return key
    body = key[len(_ENCODED):]
    return base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)).decode()


def bucket_name(subscription: SubscriptionConfig) -> str:
    """The KV bucket of ``subscription``'s snapshots: ``actorbus-snapshots-<durable>``
    (a durable is ``[A-Za-z0-9_-]``, as a bucket name must be)."""
    return f"{BUCKET_PREFIX}{subscription.durable}"


class StoredEvent(NamedTuple):
    """One message of a subscription as the stream keeps it, read back for a restore."""

    sequence: int
    subject: str
    data: bytes
    headers: Mapping[str, str] | None


class EventRange(NamedTuple):
    """The events of ``aggregate_id`` with stream sequence in (``after``, ``before``), wanted
    for a restore; ``subject`` is that of its message at ``before``."""

    aggregate_id: str
    after: int
    before: int
    subject: str


class SnapshotStore(Protocol):
    """The snapshots of one subscription's aggregates, and its events read back from the stream."""

    @property
    def where(self) -> str:
        """Where the snapshots are, for a log line: ``bucket actorbus-snapshots-orders``."""

    def load(self, aggregate_ids: Sequence[str]) -> dict[str, bytes | None]:
        """The stored snapshot of each of ``aggregate_ids`` (None: none), read at once; raise
        when the store cannot say."""

    def save(self, aggregate_id: str, data: bytes) -> None:
        """Store ``data`` as ``aggregate_id``'s snapshot; may return before it is written, but
        the saves of one id are written in the order they were made (a later one may replace
        an earlier one not yet written). A failed write is logged, not raised: the
        previous snapshot stays, and a restore reads more of the stream."""

    def events(self, ranges: Sequence[EventRange]) -> dict[str, list[StoredEvent]]:
        """The events of each range, in stream order, by aggregate id, read at once."""

    def flush(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for the saves made so far to be written."""


class SnapshotStores(Protocol):
    """Opens the store of each subscription; travels to the pool members with ``StartMember``."""

    def store_for(self, subscription: SubscriptionConfig) -> SnapshotStore:
        """The store of ``subscription``'s snapshots (made on first use)."""

    def close(self, timeout: float) -> None:
        """Write what is saved (up to ``timeout`` seconds) and let go of the connection."""


class MemorySnapshots:
    """Snapshots and a stream in memory: one :class:`SnapshotStore` (and its
    :class:`SnapshotStores`) for unit tests.

    ``append`` adds an event to the stream with the next sequence and the
    aggregate id it belongs to; ``events`` reads them back as a store reads
    JetStream.
    """

    def __init__(self) -> None:
        self.saved: dict[str, bytes] = {}
        self.saves = 0
        self.loads = 0
        self._stream: list[tuple[StoredEvent, str]] = []

    @property
    def where(self) -> str:
        """Where the snapshots are, for a log line."""
        return "memory"

    def append(self, aggregate_id: str, data: bytes, subject: str = "events") -> int:
        """Add an event of ``aggregate_id`` to the stream; return its sequence."""
        sequence = len(self._stream) + 1
        self._stream.append((StoredEvent(sequence, subject, data, None), aggregate_id))
        return sequence

    def load(self, aggregate_ids: Sequence[str]) -> dict[str, bytes | None]:
        """The saved snapshot of each id, if any."""
        self.loads += 1
        return {aggregate_id: self.saved.get(aggregate_id) for aggregate_id in aggregate_ids}

    def save(self, aggregate_id: str, data: bytes) -> None:
        """Keep ``data`` as ``aggregate_id``'s snapshot, at once."""
        self.saved[aggregate_id] = data
        self.saves += 1

    def events(self, ranges: Sequence[EventRange]) -> dict[str, list[StoredEvent]]:
        """The appended events of each range."""
        return {wanted.aggregate_id: [event for event, owner in
                                      self._stream[wanted.after:max(wanted.after, wanted.before - 1)]
                                      if owner == wanted.aggregate_id]
                for wanted in ranges}

    def flush(self, timeout: float) -> None:
        """Nothing to wait for: saves are kept at once."""

    def store_for(self, subscription: SubscriptionConfig) -> MemorySnapshots:
        """This store, whatever the subscription."""
        return self

    def close(self, timeout: float) -> None:
        """Nothing to let go of."""
