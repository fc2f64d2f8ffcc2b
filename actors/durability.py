"""Durable aggregates in a pool member: restore from the snapshot and the stream, apply once, snapshot.

An instance of an aggregate class with ``snapshot_every`` is made from its
snapshot (if one is stored and usable), then the events of its id after the
snapshot's sequence and before the message at hand are read back from the
stream and applied: they may have been acked already (a snapshot is written
every N events, not on every ack), so without them the state would miss
them. From then on the member knows the sequence of the last event applied
to the state, and a message at or below it (a redelivery after a crash, a
re-send) is acknowledged as handled without calling ``handle`` again.
"""
from __future__ import annotations

import inspect
import logging
import time
from typing import Any
from collections.abc import Awaitable, Callable, Sequence

from actorbus.aggregate import Aggregate
from actorbus.envelope import InvalidEnvelope
from actorbus.message import Message
from actorbus.snapshots import (EventRange, Snapshot, SnapshotError, SnapshotStore, StoredEvent,
                                decode_snapshot, encode_snapshot)

log = logging.getLogger("actorbus.actors")

#: Seconds between two warnings of aggregates rebuilt from the stream (each is named).
REBUILD_WARNING_INTERVAL = 60.0

#: Turns an event read back from the stream into the message its handler gets
#: (raises InvalidEnvelope for one that is no valid envelope).
MessageOf = Callable[[StoredEvent, str], Message]
#: Runs an awaitable to its end, for an ``async def handle`` during a restore.
RunAwaitable = Callable[[Awaitable[Any]], Any]


class _Progress:
    """What the member knows of one live durable instance."""

    __slots__ = ("applied", "unsaved")

    def __init__(self, applied: int) -> None:
        self.applied = applied   # stream sequence of the last event in the state
        self.unsaved = 0         # events applied since the last snapshot


class SnapshotKeeper:
    """Restores, applies and snapshots the durable instances of one aggregate class in one member."""

    def __init__(self, cls: type[Aggregate], store: SnapshotStore, message_of: MessageOf,
                 run: RunAwaitable) -> None:
        if cls.snapshot_every is None:
            raise ValueError(f"{cls.__qualname__} has no snapshot_every: it is not durable")
        self._cls = cls
        self._every = cls.snapshot_every
        self._store = store
        self._message_of = message_of
        self._run = run
        self._progress: dict[str, _Progress] = {}
        # Restored ahead by prepare(): id → (sequence of the message it is for, instance, progress).
        self._prepared: dict[str, tuple[int, Aggregate, _Progress]] = {}
        self._quiet_until = 0.0        # no rebuild warning before then
        self._rebuilds_unwarned = 0

    def prepare(self, firsts: Sequence[EventRange]) -> None:
        """Restore at once the ids whose first message here is coming (``before``: its
        sequence), so that a batch of them costs two round trips to the store, not two each.

        What is not used by the message it was made for is dropped at the next call; a
        failure here is left to :meth:`restore`, which tries again on its own.
        """
        self._prepared.clear()
        wanted = [first for first in firsts if first.aggregate_id not in self._progress]
        if len(wanted) < 2:
            return   # one alone is restored as fast by restore()
        try:
            self._prepared = self._restore_all(wanted)
        except Exception as exc:   # the store cannot be read now: each message finds out itself
            log.debug("restoring %d aggregate(s) at once failed: %s", len(wanted), exc)

    def restore(self, msg: Message) -> Aggregate:
        """A new instance for ``msg``'s aggregate, with every event before ``msg`` applied once.

        Raises when the store cannot be read: the message then fails and is
        retried, as when its handler raises.
        """
        aggregate_id = msg.aggregate_id
        assert aggregate_id is not None   # AggregateInstances refuses keyless messages
        prepared = self._prepared.pop(aggregate_id, None)
        if prepared is None or prepared[0] != msg.stream_sequence:
            first = EventRange(aggregate_id, 0, msg.stream_sequence, msg.subject)
            prepared = self._restore_all([first])[aggregate_id]
        _, instance, progress = prepared
        self._progress[aggregate_id] = progress
        if progress.unsaved >= self._every:
            self._save(aggregate_id, instance, progress)
        return instance

    def _restore_all(self, firsts: Sequence[EventRange]) -> dict[str, tuple[int, Aggregate, _Progress]]:
        """Each id of ``firsts`` restored from its snapshot, then its events up to its first
        message here applied from the stream: one read of the snapshots, one of the events."""
        stored = self._store.load([first.aggregate_id for first in firsts])
        restored: dict[str, tuple[Aggregate, int]] = {}
        for first in firsts:
            restored[first.aggregate_id] = self._restored(first.aggregate_id,
                                                          stored.get(first.aggregate_id))
        events = self._store.events([first._replace(after=restored[first.aggregate_id][1])
                                     for first in firsts])
        done = {}
        for first in firsts:
            instance, applied = restored[first.aggregate_id]
            progress = _Progress(applied)
            for event in events.get(first.aggregate_id, ()):
                self._replay(instance, first.aggregate_id, event, progress)
            done[first.aggregate_id] = (first.before, instance, progress)
        return done

    def apply(self, instance: Aggregate, msg: Message) -> Any:
        """``instance.handle(msg)`` unless ``msg`` is already in the state (then None: it
        is acknowledged as handled); a snapshot follows every ``snapshot_every`` events."""
        aggregate_id = instance.aggregate_id
        progress = self._progress[aggregate_id]
        if msg.stream_sequence <= progress.applied:
            log.debug("aggregate %s: sequence %d is in its state already (through %d); not "
                      "applied again", aggregate_id, msg.stream_sequence, progress.applied)
            return None
        result = instance.handle(msg)
        if inspect.isawaitable(result):
            return self._applied_after(result, instance, msg.stream_sequence)
        self._applied(instance, msg.stream_sequence)
        return result

    async def _applied_after(self, result: Awaitable[Any], instance: Aggregate, sequence: int) -> Any:
        value = await result
        self._applied(instance, sequence)
        return value

    def _applied(self, instance: Aggregate, sequence: int) -> None:
        progress = self._progress[instance.aggregate_id]
        progress.applied = sequence
        progress.unsaved += 1
        if progress.unsaved >= self._every:
            self._save(instance.aggregate_id, instance, progress)

    def passivated(self, instance: Aggregate) -> None:
        """``instance`` is dropped: snapshot what is not saved yet."""
        progress = self._progress.pop(instance.aggregate_id, None)
        if progress is not None and progress.unsaved:
            self._save(instance.aggregate_id, instance, progress)

    def forget(self) -> None:
        """Know no instance any more (they were dropped unsaved)."""
        self._progress.clear()
        self._prepared.clear()

    def flush(self, instances: list[Aggregate], timeout: float) -> None:
        """On a clean stop: snapshot every instance with unsaved events, and wait up to
        ``timeout`` seconds for the writes."""
        for instance in instances:
            progress = self._progress.get(instance.aggregate_id)
            if progress is not None and progress.unsaved:
                self._save(instance.aggregate_id, instance, progress)
        self._store.flush(timeout)

    def _restored(self, aggregate_id: str, data: bytes | None) -> tuple[Aggregate, int]:
        """A new instance with its stored snapshot ``data`` restored, and the sequence its state
        is at (0: no snapshot, or one that could not be used: the aggregate is rebuilt from
        the stream)."""
        cls = self._cls
        if data is None:
            return cls(aggregate_id), 0
        try:
            snapshot = decode_snapshot(data)
        except SnapshotError as exc:
            return self._rebuilt(aggregate_id, f"its snapshot cannot be decoded ({exc})")
        state = snapshot.state
        if snapshot.version != cls.snapshot_version:
            try:
                state = cls.migrate(snapshot.state, snapshot.version)
            except Exception as exc:
                return self._rebuilt(aggregate_id, f"migrate() raised on its snapshot of "
                                     f"snapshot_version {snapshot.version} ({type(exc).__name__}: {exc})")
            if state is None:
                return self._rebuilt(aggregate_id, f"its snapshot is of snapshot_version "
                                     f"{snapshot.version}, the class is at {cls.snapshot_version} "
                                     "and migrate() declined it")
        instance = cls(aggregate_id)
        try:
            instance.restore(state)
        except Exception as exc:
            return self._rebuilt(aggregate_id, f"restore() raised on its snapshot "
                                 f"({type(exc).__name__}: {exc})")
        return instance, snapshot.sequence

    def _rebuilt(self, aggregate_id: str, why: str) -> tuple[Aggregate, int]:
        """A new instance for an aggregate whose snapshot cannot be used, to be rebuilt from the
        stream; says so, naming it: a warning at most once a minute (after a new
        ``snapshot_version`` every aggregate says it), the others in between at INFO."""
        now = time.monotonic()
        if now >= self._quiet_until:
            self._quiet_until = now + REBUILD_WARNING_INTERVAL
            more = f" ({self._rebuilds_unwarned} more since the last warning, at INFO)" \
                if self._rebuilds_unwarned else ""
            self._rebuilds_unwarned = 0
            level = logging.WARNING
        else:
            self._rebuilds_unwarned += 1
            more, level = "", logging.INFO
        log.log(level, "aggregate %s (%s): %s in %s; rebuilt from the stream%s", aggregate_id,
                self._cls.__qualname__, why, self._store.where, more)
        return self._cls(aggregate_id), 0

    def _replay(self, instance: Aggregate, aggregate_id: str, event: StoredEvent,
                progress: _Progress) -> None:
        """Apply one event read back from the stream; one its handler refuses is skipped
        with a line naming it (it most likely failed when it first came, too)."""
        try:
            message = self._message_of(event, aggregate_id)
        except InvalidEnvelope:
            return   # dead-lettered when it came: never applied
        try:
            result = instance.handle(message)
            if inspect.isawaitable(result):
                self._run(result)
        except Exception as exc:
            log.error("aggregate %s: the event at sequence %d failed again while restoring "
                      "(%s: %s); skipped", aggregate_id, event.sequence, type(exc).__name__, exc)
            return
        progress.applied = event.sequence
        progress.unsaved += 1

    def _save(self, aggregate_id: str, instance: Aggregate, progress: _Progress) -> None:
        """Encode the snapshot here (it is the state now) and hand it to the store, which
        writes it without holding up the next message."""
        try:
            data = encode_snapshot(Snapshot(instance.snapshot(), self._cls.snapshot_version,
                                            progress.applied))
        except Exception as exc:
            log.error("aggregate %s (%s): no snapshot taken: %s", aggregate_id,
                      self._cls.__qualname__, exc)
            return
        self._store.save(aggregate_id, data)
        progress.unsaved = 0
