"""Per-sequence frequency plus a short decayed burst term, discounted by layer distance.

Evicts the resident expert with the lowest
    (uses_this_sequence + burst * decayed_uses) * exp(-w_dist * layer_distance)
(ties: the first made resident). Why each term, from offline replay of the reference model's
routing trace (bench/replay.py; calibrated on one trace, checked on another):

* An expert's use count within the current sequence is the best single predictor of its next
  use (the prompt decides which experts are hot; counts carried over from earlier sequences hurt).
* Routing is bursty: an expert used in the last few tokens is likely again soon. A count decaying
  with a half-life of ``half_life`` tokens adds that; unlike the per-sequence count it survives a
  new sequence, so the first tokens still favour what was hot a moment ago.
* Layers run in a cycle, so an expert of the layer just computed is needed again only after all the
  others (``layer_distance`` in [0, 1), as in HOBBIT's score).

Time is counted in tokens: ``on_layer`` starts a new one whenever the layer index does not grow.
Statistics are per expert ``key[:2]`` (all precisions together); only resident keys are ranked.
"""

from __future__ import annotations

from typing import Callable, Hashable

import numpy as np

from .slots import SlotTable


class SequenceFrequencyPolicy:
    name = "seqfreq"

    def __init__(self, num_layers: int = 1, half_life: float = 16.0, burst: float = 1.0,
                 w_dist: float = 0.5) -> None:
        self.num_layers = max(1, num_layers)
        self.decay = 0.5 ** (1.0 / half_life)
        self.burst = burst
        self.w_dist = w_dist
        self.current_layer = -1
        self.token = 0
        self._keys = SlotTable(layer=np.int64, expert=np.int64)
        # per (layer, expert): uses in this sequence, decayed uses as of its last use, that token
        self._experts = SlotTable(uses=np.float64, recent=np.float64, last=np.int64)
        # (resident slots, their keep priority) while no statistic changed: a layer call's misses
        # evict one after another, and scoring every resident expert again for each (3,000 of
        # them for Qwen3-30B-A3B at half residency: ~0.1 ms) multiplied that by the misses
        self._ranked: tuple[np.ndarray, np.ndarray] | None = None

    def on_layer(self, layer: int) -> None:
        if layer <= self.current_layer or self.current_layer < 0:
            self.token += 1
        self.current_layer = layer
        self._ranked = None

    def _touch(self, key: Hashable) -> None:
        self._ranked = None
        seen = key[:2] in self._experts.slot_of
        s, e = self._keys.slot(key), self._experts.slot(key[:2])
        self._keys["layer"][s], self._keys["expert"][s] = key[0], e
        self._keys.set_resident(key, True)
        ex = self._experts
        age = self.token - ex["last"][e] if seen else 0
        ex["uses"][e] += 1.0
        ex["recent"][e] = ex["recent"][e] * self.decay ** age + 1.0
        ex["last"][e] = self.token

    on_insert = on_hit = _touch

    def on_hits(self, keys: list) -> None:
        """Uses of resident experts, all at once (one layer call's hits)."""
        self._ranked = None
        ex = self._experts
        slot_of = ex.slot_of
        if any(k[:2] not in slot_of for k in keys):
            for key in keys:
                self._touch(key)
            return
        e = np.fromiter((slot_of[k[:2]] for k in keys), dtype=np.int64, count=len(keys))
        uses, recent, last = ex["uses"], ex["recent"], ex["last"]
        uses[e] += 1.0
        recent[e] = recent[e] * self.decay ** (self.token - last[e]) + 1.0
        last[e] = self.token

    def on_prefetch(self, key: Hashable) -> None:
        """Read ahead of any request: resident, with no use counted (until the router asks)."""
        self._ranked = None
        s, e = self._keys.slot(key), self._experts.slot(key[:2])
        self._keys["layer"][s], self._keys["expert"][s] = key[0], e
        self._keys.set_resident(key, True)

    def on_evict(self, key: Hashable) -> None:
        self._keys.set_resident(key, False)  # statistics stay: they describe the expert

    def values(self, slots: np.ndarray) -> np.ndarray:
        """Keep priority of the keys in ``slots`` (the lowest is evicted)."""
        layer, e = self._keys["layer"][slots], self._keys["expert"][slots]
        ex = self._experts
        # an expert whose layer already ran this token is next used a token later
        age = self.token - ex["last"][e] + (layer <= self.current_layer)
        v = ex["uses"][e] + self.burst * ex["recent"][e] * self.decay ** age
        distance = ((layer - self.current_layer - 1) % self.num_layers) / self.num_layers
        return v * np.exp(-self.w_dist * distance)

    def victim(self, evictable: Callable[[Hashable], bool]) -> Hashable:
        if self._ranked is None:
            slots = self._keys.resident_slots()
            self._ranked = slots, self.values(slots)
        else:  # (only evictions since: the same priorities, less the experts evicted)
            slots, priority = self._ranked
            still = self._keys.resident_mask(slots)
            self._ranked = slots[still], priority[still]
        return self._keys.first_evictable(*self._ranked, evictable)

    def reset(self) -> None:
        """A new sequence: its own counts start again; the decayed burst term carries over."""
        self._ranked = None
        self._experts["uses"][:] = 0.0
