"""The one thread a pool member runs its user's handlers on, called synchronously.

A member waits for each run of handlers anyway (handlers run one at a
time, in order), so a ``ThreadPoolExecutor`` buys nothing and costs a
future, a condition and a work item per call: at a few thousand dispatches
a second that was a tenth of a member's CPU. Two ``SimpleQueue`` (C) hand
each call over and its result back.
"""
from __future__ import annotations

import queue
import threading
from typing import Any, TypeVar
from collections.abc import Callable

T = TypeVar("T")

_STOP = object()


class HandlerThread:
    """A daemon thread that runs what :meth:`call` gives it, one call at a time."""

    def __init__(self, name: str = "actorbus-handlers") -> None:
        self._calls: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._results: queue.SimpleQueue[tuple[bool, Any]] = queue.SimpleQueue()
        self._lock = threading.Lock()   # one caller at a time: each waits for its own result
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def call(self, function: Callable[..., T], *args: Any) -> T:
        """``function(*args)`` on the thread; its result, or what it raised, raised here."""
        with self._lock:
            if not self._thread.is_alive():
                raise RuntimeError("the handler thread has stopped")
            self._calls.put((function, args))
            ok, value = self._results.get()
        if ok:
            return value  # type: ignore[no-any-return]
        raise value

    def stop(self) -> None:
        """End the thread once the call it is running (if any) returns; do not wait."""
        self._calls.put(_STOP)

    def _serve(self) -> None:
        calls, results = self._calls, self._results
        while True:
            item = calls.get()
            if item is _STOP:
                return
            function, args = item
            try:
                results.put((True, function(*args)))
            except BaseException as exc:   # handed to the caller, which raises it
                results.put((False, exc))
