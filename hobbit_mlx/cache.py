"""The expert cache: which experts, at which precision, are resident, with every byte accounted.

The cache owns resident expert arrays and their byte count and never holds more than
``capacity_bytes``; a policy (``hobbit_mlx.policies``) only decides the eviction order. Keys are
``(layer, expert, precision)``. Experts that the current layer needs are pinned while it fetches,
so bringing in one of its misses never evicts another of its experts. Experts predicted for a
later layer are *held*: a prefetch never evicts them, but the current layer's own misses may when
nothing else is left to evict (a guess must not starve what is needed now).
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Hashable

import mlx.core as mx

from .policies import Policy

Arrays = dict[str, mx.array]


def arrays_nbytes(arrays: Arrays) -> int:
    return sum(a.nbytes for a in arrays.values())


class ExpertCache:
    """Resident experts under a byte budget; thread-safe (the prefetcher inserts too)."""

    def __init__(self, capacity_bytes: int, policy: Policy):
        self.capacity_bytes = int(capacity_bytes)
        self.policy = policy
        self.resident_bytes = 0
        self._entries: dict[Hashable, tuple[Arrays, int]] = {}
        self._pins: Counter = Counter()
        self._holds: Counter = Counter()
        self._per_layer: Counter = Counter()  # (layer, precision) -> resident experts
        self.lock = threading.RLock()

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> list[Hashable]:
        with self.lock:
            return list(self._entries)

    def get(self, key: Hashable) -> Arrays | None:
        """The resident arrays for ``key`` (counted as a use by the policy), or None."""
        with self.lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self.policy.on_hit(key)
            return entry[0]

    def pin_and_get(self, keys: list) -> list:
        """Pin ``keys`` and return their resident arrays (None where not resident), each
        counted as a use: one lock for a whole layer call's experts."""
        with self.lock:
            self._pins.update(keys)
            out = []
            for key in keys:
                entry = self._entries.get(key)
                if entry is not None:
                    self.policy.on_hit(key)
                out.append(None if entry is None else entry[0])
            return out

    def put(self, key: Hashable, arrays: Arrays, prefetched: bool = False) -> bool:
        """Make ``key`` resident, evicting unpinned experts as needed; False if it cannot fit.
        ``prefetched``: read ahead of any request, so a policy that counts uses does not count one."""
        nbytes = arrays_nbytes(arrays)
        with self.lock:
            if key in self._entries:
                return True
            if nbytes > self.capacity_bytes:
                return False
            unpinned = lambda k: k in self._entries and not self._pins[k]  # noqa: E731
            free = lambda k: unpinned(k) and not self._holds[k]  # noqa: E731
            while self.resident_bytes + nbytes > self.capacity_bytes:
                try:
                    victim = self.policy.victim(free)
                except LookupError:
                    if prefetched:
                        return False
                    try:
                        victim = self.policy.victim(unpinned)
                    except LookupError:
                        return False
                self._evict(victim)
            self._entries[key] = (arrays, nbytes)
            self.resident_bytes += nbytes
            self._per_layer[key[0], key[2]] += 1
            on_prefetch = getattr(self.policy, "on_prefetch", None) if prefetched else None
            (on_prefetch or self.policy.on_insert)(key)
            return True

    def _evict(self, key: Hashable) -> None:
        _, nbytes = self._entries.pop(key)
        self.resident_bytes -= nbytes
        self._per_layer[key[0], key[2]] -= 1
        self.policy.on_evict(key)

    def resident_in_layer(self, layer: int, precision: str = "high") -> int:
        """How many experts of a layer are resident at a precision."""
        return self._per_layer[layer, precision]

    def pin(self, keys) -> None:
        with self.lock:
            self._pins.update(keys)

    def unpin(self, keys) -> None:
        self._count_down(self._pins, keys)

    def hold(self, keys) -> None:
        """Protect predicted experts (resident or not yet) from eviction by other predictions."""
        with self.lock:
            self._holds.update(keys)

    def release(self, keys) -> None:
        self._count_down(self._holds, keys)

    def _count_down(self, counts: Counter, keys) -> None:
        with self.lock:
            counts.subtract(keys)
            for k in keys:
                if counts[k] <= 0:
                    del counts[k]

    def clear(self) -> None:
        with self.lock:
            for key in list(self._entries):
                self._evict(key)
