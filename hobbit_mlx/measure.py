"""What load() measures on the model itself: KV bytes per token, and the activations of prefill
chunks of each size the budget plans with (the runtime computes every expert call on slot 0 while
measuring, so nothing is read)."""

from __future__ import annotations

import gc

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models.cache import make_prompt_cache


def kv_bytes_by_layer(model: nn.Module) -> list[int]:
    """KV bytes per token of each layer's cache, from the shapes of a one-token pass (built, never
    evaluated: shapes and dtypes are known without computing anything).

    mlx-lm caches allocate in steps along the sequence axis (-2), so each array's bytes are
    divided by its length there; state without a sequence axis (recurrent layers) is constant.
    """
    cache = make_prompt_cache(model)
    model(mx.array([[0]]), cache=cache)
    return [int(sum(a.nbytes // a.shape[-2] for _, a in tree_flatten(c.state)
                    if isinstance(a, mx.array) and a.ndim >= 3 and a.shape[-2] > 0))
            for c in cache or []]


def kv_bytes_per_token(model: nn.Module) -> int:
    return sum(kv_bytes_by_layer(model))


SMALLEST_CHUNK = 16
KNEE_CHUNK = 64  # measured too: below it a chunk's activations grow about linearly


def chunk_ladder(prefill_step_size: int) -> list[int]:
    """The chunk sizes the budget plans with: 16, 24, 32, 48, 64, 96, ... up to the prefill step
    (and the step itself), so a reserve is never far above what a prompt needs; a short prompt
    and decoding reserve only a 16-token chunk's activations."""
    sizes = {prefill_step_size}
    n = SMALLEST_CHUNK
    while n < prefill_step_size:
        sizes.update(m for m in (n, n * 3 // 2) if m < prefill_step_size)
        n *= 2
    return sorted(sizes)


# Sizes between the measured ones are interpolated (a linear part for the per-token tensors,
# a quadratic one for attention scores); this margin covers the fit (within 2.5% on the
# reference model's fully measured ladder).
INTERPOLATION_MARGIN = 1.1
_MEASURED: dict[tuple, list] = {}
MEASURE_MARGIN = 1.05


def activation_ladder(model: nn.Module, prefill_step_size: int) -> list[tuple[int, int]]:
    """(chunk tokens, activation bytes) for every size of ``chunk_ladder``: the smallest, the knee
    (64) and the largest measured (a prefill pass each); sizes up to the knee interpolated
    linearly, larger ones from ``a*n + b*n^2`` through the knee and the largest."""
    ladder = chunk_ladder(prefill_step_size)
    # Measured with MLX free to reuse cached buffers (a reused buffer may be larger than asked
    # for, and counts whole): the same in every process, and not below what a run then sees.
    limit = mx.set_cache_limit(1 << 40)
    gc.collect()  # models dropped earlier hold memory until their reference cycles are collected
    # The first multi-token call makes one-time allocations that stay (they are no activations).
    measured = {ladder[0]: min(activation_bytes(model, ladder[0]), activation_bytes(model, ladder[0]))}
    for n in {min(KNEE_CHUNK, ladder[-1]), ladder[-1]} - set(measured):
        measured[n] = activation_bytes(model, n)
    mx.set_cache_limit(limit)
    knots = sorted(measured.items())
    grain = 64 * 1024
    points = []
    for n in ladder:
        if n in measured:
            points.append((n, measured[n]))
            continue
        (n0, a0), (n1, a1) = next((lo, hi) for lo, hi in zip(knots, knots[1:]) if n < hi[0])
        if n1 <= KNEE_CHUNK:  # linear between the two
            fit = a0 + (a1 - a0) * (n - n0) / (n1 - n0)
        else:  # through (n0, a0) and (n1, a1) with no constant term
            quad = max(0.0, (a1 / n1 - a0 / n0) / (n1 - n0))
            fit = (a0 / n0 - quad * n0) * n + quad * n * n
        fit = int(INTERPOLATION_MARGIN * fit)
        points.append((n, max(a0, min(a1, (fit + grain - 1) // grain * grain))))
    return points


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
