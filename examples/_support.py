"""Shared by the examples: argument parsing, an embedded nats-server, polling."""
from __future__ import annotations

import argparse
import contextlib
import time
from typing import Any
from collections.abc import Callable, Iterator

from actorbus.server import NatsServer


def parse_args(description: str, argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--servers", default=None,
                        help="NATS URL to use; without it an embedded nats-server is started")
    return parser.parse_args(argv)


@contextlib.contextmanager
def nats_url(servers: str | None) -> Iterator[str]:
    """``servers`` as given, or the URL of an embedded nats-server (free port, temp store)
    that is stopped, and its store removed, on exit."""
    if servers:
        yield servers
        return
    with NatsServer() as server:
        yield server.url


def wait_until(predicate: Callable[[], Any], timeout: float, what: str,
               interval: float = 0.1) -> Any:
    """Poll ``predicate`` until it returns something truthy; raise TimeoutError past ``timeout``."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def wait_for_acks(bus: Any, count: int, timeout: float = 30.0) -> dict[str, Any]:
    """``bus.stats()`` once it has acked ``count`` messages; TimeoutError past ``timeout``."""
    def stats_once_acked() -> dict[str, Any] | None:
        stats: dict[str, Any] = bus.stats()
        return stats if stats["acked"] >= count else None

    result: dict[str, Any] = wait_until(stats_once_acked, timeout, f"{count} acks")
    return result
