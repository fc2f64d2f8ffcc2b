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
