"""One memory budget for the whole process, split into its parts.

``memory_budget`` is the ceiling for MLX's peak memory while generating. It must hold the resident
dense weights, the KV cache for ``max_context`` tokens, activations of a prefill chunk, MLX's own
freed-buffer cache (capped with ``mx.set_cache_limit``), the working set of one MoE layer (the
experts it stacks for one call) — and what is left is the expert cache.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


class BudgetError(ValueError):
    """The memory budget cannot run this model; the message gives the minimum."""


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


@dataclass
class BudgetPlan:
    budget_bytes: int
    dense_bytes: int
    kv_reserve_bytes: int
    activation_reserve_bytes: int
    working_set_bytes: int
    mlx_cache_limit_bytes: int
    expert_cache_bytes: int

    @property
    def minimum_bytes(self) -> int:
        """The smallest budget that runs at all (an expert cache of zero: load on demand)."""
        return self.budget_bytes - self.expert_cache_bytes

    def as_dict(self) -> dict:
        return asdict(self)


def working_set_experts(experts_per_token: int, num_experts: int) -> int:
    """How many experts one layer call may stack at once."""
    return max(2 * experts_per_token, num_experts // 2)


def plan_budget(*, dense_bytes: int, expert_bytes_high: int, expert_nbytes_max: int,
                experts_per_token: int, num_experts: int, kv_bytes_per_token: int, activation_bytes: int,
                max_context: int, memory_budget: int | str | None = None,
                expert_residency: float | None = None) -> BudgetPlan:
    """Split a budget (or derive one from a residency fraction) into its parts."""
    if memory_budget is not None and expert_residency is not None:
        raise ValueError("give memory_budget or expert_residency, not both")
    # A call stacks the experts it runs; a prompt chunk may need most of a layer. Up to half a
    # layer (at least two tokens' worth) is stacked at once; larger needs run in groups.
    working = 2 * working_set_experts(experts_per_token, num_experts) * expert_nbytes_max
    kv = kv_bytes_per_token * max_context
    fixed = dense_bytes + kv + activation_bytes + working
    if expert_residency is not None:
        if not 0.0 <= expert_residency <= 1.0:
            raise ValueError(f"expert_residency must be between 0 and 1, not {expert_residency}")
        cache = int(expert_residency * expert_bytes_high)
        mlx_cache = _mlx_cache_limit(working)
        return BudgetPlan(fixed + cache + mlx_cache, dense_bytes, kv, activation_bytes, working,
                          mlx_cache, cache)
    if memory_budget is None:
        # Default: everything if it fits in 60% of the machine, else as much of it as fits there.
        memory_budget = min(int(0.6 * system_memory_bytes()),
                            fixed + expert_bytes_high + _mlx_cache_limit(working))
    budget = parse_size(memory_budget)
    mlx_cache = _mlx_cache_limit(working)
    cache = min(budget - fixed - mlx_cache, expert_bytes_high)
    plan = BudgetPlan(budget, dense_bytes, kv, activation_bytes, working, mlx_cache, max(cache, 0))
    if cache < 0:
        minimum = fixed + mlx_cache
        raise BudgetError(
            f"memory budget {format_size(budget)} is too small for this model: it needs at least "
            f"{format_size(minimum)} ({minimum} bytes) = dense weights {format_size(dense_bytes)} + "
            f"KV cache for {max_context} tokens {format_size(kv)} + activations "
            f"{format_size(activation_bytes)} + one layer's experts {format_size(working)} + MLX buffer "
            f"cache {format_size(mlx_cache)}; anything above that caches experts")
    return plan


def _mlx_cache_limit(working: int) -> int:
    """MLX keeps freed buffers for reuse; cap that cache and count it inside the budget."""
    return max(2 * working, 4 * 2**20)
