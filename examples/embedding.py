"""Embedding the bus's Supervisor in a Thespian ActorSystem of your own.

The program starts its own multiprocTCPBase ActorSystem with its own actor (a
Monitor), creates actorbus's Supervisor there and drives it with the same
messages the EventBus facade sends (StartBus, Subscribe, StopBus). The Monitor
asks the Supervisor for Stats and forwards them to whoever asked it. Messages
are published with nats-py directly; at the end no actor process is left.
"""
from __future__ import annotations

import asyncio
import itertools
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

from thespian.actors import ActorSystem, ActorTypeDispatcher

from actorbus import Message
from actorbus.embedding import (BusConfig, BusStarted, BusStopped, StartBus, Stats, StatsRequest,
                                StopBus, Subscribe, Subscribed, SubscriptionConfig, Supervisor,
                                actor_system)
from actorbus.processes import process_alive

SUBJECT = "embed.events"
MESSAGES = 25


def handle(msg: Message) -> None:
    """The subscription's handler; runs in the Supervisor's pool actors."""
    msg.data.decode()


# ---------------------------------------------------------------- the program's own actor
@dataclass(frozen=True)
class Watch:
    """Program → Monitor: watch this Supervisor."""
    supervisor: Any


@dataclass(frozen=True)
class Watching:
    """Monitor → program: watching, from process ``pid``."""
    pid: int


@dataclass(frozen=True)
class MonitorQuery:
    """Anyone → Monitor: the bus's current Stats, please."""


class Monitor(ActorTypeDispatcher):
    """Asks the Supervisor for Stats on behalf of others and forwards each reply."""

    def __init__(self) -> None:
        super().__init__()
        self._supervisor = None
        self._pending: dict[int, Any] = {}
        # Request ids of our own, well away from the program's (the Supervisor keys replies by id).
        self._ids = itertools.count(1_000_000)
        self.views = 0

    def receiveMsg_Watch(self, message: Watch, sender) -> None:
        self._supervisor = message.supervisor
        self.send(sender, Watching(os.getpid()))

    def receiveMsg_MonitorQuery(self, message: MonitorQuery, sender) -> None:
        request_id = next(self._ids)
        self._pending[request_id] = sender
        self.send(self._supervisor, StatsRequest(request_id))

    def receiveMsg_Stats(self, message: Stats, sender) -> None:
        asker = self._pending.pop(message.request_id, None)
        if asker is not None:
            self.views += 1
            self.send(asker, message)


# ---------------------------------------------------------------- the program
def ask(asys: ActorSystem, address: Any, message: Any, expected: type, timeout: float = 30.0) -> Any:
    """Ask and return the reply of type ``expected`` (same request id), skipping stale replies."""
    deadline = time.monotonic() + timeout
    reply = asys.ask(address, message, timeout)
    while True:
        if isinstance(reply, expected) and getattr(reply, "request_id", None) == \
                getattr(message, "request_id", None):
            return reply
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no {expected.__name__} in reply to {message!r} (last: {reply!r})")
        reply = asys.listen(remaining)


async def _publish(url: str, count: int) -> None:
    import nats
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        for i in range(count):
            await js.publish(SUBJECT, f"event-{i}".encode())
    finally:
        await nc.close()


def main(argv: list[str] | None = None) -> int:
    from examples._support import nats_url, parse_args

    args = parse_args(__doc__.splitlines()[0], argv)
    ids = itertools.count(1)
    pids: set[int] = set()
    # The actor system shuts down on exit, and every process it started is ended by pid.
    with nats_url(args.servers) as url, actor_system() as asys:
        monitor = asys.createActor(Monitor)
        supervisor = asys.createActor(Supervisor)
        watching = asys.ask(monitor, Watch(supervisor), 10.0)
        pids.add(watching.pid)
        started = ask(asys, supervisor,
                      StartBus(next(ids), BusConfig(servers=url, pool_size=2)), BusStarted)
        pids.update(started.pids.values())
        print(f"bus started in our ActorSystem: {dict(sorted(started.pids.items()))}")
        print(f"our Monitor actor runs in pid {watching.pid}")
        sub = SubscriptionConfig(subject=SUBJECT, handler="examples.embedding:handle",
                                 envelope=False, durable="embedded")
        subscribed = ask(asys, supervisor, Subscribe(next(ids), sub), Subscribed)
        print(f"subscribed: stream {subscribed.stream}, durable {subscribed.durable}")

        asyncio.run(_publish(url, MESSAGES))
        deadline = time.monotonic() + 20.0
        while True:
            view = asys.ask(monitor, MonitorQuery(), 10.0)
            if isinstance(view, Stats):
                pids.update(view.pids.values())
                if view.counts.get("acked", 0) >= MESSAGES:
                    break
            if time.monotonic() > deadline:
                print(f"not all acked in time: {view!r}", file=sys.stderr)
                return 1
            time.sleep(0.1)
        counts = view.counts
        print(f"monitor's view: received {counts.get('received')}, processed "
              f"{counts.get('processed')}, acked {counts.get('acked')}, "
              f"failed {counts.get('failed', 0)}; actors {dict(sorted(view.states.items()))}")
        ask(asys, supervisor, StopBus(next(ids), 10.0), BusStopped, timeout=20.0)
        print("bus stopped")
    left = [pid for pid in sorted(pids) if process_alive(pid)]
    print(f"after shutdown: {len(pids)} actor processes checked, {len(left)} left")
    ok = counts.get("acked", 0) >= MESSAGES and not left
    print(f"embedding: {'OK' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    # Run through the package so Monitor and handle are importable as examples.embedding.*.
    from examples.embedding import main as _main
    sys.exit(_main())
