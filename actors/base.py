"""The base of every actorbus actor: dispatch by message type, one failure log, no replays."""
from __future__ import annotations

import logging
from typing import Any

from thespian.actors import ActorSystemMessage, ActorTypeDispatcher, ThespianWatch

from actorbus.actor_signals import ignore_in_actor_process
from actorbus.actors.logs import adopt_actor_process_root

log = logging.getLogger("actorbus.actors")


class BusActor(ActorTypeDispatcher):  # type: ignore[misc]  # Thespian ships no types
    """An ``ActorTypeDispatcher`` (``receiveMsg_<Type>`` methods) that logs an unexpected
    exception once and a message of an unknown type once per type.

    Thespian re-runs a message whose handling raised, then answers the
    sender with a ``PoisonMessage``: for a batch of user handlers that
    would run them twice. Our actors treat their own bugs as logged
    failures instead, and report outcomes explicitly.
    """

    def __init__(self) -> None:
        super().__init__()
        adopt_actor_process_root()
        ignore_in_actor_process()   # the bus leads shutdown, not a signal to every process
        self._unknown_types: set[str] = set()

    def receiveMessage(self, message: Any, sender: Any) -> ThespianWatch | None:
        try:
            # The method for the message's own type, found directly; the dispatcher's search
            # through both class hierarchies serves the rest (base types of a message).
            handler = getattr(self, f"receiveMsg_{type(message).__name__}", None)
            if handler is not None:
                handler(message, sender)
            else:
                super().receiveMessage(message, sender)
        except Exception:
            log.exception("%s failed on %s", type(self).__name__, type(message).__name__)
        # Every return must carry the watch: Thespian forgets it otherwise.
        return self.watch()

    def watch(self) -> ThespianWatch | None:
        """File descriptors this actor wants to be woken for (``ThespianWatch``); None here."""
        return None

    def receiveUnrecognizedMessage(self, message: Any, sender: Any) -> None:
        """Drop a message no ``receiveMsg_`` method takes; say so once per type."""
        kind = type(message).__name__
        if kind in self._unknown_types:
            return
        self._unknown_types.add(kind)
        # The runtime's own notices (a child exited, a wakeup) are expected to go unhandled.
        level = logging.DEBUG if isinstance(message, ActorSystemMessage) else logging.WARNING
        log.log(level, "%s ignores messages of type %s (first from %s)", type(self).__name__,
                kind, sender)
