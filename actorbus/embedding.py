"""Embedding the bus in a Thespian actor system of your own: the public entry point.

The Supervisor is an ordinary Thespian actor. A program with its own
``multiprocTCPBase`` system creates it there and drives it with the same
messages the :class:`~actorbus.EventBus` facade sends; each request carries
a ``request_id`` that its reply repeats::

    with actor_system() as asys:
        supervisor = asys.createActor(Supervisor)
        asys.ask(supervisor, StartBus(1, BusConfig(servers=url, pool_size=2)), 30)   # BusStarted
        asys.ask(supervisor, Subscribe(2, SubscriptionConfig("orders.>", "pkg.mod:handle")), 30)
        ...
        asys.ask(supervisor, StopBus(3, timeout=10.0), 30)                            # BusStopped

A failed request is answered with :class:`RequestFailed`. Use
:func:`actor_system` (or apply :func:`bind_transport` before starting a
system yourself) so that the actor transport listens on loopback only and
refuses any process that is not one of the system's own.
"""
from __future__ import annotations

import contextlib
from typing import Any
from collections.abc import Iterator

from actorbus.actors.messages import (BusStarted, BusStopped, RequestFailed, StartBus, Stats,
                                      StatsRequest, StopBus, Subscribe, Subscribed)
from actorbus.config import BusConfig, SubscriptionConfig
from actorbus.runtime import ProcessRuntime
from actorbus.supervision.supervisor import Supervisor
from actorbus.actor_signals import starting_actor_system
from actorbus.transport_auth import sign_transport
from actorbus.transport_binding import hold_transport_host, resolve_transport_host

__all__ = [
    "BusConfig",
    "BusStarted",
    "BusStopped",
    "RequestFailed",
    "StartBus",
    "Stats",
    "StatsRequest",
    "StopBus",
    "Subscribe",
    "Subscribed",
    "SubscriptionConfig",
    "Supervisor",
    "actor_system",
    "bind_transport",
]


@contextlib.contextmanager
def actor_system(admin_port: int | None = None, transport_host: str | None = None,
                 log_config: dict[str, Any] | None = None) -> Iterator[Any]:
    """A ``multiprocTCPBase`` ActorSystem as the bus runs its own: a free admin port,
    loopback only (unless ``transport_host`` says otherwise), and on exit shut down
    with every process it started ended by pid."""
    runtime = ProcessRuntime(admin_port, log_config, transport_host=transport_host)
    try:
        yield runtime.system
    finally:
        runtime.shutdown()


@contextlib.contextmanager
def bind_transport(host: str | None = None) -> Iterator[str]:
    """Bind every actor transport socket started inside the block to ``host``
    (loopback by default; see :mod:`actorbus.transport_binding`) and sign its frames
    (:mod:`actorbus.transport_auth`); yields the host."""
    chosen = resolve_transport_host(host)
    sign_transport()
    release = hold_transport_host(chosen)
    try:
        with starting_actor_system():
            yield chosen
    finally:
        release()
