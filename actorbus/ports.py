"""Free loopback ports, for nats-server and Thespian admin ports.

A port the OS picks (a bind to port 0) comes from its ephemeral range, the
one it also hands out as the local port of every outgoing connection: on a
busy host such a port can be taken by a connection between the moment it is
chosen and the moment the server binds it. So the port is chosen below that
range, where only an explicit bind takes it, and checked free.
"""
from __future__ import annotations

import random
import socket
from pathlib import Path

#: Linux's ephemeral range, as ``ip_local_port_range`` says it.
_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
#: Lowest port chosen: above the well-known and most registered services' ports.
_LOWEST = 10_000
_ATTEMPTS = 50


def free_port() -> int:
    """A TCP port nothing listens on right now, below the OS's ephemeral range when that
    leaves room (else one the OS picks)."""
    highest = _below_ephemeral()
    if highest > _LOWEST:
        for _ in range(_ATTEMPTS):
            port = random.randint(_LOWEST, highest)
            if _bindable(port):
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        chosen: int = sock.getsockname()[1]
        return chosen


def _below_ephemeral() -> int:
    try:
        low = int(_EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0   # not Linux, or not readable: let the OS pick
    return low - 1


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
