"""A topology: a bus's configuration and its subscriptions as one value, for ``actorbus run``."""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any
from collections.abc import Callable

from actorbus.bus import EventBus


@dataclass(frozen=True)
class Subscription:
    """One subscription of a topology: the arguments of :meth:`EventBus.subscribe`."""

    subject: str
    handler: Callable[..., Any] | type | str
    envelope: bool = True
    durable: str | None = None
    stream: str | None = None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Topology:
    """What to run: the bus's settings and its subscriptions.

    ``bus`` holds :class:`EventBus` keyword arguments (``pool_size``,
    ``supervision``, ``metrics_port``, credentials and TLS such as
    ``creds`` or ``tls_ca``, a consumer group's ``group``, ``partitions``
    and ``members``, or ``partitions`` and ``bridges`` for one bus on many
    cores, ...; ``actorbus run --member`` names the instance);
    ``servers`` may be overridden when the
    topology is started; without any, ``$NATS_URL`` or
    ``nats://127.0.0.1:4222``.
    """

    subscriptions: tuple[Subscription, ...]
    servers: str | None = None
    bus: dict[str, Any] = field(default_factory=dict)

    def start(self, servers: str | None = None, **overrides: Any) -> EventBus:
        """Start an :class:`EventBus` with every subscription made; the caller stops it.

        ``overrides`` replace the topology's ``bus`` settings one by one.
        """
        bus = EventBus(servers=servers if servers is not None else self.servers,
                       **{**self.bus, **overrides})
        try:
            for sub in self.subscriptions:
                bus.subscribe(sub.subject, sub.handler, envelope=sub.envelope, durable=sub.durable,
                              stream=sub.stream, **sub.options)
        except BaseException:
            bus.stop()
            raise
        return bus


def load_topology(ref: str) -> Topology:
    """Import ``"package.module:name"``, which must be a :class:`Topology`."""
    module_name, sep, name = ref.partition(":")
    if not sep or not module_name or not name:
        raise ValueError(f"expected MODULE:TOPOLOGY, got {ref!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        # The usual cause: run from another folder than the one holding the module.
        raise ValueError(f"cannot import {module_name!r}: {exc} (run it from the folder that "
                         f"holds the module, or install it)") from exc
    try:
        value = getattr(module, name)
    except AttributeError:
        raise ValueError(f"{module_name} has no {name!r}") from None
    if not isinstance(value, Topology):
        raise ValueError(f"{ref} is a {type(value).__name__}, not an actorbus Topology")
    return value
