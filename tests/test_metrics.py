"""Prometheus metrics, scraped over HTTP while a bus runs on several actor processes."""
from __future__ import annotations

import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from actorbus import Envelope
from actorbus.ports import free_port
from tests import handlers
from tests.support import read_records, wait_for_stats

pytestmark = pytest.mark.integration


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def test_metrics_count_the_work_of_every_actor_process(make_bus, records):
    port = free_port()
    bus = make_bus(pool_size=2, metrics_port=port)
    bus.subscribe("orders.>", handlers.record, durable="orders")
    bus.subscribe("metrics.>", handlers.always_fail, envelope=False, durable="metrics", retries=0)
    for n in range(40):
        bus.publish_envelope(f"orders.{n % 8}", Envelope.create(f"agg-{n % 8}", "T", str(n).encode()))
    for n in range(6):
        bus.publish("metrics.cpu", str(n).encode())
    wait_for_stats(bus, "acked", 46)

    samples = scrape(port)

    assert len({r.pid for r in read_records(records) if r.kind == "ok"}) == 2  # both members worked
    orders = (("kind", "envelope"), ("subscription", "orders"))
    plain = (("kind", "plain"), ("subscription", "metrics"))
    assert samples[("actorbus_messages_processed_total", orders)] == 40
    assert samples[("actorbus_messages_failed_total", plain)] == 6
    assert samples[("actorbus_messages_received_total", orders)] == 40
    assert samples[("actorbus_messages_acked_total", ())] == 46
    assert samples[("actorbus_restarts_total", (("level", "pool"),))] == 0
    assert samples[("actorbus_in_flight_messages", ())] == 0
    assert samples[("actorbus_handler_duration_seconds_count", (("subscription", "orders"),))] == 40
    assert samples[("actorbus_handler_duration_seconds_bucket",
                    (("le", "+Inf"), ("subscription", "orders")))] == 40
    assert ("actorbus_actor_queue_depth", (("member", "1"),)) in samples


def test_a_metrics_port_in_use_is_named_with_the_option_that_sets_it(make_bus):
    import socket

    from actorbus.metrics import MetricsPortInUse
    from actorbus.ports import free_port
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        with pytest.raises(MetricsPortInUse, match=rf"metrics port 127.0.0.1:{port} is in use.*"
                                                   r"metrics_port=.*--metrics-port"):
            make_bus(pool_size=1, metrics_port=port)


def test_a_group_member_s_metrics_say_what_it_owns_and_how_often_that_changed(make_bus, records):
    port = free_port()
    bus = make_bus(pool_size=1, metrics_port=port, group="billing", partitions=6, member="solo")
    bus.subscribe("orders.*", handlers.record, stream="ORDERS")
    bus.publish_envelope("orders.{aggregate_id}", Envelope.create("acct-1", "T", b"1"))
    wait_for_stats(bus, "processed", 1)
    samples = scrape(port)
    assert samples[("actorbus_group_partitions_owned", ())] == 6
    assert samples[("actorbus_group_members", ())] == 1
    assert samples[("actorbus_group_rebalances_total", ())] == 0
    assert samples[("actorbus_consumers_pinned", ())] == 1    # acct-1's partition's durable
    assert samples[("actorbus_consumers_standby", ())] == 5   # pinned only once a message comes


def probe(port: int, path: str) -> tuple[int, dict]:
    """GET a probe: its status code and JSON body (also for a 503)."""
    import json
    import urllib.error
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_probes_follow_the_bus_through_start_an_outage_and_a_drain(make_bus, records,
                                                                   nats_server):
    import threading

    from tests.support import wait_for
    port = free_port()
    bus = make_bus(pool_size=1, metrics_port=port)
    # Up, not subscribed yet: alive, not ready.
    assert probe(port, "/healthz")[0] == 200
    code, body = probe(port, "/readyz")
    assert code == 503 and body["reasons"] == ["no subscription yet"]
    bus.subscribe("orders.>", handlers.hold_until_released, durable="orders")
    code, body = probe(port, "/readyz")
    assert code == 200 and body["status"] == "ok" and body["subscriptions"] == ["orders"]

    # The NATS connection lost: alive (it reconnects by itself), not ready until it has.
    nats_server.stop()
    wait_for(lambda: probe(port, "/readyz")[0] == 503, what="not ready without NATS")
    code, body = probe(port, "/readyz")
    assert "Bridge(s) not connected to NATS" in " ".join(body["reasons"]), body
    assert probe(port, "/healthz")[0] == 200
    nats_server.start()   # same port, same store
    wait_for(lambda: probe(port, "/readyz")[0] == 200, timeout=30, what="ready again")

    # Draining: not ready (so traffic moves on), still alive, until the drain is over.
    bus.publish_envelope("orders.a", Envelope.create("a", "T", b"1"))
    wait_for(lambda: [r for r in read_records(records) if r.kind == "started"],
             what="the handler to start")
    stopping = threading.Thread(target=bus.stop, kwargs={"timeout": 30})
    stopping.start()
    try:
        wait_for(lambda: probe(port, "/readyz") == (503, {"status": "draining",
                                                           "reasons": ["draining"]}),
                 what="not ready while draining")
        assert probe(port, "/healthz") == (200, {"status": "draining", "reasons": ["draining"]})
    finally:
        (records / handlers.RELEASE_MARKER).touch()
        stopping.join(40)
    assert not stopping.is_alive()
    assert [r.kind for r in read_records(records)] == ["started", "ok"]


def test_a_killed_member_makes_the_bus_unready_until_it_is_back(make_bus):
    import os
    import signal

    from actorbus.supervision import Backoff, OneForOne
    from tests.support import wait_for
    port = free_port()
    # A second's backoff: long enough to see the member down.
    bus = make_bus(pool_size=2, metrics_port=port, supervision=OneForOne(
        max_restarts=5, within=60.0, backoff=Backoff(initial=1.0, maximum=1.0, jitter=0.0)))
    bus.subscribe("orders.>", handlers.record, durable="orders")
    assert probe(port, "/readyz")[0] == 200
    os.kill(bus.pids["member-1"], signal.SIGKILL)
    wait_for(lambda: probe(port, "/readyz")[0] == 503, what="not ready with a member down")
    code, body = probe(port, "/readyz")
    assert body["reasons"] == ["not running: member-1 (restarting)"], body
    assert probe(port, "/healthz")[0] == 200   # supervision brings it back: alive
    wait_for(lambda: probe(port, "/readyz")[0] == 200, timeout=30, what="ready again")


def test_lag_follows_a_stalled_consumer_and_its_recovery(make_bus, records, monkeypatch):
    from actorbus.bridge import lag as lag_module
    from tests.support import wait_for
    # Read every half second here (the Bridge, forked from this process, inherits it).
    monkeypatch.setattr(lag_module, "LAG_INTERVAL", 0.5)
    port = free_port()
    bus = make_bus(pool_size=1, metrics_port=port)
    bus.subscribe("orders.>", handlers.hold_until_released, durable="orders")
    for n in range(20):   # one key: the first is handled (held), the rest wait behind it
        bus.publish_envelope("orders.a", Envelope.create("a", "T", str(n).encode()))

    def lag() -> dict:
        return bus.stats()["lag"].get("orders", {})

    wait_for(lambda: lag().get("ack_pending") == 20, what="20 messages awaiting an ack")
    first = lag()
    assert first["pending"] == 0 and first["redelivered"] == 0
    # Stalled: the oldest un-acked message only gets older, reading after reading.
    wait_for(lambda: lag()["read_at"] > first["read_at"] + 1.0, what="a later reading")
    later = lag()
    assert later["oldest_unacked_seconds"] >= first["oldest_unacked_seconds"] + 1.0
    samples = scrape(port)
    assert samples[("actorbus_consumer_ack_pending_messages", (("durable", "orders"),))] == 20
    assert samples[("actorbus_consumer_oldest_unacked_seconds", (("durable", "orders"),))] >= 1.0

    (records / handlers.RELEASE_MARKER).touch()
    wait_for(lambda: lag().get("ack_pending") == 0, what="everything acked")
    assert lag()["oldest_unacked_seconds"] == 0
