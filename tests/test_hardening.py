"""Delivery hardening on a real nats-server: dead letters, bad input, drain, publishing, memory."""
from __future__ import annotations

import os
import time
from collections import Counter

import msgpack
import pytest

from actorbus import BusError, Envelope, PublishError
from actorbus.processes import process_alive
from tests import handlers
from tests.support import (consumer_info, create_stream, publish_spread, read_records,
                           stream_info, stream_messages, tree_rss_bytes, wait_for,
                           wait_for_stats)

pytestmark = pytest.mark.integration


def test_poison_envelope_is_dead_lettered_after_max_deliver(make_bus, records, nats_server):
    bus = make_bus(pool_size=2)
    bus.subscribe("orders.>", handlers.fail_poison, durable="orders", max_deliver=3, retries=0,
                  nak_delay=0.01)
    for n in range(5):
        bus.publish_envelope("orders.a", Envelope.create(f"good-{n}", "Happened", str(n).encode()))
    poison = Envelope.create("bad-1", "Happened", b"poison")
    poison_seq = bus.publish_envelope("orders.bad", poison).sequence
    for n in range(5, 10):
        bus.publish_envelope("orders.a", Envelope.create(f"good-{n}", "Happened", str(n).encode()))

    stats = wait_for_stats(bus, "dead_lettered", 1)
    stats = wait_for_stats(bus, "acked", 10)

    assert stats["processed"] == 10 and stats["naked"] == 2 and stats["dead_lettered"] == 1
    found = read_records(records)
    assert [r.delivery_count for r in found if r.kind == "fail"] == [1, 2, 3]
    assert sorted(int(r.data) for r in found if r.kind == "ok") == list(range(10))
    letters = stream_messages(nats_server.url, "ORDERS_DLQ")
    assert len(letters) == 1
    letter = letters[0]
    assert letter.subject == "deadletter.ORDERS" and letter.data == poison.encode()
    assert letter.headers["Actorbus-Original-Subject"] == "orders.bad"
    assert letter.headers["Actorbus-Stream-Sequence"] == str(poison_seq)
    assert letter.headers["Actorbus-Delivery-Count"] == "3"
    assert letter.headers["Actorbus-Error"] == "RuntimeError: poison message"
    wait_for(lambda: consumer_info(nats_server.url, "ORDERS", "orders").num_ack_pending == 0,
             what="every message settled")



def test_two_dead_letters_with_the_same_message_id_are_both_kept(make_bus, nats_server):
    # A message id the publisher used twice, outside the source stream's duplicate window
    # (short here): the dead-letter stream must not take the second letter for a duplicate
    # of the first, since the original is termed either way.
    import asyncio

    import nats
    from nats.js.api import StreamConfig

    async def publish_twice() -> list[int]:
        nc = await nats.connect(nats_server.url)
        js = nc.jetstream()
        await js.add_stream(StreamConfig(name="ORDERS", subjects=["orders.>"],
                                         duplicate_window=0.2))
        sequences = [(await js.publish("orders.a", b"\xc1 not an envelope",
                                       headers={"Nats-Msg-Id": "same-id"})).seq]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:   # once the window has passed, it is stored again
            ack = await js.publish("orders.a", b"\xc1 not an envelope",
                                   headers={"Nats-Msg-Id": "same-id"})
            if not ack.duplicate:
                sequences.append(ack.seq)
                break
            await asyncio.sleep(0.05)
        await nc.close()
        return sequences

    sequences = asyncio.run(publish_twice())
    assert len(sequences) == 2
    bus = make_bus(pool_size=1)
    bus.subscribe("orders.>", handlers.record, durable="orders")
    wait_for_stats(bus, "dead_lettered", 2)
    letters = stream_messages(nats_server.url, "ORDERS_DLQ")
    assert [int(m.headers["Actorbus-Stream-Sequence"]) for m in letters] == sequences
    assert {m.headers["Actorbus-Original-Msg-Id"] for m in letters} == {"same-id"}
    assert [m.headers["Nats-Msg-Id"] for m in letters] == \
        [f"actorbus-dead-letter-ORDERS-{seq}" for seq in sequences]


BAD_INPUTS = {
    "garbage": b"\xc1\x00garbage",
    "wrong shape": msgpack.packb([1, 2, 3]),
    "blank event id": msgpack.packb({"event_id": " ", "aggregate_id": "a", "event_type": "T",
                                     "event_version": 1, "timestamp": 0, "payload": b"x"}),
    "bad aggregate id": msgpack.packb({"event_id": "e", "aggregate_id": "no spaces!",
                                       "event_type": "T", "event_version": 1, "timestamp": 0,
                                       "payload": b"x"}),
    "oversize": Envelope.create("a", "T", b"x" * 2000).encode(),
    "JSON without payload": b'{"event_id":"e","aggregate_id":"a","event_type":"T",'
                            b'"event_version":1,"timestamp":"2026-12-01T11:00:40.965292879+08:00"}',
}


def test_bad_input_is_dead_lettered_at_once_with_its_reason(make_bus, records, nats_server, log_file):
    bus = make_bus(pool_size=2)
    bus.subscribe("orders.>", handlers.record, durable="orders", max_envelope_bytes=1000)
    bus.publish_envelope("orders.a", Envelope.create("a", "Happened", b"0"))
    for data in BAD_INPUTS.values():
        bus.publish("orders.a", data)
    bus.publish_envelope("orders.a", Envelope.create("a", "Happened", b"1"))

    stats = wait_for_stats(bus, "dead_lettered", len(BAD_INPUTS))
    stats = wait_for_stats(bus, "acked", 2)

    assert stats["invalid"] == len(BAD_INPUTS) and stats["processed"] == 2 and stats["failed"] == 0
    assert [r.data for r in read_records(records)] == ["0", "1"]
    # Dead letters may be stored in any order: put them back in publish order.
    letters = sorted(stream_messages(nats_server.url, "ORDERS_DLQ"),
                     key=lambda m: int(m.headers["Actorbus-Stream-Sequence"]))
    reasons = [m.headers["Actorbus-Error"] for m in letters]
    assert len(reasons) == len(BAD_INPUTS)
    assert [int(m.headers["Actorbus-Stream-Sequence"]) for m in letters] == [2, 3, 4, 5, 6, 7]
    assert "expected a msgpack map or a JSON object, got 9 bytes starting c1 00 67" in reasons[0]
    assert "expected a msgpack map or a JSON object, got 4 bytes starting 93 01 02 03" in reasons[1]
    assert "event_id: blank" in reasons[2]
    assert "aggregate_id" in reasons[3]
    assert "over the 1000-byte limit" in reasons[4]
    assert "invalid JSON envelope: payload: missing" in reasons[5]
    assert all(m.headers["Actorbus-Delivery-Count"] == "1"
               for m in stream_messages(nats_server.url, "ORDERS_DLQ"))
    log = wait_for(lambda: log_file.exists() and log_file.read_text().count("rejected message")
                   == len(BAD_INPUTS) and log_file.read_text(), what="one error line each")
    assert "dead-lettered to deadletter.ORDERS" in log


def test_forbidden_characters_in_an_id_header_make_the_message_keyless(make_bus, records):
    bus = make_bus(pool_size=2)
    bus.subscribe("metrics.>", handlers.record, envelope=False, durable="metrics")
    bus.publish("metrics.cpu", b"1", headers={"X-Aggregate-ID": "host 1; drop"})
    bus.publish("metrics.cpu", b"2", headers={"x-AGGREGATE-id": "host-2"})
    wait_for_stats(bus, "acked", 2)
    keys = {r.data: (r.aggregate_id, r.routing_key) for r in read_records(records)}
    assert keys["1"][0] == "-" and keys["1"][1].startswith("rr-")
    assert keys["2"] == ("host-2", "host-2")


def test_existing_stream_with_conflicting_settings_is_refused(make_bus, nats_server):
    bus = make_bus(pool_size=1)
    bus.subscribe("metrics.>", handlers.record, envelope=False, durable="metrics")  # memory
    with pytest.raises(BusError, match="stream METRICS exists with memory storage.*'file'"):
        bus.subscribe("metrics.>", handlers.record, envelope=False, durable="metrics-2",
                      storage="file")
    with pytest.raises(BusError, match=r"stream METRICS exists with subjects \['metrics.>'\].*'other.x'"):
        bus.subscribe("other.x", handlers.record, envelope=False, durable="other", stream="METRICS")
    with pytest.raises(BusError, match="already subscribed"):
        bus.subscribe("metrics.>", handlers.record, envelope=False, durable="metrics")


def test_a_durable_is_never_silently_refiltered(make_bus, nats_server):
    first = make_bus(pool_size=1)
    first.subscribe("bank.>", handlers.record, durable="x", stream="BANK")
    first.stop()

    second = make_bus(pool_size=1)
    with pytest.raises(BusError) as refused:
        second.subscribe("bank.withdrawals", handlers.record, durable="x", stream="BANK")

    message = str(refused.value)
    assert "'x'" in message and "'bank.>'" in message and "'bank.withdrawals'" in message
    assert "nats consumer rm BANK x" in message and "another durable name" in message
    config = consumer_info(nats_server.url, "BANK", "x").config
    assert config.filter_subject == "bank.>" and not config.filter_subjects


def test_publishing_an_envelope_twice_stores_it_once(make_bus, nats_server):
    bus = make_bus(pool_size=1)
    bus.subscribe("orders.>", handlers.record, durable="orders")
    envelope = Envelope.create("a", "Happened", b"0")
    first = bus.publish_envelope("orders.a", envelope)
    again = bus.publish_envelope("orders.a", envelope)
    results = bus.publish_many([("orders.a", envelope), ("orders.a", Envelope.create("a", "T", b"1"))])

    assert (first.ok, first.duplicate, first.stream) == (True, False, "ORDERS")
    assert (again.duplicate, again.seq, again.stream) == (True, first.sequence, "ORDERS")
    assert [r.duplicate for r in results] == [True, False] and all(r.ok for r in results)
    assert stream_info(nats_server.url, "ORDERS").state.messages == 2


def test_publish_tells_a_deduplicated_message_from_a_stored_one(make_bus):
    bus = make_bus(pool_size=1)
    bus.subscribe("metrics.>", handlers.record, envelope=False, durable="metrics")
    stored = bus.publish("metrics.cpu", b"1", headers={"Nats-Msg-Id": "m-1"})
    again = bus.publish("metrics.cpu", b"1", headers={"Nats-Msg-Id": "m-1"})
    many = bus.publish_many([("metrics.cpu", b"1", {"Nats-Msg-Id": "m-1"})])

    assert (stored.sequence, stored.duplicate, stored.stream) == (1, False, "METRICS")
    assert (again.sequence, again.duplicate, again.stream) == (1, True, "METRICS")
    assert (many[0].seq, many[0].duplicate, many[0].stream) == (1, True, "METRICS")
    assert type(stored) is type(many[0])


def test_publish_failures_are_clear(make_bus):
    bus = make_bus(pool_size=1)
    with pytest.raises(PublishError, match="publishing to 'nowhere.x' failed"):
        bus.publish("nowhere.x", b"1")
    results = bus.publish_many([("nowhere.y", b"1")])
    assert not results[0].ok and results[0].subject == "nowhere.y" and results[0].error
    with pytest.raises(TypeError, match="bytes or an Envelope"):
        bus.publish_many([("orders.a", "text")])


def test_stop_drains_in_flight_work_and_the_next_bus_gets_the_rest(make_bus, records, nats_server):
    total = 2000
    first = make_bus(pool_size=4, window=256)   # far fewer in flight than there are messages
    first.subscribe("orders.>", handlers.slow_record, durable="orders", ack_wait=2.0)
    publish_spread(first, total, keys=20)
    wait_for_stats(first, "processed", 300)

    first.stop(timeout=20)

    handled_by_first = Counter(r.data for r in read_records(records))
    assert 300 <= len(handled_by_first) < total
    # Everything the first bus handled was acked while draining, so the
    # second bus handles only the rest: no duplicates below.
    second = make_bus(pool_size=4)
    second.subscribe("orders.>", handlers.slow_record, durable="orders", ack_wait=2.0)
    wait_for(lambda: len({r.data for r in read_records(records)}) == total, timeout=120,
             what="every message handled once")
    handled = Counter(r.data for r in read_records(records))
    assert set(handled) == {str(n) for n in range(total)}
    assert [d for d, n in handled.items() if n > 1] == [], "a drained message was handled again"


def test_slow_handler_backpressure_keeps_memory_flat_and_loses_nothing(make_bus, nats_server):
    total = 100_000
    create_stream(nats_server.url, "METRICS", ["metrics.>"])
    window = 512
    bus = make_bus(pool_size=2, window=window)
    for start in range(0, total, 10_000):   # the whole backlog is there before consuming starts
        results = bus.publish_many([(f"metrics.h{n % 100}", str(n).encode(),
                                     {"X-Aggregate-ID": f"h{n % 100}"})
                                    for n in range(start, start + 10_000)])
        assert all(r.ok for r in results)
    pids = [pid for pid in bus.pids.values() if pid != os.getpid()]
    samples = []

    def done():
        stats = bus.stats()
        samples.append((stats["processed"], tree_rss_bytes(pids)))
        assert stats["in_flight"] <= window, stats  # the Bridge's window bounds what is in flight
        return stats["acked"] >= total and stats

    bus.subscribe("metrics.>", handlers.slow_count, envelope=False, durable="metrics",
                  max_ack_pending=2000)
    stats = wait_for(done, timeout=300, interval=0.25, what=f"{total} messages processed")

    assert stats["received"] == stats["processed"] == stats["acked"] == total  # count in == count out
    early = max(rss for processed, rss in samples if processed <= total // 4)
    late = max(rss for processed, rss in samples if processed >= total * 3 // 4)
    print(f"process-tree RSS over {total} messages: {early / 2**20:.1f} MiB at most in the first "
          f"quarter, {late / 2**20:.1f} MiB at most in the last ({len(samples)} samples)")
    assert late <= early * 1.15, (early, late)


def test_an_invalid_id_header_is_counted_and_warned_once_per_minute(make_bus, records, log_file):
    bus = make_bus(pool_size=2)
    bus.subscribe("metrics.>", handlers.record, envelope=False, durable="metrics")
    for n in range(3):
        bus.publish("metrics.cpu", str(n).encode(), headers={"X-Aggregate-ID": "host 1; drop"})
    bus.publish("metrics.cpu", b"ok", headers={"X-Aggregate-ID": "host-2"})
    bus.publish("metrics.cpu", b"none")

    stats = wait_for_stats(bus, "acked", 5)

    assert stats["invalid_keys"] == 3
    assert stats["subscriptions"]["metrics"]["counts"]["invalid_keys"] == 3
    warnings = wait_for(lambda: [line for line in log_file.read_text().splitlines()
                                 if "invalid aggregate id in header" in line],
                        what="the invalid-key warning")
    assert len(warnings) == 1, warnings
    assert "X-Aggregate-ID='host 1; drop'" in warnings[0]
    assert "metrics.cpu" in warnings[0] and "round-robin" in warnings[0]


def test_stop_returns_within_its_timeout_whatever_a_handler_does(make_bus, records):
    bus = make_bus(pool_size=2)
    bus.subscribe("orders.>", handlers.hold_until_released, durable="orders")
    bus.publish_envelope("orders.a", Envelope.create("a", "Stuck", b"0"))
    wait_for(lambda: [r for r in read_records(records) if r.kind == "started"],
             what="the handler to be stuck")
    actors = [pid for pid in bus.runtime.pids()]
    started = time.monotonic()
    bus.stop(timeout=1.0)
    took = time.monotonic() - started
    print(f"stop(1.0) with a stuck handler took {took:.2f}s")
    assert took < 1.0 + 2.0
    wait_for(lambda: not [pid for pid in actors if process_alive(pid)], timeout=5,
             what="every actor process ended")


def test_an_envelope_whose_header_names_another_aggregate_is_dead_lettered(make_bus, records,
                                                                           nats_server):
    # The Bridge routes by the header without decoding; the member that decodes it finds
    # the envelope is another aggregate's: never handled (it would break both keys' order).
    bus = make_bus(pool_size=2)
    bus.subscribe("orders.>", handlers.record, durable="orders")
    bus.publish("orders.a", Envelope.create("b", "Happened", b"0").encode(),
                headers={"X-Aggregate-ID": "a"})
    bus.publish_envelope("orders.a", Envelope.create("a", "Happened", b"1"))

    stats = wait_for_stats(bus, "dead_lettered", 1)
    stats = wait_for_stats(bus, "acked", 1)
    assert stats["invalid"] == 1 and stats["processed"] == 1 and stats["failed"] == 0
    assert [(r.aggregate_id, r.data) for r in read_records(records)] == [("a", "1")]
    (letter,) = stream_messages(nats_server.url, "ORDERS_DLQ")
    assert letter.headers["Actorbus-Error"] == (
        "invalid envelope: aggregate_id: 'b' differs from the key the message was routed by, "
        "'a' (its subject's last token on a partitioned stream, else its X-Aggregate-ID header)")
