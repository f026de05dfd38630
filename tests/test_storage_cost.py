"""What the storage-cost techniques promise: exact outputs under slow simulated storage with
cancelled and promoted prefetch reads, guesses read only in free storage time and only when worth
their victim, 2-bit reads until an expert proves hot, skips of misses only, and the lossy
techniques only while reads are dear."""

from __future__ import annotations

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest

import hobbit_mlx
from hobbit_mlx import offload
from hobbit_mlx.guess_value import GuessValue
from hobbit_mlx.loader import runtime_of
from hobbit_mlx.policies import make_policy
from hobbit_mlx.precision import ExpertHeat
from hobbit_mlx.read_cost import ReadCost
from hobbit_mlx.storage import StorageModel
from hobbit_mlx.testing.slot_cache import put, slot_cache

PROMPT = "def fibonacci(n):\n    if n < 2:\n        return n\n"
SLOW = StorageModel(bandwidth=1e6)  # a tiny expert read takes milliseconds: reads stay in flight


def test_exact_output_under_slow_storage_with_prefetch(tiny_factory):
    """Offloading never changes the output: with reads slow enough that prefetch reads are
    cancelled and promoted while layers run, greedy tokens still equal mlx-lm's."""
    src, dst = tiny_factory("qwen3_moe")
    ref, tok = mlx_lm.load(str(src))
    ref.set_dtype(mx.float32)
    expected = mlx_lm.generate(ref, tok, PROMPT, max_tokens=24)
    model, tokenizer = hobbit_mlx.load(dst, expert_residency=0.4, exact=True, prefetch_layers=1,
                                       prefetch_width=2.0, simulated_storage=SLOW, progress=False)
    rt = runtime_of(model)
    pf = rt.prefetcher
    idle = pf._idle_seconds
    pf._idle_seconds = lambda d: max(idle(d), 1.0)  # read every guess: some are left unused
    got = hobbit_mlx.generate(model, tokenizer, PROMPT, max_tokens=24)
    rt.wait_idle()
    assert got == expected
    stats = hobbit_mlx.offload_stats(model)
    assert stats["prefetch_issued"] > 0 and stats["misses_high"] > 0
    assert stats["prefetch_cancelled"] > 0, "guesses their layer did not need were stopped"
    assert rt.reader.device.demand_bytes > 0 and rt.reader.device.prefetch_bytes > 0
    assert not rt.cache._pins and not rt.cache._holds and pf._tickets == {}


def test_no_guess_is_read_without_free_storage_time(tiny_factory):
    """Cost-aware prefetch reads guesses only in the storage time the layers in between leave
    free; the same model without cost awareness reads them all."""
    _, dst = tiny_factory("mixtral")
    issued = {}
    for cost_aware in (True, False):
        model, tok = hobbit_mlx.load(dst, expert_residency=0.4, prefetch_layers=1,
                                     prefetch_cost_aware=cost_aware, progress=False)
        rt = runtime_of(model)
        rt.prefetcher._idle_seconds = lambda d: 0.0  # storage booked until the layer runs
        hobbit_mlx.generate(model, tok, PROMPT, max_tokens=16)
        rt.wait_idle()
        issued[cost_aware] = hobbit_mlx.offload_stats(model)["prefetch_issued"]
        rt.close()
    assert issued[True] == 0 < issued[False]


def test_a_guess_evicts_only_a_victim_worth_less():
    """Admission control: with the pool full, a guess takes a slot only when its chance of use
    beats the measured chance that the victim is needed again; a free slot takes any guess."""
    cache = slot_cache(2, make_policy("lru", num_layers=4))
    assert put(cache, (1, 0, "high")) and put(cache, (1, 1, "high"))
    cache.synced()
    ps = cache.pools[0]
    ps.victim_reuse.hits, ps.victim_reuse.total = 5.0, 10.0  # victims came back half the time
    assert cache.reserve((1, 2, "high"), prefetched=True, worth=0.3) is None
    assert (1, 0, "high") in cache and (1, 1, "high") in cache
    slot = cache.reserve((1, 2, "high"), prefetched=True, worth=0.8)
    assert slot is not None and (1, 0, "high") not in cache  # LRU's victim made room


def test_ghosts_measure_how_often_a_victim_is_needed_again():
    cache = slot_cache(1, make_policy("lru", num_layers=4), experts=128)
    ps = cache.pools[0]
    before = ps.victim_reuse.value
    for step in range(20):  # each new expert evicts the last one, which the layer needs again
        assert put(cache, (2, step % 2, "high"))
        cache.synced()
        cache.score_ghosts(2, [0, 1])
    assert ps.victim_reuse.value > max(before, 0.8)
    for step in range(100):  # now victims are never needed again
        assert put(cache, (2, 10 + step, "high"))
        cache.synced()
        cache.score_ghosts(2, [99])
    assert ps.victim_reuse.value < 0.2
    cache.score_ghosts(2, [10], learn=False)  # (a prompt chunk only clears them)


def test_guess_value_learns_per_rank():
    value = GuessValue(top_k=2)
    assert value.bucket(0) == value.bucket(1) == 0 and value.bucket(2) == 1 and value.bucket(99) == 3
    for _ in range(50):
        value.observe(1, {5: 0, 6: 0, 7: 1, 8: 1}, used={5, 6})
    assert value.probability(1, 0) > 0.9 and value.probability(1, 1) < 0.1
    assert value.probability(2, 0) == pytest.approx(0.6)  # nothing seen at distance 2: the prior


def test_expert_heat():
    heat = ExpertHeat({0: 4}, threshold=1.5)
    heat.see(0, np.array([1, 1, 2]))
    assert not heat.hot(0, 1)  # chosen once (twice in one call counts once)
    heat.see(0, np.array([1]))
    assert heat.hot(0, 1) and not heat.hot(0, 2) and not heat.hot(0, 3)
    for _ in range(10):
        heat.see(0, np.array([3]))
    assert not heat.hot(0, 1)  # faded
    heat.reset()
    assert not heat.hot(0, 3)


def test_four_bit_misses_only_for_hot_experts(tiny_factory, monkeypatch):
    """With ``upgrade_after``, a miss reads the 4-bit copy only for an expert that proved hot;
    every other miss reads 2-bit. Without it, important cold experts are read in 4-bit."""
    _, dst = tiny_factory("qwen3_moe")
    cold_high_reads = {}
    for upgrade_after in (1.5, 0.0):
        model, tok = hobbit_mlx.load(dst, expert_residency=0.3, mixed_precision=True, adapt_to_storage=False,
                                     prefetch_layers=0, upgrade_after=upgrade_after, progress=False)
        rt = runtime_of(model)
        heat = rt.heat or ExpertHeat({l.layer: l.num_experts for l in rt.manifest.layers}, 1.5)
        seen = []

        class SpyFetch(offload.Fetch):
            def __init__(self, rt_, layer, experts, precision):
                super().__init__(rt_, layer, experts, precision)
                if precision == "high":
                    seen.extend(not heat.hot(layer.layer, self.keys[i][1])
                                for i, _, slot in self.pending if slot is not None)

        if rt.heat is None:  # the control run keeps its own heat, as the runtime would
            see = offload.OffloadedSwitch._serve

            def spy_serve(self, flat, level, _see=see):
                heat.see(self.layer.layer, flat if level is None else flat[level != 2])
                return _see(self, flat, level)
            monkeypatch.setattr(offload.OffloadedSwitch, "_serve", spy_serve)
        monkeypatch.setattr(offload, "Fetch", SpyFetch)
        hobbit_mlx.generate(model, tok, PROMPT * 2, max_tokens=24)
        stats = hobbit_mlx.offload_stats(model)
        assert stats["misses_low"] > 0
        cold_high_reads[upgrade_after] = sum(seen)
        monkeypatch.undo()
        rt.close()
    assert cold_high_reads[1.5] == 0 < cold_high_reads[0.0]


def test_skip_drops_only_misses(tiny_factory):
    """HOBBIT's skip: a low-importance slot is skipped only when its expert is not resident. With
    every expert resident nothing is skipped and the output is the unskipped one; with few
    resident, misses are skipped and fewer bytes are read."""
    _, dst = tiny_factory("qwen3_moe")
    lossy = dict(mixed_precision=True, adapt_to_storage=False, t1=0.3, t2=0.5, big_little=False, upgrade_after=0,
                 prefetch_layers=0, progress=False)
    tokens = mx.array([[3, 5, 7, 11, 13, 17, 19, 23]])
    outputs, stats = {}, {}
    for skip in (True, False):
        for residency in (1.0, 0.2):
            model, tok = hobbit_mlx.load(dst, expert_residency=residency, skip=skip, **lossy)
            outputs[skip, residency] = np.array(model(tokens))
            hobbit_mlx.generate(model, tok, PROMPT, max_tokens=12)
            stats[skip, residency] = hobbit_mlx.offload_stats(model)
            runtime_of(model).close()
    np.testing.assert_array_equal(outputs[True, 1.0], outputs[False, 1.0])
    assert stats[True, 1.0]["skipped"] == 0
    assert stats[True, 0.2]["skipped"] > 0 and stats[False, 0.2]["skipped"] == 0
    assert stats[True, 0.2]["bytes_read"] < stats[False, 0.2]["bytes_read"]
    assert not np.array_equal(outputs[True, 0.2], outputs[False, 0.2])


class _FixedReader:
    def __init__(self, seconds_per_byte: float, latency: float = 0.0):
        self.spb, self.latency = seconds_per_byte, latency

    def seconds_per_byte(self) -> float:
        return self.spb

    def latency_seconds(self, reads: int) -> float:
        return self.latency * reads


def test_read_cost_measures_decode_layer_time():
    cost = ReadCost(_FixedReader(1e-6), topk_bytes=1000)  # a top-k read takes 1 ms
    assert cost.dear()  # nothing measured yet: reads are taken to be dear
    cost.on_sync(10.0, 0.0, 0, decode=True)
    cost.on_sync(10.004, 0.002, 2, decode=True)  # 2 layers in 4 ms, 2 of them waiting for reads
    assert cost.layer_seconds == pytest.approx(0.001)
    cost.on_sync(10.5, 0.002, 0, decode=True)  # the next token: sampling is not layer compute
    cost.on_sync(20.0, 0.002, 1, decode=False)  # nor is a prompt chunk
    cost.on_sync(21.0, 0.002, 2, decode=True)
    assert cost.layer_seconds == pytest.approx(0.001)
    cost.on_sync(21.0015, 0.002, 3, decode=True)
    assert cost.layer_seconds == pytest.approx(0.8 * 0.001 + 0.2 * 0.0015)
    cost.on_sync(21.0515, 0.002, 4, decode=True)  # a 50 ms stall counts as twice the average
    assert cost.layer_seconds == pytest.approx(0.8 * 0.0011 + 0.2 * 0.0022)
    assert not cost.dear()  # a 1 ms read against 1.32 ms of compute
    cost.reader.spb = 1e-5
    assert cost.dear()


def test_read_cost_counts_per_read_latency():
    """Small experts on a device with a long latency per read: the latency, not the bytes, makes
    reads dear."""
    cost = ReadCost(_FixedReader(1e-9, latency=0.0), topk_bytes=1000, top_k=8)
    cost.on_sync(0.0, 0.0, 0, decode=True)
    cost.on_sync(0.001, 0.0, 1, decode=True)  # 1 ms of compute per layer
    assert not cost.dear()  # 1 us of bytes
    cost.reader.latency = 0.5e-3
    assert cost.read_seconds() == pytest.approx(1e-6 + 8 * 0.5e-3) and cost.dear()


def test_simulated_latency_counts_once_per_queue_depth_batch_of_commands(tmp_path, tiny_factory):
    """A record read in place is one command per run of spans (an expert's rows of each stacked
    tensor). Read together, a queue-depth batch of commands waits out the latency once; read one
    after another, each of a record's runs waits it out in turn."""
    _, dst = tiny_factory("qwen3_moe")
    model, _ = hobbit_mlx.load(dst, expert_residency=0.3, progress=False, parallel_runs=True,
                               simulated_storage="1GB/s,latency=100us,depth=4")
    reader = runtime_of(model).reader
    runs = reader.runs_per_record
    assert runs == 9  # (gate, up, down) x (weight, scales, biases), read in place
    assert reader.latency_seconds(0) == 0.0
    assert reader.latency_seconds(1) == pytest.approx(3 * 100e-6)  # 9 commands, 4 at a time
    assert reader.latency_seconds(4) == pytest.approx(9 * 100e-6)
    reader.parallel_runs = False  # (the default)
    assert reader.latency_seconds(1) == pytest.approx(9 * 100e-6)
    assert reader.latency_seconds(5) == pytest.approx(2 * 9 * 100e-6)
    runtime_of(model).close()


@pytest.mark.parametrize("bandwidth, lossy", [(1e6, True), (1e11, False)])
def test_lossy_techniques_only_while_reads_are_dear(tiny_factory, bandwidth, lossy):
    """With reads far slower than compute, the defaults (and big-little, off by default) read
    2-bit copies and run confident tokens little; with reads far faster, they read 4-bit only and
    run every token big, as exact mode does, unless ``adapt_to_storage`` is off."""
    _, dst = tiny_factory("qwen3_moe")
    storage = StorageModel(bandwidth=bandwidth)
    for adapt in (True, False):
        model, tok = hobbit_mlx.load(dst, expert_residency=0.3, simulated_storage=storage,
                                     adapt_to_storage=adapt, t1=0.3, big_little=True,
                                     little_threshold=0.6, progress=False)
        # (top-2 of random routing: a token's second expert weighs 0.5 or less, so above t1 it
        # reads 2-bit; a token whose first weighs 0.6 or more runs little)
        rt = runtime_of(model)
        hobbit_mlx.generate(model, tok, PROMPT, max_tokens=8)  # compute is measured
        assert rt.read_cost.layer_seconds > 0 and rt.read_cost.dear() == lossy
        hobbit_mlx.reset_stats(model)
        hobbit_mlx.generate(model, tok, PROMPT, max_tokens=8)
        stats = hobbit_mlx.offload_stats(model)
        rt.close()
        used = stats["misses_low"] > 0 and stats["little_token_share"] > 0
        assert used == (lossy or not adapt), (adapt, stats)
        if not used:
            assert stats["misses_low"] == stats["hits_low"] == stats["skipped"] == 0


@pytest.mark.parametrize("bandwidth, adapt, low_pool", [(1e6, True, True), (1e11, True, False),
                                                        (1e11, False, True)])
def test_the_2bit_pool_exists_only_while_reads_are_dear(tiny_factory, bandwidth, adapt, low_pool):
    """Once reads measure cheap, the next sequence's plan gives the 2-bit pool's memory to the
    4-bit pool (its copies would serve nothing); slow reads keep it, as does adapt_to_storage off."""
    _, dst = tiny_factory("qwen3_moe")
    model, tok = hobbit_mlx.load(dst, expert_residency=0.3, progress=False, adapt_to_storage=adapt,
                                 simulated_storage=StorageModel(bandwidth=bandwidth))
    rt = runtime_of(model)
    def slots(precision: str) -> int:
        pools = {id(p): p for p in (rt.cache.pool_for(layer.layer, precision)
                                    for layer in rt.manifest.layers) if p is not None}
        return sum(p.slots for p in pools.values())

    high, low = slots("high"), slots("low")
    assert low > 0  # (nothing measured at load: reads are taken to be dear)
    hobbit_mlx.generate(model, tok, PROMPT, max_tokens=8)  # compute and reads are measured
    hobbit_mlx.generate(model, tok, PROMPT, max_tokens=8)  # the next sequence is planned on them
    if low_pool:
        assert slots("low") == low and slots("high") == high
    else:
        assert slots("low") == 0 and slots("high") > high
        assert hobbit_mlx.offload_stats(model)["peak_memory_bytes"] <= rt.plan.budget_bytes
    rt.close()
