"""The live :class:`~actorbus.aggregate.Aggregate` instances of one pool actor."""
from __future__ import annotations

import logging
import time
from collections import OrderedDict
from typing import Any
from collections.abc import Callable, Sequence

from actorbus.actors.durability import SnapshotKeeper
from actorbus.actors.handlers import HandlerError

from actorbus.aggregate import Aggregate
from actorbus.message import Message
from actorbus.snapshots import EventRange

log = logging.getLogger("actorbus.actors")

# Idle instances are looked for at most this often, not on every message.
_IDLE_SCAN_INTERVAL = 1.0


class AggregateInstances:
    """Instances of one Aggregate class by id, least recently used first.

    With a ``keeper`` (a durable class), instances are restored, applied to and
    snapshotted through it.
    """

    def __init__(self, cls: type[Aggregate], clock: Callable[[], float] = time.monotonic,
                 keeper: SnapshotKeeper | None = None) -> None:
        self._cls = cls
        self._clock = clock
        self._keeper = keeper
        self._live: OrderedDict[str, tuple[Aggregate, float]] = OrderedDict()
        self._next_scan = 0.0

    def __call__(self, msg: Message) -> Any:
        """Route ``msg`` to its aggregate's instance, making it if needed."""
        if msg.aggregate_id is None:
            raise HandlerError(f"{self._cls.__qualname__} needs an aggregate id; the message on "
                               f"{msg.subject} has none")
        now = self._clock()
        self._passivate_idle(now)
        keeper = self._keeper
        entry = self._live.pop(msg.aggregate_id, None)
        if entry is not None:
            instance = entry[0]
        else:
            instance = keeper.restore(msg) if keeper is not None else self._cls(msg.aggregate_id)
        self._live[msg.aggregate_id] = (instance, now)
        while len(self._live) > self._cls.max_instances:
            self._passivate(*self._live.popitem(last=False))
        return instance.handle(msg) if keeper is None else keeper.apply(instance, msg)

    def __len__(self) -> int:
        return len(self._live)

    def _passivate_idle(self, now: float) -> None:
        timeout = self._cls.idle_timeout
        if timeout is None or now < self._next_scan:
            return
        self._next_scan = now + _IDLE_SCAN_INTERVAL
        while self._live:
            aggregate_id, (instance, last_used) = next(iter(self._live.items()))
            if now - last_used < timeout:
                break  # ordered by last use: the rest are fresher
            del self._live[aggregate_id]
            self._passivate(aggregate_id, (instance, last_used))

    def prepare(self, firsts: Sequence[EventRange]) -> None:
        """Durable classes: restore at once the aggregates of ``firsts`` that are not live
        (each range's ``before`` is the sequence of a message coming for it)."""
        if self._keeper is not None:
            self._keeper.prepare([first for first in firsts if first.aggregate_id not in self._live])

    def forget(self) -> None:
        """Durable classes: drop every instance as it is, with no snapshot and no
        ``passivate()``; each is restored from the store on its next message."""
        if self._keeper is not None:
            self._keeper.forget()
            self._live.clear()

    def flush(self, timeout: float) -> None:
        """On a clean stop: snapshot the durable instances' unsaved events and wait up to
        ``timeout`` seconds for the writes (nothing without snapshots)."""
        if self._keeper is not None:
            self._keeper.flush([instance for instance, _ in self._live.values()], timeout)

    def _passivate(self, aggregate_id: str, entry: tuple[Aggregate, float]) -> None:
        if self._keeper is not None:
            self._keeper.passivated(entry[0])
        try:
            entry[0].passivate()
        except Exception:
            log.exception("passivating aggregate %s failed", aggregate_id)
