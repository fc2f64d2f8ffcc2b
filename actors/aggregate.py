"""A pool member: runs the user's handlers for its keys, strictly in arrival order."""
from __future__ import annotations

import os

from actorbus.actors.base import BusActor
from actorbus.actors.messages import (AggregateReady, Completion, Dispatch, RegisterHandler,
                                      StartAggregate)
from actorbus.actors.processing import HandlerTable


class AggregateActor(BusActor):
    """Handles each :class:`Dispatch` in order and answers its sender with one :class:`Completion`."""

    def __init__(self) -> None:
        super().__init__()
        self._index = -1
        self._table = HandlerTable()

    def receiveMsg_StartAggregate(self, message: StartAggregate, sender) -> None:
        self._index = message.index
        for spec in message.handlers:
            self._table.register(spec)
        self.send(sender, AggregateReady(message.index, os.getpid()))

    def receiveMsg_RegisterHandler(self, message: RegisterHandler, sender) -> None:
        self._table.register(message.spec)

    def receiveMsg_Dispatch(self, message: Dispatch, sender) -> None:
        self.send(sender, Completion(self._table.process(message.deliveries), self._index))

    def receiveMsg_ActorExitRequest(self, message, sender) -> None:
        self._table.close()
