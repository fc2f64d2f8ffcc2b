"""A custom supervision tree: two buses in one program, each with its own policies.

The "orders" bus restarts only the pool member that died (OneForOne with a fast
Backoff at the pool level, a strict OneForOne at the root); the "metrics" bus
restarts its whole pool when one member dies (AllForOne). main() SIGKILLs one
aggregate actor of each while messages are being processed and shows the
restarts (restarts_pool, the new pids) and that every message is still acked.
"""
from __future__ import annotations

import os
import signal
import sys
import time

from actorbus import Envelope, EventBus, Message
from actorbus.supervision import AllForOne, Backoff, OneForOne, SupervisionTree

ORDERS_POLICY = SupervisionTree(
    root=OneForOne(max_restarts=2, within=30.0),
    pool=OneForOne(max_restarts=10, backoff=Backoff(initial=0.05, maximum=1.0)))
METRICS_POLICY = AllForOne(max_restarts=10, within=30.0, backoff=Backoff(initial=0.05, maximum=1.0))
PER_BATCH = 150


def handle(msg: Message) -> None:
    """A little work per message, so that a kill lands while messages are in flight."""
    time.sleep(0.004)


def members(bus: EventBus) -> dict[str, int]:
    """The pool members' pids as of the last ``stats()``."""
    return {name: pid for name, pid in sorted(bus.pids.items()) if name.startswith("member-")}


def publish_batch(orders: EventBus, metrics: EventBus, batch: int) -> None:
    orders.publish_many([("sv.orders.event", Envelope.create(f"order-{i % 25}", "OrderTouched",
                                                             f"{batch}-{i}".encode()))
                         for i in range(PER_BATCH)])
    metrics.publish_many([("sv.metrics.cpu", f"{batch}-{i}".encode(),
                           {"X-Aggregate-ID": f"host-{i % 10}"}) for i in range(PER_BATCH)])


def main(argv: list[str] | None = None) -> int:
    from examples._support import nats_url, parse_args, wait_for_acks, wait_until

    args = parse_args(__doc__.splitlines()[0], argv)
    with nats_url(args.servers) as url, \
            EventBus(servers=url, pool_size=3, supervision=ORDERS_POLICY, name="orders") as orders, \
            EventBus(servers=url, pool_size=3, supervision=METRICS_POLICY, name="metrics") as metrics:
        orders.subscribe("sv.orders.>", handle, envelope=True, durable="sv_orders",
                         stream="SV_ORDERS")
        metrics.subscribe("sv.metrics.>", handle, envelope=False, durable="sv_metrics",
                          stream="SV_METRICS")
        orders.stats(), metrics.stats()
        before = {"orders": members(orders), "metrics": members(metrics)}

        publish_batch(orders, metrics, 1)
        wait_until(lambda: orders.stats()["processed"] > 0 and metrics.stats()["processed"] > 0,
                   10.0, "processing to begin", interval=0.01)
        victims = {"orders": before["orders"]["member-1"],
                   "metrics": before["metrics"]["member-0"]}
        for bus_name, pid in victims.items():
            os.kill(pid, signal.SIGKILL)
            print(f"{bus_name}: SIGKILLed pool member pid {pid}")

        # OneForOne: only the killed member comes back, in a new process.
        wait_until(lambda: orders.stats()["restarts_pool"] >= 1
                   and all(s == "running" for s in orders.stats()["actors"].values()),
                   15.0, "the orders pool member to restart")
        # AllForOne: every member is replaced, so every pid changes.
        wait_until(lambda: metrics.stats() and all(
            pid != before["metrics"][name] for name, pid in members(metrics).items())
            and metrics.stats()["restarts_pool"] >= 3, 15.0, "the whole metrics pool to restart")
        after = {"orders": members(orders), "metrics": members(metrics)}

        publish_batch(orders, metrics, 2)          # the restarted pools keep working
        total = 2 * PER_BATCH
        final = {name: wait_for_acks(bus, total)
                 for name, bus in (("orders", orders), ("metrics", metrics))}

    ok = True
    for name in ("orders", "metrics"):
        changed = [m for m in before[name] if before[name][m] != after[name][m]]
        stats = final[name]
        print(f"{name}: restarts_pool={stats['restarts_pool']} restarts={stats['restarts']} "
              f"acked={stats['acked']}/{total} processed={stats['processed']}")
        for member in before[name]:
            mark = "  (restarted)" if member in changed else ""
            print(f"  {member}: pid {before[name][member]} -> {after[name][member]}{mark}")
        expected = ["member-1"] if name == "orders" else sorted(before[name])
        if sorted(changed) != expected or stats["acked"] < total:
            ok = False
    print(f"supervision_tree: {'OK' if ok else 'UNEXPECTED'} "
          "(OneForOne restarted 1 member, AllForOne restarted all)")
    return 0 if ok else 1


if __name__ == "__main__":
    # Run through the package so the handler is examples.supervision_tree:handle.
    from examples.supervision_tree import main as _main
    sys.exit(_main())
