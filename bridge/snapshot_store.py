"""Durable aggregates' snapshots in JetStream KV, and their events read back from the stream.

A pool member has no NATS connection of its own for messages (the Bridge
owns that), so the member that runs a durable aggregate opens one here on
its first use: a nats-py client on a small event-loop thread, made with the
bus's connect options (servers, credentials, TLS) through
:func:`~actorbus.bridge.connection.open_connection`. Members whose handlers
keep no snapshots never connect.

One bucket per subscription (:func:`~actorbus.snapshots.bucket_name`),
replicated and stored as the subscription's stream, keeping one revision
per key. Saves are written by one task on that loop, in order, while the
member goes on with its next message; saves of an id not yet written are
replaced by its newer one.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any
from collections.abc import Sequence

from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, RawStreamMsg, StorageType
from nats.js.errors import BadRequestError, KeyNotFoundError, NotFoundError
from nats.js.kv import KeyValue

from actorbus.bridge.connection import describe_error, open_connection
from actorbus.bridge.extraction import subscription_key
from actorbus.bridge.jetstream import subject_covers
from actorbus.bridge.loop_thread import LoopThread
from actorbus.config import BusConfig, SubscriptionConfig
from actorbus.groups import partition_filter, partition_of, without_partition
from actorbus.snapshots import EventRange, StoredEvent, bucket_name, snapshot_key

log = logging.getLogger("actorbus.snapshots")

#: Seconds one request of a restore (a snapshot, an event) may take before the message fails.
REQUEST_TIMEOUT = 10.0
#: Stream messages a scan for aggregates without subject keys reads at once.
SCAN_BATCH = 64
#: Snapshots of distinct ids written at once by the writer task.
WRITE_BATCH = 64
#: Seconds between two warnings of the same kind (NATS down, writes failing): at most one.
WARNING_INTERVAL = 60.0


class KvSnapshotStores:
    """The snapshot stores of one pool member: one connection, made on first use, and a store
    per subscription. Pickled with only its configuration (it travels in ``StartMember``)."""

    def __init__(self, config: BusConfig) -> None:
        self._config = config
        self._lock = threading.Lock()
        self._thread: LoopThread | None = None
        self._client: Client | None = None
        self._stores: dict[str, KvSnapshotStore] = {}
        self._quiet_until = 0.0   # no connection warning before then

    def __getstate__(self) -> dict[str, Any]:
        return {"config": self._config}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["config"])  # type: ignore[misc]

    def __repr__(self) -> str:
        return f"KvSnapshotStores({self._config.shown_servers()})"

    def store_for(self, subscription: SubscriptionConfig) -> KvSnapshotStore:
        """The store of ``subscription``'s snapshots; it connects on its first request."""
        store = self._stores.get(subscription.name)
        if store is None or store.subscription != subscription:
            store = self._stores[subscription.name] = KvSnapshotStore(self, subscription)
        return store

    def jetstream(self) -> tuple[LoopThread, JetStreamContext]:
        """The loop and the JetStream context of the member's connection, made now if need be."""
        with self._lock:
            if self._thread is None:
                self._thread = LoopThread("actorbus-snapshots")
            if self._client is None:
                try:
                    self._client = self._thread.run(open_connection(
                        self._config, name=f"{self._config.name}-snapshots", reconnect_forever=True,
                        error_cb=self._on_error), self._config.connect_timeout + REQUEST_TIMEOUT)
                except TimeoutError:
                    raise ConnectionError(f"cannot connect to NATS at {self._config.shown_servers()} "
                                          "for snapshots: timed out") from None
            return self._thread, self._client.jetstream(timeout=REQUEST_TIMEOUT)

    def secrets(self) -> tuple[str, ...]:
        """The configuration's secrets, to mask in what is logged."""
        return self._config.secrets()

    async def _on_error(self, exc: Exception) -> None:
        now = time.monotonic()
        if now >= self._quiet_until:   # a server down gives one a reconnect attempt
            self._quiet_until = now + WARNING_INTERVAL
            log.warning("snapshot connection: %s (warned at most once a minute)",
                        describe_error(exc, self._config.secrets()))

    def close(self, timeout: float) -> None:
        """Write what every store was given (up to ``timeout`` seconds), then disconnect."""
        with self._lock:
            thread, client = self._thread, self._client
            self._thread = self._client = None
        if thread is None:
            return
        for store in self._stores.values():
            store.flush_on(thread, timeout)
            store.disconnected()
        if client is not None:
            try:
                thread.run(client.close(), timeout)
            except Exception as exc:   # stopping: the server may be gone already
                log.debug("closing the snapshot connection: %s", type(exc).__name__)
        thread.stop()


class KvSnapshotStore:
    """The snapshots of one subscription's aggregates, in its KV bucket."""

    def __init__(self, stores: KvSnapshotStores, subscription: SubscriptionConfig) -> None:
        self.subscription = subscription
        self.bucket = bucket_name(subscription)
        self._stores = stores
        self._kv: KeyValue | None = None
        # Touched on the loop's thread only.
        self._pending: dict[str, bytes] = {}
        self._writer: asyncio.Task[None] | None = None
        self._unwritten = 0          # failed writes not warned of yet
        self._quiet_until = 0.0      # no write warning before then

    @property
    def where(self) -> str:
        """The bucket, for a log line."""
        return f"bucket {self.bucket}"

    def load(self, aggregate_ids: Sequence[str]) -> dict[str, bytes | None]:
        """The stored snapshot of each id (None: none), read concurrently."""
        thread, js = self._stores.jetstream()
        return thread.run(self._load_all(js, aggregate_ids), REQUEST_TIMEOUT)

    def save(self, aggregate_id: str, data: bytes) -> None:
        """Queue ``data`` for writing as ``aggregate_id``'s snapshot; returns at once."""
        thread, js = self._stores.jetstream()
        thread.call_soon(self._enqueue, js, snapshot_key(aggregate_id), data)

    def events(self, ranges: Sequence[EventRange]) -> dict[str, list[StoredEvent]]:
        """The events of each range, in stream order, by aggregate id.

        With ``key_from_subject`` an aggregate's events are those on its message's
        subject, read by that subject, the aggregates concurrently; otherwise every
        message of the subscription from the earliest range's start to the latest's
        end is read once, and each kept for the aggregate it is routed to.
        """
        thread, js = self._stores.jetstream()
        return thread.run(self._events_all(js, ranges), None)

    def flush(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for the queued snapshots to be written."""
        if self._writer is None:
            return   # nothing saved since the connection was made: no need to make one
        thread, _ = self._stores.jetstream()
        self.flush_on(thread, timeout)

    def disconnected(self) -> None:
        """The connection is closed: what was bound to it goes (a later request connects again)."""
        self._kv = None
        self._writer = None
        self._pending.clear()

    def flush_on(self, thread: LoopThread, timeout: float) -> None:
        """:meth:`flush` on ``thread``'s loop (the stores' closing does it on its own)."""
        try:
            thread.run(self._drained(), timeout)
        except TimeoutError:
            log.warning("%s: %d snapshot(s) not written within %.0f s", self.where,
                        len(self._pending), timeout)

    # ------------------------------------------------------------ on the loop
    async def _bucket(self, js: JetStreamContext) -> KeyValue:
        if self._kv is None:
            sub = self.subscription
            try:
                self._kv = await js.create_key_value(KeyValueConfig(
                    bucket=self.bucket, history=1, replicas=sub.replicas,
                    storage=StorageType(sub.storage_type),
                    description=f"actorbus snapshots of {sub.durable}'s durable aggregates"))
            except BadRequestError:
                # It exists, made otherwise (by hand, or before a change of replicas): use it.
                self._kv = await js.key_value(self.bucket)
        return self._kv

    async def _load_all(self, js: JetStreamContext,
                        aggregate_ids: Sequence[str]) -> dict[str, bytes | None]:
        kv = await self._bucket(js)
        found = await asyncio.gather(*(self._load(kv, snapshot_key(aggregate_id))
                                       for aggregate_id in aggregate_ids))
        return dict(zip(aggregate_ids, found, strict=True))

    @staticmethod
    async def _load(kv: KeyValue, key: str) -> bytes | None:
        try:
            entry = await kv.get(key)
        except KeyNotFoundError:
            return None
        return entry.value

    def _enqueue(self, js: JetStreamContext, key: str, data: bytes) -> None:
        self._pending.pop(key, None)   # an older save not yet written is replaced
        self._pending[key] = data
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._write(js))

    async def _write(self, js: JetStreamContext) -> None:
        try:
            kv = await self._bucket(js)
        except Exception as exc:
            if self._pending:
                self._write_failed(next(iter(self._pending)), exc, len(self._pending))
            self._pending.clear()
            return
        while self._pending:
            # Distinct keys at once; one key's saves are written one after the other.
            batch = [(key, self._pending.pop(key))
                     for key in list(self._pending)[:WRITE_BATCH]]
            results = await asyncio.gather(*(kv.put(key, data) for key, data in batch),
                                           return_exceptions=True)
            failed = [(key, result) for (key, _), result in zip(batch, results, strict=True)
                      if isinstance(result, BaseException)]
            if failed:
                self._write_failed(failed[0][0], failed[0][1], len(failed))

    def _write_failed(self, key: str, error: BaseException, count: int) -> None:
        """Warn of failed writes at most once a minute, with how many failed since the last."""
        self._unwritten += count
        now = time.monotonic()
        if now < self._quiet_until:
            return
        self._quiet_until = now + WARNING_INTERVAL
        log.warning("%s: %d snapshot(s) not written, the last of %s (%s); the previous ones stay, "
                    "and a restore reads more of the stream (warned at most once a minute)",
                    self.where, self._unwritten, key, describe_error(error, self._stores.secrets()))
        self._unwritten = 0

    async def _drained(self) -> None:
        while self._writer is not None and not self._writer.done():
            await asyncio.shield(self._writer)

    async def _events_all(self, js: JetStreamContext,
                          ranges: Sequence[EventRange]) -> dict[str, list[StoredEvent]]:
        sub = self.subscription
        by_subject = [r for r in ranges
                      if sub.key_from_subject and r.subject.rsplit(".", 1)[-1] == r.aggregate_id]
        read = await asyncio.gather(*(self._read(js, self._stored(r.subject, r.aggregate_id), r.after,
                                                 r.before, {r.aggregate_id})
                                      for r in by_subject))
        found = {r.aggregate_id: [event for _, event in events]
                 for r, events in zip(by_subject, read, strict=True)}
        scanned = [r for r in ranges if r.aggregate_id not in found]
        if scanned:
            # A partitioned stream stores each subject behind its partition.
            wanted = sub.subject if sub.partitions is None else f"*.{sub.subject}"
            events = await self._scan(js, wanted, min(r.after for r in scanned),
                                      max(r.before for r in scanned),
                                      {r.aggregate_id for r in scanned})
            for r in scanned:
                found[r.aggregate_id] = [event for key, event in events
                                         if key == r.aggregate_id and r.after < event.sequence < r.before]
        return found

    def _stored(self, subject: str, aggregate_id: str) -> str:
        """The subject a message published on ``subject`` is stored under: on a partitioned
        stream, behind its aggregate's partition (deliveries carry it as published)."""
        partitions = self.subscription.partitions
        return subject if partitions is None else \
            partition_filter(subject, partition_of(aggregate_id, partitions))

    async def _read(self, js: JetStreamContext, wanted: str, after: int, before: int,
                    aggregate_ids: set[str]) -> list[tuple[str, StoredEvent]]:
        """The messages on ``wanted`` in (``after``, ``before``) routed to one of
        ``aggregate_ids``, with that id; one request each."""
        sub = self.subscription
        found: list[tuple[str, StoredEvent]] = []
        cursor = after + 1
        while cursor < before:
            try:
                raw = await js.get_msg(sub.stream, seq=cursor, subject=wanted, next=True)
            except NotFoundError:
                break
            sequence = raw.seq or cursor
            if sequence >= before:
                break
            cursor = sequence + 1
            key, event = self._event_of(raw, sequence)
            if key in aggregate_ids:
                found.append((key, event))
        return found

    async def _scan(self, js: JetStreamContext, wanted: str, after: int, before: int,
                    aggregate_ids: set[str]) -> list[tuple[str, StoredEvent]]:
        """The messages on ``wanted`` in (``after``, ``before``) routed to one of
        ``aggregate_ids``: every sequence of the range read, :data:`SCAN_BATCH` at once
        (one after the other, a request each, would take a round trip per message)."""
        sub = self.subscription
        first = (await js.stream_info(sub.stream)).state.first_seq
        found: list[tuple[str, StoredEvent]] = []
        for start in range(max(after + 1, first), before, SCAN_BATCH):
            sequences = range(start, min(start + SCAN_BATCH, before))
            for sequence, raw in zip(sequences, await asyncio.gather(
                    *(self._message_at(js, sequence) for sequence in sequences)), strict=True):
                if raw is None or not subject_covers(wanted, raw.subject or ""):
                    continue   # deleted, or another subscription's
                key, event = self._event_of(raw, sequence)
                if key in aggregate_ids:
                    found.append((key, event))
        return found

    async def _message_at(self, js: JetStreamContext, sequence: int) -> RawStreamMsg | None:
        try:
            return await js.get_msg(self.subscription.stream, seq=sequence)
        except NotFoundError:
            return None

    def _event_of(self, raw: RawStreamMsg, sequence: int) -> tuple[str | None, StoredEvent]:
        """The aggregate a stored message is routed to, and the message as its handler sees it."""
        sub = self.subscription
        data, headers, subject = raw.data or b"", raw.headers, raw.subject or ""
        if sub.partitions is not None:
            subject = without_partition(subject)   # as it was published, as handlers see it
        return subscription_key(sub, subject, data, headers), StoredEvent(sequence, subject, data,
                                                                          headers)
