"""The Bridge actor: JetStream in, dispatches out, completions back, ack or nak.

It owns the NATS connection (an asyncio loop it turns on its own thread, see
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
from collections.abc import Mapping
from typing import Any

from thespian.actors import (ActorExitRequest, PoisonMessage, ThespianWatch, WakeupMessage,
                             WatchMessage)

from actorbus.actors.base import BusActor
from actorbus.actors.messages import (Address, DEFERRED, FAILED, INVALID, SUCCEEDED, UNDELIVERED,
                                      BridgeReady,
                                      BusStopped,
                                      Completion, Delivery, Dispatch, DrainDeadline, Halt,
                                      LinkTimer, Outcome, PinsHeld, PollLink, PoolMembers, ProgressTick,
                                      RequestFailed, RouterChanged, StartBridge, Stats,
                                      StatsRequest, StopBus, Subscribe, Subscribed)
from actorbus.actors.handlers import HandlerError
from actorbus.actors.pool import PoolTable
from actorbus.actors.processing import HandlerTable
from actorbus.actors.routing import keyless_routing_key, next_keyless_slot
from actorbus.actors.watchdog import Watchdog
from actorbus.bridge.book import SubscriptionBook
from actorbus.bridge.inbox import Delivered
from actorbus.bridge.inflight import InFlight, InFlightTable
from actorbus.bridge.jetstream import subject_covers
from actorbus.bridge.link import BridgeLink, LinkFactory
from actorbus.bridge.layout import BridgePartitions, ConsumerLayout, layout_for
from actorbus.bridge.mailbox import Mailbox, PinsChanged, Recovery, Released
from actorbus.bridge.metadata import delivery_numbers
from actorbus.bridge.nats_link import NatsLink
from actorbus.bridge.recovery import RecoveredMsg
from actorbus.bridge.settlement import (ACK, DEAD_LETTER, NAK, Decision, Order,
                                        dead_letter_headers, decide)
from actorbus.config import BusConfig, SubscriptionConfig
from actorbus.groups import without_partition
from actorbus.tracing import BridgeSpans, SpanHandle, end_settle_span, flush_traces

log = logging.getLogger("actorbus.bridge")

#: How often the Bridge turns its link where ThespianWatch is missing (simpleSystemBase).
POLL_INTERVAL = 0.005

#: Most link turns after one actor message: arrivals taken between turns, the
#: settlements they make written by the next.
MAX_TURNS = 8

#: How often the Bridge looks for messages that need an ``in_progress``.
PROGRESS_INTERVAL = 0.25

#: Bits of a token below the Bridge's incarnation: a restarted Bridge's tokens
#: start above everything an earlier one handed out (pool members drop tokens
#: at or below the last they saw), for 2**40 messages per incarnation.
INCARNATION_SHIFT = 40

#: Seconds a stopping Bridge gives its NATS link to flush and close.
CLOSE_TIMEOUT = 5.0
#: The same when the actor system ends the Bridge (no drain was asked for).
EXIT_CLOSE_TIMEOUT = 2.0

#: The delivery count a recovered message is handled with: it was delivered at least once,
#: to a Bridge that is gone (or over a connection that was cut), and may have been handled.
RECOVERED_DELIVERY_COUNT = 2

#: Seconds past its nak delay and two AckWaits after which a naked message that has not
#: come back is no longer waited for (see KeyOrder.overdue).
REDELIVERY_GRACE = 5.0

_OUTCOME_COUNTERS = {SUCCEEDED: "processed", FAILED: "failed", UNDELIVERED: "undelivered"}


class BridgePhase(enum.Enum):
    """Where the Bridge is in its life; each phase says what it still does."""

    STARTING = enum.auto()   # no connection yet
    RUNNING = enum.auto()    # fetching, dispatching, settling
    DRAINING = enum.auto()   # fetching nothing more; settling what completes, up to a deadline
    HALTED = enum.auto()     # the bus is broken: nothing fetched, nothing settled
    STOPPED = enum.auto()    # disconnected


class Bridge(BusActor):
    """Consumes durable JetStream consumers and settles each message by its outcome."""

    def __init__(self) -> None:
        super().__init__()
        self._phase = BridgePhase.STARTING
        self._config: BusConfig | None = None
        self._router: Address | None = None
        self._mailbox = Mailbox()
        self._link: BridgeLink | None = None   # a NatsLink, or what StartBridge.link_factory builds
        self._supervisor: Address | None = None   # who started it: told of the pins it holds
        self._pins_reported: dict[str, str] = {}
        self._inflight = InFlightTable()
        self._books: dict[str, SubscriptionBook] = {}
        self._direct: HandlerTable | None = None   # pool size 0
        self._counts: Counter[str] = Counter()   # not per subscription: invalid, retried
        self._watch: ThespianWatch | None = None
        # Where the pool members are (the Router says), what each holds and what waits for it.
        self._pool = PoolTable()
        self._drain: tuple[int, Address] | None = None   # (request id, who asked) while DRAINING
        self._last_held = 0
        self._layout: ConsumerLayout = BridgePartitions()
        self._link_due: float | None = None   # when the link's next timer wakes the Bridge
        self._spans = BridgeSpans()

    def watch(self) -> ThespianWatch | None:
        """The link's descriptor while connected (multiprocTCPBase)."""
        return self._watch

    def receiveMessage(self, message: Any, sender: Any) -> ThespianWatch | None:
        super().receiveMessage(message, sender)
        # A watch or a wakeup may mean the connection is ready; any other message may
        # have handed the link settlements.
        self._turn_link(io=isinstance(message, (WatchMessage, WakeupMessage)))
        return self.watch()

    def _turn_link(self, io: bool) -> None:
        # The link's loop runs only here, on this thread: what it read is taken
        # between turns, and what that settles is written by the next turn.
        link = self._link
        if link is None:
            return
        try:
            for _ in range(MAX_TURNS):
                due = link.turn(io)
                if not self._mailbox:
                    break
                self._take_fetched()
                io = False
            # Arrivals left after the last turn are taken at the wakeup, not at whatever
            # message happens to come next.
            self._wake_link_at(0.0 if self._mailbox else due)
        except Exception:
            log.exception("the Bridge's NATS link failed in a turn")

    def _wake_link_at(self, due: float | None) -> None:
        if due is None:
            return
        at = time.monotonic() + due
        if self._link_due is None or at < self._link_due - 0.001:
            self._link_due = at
            self.wakeupAfter(max(due, 0.001), payload=LinkTimer())

    # ------------------------------------------------------------ messages
    def receiveMsg_WatchMessage(self, message: WatchMessage, sender: Address) -> None:
        pass   # the turn that follows every message reads what is ready

    def receiveMsg_WakeupMessage(self, message: WakeupMessage, sender: Address) -> None:
        due = message.payload
        if isinstance(due, LinkTimer):
            self._link_due = None
        elif isinstance(due, PollLink):
            if self._phase is not BridgePhase.STOPPED:
                self.wakeupAfter(POLL_INTERVAL, payload=PollLink())
        elif isinstance(due, ProgressTick):
            self._signal_progress()
        elif isinstance(due, DrainDeadline):
            self._finish_drain()

    def receiveMsg_Completion(self, message: Completion, sender: Address) -> None:
        self._pool.completed(message, sender)
        self._handle_now(self._complete(message))
        self._dispatch()
        self._report_held()
        if self._phase is BridgePhase.DRAINING and not self._busy():
            self._finish_drain()

    def receiveMsg_PoolMembers(self, message: PoolMembers, sender: Address) -> None:
        resumed, exhausted = self._pool.update(message.addresses)
        depths = self._pool.depths()
        for index in resumed:
            log.warning("re-sending %d message(s) to pool member %d, in their order",
                        depths[index], index)
        if exhausted:
            self._handle_now(self._complete(Completion.of(exhausted)))
        self._dispatch()
        self._report_held()

    def receiveMsg_StartBridge(self, message: StartBridge, sender: Address) -> None:
        self._start(message, sender)

    def receiveMsg_Subscribe(self, message: Subscribe, sender: Address) -> None:
        self._subscribe(message, sender)

    def receiveMsg_StatsRequest(self, message: StatsRequest, sender: Address) -> None:
        self.send(sender, Stats(message.request_id, self._stats(),
                                by_subscription={name: book.snapshot()
                                                 for name, book in self._books.items()},
                                queue_depths=self._pool.depths(),
                                lag=self._link.lag() if self._link is not None else {}))

    def receiveMsg_StopBus(self, message: StopBus, sender: Address) -> None:
        self._start_drain(message, sender)

    def receiveMsg_PoisonMessage(self, message: PoisonMessage, sender: Address) -> None:
        self._returned(message, sender)

    def receiveMsg_Halt(self, message: Halt, sender: Address) -> None:
        self._halt(message.reason)

    def receiveMsg_RouterChanged(self, message: RouterChanged, sender: Address) -> None:
        self._resend_to(message.router)

    def receiveMsg_ActorExitRequest(self, message: ActorExitRequest, sender: Address) -> None:
        self._stop(timeout=EXIT_CLOSE_TIMEOUT)

    # ------------------------------------------------------------ set-up
    def _start(self, message: StartBridge, sender: Address) -> None:
        self._config = config = message.config
        self._router = message.router
        self._inflight = InFlightTable(first_token=(message.incarnation << INCARNATION_SHIFT) + 1)
        self._pool.epoch, self._pool.bridge = message.incarnation, message.index
        self._layout = layout_for(config, message.index)
        if self._router is None:
            self._direct = HandlerTable(watchdog=Watchdog())
        make_link: LinkFactory = message.link_factory or NatsLink
        self._link = link = make_link(config, self._mailbox, self._layout)
        self._supervisor = sender
        if message.pins:
            link.claim_pins(message.pins)
        try:
            link.connect()
        except ConnectionError as exc:
            # Whoever asked reports it (the facade raises, the Supervisor logs a
            # restart's failure): an error line here would say it twice.
            log.info("%s", exc)
            link.close(1.0)
            self._link = None
            self.send(sender, RequestFailed(message.request_id, str(exc)))
            return
        self._phase = BridgePhase.RUNNING
        if config.runtime == "processes":
            self._watch = ThespianWatch([link.fileno()])
        else:
            self.wakeupAfter(POLL_INTERVAL, payload=PollLink())
        self.wakeupAfter(PROGRESS_INTERVAL, payload=ProgressTick())
        self.send(sender, BridgeReady(message.request_id, os.getpid()))

    def _subscribe(self, message: Subscribe, sender: Address) -> None:
        sub = message.subscription
        if self._link is None:
            self.send(sender, RequestFailed(message.request_id, "the Bridge is not connected"))
            return
        if self._direct is not None:
            self._direct.register(sub)
            try:   # here the Bridge is the pool: a handler it cannot import fails subscribe
                self._direct.resolve(sub.name)
            except HandlerError as exc:
                log.error("subscribing %s: %s", sub.subject, exc)
                self.send(sender, RequestFailed(
                    message.request_id, f"the Bridge (pid {os.getpid()}) cannot run handler "
                                        f"{sub.handler}: {exc}"))
                return
        reads = bool(self._layout.consumers(sub))
        book = self._books.get(sub.name)
        if book is None:   # a resumed subscription keeps its book (its tally, its key order)
            book = self._books[sub.name] = SubscriptionBook(sub, reads)
        if self._config is not None and self._config.bridges > 1 and sub.partitions is None \
                and reads:
            log.warning("subscription %s is read by one Bridge of %d: its stream is not "
                        "partitioned (a subject ending with the aggregate id as a '*' token, "
                        "with partitions=, lets every Bridge share it)", sub.name,
                        self._config.bridges)
        try:
            self._link.subscribe(sub)
        except Exception as exc:
            del self._books[sub.name]
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
        orders: list[Order] = []
        for arrival in self._mailbox.drain():
            if isinstance(arrival, PinsChanged):
                self._report_pins()   # before the messages that came with the pin are handled
                continue
            if isinstance(arrival, Released):
                self._drop_released(arrival)
                continue
            book = self._books.get(arrival.subscription)
            if book is None:
                continue
            if isinstance(arrival, Recovery):
                self._take_recovered(book, arrival.messages, deliveries)
            else:
                self._take(book, arrival.messages, deliveries, orders)
        if orders and self._link is not None:
            self._link.settle(orders)
        self._handle_now(deliveries)
        self._report_held()

    def _handle_now(self, deliveries: list[Delivery]) -> None:
        """Send ``deliveries`` to the pool (or, without one, handle them here), in order."""
        while deliveries:
            if self._direct is None:
                self._pool.route(deliveries)
                self._dispatch()
                return
            # Handling may free held deliveries: those go next, round after round.
            completion = Completion.of(self._direct.process(deliveries))
            deliveries = self._complete(completion)

    def _dispatch(self) -> None:
        # Thespian sends to one target one at a time, each waiting for the
        # receiver's ack, and each send costs far more than a delivery. An idle member
        # gets what waits for it at once; a busy one gets what gathers meanwhile as one
        # larger dispatch (when and how large: the pool table).
        if self._link is not None:
            self._pool.ownership = self._link.ownership_changes()
        for address, dispatch in self._pool.dispatches():
            self.send(address, dispatch)

    def _take(self, book: SubscriptionBook, msgs: list[Delivered], deliveries: list[Delivery],
              orders: list[Order]) -> None:
        """Record each message in flight and add its delivery, unless it is held for per-key
        order; redeliveries already handled in recovery go to ``orders``."""
        sub, tally = book.config, book.tally.counts
        tally["received"] += len(msgs)
        now = time.monotonic()
        order, recovered = book.order, book.recovered
        for msg in msgs:
            try:
                delivery_count, stream_sequence = delivery_numbers(msg.reply)
            except ValueError as exc:
                log.error("ignored a message on %s: %s", msg.subject, exc)
                continue
            if delivery_count > 1:
                tally["redelivered"] += 1
            if recovered and stream_sequence in recovered:
                settled = book.redelivered_after_recovery(msg, stream_sequence)
                if settled is not None:
                    orders.append(settled)
                continue
            aggregate_id = book.routing_key(msg.subject, msg.data, msg.headers)
            if aggregate_id is None and not sub.envelope and msg.headers:
                book.note_invalid_key(msg, now)
            delivery = self._delivery(sub, msg.subject, msg.data, msg.headers, aggregate_id,
                                      delivery_count, stream_sequence)
            entry = InFlight(msg, sub, now, delivery, now)
            self._inflight.add(entry)
            if aggregate_id is None:
                deliveries.append(delivery)
            elif order.admit(aggregate_id, stream_sequence, delivery):
                deliveries.append(delivery)
                if order.held:   # a redelivery that others waited for: they go right behind it
                    self._release(book, aggregate_id, deliveries)
            else:
                entry.held_for_order = True
                tally["held_for_order"] += 1

    def _take_recovered(self, book: SubscriptionBook, msgs: list[RecoveredMsg],
                        deliveries: list[Delivery]) -> None:
        """Dispatch what recovery read back, in stream order, ahead of anything newer of its keys.

        Only messages with an aggregate id are handled: keyless ones carry no
        order promise and JetStream redelivers them anyway. What this Bridge
        still has in flight (after a reconnect) is left to that delivery.
        """
        order, recovered = book.order, book.recovered
        now = time.monotonic()
        for msg in msgs:
            aggregate_id = book.routing_key(msg.subject, msg.data, msg.headers)
            if aggregate_id is None or msg.sequence in recovered or \
                    order.is_open(aggregate_id, msg.sequence):
                continue
            delivery = self._delivery(book.config, msg.subject, msg.data, msg.headers,
                                      aggregate_id, RECOVERED_DELIVERY_COUNT, msg.sequence)
            entry = InFlight(msg, book.config, now, delivery, now)
            self._inflight.add(entry)
            recovered[msg.sequence] = entry
            book.tally.counts["recovered"] += 1
            if order.admit(aggregate_id, msg.sequence, delivery):
                deliveries.append(delivery)
            else:
                entry.held_for_order = True

    def _delivery(self, sub: SubscriptionConfig, subject: str, data: bytes,
                  headers: Mapping[str, str] | None, aggregate_id: str | None, delivery_count: int,
                  stream_sequence: int) -> Delivery:
        keyless_slot = None
        if aggregate_id is None:
            keyless_slot = next_keyless_slot()
            routing_key = keyless_routing_key(keyless_slot)
        else:
            routing_key = aggregate_id
        if sub.partitions is not None:
            subject = without_partition(subject)   # as it was published
        # Built as the tuple it is, without Delivery's Python-level __new__ (one per message).
        return tuple.__new__(Delivery, (self._inflight.next_token(), sub.name, subject, data,
                                        headers, routing_key, aggregate_id, keyless_slot,
                                        delivery_count, stream_sequence))

    def _complete(self, completion: Completion) -> list[Delivery]:
        """Settle what the completion reports; return the held deliveries it frees."""
        if self._phase is BridgePhase.HALTED:
            return []  # broken: everything stays un-acked for JetStream to redeliver
        actions: list[Order] = []
        freed: list[Delivery] = []
        pop, books = self._inflight.pop, self._books
        # An ack per message: built as the tuple it is, without Order's Python-level __new__.
        new_order = tuple.__new__
        # The common case first: handled on the first attempt, so ack.
        for token, seconds in zip(completion.succeeded, completion.seconds, strict=True):
            entry = pop(token)
            if entry is None:
                continue
            book = books[entry.subscription.name]
            book.tally.counts["processed"] += 1
            book.tally.observe(seconds)
            if entry.recovered:
                actions += book.recovered_done(entry, ACK, None)
            else:
                actions.append(new_order(Order, (entry.msg, ACK, None, None, None, None)))
            if entry.delivery.aggregate_id is not None:
                self._resolve(book, entry, freed)
        for outcome in completion.others:
            entry = pop(outcome.token)
            if entry is None:
                continue
            book = books[entry.subscription.name]
            if outcome.kind == DEFERRED:
                self._hold_again(book, entry, freed)
                continue
            decision = self._decide(book, entry, outcome)
            key = entry.delivery.aggregate_id
            msg = entry.msg
            if isinstance(msg, RecoveredMsg):   # settled through its redeliveries, if any came
                redelivered = decision.action != ACK
                orders = book.recovered_done(entry, decision.action, decision.delay)
            else:
                redelivered = decision.action == NAK
                orders = [_order(msg, decision, entry, outcome.error)]
            if outcome.trace is not None:
                self._traced(entry, outcome.trace, decision, orders)
            actions += orders
            if key is None:
                continue
            if redelivered:
                # Due to come back: newer messages of its key wait for it (not for ever).
                until = time.monotonic() + (decision.delay or 0.0) + \
                    2 * book.config.ack_wait + REDELIVERY_GRACE
                book.order.wait(key, entry.delivery.stream_sequence, until)
            else:
                self._resolve(book, entry, freed)
        if actions and self._link is not None:
            self._link.settle(actions)
        return freed

    def _traced(self, entry: InFlight, handle: SpanHandle, decision: Decision,
                orders: list[Order]) -> None:
        """Add the Bridge's spans of a message handled in a sampled span to its trace: how long
        it waited here, and its settlement (ended once the server confirms it)."""
        sub, subject = entry.subscription, entry.msg.subject
        self._spans.waited(handle, entry.received_at, sub.subject, entry.held_for_order)
        span = self._spans.settling(handle, subject, sub.subject, sub.durable,
                                    decision.action, decision.delay)
        if span is None:
            return
        if orders:   # a recovered message's settlement is its redeliveries'
            orders[0] = orders[0]._replace(span=span)
        else:
            end_settle_span(span)

    def _resolve(self, book: SubscriptionBook, entry: InFlight, freed: list[Delivery]) -> None:
        key = entry.delivery.aggregate_id
        assert key is not None   # only keyed deliveries are resolved
        book.order.resolve(key, entry.delivery.stream_sequence)
        if book.order.held:
            self._release(book, key, freed)

    def _release(self, book: SubscriptionBook, key: str, freed: list[Delivery]) -> None:
        """Add the held deliveries of ``key`` that nothing older waits for any more to ``freed``."""
        for delivery in book.order.released(key):
            entry = self._inflight.pop(delivery.token)
            if entry is not None:
                # A new token: newer messages have been dispatched while this one was held.
                freed.append(self._inflight.renew(entry))

    def _drop_released(self, released: Released) -> None:
        """Drop what is held of a durable this bus gave up: its new owner reads it back and
        handles it in order; handled here too (once its wait ran out), it could overtake."""
        book = self._books.get(released.subscription)
        if book is None or not book.held:
            return
        order = book.order

        def of_released(delivery: Delivery) -> bool:
            entry = self._inflight.get(delivery.token)
            return entry is not None and any(subject_covers(f, entry.msg.subject)
                                             for f in released.filters)
        dropped = order.drop(of_released)
        forgotten: list[Delivered] = []   # delivered here and will not be settled here
        for delivery in dropped:
            entry = self._inflight.pop(delivery.token)
            if entry is not None:
                if isinstance(entry.msg, Delivered):
                    forgotten.append(entry.msg)
                else:   # read back by recovery: its redeliveries are what the link holds
                    forgotten.extend(entry.attached or ())
        if forgotten and self._link is not None:
            self._link.forget(forgotten)
        if dropped:
            log.info("%s: dropped %d held message(s) of %s, which moved to another bus",
                     released.subscription, len(dropped), ", ".join(released.filters))

    def _hold_again(self, book: SubscriptionBook, entry: InFlight, freed: list[Delivery]) -> None:
        """The pool deferred it behind an older failure of its key: hold it (in flight again)."""
        delivery = self._inflight.renew(entry)
        entry.held_for_order = True
        key = delivery.aggregate_id
        assert key is not None   # only keyed deliveries are deferred
        book.tally.counts["held_for_order"] += 1
        book.order.hold(key, delivery.stream_sequence, delivery)
        self._release(book, key, freed)   # free at once if nothing waits

    def _decide(self, book: SubscriptionBook, entry: InFlight, outcome: Outcome) -> Decision:
        """How the message of a full outcome is settled (the delivery contract), counted and
        logged here."""
        sub, delivery = book.config, entry.delivery
        if outcome.kind == INVALID:
            # It can never succeed: redelivering it would only loop.
            log.error("rejected message on %s (stream %s seq %d): %s; dead-lettered to %s",
                      entry.msg.subject, sub.stream, delivery.stream_sequence, outcome.error,
                      sub.dead_letter_subject)
            self._counts["invalid"] += 1
            return Decision(DEAD_LETTER)
        tally = book.tally
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
        return decision

    def _held(self) -> int:
        return sum(book.held for book in self._books.values())

    def _report_held(self) -> None:
        held = self._held()
        if held != self._last_held and self._link is not None:
            self._last_held = held
            self._link.set_held(held)

    def _returned(self, message: PoisonMessage, sender: Address) -> None:
        # A member raised twice on a dispatch (a bug in our own code): fail it by kind.
        returned = message.poisonMessage
        if isinstance(returned, Dispatch):
            self._pool.returned(returned, sender)
            self._handle_now(self._complete(
                returned.undelivered(f"pool member failed on dispatch: {message.details}")))
            self._dispatch()

    # ------------------------------------------------------------ stats, stop
    def _stats(self) -> dict[str, int]:
        # Per-message counts live per subscription; the totals are their sums.
        totals = Counter(self._counts)
        for book in self._books.values():
            totals.update(book.tally.counts)
        counts = dict(totals)
        if self._link is not None:
            counts.update(self._link.counts())
        counts["in_flight"] = len(self._inflight)
        counts["held"] = self._held()
        return counts

    def _busy(self) -> int:
        """Messages in flight that a completion is still due for (held ones are not)."""
        return len(self._inflight) - self._held()

    def _resend_to(self, router: Address) -> None:
        # The old pool's work is lost with it: what was assigned to its members goes again, in
        # order, to the new members, once the new Router says where they are.
        self._router = router
        log.warning("the Router was restarted; %d message(s) in flight go to its new pool",
                    self._pool.assigned())

    def _signal_progress(self) -> None:
        # Handlers still running past half their AckWait: keep JetStream from redelivering.
        if self._link is None:
            return
        now = time.monotonic()
        due = self._inflight.due_for_progress(now)
        if due and self._phase is not BridgePhase.HALTED:
            # A recovered message has no delivery of its own: its redeliveries are kept alive.
            msgs = [msg for entry in due
                    for msg in ((entry.msg,) if isinstance(entry.msg, Delivered) else
                                entry.attached or ())]
            if msgs:
                self._link.touch(msgs)
        for book in self._books.values():
            book.forget_recovered(now)
        self._give_up_waiting(now)
        self._report_pins()   # besides PinsChanged: stopping to fetch lets pins go with none
        self.wakeupAfter(PROGRESS_INTERVAL, payload=ProgressTick())

    def _report_pins(self) -> None:
        if self._link is None:
            return
        pins = self._link.pins()
        if pins != self._pins_reported and self._supervisor is not None:
            self._pins_reported = pins
            self.send(self._supervisor, PinsHeld(pins))

    def _give_up_waiting(self, now: float) -> None:
        freed: list[Delivery] = []
        for book in self._books.values():
            for key, sequence in book.order.overdue(now):
                log.warning("sequence %d of %s (subscription %s) was naked but has not come back; "
                            "its newer messages no longer wait for it", sequence, key, book.name)
                self._release(book, key, freed)
        if freed:
            self._handle_now(freed)
            self._report_held()


    def _halt(self, reason: str) -> None:
        log.error("halted: %s; %d message(s) in flight stay un-acked", reason, len(self._inflight))
        if self._phase is BridgePhase.STOPPED:
            return
        self._phase = BridgePhase.HALTED
        if self._link is not None:
            self._link.stop_fetching()

    def _start_drain(self, message: StopBus, sender: Address) -> None:
        # Fetch nothing more; let what is in flight complete, up to the timeout.
        self._drain = (message.request_id, sender)
        halted = self._phase is BridgePhase.HALTED
        if self._phase in (BridgePhase.STARTING, BridgePhase.RUNNING):
            self._phase = BridgePhase.DRAINING
        self._dispatch()   # fetched before the stop: let it complete
        if self._link is not None:
            self._link.stop_fetching()
        if self._busy() and not halted:
            log.info("draining %d message(s) in flight, for up to %.1fs",
                     self._busy(), message.timeout)
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
        flush_traces()   # the process may end without the interpreter's exit hooks


def _order(msg: Delivered, decision: Decision, entry: InFlight, error: str | None) -> Order:
    """What the link is told to do with a delivered message (a dead letter says ``error``)."""
    if decision.action != DEAD_LETTER:
        return Order(msg, decision.action, decision.delay)
    sub, delivery = entry.subscription, entry.delivery
    return Order(msg, DEAD_LETTER, None, sub.dead_letter_subject,
                 dead_letter_headers(msg, sub.stream, delivery.stream_sequence,
                                     delivery.delivery_count, error))
