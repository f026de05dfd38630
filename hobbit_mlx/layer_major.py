"""Prefill layer by layer: every chunk of a long prompt passes a layer before any enters the next.

mlx-lm prefills a prompt chunk by chunk, each chunk through every layer. A chunk of a few hundred
tokens routes to nearly every expert of a layer, so with the experts offloaded each chunk reads
nearly the whole model again: a prompt of N chunks reads it N times. Taken layer by layer, a
layer's experts are read once for all the chunks (when the pools can hold one layer's experts),
and the chunks' hidden states are all that is held between layers (prompt tokens × hidden size).

The model's own code does the work: the decoder module (``model.model``) is called once per
(layer, chunk) with its layer list cut to that layer and its cache list to that layer's cache, its
embedding replaced by the chunk's hidden state and its final norm by the identity. The chunks
reach each layer in order, so each layer's KV cache grows as it would chunk by chunk, and every
operation sees the inputs it would see there: the KV cache and the logits are mlx-lm's exactly.
That holds where the decoder builds its attention mask from ``cache[0]`` alone and a prompt
chunk's mask does not depend on the cache's offset (plain ``KVCache``, no window): the
architectures in ``LAYER_MAJOR_TYPES``, each checked against chunked prefill by the tests.
"""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import KVCache

# Decoders whose call is: embed, mask (and mistral4's attention scale) from cache[0], each layer
# with its cache, norm (each read in mlx-lm's source and checked against its chunked prefill in
# tests/test_layer_major.py). Not here: gpt_oss (masks from sliding-window caches), llama4
# (chunked attention), granitemoe (scales the embedding inside the call), hunyuan (cross-layer
# KV sharing), hybrids with recurrent state, and anything untested.
LAYER_MAJOR_TYPES = frozenset({
    "mixtral", "phimoe", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek", "deepseek_v2",
    "deepseek_v3", "kimi_k25", "glm4_moe", "glm4_moe_lite", "solar_open", "Klear", "dots1",
    "ernie4_5_moe", "minimax", "mistral4",
})


class _HiddenState(nn.Module):
    """Stands in for the embedding: returns the hidden state the current chunk has reached."""

    def __init__(self) -> None:
        super().__init__()
        self.h = None

    def __call__(self, inputs: mx.array) -> mx.array:
        return self.h


def decoder_of(model: nn.Module) -> nn.Module | None:
    """The decoder module layer-major prefill drives, or None where it does not apply."""
    if getattr(model, "model_type", None) not in LAYER_MAJOR_TYPES:
        return None
    inner = getattr(model, "model", None)
    if inner is None or not all(hasattr(inner, a) for a in ("layers", "embed_tokens", "norm")):
        return None
    if getattr(inner, "pipeline_size", 1) > 1:  # (a pipeline's ranks hold a share of the layers)
        return None
    return inner


def applies(model: nn.Module, cache: list, tokens: int, chunk: int) -> bool:
    """Whether ``tokens`` prompt tokens are prefilled layer by layer: a supported decoder, more
    than one chunk of them, plain KV caches."""
    inner = decoder_of(model)
    return inner is not None and tokens > chunk and \
        len(cache) == len(inner.layers) and all(type(c) is KVCache for c in cache)


# A logits processor marked with this attribute looks back at most that many tokens (mlx-lm's
# penalties look at a window, 20 by default), so mlx-lm need only prefill that much of the prompt
# itself; an unmarked processor may look at the whole prompt, which then stays mlx-lm's.
LOOKS_BACK = "hobbit_looks_back"


def looking_back(processors: list, tokens: int) -> list:
    """Mark mlx-lm logits processors as seeing at most the last ``tokens`` tokens (see
    ``LOOKS_BACK``): what lets a long prompt with a repetition penalty be prefilled layer by
    layer. Returns ``processors``."""
    for p in processors:
        setattr(p, LOOKS_BACK, int(tokens))
    return processors


def prompt_tail(processors) -> int | None:
    """The prompt tokens mlx-lm must prefill itself for ``processors`` to see what they would:
    the last one at least, the longest look-back of a marked processor, None for an unmarked
    one."""
    tail = 1
    for p in processors or ():
        back = getattr(p, LOOKS_BACK, None)
        if back is None:
            return None
        tail = max(tail, back)
    return tail


def hidden_bytes_per_token(model: nn.Module) -> int:
    """What holding one prompt token's hidden state between layers costs."""
    h = decoder_of(model).embed_tokens(mx.array([[0]]))
    return h.shape[-1] * h.dtype.size


def extra_context_tokens(model: nn.Module, prompt_tokens: int, kv_bytes_per_token: int) -> int:
    """The prompt's hidden states, held between layers, counted as KV tokens for the budget."""
    if kv_bytes_per_token <= 0:
        return 0
    return math.ceil(prompt_tokens * hidden_bytes_per_token(model) / kv_bytes_per_token)


def prefill(model: nn.Module, tokens: mx.array, cache: list, chunk: int, runtime=None,
            progress: Callable[[int, int], None] | None = None) -> None:
    """Run ``tokens`` (1-D) into ``cache`` layer by layer, in chunks of ``chunk`` tokens.
    ``runtime`` (the model's ``OffloadRuntime``): while a layer's chunks pass, its experts are
    kept from eviction by the other layers' (a frequency policy would otherwise evict the ones
    the first chunks read, counted once so far, ahead of the layers behind, counted once per
    chunk); and each call's output is handed to it as the model's own call does.
    ``progress(done, total)``: mlx-lm's prompt progress callback, called after each (layer,
    chunk) with the share of the work done, in tokens (a server cancels a prefill through it)."""
    inner = decoder_of(model)
    layers = inner.layers
    chunks = [tokens[s:s + chunk][None] for s in range(0, tokens.size, chunk)]
    hidden = [inner.embed_tokens(c) for c in chunks]
    mx.eval(hidden)
    with one_layer_at_a_time(model) as run:
        for li, (layer, layer_cache) in enumerate(zip(layers, cache)):
            with runtime.experts_held(layer) if runtime is not None else nullcontext():
                for i, c in enumerate(chunks):
                    hidden[i] = run(layer, hidden[i], c, layer_cache)
                    mx.eval(hidden[i], layer_cache.state)
                    if runtime is not None:
                        runtime.end_call(hidden[i])
                    if progress is not None:
                        done = li * tokens.size + min((i + 1) * chunk, tokens.size)
                        progress(done // len(layers), tokens.size)


@contextmanager
def one_layer_at_a_time(model: nn.Module):
    """The decoder (``decoder_of(model)``) made to run one layer on a hidden state: yields
    ``run(layer, hidden, tokens, layer_cache) -> hidden`` (``tokens``: the chunk's ids, which
    the decoder takes for its shape); the decoder is whole again on leaving."""
    inner = decoder_of(model)
    layers, embed, norm = inner.layers, inner.embed_tokens, inner.norm
    state = _HiddenState()

    def run(layer: nn.Module, hidden: mx.array, tokens: mx.array, layer_cache) -> mx.array:
        inner.layers, state.h = [layer], hidden
        return inner(tokens, cache=[layer_cache])

    try:
        inner.embed_tokens, inner.norm = state, nn.Identity()
        yield run
    finally:
        inner.layers, inner.embed_tokens, inner.norm = layers, embed, norm
