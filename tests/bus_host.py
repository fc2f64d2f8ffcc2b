"""A bus in a process of its own, for tests that kill the whole host:
``python -m tests.bus_host URL PIDS_FILE [--pin-timeout S] [--handler NAME] [--bridges K]
[--subject S]``.

It subscribes ``orders.>`` (durable ``orders``) with a handler of
``tests.handlers`` (``record`` unless told); with ``--subject``, that subject
instead, keyed by its last token; with ``--bridges``, ``orders.*``
on a stream of 4 partitions read by that many Bridges,
writes the pid of every process of the bus (itself, Thespian's admin and
logger, every actor) to PIDS_FILE, and runs until it is killed.
"""
from __future__ import annotations

import argparse
import os
import time

from actorbus import EventBus
from tests import handlers


#: The pin of the durable's priority group moves this long after its bus stopped pulling.
PIN_TIMEOUT = 2.0


#: The partitions of the stream of a host with several Bridges.
PARTITIONS = 4


def main(url: str, pids_file: str, pin_timeout: float = PIN_TIMEOUT,
         handler: str = "record", bridges: int | None = None, subject: str | None = None) -> None:
    partitioned = {} if bridges is None else {"partitions": PARTITIONS, "bridges": bridges}
    bus = EventBus(servers=url, pool_size=2, window=2048, **partitioned)   # type: ignore[arg-type]
    keyed = {} if subject is None else {"key_from_subject": True}
    bus.subscribe(subject or ("orders.*" if partitioned else "orders.>"), getattr(handlers, handler),
                  durable="orders", ack_wait=5.0, pin_timeout=pin_timeout,
                  pull_expires=pin_timeout / 4, **keyed)
    pids = {os.getpid(), *bus.pids.values(), *bus.runtime.pids()}
    with open(pids_file + ".tmp", "w") as out:
        out.write(" ".join(str(pid) for pid in sorted(pids)))
    os.rename(pids_file + ".tmp", pids_file)
    while True:   # until SIGKILL
        time.sleep(1)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m tests.bus_host")
    parser.add_argument("url")
    parser.add_argument("pids_file")
    parser.add_argument("--pin-timeout", type=float, default=PIN_TIMEOUT)
    parser.add_argument("--handler", default="record")
    parser.add_argument("--bridges", type=int, default=None)
    parser.add_argument("--subject", default=None)
    args = parser.parse_args()
    main(args.url, args.pids_file, args.pin_timeout, args.handler, args.bridges, args.subject)
