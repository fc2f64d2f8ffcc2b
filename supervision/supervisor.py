"""The root of the bus: creates the Router (and its pool) and the Bridges, and
relays the facade's requests to them.

A bus runs one Bridge, or several that share its partitioned subscriptions
(``BusConfig.bridges``); each is started, watched and restarted on its own,
and a request that concerns them all (subscribe, stats, stop) is sent to
each and answered once all have answered.

It is an ordinary Thespian actor: a program with its own ``ActorSystem``
creates it there and sends it :class:`StartBus`, exactly as the
``EventBus`` facade does.
"""
from __future__ import annotations

import dataclasses
import enum
import logging
import os
from collections import Counter
from collections.abc import Mapping
from typing import Any

from thespian.actors import ActorExitRequest, ChildActorExited, WakeupMessage

from actorbus.actors.base import BusActor
from actorbus.actors.messages import (MEMBER_PREFIX, ActorState, Address, BridgeChanged,
                                      LivenessCheck,
                                      BridgeReady, BusStarted, BusStopped, Halt,
                                      HandlerRegistered, MemberDied, MemberRestarted, PinsHeld,
                                      PoolFailed, PoolReady, RegisterHandler, RequestFailed,
                                      RestartDue, RouterChanged, StartBridge, StartBus, StartPool,
                                      Stats, StatsRequest, StopBus, Subscribe, Subscribed,
                                      bridge_name, index_of_address, member_name)
from actorbus.actors.router import LIVENESS_INTERVAL, Router
from actorbus.bridge.actor import Bridge
from actorbus.bridge.snapshot_store import KvSnapshotStores
from actorbus.config import BusConfig, SubscriptionConfig
from actorbus.policies import RestartBudget
from actorbus.processes import process_alive, sigkill

log = logging.getLogger("actorbus.supervision")

_ROUTER = "router"


class SupervisorPhase(enum.Enum):
    """Where the Supervisor is in its life."""

    IDLE = enum.auto()       # created; no StartBus yet
    RUNNING = enum.auto()    # started (or starting): relaying requests, restarting children
    STOPPING = enum.auto()   # the actor system is shutting down: children's exits are expected
    FAILED = enum.auto()     # past the root's restart limit: the bus has stopped processing


class _BridgeSlot:
    """The Supervisor's view of one Bridge, across its restarts."""

    __slots__ = ("index", "address", "incarnation", "pins", "last_counts")

    def __init__(self, index: int, address: Address) -> None:
        self.index = index
        self.address: Address | None = address   # None: dead, a restart may follow
        self.incarnation = 0
        self.pins: dict[str, str] = {}            # its pins, for the next one if it dies
        self.last_counts: dict[str, int] = {}     # as of its last Stats


class _Gathering:
    """A request sent to several Bridges, answered once each has answered (or died)."""

    __slots__ = ("waiting", "replies", "asked", "subscription")

    def __init__(self, waiting: set[int], subscription: SubscriptionConfig | None = None) -> None:
        self.waiting = waiting
        self.replies: dict[int, Any] = {}
        self.asked: set[int] = set()
        self.subscription = subscription


class Supervisor(BusActor):
    """Builds the bus in order (pool first, then the Bridges) and relays requests by id."""

    def __init__(self) -> None:
        super().__init__()
        self._phase = SupervisorPhase.IDLE
        self._config: BusConfig | None = None
        self._bridges: list[_BridgeSlot] = []
        self._router = None
        self._pids: dict[str, int] = {}
        # Our own id for each request → (who asked, their id): several clients
        # (the facade, the program's own actors) may number requests alike.
        self._waiting: dict[int, tuple[object, int]] = {}
        self._relay_ids = 0
        self._registering: dict[int, SubscriptionConfig] = {}     # by request id, at the pool
        self._subscribing: dict[int, _Gathering] = {}             # by request id, at the Bridges
        self._subscribed: list[SubscriptionConfig] = []          # what a restarted Bridge resumes
        self._stats: dict[int, _Gathering] = {}
        self._stopping: dict[int, _Gathering] = {}
        self._budget = RestartBudget()
        self._router_restarts_pending = False
        self._internal_ids = 0                       # negative request ids: our own requests
        self._carried: Counter[str] = Counter()      # counted by Bridges that have died
        self._start_request: int | None = None
        self._unready: set[int] = set()              # Bridges the start still waits for
        self._restarts: Counter[str] = Counter()    # by level: bridge, router, pool
        self._states: dict[str, ActorState] = {}
        self._failure: str | None = None             # why, once FAILED

    # ------------------------------------------------------------ start
    def receiveMsg_StartBus(self, message: StartBus, sender: Address) -> None:
        if self._phase is not SupervisorPhase.IDLE:
            self.send(sender, RequestFailed(message.request_id, "this Supervisor is already started"))
            return
        self._phase = SupervisorPhase.RUNNING
        self._config = config = message.config
        self._budget = RestartBudget(config.supervision.root)
        self._start_request = self._accept(message, sender)
        self._pids["supervisor"] = os.getpid()
        for index in range(config.bridges):
            self._bridges.append(_BridgeSlot(index, self.createActor(Bridge)))
            self._states[bridge_name(index)] = ActorState.STARTING
        self._unready = set(range(config.bridges))
        self.wakeupAfter(LIVENESS_INTERVAL, payload=LivenessCheck())
        if config.pool_size > 0:
            self._router = self.createActor(Router)
            self._states["router"] = ActorState.STARTING
            self.send(self._router, StartPool(config.pool_size, self._addresses(),
                                              policy=config.supervision.pool,
                                              snapshots=KvSnapshotStores(config)))
        else:
            self._start_bridges()

    def receiveMsg_PoolReady(self, message: PoolReady, sender: Address) -> None:
        self._pids["router"] = message.router_pid
        self._states["router"] = ActorState.RUNNING
        for index, pid in enumerate(message.pids):
            self._pids[member_name(index)] = pid
            self._states[member_name(index)] = ActorState.RUNNING
        if self._router_restarts_pending:
            self._resume_pool()
            return
        # Only now may the Bridges fetch: a key is never handled before its actor exists.
        self._start_bridges()

    def _start_bridges(self) -> None:
        assert self._config is not None and self._start_request is not None  # StartBus came first
        for slot in self._bridges:
            self.send(slot.address, StartBridge(self._start_request, self._config, self._router,
                                                index=slot.index, bridges=len(self._bridges)))

    def receiveMsg_PinsHeld(self, message: PinsHeld, sender: Address) -> None:
        slot = self._slot_of(sender)
        if slot is not None:
            slot.pins = dict(message.pins)

    def receiveMsg_BridgeReady(self, message: BridgeReady, sender: Address) -> None:
        slot = self._slot_of(sender)
        if slot is None:
            return
        name = bridge_name(slot.index)
        self._pids[name] = message.pid
        self._states[name] = ActorState.RUNNING
        if message.request_id < 0:   # a restarted Bridge: resume every durable consumer
            self._restarts["bridge"] += 1
            log.warning("%s restarted (pid %d); resuming %d subscription(s)",
                        _shown(slot.index), message.pid, len(self._subscribed))
            for subscription in self._subscribed:
                self.send(slot.address, Subscribe(self._next_internal_id(), subscription))
            return
        self._unready.discard(slot.index)
        if not self._unready:
            self._reply(BusStarted(message.request_id, dict(self._pids)))

    # ------------------------------------------------------------ requests
    def receiveMsg_Subscribe(self, message: Subscribe, sender: Address) -> None:
        request_id = self._accept(message, sender)
        if self._router is None:
            self._subscribe_bridges(request_id, message.subscription)
            return
        self._registering[request_id] = message.subscription
        self.send(self._router, RegisterHandler(request_id, message.subscription))

    def receiveMsg_HandlerRegistered(self, message: HandlerRegistered, sender: Address) -> None:
        subscription = self._registering.pop(message.request_id, None)
        if message.error is not None:
            # Refused before the Bridges subscribe: nothing is fetched for a handler
            # the pool cannot run.
            if subscription is None:
                log.error("a restarted pool could not import a handler: %s", message.error)
                return
            self._reply(RequestFailed(message.request_id,
                                      f"the pool cannot run handler {subscription.handler}: "
                                      f"{message.error}"))
            return
        if subscription is not None:
            self._subscribe_bridges(message.request_id, subscription)

    def _subscribe_bridges(self, request_id: int, subscription: SubscriptionConfig) -> None:
        self._subscribing[request_id] = _Gathering({slot.index for slot in self._bridges},
                                                   subscription)
        self._subscribe_next(request_id)

    def receiveMsg_Subscribed(self, message: Subscribed, sender: Address) -> None:
        slot = self._slot_of(sender)
        gathering = self._subscribing.get(message.request_id)
        if slot is None or gathering is None:
            return   # a restarted Bridge resumed one, or the request already failed
        gathering.replies[slot.index] = message
        gathering.waiting.discard(slot.index)
        self._subscribe_next(message.request_id)

    def _subscribe_next(self, request_id: int) -> None:
        """Ask the first live Bridge; once it has answered, the others (it created the
        streams, which they then find); answer once none is waited for."""
        gathering = self._subscribing[request_id]
        subscription = gathering.subscription
        assert subscription is not None   # a subscribing gathering has one
        # A dead Bridge is not waited for: its restart resumes what was subscribed.
        gathering.waiting = {i for i in gathering.waiting if self._bridges[i].address is not None}
        due = sorted(gathering.waiting - gathering.asked)
        if not gathering.replies and not (gathering.asked & gathering.waiting):
            due = due[:1]
        elif not gathering.replies:
            due = []
        for index in due:
            gathering.asked.add(index)
            self._send_to(index, Subscribe(request_id, subscription))
        if gathering.waiting:
            return
        del self._subscribing[request_id]
        self._subscribed.append(subscription)
        first = gathering.replies.get(0) or next(iter(gathering.replies.values()), None)
        self._reply(first or Subscribed(request_id, subscription.stream, subscription.durable))

    def receiveMsg_StatsRequest(self, message: StatsRequest, sender: Address) -> None:
        request_id = self._accept(message, sender)
        live = {slot.index for slot in self._bridges if slot.address is not None}
        self._stats[request_id] = _Gathering(live)
        for index in sorted(live):
            self._send_to(index, StatsRequest(request_id))
        self._stats_done(request_id)

    def receiveMsg_Stats(self, message: Stats, sender: Address) -> None:
        slot = self._slot_of(sender)
        gathering = self._stats.get(message.request_id)
        if slot is None or gathering is None:
            return
        slot.last_counts = dict(message.counts)
        gathering.replies[slot.index] = message
        gathering.waiting.discard(slot.index)
        self._stats_done(message.request_id)

    def _stats_done(self, request_id: int) -> None:
        gathering = self._stats[request_id]
        if gathering.waiting:
            return
        del self._stats[request_id]
        totals: Counter[str] = Counter(self._carried)
        by_subscription: dict[str, dict[str, Any]] = {}
        depths: list[int] = []
        lag: dict[str, Mapping[str, float]] = {}
        # A Bridge that died meanwhile has no reply: what it last reported is carried.
        for reply in gathering.replies.values():
            totals.update(reply.counts)
            lag.update(reply.lag)
            for name, tally in reply.by_subscription.items():
                _add_tally(by_subscription.setdefault(name, {}), tally)
            depths.extend(0 for _ in range(len(reply.queue_depths) - len(depths)))
            for index, depth in enumerate(reply.queue_depths):
                depths[index] += depth
        counts = dict(totals)
        counts["bridges"] = len(self._bridges)
        counts["restarts"] = sum(self._restarts.values())
        for level in ("bridge", "router", "pool"):
            counts[f"restarts_{level}"] = self._restarts[level]
        self._reply(Stats(request_id, counts, dict(self._pids), self._failure,
                          dict(self._states), by_subscription, tuple(depths), lag))

    # ------------------------------------------------------------ the pool's health
    def receiveMsg_MemberDied(self, message: MemberDied, sender: Address) -> None:
        self._states[member_name(message.index)] = ActorState.RESTARTING

    def receiveMsg_MemberRestarted(self, message: MemberRestarted, sender: Address) -> None:
        self._restarts["pool"] += 1
        self._pids[member_name(message.index)] = message.pid
        self._states[member_name(message.index)] = ActorState.RUNNING
        log.warning("pool member %d restarted (pid %d); the Bridges re-send what it held",
                    message.index, message.pid)

    def receiveMsg_PoolFailed(self, message: PoolFailed, sender: Address) -> None:
        # Past the pool's limit, escalated to the root.
        self._give_up(message.reason)

    def receiveMsg_StopBus(self, message: StopBus, sender: Address) -> None:
        request_id = self._accept(message, sender)
        live = {slot.index for slot in self._bridges if slot.address is not None}
        self._stopping[request_id] = _Gathering(live)
        for index in sorted(live):
            self._send_to(index, StopBus(request_id, message.timeout))
        self._stopped_on_all(request_id)

    def receiveMsg_BusStopped(self, message: BusStopped, sender: Address) -> None:
        slot = self._slot_of(sender)
        gathering = self._stopping.get(message.request_id)
        if slot is None or gathering is None:
            return
        gathering.waiting.discard(slot.index)
        self._stopped_on_all(message.request_id)

    def _stopped_on_all(self, request_id: int) -> None:
        if not self._stopping[request_id].waiting:
            del self._stopping[request_id]
            self._reply(BusStopped(request_id))

    def receiveMsg_RequestFailed(self, message: RequestFailed, sender: Address) -> None:
        self._registering.pop(message.request_id, None)
        self._subscribing.pop(message.request_id, None)
        if message.request_id < 0:   # our own request: a restarted Bridge resuming
            slot = self._slot_of(sender)
            if slot is not None:
                # Left as it is, it would run on and consume nothing of that subscription:
                # it is ended, and restarted under the policy (past its limit the bus stops).
                log.error("%s (pid %s) could not resume a subscription: %s; restarting it",
                          _shown(slot.index), self._pids.get(bridge_name(slot.index)),
                          message.error)
                self.send(slot.address, ActorExitRequest())
            return
        self._reply(message)

    # ------------------------------------------------------------ failures
    def receiveMsg_ActorExitRequest(self, message: ActorExitRequest, sender: Address) -> None:
        self._phase = SupervisorPhase.STOPPING

    def receiveMsg_ChildActorExited(self, message: ChildActorExited, sender: Address) -> None:
        if self._phase is SupervisorPhase.STOPPING:
            return
        if self._router is not None and message.childAddress == self._router:
            self._router_exited()
        else:
            slot = self._slot_of(message.childAddress)
            if slot is None:
                return  # a late or repeated notice about an actor already replaced
            self._bridge_exited(slot)
        self._check_liveness()   # another may have died with it, unannounced

    def _check_liveness(self) -> None:
        """Treat a running child whose process is gone as exited, though no word of it came
        (see :class:`LivenessCheck`)."""
        if self._phase is not SupervisorPhase.RUNNING:
            return
        if self._router is not None and self._gone("router"):
            log.warning("the Router (pid %s) is gone without word of its exit",
                        self._pids.get("router"))
            self._router_exited()
        for slot in self._bridges:
            if self._phase is SupervisorPhase.RUNNING and slot.address is not None and \
                    self._gone(bridge_name(slot.index)):
                log.warning("%s (pid %s) is gone without word of its exit",
                            _shown(slot.index).capitalize(), self._pids.get(bridge_name(slot.index)))
                self._bridge_exited(slot)

    def _gone(self, name: str) -> bool:
        """The actor ``name`` runs (as last reported) in a process that is no more."""
        pid = self._pids.get(name)
        return self._states.get(name) is ActorState.RUNNING and pid is not None and \
            pid != os.getpid() and not process_alive(pid)

    def _bridge_exited(self, slot: _BridgeSlot) -> None:
        name = bridge_name(slot.index)
        self._states[name] = ActorState.RESTARTING
        # Its counters die with it: keep what it last reported.
        self._carried.update({k: v for k, v in slot.last_counts.items() if k not in _MOMENTARY})
        log.error("%s (pid %s) exited; JetStream redelivers what it had not acked",
                  _shown(slot.index).capitalize(), self._pids.get(name))
        slot.address = None
        slot.last_counts = {}
        # What waited for its answer does not wait for a dead Bridge.
        for request_id, gathering in list(self._stats.items()):
            gathering.waiting.discard(slot.index)
            gathering.replies.pop(slot.index, None)   # carried now
            self._stats_done(request_id)
        for request_id, gathering in list(self._stopping.items()):
            gathering.waiting.discard(slot.index)
            self._stopped_on_all(request_id)
        for request_id in list(self._subscribing):
            self._subscribe_next(request_id)
        self._restart_later(_shown(slot.index), slot.index)

    def _router_exited(self) -> None:
        self._states = {name: (ActorState.RESTARTING if name == "router" or name.startswith(MEMBER_PREFIX)
                               else state) for name, state in self._states.items()}
        # Its pool would linger as orphans: end it; the Bridges re-send what they held.
        orphans = [pid for name, pid in self._pids.items() if name.startswith(MEMBER_PREFIX)]
        log.error("the Router (pid %s) exited; ending its pool %s", self._pids.get("router"), orphans)
        sigkill(orphans)
        self._router = None
        self._restart_later("the Router", _ROUTER)

    def _restart_later(self, what: str, target: int | str) -> None:
        decision = self._budget.record()
        if decision.allowed:
            self.wakeupAfter(decision.delay, payload=RestartDue(target))
        else:
            self._give_up(self._budget.exhausted(what, decision))

    def _resume_pool(self) -> None:
        # The members got the handlers with StartPool, before the Bridges heard of them;
        # registered again so that one a restarted member cannot import is logged.
        self._router_restarts_pending = False
        for subscription in self._subscribed:
            self.send(self._router, RegisterHandler(self._next_internal_id(), subscription))
        self._restarts["router"] += 1
        for slot in self._bridges:
            if slot.address is not None:
                self.send(slot.address, RouterChanged(self._router))

    def receiveMsg_WakeupMessage(self, message: WakeupMessage, sender: Address) -> None:
        if isinstance(message.payload, LivenessCheck):
            self._check_liveness()
            if self._phase is SupervisorPhase.RUNNING:
                self.wakeupAfter(LIVENESS_INTERVAL, payload=LivenessCheck())
            return
        if not isinstance(message.payload, RestartDue) or self._phase is not SupervisorPhase.RUNNING:
            return
        config = self._config
        assert config is not None  # RUNNING: StartBus came first
        target = message.payload.target
        if target == _ROUTER:
            self._router_restarts_pending = True
            self._router = self.createActor(Router)
            self.send(self._router, StartPool(config.pool_size, self._addresses(),
                                              policy=config.supervision.pool,
                                              subscriptions=tuple(self._subscribed),
                                              snapshots=KvSnapshotStores(config)))
            return
        slot = self._bridges[target]
        slot.incarnation += 1
        slot.address = self.createActor(Bridge)
        if self._router is not None:
            self.send(self._router, BridgeChanged(slot.index, slot.address))
        self.send(slot.address, StartBridge(self._next_internal_id(), config, self._router,
                                            slot.incarnation, index=slot.index,
                                            bridges=len(self._bridges), pins=dict(slot.pins)))

    def _give_up(self, reason: str) -> None:
        # The root has no parent to escalate to: stop, never keep acking while broken.
        self._phase = SupervisorPhase.FAILED
        self._failure = reason
        self._states = {name: ActorState.STOPPED for name in self._states}
        log.error("the bus stops: %s; nothing more is fetched or settled", reason)
        for slot in self._bridges:
            if slot.address is not None:
                self.send(slot.address, Halt(reason))

    # ------------------------------------------------------------ helpers
    def _addresses(self) -> tuple[Address | None, ...]:
        return tuple(slot.address for slot in self._bridges)

    def _slot_of(self, address: Address) -> _BridgeSlot | None:
        index = index_of_address(self._addresses(), address)
        return None if index is None else self._bridges[index]

    def _send_to(self, index: int, message: Any) -> None:
        address = self._bridges[index].address
        if address is not None:
            self.send(address, message)

    def _next_internal_id(self) -> int:
        self._internal_ids -= 1
        return self._internal_ids

    def _accept(self, message: Any, sender: Address) -> int:
        """Our own id for a client's request, remembered with who asked and their id."""
        self._relay_ids += 1
        self._waiting[self._relay_ids] = (sender, message.request_id)
        return self._relay_ids

    def _reply(self, message: Any) -> None:
        waiting = self._waiting.pop(message.request_id, None)
        if waiting is not None:
            client, their_id = waiting
            self.send(client, dataclasses.replace(message, request_id=their_id))


#: Counts that say how things are now, not how many happened: not carried past a Bridge's death.
_MOMENTARY = frozenset({"in_flight", "held", "pinned", "standby", "partitions_owned",
                        "group_members", "nats_disconnected"})


def _shown(index: int) -> str:
    """How log lines name Bridge ``index``."""
    return "the Bridge" if index == 0 else f"Bridge {index}"


def _add_tally(total: dict[str, Any], tally: dict[str, Any]) -> None:
    """Add one Bridge's tally of a subscription to the bus's (see ``SubscriptionTally``)."""
    if not total:
        total.update(kind=tally.get("kind"), counts={}, buckets=[], duration_sum=0.0, bridges=0)
    counts = Counter(total["counts"])
    counts.update(tally.get("counts", {}))
    total["counts"] = dict(counts)
    buckets = total["buckets"]
    for index, value in enumerate(tally.get("buckets", ())):
        if index < len(buckets):
            buckets[index] += value
        else:
            buckets.append(value)
    total["duration_sum"] += tally.get("duration_sum", 0.0)
    total["bridges"] += tally.get("bridges", 0)
