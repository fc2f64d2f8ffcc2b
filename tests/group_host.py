"""A bus of a partitioned consumer group in a process of its own, for the scale-out tests:
``python -m tests.group_host URLS PIDS_FILE GROUP PARTITIONS MEMBER [MEMBERS [REPLICAS HEARTBEAT
[HANDLER]]] [--bridges K]``.

It subscribes ``orders.*`` (stream ``ORDERS``) with the recording handler (or HANDLER of
``tests.handlers``) as member
MEMBER of GROUP (static when MEMBERS, comma-separated, is given; elastic when it is
empty or "-"), with REPLICAS copies of the stream (default 1) and HEARTBEAT seconds,
writes the pid of every process of the bus to PIDS_FILE (and its actors' by name to
PIDS_FILE.actors) and, every 0.2 s, its group
stats as JSON to PIDS_FILE.stats, and runs until it is killed or gets SIGTERM (then it
stops cleanly: drains, unpins, leaves the group).
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading

from actorbus import EventBus
from tests import handlers

#: A dead member's pins move this long after its last pull request.
PIN_TIMEOUT = 2.0
#: Seconds between an elastic member's heartbeats (gone after five missed).
HEARTBEAT = 0.5
#: What the status file shows.
STATS = ("partitions_owned", "group_members", "rebalances", "pinned", "standby", "received",
         "processed", "recovered")


def main(url: str, pids_file: str, group: str, partitions: str, member: str,
         members: str | None = None, replicas: str = "1", heartbeat: str = str(HEARTBEAT),
         handler: str = "record", bridges: int = 1) -> None:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    bus = EventBus(servers=url, pool_size=2, window=2048, group=group, partitions=int(partitions),
                   member=member, members=members.split(",") if members not in (None, "", "-") else None,
                   heartbeat=float(heartbeat), bridges=bridges)
    try:
        bus.subscribe("orders.*", getattr(handlers, handler), durable="orders", stream="ORDERS",
                      ack_wait=5.0, pin_timeout=PIN_TIMEOUT, pull_expires=PIN_TIMEOUT / 4,
                      replicas=int(replicas))
        pids = {os.getpid(), *bus.pids.values(), *bus.runtime.pids()}
        with open(pids_file + ".tmp", "w") as out:
            out.write(" ".join(str(pid) for pid in sorted(pids)))
        os.rename(pids_file + ".tmp", pids_file)
        with open(pids_file + ".actors", "w") as out:
            json.dump(bus.pids, out)   # the actors by name: bridge, bridge-1, member-0, ...
        while not stop.wait(0.2):
            stats = bus.stats()
            with open(pids_file + ".stats.tmp", "w") as out:
                json.dump({key: stats.get(key, 0) for key in STATS}, out)
            os.rename(pids_file + ".stats.tmp", pids_file + ".stats")
    finally:
        bus.stop()


if __name__ == "__main__":
    arguments = sys.argv[1:]
    bridges = 1
    if "--bridges" in arguments:
        at = arguments.index("--bridges")
        bridges = int(arguments[at + 1])
        del arguments[at:at + 2]
    main(*arguments, bridges=bridges)
