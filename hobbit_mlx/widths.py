"""Prefetch width per layer, sized to reach a target prediction recall.

How well a layer's experts can be guessed from an earlier layer's gate input differs by layer: on
the reference model the top 2×k guesses hold 0.89 of the experts layers 1-2 then choose, but
0.97-0.99 for the deeper layers. One fixed width reads too much where the guess is easy and too
little where it is hard. So each (layer, distance) keeps a decayed histogram of the rank, within
its prediction, of every expert its router then chose; the width it gets is the smallest that
covered ``target`` of them, between k and ``max_width``.
"""

from __future__ import annotations

import numpy as np


class AdaptiveWidth:
    """Per (layer, distance) widths learned online from where the chosen experts ranked."""

    def __init__(self, k: int, num_experts: int, start: int, target: float, max_width: int,
                 decay: float = 0.99, warmup: int = 16):
        if not 0 < target <= 1:
            raise ValueError(f"prefetch_recall is a share in (0, 1] (got {target})")
        self.k, self.num_experts = k, num_experts
        self.start, self.target = start, target
        self.max_width = max(k, min(max_width, num_experts))
        self.decay = decay
        self.warmup = warmup * k  # choices seen before the histogram decides
        self._hist: dict[tuple[int, int], np.ndarray] = {}
        self._seen: dict[tuple[int, int], int] = {}

    def width(self, layer: int, distance: int) -> int:
        """Experts to predict per token for ``layer``, guessed ``distance`` layers ahead."""
        hist = self._hist.get((layer, distance))
        if hist is None or self._seen[layer, distance] < self.warmup:
            return self.start
        covered = np.cumsum(hist)
        needed = int(np.searchsorted(covered, self.target * covered[-1] * (1 - 1e-9))) + 1
        return int(np.clip(needed, self.k, self.max_width))

    def observe(self, layer: int, distance: int, logits: np.ndarray, chosen: np.ndarray) -> None:
        """Record where the router's choices (``[N, k]``) ranked in the prediction's logits
        (``[N, E]``, one row per token)."""
        logits = logits.reshape(-1, logits.shape[-1])
        chosen = chosen.reshape(len(logits), -1)
        order = np.argsort(-logits, axis=-1, kind="stable")
        ranks = np.empty_like(order)
        np.put_along_axis(ranks, order, np.arange(order.shape[-1])[None, :], axis=-1)
        counts = np.bincount(np.take_along_axis(ranks, chosen, axis=-1).ravel(),
                             minlength=self.num_experts).astype(np.float64)
        key = (layer, distance)
        hist = self._hist.get(key)
        self._hist[key] = counts if hist is None else hist * self.decay + counts
        self._seen[key] = self._seen.get(key, 0) + chosen.size

    def widths(self) -> dict[tuple[int, int], int]:
        """The current width of every (layer, distance) seen so far (for stats)."""
        return {key: self.width(*key) for key in self._hist}
