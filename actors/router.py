"""The Router: routing key → pool member, and what each member holds.

It is the parent of the pool. Numbering keeps per-key order whatever
order the transport delivers in: the Bridge's dispatches are routed in
their sequence order, and each member's dispatches are numbered for it
and handled there in that order. A member has at most
``MAX_MEMBER_DISPATCHES`` outstanding; what arrives meanwhile waits here
and goes as its next batch. The
Router also knows every delivery a member holds, so that nothing handed
to a member that dies is silently lost (Thespian drops messages sent to
a dead address).
"""
from __future__ import annotations

import dataclasses
import enum
import logging
import os
from collections import defaultdict

from thespian.actors import ActorExitRequest

from actorbus.actors.base import BusActor
from actorbus.actors.member import PoolMember
from actorbus.actors.messages import (UNDELIVERED, BridgeChanged, Completion, Delivery, Dispatch,
                                      HandlerRegistered, MemberDied, MemberReady, MemberRestarted,
                                      Outcome, PoolFailed, PoolReady, RegisterHandler, RestartDue,
                                      StartMember, StartPool)
from actorbus.actors.routing import pool_index
from actorbus.actors.sequencing import Resequencer
from actorbus.config import SubscriptionConfig
from actorbus.policies import RestartBudget

log = logging.getLogger("actorbus.actors")

#: Most deliveries in one dispatch to a member.
MAX_MEMBER_BATCH = 512
#: Most dispatches outstanding per member: the next is queued there while
#: it works on one, so it does not sit idle for a round trip.
MAX_MEMBER_DISPATCHES = 2

#: Most routing keys whose pool index the Router remembers before it starts afresh.
_MAX_REMEMBERED_KEYS = 100_000



class RouterPhase(enum.Enum):
    """Where the Router is in its life."""

    RUNNING = enum.auto()    # routing and restarting members
    STOPPING = enum.auto()   # the actor system is shutting down: members' exits are expected
    FAILED = enum.auto()     # members died faster than the policy allows: nothing more is sent


class _Member:
    """The Router's view of one pool member."""

    __slots__ = ("address", "pid", "outstanding", "sent", "restarting", "waiting", "held",
                 "suspects")

    def __init__(self, address) -> None:
        self.address = address
        self.pid: int | None = None
        self.outstanding = 0                     # dispatches sent, not completed
        self.sent = 0                            # dispatches sent to this incarnation
        self.restarting = False                  # dead; a new incarnation is on its way
        self.waiting: list[Delivery] = []        # routed here, not yet sent
        self.held: dict[int, Delivery] = {}      # sent or waiting, not completed, in order
        # Tokens that reached an incarnation that died: re-sent one at a time
        # until each completes, so a delivery that kills its member is found
        # exactly and the others are not failed with it.
        self.suspects: set[int] = set()


class Router(BusActor):
    """Routes dispatches from the Bridge onto the pool and forwards completions back."""

    def __init__(self) -> None:
        super().__init__()
        self._supervisor = None
        self._bridge = None
        self._members: list[_Member] = []
        self._subscriptions: list[SubscriptionConfig] = []
        self._budget = RestartBudget()
        self._max_resends = 3
        self._resends: dict[int, int] = {}      # token → times re-sent
        self._phase = RouterPhase.RUNNING
        self._dispatches: Resequencer[Dispatch] = Resequencer()   # the Bridge's, by its numbers
        self._member_of_key: dict[str, int] = {}   # routing key → pool index, remembered
        # Registrations waiting for members:
        # request id → [who asked, indices pending, errors, subscription name].
        self._registering: dict[int, list] = {}

    # ------------------------------------------------------------ set-up
    def receiveMsg_StartPool(self, message: StartPool, sender) -> None:
        self._supervisor = sender
        self._bridge = message.bridge
        self._budget = RestartBudget(message.policy)
        self._max_resends = message.max_resends
        for index in range(message.size):
            member = _Member(self.createActor(PoolMember))
            self._members.append(member)
            self.send(member.address, StartMember(index, tuple(self._subscriptions)))

    def receiveMsg_MemberReady(self, message: MemberReady, sender) -> None:
        member = self._members[message.index]
        member.pid = message.pid
        if member.restarting:
            self._resume(message.index, member)
        else:
            pids = [m.pid for m in self._members]
            if all(pid is not None for pid in pids):
                self.send(self._supervisor, PoolReady(tuple(pids), os.getpid()))  # type: ignore[arg-type]

    def receiveMsg_RegisterHandler(self, message: RegisterHandler, sender) -> None:
        self._subscriptions = [s for s in self._subscriptions
                               if s.name != message.subscription.name]
        self._subscriptions.append(message.subscription)
        # Sent before any later dispatch to the same member, so it arrives first.
        pending = set()
        for index, member in enumerate(self._members):
            if member.address is not None:
                self.send(member.address, message)
                pending.add(index)
        self._registering[message.request_id] = [sender, pending, [],
                                                   message.subscription.name]
        self._answer_registration(message.request_id)

    def receiveMsg_HandlerRegistered(self, message: HandlerRegistered, sender) -> None:
        waiting = self._registering.get(message.request_id)
        if waiting is None:
            return
        waiting[1].discard(message.member)
        if message.error:
            waiting[2].append(message.error)
        self._answer_registration(message.request_id)

    def _answer_registration(self, request_id: int) -> None:
        """Answer the Supervisor once no member is pending; the first error refuses it."""
        sender, pending, errors, name = self._registering[request_id]
        if pending:
            return
        del self._registering[request_id]
        error = errors[0] if errors else None
        if error is not None:
            # Not kept: a restarted member would only fail on it again.
            self._subscriptions = [s for s in self._subscriptions if s.name != name]
        self.send(sender, HandlerRegistered(request_id, error))

    def receiveMsg_BridgeChanged(self, message: BridgeChanged, sender) -> None:
        # A new Bridge numbers its dispatches from 1 again. What the old one
        # dispatched still runs; its completions are unknown to the new Bridge
        # and JetStream redelivers those messages after AckWait.
        self._bridge = message.bridge
        self._dispatches.reset()

    # ------------------------------------------------------------ hot path
    def receiveMsg_Dispatch(self, message: Dispatch, sender) -> None:
        for dispatch in self._dispatches.arrived(message.sequence, message):
            self._route(dispatch)

    def _route(self, message: Dispatch) -> None:
        size = len(self._members)
        groups: dict[int, list[Delivery]] = defaultdict(list)
        members = self._member_of_key
        if len(members) > _MAX_REMEMBERED_KEYS:
            members.clear()
        for delivery in message.deliveries:
            if delivery.keyless_slot is not None:
                index = pool_index(delivery.routing_key, delivery.keyless_slot, size)
            else:
                # Hashing in Python costs about a microsecond a key; ids recur.
                remembered = members.get(delivery.routing_key)
                if remembered is not None:
                    index = remembered
                else:
                    index = members[delivery.routing_key] = pool_index(delivery.routing_key, None,
                                                                       size)
            groups[index].append(delivery)
        for index, deliveries in groups.items():
            member = self._members[index]
            member.waiting.extend(deliveries)
            for delivery in deliveries:
                member.held[delivery.token] = delivery
            self._send_next(member)

    def _send_next(self, member: _Member) -> None:
        if member.restarting or self._phase is not RouterPhase.RUNNING:
            return
        while member.waiting and member.outstanding < MAX_MEMBER_DISPATCHES:
            size = MAX_MEMBER_BATCH
            if member.suspects:
                if member.outstanding:
                    return
                size = 1
            batch = member.waiting[:size]
            del member.waiting[:size]
            member.outstanding += 1
            member.sent += 1
            self.send(member.address, Dispatch(tuple(batch), member.sent))

    def receiveMsg_Completion(self, message: Completion, sender) -> None:
        member = self._members[message.member] if 0 <= message.member < len(self._members) else None
        if member is not None and member.address == sender:
            held, resends = member.held, self._resends
            for token in message.tokens():
                held.pop(token, None)
                if resends:
                    resends.pop(token, None)
            if member.suspects:
                member.suspects.difference_update(message.tokens())
            if message.final:   # a partial report settles messages, not the dispatch
                member.outstanding = max(0, member.outstanding - 1)
                self._send_next(member)
        depths = tuple(len(m.held) for m in self._members)
        self.send(self._bridge, dataclasses.replace(message, queue_depths=depths,
                                                    routed=self._dispatches.next - 1))

    # ------------------------------------------------------------ failures
    def receiveMsg_ActorExitRequest(self, message, sender) -> None:
        self._phase = RouterPhase.STOPPING

    def receiveMsg_ChildActorExited(self, message, sender) -> None:
        if self._phase is RouterPhase.STOPPING:
            return
        index = self._member_index(message.childAddress)
        if index is None:
            return
        member = self._members[index]
        log.warning("pool member %d (pid %s) exited holding %d message(s)", index, member.pid,
                    len(member.held))
        self._bury(member)
        self.send(self._supervisor, MemberDied(index))
        # Its restart gets every subscription with StartMember: do not wait for its answer.
        for request_id in list(self._registering):
            self._registering[request_id][1].discard(index)
            self._answer_registration(request_id)
        if self._phase is RouterPhase.FAILED:
            return
        decision = self._budget.record()
        if not decision.allowed:
            self._fail(self._budget.exhausted(f"pool member {index}", decision))
            return
        if self._budget.policy.restarts_all:
            for other in self._members:
                if other is not member and other.address is not None:
                    # Its exit is part of this restart, not a failure of its own.
                    address = other.address
                    self._bury(other)
                    self.send(self._supervisor, MemberDied(self._members.index(other)))
                    self.send(address, ActorExitRequest())
        for i, m in enumerate(self._members):
            if m.restarting and m.address is None:
                self.wakeupAfter(decision.delay, payload=RestartDue(i))

    def receiveMsg_WakeupMessage(self, message, sender) -> None:
        if not isinstance(message.payload, RestartDue):
            return
        index = message.payload.target
        member = self._members[index]
        if self._phase is not RouterPhase.RUNNING or not member.restarting \
                or member.address is not None:
            return
        member.address = self.createActor(PoolMember)
        self.send(member.address, StartMember(index, tuple(self._subscriptions)))

    def _bury(self, member: _Member) -> None:
        member.address = None
        member.pid = None
        member.outstanding = 0
        member.sent = 0   # a new incarnation expects dispatch 1 first
        member.restarting = True

    def _resume(self, index: int, member: _Member) -> None:
        """A member is back: re-send what its predecessor held, in the original order."""
        member.restarting = False
        exhausted: list[Outcome] = []
        resend: list[Delivery] = []
        # Only what reached the dead member counts as re-sent; what waited here did not.
        never_sent = {delivery.token for delivery in member.waiting}
        for token, delivery in list(member.held.items()):
            if token in never_sent:
                resend.append(delivery)
                continue
            count = self._resends.get(token, 0) + 1
            if count > self._max_resends:
                del member.held[token]
                self._resends.pop(token, None)
                member.suspects.discard(token)
                exhausted.append(Outcome(token, UNDELIVERED,
                                         f"pool member {index} died {count} times holding it", 0))
            else:
                self._resends[token] = count
                member.suspects.add(token)
                resend.append(delivery)
        member.waiting = resend
        if exhausted:
            self.send(self._bridge, Completion.of(exhausted))
        self.send(self._supervisor, MemberRestarted(index, member.pid or 0, len(resend)))
        self._send_next(member)

    def _fail(self, reason: str) -> None:
        # Nothing held is failed back: acking while broken would lose plain
        # messages. It all stays un-acked for JetStream to redeliver.
        self._phase = RouterPhase.FAILED
        log.error("the pool gives up: %s", reason)
        self.send(self._supervisor, PoolFailed(reason))

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
                self._resends.pop(delivery.token, None)
            member.outstanding = max(0, member.outstanding - 1)
            self._send_next(member)
        self.send(self._bridge,
                  returned.undelivered(f"pool member failed on dispatch: {message.details}"))

    def _member_index(self, address) -> int | None:
        # Thespian addresses are not hashable: a linear search over the pool.
        for index, member in enumerate(self._members):
            if member.address is not None and member.address == address:
                return index
        return None
