#!/usr/bin/env python3
"""The Python API under a memory budget: load, generate, then see what the expert cache did.

    python examples/api_budget.py [--model PATH_OR_HUB_ID] [--memory-budget 16MB] [--max-tokens 32]

Without --model it runs the bundled reference model (22 MB, so a 16 MB budget keeps only part of
its experts resident and the rest stream from storage).
"""

import argparse

import hobbit_mlx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="hobbit, mlx-lm or HF model, or a hub id")
    parser.add_argument("--memory-budget", default="16MB")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--prompt", default="def fibonacci(n):")
    args = parser.parse_args()

    model, tokenizer = hobbit_mlx.load(args.model, memory_budget=args.memory_budget)
    text = hobbit_mlx.generate(model, tokenizer, args.prompt, max_tokens=args.max_tokens)
    print(args.prompt + text)

    stats = hobbit_mlx.offload_stats(model)
    print(f"\nbudget {stats['budget_bytes'] / 1e6:.1f} MB, peak {stats['peak_memory_bytes'] / 1e6:.1f} MB, "
          f"expert pools {stats['expert_cache_bytes'] / 1e6:.1f} MB")
    print(f"expert hits {stats['hits_high']} (4-bit) + {stats['hits_low']} (2-bit), misses "
          f"{stats['misses_high']} + {stats['misses_low']}, hit rate {stats['hit_rate']:.2f}, "
          f"{stats['bytes_read'] / 1e6:.1f} MB read from storage")


if __name__ == "__main__":
    main()
