"""A pool member: runs the user's handlers for its keys, strictly in arrival order."""
from __future__ import annotations

import logging
import os
import time

from actorbus.actors.base import BusActor
from actorbus.actors.handlers import HandlerError
from actorbus.actors.messages import (SUCCEEDED, Completion, Dispatch, HandlerRegistered, MemberReady,
                                      RegisterHandler, StartMember)
from actorbus.actors.processing import HandlerTable
from actorbus.actors.sequencing import Resequencer
from actorbus.actors.watchdog import Watchdog

log = logging.getLogger("actorbus.actors")

#: Seconds of handler time after which a member reports what it has finished of a
#: dispatch, so a slow handler does not hold back the acks of the deliveries before
#: it. With fast handlers a dispatch is still answered by one Completion.
REPORT_INTERVAL = 0.05


class PoolMember(BusActor):
    """Handles each :class:`Dispatch` in order and answers its sender with one :class:`Completion`."""

    def __init__(self) -> None:
        super().__init__()
        self._index = -1
        self._table = HandlerTable(watchdog=Watchdog())
        # Tokens reach a member in increasing order (the Router keeps the
        # Bridge's order), so anything at or below the last one is a copy.
        self._last_token = 0
        self._dispatches: Resequencer[Dispatch] = Resequencer()

    def receiveMsg_StartMember(self, message: StartMember, sender) -> None:
        self._index = message.index
        for subscription in message.subscriptions:
            self._table.register(subscription)
        self.send(sender, MemberReady(message.index, os.getpid()))

    def receiveMsg_RegisterHandler(self, message: RegisterHandler, sender) -> None:
        self._table.register(message.subscription)
        error = None
        try:
            self._table.resolve(message.subscription.name)
        except HandlerError as exc:
            error = f"pool member {self._index} (pid {os.getpid()}): {exc}"
            log.error("subscription %s: %s", message.subscription.name, error)
        self.send(sender, HandlerRegistered(message.request_id, error, self._index))

    def receiveMsg_Dispatch(self, message: Dispatch, sender) -> None:
        # The transport may hand dispatches over out of order: handle them in the Router's.
        for dispatch in self._dispatches.arrived(message.sequence, message):
            self._handle(dispatch, sender)

    def _handle(self, message: Dispatch, sender) -> None:
        fresh = [d for d in message.deliveries if d.token > self._last_token]
        if len(fresh) < len(message.deliveries):
            log.warning("pool member %d dropped %d delivery(ies) it had already handled",
                        self._index, len(message.deliveries) - len(fresh))
        if fresh:
            self._last_token = fresh[-1].token
        done = []
        reported_at = time.monotonic()
        table = self._table
        for position, delivery in enumerate(fresh):
            # HandlerTable.handle spelled out: one Python frame less per delivery. This loop
            # runs deep in the stack Thespian forked the process in, and one frame more here
            # crossed CPython's 16 KB frame-stack chunk: a fresh chunk mapped and unmapped
            # for every delivery (measured: 2 page faults each, member CPU 2.4 times).
            outcome = table.deferred(delivery) if table.blocking else None
            if outcome is None:
                outcome = table.process_one(delivery)
                if outcome.kind != SUCCEEDED or table.blocking:
                    table.settled(delivery, outcome)
            done.append(outcome)
            if position + 1 < len(fresh) and time.monotonic() - reported_at >= REPORT_INTERVAL:
                self.send(sender, Completion.of(done, self._index, final=False))
                done = []
                reported_at = time.monotonic()
        # Answered even when empty: the Router counts the dispatch outstanding until it is.
        self.send(sender, Completion.of(done, self._index))

    def receiveMsg_ActorExitRequest(self, message, sender) -> None:
        self._table.close()
