"""HOBBIT threshold sweep: how t1 (2-bit loads) and t2 (skips) trade bytes read against perplexity.

Scores a held-out file token by token with a KV cache (the cache sees decode-like traffic) at one
expert residency: first t1 values with nothing skipped (t1 = 1 is exact: every miss loads 4-bit),
then t2 values with ``skip`` on at the default t1. Writes a markdown table to
bench/results/threshold-sweep.md.

    python bench/sweep_thresholds.py [--residency 0.25] [--tokens 288] [--t1 1,0.75,0.6,0.45,0.3,0.15]
        [--t2 0.95,0.9,0.8,0.7]
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
DEFAULT_T1 = 0.6


WARMUP_TOKENS = 32  # context before the first scored token


def decode_nll(model, ids: list[int], warmup: int = WARMUP_TOKENS) -> float:
    """Mean negative log-likelihood of ids[warmup:], one token per forward pass."""
    cache = make_prompt_cache(model)
    logits = model(mx.array([ids[:warmup]]), cache=cache)[0, -1]
    total = 0.0
    for t in range(warmup, len(ids)):
        total -= float(logits[ids[t]] - mx.logsumexp(logits))
        logits = model(mx.array([[ids[t]]]), cache=cache)[0, -1]
    return total / (len(ids) - warmup)


def measure(model_path, residency: float, tokens: int, t1: float, t2: float, skip: bool) -> dict:
    exact = t1 >= 1.0 and not skip
    model, tok = hobbit_mlx.load(model_path, expert_residency=residency, exact=exact,
                                 mixed_precision=not exact, t1=t1, t2=t2, skip=skip, progress=False)
    ids = tok.encode(HELD_OUT.read_text())[:tokens]
    try:
        ppl = math.exp(decode_nll(model, ids))
        s = hobbit_mlx.offload_stats(model)
    finally:
        hobbit_mlx.runtime_of(model).close()  # its readers and cache go before the next point
    req = max(s["expert_requests"], 1)
    return {"t1": t1, "t2": t2 if skip else None, "ppl": ppl, "high_loads": s["misses_high"] / req,
            "low_loads": s["misses_low"] / req, "skipped": s["skipped"] / req,
            "hit_rate": s["hit_rate"], "mib_read": s["bytes_read"] / 2**20}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="default: the bundled reference model")
    ap.add_argument("--residency", type=float, default=0.25)
    ap.add_argument("--tokens", type=int, default=288)
    ap.add_argument("--t1", default="1,0.75,0.6,0.45,0.3,0.15")
    ap.add_argument("--t2", default="0.95,0.9,0.8,0.7", help="swept with skip on, at t1=%s" % DEFAULT_T1)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "threshold-sweep.md"))
    args = ap.parse_args(argv)
    if args.tokens <= WARMUP_TOKENS:
        ap.error(f"--tokens must be above the {WARMUP_TOKENS} tokens of context the scoring "
                 f"starts after (got {args.tokens})")
    points = [(float(v), 1.0, False) for v in args.t1.split(",") if v]
    points += [(min(DEFAULT_T1, float(v)), float(v), True) for v in args.t2.split(",") if v]
    rows, exact_ppl = [], None
    for t1, t2, skip in points:
        r = measure(args.model, args.residency, args.tokens, t1, t2, skip)
        if t1 >= 1.0 and not skip:
            exact_ppl = r["ppl"]
        cost = f"{100 * (r['ppl'] / exact_ppl - 1):+.1f}%" if exact_ppl else "n/a"
        rows.append(f"| {t1} | {'off' if r['t2'] is None else r['t2']} | {r['ppl']:.3f} | {cost} | "
                    f"{r['high_loads']:.3f} | {r['low_loads']:.3f} | {r['skipped']:.3f} | "
                    f"{r['hit_rate']:.3f} | {r['mib_read']:.1f} |")
        print(rows[-1], flush=True)
    text = (f"# HOBBIT threshold sweep\n\nCommand: `python bench/sweep_thresholds.py --residency "
            f"{args.residency} --tokens {args.tokens} --t1 {args.t1} --t2 {args.t2}`\n\n"
            f"Held-out text: `{HELD_OUT.name}`, scored token by token; expert residency "
            f"{args.residency:.0%}; other options at their defaults. t1 = 1 with skip off is exact. "
            "Loads and skips are shares of expert requests (one request = one expert a layer call "
            "chose); a hit loads nothing.\n\n"
            "| t1 | t2 (skip) | perplexity | vs exact | 4-bit loads | 2-bit loads | skipped | "
            "served from memory | MiB read |\n|---|---|---|---|---|---|---|---|---|\n"
            + "\n".join(rows) + "\n")
    Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
