"""``python -m hobbit_mlx.plan MODEL [--memory-budget SIZE] [--json]``: a model's budget, before loading it.

Reads only config.json and the safetensors headers (``hobbit_mlx.sizes``: local, or a hub id
through the cache or ``huggingface_hub``'s metadata calls, no weights) and prints the dense bytes,
the expert bytes at 4 and 2 bits, the KV bytes per token, the smallest budget that runs, and the
budget ``load`` would choose on this machine (or for ``--memory-budget``) with the share of the
experts it keeps resident. The split is ``hobbit_mlx.budget``'s own; only the activations of a
prefill chunk are estimated here (``load`` measures them on the model).

An unknown model, a model that is not an MoE, or a hub id that is not cached while the hub cannot
be reached ends with one ``error: ...`` line and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from .budget import BudgetError, BudgetPlan, format_size, parse_size, plan_budget, system_memory_bytes
from .options import LoadOptions

EXIT_BAD_INPUT = 2


def _plan(sizes, mixed_precision: bool, memory_budget) -> BudgetPlan:
    k = sizes.experts_per_token
    return plan_budget(
        dense_bytes=sizes.dense_bytes, activation_points=sizes.activation_points,
        kv_bytes_per_token=sizes.kv_bytes_per_token, all_high_bytes=sizes.all_bytes("high"),
        min_high_bytes=sum(k * b for b in sizes.expert_slot_bytes["high"]),
        min_low_bytes=sum(k * b for b in sizes.expert_slot_bytes["low"]),
        mixed_precision=mixed_precision, memory_budget=memory_budget,
        kv_layer_bytes_per_token=sizes.kv_layer_bytes_per_token,
        context_activation=sizes.context_activation)


def plan_model(model: str, memory_budget: int | str | None = None,
               options: LoadOptions | None = None) -> dict:
    """What ``load(model, memory_budget=...)`` would plan, from config.json and headers only.

    Raises ``sizes.ModelNotFound``, ``UnsupportedModelError`` (not an MoE) or ``BudgetError``."""
    from .loader import compute_dtype
    from .sizes import model_sizes, read_checkpoint

    o = (options or LoadOptions()).with_overrides(memory_budget=memory_budget)
    ckpt = read_checkpoint(model)
    sizes = model_sizes(ckpt, compute_dtype=compute_dtype(o.dtype),
                        prefill_step_size=o.prefill_step_size)
    mixed = o.precision().mixed_precision
    minimum = _plan(sizes, mixed, 1 << 62).minimum_bytes
    minimum_exact = _plan(sizes, False, 1 << 62).minimum_bytes
    plan = _plan(sizes, mixed, o.memory_budget)
    total_experts = sizes.num_experts * sizes.num_moe_layers
    share_high = min(1.0, plan.high_expert_bytes / max(1, sizes.all_bytes("high")))
    share_low = min(1.0, plan.low_expert_bytes / max(1, sizes.all_bytes("low")))
    return {
        "model": str(model), "read_from": ckpt.where, "model_type": sizes.model_type,
        "moe_layers": sizes.num_moe_layers, "experts_per_layer": sizes.num_experts,
        "experts_per_token": sizes.experts_per_token, "total_experts": total_experts,
        "dense_bytes": sizes.dense_bytes,
        "expert_bytes_4bit": sizes.expert_bytes["high"], "expert_bytes_2bit": sizes.expert_bytes["low"],
        "kv_bytes_per_token": sizes.kv_bytes_per_token,
        "activation_bytes_estimated": dict(sizes.activation_points),
        "context_activation_estimated": sizes.context_activation,
        "compute_dtype": sizes.compute_dtype,
        "minimum_budget_bytes": minimum, "minimum_budget_bytes_exact": minimum_exact,
        "system_memory_bytes": system_memory_bytes(),
        "budget_given": o.memory_budget is not None,
        "budget_bytes": plan.budget_bytes,
        "expert_pool_bytes_4bit": plan.high_expert_bytes,
        "expert_pool_bytes_2bit": plan.low_expert_bytes,
        "kv_reserve_tokens": plan.kv_tokens, "prefill_chunk_tokens": plan.chunk_tokens,
        "resident_share_4bit": share_high, "resident_share_2bit": share_low,
    }


def render(p: dict) -> str:
    size = format_size
    how = "given" if p["budget_given"] else (
        f"the default for this machine: the whole model, at most 60% of its "
        f"{size(p['system_memory_bytes'])}")
    lines = [
        f"{p['model']} ({p['model_type']}, read from {p['read_from']}): {p['moe_layers']} MoE layers "
        f"x {p['experts_per_layer']} experts, top-{p['experts_per_token']}",
        f"  dense weights            {size(p['dense_bytes'])}  (resident, {p['compute_dtype']} floats)",
        f"  experts, 4-bit           {size(p['expert_bytes_4bit'])}",
        f"  experts, 2-bit           {size(p['expert_bytes_2bit'])}",
        f"  KV cache per token       {size(p['kv_bytes_per_token'])}",
        f"  minimum budget           {size(p['minimum_budget_bytes'])}  (exact mode: "
        f"{size(p['minimum_budget_bytes_exact'])}; prefill activations estimated, load() measures them)",
        f"  budget                   {size(p['budget_bytes'])}  ({how})",
        f"    4-bit expert pool      {size(p['expert_pool_bytes_4bit'])}  = "
        f"{100 * p['resident_share_4bit']:.1f}% of the 4-bit experts resident",
        f"    2-bit expert pool      {size(p['expert_pool_bytes_2bit'])}  = "
        f"{100 * p['resident_share_2bit']:.1f}% of the 2-bit experts",
        f"    KV reserve             {p['kv_reserve_tokens']} tokens; prefill chunks of "
        f"{p['prefill_chunk_tokens']} tokens",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hobbit_mlx.plan",
        description="Print the memory plan of an MoE model before loading it (reads only its "
                    "config.json and safetensors headers).")
    parser.add_argument("model", help="a local model directory (mlx-lm, Hugging Face or hobbit) "
                                      "or a hub repo id")
    parser.add_argument("--memory-budget", default=None, metavar="SIZE",
                        help="plan for this budget (e.g. 10GB) instead of this machine's default")
    parser.add_argument("--exact", action="store_true", help="plan for exact mode (4-bit only)")
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")
    args = parser.parse_args(argv)
    from .architectures import UnsupportedModelError
    from .sizes import ModelNotFound
    from .store import StoreError

    try:
        budget = None if args.memory_budget is None else parse_size(args.memory_budget)
        if budget is not None and budget <= 0:
            raise ValueError(f"--memory-budget must be positive, not {args.memory_budget!r}")
        p = plan_model(args.model, budget, LoadOptions(exact=args.exact))
    except (ModelNotFound, UnsupportedModelError, BudgetError, StoreError, ValueError) as e:
        text = " ".join(str(e).split())
        print(f"error: {text}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(json.dumps(p, indent=2) if args.json else render(p))
    return 0


if __name__ == "__main__":
    sys.exit(main())
