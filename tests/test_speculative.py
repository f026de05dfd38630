"""Self-speculative decoding: greedy output equals exact non-speculative decoding token for token,
the draft reads nothing it does not have to, the KV cache is trimmed, and bad input is refused."""

from __future__ import annotations

import re

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import make_sampler

import hobbit_mlx
from hobbit_mlx.budget import kv_bytes_for
from hobbit_mlx.loader import runtime_of
from hobbit_mlx.measure import kv_bytes_by_layer
from hobbit_mlx.speculative import (AdaptiveK, SpeculativeStats, check_draft_tokens,
                                    speculative_generate_step)

PROMPT = "def fibonacci(n):\n    if n < 2:\n        return n\n"
ARCHS = ["qwen3_moe", "mixtral", "deepseek_v3", "gpt_oss", "olmoe"]


def _empty(rt) -> None:
    rt.settle()
    rt.count_deferred()
    rt.cache.clear()
    rt.cache.reset_policies()


def _plain(model, tok, prompt, n) -> list[int]:
    return [r.token for r in hobbit_mlx.stream_generate(model, tok, prompt, max_tokens=n,
                                                        speculative=False)]


def _spec(model, tok, prompt, n, k, **kw) -> list[int]:
    return [r.token for r in hobbit_mlx.stream_generate(model, tok, prompt, max_tokens=n,
                                                        speculative=k, **kw)]


def _requests_add_up(stats: dict) -> None:
    parts = (stats["hits_high"] + stats["hits_low"] + stats["misses_high"] + stats["misses_low"]
             + stats["skipped"])
    assert parts == stats["expert_requests"] > 0


@pytest.fixture(scope="module")
def reference():
    model, tok = hobbit_mlx.load(None, expert_residency=0.25, exact=True, progress=False)
    yield model, tok
    runtime_of(model).close()


@pytest.mark.parametrize("k", [1, 3])
def test_reference_greedy_identical_to_exact_decoding(reference, k):
    model, tok = reference
    rt = runtime_of(model)
    _empty(rt)
    expected = _plain(model, tok, PROMPT, 48)
    _empty(rt)
    hobbit_mlx.reset_stats(model)
    got = _spec(model, tok, PROMPT, 48, k)
    assert got == expected
    st = rt.speculative_stats
    # drafts were made and some were rejected and some kept: both paths of the loop ran
    assert st.drafted > 0 and 0 < st.accepted < st.drafted
    assert st.emitted >= len(got) == 48
    assert any(st.k_counts.get(j, 0) for j in range(1, k + 1))
    _requests_add_up(hobbit_mlx.offload_stats(model))


def test_a_reused_prompt_cache_holds_what_plain_decoding_leaves(reference):
    """A conversation that reuses ``prompt_cache``: after each turn (ended by max_tokens, or by
    the caller stopping part way through a pass) the cache holds every token yielded, as
    mlx-lm's loop leaves it, so the next turn continues the same sequence."""
    from mlx_lm.models.cache import make_prompt_cache

    model, tok = reference
    out = {}
    for k in (False, 2):
        cache = make_prompt_cache(model)
        turns = [[r.token for r in hobbit_mlx.stream_generate(
            model, tok, prompt, max_tokens=n, speculative=k, prompt_cache=cache)]
            for prompt, n in ((PROMPT, 9), ("\n# more", 8))]
        stream = hobbit_mlx.stream_generate(model, tok, "\nx = ", max_tokens=30,
                                            speculative=k, prompt_cache=cache)
        turns.append([next(stream).token for _ in range(5)])  # stopped part way
        stream.close()
        turns.append([r.token for r in hobbit_mlx.stream_generate(
            model, tok, "\n", max_tokens=6, speculative=k, prompt_cache=cache)])
        out[k] = (turns, cache[0].offset)
    assert out[2] == out[False]


def test_reference_fixed_k_identical_and_counts(reference):
    model, tok = reference
    rt = runtime_of(model)
    _empty(rt)
    expected = _plain(model, tok, PROMPT, 40)
    _empty(rt)
    prompt = mx.array(tok.encode(PROMPT))
    st = SpeculativeStats()
    cache = make_prompt_cache(model)
    out = [t for t, _, _ in speculative_generate_step(
        prompt, model, num_draft_tokens=2, adaptive=False, max_tokens=40, stats=st,
        prompt_cache=cache)]
    assert out == expected
    assert set(st.k_counts) <= {0, 1, 2} and st.k_counts[2] >= st.passes - 2  # (the last
    # passes draft no more than is left to generate)
    assert st.emitted == 40 == st.accepted + st.passes
    # the KV cache holds the prompt and every emitted token (as mlx-lm's loop leaves it),
    # however many drafts were written and trimmed
    assert cache[0].offset == prompt.size + 40


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_models_greedy_identical(tiny_factory, arch):
    _src, dst = tiny_factory(arch)
    model, tok = hobbit_mlx.load(dst, expert_residency=0.3, exact=True, progress=False)
    rt = runtime_of(model)
    try:
        expected = _plain(model, tok, "def main():", 24)
        _empty(rt)
        hobbit_mlx.reset_stats(model)
        got = _spec(model, tok, "def main():", 24, 3)
        assert got == expected
        assert rt.speculative_stats.drafted > 0
        _requests_add_up(hobbit_mlx.offload_stats(model))
    finally:
        rt.close()


@pytest.mark.parametrize("prompt_tokens", [6, 40], ids=["short", "past-the-window"])
def test_a_sliding_window_model_stays_exact_past_its_window(tiny_factory, prompt_tokens):
    """gpt_oss's sliding-window layers keep a rotating cache (a window of 32 tokens here), which
    mlx-lm trims only while it is not full: the drafts rejected after that stayed, and the text
    went wrong (from the first token for a prompt past the window). Drafts now stop where they
    could not be rolled back; mlx-lm's own speculative loop is refused for such a model."""
    _src, dst = tiny_factory("gpt_oss")
    model, tok = hobbit_mlx.load(dst, expert_residency=0.3, exact=True, progress=False)
    rt = runtime_of(model)
    prompt = [(7 * i + 3) % 200 + 1 for i in range(prompt_tokens)]
    try:
        from mlx_lm.models.cache import RotatingKVCache
        windows = {c.max_size for c in make_prompt_cache(model) if isinstance(c, RotatingKVCache)}
        assert windows and max(windows) < prompt_tokens + 50
        expected = _plain(model, tok, prompt, 50)
        _empty(rt)
        assert _spec(model, tok, prompt, 50, 2) == expected
        with pytest.raises(ValueError, match="RotatingKVCache"):
            next(iter(hobbit_mlx.stream_generate(model, tok, prompt, max_tokens=4,
                                                 draft_model=model)))
    finally:
        rt.close()


def test_a_draft_length_past_the_call_the_budget_holds_is_cut_to_it():
    """K drafts and a token run in one call, which must fit the call the budget plans (16
    tokens near the minimum): K=40 failed on the first pass (an adaptive K once it grew there),
    and K=100,000 planned the KV and activations of that many tokens (the pools shrank 8x)."""
    budget = int(hobbit_mlx.footprint(None)["minimum_budget_bytes_exact"] * 1.05)
    model, tok = hobbit_mlx.load(None, memory_budget=budget, exact=True, progress=False,
                                 speculative_adaptive=False)
    rt = runtime_of(model)
    try:
        assert rt.plan.chunk_tokens < 40
        want = _plain(model, tok, PROMPT, 12)
        pools = rt.plan.high_expert_bytes
        for k in (40, 100_000):
            _empty(rt)
            assert _spec(model, tok, PROMPT, 12, k) == want
            assert max(rt.speculative_stats.k_counts) < rt.plan.chunk_tokens
            assert rt.plan.high_expert_bytes > 0.95 * pools  # (planned for 12 tokens, not K)
    finally:
        rt.close()


def test_lossy_defaults_run_with_speculation(deep_models):
    """With the lossy techniques on, verification uses them too (output is not exact there, but
    it runs, counts add up, and the drafts are checked against the same model)."""
    model, tok = hobbit_mlx.load(deep_models("qwen3_moe"), expert_residency=0.25, progress=False)
    try:
        got = _spec(model, tok, PROMPT, 16, 2)
        assert len(got) == 16
        _requests_add_up(hobbit_mlx.offload_stats(model))
    finally:
        runtime_of(model).close()


def test_draft_reads_only_top1_of_tokens_with_nothing_resident(reference):
    """From empty pools, a draft step reads exactly one expert per layer (each token's top-1),
    and every other chosen expert is skipped; with a full cache it reads nothing."""
    model, tok = reference
    rt = runtime_of(model)
    _empty(rt)
    hobbit_mlx.reset_stats(model)
    cache = make_prompt_cache(model)
    rt.draft_only = True
    try:
        mx.eval(model(mx.array(tok.encode("x = 1"))[None][:, -1:], cache=cache))
    finally:
        rt.draft_only = False
    s = hobbit_mlx.offload_stats(model)
    layers = len(rt.layers)
    k = rt.manifest.experts_per_token
    assert s["misses_high"] == layers and s["hits_high"] == 0
    assert s["skipped"] == layers * (k - 1)
    _requests_add_up(s)
    hobbit_mlx.reset_stats(model)
    rt.draft_only = True
    try:  # the same token again: its top-1 experts are resident now, nothing is read
        mx.eval(model(mx.array(tok.encode("x = 1"))[None][:, -1:], cache=cache))
    finally:
        rt.draft_only = False
    s = hobbit_mlx.offload_stats(model)
    assert s["misses_high"] == 0 and s["bytes_read"] == 0 and s["hits_high"] >= layers


def test_draft_with_everything_resident_is_exact(tiny_factory):
    """Nothing to drop: drafting changes nothing (gate weights renormalized over all of them)."""
    _src, dst = tiny_factory("qwen3_moe")
    model, tok = hobbit_mlx.load(dst, expert_residency=1.0, exact=True, progress=False)
    rt = runtime_of(model)
    try:
        ids = mx.array(tok.encode(PROMPT))[None]
        exact = model(ids)
        mx.eval(exact)
        rt.draft_only = True
        rt.trace = []  # (every call synced, so the draft rule runs)
        try:
            drafted = model(ids)
            mx.eval(drafted)
        finally:
            rt.draft_only, rt.trace = False, None
        s = hobbit_mlx.offload_stats(model)
        assert s["skipped"] == 0 and s["misses_high"] == 0
        np.testing.assert_allclose(np.array(drafted), np.array(exact), rtol=0, atol=1e-5)
    finally:
        rt.close()


def test_draft_renormalizes_kept_gate_weights(reference):
    """A draft call keeps only resident experts and scales their outputs by 1 / their share of
    the gate mass: compare with the layer computed by hand from the kept experts."""
    model, tok = reference
    rt = runtime_of(model)
    _empty(rt)
    layer = rt.layers[0]
    flat = np.array([[3, 5, 7, 9, 11, 13, 15, 17]])
    w = np.array([[0.3, 0.2, 0.1, 0.1, 0.1, 0.1, 0.05, 0.05]], dtype=np.float32)
    level, scale = layer._draft_levels(flat, w, None)
    assert (level == 2).sum() == 7 and level[0, 0] == 0  # nothing resident: top-1 only
    assert scale[0, 0] == pytest.approx(1 / 0.3)
    # make experts 5 and 9 resident: they are kept, the rest dropped, weights renormalized
    from hobbit_mlx.offload import Fetch
    f = Fetch(rt, layer.layer, np.array([5, 9]), "high")
    f.finish()
    level, scale = layer._draft_levels(flat, w, None)
    kept = level != 2
    assert kept.tolist() == [[False, True, False, True, False, False, False, False]]
    assert scale[0, 1] == pytest.approx(1 / 0.3) and scale[0, 3] == pytest.approx(1 / 0.3)


def test_sampling_runs_and_uses_the_sampler(reference):
    model, tok = reference
    prompt = mx.array(tok.encode(PROMPT))
    runs = []
    for seed in (0, 1):
        mx.random.seed(seed)
        runs.append([t for t, _, _ in speculative_generate_step(
            prompt, model, num_draft_tokens=2, max_tokens=24, sampler=make_sampler(temp=1.0))])
    assert all(len(r) == 24 for r in runs)
    assert all(0 <= t < model.args.vocab_size for r in runs for t in r)
    assert runs[0] != runs[1]  # the sampler draws them (greedy would repeat itself)
    greedy = _spec(model, tok, PROMPT, 24, 2, sampler=make_sampler(temp=0.0))
    assert greedy == _spec(model, tok, PROMPT, 24, 2)


def test_logits_processors_match_plain_decoding(reference):
    from mlx_lm.sample_utils import make_logits_processors
    model, tok = reference
    procs = make_logits_processors(repetition_penalty=1.5, repetition_context_size=16)
    expected = [r.token for r in hobbit_mlx.stream_generate(
        model, tok, PROMPT, max_tokens=32, speculative=False, logits_processors=procs)]
    got = _spec(model, tok, PROMPT, 32, 3, logits_processors=procs)
    assert got == expected


def test_all_resident_never_drafts(tiny_factory):
    _src, dst = tiny_factory("qwen3_moe")
    model, tok = hobbit_mlx.load(dst, expert_residency=1.0, exact=True, speculative=4,
                                 progress=False)
    try:
        expected = _plain(model, tok, PROMPT, 16)
        got = [r.token for r in hobbit_mlx.stream_generate(model, tok, PROMPT, max_tokens=16)]
        assert got == expected
        st = runtime_of(model).speculative_stats
        assert st.drafted == 0 and st.plain_passes == st.passes > 0
    finally:
        runtime_of(model).close()


def test_load_option_turns_it_on_and_generate_matches(tiny_factory):
    _src, dst = tiny_factory("mixtral")
    model, tok = hobbit_mlx.load(dst, expert_residency=0.3, exact=True, speculative=2,
                                 speculative_adaptive=False, progress=False)
    try:
        text = hobbit_mlx.generate(model, tok, "def main():", max_tokens=20)
        assert runtime_of(model).speculative_stats.drafted > 0
        _empty(runtime_of(model))
        plain = hobbit_mlx.generate(model, tok, "def main():", max_tokens=20, speculative=False)
        assert text == plain
    finally:
        runtime_of(model).close()


@pytest.mark.parametrize("bad", [-1, 2.5, "4"])
def test_k_below_one_is_refused(bad, reference):
    """(0, as False, is off: plain decoding)"""
    with pytest.raises(ValueError, match="K >= 1"):
        check_draft_tokens(bad)
    with pytest.raises(ValueError, match="K >= 1|speculative must be int"):
        hobbit_mlx.LoadOptions(speculative=bad).validate()
    model, tok = reference
    with pytest.raises(ValueError, match="K >= 1"):
        next(iter(hobbit_mlx.stream_generate(model, tok, PROMPT, max_tokens=4, speculative=bad)))


def test_adaptive_k_follows_acceptance_and_cost():
    # drafts always accepted, drafting cheap next to a pass: the longest drafts win
    a = AdaptiveK(4)
    for _ in range(30):
        k = a.next_k(100)
        a.observe(k, k, seconds=1.0 + 0.05 * k, draft_seconds=0.05 * k)
    assert a.k == 4
    # drafts never accepted: plain decoding (0) wins
    b = AdaptiveK(4)
    for _ in range(30):
        k = b.next_k(100)
        b.observe(k, 0, seconds=1.0 + 0.5 * k, draft_seconds=0.5 * k)
    assert b.k == 0
    # never beyond what is left to generate
    assert AdaptiveK(4, adaptive=False).next_k(2) == 2


def test_premise_trace_grouping():
    """bench/speculative.py's trace simulation: decode tokens regrouped K + 1 per layer call."""
    from bench import trace as tr
    from bench.speculative import grouped_trace

    calls = [(0, [[9, 8], [7, 6]]), (1, [[5, 4], [3, 2]]),  # a 2-token prompt chunk
             (0, [0, 1]), (1, [2, 3]), (0, [0, 4]), (1, [2, 5]), (0, [6, 1]), (1, [7, 3])]
    t = tr.from_calls(calls, meta={"num_layers": 2, "num_experts": 10})
    g, tokens, passes = grouped_trace(t, 2)
    assert (tokens, passes) == (3, 2)
    assert g.phase.tolist() == [0, 0, 1, 1, 1, 1]
    assert g.call(2).tolist() == [[0, 1], [0, 4]] and g.call(3).tolist() == [[2, 3], [2, 5]]
    assert g.call(4).tolist() == [[6, 1]] and g.call(5).tolist() == [[7, 3]]
    # nothing accepted: every pass keeps one token, and verifies the next ones again
    g, tokens, passes = grouped_trace(t, 3, accept=0.0, k=2)
    assert (tokens, passes) == (3, 3)
    assert [len(g.call(i)) for i in range(2, len(g))] == [3, 3, 2, 2, 1, 1]


# --- a separate draft model -------------------------------------------------------------------
def _dense_draft(out, vocab_size: int):
    """A tiny random dense llama with the tiny models' tokenizer (trained for ``vocab_size``)."""
    from mlx_lm.models import llama
    from mlx_lm.utils import save_config, save_model

    from hobbit_mlx.testing.tiny_models import make_tokenizer

    config = dict(model_type="llama", hidden_size=64, num_hidden_layers=1, intermediate_size=128,
                  num_attention_heads=2, num_key_value_heads=2, rms_norm_eps=1e-5,
                  vocab_size=vocab_size, tie_word_embeddings=True)
    mx.random.seed(1)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    mx.eval(model.parameters())
    out.mkdir(parents=True, exist_ok=True)
    save_model(out, model)
    save_config(config, config_path=out / "config.json")
    make_tokenizer(out, vocab_size)
    return out


@pytest.fixture(scope="module")
def dense_draft(tmp_path_factory):
    from hobbit_mlx.testing.tiny_models import VOCAB_SIZE
    return _dense_draft(tmp_path_factory.mktemp("draft"), VOCAB_SIZE)


def test_draft_model_greedy_identical(tiny_factory, dense_draft):
    _src, dst = tiny_factory("qwen3_moe")
    model, tok = hobbit_mlx.load(dst, expert_residency=0.3, exact=True, draft_model=str(dense_draft),
                                 progress=False)
    rt = runtime_of(model)
    try:
        assert rt.draft_model is not None and rt.draft_bytes > 0
        plain = _plain(model, tok, "def main():", 24)
        drafted = [r for r in hobbit_mlx.stream_generate(model, tok, "def main():", max_tokens=24)]
        assert [r.token for r in drafted] == plain
        assert rt.speculative_stats.drafted > 0  # the draft was consulted (an untrained one
        # is seldom accepted, and the adaptive length then falls back to plain passes)
    finally:
        rt.close()


@pytest.mark.parametrize("adaptive", [True, False])
def test_a_draft_models_draft_length_adapts(tiny_factory, dense_draft, adaptive):
    """An untrained draft is rarely right: the adaptive length falls back to plain passes (K = 0),
    where the draft's cache catches up later; a fixed length drafts K every pass. Either way the
    tokens are the plain ones."""
    _src, dst = tiny_factory("qwen3_moe")
    model, tok = hobbit_mlx.load(dst, expert_residency=0.3, exact=True, speculative=3,
                                 speculative_adaptive=adaptive, draft_model=str(dense_draft),
                                 progress=False)
    rt = runtime_of(model)
    try:
        plain = _plain(model, tok, "def main():", 48)
        out = [r.token for r in hobbit_mlx.stream_generate(model, tok, "def main():", max_tokens=48)]
        assert out == plain
        stats = rt.speculative_stats
        assert stats.drafted > 0
        if adaptive:
            assert stats.plain_passes > 0 and len(stats.k_counts) > 1
        else:  # (but for the last passes, which may draft only as many as are left to emit)
            assert stats.k_counts[3] >= stats.passes - 3 and not stats.plain_passes > 3
    finally:
        rt.close()


def test_draft_model_is_left_out_when_every_expert_is_resident(tiny_factory, dense_draft):
    """Nothing is read, so a verify pass only adds compute (the reference model with its trained
    draft decoded at 0.6x plain, resident on this CPU): plain decoding, the same tokens."""
    _src, dst = tiny_factory("qwen3_moe")
    model, tok = hobbit_mlx.load(dst, expert_residency=1.0, exact=True,
                                 draft_model=str(dense_draft), progress=False)
    rt = runtime_of(model)
    try:
        assert rt.cache.all_high_resident and rt.speculative[0] > 0
        plain = _plain(model, tok, "def main():", 24)
        out = list(hobbit_mlx.stream_generate(model, tok, "def main():", max_tokens=24))
        assert [r.token for r in out] == plain and not any(r.from_draft for r in out)
    finally:
        rt.close()


def test_draft_model_with_another_tokenizer_is_refused(tiny_factory, tmp_path):
    _src, dst = tiny_factory("qwen3_moe")
    other = _dense_draft(tmp_path / "other", 300)
    with pytest.raises(ValueError, match="tokenizer differs"):
        hobbit_mlx.load(dst, expert_residency=0.3, draft_model=str(other), progress=False)


def test_budget_too_small_for_the_draft_states_the_minimum(tiny_factory, dense_draft):
    from hobbit_mlx.speculative import load_draft
    _src, dst = tiny_factory("qwen3_moe")
    own_min = hobbit_mlx.footprint(dst)["minimum_budget_bytes_exact"]
    draft_bytes = load_draft(dense_draft)[2]
    budget = own_min + draft_bytes // 2  # enough for the model alone, not with the draft
    alone = hobbit_mlx.load(dst, memory_budget=budget, exact=True, progress=False)[0]
    own = runtime_of(alone).plan
    runtime_of(alone).close()
    with pytest.raises(hobbit_mlx.BudgetError, match="with its draft model") as e:
        hobbit_mlx.load(dst, memory_budget=budget, exact=True, draft_model=str(dense_draft),
                        progress=False)
    stated = int(re.search(r"needs at least [^(]*\((\d+) bytes\)", str(e.value)).group(1))
    # the draft's weights, and its KV cache beside the model's (a first KV step of both, while
    # the largest layer of either grows)
    draft_kv = kv_bytes_by_layer(load_draft(dense_draft)[0])
    both = kv_bytes_for(1, own.kv_bytes_per_token + sum(draft_kv),
                        max(own.kv_layer_bytes_per_token, *draft_kv))
    assert stated - own_min - draft_bytes == both - own.kv_bytes(1) > 0
    # the minimum it states runs, and the budget reported is the one given (draft included)
    model, _ = hobbit_mlx.load(dst, memory_budget=stated, exact=True,
                               draft_model=str(dense_draft), progress=False)
    assert hobbit_mlx.offload_stats(model)["budget_bytes"] == stated
    runtime_of(model).close()


def test_the_draft_models_kv_cache_is_inside_the_budget(tiny_factory, dense_draft):
    from hobbit_mlx.speculative import load_draft
    _src, dst = tiny_factory("qwen3_moe")
    model, _ = hobbit_mlx.load(dst, expert_residency=0.3, exact=True, progress=False)
    own = runtime_of(model).plan.kv_bytes_per_token
    runtime_of(model).close()
    model, _ = hobbit_mlx.load(dst, expert_residency=0.3, exact=True, draft_model=str(dense_draft),
                               progress=False)
    assert runtime_of(model).plan.kv_bytes_per_token == \
        own + sum(kv_bytes_by_layer(load_draft(dense_draft)[0]))
    runtime_of(model).close()


def test_generate_cli_speculative(tiny_factory, tmp_path, capsys):
    import importlib
    import json

    from hobbit_mlx import cli_common

    generate = importlib.import_module("hobbit_mlx.generate")
    _src, dst = tiny_factory("qwen3_moe")
    base = ["--model", str(dst), "--prompt", "def main():", "--max-tokens", "12", "--exact",
            "--expert-residency", "0.3", "--ignore-chat-template"]
    assert cli_common.run(generate.main, [*base, "--speculative", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "--speculative" in err
    assert cli_common.run(generate.main, [*base, "--speculative", "2", "--speculative-fixed",
                                          "--stats-json", str(tmp_path / "s.json")]) == 0
    out = capsys.readouterr()
    assert "Speculative: " in out.err
    stats = json.loads((tmp_path / "s.json").read_text())
    assert stats["speculative"] == 2 and stats["speculation"]["drafted"] > 0
    assert cli_common.run(generate.main, base) == 0
    assert capsys.readouterr().out == out.out  # greedy text unchanged


def test_adaptive_k_recovers_from_one_slow_pass():
    """One pass slowed by the machine (here the first plain one) does not lock a length out:
    lengths are timed by the median of their last passes and the stalest one is tried again."""
    a = AdaptiveK(4)
    a.observe(0, 0, seconds=10.0, draft_seconds=0.0)  # an outlier
    for _ in range(80):
        k = a.next_k(100)
        a.observe(k, 0, seconds=1.0 + 0.6 * k, draft_seconds=0.6 * k)  # drafts never kept
    assert a.k == 0
    assert a.seconds[0] == pytest.approx(1.0)


def test_a_model_whose_cache_cannot_roll_back_is_refused_at_load(tiny_factory, capsys):
    """nemotron_h's recurrent layers keep an ArraysCache, which speculation cannot roll back: the
    load says so (it failed at the first reply, a traceback from the CLIs)."""
    import importlib

    from hobbit_mlx.cli_common import run

    generate_cli = importlib.import_module("hobbit_mlx.generate")

    _src, dst = tiny_factory("nemotron_h")
    with pytest.raises(ValueError, match="ArraysCache cannot do"):
        hobbit_mlx.load(dst, expert_residency=0.3, speculative=2, progress=False)
    code = run(generate_cli.main, ["--model", str(dst), "--expert-residency", "0.3",
                                   "--speculative", "2", "--prompt", "hi", "--max-tokens", "4"])
    err = capsys.readouterr().err
    assert code == 2 and "rolls back the KV cache" in err and "Traceback" not in err
    model, _ = hobbit_mlx.load(dst, expert_residency=0.3, progress=False)  # (without: it loads)
    runtime_of(model).close()
