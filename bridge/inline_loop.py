"""An asyncio event loop that the actor's own thread turns, between actor messages.

The Bridge's NATS client used to run on a thread of its own. Every
message then crossed threads twice (arrival to the actor, settlement back
to the loop), each crossing a wake-up through a socket and a hand-over of
the GIL; at a few thousand messages a second those crossings cost more
CPU than the work. Here the loop belongs to the actor's thread: Thespian
watches the loop's selector (an epoll descriptor is itself readable when
any socket it watches is ready), and the actor turns the loop when it is,
after each actor message, and when the loop's next timer is due.

A turn runs what is ready without blocking; :meth:`InlineLoop.run` runs a
coroutine to its end (a bounded wait, as a call into another thread was).
Turning needs two attributes asyncio has kept since 3.4 (``_ready``,
``_scheduled``); :class:`InlineLoop` checks them when it is made.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, TypeVar
from collections.abc import Awaitable, Callable

log = logging.getLogger("actorbus.bridge")

T = TypeVar("T")

#: Most loop iterations one turn runs: a loop that keeps itself busy (a callback that
#: schedules another at once, forever) must not starve the actor's messages.
MAX_ITERATIONS = 64


class InlineLoopError(RuntimeError):
    """This Python's asyncio lacks what turning a loop from outside needs."""


class InlineLoop:
    """An asyncio loop turned by its owner's thread: :meth:`turn` when :meth:`fileno` is
    readable or :meth:`due` has passed; :meth:`run` for a coroutine's result."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        for name in ("_ready", "_scheduled", "_selector"):
            if not hasattr(self.loop, name):
                self.loop.close()
                raise InlineLoopError(f"asyncio's event loop has no {name}: actorbus's Bridge "
                                      "cannot turn it from its actor thread")
        self._stopped = False

    def fileno(self) -> int:
        """The loop's selector: readable while a socket the loop watches is ready."""
        return int(self.loop._selector.fileno())   # type: ignore[attr-defined]

    def call_soon(self, callback: Callable[..., Any], *args: Any) -> None:
        """Schedule ``callback(*args)`` for the next turn."""
        if not self._stopped:
            self.loop.call_soon(callback, *args)

    def turn(self, io: bool = True) -> None:
        """Run what is ready now (I/O, callbacks, due timers), without blocking; with
        ``io`` False, only if callbacks are ready (the owner knows no socket is)."""
        if self._stopped:
            return
        loop = self.loop
        ready: Any = loop._ready   # type: ignore[attr-defined]
        if not io and not ready:
            return
        for _ in range(MAX_ITERATIONS):
            # A stop callback already queued makes the iteration's select time out at once.
            loop.call_soon(loop.stop)
            loop.run_forever()
            if not ready:
                break

    def due(self) -> float | None:
        """Seconds until the loop's next timer (0 when something is ready), or None."""
        if self._stopped:
            return None
        if self.loop._ready:   # type: ignore[attr-defined]
            return 0.0
        scheduled: Any = self.loop._scheduled   # type: ignore[attr-defined]
        if not scheduled:
            return None
        return max(0.0, float(scheduled[0].when()) - self.loop.time())

    def run(self, coro: Awaitable[T], timeout: float | None = None) -> T:
        """Run ``coro`` on the loop until it is done, or raise ``TimeoutError`` after
        ``timeout`` seconds."""
        async def bounded() -> T:
            try:
                return await asyncio.wait_for(coro, timeout)
            except TimeoutError:
                raise TimeoutError(f"no result within {timeout}s") from None

        return self.loop.run_until_complete(bounded())

    def stop(self, timeout: float = 5.0) -> None:
        """Cancel what is left on the loop, let it finish within ``timeout``, close the loop."""
        if self._stopped:
            return
        tasks = asyncio.all_tasks(self.loop)
        for task in tasks:
            task.cancel()
        if tasks:
            try:
                self.run(asyncio.gather(*tasks, return_exceptions=True), timeout)
            except Exception as exc:
                log.debug("cancelling the NATS loop's tasks: %s", exc)
        self._stopped = True
        self.loop.close()
