"""The Router: routing key → pool member, and what each member holds.

It is the parent of the pool. Two rules keep per-key order whatever the
transport does: the Bridge's dispatches are routed in their sequence
order, and each member has at most one dispatch outstanding — what
arrives meanwhile waits here and goes as the member's next batch. The
Router also knows every delivery a member holds, so that nothing handed
to a member that dies is silently lost (Thespian drops messages sent to
a dead address).
"""
from __future__ import annotations

import logging
import os
from collections import defaultdict

from actorbus.actors.aggregate import AggregateActor
from actorbus.actors.base import BusActor
from actorbus.actors.messages import (UNDELIVERED, AggregateReady, Completion, Delivery, Dispatch,
                                      HandlerRegistered, HandlerSpec, Outcome, PoolReady,
                                      RegisterHandler, StartAggregate, StartPool)
from actorbus.actors.routing import pool_index

log = logging.getLogger("actorbus.actors")

#: Most deliveries in one dispatch to a member.
MAX_MEMBER_BATCH = 256


class _Member:
    """The Router's view of one pool member."""

    __slots__ = ("address", "pid", "busy", "waiting", "held")

    def __init__(self, address) -> None:
        self.address = address
        self.pid: int | None = None
        self.busy = False                        # a dispatch is outstanding
        self.waiting: list[Delivery] = []        # routed here, not yet sent
        self.held: dict[int, Delivery] = {}      # sent or waiting, not completed


class Router(BusActor):
    """Routes dispatches from the Bridge onto the pool and forwards completions back."""

    def __init__(self) -> None:
        super().__init__()
        self._supervisor = None
        self._bridge = None
        self._members: list[_Member | None] = []   # None once dead
        self._specs: list[HandlerSpec] = []
        self._next_sequence = 1
        self._early: dict[int, Dispatch] = {}
        self._shutting_down = False

    # ------------------------------------------------------------ set-up
    def receiveMsg_StartPool(self, message: StartPool, sender) -> None:
        self._supervisor = sender
        self._bridge = message.bridge
        for index in range(message.size):
            member = _Member(self.createActor(AggregateActor))
            self._members.append(member)
            self.send(member.address, StartAggregate(index, tuple(self._specs)))

    def receiveMsg_AggregateReady(self, message: AggregateReady, sender) -> None:
        self._members[message.index].pid = message.pid
        if all(m is not None and m.pid is not None for m in self._members):
            self.send(self._supervisor, PoolReady(tuple(m.pid for m in self._members), os.getpid()))

    def receiveMsg_RegisterHandler(self, message: RegisterHandler, sender) -> None:
        self._specs.append(message.spec)
        # Sent before any later dispatch to the same member, so it arrives first.
        for member in self._members:
            if member is not None:
                self.send(member.address, message)
        self.send(sender, HandlerRegistered(message.request_id))

    # ------------------------------------------------------------ hot path
    def receiveMsg_Dispatch(self, message: Dispatch, sender) -> None:
        if message.sequence != self._next_sequence:
            self._early[message.sequence] = message
            return
        self._route(message)
        self._next_sequence += 1
        while self._next_sequence in self._early:
            self._route(self._early.pop(self._next_sequence))
            self._next_sequence += 1

    def _route(self, message: Dispatch) -> None:
        size = len(self._members)
        groups: dict[int, list[Delivery]] = defaultdict(list)
        for delivery in message.deliveries:
            groups[pool_index(delivery.routing_key, delivery.keyless_slot, size)].append(delivery)
        lost: list[Outcome] = []
        for index, deliveries in groups.items():
            member = self._members[index]
            if member is None:
                lost.extend(Outcome(d.token, UNDELIVERED, f"pool member {index} is not running", 0)
                            for d in deliveries)
                continue
            member.waiting.extend(deliveries)
            for delivery in deliveries:
                member.held[delivery.token] = delivery
            self._send_next(member)
        if lost:
            self.send(self._bridge, Completion(tuple(lost)))

    def _send_next(self, member: _Member) -> None:
        if member.busy or not member.waiting:
            return
        batch = member.waiting[:MAX_MEMBER_BATCH]
        del member.waiting[:MAX_MEMBER_BATCH]
        member.busy = True
        self.send(member.address, Dispatch(tuple(batch)))

    def receiveMsg_Completion(self, message: Completion, sender) -> None:
        member = self._members[message.member] if 0 <= message.member < len(self._members) else None
        if member is not None:
            for outcome in message.outcomes:
                member.held.pop(outcome.token, None)
            member.busy = False
            self._send_next(member)
        self.send(self._bridge, message)

    # ------------------------------------------------------------ failures
    def receiveMsg_ActorExitRequest(self, message, sender) -> None:
        self._shutting_down = True

    def receiveMsg_ChildActorExited(self, message, sender) -> None:
        if self._shutting_down:
            return
        index = self._member_index(message.childAddress)
        if index is None:
            return
        member, self._members[index] = self._members[index], None
        log.error("pool member %d exited holding %d message(s); they are failed back to the Bridge",
                  index, len(member.held))
        if member.held:
            self.send(self._bridge, Completion(tuple(
                Outcome(token, UNDELIVERED, f"pool member {index} exited", 0) for token in member.held)))

    def receiveMsg_PoisonMessage(self, message, sender) -> None:
        # A member raised twice on a dispatch (a bug in our own code): fail it by kind.
        returned = message.poisonMessage
        if not isinstance(returned, Dispatch):
            log.error("returned as poison from %s: %r", sender, returned)
            return
        index = self._member_index(sender)
        if index is not None:
            member = self._members[index]
            for delivery in returned.deliveries:
                member.held.pop(delivery.token, None)
            member.busy = False
            self._send_next(member)
        self.send(self._bridge, Completion(tuple(
            Outcome(d.token, UNDELIVERED, f"pool member failed on dispatch: {message.details}", 0)
            for d in returned.deliveries)))

    def _member_index(self, address) -> int | None:
        # Thespian addresses are not hashable: a linear search over the pool.
        for index, member in enumerate(self._members):
            if member is not None and member.address == address:
                return index
        return None
