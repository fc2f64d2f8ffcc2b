"""How a subscription is laid out as JetStream consumers.

A bus on its own reads one durable consumer filtered on the subscription's
subject (:class:`SingleDurable`), or, when the stream is partitioned (the
aggregate id is the subject's last token), one durable per partition,
spread over the bus's Bridges (:class:`BridgePartitions`): that is what
lets several Bridges share a subscription while each key stays with one
Bridge. A bus in a partitioned consumer group (:mod:`actorbus.groups`)
reads its member's durable (:class:`StaticMembers`) or one durable per
partition it owns now, spread over its Bridges (:class:`ElasticPartitions`). The Bridge's pull path
only ever sees :class:`ConsumerSpec` values.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol
from collections.abc import Sequence

from actorbus.config import BusConfig, SubscriptionConfig
from actorbus.groups import (PRIORITY_GROUP, ConsumerGroup, GroupKind, assign_partitions,
                             partition_filter)


@dataclass(frozen=True, slots=True)
class ConsumerSpec:
    """One durable pull consumer: where it reads and what it filters."""

    stream: str
    durable: str
    filter_subjects: tuple[str, ...]
    #: Its priority group (``pinned_client``): one puller at a time; None: no group.
    priority_group: str | None = None
    #: Seconds without a pull request from the pinned client before another is pinned.
    pin_timeout: float = 10.0


class Membership(Protocol):
    """What a moving layout's membership tells of a group (see ``bridge.membership``)."""

    owned: tuple[int, ...] | None
    members: tuple[str, ...]
    rebalances: int


class ConsumerLayout(Protocol):
    """Which consumers serve a subscription, and what differs by how they are laid out."""

    #: True when the consumers a bus reads change while it runs (an elastic group's
    #: partitions move between buses as members come and go): a membership then says
    #: which partitions this bus owns (:meth:`partition_consumers`), and a consumer given
    #: up is released only once what it delivered here is settled.
    moving: bool

    def consumers(self, sub: SubscriptionConfig) -> tuple[ConsumerSpec, ...]:
        """The consumers to ensure for ``sub``; those this bus reads, unless ``moving``."""

    def partition_consumers(self, sub: SubscriptionConfig,
                            partitions: Sequence[int]) -> tuple[ConsumerSpec, ...]:
        """The consumers of these partitions of ``sub`` (a moving layout's share)."""

    def shortfall(self, sub: SubscriptionConfig) -> str | None:
        """Why this bus reads no consumer of ``sub``, when that deserves a warning."""

    def group_counts(self, memberships: Sequence[Membership]) -> dict[str, int]:
        """partitions_owned, group_members and rebalances (nothing outside a group)."""


class _Whole:
    """What the layouts of a bus that owns its share for good have in common."""

    moving = False

    def consumers(self, sub: SubscriptionConfig) -> tuple[ConsumerSpec, ...]:
        raise NotImplementedError

    def partition_consumers(self, sub: SubscriptionConfig,
                            partitions: Sequence[int]) -> tuple[ConsumerSpec, ...]:
        """Its share never moves: the consumers it reads."""
        return self.consumers(sub)

    def shortfall(self, sub: SubscriptionConfig) -> str | None:
        """Nothing to say by default."""
        return None

    def group_counts(self, memberships: Sequence[Membership]) -> dict[str, int]:
        """Not in a group: nothing."""
        return {}


class SingleDurable(_Whole):
    """One durable consumer per subscription, named ``sub.durable``, filtered on ``sub.subject``."""

    def consumers(self, sub: SubscriptionConfig) -> tuple[ConsumerSpec, ...]:
        """The one consumer of ``sub``."""
        return (ConsumerSpec(sub.stream, sub.durable, (sub.subject,), sub.priority_group,
                             sub.pin_timeout),)


class BridgePartitions(_Whole):
    """A bus of ``bridges`` Bridges on its own; this is Bridge ``index``'s share.

    A partitioned subscription has a durable per partition, ``<durable>-p<i>``,
    and Bridge ``index`` reads those with ``i % bridges == index``: a key lives
    in one partition, so in one Bridge. A durable per partition (rather than per
    Bridge) keeps each partition's acks where they are when the number of
    Bridges changes. A subscription that is not partitioned has no key the
    server can split by: the first Bridge reads it alone (:class:`SingleDurable`).
    """

    def __init__(self, index: int = 0, bridges: int = 1) -> None:
        if not 0 <= index < bridges:
            raise ValueError(f"Bridge {index} of {bridges}")
        self.index = index
        self.bridges = bridges

    def partitions(self, sub: SubscriptionConfig) -> tuple[int, ...]:
        """The partitions of ``sub`` this Bridge reads (none when ``sub`` is not partitioned)."""
        if sub.partitions is None:
            return ()
        return tuple(range(self.index, sub.partitions, self.bridges))

    def consumers(self, sub: SubscriptionConfig) -> tuple[ConsumerSpec, ...]:
        """This Bridge's durables of ``sub``."""
        if sub.partitions is None:
            return SingleDurable().consumers(sub) if self.index == 0 else ()
        return tuple(ConsumerSpec(sub.stream, partition_durable(sub.durable, p),
                                  (partition_filter(sub.subject, p),), sub.priority_group,
                                  sub.pin_timeout)
                     for p in self.partitions(sub))


def partition_durable(durable: str, partition: int) -> str:
    """The durable of one partition of a partitioned subscription on a bus of its own."""
    return f"{durable}-p{partition}"


class StaticMembers(_Whole):
    """A static group's layout: this member's durable, filtered on the partitions the fixed
    member list gives it (orbit.go's static layout)."""

    def __init__(self, group: ConsumerGroup) -> None:
        self.group = group

    def partitions(self) -> tuple[int, ...]:
        """The partitions this member owns."""
        assert self.group.members is not None
        return assign_partitions(self.group.members, self.group.partitions).get(self.group.member, ())

    def consumers(self, sub: SubscriptionConfig) -> tuple[ConsumerSpec, ...]:
        """This member's one durable (none if the member list leaves it no partition)."""
        owned = self.partitions()
        if not owned:
            return ()
        return (ConsumerSpec(sub.stream, self.group.durable_for_member(self.group.member),
                             tuple(partition_filter(sub.subject, p) for p in owned),
                             PRIORITY_GROUP, sub.pin_timeout),)

    def shortfall(self, sub: SubscriptionConfig) -> str | None:
        """A member the fixed list gives no partition reads nothing for good."""
        if self.partitions():
            return None
        return (f"member {self.group.member} of group {self.group.name} gets no partition of "
                f"{sub.stream}: more members than partitions")

    def group_counts(self, memberships: Sequence[Membership]) -> dict[str, int]:
        """From the fixed member list: nothing moves."""
        return {"partitions_owned": len(self.partitions()),
                "group_members": len(self.group.members or ()), "rebalances": 0}


class ElasticPartitions:
    """An elastic group's layout: one durable per partition; a bus reads those it owns now,
    and Bridge ``index`` of its ``bridges`` those with ``partition % bridges == index``.

    Every Bridge of a member takes part in the membership under the member's
    name (they heartbeat the same key and all come to the same share), so the
    partitions a member owns are spread over its Bridges, and a partition stays
    with the same Bridge as long as the member owns it.
    """

    moving = True

    def __init__(self, group: ConsumerGroup, index: int = 0, bridges: int = 1) -> None:
        if not 0 <= index < bridges:
            raise ValueError(f"Bridge {index} of {bridges}")
        self.group = group
        self.index = index
        self.bridges = bridges

    def consumers(self, sub: SubscriptionConfig) -> tuple[ConsumerSpec, ...]:
        """Every partition's durable, in partition order (ensured; read as owned)."""
        return tuple(self.partition(sub, p) for p in range(self.group.partitions))

    def partition_consumers(self, sub: SubscriptionConfig,
                            partitions: Sequence[int]) -> tuple[ConsumerSpec, ...]:
        """The durables of this Bridge's share of the partitions the bus owns now."""
        return tuple(self.partition(sub, p) for p in self.share(partitions))

    def share(self, partitions: Sequence[int]) -> tuple[int, ...]:
        """This Bridge's share of ``partitions`` (those the bus owns)."""
        return tuple(p for p in partitions if p % self.bridges == self.index)

    def shortfall(self, sub: SubscriptionConfig) -> str | None:
        """A member with no partition now may get some as others leave: nothing to say."""
        return None

    def group_counts(self, memberships: Sequence[Membership]) -> dict[str, int]:
        """From the memberships of this bus's subscriptions, as this Bridge's part of the bus's
        counts (the bus adds its Bridges' up): its share of the partitions; the members and
        rebalances from the first Bridge alone."""
        first = self.index == 0
        return {"partitions_owned": sum(len(self.share(m.owned or ())) for m in memberships),
                "group_members": max((len(m.members) for m in memberships), default=0)
                if first else 0,
                "rebalances": sum(m.rebalances for m in memberships) if first else 0}

    def partition(self, sub: SubscriptionConfig, partition: int) -> ConsumerSpec:
        """The durable of one partition."""
        return ConsumerSpec(sub.stream, self.group.durable_for_partition(partition),
                            (partition_filter(sub.subject, partition),), PRIORITY_GROUP,
                            sub.pin_timeout)


def layout_for(config: BusConfig, index: int = 0) -> ConsumerLayout:
    """The layout Bridge ``index`` of a bus with ``config`` reads its subscriptions with."""
    group = config.group
    if group is None:
        return BridgePartitions(index, config.bridges)
    if group.kind is GroupKind.STATIC:
        return StaticMembers(group)
    return ElasticPartitions(group, index, config.bridges)
