"""Patching a model's decoder into pipeline stages: the generic split.

Its own module because this is the code that reaches into mlx-lm's models: it finds the decoder,
passes through the layers another rank holds, lets a local layer's cache stand in for theirs,
and makes the first and last local layers receive, send and gather the hidden state.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING

import mlx.core as mx
import mlx.nn as nn

if TYPE_CHECKING:
    from .rank import Pipeline


# The decoder (the module whose ``layers`` the split cuts) is found at the first of these
# paths: text models keep it in ``model``; wrappers of a text model in ``language_model``.
DECODER_PATHS = ("model", "language_model.model", "language_model")

# Architectures whose layers return (hidden state, a state the next layer takes): the argument a
# layer another rank holds passes on unchanged.
PASSED_ON = {"hunyuan": ("shared_kv_states",),
             # (gemma4's KV-shared layers take another layer's keys, values and offset)
             "gemma4_text": ("shared_kv", "offset"), "gemma4": ("shared_kv", "offset")}


def decoder_of(model: nn.Module) -> nn.Module | None:
    """The module that holds ``model``'s decoder layers (a non-empty ``layers`` list)."""
    for path in DECODER_PATHS:
        m = model
        for name in path.split("."):
            m = getattr(m, name, None)
        if isinstance(m, nn.Module) and isinstance(getattr(m, "layers", None), list) \
                and m.layers:
            return m
    return None


def _takes_split(pipeline) -> bool:
    """mlx-lm's ``pipeline(group, split)``; kimi_k3's takes the group alone (its own split)."""
    try:
        return len(inspect.signature(pipeline).parameters) >= 2
    except (TypeError, ValueError):
        return False


class PassThrough(nn.Module):
    """A layer another rank holds: the hidden state passes through untouched (with the state
    arguments ``passed_on``, for layers that return them after it; ``layer`` gives their
    positions)."""

    def __init__(self, layer: nn.Module | None = None, passed_on: tuple = ()):
        super().__init__()
        self._passed: list = []  # (name, position): plain attributes, no parameters
        # The layer's own settings stay readable: hybrid models' make_cache and masks read
        # every layer's kind (jamba's is_attn, granitemoehybrid's layer_type, afmoe's
        # use_sliding, ...), which failed on a rank that does not hold the layer.
        for name, value in (vars(layer) if layer is not None else {}).items():
            if isinstance(value, (bool, int, float, str)) and not name.startswith("_"):
                object.__setattr__(self, name, value)
        if layer is not None and passed_on:
            names = list(inspect.signature(type(layer).__call__).parameters)[2:]  # (self, x)
            self._passed = [(name, names.index(name)) for name in passed_on]

    def __call__(self, x, *args, **kwargs):
        if not self._passed:
            return x
        return (x, *(kwargs[name] if name in kwargs else args[pos] if pos < len(args) else None
                     for name, pos in self._passed))


def _cache_kind(cache) -> tuple:
    subs = getattr(cache, "caches", None)
    if isinstance(subs, (list, tuple)):  # (a CacheList: its caches' kinds; their reprs hold ids)
        return type(cache), tuple(_cache_kind(c) for c in subs)
    try:
        return type(cache), repr(sorted(vars(cache).items()))
    except Exception:  # noqa: BLE001 - a kind never matched
        return (id(cache),)


def _cache_twins(model: nn.Module, start: int, end: int) -> dict[int, int]:
    """For each layer outside ``start``-``end``, a local layer whose new cache is of the same
    kind (class and settings), if any. Models build masks from particular layers' caches
    (gpt_oss: the first sliding and full layers'; llama4: layer 0's chunk position): on a rank
    those layers pass through, their caches never advance, and the masks are sized for no
    context; the twin's cache, which advanced, stands in for them."""
    from mlx_lm.models.cache import make_prompt_cache

    try:
        kinds = [_cache_kind(c) for c in make_prompt_cache(model)]
    except Exception:  # noqa: BLE001 - a model whose caches cannot be made before its weights
        return {}
    twins = {}
    for j, kind in enumerate(kinds):
        if not start <= j < end:
            twin = next((k for k in range(start, min(end, len(kinds))) if kinds[k] == kind), None)
            if twin is not None:
                twins[j] = twin
    return twins


def _see_local_caches(decoder: nn.Module, twins: dict[int, int]) -> None:
    """The decoder's calls see, in place of each passed-through layer's cache, its twin's
    (``_cache_twins``): only the decoder's own code reads them (a ``PassThrough`` ignores its
    cache), and the caller's list (trimmed, quantized, counted) is left as it is."""
    base = type(decoder)
    params = list(inspect.signature(base.__call__).parameters)
    if not twins or "cache" not in params:
        return
    pos = params.index("cache") - 1  # (without self)

    def see(cache):
        if not isinstance(cache, list):
            return cache
        return [cache[twins.get(i, i)] for i in range(len(cache))]

    def __call__(self, *args, **kwargs):
        if "cache" in kwargs:
            kwargs["cache"] = see(kwargs["cache"])
        elif len(args) > pos:
            args = (*args[:pos], see(args[pos]), *args[pos + 1:])
        return base.__call__(self, *args, **kwargs)

    decoder.__class__ = type(base.__name__, (base,), {"__call__": __call__})


def _find_cache(args: tuple, kwargs: dict):
    from mlx_lm.models.cache import _BaseCache

    for a in list(args) + list(kwargs.values()):
        if isinstance(a, _BaseCache):
            return a
    return None


def _stage(layer: nn.Module, pipe: Pipeline, *, recv_from: int | None = None,
           send_to: int | None = None, gather: bool = False) -> None:
    """Turn ``layer`` into a pipeline stage in place (its class, not its module path, changes,
    so weights and the expert store's module paths still match)."""
    base = type(layer)

    def __call__(self, x, *args, **kwargs):
        if pipe.active and recv_from is not None:
            x = mx.distributed.recv_like(x, recv_from, group=pipe.group)
        out = base.__call__(self, x, *args, **kwargs)
        h = out[0] if isinstance(out, tuple) else out  # (a pair: PASSED_ON)
        if pipe.active and gather:
            if send_to is not None:
                h = mx.distributed.send(h, send_to, group=pipe.group)
                # a prompt chunk evaluates only the caches: the send must run with them
                _run_with_cache(_find_cache(args, kwargs), h)
            h = mx.distributed.all_gather(h, group=pipe.group)[: h.shape[0]]
        return (h, *out[1:]) if isinstance(out, tuple) else h

    layer.__class__ = type(base.__name__, (base,), {"__call__": __call__})


def _run_with_cache(cache, h: mx.array) -> bool:
    """Make ``h`` a dependency of the cache's state (an attention layer's keys, a recurrent
    layer's first state array, a list of caches' first that takes it): a rank whose last layer
    was recurrent never sent its prompt chunks, and the next rank waited for them forever."""
    if cache is None:
        return False
    if isinstance(getattr(cache, "keys", None), mx.array):
        cache.keys = mx.depends(cache.keys, h)
        return True
    if isinstance(getattr(cache, "caches", None), (list, tuple)):  # (CacheList)
        return any(_run_with_cache(c, h) for c in cache.caches)
    arrays = getattr(cache, "cache", None)  # (ArraysCache)
    for i, a in enumerate(arrays if isinstance(arrays, list) else ()):
        if isinstance(a, mx.array):
            arrays[i] = mx.depends(a, h)
            return True
    return False
