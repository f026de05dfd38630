"""Which precision each (token, expert) slot gets: HOBBIT mixed precision and MoBiLE big-little.

HOBBIT: sort a token's chosen experts by normalized gate weight; an expert's *unimportance* is the
weight of the experts ranked above it (the top-1 has 0). On a cache miss, unimportance <= t1
loads the 4-bit copy, t1 < u <= t2 the 2-bit copy, and u > t2 skips the expert when ``skip`` is
on. Hits use whatever copy is resident, except that an important slot never uses a 2-bit copy.
As in HOBBIT, only a miss is skipped: a resident expert costs no read, so it is computed
(``plan_slots`` marks such slots ``SKIP_IF_MISSING`` and the layer call decides).

MoBiLE big-little: a token whose top-k/2 experts already carry ``little_threshold`` of the gate
mass is "unimportant" and runs only those (their weights renormalized); every other token runs
the full top-k (the fallback to big). With ``little_keeps_resident`` (the default) its other
experts are dropped only where they would be read, as HOBBIT skips misses only: a resident one
costs no read, so it runs, and the token's weights are renormalized over what ran
(``renormalized``). The same bytes are saved and less of the gate mass is lost.

Upgrade on heat (HOBBIT's high-precision-use factor turned into a read rule): with
``upgrade_after`` > 0, a miss on an expert that has not proven hot is read in 2-bit even when the
token needs it at full precision, and its 4-bit copy is read once the expert has been chosen
``upgrade_after`` times lately (``ExpertHeat``). A 2-bit read costs about half the bytes, and
an expert chosen once and never again is the common case at low residency.

Fate's prefill rule: in a prompt chunk, an expert chosen by few of the chunk's tokens contributes
little to the chunk, so its 2-bit copy serves it (``demote_unpopular``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

HIGH, LOW, DROP, SKIP_IF_MISSING = 0, 1, 2, 3


@dataclass
class PrecisionOptions:
    mixed_precision: bool = False
    t1: float = 0.4  # (load()'s defaults: options.py)
    t2: float = 0.8
    skip: bool = False
    big_little: bool = False
    little_threshold: float = 0.8
    little_keeps_resident: bool = True  # big-little drops only experts that would be read
    upgrade_after: float = 0.0  # 0: off; else uses (decayed) before a miss reads the 4-bit copy

    @property
    def needs_weights(self) -> bool:
        return self.mixed_precision or self.big_little

    @property
    def upgrades(self) -> bool:
        return self.mixed_precision and self.upgrade_after > 0

    @property
    def drops(self) -> bool:
        """Some slots may be dropped whatever is resident (so every call needs the weights)."""
        return self.big_little and not self.little_keeps_resident

    @property
    def drops_misses(self) -> bool:
        """Some slots are dropped if their expert is not resident (``SKIP_IF_MISSING``)."""
        return self.skip or (self.big_little and self.little_keeps_resident)


def plan_slots(weights: np.ndarray, opts: PrecisionOptions) -> tuple[np.ndarray, np.ndarray]:
    """Per slot: level (HIGH / LOW / DROP / SKIP_IF_MISSING) and the factor its output is
    scaled by."""
    k = weights.shape[-1]
    if weights.ndim == 2 and len(weights) == 1:
        return _plan_one_token(weights[0].tolist(), opts)
    order = np.argsort(-weights, axis=-1, kind="stable")
    ranked = np.take_along_axis(weights, order, axis=-1)
    unimportance_ranked = np.cumsum(ranked, axis=-1) - ranked
    rank = np.argsort(order, axis=-1)
    unimportance = np.take_along_axis(unimportance_ranked, rank, axis=-1)
    level = np.full(weights.shape, HIGH, dtype=np.int8)
    scale = np.ones(weights.shape, dtype=np.float32)
    if opts.mixed_precision:
        level[unimportance > opts.t1] = LOW
        if opts.skip:
            level[unimportance > opts.t2] = SKIP_IF_MISSING
    if opts.big_little and k > 1:
        half = k // 2
        mass = ranked[..., :half].sum(axis=-1, keepdims=True)
        little = mass >= opts.little_threshold
        dropped = little & (rank >= half)
        level[dropped] = SKIP_IF_MISSING if opts.little_keeps_resident else DROP
        scale = np.where(little & ~dropped, 1.0 / np.maximum(mass, 1e-9), scale).astype(np.float32)
    return level, scale


def _plan_one_token(row: list, opts: PrecisionOptions) -> tuple[np.ndarray, np.ndarray]:
    """``plan_slots`` for one token (every decode layer call), in plain Python: on k values a
    numpy call costs more than the arithmetic."""
    k = len(row)
    order = sorted(range(k), key=lambda i: -row[i])  # (stable: ties keep their order)
    level, scale = [HIGH] * k, [1.0] * k
    if opts.mixed_precision:
        above = 0.0  # unimportance: the weight of the experts ranked above
        for i in order:
            if above > opts.t2 and opts.skip:
                level[i] = SKIP_IF_MISSING
            elif above > opts.t1:
                level[i] = LOW
            above += row[i]
    if opts.big_little and k > 1:
        half = k // 2
        mass = sum(row[i] for i in order[:half])
        if mass >= opts.little_threshold:
            dropped = SKIP_IF_MISSING if opts.little_keeps_resident else DROP
            for i in order[half:]:
                level[i] = dropped
            for i in order[:half]:
                scale[i] = 1.0 / max(mass, 1e-9)
    return np.array([level], dtype=np.int8), np.array([scale], dtype=np.float32)


def renormalized(weights: np.ndarray, level: np.ndarray, scale: np.ndarray,
                 rows: np.ndarray) -> np.ndarray:
    """The output factors once a call decided which slots run: in ``rows`` (a little token whose
    resident experts ran after all, a draft token) the kept experts are renormalized over the
    gate mass that runs; other rows keep ``scale``."""
    kept = level != DROP
    mass = np.where(kept, weights, 0.0).sum(axis=-1, keepdims=True)
    factors = np.where(kept, 1.0 / np.maximum(mass, 1e-9), 1.0)
    return np.where(rows[:, None], factors, scale).astype(np.float32)


def demote_unpopular(indices: np.ndarray, level: np.ndarray, min_share: float) -> np.ndarray:
    """Level with the HIGH slots of experts chosen by fewer than ``min_share`` of the rows
    (tokens) of ``indices`` turned LOW."""
    experts, tokens = np.unique(indices[level != DROP], return_counts=True)
    rare = experts[tokens < min_share * len(indices)]
    if not len(rare):
        return level
    out = level.copy()
    out[(level == HIGH) & np.isin(indices, rare)] = LOW
    return out


class ExpertHeat:
    """How often each expert of each layer was chosen lately: every call of a layer fades its
    counts by ``decay`` and adds one for each expert chosen (a prompt chunk counts once per
    expert). An expert is hot once its count reaches ``threshold``."""

    def __init__(self, num_experts: dict[int, int], threshold: float, decay: float = 0.9):
        self.threshold, self.decay = threshold, decay
        self._counts = {layer: np.zeros(n, dtype=np.float32) for layer, n in num_experts.items()}

    def see(self, layer: int, experts: np.ndarray) -> None:
        counts = self._counts[layer]
        counts *= self.decay
        counts[np.ravel(experts)] += 1.0  # (a repeated index adds once)

    def hot(self, layer: int, expert: int) -> bool:
        return bool(self._counts[layer][expert] >= self.threshold)

    def reset(self) -> None:
        for counts in self._counts.values():
            counts[:] = 0.0
