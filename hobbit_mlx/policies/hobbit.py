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

import numpy as np

from .slots import SlotTable


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
        self._keys = SlotTable(last=np.int64, layer=np.int64, expert=np.int64)
        self._experts = SlotTable(uses=np.int64, high_uses=np.int64)  # per (layer, expert)

    def on_layer(self, layer: int) -> None:
        self.current_layer = layer

    def _touch(self, key: Hashable) -> None:
        self._clock += 1
        s = self._keys.slot(key)
        e = self._experts.slot(key[:2])
        self._keys["last"][s], self._keys["layer"][s], self._keys["expert"][s] = self._clock, key[0], e
        self._keys.set_resident(key, True)
        self._experts["uses"][e] += 1
        if key[2] == "high":
            self._experts["high_uses"][e] += 1

    on_insert = on_hit = _touch

    def on_prefetch(self, key: Hashable) -> None:
        """Resident and recent, but not a use: a wrong guess must not look frequent."""
        self._clock += 1
        s = self._keys.slot(key)
        self._keys["last"][s], self._keys["layer"][s] = self._clock, key[0]
        self._keys["expert"][s] = self._experts.slot(key[:2])
        self._keys.set_resident(key, True)

    def on_evict(self, key: Hashable) -> None:
        self._keys.set_resident(key, False)

    def scores(self, slots: np.ndarray) -> np.ndarray:
        """Eviction priority of the keys in ``slots`` (higher goes first), all at once."""
        w_lru, w_lfu, w_lhu, w_fld = self.weights
        last = self._keys["last"][slots]
        expert = self._keys["expert"][slots]
        uses, high = self._experts["uses"], self._experts["high_uses"]
        staleness = (self._clock - last) / max(1, self._clock - int(last.min(initial=self._clock)))
        frequency = uses[expert] / max(1, int(uses.max(initial=1)))
        high_use = high[expert] / max(1, int(high.max(initial=1)))
        distance = ((self._keys["layer"][slots] - self.current_layer - 1) % self.num_layers) / self.num_layers
        return w_lru * staleness + w_lfu * (1 - frequency) + w_lhu * (1 - high_use) + w_fld * distance

    def victim(self, evictable: Callable[[Hashable], bool]) -> Hashable:
        slots = self._keys.resident_slots()
        return self._keys.first_evictable(slots, -self.scores(slots), evictable)

    def reset(self) -> None:
        """Statistics are per sequence (HOBBIT); recency of resident entries is kept."""
        self._experts["uses"][:] = 0
        self._experts["high_uses"][:] = 0


class ShallowFavoringPolicy:
    """LRU among deep layers first; the first ``shallow_fraction`` of layers are evicted last."""

    name = "shallow"

    def __init__(self, num_layers: int = 1, shallow_fraction: float = 0.25) -> None:
        self.shallow_layers = max(1, round(num_layers * shallow_fraction))
        self._clock = 0
        self._keys = SlotTable(last=np.int64, shallow=bool)

    def _touch(self, key: Hashable) -> None:
        self._clock += 1
        s = self._keys.slot(key)
        self._keys["last"][s], self._keys["shallow"][s] = self._clock, key[0] < self.shallow_layers
        self._keys.set_resident(key, True)

    on_insert = on_hit = _touch

    def on_evict(self, key: Hashable) -> None:
        self._keys.set_resident(key, False)

    def victim(self, evictable: Callable[[Hashable], bool]) -> Hashable:
        slots = self._keys.resident_slots()
        # deep before shallow, then least recent
        priority = self._keys["shallow"][slots] * (self._clock + 1) + self._keys["last"][slots]
        return self._keys.first_evictable(slots, priority, evictable)

    def reset(self) -> None:
        pass
