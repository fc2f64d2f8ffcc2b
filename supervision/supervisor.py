"""The root of the bus: creates the Router (and its pool) and the Bridge, and
relays the facade's requests to them.

It is an ordinary Thespian actor: a program with its own ``ActorSystem``
creates it there and sends it :class:`StartBus`, exactly as the
``EventBus`` facade does.
"""
from __future__ import annotations

import logging
import os

from actorbus.actors.base import BusActor
from actorbus.actors.messages import (BridgeReady, BusStarted, BusStopped, Halt,
                                      HandlerRegistered, MemberRestarted, PoolFailed, PoolReady,
                                      RegisterHandler, RequestFailed, StartBridge, StartBus,
                                      StartPool, Stats, StatsRequest, StopBus, Subscribe,
                                      Subscribed)
from actorbus.actors.router import Router
from actorbus.bridge.actor import Bridge

log = logging.getLogger("actorbus.supervision")


class Supervisor(BusActor):
    """Builds the bus in order (pool first, then the Bridge) and relays requests by id."""

    def __init__(self) -> None:
        super().__init__()
        self._config = None
        self._bridge = None
        self._router = None
        self._pids: dict[str, int] = {}
        self._waiting: dict[int, object] = {}     # request id → who asked
        self._subscriptions: dict[int, object] = {}  # request id → SubscriptionConfig
        self._start_request: int | None = None
        self._exited: list[str] = []
        self._shutting_down = False
        self._restarts = 0
        self._failure: str | None = None

    # ------------------------------------------------------------ start
    def receiveMsg_StartBus(self, message: StartBus, sender) -> None:
        if self._config is not None:
            self.send(sender, RequestFailed(message.request_id, "this Supervisor is already started"))
            return
        self._config = message.config
        self._start_request = message.request_id
        self._waiting[message.request_id] = sender
        self._pids["supervisor"] = os.getpid()
        self._bridge = self.createActor(Bridge)
        if self._config.pool_size > 0:
            self._router = self.createActor(Router)
            self.send(self._router, StartPool(self._config.pool_size, self._bridge,
                                              policy=self._config.supervision))
        else:
            self.send(self._bridge, StartBridge(message.request_id, self._config, None))

    def receiveMsg_PoolReady(self, message: PoolReady, sender) -> None:
        self._pids["router"] = message.router_pid
        for index, pid in enumerate(message.pids):
            self._pids[f"aggregate-{index}"] = pid
        # Only now may the Bridge fetch: a key is never handled before its actor exists.
        self.send(self._bridge, StartBridge(self._start_request, self._config, self._router))

    def receiveMsg_BridgeReady(self, message: BridgeReady, sender) -> None:
        self._pids["bridge"] = message.pid
        self._reply(BusStarted(message.request_id, dict(self._pids)))

    # ------------------------------------------------------------ requests
    def receiveMsg_Subscribe(self, message: Subscribe, sender) -> None:
        self._waiting[message.request_id] = sender
        if self._router is None:
            self.send(self._bridge, message)
            return
        self._subscriptions[message.request_id] = message.subscription
        self.send(self._router, RegisterHandler(message.request_id, message.subscription.handler_spec()))

    def receiveMsg_HandlerRegistered(self, message: HandlerRegistered, sender) -> None:
        subscription = self._subscriptions.pop(message.request_id)
        self.send(self._bridge, Subscribe(message.request_id, subscription))

    def receiveMsg_StatsRequest(self, message: StatsRequest, sender) -> None:
        self._waiting[message.request_id] = sender
        self.send(self._bridge, message)

    def receiveMsg_Stats(self, message: Stats, sender) -> None:
        counts = dict(message.counts)
        counts["restarts"] = self._restarts
        counts["actors_exited"] = len(self._exited)
        self._reply(Stats(message.request_id, counts, dict(self._pids), self._failure))

    # ------------------------------------------------------------ the pool's health
    def receiveMsg_MemberRestarted(self, message: MemberRestarted, sender) -> None:
        self._restarts += 1
        self._pids[f"aggregate-{message.index}"] = message.pid
        log.warning("pool member %d restarted (pid %d); %d message(s) re-sent to it",
                    message.index, message.pid, message.resent)

    def receiveMsg_PoolFailed(self, message: PoolFailed, sender) -> None:
        # Past the pool's limit, escalated to the root: stop, never keep acking while broken.
        self._failure = message.reason
        log.error("the bus stops: %s; nothing more is fetched or settled", message.reason)
        self.send(self._bridge, Halt(message.reason))

    def receiveMsg_StopBus(self, message: StopBus, sender) -> None:
        self._waiting[message.request_id] = sender
        self.send(self._bridge, message)

    def receiveMsg_Subscribed(self, message: Subscribed, sender) -> None:
        self._reply(message)

    def receiveMsg_BusStopped(self, message: BusStopped, sender) -> None:
        self._reply(message)

    def receiveMsg_RequestFailed(self, message: RequestFailed, sender) -> None:
        self._reply(message)

    # ------------------------------------------------------------ failures
    def receiveMsg_ActorExitRequest(self, message, sender) -> None:
        self._shutting_down = True

    def receiveMsg_ChildActorExited(self, message, sender) -> None:
        if self._shutting_down:
            return
        which = "Bridge" if message.childAddress == self._bridge else "Router"
        self._exited.append(which)
        log.error("the %s exited", which)

    def _reply(self, message) -> None:
        client = self._waiting.pop(message.request_id, None)
        if client is not None:
            self.send(client, message)
