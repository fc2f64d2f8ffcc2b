"""Several Bridges per bus: each reads a share of a partitioned stream's partitions, all feed
one pool, and each is supervised on its own.

The layout and the member's bookkeeping are unit-tested here; the rest runs a
real nats-server and a multiprocTCPBase bus, and checks per-key order of first
handlings whatever dies.
"""
from __future__ import annotations

import os
import signal

import pytest
from thespian.actors import ActorSystem

from actorbus.actors.member import PoolMember
from actorbus.actors.messages import (Completion, Delivery, Dispatch, MemberReady,
                                      RegisterHandler, StartMember, bridge_name)
from actorbus.bridge.layout import BridgePartitions, layout_for, partition_durable
from actorbus.config import BusConfig, SubscriptionConfig, default_bridges
from actorbus.errors import ConfigurationError
from actorbus.groups import ConsumerGroup
from actorbus.supervision import Backoff, OneForOne
from tests import handlers
from tests.bus_host import PARTITIONS, PIN_TIMEOUT
from tests.support import HostBus, consumer_info, publish_spread, read_records, wait_for
from tests.test_ordered_recovery import all_handled, order_report

URL = "nats://127.0.0.1:4222"


# ---------------------------------------------------------------- the layout
def test_the_partitions_are_spread_over_the_bridges_each_to_one():
    sub = SubscriptionConfig("orders.*", "m:f", durable="orders", partitions=8)
    shares = [BridgePartitions(i, 3).consumers(sub) for i in range(3)]

    durables = [[spec.durable for spec in share] for share in shares]
    assert durables == [["orders-p0", "orders-p3", "orders-p6"], ["orders-p1", "orders-p4", "orders-p7"],
                        ["orders-p2", "orders-p5"]]
    filters = sorted(f for share in shares for spec in share for f in spec.filter_subjects)
    assert filters == sorted(f"{p}.orders.*" for p in range(8))
    assert all(spec.priority_group == sub.priority_group for share in shares for spec in share)
    assert partition_durable("orders", 5) == "orders-p5"


def test_a_subscription_without_partitions_is_read_by_the_first_bridge_alone():
    sub = SubscriptionConfig("metrics.>", "m:f", durable="metrics", envelope=False)
    first, second = BridgePartitions(0, 2).consumers(sub), BridgePartitions(1, 2).consumers(sub)
    assert [(s.durable, s.filter_subjects) for s in first] == [("metrics", ("metrics.>",))]
    assert second == ()
    assert isinstance(layout_for(BusConfig(servers=URL, bridges=2, partitions=4), 1),
                      BridgePartitions)


def test_the_default_is_one_bridge_per_four_cores_and_one_without_partitions(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert BusConfig(servers=URL, partitions=8).bridges == 4
    assert BusConfig(servers=URL, partitions=2).bridges == 2   # never more than the partitions
    assert BusConfig(servers=URL).bridges == 1                 # nothing to split
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert default_bridges(BusConfig(servers=URL, partitions=8)) == 1


def test_an_elastic_member_spreads_the_partitions_it_owns_over_its_bridges():
    group = ConsumerGroup("g", 12, "a")
    sub = SubscriptionConfig("orders.*", "m:f", durable="orders", partitions=12)
    owned = (0, 1, 2, 5, 6, 9)
    layouts = [layout_for(BusConfig(servers=URL, group=group, bridges=2), i) for i in range(2)]
    shares = [[spec.durable for spec in layout.partition_consumers(sub, owned)]
              for layout in layouts]
    assert shares == [[group.durable_for_partition(p) for p in (0, 2, 6)],
                      [group.durable_for_partition(p) for p in (1, 5, 9)]]

    class Seen:   # what a membership says
        owned = (0, 1, 2, 5, 6, 9)
        members = ("a", "b")
        rebalances = 3
    counts = [layout.group_counts([Seen()]) for layout in layouts]
    # The bus adds its Bridges' counts up: the members and rebalances are the first's alone.
    assert counts == [{"partitions_owned": 3, "group_members": 2, "rebalances": 3},
                      {"partitions_owned": 3, "group_members": 0, "rebalances": 0}]


def test_an_elastic_member_gets_the_default_bridges_of_its_cores_and_a_static_one_one(
        monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert BusConfig(servers=URL, group=ConsumerGroup("g", 12, "a")).bridges == 4
    assert BusConfig(servers=URL, group=ConsumerGroup("g", 2, "a")).bridges == 2
    assert BusConfig(servers=URL, group=ConsumerGroup("g", 12, "a", members=("a",))).bridges == 1


@pytest.mark.parametrize("options, message", [
    ({"bridges": 0}, "bridges must be an int from 1 to 64"),
    ({"bridges": True}, "bridges must be an int from 1 to 64"),
    ({"bridges": 65}, "bridges must be an int from 1 to 64, got 65"),
    ({"partitions": 0}, "partitions must be an int from 1 to 1024"),
    ({"bridges": 2, "group": ConsumerGroup("g", 4, "a", members=("a", "b"))},
     "bridges=2 with static group 'g': a static member reads one durable consumer"),
    ({"partitions": 4, "group": ConsumerGroup("g", 4, "a")}, "partitions is the group's"),
])
def test_bad_bridge_settings_are_refused_naming_what_is_wrong(options, message):
    with pytest.raises(ConfigurationError, match=message):
        BusConfig(servers=URL, **options)


def test_bridges_are_named_as_a_bus_of_one_names_its_bridge():
    assert [bridge_name(i) for i in range(3)] == ["bridge", "bridge-1", "bridge-2"]


# ---------------------------------------------------------------- a member fed by two Bridges
def _delivery(token: int, key: str) -> Delivery:
    return Delivery(token, "orders", f"orders.{key}", b"x", None, key, key, None, 1, token)


def test_a_member_numbers_each_bridge_s_dispatches_on_their_own(records):
    system = ActorSystem("simpleSystemBase", logDefs=False, transientUnique=True)
    try:
        member = system.createActor(PoolMember)
        sub = SubscriptionConfig("orders.*", "tests.handlers:record", durable="orders",
                                 envelope=False, partitions=4)
        assert isinstance(system.ask(member, StartMember(0, (sub,)), 5), MemberReady)
        system.ask(member, RegisterHandler(1, sub), 5)
        # Both Bridges start at dispatch 1 and at tokens of their own: neither is taken for a
        # copy of the other's, nor waits for the other's numbering.
        first = system.ask(member, Dispatch((_delivery(5, "a"),), 1, 0, bridge=0), 5)
        second = system.ask(member, Dispatch((_delivery(2, "b"),), 1, 0, bridge=1), 5)
        again = system.ask(member, Dispatch((_delivery(3, "b"),), 2, 0, bridge=1), 5)
    finally:
        system.shutdown()
    for completion, token in ((first, 5), (second, 2), (again, 3)):
        assert isinstance(completion, Completion) and completion.succeeded == (token,), \
            list(completion.outcomes())


# ---------------------------------------------------------------- end to end
def busy_bus_of_two_bridges(make_bus, total: int, keys: int, processed: int):
    """A bus of two Bridges over four partitions, ``total`` envelopes over ``keys`` keys
    published, once it has processed ``processed``: a slow handler (2 ms) keeps it busy
    for whatever is killed next."""
    bus = make_bus(pool_size=2, partitions=4, bridges=2, window=1024,
                   supervision=OneForOne(backoff=Backoff(initial=0.05, maximum=0.5)))
    bus.subscribe("orders.*", handlers.slow_record, durable="orders", ack_wait=5.0)
    publish_spread(bus, total, keys, per_key_sequence=True, subject="orders.{aggregate_id}")
    wait_for(lambda: bus.stats()["processed"] >= processed, what="processing under way",
             interval=0.01)
    return bus


def test_both_bridges_and_the_router_killed_at_the_same_moment_are_all_restarted_in_order(
        make_bus, records):
    # Thespian may report only one of several children killed at once: the Supervisor also
    # looks at its children's processes.
    total, keys = 6000, 60
    bus = busy_bus_of_two_bridges(make_bus, total, keys, processed=1000)
    victims = [bus.pids[name] for name in ("bridge", "bridge-1", "router")]

    for pid in victims:
        os.kill(pid, signal.SIGKILL)

    wait_for(lambda: all_handled(records, total), timeout=120, what="every envelope handled")
    report, stats = order_report(records, total, keys), bus.stats()
    print(f"both Bridges and the Router SIGKILLed at once: {report}, restarts {stats['restarts']}")
    assert report["lost"] == 0 and report["violations"] == 0, report
    assert stats["restarts_bridge"] == 2
    assert set(stats["actors"].values()) == {"running"}
    assert not set(victims) & set(bus.pids.values())


@pytest.mark.integration
def test_two_bridges_share_a_partitioned_stream_and_keep_per_key_order(make_bus, records,
                                                                         nats_server):
    total, keys = 2000, 50
    bus = make_bus(pool_size=2, partitions=4, bridges=2)
    bus.subscribe("orders.*", handlers.record, durable="orders")
    publish_spread(bus, total, keys, per_key_sequence=True, subject="orders.{aggregate_id}")

    wait_for(lambda: all_handled(records, total), timeout=60, what="every envelope handled")
    report, stats = order_report(records, total, keys), bus.stats()
    assert report["lost"] == 0 and report["violations"] == 0 and report["duplicates"] == 0, report
    assert stats["bridges"] == 2 and stats["subscriptions"]["orders"]["bridges"] == 2
    wait_for(lambda: bus.stats()["acked"] == total, what="everything acked")
    # Every partition has its durable, read by one Bridge, each acked to the end.
    delivered = {}
    for partition in range(4):
        info = consumer_info(nats_server.url, "ORDERS", f"orders-p{partition}")
        delivered[partition] = info.delivered.stream_seq
        assert info.num_ack_pending == 0 and info.num_pending == 0, info
    assert all(delivered.values()), delivered
    assert set(bus.pids) >= {"bridge", "bridge-1"} and bus.pids["bridge"] != bus.pids["bridge-1"]


@pytest.mark.integration
def test_a_subscription_whose_key_is_not_in_its_subject_is_read_by_one_bridge(make_bus, records,
                                                                               log_file):
    bus = make_bus(pool_size=1, partitions=4, bridges=2)
    bus.subscribe("orders.>", handlers.record, durable="orders")
    publish_spread(bus, 20, 5)

    wait_for(lambda: bus.stats()["acked"] == 20, what="the envelopes acked")
    assert bus.stats()["subscriptions"]["orders"]["bridges"] == 1
    wait_for(lambda: "is read by one Bridge of 2" in log_file.read_text(),
             what="the one-Bridge warning in the bus's log")


@pytest.mark.integration
def test_one_bridge_of_two_killed_mid_stream_recovers_its_partitions_in_order(make_bus, records):
    total, keys = 8000, 80
    bus = busy_bus_of_two_bridges(make_bus, total, keys, processed=1500)
    survivor = bus.pids["bridge"]

    os.kill(bus.pids["bridge-1"], signal.SIGKILL)

    wait_for(lambda: all_handled(records, total), timeout=120, what="every envelope handled")
    report, stats = order_report(records, total, keys), bus.stats()
    print(f"one Bridge of two SIGKILLed, {total} envelopes / {keys} keys: {report}, "
          f"recovered {stats['recovered']}")
    assert report["lost"] == 0 and report["violations"] == 0, report
    assert stats["restarts_bridge"] == 1 and stats["restarts"] == 1
    assert bus.pids["bridge"] == survivor   # the other Bridge went on
    assert stats["actors"]["bridge-1"] == "running"


@pytest.mark.integration
def test_a_nats_server_crash_under_two_bridges_keeps_per_key_order(make_bus, records, nats_server):
    total, keys = 8000, 80
    bus = make_bus(pool_size=2, partitions=4, bridges=2)
    bus.subscribe("orders.*", handlers.slow_record, durable="orders", ack_wait=3.0)
    publish_spread(bus, total, keys, per_key_sequence=True, subject="orders.{aggregate_id}")
    wait_for(lambda: bus.stats()["processed"] >= 1000, what="processing under way", interval=0.01)

    nats_server.kill()      # file storage keeps the stream and the consumers' state
    nats_server.start()     # same port, same store

    wait_for(lambda: all_handled(records, total), timeout=120, what="every envelope handled")
    report = order_report(records, total, keys)
    print(f"nats-server SIGKILL under two Bridges, {total} envelopes / {keys} keys: {report}")
    assert report["lost"] == 0 and report["violations"] == 0, report


@pytest.mark.integration
def test_a_killed_host_of_two_bridges_is_recovered_in_order_by_the_next_bus(make_bus, records,
                                                                           nats_server, tmp_path):
    total, keys = 8000, 80
    # A slow handler (2 ms): the host is still busy when it is killed.
    host = HostBus(nats_server.url, tmp_path / "host.pids", handler="slow_record", bridges=2)
    try:
        host.wait_started()
        publisher = make_bus(pool_size=1)   # publishes only; consumes nothing
        publish_spread(publisher, total, keys, per_key_sequence=True,
                       subject="orders.{aggregate_id}")
        wait_for(lambda: len(read_records(records)) >= 1500, what="the host handling",
                 interval=0.01)
    finally:
        host.kill()   # every process of that bus at once, both Bridges with it
    gaps = {p: (lambda info: info.delivered.stream_seq - info.ack_floor.stream_seq)(
        consumer_info(nats_server.url, "ORDERS", f"orders-p{p}")) for p in range(PARTITIONS)}

    # Pinned on each partition once the dead host's pins time out.
    bus = make_bus(pool_size=2, partitions=PARTITIONS, bridges=2)
    bus.subscribe("orders.*", handlers.record, durable="orders", ack_wait=5.0,
                  pin_timeout=PIN_TIMEOUT, pull_expires=PIN_TIMEOUT / 4)
    wait_for(lambda: all_handled(records, total), timeout=120, what="every envelope handled")
    report, stats = order_report(records, total, keys), bus.stats()
    print(f"host of two Bridges SIGKILLed, {total} envelopes / {keys} keys: gaps {gaps}, "
          f"{report}, recovered {stats['recovered']}")
    assert report["lost"] == 0 and report["violations"] == 0, report
    assert sum(gaps.values()) > 0 and stats["recovered"] > 0


@pytest.mark.integration
def test_a_naked_envelope_holds_back_the_rest_of_its_key_under_two_bridges(make_bus, records):
    bus = make_bus(pool_size=2, partitions=4, bridges=2)
    bus.subscribe("orders.*", handlers.fail_first_delivery_of_first, durable="orders", retries=0,
                  nak_delay=0.3)
    publish_spread(bus, 51 * 4, keys=4, per_key_sequence=True, subject="orders.{aggregate_id}")
    wait_for(lambda: all_handled(records, 51 * 4), timeout=60, what="every envelope handled")
    report, stats = order_report(records, 51 * 4, 4), bus.stats()
    for key in range(4):
        successes = [int(r.data) for r in read_records(records)
                     if r.kind == "ok" and r.aggregate_id == f"agg-{key}"]
        assert successes == list(range(51)), (key, successes)
    assert report["lost"] == 0 and report["violations"] == 0
    assert stats["naked"] == 4 and stats["dead_lettered"] == 0
