"""Reading the router: gate weights of the chosen experts, and predicting a later layer's choice.

mlx-lm MoE blocks call their router (a child named ``gate`` or ``router``) on the block input and
then the switch module with the chosen indices. We tap the router in place — its class is swapped
for a subclass that records its input and output — so parameter names and mlx-lm's code stay
untouched. What a router returns differs by architecture: logits over all experts (Mixtral, Qwen,
OLMoE, gpt-oss, ...) or the finished ``(indices, weights)`` pair (DeepSeek, GLM, Granite); both
give the normalized weights of the chosen experts (HOBBIT's importance) and, applied to an earlier
layer's input, a prediction of which experts a later layer will choose (HOBBIT/Fate prefetch).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

ROUTER_NAMES = ("gate", "router")
_TAPPED: dict[type, type] = {}


def find_router(block: nn.Module, num_experts: int) -> nn.Module | None:
    """The router child of an MoE block: a gate/router module with an [E, hidden] weight inside."""
    for name in ROUTER_NAMES:
        child = block.get(name) if isinstance(block, dict) else None
        if not isinstance(child, nn.Module):
            continue
        for _, mod in [("", child)] + list(child.named_modules()):
            w = mod.get("weight") if isinstance(mod, dict) else None
            if isinstance(w, mx.array) and w.ndim == 2 and w.shape[0] == num_experts:
                return child
    return None


def tap_router(router: nn.Module) -> nn.Module:
    """Make ``router`` remember its last input and output (``_hobbit_in`` / ``_hobbit_out``)."""
    cls = type(router)
    if cls not in _TAPPED:
        def __call__(self, x, *args, **kwargs):
            out = cls.__call__(self, x, *args, **kwargs)
            object.__setattr__(self, "_hobbit_in", x)
            object.__setattr__(self, "_hobbit_out", out)
            return out

        _TAPPED[cls] = type(cls.__name__, (cls,), {"__call__": __call__, "_hobbit_untapped": cls})
    router.__class__ = _TAPPED[cls]
    return router


def untapped_call(router: nn.Module, x: mx.array):
    """Run a router without recording (used for predictions)."""
    return router._hobbit_untapped.__call__(router, x)


def _split_output(out) -> tuple[mx.array | None, mx.array | None]:
    """(indices, weights) from a router returning a pair, or (None, logits) from one returning logits."""
    if isinstance(out, (tuple, list)):
        ints = [a for a in out if isinstance(a, mx.array) and not mx.issubdtype(a.dtype, mx.floating)]
        floats = [a for a in out if isinstance(a, mx.array) and mx.issubdtype(a.dtype, mx.floating)]
        return (ints[0] if ints else None), (floats[0] if floats else None)
    return None, out


def chosen_weights(router_out, indices: np.ndarray, scoring: str = "softmax") -> np.ndarray:
    """Normalized gate weights of the chosen experts, shape ``indices.shape`` (each row sums to 1)."""
    inds, values = _split_output(router_out)
    if values is None:
        return np.full(indices.shape, 1.0 / indices.shape[-1], dtype=np.float32)
    if inds is not None:  # the router already gave the weights of its choices
        w = np.abs(np.array(values.astype(mx.float32))).reshape(indices.shape)
    else:
        logits = values.astype(mx.float32)
        probs = mx.sigmoid(logits) if scoring == "sigmoid" else mx.softmax(logits, axis=-1)
        flat = np.array(probs).reshape(-1, probs.shape[-1])
        w = np.take_along_axis(flat, indices.reshape(flat.shape[0], -1), axis=-1).reshape(indices.shape)
    total = w.sum(axis=-1, keepdims=True)
    return w / np.where(total > 0, total, 1.0)


def predict_indices(router: nn.Module, x: mx.array, k: int) -> tuple[np.ndarray, np.ndarray]:
    """A later layer's router applied to this layer's gate input: (top-k indices, their weights)."""
    inds, values = _split_output(untapped_call(router, x))
    if inds is not None:
        ind = np.array(inds).reshape(-1, inds.shape[-1])
        w = np.abs(np.array(values.astype(mx.float32))).reshape(ind.shape) if values is not None \
            else np.ones(ind.shape, np.float32)
    else:
        logits = np.array(values.astype(mx.float32)).reshape(-1, values.shape[-1])
        ind = np.argpartition(-logits, k - 1, axis=-1)[:, :k]
        z = np.take_along_axis(logits, ind, axis=-1)
        w = np.exp(z - z.max(axis=-1, keepdims=True))
    return ind, w / w.sum(axis=-1, keepdims=True)
