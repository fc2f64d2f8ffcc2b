"""The Bridge's NATS side: one connection, a fetch loop per subscription, settling.

It all runs on a :class:`LoopThread`. Fetched batches go to the actor
thread through a :class:`Mailbox`; settlements come back through
:meth:`NatsLink.settle`. The window bounds how many messages may be
delivered and unsettled at once, so a slow pool holds fetching back
instead of growing queues.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections import Counter
from typing import Any, Iterable

import nats
import nats.errors

from actorbus.bridge.jetstream import ensure_consumer, ensure_dead_letter_stream, ensure_stream
from actorbus.bridge.loop_thread import LoopThread
from actorbus.bridge.mailbox import Mailbox
from actorbus.bridge.settlement import ACK, DEAD_LETTER, NAK, TERM, Order
from actorbus.config import SubscriptionConfig

log = logging.getLogger("actorbus.bridge")

_RETRY_AFTER_FETCH_ERROR = 0.5
_SETTLE_FLUSH_TIMEOUT = 5.0
_REBIND_AFTER_FAILURES = 3


class NatsLink:
    """Connection, fetching and ack/nak/term for the Bridge, on its own thread."""

    def __init__(self, servers: Iterable[str], mailbox: Mailbox, *, window: int,
                 name: str = "actorbus") -> None:
        self._servers = list(servers)
        self._mailbox = mailbox
        self._window = window
        self._name = name
        self._thread = LoopThread(f"{name}-nats")
        self._nc: Any = None
        self._js: Any = None
        self._fetchers: dict[str, asyncio.Task] = {}
        self._settling: set[asyncio.Task] = set()
        self._closing = False
        self._outstanding = 0
        self._space: asyncio.Condition | None = None
        self._counts: Counter[str] = Counter()
        self._counts_lock = threading.Lock()

    # ------------------------------------------------------------ any thread
    def connect(self, timeout: float) -> None:
        """Connect; raise ``ConnectionError`` naming the servers if it cannot."""
        try:
            self._thread.run(self._connect(timeout), timeout + 1.0)
        except Exception as exc:
            raise ConnectionError(
                f"could not connect to NATS at {', '.join(self._servers)}: "
                f"{type(exc).__name__}: {exc}") from exc

    def subscribe(self, sub: SubscriptionConfig, timeout: float = 10.0) -> None:
        """Ensure the stream and durable consumer, then start fetching for ``sub``."""
        self._thread.run(self._subscribe(sub), timeout)

    def settle(self, actions: list[Order]) -> None:
        """Ack, nak (with delay), term or dead-letter these messages; returns at once."""
        self._thread.call_soon(self._track, self._settle, actions)

    def touch(self, msgs: list[Any]) -> None:
        """Tell JetStream these messages are still being worked on (``in_progress``)."""
        self._thread.call_soon(self._track, self._touch, msgs)

    def counts(self) -> dict[str, int]:
        """Done so far: acked, naked, termed, dead_lettered, in_progress, settle_errors."""
        with self._counts_lock:
            return dict(self._counts)

    def stop_fetching(self, timeout: float = 5.0) -> None:
        """Fetch nothing more; settling goes on."""
        self._thread.run(self._stop_fetching(), timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Stop fetching, flush the settlements already made, disconnect."""
        try:
            self._thread.run(self._close(), timeout)
        except Exception as exc:
            log.warning("closing the NATS connection did not finish cleanly: %s", exc)
        self._thread.stop(timeout)

    # ------------------------------------------------------------ loop thread
    async def _connect(self, timeout: float) -> None:
        self._space = asyncio.Condition()
        self._nc = await nats.connect(
            servers=self._servers, name=self._name, connect_timeout=timeout,
            allow_reconnect=True, max_reconnect_attempts=-1, reconnect_time_wait=0.5,
            error_cb=self._on_error, disconnected_cb=self._on_disconnected,
            reconnected_cb=self._on_reconnected)
        self._js = self._nc.jetstream()

    async def _subscribe(self, sub: SubscriptionConfig) -> None:
        await ensure_stream(self._js, sub)
        if sub.envelope:
            await ensure_dead_letter_stream(self._js, sub)
        await ensure_consumer(self._js, sub)
        psub = await self._js.pull_subscribe_bind(durable=sub.durable, stream=sub.stream)
        self._fetchers[sub.name] = asyncio.create_task(self._fetch_loop(sub, psub),
                                                       name=f"fetch-{sub.name}")

    async def _fetch_loop(self, sub: SubscriptionConfig, psub: Any) -> None:
        assert self._space is not None
        failures = 0
        while True:
            async with self._space:
                await self._space.wait_for(lambda: self._outstanding < self._window)
                room = self._window - self._outstanding
            try:
                msgs = await psub.fetch(min(sub.batch_size, room), timeout=sub.fetch_timeout)
            except (nats.errors.TimeoutError, asyncio.TimeoutError):
                continue  # nothing to fetch (nats-py raises either kind)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1
                log.warning("fetch for %s failed (%d in a row), retrying: %s: %s", sub.name,
                            failures, type(exc).__name__, exc)
                await asyncio.sleep(_RETRY_AFTER_FETCH_ERROR)
                if failures % _REBIND_AFTER_FAILURES == 0:
                    # After a server restart nats-py does not always resume a
                    # pull subscription: bind a fresh one to the durable.
                    psub = await self._rebind(sub, psub)
                continue
            failures = 0
            if msgs:
                self._outstanding += len(msgs)
                self._mailbox.put((sub.name, msgs))

    async def _rebind(self, sub: SubscriptionConfig, psub: Any) -> Any:
        try:
            fresh = await self._js.pull_subscribe_bind(durable=sub.durable, stream=sub.stream)
        except Exception as exc:
            log.warning("re-binding %s failed: %s: %s", sub.name, type(exc).__name__, exc)
            return psub
        with contextlib.suppress(Exception):
            await psub.unsubscribe()
        log.warning("re-bound the pull subscription of %s", sub.name)
        return fresh

    def _track(self, work: Any, items: list[Any]) -> None:
        # Kept until done, so that closing waits for what was already handed over.
        task = asyncio.ensure_future(work(items))
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    async def _touch(self, msgs: list[Any]) -> None:
        touched = 0
        for msg in msgs:
            try:
                await msg.in_progress()
                touched += 1
            except Exception as exc:
                log.warning("could not send in_progress on %s: %s: %s", msg.subject,
                            type(exc).__name__, exc)
        with self._counts_lock:
            self._counts["in_progress"] += touched

    async def _settle(self, actions: list[Order]) -> None:
        done: Counter[str] = Counter()
        for order in actions:
            msg = order.msg
            try:
                if order.action == ACK:
                    await msg.ack()
                    done["acked"] += 1
                elif order.action == NAK:
                    await msg.nak(delay=order.delay)
                    done["naked"] += 1
                elif order.action == TERM:
                    await msg.term()
                    done["termed"] += 1
                elif order.action == DEAD_LETTER:
                    # Termed only once the dead letter is stored: never lost in between.
                    await self._js.publish(order.dead_letter_subject, msg.data,
                                           headers=order.dead_letter_headers)
                    await msg.term()
                    done["dead_lettered"] += 1
                    done["termed"] += 1
            except Exception as exc:
                # Not counted as done: JetStream redelivers it after AckWait.
                done["settle_errors"] += 1
                log.warning("could not %s message on %s: %s: %s", order.action, msg.subject,
                            type(exc).__name__, exc)
        try:
            # Counted only once the server has them: during an outage nats-py
            # buffers acks that may never take effect.
            await self._nc.flush(timeout=_SETTLE_FLUSH_TIMEOUT)
        except Exception as exc:
            unconfirmed = len(actions) - done["settle_errors"]
            done = Counter(settle_errors=len(actions))
            log.warning("%d settlement(s) not confirmed by the server (%s: %s); JetStream will "
                        "redeliver what did not take effect", unconfirmed, type(exc).__name__, exc)
        with self._counts_lock:
            self._counts.update(done)
        assert self._space is not None
        async with self._space:
            self._outstanding -= len(actions)
            self._space.notify_all()

    async def _stop_fetching(self) -> None:
        for task in self._fetchers.values():
            task.cancel()
        await asyncio.gather(*self._fetchers.values(), return_exceptions=True)
        self._fetchers.clear()

    async def _close(self) -> None:
        self._closing = True
        await self._stop_fetching()
        # Let settlements already scheduled reach the socket before closing it.
        await asyncio.gather(*self._settling, return_exceptions=True)
        if self._nc is not None and not self._nc.is_closed:
            try:
                await self._nc.flush(timeout=2)
            except Exception as exc:
                log.warning("flushing before close failed: %s", exc)
            await self._nc.close()

    async def _on_error(self, exc: Exception) -> None:
        log.warning("NATS error: %s: %s", type(exc).__name__, exc)

    async def _on_disconnected(self) -> None:
        if not self._closing:
            log.warning("disconnected from NATS")

    async def _on_reconnected(self) -> None:
        log.warning("reconnected to NATS at %s", self._nc.connected_url.netloc if self._nc else "?")
