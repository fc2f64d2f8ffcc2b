"""A restart budget: how many restarts a policy allows within its window, and
how long to wait before each one."""
from __future__ import annotations

import random
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

from actorbus.supervision.policies import OneForOne, _Policy


@dataclass(frozen=True, slots=True)
class RestartDecision:
    """Restart after ``delay`` seconds, or (``allowed`` False) give up and escalate/stop."""

    allowed: bool
    delay: float
    recent: int  # restarts within the window, this one included


class RestartBudget:
    """Counts restarts in a sliding window of ``policy.within`` seconds."""

    def __init__(self, policy: _Policy | None = None, clock: Callable[[], float] = time.monotonic,
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
