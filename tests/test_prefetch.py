"""Prefetch details: stacked gates, prediction width, per-distance counters, prefill 2-bit rule."""

from __future__ import annotations

import threading

import mlx.core as mx
import numpy as np
import pytest

import hobbit_mlx
from hobbit_mlx import offload
from hobbit_mlx.loader import runtime_of
from hobbit_mlx.testing.slot_cache import put, slot_cache, use
from hobbit_mlx.policies import make_policy
from hobbit_mlx.precision import DROP, HIGH, LOW, demote_unpopular
from hobbit_mlx.routing import StackedGates, predictions_from, top_predictions, untapped_call

PROMPT = "def fibonacci(n):\n    if n < 2:\n        return n\n"


def _run(dst, **kw):
    model, tok = hobbit_mlx.load(dst, progress=False, **kw)
    text = hobbit_mlx.generate(model, tok, PROMPT, max_tokens=12)
    return model, text, hobbit_mlx.offload_stats(model)


def test_top_predictions_orders_best_first():
    logits = np.array([[0.0, 3.0, 1.0, 2.0]], dtype=np.float32)
    ind, w = top_predictions(logits, 3)
    assert ind.tolist() == [[1, 3, 2]]
    assert np.isclose(w.sum(), 1) and w[0, 0] > w[0, 1] > w[0, 2]


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
def test_stacked_gates_predict_what_each_router_predicts(deep_models, arch):
    dst = deep_models(arch)
    model, _ = hobbit_mlx.load(dst, expert_residency=0.25, prefetch_layers=2, progress=False)
    rt = runtime_of(model)
    assert rt.prefetcher.gate_stacks, "plain linear gates must stack"
    stack = rt.prefetcher.gate_stacks[0]
    x = mx.random.normal((5, model.args.hidden_size)).astype(mx.float32)
    logits = stack(x)
    assert len(logits) == 2
    for distance, got in enumerate(logits, start=1):
        want_ind, _ = predictions_from(untapped_call(rt.layers[distance].router, x), 4)
        got_ind, _ = top_predictions(np.array(got), 4)
        np.testing.assert_array_equal(np.sort(got_ind, axis=-1), np.sort(want_ind, axis=-1))


def test_routers_that_choose_for_themselves_do_not_stack(tiny_factory):
    _, dst = tiny_factory("deepseek_v2")
    model, _ = hobbit_mlx.load(dst, expert_residency=0.25, prefetch_layers=2, progress=False)
    rt = runtime_of(model)
    assert rt.prefetcher.gate_stacks == {}
    assert StackedGates.of([layer.router for layer in rt.layers[:2]]) is None


def test_wider_prediction_issues_more_and_keeps_output_exact(deep_models):
    dst = deep_models("mixtral")
    _, text_off, _ = _run(dst, expert_residency=0.4, exact=True, prefetch_layers=0)
    narrow_model, text_narrow, narrow = _run(dst, expert_residency=0.4, exact=True, prefetch_layers=2,
                                             prefetch_width=1.0)
    wide_model, text_wide, wide = _run(dst, expert_residency=0.4, exact=True, prefetch_layers=2,
                                       prefetch_width=2.0)
    assert text_narrow == text_wide == text_off
    k = runtime_of(wide_model).manifest.experts_per_token
    assert runtime_of(narrow_model).prefetcher.width == k and runtime_of(wide_model).prefetcher.width == 2 * k
    for d in (1, 2):
        assert wide["prediction_precision_by_distance"][d] <= 1
        assert wide["prediction_recall_by_distance"][d] >= narrow["prediction_recall_by_distance"][d]
    assert set(wide["prefetch_precision_by_distance"]) <= {1, 2}
    assert all(0 <= p <= 1 for p in wide["prefetch_precision_by_distance"].values())
    assert wide["prefetch_issued"] > narrow["prefetch_issued"]
    assert 0 <= wide["hits_in_flight"] <= wide["hits_high"] + wide["hits_low"]
    assert wide["resident_hit_rate"] <= wide["hit_rate"]
    with pytest.raises(ValueError, match="prefetch_width"):
        hobbit_mlx.load(dst, prefetch_width=0, progress=False)


def test_demote_unpopular_marks_rarely_chosen_experts_low():
    indices = np.array([[0, 1], [0, 2], [0, 1], [3, 1]])
    level = np.full(indices.shape, HIGH, dtype=np.int8)
    level[3, 0] = DROP
    out = demote_unpopular(indices, level, min_share=0.5)
    # expert 0: 3 of 4 tokens, 1: 3 of 4 -> stay HIGH; 2: 1 of 4 -> LOW; 3 is dropped, stays so
    assert out.tolist() == [[HIGH, HIGH], [HIGH, LOW], [HIGH, HIGH], [DROP, HIGH]]
    assert (demote_unpopular(indices, level, 0.0) == level).all()


def test_prefill_low_precision_reads_2bit_copies_in_prefill_only(tiny_factory):
    _, dst = tiny_factory("qwen3_moe")
    model, _ = hobbit_mlx.load(dst, expert_residency=0.0, mixed_precision=False, prefetch_layers=0,
                               prefill_low_precision=0.5, progress=False)
    model(mx.array([list(range(3, 40))]))
    prefill = hobbit_mlx.offload_stats(model)
    assert prefill["misses_low"] > 0 and prefill["misses_high"] > 0
    hobbit_mlx.reset_stats(model)
    model(mx.array([[5]]))  # one token: every chosen expert is popular
    assert hobbit_mlx.offload_stats(model)["misses_low"] == 0
    with pytest.raises(ValueError, match="exact=True cannot"):
        hobbit_mlx.load(dst, exact=True, prefill_low_precision=0.2, progress=False)


@pytest.mark.parametrize("name", ["hobbit", "lru", "seqfreq"])
def test_protected_shallow_layers_are_evicted_last(name):
    policy = make_policy(name, num_layers=4, shallow_layers=1)
    cache = slot_cache(2, policy)
    assert put(cache, (0, 0, "high"))  # the least used and oldest: LRU/LFU would evict it
    assert put(cache, (2, 0, "high"))
    assert use(cache, (2, 0, "high"))
    assert put(cache, (3, 0, "high"))
    assert (0, 0, "high") in cache and (2, 0, "high") not in cache
    assert put(cache, (0, 1, "high"))  # only layer 0 and the pinned-free (3, 0) remain
    assert (3, 0, "high") not in cache
    assert put(cache, (0, 2, "high"))  # nothing deeper is left: a shallow expert goes
    assert len(cache) == 2 and (0, 2, "high") in cache


def test_demand_reads_do_not_queue_behind_prefetch_reads(tiny_factory):
    import threading

    _, dst = tiny_factory("qwen3_moe")
    model, _ = hobbit_mlx.load(dst, expert_residency=0.0, prefetch_layers=1, io_workers=2,
                               progress=False)
    rt = runtime_of(model)
    entry = rt.manifest.layers[0].precisions["high"]
    pool = rt.cache.pool_for(0, "high")
    key = (0, 0, "high")
    slot = rt.cache.reserve(key)
    assert slot is not None
    release = threading.Event()
    blockers = [rt.reader.background_pool.submit(release.wait) for _ in range(4)]  # every worker busy
    try:
        # a demand read still runs, and its bytes land in the slot
        nbytes = rt.reader.submit_into(entry, 0, pool, slot).result(timeout=30)
        assert nbytes == entry.records[0].nbytes
        assert not any(b.done() for b in blockers)
    finally:
        release.set()
    spans = rt.reader.read_bytes(entry.records[0])
    same = [d.tensor for d in pool.destinations if d.convert is None]
    assert same, "the quantized weights are resident as stored"
    for t in same:
        np.testing.assert_array_equal(pool.slot_bytes(t.name, slot),
                                      spans[t.span][t.offset:t.offset + t.nbytes])
    rt.cache.commit(key, slot)


@pytest.mark.parametrize("scratch", [None, 0])
def test_close_waits_for_prefetches_and_stops_the_readers(deep_models, scratch):
    model, _ = hobbit_mlx.load(deep_models("mixtral"), expert_residency=0.5, prefetch_layers=1,
                               prefetch_scratch=scratch, prefetch_cost_aware=False, progress=False)
    rt = runtime_of(model)
    model(mx.array([list(range(3, 30))]))  # prefill issues prefetches
    assert rt.stats.prefetch_issued > 0
    with rt.prefetcher._lock:
        reads = list(rt.prefetcher._inflight.values())
    rt.close()
    assert all(f.done() for f in reads)  # no read writes into a freed pool
    assert not [t for t in threading.enumerate()
                if t.name.startswith(("hobbit-io", "hobbit-prefetch"))]
    assert rt.cache.resident_bytes == 0 and len(rt.cache) == 0
    assert all(ps.pool.slots == 0 and not ps.pool.arrays for ps in rt.cache.pools)  # pools freed


@pytest.mark.parametrize("name", ["hobbit", "lfu", "seqfreq"])
def test_a_prefetched_expert_counts_no_use(name):
    """A frequency policy must not mistake an unused prefetch for a frequently used expert."""
    cache = slot_cache(2, make_policy(name, num_layers=4))
    assert put(cache, (1, 0, "high"))  # requested once
    assert use(cache, (1, 0, "high"))  # and again
    assert put(cache, (1, 1, "high"), prefetched=True)  # guessed, never requested
    assert put(cache, (1, 2, "high"))
    assert (1, 0, "high") in cache and (1, 1, "high") not in cache


@pytest.mark.parametrize("name", ["hobbit", "lfu", "seqfreq"])
def test_a_prefetched_expert_ranks_below_one_used_once(name):
    """Even an expert requested once (and older) outranks a guess nobody asked for."""
    cache = slot_cache(2, make_policy(name, num_layers=4))
    assert put(cache, (1, 0, "high"))  # requested once
    assert put(cache, (1, 1, "high"), prefetched=True)  # guessed, never requested
    assert put(cache, (1, 2, "high"))
    assert (1, 0, "high") in cache and (1, 1, "high") not in cache


def test_a_predicted_expert_is_never_read_again_before_its_layer_runs(deep_models, monkeypatch):
    """An expert predicted for the next layer, resident or being read when predicted, stays
    resident until that layer has fetched it: the reads that come in meanwhile (LRU evicts the
    layer that comes next) may not evict it, nor may this layer's misses while room is left.
    (The pool holds two layers' experts: a prompt chunk needs all of a layer's, and with less
    room a miss rightly takes a held slot when nothing else is left.)"""
    dst = deep_models("qwen3_moe")
    model, tok = hobbit_mlx.load(dst, expert_residency=0.75, prefetch_layers=1, prefetch_scratch=0,
                                 policy="lru", progress=False)
    rt = runtime_of(model)
    pf = rt.prefetcher
    protected: dict[int, set] = {}  # layer -> predicted keys that were resident or in flight
    issue = pf._issue

    def spy_issue(switch, distance, ind, weights):
        lid = switch.layer.layer
        keys = {(lid, int(e), "high") for e in np.unique(ind)}
        issue(switch, distance, ind, weights)
        with pf._lock:
            protected[lid] = {k for k in keys if k in rt.cache or k in pf._inflight}

    read_again = []
    checked = []  # protected keys that their layer's fetch then needed

    class SpyFetch(offload.Fetch):
        def __init__(self, rt_, layer, experts, precision):
            super().__init__(rt_, layer, experts, precision)
            expected = protected.pop(layer.layer, set()) if precision == "high" else set()
            checked.extend(k for k in self.keys if k in expected)
            # a pending entry with a slot is a demand read (None: waiting on a prefetch's read)
            read_again.extend(self.keys[i] for i, _, slot in self.pending
                              if slot is not None and self.keys[i] in expected)

    pf._issue = spy_issue
    monkeypatch.setattr(offload, "Fetch", SpyFetch)
    hobbit_mlx.generate(model, tok, PROMPT * 3, max_tokens=24)
    rt.wait_idle()
    assert rt.stats.prefetch_issued > 0
    assert checked, "some predicted experts were needed by their layer"
    assert read_again == []
    assert not rt.cache._pins and not rt.cache._holds  # all released once their layer ran


@pytest.mark.parametrize("layers_ahead", [1, 2])
@pytest.mark.parametrize("residency", [0.125, 0.5])
def test_every_protection_is_released_once_its_layer_runs(deep_models, layers_ahead, residency):
    """Guesses that take pool slots: also when a layer is predicted twice (two layers ahead, then
    one) and the first read found no room in a small cache."""
    dst = deep_models("mixtral")
    model, tok = hobbit_mlx.load(dst, expert_residency=residency, prefetch_layers=layers_ahead,
                                 prefetch_width=2.0, prefetch_scratch=0, progress=False)
    rt = runtime_of(model)
    hobbit_mlx.generate(model, tok, PROMPT * 2, max_tokens=24)
    rt.wait_idle()
    assert rt.stats.prefetch_issued > 0
    assert not rt.cache._pins and not rt.cache._holds
    assert rt.prefetcher._issued == {} and rt.prefetcher._held == {}


def test_held_experts_yield_to_demand_but_not_to_other_predictions():
    cache = slot_cache(2, make_policy("lru"))
    assert put(cache, (1, 0, "high"))
    assert put(cache, (1, 1, "high"))
    cache.hold([(1, 0, "high"), (1, 1, "high")])
    assert not put(cache, (1, 2, "high"), prefetched=True)  # a guess evicts no guess
    cache.pin([(1, 1, "high")])
    assert put(cache, (1, 3, "high"))  # a demand read takes a held slot
    assert (1, 0, "high") not in cache and (1, 1, "high") in cache  # never a pinned one
    cache.pin([(1, 3, "high")])
    assert not put(cache, (1, 4, "high"))  # every slot pinned: nothing to evict
    cache.release([(1, 0, "high"), (1, 1, "high")])
    assert not cache._holds


def test_a_slot_a_pending_graph_reads_is_not_reused_before_the_sync():
    """Unpinned, unheld, but used in the current epoch: no read may overwrite its slot until
    everything built so far has been evaluated (``synced``)."""
    cache = slot_cache(2, make_policy("lru"))
    assert put(cache, (1, 0, "high")) and put(cache, (1, 1, "high"))
    slots = cache.pin_and_lookup([(1, 0, "high"), (1, 1, "high")])
    assert sorted(slots) == [0, 1]
    cache.unpin([(1, 0, "high"), (1, 1, "high")])
    assert cache.reserve((1, 2, "high")) is None  # both still read by this epoch's graphs
    cache.synced()
    slot = cache.reserve((1, 2, "high"))
    assert slot in slots
    cache.commit((1, 2, "high"), slot)
    assert len(cache) == 2 and (1, 2, "high") in cache


# --- guesses in scratch slots -------------------------------------------------------------------


def test_a_guess_evicts_nothing_and_joins_the_cache_only_when_used():
    cache = slot_cache(4, make_policy("lru"))
    cache.set_scratch(1, min_regular=1)
    for e in range(3):  # the policy's experts fill the pool but for the scratch slot
        assert put(cache, (1, e, "high"))
    assert cache.reserve_guest((2, 0, "high")) is not None
    assert cache.reserve_guest((2, 1, "high")) is None  # one scratch slot: taken
    regular = set(cache.keys())
    slot = next(s for s in range(4) if s not in [cache.slot(k) for k in regular])
    cache.commit_guest((2, 0, "high"), slot)
    assert set(cache.keys()) == regular | {(2, 0, "high")}  # nothing evicted for it
    assert cache.pin_and_lookup([(2, 0, "high")]) == [slot]  # its layer uses it: adopted
    cache.unpin([(2, 0, "high")])
    assert not cache.is_guest((2, 0, "high")) and (1, 0, "high") not in cache  # LRU's victim left
    cache.synced()
    assert cache.reserve_guest((2, 1, "high")) is not None  # the victim's slot is scratch now
    assert put(cache, (1, 3, "high"))  # a demand read evicts a policy expert, never the guess


def test_a_guess_its_layer_ran_without_leaves_without_a_trace():
    cache = slot_cache(3, make_policy("lru"))
    cache.set_scratch(1, min_regular=1)
    assert put(cache, (1, 0, "high")) and put(cache, (1, 1, "high"))
    slot = cache.reserve_guest((2, 5, "high"))
    cache.commit_guest((2, 5, "high"), slot)
    cache.drop_guest((2, 5, "high"))
    assert (2, 5, "high") not in cache and cache.pools[0].guests == 0
    assert cache.pools[0].free == [slot]
    assert put(cache, (1, 2, "high"))  # no room for the policy: LRU evicts (1, 0), not the guess
    assert (1, 0, "high") not in cache and (1, 1, "high") in cache


def test_a_demand_read_borrows_a_scratch_slot_only_while_every_expert_is_protected():
    cache = slot_cache(3, make_policy("lru"))
    cache.set_scratch(1, min_regular=1)
    assert put(cache, (1, 0, "high")) and put(cache, (1, 1, "high"))
    cache.pin([(1, 0, "high"), (1, 1, "high")])
    slot = cache.reserve((1, 2, "high"))  # nothing to evict: the scratch slot
    assert slot is not None
    cache.commit((1, 2, "high"), slot)
    cache.unpin([(1, 0, "high"), (1, 1, "high")])
    assert cache.pools[0].free == []
    cache.synced()  # the policy gives the scratch room its slot back
    assert len(cache.pools[0].free) == 1 and len(cache) == 2


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_guesses_in_scratch_slots_keep_output_exact_and_leave_no_guest_behind(deep_models, arch):
    dst = deep_models(arch)
    _, text_off, off = _run(dst, expert_residency=0.5, exact=True)
    model, text_on, on = _run(dst, expert_residency=0.5, exact=True, prefetch_layers=1,
                              prefetch_cost_aware=False, prefetch_scratch=2)
    rt = runtime_of(model)
    rt.wait_idle()
    assert text_on == text_off
    assert on["prefetch_issued"] > 0 and on["prefetch_used"] > 0
    assert rt.prefetcher.scratch and [ps.scratch for ps in rt.cache.pools] == [2]
    assert not rt.cache._guests and all(ps.guests == 0 for ps in rt.cache.pools)
    assert not rt.cache._pins and not rt.cache._holds and rt.prefetcher._issued == {}
    ps = rt.cache.pools[0]
    assert ps.resident <= ps.pool.slots - ps.scratch  # the policy's experts left the room free


def test_a_guess_that_lands_between_lookup_and_read_is_a_hit_not_a_second_read(deep_models):
    """The prefetch commits its slot a moment before it leaves the reads in flight: a layer that
    found the expert missing, then no read in flight, finds it resident."""
    model, _ = hobbit_mlx.load(deep_models("qwen3_moe"), expert_residency=0.5, exact=True,
                               prefetch_layers=1, prefetch_scratch=2, progress=False)
    rt = runtime_of(model)
    pf, layer = rt.prefetcher, rt.manifest.layers[1]
    key = (1, next(e for e in range(layer.num_experts) if (1, e, "high") not in rt.cache), "high")
    in_flight = pf.inflight

    def lands_now(k):
        if k == key and k not in rt.cache:
            rt.cache.commit_guest(k, rt.cache.reserve_guest(k))
        return in_flight(k)

    pf.inflight = lands_now
    before = rt.stats.bytes_read
    fetch = offload.Fetch(rt, layer, np.array([key[1]]), "high")
    fetch.finish()
    assert fetch.pending == [] and fetch.slots[0] == rt.cache.slot(key)
    assert rt.stats.bytes_read == before and not rt.cache.is_guest(key)  # adopted, not read


def test_guesses_are_read_as_their_misses_would_be(deep_models):
    """While the lossy techniques serve, a predicted expert the plan would read in 2-bit is
    guessed in 2-bit, and one it would skip if missing is not guessed."""
    model, _ = hobbit_mlx.load(deep_models("qwen3_moe"), expert_residency=0.5, prefetch_layers=1,
                               adapt_to_storage=False, big_little=False, progress=False)
    rt = runtime_of(model)
    k = rt.manifest.experts_per_token
    assert k >= 2 and rt.precision.skip and rt.precision.mixed_precision
    ind = np.arange(2 * k).reshape(2, k)
    weights = np.zeros((2, k), np.float32)
    weights[0, :2] = [0.9, 0.1]  # the second: unimportance 0.9 > t2, skipped if missing
    weights[1, :2] = [0.5, 0.5]  # the second: unimportance 0.5 > t1, read in 2-bit
    experts, precisions = rt.prefetcher._plan(ind, weights, 1, rt.prefetcher._buckets(ind))
    got = dict(zip(experts.tolist(), precisions))
    assert got[0] == "high" and got[k] == "high" and got[k + 1] == "low"
    assert 1 not in got


def test_a_guess_that_finds_its_expert_resident_gives_its_slot_back():
    """Two reads of one expert can be in flight only by a race (the first landed between the
    prefetcher's look and its read); the second never overwrites the first."""
    cache = slot_cache(4, make_policy("seqfreq", num_layers=4))
    cache.set_scratch(2, min_regular=1)
    assert put(cache, (1, 0, "high"))
    slot = cache.reserve_guest((1, 0, "high"))
    before = cache.slot((1, 0, "high"))
    cache.commit_guest((1, 0, "high"), slot)
    assert cache.slot((1, 0, "high")) == before and not cache.is_guest((1, 0, "high"))
    assert cache.pools[0].guests == 0 and slot in cache.pools[0].free


def test_predictions_reach_the_host_in_float32_from_the_layers_sync():
    """A bf16 router's predictions are cast to float32 before the layer's host sync evaluates
    them, so the host copies after it are no second round trip to the GPU; float32 outputs
    pass as they are."""
    from hobbit_mlx.routing import in_float32, router_logits

    logits = mx.random.normal((2, 8)).astype(mx.bfloat16)
    cast = in_float32(logits)
    assert cast.dtype == mx.float32
    mx.eval(cast)  # (the sync)
    np.testing.assert_array_equal(router_logits(cast), np.array(logits.astype(mx.float32)))
    assert router_logits(cast).dtype == np.float32
    inds, weights = in_float32((mx.array([[1, 3]], dtype=mx.uint32), mx.ones((1, 2), mx.bfloat16)))
    assert inds.dtype == mx.uint32 and weights.dtype == mx.float32
    same = mx.zeros((1, 4))
    assert in_float32(same) is same
