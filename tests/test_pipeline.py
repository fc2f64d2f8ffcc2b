"""The delivery contract end to end: multiprocTCPBase actors and a real nats-server."""
from __future__ import annotations

import time
from collections import Counter, defaultdict

import pytest

from actorbus import BusError, Envelope, EventBus
from actorbus.actors.handlers import HandlerError
from actorbus.ports import free_port
from tests import handlers
from tests.support import (consumer_info, create_stream, read_records, stream_info, wait_for, wait_for_stats)

pytestmark = pytest.mark.integration


def plain(value) -> str:
    """An enum from nats-py, or the plain value it sometimes gives instead."""
    return getattr(value, "value", value)


def publish_envelopes(bus: EventBus, subject_prefix: str, aggregates: int, per_aggregate: int) -> None:
    for seq in range(per_aggregate):
        for a in range(aggregates):
            bus.publish_envelope(f"{subject_prefix}.{a}",
                                 Envelope.create(f"agg-{a}", "Happened", str(seq).encode()))


def test_per_key_order_one_actor_per_aggregate(make_bus, records):
    bus = make_bus(pool_size=4)
    bus.subscribe("orders.>", handlers.record, durable="orders")
    publish_envelopes(bus, "orders", aggregates=50, per_aggregate=100)

    stats = wait_for_stats(bus, "acked", 5000)

    assert stats["processed"] == 5000 and stats["failed"] == 0
    seen = defaultdict(list)
    pids = defaultdict(set)
    for r in read_records(records):
        seen[r.aggregate_id].append(int(r.data))
        pids[r.aggregate_id].add(r.pid)
    assert len(seen) == 50
    for aggregate, seqs in seen.items():
        assert seqs == list(range(100)), f"{aggregate} handled out of order"
        assert len(pids[aggregate]) == 1, f"{aggregate} handled by several processes"
    aggregate_pids = {pid for name, pid in bus.pids.items() if name.startswith("member-")}
    assert set().union(*pids.values()) <= aggregate_pids


def test_keyless_messages_spread_round_robin(make_bus, records):
    pool, messages = 4, 402
    bus = make_bus(pool_size=pool)
    bus.subscribe("metrics.>", handlers.record, envelope=False, durable="metrics")
    for n in range(messages):
        bus.publish("metrics.cpu", str(n).encode())

    wait_for_stats(bus, "acked", messages)

    found = read_records(records)
    assert all(r.aggregate_id == "-" and r.routing_key.startswith("rr-") for r in found)
    per_actor = Counter(r.pid for r in found)
    assert len(per_actor) == pool
    assert all(abs(count - messages / pool) <= 1 for count in per_actor.values()), per_actor


def test_header_aggregate_id_routes_plain_messages(make_bus, records):
    bus = make_bus(pool_size=4)
    bus.subscribe("metrics.>", handlers.record, envelope=False, durable="metrics")
    for n in range(60):
        bus.publish("metrics.cpu", str(n).encode(), headers={"X-Aggregate-ID": f"host-{n % 3}"})

    wait_for_stats(bus, "acked", 60)

    by_host = defaultdict(list)
    for r in read_records(records):
        by_host[r.aggregate_id].append((int(r.data), r.pid))
    assert set(by_host) == {"host-0", "host-1", "host-2"}
    for host, handled in by_host.items():
        assert [n for n, _ in handled] == sorted(n for n, _ in handled)
        assert len({pid for _, pid in handled}) == 1


def test_ack_waits_for_the_handler_to_finish(make_bus, records, nats_server):
    bus = make_bus(pool_size=2)
    bus.subscribe("orders.>", handlers.hold_until_released, durable="orders")
    bus.publish_envelope("orders.a", Envelope.create("a", "Happened", b"0"))

    wait_for(lambda: [r for r in read_records(records) if r.kind == "started"], what="handler start")
    info = consumer_info(nats_server.url, "ORDERS", "orders")
    assert info.num_ack_pending == 1
    assert bus.stats()["acked"] == 0

    (records / handlers.RELEASE_MARKER).touch()
    wait_for_stats(bus, "acked", 1)
    wait_for(lambda: consumer_info(nats_server.url, "ORDERS", "orders").num_ack_pending == 0,
             what="the server to see the ack")


def test_a_slow_batch_is_acked_as_it_goes_not_at_its_end(make_bus, records, nats_server):
    # Stored before subscribing: the ten reach the key's member in one dispatch.
    create_stream(nats_server.url, "ORDERS", ["orders.>"], storage="file")
    bus = make_bus(pool_size=2)
    publish_envelopes(bus, "orders", aggregates=1, per_aggregate=10)
    bus.subscribe("orders.>", handlers.slow_tenths, durable="orders")
    started = time.monotonic()

    stats = wait_for_stats(bus, "acked", 1, timeout=30)
    first_ack = time.monotonic() - started

    # 0.3 s a message: acked after its own handler, not after the whole batch's 3 s.
    assert stats["in_flight"] >= 5, (first_ack, stats)
    assert first_ack < 1.5, first_ack
    stats = wait_for_stats(bus, "acked", 10, timeout=30)
    assert stats["processed"] == 10
    done = [int(r.data) for r in read_records(records)]
    assert done == list(range(10))


def test_envelope_failure_is_redelivered_until_it_succeeds(make_bus, records, log_file):
    bus = make_bus(pool_size=2)
    bus.subscribe("orders.>", handlers.fail_first_two_deliveries, durable="orders",
                  retries=0, nak_delay=0.05)
    bus.publish_envelope("orders.a", Envelope.create("a", "Happened", b"0"))

    stats = wait_for_stats(bus, "acked", 1)

    assert stats["naked"] == 2 and stats["processed"] == 1 and stats["failed"] == 2
    attempts = [(r.kind, r.delivery_count) for r in read_records(records)]
    assert attempts == [("fail", 1), ("fail", 2), ("ok", 3)]
    log = wait_for(lambda: log_file.exists() and log_file.read_text(), what="the warning log")
    assert log.count("Envelope message processing failed, will be redelivered: subject=orders.a") == 2
    assert "deliberate failure on delivery 1" in log


def test_in_place_retry_keeps_order_without_a_nak(make_bus, records):
    bus = make_bus(pool_size=2)
    bus.subscribe("orders.>", handlers.fail_first_attempt, durable="orders", retry_backoff=0.001)
    publish_envelopes(bus, "orders", aggregates=3, per_aggregate=20)

    stats = wait_for_stats(bus, "acked", 60)

    assert stats["naked"] == 0 and stats["retried"] == 60
    done = defaultdict(list)
    for r in read_records(records):
        if r.kind == "ok":
            assert r.attempt == 2 and r.delivery_count == 1
            done[r.aggregate_id].append(int(r.data))
    assert all(seqs == list(range(20)) for seqs in done.values()) and len(done) == 3


def test_plain_failure_is_acked_once_and_never_redelivered(make_bus, records, log_file, nats_server):
    bus = make_bus(pool_size=2)
    bus.subscribe("metrics.>", handlers.always_fail, envelope=False, durable="metrics",
                  retries=0, ack_wait=1.0)
    bus.publish("metrics.cpu", b"1")

    stats = wait_for_stats(bus, "acked", 1)

    assert stats["failed"] == 1 and stats["naked"] == 0
    info = wait_for(lambda: (lambda i: i if i.num_ack_pending == 0 else None)(
        consumer_info(nats_server.url, "METRICS", "metrics")), what="the ack on the server")
    # Acked at the server: JetStream will not redeliver it, ever.
    assert info.delivered.consumer_seq == 1 and info.ack_floor.consumer_seq == 1
    assert info.num_redelivered == 0
    assert [r.kind for r in read_records(records)] == ["fail"]
    log = wait_for(lambda: log_file.exists() and log_file.read_text(), what="the warning log")
    assert "Regular message processing failed, marking as processed: subject=metrics.cpu" in log


def test_plain_handler_runs_once_by_default_and_retries_only_when_asked(make_bus, records,
                                                                      log_file, nats_server):
    # No ``retries`` given: at-most-once means the handler runs exactly once.
    bus = make_bus(pool_size=2)
    bus.subscribe("metrics.>", handlers.always_fail, envelope=False, durable="metrics")
    bus.subscribe("jobs.>", handlers.always_fail, envelope=False, durable="jobs", retries=2,
                  retry_backoff=0.001)
    bus.publish("metrics.cpu", b"1")
    bus.publish("jobs.run", b"2")

    stats = wait_for_stats(bus, "acked", 2)

    assert stats["failed"] == 2 and stats["naked"] == 0 and stats["retried"] == 2
    wait_for(lambda: consumer_info(nats_server.url, "METRICS", "metrics").num_ack_pending == 0,
             what="the ack on the server")
    runs = Counter(r.subject for r in read_records(records))
    assert runs == {"metrics.cpu": 1, "jobs.run": 3}
    assert {r.attempt for r in read_records(records) if r.subject == "jobs.run"} == {1, 2, 3}
    log = wait_for(lambda: log_file.exists() and log_file.read_text().count(
        "Regular message processing failed, marking as processed") == 2 and log_file.read_text(),
        what="both warnings")
    assert "Regular message processing failed, marking as processed: subject=metrics.cpu" in log


def test_storage_type_follows_the_kind_unless_set(make_bus, nats_server):
    bus = make_bus(pool_size=1)
    bus.subscribe("orders.>", handlers.record, envelope=True, durable="orders")
    bus.subscribe("metrics.>", handlers.record, envelope=False, durable="metrics")
    bus.subscribe("audit.>", handlers.record, envelope=False, durable="audit", storage="file")

    storage = {name: plain(stream_info(nats_server.url, name).config.storage)
               for name in ("ORDERS", "METRICS", "AUDIT")}
    assert storage == {"ORDERS": "file", "METRICS": "memory", "AUDIT": "file"}


def test_consumer_settings_are_applied_to_the_durable(make_bus, nats_server):
    bus = make_bus(pool_size=1)
    bus.subscribe("orders.>", handlers.record, durable="orders-x", stream="ORDERS",
                  ack_wait=7.5, max_deliver=4, max_ack_pending=123)

    config = consumer_info(nats_server.url, "ORDERS", "orders-x").config
    assert (config.ack_wait, config.max_deliver, config.max_ack_pending) == (7.5, 4, 123)
    assert config.durable_name == "orders-x" and config.filter_subject == "orders.>"
    assert plain(config.ack_policy) == "explicit"


def test_pool_size_zero_processes_in_the_bridge_with_the_same_rules(make_bus, records):
    bus = make_bus(pool_size=0)
    assert set(bus.pids) == {"supervisor", "bridge"}
    bus.subscribe("orders.>", handlers.fail_first_two_deliveries, durable="orders",
                  retries=0, nak_delay=0.05)
    bus.subscribe("metrics.>", handlers.always_fail, envelope=False, durable="metrics", retries=0)
    bus.publish_envelope("orders.a", Envelope.create("a", "Happened", b"0"))
    bus.publish("metrics.cpu", b"1")

    stats = wait_for_stats(bus, "acked", 2)

    assert stats["naked"] == 2 and stats["processed"] == 1 and stats["failed"] == 3
    found = read_records(records)
    assert {r.pid for r in found} == {bus.pids["bridge"]}
    assert [r.delivery_count for r in found if r.subject == "orders.a"] == [1, 2, 3]
    assert [r.kind for r in found if r.subject == "metrics.cpu"] == ["fail"]


def test_stop_leaves_in_flight_work_unacked_for_the_next_bus(make_bus, records, nats_server):
    first = make_bus(pool_size=2)
    first.subscribe("orders.>", handlers.hold_until_released, durable="orders", ack_wait=2.0)
    first.publish_envelope("orders.a", Envelope.create("a", "Happened", b"0"))
    wait_for(lambda: [r for r in read_records(records) if r.kind == "started"], what="handler start")

    first.stop(timeout=5)

    info = consumer_info(nats_server.url, "ORDERS", "orders")
    assert info.num_ack_pending == 1 and info.ack_floor.stream_seq == 0
    second = make_bus(pool_size=2)
    second.subscribe("orders.>", handlers.record, durable="orders", ack_wait=2.0)
    wait_for_stats(second, "acked", 1)
    redelivered = [r for r in read_records(records) if r.kind == "ok"]
    assert [(r.data, r.delivery_count) for r in redelivered] == [("0", 2)]


def test_invalid_envelope_is_terminated_and_disturbs_nothing(make_bus, records, log_file, nats_server):
    bus = make_bus(pool_size=2)
    bus.subscribe("orders.>", handlers.record, durable="orders")
    bus.publish_envelope("orders.a", Envelope.create("a", "Happened", b"0"))
    bus.publish("orders.a", b"\x93garbage")
    bus.publish_envelope("orders.a", Envelope.create("a", "Happened", b"1"))

    stats = wait_for_stats(bus, "termed", 1)
    stats = wait_for_stats(bus, "acked", 2)

    assert stats["invalid"] == 1 and stats["processed"] == 2
    assert [r.data for r in read_records(records)] == ["0", "1"]
    log = wait_for(lambda: log_file.exists() and "rejected message" in log_file.read_text()
                   and log_file.read_text(), what="the error log")
    assert "rejected message on orders.a" in log and "invalid envelope" in log
    wait_for(lambda: consumer_info(nats_server.url, "ORDERS", "orders").num_ack_pending == 0,
             what="every message settled")


def test_async_handler_runs_in_order(make_bus, records):
    bus = make_bus(pool_size=2)
    bus.subscribe("orders.>", handlers.record_async, durable="orders")
    publish_envelopes(bus, "orders", aggregates=2, per_aggregate=30)
    wait_for_stats(bus, "acked", 60)
    seen = defaultdict(list)
    for r in read_records(records):
        seen[r.aggregate_id].append(int(r.data))
    assert all(seqs == list(range(30)) for seqs in seen.values()) and len(seen) == 2


def test_simple_runtime_runs_the_same_pipeline(make_bus, records):
    bus = make_bus(pool_size=3, runtime="simple")
    bus.subscribe("orders.>", handlers.fail_first_two_deliveries, durable="orders",
                  retries=0, nak_delay=0.05)
    bus.subscribe("metrics.>", handlers.record, envelope=False, durable="metrics")
    publish_envelopes(bus, "orders", aggregates=3, per_aggregate=2)
    for n in range(9):
        bus.publish("metrics.cpu", str(n).encode())

    stats = wait_for_stats(bus, "processed", 15)

    assert stats["naked"] == 12
    found = read_records(records)
    # Keyless messages take consecutive numbers of the process-wide counter
    # (which other tests in this process may have advanced already).
    slots = sorted(int(r.routing_key[3:]) for r in found if r.subject == "metrics.cpu")
    assert slots == list(range(slots[0], slots[0] + 9))


def test_lambda_and_closure_handlers_are_refused_at_subscribe(make_bus):
    bus = make_bus(pool_size=1)
    with pytest.raises(HandlerError, match="lambda or closure"):
        bus.subscribe("orders.>", lambda msg: None, durable="orders")

    def local_handler(msg):
        pass
    with pytest.raises(HandlerError, match="lambda or closure"):
        bus.subscribe("orders.>", local_handler, durable="orders")
    with pytest.raises(HandlerError, match="cannot import module"):
        bus.subscribe("orders.>", "no_such_module_here:handle", durable="orders")


def test_unreachable_server_is_a_clear_error(records):
    url = f"nats://127.0.0.1:{free_port()}"
    with pytest.raises(BusError, match=f"cannot connect to NATS at {url}: connection refused"):
        EventBus(servers=url, pool_size=1, connect_timeout=1.0)


def test_stateful_aggregates_keep_state_per_id_across_interleaving(make_bus, records):
    bus = make_bus(pool_size=2)
    bus.subscribe("orders.>", handlers.Counter, durable="orders")
    publish_envelopes(bus, "orders", aggregates=5, per_aggregate=8)   # ids interleave

    wait_for_stats(bus, "acked", 40)

    counts = defaultdict(list)
    for r in read_records(records):
        counts[r.aggregate_id].append(r.kind)
    # Counter keeps two instances per actor: ids come and go (passivate, then
    # __init__ restores the count), and every id still counts 1..8 on its own.
    assert counts == {f"agg-{a}": [f"count={n}" for n in range(1, 9)] for a in range(5)}


@pytest.mark.parametrize("pool_size", [2, 0])
def test_a_handler_the_pool_cannot_import_fails_subscribe(make_bus, tmp_path, monkeypatch,
                                                          nats_server, pool_size):
    bus = make_bus(pool_size=pool_size)
    # Only on the host's sys.path, and only after the actor processes started.
    # A name of its own per run: the actor processes fork from this one, and would
    # inherit a module an earlier run imported here.
    module = f"host_only_handlers_{pool_size}"
    host_only = tmp_path / "host_only"
    host_only.mkdir()
    (host_only / f"{module}.py").write_text("def handle(msg):\n    pass\n")
    monkeypatch.syspath_prepend(str(host_only))

    with pytest.raises(BusError) as refused:
        bus.subscribe("metrics.>", f"{module}:handle", envelope=False, durable="metrics")

    message = str(refused.value)
    assert f"{module}:handle" in message and f"No module named '{module}'" in message
    # Refused before anything was fetched: no consumer was made.
    with pytest.raises(Exception, match="consumer not found|stream not found"):
        consumer_info(nats_server.url, "METRICS", "metrics")
    assert bus.stats()["received"] == 0
