"""One memory budget for the whole process, split into its parts.

``memory_budget`` is the ceiling for MLX's memory while generating: the resident dense weights,
the activations of a prefill chunk (measured at load; MLX's own freed-buffer cache is capped
with ``mx.set_cache_limit`` at the same size and shares that reserve), the KV cache of the
context in use, and the expert pools, which take everything that is left. The KV reserve follows the context: it starts at
``INITIAL_CONTEXT`` tokens and, when a sequence outgrows it, doubles while the pools give slots
back (``BudgetPlan.for_context``); a new sequence gets them back. The smallest budget that runs is
dense + activations + KV for one KV step + one layer's top-k experts in each pool.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, replace

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}

KV_STEP = 256  # mlx-lm's KV caches grow in steps of this many tokens
INITIAL_CONTEXT = 1024  # tokens of KV reserved before a sequence shows it needs more
LOW_SHARE = 0.125  # with mixed precision, the share of the expert bytes kept for 2-bit copies


class BudgetError(ValueError):
    """The memory budget cannot run this model; the message gives the minimum."""


class ContextBudgetError(BudgetError):
    """The context outgrew what the budget can hold; the message says how far it got."""


def parse_size(value: int | float | str) -> int:
    """Bytes from 6442450944, "6GB", "6 GiB", "512MiB", "1.5g"."""
    if isinstance(value, (int, float)):
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read {value!r} as a size (examples: 6GB, 6GiB, 512MiB, 123456789)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def format_size(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def system_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 16 * 2**30


def kv_tokens_for(tokens: int) -> int:
    """Tokens of KV memory mlx-lm holds for ``tokens`` (whole steps, plus the step a growing
    cache allocates before it copies the old one over)."""
    return (max(tokens, 1) + KV_STEP - 1) // KV_STEP * KV_STEP + KV_STEP


@dataclass
class BudgetPlan:
    budget_bytes: int
    dense_bytes: int
    activation_reserve_bytes: int  # measured: one prefill chunk's peak above the weights
    mlx_cache_limit_bytes: int
    kv_bytes_per_token: int
    kv_tokens: int  # context the KV reserve holds now
    high_expert_bytes: int  # the 4-bit pools
    low_expert_bytes: int  # the 2-bit pools
    all_high_bytes: int  # every expert in 4-bit
    min_expert_bytes: int  # one layer's top-k in each pool
    mixed_precision: bool
    fixed_budget: bool  # the user gave a budget (else it follows a residency)
    min_low_bytes: int = 0  # one layer's top-k in the 2-bit pool (mixed precision)
    initial_expert_bytes: int = 0  # a residency's pool bytes (the pools' cap then)
    initial_context: int = INITIAL_CONTEXT  # KV reserved when a sequence starts

    @property
    def kv_reserve_bytes(self) -> int:
        return self.kv_bytes_per_token * kv_tokens_for(self.kv_tokens)

    @property
    def expert_cache_bytes(self) -> int:
        return self.high_expert_bytes + self.low_expert_bytes

    @property
    def fixed_bytes(self) -> int:
        return self.dense_bytes + self.activation_reserve_bytes

    @property
    def minimum_bytes(self) -> int:
        """The smallest budget that runs a one-step context at all."""
        return self.fixed_bytes + self.kv_bytes_per_token * kv_tokens_for(1) + self.min_expert_bytes

    def max_context(self) -> int:
        """The longest context this budget can hold with the pools at their minimum."""
        room = self.budget_bytes - self.fixed_bytes - self.min_expert_bytes
        steps = room // max(1, self.kv_bytes_per_token) // KV_STEP - 1
        return max(0, steps * KV_STEP)

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(kv_reserve_bytes=self.kv_reserve_bytes, expert_cache_bytes=self.expert_cache_bytes,
                 minimum_bytes=self.minimum_bytes)
        return d

    def _split(self, expert_bytes: int) -> tuple[int, int]:
        """(high, low) pool bytes for ``expert_bytes`` of pools."""
        if expert_bytes >= self.all_high_bytes or not self.mixed_precision:
            return min(expert_bytes, self.all_high_bytes), 0
        low = max(int(LOW_SHARE * expert_bytes), self.min_low_bytes)
        return expert_bytes - low, low

    def _fit(self, tokens: int) -> "BudgetPlan":
        """KV for ``tokens``, the pools take the rest (up to their cap); when the pools are at
        their cap, the KV reserve takes whatever the budget has left."""
        cap = self.all_high_bytes if self.fixed_budget else self.initial_expert_bytes
        room = self.budget_bytes - self.fixed_bytes - self.kv_bytes_per_token * kv_tokens_for(tokens)
        experts = min(room, cap)
        if experts == cap:
            spare = (self.budget_bytes - self.fixed_bytes - cap) // max(1, self.kv_bytes_per_token)
            tokens = max(tokens, (spare // KV_STEP - 1) * KV_STEP)
        high, low = self._split(experts)
        return replace(self, kv_tokens=tokens, high_expert_bytes=high, low_expert_bytes=low)

    def for_context(self, tokens: int) -> "BudgetPlan":
        """The plan whose KV reserve holds ``tokens`` (doubling, so that a growing sequence
        replans rarely): the pools give back what the KV needs. Raises ContextBudgetError when
        even the smallest pools leave too little."""
        if tokens > self.max_context():
            need = self.fixed_bytes + self.min_expert_bytes + self.kv_bytes_per_token * kv_tokens_for(tokens)
            raise ContextBudgetError(
                f"the context reached {tokens} tokens, more than the memory budget "
                f"{format_size(self.budget_bytes)} can hold ({self.max_context()} tokens with the "
                f"expert pools at their minimum); {tokens} tokens need a budget of at least "
                f"{format_size(need)} ({need} bytes)")
        return self._fit(max(tokens, min(2 * self.kv_tokens, self.max_context())))

    def for_new_sequence(self) -> "BudgetPlan":
        """The plan for a sequence that starts empty: the initial KV reserve, the rest to pools."""
        return self._fit(min(self.initial_context, self.max_context()))


def plan_budget(*, dense_bytes: int, activation_bytes: int, kv_bytes_per_token: int,
                all_high_bytes: int, min_high_bytes: int, min_low_bytes: int,
                mixed_precision: bool, memory_budget: int | str | None = None,
                expert_residency: float | None = None,
                initial_context: int = INITIAL_CONTEXT) -> BudgetPlan:
    """Split a budget (or derive one from a residency fraction of the 4-bit expert bytes)."""
    if memory_budget is not None and expert_residency is not None:
        raise ValueError("give memory_budget or expert_residency, not both")
    # MLX's freed-buffer cache holds the activations a chunk freed for the next chunk to reuse:
    # at most the activation reserve, and never at the same time as the activations themselves.
    cache_limit = activation_bytes
    fixed = dense_bytes + activation_bytes
    min_low = min_low_bytes if mixed_precision else 0
    plan = BudgetPlan(0, dense_bytes, activation_bytes, cache_limit, kv_bytes_per_token,
                      initial_context, 0, 0, all_high_bytes, min_high_bytes + min_low,
                      mixed_precision, expert_residency is None, min_low_bytes=min_low,
                      initial_context=initial_context)
    kv = kv_bytes_per_token * kv_tokens_for(initial_context)
    if expert_residency is not None:
        if not 0.0 <= expert_residency <= 1.0:
            raise ValueError(f"expert_residency must be between 0 and 1, not {expert_residency}")
        experts = max(int(expert_residency * all_high_bytes), plan.min_expert_bytes)
        plan = replace(plan, budget_bytes=fixed + kv + experts, initial_expert_bytes=experts)
        return plan._fit(initial_context)
    if memory_budget is None:
        # Default: everything if it fits in 60% of the machine, else as much of it as fits there.
        memory_budget = min(int(0.6 * system_memory_bytes()), fixed + kv + all_high_bytes)
    plan = replace(plan, budget_bytes=parse_size(memory_budget))
    if plan.budget_bytes < plan.minimum_bytes:
        minimum = plan.minimum_bytes
        raise BudgetError(
            f"memory budget {format_size(plan.budget_bytes)} is too small for this model: it needs "
            f"at least {format_size(minimum)} ({minimum} bytes) = dense weights "
            f"{format_size(dense_bytes)} + activations of a prefill chunk (measured) "
            f"{format_size(activation_bytes)} (MLX's buffer cache shares it) + KV "
            f"cache for {kv_tokens_for(1)} tokens {format_size(kv_bytes_per_token * kv_tokens_for(1))}"
            f" + one layer's top-k experts {format_size(plan.min_expert_bytes)}; anything above "
            "that caches experts or holds a longer context")
    return plan.for_new_sequence()
