"""Stopping a bus from a command (``actorbus run``, ``actorbus demo``): drain, and let a
second Ctrl-C or SIGTERM cut the drain short without leaving an actor process behind."""
from __future__ import annotations

import os
import signal
from types import FrameType
from typing import NoReturn

from rich.console import Console

from actorbus.bus import EventBus
from actorbus.processes import process_alive

#: What a command prints when a second signal cuts its drain short.
STOPPING_NOW = ("stopping now: the actor system is shut down without waiting; what was not "
                "acked is redelivered by JetStream")


def drain_then_stop(bus: EventBus, console: Console, timeout: float) -> bool:
    """Drain and stop ``bus`` (up to ``timeout`` seconds); True if the drain ran its course.

    A Ctrl-C or SIGTERM during the drain stops it at once: the actor system is
    still shut down, and later signals are ignored until it is, so no actor
    process outlives the command.
    """
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}

    def stop_now(signum: int, frame: FrameType | None) -> NoReturn:
        for each in previous:
            signal.signal(each, signal.SIG_IGN)
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        for signum in previous:
            signal.signal(signum, stop_now)
        try:
            bus.stop(timeout=timeout)
        except KeyboardInterrupt:
            console.print(STOPPING_NOW)
            # The interrupt may have cut the shutdown itself short: finish it.
            if any(process_alive(pid) for pid in bus.pids.values() if pid != os.getpid()):
                bus.runtime.shutdown(bus.pids.values())
            return False
        return True
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
