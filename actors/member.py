"""A pool member: runs the user's handlers for its keys, strictly in arrival order."""
from __future__ import annotations

import contextlib
import logging
import os
import time

from thespian.actors import ActorExitRequest

from actorbus.actors.base import BusActor
from actorbus.actors.handler_thread import HandlerThread
from actorbus.actors.handlers import HandlerError
from actorbus.actors.messages import (Address, Completion, Delivery, Dispatch, HandlerRegistered,
                                      MemberReady, Outcome, RegisterHandler, StartMember)
from actorbus.actors.processing import HandlerTable
from actorbus.actors.sequencing import Resequencer
from actorbus.actors.watchdog import Watchdog
from actorbus.tracing import flush_traces

log = logging.getLogger("actorbus.actors")

#: Seconds of handler time after which a member reports what it has finished of a
#: dispatch, so a slow handler does not hold back the acks of the deliveries before
#: it. With fast handlers a dispatch is still answered by one Completion.
REPORT_INTERVAL = 0.05


class _Feed:
    """What a member knows of one Bridge's dispatches."""

    __slots__ = ("epoch", "last_token", "dispatches", "ownership")

    def __init__(self) -> None:
        self.epoch = 0   # the incarnation of the Bridge whose dispatches are numbered here
        self.ownership = 0   # what the Bridge reads changed hands this many times
        # Tokens reach a member in increasing order (a Bridge routes in fetch order), so
        # anything at or below the last one is a copy.
        self.last_token = 0
        self.dispatches: Resequencer[Dispatch] = Resequencer()


class PoolMember(BusActor):
    """Handles each :class:`Dispatch` in order and answers its sender with one :class:`Completion`."""

    def __init__(self) -> None:
        super().__init__()
        self._index = -1
        self._table = HandlerTable(watchdog=Watchdog())
        # Each Bridge of the bus numbers its dispatches and tokens on its own.
        self._feeds: dict[int, _Feed] = {}
        # The user's handlers run here, not on the actor's thread: Thespian forked this
        # process deep in its parent's call stack, and a handler's calls crossing
        # CPython's 16 KB frame-stack chunk there map and unmap a chunk per call (measured:
        # members at 2 page faults and 2.4 times the CPU per message). A thread of its own
        # starts from an empty stack. One thread: handlers still run one at a time, in order.
        self._runner = HandlerThread()

    def receiveMsg_StartMember(self, message: StartMember, sender: Address) -> None:
        self._index = message.index
        if message.snapshots is not None:
            self._table.use_snapshots(message.snapshots)
        for subscription in message.subscriptions:
            self._table.register(subscription)
            # Now, not on the first dispatch: that one's durable aggregates are restored at
            # once only if the table knows them durable (see HandlerTable.prepare). One that
            # does not import fails each of its deliveries, saying why.
            with contextlib.suppress(HandlerError):
                self._table.resolve(subscription.name)
        self.send(sender, MemberReady(message.index, os.getpid()))

    def receiveMsg_RegisterHandler(self, message: RegisterHandler, sender: Address) -> None:
        self._table.register(message.subscription)
        error = None
        try:
            self._table.resolve(message.subscription.name)
        except HandlerError as exc:
            error = f"pool member {self._index} (pid {os.getpid()}): {exc}"
            log.error("subscription %s: %s", message.subscription.name, error)
        self.send(sender, HandlerRegistered(message.request_id, error, self._index))

    def receiveMsg_Dispatch(self, message: Dispatch, sender: Address) -> None:
        feed = self._feeds.get(message.bridge)
        if feed is None:
            feed = self._feeds[message.bridge] = _Feed()
        if message.epoch != feed.epoch:
            if message.epoch < feed.epoch:
                log.warning("pool member %d dropped a dispatch of an earlier Bridge %d",
                            self._index, message.bridge)
                return
            # A restarted Bridge numbers its dispatches from 1 again.
            feed.epoch = message.epoch
            feed.dispatches.reset()
        # The transport may hand dispatches over out of order: handle them in the Bridge's.
        for dispatch in feed.dispatches.arrived(message.sequence, message):
            self._handle(dispatch, feed, sender)

    def _handle(self, message: Dispatch, feed: _Feed, sender: Address) -> None:
        fresh = [d for d in message.deliveries if d.token > feed.last_token]
        if len(fresh) < len(message.deliveries):
            log.warning("pool member %d dropped %d delivery(ies) it had already handled",
                        self._index, len(message.deliveries) - len(fresh))
        if fresh:
            feed.last_token = fresh[-1].token
        # Handlers run on a thread of their own, in runs of about REPORT_INTERVAL; what a
        # run finished is reported from here (only the actor's thread may send).
        # What the Bridge reads changed hands: its durable aggregates may have been handled
        # elsewhere meanwhile, and are restored from the store on their next message.
        moved = message.ownership != feed.ownership
        feed.ownership = message.ownership
        position = 0
        while True:
            done, position = self._runner.call(self._run, fresh, position, moved)
            if position >= len(fresh):
                break
            self.send(sender, Completion.of(done, self._index, final=False))
        # Answered even when empty: the Bridge counts the dispatch outstanding until it is.
        self.send(sender, Completion.of(done, self._index))

    def _run(self, deliveries: list[Delivery], start: int,
             moved: bool = False) -> tuple[list[Outcome], int]:
        """Handle ``deliveries`` from ``start`` in order, for about REPORT_INTERVAL at most
        (at least one); return the outcomes and where to go on. ``moved``: what the Bridge
        reads changed hands before this dispatch."""
        done = []
        table = self._table
        if start == 0:   # a dispatch begins: its durable aggregates first seen are restored at once
            if moved:
                table.forget_durable()
            table.prepare(deliveries)
        started = time.monotonic()
        position = start
        while position < len(deliveries):
            delivery = deliveries[position]
            position += 1
            outcome = table.handle(delivery)
            done.append(outcome)
            if time.monotonic() - started >= REPORT_INTERVAL:
                break
        return done, position

    def receiveMsg_ActorExitRequest(self, message: ActorExitRequest, sender: Address) -> None:
        self._runner.call(self._table.close)   # its event loop belongs to that thread
        self._runner.stop()
        flush_traces()   # the process may end without the interpreter's exit hooks
