"""Router, pool table and aggregate actor logic on Thespian's simpleSystemBase (no server, one thread)."""
from __future__ import annotations

import pickle
from collections import defaultdict

import pytest
from thespian.actors import Actor, ActorSystem

from actorbus.actors.member import PoolMember
from actorbus.actors.messages import (FAILED, SUCCEEDED, UNDELIVERED, Completion, Delivery, Dispatch,
                                      HandlerRegistered, Outcome, PoolMembers, PoolReady,
                                      RegisterHandler, StartMember, StartPool)
from actorbus.actors.pool import PoolTable
from actorbus.actors.router import Router
from actorbus.config import SubscriptionConfig
from tests.support import read_records


class CollectingBridge(Actor):
    """Stands in for the Bridge: routes with a pool table where the Router says the members
    are, keeps the completions, hands them over on request."""

    def __init__(self):
        super().__init__()
        self.pool = PoolTable()
        self.announcements = []
        self.completions = []

    def receiveMessage(self, message, sender):
        if isinstance(message, PoolMembers):
            self.announcements.append(message)
            self.pool.update(message.addresses)
        elif isinstance(message, tuple) and message[0] == "route":
            self.pool.route(message[1])
            self._dispatch()
        elif isinstance(message, Completion):
            self.pool.completed(message, sender)
            self.completions.append(message)
            self._dispatch()
        elif message == "report":
            self.send(sender, (list(self.completions), list(self.announcements)))

    def _dispatch(self):
        for address, dispatch in self.pool.dispatches():
            self.send(address, dispatch)


@pytest.fixture
def system():
    asys = ActorSystem("simpleSystemBase", logDefs=False, transientUnique=True)
    yield asys
    asys.shutdown()


def delivery(token: int, key: str, seq: int) -> Delivery:
    return Delivery(token, "orders", f"orders.{key}", str(seq).encode(), None, key, key, None, 1, seq)


def test_router_announces_its_members_and_the_pool_table_routes_by_key(system, records):
    bridge = system.createActor(CollectingBridge)
    router = system.createActor(Router)
    spec = SubscriptionConfig("orders.>", "tests.handlers:record", envelope=False,
                              durable="orders")
    # The handlers come with StartPool: the members run them before the Bridge hears of them.
    assert isinstance(system.ask(router, StartPool(3, (bridge,), subscriptions=(spec,)), 5),
                      PoolReady)
    assert isinstance(system.ask(router, RegisterHandler(7, spec), 5), HandlerRegistered)

    keys = [f"k{i}" for i in range(6)]
    system.tell(bridge, ("route", tuple(delivery(i + 1, k, 0) for i, k in enumerate(keys))))
    system.tell(bridge, ("route", tuple(delivery(i + 7, k, 1) for i, k in enumerate(keys))))

    completions, announcements = system.ask(bridge, "report", 5)
    assert len(announcements) == 1 and None not in announcements[0].addresses
    assert len(announcements[0].addresses) == 3
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


class CollectingRouter(Actor):
    """Stands in for the Router: starts one member, forwards to it, keeps its completions."""

    def __init__(self):
        super().__init__()
        self.member = None
        self.completions = []

    def receiveMessage(self, message, sender):
        if isinstance(message, tuple) and message[0] == "start":
            self.member = self.createActor(PoolMember)
            self.send(self.member, StartMember(0, (message[1],)))
        elif isinstance(message, Dispatch):
            self.send(self.member, message)
        elif isinstance(message, Completion):
            self.completions.append(message)
        elif message == "report":
            self.send(sender, list(self.completions))


def test_member_handles_its_dispatches_in_their_sequence_order(system, records):
    router = system.createActor(CollectingRouter)
    spec = SubscriptionConfig("orders.>", "tests.handlers:record", envelope=False,
                              durable="orders")
    system.tell(router, ("start", spec))
    # The transport handed them over in the order 3, 1, 2.
    system.tell(router, Dispatch((delivery(5, "a", 2), delivery(6, "a", 3)), sequence=3))
    system.tell(router, Dispatch((delivery(1, "a", 0), delivery(2, "b", 0)), sequence=1))
    system.tell(router, Dispatch((delivery(3, "a", 1), delivery(4, "b", 1)), sequence=2))

    completions = system.ask(router, "report", 5)
    assert [list(c.tokens()) for c in completions] == [[1, 2], [3, 4], [5, 6]]
    handled = defaultdict(list)
    for r in read_records(records):
        handled[r.aggregate_id].append(int(r.data))
    assert handled == {"a": [0, 1, 2, 3], "b": [0, 1]}


def test_completions_carry_first_try_successes_as_bare_tokens():
    outcomes = [Outcome(1, SUCCEEDED, None, 1, 0.5), Outcome(2, FAILED, "boom", 4, 1.0),
                Outcome(3, SUCCEEDED, None, 2, 0.25), Outcome(4, UNDELIVERED, "gone", 0)]
    completion = Completion.of(outcomes, member=3)
    assert completion.succeeded == (1,) and completion.seconds == (0.5,)
    assert completion.others == tuple(outcomes[1:])   # a retried success travels in full
    assert sorted(completion.outcomes()) == sorted(outcomes)
    assert list(completion.tokens()) == [1, 2, 3, 4] and len(completion) == 4
    # What crosses a process boundary comes back as the same named values.
    again = pickle.loads(pickle.dumps(completion))
    assert again == completion and type(again.others[0]) is Outcome
    d = pickle.loads(pickle.dumps(delivery(9, "k", 1)))
    assert type(d) is Delivery and d.routing_key == "k" and d.token == 9
    dispatch = Dispatch((delivery(7, "k", 1), delivery(8, "j", 2)), sequence=4, epoch=2, bridge=1)
    again_dispatch = pickle.loads(pickle.dumps(dispatch))
    assert again_dispatch == dispatch and all(type(d) is Delivery for d in again_dispatch.deliveries)


def test_pool_table_resends_what_a_dead_member_held_in_order_and_counts_attempts():
    pool = PoolTable(max_resends=1)
    pool.update(("m0", "m1"))
    keys = ["a", "b", "c", "d", "e", "f"]
    pool.route([delivery(i + 1, k, 0) for i, k in enumerate(keys)])
    sent = list(pool.dispatches())
    index = {address: [d.token for d in dispatch.deliveries] for address, dispatch in sent}
    assert sorted(t for tokens in index.values() for t in tokens) == [1, 2, 3, 4, 5, 6]
    assert all(dispatch.sequence == 1 for _address, dispatch in sent)
    victim = "m0" if index.get("m0") else "m1"
    tokens = index[victim]
    # A busy member gets no second dispatch for a few deliveries: they wait for its completion.
    pool.route([delivery(7, keys[tokens[0] - 1], 1)])
    assert list(pool.dispatches()) == []
    position = ("m0", "m1").index(victim)
    down = (None, "m1") if position == 0 else ("m0", None)
    up = ("m0-new", "m1") if position == 0 else ("m0", "m1-new")
    assert pool.update(down) == ([], [])
    assert pool.depths()[position] == len(tokens) + 1
    resumed, exhausted = pool.update(up)
    assert resumed == [position] and exhausted == []
    # Re-sent one at a time (suspects), in the original order, numbered afresh.
    (address, first), = pool.dispatches()
    assert address == up[position] and first.sequence == 1
    assert [d.token for d in first.deliveries] == tokens[:1]
    pool.completed(Completion.of([Outcome(tokens[0], SUCCEEDED)], member=position), address)
    assert [d.token for _a, dispatch in pool.dispatches() for d in dispatch.deliveries] == tokens[1:2]
    # It dies again: the one it held is past MAX_RESENDS and fails as undelivered; what
    # waited here did not reach this incarnation, is not counted again and goes next.
    pool.update(down)
    resumed, exhausted = pool.update(up)
    assert [o.token for o in exhausted] == tokens[1:2] and resumed == [position]
    assert all(o.kind == UNDELIVERED for o in exhausted)
    assert pool.depths()[position] == len(tokens) - 2 + 1
    following = [d.token for _a, dispatch in pool.dispatches() for d in dispatch.deliveries]
    assert following == (tokens[2:3] if len(tokens) > 2 else [7])


def test_pool_table_replaced_pool_resends_without_counting():
    pool = PoolTable(epoch=3, max_resends=0)
    pool.update(("m0",))
    pool.route([delivery(1, "a", 0), delivery(2, "a", 1)])
    (_address, dispatch), = pool.dispatches()
    assert dispatch.epoch == 3
    # The Router and its pool were restarted: new addresses, no word of a death.
    resumed, exhausted = pool.update(("n0",))
    assert resumed == [0] and exhausted == []
    (address, again), = pool.dispatches()
    assert address == "n0" and [d.token for d in again.deliveries] == [1, 2] and again.sequence == 1
