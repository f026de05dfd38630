"""Least frequently used (ties broken by recency): a frequency baseline for HOBBIT's score."""

from __future__ import annotations

from typing import Callable, Hashable

import numpy as np

from .slots import SlotTable


class LFUPolicy:
    name = "lfu"

    def __init__(self) -> None:
        self._keys = SlotTable(count=np.int64, last=np.int64)
        self._clock = 0

    def _touch(self, key: Hashable) -> None:
        self._clock += 1
        s = self._keys.slot(key)
        self._keys["count"][s] += 1
        self._keys["last"][s] = self._clock
        self._keys.set_resident(key, True)

    on_insert = on_hit = _touch

    def on_prefetch(self, key: Hashable) -> None:
        """Read ahead of any request: resident and recent, with no use counted."""
        self._clock += 1
        s = self._keys.slot(key)  # first: a new slot may grow the columns
        self._keys["last"][s] = self._clock
        self._keys.set_resident(key, True)

    def on_evict(self, key: Hashable) -> None:
        # counts survive eviction: frequency is the expert's, not the entry's
        self._keys.set_resident(key, False)

    def victim(self, evictable: Callable[[Hashable], bool]) -> Hashable:
        slots = self._keys.resident_slots()
        # fewest uses, then least recent
        priority = self._keys["count"][slots] * (self._clock + 1) + self._keys["last"][slots]
        return self._keys.first_evictable(slots, priority, evictable)

    def reset(self) -> None:
        """A new sequence: resident experts start from one use, the others from none."""
        resident = np.zeros(len(self._keys.keys), dtype=bool)
        resident[self._keys.resident_slots()] = True
        self._keys["count"][:] = resident
