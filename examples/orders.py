"""Order processing with stateful aggregates and envelope events.

Each order id gets one ``Order`` aggregate instance inside the pool actor that
owns the id; its events (OrderPlaced, LineAdded, OrderShipped, JSON payloads in
envelopes) reach it in order. ``topology`` also runs under
``actorbus run examples.orders:topology``. main() publishes ~20 orders, waits
until all are acked and prints a summary by status.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

from actorbus import Aggregate, Envelope, Message, Subscription, Topology

#: Where each Order writes its state (set before the bus starts: actor processes inherit it).
STATE_DIR_ENV = "ACTORBUS_EXAMPLE_ORDERS_DIR"


class Order(Aggregate):
    """One order: its lines, total and status, built from its events in order."""

    idle_timeout = 600.0

    def __init__(self, aggregate_id: str) -> None:
        super().__init__(aggregate_id)
        self.status = "new"
        self.lines: list[dict] = []
        self.total = 0.0
        self.events = 0

    def handle(self, msg: Message) -> None:
        event = msg.envelope.event_type
        body = json.loads(msg.data) if msg.data else {}
        if event == "OrderPlaced":
            if self.status != "new":
                raise ValueError(f"{self.aggregate_id}: OrderPlaced while {self.status}")
            self.status = "placed"
            self.customer = body.get("customer")
        elif event == "LineAdded":
            if self.status != "placed":
                raise ValueError(f"{self.aggregate_id}: LineAdded while {self.status}")
            self.lines.append(body)
            self.total += body["qty"] * body["price"]
        elif event == "OrderShipped":
            if self.status != "placed":
                raise ValueError(f"{self.aggregate_id}: OrderShipped while {self.status}")
            self.status = "shipped"
        else:
            raise ValueError(f"unknown event type {event!r}")
        self.events += 1
        self._save()

    def _save(self) -> None:
        directory = os.environ.get(STATE_DIR_ENV)
        if not directory:
            return
        state = {"order": self.aggregate_id, "status": self.status, "lines": len(self.lines),
                 "total": round(self.total, 2), "events": self.events, "pid": os.getpid()}
        path = Path(directory) / f"{self.aggregate_id}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        tmp.replace(path)


topology = Topology(
    subscriptions=(Subscription("shop.orders.>", Order, durable="orders", stream="SHOP_ORDERS"),),
    bus={"pool_size": 4},
)


def order_events(order_id: str, n: int) -> list[tuple[str, Envelope]]:
    """The events of order number ``n``: placed, 1-3 lines, and every third one not shipped."""
    def event(kind: str, body: dict) -> tuple[str, Envelope]:
        return (f"shop.orders.{kind.lower()}",
                Envelope.create(order_id, kind, json.dumps(body).encode()))

    events = [event("OrderPlaced", {"customer": f"customer-{n % 5}"})]
    for line in range(1 + n % 3):
        events.append(event("LineAdded", {"sku": f"SKU-{line}", "qty": 1 + line,
                                          "price": 9.5 + n}))
    if n % 3 != 2:
        events.append(event("OrderShipped", {}))
    return events


def main(argv: list[str] | None = None) -> int:
    from examples._support import nats_url, parse_args, wait_for_acks

    args = parse_args(__doc__.splitlines()[0], argv)
    run = uuid.uuid4().hex[:6]
    orders = [f"order-{run}-{n:02d}" for n in range(20)]
    messages = [item for n, order in enumerate(orders) for item in order_events(order, n)]
    with tempfile.TemporaryDirectory(prefix="actorbus-orders-") as state_dir, \
            nats_url(args.servers) as url:
        os.environ[STATE_DIR_ENV] = state_dir      # before the actor processes fork
        started = time.monotonic()
        with topology.start(servers=url) as bus:
            results = bus.publish_many(messages)
            failed = [r for r in results if not r.ok]
            if failed:
                print(f"publishing failed: {failed[0].error}", file=sys.stderr)
                return 1
            stats = wait_for_acks(bus, len(messages))
        seconds = time.monotonic() - started
        states = [json.loads((Path(state_dir) / f"{o}.json").read_text())
                  for o in orders if (Path(state_dir) / f"{o}.json").exists()]
    by_status = Counter(s["status"] for s in states)
    print(f"published {len(messages)} events for {len(orders)} orders; "
          f"acked {stats['acked']}, failed {stats['failed']}, in {seconds:.1f}s")
    for status in sorted(by_status):
        group = [s for s in states if s["status"] == status]
        print(f"  {status:8s} {len(group):3d} orders, {sum(s['lines'] for s in group):3d} lines, "
              f"total {sum(s['total'] for s in group):9.2f}")
    print(f"  handled on {len({s['pid'] for s in states})} actor processes")
    ok = (len(states) == len(orders) and stats["failed"] == 0
          and sum(s["events"] for s in states) == len(messages))
    print("orders: OK" if ok else "orders: MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    # Run through the package so Order is examples.orders.Order, importable in the actors.
    from examples.orders import main as _main
    sys.exit(_main())
