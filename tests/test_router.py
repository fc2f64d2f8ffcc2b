"""Router and aggregate actor logic on Thespian's simpleSystemBase (no server, one thread)."""
from __future__ import annotations

from collections import defaultdict

import pytest
from thespian.actors import Actor, ActorSystem

from actorbus.actors.messages import (SUCCEEDED, Completion, Delivery, Dispatch, HandlerRegistered,
                                      PoolReady, RegisterHandler, StartPool)
from actorbus.actors.router import Router
from actorbus.config import SubscriptionConfig
from tests.support import read_records


class CollectingBridge(Actor):
    """Stands in for the Bridge: keeps completions, hands them over on request."""

    def __init__(self):
        super().__init__()
        self.completions = []

    def receiveMessage(self, message, sender):
        if isinstance(message, Completion):
            self.completions.append(message)
        elif message == "report":
            self.send(sender, list(self.completions))


@pytest.fixture
def system():
    asys = ActorSystem("simpleSystemBase", logDefs=False, transientUnique=True)
    yield asys
    asys.shutdown()


def delivery(token: int, key: str, seq: int) -> Delivery:
    return Delivery(token, "orders", f"orders.{key}", str(seq).encode(), None, key, key, None, 1, seq)


def test_router_routes_by_key_in_dispatch_sequence_order(system, records):
    bridge = system.createActor(CollectingBridge)
    router = system.createActor(Router)
    assert isinstance(system.ask(router, StartPool(3, bridge), 5), PoolReady)
    spec = SubscriptionConfig("orders.>", "tests.handlers:record", envelope=False,
                              durable="orders").handler_spec()
    assert isinstance(system.ask(router, RegisterHandler(7, spec), 5), HandlerRegistered)

    keys = [f"k{i}" for i in range(6)]
    first = Dispatch(tuple(delivery(i + 1, k, 0) for i, k in enumerate(keys)), sequence=1)
    second = Dispatch(tuple(delivery(i + 7, k, 1) for i, k in enumerate(keys)), sequence=2)
    system.tell(router, second)   # arrives early: must wait for the first
    system.tell(router, first)

    completions = system.ask(bridge, "report", 5)
    outcomes = [o for c in completions for o in c.outcomes()]
    assert sorted(o.token for o in outcomes) == list(range(1, 13))
    assert all(o.kind == SUCCEEDED for o in outcomes)
    handled = defaultdict(list)
    for r in read_records(records):
        handled[r.aggregate_id].append(int(r.data))
    assert handled == {k: [0, 1] for k in keys}
    members_per_key = defaultdict(set)
    for c in completions:
        for o in c.outcomes():
            members_per_key[(o.token - 1) % 6].add(c.member)
    assert all(len(members) == 1 for members in members_per_key.values())
