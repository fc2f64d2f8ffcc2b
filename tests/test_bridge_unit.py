"""The Bridge's decisions on Thespian's simpleSystemBase, with a fake NATS link.

The link is the Bridge's only way to NATS (``StartBridge.link_factory``);
here it records what the Bridge asks of it, and the test plays JetStream
(messages arrive in the mailbox) and the Router (a collecting actor, and
completions sent back by the test). End-to-end behaviour on a real
nats-server is tested elsewhere.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import pytest
from thespian.actors import Actor, ActorSystem

from actorbus import Envelope
from actorbus.actors.messages import (FAILED, SUCCEEDED, BridgeReady, BusStopped, Completion,
                                      Dispatch, Halt, Outcome, StartBridge, StopBus, Subscribe,
                                      Subscribed)
from actorbus.bridge.actor import Bridge
from actorbus.bridge.settlement import ACK, DEAD_LETTER, NAK
from actorbus.config import BusConfig, SubscriptionConfig


@dataclass
class FakeMsg:
    """What the Bridge reads of a nats-py message."""

    subject: str
    data: bytes
    reply: str
    headers: dict[str, str] | None = None


@dataclass
class FakeLink:
    """Stands in for NatsLink: records subscriptions, settlements and closing."""

    mailbox: Any = None
    subscribed: list[str] = field(default_factory=list)
    settled: list[Any] = field(default_factory=list)
    fetching: bool = True
    closed: bool = False

    def attach(self, config: BusConfig, mailbox: Any) -> "FakeLink":
        self.mailbox = mailbox
        return self

    def connect(self) -> None:
        pass

    def subscribe(self, sub: SubscriptionConfig) -> None:
        self.subscribed.append(sub.name)

    def settle(self, orders: list[Any]) -> None:
        self.settled.extend(orders)

    def touch(self, msgs: list[Any]) -> None:
        pass

    def counts(self) -> dict[str, int]:
        return {}

    def stop_fetching(self) -> None:
        self.fetching = False

    def close(self, timeout: float) -> None:
        self.closed = True

    # ------------------------------------------------------------ the test plays JetStream
    def deliver(self, sub: str, *msgs: FakeMsg) -> None:
        self.mailbox.put((sub, list(msgs)))

    def actions(self) -> list[tuple[str, Any]]:
        return [(order.msg.subject, order.action) for order in self.settled]


class CollectingRouter(Actor):
    """Stands in for the Router: keeps every dispatch, hands them over on request."""

    def __init__(self) -> None:
        super().__init__()
        self.dispatches: list[Dispatch] = []

    def receiveMessage(self, message, sender):
        if isinstance(message, Dispatch):
            self.dispatches.append(message)
        elif message == "report":
            self.send(sender, list(self.dispatches))


def msg(subject: str, data: bytes, seq: int, delivered: int = 1, **headers: str) -> FakeMsg:
    return FakeMsg(subject, data, f"$JS.ACK.ORDERS.orders.{delivered}.{seq}.{seq}.0.0",
                   headers or None)


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
    router = system.createActor(CollectingRouter)
    actor = system.createActor(Bridge)
    config = BusConfig(runtime="simple", pool_size=1)
    assert isinstance(system.ask(actor, StartBridge(1, config, router, link_factory=link.attach), 5),
                      BridgeReady)
    sub = SubscriptionConfig("orders.>", "tests.handlers:record", durable="orders", max_deliver=3,
                             nak_delay=0.5)
    assert isinstance(system.ask(actor, Subscribe(2, sub), 5), Subscribed)
    return system, actor, router, link


def dispatched(system, router, count: int) -> list:
    """The deliveries the Router has been sent, once there are ``count`` (the Bridge polls its mailbox)."""
    deadline = time.monotonic() + 5
    while True:
        deliveries = [d for dispatch in system.ask(router, "report", 5) for d in dispatch.deliveries]
        if len(deliveries) >= count or time.monotonic() > deadline:
            return deliveries
        system.listen(0.01)   # let the Bridge's mailbox poll run


def test_deliveries_go_to_the_router_in_fetch_order_with_their_keys(bridge):
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


def test_an_invalid_envelope_is_dead_lettered_at_once_and_never_dispatched(bridge):
    system, actor, router, link = bridge
    link.deliver("orders", msg("orders.a", b"\xc1 not an envelope", 1), msg("orders.a", envelope("a", b"2"), 2))
    deliveries = dispatched(system, router, 1)
    assert [d.stream_sequence for d in deliveries] == [2]
    assert link.actions() == [("orders.a", DEAD_LETTER)]
    assert "expected a msgpack map" in link.settled[0].dead_letter_headers["Actorbus-Error"]


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
