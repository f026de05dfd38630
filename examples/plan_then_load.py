#!/usr/bin/env python3
"""Read a model's memory plan before loading it, then load it with a budget chosen from the plan.

    python examples/plan_then_load.py [--model PATH_OR_HUB_ID] [--residency 0.5]

``hobbit_mlx.plan.plan_model`` reads only config.json and the safetensors headers (a hub id:
through the Hugging Face cache or the hub's metadata calls, no weights), like
``python -m hobbit_mlx.plan MODEL``. Here the budget is the one the plan says keeps about
``--residency`` of the 4-bit experts resident beside a context of 1,024 tokens (the plan's
default): the minimum holds only a first KV step, so the minimum plus that share of the experts'
bytes would keep fewer resident.
"""

import argparse

import hobbit_mlx
from hobbit_mlx.budget import format_size
from hobbit_mlx.plan import plan_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="hobbit, mlx-lm or HF model, or a hub id")
    parser.add_argument("--residency", type=float, default=0.5,
                        help="share of the 4-bit experts to budget for (0..1)")
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()
    model_id = args.model or str(hobbit_mlx.loader.REFERENCE_MODEL)

    plan = plan_model(model_id)
    print(f"{model_id}: dense {format_size(plan['dense_bytes'])}, experts "
          f"{format_size(plan['expert_bytes_high'])} (4-bit) / {format_size(plan['expert_bytes_low'])} "
          f"(2-bit), KV {format_size(plan['kv_bytes_per_token'])} per token")
    print(f"minimum budget {format_size(plan['minimum_budget_bytes'])}; this machine would give it "
          f"{format_size(plan['budget_bytes'])} ({100 * plan['resident_share_high']:.0f}% of the "
          f"4-bit experts resident)")

    budget = int(plan["minimum_budget_bytes"] + args.residency * plan["expert_bytes_high"])
    chosen = plan_model(model_id, budget)
    for _ in range(8):  # the KV reserve and the pools' granularity take their share: top up
        short = args.residency - chosen["resident_share_high"]
        if short <= 0.01:
            break
        budget += int(short * plan["expert_bytes_high"]) + 1
        chosen = plan_model(model_id, budget)
    print(f"loading with {format_size(budget)}: about {100 * chosen['resident_share_high']:.0f}% of "
          f"the 4-bit experts resident")
    model, tokenizer = hobbit_mlx.load(model_id, memory_budget=budget)
    print(hobbit_mlx.generate(model, tokenizer, "import os\n", max_tokens=args.max_tokens))
    stats = hobbit_mlx.offload_stats(model)
    print(f"peak memory {format_size(stats['peak_memory_bytes'])} of {format_size(stats['budget_bytes'])}")


if __name__ == "__main__":
    main()
