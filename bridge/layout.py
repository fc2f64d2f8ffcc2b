"""How a subscription is laid out as JetStream consumers: the seam for partitioned consumers.

Today each subscription is one durable consumer filtered on its subject
(:class:`SingleDurable`). A layout that splits a stream's partitions over
several consumers, or pins one consumer to one instance of many, is
another :class:`ConsumerLayout`; the Bridge's pull path only ever sees
:class:`ConsumerSpec` values.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from actorbus.config import SubscriptionConfig


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
