#!/usr/bin/env python3
"""A chat loop that keeps the conversation's KV cache between turns.

    python examples/chat_loop.py [--model PATH_OR_HUB_ID] [--memory-budget 16MB] [--max-tokens 64]
    echo "hello" | python examples/chat_loop.py          # one turn per input line, then exit
    python examples/chat_loop.py --once "hello"           # one turn, then exit

Interactive when stdin is a terminal (an empty line or Ctrl-D ends it); otherwise every line of
stdin is one user turn, which is how the test suite runs it.
"""

import argparse
import sys

from mlx_lm.models.cache import make_prompt_cache

import hobbit_mlx


def turns(once: str | None):
    """User messages: the --once message, else stdin's lines (prompting when it is a terminal)."""
    if once is not None:
        yield once
        return
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print(">> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or (interactive and not line.strip()):
            return
        if line.strip():
            yield line.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="hobbit, mlx-lm or HF model, or a hub id")
    parser.add_argument("--memory-budget", default="16MB")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--once", default=None, metavar="MESSAGE", help="one turn, then exit")
    args = parser.parse_args()

    model, tokenizer = hobbit_mlx.load(args.model, memory_budget=args.memory_budget)
    cache = make_prompt_cache(model)  # the conversation so far, reused by every turn
    for message in turns(args.once):
        if not sys.stdin.isatty() or args.once is not None:
            print(f">> {message}")
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": message}],
                                               add_generation_prompt=True)
        for response in hobbit_mlx.stream_generate(model, tokenizer, prompt, prompt_cache=cache,
                                                   max_tokens=args.max_tokens):
            print(response.text, end="", flush=True)
        print()
    stats = hobbit_mlx.offload_stats(model)
    print(f"[{stats['context_tokens']} tokens of context; expert hit rate {stats['hit_rate']:.2f}]")


if __name__ == "__main__":
    main()
