"""A quantized KV cache (``kv_bits``): the budget plans for it, the output is mlx-lm's with the
same setting, a budget too small for the unquantized context holds the quantized one, and bad
settings are named at load."""

from __future__ import annotations

import importlib

import mlx.core as mx
import mlx_lm
import pytest

import hobbit_mlx
from hobbit_mlx.budget import ContextBudgetError, plan_budget
from hobbit_mlx.loader import runtime_of

KV = dict(kv_bits=4, kv_group_size=32)
PROMPT = "def fibonacci(n):\n    if n < 2:\n        return n\n" * 12
LONG = "".join(f"v{i} = v{i - 1} * {i % 7} + {i % 5}\n" for i in range(1, 70))  # ~1,000 tokens


@pytest.fixture(scope="module")
def wide_heads(tmp_path_factory):
    """A tiny qwen3_moe whose head dimension (32) a group size MLX quantizes with divides (the
    other tiny models' 16 does not), with 16 experts per layer so that half of them stream."""
    from convert import convert
    from hobbit_mlx.testing.tiny_models import make_tiny_model

    root = tmp_path_factory.mktemp("kvq")
    src = make_tiny_model("qwen3_moe", root / "mlx", config_overrides={"head_dim": 32,
                                                                       "num_experts": 16})
    return src, convert(src, root / "hobbit", progress=False)


def _mlx_lm_text(src, prompt: str, max_tokens: int, **kw) -> str:
    ref, tokenizer = mlx_lm.load(str(src))
    ref.set_dtype(mx.float32)
    return mlx_lm.generate(ref, tokenizer, prompt, max_tokens=max_tokens, **kw)


def test_offloading_with_a_quantized_kv_cache_gives_mlx_lms_text(wide_heads):
    """Exact mode, half the experts streamed, a 4-bit KV cache: mlx-lm's text with the same KV
    setting (and the same prefill chunks: the quantization depends on them)."""
    src, store = wide_heads
    model, tokenizer = hobbit_mlx.load(store, expert_residency=0.5, exact=True, progress=False,
                                       **KV)
    got = hobbit_mlx.generate(model, tokenizer, PROMPT, max_tokens=24, prefill_step_size=16)
    stats = hobbit_mlx.offload_stats(model)
    assert stats["misses_high"] > 0  # experts were read
    assert got == _mlx_lm_text(src, PROMPT, 24, prefill_step_size=16, quantized_kv_start=0, **KV)
    assert got != _mlx_lm_text(src, PROMPT, 24, prefill_step_size=16)  # (it did quantize)


def test_a_budget_too_small_for_the_context_holds_it_quantized(wide_heads):
    """At a budget whose unquantized KV cannot hold the prompt, the 4-bit one can, and the run
    stays within the budget; where both hold it, the quantized plan leaves the pools more."""
    _, store = wide_heads
    plain, tokenizer = hobbit_mlx.load(store, memory_budget="2.2MB", exact=True, progress=False)
    n = len(tokenizer.encode(LONG))
    assert runtime_of(plain).plan.max_context() < n
    with pytest.raises(ContextBudgetError):
        hobbit_mlx.generate(plain, tokenizer, LONG, max_tokens=8)
    model, tokenizer = hobbit_mlx.load(store, memory_budget="2.2MB", exact=True, progress=False,
                                       **KV)
    assert runtime_of(model).plan.max_context() > n
    assert hobbit_mlx.generate(model, tokenizer, LONG, max_tokens=8)
    stats = hobbit_mlx.offload_stats(model)
    assert 0 < stats["peak_memory_bytes"] <= stats["budget_bytes"]

    pools = {}  # a context whose unquantized KV leaves the pools short of every expert
    for kv in ({}, KV):
        m, _ = hobbit_mlx.load(store, memory_budget="1.5MB", exact=True, progress=False,
                               max_context=512, **kv)
        assert runtime_of(m).plan.kv_tokens >= 512
        pools[bool(kv)] = runtime_of(m).plan.high_expert_bytes
    assert pools[False] < runtime_of(m).plan.all_high_bytes
    assert pools[True] > pools[False]


def test_the_plan_counts_the_unquantized_cache_until_the_switch():
    """Below ``quantized_kv_start`` the cache is counted unquantized; from there on, the
    quantized cache, never below the switch (both copies held at once); never decreasing."""
    common = dict(dense_bytes=1000, activation_points=[(16, 1000), (64, 4000)],
                  kv_bytes_per_token=1024, all_high_bytes=10 ** 6, min_high_bytes=1000,
                  min_low_bytes=0, mixed_precision=False, memory_budget=10 ** 7,
                  kv_layer_bytes_per_token=512)
    plain = plan_budget(**common)
    quant = plan_budget(**common, kv_quantized=(256, 128, 1000))
    assert quant.kv_bytes(999) == plain.kv_bytes(999)
    at = quant.kv_bytes(1000)
    assert at >= plain.kv_bytes(1000 + 64 - 1)
    assert quant.kv_bytes(20000) < plain.kv_bytes(20000)
    sizes = [quant.kv_bytes(t) for t in range(0, 30000, 97)]
    assert sizes == sorted(sizes)
    assert quant.max_context() > 3 * plain.max_context()


def test_bad_kv_settings_are_named(wide_heads, tiny_factory):
    _, store = wide_heads
    cases = [(dict(kv_bits=7), "kv_bits 7"), (dict(kv_bits=4, kv_group_size=33), "kv_group_size 33"),
             (dict(kv_bits=4, kv_group_size=32, quantized_kv_start=-1), "quantized_kv_start"),
             (dict(kv_bits=4, kv_group_size=32, speculative=2), "speculative"),
             (dict(kv_bits=4), "kv_group_size 64 does not divide this model's head dimension 32: "
                               "kv_group_size 32 would")]
    for options, needle in cases:
        with pytest.raises(ValueError, match=needle):
            hobbit_mlx.load(store, expert_residency=0.5, progress=False, **options)
    _, narrow = tiny_factory("qwen3_moe")  # head dimension 16
    with pytest.raises(ValueError, match="no group size MLX quantizes with does"):
        hobbit_mlx.load(narrow, progress=False, kv_bits=4, kv_group_size=32)

    model, tokenizer = hobbit_mlx.load(store, expert_residency=0.5, progress=False, **KV)
    with pytest.raises(TypeError, match="load option"):
        hobbit_mlx.generate(model, tokenizer, "hi", max_tokens=2, kv_bits=8)
    assert hobbit_mlx.generate(model, tokenizer, "hi", max_tokens=2, **KV)  # the same: fine
    plain, tokenizer = hobbit_mlx.load(store, expert_residency=0.5, progress=False)
    with pytest.raises(TypeError, match="load option"):
        hobbit_mlx.generate(plain, tokenizer, "hi", max_tokens=2, kv_bits=4)


def test_kv_settings_that_would_do_nothing_are_refused(wide_heads):
    """A tuning flag without --kv-bits, ``kv_bits=True``, and a per-call start or group size
    other than load's (they were ignored, or replaced by load's without a word)."""
    from hobbit_mlx.cli_common import CLIError
    from hobbit_mlx.cli_flags import load_options
    from hobbit_mlx.plan import main as plan_main

    parser = importlib.import_module("hobbit_mlx.generate").setup_arg_parser()
    for flags in (["--kv-group-size", "32"], ["--quantized-kv-start", "100"]):
        with pytest.raises(CLIError, match="give --kv-bits too"):
            load_options(parser.parse_args(flags))
        assert plan_main([str(wide_heads[1]), *flags]) == 2
    with pytest.raises(ValueError, match="kv_bits .*True"):
        hobbit_mlx.load(wide_heads[1], progress=False, kv_bits=True, kv_group_size=32)
    model, tokenizer = hobbit_mlx.load(wide_heads[1], expert_residency=0.5, progress=False, **KV)
    for kw in (dict(quantized_kv_start=5), dict(kv_group_size=64)):
        with pytest.raises(TypeError, match="load option"):
            hobbit_mlx.generate(model, tokenizer, "hi", max_tokens=2, **kw)


def test_cli_flags_reach_load():
    from hobbit_mlx.cli_flags import load_options

    cli_generate = importlib.import_module("hobbit_mlx.generate")  # (not the function)
    args = cli_generate.setup_arg_parser().parse_args(
        ["--kv-bits", "8", "--kv-group-size", "32", "--quantized-kv-start", "100"])
    o = load_options(args)
    assert (o.kv_bits, o.kv_group_size, o.quantized_kv_start) == (8, 32, 100)


def test_a_later_start_loads_where_the_unquantized_cache_does(wide_heads):
    """With ``quantized_kv_start`` past the start of the context, the switch (both copies held
    at once) is counted for the chunk that crosses it: a budget that loads unquantized loads
    (it failed at load: the plan fitted a context for 1-token calls, then 16-token ones), with
    the context below the start that it holds, and runs within it."""
    _, store = wide_heads
    model, tokenizer = hobbit_mlx.load(store, memory_budget="2MB", exact=True, progress=False,
                                       quantized_kv_start=500, **KV)
    plan = runtime_of(model).plan
    assert 300 < plan.kv_tokens < 500  # (past the start the switch does not fit)
    assert hobbit_mlx.generate(model, tokenizer, tokenizer.encode(LONG)[:280], max_tokens=8)
    stats = hobbit_mlx.offload_stats(model)
    assert 0 < stats["peak_memory_bytes"] <= stats["budget_bytes"]


def test_mlx_lms_generate_must_quantize_as_loaded(wide_heads):
    """mlx-lm's own ``generate`` works on the model when it quantizes the KV cache as loaded;
    without ``kv_bits`` it is refused at its second call (it ran at 2.2x the budget before: the
    budget had planned for the quantized cache)."""
    from hobbit_mlx.budget import BudgetError

    _, store = wide_heads
    model, tokenizer = hobbit_mlx.load(store, expert_residency=0.5, exact=True, progress=False,
                                       **KV)
    with pytest.raises(BudgetError, match="does not quantize it"):
        mlx_lm.generate(model, tokenizer, PROMPT, max_tokens=4, prefill_step_size=16)
    # (mlx-lm's default quantized_kv_start is 5000; the model's is 0)
    assert mlx_lm.generate(model, tokenizer, PROMPT, max_tokens=4, prefill_step_size=16,
                           quantized_kv_start=0, **KV)
