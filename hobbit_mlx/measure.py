"""What load() measures on the model itself: KV bytes per token, and the activations of prefill
chunks of each size the budget plans with (the runtime computes every expert call on slot 0 while
measuring, so nothing is read)."""

from __future__ import annotations

import gc

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models.cache import make_prompt_cache


def kv_bytes_per_token(model: nn.Module) -> int:
    """Measured: run one token through the model and size the KV cache arrays it made.

    mlx-lm caches allocate in steps along the sequence axis (-2), so each array's bytes are
    divided by its length there; state without a sequence axis (recurrent layers) is constant.
    """
    cache = make_prompt_cache(model)
    model(mx.array([[0]]), cache=cache)
    states = [a for c in cache or [] for _, a in tree_flatten(c.state) if isinstance(a, mx.array)]
    mx.eval(states)
    return int(sum(a.nbytes // a.shape[-2] for a in states if a.ndim >= 3 and a.shape[-2] > 0))


def chunk_ladder(prefill_step_size: int) -> list[int]:
    """The chunk sizes the budget plans with: 64, 96, 128, 192, ... up to the prefill step (and
    the step itself), so a reserve is never far above what a prompt needs."""
    sizes = {prefill_step_size}
    n = 64
    while n < prefill_step_size:
        sizes.update(m for m in (n, n * 3 // 2) if m < prefill_step_size)
        n *= 2
    return sorted(sizes)


# Sizes between the two measured ones are interpolated (a linear part for the per-token tensors,
# a quadratic one for attention scores); this margin covers the fit (within 2.5% on the
# reference model's fully measured ladder).
INTERPOLATION_MARGIN = 1.1
_MEASURED: dict[tuple, list] = {}
MEASURE_MARGIN = 1.05


def activation_ladder(model: nn.Module, prefill_step_size: int) -> list[tuple[int, int]]:
    """(chunk tokens, activation bytes) for every size of ``chunk_ladder``: the smallest and the
    largest measured (a prefill pass each), the sizes between from ``a*n + b*n^2`` through them."""
    ladder = chunk_ladder(prefill_step_size)
    # Measured with MLX free to reuse cached buffers (a reused buffer may be larger than asked
    # for, and counts whole): the same in every process, and not below what a run then sees.
    limit = mx.set_cache_limit(1 << 40)
    gc.collect()  # models dropped earlier hold memory until their reference cycles are collected
    # The first multi-token call makes one-time allocations that stay (they are no activations).
    small = min(activation_bytes(model, ladder[0]), activation_bytes(model, ladder[0]))
    large = activation_bytes(model, ladder[-1]) if len(ladder) > 1 else small
    mx.set_cache_limit(limit)
    n0, n1 = ladder[0], ladder[-1]
    if n1 == n0:
        return [(n0, small)]
    quad = max(0.0, (large / n1 - small / n0) / (n1 - n0))  # through both points
    lin = small / n0 - quad * n0
    grain = 64 * 1024
    points = [(n0, small)]
    for n in ladder[1:-1]:
        fit = int(INTERPOLATION_MARGIN * (lin * n + quad * n * n))
        points.append((n, max(small, min(large, (fit + grain - 1) // grain * grain))))
    return points + [(n1, large)]


def activation_bytes(model: nn.Module, chunk: int) -> int:
    """Measured: the peak memory a prefill chunk of ``chunk`` tokens adds above the weights, less
    the KV cache it leaves (which the KV reserve counts). Runs with the runtime measuring, so no
    expert is read; the expert calls build the graphs a chunk with misses builds."""
    cache = make_prompt_cache(model)
    mx.synchronize()
    mx.clear_cache()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    tokens = mx.array([[(7 * i + 3) % 97 + 1 for i in range(chunk)]])
    model(tokens, cache=cache)
    states = [a for c in cache or [] for _, a in tree_flatten(c.state) if isinstance(a, mx.array)]
    mx.eval(states)
    peak = mx.get_peak_memory()
    kv = sum(a.nbytes for a in states)
    del states, cache
    mx.clear_cache()
    # The allocator's rounding moves the peak by a few KiB, and a run's buffer reuse by a few
    # percent, from one run to the next: a margin of both.
    grain = 64 * 1024
    return (int(MEASURE_MARGIN * max(0, peak - base - kv)) + 2 * grain - 1) // grain * grain


def measured_activations(model: nn.Module, prefill_step_size: int, key: tuple) -> list[tuple[int, int]]:
    """``activation_ladder``, measured once per ``key`` (model, chunk size, dtype) in a process:
    a budget that one load (or ``footprint``) states as the minimum is the next load's minimum."""
    if key not in _MEASURED:
        _MEASURED[key] = activation_ladder(model, prefill_step_size)
    return _MEASURED[key]
