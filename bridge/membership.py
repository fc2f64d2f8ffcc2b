"""A consumer group's membership in KV buckets: the static member list, the elastic heartbeats.

Runs on the Bridge's NATS loop thread. A static group's member list is
written once, as orbit.go's ``pcgroups`` writes it, and checked by every
member after. An elastic member keeps its key fresh; the bucket's max age
ends the key of a member that stopped (a clean leave deletes it at once),
and each member spreads the partitions over the keys it finds with the
same arithmetic, so all of them come to the same answer without talking
to each other.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any, Awaitable, Callable

from nats.js.errors import (BucketNotFoundError, KeyDeletedError, KeyNotFoundError,
                            KeyWrongLastSequenceError, NoKeysError)

from actorbus.config import ConfigurationError, SubscriptionConfig
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
        self._tasks: list[asyncio.Task] = []
        self.owned: tuple[int, ...] | None = None
        self.members: tuple[str, ...] = ()
        self.rebalances = 0   # changes of what this bus owns after the first

    async def join(self) -> None:
        """Announce this member and take its first share."""
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
        await self._beat()
        await self._rebalance()
        self._tasks = [asyncio.create_task(self._heartbeats(), name="group-heartbeat"),
                       asyncio.create_task(self._watch(), name="group-membership")]

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

    async def _beat(self) -> None:
        await self._kv.put(self._key, json.dumps({"member": self._group.member,
                                                  "at": time.time()}).encode())

    async def _heartbeats(self) -> None:
        # Apart from the rebalancing: a long drain must not let this member's key age out.
        while True:
            await asyncio.sleep(self._group.heartbeat)
            try:
                await self._beat()
            except Exception as exc:
                log.warning("group %s: heartbeat of member %s failed: %s: %s", self._group.name,
                            self._group.member, type(exc).__name__, exc)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._group.heartbeat / 2)
            try:
                await self._rebalance()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("group %s: reading the membership failed: %s: %s", self._group.name,
                            type(exc).__name__, exc)

    async def _rebalance(self) -> None:
        try:
            keys = await self._kv.keys()   # (nats-py's filters match substrings)
        except NoKeysError:
            keys = []
        members = tuple(sorted(key[len(self._prefix):] for key in keys
                               if key.startswith(self._prefix)))
        if self._group.member not in members:
            members = tuple(sorted((*members, self._group.member)))   # our own put is on its way
        owned = assign_partitions(members, self._group.partitions).get(self._group.member, ())
        if members != self.members:
            log.info("group %s: members now %s; member %s owns partitions %s", self._group.name,
                     ", ".join(members), self._group.member, list(owned))
            self.members = members
        if owned != self.owned:
            if self.owned is not None:
                self.rebalances += 1
            self.owned = owned
            await self._on_change(owned)
