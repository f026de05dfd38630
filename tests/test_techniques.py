"""The seed techniques: each is a switch, each does what it claims, none breaks the budget."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import hobbit_mlx
from hobbit_mlx.loader import runtime_of
from hobbit_mlx.testing.slot_cache import put, slot_cache, use
from hobbit_mlx.policies import POLICIES, make_policy
from hobbit_mlx.precision import DROP, HIGH, LOW, SKIP_IF_MISSING, PrecisionOptions, plan_slots

PROMPT = "def fibonacci(n):\n    if n < 2:\n        return n\n"


def test_hobbit_thresholds_rank_by_gate_weight():
    w = np.array([[0.2, 0.5, 0.3], [0.9, 0.05, 0.05]], dtype=np.float32)
    level, scale = plan_slots(w, PrecisionOptions(mixed_precision=True, t1=0.6, t2=0.9))
    # unimportance: row 0 -> [0.8, 0, 0.5]; row 1 -> [0, 0.9, 0.95] (ties keep index order)
    assert level.tolist() == [[LOW, HIGH, HIGH], [HIGH, LOW, LOW]]
    level, _ = plan_slots(w, PrecisionOptions(mixed_precision=True, t1=0.6, t2=0.9, skip=True))
    assert level.tolist() == [[LOW, HIGH, HIGH], [HIGH, LOW, SKIP_IF_MISSING]]
    assert (scale == 1).all()


def test_big_little_drops_the_lower_half_of_confident_tokens_and_renormalizes():
    w = np.array([[0.7, 0.2, 0.05, 0.05], [0.3, 0.3, 0.2, 0.2]], dtype=np.float32)
    level, scale = plan_slots(w, PrecisionOptions(big_little=True, little_threshold=0.8,
                                                  little_keeps_resident=False))
    assert level.tolist() == [[HIGH, HIGH, DROP, DROP], [HIGH, HIGH, HIGH, HIGH]]
    np.testing.assert_allclose(scale[0, :2], 1 / 0.9, rtol=1e-6)
    assert (scale[1] == 1).all()
    # by default only the experts that would be read are dropped (the layer call decides)
    level, scale = plan_slots(w, PrecisionOptions(big_little=True, little_threshold=0.8))
    assert level.tolist() == [[HIGH, HIGH, SKIP_IF_MISSING, SKIP_IF_MISSING], [HIGH] * 4]
    np.testing.assert_allclose(scale[0, :2], 1 / 0.9, rtol=1e-6)


def test_lossy_techniques_are_on_unless_exact():
    """The defaults turn on what pays under a Mac's storage cost, and exact mode none of it; an
    explicit choice wins. (Big-little is off: at the default thresholds it drops what skip
    drops.)"""
    lossy = hobbit_mlx.LoadOptions().precision()
    assert lossy.mixed_precision and lossy.skip and not lossy.big_little
    assert lossy.drops_misses and not lossy.drops  # nothing resident is ever dropped
    little = hobbit_mlx.LoadOptions(big_little=True).precision()
    assert little.big_little and little.little_keeps_resident and not little.drops
    exact = hobbit_mlx.LoadOptions(exact=True).precision()
    assert not (exact.mixed_precision or exact.skip or exact.big_little or exact.needs_weights)
    assert not hobbit_mlx.LoadOptions(skip=False).precision().skip
    assert not hobbit_mlx.LoadOptions(mixed_precision=False).precision().upgrades


def test_exact_refuses_lossy_options(tiny_factory):
    _, dst = tiny_factory("qwen3_moe")
    with pytest.raises(ValueError, match="exact=True cannot"):
        hobbit_mlx.load(dst, exact=True, mixed_precision=True, progress=False)


@pytest.mark.parametrize("bad,needle", [
    (dict(dtype="bogus"), "dtype"), (dict(little_threshold=2.0), "little_threshold"),
    (dict(keep_shallow_layers=-3), "keep_shallow_layers"),
    (dict(policy_options={"half_lif": 3}), "half_lif")])
def test_options_that_cannot_work_are_named(tiny_factory, bad, needle):
    _, dst = tiny_factory("qwen3_moe")
    with pytest.raises(ValueError, match=needle):
        hobbit_mlx.load(dst, expert_residency=0.5, progress=False, **bad)


def test_a_draft_model_path_per_call_is_refused_with_the_way_to_pass_one(tiny_factory):
    _, dst = tiny_factory("qwen3_moe")
    model, tok = hobbit_mlx.load(dst, expert_residency=0.5, progress=False)
    with pytest.raises(TypeError, match="load"):
        hobbit_mlx.generate(model, tok, PROMPT, max_tokens=2, draft_model=str(dst))


def _run(dst, **kw):
    model, tok = hobbit_mlx.load(dst, progress=False, **kw)
    text = hobbit_mlx.generate(model, tok, PROMPT, max_tokens=16)
    return model, text, hobbit_mlx.offload_stats(model)


def test_mixed_precision_loads_low_copies_on_unimportant_misses(tiny_factory):
    _, dst = tiny_factory("qwen3_moe")
    _, _, exact = _run(dst, expert_residency=0.3, exact=True)
    _, _, mixed = _run(dst, expert_residency=0.3, mixed_precision=True, adapt_to_storage=False, t1=0.3, t2=1.0,
                       big_little=False, upgrade_after=0)
    assert exact["misses_low"] == exact["hits_low"] == 0
    assert mixed["misses_low"] > 0
    assert mixed["bytes_read"] < exact["bytes_read"]
    assert mixed["peak_memory_bytes"] <= mixed["budget_bytes"]
    # t1 = 1: nothing is unimportant enough, so the output is the exact one
    m1, _ = hobbit_mlx.load(dst, expert_residency=0.3, mixed_precision=True, adapt_to_storage=False, t1=1.0, t2=1.0,
                            big_little=False, upgrade_after=0, progress=False)
    m2, _ = hobbit_mlx.load(dst, expert_residency=0.3, exact=True, progress=False)
    tokens = mx.array([[3, 5, 7, 11, 13, 17, 19, 23]])
    np.testing.assert_array_equal(np.array(m1(tokens)), np.array(m2(tokens)))


@pytest.mark.parametrize("arch,router", [("gemma4_text", "model.layers.{}.router"),
                                         ("deepseek_v41", "model.layers.{}.mlp.gate")])
def test_a_router_beside_the_experts_module_is_read(tiny_factory, arch, router):
    """gemma4 and deepseek_v41 keep the switch in an experts module of its own, beside the
    router: the router is found there, so its gate weights send unimportant misses to 2-bit
    (they ran exact whatever the options, and Fate's prefill option crashed them)."""
    _, dst = tiny_factory(arch)
    model, _, mixed = _run(dst, expert_residency=0.3, mixed_precision=True, t1=0.0, t2=1.0,
                           adapt_to_storage=False, prefill_low_precision=0.3)
    modules = dict(model.named_modules())
    assert [layer.router for layer in runtime_of(model).layers] == \
        [modules[router.format(layer.layer.layer)] for layer in runtime_of(model).layers]
    assert mixed["misses_low"] > 0


def test_without_a_router_the_lossy_options_are_said_not_to_apply(tiny_factory):
    """longcat_flash's router chooses among its zero experts too (no [experts, hidden] gate):
    its layers run as in exact mode, with a warning, and Fate's prefill option does not crash
    the big-little rule (it took a precision level without gate weights for one)."""
    _, dst = tiny_factory("longcat_flash")
    with pytest.warns(UserWarning, match="no router found beside the experts of 2 of 2"):
        _, _, stats = _run(dst, expert_residency=0.3, adapt_to_storage=False,
                           prefill_low_precision=0.3, t1=0.0)
    assert stats["misses_low"] > 0  # (Fate's rule needs no weights: a prefill's rare experts)
    assert stats["little_tokens"] == 0 and stats["skipped"] == 0


def test_big_little_runs_fewer_experts(tiny_factory):
    _, dst = tiny_factory("olmoe")
    _, _, big = _run(dst, expert_residency=0.0, exact=True)
    _, _, little = _run(dst, expert_residency=0.0, mixed_precision=False, big_little=True, adapt_to_storage=False,
                        little_threshold=0.0)
    assert little["little_token_share"] == 1.0
    assert little["bytes_read"] < big["bytes_read"]
    assert little["skipped"] > 0


def test_big_little_drops_only_what_it_would_read(tiny_factory):
    """A little token's other experts are dropped where they would be read (test above); with
    every expert resident nothing is dropped and the output is exact, where the old rule drops
    them anyway."""
    _, dst = tiny_factory("olmoe")
    tokens = mx.array([[3, 5, 7, 11, 13, 17, 19, 23]])
    exact, _ = hobbit_mlx.load(dst, expert_residency=1.0, exact=True, progress=False)
    want = np.array(exact(tokens))
    for keeps in (True, False):
        model, _ = hobbit_mlx.load(dst, expert_residency=1.0, mixed_precision=False,
                                   big_little=True, little_threshold=0.0, adapt_to_storage=False,
                                   little_keeps_resident=keeps, progress=False)
        rt = runtime_of(model)
        rt.preload()  # (load preloads a model that fits whole; this says so)
        got = np.array(model(tokens))
        assert rt.stats.bytes_read == 0
        if keeps:  # nothing can be dropped: the calls stay lazy, as in exact mode
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
            assert rt.stats.skipped == 0 and rt.stats.host_syncs == 0
        else:
            assert rt.stats.little_tokens > 0 and rt.stats.skipped > 0
            assert not np.allclose(got, want, atol=1e-4)


def test_a_skipped_slot_runs_when_its_expert_is_read_for_another_token(tiny_factory):
    """In a prompt chunk, an expert that one token runs is read anyway: another token's
    skip-if-missing slot on it runs too; a slot whose expert nobody runs is dropped."""
    _, dst = tiny_factory("qwen3_moe")
    model, _ = hobbit_mlx.load(dst, expert_residency=0.25, skip=True, adapt_to_storage=False,
                               progress=False)
    switch = runtime_of(model).layers[0]
    assert not any((switch.layer.layer, e, p) in runtime_of(model).cache
                   for e in (1, 2, 3) for p in ("high", "low"))
    level = np.array([[HIGH, LOW], [SKIP_IF_MISSING, SKIP_IF_MISSING]], dtype=np.int8)
    out = switch._skip_missing(np.array([[1, 2], [2, 3]]), level)
    assert out.tolist() == [[HIGH, LOW], [LOW, DROP]]
    one = switch._skip_missing(np.array([[2, 3]]), np.array([[HIGH, SKIP_IF_MISSING]], np.int8))
    assert one.tolist() == [[HIGH, DROP]]


def test_prefetch_predicts_and_is_used_without_changing_output(tiny_factory):
    _, dst = tiny_factory("mixtral")
    off, text_off, s_off = _run(dst, expert_residency=0.5, exact=True, prefetch_layers=0)
    on, text_on, s_on = _run(dst, expert_residency=0.5, exact=True, prefetch_layers=2)
    assert text_on == text_off
    assert s_off["prefetch_issued"] == 0 and s_off["prediction_total"] == 0
    assert s_on["prefetch_issued"] > 0 and 0 <= s_on["prefetch_used"] <= s_on["prefetch_issued"]
    assert s_on["prediction_total"] > 0 and 0 <= s_on["prediction_recall"] <= 1
    by_distance = s_on["prediction_recall_by_distance"]
    assert 1 in by_distance and set(by_distance) <= {1, 2} and all(0 <= r <= 1 for r in by_distance.values())
    assert s_on["prediction_recall_by_distance"][1] == s_on["prediction_recall"]
    assert s_on["resident_expert_bytes"] <= s_on["expert_cache_bytes"]
    assert not runtime_of(on).cache._pins and not runtime_of(on).cache._holds  # all let go


@pytest.fixture(scope="module")
def policy_runs(tiny_factory):
    """policy -> (text, stats, victims the policy chose) of one exact run at 30% residency."""
    _, dst = tiny_factory("qwen3_moe")
    out = {}
    for policy in sorted(POLICIES):
        model, tok = hobbit_mlx.load(dst, expert_residency=0.3, exact=True, policy=policy,
                                     progress=False)
        victims = []
        for ps in runtime_of(model).cache.pools:
            choose = ps.policy.victim
            ps.policy.victim = lambda ok, choose=choose: victims.append(choose(ok)) or victims[-1]
        text = hobbit_mlx.generate(model, tok, PROMPT, max_tokens=16)
        out[policy] = (text, hobbit_mlx.offload_stats(model), victims)
    return out


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_every_policy_is_exact_and_decides_the_evictions(policy_runs, policy):
    """Exact output cannot depend on the policy; what it decides is which experts go."""
    text, stats, victims = policy_runs[policy]
    assert text == policy_runs["lru"][0]
    assert stats["policy"] == policy
    assert stats["resident_expert_bytes"] <= stats["expert_cache_bytes"]
    assert stats["hits_high"] > 0 and victims  # it was asked, and its choice was evicted
    assert stats["misses_high"] >= len(victims)


def test_policies_change_what_stays_resident(policy_runs):
    """The same requests under six policies: not one eviction order, so not one miss count."""
    orders = {tuple(victims) for _, _, victims in policy_runs.values()}
    misses = {stats["misses_high"] for _, stats, _ in policy_runs.values()}
    assert len(orders) >= 4 and len(misses) >= 2, misses


def test_cache_never_exceeds_capacity_and_respects_pins():
    cache = slot_cache(3, make_policy("lru"), low_slots=0)
    assert cache.capacity(0, "high") == 3 and cache.capacity(0, "low") == 0
    for e in range(3):
        assert put(cache, (0, e, "high"))
    cache.pin([(0, 0, "high")])
    assert put(cache, (0, 3, "high"))  # evicts (0,1), the oldest unpinned
    assert (0, 0, "high") in cache and (0, 1, "high") not in cache
    assert len(cache) == 3 and cache.resident_bytes == 300 == cache.capacity_bytes
    assert not put(cache, (0, 4, "low"))  # a pool with no slot takes nothing
    cache.pin([(0, 2, "high"), (0, 3, "high")])
    assert not put(cache, (0, 5, "high"))  # every slot pinned: nothing to evict
    assert len(cache) == 3 and cache.resident_bytes == 300
    # the slots hold distinct experts, and the remap points each expert at its own slot
    slots = [cache.slot((0, e, "high")) for e in (0, 2, 3)]
    assert sorted(slots) == [0, 1, 2]
    remap = np.array(cache.device_remap(0, "high"))
    assert [int(remap[e]) for e in (0, 2, 3)] == slots


def test_shallow_policy_evicts_deep_layers_first():
    cache = slot_cache(3, make_policy("shallow", num_layers=4, shallow_fraction=0.25))
    assert put(cache, (0, 0, "high"))
    assert put(cache, (3, 0, "high"))
    assert put(cache, (2, 0, "high"))
    assert put(cache, (1, 0, "high"))
    assert (0, 0, "high") in cache and (3, 0, "high") not in cache


def test_hobbit_policy_prefers_to_evict_the_layer_just_computed():
    # (just_ran=1: a policy never told which layer ran would count from layer 0 and evict
    # layer 0's expert, the one needed next)
    for just_ran in (2, 1):
        policy = make_policy("hobbit", num_layers=4, w_lru=0, w_lfu=0, w_lhu=0, w_fld=1)
        cache = slot_cache(2, policy)
        assert put(cache, (just_ran - 1, 0, "high"))
        assert put(cache, (just_ran, 0, "high"))
        cache.on_layer(just_ran)  # after layer L come L+1, ..., L-1, then L again: L's expert
        # is needed last
        assert put(cache, (3, 0, "high"))
        assert (just_ran - 1, 0, "high") in cache and (just_ran, 0, "high") not in cache


def test_arc_keeps_a_reused_expert_through_a_scan():
    """A scan of experts used once must not push out one used twice (LRU would evict it)."""
    for name, survives in (("arc", True), ("lru", False)):
        cache = slot_cache(3, make_policy(name))
        hot = (0, 0, "high")
        assert put(cache, hot)
        assert use(cache, hot)  # used again: frequent
        for e in range(1, 5):  # four experts seen once each
            assert put(cache, (0, e, "high"))
        assert (hot in cache) is survives, name


def test_low_precision_prefetch_reads_2bit_copies_for_unimportant_predictions(tiny_factory):
    """Also while the lossy techniques are off (reads measured cheap), when a guess would
    otherwise be read in 4-bit."""
    _, dst = tiny_factory("olmoe")
    model, _, low = _run(dst, expert_residency=0.3, prefetch_layers=1, t1=0.3, prefetch_low_precision=True)
    assert low["prefetch_issued"] > 0
    assert low["resident_expert_bytes"] <= low["expert_cache_bytes"]
    rt = runtime_of(model)
    rt.lossy_now = lambda: False
    pf, k = rt.prefetcher, rt.manifest.experts_per_token
    ind = np.arange(k)[None]
    weights = np.linspace(1.0, 0.1, k, dtype=np.float32)[None]
    pf.low_precision = False
    assert pf._plan(ind, weights, 1, pf._buckets(ind))[1] == ["high"] * k
    pf.low_precision = True
    experts, precisions = pf._plan(ind, weights, 1, pf._buckets(ind))
    assert precisions[0] == "high" and "low" in precisions  # the top-1, and the unimportant
