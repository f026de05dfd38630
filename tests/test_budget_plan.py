"""The budget plan's rules, case by case (the properties are in test_budget_properties.py): the
default budget, residency plans, the chunk the plan picks, where the context limit lies, and the
numbers its errors give (a budget of that many bytes runs, one byte less does not)."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest

import hobbit_mlx.budget as budget
from hobbit_mlx.budget import (CHUNK_SHARE, INITIAL_CONTEXT, KV_STEP, BudgetError,
                               ContextBudgetError, format_size, kv_bytes_for, kv_tokens_for,
                               parse_size, plan_budget)

MB = 10**6
POINTS = [(64, 2 * MB), (128, 4 * MB), (256, 8 * MB)]


def _sizes(**over):
    sizes = dict(dense_bytes=100 * MB, activation_points=POINTS, kv_bytes_per_token=1000,
                 all_high_bytes=400 * MB, min_high_bytes=8 * MB, min_low_bytes=4 * MB,
                 mixed_precision=True)
    sizes.update(over)
    return sizes


def _full(sizes, context=INITIAL_CONTEXT):
    """Dense + the longest chunk's activations + the KV of ``context`` tokens."""
    return (sizes["dense_bytes"] + sizes["activation_points"][-1][1]
            + sizes["kv_bytes_per_token"] * kv_tokens_for(context))


@pytest.mark.parametrize("ram_share", [0.5, 4.0])  # the model fits 60% of RAM, or not
def test_the_default_budget_is_the_whole_model_or_60_percent_of_memory(monkeypatch, ram_share):
    sizes = _sizes()
    whole = _full(sizes) + sizes["all_high_bytes"]
    ram = int(whole / 0.6 * ram_share)
    monkeypatch.setattr(budget, "system_memory_bytes", lambda: ram)
    plan = plan_budget(**sizes)
    assert plan.budget_bytes == min(int(0.6 * ram), whole)
    pools = plan.high_expert_bytes + plan.low_expert_bytes
    assert (pools == sizes["all_high_bytes"]) == (ram_share >= 1.0)


def test_system_memory_is_the_physical_memory_or_16_gib(monkeypatch):
    sysconf = {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": 1000}
    monkeypatch.setattr(budget.os, "sysconf", lambda name: sysconf[name])
    assert budget.system_memory_bytes() == 4096 * 1000

    def unknown(name):
        raise ValueError(name)

    monkeypatch.setattr(budget.os, "sysconf", unknown)
    assert budget.system_memory_bytes() == 16 * 2**30


@pytest.mark.parametrize("residency", [-0.01, 1.01])
def test_a_residency_outside_0_to_1_is_refused(residency):
    with pytest.raises(ValueError, match="between 0 and 1"):
        plan_budget(**_sizes(), expert_residency=residency)
    with pytest.raises(ValueError, match="not both"):
        plan_budget(**_sizes(), expert_residency=0.5, memory_budget="1GB")


@pytest.mark.parametrize("mixed", [True, False])
def test_a_residency_plan_holds_the_longest_chunk_and_caps_the_pools(mixed):
    sizes = _sizes(mixed_precision=mixed)
    plan = plan_budget(**sizes, expert_residency=0.25)
    experts = int(0.25 * sizes["all_high_bytes"])
    assert plan.expert_cap_bytes == experts
    assert plan.budget_bytes == _full(sizes) + experts
    assert plan.chunk_tokens == POINTS[-1][0] and plan.kv_tokens >= INITIAL_CONTEXT
    assert plan.high_expert_bytes + plan.low_expert_bytes == experts
    # the 2-bit pools exist only with mixed precision, and then count in the minimum
    assert plan.min_low_bytes == (sizes["min_low_bytes"] if mixed else 0)
    assert plan.min_expert_bytes == sizes["min_high_bytes"] + plan.min_low_bytes
    assert (plan.low_expert_bytes > 0) == mixed
    if mixed:  # the 2-bit pools keep their share of the expert bytes (at least one top-k)
        assert plan.low_expert_bytes == max(int(budget.LOW_SHARE * experts), plan.min_low_bytes)
    # the context asked for is kept: a sequence of unknown length reserves it (pool_plan)
    longer = plan_budget(**sizes, expert_residency=0.25, initial_context=3000)
    assert longer.initial_context == 3000 and longer.kv_tokens >= 3000
    assert plan_budget(**sizes, memory_budget="1GB", initial_context=3000).initial_context == 3000
    # a residency of 0 still holds one layer's top-k
    tiny = plan_budget(**sizes, expert_residency=0.0)
    assert tiny.high_expert_bytes + tiny.low_expert_bytes == tiny.min_expert_bytes


BIG_ACTIVATIONS = [(64, 20 * MB), (128, 200 * MB), (256, 400 * MB)]


def test_the_plan_picks_the_longest_chunk_whose_activations_fit_a_quarter_of_the_room():
    sizes = _sizes(activation_points=BIG_ACTIVATIONS, all_high_bytes=4000 * MB)
    kv = sizes["kv_bytes_per_token"] * kv_tokens_for(INITIAL_CONTEXT)
    for n, act in BIG_ACTIVATIONS:
        # a budget whose room (after dense and KV) is just enough for this chunk's share
        room = int(act / CHUNK_SHARE) + 1
        plan = plan_budget(**sizes, memory_budget=sizes["dense_bytes"] + kv + room)
        assert plan.chunk_tokens == n
        assert plan.largest_chunk(INITIAL_CONTEXT) == n


@pytest.mark.parametrize("layer_share", [0, 250])
def test_max_context_is_the_longest_whose_kv_fits_beside_the_smallest_pools(layer_share):
    sizes = _sizes(kv_layer_bytes_per_token=layer_share)
    for extra in (0, 1, 999, 1000 * KV_STEP - 1, 1000 * KV_STEP, 7 * 1000 * KV_STEP + 5):
        plan = plan_budget(**sizes, memory_budget=plan_budget(**sizes, expert_residency=0.0)
                           .minimum_bytes + extra)
        for chunk in (1, 64, 200):
            n = plan.max_context(chunk)
            room = (plan.budget_bytes - plan.dense_bytes - plan.activation_for(chunk)
                    - plan.min_expert_bytes)
            assert n % KV_STEP == 0
            assert n == 0 or plan.kv_bytes(n) <= room
            assert plan.kv_bytes(n + KV_STEP) > room


def test_a_context_error_names_the_budget_that_holds_that_context():
    sizes = _sizes()
    plan = plan_budget(**sizes, memory_budget=130 * MB)
    tokens = plan.max_context(64) + 1
    with pytest.raises(ContextBudgetError, match=f"reached {tokens} tokens") as e:
        plan.fit(tokens, 64)
    assert f"({plan.max_context(64)} tokens with" in str(e.value)
    need = int(re.search(r"at least .* \((\d+) bytes\)", str(e.value)).group(1))
    assert format_size(need) in str(e.value) and format_size(plan.budget_bytes) in str(e.value)
    bigger = plan_budget(**sizes, memory_budget=need)
    assert bigger.fit(tokens, 64).kv_tokens >= tokens
    smaller = plan_budget(**sizes, memory_budget=need - 1)
    with pytest.raises(ContextBudgetError):
        smaller.fit(tokens, 64)


def test_a_context_error_names_the_budget_that_runs_the_whole_sequence():
    """The context runs out part way through a sequence that may reach ``goal`` tokens: the
    budget stated holds the goal, not just the tokens reached (a retry there stopped one token
    later, again and again)."""
    plan = plan_budget(**_sizes(), memory_budget=130 * MB)
    tokens = plan.max_context(64) + 1
    goal = tokens + 500
    with pytest.raises(ContextBudgetError, match=f"reached {tokens} tokens.*may reach {goal}") as e:
        plan.fit(tokens, 64, goal)
    need = int(re.search(r"\((\d+) bytes\)", str(e.value)).group(1))
    assert plan_budget(**_sizes(), memory_budget=need).fit(goal, 64).kv_tokens >= goal


def test_a_call_too_long_for_the_budget_names_the_chunk_that_fits():
    """mlx-lm's generate with a longer prefill chunk than the plan's: the error says that the
    call, not the context, is too long, and which chunk fits (it blamed a 0-token context)."""
    plan = plan_budget(**_sizes(), memory_budget=130 * MB)
    tokens = plan.max_context(256) + 1
    assert plan.max_context(64) >= tokens
    with pytest.raises(ContextBudgetError, match="a model call of 256 tokens") as e:
        plan.fit(tokens, 256)
    fits = int(re.search(r"calls of at most (\d+) tokens", str(e.value)).group(1))
    assert fits < 256 and plan.fit(tokens, fits).kv_tokens >= tokens


def test_a_too_small_budget_error_names_the_minimum_that_runs():
    sizes = _sizes()
    with pytest.raises(BudgetError, match="too small") as e:
        plan_budget(**sizes, memory_budget=MB)
    minimum = int(re.search(r"at least .* \((\d+) bytes\)", str(e.value)).group(1))
    assert format_size(minimum) in str(e.value)
    assert f"{POINTS[0][0]}-token prefill chunk" in str(e.value)
    plan = plan_budget(**sizes, memory_budget=minimum)  # runs, with the smallest parts
    assert plan.chunk_tokens == POINTS[0][0]
    assert plan.high_expert_bytes + plan.low_expert_bytes == plan.min_expert_bytes
    with pytest.raises(BudgetError):
        plan_budget(**sizes, memory_budget=minimum - 1)


def test_pools_at_their_cap_give_the_rest_to_the_chunk_then_the_context():
    # activations large next to the experts: the budget's quarter rule would pick the shortest
    # chunk, but pools that hold every expert beside a longer one are not cut for it: the chunk
    # a sequence asks for is the longest beside full pools, which the plan takes
    sizes = _sizes(activation_points=BIG_ACTIVATIONS, all_high_bytes=100 * MB)
    cap = sizes["all_high_bytes"]
    # (400 MB: exactly the longest chunk's activations, which then fit)
    for spare in (250 * MB, 400 * MB, 450 * MB + 5 * 1000 * KV_STEP):
        budget_bytes = (sizes["dense_bytes"] + cap + sizes["kv_bytes_per_token"]
                        * kv_tokens_for(INITIAL_CONTEXT) + spare)
        plan = plan_budget(**sizes, memory_budget=budget_bytes)
        assert plan.high_expert_bytes == cap and plan.low_expert_bytes == 0
        assert plan.largest_chunk(INITIAL_CONTEXT) == plan.chunk_tokens > BIG_ACTIVATIONS[0][0]
        assert plan.chunk_tokens == max(n for n, b in BIG_ACTIVATIONS if b <= spare) > 64
        left = budget_bytes - sizes["dense_bytes"] - cap - plan.activation_reserve_bytes
        # the KV reserve takes whole steps of what is left, and no further step fits
        assert plan.kv_reserve_bytes <= left
        assert plan.kv_bytes_per_token * kv_tokens_for(plan.kv_tokens + KV_STEP) > left
        assert plan.kv_tokens >= INITIAL_CONTEXT
        # a whole number of tokens (``hobbit plan`` and offload_stats report it)
        assert type(plan.kv_tokens) is int and type(plan.chunk_tokens) is int


def test_an_activation_for_a_call_longer_than_measured_is_refused():
    plan = plan_budget(**_sizes(), expert_residency=0.5)
    assert plan.activation_for(1) == POINTS[0][1] and plan.activation_for(65) == POINTS[1][1]
    assert plan.activation_for(256) == POINTS[2][1]
    with pytest.raises(BudgetError, match="257 tokens is longer than the prefill chunk \\(256"):
        plan.activation_for(257)


def test_sizes_read_and_print():
    assert parse_size(" 2 kib ") == 2048 and parse_size("1.5GB") == 1_500_000_000
    assert parse_size(".5k") == 500 and parse_size(3.9) == 3
    for garbage in ("", "GB", "1.2.3", "5 parsecs", "-5"):
        with pytest.raises(ValueError, match="cannot read"):
            parse_size(garbage)
    assert format_size(2**30) == "1.00 GiB" and format_size(2**20) == "1.00 MiB"
    assert format_size(3 * 2**30) == "3.00 GiB" and format_size(-3 * 2**30) == "-3.00 GiB"
    assert format_size(2**30 - 1) == "1024.00 MiB" and format_size(1536 * 2**10) == "1.50 MiB"
    assert format_size(2048) == "2.00 KiB" and format_size(1023) == "1023 B"


def test_a_plan_as_a_dict_gives_every_part_and_the_reserves():
    """``BudgetPlan.as_dict`` (the plan as JSON for reports): the plan's fields and the parts
    derived from them, which add up to at most the budget."""
    import json

    plan = plan_budget(**_sizes(), memory_budget=300 * MB)
    d = json.loads(json.dumps(plan.as_dict()))
    assert d["budget_bytes"] == 300 * MB and d["kv_tokens"] == plan.kv_tokens
    assert d["kv_reserve_bytes"] == plan.kv_bytes_per_token * kv_tokens_for(plan.kv_tokens)
    assert d["activation_reserve_bytes"] == d["mlx_cache_limit_bytes"] == plan.activation_for(
        plan.chunk_tokens)
    assert d["expert_cache_bytes"] == d["high_expert_bytes"] + d["low_expert_bytes"] > 0
    assert d["minimum_bytes"] == plan.minimum_bytes
    parts = (d["dense_bytes"] + d["activation_reserve_bytes"] + d["kv_reserve_bytes"]
             + d["expert_cache_bytes"])
    assert parts == d["budget_bytes"]  # (the pools below their cap take the rest)


def test_kv_reserve_holds_a_growing_layer_beside_the_others():
    """mlx-lm grows one layer's cache at a time, its old buffer beside the new one: whole steps of
    every layer plus one layer's whole cache. Without the largest layer's share known, one more
    step of every layer (short of that peak once a layer holds more than a step of all)."""
    assert kv_bytes_for(1, 1000, 125) == 1125 * KV_STEP  # (8 layers of 125 bytes per token)
    assert kv_bytes_for(KV_STEP, 1000, 125) == 1125 * KV_STEP
    assert kv_bytes_for(KV_STEP + 1, 1000, 125) == 1125 * 2 * KV_STEP
    assert kv_bytes_for(300, 1000) == 1000 * kv_tokens_for(300) == 1000 * 3 * KV_STEP
    plan = plan_budget(**_sizes(kv_layer_bytes_per_token=125), memory_budget=300 * MB)
    assert plan.kv_reserve_bytes == kv_bytes_for(plan.kv_tokens, 1000, 125)
    old = plan_budget(**_sizes(), memory_budget=300 * MB)  # (pools below their cap)
    assert plan.kv_tokens == old.kv_tokens and plan.kv_reserve_bytes < old.kv_reserve_bytes
    assert plan.expert_cache_bytes > old.expert_cache_bytes  # what the KV no longer takes


def test_activations_grow_with_the_context_a_call_attends_to():
    """A call's activations grow with its context (attention scores per chunk and context token,
    buffers copied once any context is held): the reserve, the longest context and the minimum
    count it."""
    flat = plan_budget(**_sizes(kv_layer_bytes_per_token=125), memory_budget=130 * MB)
    grown = plan_budget(**_sizes(kv_layer_bytes_per_token=125, context_activation=(40.0, 300_000.0, 1000.0)),
                        memory_budget=130 * MB)
    assert grown.activation_for(64, 1000) == 2 * MB + int(300_000.0 + 64 * (1000.0 + 1000 * 40.0))
    assert grown.activation_for(64) == flat.activation_for(64) == 2 * MB
    assert grown.activation_reserve_bytes == grown.activation_for(grown.chunk_tokens, grown.kv_tokens)
    assert grown.minimum_bytes > flat.minimum_bytes
    for plan in (flat, grown):  # the minimum holds a first KV step of context, not a few tokens
        least = replace(plan, budget_bytes=plan.minimum_bytes)
        assert least.max_context(least.activation_points[0][0]) >= KV_STEP
    for chunk in (1, 64, 256):
        n = grown.max_context(chunk)
        assert 0 < n < flat.max_context(chunk)
        room = grown.budget_bytes - grown.dense_bytes - grown.min_expert_bytes
        assert grown.kv_bytes(n) + grown.activation_for(chunk, n) <= room
        assert grown.kv_bytes(n + KV_STEP) + grown.activation_for(chunk, n + KV_STEP) > room
    fitted = grown.fit(grown.max_context(64), 64)
    assert (fitted.dense_bytes + fitted.activation_reserve_bytes + fitted.kv_reserve_bytes
            + fitted.expert_cache_bytes) <= fitted.budget_bytes


def test_a_budget_past_the_gpus_working_set_is_warned_and_the_default_stays_within(monkeypatch):
    """On Apple silicon MLX allocates past Metal's recommended working set, and the GPU then
    pages: a budget given past it is warned about at load, and the default stays within it."""
    import mlx.core as mx

    from hobbit_mlx.loader import warn_past_working_set

    monkeypatch.setattr(mx, "device_info", lambda: {"max_recommended_working_set_size": 200 * MB})
    with pytest.warns(UserWarning, match="recommended working set"):
        warn_past_working_set(300 * MB)
    sizes = _sizes(all_high_bytes=8000 * MB)  # (more than either limit)
    monkeypatch.setattr(budget, "system_memory_bytes", lambda: 10_000 * MB)
    assert plan_budget(**sizes).budget_bytes == int(0.9 * 200 * MB)
    monkeypatch.setattr(mx, "device_info", lambda: {"architecture": "x86_64"})  # the CPU
    assert budget.gpu_working_set_bytes() is None
    assert plan_budget(**sizes).budget_bytes == int(0.6 * 10_000 * MB)


def test_an_mlx_without_top_level_device_info_still_gives_the_metal_limits(monkeypatch):
    """Older MLX has only ``mx.metal.device_info``: without the fallback, the working-set cap
    and the largest-buffer cap were silently gone."""
    import mlx.core as mx

    from hobbit_mlx.pool_plan import max_buffer_bytes

    monkeypatch.delattr(mx, "device_info", raising=False)
    monkeypatch.setattr(mx.metal, "device_info", lambda: {
        "max_recommended_working_set_size": 200 * MB, "max_buffer_length": 50 * MB}, raising=False)
    assert budget.gpu_working_set_bytes() == 200 * MB and max_buffer_bytes() == 50 * MB


def test_buffers_rounded_to_pages_are_counted_whole(monkeypatch):
    """On Metal every buffer above a 16 KiB page takes whole pages: the dense weights count so,
    and the pools and KV caches a page more per array (on the CPU backend, exact bytes)."""
    from mlx.utils import tree_flatten

    from hobbit_mlx.loader import load, runtime_of

    assert budget.allocated_bytes(16384, 16384) == 16384
    assert budget.allocated_bytes(16385, 16384) == 32768
    assert budget.allocated_bytes(100, 16384) == 100 and budget.allocated_bytes(16385, 0) == 16385
    exact = runtime_of(load(None, memory_budget="24MB", progress=False)[0]).plan.dense_bytes
    monkeypatch.setattr("hobbit_mlx.loader.allocation_page", lambda: 16384)
    paged = load(None, memory_budget="24MB", progress=False)[0]
    rounded = runtime_of(paged).plan.dense_bytes
    arrays = [a.nbytes for _, a in tree_flatten(paged.parameters())]
    assert rounded - exact >= sum(budget.allocated_bytes(n, 16384) - n for n in arrays) > 0
    assert rounded - exact <= sum(budget.allocated_bytes(n, 16384) - n for n in arrays) + 16384 * 200
