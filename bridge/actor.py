"""The Bridge actor: JetStream in, dispatches out, completions back, ack or nak.

It owns the NATS connection (on a background thread, see
:mod:`actorbus.bridge.nats_link`) and the in-flight table. It never acks
a message whose completion has not arrived, and it never creates actors:
a process holding a network thread must not fork.
"""
from __future__ import annotations

import enum
import logging
import os
import time
from collections import Counter
from typing import Any

from thespian.actors import ThespianWatch

from actorbus.actors.base import BusActor
from actorbus.actors.messages import (FAILED, SUCCEEDED, UNDELIVERED, BridgeReady, BusStopped,
                                      Completion, Delivery, Dispatch, DrainDeadline, Halt,
                                      Outcome, PollMailbox, ProgressTick, RequestFailed,
                                      RouterChanged, StartBridge, Stats, StatsRequest, StopBus,
                                      Subscribe, Subscribed)
from actorbus.actors.processing import HandlerTable
from actorbus.actors.routing import keyless_routing_key, next_keyless_slot
from actorbus.actors.watchdog import Watchdog
from actorbus.bridge.extraction import extract_aggregate_id
from actorbus.bridge.inflight import InFlight, InFlightTable
from actorbus.bridge.mailbox import Mailbox
from actorbus.bridge.metadata import delivery_numbers
from actorbus.bridge.nats_link import NatsLink
from actorbus.bridge.settlement import ACK, DEAD_LETTER, Order, dead_letter_headers, decide
from actorbus.bridge.tally import SubscriptionTally
from actorbus.config import BusConfig, SubscriptionConfig
from actorbus.envelope import InvalidEnvelope, decode_envelope

log = logging.getLogger("actorbus.bridge")

#: How often the Bridge looks at its mailbox where ThespianWatch is missing (simpleSystemBase).
POLL_INTERVAL = 0.005

#: How often the Bridge looks for messages that need an ``in_progress``.
PROGRESS_INTERVAL = 0.25

#: Dispatches the Router may not yet have routed before the Bridge holds the next back.
#: Measured on 2 cores (100k envelopes, pool 2/4/8): 1 gave 29k/25k/21k msg/s and
#: p50 16 ms at half rate; 2 gave 26k/22k/16k and 24 ms; 8 gave 26k/16k and 33 ms.
MAX_UNROUTED_DISPATCHES = 1

#: Bits of a token below the Bridge's incarnation: a restarted Bridge's tokens
#: start above everything an earlier one handed out (pool members drop tokens
#: at or below the last they saw), for 2**40 messages per incarnation.
INCARNATION_SHIFT = 40

#: Seconds a stopping Bridge gives its NATS link to flush and close.
CLOSE_TIMEOUT = 5.0
#: The same when the actor system ends the Bridge (no drain was asked for).
EXIT_CLOSE_TIMEOUT = 2.0

_OUTCOME_COUNTERS = {SUCCEEDED: "processed", FAILED: "failed", UNDELIVERED: "undelivered"}


class BridgePhase(enum.Enum):
    """Where the Bridge is in its life; each phase says what it still does."""

    STARTING = enum.auto()   # no connection yet
    RUNNING = enum.auto()    # fetching, dispatching, settling
    DRAINING = enum.auto()   # fetching nothing more; settling what completes, up to a deadline
    HALTED = enum.auto()     # the bus is broken: nothing fetched, nothing settled
    STOPPED = enum.auto()    # disconnected


#: Builds the Bridge's NATS side; :class:`NatsLink` unless a test gives another.
LinkFactory = Any


class Bridge(BusActor):
    """Consumes durable JetStream consumers and settles each message by its outcome."""

    def __init__(self) -> None:
        super().__init__()
        self._phase = BridgePhase.STARTING
        self._config: BusConfig | None = None
        self._router: Any = None
        self._mailbox = Mailbox()
        self._link: Any = None   # a NatsLink, or what StartBridge.link_factory builds
        self._inflight = InFlightTable()
        self._subscriptions: dict[str, SubscriptionConfig] = {}
        self._direct: HandlerTable | None = None   # pool size 0
        self._counts: Counter[str] = Counter()   # not per subscription: invalid, retried
        self._tallies: dict[str, SubscriptionTally] = {}
        self._queue_depths: tuple[int, ...] = ()
        self._watch: ThespianWatch | None = None
        self._dispatches = 0      # numbered dispatches sent to the Router
        self._routed = 0          # how many of them it has routed, as last heard
        self._unsent: list[Delivery] = []
        self._drain: tuple[int, Any] | None = None   # (request id, who asked) while DRAINING

    def watch(self) -> ThespianWatch | None:
        """The mailbox's descriptor while connected (multiprocTCPBase)."""
        return self._watch

    # ------------------------------------------------------------ messages
    def receiveMsg_WatchMessage(self, message, sender) -> None:
        self._take_fetched()

    def receiveMsg_WakeupMessage(self, message, sender) -> None:
        due = message.payload
        if isinstance(due, PollMailbox):
            if self._phase is not BridgePhase.STOPPED:
                self._take_fetched()
                self.wakeupAfter(POLL_INTERVAL, payload=PollMailbox())
        elif isinstance(due, ProgressTick):
            self._signal_progress()
        elif isinstance(due, DrainDeadline):
            self._finish_drain()

    def receiveMsg_Completion(self, message: Completion, sender) -> None:
        if message.queue_depths:
            self._queue_depths = message.queue_depths
        self._routed = max(self._routed, message.routed)
        self._complete(message)
        self._dispatch()
        if self._phase is BridgePhase.DRAINING and not len(self._inflight):
            self._finish_drain()

    def receiveMsg_StartBridge(self, message: StartBridge, sender) -> None:
        self._start(message, sender)

    def receiveMsg_Subscribe(self, message: Subscribe, sender) -> None:
        self._subscribe(message, sender)

    def receiveMsg_StatsRequest(self, message: StatsRequest, sender) -> None:
        self.send(sender, Stats(message.request_id, self._stats(),
                                by_subscription={name: tally.snapshot()
                                                 for name, tally in self._tallies.items()},
                                queue_depths=self._queue_depths))

    def receiveMsg_StopBus(self, message: StopBus, sender) -> None:
        self._start_drain(message, sender)

    def receiveMsg_PoisonMessage(self, message, sender) -> None:
        self._returned(message)

    def receiveMsg_Halt(self, message: Halt, sender) -> None:
        self._halt(message.reason)

    def receiveMsg_RouterChanged(self, message: RouterChanged, sender) -> None:
        self._resend_to(message.router)

    def receiveMsg_ActorExitRequest(self, message, sender) -> None:
        self._stop(timeout=EXIT_CLOSE_TIMEOUT)

    # ------------------------------------------------------------ set-up
    def _start(self, message: StartBridge, sender) -> None:
        self._config = config = message.config
        self._router = message.router
        self._inflight = InFlightTable(first_token=(message.incarnation << INCARNATION_SHIFT) + 1)
        if self._router is None:
            self._direct = HandlerTable(watchdog=Watchdog())
        make_link = message.link_factory or NatsLink
        self._link = make_link(config, self._mailbox)
        try:
            self._link.connect()
        except ConnectionError as exc:
            # Whoever asked reports it (the facade raises, the Supervisor logs a
            # restart's failure): an error line here would say it twice.
            log.info("%s", exc)
            self._link.close(1.0)
            self._link = None
            self.send(sender, RequestFailed(message.request_id, str(exc)))
            return
        self._phase = BridgePhase.RUNNING
        if config.runtime == "processes":
            self._watch = ThespianWatch([self._mailbox.fileno()])
        else:
            self.wakeupAfter(POLL_INTERVAL, payload=PollMailbox())
        self.wakeupAfter(PROGRESS_INTERVAL, payload=ProgressTick())
        self.send(sender, BridgeReady(message.request_id, os.getpid()))

    def _subscribe(self, message: Subscribe, sender) -> None:
        sub = message.subscription
        if self._link is None:
            self.send(sender, RequestFailed(message.request_id, "the Bridge is not connected"))
            return
        if self._direct is not None:
            self._direct.register(sub)
        self._subscriptions[sub.name] = sub
        self._tallies.setdefault(sub.name, SubscriptionTally("envelope" if sub.envelope else "plain"))
        try:
            self._link.subscribe(sub)
        except Exception as exc:
            del self._subscriptions[sub.name]
            log.error("subscribing %s failed: %s", sub.subject, exc)
            self.send(sender, RequestFailed(message.request_id, f"subscribing {sub.subject!r}: {exc}"))
            return
        self.send(sender, Subscribed(message.request_id, sub.stream, sub.durable))

    # ------------------------------------------------------------ hot path
    def _take_fetched(self) -> None:
        if self._phase is not BridgePhase.RUNNING:
            # Stopping: what was fetched but not dispatched stays un-acked,
            # so JetStream redelivers it after AckWait.
            self._mailbox.drain()
            return
        deliveries: list[Delivery] = []
        rejected: list[Order] = []
        for name, msgs in self._mailbox.drain():
            sub = self._subscriptions.get(name)
            if sub is not None:
                self._take(sub, msgs, deliveries, rejected)
        if rejected and self._link is not None:
            self._link.settle(rejected)
        if not deliveries:
            return
        if self._direct is not None:
            self._complete(Completion.of(self._direct.process(deliveries)))
        else:
            self._unsent.extend(deliveries)
            self._dispatch()

    def _dispatch(self, *, even_if_behind: bool = False) -> None:
        # Thespian sends to one target one at a time, each waiting for the
        # receiver's ack, and each send costs far more than a delivery: many
        # small dispatches queue behind each other. While the Router has not
        # routed the last one, deliveries gather here and go as one larger
        # dispatch (completions report how far it has got).
        if not self._unsent:
            return
        if not even_if_behind and self._dispatches - self._routed >= MAX_UNROUTED_DISPATCHES:
            return
        deliveries, self._unsent = tuple(self._unsent), []
        self._dispatches += 1
        self.send(self._router, Dispatch(deliveries, self._dispatches))

    def _take(self, sub: SubscriptionConfig, msgs: list, deliveries: list[Delivery],
              rejected: list[Order]) -> None:
        """Record each message in flight and add its delivery; invalid envelopes go to ``rejected``."""
        tally = self._tallies[sub.name].counts
        tally["received"] += len(msgs)
        now = time.monotonic()
        for msg in msgs:
            try:
                delivery_count, stream_sequence = delivery_numbers(msg.reply)
            except ValueError as exc:
                log.error("ignored a message on %s: %s", msg.subject, exc)
                continue
            if delivery_count > 1:
                tally["redelivered"] += 1
            if sub.envelope:
                try:
                    aggregate_id = decode_envelope(msg.data, sub.envelope_format,
                                                   max_bytes=sub.max_envelope_bytes).aggregate_id
                except InvalidEnvelope as exc:
                    # It can never succeed: redelivering it would only loop.
                    log.error("rejected message on %s (stream %s seq %d): %s; dead-lettered to %s",
                              msg.subject, sub.stream, stream_sequence, exc, sub.dead_letter_subject)
                    self._counts["invalid"] += 1
                    rejected.append(_dead_letter(msg, sub, stream_sequence, delivery_count, str(exc)))
                    continue
            else:
                aggregate_id = extract_aggregate_id(msg.data, msg.headers, None, msg.subject,
                                                    use_subject=sub.key_from_subject)
            keyless_slot = None
            routing_key = aggregate_id
            if aggregate_id is None:
                keyless_slot = next_keyless_slot()
                routing_key = keyless_routing_key(keyless_slot)
            entry = InFlight(msg, sub, now)
            entry.delivery = delivery = Delivery(
                self._inflight.add(entry), sub.name, msg.subject, msg.data, msg.headers,
                routing_key, aggregate_id, keyless_slot, delivery_count, stream_sequence)
            deliveries.append(delivery)

    def _complete(self, completion: Completion) -> None:
        if self._phase is BridgePhase.HALTED:
            return  # broken: everything stays un-acked for JetStream to redeliver
        actions: list[Order] = []
        pop = self._inflight.pop
        # The common case first: handled on the first attempt, so ack.
        for token, seconds in zip(completion.succeeded, completion.seconds):
            entry = pop(token)
            if entry is not None:
                tally = self._tallies[entry.subscription.name]
                tally.counts["processed"] += 1
                tally.observe(seconds)
                actions.append(Order(entry.msg, ACK))
        for outcome in completion.others:
            entry = pop(outcome.token)
            if entry is not None:
                actions.append(self._decide(entry, outcome))
        if actions and self._link is not None:
            self._link.settle(actions)

    def _decide(self, entry: InFlight, outcome: Outcome) -> Order:
        sub, delivery = entry.subscription, entry.delivery
        tally = self._tallies[sub.name]
        tally.counts[_OUTCOME_COUNTERS[outcome.kind]] += 1
        if outcome.kind != UNDELIVERED:
            tally.observe(outcome.seconds)
        if outcome.attempts > 1:
            self._counts["retried"] += outcome.attempts - 1
        decision = decide(outcome.kind, sub.settlement,
                          nak_delay=sub.nak_delay_for(delivery.delivery_count),
                          last_delivery=sub.is_last_delivery(delivery.delivery_count))
        if decision.warning:
            log.warning("%s: subject=%s error=%s", decision.warning, entry.msg.subject,
                        outcome.error)
        if decision.action == DEAD_LETTER:
            return _dead_letter(entry.msg, sub, delivery.stream_sequence, delivery.delivery_count,
                                outcome.error)
        return Order(entry.msg, decision.action, decision.delay)

    def _returned(self, message: PoisonMessage) -> None:
        returned = message.poisonMessage
        if isinstance(returned, Dispatch):
            self._complete(Completion.of(
                Outcome(d.token, UNDELIVERED, f"the Router failed: {message.details}", 0)
                for d in returned.deliveries))

    # ------------------------------------------------------------ stats, stop
    def _stats(self) -> dict[str, int]:
        # Per-message counts live per subscription; the totals are their sums.
        counts = Counter(self._counts)
        for tally in self._tallies.values():
            counts.update(tally.counts)
        counts = dict(counts)
        if self._link is not None:
            counts.update(self._link.counts())
        counts["in_flight"] = len(self._inflight)
        return counts

    def _resend_to(self, router) -> None:
        # The old pool's work is lost with it: send everything in flight to the
        # new Router, in the order it was fetched, numbered from 1 again.
        self._router = router
        deliveries = [e.delivery for e in self._inflight.entries()]
        self._dispatches = self._routed = 0
        log.warning("the Router was restarted; re-sending %d message(s) in flight", len(deliveries))
        self._unsent = deliveries
        self._dispatch(even_if_behind=True)

    def _signal_progress(self) -> None:
        # Handlers still running past half their AckWait: keep JetStream from redelivering.
        if self._link is None:
            return
        due = self._inflight.due_for_progress(time.monotonic())
        if due and self._phase is not BridgePhase.HALTED:
            self._link.touch([entry.msg for entry in due])
        # Not held back for long, whatever the Router last said.
        self._dispatch(even_if_behind=True)
        self.wakeupAfter(PROGRESS_INTERVAL, payload=ProgressTick())

    def _halt(self, reason: str) -> None:
        log.error("halted: %s; %d message(s) in flight stay un-acked", reason, len(self._inflight))
        if self._phase is BridgePhase.STOPPED:
            return
        self._phase = BridgePhase.HALTED
        if self._link is not None:
            self._link.stop_fetching()

    def _start_drain(self, message: StopBus, sender) -> None:
        # Fetch nothing more; let what is in flight complete, up to the timeout.
        self._drain = (message.request_id, sender)
        halted = self._phase is BridgePhase.HALTED
        if self._phase in (BridgePhase.STARTING, BridgePhase.RUNNING):
            self._phase = BridgePhase.DRAINING
        self._dispatch(even_if_behind=True)   # fetched before the stop: let it complete
        if self._link is not None:
            self._link.stop_fetching()
        if len(self._inflight) and not halted:
            log.info("draining %d message(s) in flight, for up to %.1fs",
                     len(self._inflight), message.timeout)
            self.wakeupAfter(message.timeout, payload=DrainDeadline())
        else:
            self._finish_drain()

    def _finish_drain(self) -> None:
        if self._drain is None:
            return
        request_id, asker = self._drain
        self._drain = None
        self._stop(timeout=CLOSE_TIMEOUT)
        self.send(asker, BusStopped(request_id))

    def _stop(self, timeout: float) -> None:
        # Whatever is still in flight is neither acked nor naked: JetStream
        # redelivers it after AckWait.
        self._phase = BridgePhase.STOPPED
        self._watch = None
        if self._link is not None:
            self._link.close(timeout)
            self._counts.update(self._link.counts())
            self._link = None
        if len(self._inflight):
            log.info("stopped with %d message(s) in flight; JetStream will redeliver them",
                     len(self._inflight))


def _dead_letter(msg, sub: SubscriptionConfig, stream_sequence: int, delivery_count: int,
                 error: str | None) -> Order:
    return Order(msg, DEAD_LETTER, None, sub.dead_letter_subject,
                 dead_letter_headers(msg, sub.stream, stream_sequence, delivery_count, error))
