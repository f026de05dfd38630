#!/usr/bin/env python3
"""A long prompt, prefilled chunk by chunk (mlx-lm's order) and layer by layer: bytes and time.

    python bench/long_prompt.py [--budgets 24MB,18MB] [--steps 64,256] [--prompt-tokens 1536]
        [--storage 20MB/s] [--out bench/results] [--name long-prompt-reference]

The bundled reference model, exact mode (so both orders must give the same text), one held-out
piece as the prompt, 8 tokens generated. Chunk by chunk, every chunk reads nearly every expert of
every layer again; layer by layer, a layer's experts are read once for all the chunks (see
``hobbit_mlx/layer_major.py``). Reported per run: prompt tokens/s (prefill included, as mlx-lm
reports it), MiB read, that as a multiple of all the 4-bit experts, and the chunk the budget let
the prefill use. ``--storage``: a simulated device every read waits for (``none``: this machine's
page cache). Writes ``OUT/NAME.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    import _path  # noqa: F401  (repository root on sys.path, see bench/_path.py)

from bench import arguments  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def run(budget: str, step: int, layer_major: bool, prompt: list[int], storage) -> dict:
    import hobbit_mlx
    from hobbit_mlx.loader import runtime_of

    model, tok = hobbit_mlx.load(None, memory_budget=budget, exact=True, progress=False,
                                 prefill_step_size=step, layer_major_prefill=layer_major,
                                 simulated_storage=storage)
    rt = runtime_of(model)
    used = layer_major and not rt.cache.all_high_resident  # (nothing to read: mlx-lm's order)
    responses = list(hobbit_mlx.stream_generate(model, tok, prompt, max_tokens=8))
    stats = hobbit_mlx.offload_stats(model)
    row = {"budget": budget, "step": step, "order": "layers" if used else "chunks" + (" (every expert resident)" if layer_major else ""),
           "chunk": rt.plan.chunk_tokens, "prompt_tokens": responses[-1].prompt_tokens,
           "prompt_tps": responses[-1].prompt_tps, "bytes_read": stats["bytes_read"],
           "all_experts": rt.manifest.expert_bytes("high"),
           "peak_vs_budget": stats["peak_memory_bytes"] / stats["budget_bytes"],
           "tokens": [r.token for r in responses]}
    rt.close()
    return row


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "—"


def _steps(text: str) -> list[int]:
    try:
        out = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        out = []
    if not out or min(out) < 1:
        raise arguments.Bad(f"prefill step sizes of 1 token or more, comma-separated, not {text!r}")
    return out


@arguments.refuse_bad_input
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budgets", default="24MB,18MB", type=arguments.sizes)
    ap.add_argument("--steps", default="64,256", type=_steps)
    ap.add_argument("--prompt-tokens", type=int, default=1536)
    ap.add_argument("--storage", default="20MB/s", type=arguments.storage("none"),
                    help='a simulated device, or "none"')
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--name", default="long-prompt-reference")
    args = ap.parse_args(argv)
    if not args.budgets:
        ap.error("--budgets: at least one budget")
    if args.prompt_tokens < 2:
        ap.error(f"--prompt-tokens must be at least 2, not {args.prompt_tokens}")
    out = arguments.out_dir(ap, args.out)
    from bench.forced_decode import text_pieces
    from hobbit_mlx.loader import REFERENCE_MODEL
    from mlx_lm.utils import load_tokenizer

    tok = load_tokenizer(REFERENCE_MODEL)
    prompt = [int(t) for t in text_pieces(tok, 1, args.prompt_tokens)[0]]
    storage = None if args.storage == "none" else args.storage
    rows = []
    for budget in args.budgets:
        for step in args.steps:
            pair = [run(budget, step, lm, prompt, storage) for lm in (False, True)]
            if pair[0]["tokens"] != pair[1]["tokens"]:
                raise SystemExit(f"{budget} step {step}: the two orders generated different tokens")
            rows += pair
            for r in pair:
                print(f"{budget:>6} step {step:4d} (chunk {r['chunk']:4d}) {r['order']:6s}: "
                      f"{r['prompt_tps']:7.1f} prompt tok/s, {r['bytes_read'] / 2**20:7.1f} MiB "
                      f"read ({r['bytes_read'] / r['all_experts']:.1f}x the experts), "
                      f"peak {r['peak_vs_budget']:.2f} of the budget", flush=True)
    cmd = arguments.command(__file__, argv)
    lines = ["# A long prompt: prefill chunk by chunk against layer by layer", "",
             f"`{cmd.strip()}` — reference model, exact mode, one held-out prompt of "
             f"{rows[0]['prompt_tokens']} tokens, 8 tokens generated (the same in both orders); "
             f"storage: {args.storage}; all 4-bit experts: {rows[0]['all_experts'] / 2**20:.2f} MiB.",
             "", "| budget | step (chunk used) | order | prompt tok/s | MiB read | × all experts | "
             "× chunk order's bytes | peak / budget |", "|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(rows):
        base = rows[i - i % 2]
        lines.append(f"| {r['budget']} | {r['step']} ({r['chunk']}) | {r['order']} | "
                     f"{r['prompt_tps']:.1f} | {r['bytes_read'] / 2**20:.1f} | "
                     f"{r['bytes_read'] / r['all_experts']:.2f} | "
                     f"{_ratio(r['bytes_read'], base['bytes_read'])} | {r['peak_vs_budget']:.2f} |")
    (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    (out / f"{args.name}.json").write_text(json.dumps(rows, indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
