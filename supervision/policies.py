"""Restart policies, in Akka's words: one-for-one, all-for-one, a restart
budget within a time window, backoff between restarts, and what to do
past the budget (escalate to the parent, or stop)."""
from __future__ import annotations

import random
from dataclasses import dataclass, field

ESCALATE = "escalate"
STOP = "stop"


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
        base = min(self.initial * self.multiplier ** restart_number, self.maximum)
        spread = (rng or random).uniform(-self.jitter, self.jitter) if self.jitter else 0.0
        return base * (1.0 + spread)


@dataclass(frozen=True)
class _Policy:
    max_restarts: int = 3
    within: float = 60.0
    backoff: Backoff = field(default_factory=Backoff)
    on_limit: str = ESCALATE

    def __post_init__(self) -> None:
        if isinstance(self.max_restarts, bool) or not isinstance(self.max_restarts, int) \
                or self.max_restarts < 0:
            raise ValueError(f"max_restarts must be an int >= 0, got {self.max_restarts!r}")
        _positive("within", self.within)
        if not isinstance(self.backoff, Backoff):
            raise ValueError(f"backoff must be a Backoff, got {self.backoff!r}")
        if self.on_limit not in (ESCALATE, STOP):
            raise ValueError(f"on_limit must be {ESCALATE!r} or {STOP!r}, got {self.on_limit!r}")


@dataclass(frozen=True)
class OneForOne(_Policy):
    """Restart only the child that died."""


@dataclass(frozen=True)
class AllForOne(_Policy):
    """Restart every child when one dies."""


Policy = OneForOne | AllForOne


@dataclass(frozen=True)
class SupervisionTree:
    """A policy per level: ``root``, the Supervisor over the Bridge and the
    Router; ``pool``, the Router over the aggregate actors."""

    root: _Policy = field(default_factory=OneForOne)
    pool: _Policy = field(default_factory=OneForOne)

    def __post_init__(self) -> None:
        for level in ("root", "pool"):
            if not isinstance(getattr(self, level), (OneForOne, AllForOne)):
                raise ValueError(f"{level} must be OneForOne or AllForOne, got {getattr(self, level)!r}")


def as_tree(supervision: "_Policy | SupervisionTree | None") -> SupervisionTree:
    """One policy for both levels, a tree as given, or the defaults for None."""
    if supervision is None:
        return SupervisionTree()
    if isinstance(supervision, SupervisionTree):
        return supervision
    if isinstance(supervision, (OneForOne, AllForOne)):
        return SupervisionTree(root=supervision, pool=supervision)
    raise ValueError("supervision must be OneForOne, AllForOne or SupervisionTree, "
                     f"got {supervision!r}")
