"""ARC (adaptive replacement cache, Megiddo & Modha), as Fate uses for its expert cache.

Resident keys live in T1 (seen once recently) or T2 (seen again); evicted keys leave "ghosts" in
B1/B2. A miss that hits a ghost in B1 says recency deserved more room, so the target size ``p`` of
T1 grows; a ghost hit in B2 shrinks it. The cache decides *when* to evict (bytes); ARC decides
*which*: the least recent of T1 while T1 exceeds ``p``, else the least recent of T2.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Hashable


class ARCPolicy:
    name = "arc"

    def __init__(self) -> None:
        self.t1: OrderedDict = OrderedDict()
        self.t2: OrderedDict = OrderedDict()
        self.b1: OrderedDict = OrderedDict()
        self.b2: OrderedDict = OrderedDict()
        self.p = 0.0

    @property
    def _capacity(self) -> int:
        return max(1, len(self.t1) + len(self.t2))

    def on_insert(self, key: Hashable) -> None:
        if key in self.b1:  # recency was evicted too early: give T1 more room
            self.p = min(self._capacity, self.p + max(len(self.b2) / len(self.b1), 1.0))
            del self.b1[key]
            self.t2[key] = None
        elif key in self.b2:  # frequency was evicted too early: give T2 more room
            self.p = max(0.0, self.p - max(len(self.b1) / len(self.b2), 1.0))
            del self.b2[key]
            self.t2[key] = None
        else:
            self.t1[key] = None

    def on_hit(self, key: Hashable) -> None:
        self.t1.pop(key, None)
        self.t2.pop(key, None)
        self.t2[key] = None

    def on_evict(self, key: Hashable) -> None:
        if self.t1.pop(key, 0) is None:
            self.b1[key] = None
        elif self.t2.pop(key, 0) is None:
            self.b2[key] = None
        for ghosts in (self.b1, self.b2):  # ghosts remember at most one cache's worth of keys
            while len(ghosts) > self._capacity:
                ghosts.popitem(last=False)

    def victim(self, evictable: Callable[[Hashable], bool]) -> Hashable:
        first, second = (self.t1, self.t2) if len(self.t1) > self.p else (self.t2, self.t1)
        for lst in (first, second):
            for key in lst:  # least recent first
                if evictable(key):
                    return key
        raise LookupError("no evictable expert")

    def reset(self) -> None:
        """ARC adapts continuously; nothing is per sequence."""
