"""Layer-major prefill: each layer's experts read once per prompt, with mlx-lm's KV and logits."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import load_model

import hobbit_mlx
from hobbit_mlx import layer_major
from hobbit_mlx.loader import runtime_of
from hobbit_mlx.testing.tiny_models import TINY_ARCHS

PROMPT = [(11 * i + 5) % 200 + 1 for i in range(50)]  # 50 tokens: chunks of 16, 16, 16, 2
CHUNK = 16


def _chunked(model, tokens: mx.array, chunk: int):
    """mlx-lm's prefill: chunk after chunk through every layer; the next token's logits."""
    cache = make_prompt_cache(model)
    for s in range(0, tokens.size - 1, chunk):
        model(tokens[s:min(s + chunk, tokens.size - 1)][None], cache=cache)
        mx.eval([c.state for c in cache])
    return cache, model(tokens[-1:][None], cache=cache)


@pytest.mark.parametrize("arch", sorted(layer_major.LAYER_MAJOR_TYPES & set(TINY_ARCHS)))
def test_kv_and_logits_equal_chunked_prefill(deep_models, arch):
    """Every chunk through a layer before the next layer: the model's KV cache and the next
    token's logits are those of mlx-lm's chunked prefill (whole model resident). Four layers: a
    hidden state passed on wrongly shows in the KV of the layers after the next one."""
    dst = deep_models(arch)
    ref, _ = load_model(dst.parent / "mlx")
    ref.set_dtype(mx.float32)
    tokens = mx.array(PROMPT)
    try:
        ref_cache, expected = _chunked(ref, tokens, CHUNK)
        mx.eval(expected)
    except RuntimeError as e:  # some mlx-lm models use Metal-only kernels
        pytest.skip(f"mlx-lm itself cannot run {arch} on this backend: {e}")
    model, _ = hobbit_mlx.load(dst, expert_residency=0.5, exact=True, progress=False)
    cache = make_prompt_cache(model)
    assert layer_major.applies(model, cache, tokens.size - 1, CHUNK)
    layer_major.prefill(model, tokens[:-1], cache, CHUNK, runtime_of(model))
    got = model(tokens[-1:][None], cache=cache)
    np.testing.assert_allclose(np.array(got), np.array(expected), rtol=0, atol=1e-5)
    for mine, theirs in zip(cache, ref_cache):
        assert mine.offset == theirs.offset == tokens.size
        for a, b in zip(mine.state, theirs.state):
            np.testing.assert_allclose(np.array(a), np.array(b), rtol=0, atol=1e-5)
    assert hobbit_mlx.offload_stats(model)["misses_high"] > 0


def test_a_continued_context_equals_chunked_prefill(tiny_factory):
    """A second prompt on a KV cache that holds a first one (a chat's next turn): each layer's
    chunks continue from that layer's own offset."""
    src, dst = tiny_factory("qwen3_moe")
    ref, _ = load_model(src)
    ref.set_dtype(mx.float32)
    tokens = mx.array(PROMPT)
    first, second = tokens[:20], tokens[20:-1]
    ref_cache = make_prompt_cache(ref)
    for part in (first, second):
        for s in range(0, part.size, CHUNK):
            ref(part[s:s + CHUNK][None], cache=ref_cache)
            mx.eval([c.state for c in ref_cache])
    expected = ref(tokens[-1:][None], cache=ref_cache)
    model, _ = hobbit_mlx.load(dst, expert_residency=0.5, exact=True, progress=False)
    cache = make_prompt_cache(model)
    for part in (first, second):
        layer_major.prefill(model, part, cache, CHUNK, runtime_of(model))
    got = model(tokens[-1:][None], cache=cache)
    np.testing.assert_allclose(np.array(got), np.array(expected), rtol=0, atol=1e-5)
    assert [c.offset for c in cache] == [tokens.size] * len(cache)


def test_a_long_prompt_reads_each_layers_experts_once(tmp_path):
    """The bundled reference model, a prompt of many chunks, pools of about half the experts:
    the same text as chunk-by-chunk prefill, the whole prompt counted in the responses, the
    budget kept, a fraction of the bytes read, and pools as large for decoding."""
    text = open(hobbit_mlx.__file__).read()[:1500]  # (8 chunks)
    out = {}
    for order in (False, True):
        model, tok = hobbit_mlx.load(None, memory_budget="24MB", exact=True, progress=False,
                                     prefill_step_size=64, layer_major_prefill=order)
        responses = list(hobbit_mlx.stream_generate(model, tok, text, max_tokens=12))
        stats = hobbit_mlx.offload_stats(model)
        assert stats["peak_memory_bytes"] <= stats["budget_bytes"]
        out[order] = ("".join(r.text for r in responses), responses[-1].prompt_tokens,
                      stats["bytes_read"], stats["expert_cache_bytes"])
        runtime_of(model).close()
        del model
    (text_c, n_c, read_c, pools_c), (text_l, n_l, read_l, pools_l) = out[False], out[True]
    assert text_l == text_c and n_l == n_c == len(tok.encode(text))
    assert read_l < read_c / 3
    assert pools_l >= pools_c  # the hidden states' reserve went back to the pools for decoding


def test_not_where_mlx_lm_must_see_the_whole_prompt(tiny_factory):
    """Penalties see the prompt's tokens, a windowed cache masks by its offset: those keep
    mlx-lm's own prefill, as does an architecture outside the checked list."""
    _, dst = tiny_factory("qwen3_moe")
    model, _ = hobbit_mlx.load(dst, expert_residency=0.5, exact=True, progress=False)
    assert hobbit_mlx._layer_major_candidate(model, {})
    assert not hobbit_mlx._layer_major_candidate(model, {"logits_processors": [lambda t, l: l]})
    assert not hobbit_mlx._layer_major_candidate(model, {"max_kv_size": 64})
    assert not layer_major.applies(model, make_prompt_cache(model, max_kv_size=64), 200, CHUNK)
    assert not layer_major.applies(model, make_prompt_cache(model), CHUNK, CHUNK)
    _, dst = tiny_factory("gpt_oss")
    other, _ = hobbit_mlx.load(dst, expert_residency=0.5, exact=True, progress=False)
    assert layer_major.decoder_of(other) is None


def test_not_with_prefetch(tiny_factory):
    """Prefetch guesses the next layer of the same tokens, which this order does not run next."""
    _, dst = tiny_factory("qwen3_moe")
    model, _ = hobbit_mlx.load(dst, expert_residency=0.5, prefetch_layers=1, progress=False)
    assert not hobbit_mlx._layer_major_candidate(model, {})


def test_progress_is_reported_and_can_stop_the_prefill(tiny_factory):
    """mlx-lm's prompt progress callback is called as the layers pass (rising to the prompt's
    length), and an exception raised in it (a server's cancelled request) stops the prefill."""
    _, dst = tiny_factory("qwen3_moe")
    model, _ = hobbit_mlx.load(dst, expert_residency=0.5, exact=True, progress=False)
    tokens = mx.array(PROMPT[:-1])
    seen = []
    layer_major.prefill(model, tokens, make_prompt_cache(model), CHUNK, runtime_of(model),
                        lambda done, total: seen.append((done, total)))
    assert seen == sorted(seen) and seen[-1] == (tokens.size, tokens.size) and len(seen) > 2

    class Stop(Exception):
        pass

    def stop(done, total):
        raise Stop

    decoder = layer_major.decoder_of(model)
    layers = decoder.layers
    with pytest.raises(Stop):
        layer_major.prefill(model, tokens, make_prompt_cache(model), CHUNK, runtime_of(model), stop)
    assert decoder.layers is layers  # (the decoder is whole again)


def test_penalties_that_look_back_a_window_keep_only_that_window_for_mlx_lm(tiny_factory):
    """A repetition penalty marked with its window (as the CLIs and the server mark mlx-lm's
    penalties) sees the same last tokens: the prompt but for that window is prefilled layer by
    layer, and the text equals chunk-by-chunk prefill's. An unmarked processor keeps mlx-lm's
    prefill."""
    from mlx_lm.sample_utils import make_logits_processors

    assert layer_major.prompt_tail(None) == 1
    assert layer_major.prompt_tail(layer_major.looking_back(make_logits_processors(
        {5: 1.0}, 1.5, 12), 12)) == 12
    assert layer_major.prompt_tail([lambda t, l: l]) is None
    _, dst = tiny_factory("qwen3_moe")
    prompt = [(13 * i + 7) % 200 + 1 for i in range(120)]
    out = {}
    for order in (False, True):
        model, tok = hobbit_mlx.load(dst, expert_residency=0.5, exact=True, progress=False,
                                     prefill_step_size=16, layer_major_prefill=order)
        seen = []
        real = make_logits_processors(repetition_penalty=2.0, repetition_context_size=12)[0]
        spy = lambda tokens, logits: (seen.append(tokens.size), real(tokens, logits))[1]  # noqa: E731
        processors = layer_major.looking_back([spy], 12)
        rs = list(hobbit_mlx.stream_generate(model, tok, prompt, max_tokens=12,
                                             logits_processors=processors))
        out[order] = ([r.token for r in rs], rs[-1].prompt_tokens, seen[0],
                      hobbit_mlx.offload_stats(model)["bytes_read"])
    assert out[True][:2] == out[False][:2] and out[True][1] == len(prompt)
    assert out[False][2] == len(prompt) and out[True][2] == 12  # what mlx-lm's loop was given
    assert out[True][3] < out[False][3]


def test_a_prompt_that_fits_only_chunk_by_chunk_is_prefilled_chunk_by_chunk():
    """The budget holds the prompt's KV but not its hidden states beside it: the prompt is not
    refused (the server advertised it as fitting) but prefilled chunk by chunk, as mlx-lm does."""
    least = hobbit_mlx.footprint(None)["minimum_budget_bytes_exact"]
    model, tok = hobbit_mlx.load(None, memory_budget=int(least * 1.15), exact=True,
                                 progress=False)  # (a short context: a short test)
    rt = runtime_of(model)
    limit = rt.plan.max_context()
    n = limit - 8
    held = layer_major.extra_context_tokens(model, n, rt.kv_bytes_per_token)
    assert n + held > limit  # (else this budget does not test the fallback)
    words = tok.encode(open(hobbit_mlx.__file__).read(), add_special_tokens=False)
    prompt = (words * (n // len(words) + 1))[:n]
    before = hobbit_mlx.offload_stats(model)["bytes_read"]
    responses = list(hobbit_mlx.stream_generate(model, tok, prompt, max_tokens=2))
    assert responses[-1].prompt_tokens == n
    stats = hobbit_mlx.offload_stats(model)
    assert stats["peak_memory_bytes"] <= stats["budget_bytes"]
    assert stats["bytes_read"] > before


def test_the_paths_that_leave_mlx_lms_loop_set_its_wired_limit(tiny_factory, monkeypatch):
    """On a Mac mlx-lm's generation loop wires memory up to the GPU's working set while it
    runs; the layer-major prefill and the speculative loop run outside it and must do the same
    (they ran with the limit unset). The device's answer is faked here: the CPU has none."""
    _, dst = tiny_factory("qwen3_moe")
    model, tok = hobbit_mlx.load(dst, expert_residency=0.25, exact=True, progress=False,
                                 prefill_step_size=CHUNK)
    limit = 1 << 40
    calls = []
    monkeypatch.setattr(mx, "device_info", lambda: {"max_recommended_working_set_size": limit})
    monkeypatch.setattr(mx, "set_wired_limit", lambda n: calls.append(n) or 0)
    prompt = mx.array(PROMPT)
    original = layer_major.prefill

    def prefill(*args, **kwargs):
        assert calls and calls[-1] == limit  # set while the layers run
        return original(*args, **kwargs)

    monkeypatch.setattr(layer_major, "prefill", prefill)
    list(hobbit_mlx.stream_generate(model, tok, prompt, max_tokens=2))
    assert calls.count(limit) == 2 and calls[-1] == 0  # the prefill's, then mlx-lm's loop's
    calls.clear()
    list(hobbit_mlx.stream_generate(model, tok, prompt, max_tokens=4, speculative=2))
    assert calls.count(limit) >= 1 and calls[-1] == 0  # set, then given back
    runtime_of(model).close()
