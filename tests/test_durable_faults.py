"""Durable aggregates under faults, on a real nats-server and the processes runtime: every
aggregate's state (a running sum and the numbers of its events, in the order applied) ends
equal to the fold of its events, each applied once and in order, whatever was killed.

The suite runs them sized down; ``ACTORBUS_DURABLE_FULL=1`` runs 20,000 events over 500
aggregates, as the acceptance run does.
"""
from __future__ import annotations

import asyncio
import os
import random
import signal
import time

import nats
import pytest

from actorbus.snapshots import Snapshot, aggregate_of_key, decode_snapshot
from actorbus.supervision import Backoff, OneForOne
from tests import handlers
from tests.bus_host import PIN_TIMEOUT
from tests.support import (GROUP_PARTITIONS, GroupHost, HostBus, consumer_info, publish_spread,
                           running_member_pids, wait_for)

pytestmark = pytest.mark.integration

FULL = os.environ.get("ACTORBUS_DURABLE_FULL") == "1"
TOTAL, KEYS = (20_000, 500) if FULL else (4_000, 100)
SUBJECT = "ledger.*"
STREAM = "LEDGER"


def publish_events(bus, start: int, total: int) -> None:
    """Events ``start`` up to ``total`` round-robin over ``agg-<k>`` on ``ledger.agg-<k>``, each
    carrying its number within its aggregate."""
    publish_spread(bus, total, KEYS, per_key_sequence=True, subject="ledger.{aggregate_id}",
                   start=start)


def settled(url: str, durable: str) -> bool:
    info = consumer_info(url, STREAM, durable)
    return info.num_pending == 0 and info.num_ack_pending == 0


def snapshots(url: str, durable: str) -> dict[str, Snapshot]:
    """Every snapshot in the subscription's bucket, by aggregate id."""
    async def read() -> dict[str, Snapshot]:
        nc = await nats.connect(url)
        try:
            kv = await nc.jetstream().key_value(f"actorbus-snapshots-{durable}")
            return {aggregate_of_key(key): decode_snapshot((await kv.get(key)).value)
                    for key in await kv.keys()}
        finally:
            await nc.close()
    return asyncio.run(read())


def finish_and_check(bus, url: str, durable: str) -> None:
    """One more event for every aggregate (each key is live again, restored if need be), a
    clean stop (which snapshots every live aggregate), then each snapshot must be the fold
    of all its events: numbers 0..n exactly once, in order, and their sum."""
    publish_events(bus, TOTAL, TOTAL + KEYS)
    wait_for(lambda: settled(url, durable), timeout=120, what="every event acked")
    bus.stop()
    found = snapshots(url, durable)
    expected = list(range(TOTAL // KEYS + 1))
    wrong = {key: s.state["numbers"] for key, s in found.items() if s.state["numbers"] != expected}
    assert len(found) == KEYS and not wrong, f"{len(wrong)} wrong, e.g. {next(iter(wrong.items()), None)}"
    assert all(s.state["total"] == sum(expected) for s in found.values())


def test_members_sigkilled_every_300ms_leave_every_state_applied_once(make_bus, nats_server):
    bus = make_bus(pool_size=4, window=256, supervision=OneForOne(
        max_restarts=1000, within=60.0, backoff=Backoff(initial=0.01, maximum=0.1, jitter=0.0)))
    bus.subscribe(SUBJECT, handlers.SlowLedger, durable="ledger", key_from_subject=True,
                  ack_wait=5.0)
    started = time.monotonic()
    publish_events(bus, 0, TOTAL)
    rng = random.Random(26)
    kills = 0
    deadline = time.monotonic() + 150
    while not settled(nats_server.url, "ledger"):
        assert time.monotonic() < deadline, f"not every event was acked: {bus.stats()}"
        stats = bus.stats()
        running = running_member_pids(bus, stats)
        if stats["acked"] < TOTAL * 0.9 and running:
            try:
                os.kill(rng.choice(running), signal.SIGKILL)
                kills += 1
            except ProcessLookupError:
                pass   # it died since the last look
        time.sleep(0.3)
    print(f"{TOTAL} events / {KEYS} aggregates, {kills} member SIGKILLs, "
          f"{time.monotonic() - started:.1f} s, {bus.stats()['restarts']} restarts")
    assert kills >= 3
    finish_and_check(bus, nats_server.url, "ledger")


def test_a_whole_bus_sigkilled_and_started_again_leaves_every_state_applied_once(
        make_bus, nats_server, tmp_path):
    publisher = make_bus(pool_size=1)   # publishes only
    # Host 1 handles 15 events an aggregate, all acked, and is killed idle: each aggregate
    # has 5 events applied after its last snapshot (every 10) that only its memory held.
    first = HostBus(nats_server.url, tmp_path / "host1.pids", handler="SlowLedger", subject=SUBJECT)
    try:
        first.wait_started()
        acked = 15 * KEYS
        publish_events(publisher, 0, acked)
        wait_for(lambda: settled(nats_server.url, "orders"), timeout=120, what="all acked")
    finally:
        first.kill()
    # Host 2 is killed mid-stream: much handled (and snapshotted) that is not acked yet.
    second = HostBus(nats_server.url, tmp_path / "host2.pids", handler="SlowLedger",
                     subject=SUBJECT)
    try:
        second.wait_started()
        publish_events(publisher, acked, TOTAL)
        wait_for(lambda: consumer_info(nats_server.url, STREAM, "orders").ack_floor.stream_seq
                 >= acked + (TOTAL - acked) // 3, timeout=120, what="a third more acked",
                 interval=0.01)
    finally:
        second.kill()
    info = consumer_info(nats_server.url, STREAM, "orders")
    print(f"host 2 killed at ack floor {info.ack_floor.stream_seq}, delivered "
          f"{info.delivered.stream_seq} of {TOTAL}")
    assert info.ack_floor.stream_seq < TOTAL
    bus = make_bus(pool_size=2)
    bus.subscribe(SUBJECT, handlers.SlowLedger, durable="orders", key_from_subject=True,
                  ack_wait=5.0, pin_timeout=PIN_TIMEOUT, pull_expires=PIN_TIMEOUT / 4)
    finish_and_check(bus, nats_server.url, "orders")


def group_settled(url: str) -> bool:
    return all(settled_on(url, "ORDERS", f"ledgers-p{p}") for p in range(GROUP_PARTITIONS))


def settled_on(url: str, stream: str, durable: str) -> bool:
    info = consumer_info(url, stream, durable)
    return info.num_pending == 0 and info.num_ack_pending == 0


def test_partitions_moving_between_group_members_mid_stream_leave_every_state_applied_once(
        make_bus, nats_server, tmp_path):
    url = nats_server.url
    hosts: list[GroupHost] = []

    def start(member: str) -> GroupHost:
        host = GroupHost(url, tmp_path / f"{member}.pids", "ledgers", GROUP_PARTITIONS, member,
                         handler="SlowLedger")
        hosts.append(host)
        host.wait_started()
        return host

    try:
        first = start("a")
        wait_for(lambda: first.stats().get("partitions_owned") == GROUP_PARTITIONS,
                 what="a owning every partition")
        publisher = make_bus(pool_size=0)   # publishes only
        half = TOTAL // 2

        def publish(start: int, end: int) -> None:
            publish_spread(publisher, end, KEYS, per_key_sequence=True,
                           subject="orders.{aggregate_id}", start=start)

        publish(0, half)
        wait_for(lambda: first.stats().get("processed", 0) >= half // 2, timeout=60,
                 what="a quarter handled by a", interval=0.02)
        # Half of the partitions move to b, mid-stream; b restores their aggregates, which
        # a holds live.
        second = start("b")
        wait_for(lambda: second.stats().get("partitions_owned") == GROUP_PARTITIONS // 2 and
                 first.stats().get("partitions_owned") == GROUP_PARTITIONS // 2, timeout=30,
                 what="the partitions shared")
        publish(half, TOTAL)
        wait_for(lambda: second.stats().get("processed", 0) >= half // 5, timeout=60,
                 what="b handling its share", interval=0.02)
        # b leaves: its partitions move back to a, which held instances of them all along.
        second.terminate()
        wait_for(lambda: first.stats().get("partitions_owned") == GROUP_PARTITIONS, timeout=30,
                 what="a owning every partition again")
        wait_for(lambda: group_settled(url), timeout=120, what="every event acked")
        publish(TOTAL, TOTAL + KEYS)
        wait_for(lambda: group_settled(url), timeout=60, what="the last events acked")
        print(f"{TOTAL} events / {KEYS} aggregates over a group: a handled "
              f"{first.stats().get('processed')}, b {second.stats().get('processed')}, "
              f"a's rebalances {first.stats().get('rebalances')}")
        first.terminate()   # a clean stop: every live aggregate snapshotted
    finally:
        for host in hosts:
            host.ensure_gone()
    found = snapshots(url, "orders")
    expected = list(range(TOTAL // KEYS + 1))
    wrong = {key: s.state["numbers"] for key, s in found.items() if s.state["numbers"] != expected}
    assert len(found) == KEYS and not wrong, f"{len(wrong)} wrong, e.g. {next(iter(wrong.items()), None)}"


def test_aggregates_keyed_by_header_are_restored_by_scanning_the_stream(make_bus, nats_server):
    # The aggregate id is in the X-Aggregate-ID header, not the subject: a restore reads
    # every message of the subscription since the snapshots and keeps each aggregate's own.
    keys, acked = 30, 15
    bus = make_bus(pool_size=2)
    bus.subscribe("journal.>", handlers.Ledger, durable="journal", ack_wait=5.0)
    publish_spread(bus, keys * acked, keys, per_key_sequence=True, subject="journal.entries")
    wait_for(lambda: settled_on(nats_server.url, "JOURNAL", "journal"), what="all acked")
    # Each member SIGKILLed in turn: each aggregate has 5 events after its snapshot, acked,
    # that only the dead members held. (One at a time: killing both at once sometimes
    # leaves one death unnoticed by the Router, a fault of its own.)
    for name in ("member-0", "member-1"):
        bus.stats()   # refreshes bus.pids
        victim = bus.pids[name]
        os.kill(victim, signal.SIGKILL)

        def restarted(name: str = name, victim: int = victim) -> bool:
            state = bus.stats()["actors"].get(name)   # refreshes bus.pids
            return bus.pids.get(name) != victim and state == "running"

        wait_for(restarted, what=f"{name} restarted")
    publish_spread(bus, keys * (acked + 1), keys, per_key_sequence=True, subject="journal.entries",
                   start=keys * acked)
    wait_for(lambda: settled_on(nats_server.url, "JOURNAL", "journal"), what="all acked")
    bus.stop()
    found = snapshots(nats_server.url, "journal")
    assert {key: s.state["numbers"] for key, s in found.items()} == \
        {f"agg-{k}": list(range(acked + 1)) for k in range(keys)}


def test_snapshots_on_a_secured_server_show_no_secret(make_bus, tmp_path, log_file):
    # The members' own connection is made with the bus's settings: a password in the URL
    # works, and shows nowhere (logs through a server restart, reprs, command lines).
    from actorbus.bridge.snapshot_store import KvSnapshotStores
    from actorbus.server import NatsServer
    from tests.test_nats_auth import SECRET, command_line

    (tmp_path / "server.conf").write_text(f'authorization {{ user: alice, password: "{SECRET}" }}\n')
    server = NatsServer(store_dir=tmp_path / "secured", config=tmp_path / "server.conf").start()
    try:
        url = f"nats://alice:{SECRET}@127.0.0.1:{server.port}"
        bus = make_bus(servers=url, pool_size=1)
        bus.subscribe(SUBJECT, handlers.Ledger, durable="secured", key_from_subject=True)
        publish_spread(bus, 30, 2, per_key_sequence=True, subject="ledger.{aggregate_id}")
        wait_for(lambda: bus.stats()["acked"] >= 30, what="all acked")
        server.kill()   # the snapshot connection reconnects, and says so
        server.start()
        publish_spread(bus, 32, 2, per_key_sequence=True, subject="ledger.{aggregate_id}", start=30)
        wait_for(lambda: bus.stats()["acked"] >= 32, what="all acked again")
        shown = [log_file.read_text(), repr(KvSnapshotStores(bus.config))]
        shown += [command_line(pid) for pid in bus.runtime.pids()]
        bus.stop()
        found = snapshots(url, "secured")
        assert {key: s.state["numbers"] for key, s in found.items()} == \
            {"agg-0": list(range(16)), "agg-1": list(range(16))}
        assert "alice:***@" in shown[1]
        assert not [text for text in shown if SECRET in text]
    finally:
        server.close()


def snapshot_privilege(durable: str) -> list[str]:
    """What docs/durable.md lists: the publish permissions of a subscription's snapshots."""
    bucket = f"actorbus-snapshots-{durable}"
    return [f"$JS.API.STREAM.INFO.KV_{bucket}", f"$JS.API.STREAM.CREATE.KV_{bucket}",
            f"$JS.API.STREAM.MSG.GET.KV_{bucket}", f"$KV.{bucket}.>"]


def test_durable_aggregates_need_only_the_listed_permissions(make_bus, tmp_path, log_file):
    from actorbus.server import NatsServer
    from tests.test_nats_auth import SECRET, _quoted, least_privilege

    publish, subscribe = least_privilege("LEDGER", "limited", "ledger.*")
    publish += snapshot_privilege("limited")
    (tmp_path / "server.conf").write_text(f"""
authorization {{
  users = [
    {{ user: alice, password: "{SECRET}" }}
    {{ user: limited, password: "limited-pw",
       permissions: {{ publish: {{ allow: [{_quoted(publish)}] }},
                       subscribe: {{ allow: [{_quoted(subscribe)}] }} }} }}
  ]
}}
""")
    server = NatsServer(store_dir=tmp_path / "limited", config=tmp_path / "server.conf").start()
    try:
        bus = make_bus(servers=server.url, user="limited", password="limited-pw", pool_size=1)
        bus.subscribe(SUBJECT, handlers.Ledger, durable="limited", key_from_subject=True)
        publish_spread(bus, 30, 2, per_key_sequence=True, subject="ledger.{aggregate_id}")
        wait_for(lambda: bus.stats()["acked"] >= 30, what="all acked")
        bus.stats()
        victim = bus.pids["member-0"]
        os.kill(victim, signal.SIGKILL)   # its restart restores: snapshots and the stream read
        wait_for(lambda: bus.stats()["actors"].get("member-0") == "running" and
                 bus.pids["member-0"] != victim, what="member-0 restarted")
        publish_spread(bus, 32, 2, per_key_sequence=True, subject="ledger.{aggregate_id}", start=30)
        wait_for(lambda: bus.stats()["acked"] >= 32, what="all acked again")
        bus.stop()
        found = snapshots(f"nats://alice:{SECRET}@127.0.0.1:{server.port}", "limited")
        assert {key: s.state["numbers"] for key, s in found.items()} == \
            {"agg-0": list(range(16)), "agg-1": list(range(16))}
        assert "violation" not in log_file.read_text().lower()
    finally:
        server.close()
