"""Putting numbered dispatches back in order: the transport may hand them over in another."""
from __future__ import annotations

from typing import Generic, TypeVar
from collections.abc import Iterator

T = TypeVar("T")


class Resequencer(Generic[T]):
    """Holds items numbered 1, 2, ... until every earlier number has arrived."""

    def __init__(self) -> None:
        self._early: dict[int, T] = {}
        self.next = 1   # the number due next

    def arrived(self, sequence: int, item: T) -> Iterator[T]:
        """Record ``item``; yield, in order, every item that is now due."""
        self._early[sequence] = item
        while self.next in self._early:
            item = self._early.pop(self.next)
            self.next += 1
            yield item

    def reset(self) -> None:
        """Forget what is held and expect number 1 next (a new sender numbers from 1)."""
        self._early.clear()
        self.next = 1
