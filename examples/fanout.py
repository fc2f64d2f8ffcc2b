"""Keyless fan-out: plain messages with no aggregate id, spread over a pool of 4.

A message without an aggregate id (no envelope, no X-Aggregate-ID header) gets a
round-robin slot from the Router, so consecutive messages go to consecutive pool
members. Each handler call appends its pid to a file of its own process; main()
prints how many messages each process handled (the counts differ by at most 1).
"""
from __future__ import annotations

import os
import sys
import tempfile
from collections import Counter
from pathlib import Path

from actorbus import EventBus, Message

#: Where the handlers record their pid (set before the bus starts: actor processes inherit it).
RECORDS_ENV = "ACTORBUS_EXAMPLE_FANOUT_DIR"
MESSAGES = 42
POOL_SIZE = 4


def handle(msg: Message) -> None:
    """Record which process handled this message."""
    with open(Path(os.environ[RECORDS_ENV]) / f"pids-{os.getpid()}.txt", "a") as out:
        out.write(f"{os.getpid()} {msg.routing_key}\n")


def main(argv: list[str] | None = None) -> int:
    from examples._support import nats_url, parse_args, wait_for_acks

    args = parse_args(__doc__.splitlines()[0], argv)
    with tempfile.TemporaryDirectory(prefix="actorbus-fanout-") as records, \
            nats_url(args.servers) as url:
        os.environ[RECORDS_ENV] = records        # before the actor processes fork
        with EventBus(servers=url, pool_size=POOL_SIZE) as bus:
            bus.subscribe("fanout.work", handle, envelope=False, durable="fanout",
                          stream="FANOUT")
            results = bus.publish_many([("fanout.work", f"job-{i}".encode())
                                        for i in range(MESSAGES)])
            if not all(r.ok for r in results):
                print("publishing failed", file=sys.stderr)
                return 1
            stats = wait_for_acks(bus, MESSAGES)
            members = {pid: name for name, pid in bus.pids.items() if name.startswith("member-")}
        counts: Counter[int] = Counter()
        for path in Path(records).glob("pids-*.txt"):
            for line in path.read_text().splitlines():
                counts[int(line.split()[0])] += 1
    print(f"{MESSAGES} keyless messages, acked {stats['acked']}, on a pool of {POOL_SIZE}:")
    for pid, name in sorted(members.items(), key=lambda item: item[1]):
        print(f"  {name} (pid {pid}): {counts.get(pid, 0)} messages")
    others = set(counts) - set(members)
    values = [counts.get(pid, 0) for pid in members]
    spread = max(values) - min(values) if values else None
    ok = (not others and len(members) == POOL_SIZE and sum(values) == MESSAGES
          and spread is not None and spread <= 1)
    print(f"fanout: {'OK' if ok else 'UNEVEN'} (max - min = {spread})")
    return 0 if ok else 1


if __name__ == "__main__":
    # Run through the package so the handler is examples.fanout:handle, importable in the actors.
    from examples.fanout import main as _main
    sys.exit(_main())
