"""How the bus connects to NATS: the one place that builds nats-py's ``connect`` options.

The Bridge and the facade's publisher both connect through
:func:`connect_options`, so a setting (servers, timeouts, and the
credentials and TLS of a secured server) means the same to both. The
configuration carries plain values (paths and strings), never live
objects such as an ``ssl.SSLContext``: it travels pickled to the Bridge's
process, and the context is built where the connection is made.
"""
from __future__ import annotations

from typing import Any, Awaitable, Callable

from actorbus.config import BusConfig

#: Seconds between reconnect attempts.
RECONNECT_TIME_WAIT = 0.5

Callback = Callable[..., Awaitable[None]]


def connect_options(config: BusConfig, *, name: str, reconnect_forever: bool,
                    error_cb: Callback | None = None, disconnected_cb: Callback | None = None,
                    reconnected_cb: Callback | None = None) -> dict[str, Any]:
    """Keyword arguments for ``nats.connect`` for ``config``.

    ``reconnect_forever`` is for the Bridge, which must outlive a server
    restart; the publisher gives up after a few attempts so that a caller
    gets an error instead of a hang.
    """
    options: dict[str, Any] = {
        "servers": list(config.servers),
        "name": name,
        "connect_timeout": config.connect_timeout,
        "allow_reconnect": True,
        "max_reconnect_attempts": -1 if reconnect_forever else 3,
        "reconnect_time_wait": RECONNECT_TIME_WAIT,
    }
    callbacks = {"error_cb": error_cb, "disconnected_cb": disconnected_cb,
                 "reconnected_cb": reconnected_cb}
    options.update({key: cb for key, cb in callbacks.items() if cb is not None})
    return options
