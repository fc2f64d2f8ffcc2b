"""The Router: routing key → pool member, and what each member holds.

It is the parent of the pool. It keeps, per member, the deliveries sent
and not yet completed, so that nothing handed to a member that dies is
silently lost (Thespian drops messages sent to a dead address).
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


class Router(BusActor):
    """Routes dispatches from the Bridge onto the pool and forwards completions back."""

    def __init__(self) -> None:
        super().__init__()
        self._supervisor = None
        self._bridge = None
        self._members: list = []             # address, or None once dead
        self._member_pids: dict[int, int] = {}
        self._held: list[dict[int, Delivery]] = []   # per member, in send order
        self._specs: list[HandlerSpec] = []
        self._shutting_down = False

    # ------------------------------------------------------------ set-up
    def receiveMsg_StartPool(self, message: StartPool, sender) -> None:
        self._supervisor = sender
        self._bridge = message.bridge
        for index in range(message.size):
            member = self.createActor(AggregateActor)
            self._members.append(member)
            self._held.append({})
            self.send(member, StartAggregate(index, tuple(self._specs)))

    def receiveMsg_AggregateReady(self, message: AggregateReady, sender) -> None:
        self._member_pids[message.index] = message.pid
        if len(self._member_pids) == len(self._members):
            pids = tuple(self._member_pids[i] for i in range(len(self._members)))
            self.send(self._supervisor, PoolReady(pids, os.getpid()))

    def receiveMsg_RegisterHandler(self, message: RegisterHandler, sender) -> None:
        self._specs.append(message.spec)
        # Sent before any later dispatch to the same member, so it arrives first.
        for member in self._members:
            if member is not None:
                self.send(member, message)
        self.send(sender, HandlerRegistered(message.request_id))

    # ------------------------------------------------------------ hot path
    def receiveMsg_Dispatch(self, message: Dispatch, sender) -> None:
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
            held = self._held[index]
            for delivery in deliveries:
                held[delivery.token] = delivery
            self.send(member, Dispatch(tuple(deliveries)))
        if lost:
            self.send(self._bridge, Completion(tuple(lost)))

    def receiveMsg_Completion(self, message: Completion, sender) -> None:
        if 0 <= message.member < len(self._held):
            held = self._held[message.member]
            for outcome in message.outcomes:
                held.pop(outcome.token, None)
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
        self._members[index] = None
        held, self._held[index] = self._held[index], {}
        log.error("pool member %d exited holding %d message(s); they are failed back to the Bridge",
                  index, len(held))
        if held:
            self.send(self._bridge, Completion(tuple(
                Outcome(token, UNDELIVERED, f"pool member {index} exited", 0) for token in held)))

    def receiveMsg_PoisonMessage(self, message, sender) -> None:
        # A member raised twice on a dispatch (a bug in our own code): fail it by kind.
        returned = message.poisonMessage
        if not isinstance(returned, Dispatch):
            log.error("returned as poison from %s: %r", sender, returned)
            return
        index = self._member_index(sender)
        if index is not None:
            for delivery in returned.deliveries:
                self._held[index].pop(delivery.token, None)
        self.send(self._bridge, Completion(tuple(
            Outcome(d.token, UNDELIVERED, f"pool member failed on dispatch: {message.details}", 0)
            for d in returned.deliveries)))

    def _member_index(self, address) -> int | None:
        # Thespian addresses are not hashable: a linear search over the pool.
        for index, member in enumerate(self._members):
            if member is not None and member == address:
                return index
        return None
