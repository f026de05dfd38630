"""Properties of the budget plan over random model sizes and budgets (hypothesis): its parts
(dense + activations + KV + pools) sum to the budget while the pools are below their cap and
never exceed it, the pools never fall below one layer's top-k, a plan for a longer context holds
that context, and the pools sized from a plan fit in the bytes the plan gives them."""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from hobbit_mlx.budget import KV_STEP, BudgetError, ContextBudgetError, plan_budget
from hobbit_mlx.pool_plan import PoolGroup, pool_slots

SETTINGS = settings(max_examples=150, deadline=None)
MB = 10**6


@st.composite
def models(draw):
    """Sizes of a model: dense bytes, measured activations per chunk (growing with the chunk),
    KV bytes per token, expert bytes; the 2-bit slot is 0.3-0.8 of the 4-bit one (real stores:
    about 0.56)."""
    k = draw(st.integers(1, 8))
    layers, experts = draw(st.integers(1, 48)), draw(st.integers(k, 128))
    slot_high = draw(st.integers(1_000, 3 * MB))
    slot_low = int(slot_high * draw(st.floats(0.3, 0.8)))
    chunks = sorted(draw(st.sets(st.sampled_from([64, 96, 128, 192, 256, 384, 512]), min_size=1)))
    per_token = draw(st.integers(1_000, 200_000))
    points = [(n, n * per_token + draw(st.integers(0, MB))) for n in chunks]
    points = [(n, max(b for _, b in points[:i + 1])) for i, (n, _) in enumerate(points)]
    mixed = draw(st.booleans())
    kv = draw(st.integers(1, 200_000))
    return dict(dense_bytes=draw(st.integers(MB, 2000 * MB)), activation_points=points,
                kv_bytes_per_token=kv, kv_layer_bytes_per_token=draw(st.integers(0, kv)),
                context_activation=(draw(st.floats(0, 64)), draw(st.floats(0, 2 * MB)),
                                    draw(st.floats(0, 8192))),
                all_high_bytes=layers * experts * slot_high, min_high_bytes=k * slot_high,
                min_low_bytes=k * slot_low, mixed_precision=mixed,
                _groups=(k, layers, experts, slot_high, slot_low))


def _parts(plan) -> int:
    return (plan.dense_bytes + plan.activation_reserve_bytes + plan.kv_reserve_bytes
            + plan.high_expert_bytes + plan.low_expert_bytes)


def _check(plan) -> None:
    pools = plan.high_expert_bytes + plan.low_expert_bytes
    assert _parts(plan) <= plan.budget_bytes
    cap = min(plan.expert_cap_bytes, plan.all_high_bytes)  # (no pool holds more than every expert)
    assert min(plan.min_expert_bytes, cap) <= pools <= cap
    if pools < cap:  # the pools take everything the other parts leave
        assert _parts(plan) == plan.budget_bytes
    if plan.mixed_precision and pools < plan.all_high_bytes:
        assert plan.low_expert_bytes >= plan.min_low_bytes
        assert plan.high_expert_bytes >= plan.min_expert_bytes - plan.min_low_bytes
    else:
        assert plan.low_expert_bytes == 0
    assert plan.kv_tokens >= 1 and plan.chunk_tokens in [n for n, _ in plan.activation_points]


@SETTINGS
@given(model=models(), extra=st.integers(0, 50_000 * MB), context=st.integers(1, 40_000))
def test_a_plan_sums_to_its_budget(model, extra, context):
    sizes = {k: v for k, v in model.items() if not k.startswith("_")}
    probe = plan_budget(**sizes, expert_residency=0.0)
    budget = probe.minimum_bytes + extra
    plan = plan_budget(**sizes, memory_budget=budget, initial_context=context)
    assert plan.budget_bytes == budget
    _check(plan)
    with pytest.raises(BudgetError, match="too small"):
        plan_budget(**sizes, memory_budget=probe.minimum_bytes - 1)


@SETTINGS
@given(model=models(), extra=st.integers(0, 5_000 * MB), tokens=st.integers(1, 200_000),
       chunk=st.integers(1, 600))
# (found by hypothesis: one layer's top-k is every expert, so the pools' minimum with a 2-bit pool
# is above their cap, and plan_budget chose a chunk that held the cap but not the minimum)
@example(model=dict(dense_bytes=1_000_000, activation_points=[(64, 64_000), (96, 96_000)],
                    kv_bytes_per_token=1, kv_layer_bytes_per_token=0,
                    context_activation=(0.0, 0.0, 0.0), all_high_bytes=64_008,
                    min_high_bytes=64_008, min_low_bytes=32_004, mixed_precision=True),
         extra=0, tokens=1, chunk=1)
def test_a_plan_fitted_to_a_context_holds_it_or_says_why_not(model, extra, tokens, chunk):
    sizes = {k: v for k, v in model.items() if not k.startswith("_")}
    budget = plan_budget(**sizes, expert_residency=0.0).minimum_bytes + extra
    plan = plan_budget(**sizes, memory_budget=budget)
    call = max(1, min(chunk, plan.max_chunk))
    if tokens > plan.max_context(call):
        shorter = [n for n, _ in plan.activation_points if n < call and plan.max_context(n) >= tokens]
        if shorter and call <= tokens:  # a shorter call fits: the error names it
            with pytest.raises(ContextBudgetError, match=f"at most {shorter[-1]} tokens do"):
                plan.fit(tokens, chunk)
            assert plan.fit(tokens, shorter[-1]).kv_tokens >= tokens
            return
        with pytest.raises(ContextBudgetError, match=f"reached {tokens} tokens"):
            plan.fit(tokens, chunk)
        return
    fitted = plan.fit(tokens, chunk)
    _check(fitted)
    assert fitted.kv_tokens >= tokens
    assert fitted.kv_reserve_bytes >= fitted.kv_bytes(tokens) >= fitted.kv_bytes_per_token * tokens
    assert fitted.chunk_tokens >= min(chunk, plan.max_chunk)


@SETTINGS
@given(model=models(), residency=st.floats(0.0, 1.0))
def test_a_residency_sizes_the_pools_as_that_share(model, residency):
    sizes = {k: v for k, v in model.items() if not k.startswith("_")}
    plan = plan_budget(**sizes, expert_residency=residency)
    _check(plan)
    pools = plan.high_expert_bytes + plan.low_expert_bytes
    assert pools == min(max(int(residency * plan.all_high_bytes), plan.min_expert_bytes),
                        plan.all_high_bytes)


class _Pool:
    def __init__(self, slot_nbytes):
        self.slot_nbytes = slot_nbytes


@SETTINGS
@given(model=models(), extra=st.integers(0, 50_000 * MB))
def test_pools_sized_from_a_plan_fit_its_bytes(model, extra):
    k, layers, experts, slot_high, slot_low = model["_groups"]
    sizes = {key: v for key, v in model.items() if not key.startswith("_")}
    plan = plan_budget(**sizes, memory_budget=plan_budget(**sizes, expert_residency=0.0)
                       .minimum_bytes + extra)
    groups = [PoolGroup("high", _Pool(slot_high), list(range(layers)), experts),
              PoolGroup("low", _Pool(slot_low), list(range(layers)), experts)]
    slots = pool_slots(groups, plan, k)
    high, low = slots[id(groups[0].pool)], slots[id(groups[1].pool)]
    assert k <= high <= layers * experts  # at least one layer's top-k, at most every expert
    assert high * slot_high <= plan.high_expert_bytes
    assert low * slot_low <= plan.low_expert_bytes
    if plan.low_expert_bytes:
        assert low >= k
    # nothing worth a slot is left over
    assert high == layers * experts or plan.high_expert_bytes - high * slot_high < slot_high
    assert KV_STEP > 0
