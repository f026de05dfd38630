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


def in_float32(router_out):
    """A router's output with its floats cast to float32, lazily: built before the layer's host
    sync, the cast is evaluated in it, and the host copies after it wait for nothing (on a bf16
    model a cast made after the sync is a second round trip to the GPU, queued behind its work)."""
    inds, values = _split_output(router_out)
    if values is None or values.dtype == mx.float32:
        return router_out
    return values.astype(mx.float32) if inds is None else (inds, values.astype(mx.float32))


def gate_weights(router_out, indices: mx.array, scoring: str = "softmax") -> mx.array | None:
    """The gate weights of the chosen experts, lazily (shape ``indices.shape``, not normalized);
    None when the router gives none. Evaluated together with the indices: one host sync."""
    inds, values = _split_output(router_out)
    if values is None:
        return None
    if inds is not None:  # the router already gave the weights of its choices
        return mx.abs(values.astype(mx.float32)).reshape(indices.shape)
    logits = values.astype(mx.float32)
    probs = mx.sigmoid(logits) if scoring == "sigmoid" else mx.softmax(logits, axis=-1)
    probs = probs.reshape(-1, probs.shape[-1])
    return mx.take_along_axis(probs, indices.reshape(probs.shape[0], -1), axis=-1).reshape(indices.shape)


def normalized(weights: mx.array | None, shape: tuple) -> np.ndarray:
    """Host copy of ``gate_weights`` with each row summing to 1 (uniform when there are none)."""
    if weights is None:
        return np.full(shape, 1.0 / shape[-1], dtype=np.float32)
    w = np.array(weights).reshape(shape)
    total = w.sum(axis=-1, keepdims=True)
    return w / np.where(total > 0, total, 1.0)


def top_predictions(logits: np.ndarray, width: int,
                    scoring: str = "softmax") -> tuple[np.ndarray, np.ndarray]:
    """Each row's ``width`` largest logits, best first: (indices, their weights as the block
    would apply them, normalized: softmax over those logits, or their sigmoids)."""
    logits = logits.reshape(-1, logits.shape[-1])
    width = min(width, logits.shape[-1])
    ind = np.argpartition(-logits, width - 1, axis=-1)[:, :width]
    z = np.take_along_axis(logits, ind, axis=-1)
    order = np.argsort(-z, axis=-1, kind="stable")
    ind, z = np.take_along_axis(ind, order, axis=-1), np.take_along_axis(z, order, axis=-1)
    w = 1 / (1 + np.exp(-z)) if scoring == "sigmoid" else np.exp(z - z[:, :1])
    return ind, w / w.sum(axis=-1, keepdims=True)


def router_logits(router_out) -> np.ndarray | None:
    """Host copy of a router's logits, ``[N, E]``; None for routers that make their own choice."""
    inds, values = _split_output(router_out)
    if inds is not None:
        return None
    return np.array(values.astype(mx.float32)).reshape(-1, values.shape[-1])


def predictions_from(router_out, width: int,
                     scoring: str = "softmax") -> tuple[np.ndarray, np.ndarray]:
    """(top-``width`` indices, weights) per row of a router's output (logits, or the finished
    choice of routers that make one — DeepSeek, GLM, ...: those predict their own top-k)."""
    inds, values = _split_output(router_out)
    if inds is None:
        return top_predictions(router_logits(router_out), width, scoring)
    ind = np.array(inds).reshape(-1, inds.shape[-1])
    w = np.abs(np.array(values.astype(mx.float32))).reshape(ind.shape) if values is not None \
        else np.ones(ind.shape, np.float32)
    return ind, w / w.sum(axis=-1, keepdims=True)


def _is_plain_linear(router: nn.Module) -> bool:
    return getattr(router, "_hobbit_untapped", type(router)) in (nn.Linear, nn.QuantizedLinear)


def _linear_kind(router: nn.Module) -> tuple:
    quant = (router.group_size, router.bits, router.mode) if isinstance(router, nn.QuantizedLinear) \
        else None
    return (quant, tuple(sorted(router.keys())), router.weight.shape[1:], router.weight.dtype)


class StackedGates:
    """The routers of the next few layers as one matmul over the same gate input.

    Prefetch applies every later layer's gate to the current layer's gate input; with the gates
    stacked that is one matmul per layer instead of one per layer ahead (their results join the
    layer's one host sync). Only plain linear gates (logits out, same quantization) stack; other
    routers are called one by one.
    """

    def __init__(self, routers: list[nn.Module]):
        first = routers[0]
        self.sizes = [r.weight.shape[0] for r in routers]
        self.quant = _linear_kind(first)[0]
        self.arrays = {name: mx.concatenate([r[name] for r in routers], axis=0)
                       for name in ("weight", "scales", "biases", "bias") if name in first}
        mx.eval(self.arrays)

    @classmethod
    def of(cls, routers: list[nn.Module | None]) -> "StackedGates | None":
        if len(routers) < 2 or not all(r is not None and _is_plain_linear(r) for r in routers):
            return None
        if len({_linear_kind(r) for r in routers}) != 1:
            return None
        return cls(routers)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())

    def __call__(self, x: mx.array) -> list[mx.array]:
        """Each stacked router's logits for ``x`` (lazy: evaluate them with the layer's indices)."""
        a = self.arrays
        if self.quant is not None:
            group_size, bits, mode = self.quant
            y = mx.quantized_matmul(x, a["weight"], a["scales"], a.get("biases"), transpose=True,
                                    group_size=group_size, bits=bits, mode=mode)
        else:
            y = x @ a["weight"].T
        if "bias" in a:
            y = y + a["bias"]
        return mx.split(y, np.cumsum(self.sizes)[:-1].tolist(), axis=-1)
