"""Rebuilding a subscription's snapshots from its stream: what ``actorbus replay`` does.

Every event of the subscription, from the first the stream holds to the
last it held when the replay began, goes through the handler's
:class:`~actorbus.Aggregate` class as a pool member would run it (the same
decoding, in-place retries, snapshot every ``snapshot_every`` events, on
passivation and at the end), starting each aggregate from nothing rather
than from its stored snapshot. The events are read by an ephemeral
consumer that acknowledges nothing, so the subscription's durable consumer
and a bus running on it are left alone; what a running bus writes
meanwhile is a snapshot as good as the replay's (a restore applies the
stream after either).
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from collections.abc import Callable, Sequence

from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from actorbus.actors.handlers import handler_reference, resolve_handler
from actorbus.actors.messages import SUCCEEDED, Delivery
from actorbus.actors.processing import SNAPSHOT_FLUSH_TIMEOUT, HandlerTable
from actorbus.aggregate import Aggregate
from actorbus.bridge.extraction import subscription_key
from actorbus.bridge.snapshot_store import KvSnapshotStore, KvSnapshotStores
from actorbus.config import BusConfig, SubscriptionConfig
from actorbus.dlq import connection_config
from actorbus.groups import is_partitionable, without_partition
from actorbus.snapshots import EventRange, StoredEvent
from actorbus.topology import Topology

log = logging.getLogger("actorbus.replay")

#: Events one fetch asks for.
FETCH_BATCH = 512
#: Seconds a fetch waits for events the consumer still has pending before the replay fails.
FETCH_TIMEOUT = 10.0
#: Seconds the ephemeral consumer outlives a replay that died.
CONSUMER_INACTIVE = 60.0

Progress = Callable[[int, int], None]
_IDENTITY = ("user", "password", "token", "nkey_seed", "creds")
_NATS_SETTINGS = (*_IDENTITY, "tls_ca", "tls_cert", "tls_key")


class ReplayError(ValueError):
    """A replay that cannot run: the message names the subscription and what is wrong."""


@dataclass(frozen=True)
class ReplayReport:
    """What a replay did."""

    #: Events of the subscription read from the stream.
    events: int
    #: Aggregates whose snapshot was written.
    aggregates: int
    #: Events whose handler failed on every attempt: skipped, named in the log.
    failed: int
    #: The last stream sequence read (0: the stream had none of the subscription's events).
    through: int


def durable_class(subscription: SubscriptionConfig) -> type[Aggregate]:
    """The durable :class:`Aggregate` class ``subscription`` runs; :class:`ReplayError` if
    its handler is none."""
    handler = resolve_handler(subscription.handler)
    if not (isinstance(handler, type) and issubclass(handler, Aggregate)) or \
            handler.snapshot_every is None:
        raise ReplayError(f"subscription {subscription.name!r}: its handler {subscription.handler} "
                          "is not an Aggregate class with snapshot_every: it keeps no snapshots")
    return handler


def rebuild_snapshots(config: BusConfig, subscription: SubscriptionConfig,
                      progress: Progress | None = None) -> ReplayReport:
    """Rebuild every snapshot of ``subscription`` from its stream; ``progress(done, total)``
    is called as events are applied."""
    cls = durable_class(subscription)
    stores = KvSnapshotStores(config)
    rebuilding = _FromNothing(stores)
    table = HandlerTable([subscription], snapshots=rebuilding)
    try:
        events, failed, through = _replay(stores, subscription, table, progress)
        table.close()   # snapshots every aggregate still held, and waits for the writes
    finally:
        stores.close(SNAPSHOT_FLUSH_TIMEOUT)
    log.info("replayed %d event(s) of %s through sequence %d into %d %s snapshot(s)", events,
             subscription.name, through, len(rebuilding.saved), cls.__qualname__)
    return ReplayReport(events, len(rebuilding.saved), failed, through)


def _replay(stores: KvSnapshotStores, subscription: SubscriptionConfig, table: HandlerTable,
            progress: Progress | None) -> tuple[int, int, int]:
    """Read the subscription's events through an ephemeral consumer and handle each one;
    (events, failed, last sequence)."""
    thread, js = stores.jetstream()
    info = thread.run(js.stream_info(subscription.stream), FETCH_TIMEOUT)
    last = info.state.last_seq
    partitioned = info.config.subject_transform is not None
    wanted = f"*.{subscription.subject}" if partitioned else subscription.subject
    reader = thread.run(js.pull_subscribe(wanted, stream=subscription.stream, config=ConsumerConfig(
        ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL,
        inactive_threshold=CONSUMER_INACTIVE, mem_storage=True,
        description=f"actorbus replay of {subscription.name}'s snapshots")), FETCH_TIMEOUT)
    events = failed = through = 0
    consumer = thread.run(reader.consumer_info(), FETCH_TIMEOUT)
    total = consumer.num_pending or 0
    try:
        while events < total and through < last:
            for msg in thread.run(reader.fetch(min(FETCH_BATCH, total - events),
                                               timeout=FETCH_TIMEOUT), FETCH_TIMEOUT * 2):
                sequence = msg.metadata.sequence.stream
                # As it was published, as handlers see it (deliveries carry it so).
                subject = without_partition(msg.subject) if partitioned else msg.subject
                event = StoredEvent(sequence, subject, msg.data, msg.headers)
                events += 1
                through = max(through, sequence)
                if sequence <= last and not _applied(table, subscription, event):
                    failed += 1
            if progress is not None:
                progress(events, total)
    finally:
        # Gone once inactive anyway, if this fails.
        with contextlib.suppress(NotFoundError, TimeoutError):
            thread.run(js.delete_consumer(subscription.stream, consumer.name), FETCH_TIMEOUT)
    return events, failed, through


def _applied(table: HandlerTable, subscription: SubscriptionConfig, event: StoredEvent) -> bool:
    """Handle one event as a member would (keyless ones are no aggregate's: True); False when
    its handler failed on every attempt."""
    key = subscription_key(subscription, event.subject, event.data, event.headers)
    if key is None:
        return True
    outcome = table.process_one(Delivery(event.sequence, subscription.name, event.subject,
                                         event.data, event.headers, key, key, None, 1,
                                         event.sequence))
    if outcome.kind != SUCCEEDED:
        log.warning("aggregate %s: the event at sequence %d was not applied (%s: %s)", key,
                    event.sequence, outcome.kind, outcome.error)
        return False
    return True


class _FromNothing:
    """The KV stores seen by a replay: every aggregate starts from nothing (no snapshot is
    read and no event read back: the replay hands each one over itself); saves go to KV."""

    def __init__(self, stores: KvSnapshotStores) -> None:
        self._stores = stores
        self.saved: set[str] = set()

    def store_for(self, subscription: SubscriptionConfig) -> _FromNothing.Store:
        """The subscription's KV store, seen from nothing."""
        return _FromNothing.Store(self._stores.store_for(subscription), self.saved)

    def close(self, timeout: float) -> None:
        """Left to the replay, which closes the KV stores once it is done."""

    class Store:
        """One subscription's store in a replay."""

        def __init__(self, store: KvSnapshotStore, saved: set[str]) -> None:
            self._store = store
            self._saved = saved

        @property
        def where(self) -> str:
            """The bucket, for a log line."""
            return self._store.where

        def load(self, aggregate_ids: Sequence[str]) -> dict[str, bytes | None]:
            """None each: a replay starts every aggregate from nothing."""
            return dict.fromkeys(aggregate_ids)

        def save(self, aggregate_id: str, data: bytes) -> None:
            """Write it to the bucket (in the background)."""
            self._saved.add(aggregate_id)
            self._store.save(aggregate_id, data)

        def events(self, ranges: Sequence[EventRange]) -> dict[str, list[StoredEvent]]:
            """Nothing: the replay hands every event over in stream order itself."""
            return {}

        def flush(self, timeout: float) -> None:
            """Wait for the writes."""
            self._store.flush(timeout)


def replay_subscription(subscriptions: list[SubscriptionConfig], name: str | None) -> SubscriptionConfig:
    """The subscription to replay: the one named (by durable), or the only one with a durable
    aggregate; :class:`ReplayError` naming the choices otherwise."""
    if name is not None:
        for subscription in subscriptions:
            if subscription.name == name:
                return subscription
        raise ReplayError(f"no subscription {name!r}; the topology has "
                          f"{sorted(s.name for s in subscriptions)}")
    durable = [s for s in subscriptions if _is_durable(s)]
    if len(durable) != 1:
        raise ReplayError(f"{len(durable)} subscriptions have durable aggregates "
                          f"({sorted(s.name for s in durable)}): name one with --subscription")
    return durable[0]


def _is_durable(subscription: SubscriptionConfig) -> bool:
    try:
        durable_class(subscription)
    except Exception:   # not durable, or its handler does not import: not a candidate
        return False
    return True


def subscriptions_of(topology: Topology) -> list[SubscriptionConfig]:
    """The subscriptions of ``topology`` as a bus started from it would make them."""
    partitions = topology.bus.get("partitions")
    made = []
    for sub in topology.subscriptions:
        options = dict(sub.options)
        if partitions is not None and is_partitionable(sub.subject):
            options.setdefault("partitions", partitions)
        made.append(SubscriptionConfig(sub.subject, handler_reference(sub.handler),
                                       envelope=sub.envelope, durable=sub.durable,
                                       stream=sub.stream, **options))
    return made


def connection_of(topology: Topology, servers: str | None, **nats: str | None) -> BusConfig:
    """How to reach the topology's NATS: ``servers`` else its own (else ``$NATS_URL``), its
    credentials and TLS overridden by the ``nats`` settings given."""
    settings = {name: topology.bus.get(name) for name in _NATS_SETTINGS}
    if any(nats.get(name) is not None for name in _IDENTITY):
        settings.update(dict.fromkeys(_IDENTITY))   # an identity given replaces the topology's
    settings.update({name: value for name, value in nats.items() if value is not None})
    return connection_config(servers or topology.servers, **settings)


def describe(report: ReplayReport, subscription: SubscriptionConfig) -> str:
    """One line for the command: what was rebuilt from what."""
    failed = f"; {report.failed} event(s) failed and were skipped" if report.failed else ""
    return (f"rebuilt {report.aggregates} snapshot(s) of {subscription.name} from "
            f"{report.events} event(s) through sequence {report.through}{failed}")
