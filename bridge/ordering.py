"""Per-key order under redelivery: nothing of a key overtakes an older message waiting to come back.

JetStream redelivers a naked message (or one lost with a crashed Bridge)
after newer ones of the same key have been delivered. The Bridge keeps,
per subscription and aggregate id, the stream sequences that are *open*:
delivered or recovered, and not yet *resolved* (handled successfully, or
settled for good). An open sequence is *waiting* while it failed and is
due to come back (naked). A message whose key has an older waiting
sequence is *held*: it stays un-acked in the Bridge (kept alive with
``in_progress``) and is released, in stream order, once nothing older of
its key waits. Messages behind an open sequence that is merely being
handled go ahead: the pool handles a key's messages in order, and defers
them itself if the older one fails (``OutcomeKind.DEFERRED``).

Keyless messages (``rr-<n>``) carry no order promise and are never held.
Only the Bridge actor's thread uses it.
"""
from __future__ import annotations

import bisect
from typing import Generic, TypeVar
from collections.abc import Callable

T = TypeVar("T")


class KeyOrder(Generic[T]):
    """Open, waiting and held sequences of one subscription, by key."""

    def __init__(self) -> None:
        # (key, sequence) of every open sequence: one flat set, so that the common case
        # (a key with nothing waiting) allocates nothing per message but a pair.
        self._open: set[tuple[str, int]] = set()
        self._waiting: dict[str, list[int]] = {}           # key → waiting sequences, ascending
        self._held: dict[str, list[tuple[int, T]]] = {}    # key → (sequence, item), ascending
        self._deadlines: dict[tuple[str, int], float] = {} # (key, waiting sequence) → give up at
        self.held = 0                                      # items held, all keys

    def admit(self, key: str, sequence: int, item: T) -> bool:
        """Open ``sequence`` of ``key``: True when ``item`` may be handled now, False
        when it is held behind an older waiting sequence of its key."""
        self._open.add((key, sequence))
        waiting = self._waiting.get(key)
        if waiting:
            index = bisect.bisect_left(waiting, sequence)
            if index < len(waiting) and waiting[index] == sequence:
                del waiting[index]   # it came back: it is handled now
                self._deadlines.pop((key, sequence), None)
                if not waiting:
                    del self._waiting[key]
        if waiting and waiting[0] < sequence:
            self._hold(key, sequence, item)
            return False
        return True

    def hold(self, key: str, sequence: int, item: T) -> None:
        """Hold ``item`` again: the pool deferred it behind an older failure of its key."""
        self._open.add((key, sequence))
        self._hold(key, sequence, item)

    def wait(self, key: str, sequence: int, until: float) -> None:
        """``sequence`` failed and is due to come back: newer ones of ``key`` wait for it,
        until the monotonic time ``until`` at the latest (see :meth:`overdue`)."""
        self._open.add((key, sequence))
        waiting = self._waiting.setdefault(key, [])
        if sequence not in waiting:
            bisect.insort(waiting, sequence)
        self._deadlines[(key, sequence)] = until

    def overdue(self, now: float) -> list[tuple[str, int]]:
        """Waiting sequences that did not come back in time, no longer waited for.

        JetStream may never redeliver a message (its ``max_deliver`` used up by
        expired AckWaits while no Bridge ran, or the consumer was reset): the
        newer messages of its key must not wait for ever. Release their keys.
        """
        late = [pair for pair, until in self._deadlines.items() if until <= now]
        for key, sequence in late:
            self.resolve(key, sequence)
        return late

    def resolve(self, key: str, sequence: int) -> None:
        """``sequence`` of ``key`` is done for good (handled, or settled without a redelivery)."""
        self._open.discard((key, sequence))
        if not self._waiting:
            return
        waiting = self._waiting.get(key)
        if waiting and sequence in waiting:
            waiting.remove(sequence)
            if not waiting:
                del self._waiting[key]
        self._deadlines.pop((key, sequence), None)

    def is_open(self, key: str, sequence: int) -> bool:
        """True while ``sequence`` of ``key`` is delivered (or recovered) and not resolved."""
        return (key, sequence) in self._open

    def released(self, key: str) -> list[T]:
        """Held items of ``key`` that nothing older waits for any more, in stream order."""
        held = self._held.get(key)
        if not held:
            return []
        waiting = self._waiting.get(key)
        free: list[T] = []
        while held and not (waiting and waiting[0] < held[0][0]):
            free.append(held.pop(0)[1])
        if not held:
            del self._held[key]
        self.held -= len(free)
        return free

    def drop(self, matches: Callable[[T], bool]) -> list[T]:
        """Remove the held items ``matches`` picks (their partition moved to another bus) and
        return them; their keys' other state stays, and ends as it would."""
        dropped: list[T] = []
        for key in list(self._held):
            kept = [pair for pair in self._held[key] if not matches(pair[1])]
            dropped.extend(item for _, item in self._held[key] if matches(item))
            if kept:
                self._held[key] = kept
            else:
                del self._held[key]
        self.held -= len(dropped)
        return dropped

    def _hold(self, key: str, sequence: int, item: T) -> None:
        held = self._held.setdefault(key, [])
        bisect.insort(held, (sequence, item), key=lambda pair: pair[0])
        self.held += 1
