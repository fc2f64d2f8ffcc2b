"""The Bridge's counters by subscription, and handler durations as histogram buckets."""
from __future__ import annotations

import bisect
from collections import Counter
from typing import Any

#: Upper bounds (seconds) of the handler-duration histogram buckets; +Inf is implied.
DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0)


class SubscriptionTally:
    """Counts (received, processed, failed, redelivered, ...) and durations of one subscription."""

    def __init__(self, kind: str) -> None:
        self.kind = kind  # "envelope" or "plain"
        self.counts: Counter[str] = Counter()
        self.buckets = [0] * (len(DURATION_BUCKETS) + 1)
        self.duration_sum = 0.0

    def observe(self, seconds: float) -> None:
        """One handler run (all its attempts) took ``seconds``."""
        self.buckets[bisect.bisect_left(DURATION_BUCKETS, seconds)] += 1
        self.duration_sum += seconds

    def snapshot(self) -> dict[str, Any]:
        """Plain values for a Stats message."""
        return {"kind": self.kind, "counts": dict(self.counts), "buckets": list(self.buckets),
                "duration_sum": self.duration_sum}
