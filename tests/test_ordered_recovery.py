"""Per-key order under failure: for every aggregate id the first successful
handlings follow stream order, whatever dies — the Bridge, the whole host, nats-server —
and whatever fails; duplicates are allowed and counted, loss is not.

Each test runs a real nats-server and a multiprocTCPBase bus, and reports the
duplicate handlings it saw.
"""
from __future__ import annotations

import os
import signal
from collections import defaultdict
from pathlib import Path

import pytest

from actorbus.supervision import Backoff, OneForOne
from tests import handlers
from tests.bus_host import PIN_TIMEOUT
from tests.support import HostBus, consumer_info, publish_spread, read_records, wait_for

pytestmark = pytest.mark.integration

def order_report(records: Path, total: int, keys: int) -> dict:
    """Lost envelopes, per-key order violations among first successful handlings, duplicates."""
    firsts: dict[str, list[int]] = defaultdict(list)
    seen: set[tuple[str, int]] = set()
    handled = 0
    for record in read_records(records):
        if record.kind != "ok":
            continue
        handled += 1
        item = (record.aggregate_id, int(record.data))
        if item not in seen:
            seen.add(item)
            firsts[record.aggregate_id].append(int(record.data))
    violations = [(key, numbers) for key, numbers in firsts.items() if numbers != sorted(numbers)]
    expected = {(f"agg-{k}", n) for k in range(keys) for n in range(total // keys)}
    return {"lost": len(expected - seen), "violations": len(violations),
            "first_violation": violations[0] if violations else None,
            "duplicates": handled - len(seen)}


def all_handled(records: Path, total: int) -> bool:
    return len({(r.aggregate_id, r.data) for r in read_records(records) if r.kind == "ok"}) >= total


def test_a_killed_bridge_recovers_its_gap_first_and_keeps_per_key_order(make_bus, records, nats_server):
    total, keys = 8000, 80
    bus = make_bus(pool_size=2, window=2048,
                   supervision=OneForOne(backoff=Backoff(initial=0.05, maximum=0.5)))
    # A slow handler (2 ms): the bus is still busy when its Bridge is killed.
    bus.subscribe("orders.>", handlers.slow_record, durable="orders", ack_wait=5.0)
    publish_spread(bus, total, keys, per_key_sequence=True)
    wait_for(lambda: bus.stats()["processed"] >= 2000, what="processing under way", interval=0.01)

    os.kill(bus.pids["bridge"], signal.SIGKILL)

    wait_for(lambda: all_handled(records, total), timeout=120, what="every envelope handled")
    report, stats = order_report(records, total, keys), bus.stats()
    print(f"Bridge SIGKILL, {total} envelopes / {keys} keys: {report}, recovered "
          f"{stats['recovered']} in {stats.get('recoveries', 0)} recovery(ies)")
    assert report["lost"] == 0 and report["violations"] == 0, report
    assert stats["restarts_bridge"] == 1 and stats["recovered"] > 0


def test_a_killed_host_is_recovered_by_the_next_bus_on_the_durable(make_bus, records, nats_server,
                                                                   tmp_path):
    total, keys = 10_000, 100
    # A slow handler (2 ms): the host is still busy when it is killed.
    host = HostBus(nats_server.url, tmp_path / "host.pids", handler="slow_record")
    try:
        host.wait_started()
        publisher = make_bus(pool_size=1)   # publishes only; consumes nothing
        publish_spread(publisher, total, keys, per_key_sequence=True)
        wait_for(lambda: len(read_records(records)) >= 2000, what="the host handling", interval=0.01)
    finally:
        host.kill()   # every process of that bus at once: a host crash
    info = consumer_info(nats_server.url, "ORDERS", "orders")
    gap = info.delivered.stream_seq - info.ack_floor.stream_seq

    bus = make_bus(pool_size=2)   # pinned once the dead host's pin times out
    bus.subscribe("orders.>", handlers.record, durable="orders", ack_wait=5.0,
                  pin_timeout=PIN_TIMEOUT, pull_expires=PIN_TIMEOUT / 4)
    wait_for(lambda: all_handled(records, total), timeout=120, what="every envelope handled")
    report, stats = order_report(records, total, keys), bus.stats()
    print(f"host SIGKILL, {total} envelopes / {keys} keys: gap {gap}, {report}, "
          f"recovered {stats['recovered']}")
    assert report["lost"] == 0 and report["violations"] == 0, report
    assert gap > 0 and stats["recovered"] > 0


def test_a_nats_server_crash_keeps_per_key_order(make_bus, records, nats_server):
    total, keys = 10_000, 100
    bus = make_bus(pool_size=2)
    bus.subscribe("orders.>", handlers.slow_record, durable="orders", ack_wait=3.0)
    publish_spread(bus, total, keys, per_key_sequence=True)
    wait_for(lambda: bus.stats()["processed"] >= 1000, what="processing under way", interval=0.01)

    nats_server.kill()      # file storage keeps the stream and the consumer's state
    nats_server.start()     # same port, same store

    wait_for(lambda: all_handled(records, total), timeout=120, what="every envelope handled")
    report = order_report(records, total, keys)
    print(f"nats-server SIGKILL, {total} envelopes / {keys} keys: {report}, stats {bus.stats()}")
    assert report["lost"] == 0 and report["violations"] == 0, report


def test_a_naked_envelope_holds_back_the_rest_of_its_key(make_bus, records):
    bus = make_bus(pool_size=2)
    bus.subscribe("orders.>", handlers.fail_first_delivery_of_first, durable="orders", retries=0,
                  nak_delay=0.3)
    # agg-0 gets 51 envelopes (0..50), the others 51 each too: the first of each fails once.
    publish_spread(bus, 51 * 4, keys=4, per_key_sequence=True)
    wait_for(lambda: all_handled(records, 51 * 4), timeout=60, what="every envelope handled")
    stats = bus.stats()
    report = order_report(records, 51 * 4, 4)
    successes = [int(r.data) for r in read_records(records) if r.kind == "ok" and r.aggregate_id == "agg-0"]
    print(f"one nak per key with 50 later envelopes waiting: {report}, naked {stats['naked']}, "
          f"held {stats['subscriptions']['orders']['counts'].get('held_for_order', 0)}")
    assert successes == list(range(51))
    assert report["lost"] == 0 and report["violations"] == 0
    assert stats["naked"] == 4 and stats["dead_lettered"] == 0
