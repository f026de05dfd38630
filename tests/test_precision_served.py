"""Mixed precision serves each request at the precision its importance asks for, checked per
(token, chosen expert) from a recorded trace of real generations: an important expert
(unimportance <= t1) is always computed from its 4-bit copy, hit or miss, even when its 2-bit copy
is resident; with skip on, an expert beyond t2 is never read for that token: it is computed only
when a copy of it is resident already, or when another token of the call runs it."""

from __future__ import annotations

import numpy as np
import pytest

import hobbit_mlx
from hobbit_mlx import offload
from hobbit_mlx.loader import runtime_of

PROMPT = "def fibonacci(n):\n    if n < 2:\n        return n\n"


def _unimportance(weights: np.ndarray) -> np.ndarray:
    """Per slot: the gate weight of the token's experts ranked above it (ties: lower slot first)."""
    out = np.zeros_like(weights)
    for t, row in enumerate(weights):
        order = sorted(range(len(row)), key=lambda j: -row[j])
        above = 0.0
        for j in order:
            out[t, j] = above
            above += row[j]
    return out


def _served(parts, shape) -> dict:
    """precision -> [tokens, k] mask of the slots a part computes."""
    out = {"high": np.zeros(shape, bool), "low": np.zeros(shape, bool)}
    for precision, _, mask in parts:
        out[precision] |= np.ones(shape, bool) if mask is None else mask
    return out


@pytest.mark.parametrize("options", [
    dict(t1=0.3, t2=0.6, skip=True),
    dict(t1=0.4, t2=0.6, skip=True, prefetch_layers=1, prefetch_low_precision=True,
         prefetch_cost_aware=False),
    dict(t1=0.3, t2=0.9, skip=False, prefill_low_precision=0.0),
], ids=["skip", "prefetch-low", "no-skip"])
def test_each_request_is_served_at_its_precision(deep_models, monkeypatch, options):
    load = lambda: hobbit_mlx.load(deep_models("mixtral"), expert_residency=0.25,  # noqa: E731
                                   mixed_precision=True, big_little=False, upgrade_after=0,
                                   adapt_to_storage=False, progress=False, **options)
    # The experts the prompt's tokens rank first in layer 0 (its first call: the same in any run)
    model, tok = load()
    rt = runtime_of(model)
    rt.trace = []
    hobbit_mlx.generate(model, tok, PROMPT, max_tokens=1)
    layer, flat, weights = rt.trace[0]
    firsts = np.unique(flat[_unimportance(weights) == 0], return_counts=True)
    firsts = firsts[0][np.argsort(-firsts[1], kind="stable")]
    # A fresh run starts with their 2-bit copies resident (in the low pool's free slots), so that
    # an important request meets one at once (by chance alone, two short generations may not)
    model, tok = load()
    rt = runtime_of(model)
    seed = [(layer, int(e), "low") for e in firsts if (layer, int(e), "high") not in rt.cache]
    rt._read_all(seed[:rt.cache.capacity(layer, "low")])
    rt.trace = []  # (layer, indices [N, k], weights [N, k]) of every call
    calls = []  # (layer, indices, parts) of every call, in the same order
    contested = []  # important experts whose 2-bit copy, not their 4-bit one, was resident
    serve = offload.OffloadedSwitch._serve

    def spy(self, flat, level):
        lid = self.layer.layer
        contested.extend(e for e in set(flat[level == 0].tolist())
                         if (lid, e, "low") in rt.cache and (lid, e, "high") not in rt.cache)
        held = np.vectorize(lambda e: rt.has_or_reading(lid, int(e), "high")
                            or rt.has_or_reading(lid, int(e), "low"))(flat)
        parts = serve(self, flat, level)
        calls.append((self.layer.layer, flat.copy(), parts, held))
        return parts

    monkeypatch.setattr(offload.OffloadedSwitch, "_serve", spy)
    for prompt in (PROMPT, PROMPT[::-1]):
        hobbit_mlx.generate(model, tok, prompt, max_tokens=16)
    t1, t2, skip = options["t1"], options["t2"], options["skip"]
    assert len(calls) == len(rt.trace) > 0
    important = skipped = 0
    for (layer, flat, weights), (layer_, flat_, parts, held) in zip(rt.trace, calls):
        assert layer == layer_ and (flat == flat_).all()
        u = _unimportance(weights)
        served = _served(parts, flat.shape)
        must_high = u <= t1
        assert served["high"][must_high].all(), (layer, flat, weights, parts)
        assert not served["low"][must_high].any()
        important += int(must_high.sum())
        dropped = u > t2
        if skip:  # a miss beyond t2 is skipped; a resident expert is computed, and so is one
            # that another token of the call runs (it is read anyway)
            runs = np.isin(flat, flat[~dropped]) if len(flat) > 1 else np.zeros_like(held)
            held = held | runs
            assert not (served["high"] | served["low"])[dropped & ~held].any()
            assert (served["high"] | served["low"])[dropped & held].all()
            skipped += int((dropped & ~held).sum())
        else:
            assert (served["high"] | served["low"]).all()
    stats = hobbit_mlx.offload_stats(model)
    assert important > 0 and stats["misses_low"] > 0  # both precisions were in play
    assert contested, "no important expert found only its 2-bit copy resident"
    assert skipped > 0 if skip else stats["skipped"] == 0
