"""Per-key numbers in numpy columns, so a policy ranks all resident experts in a few vector ops.

A policy that scores every resident expert in a Python loop costs milliseconds per eviction once
thousands of experts are resident (Qwen3-30B-A3B at half residency holds about 3,000), and a
token can evict dozens. Keys get a slot for good (the key space is layers x experts x precisions,
so slots are never freed); each column is a numpy array indexed by slot.
"""

from __future__ import annotations

from typing import Callable, Hashable

import numpy as np


class SlotTable:
    def __init__(self, **columns: type) -> None:
        self.keys: list[Hashable] = []
        self.slot_of: dict[Hashable, int] = {}
        self._cols = {name: np.zeros(64, dtype=dtype) for name, dtype in columns.items()}
        self._resident = np.zeros(64, dtype=bool)

    def slot(self, key: Hashable) -> int:
        """The key's slot, made on first sight."""
        s = self.slot_of.get(key)
        if s is None:
            s = self.slot_of[key] = len(self.keys)
            self.keys.append(key)
            if s == len(self._resident):  # grow every column by doubling
                self._resident = np.concatenate([self._resident, np.zeros_like(self._resident)])
                self._cols = {n: np.concatenate([c, np.zeros_like(c)]) for n, c in self._cols.items()}
        return s

    def __getitem__(self, name: str) -> np.ndarray:
        """A column over every slot made so far (a view: writes go to the table)."""
        return self._cols[name][:len(self.keys)]

    def set_resident(self, key: Hashable, resident: bool) -> None:
        self._resident[self.slot(key)] = resident

    def resident_slots(self) -> np.ndarray:
        return np.flatnonzero(self._resident[:len(self.keys)])

    def resident_mask(self, slots: np.ndarray) -> np.ndarray:
        """Which of ``slots`` are resident now."""
        return self._resident[slots]

    def first_evictable(self, slots: np.ndarray, priority: np.ndarray,
                        evictable: Callable[[Hashable], bool]) -> Hashable:
        """Among ``slots``, the key of lowest ``priority`` that ``evictable`` accepts. The few best
        candidates are tried first (the usual case: the best one is not pinned)."""
        head = min(len(slots), 16)
        if head == 0:
            raise LookupError("no evictable expert")
        first = self.keys[slots[int(np.argmin(priority))]]  # (argmin: the first of equals)
        if evictable(first):  # the usual case
            return first
        best = np.argpartition(priority, head - 1)[:head] if head < len(slots) else np.arange(head)
        tried = best[np.argsort(priority[best], kind="stable")]
        for i in tried:
            if evictable(self.keys[slots[i]]):
                return self.keys[slots[i]]
        if head < len(slots):  # all of the best are pinned: look further, in order
            for i in np.argsort(priority, kind="stable"):
                if evictable(self.keys[slots[i]]):
                    return self.keys[slots[i]]
        raise LookupError("no evictable expert")
