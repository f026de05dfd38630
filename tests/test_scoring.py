"""The gate weights the lossy techniques read are the ones the MoE block applies: softmax or
sigmoid of the router's logits, found by probing the block (``hobbit_mlx/scoring.py``)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import hobbit_mlx
from hobbit_mlx.loader import runtime_of
from hobbit_mlx.offload import router_block
from hobbit_mlx.routing import gate_weights, normalized, untapped_call
from hobbit_mlx.scoring import declared_scoring, probe_scoring


def _probe(model):
    rt = runtime_of(model)
    modules = dict(model.named_modules())
    layer = rt.layers[0]
    path, router = router_block(model, modules, layer.layer)
    return probe_scoring(modules[path], layer.layer.module_path[len(path) + 1:], router), router


# Klear, lfm2_moe and minimax_m3_vl apply sigmoid in their code, named by no config key: read as
# softmax, their even weights looked peaked and the techniques read, skipped and dropped far more
@pytest.mark.parametrize("arch,scoring", [("Klear", "sigmoid"), ("lfm2_moe", "sigmoid"),
                                          ("minimax_m3_vl", "sigmoid"), ("qwen3_moe", "softmax"),
                                          ("mixtral", "softmax")])
def test_the_probe_finds_what_the_block_applies(tiny_factory, arch, scoring):
    _, dst = tiny_factory(arch)
    model, _ = hobbit_mlx.load(dst, expert_residency=0.5, progress=False)
    probed, router = _probe(model)
    assert probed == scoring and runtime_of(model).scoring == scoring
    # the probe leaves the model as it was: its switch modules back, its router's tap empty
    assert router._hobbit_out is None
    assert all(dict(model.named_modules())[layer.layer.module_path] is layer
               for layer in runtime_of(model).layers)


def test_gate_weights_under_the_probed_scoring_are_the_blocks(tiny_factory):
    """lfm2_moe: the normalized weights read from the router's logits equal the sigmoid weights
    the block combines its experts with, and differ from softmax's."""
    _, dst = tiny_factory("lfm2_moe")
    model, _ = hobbit_mlx.load(dst, expert_residency=0.5, progress=False)
    router = runtime_of(model).layers[0].router
    x = 3 * mx.random.normal((1, 4, router.weight.shape[1] * 32 // router.bits),
                             key=mx.random.key(1))
    logits = untapped_call(router, x)
    inds = mx.argpartition(-logits, 3, axis=-1)[..., :4]
    sig = normalized(gate_weights(logits, inds, "sigmoid"), (4, 4))
    soft = normalized(gate_weights(logits, inds, "softmax"), (4, 4))
    chosen = np.take_along_axis(np.array(logits).reshape(4, -1), np.array(inds).reshape(4, 4), -1)
    want = 1 / (1 + np.exp(-chosen))
    np.testing.assert_allclose(sig, want / want.sum(-1, keepdims=True), rtol=1e-5)
    assert np.abs(soft - sig).max() > 0.05


def test_a_block_the_probe_cannot_read_falls_back_to_what_the_model_names(tiny_factory):
    """kimi_k3 normalizes the weighted sum of its experts, so its weights cannot be read off the
    block's output; its arguments name sigmoid (a default, not in config.json)."""
    _, dst = tiny_factory("kimi_k3")
    model, _ = hobbit_mlx.load(dst, expert_residency=0.5, progress=False)
    probed, _ = _probe(model)
    assert probed is None
    assert runtime_of(model).scoring == "sigmoid" == declared_scoring({}, model)
    assert declared_scoring({"score_function": "sigmoid"}, None) == "sigmoid"
    assert declared_scoring({}, None) == "softmax"
