"""HOBBIT threshold sweep: how t1 trades 2-bit loads (bytes read) against perplexity.

Scores a held-out file token by token with a KV cache (the cache sees decode-like traffic) at one
expert residency, for several t1 values (t1 = 1 is exact: every miss loads 4-bit), and writes a
markdown table to bench/results/t1-sweep.md.

    python bench/sweep_t1.py [--residency 0.25] [--tokens 288] [--t1 1,0.75,0.6,0.45,0.3,0.15]
"""

from __future__ import annotations

import argparse
import math
import sys
import sysconfig
from pathlib import Path

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

import hobbit_mlx

HELD_OUT = Path(sysconfig.get_paths()["stdlib"]) / "base64.py"  # in reference/val_files.txt


def decode_nll(model, ids: list[int], warmup: int = 32) -> float:
    """Mean negative log-likelihood of ids[warmup:], one token per forward pass."""
    cache = make_prompt_cache(model)
    logits = model(mx.array([ids[:warmup]]), cache=cache)[0, -1]
    total = 0.0
    for t in range(warmup, len(ids)):
        total -= float(logits[ids[t]] - mx.logsumexp(logits))
        logits = model(mx.array([[ids[t]]]), cache=cache)[0, -1]
    return total / (len(ids) - warmup)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="default: the bundled reference model")
    ap.add_argument("--residency", type=float, default=0.25)
    ap.add_argument("--tokens", type=int, default=288)
    ap.add_argument("--t1", default="1,0.75,0.6,0.45,0.3,0.15")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "t1-sweep.md"))
    args = ap.parse_args(argv)
    rows = []
    for t1 in [float(v) for v in args.t1.split(",")]:
        exact = t1 >= 1.0
        model, tok = hobbit_mlx.load(args.model, expert_residency=args.residency, exact=exact,
                                     mixed_precision=not exact, t1=t1, t2=1.0, progress=False)
        ids = tok.encode(HELD_OUT.read_text())[: args.tokens]
        ppl = math.exp(decode_nll(model, ids))
        s = hobbit_mlx.offload_stats(model)
        loads = s["misses_high"] + s["misses_low"]
        rows.append(f"| {t1} | {ppl:.3f} | {s['misses_low'] / max(loads, 1):.2f} | "
                    f"{s['hits_low'] / max(s['hits_high'] + s['hits_low'], 1):.2f} | {s['hit_rate']:.3f} | "
                    f"{s['bytes_read'] / 2**20:.1f} |")
        print(rows[-1], flush=True)
    text = (f"# HOBBIT t1 sweep\n\nCommand: `python bench/sweep_t1.py --residency {args.residency} "
            f"--tokens {args.tokens} --t1 {args.t1}`\n\nHeld-out text: `{HELD_OUT.name}`, scored token by "
            f"token; expert residency {args.residency:.0%}; t2 = 1 (nothing skipped); t1 = 1 is exact.\n\n"
            "| t1 | perplexity | 2-bit share of misses | 2-bit share of hits | served from memory | MiB read |\n"
            "|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")
    Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
