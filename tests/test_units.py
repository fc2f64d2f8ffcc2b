"""Configuration, settlement, handler references and in-order processing (no server)."""
from __future__ import annotations

import pytest

from actorbus import Aggregate
from actorbus.actors.handlers import HandlerError, handler_reference
from actorbus.actors.messages import FAILED, INVALID, SUCCEEDED, UNDELIVERED, Delivery
from actorbus.actors.processing import HandlerTable
from actorbus.bridge.jetstream import subject_covers
from actorbus.bridge.settlement import ACK, ENVELOPE_FAILED, NAK, REGULAR_FAILED, decide
from actorbus.config import SettlementPolicy
from actorbus.config import BusConfig, SubscriptionConfig
from actorbus.errors import ConfigurationError
from actorbus.supervision import Backoff, OneForOne
from tests import handlers


def sub(**changes) -> SubscriptionConfig:
    return SubscriptionConfig(**{"subject": "orders.>", "handler": "tests.handlers:record", **changes})


def test_settlement_follows_the_contract():
    assert decide(SUCCEEDED, SettlementPolicy.NACK_ON_ERROR, nak_delay=1.0).action == ACK
    assert decide(SUCCEEDED, SettlementPolicy.ACK, nak_delay=1.0).action == ACK
    failed_envelope = decide(FAILED, SettlementPolicy.NACK_ON_ERROR, nak_delay=1.5)
    assert (failed_envelope.action, failed_envelope.delay, failed_envelope.warning) == \
        (NAK, 1.5, ENVELOPE_FAILED)
    failed_plain = decide(FAILED, SettlementPolicy.ACK, nak_delay=1.5)
    assert (failed_plain.action, failed_plain.warning) == (ACK, REGULAR_FAILED)
    assert decide(UNDELIVERED, SettlementPolicy.NACK_ON_ERROR, nak_delay=1.0).action == NAK
    assert decide(UNDELIVERED, SettlementPolicy.ACK, nak_delay=1.0).action == ACK


def test_nak_delay_grows_exponentially_to_its_cap():
    config = sub(nak_delay=0.5, nak_delay_max=3.0)
    assert [config.nak_delay_for(n) for n in (1, 2, 3, 4, 5)] == [0.5, 1.0, 2.0, 3.0, 3.0]


def test_subscription_defaults_derive_stream_durable_and_storage():
    envelope, plain = sub(), sub(subject="metrics.cpu", envelope=False)
    assert (envelope.stream, envelope.durable, envelope.storage_type) == ("ORDERS", "orders", "file")
    assert (plain.stream, plain.storage_type) == ("METRICS", "memory")
    assert sub(envelope=False, storage="file").storage_type == "file"


@pytest.mark.parametrize("changes, named", [
    ({"subject": "orders..x"}, "subject"),
    ({"subject": "orders.>.x"}, "subject"),
    ({"subject": ">"}, "starts with a wildcard"),
    ({"storage": "disk"}, "storage"),
    ({"ack_wait": 0}, "ack_wait"),
    ({"max_deliver": 0}, "max_deliver"),
    ({"max_ack_pending": 0}, "max_ack_pending"),
    ({"retries": -1}, "retries"),
    ({"durable": "has space"}, "durable"),
])
def test_bad_subscription_values_are_named(changes, named):
    with pytest.raises(ConfigurationError, match=named):
        sub(**changes)


@pytest.mark.parametrize("changes, named", [
    ({"pool_size": -1}, "pool_size"),
    ({"pool_size": 2.5}, "pool_size"),
    ({"runtime": "threads"}, "runtime"),
    ({"window": 200_000}, "window"),
    ({"servers": ""}, "servers"),
])
def test_bad_bus_values_are_named(changes, named):
    with pytest.raises(ConfigurationError, match=named):
        BusConfig(**changes)


def test_servers_may_be_a_comma_separated_string():
    assert BusConfig(servers="nats://a:1, nats://b:2").servers == ("nats://a:1", "nats://b:2")


def test_subject_coverage():
    assert subject_covers("orders.>", "orders.created")
    assert subject_covers("orders.>", "orders.*.x")
    assert subject_covers("orders.*", "orders.created")
    assert not subject_covers("orders.*", "orders.>")
    assert not subject_covers("orders.>", "orders")
    assert not subject_covers("orders.created", "orders.>")


def test_handler_references():
    assert handler_reference(handlers.record) == "tests.handlers:record"
    assert handler_reference("tests.handlers:record") == "tests.handlers:record"
    with pytest.raises(HandlerError, match="lambda or closure"):
        handler_reference(lambda m: None)
    with pytest.raises(HandlerError, match="has no 'missing'"):
        handler_reference("tests.handlers:missing")
    with pytest.raises(HandlerError, match="form 'module:function'"):
        handler_reference("tests.handlers.record")


def test_policies_validate_their_values():
    assert OneForOne().max_restarts == 3
    with pytest.raises(ValueError, match="max_restarts"):
        OneForOne(max_restarts=-1)
    with pytest.raises(ValueError, match="maximum"):
        Backoff(initial=2.0, maximum=1.0)
    backoff = Backoff(initial=0.1, maximum=1.0, multiplier=2.0, jitter=0.0)
    assert [backoff.delay(n) for n in range(5)] == [0.1, 0.2, 0.4, 0.8, 1.0]


# ---------------------------------------------------------------- processing in order
calls: list[tuple[str, int]] = []


def flaky(msg) -> None:
    calls.append((msg.data.decode(), msg.attempt))
    if msg.data == b"bad" or (msg.data == b"flaky" and msg.attempt < 3):
        raise ValueError(f"no {msg.data.decode()}")


def delivery(token: int, data: bytes, subscription: str = "s") -> Delivery:
    return Delivery(token, subscription, "a.b", data, None, "k", "k", None, 1, token)


def test_handler_table_retries_in_place_and_keeps_order():
    calls.clear()
    spec = sub(durable="s", envelope=False, handler="tests.test_units:flaky", retries=2,
               retry_backoff=0.01)
    slept: list[float] = []
    table = HandlerTable([spec], sleep=slept.append)

    outcomes = table.process([delivery(1, b"ok"), delivery(2, b"flaky"), delivery(3, b"bad"),
                              delivery(4, b"ok"), delivery(5, b"x", subscription="unknown")])

    assert [(o.kind, o.attempts) for o in outcomes] == [
        (SUCCEEDED, 1), (SUCCEEDED, 3), (FAILED, 3), (SUCCEEDED, 1), (UNDELIVERED, 0)]
    assert outcomes[2].error == "ValueError: no bad"
    assert [c[0] for c in calls] == ["ok", "flaky", "flaky", "flaky", "bad", "bad", "bad", "ok"]
    assert slept == [0.01, 0.02, 0.01, 0.02]


def test_handler_table_decodes_envelopes_and_fails_bad_ones():
    from actorbus import Envelope
    spec = sub(durable="s", handler="tests.test_units:flaky", retries=0)
    table = HandlerTable([spec])
    good = Envelope.create("k", "T", b"ok").encode()
    outcomes = table.process([delivery(1, good), delivery(2, b"\xc1")])
    # Not a failure of the handler: an envelope that can never be valid (dead-lettered at once).
    assert [o.kind for o in outcomes] == [SUCCEEDED, INVALID]
    assert "invalid envelope" in outcomes[1].error and outcomes[1].attempts == 0


def test_supervision_is_one_policy_or_one_per_level():
    from actorbus.supervision import AllForOne, SupervisionTree
    single = BusConfig(supervision=AllForOne(max_restarts=7)).supervision
    assert single.root == single.pool == AllForOne(max_restarts=7)
    tree = BusConfig(supervision=SupervisionTree(root=OneForOne(max_restarts=1),
                                                 pool=AllForOne())).supervision
    assert (tree.root.max_restarts, type(tree.pool)) == (1, AllForOne)
    assert BusConfig().supervision == SupervisionTree()
    with pytest.raises(ConfigurationError, match="supervision must be"):
        BusConfig(supervision="restart please")


class Tally(Aggregate):
    SAVED: dict = {}
    max_instances = 2
    idle_timeout = 5.0
    made: list = []

    def __init__(self, aggregate_id):
        super().__init__(aggregate_id)
        self.made.append(aggregate_id)
        self.seen = self.SAVED.pop(aggregate_id, [])

    async def handle(self, msg):   # async handle() runs on the actor's loop
        self.seen.append(msg.data.decode())
        calls.append((msg.aggregate_id, tuple(self.seen)))

    def passivate(self):
        self.SAVED[self.aggregate_id] = self.seen


def keyed(token: int, key: str | None, data: str) -> Delivery:
    return Delivery(token, "s", "a.b", data.encode(), None, key or f"rr-{token}", key, None, 1, token)


def test_aggregate_instances_keep_state_per_id_and_are_rebuilt_after_passivation():
    calls.clear()
    Tally.made.clear()
    spec = sub(durable="s", envelope=False, handler="tests.test_units:Tally", retries=0)
    table = HandlerTable([spec])
    outcomes = table.process([keyed(1, "a", "1"), keyed(2, "b", "2"), keyed(3, "a", "3"),
                              keyed(4, "c", "4"),   # a third id: "b", least recently used, goes
                              keyed(5, "b", "5"), keyed(6, None, "6")])
    assert [o.kind for o in outcomes] == [SUCCEEDED] * 5 + [FAILED]
    assert "needs an aggregate id" in outcomes[5].error
    assert calls == [("a", ("1",)), ("b", ("2",)), ("a", ("1", "3")), ("c", ("4",)),
                     ("b", ("2", "5"))]   # b's state came back through passivate/__init__
    assert Tally.made == ["a", "b", "c", "b"]


def test_idle_aggregates_are_passivated():
    from actorbus.actors.instances import AggregateInstances
    from actorbus.message import Message
    now = [0.0]
    Tally.SAVED.clear()
    instances = AggregateInstances(Tally, clock=lambda: now[0])
    message = Message("a.b", b"x", None, None, "a", "a", 1, 1)
    instances(message).close()
    now[0] = 10.0   # past idle_timeout
    instances(Message("a.b", b"y", None, None, "z", "z", 1, 2)).close()
    assert "a" in Tally.SAVED and len(instances) == 1


def test_load_topology_names_what_is_wrong():
    from actorbus.topology import Topology, load_topology
    assert isinstance(load_topology("tests.handlers:topology"), Topology)
    with pytest.raises(ValueError, match="expected MODULE:TOPOLOGY"):
        load_topology("tests.handlers")
    with pytest.raises(ValueError, match="cannot import 'no_such_module_here'"):
        load_topology("no_such_module_here:topology")
    with pytest.raises(ValueError, match="has no 'missing'"):
        load_topology("tests.handlers:missing")


def test_every_durable_has_a_pinned_priority_group_unless_turned_off():
    from actorbus.bridge.layout import SingleDurable
    (spec,) = SingleDurable().consumers(sub(durable="s"))
    assert (spec.priority_group, spec.pin_timeout) == ("actorbus", 10.0)
    assert sub(durable="s", pull_expires=30.0).pin_timeout == 60.0   # twice the pull expiry
    (spec,) = SingleDurable().consumers(sub(durable="s", priority_group=None))
    assert spec.priority_group is None
    with pytest.raises(ConfigurationError, match=r"pin_timeout \(1.0\) must be at least twice"):
        sub(durable="s", pin_timeout=1.0, pull_expires=1.0)
    with pytest.raises(ConfigurationError, match="priority_group"):
        sub(durable="s", priority_group="no spaces")


def test_recovery_reads_back_redeliveries_kept_back_but_not_first_deliveries():
    # A bus pinned in place of a dead one: what arrives while it recovers includes
    # redeliveries of the dead bus's messages (recovered in stream order, in their
    # place) and first deliveries (newer than any gap: handled after it).
    from types import SimpleNamespace

    from actorbus.bridge.layout import SingleDurable
    from actorbus.bridge.pull import PullConsumer
    config = sub(durable="orders")
    (spec,) = SingleDurable().consumers(config)
    consumer = PullConsumer(SimpleNamespace(new_inbox=lambda: "_INBOX.x"), config, spec,
                            lambda *_: None, lambda: None)
    consumer._deferred = [SimpleNamespace(reply=f"$JS.ACK.ORDERS.orders.{count}.{seq}.{seq}.0.0")
                          for count, seq in ((2, 7), (1, 12), (3, 5), (1, 13))]
    assert consumer.first_deliveries_kept_back() == {12, 13}


def test_key_order_drops_the_held_items_picked_and_keeps_the_rest_in_order():
    from actorbus.bridge.ordering import KeyOrder
    order: KeyOrder[str] = KeyOrder()
    order.wait("a", 1, until=10.0)
    order.wait("b", 5, until=10.0)
    assert not order.admit("a", 2, "a2") and not order.admit("a", 3, "a3")
    assert not order.admit("b", 6, "b6")
    assert order.drop(lambda item: item in ("a2", "b6")) == ["a2", "b6"]
    assert order.held == 1
    assert order.admit("a", 1, "a1")          # a's redelivery comes back
    assert order.released("a") == ["a3"] and order.released("b") == [] and order.held == 0


def test_a_free_port_is_chosen_below_the_ephemeral_range_and_is_free():
    # Outside the range the OS hands out to outgoing connections, nothing but an explicit
    # bind can take the port between its choice and the server's bind.
    import socket
    from pathlib import Path

    from actorbus.ports import free_port
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = {free_port() for _ in range(20)}
    assert all(10_000 <= port < low for port in ports)
    for port in ports:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))   # free, as said


class _UnreachableJetStream:
    """A JetStream context whose every request fails, as while the server is away."""

    async def consumer_info(self, stream, durable):
        raise TimeoutError("nats: timeout")


def test_a_lag_reading_that_keeps_failing_is_warned_of_once_a_minute_not_at_every_reading(caplog):
    import asyncio
    import logging

    from actorbus.bridge.lag import LAG_INTERVAL, WARN_INTERVAL, LagWatch
    from actorbus.bridge.layout import ConsumerSpec
    watch = LagWatch()
    spec = ConsumerSpec("ORDERS", "orders", ("orders.>",))
    readings = int(WARN_INTERVAL / LAG_INTERVAL) + 1   # 13: a warning at 0 s and at 60 s
    with caplog.at_level(logging.DEBUG, logger="actorbus.bridge"):
        for n in range(readings):
            asyncio.run(watch.read(_UnreachableJetStream(), [spec], n * LAG_INTERVAL))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and "durable orders failed: TimeoutError" in warnings[0].getMessage()
    assert "still" in warnings[1].getMessage()
    assert len([r for r in caplog.records if r.levelno == logging.DEBUG]) == readings - 2
