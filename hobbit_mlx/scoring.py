"""Which function turns a router's logits into the gate weights its MoE block applies.

HOBBIT's importance, big-little and the guesses' weights need each chosen expert's share of the
gate mass. Routers that return their own choice (DeepSeek, GLM, ...) give the weights; routers
that return logits leave the block to apply softmax (Mixtral, Qwen) or sigmoid (MiniMax,
Kimi-Linear, LFM2, Klear, ...), named by one of several config keys or by none (a default in the
architecture's code). Read as softmax, a sigmoid router's nearly even weights look peaked: every
expert below the first seems unimportant, and the lossy techniques then read, skip and drop far
more than their thresholds mean. So the function is found from the model itself: the block runs
once on a probe input with its switch module replaced by one that returns the k-th basis vector
for the k-th chosen expert, so that the block's output holds the weights it applied.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .routing import untapped_call

SCORINGS = ("softmax", "sigmoid")
# where architectures name it (the probe is the rule; these are for blocks it cannot read, such
# as kimi_k3's, which normalizes the weighted sum)
SCORING_KEYS = ("scoring_func", "score_func", "score_function", "moe_gate_act",
                "moe_router_activation_func", "moe_router_score_func")
PROBE_TOKENS = 4
_FIT = 1e-3  # what is left of a weighted sum's coordinates past its k weights (rounding)
_CLOSE = 0.05  # how close the probed weights must be to one function's (normalized, per token)


class _BasisSwitch(nn.Module):
    """Stands in for a switch module: the k-th chosen expert's output is the k-th basis vector
    (or zeros), so the block's weighted sum of them is its weights."""

    def __init__(self, basis: bool):
        super().__init__()
        self.basis = basis
        self.indices = None

    def __call__(self, x: mx.array, indices: mx.array, *args, **kwargs) -> mx.array:
        self.indices = indices
        k, width = indices.shape[-1], x.shape[-1]
        eye = mx.eye(k, width, dtype=x.dtype) if self.basis else mx.zeros((k, width), x.dtype)
        return mx.broadcast_to(eye, (*indices.shape, width))


def _weights_of(probs: np.ndarray, indices: np.ndarray) -> np.ndarray:
    w = np.take_along_axis(probs, indices, axis=-1)
    return w / w.sum(axis=-1, keepdims=True)


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def probe_scoring(block: nn.Module, switch_path: str, router: nn.Module) -> str | None:
    """"softmax" or "sigmoid": what the block applies to its router's logits; None when the
    router gives its own weights, or the block cannot be probed (another call signature, an
    output that is not a weighted sum of its experts' outputs, top-1 routing, or neither
    function fits the weights it applied)."""
    parent_path, _, name = switch_path.rpartition(".")
    parent = dict(block.named_modules())[parent_path] if parent_path else block
    switch = parent[name]
    linear = _linear_of(router)
    if linear is None:
        return None
    x = (3 * mx.random.normal((1, PROBE_TOKENS, _input_dims(linear)), key=mx.random.key(0))
         ).astype(_float_type(linear))
    if not isinstance(untapped_call(router, x), mx.array):
        return None  # (it gives its own weights: nothing to find)
    outputs, seen = [], None
    try:
        for basis in (False, True):
            probe = _BasisSwitch(basis)
            setattr(parent, name, probe)
            out = block(x)
            out = out[0] if isinstance(out, (tuple, list)) else out
            outputs.append(np.array(out.astype(mx.float32)).reshape(PROBE_TOKENS, -1))
            seen = np.array(probe.indices).reshape(PROBE_TOKENS, -1)
    except Exception:  # (a block called with more than its input, or shapes it cannot take)
        return None
    finally:
        setattr(parent, name, switch)
        router_out = getattr(router, "_hobbit_out", None)
        object.__setattr__(router, "_hobbit_in", None)
        object.__setattr__(router, "_hobbit_out", None)
    if not isinstance(router_out, mx.array) or seen is None or seen.shape[-1] < 2:
        return None
    k = seen.shape[-1]
    applied = outputs[1] - outputs[0]
    if applied.shape[-1] < k or np.abs(applied[:, k:]).max() > _FIT * np.abs(applied).max():
        return None  # (the block transforms the weighted sum: its weights cannot be read off)
    applied = np.abs(applied[:, :k])
    total = applied.sum(axis=-1, keepdims=True)
    if not (total > 0).all():
        return None
    applied = applied / total
    logits = np.array(router_out.astype(mx.float32)).reshape(PROBE_TOKENS, -1)
    fits = {"softmax": _weights_of(_softmax(logits), seen),
            "sigmoid": _weights_of(1 / (1 + np.exp(-logits)), seen)}
    errors = {s: float(np.abs(w - applied).max()) for s, w in fits.items()}
    best, other = sorted(errors, key=errors.get)
    # (a bf16 model's output carries its rounding; the two functions differ far more)
    return best if errors[best] < _CLOSE and errors[best] < errors[other] / 4 else None


def declared_scoring(config: dict, model: nn.Module) -> str:
    """The scoring a config (or, for a key it leaves out, the model's own arguments with their
    defaults) names; softmax when none does."""
    args = [config] + [vars(a) for m in (model, getattr(model, "language_model", None))
                       if m is not None and (a := getattr(m, "args", None)) is not None
                       and hasattr(a, "__dict__")]
    for where in args:
        for key in SCORING_KEYS:
            if where.get(key) in SCORINGS:
                return where[key]
    return "softmax"


def _linear_of(router: nn.Module) -> nn.Module | None:
    """The router's projection: the module (itself or a child) with a 2-D weight."""
    for _, mod in [("", router)] + list(router.named_modules()):
        w = mod.get("weight") if isinstance(mod, dict) else None
        if isinstance(w, mx.array) and w.ndim == 2:
            return mod
    return None


def _input_dims(linear: nn.Module) -> int:
    """What the router's projection takes: its weight's columns, unpacked when quantized."""
    columns = linear["weight"].shape[1]
    return columns * 32 // linear.bits if "scales" in linear else columns


def _float_type(linear: nn.Module) -> mx.Dtype:
    """The model's float type, as the router's projection holds it."""
    return (linear["scales"] if "scales" in linear else linear["weight"]).dtype
