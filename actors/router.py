"""The Router: the parent and supervisor of the pool, and where its members are.

It creates the members, restarts them under its policy and tells the
Bridge where each one is (:class:`PoolMembers`): once all have started,
and whenever one dies or is back. The Bridge routes (routing key →
member) and sends each member its dispatches itself, one actor hop from
the Bridge to a handler and one back (see :mod:`actorbus.actors.pool`);
it also keeps what each member holds, so that nothing handed to a member
that dies is silently lost (Thespian drops messages sent to a dead
address): the Bridge re-sends it, in order, once the Router says the
member is back.
"""
from __future__ import annotations

import enum
import logging
import os

from thespian.actors import ActorExitRequest, ChildActorExited, PoisonMessage, WakeupMessage

from actorbus.actors.base import BusActor
from actorbus.actors.member import PoolMember
from actorbus.actors.messages import (Address, BridgeChanged, HandlerRegistered, MemberDied, MemberReady,
                                      MemberRestarted, PoolFailed, PoolMembers, PoolReady,
                                      LivenessCheck, RegisterHandler, RestartDue, StartMember, StartPool,
                                      index_of_address)
from actorbus.config import SubscriptionConfig
from actorbus.policies import RestartBudget
from actorbus.processes import process_alive
from actorbus.snapshots import SnapshotStores

log = logging.getLogger("actorbus.actors")

#: Seconds between two looks at whether each member's process still runs (see
#: :class:`LivenessCheck`): how long a death Thespian did not report goes unnoticed.
LIVENESS_INTERVAL = 1.0

class RouterPhase(enum.Enum):
    """Where the Router is in its life."""

    RUNNING = enum.auto()    # routing and restarting members
    STOPPING = enum.auto()   # the actor system is shutting down: members' exits are expected
    FAILED = enum.auto()     # members died faster than the policy allows: nothing more is sent


class _Member:
    """The Router's view of one pool member."""

    __slots__ = ("address", "pid", "restarting", "ready")

    def __init__(self, address: Address) -> None:
        self.address: Address | None = address
        self.pid: int | None = None
        self.restarting = False                  # dead; a new incarnation is on its way
        self.ready = False                       # this incarnation has started


class _Registration:
    """A handler registration waiting for the members' answers."""

    __slots__ = ("asker", "pending", "errors", "name")

    def __init__(self, asker: Address, pending: set[int], name: str) -> None:
        self.asker = asker
        self.pending = pending           # member indices not answered yet
        self.errors: list[str] = []
        self.name = name                 # the subscription's


class Router(BusActor):
    """Creates and restarts the pool members; tells the Bridge where they are."""

    def __init__(self) -> None:
        super().__init__()
        self._supervisor = None
        self._bridges: list[Address | None] = []   # each Bridge dispatches to every member
        self._members: list[_Member] = []
        self._subscriptions: list[SubscriptionConfig] = []
        self._snapshots: SnapshotStores | None = None
        self._budget = RestartBudget()
        self._phase = RouterPhase.RUNNING
        self._announced = False   # the Bridge has been told where the members are
        self._registering: dict[int, _Registration] = {}   # by request id

    # ------------------------------------------------------------ set-up
    def receiveMsg_StartPool(self, message: StartPool, sender: Address) -> None:
        self._supervisor = sender
        self._bridges = list(message.bridges)
        self._budget = RestartBudget(message.policy)
        self._subscriptions = list(message.subscriptions)
        self._snapshots = message.snapshots
        for index in range(message.size):
            member = _Member(self.createActor(PoolMember))
            self._members.append(member)
            self.send(member.address, StartMember(index, tuple(self._subscriptions), self._snapshots))
        self.wakeupAfter(LIVENESS_INTERVAL, payload=LivenessCheck())

    def receiveMsg_MemberReady(self, message: MemberReady, sender: Address) -> None:
        member = self._members[message.index]
        member.pid = message.pid
        member.ready = True
        if member.restarting:
            member.restarting = False
            self._announce()
            self.send(self._supervisor, MemberRestarted(message.index, message.pid))
        else:
            pids = tuple(m.pid for m in self._members if m.pid is not None)
            if len(pids) == len(self._members):
                self._announce()
                self.send(self._supervisor, PoolReady(pids, os.getpid()))

    def _announce(self, bridges: list[Address | None] | None = None) -> None:
        """Tell the Bridges (or those of ``bridges``) where every member is (None where one is
        not up)."""
        if not self._bridges or not all(m.ready or m.restarting for m in self._members):
            return   # all at once the first time: a restarted pool replaces the old as a whole
        self._announced = True
        where = PoolMembers(tuple(m.address if m.ready else None for m in self._members))
        for bridge in self._bridges if bridges is None else bridges:
            if bridge is not None:   # None: a Bridge being restarted hears it once it is back
                self.send(bridge, where)

    def receiveMsg_RegisterHandler(self, message: RegisterHandler, sender: Address) -> None:
        self._subscriptions = [s for s in self._subscriptions
                               if s.name != message.subscription.name]
        self._subscriptions.append(message.subscription)
        # Sent before any later dispatch to the same member, so it arrives first.
        pending = set()
        for index, member in enumerate(self._members):
            if member.address is not None:
                self.send(member.address, message)
                pending.add(index)
        self._registering[message.request_id] = _Registration(sender, pending,
                                                              message.subscription.name)
        self._answer_registration(message.request_id)

    def receiveMsg_HandlerRegistered(self, message: HandlerRegistered, sender: Address) -> None:
        waiting = self._registering.get(message.request_id)
        if waiting is None:
            return
        waiting.pending.discard(message.member)
        if message.error:
            waiting.errors.append(message.error)
        self._answer_registration(message.request_id)

    def _answer_registration(self, request_id: int) -> None:
        """Answer the Supervisor once no member is pending; the first error refuses it."""
        waiting = self._registering[request_id]
        if waiting.pending:
            return
        del self._registering[request_id]
        error = waiting.errors[0] if waiting.errors else None
        if error is not None:
            # Not kept: a restarted member would only fail on it again.
            self._subscriptions = [s for s in self._subscriptions if s.name != waiting.name]
        self.send(waiting.asker, HandlerRegistered(request_id, error))

    def receiveMsg_BridgeChanged(self, message: BridgeChanged, sender: Address) -> None:
        # What the old Bridge dispatched still runs; its completions go to the dead
        # Bridge and JetStream redelivers those messages after AckWait.
        self._bridges[message.index] = message.bridge
        if self._announced:
            self._announce([message.bridge])

    # ------------------------------------------------------------ failures
    def receiveMsg_ActorExitRequest(self, message: ActorExitRequest, sender: Address) -> None:
        self._phase = RouterPhase.STOPPING

    def receiveMsg_ChildActorExited(self, message: ChildActorExited, sender: Address) -> None:
        if self._phase is RouterPhase.STOPPING:
            return
        index = self._member_index(message.childAddress)
        if index is None:
            return
        log.warning("pool member %d (pid %s) exited; the Bridge re-sends what it held once it "
                    "is back", index, self._members[index].pid)
        self._member_exited(index)
        self._check_liveness()   # another may have died with it, unannounced

    def _check_liveness(self) -> None:
        """Treat a member whose process is gone as exited, though no word of it came."""
        for index, member in enumerate(self._members):
            if self._phase is not RouterPhase.RUNNING:
                return
            pid = member.pid
            if member.address is None or pid is None or pid == os.getpid() or process_alive(pid):
                continue
            log.warning("pool member %d (pid %d) is gone without word of its exit; restarting it "
                        "as any exited member", index, pid)
            self._member_exited(index)

    def _member_exited(self, index: int) -> None:
        """Member ``index`` is dead: say so, and restart it (and the others, under
        all-for-one) when the budget allows."""
        member = self._members[index]
        self._bury(member)
        self._announce()
        self.send(self._supervisor, MemberDied(index))
        # Its restart gets every subscription with StartMember: do not wait for its answer.
        for request_id in list(self._registering):
            self._registering[request_id].pending.discard(index)
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
            self._announce()
        for i, m in enumerate(self._members):
            if m.restarting and m.address is None:
                self.wakeupAfter(decision.delay, payload=RestartDue(i))

    def receiveMsg_WakeupMessage(self, message: WakeupMessage, sender: Address) -> None:
        if isinstance(message.payload, LivenessCheck):
            self._check_liveness()
            if self._phase is RouterPhase.RUNNING:
                self.wakeupAfter(LIVENESS_INTERVAL, payload=LivenessCheck())
            return
        if not isinstance(message.payload, RestartDue):
            return
        index = message.payload.target
        member = self._members[index]
        if self._phase is not RouterPhase.RUNNING or not member.restarting \
                or member.address is not None:
            return
        member.address = self.createActor(PoolMember)
        self.send(member.address, StartMember(index, tuple(self._subscriptions), self._snapshots))

    def _bury(self, member: _Member) -> None:
        member.address = None
        member.pid = None
        member.ready = False
        member.restarting = True

    def _fail(self, reason: str) -> None:
        # Nothing held is failed back: acking while broken would lose plain
        # messages. It all stays un-acked for JetStream to redeliver.
        self._phase = RouterPhase.FAILED
        log.error("the pool gives up: %s", reason)
        self.send(self._supervisor, PoolFailed(reason))

    def receiveMsg_PoisonMessage(self, message: PoisonMessage, sender: Address) -> None:
        log.error("returned as poison from %s: %r", sender, message.poisonMessage)

    def _member_index(self, address: Address) -> int | None:
        return index_of_address((member.address for member in self._members), address)
