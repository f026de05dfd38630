"""Adaptive prefetch width: each layer predicts as many experts as its recall target needs."""

from __future__ import annotations

import numpy as np
import pytest

import hobbit_mlx
from hobbit_mlx.loader import runtime_of
from hobbit_mlx.widths import AdaptiveWidth

E, K = 16, 2


def _logits_ranking(order: list[int]) -> np.ndarray:
    """One token's logits that rank the experts in ``order`` (best first)."""
    logits = np.zeros((1, E), np.float32)
    logits[0, order] = np.linspace(1.0, 0.0, len(order))
    return logits


def test_width_is_the_start_until_enough_choices_are_seen():
    widths = AdaptiveWidth(K, E, start=4, target=0.9, max_width=8, warmup=4)
    ranking = _logits_ranking(list(range(E)))
    for _ in range(3):
        widths.observe(1, 1, ranking, np.array([[0, 1]]))
        assert widths.width(1, 1) == 4
    widths.observe(1, 1, ranking, np.array([[0, 1]]))
    assert widths.width(1, 1) == K  # always chosen among the top-k guesses: k is enough
    assert widths.width(2, 1) == 4  # another layer learns on its own


def test_width_grows_to_cover_the_target_share_and_stops_at_the_maximum():
    ranking = _logits_ranking(list(range(E)))
    easy = AdaptiveWidth(K, E, start=4, target=0.75, max_width=8, warmup=1)
    hard = AdaptiveWidth(K, E, start=4, target=0.75, max_width=8, warmup=1)
    for _ in range(10):
        easy.observe(3, 1, ranking, np.array([[0, 5]]))  # ranks 0 and 5: 6 guesses cover both
        hard.observe(3, 1, ranking, np.array([[0, 12]]))  # rank 12: beyond the maximum
    assert easy.width(3, 1) == 6
    assert hard.width(3, 1) == 8
    half = AdaptiveWidth(K, E, start=4, target=0.5, max_width=8, warmup=1)
    half.observe(3, 1, ranking, np.array([[0, 12]]))
    assert half.width(3, 1) == K  # half of the choices rank first: the floor is k


def test_ranks_are_per_token():
    widths = AdaptiveWidth(K, E, start=4, target=1.0, max_width=E, warmup=1)
    logits = np.concatenate([_logits_ranking(list(range(E))), _logits_ranking(list(range(E))[::-1])])
    widths.observe(0, 1, logits, np.array([[0, 1], [15, 14]]))  # each token's own top 2
    assert widths.width(0, 1) == K


def test_bad_target_is_refused(tiny_factory):
    with pytest.raises(ValueError, match="prefetch_recall"):
        AdaptiveWidth(K, E, start=4, target=1.5, max_width=8)
    _, dst = tiny_factory("qwen3_moe")
    with pytest.raises(ValueError, match="prefetch_recall"):
        hobbit_mlx.load(dst, prefetch_recall=-0.1, progress=False)


def _guesses_per_token(model) -> dict:
    """layer -> the experts per token each prediction one layer ahead guessed (in order)."""
    pf = runtime_of(model).prefetcher
    issue, seen = pf._issue, {}

    def spy(switch, distance, ind, weights):
        if distance == 1:
            seen.setdefault(switch.layer.layer, []).append(ind.shape[-1])
        return issue(switch, distance, ind, weights)

    pf._issue = spy
    return seen


def test_adaptive_width_learns_per_layer_and_keeps_exact_output(tiny_factory):
    _, dst = tiny_factory("mixtral")
    prompt = "def fibonacci(n):\n    if n < 2:\n        return n\n"
    ref_model, tok = hobbit_mlx.load(dst, expert_residency=0.25, exact=True, prefetch_layers=0,
                                     progress=False)
    want = hobbit_mlx.generate(ref_model, tok, prompt, max_tokens=16)
    model, tok = hobbit_mlx.load(dst, expert_residency=0.25, exact=True, prefetch_layers=1,
                                 prefetch_recall=0.9, progress=False)
    guessed = _guesses_per_token(model)
    assert hobbit_mlx.generate(model, tok, prompt, max_tokens=16) == want
    rt = runtime_of(model)
    k = rt.manifest.experts_per_token
    stats = hobbit_mlx.offload_stats(model)
    widths = stats["prefetch_widths"]
    assert set(widths) == {s.layer.layer for s in rt.layers[1:]}  # every layer an earlier one predicts
    assert all(k <= w <= rt.manifest.num_experts for w in widths.values())
    # the reported width is the one the last prediction for each layer used
    assert widths == {layer: used[-1] for layer, used in guessed.items()}
    fixed, tok = hobbit_mlx.load(dst, expert_residency=0.25, prefetch_layers=1, progress=False)
    guessed = _guesses_per_token(fixed)
    hobbit_mlx.generate(fixed, tok, prompt, max_tokens=4)
    assert hobbit_mlx.offload_stats(fixed)["prefetch_widths"] == 2 * k  # prefetch_width=2.0
    assert guessed and all(set(used) == {2 * k} for used in guessed.values())


def test_adaptive_width_takes_at_most_a_quarter_of_a_small_cache(tmp_path):
    from convert import convert
    from hobbit_mlx.testing.tiny_models import make_tiny_model

    src = make_tiny_model("mixtral", tmp_path / "mlx", config_overrides={"num_hidden_layers": 4})
    dst = convert(src, tmp_path / "hobbit", progress=False)
    for size in ({"expert_residency": 0.1}, {"memory_budget": "1GB"}):
        model, _ = hobbit_mlx.load(dst, **size, prefetch_layers=1, prefetch_width=1.0,
                                   prefetch_recall=0.9, progress=False)
        rt = runtime_of(model)
        k, n = rt.manifest.experts_per_token, rt.manifest.num_experts
        widths = rt.prefetcher.widths
        cache_experts = rt.cache.capacity(0, "high")  # every layer shares one 4-bit pool here
        assert all(rt.cache.pool_for(s.layer.layer, "high") is rt.cache.pool_for(0, "high")
                   for s in rt.layers)
        assert k <= widths.max_width <= max(widths.start, cache_experts // 4, k)
        if "memory_budget" in size:  # a large cache: up to 4x top-k
            assert cache_experts >= 4 * min(4 * k, n) and widths.max_width == min(4 * k, n)
        else:
            assert widths.max_width < min(4 * k, n)
