"""Restart policies, in Akka's words: one-for-one, all-for-one, a restart
budget within a time window, and backoff between restarts.

Past the budget a level escalates: the pool's failure goes to the
Supervisor, whose failure halts the bus and reaches its user as a
:class:`~actorbus.BusError` from ``stats()`` (the host process is the
root's parent). These are configuration values, a leaf of the import
graph: :mod:`actorbus.supervision` re-exports them.
"""
from __future__ import annotations

import random
import time
from collections import deque
from dataclasses import dataclass, field
from typing import ClassVar
from collections.abc import Callable


def exponential_delay(initial: float, maximum: float, n: int, multiplier: float = 2.0) -> float:
    """``initial * multiplier**n`` capped at ``maximum``: the one backoff formula of the bus
    (restarts, in-place retries and nak delays all use it)."""
    return min(initial * multiplier ** max(n, 0), maximum)


def _positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"{name} must be a number > 0, got {value!r}")


@dataclass(frozen=True)
class Backoff:
    """Delay before restart n (0-based): ``initial * multiplier**n``, capped at ``maximum``,
    spread by ±``jitter`` (a fraction)."""

    initial: float = 0.1
    maximum: float = 5.0
    multiplier: float = 2.0
    jitter: float = 0.2

    def __post_init__(self) -> None:
        _positive("initial", self.initial)
        _positive("maximum", self.maximum)
        if self.maximum < self.initial:
            raise ValueError(f"maximum ({self.maximum}) is below initial ({self.initial})")
        if isinstance(self.multiplier, bool) or not isinstance(self.multiplier, (int, float)) \
                or self.multiplier < 1:
            raise ValueError(f"multiplier must be >= 1, got {self.multiplier!r}")
        if isinstance(self.jitter, bool) or not isinstance(self.jitter, (int, float)) \
                or not 0 <= self.jitter < 1:
            raise ValueError(f"jitter must be in [0, 1), got {self.jitter!r}")

    def delay(self, restart_number: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before restart ``restart_number`` (0 for the first)."""
        base = exponential_delay(self.initial, self.maximum, restart_number, self.multiplier)
        spread = (rng or random).uniform(-self.jitter, self.jitter) if self.jitter else 0.0
        return base * (1.0 + spread)


@dataclass(frozen=True)
class RestartPolicy:
    """What both policies share: at most ``max_restarts`` within ``within`` seconds,
    ``backoff`` between them; past that, escalate."""

    max_restarts: int = 3
    within: float = 60.0
    backoff: Backoff = field(default_factory=Backoff)

    #: True when one death restarts every sibling (all-for-one).
    restarts_all: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if isinstance(self.max_restarts, bool) or not isinstance(self.max_restarts, int) \
                or self.max_restarts < 0:
            raise ValueError(f"max_restarts must be an int >= 0, got {self.max_restarts!r}")
        _positive("within", self.within)
        if not isinstance(self.backoff, Backoff):
            raise ValueError(f"backoff must be a Backoff, got {self.backoff!r}")


@dataclass(frozen=True)
class OneForOne(RestartPolicy):
    """Restart only the child that died."""


@dataclass(frozen=True)
class AllForOne(RestartPolicy):
    """Restart every child when one dies."""

    restarts_all: ClassVar[bool] = True


@dataclass(frozen=True)
class SupervisionTree:
    """A policy per level: ``root``, the Supervisor over the Bridge and the
    Router; ``pool``, the Router over the aggregate actors."""

    root: RestartPolicy = field(default_factory=OneForOne)
    pool: RestartPolicy = field(default_factory=OneForOne)

    def __post_init__(self) -> None:
        for level in ("root", "pool"):
            if not isinstance(getattr(self, level), (OneForOne, AllForOne)):
                raise ValueError(f"{level} must be OneForOne or AllForOne, got {getattr(self, level)!r}")


def as_tree(supervision: RestartPolicy | SupervisionTree | None) -> SupervisionTree:
    """One policy for both levels, a tree as given, or the defaults for None."""
    if supervision is None:
        return SupervisionTree()
    if isinstance(supervision, SupervisionTree):
        return supervision
    if isinstance(supervision, (OneForOne, AllForOne)):
        return SupervisionTree(root=supervision, pool=supervision)
    raise ValueError("supervision must be OneForOne, AllForOne or SupervisionTree, "
                     f"got {supervision!r}")


@dataclass(frozen=True, slots=True)
class RestartDecision:
    """Restart after ``delay`` seconds, or (``allowed`` False) give up and escalate."""

    allowed: bool
    delay: float
    recent: int  # restarts within the window, this one included


class RestartBudget:
    """A policy applied over time: restarts counted in a sliding window of ``policy.within`` seconds."""

    def __init__(self, policy: RestartPolicy | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None) -> None:
        self.policy = policy or OneForOne()
        self._clock = clock
        self._rng = rng or random.Random()
        self._times: deque[float] = deque()

    def record(self) -> RestartDecision:
        """A child died: may it be restarted, and after how long?"""
        now = self._clock()
        while self._times and now - self._times[0] > self.policy.within:
            self._times.popleft()
        if len(self._times) >= self.policy.max_restarts:
            return RestartDecision(False, 0.0, len(self._times) + 1)
        delay = self.policy.backoff.delay(len(self._times), self._rng)
        self._times.append(now)
        return RestartDecision(True, delay, len(self._times))

    def exhausted(self, what: str, decision: RestartDecision) -> str:
        """Why ``what`` is not restarted again, in words."""
        return (f"{what} died {decision.recent} times within {self.policy.within}s "
                f"(max_restarts={self.policy.max_restarts})")
