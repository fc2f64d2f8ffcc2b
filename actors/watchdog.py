"""Ending an actor process whose handler hangs.

A handler past its subscription's ``processing_timeout`` is treated as a
crash of its actor: a watchdog thread ends the process, and the parent
restarts the actor and re-sends what it held (each re-send counts as an
attempt). Arming and disarming only write an attribute, so the hot path
pays nothing for it.
"""
from __future__ import annotations

import os
import threading
import time

#: Exit status of a process ended by its watchdog.
EXIT_HUNG = 70

_CHECK_INTERVAL = 0.05


class Watchdog:
    """One per process; started on first use."""

    def __init__(self) -> None:
        self._deadline: float | None = None
        self._what = ""
        self._thread: threading.Thread | None = None

    def arm(self, timeout: float | None, what: str) -> None:
        """Expect the current handler call to end within ``timeout`` seconds (None: no limit)."""
        if timeout is None:
            self._deadline = None
            return
        self._what = what
        self._deadline = time.monotonic() + timeout
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="actorbus-watchdog", daemon=True)
            self._thread.start()

    def disarm(self) -> None:
        """The handler call ended."""
        self._deadline = None

    def _watch(self) -> None:
        while True:
            time.sleep(_CHECK_INTERVAL)
            deadline = self._deadline
            if deadline is not None and time.monotonic() > deadline:
                # Not through logging: Thespian's log forwarding belongs to the actor thread.
                os.write(2, f"actorbus: {self._what} ran past its processing_timeout; "
                            f"ending actor process {os.getpid()}\n".encode())
                os._exit(EXIT_HUNG)
