"""HOBBIT's multidimensional cache score, and Fate's shallow-favoring allocation.

HOBBIT evicts the expert with the highest score
    w_lru * staleness + w_lfu * (1 - frequency) + w_lhu * (1 - high_precision_use) + w_fld * distance
each factor normalized to [0, 1]: how long since last use, how often it was used in the current
sequence, how often at high precision, and how far its layer lies ahead of the layer now computing
(the layer just computed is needed again only after all the others, so it is farthest).

Fate favors shallow layers: the first layers have no earlier layer to predict their experts from,
so their experts stay resident and deeper layers (which prefetch can cover) are evicted first.
"""

from __future__ import annotations

from typing import Callable, Hashable


class HobbitPolicy:
    name = "hobbit"

    # Defaults calibrated by offline replay of the reference model's routing trace (bench/README.md):
    # frequency within the sequence matters most there; recency adds nothing on top of it.
    def __init__(self, num_layers: int = 1, w_lru: float = 0.0, w_lfu: float = 1.0,
                 w_lhu: float = 0.25, w_fld: float = 0.25) -> None:
        self.num_layers = max(1, num_layers)
        self.weights = (w_lru, w_lfu, w_lhu, w_fld)
        self.current_layer = 0
        self._clock = 0
        self._last: dict[Hashable, int] = {}
        self._uses: dict[tuple, int] = {}
        self._high_uses: dict[tuple, int] = {}

    def on_layer(self, layer: int) -> None:
        self.current_layer = layer

    def _touch(self, key: Hashable) -> None:
        self._clock += 1
        self._last[key] = self._clock
        expert = key[:2]
        self._uses[expert] = self._uses.get(expert, 0) + 1
        if key[2] == "high":
            self._high_uses[expert] = self._high_uses.get(expert, 0) + 1

    on_insert = on_hit = _touch

    def on_evict(self, key: Hashable) -> None:
        self._last.pop(key, None)

    def score(self, key: Hashable, norms: tuple[int, int, int] | None = None) -> float:
        """Eviction priority of a resident key (higher goes first)."""
        w_lru, w_lfu, w_lhu, w_fld = self.weights
        oldest, max_use, max_high = norms or self._norms()
        staleness = (self._clock - self._last[key]) / max(1, self._clock - oldest)
        expert = key[:2]
        frequency = self._uses.get(expert, 0) / max_use
        high_use = self._high_uses.get(expert, 0) / max_high
        distance = ((key[0] - self.current_layer - 1) % self.num_layers) / self.num_layers
        return w_lru * staleness + w_lfu * (1 - frequency) + w_lhu * (1 - high_use) + w_fld * distance

    def _norms(self) -> tuple[int, int, int]:
        return (min(self._last.values(), default=self._clock),
                max(self._uses.values(), default=1) or 1, max(self._high_uses.values(), default=1) or 1)

    def victim(self, evictable: Callable[[Hashable], bool]) -> Hashable:
        norms = self._norms()  # once per eviction, not once per candidate
        best = max((k for k in self._last if evictable(k)), key=lambda k: self.score(k, norms),
                   default=None)
        if best is None:
            raise LookupError("no evictable expert")
        return best

    def reset(self) -> None:
        """Statistics are per sequence (HOBBIT); recency of resident entries is kept."""
        self._uses.clear()
        self._high_uses.clear()


class ShallowFavoringPolicy:
    """LRU among deep layers first; the first ``shallow_fraction`` of layers are evicted last."""

    name = "shallow"

    def __init__(self, num_layers: int = 1, shallow_fraction: float = 0.25) -> None:
        self.shallow_layers = max(1, round(num_layers * shallow_fraction))
        self._clock = 0
        self._last: dict[Hashable, int] = {}

    def _touch(self, key: Hashable) -> None:
        self._clock += 1
        self._last[key] = self._clock

    on_insert = on_hit = _touch

    def on_evict(self, key: Hashable) -> None:
        self._last.pop(key, None)

    def victim(self, evictable: Callable[[Hashable], bool]) -> Hashable:
        best = min((k for k in self._last if evictable(k)),
                   key=lambda k: (k[0] < self.shallow_layers, self._last[k]), default=None)
        if best is None:
            raise LookupError("no evictable expert")
        return best

    def reset(self) -> None:
        pass
