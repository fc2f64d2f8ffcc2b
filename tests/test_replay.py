"""``actorbus replay``: every snapshot of a subscription rebuilt from its stream, on a real
nats-server, while a bus runs on the subscription undisturbed."""
from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import nats
import pytest

from actorbus.snapshots import Snapshot, encode_snapshot, snapshot_key
from tests import handlers
from tests.support import consumer_info, publish_spread, wait_for
from tests.test_durable_faults import snapshots

pytestmark = pytest.mark.integration

ACTORBUS = str(Path(sys.executable).parent / "actorbus")
ROOT = Path(__file__).resolve().parent.parent
KEYS, PER_KEY = 3, 25


def replay(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([ACTORBUS, "replay", "tests.handlers:ledger_topology", "--servers", url,
                           *args], capture_output=True, text=True, timeout=120, cwd=ROOT)


def spoil(url: str) -> None:
    """agg-0's snapshot undecodable, agg-1's wrong (as a buggy handle would have left it),
    agg-2's gone."""
    async def main() -> None:
        nc = await nats.connect(url)
        kv = await nc.jetstream().key_value("actorbus-snapshots-ledger")
        await kv.put(snapshot_key("agg-0"), b"\xc1 spoilt")
        await kv.put(snapshot_key("agg-1"), encode_snapshot(Snapshot({"total": 1, "numbers": [1]}, 1, 3)))
        await kv.delete(snapshot_key("agg-2"))
        await nc.close()
    asyncio.run(main())


def test_replay_rebuilds_every_snapshot_and_leaves_a_running_bus_alone(make_bus, nats_server):
    first = make_bus(pool_size=2)
    first.subscribe("ledger.*", handlers.Ledger, durable="ledger", key_from_subject=True)
    publish_spread(first, KEYS * PER_KEY, KEYS, per_key_sequence=True, subject="ledger.{aggregate_id}")
    wait_for(lambda: consumer_info(nats_server.url, "LEDGER", "ledger").num_ack_pending == 0 and
             consumer_info(nats_server.url, "LEDGER", "ledger").num_pending == 0, what="all acked")
    first.stop()
    spoil(nats_server.url)

    running = make_bus(pool_size=2)
    running.subscribe("ledger.*", handlers.Ledger, durable="ledger", key_from_subject=True)
    before = consumer_info(nats_server.url, "LEDGER", "ledger")
    result = replay(nats_server.url)
    after = consumer_info(nats_server.url, "LEDGER", "ledger")

    assert result.returncode == 0, result.stderr
    assert (f"rebuilt {KEYS} snapshot(s) of ledger from {KEYS * PER_KEY} event(s) through "
            f"sequence {KEYS * PER_KEY}") in result.stdout
    found = snapshots(nats_server.url, "ledger")
    assert {key: s.state["numbers"] for key, s in found.items()} == \
        {f"agg-{k}": list(range(PER_KEY)) for k in range(KEYS)}
    # Each at the sequence of its aggregate's last event (round-robin: agg-k's is 72 + k + 1).
    assert {key: s.sequence for key, s in found.items()} == \
        {f"agg-{k}": KEYS * (PER_KEY - 1) + k + 1 for k in range(KEYS)}
    assert (after.delivered.stream_seq, after.ack_floor.stream_seq, after.num_ack_pending) == \
        (before.delivered.stream_seq, before.ack_floor.stream_seq, before.num_ack_pending)
    assert running.stats()["processed"] == 0


def test_replay_names_a_subscription_it_cannot_find(nats_server):
    result = replay(nats_server.url, "--subscription", "nope")
    assert result.returncode == 2
    assert "no subscription 'nope'; the topology has ['ledger']" in result.stderr
    assert "Traceback" not in result.stderr


def test_replay_reads_a_partitioned_stream(make_bus, nats_server):
    bus = make_bus(pool_size=2, partitions=4)
    bus.subscribe("ledgerp.*", handlers.Ledger, durable="ledgerp")
    publish_spread(bus, KEYS * PER_KEY, KEYS, per_key_sequence=True,
                   subject="ledgerp.{aggregate_id}")
    wait_for(lambda: bus.stats()["acked"] >= KEYS * PER_KEY, what="all acked")
    bus.stop()
    assert asyncio.run(_delete_bucket(nats_server.url, "actorbus-snapshots-ledgerp"))   # all lost
    result = subprocess.run([ACTORBUS, "replay", "tests.handlers:ledger_partitioned_topology",
                             "--servers", nats_server.url], capture_output=True, text=True,
                            timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert f"rebuilt {KEYS} snapshot(s) of ledgerp from {KEYS * PER_KEY} event(s)" in result.stdout
    found = snapshots(nats_server.url, "ledgerp")
    assert {key: s.state["numbers"] for key, s in found.items()} == \
        {f"agg-{k}": list(range(PER_KEY)) for k in range(KEYS)}


async def _delete_bucket(url: str, bucket: str) -> bool:
    nc = await nats.connect(url)
    try:
        return bool(await nc.jetstream().delete_key_value(bucket))
    finally:
        await nc.close()
