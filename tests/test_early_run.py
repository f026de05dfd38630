"""The early run: a decode call's resident 4-bit experts start computing before the router sync
(through the device remap, other choices masked to zero), and only the misses and 2-bit parts
run after it. It must change nothing: every configuration decodes the same logits with it on
(``overlap_io``) and off, including plans that drop or demote a resident expert, where the early
output goes unused."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache

import hobbit_mlx
from hobbit_mlx.loader import runtime_of

TOKENS = [(11 * i + 5) % 200 + 1 for i in range(40)]
LOSSY = dict(adapt_to_storage=False, t1=0.5, t2=0.8)  # (lossy on a warm page cache too)


def _decode(dst, **kw) -> tuple[np.ndarray, dict]:
    """Logits of a 40-token text decoded one token at a time (the prompt cache grows)."""
    model, _ = hobbit_mlx.load(dst, expert_residency=0.3, progress=False, **kw)
    cache = make_prompt_cache(model)
    logits = []
    for t in TOKENS:
        out = model(mx.array([[t]]), cache=cache)
        mx.eval(out)
        logits.append(np.array(out[0, -1]))
    stats = hobbit_mlx.offload_stats(model)
    runtime_of(model).close()
    return np.stack(logits), stats


@pytest.mark.parametrize("name,kw", [
    ("exact", dict(exact=True)),
    ("lossy", LOSSY),
    ("little-drops-resident", dict(LOSSY, little_keeps_resident=False, little_threshold=0.0)),
    ("2-bit-until-hot", dict(LOSSY, upgrade_after=1.5)),
])
def test_early_run_changes_no_logit(tiny_factory, name, kw):
    _, dst = tiny_factory("qwen3_moe")
    with_early, on = _decode(dst, **kw)
    without, off = _decode(dst, overlap_io=False, **kw)
    np.testing.assert_array_equal(with_early, without)
    assert on["misses_high"] + on["misses_low"] > 0 and on["hits_high"] > 0
    assert on["early_runs"] > 0 and off["early_runs"] == off["early_unused"] == 0
    if name == "little-drops-resident":  # a resident expert dropped: its early output is not used
        assert on["early_unused"] > 0


def test_early_run_with_prefetch_reading_into_the_same_pool(tiny_factory):
    """Prefetch reserves slots (evicting) between the sync and the call's fetch, and its reads
    land meanwhile: the slots the early run reads are stamped first, and an expert that landed
    after the early run was built runs after the sync. The logits stay exact."""
    _, dst = tiny_factory("qwen3_moe")
    want, _ = _decode(dst, exact=True, overlap_io=False)
    got, stats = _decode(dst, exact=True, prefetch_layers=2)
    np.testing.assert_array_equal(got, want)
    assert stats["prefetch_issued"] > 0 and stats["early_runs"] > 0


def test_no_slot_the_early_run_reads_is_evicted_before_it_ran(tiny_factory, monkeypatch):
    """Between the sync and the call's output, prefetch reservations evict (LRU would pick the
    current layer's experts: used a whole token ago). None may be one the early run reads."""
    import hobbit_mlx.offload as offload

    _, dst = tiny_factory("qwen3_moe")
    model, _ = hobbit_mlx.load(dst, expert_residency=0.3, exact=True, prefetch_layers=2,
                               policy="lru", progress=False)
    rt = runtime_of(model)
    reading: set = set()  # keys the early run of the call in progress reads
    start, synced = offload.OffloadedSwitch._start_resident, offload.OffloadedSwitch._synced_call

    def start_and_note(self, x, indices):
        early = start(self, x, indices)
        if early is not None:
            chosen = set(np.array(indices).reshape(-1).tolist())
            reading.update((self.layer.layer, e, "high") for e in chosen if early[1][e])
        return early

    def call_then_forget(self, x, indices):
        try:
            return synced(self, x, indices)
        finally:
            reading.clear()

    # A call whose misses come in groups evaluates what it has built, the early run included,
    # before the next group's reads (the epoch moves on): from then on its slots may be written.
    compute, cache_synced, computing = offload.OffloadedSwitch._compute, rt.cache.synced, False

    def compute_and_note(self, *args):
        nonlocal computing
        computing = True
        try:
            return compute(self, *args)
        finally:
            computing = False

    def synced_and_forget():
        if computing:
            reading.clear()
        cache_synced()

    evicted_while_reading = []
    evict = rt.cache._evict
    rt.cache._evict = lambda key: evicted_while_reading.append(key in reading) or evict(key)
    rt.cache.synced = synced_and_forget
    monkeypatch.setattr(offload.OffloadedSwitch, "_start_resident", start_and_note)
    monkeypatch.setattr(offload.OffloadedSwitch, "_synced_call", call_then_forget)
    monkeypatch.setattr(offload.OffloadedSwitch, "_compute", compute_and_note)
    cache = make_prompt_cache(model)
    for t in TOKENS:
        mx.eval(model(mx.array([[t]]), cache=cache))
    assert rt.stats.early_runs > 0 and rt.stats.prefetch_issued > 0
    assert len(evicted_while_reading) > 0 and not any(evicted_while_reading)
