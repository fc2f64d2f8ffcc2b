"""A consumer group's membership in KV buckets: the static member list, the elastic heartbeats.

Runs on the Bridge's NATS loop thread. A static group's member list is
written once, as orbit.go's ``pcgroups`` writes it, and checked by every
member after. An elastic member keeps its key fresh and follows every
update of its group's keys through a KV watch: a member is in from its
first heartbeat until its key is deleted (a clean leave) or purged, or
until the bucket's own clock has run ``member_ttl`` past its last
heartbeat, when the bucket's max age ends the key too. Each member
spreads the partitions over the members it follows with the same
arithmetic, so all of them come to the same answer without talking to
each other. Nothing is judged on one listing of the keys: a listing
taken under load can come back short, and one short listing moved
partitions for nothing.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from datetime import datetime
from typing import Any
from collections.abc import Awaitable, Callable

from nats.js.errors import (BucketNotFoundError, KeyDeletedError, KeyNotFoundError,
                            KeyWrongLastSequenceError)
from nats.js.kv import KV_DEL, KV_PURGE, StopIterSentinel

from actorbus.config import SubscriptionConfig
from actorbus.errors import ConfigurationError
from actorbus.groups import STATIC_BUCKET, ConsumerGroup, assign_partitions

log = logging.getLogger("actorbus.bridge")


async def ensure_static_group(js: Any, sub: SubscriptionConfig, group: ConsumerGroup) -> None:
    """Write the group's configuration under ``<stream>.<group>`` in ``static-consumer-groups``
    if it is not there; refuse one that says otherwise (every member must agree)."""
    try:
        kv = await js.key_value(STATIC_BUCKET)
    except BucketNotFoundError:
        kv = await js.create_key_value(bucket=STATIC_BUCKET, replicas=sub.replicas)
    key = f"{sub.stream}.{group.name}"
    members = list(group.members or ())
    wanted = {"max_members": group.partitions, "filters": [sub.subject], "members": members}
    try:
        entry = await kv.get(key)
    except (KeyNotFoundError, KeyDeletedError):
        entry = None
    if entry is None or entry.value is None:
        try:
            await kv.create(key, json.dumps(wanted).encode())
            log.info("created static consumer group %s on stream %s: %d partitions over %s",
                     group.name, sub.stream, group.partitions, ", ".join(members))
            return
        except KeyWrongLastSequenceError:   # another member wrote it first: check what it wrote
            entry = await kv.get(key)
    try:
        stored = json.loads(entry.value)
    except ValueError:
        raise ConfigurationError(f"static consumer group {key} in bucket {STATIC_BUCKET} is not "
                                 "JSON; delete that key") from None
    same = (stored.get("max_members") == group.partitions
            and sorted(stored.get("members") or []) == sorted(members)
            and (stored.get("filters") or [">"]) in (wanted["filters"], [">"]))
    if not same:
        raise ConfigurationError(
            f"static consumer group {key} exists with {stored.get('max_members')} partitions and "
            f"members {stored.get('members')}, not {group.partitions} and {members}; "
            f"a static group is fixed: delete its key in bucket {STATIC_BUCKET} (and its "
            "durables) to change it, or use an elastic group")


#: Heartbeats without any update of the group's keys after which the silence is taken as an
#: outage (the server, or every member, away): nobody could beat then, so it counts against no one.
OUTAGE_HEARTBEATS = 2
#: Seconds (and at least this many heartbeats, below) this member's stored heartbeat may take to
#: come back through its watch before the watch is taken as lost, its consumer gone with a server
#: restart, and is made anew.
WATCH_LAG = 2.0
WATCH_LAG_HEARTBEATS = 2
#: Seconds ``join`` waits for the watch to show this member's first heartbeat.
JOIN_TIMEOUT = 5.0
#: Seconds the server keeps a watch's consumer that nobody subscribes to: one given up is gone soon.
WATCH_INACTIVE = 30.0


class MemberView:
    """The live members of an elastic group, from the stored updates of their keys, in order.

    No I/O: a KV watch feeds it every update (:meth:`update`). Ages are read
    on the bucket's own clock, the stream timestamps of the updates, as the
    bucket's max age reads them: a member whose heartbeats this bus reads
    late (its own process busy, its watch behind) has not aged meanwhile. A
    member is in from a heartbeat until its key is deleted or purged, or
    until the clock has run ``ttl`` past its last heartbeat. This member is
    always in (its own heartbeat may be on its way).
    """

    def __init__(self, member: str, ttl: float, heartbeat: float) -> None:
        self.member = member
        self.ttl = ttl
        self._outage = OUTAGE_HEARTBEATS * heartbeat
        self._last: dict[str, float] = {}
        self._clock: float | None = None
        self._following = False

    def follow(self) -> None:
        """From now on the updates are the bucket's current ones, not the first replay of each
        key's last update (whose gaps are keys' ages, not silences)."""
        self._following = True

    def update(self, member: str, operation: str | None, at: float) -> None:
        """One stored update of ``member``'s key: a heartbeat (``operation`` None) or a delete
        or purge (``"DEL"``, ``"PURGE"``), stored at ``at`` (seconds, the server's clock)."""
        if self._following and self._clock is not None and at - self._clock > self._outage:
            # Nothing stored for that long: the server or every member was away, and nobody
            # could beat meanwhile. Every member's count starts again now, since they come
            # back one by one as they reconnect.
            log.info("no update of the group's keys for %.1fs (an outage, or a gap in this "
                     "member's watch): every member's %gs start again", at - self._clock, self.ttl)
            for name in self._last:
                self._last[name] = max(self._last[name], at)
        if self._clock is None or at > self._clock:
            self._clock = at
        if operation in (KV_DEL, KV_PURGE):
            self._last.pop(member, None)
        else:
            self._last[member] = max(at, self._last.get(member, at))
        for name, last in list(self._last.items()):
            if self._clock - last > self.ttl:
                del self._last[name]

    @property
    def members(self) -> tuple[str, ...]:
        """The members now, sorted."""
        return tuple(sorted({*self._last, self.member}))


class ElasticMembership:
    """One bus's membership of an elastic group on one stream.

    ``on_change`` gets the partitions this bus owns whenever they change
    (the first time included), one call at a time.
    """

    def __init__(self, js: Any, sub: SubscriptionConfig, group: ConsumerGroup,
                 on_change: Callable[[tuple[int, ...]], Awaitable[None]]) -> None:
        self._js = js
        self._group = group
        self._prefix = f"{sub.stream}."
        self._key = f"{sub.stream}.{group.member}"
        self._replicas = sub.replicas
        self._on_change = on_change
        self._kv: Any = None
        self._tasks: list[asyncio.Task[None]] = []
        self._view = MemberView(group.member, group.member_ttl, group.heartbeat)
        self._changed = asyncio.Event()
        self._joined = asyncio.Event()
        self._first_beat: int | None = None   # the revision of this member's first heartbeat
        self._own_seen = 0                    # the latest revision of its key the watch showed
        self._unseen: tuple[int, float] | None = None   # a stored heartbeat not shown yet, and when
        self._watch_lag = max(WATCH_LAG, WATCH_LAG_HEARTBEATS * group.heartbeat)
        self.owned: tuple[int, ...] | None = None
        self.members: tuple[str, ...] = ()
        self.rebalances = 0   # changes of what this bus owns after the first

    async def join(self) -> None:
        """Announce this member and take its first share, once the group's keys are read."""
        try:
            self._kv = await self._js.key_value(self._group.bucket)
        except BucketNotFoundError:
            # Every entry ages out after member_ttl: a member that stops renewing is gone.
            self._kv = await self._js.create_key_value(
                bucket=self._group.bucket, history=1, ttl=self._group.member_ttl,
                replicas=self._replicas)
        else:
            ttl = (await self._kv.status()).ttl
            if ttl and abs(ttl - self._group.member_ttl) > 0.001:
                # The first member made the bucket: its age limit is everyone's.
                log.warning("group %s: its bucket %s forgets a member %gs after its last "
                            "heartbeat, not the %gs this bus was given (heartbeat %gs); give every "
                            "member the same heartbeat", self._group.name, self._group.bucket,
                            ttl, self._group.member_ttl, self._group.heartbeat)
                self._view.ttl = ttl
        # Watch first, then beat: once the watch shows this heartbeat it has shown every key
        # stored before it (it replays each key's last update, then follows in stream order).
        watcher = await self._open_watch()
        self._tasks.append(asyncio.create_task(self._follow(watcher), name="group-membership"))
        self._first_beat = await self._beat()
        self._check_joined()
        try:
            await asyncio.wait_for(self._joined.wait(), JOIN_TIMEOUT)
        except TimeoutError:
            raise TimeoutError(f"group {self._group.name}: the watch of bucket "
                               f"{self._group.bucket} did not show member {self._group.member}'s "
                               f"heartbeat within {JOIN_TIMEOUT:g}s") from None
        await self._rebalance()
        self._tasks += [asyncio.create_task(self._heartbeats(), name="group-heartbeat"),
                        asyncio.create_task(self._rebalancing(), name="group-rebalancing")]

    async def leave(self) -> None:
        """Stop taking part and delete this member's key, so the others take its share now."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._kv is not None:
            try:
                await self._kv.delete(self._key)
            except Exception as exc:
                log.warning("could not delete member %s of group %s (%s: %s); the others take its "
                            "partitions after member_ttl (%gs)", self._group.member,
                            self._group.name, type(exc).__name__, exc, self._group.member_ttl)

    async def _beat(self) -> int:
        revision: int = await self._kv.put(self._key, json.dumps({"member": self._group.member,
                                                             "at": time.time()}).encode())
        if self._unseen is None and revision > self._own_seen:
            self._unseen = (revision, time.monotonic())
        return revision

    async def _heartbeats(self) -> None:
        # Apart from the rebalancing: a long drain must not let this member's key age out.
        while True:
            await asyncio.sleep(self._group.heartbeat)
            try:
                await self._beat()
            except Exception as exc:
                log.warning("group %s: heartbeat of member %s failed: %s: %s", self._group.name,
                            self._group.member, type(exc).__name__, exc)

    async def _open_watch(self) -> Any:
        # Headers only: the member is in the key, its age in the stream timestamp.
        return await self._kv.watch(f"{self._prefix}*", meta_only=True,
                                    inactive_threshold=WATCH_INACTIVE)

    async def _follow(self, watcher: Any) -> None:
        """Read the watch into the view for as long as this member takes part; make it anew
        when it is lost, keeping the view (no member is dropped meanwhile)."""
        while True:
            try:
                await self._read(watcher)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("group %s: reading the watch of bucket %s failed (%s: %s); watching "
                            "anew, keeping the members meanwhile", self._group.name,
                            self._group.bucket, type(exc).__name__, exc)
            finally:
                try:
                    await watcher.stop()
                except Exception as exc:   # the connection may be down: the server drops it later
                    log.debug("stopping a membership watch: %s: %s", type(exc).__name__, exc)
            watcher = await self._reopen()

    async def _read(self, watcher: Any) -> None:
        """Apply the watch's updates; return once it has fallen silent about this member's own
        heartbeats for longer than they take to come back."""
        while True:
            try:
                entry = await watcher.updates(timeout=self._group.heartbeat)
            except TimeoutError:
                entry = None
            if isinstance(entry, StopIterSentinel):
                return
            if entry is not None:
                self._apply(entry)
            unseen = self._unseen
            if unseen is not None and time.monotonic() - unseen[1] > self._watch_lag:
                log.warning("group %s: the watch of bucket %s has not shown member %s's heartbeat "
                            "of %.1fs ago; watching anew, keeping the members meanwhile",
                            self._group.name, self._group.bucket, self._group.member,
                            time.monotonic() - unseen[1])
                return

    async def _reopen(self) -> Any:
        failed = False
        while True:
            try:
                watcher = await self._open_watch()
            except Exception as exc:
                if not failed:
                    log.warning("group %s: cannot watch bucket %s (%s: %s); trying again every "
                                "%gs, keeping the members meanwhile", self._group.name,
                                self._group.bucket, type(exc).__name__, exc, self._group.heartbeat)
                failed = True
                await asyncio.sleep(self._group.heartbeat)
                continue
            if failed:
                log.info("group %s: watching bucket %s again", self._group.name, self._group.bucket)
            # The new watch starts with every key's last update: what it shows next is news.
            self._unseen = None
            return watcher

    def _apply(self, entry: Any) -> None:
        if not entry.key.startswith(self._prefix):
            return
        if entry.key == self._key and entry.operation is None and entry.revision:
            self._own_seen = max(self._own_seen, entry.revision)
            if self._unseen is not None and entry.revision >= self._unseen[0]:
                self._unseen = None
            self._check_joined()
        self._view.update(entry.key[len(self._prefix):], entry.operation, _seconds(entry.created))
        members = self._view.members
        if members != self.members:
            self.members = members
            if self._joined.is_set():
                log.info("group %s: members now %s", self._group.name, ", ".join(members))
            self._changed.set()

    def _check_joined(self) -> None:
        if not self._joined.is_set() and self._first_beat is not None and \
                self._own_seen >= self._first_beat:
            self._view.follow()
            self._joined.set()

    async def _rebalancing(self) -> None:
        while True:
            await self._changed.wait()
            self._changed.clear()
            try:
                await self._rebalance()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("group %s: taking this member's share failed (%s: %s); trying again "
                            "in %gs", self._group.name, type(exc).__name__, exc,
                            self._group.heartbeat)
                await asyncio.sleep(self._group.heartbeat)
                self._changed.set()

    async def _rebalance(self) -> None:
        members = self.members or (self._group.member,)
        owned = assign_partitions(members, self._group.partitions).get(self._group.member, ())
        if owned != self.owned:
            log.info("group %s: members %s; member %s owns partitions %s", self._group.name,
                     ", ".join(members), self._group.member, list(owned))
            previous, self.owned = self.owned, owned
            try:
                await self._on_change(owned)
            except BaseException:
                self.owned = previous   # so that the next try makes the change again
                raise
            if previous is not None:
                self.rebalances += 1


def _seconds(stamp: Any) -> float:
    """A watch entry's stream timestamp (nats-py gives a datetime) in seconds."""
    return stamp.timestamp() if isinstance(stamp, datetime) else float(stamp)
