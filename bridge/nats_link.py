"""The Bridge's NATS side: one connection, pull requests per subscription, settling.

It all runs on an :class:`InlineLoop` that the Bridge's actor thread turns
(:meth:`NatsLink.turn`) when the connection is readable, after each actor
message and when a timer is due. Arrived messages wait in a :class:`Mailbox`
for the Bridge; settlements are handed over through :meth:`NatsLink.settle`
to its :class:`Settler`.
Its :class:`FetchWindow` bounds how many messages may be requested or
delivered and unsettled at once, so a slow pool holds fetching back instead
of growing queues.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from typing import Any
from collections.abc import Mapping

from actorbus.bridge.connection import describe_error, open_connection
from actorbus.bridge.inbox import Delivered, InboxClient
from actorbus.bridge.inline_loop import InlineLoop
from actorbus.bridge.jetstream import ensure_consumer, ensure_dead_letter_stream, ensure_stream
from actorbus.bridge.lag import LagWatch
from actorbus.bridge.layout import ConsumerLayout, ConsumerSpec, layout_for
from actorbus.bridge.mailbox import Arrival, Mailbox, PinsChanged, Recovery, Released
from actorbus.bridge.membership import ElasticMembership, ensure_static_group
from actorbus.bridge.pull import PullConsumer
from actorbus.bridge.recovery import read_gap
from actorbus.bridge.settlement import Order
from actorbus.bridge.settler import Settler
from actorbus.bridge.window import FetchWindow
from actorbus.config import BusConfig, SubscriptionConfig
from actorbus.errors import ConfigurationError
from actorbus.groups import GroupKind

log = logging.getLogger("actorbus.bridge")

#: How often lost pull requests are looked for and requests topped up.
_TICK = 0.1
#: How often a released partition's drain looks whether its messages are all settled.
_DRAIN_POLL = 0.02


class NatsLink:
    """Connection, fetching and ack/nak/term for the Bridge, on its own thread."""

    def __init__(self, config: BusConfig, mailbox: Mailbox,
                 layout: ConsumerLayout | None = None) -> None:
        self._config = config
        self._mailbox = mailbox
        self._layout = layout or layout_for(config)
        # Elastic groups: a partition moves to another bus only once what its durable
        # delivered here is settled, so the window counts by durable there.
        self._window = FetchWindow(config.window, by_durable=self._layout.moving)
        self._loop = InlineLoop()
        self._nc: Any = None
        self._js: Any = None
        self._consumers: dict[str, PullConsumer] = {}
        #: Stopped fetching, not yet unpinned: they keep their pins while they drain.
        self._stopped: list[PullConsumer] = []
        self._ticker: asyncio.Task[None] | None = None
        self._settling: set[asyncio.Task[None]] = set()
        self._lag = LagWatch()
        self._settler = Settler(lambda: self._nc, lambda: self._js, self._window, self._top_up)
        self._closing = False
        self._counts: Counter[str] = Counter()   # recoveries; the settler counts the rest
        self._violations: list[str] = []   # the server's permissions violations, latest last
        # Elastic groups: who owns which partitions.
        self._memberships: dict[str, ElasticMembership] = {}
        self._releasing: dict[str, asyncio.Task[None]] = {}
        self._claimed: dict[str, str] = {}   # pins of the Bridge before this one, by durable

    # ------------------------------------------------------------ the actor's thread
    def fileno(self) -> int:
        """Readable while the connection has something for :meth:`turn`."""
        return self._loop.fileno()

    def turn(self, io: bool = True) -> float | None:
        """Do the NATS work that is ready (reads, writes, settlements handed over, due
        timers; with ``io`` False only what was handed over); the seconds until the next
        timer, or None."""
        self._loop.turn(io)
        return self._loop.due()

    def connect(self) -> None:
        """Connect; raise ``ConnectionError`` naming the servers (secrets masked) and
        the reason if it cannot within ``connect_timeout``."""
        timeout = self._config.connect_timeout
        try:
            self._loop.run(self._connect(), timeout + 2.0)
        except ConnectionError:
            raise
        except Exception as exc:
            raise ConnectionError(
                f"cannot connect to NATS at {self._config.shown_servers()}: "
                f"{describe_error(exc, self._config.secrets())}") from None

    def subscribe(self, sub: SubscriptionConfig, timeout: float = 10.0) -> None:
        """Ensure the stream and durable consumer, then start fetching for ``sub``.

        A JetStream API request the server refuses for lack of permission is
        only dropped (the request then times out); the server's permissions
        violation, reported meanwhile, is what the error says.
        """
        self._violations.clear()
        try:
            self._loop.run(self._subscribe(sub), timeout)
        except Exception:
            if self._violations:
                raise PermissionError(self._violations[-1]) from None
            raise

    def settle(self, actions: list[Order]) -> None:
        """Ack, nak (with delay), term or dead-letter these messages; returns at once."""
        self._loop.call_soon(self._track, self._settler.settle, actions)

    def touch(self, msgs: list[Delivered]) -> None:
        """Tell JetStream these messages are still being worked on (``in_progress``)."""
        self._loop.call_soon(self._track, self._settler.touch, msgs)

    def claim_pins(self, pins: Mapping[str, str]) -> None:
        """Pull with these pin ids (by durable) until pinned: the pins the Bridge before
        this one held, so that it goes on without waiting for them to lapse."""
        self._claimed = dict(pins)

    def pins(self) -> dict[str, str]:
        """The pin id of each durable this bus is pinned on now."""
        return {name: c.pin_id for name, c in list(self._consumers.items()) if c.pin_id is not None}

    def forget(self, msgs: list[Delivered]) -> None:
        """These delivered messages will not be settled here (their partition moved away)."""
        self._window.settled(len(msgs), self._window.by_durable_of(msgs))

    def set_held(self, held: int) -> None:
        """How many delivered messages the Bridge holds back for per-key order.

        They stay un-acked until an older message of their key comes back,
        and that message must still be fetched: held messages do not use up
        the window (up to one window's worth of them).
        """
        self._window.held = held

    def counts(self) -> dict[str, int]:
        """Done so far: acked, naked, termed, dead_lettered, in_progress, settle_errors,
        recoveries; and of the consumers in a priority group: pinned (now), pins, unpins."""
        counts = {**self._settler.counts, **self._counts}   # their keys do not overlap
        consumers = list(self._consumers.values())
        grouped = [c for c in consumers if c.spec.priority_group is not None]
        if grouped:
            counts["pinned"] = sum(c.pin_id is not None for c in grouped)
            counts["standby"] = len(grouped) - counts["pinned"]
            counts["pins"] = sum(c.pins for c in grouped)
            counts["unpins"] = sum(c.unpins for c in grouped)
        counts.update(self._layout.group_counts(list(self._memberships.values())))
        # The readiness probe's: this Bridge's connection is not up (reconnecting, or closed).
        counts["nats_disconnected"] = int(self._nc is None or not self._nc.is_connected)
        return counts

    def ownership_changes(self) -> int:
        """Times what this link reads changed hands: pins lost, partitions rebalanced."""
        return sum(c.unpins for c in self._consumers.values()) + \
            sum(m.rebalances for m in self._memberships.values())

    def lag(self) -> dict[str, dict[str, float]]:
        """The last lag reading of each durable this link reads (see :mod:`bridge.lag`)."""
        return self._lag.snapshot()

    def stop_fetching(self, timeout: float = 5.0) -> None:
        """Fetch nothing more; settling goes on."""
        self._loop.run(self._stop_fetching(), timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Stop fetching, flush the settlements already made, disconnect."""
        try:
            self._loop.run(self._close(), timeout)
        except Exception as exc:
            log.warning("closing the NATS connection did not finish cleanly: %s", exc)
        self._loop.stop(timeout)

    # ------------------------------------------------------------ on the loop
    async def _connect(self) -> None:
        self._nc = await open_connection(
            self._config, name=self._config.name, reconnect_forever=True,
            error_cb=self._on_error, disconnected_cb=self._on_disconnected,
            reconnected_cb=self._on_reconnected, client=InboxClient())
        self._js = self._nc.jetstream()

    async def _subscribe(self, sub: SubscriptionConfig) -> None:
        group = self._config.group
        if group is not None and sub.partitions != group.partitions:
            raise ConfigurationError(f"subscription {sub.name} has partitions={sub.partitions}, "
                                     f"but the bus's group {group.name} has {group.partitions}")
        await ensure_stream(self._js, sub)
        if sub.envelope or sub.settlement.redelivers:
            await ensure_dead_letter_stream(self._js, sub)
        if group is not None and group.kind is GroupKind.STATIC:
            await ensure_static_group(self._js, sub, group)
        specs = self._layout.consumers(sub)
        for spec in specs:
            await ensure_consumer(self._js, sub, spec)
        if self._layout.moving:
            assert group is not None   # only a group's partitions move
            membership = ElasticMembership(self._js, sub, group,
                                           lambda owned: self._own(sub, owned))
            self._memberships[sub.name] = membership
            await membership.join()
        else:
            shortfall = self._layout.shortfall(sub)
            if shortfall:
                log.warning("%s", shortfall)
            for spec in specs:
                await self._start_consumer(sub, spec)
        if self._ticker is None:
            self._ticker = asyncio.create_task(self._tick(), name="pull-requests")
        await self._top_up()

    async def _start_consumer(self, sub: SubscriptionConfig, spec: ConsumerSpec) -> None:
        durable = spec.durable

        def arrived(sub: SubscriptionConfig, msgs: list[Any]) -> None:
            self._window.arrived(len(msgs), durable)
            self._mailbox.put(Arrival(sub.name, msgs))

        consumer = PullConsumer(self._nc, sub, spec, arrived, self._schedule_top_up,
                                self._pinned, self._claimed.pop(spec.durable, None),
                                self._let_go)
        await consumer.start()
        self._consumers[spec.durable] = consumer
        if spec.priority_group is None:
            # The consumer is ours alone: what it left un-acked is ours to recover. In a
            # priority group that waits until this bus is pinned (see PullConsumer).
            self._schedule_recovery(consumer)

    async def _own(self, sub: SubscriptionConfig, owned: tuple[int, ...]) -> None:
        """Read the durables of ``owned`` partitions of ``sub`` and no others: release those
        that moved away (drained, then unpinned), start those that moved here."""
        if self._closing:
            return
        wanted = {spec.durable: spec for spec in self._layout.partition_consumers(sub, owned)}
        mine = {name for name, c in self._consumers.items() if c.subscription == sub.name}
        for durable in sorted(mine - wanted.keys()):
            consumer = self._consumers.pop(durable)
            self._releasing[durable] = asyncio.create_task(self._release(consumer),
                                                           name=f"release-{durable}")
        for durable in sorted(wanted.keys() - mine):
            releasing = self._releasing.get(durable)
            if releasing is not None:
                # Given back and taken again before its drain ended: start after it.
                await asyncio.gather(releasing, return_exceptions=True)
            if not self._closing:
                await self._start_consumer(sub, wanted[durable])
        await self._top_up()

    async def _release(self, consumer: PullConsumer) -> None:
        """Stop pulling ``consumer``; once what it delivered here is settled, unpin it so that
        its new owner, pinned next, finds every message before the next one acked."""
        durable = consumer.name
        self._stopped.append(consumer)
        try:
            await consumer.stop()
            self._let_go(consumer)
            deadline = time.monotonic() + consumer.ack_wait
            while self._window.unsettled_of(durable) and time.monotonic() < deadline:
                if self._closing:
                    return   # unpinned by _close, after the last flush
                await asyncio.sleep(_DRAIN_POLL)
            if self._window.unsettled_of(durable):
                log.warning("durable %s: %d message(s) still unsettled after ack_wait; unpinning "
                            "anyway, its new owner reads them back", durable,
                            self._window.unsettled_of(durable))
            await self._unpin_one(consumer)
        finally:
            self._releasing.pop(durable, None)
            if not self._closing:
                # Renewed no more: unpinned, or (had the release failed) left to lapse.
                self._stopped.remove(consumer)

    def _pinned(self, consumer: PullConsumer) -> None:
        # Ahead of its messages in the mailbox: the Bridge reports its pins before handling them.
        self._mailbox.put(PinsChanged())
        self._schedule_recovery(consumer)

    def _let_go(self, consumer: PullConsumer) -> None:
        # Its partition moved, or its pin: another bus reads back what this one left
        # un-acked, so what the Bridge holds back of it for per-key order is that bus's to
        # handle, in order. And the pins this bus holds changed.
        self._mailbox.put(Released(consumer.subscription, consumer.spec.filter_subjects))
        self._mailbox.put(PinsChanged())

    def _schedule_recovery(self, consumer: PullConsumer) -> None:
        # Not awaited by the caller: a large gap takes a while to read (about 0.3 ms a
        # message), and nothing of this consumer is handed over until it is done.
        consumer.hold_for_recovery()
        self._track(lambda _: self._recover(consumer), None)

    async def _recover(self, consumer: PullConsumer) -> None:
        """Hand over the consumer's un-acked gap, read from the stream, before anything it delivers."""
        spec = consumer.spec
        try:
            gap = await read_gap(self._js, spec, consumer.first_deliveries_kept_back)
            if consumer.stopped:
                return   # released meanwhile: its new owner recovers it
        except Exception as exc:
            log.warning("could not read the un-acked messages of %s back from stream %s (%s: %s); "
                        "per-key order is not guaranteed for their redeliveries", spec.durable,
                        spec.stream, type(exc).__name__, exc)
        else:
            if gap.messages:
                log.info("recovering %d message(s) of durable %s between its ack floor %d and its "
                         "delivered sequence %d (read in %.3fs)", len(gap.messages), spec.durable,
                         gap.ack_floor, gap.delivered, gap.seconds)
                self._counts["recoveries"] += 1
                self._mailbox.put(Recovery(consumer.subscription, gap.messages))
        consumer.resume()

    def _schedule_top_up(self) -> None:
        self._track(lambda _: self._top_up(), None)

    async def _top_up(self) -> None:
        """Keep each consumer's requests topped up, within what the window leaves."""
        if self._closing or not self._consumers or self._nc.is_closed:
            return
        for consumer, wanted in self._window.requests(list(self._consumers.values())):
            try:
                await consumer.request(wanted)
            except Exception as exc:
                consumer.forget()
                log.warning("pull request for %s failed: %s: %s", consumer.name,
                            type(exc).__name__, exc)

    async def _tick(self) -> None:
        # Requests lost with a server restart are never answered: forget them
        # once they are well past their expiry, and ask again. Pins are renewed
        # while the window leaves no room to ask, and while a stopped consumer drains.
        while True:
            await asyncio.sleep(_TICK)
            now = time.monotonic()
            for consumer in self._consumers.values():
                consumer.forget(now)
            await self._top_up()
            if self._nc is None or self._nc.is_closed:
                continue
            if self._lag.due(now) and self._nc.is_connected:
                await self._lag.read(self._js, [c.spec for c in self._consumers.values()], now)
            for consumer in [*self._consumers.values(), *self._stopped]:
                try:
                    await consumer.keep_pin(now)
                except Exception as exc:
                    log.warning("renewing the pin of %s failed: %s: %s", consumer.name,
                                type(exc).__name__, exc)

    def _track(self, work: Any, items: list[Any] | None) -> None:
        # Kept until done, so that closing waits for what was already handed over.
        task = asyncio.ensure_future(work(items))
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    async def _stop_fetching(self) -> None:
        # The other members take this one's partitions as standbys now; they are
        # pinned once what is in flight here is settled and unpinned (see _close).
        memberships, self._memberships = list(self._memberships.values()), {}
        for membership in memberships:
            await membership.leave()
        # Without interest on the inbox the server drops the waiting requests. The ticker
        # goes on renewing the pins until _close unpins.
        consumers, self._consumers = list(self._consumers.values()), {}
        for consumer in consumers:
            try:
                await consumer.stop()
            except Exception as exc:
                log.warning("stopping the pull subscription of %s: %s: %s", consumer.name,
                            type(exc).__name__, exc)
        self._stopped.extend(consumers)

    async def _unpin(self) -> None:
        """Release the pins this bus holds, so that a standby takes over at once instead of
        after ``pin_timeout`` (called once what was in flight is settled)."""
        for consumer in self._stopped:
            await self._unpin_one(consumer)

    async def _unpin_one(self, consumer: PullConsumer) -> None:
        spec = consumer.spec
        if consumer.pin_id is not None and self._nc is not None and not self._nc.is_closed:
            try:
                reply = await self._nc.request(f"$JS.API.CONSUMER.UNPIN.{spec.stream}.{spec.durable}",
                                               json.dumps({"group": spec.priority_group}).encode(),
                                               timeout=2.0)
                error = json.loads(reply.data).get("error")
                if error:
                    raise RuntimeError(error.get("description", error))
                log.info("durable %s: unpinned; a standby takes over", spec.durable)
            except Exception as exc:
                log.warning("could not unpin durable %s (%s: %s); a standby takes over after "
                            "pin_timeout (%gs)", spec.durable, type(exc).__name__, exc,
                            spec.pin_timeout)
            finally:
                consumer.unpinned()   # no longer renewed either way

    async def _close(self) -> None:
        self._closing = True
        await self._stop_fetching()
        # Let settlements already scheduled reach the socket before closing it.
        await asyncio.gather(*self._settling, *self._releasing.values(), return_exceptions=True)
        if self._nc is not None and not self._nc.is_closed:
            try:
                await self._nc.confirm(timeout=2)
            except Exception as exc:
                log.warning("flushing before close failed: %s", exc)
            # Only now: a standby pinned earlier would recover what was still settling.
            await self._unpin()
        if self._ticker is not None:
            self._ticker.cancel()
            await asyncio.gather(self._ticker, return_exceptions=True)
            self._ticker = None
        if self._nc is not None and not self._nc.is_closed:
            await self._nc.close()

    async def _on_error(self, exc: Exception) -> None:
        # nats-py's texts pass through the redaction too: a secret never reaches a log.
        text = describe_error(exc, self._config.secrets())
        if "permissions violation" in text.lower():
            self._violations.append(text)
            del self._violations[:-1]
        log.warning("NATS error: %s: %s", type(exc).__name__, text)

    async def _on_disconnected(self) -> None:
        if not self._closing and self._nc is not None:
            log.warning("disconnected from NATS")

    async def _on_reconnected(self) -> None:
        url = self._nc.connected_url if self._nc else None
        # Host and port only: the URL's user info may hold a password.
        log.warning("reconnected to NATS at %s", f"{url.hostname}:{url.port}" if url else "?")
        # A restarted server has forgotten the waiting requests: ask afresh, once what the
        # cut connection left un-acked has been read back (its acks may have been lost).
        # In a priority group only the pinned bus recovers; a standby has nothing of its own.
        consumers = [c for c in self._consumers.values()
                     if c.spec.priority_group is None or c.pin_id is not None]
        for consumer in self._consumers.values():
            consumer.forget()
        for consumer in consumers:
            consumer.hold_for_recovery()
        for consumer in consumers:
            await self._recover(consumer)
        await self._top_up()
