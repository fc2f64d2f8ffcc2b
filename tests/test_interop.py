"""Go EventBus JSON envelopes through the whole bus: a real nats-server, the processes runtime."""
from __future__ import annotations

import dataclasses
import json
import time
from collections import defaultdict

import pytest

from actorbus import Envelope
from tests import handlers
from tests.support import (create_stream, read_records, stream_messages, wait_for,
                           wait_for_stats)
from tests.test_wire_format import GO_ENVELOPES

pytestmark = pytest.mark.integration


def go_envelope(n: int, aggregate: str, payload: dict) -> bytes:
    """A JSON envelope as the Go EventBus writes it (no headers go with it)."""
    return json.dumps({"event_id": f"evt-{n}", "aggregate_id": aggregate, "event_type": "Happened",
                       "event_version": 1, "timestamp": f"2026-12-01T11:00:40.{n:09d}+08:00",
                       "payload": payload}, separators=(",", ":")).encode()


def test_json_envelopes_get_the_envelope_contract(make_bus, records, nats_server):
    total, keys, failing = 400, 20, {3, 77, 150, 222, 399}
    started = time.monotonic()
    bus = make_bus(pool_size=2)
    bus.subscribe("orders.>", handlers.fail_marked_once, durable="orders", retries=0,
                  nak_delay=0.05, envelope_format="auto")
    results = bus.publish_many([
        (f"orders.{n % keys}",
         go_envelope(n, f"agg-{n % keys}", {"n": n, "fail": True} if n in failing else {"n": n}))
        for n in range(total)])
    assert all(r.ok for r in results)

    stats = wait_for_stats(bus, "acked", total)

    assert stats["processed"] == total and stats["naked"] == len(failing)
    assert stats["redelivered"] == len(failing)
    assert stats["dead_lettered"] == 0 and stats["invalid"] == 0
    found = read_records(records)
    assert sorted(json.loads(r.data)["n"] for r in found if r.kind == "fail") == sorted(failing)
    assert all(r.delivery_count == 1 for r in found if r.kind == "fail")
    redelivered = {json.loads(r.data)["n"]: r.delivery_count for r in found
                   if r.kind == "ok" and r.delivery_count > 1}
    assert redelivered == {n: 2 for n in failing}
    first_handlings, handled = defaultdict(list), defaultdict(list)
    seen = set()
    for r in found:
        n = json.loads(r.data)["n"]
        assert r.aggregate_id == r.routing_key == f"agg-{n % keys}"   # from the body: no header
        if n not in seen:
            seen.add(n)
            first_handlings[r.aggregate_id].append(n)
        if r.kind == "ok":
            handled[r.aggregate_id].append(n)
    # Per-key order: first handlings follow stream order whatever
    # fails (a naked envelope's redelivery may come after later ones of its key, as in msgpack).
    for aggregate, numbers in first_handlings.items():
        assert numbers == sorted(numbers), f"{aggregate} first handled out of order"
    assert sorted(n for ns in handled.values() for n in ns) == list(range(total))
    assert {r.pid for r in found} <= {pid for name, pid in bus.pids.items() if name.startswith("member-")}
    print(f"{total} JSON envelopes in {time.monotonic() - started:.1f}s; {stats}")


def test_go_envelopes_come_out_of_a_handler_and_publish_envelope_as_they_went_in(
        make_bus, records, nats_server):
    bus = make_bus(pool_size=1)
    bus.subscribe("orders.>", handlers.record_envelope_as_json, durable="orders",
                  envelope_format="json")
    for wire in GO_ENVELOPES.values():
        bus.publish("orders.go", wire)       # as the newest Go publisher does: no headers

    wait_for_stats(bus, "acked", len(GO_ENVELOPES))
    seen = wait_for(lambda: [bytes.fromhex(line) for path in records.glob("json-*.txt")
                             for line in path.read_text().split()], what="the handler's records")
    assert seen == list(GO_ENVELOPES.values())

    create_stream(nats_server.url, "OUTBOX", ["outbox.>"])
    for wire in seen:
        bus.publish_envelope("outbox.go", Envelope.decode(wire), format="json")
    stored = stream_messages(nats_server.url, "OUTBOX")
    assert [m.data for m in stored] == list(GO_ENVELOPES.values())
    for message, wire in zip(stored, GO_ENVELOPES.values(), strict=True):
        fields = json.loads(wire)
        assert message.headers["Content-Type"] == "application/json"
        assert message.headers["Nats-Msg-Id"] == fields["event_id"]
        assert message.headers["X-Aggregate-ID"] == fields["aggregate_id"]
    # A new event id: the same one would be dropped by JetStream as a duplicate.
    envelope = dataclasses.replace(Envelope.decode(seen[0]), event_id="evt-msgpack")
    sequence = bus.publish_envelope("outbox.py", envelope).sequence
    stored = stream_messages(nats_server.url, "OUTBOX")[sequence - 1]
    assert stored.headers["Content-Type"] == "application/msgpack"
    assert stored.headers["X-Aggregate-ID"] == envelope.aggregate_id
    assert Envelope.decode(stored.data) == envelope


def test_a_plain_subscription_routes_go_envelopes_by_their_body(make_bus, records):
    # The newest Go publisher sets no X-Aggregate-ID: the body gives the key.
    bus = make_bus(pool_size=2)
    bus.subscribe("metrics.>", handlers.record, envelope=False, durable="metrics")
    results = bus.publish_many([(f"metrics.{n % 3}", go_envelope(n, f"host-{n % 3}", {"n": n}))
                                for n in range(30)] + [("metrics.x", b'{"n":"no-envelope"}')])
    assert all(r.ok for r in results)

    wait_for_stats(bus, "acked", 31)

    by_key, pids = defaultdict(list), defaultdict(set)
    found = read_records(records)
    assert len(found) == 31
    for r in found:
        if r.aggregate_id == "-":
            assert r.routing_key.startswith("rr-")    # a JSON body that is no envelope: keyless
            continue
        by_key[r.routing_key].append(json.loads(r.data)["payload"]["n"])
        pids[r.routing_key].add(r.pid)
    assert set(by_key) == {"host-0", "host-1", "host-2"}
    for key, numbers in by_key.items():
        assert numbers == sorted(numbers) and len(numbers) == 10 and len(pids[key]) == 1
