"""Consumer groups: the arithmetic (orbit.go's spread, the transform) and what a real
nats-server makes of it; configuration mistakes named."""
from __future__ import annotations

import asyncio
import json

import nats
import pytest

from actorbus import ConfigurationError, Envelope, EventBus
from actorbus.config import SubscriptionConfig
from actorbus.groups import (ConsumerGroup, assign_partitions, partition_of, partition_transform,
                             subject_for_key, without_partition)
from tests import handlers
from tests.support import create_stream, stream_messages, wait_for


def test_partitions_are_spread_as_orbit_spreads_them():
    # orbit.go GeneratePartitionFilters: runs of P // n in sorted member order, the
    # remainder one each from the first member on.
    assert assign_partitions(["c", "a", "b"], 8) == {"a": (0, 1, 6), "b": (2, 3, 7), "c": (4, 5)}
    assert assign_partitions(["m1", "m2"], 10) == {"m1": (0, 1, 2, 3, 4), "m2": (5, 6, 7, 8, 9)}
    # More members than partitions: the first P (sorted) get one each.
    assert assign_partitions(["d", "c", "b", "a"], 2) == {"a": (0,), "b": (1,)}
    assert assign_partitions([], 4) == {}


def test_every_partition_has_exactly_one_owner_whatever_the_members():
    for members in (["a"], ["a", "b"], ["x", "y", "z"], [f"m{i}" for i in range(7)]):
        for partitions in (1, 3, 12, 13):
            owned = assign_partitions(members, partitions)
            flat = sorted(p for parts in owned.values() for p in parts)
            assert flat == list(range(partitions)), (members, partitions)


def test_the_stream_transform_partitions_on_the_last_wildcard():
    assert partition_transform("orders.*", 8) == "{{partition(8,1)}}.orders.{{wildcard(1)}}"
    assert partition_transform("shop.*.orders.*", 4) == \
        "{{partition(4,2)}}.shop.{{wildcard(1)}}.orders.{{wildcard(2)}}"
    assert without_partition("3.orders.a1") == "orders.a1"


@pytest.mark.parametrize("subject", ["orders.>", "orders.new", "*.orders"])
def test_a_partitioned_subject_must_end_with_the_aggregate_id_token(subject):
    with pytest.raises(ConfigurationError, match="must end with the aggregate id"):
        SubscriptionConfig(subject, "tests.handlers:record", partitions=4)


def test_a_partitioned_subscription_takes_its_key_from_the_subject():
    assert SubscriptionConfig("orders.*", "tests.handlers:record", partitions=4).key_from_subject


def test_publishers_put_the_aggregate_id_in_the_subject():
    assert subject_for_key("orders.{aggregate_id}", "acct-1") == "orders.acct-1"
    assert subject_for_key("orders.fixed", "acct-1") == "orders.fixed"
    with pytest.raises(ValueError, match="cannot be a subject token"):
        subject_for_key("orders.{aggregate_id}", "acct.1")


@pytest.mark.parametrize("kwargs, message", [
    ({"partitions": 0}, "partitions must be an int from 1"),
    ({"partitions": 4, "members": ["a", "b"]}, "static group needs member="),
    ({"partitions": 4, "members": ["a", "b"], "member": "c"}, "is not one of the group's members"),
    ({"partitions": 4, "members": ["a", "a"], "member": "a"}, "distinct names"),
    ({"partitions": 4, "member": "no spaces"}, "member must be 1-64 characters"),
    ({"partitions": 4, "heartbeat": 0}, "heartbeat must be a number > 0"),
])
def test_group_settings_that_cannot_work_are_named(kwargs, message):
    with pytest.raises(ConfigurationError, match=message):
        ConsumerGroup("billing", **kwargs)


def test_an_elastic_member_is_named_after_its_host_and_process_by_default():
    group = ConsumerGroup("billing", 4)
    assert group.members is None and group.kind == "elastic" and group.member.endswith(str(__import__("os").getpid()))


def test_the_bus_refuses_group_settings_without_a_group_or_partitions():
    with pytest.raises(ConfigurationError, match="member without group="):
        EventBus(servers="nats://127.0.0.1:1", runtime="simple", partitions=4, member="a")
    with pytest.raises(ConfigurationError, match="members without group="):
        EventBus(servers="nats://127.0.0.1:1", runtime="simple", members=["a"])
    with pytest.raises(ConfigurationError, match="needs partitions="):
        EventBus(servers="nats://127.0.0.1:1", runtime="simple", group="billing")


@pytest.mark.integration
def test_the_server_partitions_each_aggregate_as_the_arithmetic_says(make_bus, nats_server):
    bus = make_bus(pool_size=1, group="billing", partitions=5, member="solo")
    bus.subscribe("orders.*", handlers.record, stream="ORDERS")
    ids = [f"acct-{n}" for n in range(40)]
    assert all(r.ok for r in bus.publish_many(
        [("orders.{aggregate_id}", Envelope.create(i, "T", b"x")) for i in ids]))
    stored = {m.subject.split(".")[2]: int(m.subject.split(".")[0])
              for m in stream_messages(nats_server.url, "ORDERS")}
    assert stored == {i: partition_of(i, 5) for i in ids}
    wait_for(lambda: bus.stats()["processed"] >= 40, what="all handled")
    assert bus.stats()["partitions_owned"] == 5 and bus.stats()["group_members"] == 1


@pytest.mark.integration
def test_handlers_see_the_subject_as_published(make_bus, records):
    bus = make_bus(pool_size=1, group="billing", partitions=3, member="solo")
    bus.subscribe("orders.*", handlers.record, stream="ORDERS")
    bus.publish_envelope("orders.{aggregate_id}", Envelope.create("acct-7", "T", b"x"))
    from tests.support import read_records
    wait_for(lambda: read_records(records), what="the envelope handled")
    assert read_records(records)[0].subject == "orders.acct-7"


@pytest.mark.integration
def test_an_existing_stream_without_the_partition_transform_is_refused(make_bus, nats_server):
    create_stream(nats_server.url, "ORDERS", ["orders.*"])
    bus = make_bus(pool_size=1, group="billing", partitions=4, member="solo")
    with pytest.raises(Exception, match="not the 4 partitions the group needs"):
        bus.subscribe("orders.*", handlers.record, stream="ORDERS")


@pytest.mark.integration
def test_a_static_group_is_written_as_orbit_writes_it_and_a_different_one_is_refused(make_bus,
                                                                                    nats_server):
    bus = make_bus(pool_size=1, group="billing", partitions=4, member="m1", members=["m1", "m2"])
    bus.subscribe("orders.*", handlers.record, stream="ORDERS")

    async def read():
        nc = await nats.connect(nats_server.url)
        try:
            kv = await nc.jetstream().key_value("static-consumer-groups")
            entry = await kv.get("ORDERS.billing")
            info = await nc.jetstream().consumer_info("ORDERS", "billing-m1")
            return json.loads(entry.value), info.config.filter_subjects or [info.config.filter_subject]
        finally:
            await nc.close()
    stored, filters = asyncio.run(read())
    assert stored == {"max_members": 4, "filters": ["orders.*"], "members": ["m1", "m2"]}
    assert sorted(filters) == ["0.orders.*", "1.orders.*"]

    other = make_bus(pool_size=1, group="billing", partitions=4, member="m1", members=["m1", "m3"])
    with pytest.raises(Exception, match="static consumer group ORDERS.billing exists"):
        other.subscribe("orders.*", handlers.record, stream="ORDERS")
