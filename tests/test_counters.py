"""The offload counters add up: every expert request is a 4-bit or 2-bit hit, a 4-bit or 2-bit
miss, or skipped, after every generation and in every configuration, hits on prefetch reads still
in flight included (reached on purpose: prefetch reads are held until their layer decides)."""

from __future__ import annotations

import pytest

import hobbit_mlx
from hobbit_mlx.loader import runtime_of
from hobbit_mlx.testing.faults import hold_prefetch_reads

PROMPT = "def fibonacci(n):\n    if n < 2:\n        return n\n"

CONFIGS = {
    "exact": dict(exact=True),
    "defaults": dict(),
    "mixed-skip": dict(mixed_precision=True, t1=0.3, t2=0.6, skip=True, big_little=False,
                       upgrade_after=0),
    "big-little-0.5": dict(big_little=True, little_threshold=0.5, mixed_precision=False),
    "prefetch": dict(prefetch_layers=2, prefetch_cost_aware=False, exact=True),
    "prefetch-low": dict(prefetch_layers=1, prefetch_cost_aware=False, prefetch_low_precision=True,
                         t1=0.3),
    "prefill-low": dict(prefill_low_precision=0.3, big_little=False),
    "resident": dict(expert_residency=1.0, exact=True),
    "partly-lazy": dict(expert_residency=0.75, exact=True),  # some layers all resident: lazy
}


def _requests_add_up(stats: dict) -> None:
    parts = (stats["hits_high"] + stats["hits_low"] + stats["misses_high"] + stats["misses_low"]
             + stats["skipped"])
    assert parts == stats["expert_requests"] > 0, {k: stats[k] for k in (
        "expert_requests", "hits_high", "hits_low", "misses_high", "misses_low", "skipped",
        "hits_in_flight")}
    assert 0 <= stats["hits_in_flight"] <= stats["hits_high"] + stats["hits_low"]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_requests_add_up_after_every_generation(deep_models, name):
    options = dict(expert_residency=0.25, **CONFIGS[name]) if "expert_residency" not in \
        CONFIGS[name] else CONFIGS[name]
    model, tok = hobbit_mlx.load(deep_models("qwen3_moe"), progress=False, **options)
    for prompt in (PROMPT, PROMPT[::-1]):  # a second sequence counts on from the first
        hobbit_mlx.generate(model, tok, prompt, max_tokens=12)
        _requests_add_up(hobbit_mlx.offload_stats(model))


def test_hits_on_reads_in_flight_are_counted(deep_models):
    model, tok = hobbit_mlx.load(deep_models("mixtral"), expert_residency=0.25, exact=True,
                                 prefetch_layers=1, prefetch_cost_aware=False, progress=False)
    rt = runtime_of(model)
    timed_out = hold_prefetch_reads(rt)
    hobbit_mlx.generate(model, tok, PROMPT, max_tokens=12)
    stats = hobbit_mlx.offload_stats(model)
    assert not timed_out
    assert stats["hits_in_flight"] > 0  # the branch under test was taken
    assert stats["prefetch_used"] > 0 and stats["prefetch_cancelled"] > 0
    _requests_add_up(stats)
    assert not rt.cache._pins and not rt.cache._holds


def test_layers_all_resident_run_lazily_beside_layers_that_miss(deep_models):
    """At 3/4 residency some layers hold all their experts: their calls stay lazy (hits counted
    later, and told to the policy) while other layers miss; the text is exact mode's."""
    dst = deep_models("qwen3_moe")
    whole, tok = hobbit_mlx.load(dst, expert_residency=1.0, exact=True, progress=False)
    expected = hobbit_mlx.generate(whole, tok, PROMPT, max_tokens=12)
    model, tok = hobbit_mlx.load(dst, expert_residency=0.75, exact=True, progress=False)
    assert hobbit_mlx.generate(model, tok, PROMPT, max_tokens=12) == expected
    stats = hobbit_mlx.offload_stats(model)
    assert stats["misses_high"] > 0 and stats["layer_calls"] > stats["host_syncs"]
    _requests_add_up(stats)
    assert not runtime_of(model).cache._pins


@pytest.mark.parametrize("threads", [True, False], ids=["reader-threads", "inline-reads"])
def test_bytes_read_are_the_bytes_the_reader_read(deep_models, monkeypatch, threads):
    """Demand reads (on reader threads, or inline) and prefetch reads each add their bytes once."""
    import hobbit_mlx.fetch as fetch_module

    monkeypatch.setattr(fetch_module, "INLINE_READ_S", 0.0 if threads else float("inf"))
    model, tok = hobbit_mlx.load(deep_models("mixtral"), expert_residency=0.25, exact=True,
                                 prefetch_layers=1, prefetch_cost_aware=False, progress=False)
    rt = runtime_of(model)
    before = rt.stats.bytes_read, rt.reader.bytes_read
    hobbit_mlx.generate(model, tok, PROMPT, max_tokens=12)
    rt.wait_idle()
    stats = hobbit_mlx.offload_stats(model)
    assert stats["misses_high"] > 0 and stats["prefetch_bytes"] > 0
    assert rt.stats.bytes_read - before[0] == rt.reader.bytes_read - before[1] > 0
