"""Where the NATS thread leaves work for the Bridge actor's thread.

Only the actor's own thread may call Thespian's ``send``; the NATS thread
appends to a queue and writes one byte to a socket pair, whose read end
the actor watches (``ThespianWatch``) and drains.
"""
from __future__ import annotations

import socket
import threading
from collections import deque
from typing import Any, NamedTuple


class Arrival(NamedTuple):
    """What the NATS thread leaves for the Bridge: messages of one subscription that came
    together, either delivered by its consumer or (``recovered``) read back from the stream."""

    subscription: str
    messages: list[Any]
    recovered: bool = False


class Released(NamedTuple):
    """The NATS thread gave a durable up (its partition moved to another bus), or lost its
    pin to another bus: what the Bridge holds back of it for per-key order is dropped,
    neither handled nor settled, for the new owner reads it back in order. ``filters``:
    the durable's subject filters."""

    subscription: str
    filters: tuple[str, ...]


class PinsChanged(NamedTuple):
    """The NATS thread was pinned on a durable, or lost a pin: the Bridge tells the Supervisor
    its pins."""


class Mailbox:
    """A thread-safe queue with a readable file descriptor while it holds anything."""

    def __init__(self) -> None:
        self._reader, self._writer = socket.socketpair()
        self._reader.setblocking(False)
        self._items: deque[Any] = deque()
        self._lock = threading.Lock()
        self._signalled = False

    def fileno(self) -> int:
        """The descriptor that becomes readable when items arrive."""
        return self._reader.fileno()

    def put(self, item: Any) -> None:
        """Leave ``item`` for the actor thread (any thread)."""
        with self._lock:
            self._items.append(item)
            if not self._signalled:
                self._signalled = True
                self._writer.send(b"\0")

    def drain(self) -> list[Any]:
        """Take everything left so far (the actor thread)."""
        with self._lock:
            self._signalled = False
            try:
                while self._reader.recv(4096):
                    pass
            except BlockingIOError:
                pass
            items = list(self._items)
            self._items.clear()
        return items

    def close(self) -> None:
        """Close both ends of the socket pair."""
        self._reader.close()
        self._writer.close()
