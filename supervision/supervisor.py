"""The root of the bus: creates the Router (and its pool) and the Bridge, and
relays the facade's requests to them.

It is an ordinary Thespian actor: a program with its own ``ActorSystem``
creates it there and sends it :class:`StartBus`, exactly as the
``EventBus`` facade does.
"""
from __future__ import annotations

import dataclasses
import enum
import logging
import os
import signal
from collections import Counter

from actorbus.actors.base import BusActor
from actorbus.actors.messages import (MEMBER_PREFIX, ActorState, BridgeChanged, BridgeReady, BusStarted,
                                      BusStopped, Halt, HandlerRegistered, MemberDied,
                                      MemberRestarted, PinsHeld, PoolFailed, PoolReady, RegisterHandler,
                                      RequestFailed, RestartDue, RouterChanged, StartBridge,
                                      StartBus, StartPool, Stats, StatsRequest, StopBus, Subscribe,
                                      Subscribed, member_name)
from actorbus.actors.router import Router
from actorbus.bridge.actor import Bridge
from actorbus.config import BusConfig, SubscriptionConfig
from actorbus.policies import RestartBudget

log = logging.getLogger("actorbus.supervision")

_BRIDGE = "bridge"
_ROUTER = "router"


class SupervisorPhase(enum.Enum):
    """Where the Supervisor is in its life."""

    IDLE = enum.auto()       # created; no StartBus yet
    RUNNING = enum.auto()    # started (or starting): relaying requests, restarting children
    STOPPING = enum.auto()   # the actor system is shutting down: children's exits are expected
    FAILED = enum.auto()     # past the root's restart limit: the bus has stopped processing


class Supervisor(BusActor):
    """Builds the bus in order (pool first, then the Bridge) and relays requests by id."""

    def __init__(self) -> None:
        super().__init__()
        self._phase = SupervisorPhase.IDLE
        self._config: BusConfig | None = None
        self._bridge = None
        self._router = None
        self._pids: dict[str, int] = {}
        # Our own id for each request → (who asked, their id): several clients
        # (the facade, the program's own actors) may number requests alike.
        self._waiting: dict[int, tuple[object, int]] = {}
        self._relay_ids = 0
        self._subscribing: dict[int, SubscriptionConfig] = {}    # by request id
        self._subscribed: list[SubscriptionConfig] = []          # what a restarted Bridge resumes
        self._budget = RestartBudget()
        self._bridge_incarnation = 0
        self._pins: dict[str, str] = {}   # the Bridge's, for the next one if it dies
        self._router_restarts_pending = False
        self._internal_ids = 0                       # negative request ids: our own requests
        self._last_counts: dict[str, int] = {}       # as of the last Stats relayed
        self._carried: Counter[str] = Counter()      # counted by Bridges that have died
        self._start_request: int | None = None
        self._restarts: Counter[str] = Counter()    # by level: bridge, router, pool
        self._states: dict[str, ActorState] = {}
        self._failure: str | None = None             # why, once FAILED

    # ------------------------------------------------------------ start
    def receiveMsg_StartBus(self, message: StartBus, sender) -> None:
        if self._phase is not SupervisorPhase.IDLE:
            self.send(sender, RequestFailed(message.request_id, "this Supervisor is already started"))
            return
        self._phase = SupervisorPhase.RUNNING
        self._config = message.config
        self._budget = RestartBudget(self._config.supervision.root)
        self._start_request = self._accept(message, sender)
        self._pids["supervisor"] = os.getpid()
        self._bridge = self.createActor(Bridge)
        self._states["bridge"] = ActorState.STARTING
        if self._config.pool_size > 0:
            self._router = self.createActor(Router)
            self._states["router"] = ActorState.STARTING
            self.send(self._router, StartPool(self._config.pool_size, self._bridge,
                                              policy=self._config.supervision.pool))
        else:
            self.send(self._bridge, StartBridge(self._start_request, self._config, None))

    def receiveMsg_PoolReady(self, message: PoolReady, sender) -> None:
        self._pids["router"] = message.router_pid
        self._states["router"] = ActorState.RUNNING
        for index, pid in enumerate(message.pids):
            self._pids[member_name(index)] = pid
            self._states[member_name(index)] = ActorState.RUNNING
        if self._router_restarts_pending:
            self._resume_pool()
            return
        # Only now may the Bridge fetch: a key is never handled before its actor exists.
        assert self._config is not None and self._start_request is not None  # StartBus came first
        self.send(self._bridge, StartBridge(self._start_request, self._config, self._router))

    def receiveMsg_PinsHeld(self, message: PinsHeld, sender) -> None:
        if sender == self._bridge:
            self._pins = dict(message.pins)

    def receiveMsg_BridgeReady(self, message: BridgeReady, sender) -> None:
        self._pids["bridge"] = message.pid
        self._states["bridge"] = ActorState.RUNNING
        if message.request_id < 0:   # a restarted Bridge: resume every durable consumer
            self._restarts["bridge"] += 1
            log.warning("the Bridge restarted (pid %d); resuming %d subscription(s)",
                        message.pid, len(self._subscribed))
            for subscription in self._subscribed:
                self.send(self._bridge, Subscribe(self._next_internal_id(), subscription))
            return
        self._reply(BusStarted(message.request_id, dict(self._pids)))

    # ------------------------------------------------------------ requests
    def receiveMsg_Subscribe(self, message: Subscribe, sender) -> None:
        request_id = self._accept(message, sender)
        self._subscribing[request_id] = message.subscription
        if self._router is None:
            self.send(self._bridge, Subscribe(request_id, message.subscription))
            return
        self.send(self._router, RegisterHandler(request_id, message.subscription))

    def receiveMsg_HandlerRegistered(self, message: HandlerRegistered, sender) -> None:
        if message.error is not None:
            # Refused before the Bridge subscribes: nothing is fetched for a handler
            # the pool cannot run.
            subscription = self._subscribing.pop(message.request_id, None)
            if subscription is None:
                log.error("a restarted pool could not import a handler: %s", message.error)
                return
            self._reply(RequestFailed(message.request_id,
                                      f"the pool cannot run handler {subscription.handler}: "
                                      f"{message.error}"))
            return
        subscription = self._subscribing.get(message.request_id)
        if subscription is not None:
            self.send(self._bridge, Subscribe(message.request_id, subscription))

    def receiveMsg_StatsRequest(self, message: StatsRequest, sender) -> None:
        request_id = self._accept(message, sender)
        if self._bridge is None:   # between a Bridge's death and its restart
            self.receiveMsg_Stats(Stats(request_id, dict(self._last_counts)), None)
            return
        self.send(self._bridge, StatsRequest(request_id))

    def receiveMsg_Stats(self, message: Stats, sender) -> None:
        if sender is not None:
            self._last_counts = dict(message.counts)
        totals = Counter(message.counts)
        totals.update(self._carried)
        counts = dict(totals)
        counts["restarts"] = sum(self._restarts.values())
        for level in ("bridge", "router", "pool"):
            counts[f"restarts_{level}"] = self._restarts[level]
        self._reply(Stats(message.request_id, counts, dict(self._pids), self._failure,
                          dict(self._states), message.by_subscription, message.queue_depths))

    # ------------------------------------------------------------ the pool's health
    def receiveMsg_MemberDied(self, message: MemberDied, sender) -> None:
        self._states[member_name(message.index)] = ActorState.RESTARTING

    def receiveMsg_MemberRestarted(self, message: MemberRestarted, sender) -> None:
        self._restarts["pool"] += 1
        self._pids[member_name(message.index)] = message.pid
        self._states[member_name(message.index)] = ActorState.RUNNING
        log.warning("pool member %d restarted (pid %d); %d message(s) re-sent to it",
                    message.index, message.pid, message.resent)

    def receiveMsg_PoolFailed(self, message: PoolFailed, sender) -> None:
        # Past the pool's limit, escalated to the root.
        self._give_up(message.reason)

    def receiveMsg_StopBus(self, message: StopBus, sender) -> None:
        request_id = self._accept(message, sender)
        if self._bridge is None:
            self._reply(BusStopped(request_id))
            return
        self.send(self._bridge, StopBus(request_id, message.timeout))

    def receiveMsg_Subscribed(self, message: Subscribed, sender) -> None:
        subscription = self._subscribing.pop(message.request_id, None)
        if subscription is not None:
            self._subscribed.append(subscription)
        self._reply(message)

    def receiveMsg_BusStopped(self, message: BusStopped, sender) -> None:
        self._reply(message)

    def receiveMsg_RequestFailed(self, message: RequestFailed, sender) -> None:
        self._subscribing.pop(message.request_id, None)
        if message.request_id < 0:
            log.error("a restarted Bridge could not resume: %s", message.error)
        self._reply(message)

    # ------------------------------------------------------------ failures
    def receiveMsg_ActorExitRequest(self, message, sender) -> None:
        self._phase = SupervisorPhase.STOPPING

    def receiveMsg_ChildActorExited(self, message, sender) -> None:
        if self._phase is SupervisorPhase.STOPPING:
            return
        if self._router is not None and message.childAddress == self._router:
            self._router_exited()
            return
        if self._bridge is None or message.childAddress != self._bridge:
            return  # a late or repeated notice about an actor already replaced
        self._states["bridge"] = ActorState.RESTARTING
        # Its counters die with it: keep what it last reported.
        self._carried.update({k: v for k, v in self._last_counts.items() if k != "in_flight"})
        self._last_counts = {}
        log.error("the Bridge (pid %s) exited; JetStream redelivers what it had not acked",
                  self._pids.get("bridge"))
        self._bridge = None
        self._restart_later("the Bridge", _BRIDGE)

    def _router_exited(self) -> None:
        self._states = {name: (ActorState.RESTARTING if name == "router" or name.startswith(MEMBER_PREFIX)
                               else state) for name, state in self._states.items()}
        # Its pool would linger as orphans: end it; the Bridge re-sends what it held.
        orphans = [pid for name, pid in self._pids.items() if name.startswith(MEMBER_PREFIX)]
        log.error("the Router (pid %s) exited; ending its pool %s", self._pids.get("router"), orphans)
        for pid in orphans:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._router = None
        self._restart_later("the Router", _ROUTER)

    def _restart_later(self, what: str, target: str) -> None:
        decision = self._budget.record()
        if decision.allowed:
            self.wakeupAfter(decision.delay, payload=RestartDue(target))
        else:
            self._give_up(self._budget.exhausted(what, decision))

    def _resume_pool(self) -> None:
        # The members got the handlers with StartPool, before the Bridge heard of them;
        # registered again so that one a restarted member cannot import is logged.
        self._router_restarts_pending = False
        for subscription in self._subscribed:
            self.send(self._router, RegisterHandler(self._next_internal_id(), subscription))
        self._restarts["router"] += 1
        self.send(self._bridge, RouterChanged(self._router))

    def receiveMsg_WakeupMessage(self, message, sender) -> None:
        if not isinstance(message.payload, RestartDue) or self._phase is not SupervisorPhase.RUNNING:
            return
        assert self._config is not None  # RUNNING: StartBus came first
        if message.payload.target == _ROUTER:
            self._router_restarts_pending = True
            self._router = self.createActor(Router)
            self.send(self._router, StartPool(self._config.pool_size, self._bridge,
                                              policy=self._config.supervision.pool,
                                              subscriptions=tuple(self._subscribed)))
            return
        self._bridge_incarnation += 1
        self._bridge = self.createActor(Bridge)
        if self._router is not None:
            self.send(self._router, BridgeChanged(self._bridge))
        self.send(self._bridge, StartBridge(self._next_internal_id(), self._config, self._router,
                                            self._bridge_incarnation, pins=dict(self._pins)))

    def _give_up(self, reason: str) -> None:
        # The root has no parent to escalate to: stop, never keep acking while broken.
        self._phase = SupervisorPhase.FAILED
        self._failure = reason
        self._states = {name: ActorState.STOPPED for name in self._states}
        log.error("the bus stops: %s; nothing more is fetched or settled", reason)
        if self._bridge is not None:
            self.send(self._bridge, Halt(reason))

    def _next_internal_id(self) -> int:
        self._internal_ids -= 1
        return self._internal_ids

    def _accept(self, message, sender) -> int:
        """Our own id for a client's request, remembered with who asked and their id."""
        self._relay_ids += 1
        self._waiting[self._relay_ids] = (sender, message.request_id)
        return self._relay_ids

    def _reply(self, message) -> None:
        waiting = self._waiting.pop(message.request_id, None)
        if waiting is not None:
            client, their_id = waiting
            self.send(client, dataclasses.replace(message, request_id=their_id))
