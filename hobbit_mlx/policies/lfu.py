"""Least frequently used (ties broken by recency): a frequency baseline for HOBBIT's score."""

from __future__ import annotations

from typing import Callable, Hashable


class LFUPolicy:
    name = "lfu"

    def __init__(self) -> None:
        self._count: dict[Hashable, int] = {}
        self._last: dict[Hashable, int] = {}
        self._clock = 0

    def _touch(self, key: Hashable) -> None:
        self._clock += 1
        self._count[key] = self._count.get(key, 0) + 1
        self._last[key] = self._clock

    on_insert = on_hit = _touch

    def on_evict(self, key: Hashable) -> None:
        self._last.pop(key, None)  # counts survive eviction: frequency is the expert's, not the entry's

    def victim(self, evictable: Callable[[Hashable], bool]) -> Hashable:
        best = min((k for k in self._last if evictable(k)),
                   key=lambda k: (self._count[k], self._last[k]), default=None)
        if best is None:
            raise LookupError("no evictable expert")
        return best

    def reset(self) -> None:
        self._count = {k: 1 for k in self._last}
