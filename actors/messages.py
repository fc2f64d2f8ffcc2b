"""Every message the actors exchange: small frozen values, named for what they mean.

The hot path carries batches (a :class:`Dispatch` holds many deliveries, a
:class:`Completion` many outcomes), because a Thespian send costs about as
much as handling a few hundred trivial messages.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, NamedTuple
from collections.abc import Iterable, Iterator, Mapping

from actorbus.config import BusConfig, SubscriptionConfig
from actorbus.policies import RestartPolicy
from actorbus.tracing import SpanHandle
from actorbus.snapshots import SnapshotStores

#: A Thespian actor address: opaque, only ever passed back to ``send``.
Address = Any


def index_of_address(addresses: Iterable[Address | None], address: Address) -> int | None:
    """Where ``address`` is in ``addresses`` (None: nowhere). Thespian's addresses compare
    equal but do not hash, so a pool is searched, not looked up."""
    for index, candidate in enumerate(addresses):
        if candidate is not None and candidate == address:
            return index
    return None


# ---------------------------------------------------------------- hot path
# Every delivery crosses a process boundary (Bridge → member) and every outcome one more,
# each a pickle and an unpickle: the per-message parts are named tuples
# (a slotted dataclass pickles through Python code, several times slower),
# and the common outcome, a first-try success, travels as a bare token.
# Thespian also formats every message it sends for a debug line, filtered
# or not: the batch messages keep their repr short.

class Delivery(NamedTuple):
    """One JetStream message as the pool sees it; ``token`` is the Bridge's key for it."""

    token: int
    subscription: str
    subject: str
    data: bytes
    headers: Mapping[str, str] | None
    routing_key: str
    aggregate_id: str | None
    keyless_slot: int | None
    delivery_count: int
    stream_sequence: int

    def __repr__(self) -> str:
        return f"Delivery(#{self.token} {self.subject} key={self.routing_key})"


@dataclass(frozen=True, slots=True, repr=False)
class Dispatch:
    """Bridge → pool member: deliveries to handle, in order.

    ``sequence`` numbers the dispatches to one member incarnation (1, 2, ...)
    so the member handles them in the order they were routed even if the
    transport hands them over in another. ``epoch`` is the Bridge's
    incarnation: a restarted Bridge numbers from 1 again, and a member
    starts afresh when the epoch goes up. ``bridge`` is the index of the
    Bridge that sent it: a bus may run several, and a member keeps each one's
    numbering apart. ``ownership`` counts the times what that Bridge reads changed
    hands (a pin lost, a group's partitions rebalanced): a member that sees it change
    drops its durable aggregates' instances, whose events may have been handled
    elsewhere meanwhile, and restores them on their next message.
    """

    deliveries: tuple[Delivery, ...]
    sequence: int
    epoch: int = 0
    bridge: int = 0
    ownership: int = 0

    def __repr__(self) -> str:
        return f"Dispatch(#{self.sequence}, {len(self.deliveries)} deliveries)"

    def __reduce__(self) -> tuple[Any, ...]:
        # Deliveries travel as plain tuples: a NamedTuple pickles through a Python call per
        # object, which the Bridge (every message passes through it) paid on each one.
        rows = tuple(map(tuple, self.deliveries))
        return (_dispatch_of_rows, (rows, self.sequence, self.epoch, self.bridge, self.ownership))

    def undelivered(self, reason: str) -> Completion:
        """A completion that fails every delivery of this dispatch as never handled."""
        return Completion.of(Outcome(d.token, UNDELIVERED, reason, 0) for d in self.deliveries)


def _dispatch_of_rows(rows: tuple[tuple[Any, ...], ...], sequence: int, epoch: int,
                      bridge: int, ownership: int = 0) -> Dispatch:
    return Dispatch(tuple(map(Delivery._make, rows)), sequence, epoch, bridge, ownership)


class OutcomeKind(enum.StrEnum):
    """What became of a delivery, in one word."""

    SUCCEEDED = "succeeded"      #: the handler returned
    FAILED = "failed"            #: the handler raised on every attempt
    UNDELIVERED = "undelivered"  #: it never reached a handler (hand-off failed)
    #: not handled: an older message of its key failed and is due to come back first
    DEFERRED = "deferred"
    #: not handled: not a valid envelope (or not of the key it was routed by); it never
    #: can be, so it is dead-lettered at once
    INVALID = "invalid"


SUCCEEDED = OutcomeKind.SUCCEEDED
FAILED = OutcomeKind.FAILED
UNDELIVERED = OutcomeKind.UNDELIVERED
DEFERRED = OutcomeKind.DEFERRED
INVALID = OutcomeKind.INVALID


class Outcome(NamedTuple):
    """What became of one delivery."""

    token: int
    kind: OutcomeKind
    error: str | None = None
    attempts: int = 1
    seconds: float = 0.0  # time in the handler, all attempts
    #: The sampled ``process`` span it was handled in (see :mod:`actorbus.tracing`):
    #: the Bridge adds its own spans of the message to that trace.
    trace: SpanHandle | None = None


@dataclass(frozen=True, slots=True, repr=False)
class Completion:
    """Pool member → Bridge: the outcomes of one dispatch.

    A delivery handled on its first attempt is just its token in
    ``succeeded`` and its handler time at the same place in ``seconds``;
    every other outcome is in ``others``, in full. Build one with
    :meth:`of`, read it back with :meth:`outcomes`. ``member`` is the pool
    index of the actor that produced it.

    A member working through a long dispatch reports what it has finished
    as it goes (``final=False``), so those messages are acked without
    waiting for the rest; the last part of a dispatch has ``final=True``
    and only it ends the dispatch in the Bridge's pool bookkeeping.
    """

    succeeded: tuple[int, ...] = ()
    seconds: tuple[float, ...] = ()
    others: tuple[Outcome, ...] = ()
    member: int = -1
    final: bool = True  # the last part of its dispatch (partial reports have False)

    @classmethod
    def of(cls, outcomes: Iterable[Outcome], member: int = -1, final: bool = True) -> Completion:
        """The compact form of ``outcomes``."""
        succeeded: list[int] = []
        seconds: list[float] = []
        others: list[Outcome] = []
        for outcome in outcomes:
            if outcome.kind == SUCCEEDED and outcome.attempts == 1 and outcome.trace is None:
                succeeded.append(outcome.token)
                seconds.append(outcome.seconds)
            else:
                others.append(outcome)
        return cls(tuple(succeeded), tuple(seconds), tuple(others), member, final=final)

    def outcomes(self) -> Iterator[Outcome]:
        """Every outcome in full: the first-try successes, then the others."""
        for token, seconds in zip(self.succeeded, self.seconds, strict=True):
            yield Outcome(token, SUCCEEDED, None, 1, seconds)
        yield from self.others

    def tokens(self) -> Iterator[int]:
        """The token of every outcome."""
        yield from self.succeeded
        for outcome in self.others:
            yield outcome.token

    def __len__(self) -> int:
        return len(self.succeeded) + len(self.others)

    def __repr__(self) -> str:
        part = "" if self.final else ", partial"
        return f"Completion(member {self.member}, {len(self)} outcomes{part})"


# ---------------------------------------------------------------- set-up
class ActorState(enum.StrEnum):
    """A supervised actor's state, as ``stats()["actors"]`` reports it."""

    STARTING = "starting"
    RUNNING = "running"
    RESTARTING = "restarting"
    STOPPED = "stopped"


#: How pool members are named in ``pids`` and ``stats()["actors"]``: ``member-<index>``.
MEMBER_PREFIX = "member-"


def member_name(index: int) -> str:
    """The name of pool member ``index`` in ``pids`` and ``stats()["actors"]``."""
    return f"{MEMBER_PREFIX}{index}"


BRIDGE_NAME = "bridge"


def bridge_name(index: int) -> str:
    """The name of Bridge ``index`` in ``pids`` and ``stats()["actors"]``: the first is
    ``bridge``, as on a bus with one, the others ``bridge-1``, ``bridge-2``, ..."""
    return BRIDGE_NAME if index == 0 else f"{BRIDGE_NAME}-{index}"


@dataclass(frozen=True, slots=True)
class StartBus:
    """Facade → Supervisor: build the Bridge and the pool for this configuration."""

    request_id: int
    config: BusConfig


@dataclass(frozen=True, slots=True)
class BusStarted:
    """Supervisor → facade: everything is up; ``pids`` names each actor's process."""

    request_id: int
    pids: Mapping[str, int]


@dataclass(frozen=True, slots=True)
class StartPool:
    """Supervisor → Router: create ``size`` pool members; the ``bridges`` hear where they are.

    ``policy`` restarts members that die.
    """

    size: int
    bridges: tuple[Address, ...]
    policy: RestartPolicy | None = None  # None: OneForOne()
    #: Handlers the members run from the start (a restarted pool's, before the Bridge
    #: hears where its members are).
    subscriptions: tuple[SubscriptionConfig, ...] = ()
    #: Where the members keep durable aggregates' snapshots (None: they do not).
    snapshots: SnapshotStores | None = None


@dataclass(frozen=True, slots=True)
class PoolMembers:
    """Router → Bridge: where each pool member is, by index (None: dead, a restart may follow).

    Sent once every member has started, and again whenever one dies or is back.
    The Bridge sends the members their dispatches itself and re-sends, in order,
    what a member held when it died (see ``actors.pool.MAX_RESENDS``).
    """

    addresses: tuple[Address | None, ...]

    def __repr__(self) -> str:
        up = sum(address is not None for address in self.addresses)
        return f"PoolMembers({up} of {len(self.addresses)} up)"


@dataclass(frozen=True, slots=True)
class MemberDied:
    """Router → Supervisor: pool member ``index`` died; a restart may follow."""

    index: int


@dataclass(frozen=True, slots=True)
class MemberRestarted:
    """Router → Supervisor: pool member ``index`` runs again, in process ``pid``."""

    index: int
    pid: int


@dataclass(frozen=True, slots=True)
class BridgeChanged:
    """Supervisor → Router: Bridge ``index`` was restarted; tell ``bridge`` where the members are."""

    index: int
    bridge: Address


@dataclass(frozen=True, slots=True)
class RouterChanged:
    """Supervisor → Bridge: the Router (and its pool) was restarted; what the old members held
    goes to the new ones once the new Router says where they are (:class:`PoolMembers`)."""

    router: Address


@dataclass(frozen=True, slots=True)
class PoolFailed:
    """Router → Supervisor: members died faster than the policy allows."""

    reason: str


@dataclass(frozen=True, slots=True)
class Halt:
    """Supervisor → Bridge: fetch nothing and settle nothing more (the bus is broken)."""

    reason: str


@dataclass(frozen=True, slots=True)
class PoolReady:
    """Router → Supervisor: every pool member answered."""

    pids: tuple[int, ...]
    router_pid: int


@dataclass(frozen=True, slots=True)
class StartMember:
    """Router → pool member: your index and the subscriptions whose handlers you run."""

    index: int
    subscriptions: tuple[SubscriptionConfig, ...]
    #: Where durable aggregates' snapshots are kept (None: nowhere; their state is in memory).
    snapshots: SnapshotStores | None = None


@dataclass(frozen=True, slots=True)
class MemberReady:
    """Pool member → Router: started, in process ``pid``."""

    index: int
    pid: int


@dataclass(frozen=True, slots=True)
class StartBridge:
    """Supervisor → Bridge: connect and be ready; dispatch to ``router``'s pool (None: no pool).

    ``index`` is this Bridge's place among the bus's ``bridges``: it reads the
    partitions whose number is ``index`` modulo ``bridges`` (see
    :mod:`actorbus.bridge.layout`).
    """

    request_id: int
    config: BusConfig
    router: Address | None
    incarnation: int = 0  # restarts so far: keeps tokens of a restarted Bridge distinct
    index: int = 0
    bridges: int = 1
    #: Builds the Bridge's NATS side (None: the real one); a seam for tests of the Bridge.
    link_factory: Any = None   # a bridge.link.LinkFactory (this layer cannot name it)
    #: The pins the Bridge before it held, by durable: claimed again (see PinsHeld).
    pins: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PinsHeld:
    """Bridge → Supervisor, when they change: the pin ids it holds, by durable.

    A pin id is all the server asks of the pinned client: a restarted Bridge
    that pulls with its predecessor's ids goes on at once, where a new client
    would wait ``pin_timeout`` for the dead one's pin to lapse.
    """

    pins: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class BridgeReady:
    """Bridge → Supervisor: connected to NATS."""

    request_id: int
    pid: int


@dataclass(frozen=True, slots=True)
class Subscribe:
    """Facade → Supervisor → Bridge: consume a subscription."""

    request_id: int
    subscription: SubscriptionConfig


@dataclass(frozen=True, slots=True)
class RegisterHandler:
    """Supervisor → Router → pool members: a subscription whose handler they run."""

    request_id: int
    subscription: SubscriptionConfig


@dataclass(frozen=True, slots=True)
class HandlerRegistered:
    """Pool member → Router → Supervisor: the handler is resolved where it will run.

    A member answers once it has imported the handler; the Router answers
    the Supervisor once every member has. ``error`` is set when a member
    could not import it (the module is on the host's ``sys.path`` only, or
    raises on import): the subscription is refused before anything is fetched.
    """

    request_id: int
    error: str | None = None
    member: int = -1


@dataclass(frozen=True, slots=True)
class Subscribed:
    """→ facade: the stream and the durable consumer exist and fetching has begun."""

    request_id: int
    stream: str
    durable: str


@dataclass(frozen=True, slots=True)
class StatsRequest:
    """Facade → Supervisor → Bridge: the counters, please."""

    request_id: int


@dataclass(frozen=True, slots=True)
class Stats:
    """→ facade: the counters of ``bus.stats()``."""

    request_id: int
    counts: Mapping[str, int] = field(default_factory=dict)
    pids: Mapping[str, int] = field(default_factory=dict)
    failure: str | None = None
    states: Mapping[str, str] = field(default_factory=dict)
    by_subscription: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    queue_depths: tuple[int, ...] = ()
    #: By durable: its last lag reading (see ``bridge.lag``).
    lag: Mapping[str, Mapping[str, float]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class StopBus:
    """Facade → Supervisor → Bridge: stop fetching and disconnect, settling only what completed."""

    request_id: int
    timeout: float


@dataclass(frozen=True, slots=True)
class BusStopped:
    """→ facade: the Bridge has disconnected."""

    request_id: int


@dataclass(frozen=True, slots=True)
class RequestFailed:
    """→ facade: a request could not be carried out; ``error`` says why."""

    request_id: int
    error: str


# ---------------------------------------------------------------- timers
# Payloads of an actor's own ``wakeupAfter``: each names what is due.
@dataclass(frozen=True, slots=True)
class PollLink:
    """Bridge → itself: turn the link (where ``ThespianWatch`` is missing)."""


@dataclass(frozen=True, slots=True)
class LinkTimer:
    """Bridge → itself: a timer of the link's loop is due."""


@dataclass(frozen=True, slots=True)
class ProgressTick:
    """Bridge → itself: send ``in_progress`` where due, and dispatch what waits."""


@dataclass(frozen=True, slots=True)
class DrainDeadline:
    """Bridge → itself: the drain's time is up."""


@dataclass(frozen=True, slots=True)
class LivenessCheck:
    """Router or Supervisor → itself: look whether each child's process still runs.
    Thespian tells a parent of each child's exit, but with two children killed at once it
    was seen to tell of one only: the other would never be restarted."""


@dataclass(frozen=True, slots=True)
class RestartDue:
    """An actor → itself: restart the child ``target`` now (its backoff has passed)."""

    target: Any
