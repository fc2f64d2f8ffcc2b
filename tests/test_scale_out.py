"""Scale-out: several buses, each a process of its own, in one partitioned consumer group.

Every test runs real nats-server and multiprocTCPBase buses (``tests.group_host``),
20,000 envelopes over 500 keys published as ``orders.<aggregate id>``, and checks
that nothing is lost and that each key's first handlings are in order, and who
handled what.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from collections import defaultdict
from pathlib import Path

import pytest

from actorbus import Envelope
from actorbus.processes import process_alive
from tests.support import GROUP_PARTITIONS, GroupHost, publish_spread, read_records, wait_for
from tests.test_ordered_recovery import all_handled, order_report

pytestmark = pytest.mark.integration

TOTAL, KEYS, PARTITIONS = 20_000, 500, GROUP_PARTITIONS


@pytest.fixture
def hosts(group_hosts):
    """Start group members with ``start(member, members=None)``; all are gone after the test."""
    return group_hosts


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


class Publishing:
    """Publishes every envelope from a thread of its own, so the group is killed or grown
    while envelopes still arrive (the three members handle as fast as one publishes).

    ``patient``: while a cluster elects a stream leader publishes fail; each run of 50 (50
    different keys) is retried until it is stored before the next, as a publisher that keeps
    each key's order must (a retried copy that was stored already is dropped by its id).
    """

    def __init__(self, bus, patient: bool = False) -> None:
        self.failure: BaseException | None = None
        self.retried = 0
        target = self._run_patiently if patient else self._run
        self._thread = threading.Thread(target=target, args=(bus,), daemon=True)
        self._thread.start()

    def _run(self, bus) -> None:
        try:
            publish_spread(bus, TOTAL, KEYS, per_key_sequence=True,
                           subject="orders.{aggregate_id}", in_flight=50)
        except BaseException as exc:  # noqa: B036 - re-raised by the test in join()
            self.failure = exc

    def _run_patiently(self, bus) -> None:
        try:
            envelopes = [("orders.{aggregate_id}",
                          Envelope.create(f"agg-{n % KEYS}", "T", str(n // KEYS).encode()))
                         for n in range(TOTAL)]
            for start in range(0, TOTAL, 50):
                pending = envelopes[start:start + 50]
                deadline = time.monotonic() + 60
                while pending:
                    results = bus.publish_many(pending, in_flight=50)
                    pending = [item for item, result in zip(pending, results, strict=True)
                               if not result.ok]
                    self.retried += len(pending)
                    assert time.monotonic() < deadline, f"{len(pending)} not stored within 60 s"
        except BaseException as exc:  # noqa: B036 - re-raised by the test in join()
            self.failure = exc

    def join(self) -> None:
        self._thread.join(120)
        assert not self._thread.is_alive(), "publishing did not finish"
        if self.failure is not None:
            raise self.failure


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


@pytest.mark.parametrize("bridges", [1, 2])
def test_a_killed_elastic_member_s_partitions_move_to_the_others_in_order(hosts, make_bus, records,
                                                                         bridges):
    members = [hosts(name, bridges=bridges) for name in ("a", "b", "c")]
    wait_for(lambda: settled(members, 3), timeout=30, what="three members with their partitions")
    publishing = Publishing(make_bus(pool_size=0))
    wait_for(lambda: len(read_records(records)) >= TOTAL // 5, what="handling under way",
             interval=0.01)
    victim, survivors = members[0], members[1:]
    victim.kill()

    wait_for(lambda: settled(survivors, 2), timeout=30, what="two members sharing the partitions")
    publishing.join()
    wait_for(lambda: all_handled(records, TOTAL), timeout=120, what="every envelope handled")
    report = order_report(records, TOTAL, KEYS)
    by_key = handlers_of(records, members)
    moved = sum(1 for who in by_key.values() if victim.member in who and len(who) > 1)
    per_member: dict = defaultdict(int)
    member_of = {pid: host.member for host in members for pid in host.pids}
    for record in read_records(records):
        per_member[member_of.get(record.pid)] += 1
    print(f"elastic member {victim.member} ({bridges} Bridge(s) each) SIGKILLed: {report}; "
          f"keys moved to a survivor {moved}; "
          f"rebalances {[h.stats()['rebalances'] for h in survivors]}; handled {dict(per_member)}")
    assert report["lost"] == 0 and report["violations"] == 0, report
    assert moved > 0
    assert all(h.stats()["rebalances"] >= 1 for h in survivors)


def test_one_bridge_of_an_elastic_member_killed_mid_stream_keeps_its_partitions_in_order(
        hosts, make_bus, records):
    members = [hosts(name, bridges=2) for name in ("a", "b")]
    wait_for(lambda: settled(members, 2), timeout=30, what="two members with their partitions")
    owned = [h.stats()["partitions_owned"] for h in members]
    rebalanced = [h.stats()["rebalances"] for h in members]   # the first member's as b joined
    publishing = Publishing(make_bus(pool_size=0))
    wait_for(lambda: len(read_records(records)) >= TOTAL // 5, what="handling under way",
             interval=0.01)
    victim = members[0].actor_pids()["bridge-1"]
    os.kill(victim, signal.SIGKILL)

    publishing.join()
    wait_for(lambda: all_handled(records, TOTAL), timeout=120, what="every envelope handled")
    report = order_report(records, TOTAL, KEYS)
    stats = [h.stats() for h in members]
    print(f"one Bridge of two of elastic member a SIGKILLed: {report}; partitions owned {owned}; "
          f"rebalances {[s['rebalances'] for s in stats]}")
    assert report["lost"] == 0 and report["violations"] == 0, report
    # The member's other Bridge kept its key alive: no partition moved between the members.
    assert [s["partitions_owned"] for s in stats] == owned
    assert [s["rebalances"] for s in stats] == rebalanced
    assert not process_alive(victim)


def test_an_elastic_member_added_mid_stream_takes_partitions_over_in_order(hosts, make_bus, records):
    members = [hosts(name) for name in ("a", "b")]
    wait_for(lambda: settled(members, 2), timeout=30, what="two members with their partitions")
    publishing = Publishing(make_bus(pool_size=0))
    wait_for(lambda: len(read_records(records)) >= TOTAL // 5, what="handling under way",
             interval=0.01)
    members.append(hosts("c"))

    wait_for(lambda: settled(members, 3), timeout=30, what="three members with their partitions")
    publishing.join()
    wait_for(lambda: all_handled(records, TOTAL), timeout=120, what="every envelope handled")
    report = order_report(records, TOTAL, KEYS)
    by_key = handlers_of(records, members)
    newcomer = sum(1 for who in by_key.values() if "c" in who)
    print(f"elastic member added mid-stream: {report}; keys the newcomer handled {newcomer}")
    assert report["lost"] == 0 and report["violations"] == 0, report
    assert newcomer > 0


def test_a_static_group_fails_over_to_the_member_s_hot_standby_in_order(hosts, make_bus, records):
    names = ["a", "b"]
    first_a, b = hosts("a", names), hosts("b", names)
    standby_a = hosts("a", names)
    publishing = Publishing(make_bus(pool_size=0))
    wait_for(lambda: len(read_records(records)) >= TOTAL // 5, what="handling under way",
             interval=0.01)
    both_a = {pid for h in (first_a, standby_a) for pid in h.pids}
    active_a = first_a if first_a.stats().get("pinned") else standby_a
    assert active_a.stats()["pinned"] == 1 and b.stats()["pinned"] == 1
    idle_a = standby_a if active_a is first_a else first_a
    assert idle_a.stats()["received"] == 0 and idle_a.stats()["standby"] == 1
    active_a.kill()

    publishing.join()
    wait_for(lambda: all_handled(records, TOTAL), timeout=120, what="every envelope handled")
    report = order_report(records, TOTAL, KEYS)
    by_key = handlers_of(records, [active_a, idle_a, b])
    print(f"static member a's active instance SIGKILLed: {report}; "
          f"standby recovered {idle_a.stats()['recovered']}")
    assert report["lost"] == 0 and report["violations"] == 0, report
    # Each key stays with its member: a's keys with a's two instances, b's with b.
    assert all(who <= {"a"} or who == {"b"} for who in by_key.values()), \
        [k for k, w in by_key.items() if not (w <= {"a"} or w == {"b"})][:5]
    assert idle_a.stats()["pinned"] == 1
    assert any(r.pid in both_a for r in read_records(records))


@pytest.mark.cluster
def test_an_elastic_group_on_a_three_node_cluster_survives_its_consumer_leader_s_server(
        nats_cluster, tmp_path, records, make_bus):
    # R3 stream, consumers and membership bucket. Heartbeats of 2 s: a member is gone after
    # 10 s, longer than an election (4-9 s), so the kill moves no partition.
    members = []
    try:
        for name in ("a", "b", "c"):
            host = GroupHost(nats_cluster.urls, tmp_path / f"{name}.pids", "billing", PARTITIONS,
                             name, replicas=3, heartbeat=2.0)
            members.append(host)
            host.wait_started()
        wait_for(lambda: settled(members, 3), timeout=60, what="three members with their partitions")
        publishing = Publishing(make_bus(pool_size=0, servers=nats_cluster.urls), patient=True)
        wait_for(lambda: len(read_records(records)) >= TOTAL // 5, what="handling under way",
                 interval=0.01)
        leader = nats_cluster.consumer_leader("ORDERS", "billing-p0")
        victim = nats_cluster.index_of(leader)
        nats_cluster.kill(victim)

        publishing.join()
        wait_for(lambda: all_handled(records, TOTAL), timeout=120, what="every envelope handled")
        report = order_report(records, TOTAL, KEYS)
        new_leader = nats_cluster.wait_leader("ORDERS", "billing-p0", not_on=leader)
        print(f"3-node cluster, server {leader} (leader of billing-p0) SIGKILLed: {report}; "
              f"new leader {new_leader}; publishes retried {publishing.retried}")
        assert report["lost"] == 0 and report["violations"] == 0, report
    finally:
        for host in members:
            host.ensure_gone()
