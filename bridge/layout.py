"""How a subscription is laid out as JetStream consumers.

A bus on its own reads one durable consumer filtered on the subscription's
subject (:class:`SingleDurable`). A bus in a partitioned consumer group
(:mod:`actorbus.groups`) reads its member's durable (:class:`StaticMembers`)
or one durable per partition it owns now (:class:`ElasticPartitions`). The
Bridge's pull path only ever sees :class:`ConsumerSpec` values.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

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


class ConsumerLayout(Protocol):
    """Which consumers serve a subscription."""

    def consumers(self, sub: SubscriptionConfig) -> tuple[ConsumerSpec, ...]:
        """The consumers whose messages, together, are ``sub``'s messages."""


class SingleDurable:
    """One durable consumer per subscription, named ``sub.durable``, filtered on ``sub.subject``."""

    def consumers(self, sub: SubscriptionConfig) -> tuple[ConsumerSpec, ...]:
        """The one consumer of ``sub``."""
        return (ConsumerSpec(sub.stream, sub.durable, (sub.subject,), sub.priority_group,
                             sub.pin_timeout),)


class StaticMembers:
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


class ElasticPartitions:
    """An elastic group's layout: one durable per partition; a bus reads those it owns now."""

    def __init__(self, group: ConsumerGroup) -> None:
        self.group = group

    def consumers(self, sub: SubscriptionConfig) -> tuple[ConsumerSpec, ...]:
        """Every partition's durable, in partition order."""
        return tuple(self.partition(sub, p) for p in range(self.group.partitions))

    def partition(self, sub: SubscriptionConfig, partition: int) -> ConsumerSpec:
        """The durable of one partition."""
        return ConsumerSpec(sub.stream, self.group.durable_for_partition(partition),
                            (partition_filter(sub.subject, partition),), PRIORITY_GROUP,
                            sub.pin_timeout)


def layout_for(config: BusConfig) -> ConsumerLayout:
    """The layout a bus with ``config`` reads its subscriptions with."""
    group = config.group
    if group is None:
        return SingleDurable()
    if group.kind is GroupKind.STATIC:
        return StaticMembers(group)
    return ElasticPartitions(group)
