"""How a model's layers are shared between the ranks.

Its own module because the arithmetic is pure: layer counts per rank in proportion to the ranks'
budgets (``pipeline_budget``) or as given (checked), and each rank's range of layers in mlx-lm's
order, with no group or model involved.
"""

from __future__ import annotations

from typing import Sequence

from .errors import PipelineError


def proportional_split(num_layers: int, weights: Sequence[float]) -> list[int]:
    """Layers per rank (in rank order) in proportion to ``weights`` (their memory budgets), each
    rank at least one layer; largest remainders get the layers rounding leaves over."""
    size = len(weights)
    if num_layers < size:
        raise PipelineError(f"{size} ranks cannot share {num_layers} layers (at least one each)")
    total = float(sum(weights))
    if total <= 0 or any(w <= 0 for w in weights):
        weights, total = [1.0] * size, float(size)
    exact = [(num_layers - size) * w / total for w in weights]
    split = [1 + int(e) for e in exact]
    for r in sorted(range(size), key=lambda r: (int(exact[r]) - exact[r], r))[:num_layers - sum(split)]:
        split[r] += 1
    return split


def check_split(split: Sequence[int], num_layers: int, size: int) -> list[int]:
    """An explicit split, checked: one positive count per rank summing to the layers."""
    split = [int(s) for s in split]
    if len(split) != size:
        raise PipelineError(f"pipeline split {split} has {len(split)} entries for {size} ranks")
    if any(s < 1 for s in split) or sum(split) != num_layers:
        raise PipelineError(f"pipeline split {split} must be positive and sum to the model's "
                            f"{num_layers} layers")
    return split


def layer_range(split: Sequence[int], rank: int) -> tuple[int, int]:
    """(start, end) of rank's layers: the higher ranks hold the layers before (mlx-lm's order)."""
    start = sum(split[rank + 1:])
    return start, start + split[rank]


def pipeline_budget(options) -> int | None:
    """The budget a rank weighs its share of layers by: its memory budget, or (none given) the
    60% of RAM load() would take; None with ``expert_residency`` (an even split)."""
    from ..budget import parse_size, system_memory_bytes

    if options.memory_budget is not None:
        return parse_size(options.memory_budget)
    if options.expert_residency is not None:
        return None
    return int(0.6 * system_memory_bytes())
