"""Scale-out: several buses, each a process of its own, in one partitioned consumer group.

Every test runs real nats-server and multiprocTCPBase buses (``tests.group_host``),
20,000 envelopes over 500 keys published as ``orders.<aggregate id>``, and checks
that nothing is lost and that each key's first handlings are in order, and who
handled what.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pytest

from tests.support import GroupHost, publish_spread, read_records, wait_for
from tests.test_ordered_recovery import all_handled, order_report

pytestmark = pytest.mark.integration

TOTAL, KEYS, PARTITIONS = 20_000, 500, 12


@pytest.fixture
def hosts(nats_server, tmp_path, records):
    """Start group members with ``start(member, members=None)``; all are gone after the test."""
    started: list[GroupHost] = []

    def start(member: str, members: list[str] | None = None, group: str = "billing") -> GroupHost:
        host = GroupHost(nats_server.url, tmp_path / f"{member}-{len(started)}.pids", group,
                         PARTITIONS, member, members)
        started.append(host)
        host.wait_started()
        return host

    yield start
    for host in started:
        host.ensure_gone()


def settled(hosts: list[GroupHost], members: int) -> list[dict] | None:
    """Every host sees ``members`` members and the partitions are all owned, once (a pin is
    only known once a message comes: not waited for)."""
    stats = [h.stats() for h in hosts]
    if (all(s.get("group_members") == members for s in stats)
            and sum(s.get("partitions_owned", 0) for s in stats) == PARTITIONS):
        return stats
    return None


def handlers_of(records: Path, hosts: list[GroupHost]) -> dict[str, set[str]]:
    """Which members handled each key."""
    member_of = {pid: host.member for host in hosts for pid in host.pids}
    by_key: dict[str, set[str]] = defaultdict(set)
    for record in read_records(records):
        by_key[record.aggregate_id].add(member_of.get(record.pid, f"pid {record.pid}"))
    return by_key


def publish(bus) -> None:
    publish_spread(bus, TOTAL, KEYS, per_key_sequence=True, subject="orders.{aggregate_id}")


def test_an_elastic_group_of_three_spreads_the_keys_each_to_one_member(hosts, make_bus, records):
    members = [hosts(name) for name in ("a", "b", "c")]
    wait_for(lambda: settled(members, 3), timeout=30, what="three members with their partitions")
    publish(make_bus(pool_size=0))
    wait_for(lambda: all_handled(records, TOTAL), timeout=120, what="every envelope handled")

    report = order_report(records, TOTAL, KEYS)
    by_key = handlers_of(records, members)
    shared = {key: who for key, who in by_key.items() if len(who) > 1}
    load = {h.member: sum(1 for who in by_key.values() if who == {h.member}) for h in members}
    print(f"elastic group of 3: {report}; keys per member {load}")
    assert report["lost"] == 0 and report["violations"] == 0, report
    assert not shared, f"{len(shared)} keys handled by more than one member, e.g. {list(shared.items())[:3]}"
    assert all(load.values()), load
