"""An elastic group's membership: a live member is never dropped on one bad read.

The unit tests feed the view and the membership directly; the integration
tests run a real nats-server, and the soak member processes of their own
(``tests.group_host``): it keeps three members busy beside CPU
burners for ``ACTORBUS_MEMBERSHIP_SOAK`` seconds (default 15, short enough for the
suite; set 60 or more for a longer look).
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from datetime import datetime, timezone
from typing import Any

import pytest
from nats.js.errors import BucketNotFoundError, NoKeysError
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from actorbus import Envelope
from actorbus.bridge import membership as membership_module
from actorbus.bridge.membership import ElasticMembership, MemberView
from actorbus.config import SubscriptionConfig
from actorbus.groups import ConsumerGroup, assign_partitions
from actorbus.processes import process_alive
from tests.support import GROUP_PARTITIONS, GroupHost, wait_for

#: Seconds the soak test runs its members under load.
SOAK_SECONDS = float(os.environ.get("ACTORBUS_MEMBERSHIP_SOAK", "15"))
#: Short heartbeats, so that the soak covers many of them (a member is gone after five missed).
SOAK_HEARTBEAT = 0.25
PARTITIONS = GROUP_PARTITIONS
#: Envelopes per second published while the members run: they are busy, not idle.
RATE = 600


# ---------------------------------------------------------------- the view, fed directly
def test_a_member_is_in_until_five_heartbeats_of_the_bucket_s_time_pass_without_one():
    view = MemberView("a", ttl=2.5, heartbeat=0.5)
    view.follow()
    for n in range(6):   # a and b beat every 0.5 s; c once, at 0.0
        view.update("a", None, 100.0 + n * 0.5)
        if n == 0:
            view.update("c", None, 100.0)
        if n in (0, 4):   # b's beats of 100.5 to 101.5 were missed: still in
            view.update("b", None, 100.0 + n * 0.5)
        assert view.members == ("a", "b", "c"), n
    view.update("a", None, 102.6)   # 2.6 s after c's only beat
    assert view.members == ("a", "b")


def test_a_deleted_or_purged_key_takes_its_member_out_at_once_and_a_beat_brings_it_back():
    view = MemberView("a", ttl=2.5, heartbeat=0.5)
    view.follow()
    for name in "abc":
        view.update(name, None, 100.0)
    view.update("b", KV_DEL, 100.1)
    view.update("c", KV_PURGE, 100.2)
    assert view.members == ("a",)
    view.update("c", None, 100.3)
    assert view.members == ("a", "c")


def test_this_member_is_always_in_its_own_view():
    view = MemberView("a", ttl=2.5, heartbeat=0.5)
    assert view.members == ("a",)
    view.update("b", None, 100.0)
    view.update("b", None, 103.0)
    view.update("a", KV_DEL, 103.1)
    assert view.members == ("a", "b")


def test_an_outage_counts_against_no_one_and_members_come_back_one_by_one():
    view = MemberView("a", ttl=2.5, heartbeat=0.5)
    view.follow()
    for name in "abc":
        view.update(name, None, 100.0)
    # Nothing stored for 10 s (the server restarted); then a beats every 0.5 s from 110.0,
    # b comes back at 111.6 and c at 112.4: 12 s after their last beats, both are kept.
    for n in range(6):
        view.update("a", None, 110.0 + n * 0.5)
        assert view.members == ("a", "b", "c"), n
    view.update("b", None, 111.6)
    view.update("c", None, 112.4)
    assert view.members == ("a", "b", "c")
    # Then c stops: gone 2.5 s after its last beat, in the bucket's time.
    for n in range(4):
        view.update("a", None, 113.0 + n * 0.5)
        view.update("b", None, 113.0 + n * 0.5)
    assert view.members == ("a", "b", "c")
    view.update("a", None, 115.0)
    assert view.members == ("a", "b")


def test_the_first_replay_s_gaps_are_ages_not_an_outage():
    # A watch starts with each key's last update: c's, 2.4 s old, is not news of an outage.
    view = MemberView("a", ttl=2.5, heartbeat=0.5)
    view.update("c", None, 100.0)
    view.update("b", None, 102.2)
    view.update("a", None, 102.4)
    view.follow()
    assert view.members == ("a", "b", "c")
    view.update("b", None, 102.6)
    assert view.members == ("a", "b")


# ---------------------------------------------------------------- the membership, on a fake bucket
class FakeWatcher:
    """nats-py's KeyWatcher as the membership reads it: ``updates(timeout)``, ``stop()``."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue = asyncio.Queue()
        self.lost = False   # its consumer gone: it shows nothing more
        self.stopped = False

    async def updates(self, timeout: float = 5.0) -> Any:
        try:
            return await asyncio.wait_for(self.queue.get(), timeout)
        except asyncio.TimeoutError:
            raise TimeoutError from None

    async def stop(self) -> None:
        self.stopped = True
        self.queue.put_nowait(KeyValue.KeyWatcher.STOP_ITER)


class FakeBucket:
    """An elastic group's KV bucket in memory, with the reads that went wrong under load:
    every ``short_every``-th listing leaves out member ``b``, and every ``miss_every``-th of
    ``b``'s updates never reaches a watch."""

    def __init__(self, ttl: float, short_every: int = 0, miss_every: int = 0) -> None:
        self.ttl = ttl
        self.keys_now: dict[str, int] = {}
        self.revision = 0
        self.watchers: list[FakeWatcher] = []
        self.listings = self.short_listings = self.watches = 0
        self.can_watch = True
        self._short_every, self._miss_every, self._b_updates = short_every, miss_every, 0

    # nats-py's JetStreamContext, as far as the membership uses it
    async def key_value(self, bucket: str) -> "FakeBucket":
        if not self.revision:
            raise BucketNotFoundError
        return self

    async def create_key_value(self, **config: Any) -> "FakeBucket":
        return self

    async def status(self) -> Any:
        return type("Status", (), {"ttl": self.ttl})()

    async def put(self, key: str, value: bytes) -> int:
        return self._store(key, None)

    async def delete(self, key: str) -> bool:
        self._store(key, KV_DEL)
        return True

    async def keys(self) -> list[str]:
        self.listings += 1
        keys = list(self.keys_now)
        if self._short_every and self.listings % self._short_every == 0:
            keys = [key for key in keys if not key.endswith(".b")]
            self.short_listings += 1
        if not keys:
            raise NoKeysError
        return keys

    async def watch(self, keys: str, **options: Any) -> FakeWatcher:
        if not self.can_watch:
            raise TimeoutError("nats: timeout")
        self.watches += 1
        watcher = FakeWatcher()
        for key, revision in sorted(self.keys_now.items(), key=lambda kv: kv[1]):
            watcher.queue.put_nowait(self._entry(key, revision, None))
        self.watchers.append(watcher)
        return watcher

    def _store(self, key: str, operation: str | None) -> int:
        self.revision += 1
        if operation is None:
            self.keys_now[key] = self.revision
        else:
            self.keys_now.pop(key, None)
        missed = False
        if key.endswith(".b"):
            self._b_updates += 1
            missed = bool(self._miss_every) and self._b_updates % self._miss_every == 0
        for watcher in self.watchers:
            if not (missed or watcher.lost or watcher.stopped):
                watcher.queue.put_nowait(self._entry(key, self.revision, operation))
        return self.revision

    def _entry(self, key: str, revision: int, operation: str | None) -> Any:
        return KeyValue.Entry(bucket="actorbus-group-billing", key=key, value=b"",
                              revision=revision, delta=0, created=datetime.now(timezone.utc),
                              operation=operation)


async def _beating(bucket: FakeBucket, names: str, heartbeat: float) -> None:
    while True:
        for name in names:
            await bucket.put(f"ORDERS.{name}", b"{}")
        await asyncio.sleep(heartbeat)


async def _membership_of_a(bucket: FakeBucket, heartbeat: float) -> tuple[ElasticMembership, list]:
    shares: list[tuple[int, ...]] = []

    async def on_change(owned: tuple[int, ...]) -> None:
        shares.append(owned)
    sub = SubscriptionConfig("orders.*", "tests.handlers:record", stream="ORDERS", partitions=12)
    membership = ElasticMembership(bucket, sub, ConsumerGroup("billing", 12, member="a",
                                                              heartbeat=heartbeat), on_change)
    await membership.join()
    return membership, shares


def test_short_listings_and_missed_updates_under_load_drop_no_live_member():
    # What a loaded machine did to the old membership: now and then a listing of the keys
    # left a live member out, and it gave that member's partitions to the others for a
    # moment. b's updates also go missing now and then: short of five in a row, b stays.
    heartbeat = 0.05

    async def main() -> tuple[ElasticMembership, list, set, FakeBucket]:
        bucket = FakeBucket(ttl=5 * heartbeat, short_every=4, miss_every=2)
        beating = asyncio.create_task(_beating(bucket, "bc", heartbeat))
        await asyncio.sleep(heartbeat)
        membership, shares = await _membership_of_a(bucket, heartbeat)
        views = set()
        for _ in range(200):   # 40 heartbeats
            views.add(membership.members)
            await asyncio.sleep(heartbeat / 5)
        beating.cancel()
        await membership.leave()
        return membership, shares, views, bucket

    membership, shares, views, bucket = asyncio.run(main())
    assert views == {("a", "b", "c")}
    assert shares == [assign_partitions("abc", 12)["a"]] and membership.rebalances == 0
    assert bucket.keys_now == {"ORDERS.b": bucket.keys_now["ORDERS.b"],
                               "ORDERS.c": bucket.keys_now["ORDERS.c"]}   # a left


def test_a_lost_watch_is_made_anew_and_the_members_are_kept_meanwhile(monkeypatch):
    heartbeat = 0.05
    monkeypatch.setattr(membership_module, "WATCH_LAG", 0.3)

    async def main() -> tuple[list, list, list, FakeBucket]:
        bucket = FakeBucket(ttl=5 * heartbeat)
        beating = asyncio.create_task(_beating(bucket, "bc", heartbeat))
        await asyncio.sleep(heartbeat)
        membership, shares = await _membership_of_a(bucket, heartbeat)
        bucket.can_watch = False       # the server restarts: its consumer is gone, and
        bucket.watchers[0].lost = True   # no new one can be made for a while
        views = []
        for _ in range(50):   # 0.5 s: past the watch's lag, past member_ttl
            views.append(membership.members)
            await asyncio.sleep(0.01)
        bucket.can_watch = True
        wait = asyncio.get_running_loop().time() + 5
        while bucket.watches < 2 and asyncio.get_running_loop().time() < wait:
            await asyncio.sleep(0.01)
        joiner = asyncio.create_task(_beating(bucket, "d", heartbeat))
        while membership.members != ("a", "b", "c", "d") and asyncio.get_running_loop().time() < wait:
            views.append(membership.members)
            await asyncio.sleep(0.01)
        views.append(membership.members)
        beating.cancel()
        joiner.cancel()
        await membership.leave()
        return views, shares, [w.stopped for w in bucket.watchers], bucket

    views, shares, stopped, bucket = asyncio.run(main())
    assert set(views[:-1]) == {("a", "b", "c")} and views[-1] == ("a", "b", "c", "d")
    assert bucket.watches == 2 and stopped == [True, True]
    assert shares == [assign_partitions("abc", 12)["a"], assign_partitions("abcd", 12)["a"]]


@contextlib.contextmanager
def cpu_burners(count: int):
    """``count`` busy-looping processes for the duration; SIGKILLed by pid afterwards."""
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        yield [burner.pid for burner in burners]
    finally:
        for burner in burners:
            with contextlib.suppress(ProcessLookupError):
                os.kill(burner.pid, signal.SIGKILL)
            burner.wait(10)
        assert not [b.pid for b in burners if process_alive(b.pid)]


class PacedPublisher:
    """Publishes ``rate`` envelopes a second over 500 keys from a thread, until stopped."""

    def __init__(self, bus, rate: int) -> None:
        self.published = 0
        self.failure: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(bus, rate), daemon=True)
        self._thread.start()

    def _run(self, bus, rate: int) -> None:
        batch = rate // 10
        try:
            next_at = time.monotonic()
            while not self._stop.is_set():
                results = bus.publish_many(
                    [("orders.{aggregate_id}",
                      Envelope.create(f"agg-{n % 500}", "T", str(n).encode()))
                     for n in range(self.published, self.published + batch)], in_flight=batch)
                assert all(r.ok for r in results), [r for r in results if not r.ok][:3]
                self.published += batch
                next_at += 0.1
                self._stop.wait(max(0.0, next_at - time.monotonic()))
        except BaseException as exc:  # noqa: B036 - re-raised by the test in stop()
            self.failure = exc

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
        assert not self._thread.is_alive(), "publishing did not stop"
        if self.failure is not None:
            raise self.failure


@pytest.fixture
def members(group_hosts):
    """Start elastic members of group ``billing`` with ``start(name, heartbeat)``; every one is
    gone after the test, by pid."""
    return lambda name, heartbeat: group_hosts(name, heartbeat=heartbeat)


def views(hosts: list[GroupHost]) -> list[dict]:
    """Each member's group stats now ({} for one that has written none yet)."""
    return [host.stats() for host in hosts]


@pytest.mark.integration
@pytest.mark.timeout(SOAK_SECONDS + 240)
def test_three_busy_members_beside_cpu_burners_always_see_all_three_and_never_rebalance(
        members, make_bus):
    hosts = [members(name, SOAK_HEARTBEAT) for name in ("a", "b", "c")]
    wait_for(lambda: all(s.get("group_members") == 3 and s.get("partitions_owned") == 4
                         for s in views(hosts)), timeout=60, what="three members, four partitions each")
    before = {host.member: host.stats()["rebalances"] for host in hosts}
    seen: Counter = Counter()   # (member, members it saw, partitions it owned) per sample
    samples = 0
    publisher = PacedPublisher(make_bus(pool_size=0), RATE)
    try:
        with cpu_burners(2):
            deadline = time.monotonic() + SOAK_SECONDS
            while time.monotonic() < deadline:
                for host, stats in zip(hosts, views(hosts), strict=True):
                    seen[(host.member, stats["group_members"], stats["partitions_owned"])] += 1
                samples += 1
                time.sleep(0.05)
    finally:
        publisher.stop()
    after = {host.member: host.stats()["rebalances"] for host in hosts}
    handled = sum(host.stats()["processed"] for host in hosts)
    print(f"{SOAK_SECONDS:g} s beside 2 CPU burners, heartbeat {SOAK_HEARTBEAT} s "
          f"({SOAK_SECONDS / SOAK_HEARTBEAT:.0f} heartbeats), {publisher.published} envelopes "
          f"published, {handled} handled: {samples} samples of (member, members seen, partitions "
          f"owned) {dict(seen)}; rebalances before {before}, after {after}")
    assert {(member, count, owned) for member, count, owned in seen} == \
        {("a", 3, 4), ("b", 3, 4), ("c", 3, 4)}, dict(seen)
    # The joins before the soak were rebalances (a alone, then a and b): none since.
    assert after == before, {m: after[m] - before[m] for m in after}


@pytest.mark.integration
def test_members_keep_each_other_through_a_nats_server_restart_and_then_see_a_newcomer(
        make_bus, nats_server, log_file):
    # The server is down longer than member_ttl (2.5 s): every key would have aged out on
    # the way, and each watch's consumer is gone with the server.
    def member(name: str):
        bus = make_bus(pool_size=1, group="billing", partitions=PARTITIONS, member=name,
                       heartbeat=0.5)
        bus.subscribe("orders.*", "tests.handlers:record", stream="ORDERS")
        return bus

    buses = [member("a"), member("b")]
    wait_for(lambda: all(b.stats()["partitions_owned"] == 6 for b in buses),
             what="a and b with six partitions each")
    seen: Counter = Counter()
    stop = threading.Event()

    def watch_views() -> None:
        while not stop.is_set():
            for name, bus in zip("ab", buses, strict=True):
                stats = bus.stats()
                seen[(name, stats["group_members"], stats["partitions_owned"],
                      stats["rebalances"])] += 1
            stop.wait(0.05)
    watcher = threading.Thread(target=watch_views, daemon=True)
    watcher.start()
    try:
        nats_server.kill()
        time.sleep(4.0)   # the outage itself: nothing to poll for while the server is down
        nats_server.start()   # same port, same store
        # Sampled until both have made their watch anew and read the news since the outage.
        wait_for(lambda: all(f"not shown member {name}'s heartbeat" in log_file.read_text()
                             for name in "ab"), timeout=30, what="a and b watching anew")
        wait_for(lambda: log_file.read_text().count("every member's 2.5s start again") >= 2,
                 timeout=30, what="a and b reading the outage in their new watches")
    finally:
        stop.set()
        watcher.join(10)
    print(f"through a 4 s nats-server outage: (member, members seen, partitions owned, "
          f"rebalances) {dict(seen)}")
    # b's joining was a's one rebalance, before the outage: none since.
    assert set(seen) == {("a", 2, 6, 1), ("b", 2, 6, 0)}, dict(seen)

    buses.append(member("c"))   # the watches made anew show a newcomer
    wait_for(lambda: all(b.stats()["group_members"] == 3 and b.stats()["partitions_owned"] == 4
                         for b in buses), timeout=30, what="a, b and c with four partitions each")
