"""HOBBIT threshold sweep: how t1 (2-bit loads) and t2 (skips) trade bytes read against perplexity.

Scores a held-out file token by token with a KV cache (the cache sees decode-like traffic) at one
expert residency: first t1 values with nothing skipped (t1 = 1 is exact: every miss loads 4-bit),
then t2 values with ``skip`` on at the default t1. Big-little is off in every row (its dropped
experts would count as skipped), so a row with skip off drops nothing. Every share is of expert
requests: 4-bit loads + 2-bit loads + skipped + served from memory = 1. Writes a markdown table
to bench/results/threshold-sweep.md.

    python bench/sweep_thresholds.py [--residency 0.25] [--tokens 288] [--t1 1,0.75,0.6,0.45,0.3,0.15]
        [--t2 0.95,0.9,0.8,0.7]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

if __package__ in (None, ""):
    import _path  # noqa: F401  (repository root on sys.path, see bench/_path.py)

import hobbit_mlx  # noqa: E402
from bench import arguments  # noqa: E402
from bench.workload import heldout_text  # noqa: E402

HELD_OUT = "base64.py"  # in reference/val_files.txt, kept in reference/val_texts.json.gz
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
                                 mixed_precision=not exact, t1=t1, t2=t2, skip=skip,
                                 big_little=False, progress=False)
    ids = tok.encode(heldout_text(HELD_OUT))[:tokens]
    try:
        ppl = math.exp(decode_nll(model, ids))
        s = hobbit_mlx.offload_stats(model)
    finally:
        hobbit_mlx.runtime_of(model).close()  # its readers and cache go before the next point
    return {"t1": t1, "t2": t2 if skip else None, "ppl": ppl, **shares(s),
            "mib_read": s["bytes_read"] / 2**20}


def shares(stats: dict) -> dict:
    """4-bit loads, 2-bit loads, skipped and served from memory, each a share of the expert
    requests (``offload_stats``' counters): one denominator, so the four add up to 1."""
    req = max(stats["expert_requests"], 1)
    return {"high_loads": stats["misses_high"] / req, "low_loads": stats["misses_low"] / req,
            "skipped": stats["skipped"] / req,
            "served": (stats["hits_high"] + stats["hits_low"]) / req}


def _thresholds(text: str) -> list[float]:
    out = []
    for v in text.split(","):
        v = v.strip()
        if not v:
            continue
        try:
            out.append(float(v))
        except ValueError:
            raise arguments.Bad(f"thresholds in [0, 1], comma-separated, not {text!r}") from None
        if not 0.0 <= out[-1] <= 1.0:
            raise arguments.Bad(f"a threshold is in [0, 1], not {v}")
    return out


@arguments.refuse_bad_input
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, type=arguments.model_or_repo,
                    help="default: the bundled reference model")
    ap.add_argument("--residency", type=arguments.residency, default=0.25)
    ap.add_argument("--tokens", type=int, default=288)
    ap.add_argument("--t1", default="1,0.75,0.6,0.45,0.3,0.15", type=_thresholds)
    ap.add_argument("--t2", default="0.95,0.9,0.8,0.7", type=_thresholds,
                    help="swept with skip on, at t1=%s" % DEFAULT_T1)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "threshold-sweep.md"))
    args = ap.parse_args(argv)
    if args.tokens <= WARMUP_TOKENS:
        ap.error(f"--tokens must be above the {WARMUP_TOKENS} tokens of context the scoring "
                 f"starts after (got {args.tokens})")
    if not args.t1 and not args.t2:
        ap.error("nothing to sweep: --t1 and --t2 are both empty")
    out = arguments.out_dir(ap, args.out, file=True)
    t1s, t2s = ",".join(f"{v:g}" for v in args.t1), ",".join(f"{v:g}" for v in args.t2)
    points = [(v, 1.0, False) for v in args.t1]
    points += [(min(DEFAULT_T1, v), v, True) for v in args.t2]
    rows, exact_ppl = [], None
    for t1, t2, skip in points:
        r = measure(args.model, args.residency, args.tokens, t1, t2, skip)
        if t1 >= 1.0 and not skip:
            exact_ppl = r["ppl"]
        cost = f"{100 * (r['ppl'] / exact_ppl - 1):+.1f}%" if exact_ppl else "n/a"
        rows.append(f"| {t1} | {'off' if r['t2'] is None else r['t2']} | {r['ppl']:.3f} | {cost} | "
                    f"{r['high_loads']:.3f} | {r['low_loads']:.3f} | {r['skipped']:.3f} | "
                    f"{r['served']:.3f} | {r['mib_read']:.1f} |")
        print(rows[-1], flush=True)
    text = (f"# HOBBIT threshold sweep\n\nCommand: `python bench/sweep_thresholds.py --residency "
            f"{args.residency:g} --tokens {args.tokens} --t1 {t1s} --t2 {t2s}"
            + (f" --model {args.model}" if args.model else "") + "`\n\n"
            f"Held-out text: `{HELD_OUT}`, scored token by token; expert residency "
            f"{args.residency:.0%}; big-little off in every row (its dropped experts would count "
            "as skipped), so t2 (skip) = off drops nothing; other options at their defaults. "
            "t1 = 1 with skip off is exact. Every column but perplexity and MiB is a share of the "
            "expert requests (one request = one expert a layer call chose): 4-bit loads + 2-bit "
            "loads + skipped + served from memory = 1; a request served from memory loads "
            "nothing.\n\n"
            "| t1 | t2 (skip) | perplexity | vs exact | 4-bit loads | 2-bit loads | skipped | "
            "served from memory | MiB read |\n|---|---|---|---|---|---|---|---|---|\n"
            + "\n".join(rows) + "\n")
    out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
