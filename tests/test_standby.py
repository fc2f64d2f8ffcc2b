"""One durable, one active bus: a second bus is a hot standby, never a silent split of keys.

Every durable the bus creates has a priority group with the ``pinned_client``
policy: the server hands messages to one pinned bus only. Tests on real
nats-server and multiprocTCPBase buses (and, for a crash, a bus in a process
of its own that is SIGKILLed whole).
"""
from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from actorbus import Envelope
from actorbus.supervision import Backoff, OneForOne
from tests import handlers
from tests.bus_host import PIN_TIMEOUT
from tests.support import HostBus, publish_spread, read_records, wait_for
from tests.test_ordered_recovery import all_handled, order_report

pytestmark = pytest.mark.integration

#: Short enough that a failover is quick, twice the pull expiry as required.
PINNING = {"pin_timeout": PIN_TIMEOUT, "pull_expires": PIN_TIMEOUT / 4}


def member_pids(bus) -> set[int]:
    return {pid for name, pid in bus.pids.items() if name.startswith("member-")}


def publish(bus, start: int, count: int) -> None:
    results = bus.publish_many([(f"orders.{n % 3}", Envelope.create(f"acct-{n % 3}", "T",
                                                                     str(n).encode()))
                                for n in range(start, start + count)])
    assert all(r.ok for r in results)


def test_a_second_bus_on_the_durable_is_a_hot_standby_and_takes_over_on_a_clean_stop(make_bus,
                                                                                       records):
    first, second = make_bus(pool_size=2), make_bus(pool_size=2)
    for bus in (first, second):
        bus.subscribe("orders.>", handlers.record, durable="orders", **PINNING)
    publish(first, 0, 30)
    wait_for(lambda: len(read_records(records)) >= 30, what="the first 30 handled")
    handled_by = {r.pid for r in read_records(records)}
    active, standby = (first, second) if handled_by <= member_pids(first) else (second, first)
    assert handled_by <= member_pids(active), "both buses handled messages: the keys were split"
    assert active.stats()["pinned"] == 1 and standby.stats()["standby"] == 1
    assert standby.stats()["received"] == 0

    active.stop()   # drains, then unpins: the standby takes over without waiting for the timeout
    publish(standby, 30, 30)
    wait_for(lambda: len(read_records(records)) >= 60, what="the next 30 handled by the standby")
    later = read_records(records)[30:]
    assert {r.pid for r in later} <= member_pids(standby)
    assert sorted(int(r.data) for r in later) == list(range(30, 60))
    assert standby.stats()["pinned"] == 1


#: A pin that lapses quickly; the handlers' messages are not redelivered meanwhile.
QUICK_PIN = {"pin_timeout": 1.0, "pull_expires": 0.25, "ack_wait": 30.0}


def _held_by_active_with_standby(make_bus, records):
    """An active bus whose window (4) is full of handlers waiting for the release marker,
    12 envelopes over 3 keys published, and a standby on the same durable."""
    active = make_bus(pool_size=2, window=4)
    active.subscribe("orders.>", handlers.hold_until_released, durable="orders", **QUICK_PIN)
    publish(active, 0, 1)
    wait_for(lambda: read_records(records), what="the first message started")   # pinned
    standby = make_bus(pool_size=2, window=4)
    standby.subscribe("orders.>", handlers.hold_until_released, durable="orders", **QUICK_PIN)
    publish(active, 1, 11)
    wait_for(lambda: active.stats()["received"] >= 4, what="the active bus's window full")
    return active, standby


def _standby_idle_for(standby, seconds: float) -> None:
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        assert standby.stats()["received"] == 0, "the pin lapsed to the standby"
        time.sleep(0.1)


def _handled_in_order(records, count: int) -> list:
    wait_for(lambda: len([r for r in read_records(records) if r.kind == "ok"]) >= count,
             what=f"all {count} handled")
    done = [r for r in read_records(records) if r.kind == "ok"]
    assert sorted(int(r.data) for r in done) == list(range(count))
    for key in ("acct-0", "acct-1", "acct-2"):
        numbers = [int(r.data) for r in done if r.aggregate_id == key]
        assert numbers == sorted(numbers), (key, numbers)
    return done


def test_a_pinned_bus_busy_for_longer_than_pin_timeout_keeps_its_keys(make_bus, records):
    # No room in its window to ask for more: only its renewals keep the pin.
    active, standby = _held_by_active_with_standby(make_bus, records)
    _standby_idle_for(standby, 3 * QUICK_PIN["pin_timeout"])
    (records / handlers.RELEASE_MARKER).touch()

    done = _handled_in_order(records, 12)
    assert {r.pid for r in done} <= member_pids(active)
    assert standby.stats()["received"] == 0 and active.stats()["unpins"] == 0


def test_a_bus_draining_for_longer_than_pin_timeout_keeps_its_keys_until_it_unpins(make_bus,
                                                                                  records,
                                                                                  log_file):
    active, standby = _held_by_active_with_standby(make_bus, records)
    stopping = threading.Thread(target=active.stop, kwargs={"timeout": 30})
    stopping.start()
    try:
        try:
            wait_for(lambda: "draining " in log_file.read_text(), what="the drain under way")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; the log:\n{log_file.read_text()}") from None
        _standby_idle_for(standby, 3 * QUICK_PIN["pin_timeout"])
    finally:
        (records / handlers.RELEASE_MARKER).touch()
        stopping.join(60)
    assert not stopping.is_alive()

    done = _handled_in_order(records, 12)
    by_active = {int(r.data) for r in done if r.pid in member_pids(active)}
    assert len(by_active) == 4 and standby.stats()["received"] == 8   # the rest, after the unpin


def test_a_crashed_active_bus_fails_over_to_the_standby_in_order(make_bus, records, nats_server,
                                                                tmp_path):
    total, keys, first = 10_000, 100, 1000
    # A slow handler (2 ms): the host is still busy when it is killed.
    host = HostBus(nats_server.url, tmp_path / "host.pids", pin_timeout=PIN_TIMEOUT,
                   handler="slow_record")
    try:
        host_pids = set(host.wait_started())
        standby = make_bus(pool_size=2)
        # The host is pinned by the first messages it handles, before the standby pulls:
        # otherwise whichever pull request waits first at the first message gets the pin.
        publish_spread(standby, first, keys, per_key_sequence=True)
        wait_for(lambda: read_records(records), what="the host handling", interval=0.01)
        assert {r.pid for r in read_records(records)} <= host_pids
        standby.subscribe("orders.>", handlers.record, durable="orders", ack_wait=5.0, **PINNING)
        publish_spread(standby, total, keys, per_key_sequence=True, start=first)
        wait_for(lambda: len(read_records(records)) >= 2000, what="the active bus handling",
                 interval=0.01)
        assert standby.stats()["received"] == 0   # idle while the other is pinned
    finally:
        host.kill()

    wait_for(lambda: all_handled(records, total), timeout=120, what="every envelope handled")
    report, stats = order_report(records, total, keys), standby.stats()
    by_standby = sum(1 for r in read_records(records) if r.pid in member_pids(standby))
    print(f"active bus SIGKILLed, standby took over: {report}, recovered {stats['recovered']}, "
          f"handled by the standby {by_standby}")
    assert report["lost"] == 0 and report["violations"] == 0, report
    assert stats["pinned"] == 1 and stats["pins"] >= 1 and stats["recovered"] > 0
    assert by_standby and not host_pids & member_pids(standby)


def test_a_restarted_bridge_goes_on_under_its_predecessor_s_pin_without_waiting_for_it(make_bus,
                                                                                        records):
    # A new client would wait pin_timeout (60 s here) for the dead Bridge's pin to lapse.
    total, keys = 6000, 60
    bus = make_bus(pool_size=2, supervision=OneForOne(backoff=Backoff(initial=0.05, maximum=0.5)))
    # A slow handler (2 ms): the bus is still busy when its Bridge is killed.
    bus.subscribe("orders.>", handlers.slow_record, durable="orders", ack_wait=5.0,
                  pin_timeout=60.0)
    publish_spread(bus, total, keys, per_key_sequence=True)
    wait_for(lambda: len(read_records(records)) >= total // 4, what="handling under way",
             interval=0.01)
    os.kill(bus.pids["bridge"], signal.SIGKILL)

    wait_for(lambda: all_handled(records, total), timeout=30,
             what="every envelope handled well within pin_timeout")
    report, stats = order_report(records, total, keys), bus.stats()
    print(f"Bridge SIGKILLed, restarted under its pin: {report}, recovered {stats['recovered']}")
    assert report["lost"] == 0 and report["violations"] == 0, report
    assert stats["restarts_bridge"] == 1 and stats["pinned"] == 1 and stats["recovered"] > 0
