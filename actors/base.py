"""The base of the pool's actors: dispatch by message type, one failure log, no replays."""
from __future__ import annotations

import logging

from thespian.actors import ActorTypeDispatcher

from actorbus.actors.logs import adopt_actor_process_root

log = logging.getLogger("actorbus.actors")


class BusActor(ActorTypeDispatcher):
    """An ``ActorTypeDispatcher`` that logs an unexpected exception once.

    Thespian re-runs a message whose handling raised, then answers the
    sender with a ``PoisonMessage``: for a batch of user handlers that
    would run them twice. Our actors treat their own bugs as logged
    failures instead, and report outcomes explicitly.
    """

    def __init__(self) -> None:
        super().__init__()
        adopt_actor_process_root()

    def receiveMessage(self, message, sender):
        try:
            return super().receiveMessage(message, sender)
        except Exception:
            log.exception("%s failed on %s", type(self).__name__, type(message).__name__)
            return None
