"""Settling what the pool handled: acks, naks, terms and dead letters, confirmed by the server.

The Bridge decides how each message is settled (:class:`Order`); a
:class:`Settler` writes a batch of orders as one buffer of protocol commands,
publishes dead letters before terming their originals, and counts a
settlement only once the server has read it (a PING written behind the
commands, and its PONG). Only then does the fetch window count those messages
as settled, so a drained partition is unpinned only with its acks at the server.
"""
from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from actorbus.bridge.inbox import (ACK_COMMAND, PROGRESS_PAYLOAD, TERM_PAYLOAD, Delivered,
                                   InboxClient, nak_payload, settlement_command)
from actorbus.bridge.settlement import ACK, DEAD_LETTER, NAK, TERM, Order
from actorbus.bridge.window import FetchWindow
from actorbus.tracing import end_settle_span

log = logging.getLogger("actorbus.bridge")

#: Seconds the server has to confirm a batch of settlements.
CONFIRM_TIMEOUT = 5.0


class Settler:
    """Writes the Bridge's settlements on its link's connection and counts what the server
    confirmed (``acked``, ``naked``, ``termed``, ``dead_lettered``, ``in_progress``,
    ``settle_errors``)."""

    def __init__(self, nc: Callable[[], InboxClient], js: Callable[[], Any], window: FetchWindow,
                 on_settled: Callable[[], Awaitable[None]]) -> None:
        # The connection is made after the link: looked up when used.
        self._nc = nc
        self._js = js
        self._window = window
        self._on_settled = on_settled
        self.counts: Counter[str] = Counter()
        # Settled, written, not yet confirmed: (counts, how many, by durable, settle spans).
        self._unconfirmed: list[tuple[Counter[str], int, Counter[str] | None, list[Any]]] = []
        self._confirming = False

    async def touch(self, msgs: list[Delivered]) -> None:
        """Tell JetStream these messages are still being worked on (``in_progress``)."""
        commands = [settlement_command(msg.reply, PROGRESS_PAYLOAD) for msg in msgs if msg.reply]
        try:
            await self._nc().write_settlements(b"".join(commands))
        except Exception as exc:
            log.warning("could not send in_progress for %d message(s): %s: %s", len(msgs),
                        type(exc).__name__, exc)
            return
        self.counts["in_progress"] += len(commands)

    async def settle(self, actions: list[Order]) -> None:
        """Ack, nak (with delay), term or dead-letter these messages, as one write; counted
        once the server confirms it read them."""
        done: Counter[str] = Counter()
        commands: list[bytes] = []
        written: Counter[str] = Counter()
        acked = 0
        spans: list[Any] = []   # of the traced ones (see actorbus.tracing)
        for order in actions:
            msg = order.msg
            if not msg.reply:
                done["settle_errors"] += 1
                log.warning("could not %s message on %s: it has no ack subject", order.action,
                            msg.subject)
                if order.span is not None:
                    end_settle_span(order.span, "it has no ack subject")
                continue
            if order.action is ACK:   # most of them: the command written out here
                commands.append(ACK_COMMAND % msg.reply.encode())
                acked += 1
            elif order.action == NAK:
                commands.append(settlement_command(msg.reply, nak_payload(order.delay)))
                written["naked"] += 1
            elif order.action == TERM:
                commands.append(settlement_command(msg.reply, TERM_PAYLOAD))
                written["termed"] += 1
            elif order.action == DEAD_LETTER:
                # Termed only once the dead letter is stored: never lost in between.
                if not await self._dead_letter(order, msg):
                    done["settle_errors"] += 1   # JetStream redelivers it after AckWait
                    continue
                commands.append(settlement_command(msg.reply, TERM_PAYLOAD))
                written["dead_lettered"] += 1
                written["termed"] += 1
            if order.span is not None:
                spans.append(order.span)
        if acked:
            written["acked"] += acked
        if commands:
            try:
                # One buffer for the batch: a write each would cost more than the acks.
                await self._nc().write_settlements(b"".join(commands), confirm_follows=True)
                done.update(written)
            except Exception as exc:
                done["settle_errors"] += len(commands)
                for span in spans:
                    end_settle_span(span, f"not written: {type(exc).__name__}: {exc}")
                spans = []
                log.warning("could not settle %d message(s): %s: %s", len(commands),
                            type(exc).__name__, exc)
        durables = self._window.by_durable_of([order.msg for order in actions])
        self._unconfirmed.append((done, len(actions), durables, spans))
        if not self._confirming:
            self._confirming = True
            await self._confirm()

    async def _dead_letter(self, order: Order, msg: Delivered) -> bool:
        """Publish ``msg`` to its dead-letter subject; whether JetStream stored it."""
        try:
            await self._js().publish(order.dead_letter_subject, msg.data,
                                     headers=order.dead_letter_headers)
        except Exception as exc:
            log.warning("could not dead-letter message on %s: %s: %s", msg.subject,
                        type(exc).__name__, exc)
            if order.span is not None:
                end_settle_span(order.span, f"dead letter not stored: {exc}")
            return False
        return True

    async def _confirm(self) -> None:
        """Flush, and count what was settled before the flush; again while more was settled
        meanwhile. One flush (a round trip to the server) confirms every settlement written
        before it: not one per completion."""
        try:
            while self._unconfirmed:
                batch, self._unconfirmed = self._unconfirmed, []
                settled = sum(count for _done, count, _durables, _spans in batch)
                done: Counter[str] = Counter()
                for counts, _count, _durables, _spans in batch:
                    done.update(counts)
                error = None
                try:
                    # Counted only once the server has them: during an outage nats-py
                    # buffers acks that may never take effect.
                    await self._nc().confirm(timeout=CONFIRM_TIMEOUT)
                except Exception as exc:
                    unconfirmed = settled - done["settle_errors"]
                    done = Counter(settle_errors=settled)
                    error = f"not confirmed by the server: {type(exc).__name__}: {exc}"
                    log.warning("%d settlement(s) not confirmed by the server (%s: %s); JetStream "
                                "will redeliver what did not take effect", unconfirmed,
                                type(exc).__name__, exc)
                self.counts.update(done)
                for _done, _count, _durables, spans in batch:
                    for span in spans:
                        end_settle_span(span, error)
                # Only now may a drained partition be unpinned: its acks are at the server.
                by_durable: Counter[str] = Counter()
                for _done, _count, durables, _spans in batch:
                    by_durable.update(durables or {})
                self._window.settled(settled, by_durable)
                await self._on_settled()
        finally:
            self._confirming = False
