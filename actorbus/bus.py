"""``EventBus``: the facade over the Supervisor actor and a publisher."""
from __future__ import annotations

import itertools
import logging
import threading
import time
from typing import Any, TypeVar
from collections.abc import Callable, Iterable, Mapping

from actorbus.actors.handlers import handler_reference
from actorbus.actors.messages import (BusStarted, BusStopped, RequestFailed, StartBus, Stats,
                                      StatsRequest, StopBus, Subscribe, Subscribed)
from actorbus.codecs import EnvelopeFormat
from actorbus.envelope import Envelope
from actorbus.config import (DEFAULT_WINDOW, BusConfig, NatsAuth, SubscriptionConfig, resolve_auth,
                             servers_from_env)
from actorbus.errors import ConfigurationError
from actorbus.groups import DEFAULT_HEARTBEAT, ConsumerGroup, is_partitionable
from actorbus.metrics import MetricsServer
from actorbus.policies import RestartPolicy, SupervisionTree
from actorbus.publisher import OutgoingMessage, Publisher, PublishResult
from actorbus.runtime import ProcessRuntime, SimpleRuntime, make_runtime
from actorbus.supervision.supervisor import Supervisor

log = logging.getLogger("actorbus.bus")

#: The Supervisor's answer a request waits for.
_Reply = TypeVar("_Reply")

#: Where NATS is when neither ``servers`` nor ``$NATS_URL`` say.
DEFAULT_SERVERS = "nats://127.0.0.1:4222"

#: The counters ``stats()`` always has.
STAT_KEYS = ("received", "processed", "failed", "acked", "naked", "dead_lettered", "restarts",
             "in_flight", "redelivered", "retried", "undelivered", "invalid", "invalid_keys",
             "termed", "settle_errors", "in_progress", "restarts_bridge", "restarts_router", "restarts_pool",
             "held", "held_for_order", "recovered", "recoveries", "duplicates_skipped")


#: Seconds ``stop(timeout)`` may take beyond ``timeout``: closing, and ending the actors.
STOP_GRACE = 2.0


class BusError(RuntimeError):
    """The bus could not do what was asked; the message says why."""


class EventBus:
    """Consume JetStream subscriptions on a supervised actor pool, and publish.

    Starts at construction (connects, builds the pool) and stops at
    :meth:`stop` or the end of a ``with`` block. Its actor processes and
    metrics endpoint listen on 127.0.0.1 unless ``transport_host`` (or
    ``$ACTORBUS_TRANSPORT_HOST``) and ``metrics_host`` say otherwise::

        with EventBus(servers=url, pool_size=8) as bus:
            bus.subscribe("orders.>", handle, envelope=True, durable="orders")

    ``servers`` defaults to ``$NATS_URL``, then ``nats://127.0.0.1:4222``.
    A secured NATS: ``user`` with ``password``, ``token``, ``nkey_seed``
    (an NKey seed file) or ``creds`` (a JWT creds file); ``tls_ca`` (a CA
    file), ``tls_cert`` with ``tls_key`` (a client certificate). Settings
    not given come from the ``nats`` CLI's environment variables
    (``NATS_USER``, ``NATS_PASSWORD``, ``NATS_CREDS``, ``NATS_NKEY``,
    ``NATS_CA``, ``NATS_CERT``, ``NATS_KEY``); ``auth=NatsAuth(...)`` gives
    them all at once and reads no environment.

    Many buses on one stream (the documentation's "Running more than one instance", docs/scale-out.md):
    ``group`` names a partitioned consumer group and ``partitions`` its P;
    with ``members`` (the fixed list) and ``member`` (which one this bus is)
    the group is static, without ``members`` it is elastic (``member``
    defaults to ``<host>-<pid>``; ``heartbeat`` seconds between its
    heartbeats). Every subscription of such a bus is partitioned: its
    subject ends with the aggregate id as a ``*`` token (``orders.*``).

    Using more cores with one bus: ``partitions`` without ``group``
    partitions the streams this bus's subscriptions create, for each subject
    that ends with the aggregate id as a ``*`` token, and ``bridges`` Bridges
    (default: one per four cores, at most one per partition) share the
    partitions; a subscription whose key is not in its subject is read by
    one Bridge.
    """

    def __init__(self, servers: str | list[str] | tuple[str, ...] | None = None,
                 pool_size: int = 8, runtime: str = "processes",
                 supervision: RestartPolicy | SupervisionTree | None = None, *,
                 window: int = DEFAULT_WINDOW, connect_timeout: float = 5.0, name: str = "actorbus",
                 admin_port: int | None = None, log_config: dict[str, Any] | None = None,
                 request_timeout: float = 30.0, metrics_port: int | None = None,
                 metrics_host: str = "127.0.0.1", transport_host: str | None = None,
                 auth: NatsAuth | None = None, user: str | None = None, password: str | None = None,
                 token: str | None = None, nkey_seed: str | None = None, creds: str | None = None,
                 tls_ca: str | None = None, tls_cert: str | None = None,
                 tls_key: str | None = None, group: str | None = None,
                 partitions: int | None = None, member: str | None = None,
                 members: Iterable[str] | None = None,
                 heartbeat: float = DEFAULT_HEARTBEAT, bridges: int | None = None) -> None:
        if servers is None:
            servers = servers_from_env() or DEFAULT_SERVERS
        # A str or list is normalised by BusConfig itself.
        self.config = BusConfig(servers=servers,
                                pool_size=pool_size, runtime=runtime, window=window,
                                connect_timeout=connect_timeout, name=name, supervision=supervision,
                                auth=resolve_auth(auth, user=user, password=password, token=token,
                                                  nkey_seed=nkey_seed, creds=creds, tls_ca=tls_ca,
                                                  tls_cert=tls_cert, tls_key=tls_key),
                                group=_group(group, partitions, member, members, heartbeat),
                                partitions=partitions if group is None else None,
                                bridges=bridges)
        self._request_timeout = request_timeout
        self._request_ids = itertools.count(1)
        self._subscriptions: dict[str, SubscriptionConfig] = {}
        self._pids: dict[str, int] = {}
        self._stopped = False
        self._publisher: Publisher | None = None
        self._metrics: MetricsServer | None = None
        # The metrics endpoint reads stats from its own thread: one request at a time.
        self._request_lock = threading.Lock()
        self._runtime = make_runtime(runtime, admin_port, log_config, transport_host)
        try:
            self._supervisor = self._runtime.create(Supervisor)
            started = self._request(lambda rid: StartBus(rid, self.config), BusStarted,
                                    what="starting the bus")
            self._pids = dict(started.pids)
            self._publisher = Publisher(self.config)
            if metrics_port is not None:
                self._metrics = MetricsServer(self.stats, metrics_port, addr=metrics_host,
                                              draining=lambda: self._stopped)
        except BaseException:
            if self._publisher is not None:
                self._publisher.close()
            self._runtime.shutdown(self._pids.values())
            self._stopped = True
            raise

    # ------------------------------------------------------------ consuming
    def subscribe(self, subject: str, handler: Callable[..., Any] | str, *, envelope: bool = True,
                  durable: str | None = None, stream: str | None = None, **options: Any) -> SubscriptionConfig:
        """Consume ``subject`` through a durable pull consumer, ``handler`` on the pool.

        ``handler`` is a module-level function (or ``"module:function"``),
        sync or ``async def``; it raises to fail. ``envelope=True`` decodes
        envelopes and redelivers failures; ``envelope=False`` passes raw
        bytes and does not. ``options`` are the other fields of
        :class:`~actorbus.config.SubscriptionConfig` (``ack_wait``,
        ``max_deliver``, ``max_ack_pending``, ``storage``, ``retries``, ...).
        ``handler`` may also be an :class:`~actorbus.Aggregate` subclass.
        Returns the subscription's configuration.
        """
        self._check_running()
        ref = handler_reference(handler)
        if self.config.group is not None:
            options.setdefault("partitions", self.config.group.partitions)
        elif self.config.partitions is not None and is_partitionable(subject):
            options.setdefault("partitions", self.config.partitions)
        # None: derived from the subject (SubscriptionConfig fills them in).
        sub = SubscriptionConfig(subject=subject, handler=ref, envelope=envelope,
                                 durable=durable, stream=stream, **options)
        if sub.name in self._subscriptions:
            raise BusError(f"durable {sub.name!r} is already subscribed on this bus")
        self._request(lambda rid: Subscribe(rid, sub), Subscribed, what=f"subscribing {subject!r}")
        self._subscriptions[sub.name] = sub
        return sub

    # ------------------------------------------------------------ publishing
    def publish(self, subject: str, data: bytes,
                headers: Mapping[str, str] | None = None) -> PublishResult:
        """Publish raw bytes to JetStream; return its :class:`PublishResult` (``sequence``,
        ``duplicate``, ``stream``). Raises :class:`PublishError`."""
        self._check_running()
        return self._running_publisher().publish(subject, data, headers)

    def publish_envelope(self, subject: str, envelope: Envelope,
                         format: EnvelopeFormat | str = EnvelopeFormat.MSGPACK) -> PublishResult:
        """Publish an envelope in ``format`` (``"msgpack"``, or ``"json"`` as the Go EventBus
        writes it) with headers ``Nats-Msg-Id`` (its event id), ``Content-Type`` and
        ``X-Aggregate-ID``; return its :class:`PublishResult`: ``duplicate`` is True when
        JetStream already had it. ``{aggregate_id}`` in ``subject`` is replaced by the
        envelope's aggregate id (``"orders.{aggregate_id}"``), as a partitioned stream needs."""
        self._check_running()
        return self._running_publisher().publish_envelope(subject, envelope, format)

    def publish_many(self, messages: Iterable[OutgoingMessage], *, in_flight: int = 500,
                     format: EnvelopeFormat | str = EnvelopeFormat.MSGPACK) -> list[PublishResult]:
        """Publish ``(subject, data[, headers])`` items (``data`` bytes or an
        :class:`Envelope`, encoded in ``format``), awaiting every acknowledgement; one
        result each, in order."""
        self._check_running()
        return self._running_publisher().publish_many(messages, in_flight=in_flight, format=format)

    # ------------------------------------------------------------ watching, stopping
    def stats(self) -> dict[str, Any]:
        """Counters: received, processed, failed, acked, naked, dead_lettered, restarts,
        in_flight; also redelivered (delivery count > 1), retried (in-place retries),
        undelivered (never reached a handler), invalid (rejected envelopes), invalid_keys
        (an aggregate-id header that is not a valid id: the message went round-robin), termed,
        settle_errors (acks/naks that did not reach the server), in_progress
        (signals sent for long-running handlers); held (messages waiting now behind an
        older message of their key due to come back), held_for_order (how often that
        happened), recovered (un-acked messages read back from the stream after a
        Bridge start or a reconnect), recoveries, duplicates_skipped (redeliveries of
        recovered messages acked without handling them again); pinned and standby (durables
        of a priority group this bus got a message for under its pin, and the others), pins, unpins; in a
        consumer group, partitions_owned, group_members and rebalances; ``restarts`` split by level as
        restarts_bridge, restarts_router, restarts_pool; ``actors``, each
        supervised actor's state (starting, running, restarting, stopped);
        ``subscriptions``, per durable: its kind, counts and handler-duration
        histogram buckets; ``queue_depths``, messages held per pool member;
        ``nats_disconnected``, Bridges whose NATS connection is not up now; ``lag``, per
        durable: pending, ack_pending, redelivered and oldest_unacked_seconds as JetStream
        reported them at read_at (read every few seconds, not at each call).

        Raises :class:`BusError` once the bus has stopped processing because
        actors died faster than its supervision policy allows.
        """
        self._check_running()
        reply = self._request(StatsRequest, Stats, what="reading stats")
        self._pids.update(reply.pids)
        if reply.failure:
            raise BusError(f"the bus has stopped processing: {reply.failure}")
        counts: dict[str, Any] = {key: 0 for key in STAT_KEYS}
        counts.update(reply.counts)
        counts["actors"] = dict(reply.states)
        counts["subscriptions"] = {name: dict(tally) for name, tally in reply.by_subscription.items()}
        counts["queue_depths"] = list(reply.queue_depths)
        counts["lag"] = {durable: dict(lag) for durable, lag in reply.lag.items()}
        return counts

    @property
    def stopped(self) -> bool:
        """True once :meth:`stop` was called (draining, or done)."""
        return self._stopped

    @property
    def pids(self) -> dict[str, int]:
        """The process id of each actor (``supervisor``, ``bridge``, ``router``, ``member-<i>``),
        as of the last ``stats()`` call."""
        return dict(self._pids)

    @property
    def runtime(self) -> ProcessRuntime | SimpleRuntime:
        """The actor system under the bus (``runtime.pids()``: Thespian's processes)."""
        return self._runtime

    def stop(self, timeout: float = 10.0) -> None:
        """Drain and shut down: stop fetching, wait up to ``timeout`` seconds for the
        messages in flight to complete and settle them, disconnect, stop the actors.

        Messages still in flight after ``timeout`` are neither acked nor
        naked: JetStream redelivers them after their AckWait.
        """
        if self._stopped:
            return
        # A deploy gives the process a fixed grace period: whatever the handlers do,
        # stop returns within timeout + STOP_GRACE seconds.
        deadline = time.monotonic() + timeout + STOP_GRACE
        # Draining from here: the probes say so (not ready) until the drain is over.
        self._stopped = True
        try:
            self._request(lambda rid: StopBus(rid, timeout), BusStopped, what="stopping the bus",
                          timeout=timeout + STOP_GRACE / 2)
        except Exception as exc:
            log.warning("the Bridge did not stop cleanly: %s", exc)
        finally:
            if self._metrics is not None:
                self._metrics.close()
            if self._publisher is not None:
                self._publisher.close()
            self._runtime.shutdown(self._pids.values(),
                                   timeout=max(deadline - time.monotonic(), 0.1))

    def __enter__(self) -> EventBus:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    # ------------------------------------------------------------ internals
    def _running_publisher(self) -> Publisher:
        self._check_running()
        assert self._publisher is not None   # made at start, kept until stop
        return self._publisher

    def _check_running(self) -> None:
        if self._stopped:
            raise BusError("the bus is stopped")

    def _request(self, make: Callable[[int], object], expected: type[_Reply], *, what: str,
                 timeout: float | None = None) -> _Reply:
        with self._request_lock:
            return self._request_locked(make, expected, what=what, timeout=timeout)

    def _request_locked(self, make: Callable[[int], object], expected: type[_Reply], *, what: str,
                        timeout: float | None) -> _Reply:
        request_id = next(self._request_ids)
        timeout = self._request_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        reply: object = self._runtime.ask(self._supervisor, make(request_id), timeout)
        while True:
            if isinstance(reply, RequestFailed) and reply.request_id == request_id:
                raise BusError(f"{what} failed: {reply.error}")
            if isinstance(reply, expected) and getattr(reply, "request_id", None) == request_id:
                return reply
            remaining = deadline - time.monotonic()
            if reply is None or remaining <= 0:
                raise BusError(f"{what}: no answer from the Supervisor within {timeout}s")
            # A late answer to an earlier request that timed out: skip it.
            reply = self._runtime.listen(remaining)


def _group(name: str | None, partitions: int | None, member: str | None,
           members: Iterable[str] | None, heartbeat: float) -> ConsumerGroup | None:
    if name is None:   # partitions alone: this bus's own streams are partitioned
        given = [n for n, v in (("member", member), ("members", members)) if v is not None]
        if given:
            raise ConfigurationError(f"{', '.join(given)} without group=: name the consumer group")
        return None
    if partitions is None:
        raise ConfigurationError(f"group {name!r} needs partitions=: how many ways the stream "
                                 "is split (fixed for the stream's life)")
    listed = None if members is None else tuple(members)
    if member is None:   # the group's default name
        return ConsumerGroup(name, partitions, members=listed, heartbeat=heartbeat)
    return ConsumerGroup(name, partitions, member, listed, heartbeat)
