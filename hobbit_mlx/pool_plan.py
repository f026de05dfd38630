"""Pools sized by the budget plan, and the plan following the sequence: which pool serves which
layers, how many slots each gets, and the rebuild when a sequence outgrows its reserves."""

from __future__ import annotations

from dataclasses import dataclass, replace

import mlx.core as mx

from .budget import BudgetPlan, device_info
from .runtime import OffloadRuntime
from .pools import SlotPool, pool_signature
from .store import Manifest


@dataclass
class PoolGroup:
    """The layers one pool serves at one precision."""

    precision: str
    pool: SlotPool
    layers: list[int]
    num_experts: int

    @property
    def all_bytes(self) -> int:
        return len(self.layers) * self.num_experts * self.pool.slot_nbytes


def make_pools(manifest: Manifest, precisions: tuple, float_dtype) -> list[PoolGroup]:
    """One pool (of one slot, for now) per precision and expert layout."""
    groups: dict[tuple, PoolGroup] = {}
    for layer in manifest.layers:
        for precision in precisions:
            entry = layer.precisions[precision]
            key = (precision, pool_signature(entry))
            if key not in groups:
                groups[key] = PoolGroup(precision, SlotPool(entry, 1, float_dtype), [],
                                         layer.num_experts)
            groups[key].layers.append(layer.layer)
    return list(groups.values())


def max_buffer_bytes() -> int | None:
    """The largest single buffer the device allocates (Metal's ``maxBufferLength``, roughly
    0.55-0.68x the memory of an Apple silicon Mac); None where there is no such limit (CPU)."""
    size = device_info().get("max_buffer_length")
    return int(size) if size else None


def pool_slots(groups: list[PoolGroup], plan: BudgetPlan, k: int) -> dict[int, int]:
    """Slots per pool for the plan's pool bytes: each precision's bytes shared among its pools in
    proportion to the experts they serve, none beyond what they serve, and none beyond what the
    device allocates in one buffer (a pool holds each of its tensors in one array across slots:
    past Metal's limit the allocation fails, after the old pools were let go)."""
    out = {}
    largest_buffer = max_buffer_bytes()
    for precision, budget in (("high", plan.high_expert_bytes), ("low", plan.low_expert_bytes)):
        mine = [g for g in groups if g.precision == precision]
        total = sum(g.all_bytes for g in mine)
        for g in mine:
            share = budget * g.all_bytes // max(1, total)
            slots = min(len(g.layers) * g.num_experts, share // g.pool.slot_nbytes)
            if largest_buffer is not None:
                slots = min(slots, largest_buffer // max(g.pool.tensor_slot_nbytes().values()))
            out[id(g.pool)] = int(slots) if slots >= k else (k if budget >= k * g.pool.slot_nbytes else 0)
    return out


def apply_plan(rt: OffloadRuntime, groups: list[PoolGroup], plan: BudgetPlan) -> None:
    """Size the pools for ``plan`` and set the limits it reserves for. Pools are rebuilt when
    they must shrink, or when they may grow by a tenth or more (a rebuild reads the kept experts
    again); a smaller gain leaves them as they are, and the plan counts them as they are."""
    k = rt.manifest.experts_per_token
    by_pool = pool_slots(groups, plan, k)
    slots = {id(ps): by_pool[id(ps.pool)] for ps in rt.cache.pools}
    now = sum(ps.pool.nbytes for ps in rt.cache.pools)
    new = sum(slots[id(ps)] * ps.pool.slot_nbytes for ps in rt.cache.pools)
    shrinks = any(slots[id(ps)] < ps.pool.slots for ps in rt.cache.pools)
    if shrinks or new >= 1.1 * now:
        rt.resize_pools(slots)
    elif rt.plan is not None and new != now:
        plan = replace(plan, high_expert_bytes=rt.plan.high_expert_bytes,
                       low_expert_bytes=rt.plan.low_expert_bytes)
    rt.plan = plan
    rt.context_limit, rt.chunk_limit = plan.kv_tokens, plan.chunk_tokens
    mx.set_cache_limit(plan.mlx_cache_limit_bytes)


def follow_sequence(rt: OffloadRuntime, groups: list[PoolGroup], prefill_step: int) -> None:
    """KV and activation reserves that follow the sequence: planned when a sequence starts, grown
    (the pools giving slots back) when a call outgrows them."""

    goal = [0]  # the tokens the current sequence may reach (0: not known)

    def on_context(tokens: int, call_tokens: int) -> None:
        plan = rt.plan
        if call_tokens > plan.max_chunk:  # (mlx-lm's own generate prefills 2,048 at a time)
            raise plan.call_too_long(call_tokens, tokens)
        chunk = max(call_tokens, plan.chunk_tokens)
        if tokens > plan.max_context(chunk):  # a longer context leaves less for long chunks
            chunk = call_tokens
        if tokens > plan.kv_tokens:  # double, so that a growing context replans rarely
            tokens = max(tokens, min(2 * plan.kv_tokens, plan.max_context(chunk)))
        apply_plan(rt, groups, plan.fit(tokens, chunk, goal[0]))

    uses_low = rt.plan.mixed_precision  # (the model has 2-bit pools at all)

    def on_sequence(context: int, prompt: int, max_new: int) -> None:
        plan = rt.plan
        if uses_low:  # 2-bit pools only while reads are dear (ReadCost)
            plan = replace(plan, mixed_precision=rt.wants_low_pool(plan.mixed_precision))
        goal[0] = context + prompt + max_new if max_new > 0 else 0
        if context + prompt > plan.max_context():
            plan.fit(context + prompt, 1, goal[0], starting=True)  # raises, with the numbers
        # The KV reserve starts at the context the sequence has and max_context beyond it, and
        # grows as the context does (on_context): planned for the whole max_tokens at once, an
        # agent's 32,000 left the pools at their minimum from the first token (a 0.21 served
        # rate where a 200-token limit had 0.96), for a reply that mostly ends far sooner.
        tokens = max(context + prompt, plan.initial_context)
        tokens = min(tokens, goal[0] or tokens, plan.max_context())
        chunk = min(max(prompt, 1), prefill_step, plan.largest_chunk(tokens) or 1)
        apply_plan(rt, groups, plan.fit(tokens, chunk))

    rt.on_context = on_context
    rt.on_sequence = on_sequence
