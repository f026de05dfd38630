"""What load() measures on the model itself: KV bytes per token, and the activations of prefill
chunks of each size the budget plans with (the runtime computes every expert call on slot 0 while
measuring, so nothing is read). The activations take most of a load's time (7 of 7.3 s for the
reference model on a 2-core CPU), so they are kept on disk for the next process, keyed by the
model, the options that shape them, the machine and the code that measures them."""

from __future__ import annotations

import gc
import hashlib
import json
import os
import platform
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models.cache import (ArraysCache, CacheList, ChunkedKVCache, KVCache, RotatingKVCache,
                                  make_prompt_cache)

from .budget import KV_STEP

if TYPE_CHECKING:
    from .store import Manifest


def kv_bytes_by_layer(model: nn.Module, kv_quant=None) -> list[int]:
    """KV bytes per token of each layer's cache, from the shapes of a one-token pass (built, never
    evaluated: shapes and dtypes are known without computing anything); with ``kv_quant`` (a
    ``KVQuant``), of the cache quantized as mlx-lm quantizes it.

    mlx-lm caches allocate in steps along the sequence axis (-2), so each array's bytes are
    divided by its length there; state without a sequence axis (recurrent layers) is constant.
    """
    cache = make_prompt_cache(model)
    model(mx.array([[0]]), cache=cache)
    if kv_quant is not None:
        kv_quant.quantize(cache)
    return [int(sum(a.nbytes // a.shape[-2] for _, a in tree_flatten(c.state)
                    if isinstance(a, mx.array) and a.ndim >= 3 and a.shape[-2] > 0))
            for c in cache or []]


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
_MEASURED: dict[tuple, tuple] = {}
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
    _raw_activation(model, ladder[0])
    # (the smallest chunk's reserve serves every shorter call: a decoded token's too, whose
    # logits row and log-softmax may outweigh a chunk's activations on a large vocabulary)
    measured = {ladder[0]: max(activation_bytes(model, ladder[0], runs=3),
                               activation_bytes(model, 1, runs=3, next_token=True))}
    knee = min(KNEE_CHUNK, ladder[-1])
    for n in {knee, ladder[-1]} - set(measured):  # (the largest: once, the margin covers it)
        measured[n] = activation_bytes(model, n, runs=3 if n == knee else 1)
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


def _kv_state(cache) -> list:
    return [a for c in cache or [] for _, a in tree_flatten(c.state) if isinstance(a, mx.array)]


def _raw_activation(model: nn.Module, chunk: int, context: int = 0, kv_quant=None,
                    next_token: bool = False) -> int:
    """The peak memory a ``chunk``-token call adds above the weights and the KV cache of
    ``context`` tokens already held (quantized with ``kv_quant``), less the KV cache it adds;
    with ``next_token``, its next token chosen as a generation chooses it (a prefill chunk's
    logits are never computed).
    Runs with the runtime measuring, so no expert is read; the expert calls build the graphs a
    chunk with misses builds."""
    cache = make_prompt_cache(model)
    tokens = mx.array([[(7 * i + 3) % 97 + 1 for i in range(chunk + context)]])
    if context:
        _hold_context(model, cache, tokens[:, :context])
        if kv_quant is not None:
            kv_quant.quantize(cache)
            mx.eval(_kv_state(cache))
    held = sum(a.nbytes for a in _kv_state(cache))
    mx.synchronize()
    mx.clear_cache()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    logits = model(tokens[:, context:], cache=cache)
    chosen = []
    if next_token:  # (mlx-lm's generation holds the outputs of the step its caller holds and
        # of the step in flight while it builds the next)
        chosen = _next_token(logits)
        for _ in range(2):
            logits = model(chosen[-1][:, None], cache=cache)
            chosen += _next_token(logits)
    states = _kv_state(cache)
    mx.eval(states, chosen)
    peak = mx.get_peak_memory()
    kv = sum(a.nbytes for a in states) - held
    del states, cache, logits, chosen
    mx.clear_cache()
    return max(0, peak - base - kv)


def _next_token(logits: mx.array) -> list[mx.array]:
    """What a generation's step computes of its logits: the last token's row, its log-softmax
    and the token chosen (mlx-lm's ``generate_step``): vocabulary rows, which a large
    vocabulary makes count."""
    last = logits[:, -1, :]
    logprobs = last - mx.logsumexp(last, axis=-1, keepdims=True)
    return [logprobs, mx.argmax(logprobs, axis=-1)]


def _peak_of(model: nn.Module, chunk: int, context: int = 0, kv_quant=None, runs: int = 3,
             next_token: bool = False) -> int:
    """The most of ``runs`` measurements: now and then a run peaks lower (by up to 27% of a
    64-token call on a tiny model), never higher. Taking the least of two, or one, sometimes
    planned a budget that the same call then went over."""
    return max(_raw_activation(model, chunk, context, kv_quant, next_token) for _ in range(runs))


def _hold_context(model: nn.Module, cache: list, tokens: mx.array) -> None:
    """Puts ``tokens``' worth of context in ``cache``. Attention caches get zero keys and values
    of the shapes a one-token pass gives them (a sliding window keeps its window), recurrent ones
    that pass's state: the memory a call attending to them needs does not depend on the values,
    and nothing is computed, so long contexts cost little to probe. A model with a cache of any
    other kind runs the tokens instead, in 256-token calls."""
    probe = make_prompt_cache(model)
    model(tokens[:, :1], cache=probe)
    if not all(_fill(c, p, tokens.shape[-1]) for c, p in zip(cache, probe)):
        cache[:] = make_prompt_cache(model)
        for start in range(0, tokens.shape[-1], KV_STEP):
            model(tokens[:, start:start + KV_STEP], cache=cache)
            mx.eval(_kv_state(cache))
    mx.eval(_kv_state(cache))


def _fill(cache, probe, tokens: int) -> bool:
    """``_hold_context`` for one layer's cache; False for a kind it does not know."""
    if isinstance(cache, CacheList):
        return all(_fill(c, p, tokens) for c, p in zip(cache.caches, probe.caches))
    if isinstance(cache, ArraysCache):
        cache.cache = list(probe.cache)
        return True
    if _untouched(probe):  # a layer that does not run here (a pipeline rank's others): running
        return True       # the tokens leaves its cache empty too
    k, v = getattr(probe, "keys", None), getattr(probe, "values", None)
    if not (isinstance(cache, (KVCache, RotatingKVCache, ChunkedKVCache))
            and isinstance(k, mx.array) and isinstance(v, mx.array) and k.ndim == v.ndim == 4):
        return False

    def zeros(n: int) -> tuple[mx.array, mx.array]:
        return (mx.zeros((*k.shape[:2], n, k.shape[-1]), k.dtype),
                mx.zeros((*v.shape[:2], n, v.shape[-1]), v.dtype))

    if isinstance(cache, ChunkedKVCache):  # (llama4 trims its chunked caches before each call:
        for start in range(0, tokens, KV_STEP):  # filled as calls of KV_STEP tokens leave it)
            cache.maybe_trim_front()
            cache.update_and_fetch(*zeros(min(KV_STEP, tokens - start)))
        return True
    cache.update_and_fetch(*zeros(tokens))
    return True


def _untouched(probe) -> bool:
    """Whether the one-token call left this cache empty: whatever a layer did not write for one
    token, it does not write for more (a cache of a kind that cannot say is not taken as empty)."""
    try:
        return bool(probe.empty())
    except (AttributeError, NotImplementedError, TypeError):
        return False


def activation_bytes(model: nn.Module, chunk: int, runs: int = 1, next_token: bool = False) -> int:
    """Measured: the activations of a prefill chunk of ``chunk`` tokens on an empty cache (with
    ``next_token``, of a call choosing its next token), the most of ``runs`` runs."""
    # The allocator's rounding moves the peak by a few KiB, and a run's buffer reuse by a few
    # percent, from one run to the next: a margin of both.
    grain = 64 * 1024
    raw = _peak_of(model, chunk, runs=runs, next_token=next_token)
    return (int(MEASURE_MARGIN * raw) + 2 * grain - 1) // grain * grain


# Contexts held while a call's growth with the context is measured; each leaves room for a
# 64-token call in its KV step. Up to a model-dependent length the growth is a constant (buffers
# an attending call copies); beyond it the attention scores of each (call token, context token)
# pair outgrow the expert activations they share the peak with, so the far pair gives the slope
# (the same per call token for 16- and 64-token calls, measured: only the shorter one goes far).
CONTEXT_PROBES = {SMALLEST_CHUNK: (192, 1984, 4032), KNEE_CHUNK: (192,)}
CONTEXT_MARGIN = 1.25
# The growth is a difference of two peaks, each of which may come out a few percent of the call's
# activations low in one process and not in another (the buffers MLX happens to reuse): so a
# margin of the growth alone does not cover it. Measured: one process's fit reserved 148 KB less
# than another's for a 64-token call (of 4.6 MB) on the reference model, and a prompt chunk went
# 92 KB over a 28 MB budget. The growth terms carry this share of the call's own activations.
GROWTH_NOISE = 0.05


def context_activation(model: nn.Module, kv_quant=None) -> tuple[float, float, float]:
    """How a call's activations grow with the context it attends to, as (bytes per call token per
    context token, bytes added by any context, and per call token): ``activation_for`` reserves
    the second, the third times the call's tokens and the first times the pairs. Measured with
    16- and 64-token calls against the contexts of ``CONTEXT_PROBES``; the fit lies above every
    measurement. With ``kv_quant`` the contexts are quantized (the attention then differs)."""
    limit = mx.set_cache_limit(1 << 40)
    gc.collect()
    grown, empty = {}, {}
    for n, contexts in CONTEXT_PROBES.items():
        # (the least for the call alone, the most with a context: the growth is not understated)
        empty[n] = min(_raw_activation(model, n), _raw_activation(model, n))
        grown[n] = {c: max(0, _peak_of(model, n, c, kv_quant, runs=2) - empty[n])
                    for c in contexts}
    mx.set_cache_limit(limit)
    per_pair = max([0.0] + [(g[c1] - g[c0]) / (c1 - c0) / n for n, g in grown.items()
                            for c0, c1 in zip(sorted(g), sorted(g)[1:])])
    # what each call adds beside its pairs (the nearest context's stands for any shorter one:
    # the copies come at once), then a line in the call's tokens above both calls
    fixed = {n: max(g[min(g)], *(grew - per_pair * n * c for c, grew in g.items()))
             + GROWTH_NOISE * empty[n] for n, g in grown.items()}
    per_token = max(0.0, (fixed[KNEE_CHUNK] - fixed[SMALLEST_CHUNK]) / (KNEE_CHUNK - SMALLEST_CHUNK))
    constant = max(0.0, *(f - per_token * n for n, f in fixed.items()))
    return CONTEXT_MARGIN * per_pair, CONTEXT_MARGIN * constant, CONTEXT_MARGIN * per_token


def model_structure(config: dict, arrays: list[tuple[str, mx.array]],
                    manifest: Manifest) -> str:
    """What a model's measured activations depend on besides the options: its configuration,
    the names, shapes and dtypes of its resident ``arrays`` and how its experts are stored, not
    their values (measuring, every expert computes on slot 0, whatever the router chose) nor the
    model's path: a copy, a new conversion or a moved model reuses the measurement."""
    layout = {
        "config": config,
        "arrays": [(name, list(a.shape), str(a.dtype)) for name, a in arrays],
        "experts": [(l.num_experts, l.module_path,
                     {name: (p.bits, p.quant, [(t.name, t.dtype, t.shape) for t in p.tensors])
                      for name, p in sorted(l.precisions.items())}) for l in manifest.layers]}
    return hashlib.sha1(json.dumps(layout, sort_keys=True, default=str).encode()).hexdigest()


def measured_activations(model: nn.Module, prefill_step_size: int, key: tuple,
                         store: Path | None = None, kv_quant=None,
                         announce: Callable[[], None] | None = None
                         ) -> tuple[list[tuple[int, int]], tuple[float, float, float]]:
    """``activation_ladder`` and ``context_activation``, each measured once per ``key`` (model,
    dtype, pipeline layers): the ladder per chunk size, the growth with the context per KV
    quantization (it does not depend on the chunk size, and is most of a measurement: a load
    with another ``prefill_step_size`` measures only its ladder). A budget that one load (or
    ``footprint``) states as the minimum is the next load's minimum. With ``store`` (a
    directory), also across processes: read from there when a process on this machine measured
    them with this code, else measured and written there. ``announce`` is called before a
    measurement runs (most of a first load's time)."""
    said = []

    def say() -> None:
        if announce is not None and not said:
            said.append(True)
            announce()

    ladder = _measured(("ladder", *key, prefill_step_size), store, say,
                       lambda: activation_ladder(model, prefill_step_size))
    context = _measured(("context", *key, kv_quant), store, say,
                        lambda: context_activation(model, kv_quant))
    return ladder, context


def _measured(key: tuple, store: Path | None, say: Callable[[], None], take: Callable):
    """One part of ``measured_activations``: kept in this process, then in ``store``, else
    measured (and kept in both)."""
    if key in _MEASURED:
        return _MEASURED[key]
    kind = key[0]
    path = None if store is None else Path(store) / f"{_disk_key(key)}.json"
    got = _read_measured(path, kind) if path is not None else None
    if got is None:
        say()
        got = take()
        if path is not None:
            _write_measured(path, kind, got)
    _MEASURED[key] = got
    return got


def _disk_key(key: tuple) -> str:
    """``key`` with what else decides the numbers: the machine, MLX and mlx-lm, and the code that
    measures (this module and the offloaded calls it runs)."""
    import mlx_lm

    from . import offload

    code = hashlib.sha1()
    for module in (__file__, offload.__file__):
        code.update(Path(module).read_bytes())
    parts = (repr(key), mx.__version__, getattr(mlx_lm, "__version__", ""), platform.machine(),
             platform.system(), str(mx.default_device()), code.hexdigest())
    return hashlib.sha1("\n".join(parts).encode()).hexdigest()


def _read_measured(path: Path, kind: str):
    """The ``kind`` ("ladder" or "context") kept at ``path``, or None (none kept, or unreadable:
    measured again)."""
    try:
        data = json.loads(path.read_text())[kind]
        got = [(int(n), int(b)) for n, b in data] if kind == "ladder" else \
            tuple(float(x) for x in data)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    whole = bool(got) if kind == "ladder" else len(got) == 3
    return got if whole else None


def _write_measured(path: Path, kind: str, measured) -> None:
    """Kept for the next process: written whole (a temporary file renamed), or not at all."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    except OSError as e:
        return _not_kept(path.parent, e)  # (a read-only cache directory: measured again)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({kind: list(measured)}, f)
        os.replace(tmp, path)
    except OSError as e:
        _not_kept(path.parent, e)
    finally:
        if os.path.exists(tmp):  # (not renamed: a failed write leaves nothing behind)
            os.unlink(tmp)
    _prune(path.parent)


_WARNED_NOT_KEPT: set[Path] = set()


def _not_kept(store: Path, e: OSError) -> None:
    """Measurements that cannot be kept cost every load their seconds: say so, once per
    directory and process, naming it."""
    if store in _WARNED_NOT_KEPT:
        return
    _WARNED_NOT_KEPT.add(store)
    warnings.warn(f"{store}: cannot keep the measured activations there ({e.strerror or e}); "
                  "every load measures them again (seconds): make it writable, or set "
                  "HOBBIT_MLX_CACHE to a writable directory", stacklevel=4)


KEPT_MEASUREMENTS = 512  # files kept (each < 1 KB; models come and go, test runs make many)


def _prune(store: Path) -> None:
    """The oldest kept measurements go beyond ``KEPT_MEASUREMENTS``."""
    try:
        kept = sorted(store.glob("*.json"), key=lambda p: p.stat().st_mtime)
        for old in kept[:max(0, len(kept) - KEPT_MEASUREMENTS)]:
            old.unlink()
    except OSError:
        pass  # (another process pruned it first)
