"""Exact mode equals mlx-lm on the same 4-bit checkpoint, for every architecture, at any budget."""

from __future__ import annotations

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from mlx_lm.utils import load_model

import hobbit_mlx
from hobbit_mlx.loader import runtime_of
from hobbit_mlx.testing.tiny_models import TINY_ARCHS

PROMPT = [[(7 * i + 3) % 200 + 1 for i in range(40)]]  # 40 tokens x top-k >= 64: mlx-lm's sorted path


def _reference(src):
    model, _ = load_model(src)
    model.set_dtype(mx.float32)
    return model


@pytest.mark.parametrize("arch", sorted(TINY_ARCHS))
def test_logits_equal_mlx_lm_below_full_residency(tiny_factory, arch):
    src, dst = tiny_factory(arch)
    ref = _reference(src)
    tokens = mx.array(PROMPT)
    try:
        expected = ref(tokens)
        mx.eval(expected)
    except RuntimeError as e:  # some mlx-lm models use Metal-only kernels
        pytest.skip(f"mlx-lm itself cannot run {arch} on this backend: {e}")
    model, _ = hobbit_mlx.load(dst, expert_residency=0.25, exact=True, progress=False)
    got = model(tokens)
    np.testing.assert_allclose(np.array(got), np.array(expected), rtol=0, atol=1e-5)
    stats = hobbit_mlx.offload_stats(model)
    assert stats["misses_high"] > 0
    assert stats["resident_expert_bytes"] <= stats["expert_cache_bytes"]
    assert stats["expert_cache_bytes"] < 0.3 * runtime_of(model).manifest.expert_bytes("high")


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral", "deepseek_v3", "gpt_oss"])
def test_greedy_generation_identical(tiny_factory, arch):
    src, dst = tiny_factory(arch)
    ref, tok = mlx_lm.load(str(src))
    ref.set_dtype(mx.float32)
    expected = mlx_lm.generate(ref, tok, "def main():", max_tokens=24)
    model, tokenizer = hobbit_mlx.load(dst, expert_residency=0.4, exact=True, progress=False)
    got = hobbit_mlx.generate(model, tokenizer, "def main():", max_tokens=24)
    assert got == expected
    stats = hobbit_mlx.offload_stats(model)
    assert stats["hits_high"] > 0 and stats["misses_high"] > 0
    assert stats["peak_memory_bytes"] <= stats["budget_bytes"]


def test_expert_groups_when_pool_is_small(tiny_factory):
    """A chunk needing more experts than the pool has slots runs in groups with the same result."""
    src, dst = tiny_factory("qwen3_moe")
    tokens = mx.array(PROMPT)
    expected = _reference(src)(tokens)
    model, _ = hobbit_mlx.load(dst, expert_residency=0.0, exact=True, progress=False)
    rt = runtime_of(model)
    slots = [ps.pool.slots for ps in rt.cache.pools]
    assert slots == [rt.manifest.experts_per_token]  # the smallest pool: one layer's top-k
    np.testing.assert_array_equal(np.array(model(tokens)), np.array(expected))
    stats = hobbit_mlx.offload_stats(model)
    # each layer needed more experts than the pool holds, so it ran in several groups
    assert stats["misses_high"] > len(rt.manifest.layers) * slots[0]
    assert stats["resident_expert_bytes"] <= stats["expert_cache_bytes"]


def test_float_source_matches_mlx_lm_quantized(tiny_factory, tmp_path):
    """From a float checkpoint, the converter quantizes like mlx_lm.convert does."""
    src, dst = tiny_factory("qwen3_moe", quantize=False)
    ref_dir = tmp_path / "mlx-q4"
    mlx_lm.convert(str(src), str(ref_dir), quantize=True, q_bits=4, q_group_size=64)
    tokens = mx.array(PROMPT)
    expected = _reference(ref_dir)(tokens)
    model, _ = hobbit_mlx.load(dst, expert_residency=0.5, exact=True, progress=False)
    np.testing.assert_allclose(np.array(model(tokens)), np.array(expected), rtol=0, atol=1e-5)


def test_stats_reset_and_hits_on_repeat(tiny_factory):
    _, dst = tiny_factory("olmoe")
    model, _ = hobbit_mlx.load(dst, expert_residency=1.0, exact=True, progress=False)
    runtime_of(model).cache.clear()  # cold: the pools hold every expert but are empty
    tokens = mx.array(PROMPT)
    model(tokens)
    first = hobbit_mlx.offload_stats(model)
    assert first["misses_high"] > 0 and first["bytes_read"] > 0
    hobbit_mlx.reset_stats(model)
    model(tokens)
    second = hobbit_mlx.offload_stats(model)
    assert second["misses_high"] == 0 and second["bytes_read"] == 0
    assert second["hits_high"] == second["expert_requests"] > 0


def test_whole_model_resident_is_preloaded_and_never_syncs(tiny_factory):
    """When the pools hold every expert, load() reads them all (as mlx-lm would) and no layer
    call needs a host sync: mlx-lm's lazy pipelining runs as stock."""
    src, dst = tiny_factory("olmoe")
    tokens = mx.array(PROMPT)
    expected = _reference(src)(tokens)
    model, _ = hobbit_mlx.load(dst, expert_residency=1.0, exact=True, progress=False)
    np.testing.assert_array_equal(np.array(model(tokens)), np.array(expected))
    stats = hobbit_mlx.offload_stats(model)
    assert stats["host_syncs"] == 0 and stats["misses_high"] == 0 and stats["bytes_read"] == 0
    assert stats["layer_calls"] == len(runtime_of(model).manifest.layers)
    assert stats["hits_high"] == stats["expert_requests"] > 0  # counted from the lazy calls


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "deepseek_v3"])
def test_per_expert_hf_checkpoint_converts_like_mlx_lm(tiny_factory, tmp_path, arch):
    """A Hugging Face checkpoint with one key per expert (bf16) converts through mlx-lm's sanitize."""
    from convert import convert
    from hobbit_mlx.testing.tiny_models import save_hf_per_expert

    src, _ = tiny_factory(arch, quantize=False)
    hf = save_hf_per_expert(src, tmp_path / "hf", dtype=mx.bfloat16)
    ref_dir = tmp_path / "mlx-q4"
    mlx_lm.convert(str(hf), str(ref_dir), quantize=True, q_bits=4, q_group_size=64)
    dst = convert(hf, tmp_path / "hobbit", progress=False)
    tokens = mx.array(PROMPT)
    expected = _reference(ref_dir)(tokens)
    model, _ = hobbit_mlx.load(dst, expert_residency=0.3, exact=True, progress=False)
    np.testing.assert_allclose(np.array(model(tokens)), np.array(expected), rtol=0, atol=1e-5)


def test_a_token_whose_top_k_repeats_a_missing_expert(tiny_factory):
    """longcat_flash maps its zero experts to index 0, so a decode token's top-k can hold one
    expert twice. Exact mode must give mlx-lm's switch output for such rows whether or not the
    expert is resident (a repeated miss was read into two slots, and the output was wrong)."""
    src, dst = tiny_factory("qwen3_moe")
    ref = dict(_reference(src).named_modules())
    model, _ = hobbit_mlx.load(dst, expert_residency=0.25, exact=True, progress=False)
    rt = runtime_of(model)
    mx.random.seed(0)
    checked_misses = 0
    for switch in rt.layers:
        x = mx.random.normal((1, 1, model.args.hidden_size))
        for row in ([[3, 5]], [[5, 5]], [[0, 0]], [[6, 6]], [[1, 7]], [[2, 2]], [[7, 7]]):
            indices = mx.array(row, dtype=mx.uint32)[None]
            checked_misses += (switch.layer.layer, row[0][0], "high") not in rt.cache
            expected = ref[switch.layer.module_path](x, indices)
            np.testing.assert_array_equal(np.array(switch(x, indices)), np.array(expected))
    assert checked_misses > 0


@pytest.mark.parametrize("copy", [False, True], ids=["in-place", "copy"])
def test_a_quantized_checkpoints_float_experts_stay_float(tmp_path, copy):
    """A quant_predicate that skips some experts (or a group size that does not divide them)
    leaves them float in an mlx-lm checkpoint, and mlx-lm runs them so. They were requantized
    to 4 bits (logits off by 0.07-1.5, greedy text diverged); the high copy now keeps them."""
    import contextlib
    import io

    from convert import convert
    from hobbit_mlx.plan import plan_model
    from hobbit_mlx.store import is_float, load_manifest
    from hobbit_mlx.testing.tiny_models import make_tiny_model

    src = tmp_path / "mlx"
    with contextlib.redirect_stdout(io.StringIO()):
        mlx_lm.convert(str(make_tiny_model("mixtral", tmp_path / "float", quantize=False)),
                       str(src), quantize=True, q_group_size=64, dtype="bfloat16",
                       quant_predicate=lambda path, _: not (".1." in path and "switch" in path))
    dst = convert(src, tmp_path / "hobbit", copy=copy, progress=False)
    manifest = load_manifest(dst)
    kept = [layer.layer for layer in manifest.layers
            if all(is_float(q) for q in layer.precisions["high"].quant.values())]
    assert kept == [1] and not any(is_float(q) for layer in manifest.layers
                                   for q in layer.precisions["low"].quant.values())
    tokens = mx.array(PROMPT)
    expected = _reference(src)(tokens)
    model, _ = hobbit_mlx.load(dst, expert_residency=0.25, exact=True, progress=False)
    np.testing.assert_array_equal(np.array(model(tokens)), np.array(expected))
    assert hobbit_mlx.offload_stats(model)["misses_high"] > 0
    planned = plan_model(str(src), "1GB")  # (plan counts them as the converter stores them)
    assert planned["expert_bytes_high"] == manifest.expert_bytes("high")


@pytest.mark.parametrize("recipe", ["mixed_3_6", "mixed_2_6"])
def test_a_mixed_bit_checkpoint_keeps_every_experts_own_width(tmp_path, recipe):
    """mlx-lm's mixed recipes quantize most experts below the config's nominal 4 bits (and some
    down projections at 6). The high copy keeps each projection as it is, so exact mode computes
    what mlx-lm does (3-bit experts were requantized to 4 bits); a low copy never requantizes a
    projection already at or below its width."""
    import contextlib
    import io

    from convert import convert
    from hobbit_mlx.store import load_manifest
    from hobbit_mlx.testing.tiny_models import make_tiny_model

    src = tmp_path / "mlx"
    with contextlib.redirect_stdout(io.StringIO()):
        mlx_lm.convert(str(make_tiny_model("qwen3_moe", tmp_path / "float", quantize=False)),
                       str(src), quantize=True, q_group_size=64, quant_predicate=recipe)
    dst = convert(src, tmp_path / "hobbit", progress=False)
    tokens = mx.array(PROMPT)
    expected = _reference(src)(tokens)
    model, _ = hobbit_mlx.load(dst, expert_residency=0.25, exact=True, progress=False)
    np.testing.assert_array_equal(np.array(model(tokens)), np.array(expected))
    widths = {p: q["bits"] for layer in load_manifest(dst).layers
              for p, q in layer.precisions["high"].quant.items()}
    assert min(widths.values()) < 4  # the recipe's narrow experts, kept
    for layer in load_manifest(dst).layers:
        high, low = layer.precisions["high"].quant, layer.precisions["low"].quant
        assert all(low[p]["bits"] <= high[p]["bits"] for p in high)
