"""End to end: a generation with prefetch on and tiny pools never evicts an expert that a layer
call has pinned (an expert it needs: resident, or being read by a prefetch), and its text is the
text without prefetch (exact mode: mlx-lm's, see test_exact.py).

Where pins matter: a layer waits on a prefetch read in flight; the read lands (resident, held,
not yet stamped as used by this call), and a demand read of the same call then finds no slot
but held ones. The test makes that happen on purpose: prefetch reads wait until their layer
decides on them, and a layer that asks for one waits until it has landed before going on.
Every eviction is checked against the pins at that moment."""

from __future__ import annotations

import time

import pytest

import hobbit_mlx
import hobbit_mlx.fetch as fetch_module
from hobbit_mlx.loader import runtime_of
from hobbit_mlx.testing.faults import hold_prefetch_reads

PROMPT = "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) +"


def _land_when_promoted(pf) -> None:
    """A layer that waits on a prefetch read goes on only once the read has landed."""
    promote = pf.promote

    def promote_and_land(key):
        promote(key)
        while True:
            with pf._lock:
                if key not in pf._inflight:
                    return
            time.sleep(0.0002)

    pf.promote = promote_and_land


@pytest.mark.parametrize("arch,layers_ahead", [("qwen3_moe", 1), ("mixtral", 2)])
def test_a_generation_with_prefetch_never_evicts_a_pinned_expert(deep_models, monkeypatch,
                                                                  arch, layers_ahead):
    dst = deep_models(arch)
    options = dict(expert_residency=0.25, exact=True, policy="lru", progress=False)
    plain, tok = hobbit_mlx.load(dst, **options)
    expected = hobbit_mlx.generate(plain, tok, PROMPT, max_tokens=24)

    monkeypatch.setattr(fetch_module, "INLINE_READ_S", 0.0)  # every read on a reader thread
    model, tok = hobbit_mlx.load(dst, prefetch_layers=layers_ahead, prefetch_width=1.0,
                                 prefetch_cost_aware=False, **options)
    rt = runtime_of(model)
    timed_out = hold_prefetch_reads(rt)
    _land_when_promoted(rt.prefetcher)
    cache = rt.cache
    evictions, pinned_evicted = [], []
    evict = cache._evict

    def checked_evict(key):
        evictions.append(key)
        if cache._pins[key]:
            pinned_evicted.append(key)
        return evict(key)

    monkeypatch.setattr(cache, "_evict", checked_evict)
    assert hobbit_mlx.generate(model, tok, PROMPT, max_tokens=24) == expected
    rt.wait_idle()
    stats = hobbit_mlx.offload_stats(model)
    assert not timed_out
    # the situation under test arose: evictions, layers that waited on prefetch reads in flight
    assert evictions and stats["hits_in_flight"] > 0 and stats["misses_high"] > 0
    assert pinned_evicted == []
    assert not cache._pins and not cache._holds


def test_a_prefetch_read_is_resident_once_the_layer_that_waited_for_it_goes_on(deep_models,
                                                                              monkeypatch):
    """A prefetch read's future completes on its reader thread a moment before the thread makes
    the expert resident (the future's callbacks run after its waiters wake). A layer waiting on
    the read must not take that moment for a failed read (reading the expert again, or finding
    no slot for it). The moment is widened here: each prefetch read's completion handler starts
    late."""
    dst = deep_models("mixtral")
    options = dict(expert_residency=0.25, exact=True, progress=False)
    plain, tok = hobbit_mlx.load(dst, **options)
    expected = hobbit_mlx.generate(plain, tok, PROMPT, max_tokens=12)

    model, tok = hobbit_mlx.load(dst, prefetch_layers=1, prefetch_cost_aware=False, **options)
    rt = runtime_of(model)
    timed_out = hold_prefetch_reads(rt)  # layers wait on prefetch reads in flight
    done = rt.prefetcher._done

    def late_done(key, slot, fut):
        time.sleep(0.02)
        done(key, slot, fut)

    monkeypatch.setattr(rt.prefetcher, "_done", late_done)
    read_into = rt.reader.read_into
    demand_reads = []

    def counted(entry, expert, pool, slot, background=False, ticket=None):
        if not background:
            demand_reads.append((entry, expert))
        return read_into(entry, expert, pool, slot, background, ticket)

    rt.reader.read_into = counted
    assert hobbit_mlx.generate(model, tok, PROMPT, max_tokens=12) == expected
    rt.wait_idle()
    stats = hobbit_mlx.offload_stats(model)
    assert not timed_out and stats["hits_in_flight"] > 0
    # every waited-on prefetch read served its layer: demand reads are the misses only
    assert len(demand_reads) == stats["misses_high"]
    assert not rt.cache._pins and not rt.cache._holds
    for ps in rt.cache.pools:
        resident = [s for s, k in enumerate(ps.key_of) if k is not None]
        assert sorted(resident + ps.free) == list(range(ps.pool.slots)), "a slot was lost"
        assert all(rt.cache.slot(ps.key_of[s]) == s for s in resident)
