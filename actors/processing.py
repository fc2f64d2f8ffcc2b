"""Running deliveries through their handlers, in order: the work of a pool member.

The aggregate actors and the Bridge without a pool (pool size 0) share
this, so both keep the same rules: in-place retries with backoff before a
failure is reported, so that a transient error does not reorder a key.
"""
from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
import time
from typing import Any
from collections.abc import Awaitable, Callable, Iterable, Sequence

from actorbus.actors.durability import SnapshotKeeper
from actorbus.actors.handlers import HandlerError, resolve_handler
from actorbus.actors.instances import AggregateInstances
from actorbus.actors.messages import (DEFERRED, FAILED, INVALID, SUCCEEDED, UNDELIVERED, Delivery,
                                      Outcome)
from actorbus.actors.watchdog import Watchdog
from actorbus.aggregate import Aggregate
from actorbus.config import SubscriptionConfig
from actorbus.envelope import InvalidEnvelope, decode_envelope
from actorbus.message import Message
from actorbus.snapshots import EventRange, SnapshotStores, StoredEvent
from actorbus.tracing import ProcessSpan, ProcessSpans, process_spans

log = logging.getLogger("actorbus.actors")

#: Seconds a clean stop waits for the durable aggregates' last snapshots to be written.
SNAPSHOT_FLUSH_TIMEOUT = 5.0


class HandlerTable:
    """The handlers of one pool member, by subscription, and the loop for async ones."""

    def __init__(self, subscriptions: Iterable[SubscriptionConfig] = (),
                 sleep: Callable[[float], Any] = time.sleep, watchdog: Watchdog | None = None,
                 snapshots: SnapshotStores | None = None, spans: ProcessSpans | None = None):
        self._watchdog = watchdog
        self._spans = spans if spans is not None else process_spans()
        self._snapshots = snapshots   # None: durable aggregates keep their state in memory only
        self._durable = False         # a resolved handler keeps snapshots
        self._subscriptions: dict[str, SubscriptionConfig] = {}
        # (subscription, aggregate id) → stream sequence of its failed message due to come back.
        self._blocked: dict[tuple[str, str | None], int] = {}
        self._handlers: dict[str, Callable[..., Any]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sleep = sleep
        for subscription in subscriptions:
            self.register(subscription)

    def use_snapshots(self, snapshots: SnapshotStores) -> None:
        """Keep durable aggregates' snapshots in ``snapshots`` (before any handler is resolved)."""
        self._snapshots = snapshots

    def register(self, subscription: SubscriptionConfig) -> None:
        """Add or replace the handler of ``subscription``."""
        self._subscriptions[subscription.name] = subscription
        self._handlers.pop(subscription.name, None)

    def resolve(self, name: str) -> None:
        """Import the handler of subscription ``name`` now; raise :class:`HandlerError` if it fails.

        Called when a subscription is registered, so that a handler that does
        not import here fails ``subscribe`` instead of every delivery.
        """
        self._handler(self._subscriptions[name])

    def process(self, deliveries: Sequence[Delivery]) -> tuple[Outcome, ...]:
        """Handle ``deliveries`` strictly in order (see :meth:`handle`); one outcome each."""
        self.prepare(deliveries)
        return tuple(self.handle(delivery) for delivery in deliveries)

    def prepare(self, deliveries: Sequence[Delivery]) -> None:
        """Restore at once the durable aggregates whose first message here is among
        ``deliveries`` (about to be handled); never raises. Nothing to do (and nothing
        done, on the hot path) until a resolved handler keeps snapshots."""
        if not self._durable:
            return
        firsts: dict[str, dict[str, EventRange]] = {}
        for delivery in deliveries:
            if delivery.aggregate_id is not None:
                firsts.setdefault(delivery.subscription, {}).setdefault(
                    delivery.aggregate_id, EventRange(delivery.aggregate_id, 0,
                                                      delivery.stream_sequence, delivery.subject))
        for name, wanted in firsts.items():
            spec = self._subscriptions.get(name)
            try:
                instances = None if spec is None else self._handler(spec)
            except HandlerError:
                continue   # each of its deliveries fails, saying why
            if isinstance(instances, AggregateInstances):
                instances.prepare(list(wanted.values()))

    def handle(self, delivery: Delivery) -> Outcome:
        """Handle one delivery in its aggregate's order; never raises.

        Once a message of an aggregate fails and is due to come back
        (redelivered after a nak), the later messages of that aggregate are
        not handled but ``DEFERRED``, until the failed one comes back and
        succeeds: its successes must follow stream order.
        """
        outcome = self._deferred(delivery) if self._blocked else None
        if outcome is None:
            outcome = self.process_one(delivery)
            if outcome.kind != SUCCEEDED or self._blocked:
                self._settled(delivery, outcome)
        return outcome

    def _deferred(self, delivery: Delivery) -> Outcome | None:
        """The ``DEFERRED`` outcome of ``delivery`` if an older message of its aggregate failed
        and is due to come back; None when it may be handled now."""
        if delivery.aggregate_id is None:
            return None
        failed_at = self._blocked.get((delivery.subscription, delivery.aggregate_id))
        if failed_at is not None and delivery.stream_sequence > failed_at:
            return Outcome(delivery.token, DEFERRED,
                           f"waits for sequence {failed_at} of its aggregate", 0)
        return None

    def _settled(self, delivery: Delivery, outcome: Outcome) -> None:
        """Record how ``delivery`` went: a failure due to come back blocks its aggregate;
        the blocking message handled again unblocks it."""
        if delivery.aggregate_id is None:
            return
        key = (delivery.subscription, delivery.aggregate_id)
        if outcome.kind not in (SUCCEEDED, INVALID) and self._comes_back(delivery):
            self._blocked[key] = delivery.stream_sequence
        elif self._blocked.get(key) == delivery.stream_sequence:
            del self._blocked[key]   # the failed one came back and is settled now

    def _comes_back(self, delivery: Delivery) -> bool:
        spec = self._subscriptions.get(delivery.subscription)
        return spec is not None and spec.settlement.redelivers and \
            not spec.is_last_delivery(delivery.delivery_count)

    def process_one(self, delivery: Delivery) -> Outcome:
        """Handle one delivery with in-place retries, inside its ``process`` span; never
        raises."""
        spec = self._subscriptions.get(delivery.subscription)
        if spec is None:
            return Outcome(delivery.token, UNDELIVERED,
                           f"no handler registered for subscription {delivery.subscription!r}", 0)
        message: Message | None = None
        invalid = None
        try:
            message = self._message(spec, delivery)
        except InvalidEnvelope as exc:
            invalid = str(exc)
        span = self._spans.start(spec, delivery.subject, delivery.headers,
                                 message.envelope.trace_id if message and message.envelope else None)
        if span is None:   # not traced
            return self._run(spec, delivery, message, None) if message is not None else \
                Outcome(delivery.token, INVALID, invalid, 0)
        if span.recording:
            span.describe(_attributes_of(delivery))
        with span:
            if message is None:
                outcome = Outcome(delivery.token, INVALID, invalid, 0)
            else:
                outcome = self._run(spec, delivery, message, span)
        handle = span.end(outcome.kind, outcome.error, outcome.attempts)
        return outcome if handle is None else outcome._replace(trace=handle)

    def _run(self, spec: SubscriptionConfig, delivery: Delivery, message: Message,
             span: ProcessSpan | None) -> Outcome:
        """The handler on ``message``, tried again (in place, after a delay) while it raises,
        up to the subscription's retries."""
        try:
            handler = self._handler(spec)
        except HandlerError as exc:
            return Outcome(delivery.token, FAILED, str(exc), 1)
        attempt = 1
        started = time.perf_counter()
        while True:
            try:
                if self._watchdog is not None:
                    self._watchdog.arm(spec.processing_timeout, f"the handler of {delivery.subject}")
                try:
                    self._call(handler, message)
                finally:
                    if self._watchdog is not None:
                        self._watchdog.disarm()
                return Outcome(delivery.token, SUCCEEDED, None, attempt,
                               time.perf_counter() - started)
            except Exception as exc:
                if attempt > spec.retries:
                    return Outcome(delivery.token, FAILED, f"{type(exc).__name__}: {exc}", attempt,
                                   time.perf_counter() - started)
                delay = spec.retry_delay_for(attempt)
                log.debug("handler failed on %s (attempt %d), retrying in %.3fs: %r",
                          delivery.subject, attempt, delay, exc)
                if span is not None:
                    span.retried(attempt, exc)
                self._sleep(delay)
                attempt += 1
                message = dataclasses.replace(message, attempt=attempt)

    def forget_durable(self) -> None:
        """Drop every durable aggregate's live instance, unsaved: what it reads changed hands,
        so their events may have been handled elsewhere; each is restored on its next message."""
        for handler in self._handlers.values():
            if isinstance(handler, AggregateInstances):
                handler.forget()

    def close(self) -> None:
        """Write the durable aggregates' last snapshots, then close the event loop used for
        async handlers, if one was made."""
        for handler in self._handlers.values():
            if isinstance(handler, AggregateInstances):
                handler.flush(SNAPSHOT_FLUSH_TIMEOUT)
        if self._snapshots is not None:
            self._snapshots.close(SNAPSHOT_FLUSH_TIMEOUT)
        if self._loop is not None:
            self._loop.close()
            self._loop = None

    def _handler(self, spec: SubscriptionConfig) -> Callable[..., Any]:
        handler = self._handlers.get(spec.name)
        if handler is None:
            handler = resolve_handler(spec.handler)
            if isinstance(handler, type) and issubclass(handler, Aggregate):
                handler = AggregateInstances(handler, keeper=self._keeper(spec, handler))
            self._handlers[spec.name] = handler
        return handler

    def _keeper(self, spec: SubscriptionConfig, cls: type[Aggregate]) -> SnapshotKeeper | None:
        """What makes ``cls`` durable on ``spec`` (None: it does not snapshot, or nothing here
        can keep snapshots)."""
        if cls.snapshot_every is None:
            return None
        if self._snapshots is None:
            log.warning("subscription %s: %s has snapshot_every, but its handlers run where no "
                        "snapshot store is (pool_size=0): its state is kept in memory only",
                        spec.name, cls.__qualname__)
            return None

        def message_of(event: StoredEvent, aggregate_id: str) -> Message:
            return self._message(spec, Delivery(0, spec.name, event.subject, event.data,
                                                event.headers, aggregate_id, aggregate_id, None, 1,
                                                event.sequence))

        self._durable = True
        return SnapshotKeeper(cls, self._snapshots.store_for(spec), message_of, self._await)

    @staticmethod
    def _message(spec: SubscriptionConfig, delivery: Delivery) -> Message:
        envelope = None
        data = delivery.data
        if spec.envelope:
            # Validated here, not in the Bridge: a member has cores to spare, the Bridge
            # is the stage every message passes through. It routed by a key it read
            # without decoding (the subject, a header, a peek): the envelope must agree.
            envelope = decode_envelope(delivery.data, spec.envelope_format,
                                       max_bytes=spec.max_envelope_bytes)
            if delivery.aggregate_id is not None and envelope.aggregate_id != delivery.aggregate_id:
                raise InvalidEnvelope(
                    "aggregate_id", f"{envelope.aggregate_id!r} differs from the key the "
                    f"message was routed by, {delivery.aggregate_id!r} (its subject's last token "
                    "on a partitioned stream, else its X-Aggregate-ID header)")
            data = envelope.payload
        return Message(
            subject=delivery.subject,
            data=data,
            headers=delivery.headers,
            envelope=envelope,
            aggregate_id=delivery.aggregate_id,
            routing_key=delivery.routing_key,
            delivery_count=delivery.delivery_count,
            stream_sequence=delivery.stream_sequence,
        )

    def _call(self, handler: Callable[..., Any], message: Message) -> None:
        result = handler(message)
        if inspect.isawaitable(result):  # an async def handler, or an async handle()
            self._await(result)

    def _await(self, awaitable: Awaitable[Any]) -> Any:
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        return self._loop.run_until_complete(awaitable)


def _attributes_of(delivery: Delivery) -> dict[str, Any]:
    """What a traced delivery's ``process`` span says about it, beyond the messaging basics."""
    attributes: dict[str, Any] = {"messaging.message.body.size": len(delivery.data),
                                  "actorbus.subscription": delivery.subscription,
                                  "actorbus.delivery_count": delivery.delivery_count,
                                  "actorbus.stream_sequence": delivery.stream_sequence}
    if delivery.aggregate_id is not None:
        attributes["actorbus.aggregate_id"] = delivery.aggregate_id
    return attributes
