"""Slot pools: exactness under heavy eviction, slots never rewritten under a pending graph, reader
threads that run no MLX op, and a budget that holds while the KV cache grows."""

from __future__ import annotations

import gc
import threading
from concurrent.futures import ThreadPoolExecutor

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import load_model

import hobbit_mlx
from hobbit_mlx.budget import ContextBudgetError
from hobbit_mlx.loader import runtime_of


def _reference(src):
    model, _ = load_model(src)
    model.set_dtype(mx.float32)
    return model


def _tokens(n: int, seed: int) -> mx.array:
    rng = np.random.default_rng(seed)
    return mx.array(rng.integers(1, 200, size=(1, n)))


def test_bit_equal_after_thousands_of_evictions(tiny_factory):
    """Token by token through the smallest pool (one layer's top-k): every call evicts, and every
    logit still equals mlx-lm's bit for bit."""
    src, dst = tiny_factory("qwen3_moe")
    ref = _reference(src)
    model, _ = hobbit_mlx.load(dst, expert_residency=0.0, exact=True, prefetch_layers=0,
                               progress=False)
    tokens = _tokens(400, seed=1)
    ref_cache, cache = make_prompt_cache(ref), make_prompt_cache(model)
    for i in range(tokens.shape[1]):
        t = tokens[:, i:i + 1]
        np.testing.assert_array_equal(np.array(model(t, cache=cache)), np.array(ref(t, cache=ref_cache)))
    stats = hobbit_mlx.offload_stats(model)
    assert stats["misses_high"] >= 1000  # each miss beyond the first k evicted an expert


def test_slot_not_rewritten_under_a_pending_graph(tiny_factory):
    """A graph built on the pools and evaluated only after other calls evicted and re-read its
    slots must still see the experts it was built with."""
    src, dst = tiny_factory("qwen3_moe")
    ref = _reference(src)
    a, b = _tokens(24, seed=2), _tokens(24, seed=3)
    want_a = np.array(ref(a))
    model, _ = hobbit_mlx.load(dst, expert_residency=0.0, exact=True, prefetch_layers=0,
                               progress=False)
    lazy_a = model(a)  # built, not evaluated: its last layer's experts are in the pool now
    before = hobbit_mlx.offload_stats(model)["misses_high"]
    model(b)  # reads b's experts into the same few slots
    assert hobbit_mlx.offload_stats(model)["misses_high"] > before
    np.testing.assert_array_equal(np.array(lazy_a), want_a)


def test_prefetch_writes_slots_while_the_model_computes(tiny_factory):
    """Prefetch threads write slots concurrently with compute; greedy output equals mlx-lm's."""
    src, dst = tiny_factory("qwen3_moe")
    ref, tok = mlx_lm.load(str(src))
    ref.set_dtype(mx.float32)
    expected = mlx_lm.generate(ref, tok, "def main():", max_tokens=48)
    model, tokenizer = hobbit_mlx.load(dst, expert_residency=0.5, exact=True, prefetch_layers=1,
                                       progress=False)
    assert hobbit_mlx.generate(model, tokenizer, "def main():", max_tokens=48) == expected
    stats = hobbit_mlx.offload_stats(model)
    assert stats["prefetch_issued"] > 0 and stats["misses_high"] > 0


def _foreign_stream_pool(workers: int, prefix: str) -> ThreadPoolExecutor:
    """Worker threads whose default MLX stream belongs to another thread: any MLX op they
    evaluate raises "There is no Stream(...) in current thread" (as every op in a thread without
    a stream does on Apple GPUs)."""
    foreign = mx.new_stream(mx.cpu)
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix=prefix,
                              initializer=mx.set_default_stream, initargs=(foreign,))


def test_foreign_stream_threads_cannot_run_mlx():
    """The trap the next test relies on: an MLX op in such a thread fails."""
    pool = _foreign_stream_pool(1, "trap")
    with pytest.raises(RuntimeError, match="Stream"):
        pool.submit(lambda: mx.eval(mx.ones((2,)) + 1)).result()
    pool.shutdown()


def test_reader_and_prefetch_threads_run_no_mlx_op(tiny_factory):
    src, dst = tiny_factory("qwen3_moe")
    ref = _reference(src)
    tokens = _tokens(32, seed=4)
    want = np.array(ref(tokens))
    model, _ = hobbit_mlx.load(dst, expert_residency=0.25, mixed_precision=False, prefetch_layers=1,
                               progress=False)
    reader = runtime_of(model).reader
    reader.pool.shutdown()
    reader.background_pool.shutdown()
    reader.pool = _foreign_stream_pool(4, "hobbit-io")
    reader.background_pool = _foreign_stream_pool(2, "hobbit-prefetch")
    cache = make_prompt_cache(model)
    got = model(tokens[:, :24], cache=cache)
    mx.eval(got)
    for i in range(24, 32):  # decode: prefetch reads run while the model computes
        mx.eval(model(tokens[:, i:i + 1], cache=cache))
    np.testing.assert_array_equal(np.array(got), want[:, :24])
    stats = hobbit_mlx.offload_stats(model)
    assert stats["misses_high"] > 0 and stats["prefetch_issued"] > 0


def test_peak_within_budget_while_kv_growth_shrinks_the_pools(tiny_factory):
    """A sequence that outgrows its KV reserve takes the KV from the pools: they are rebuilt
    smaller, peak memory stays within the budget, and the output stays exact."""
    src, dst = tiny_factory("qwen3_moe")
    probe, _ = hobbit_mlx.load(dst, exact=True, prefetch_layers=0, max_context=256, progress=False)
    plan = runtime_of(probe).plan
    runtime_of(probe).close()
    # Every expert fits beside a short context; at 1,000 tokens a quarter of them do (a margin
    # wider than the activation measurement moves between loads).
    budget = (plan.dense_bytes + plan.activation_for(500, 1000) + plan.kv_bytes(1000)
              + plan.all_high_bytes // 4)
    tokens = _tokens(1000, seed=5)
    chunks = [(0, 500)] + [(i, i + 100) for i in range(500, 1000, 100)]
    def run(model, cache, i, j):  # as mlx-lm prefills: the chunk, then the logits of one token
        model(tokens[:, i:j - 1], cache=cache)
        mx.eval([c.state for c in cache])
        return np.array(model(tokens[:, j - 1:j], cache=cache))

    ref = _reference(src)
    ref_cache = make_prompt_cache(ref)
    want = [run(ref, ref_cache, i, j) for i, j in chunks]
    del ref, ref_cache
    gc.collect()
    model, _ = hobbit_mlx.load(dst, memory_budget=budget, exact=True, prefetch_layers=0,
                               max_context=256, progress=False)
    rt = runtime_of(model)
    slots_before = rt.cache.pools[0].pool.slots
    assert slots_before * rt.cache.pools[0].pool.slot_nbytes == plan.all_high_bytes
    cache = make_prompt_cache(model)
    for (i, j), w in zip(chunks, want):
        np.testing.assert_array_equal(run(model, cache, i, j), w)
    stats = hobbit_mlx.offload_stats(model)
    assert stats["pool_rebuilds"] >= 1
    assert rt.cache.pools[0].pool.slots < slots_before
    assert stats["kv_reserve_tokens"] >= 1000
    assert stats["peak_memory_bytes"] <= stats["budget_bytes"] == budget, (stats["peak_memory_bytes"], budget, rt.plan, plan)


def test_pools_rebuilt_after_a_fully_resident_sequence_free_the_old_buffers(tmp_path):
    """A short sequence holds every expert (its calls read the pool through slices of it); a
    longer one then shrinks the pools. The slices must not keep the old pool's buffers alive:
    they held them outside the budget (peaks of 1.3-1.9x the budget). Experts take most of the
    memory here, as in a real model."""
    from convert import convert
    from hobbit_mlx.testing.tiny_models import make_tiny_model

    src = make_tiny_model("qwen3_moe", tmp_path / "mlx", config_overrides={
        "hidden_size": 128, "moe_intermediate_size": 128, "num_experts": 32, "head_dim": 64,
        "num_hidden_layers": 4, "num_key_value_heads": 4})
    model, tokenizer = hobbit_mlx.load(convert(src, tmp_path / "hobbit", progress=False),
                                       memory_budget="8MB", exact=True, progress=False)
    rt = runtime_of(model)
    hobbit_mlx.generate(model, tokenizer, _tokens(20, seed=20)[0].tolist(), max_tokens=20)
    assert rt.cache.all_high_resident
    rebuilds = 0
    for n in (300, 20, 150):
        hobbit_mlx.reset_stats(model)
        hobbit_mlx.generate(model, tokenizer, _tokens(n, seed=n)[0].tolist(), max_tokens=20)
        stats = hobbit_mlx.offload_stats(model)
        rebuilds += stats["pool_rebuilds"]
        assert stats["peak_memory_bytes"] <= stats["budget_bytes"]
    assert rebuilds >= 1  # (300 tokens of KV take a third of the pools)


def test_context_beyond_the_budget_stops_with_a_clear_error(tiny_factory):
    _, dst = tiny_factory("qwen3_moe")
    probe, _ = hobbit_mlx.load(dst, exact=True, prefetch_layers=0, max_context=256, progress=False)
    plan = runtime_of(probe).plan
    runtime_of(probe).close()
    budget = plan.minimum_bytes + plan.kv_bytes_per_token * 512
    model, _ = hobbit_mlx.load(dst, memory_budget=budget, exact=True, prefetch_layers=0,
                               max_context=256, progress=False)
    cache = make_prompt_cache(model)
    step = runtime_of(model).plan.activation_points[0][0]  # (a longer call would be named)
    with pytest.raises(ContextBudgetError, match=r"the context reached \d+ tokens"):
        for i in range(0, 4000, step):
            mx.eval(model(_tokens(step, seed=i), cache=cache))
    assert cache[0].offset < 4000


def test_minimum_budget_is_small(tiny_factory):
    """The smallest budget is dense + activations + one KV step + one layer's top-k per pool:
    below the model's own size, and it runs."""
    src, dst = tiny_factory("qwen3_moe")
    info = hobbit_mlx.footprint(dst)
    rt_plan_min = info["minimum_budget_bytes_exact"]
    assert info["minimum_budget_bytes"] > rt_plan_min  # defaults add a 2-bit pool and gates
    expert_min = info["experts_per_token"] * info["expert_bytes_high"] // (
        info["num_moe_layers"] * info["num_experts"])
    assert rt_plan_min <= (info["dense_bytes"] + info["activation_bytes"]
                           + info["kv_bytes_per_token"] * 512 + 2 * expert_min)
    model, tok = hobbit_mlx.load(dst, memory_budget=rt_plan_min, exact=True, prefetch_layers=0,
                                 progress=False)
    assert runtime_of(model).plan.minimum_bytes == rt_plan_min  # measured the same again
    assert hobbit_mlx.generate(model, tok, "hi", max_tokens=4) is not None
    with pytest.raises(hobbit_mlx.BudgetError, match="too small"):
        hobbit_mlx.load(dst, memory_budget=int(0.95 * rt_plan_min), exact=True, prefetch_layers=0,
                        progress=False)


def test_generation_on_a_thread_of_its_own(tiny_factory):
    """Generation started off the main thread (as a server does) runs with its own stream."""
    _, dst = tiny_factory("qwen3_moe")
    model, tok = hobbit_mlx.load(dst, expert_residency=0.5, exact=True, progress=False)
    want = hobbit_mlx.generate(model, tok, "def f():", max_tokens=12)
    out = {}

    def run():
        with mx.stream(mx.new_stream(mx.default_device())):
            out["text"] = hobbit_mlx.generate(model, tok, "def f():", max_tokens=12)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert out["text"] == want


def test_load_options_and_keywords_are_the_same_call(tiny_factory):
    """``load(path, options=LoadOptions(...))`` equals the keywords; unknown names are refused."""
    _, dst = tiny_factory("qwen3_moe")
    opts = hobbit_mlx.LoadOptions(exact=True, prefetch_layers=0, expert_residency=0.5,
                                  progress=False)
    a, _ = hobbit_mlx.load(dst, options=opts)
    b, _ = hobbit_mlx.load(dst, expert_residency=0.5, exact=True, prefetch_layers=0, progress=False)
    plan_a, plan_b = runtime_of(a).plan, runtime_of(b).plan  # (activations measured apart)
    assert plan_a.dense_bytes == plan_b.dense_bytes and plan_a.expert_cap_bytes == plan_b.expert_cap_bytes
    assert [ps.pool.slots for ps in runtime_of(a).cache.pools] == \
        [ps.pool.slots for ps in runtime_of(b).cache.pools]
    assert runtime_of(a).prefetcher is None and not runtime_of(a).precision.mixed_precision
    c, _ = hobbit_mlx.load(dst, options=opts, prefetch_layers=1)  # a keyword overrides a field
    assert runtime_of(c).prefetcher is not None
    with pytest.raises(TypeError, match="prefetch_widht"):
        hobbit_mlx.load(dst, prefetch_widht=2)
    with pytest.raises(ValueError, match="not both"):
        hobbit_mlx.load(dst, memory_budget="1GB", expert_residency=0.5)


@pytest.mark.parametrize("overlap", [True, False])
def test_overlapped_reads_give_the_same_logits(tiny_factory, monkeypatch, overlap):
    """With overlap, a prompt chunk with hits and misses runs its resident experts while the misses
    are read, and a decode call starts them before the router sync (the early run); each adds a
    masked run of the misses, summed. Without, one run after the reads. Both equal mlx-lm bit for
    bit."""
    import hobbit_mlx.fetch as fetch_module
    import hobbit_mlx.offload as offload

    src, dst = tiny_factory("mixtral")
    ref = _reference(src)
    tokens = _tokens(40, seed=6)
    # 8 tokens decoded, then a 24-token chunk (the cache holds experts by then), then 8 decoded
    steps = [(i, i + 1) for i in range(8)] + [(8, 32)] + [(i, i + 1) for i in range(32, 40)]
    ref_cache = make_prompt_cache(ref)
    want = [np.array(ref(tokens[:, a:b], cache=ref_cache)) for a, b in steps]
    monkeypatch.setattr(offload, "OVERLAP_MIN_WAIT_S", 0.0)
    monkeypatch.setattr(fetch_module, "INLINE_READ_S", 0.0)  # reads in threads, so there is a wait
    runs = []
    masked = offload.OffloadedSwitch._masked_run
    monkeypatch.setattr(offload.OffloadedSwitch, "_masked_run",
                        lambda self, *a: runs.append(1) or masked(self, *a))
    model, _ = hobbit_mlx.load(dst, expert_residency=0.5, exact=True, prefetch_layers=0,
                               overlap_io=overlap, prefill_step_size=32, progress=False)
    runs.clear()  # (load measures activations with masked runs)
    cache = make_prompt_cache(model)
    prompt_runs = 0
    for (a, b), expected in zip(steps, want):
        before = len(runs)
        np.testing.assert_array_equal(np.array(model(tokens[:, a:b], cache=cache)), expected)
        if b - a > 1:
            prompt_runs = len(runs) - before
    stats = hobbit_mlx.offload_stats(model)
    assert stats["misses_high"] > 0 and stats["hits_high"] > 0
    assert (prompt_runs > 0) == overlap  # the split ran only when overlapping
    assert (stats["early_runs"] > 0) == (len(runs) > prompt_runs) == overlap


def test_new_sequence_after_a_long_one_gets_its_pools_back(tiny_factory):
    """Defaults (mixed precision) with every expert fitting in 4-bit: a long sequence shrinks the
    pools (a 2-bit pool appears), the next short one grows them back, fills them, and runs
    without a sync or a 2-bit pool."""
    _, dst = tiny_factory("qwen3_moe")
    probe, _ = hobbit_mlx.load(dst, max_context=256, progress=False)
    plan = runtime_of(probe).plan
    runtime_of(probe).close()
    budget = (plan.dense_bytes + plan.activation_for(200, 800) + plan.kv_bytes(800)
              + plan.all_high_bytes // 4)
    model, _ = hobbit_mlx.load(dst, memory_budget=budget, max_context=256, progress=False)
    rt = runtime_of(model)
    full = [ps.pool.slots for ps in rt.cache.pools]
    assert full[1] == 0  # everything fits in 4-bit: no 2-bit pool
    cache = make_prompt_cache(model)
    for i in range(0, 800, 200):
        mx.eval(model(_tokens(200, seed=i), cache=cache))
    assert [ps.pool.slots for ps in rt.cache.pools] != full
    rt.new_sequence()
    assert [ps.pool.slots for ps in rt.cache.pools] == full
    hobbit_mlx.reset_stats(model)
    mx.eval(model(_tokens(40, seed=7), cache=make_prompt_cache(model)))
    stats = hobbit_mlx.offload_stats(model)
    assert stats["host_syncs"] == 0 and stats["misses_high"] == stats["misses_low"] == 0


def test_generate_keeps_the_text_made_before_the_context_ran_out(tiny_factory):
    """A sequence the budget cannot take to ``max_tokens`` stops with an error that carries the
    text generated until then (the tokens a stream gave), and states the budget for the whole
    sequence, which then runs it."""
    import re

    _, dst = tiny_factory("qwen3_moe")
    probe, _ = hobbit_mlx.load(dst, exact=True, progress=False)
    minimum = runtime_of(probe).plan.minimum_bytes
    runtime_of(probe).close()
    model, tok = hobbit_mlx.load(dst, memory_budget=minimum, exact=True, progress=False)
    eos = mx.array(sorted(tok.eos_token_ids))
    run = dict(max_tokens=runtime_of(model).plan.max_context() + 64,  # (never an early end)
               logits_processors=[lambda _, logits: logits.at[:, eos].add(-1e9)])
    streamed = []
    with pytest.raises(ContextBudgetError):
        for r in hobbit_mlx.stream_generate(model, tok, "hello", **run):
            streamed.append(r.text)
    with pytest.raises(ContextBudgetError) as e:
        hobbit_mlx.generate(model, tok, "hello", **run)
    assert e.value.text == "".join(streamed) and len(streamed) > 100
    need = int(re.search(r"\((\d+) bytes\)", str(e.value)).group(1))
    runtime_of(model).close()
    model, tok = hobbit_mlx.load(dst, memory_budget=need, exact=True, progress=False)
    assert hobbit_mlx.generate(model, tok, "hello", **run).startswith(e.value.text)
    runtime_of(model).close()


def test_bf16_scales_are_held_in_float16_as_mlx_casts_them():
    """mlx-community checkpoints store bf16 scales; ``dtype="float16"`` (an M1 / M2 GPU has no
    native bf16) failed at load for want of this conversion."""
    from hobbit_mlx.pools import convert_into

    x = mx.concatenate([mx.random.normal((1000,)) * 1e-3, mx.array([0.0, -2.5, 6e4, 1e-8])])
    stored = x.astype(mx.bfloat16)
    src = np.array(stored.view(mx.uint16)).view(np.uint8)
    dst = np.zeros(src.size, np.uint8)
    convert_into("BF16->F16", src, dst)
    np.testing.assert_array_equal(dst.view(np.float16), np.array(stored.astype(mx.float16)))


def test_no_pool_array_is_larger_than_the_devices_largest_buffer(tiny_factory, monkeypatch):
    """Metal refuses one buffer past ``max_buffer_length`` (about 0.55-0.68x a Mac's memory),
    and a pool holds each tensor in one array across its slots: the slots stop there, and the
    model still computes exactly."""
    _src, dst = tiny_factory("qwen3_moe")
    model, _ = hobbit_mlx.load(dst, expert_residency=1.0, exact=True, progress=False)
    tokens = _tokens(24, seed=3)
    expected = model(tokens)
    mx.eval(expected)
    largest = max(a.nbytes for ps in runtime_of(model).cache.pools for a in ps.pool.arrays.values())
    runtime_of(model).close()
    limit = largest // 3
    monkeypatch.setattr(mx, "device_info", lambda: {"max_buffer_length": limit})
    model, _ = hobbit_mlx.load(dst, expert_residency=1.0, exact=True, progress=False)
    arrays = [a for ps in runtime_of(model).cache.pools for a in ps.pool.arrays.values()]
    assert max(a.nbytes for a in arrays) <= limit
    np.testing.assert_array_equal(np.array(model(tokens)), np.array(expected))
    assert hobbit_mlx.offload_stats(model)["misses_high"] > 0  # (fewer slots than experts)
    runtime_of(model).close()


def test_a_call_longer_than_measured_names_a_chunk_the_budget_holds(tiny_factory):
    """mlx-lm's own generate prefills 2,048 tokens a call: the error names a chunk size that
    this budget holds at that context (it named the measured maximum, which this budget
    could not take either), and that size runs."""
    import re

    import mlx_lm

    from hobbit_mlx.budget import BudgetError

    _, dst = tiny_factory("qwen3_moe")
    from dataclasses import replace

    probe, _ = hobbit_mlx.load(dst, exact=True, progress=False)
    plan = runtime_of(probe).plan
    runtime_of(probe).close()
    budget = plan.minimum_bytes  # the least that holds the prompt in 16-token calls
    while replace(plan, budget_bytes=budget).max_context(16) < 720:
        budget += 10_000
    assert replace(plan, budget_bytes=budget).max_context(plan.max_chunk) < 700
    model, tok = hobbit_mlx.load(dst, memory_budget=budget, exact=True, progress=False)
    prompt = _tokens(700, seed=5)[0]
    with pytest.raises(BudgetError, match="longer than the prefill chunk") as e:
        mlx_lm.generate(model, tok, prompt, max_tokens=2)
    step = int(re.search(r"chunks of at most (\d+) tokens", str(e.value)).group(1))
    assert step < runtime_of(model).plan.max_chunk
    mlx_lm.generate(model, tok, prompt, max_tokens=2, prefill_step_size=step)
    runtime_of(model).close()


def test_a_large_max_tokens_reserves_no_more_than_max_context_at_the_start(tiny_factory):
    """An agent's max_tokens of 32,000 reserved its KV up front: the pools were at their
    minimum from the first token, for a reply that mostly ends far sooner. The reserve starts at
    max_context (or the prompt) and grows with the context."""
    _, dst = tiny_factory("qwen3_moe")
    model, _ = hobbit_mlx.load(dst, expert_residency=0.5, exact=True, progress=False)
    rt = runtime_of(model)
    plans = {}
    for max_tokens in (32000, rt.plan.initial_context - 10):
        rt.new_sequence(0, 10, max_tokens)
        plans[max_tokens] = (rt.plan.kv_tokens, rt.plan.expert_cache_bytes)
    long, at_max_context = plans.values()
    assert long == at_max_context  # (no more KV, no smaller pools, than a max_context request)
    rt.new_sequence(0, 10, 32000)
    assert rt.plan.max_context() > rt.plan.initial_context  # (the cut is the rule's, not the
    # budget's: it would hold a longer reserve)


def test_a_prompt_chunk_does_not_cut_pools_that_hold_every_expert():
    """A budget that holds every expert in 4-bit beside the smallest prompt chunk: each sequence
    cut the pools for a longer chunk (evicting experts, a 2-bit pool appearing) and decode grew
    them back, reading the experts again. They stay whole now, and a second reply reads
    nothing."""
    from hobbit_mlx.loader import REFERENCE_MODEL

    probe, _ = hobbit_mlx.load(REFERENCE_MODEL, progress=False)
    plan = runtime_of(probe).plan
    runtime_of(probe).close()
    del probe  # (its dense weights would count in this process's peak)
    gc.collect()
    context = 256
    budget = (plan.dense_bytes + plan.activation_for(16, context) + plan.kv_bytes(context, 16)
              + plan.all_high_bytes + 64 * 1024)
    assert plan.largest_chunk(context) > 16  # (what a sequence's prompt asked for)
    model, tok = hobbit_mlx.load(REFERENCE_MODEL, memory_budget=budget, progress=False)
    rt = runtime_of(model)
    try:
        prompt = list(range(5, 133))  # (128 tokens)
        for i in range(3):
            hobbit_mlx.reset_stats(model)
            hobbit_mlx.generate(model, tok, prompt, max_tokens=32)
            stats = hobbit_mlx.offload_stats(model)
            assert stats["peak_memory_bytes"] <= budget
            assert rt.cache.all_high_resident and stats["pool_slots"][1] == 0
            if i:  # (the first may grow the pools the load planned for a longer context)
                assert stats["pool_rebuilds"] == 0 and stats["bytes_read"] == 0
    finally:
        rt.close()
