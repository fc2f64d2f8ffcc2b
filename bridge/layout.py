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


class ConsumerLayout(Protocol):
    """Which consumers serve a subscription."""

    def consumers(self, sub: SubscriptionConfig) -> tuple[ConsumerSpec, ...]:
        """The consumers whose messages, together, are ``sub``'s messages."""


class SingleDurable:
    """One durable consumer per subscription, named ``sub.durable``, filtered on ``sub.subject``."""

    def consumers(self, sub: SubscriptionConfig) -> tuple[ConsumerSpec, ...]:
        """The one consumer of ``sub``."""
        return (ConsumerSpec(sub.stream, sub.durable, (sub.subject,)),)
