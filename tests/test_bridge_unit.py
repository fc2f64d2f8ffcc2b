"""The Bridge's decisions on Thespian's simpleSystemBase, with a fake NATS link.

The link is the Bridge's only way to NATS (``StartBridge.link_factory``);
here it records what the Bridge asks of it, and the test plays JetStream
(messages arrive in the mailbox) and the pool (one collecting actor as its
only member, and completions sent back by the test). End-to-end behaviour on a real
nats-server is tested elsewhere.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import pytest
from thespian.actors import Actor, ActorSystem

from actorbus import Envelope
from actorbus.actors.messages import (DEFERRED, FAILED, INVALID, SUCCEEDED, BridgeReady, BusStopped,
                                      Completion, Dispatch, Halt, Outcome, PinsHeld, PoolMembers,
                                      StartBridge, StatsRequest, StopBus, Subscribe, Subscribed)
from actorbus.bridge.actor import Bridge
from actorbus.bridge.inbox import Delivered
from actorbus.bridge.mailbox import Arrival, PinsChanged, Recovery, Released
from actorbus.bridge.metadata import delivery_numbers
from actorbus.bridge.recovery import RecoveredMsg
from actorbus.bridge.settlement import ACK, DEAD_LETTER, NAK
from actorbus.config import BusConfig, SubscriptionConfig


@dataclass
class FakeLink:
    """Stands in for NatsLink: records subscriptions, settlements and closing."""

    mailbox: Any = None
    subscribed: list[str] = field(default_factory=list)
    settled: list[Any] = field(default_factory=list)
    fetching: bool = True
    closed: bool = False
    held: int = 0
    pinned: dict[str, str] = field(default_factory=dict)   # the pins the test says it holds
    forgotten: list[Any] = field(default_factory=list)
    claimed: dict[str, str] = field(default_factory=dict)

    def attach(self, config: BusConfig, mailbox: Any, layout: Any = None) -> "FakeLink":
        self.mailbox = mailbox
        return self

    def connect(self) -> None:
        pass

    def fileno(self) -> int:
        return -1   # never watched: these tests run on simpleSystemBase

    def turn(self, io: bool) -> float | None:
        return None

    def subscribe(self, sub: SubscriptionConfig) -> None:
        self.subscribed.append(sub.name)

    def settle(self, orders: list[Any]) -> None:
        self.settled.extend(orders)

    def touch(self, msgs: list[Any]) -> None:
        pass

    def lag(self) -> dict[str, dict[str, float]]:
        return {}

    def counts(self) -> dict[str, int]:
        return {}

    def ownership_changes(self) -> int:
        return 0

    def set_held(self, held: int) -> None:
        self.held = held

    def forget(self, msgs: list[Any]) -> None:
        self.forgotten.extend(msgs)

    def claim_pins(self, pins: dict[str, str]) -> None:
        self.claimed = dict(pins)

    def pins(self) -> dict[str, str]:
        return dict(self.pinned)

    def stop_fetching(self) -> None:
        self.fetching = False

    def close(self, timeout: float) -> None:
        self.closed = True

    # ------------------------------------------------------------ the test plays JetStream
    def deliver(self, sub: str, *msgs: Delivered) -> None:
        self.mailbox.put(Arrival(sub, list(msgs)))

    def recover(self, sub: str, *msgs: RecoveredMsg) -> None:
        self.mailbox.put(Recovery(sub, list(msgs)))

    def actions(self) -> list[tuple[str, Any]]:
        return [(order.msg.subject, order.action) for order in self.settled]


class CollectingMember(Actor):
    """Stands in for the pool's only member: keeps every dispatch, hands them over on request.

    It ends each dispatch at once with an empty completion (so the Bridge keeps sending it
    more); the test reports the outcomes, in completions of its own.
    """

    def __init__(self) -> None:
        super().__init__()
        self.dispatches: list[Dispatch] = []

    def receiveMessage(self, message, sender):
        if isinstance(message, Dispatch):
            self.dispatches.append(message)
            self.send(sender, Completion.of((), member=0))
        elif message == "report":
            self.send(sender, list(self.dispatches))


def msg(subject: str, data: bytes, seq: int, delivered: int = 1, **headers: str) -> Delivered:
    return Delivered(subject, f"$JS.ACK.ORDERS.orders.{delivered}.{seq}.{seq}.0.0", data,
                     headers or None, None)


def envelope(key: str, body: bytes) -> bytes:
    return Envelope.create(key, "Happened", body).encode()


@pytest.fixture
def system():
    asys = ActorSystem("simpleSystemBase", logDefs=False, transientUnique=True)
    yield asys
    asys.shutdown()


@pytest.fixture
def bridge(system):
    """A started Bridge on a fake link, subscribed to ``orders.>`` (envelopes, max_deliver 3)."""
    link = FakeLink()
    router = system.createActor(CollectingMember)
    actor = system.createActor(Bridge)
    config = BusConfig(runtime="simple", pool_size=1)
    assert isinstance(system.ask(actor, StartBridge(1, config, router, link_factory=link.attach), 5),
                      BridgeReady)
    system.tell(actor, PoolMembers((router,)))   # the Router's word: the member is up
    sub = SubscriptionConfig("orders.>", "tests.handlers:record", durable="orders", max_deliver=3,
                             nak_delay=0.5)
    assert isinstance(system.ask(actor, Subscribe(2, sub), 5), Subscribed)
    return system, actor, router, link


def dispatched(system, router, count: int) -> list:
    """The deliveries the member has been sent, once there are ``count`` (the Bridge polls its mailbox)."""
    deadline = time.monotonic() + 5
    while True:
        deliveries = [d for dispatch in system.ask(router, "report", 5) for d in dispatch.deliveries]
        if len(deliveries) >= count or time.monotonic() > deadline:
            return deliveries
        system.listen(0.01)   # let the Bridge's mailbox poll run


def test_deliveries_go_to_the_pool_in_fetch_order_with_their_keys(bridge):
    system, actor, router, link = bridge
    link.deliver("orders", msg("orders.a", envelope("a", b"1"), 1), msg("orders.b", envelope("b", b"2"), 2),
                 msg("orders.a", envelope("a", b"3"), 3))
    deliveries = dispatched(system, router, 3)
    assert [(d.stream_sequence, d.aggregate_id) for d in deliveries] == [(1, "a"), (2, "b"), (3, "a")]
    assert link.settled == []   # nothing is settled before its completion


def test_a_success_is_acked_and_only_then(bridge):
    system, actor, router, link = bridge
    link.deliver("orders", msg("orders.a", envelope("a", b"1"), 1), msg("orders.b", envelope("b", b"2"), 2))
    first, second = dispatched(system, router, 2)
    system.tell(actor, Completion.of([Outcome(second.token, SUCCEEDED)]))
    system.listen(0.02)
    assert link.actions() == [("orders.b", ACK)]
    system.tell(actor, Completion.of([Outcome(first.token, SUCCEEDED)]))
    system.listen(0.02)
    assert link.actions() == [("orders.b", ACK), ("orders.a", ACK)]


def test_an_envelope_failure_is_naked_with_a_delay_then_dead_lettered_on_its_last_delivery(bridge):
    system, actor, router, link = bridge
    link.deliver("orders", msg("orders.a", envelope("a", b"1"), 1, delivered=2),
                 msg("orders.b", envelope("b", b"2"), 2, delivered=3))
    early, last = dispatched(system, router, 2)
    system.tell(actor, Completion.of([Outcome(early.token, FAILED, "boom"),
                                      Outcome(last.token, FAILED, "boom")]))
    system.listen(0.02)
    assert link.actions() == [("orders.a", NAK), ("orders.b", DEAD_LETTER)]
    assert link.settled[0].delay == 1.0   # nak_delay doubled for the second delivery
    assert link.settled[1].dead_letter_subject == "deadletter.ORDERS"
    assert link.settled[1].dead_letter_headers["Actorbus-Error"] == "boom"


def test_an_invalid_envelope_is_dead_lettered_at_once_on_its_member_s_word(bridge):
    # The Bridge does not decode envelopes: it routes by a key it reads cheaply and the
    # member validates; an INVALID outcome is dead-lettered at once, never naked.
    system, actor, router, link = bridge
    link.deliver("orders", msg("orders.a", b"\xc1 not an envelope", 1),
                 msg("orders.a", envelope("a", b"2"), 2, **{"X-Aggregate-ID": "a"}))
    bad, good = dispatched(system, router, 2)
    assert (bad.aggregate_id, good.aggregate_id) == (None, "a")   # no key to peek at: keyless
    system.tell(actor, Completion.of([Outcome(bad.token, INVALID, "invalid envelope: <envelope>: "
                                                                  "expected a msgpack map"),
                                      Outcome(good.token, SUCCEEDED)]))
    system.listen(0.02)
    assert link.actions() == [("orders.a", ACK), ("orders.a", DEAD_LETTER)]
    assert "expected a msgpack map" in link.settled[1].dead_letter_headers["Actorbus-Error"]
    assert system.ask(actor, StatsRequest(1), 5).counts["invalid"] == 1


def test_the_key_is_read_from_the_header_or_peeked_at_without_validating(bridge):
    system, actor, router, link = bridge
    link.deliver("orders", msg("orders.x", envelope("b", b"1"), 1, **{"X-Aggregate-ID": "a"}),
                 msg("orders.y", envelope("c", b"2"), 2))
    first, second = dispatched(system, router, 2)
    # The header wins (its member finds the envelope says otherwise, and rejects it).
    assert (first.aggregate_id, second.aggregate_id) == ("a", "c")


def test_a_drain_waits_for_what_is_in_flight_then_closes(bridge):
    system, actor, router, link = bridge
    link.deliver("orders", msg("orders.a", envelope("a", b"1"), 1))
    (delivery,) = dispatched(system, router, 1)
    system.tell(actor, StopBus(9, timeout=30))
    system.listen(0.02)
    assert not link.fetching and not link.closed   # draining: still waiting for the completion
    reply = system.ask(actor, Completion.of([Outcome(delivery.token, SUCCEEDED)]), 5)
    assert isinstance(reply, BusStopped) and reply.request_id == 9
    assert link.actions() == [("orders.a", ACK)] and link.closed


def test_a_drain_past_its_deadline_leaves_the_rest_unsettled(bridge):
    system, actor, router, link = bridge
    link.deliver("orders", msg("orders.a", envelope("a", b"1"), 1))
    dispatched(system, router, 1)
    reply = system.ask(actor, StopBus(9, timeout=0.05), 5)
    assert isinstance(reply, BusStopped) and link.closed
    assert link.settled == []   # JetStream redelivers it after AckWait


def test_a_halted_bridge_settles_nothing_more(bridge):
    system, actor, router, link = bridge
    link.deliver("orders", msg("orders.a", envelope("a", b"1"), 1))
    (delivery,) = dispatched(system, router, 1)
    system.tell(actor, Halt("the pool gave up"))
    system.tell(actor, Completion.of([Outcome(delivery.token, SUCCEEDED)]))
    system.listen(0.02)
    assert link.settled == [] and not link.fetching


# ---------------------------------------------------------------- per-key order under redelivery
def stats_of(system, actor) -> dict:
    from actorbus.actors.messages import Stats
    reply = system.ask(actor, StatsRequest(99), 5)
    assert isinstance(reply, Stats)
    return {**reply.counts, **{k: v for t in reply.by_subscription.values()
                               for k, v in t["counts"].items()}}


def test_a_naked_message_holds_back_newer_ones_of_its_key_until_it_comes_back(bridge):
    system, actor, router, link = bridge
    link.deliver("orders", msg("orders.a", envelope("a", b"1"), 1), msg("orders.a", envelope("a", b"2"), 2))
    first, second = dispatched(system, router, 2)
    # The member failed seq 1 and deferred seq 2 behind it.
    system.tell(actor, Completion.of([Outcome(first.token, FAILED, "boom"),
                                      Outcome(second.token, DEFERRED, "waits")]))
    system.listen(0.02)
    assert link.actions() == [("orders.a", NAK)]
    # Newer messages of that key wait too; another key goes ahead.
    link.deliver("orders", msg("orders.a", envelope("a", b"3"), 3), msg("orders.b", envelope("b", b"4"), 4))
    assert [d.stream_sequence for d in dispatched(system, router, 3)][2:] == [4]
    stats = stats_of(system, actor)
    assert stats["held"] == 2 and stats["held_for_order"] == 2 and link.held == 2   # deferred, then held
    # Seq 1 comes back: it goes first, then what waited for it, in stream order, under new tokens.
    link.deliver("orders", msg("orders.a", envelope("a", b"1"), 1, delivered=2))
    later = dispatched(system, router, 6)[3:]
    assert [d.stream_sequence for d in later] == [1, 2, 3]
    assert later[1].token != second.token
    assert stats_of(system, actor)["held"] == 0 and link.held == 0


def test_recovered_messages_go_first_and_their_redeliveries_are_acked_without_handling(bridge):
    system, actor, router, link = bridge
    link.recover("orders", RecoveredMsg("orders.a", envelope("a", b"1"), None, 1),
                 RecoveredMsg("orders.k", b"keyless bytes are not recovered", None, 2),
                 RecoveredMsg("orders.a", envelope("a", b"3"), None, 3))
    link.deliver("orders", msg("orders.a", envelope("a", b"4"), 4))
    deliveries = dispatched(system, router, 3)
    assert [(d.stream_sequence, d.delivery_count) for d in deliveries] == [(1, 2), (3, 2), (4, 1)]
    one, three, four = deliveries
    # Seq 3's redelivery arrives while its recovered copy is being handled: settled by it.
    link.deliver("orders", msg("orders.a", envelope("a", b"3"), 3, delivered=2))
    system.listen(0.02)
    system.tell(actor, Completion.of([Outcome(t, SUCCEEDED) for t in (one.token, three.token, four.token)]))
    system.listen(0.02)
    assert link.actions() == [("orders.a", ACK), ("orders.a", ACK)]   # seq 3's redelivery, seq 4
    # Seq 1's redelivery comes later: acked, not handled again.
    link.deliver("orders", msg("orders.a", envelope("a", b"1"), 1, delivered=2))
    system.listen(0.02)
    assert len(dispatched(system, router, 3)) == 3
    assert [order.msg.reply.split(".")[5] for order in link.settled] == ["3", "4", "1"]
    assert stats_of(system, actor)["duplicates_skipped"] == 2


def test_a_recovered_message_that_fails_is_handled_again_on_its_redelivery(bridge):
    system, actor, router, link = bridge
    link.recover("orders", RecoveredMsg("orders.a", envelope("a", b"1"), None, 1))
    (recovered,) = dispatched(system, router, 1)
    system.tell(actor, Completion.of([Outcome(recovered.token, FAILED, "boom")]))
    system.listen(0.02)
    assert link.settled == []   # nothing to settle: the durable still owes its redelivery
    link.deliver("orders", msg("orders.a", envelope("a", b"2"), 2))
    system.listen(0.02)
    assert len(dispatched(system, router, 1)) == 1   # seq 2 waits for seq 1
    link.deliver("orders", msg("orders.a", envelope("a", b"1"), 1, delivered=2))
    assert [d.stream_sequence for d in dispatched(system, router, 3)] == [1, 1, 2]


def test_the_bridge_tells_who_started_it_the_pins_it_holds_when_they_change(bridge):
    system, actor, router, link = bridge
    link.pinned["orders"] = "pin-1"
    link.mailbox.put(PinsChanged())   # as NatsLink does when a message comes under a new pin
    reply = system.listen(2)   # reported to the starter (here: the test)
    while reply is not None and not isinstance(reply, PinsHeld):
        reply = system.listen(2)
    assert reply == PinsHeld({"orders": "pin-1"})


def test_a_restarted_bridge_claims_the_pins_its_predecessor_held(system):
    link = FakeLink()
    actor = system.createActor(Bridge)
    config = BusConfig(runtime="simple", pool_size=1)
    assert isinstance(system.ask(actor, StartBridge(1, config, None, incarnation=1,
                                                    link_factory=link.attach,
                                                    pins={"orders": "pin-1"}), 5), BridgeReady)
    assert link.claimed == {"orders": "pin-1"}


def test_held_messages_of_a_durable_given_up_are_dropped_neither_handled_nor_settled(bridge):
    # A partition moved to another bus while one of its keys waited for a nak's redelivery:
    # the new owner reads it all back in order; handled here too, it could overtake.
    system, actor, router, link = bridge
    link.deliver("orders", msg("orders.a", envelope("a", b"1"), 1))
    first = dispatched(system, router, 1)[0]
    system.tell(actor, Completion.of([Outcome(first.token, FAILED, "boom")]))
    system.listen(0.02)
    link.deliver("orders", msg("orders.a", envelope("a", b"2"), 2), msg("orders.b", envelope("b", b"3"), 3))
    assert [d.stream_sequence for d in dispatched(system, router, 2)][1:] == [3]   # a's seq 2 held
    assert stats_of(system, actor)["held"] == 1

    link.mailbox.put(Released("orders", ("orders.a",)))
    deadline = time.monotonic() + 5
    while not link.forgotten and time.monotonic() < deadline:
        system.listen(0.01)
    assert [(m.subject, delivery_numbers(m.reply)[1]) for m in link.forgotten] == [("orders.a", 2)]
    assert stats_of(system, actor)["held"] == 0
    # Seq 1's redelivery, had it come here, no longer frees anything to handle.
    link.deliver("orders", msg("orders.a", envelope("a", b"1"), 1, delivered=2))
    assert [d.stream_sequence for d in dispatched(system, router, 3)][2:] == [1]
