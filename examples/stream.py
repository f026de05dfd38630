#!/usr/bin/env python3
"""Streaming generation: print each piece of text as soon as it is decoded.

    python examples/stream.py [--model PATH_OR_HUB_ID] [--memory-budget 16MB] [--max-tokens 48]

``hobbit_mlx.stream_generate`` is mlx-lm's ``stream_generate`` with the memory budget planned for
the sequence first, so each response carries mlx-lm's fields (text, token, speeds, peak memory).
"""

import argparse
import sys

import hobbit_mlx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="hobbit, mlx-lm or HF model, or a hub id")
    parser.add_argument("--memory-budget", default="16MB")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--prompt", default="class Stack:")
    args = parser.parse_args()

    model, tokenizer = hobbit_mlx.load(args.model, memory_budget=args.memory_budget)
    sys.stdout.write(args.prompt)
    last = None
    for response in hobbit_mlx.stream_generate(model, tokenizer, args.prompt,
                                               max_tokens=args.max_tokens):
        sys.stdout.write(response.text)
        sys.stdout.flush()
        last = response
    print(f"\n\n{last.generation_tokens} tokens at {last.generation_tps:.1f} tokens/s, "
          f"peak memory {last.peak_memory:.3f} GB")


if __name__ == "__main__":
    main()
