#!/usr/bin/env python3
"""What fitting the low copies buys: the 2-bit experts' error, and decode quality on the same
tokens, with the converter's two roundings (``--low-rounding fitted`` and ``nearest``).

    python bench/low_rounding.py [--model SRC] [--residencies 0.5,0.25] [--tokens 256]
        [--pieces 8] [--prompt-tokens 64] [--configs default,default-upgrade]
        [--config NAME=JSON ...] [--work DIR]
        [--low-bits 2] [--group-size 64] [--out bench/results]
        [--name NAME] [--no-decode]

1. Every stacked expert weight of the source (an mlx-lm checkpoint: dequantized first when
   quantized) is quantized at the low width both ways; the squared error relative to the
   weights, per projection and in all, is what each rounding loses.
2. The source is converted once per rounding (into ``--work``, a temporary directory by default)
   and ``bench/forced_decode.py`` decodes the same held-out tokens on each, under mac-like
   storage: the KL divergence of each next-token distribution from mlx-lm's (the sensitive
   measure: perplexity moves by chance as much as by a better copy), decode perplexity against
   mlx-lm, top-1 agreement and bytes per token, side by side.
   Only the lossy techniques read the low copies, so exact configurations are left out.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):
    import _path  # noqa: F401  (repository root on sys.path, see bench/_path.py)

from bench import arguments, forced_decode  # noqa: E402
from bench.workload import REFERENCE_MODEL, RESULTS  # noqa: E402
from hobbit_mlx.store import LOW_ROUNDINGS as ROUNDINGS  # noqa: E402  (fitted, nearest)


def weight_errors(src: Path, bits: int, group_size: int) -> dict[str, dict[str, float]]:
    """{projection name: {rounding: squared error / squared weights}}, and "all"."""
    import mlx.core as mx

    from convert.fitted_quant import fitted_quantize

    cfg = json.loads((src / "config.json").read_text())
    q = cfg.get("quantization") or {}
    sums: dict[str, dict[str, float]] = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors = mx.load(str(f))
        for key, w in tensors.items():
            stem = key[:-len(".weight")]
            if not key.endswith(".weight") or w.ndim != 3:
                continue  # (experts are stacked: [experts, out, in])
            if f"{stem}.scales" in tensors:
                spec = q.get(stem, q)
                w = mx.dequantize(w, tensors[f"{stem}.scales"], tensors.get(f"{stem}.biases"),
                                  group_size=spec["group_size"], bits=spec["bits"],
                                  mode=spec.get("mode", "affine"))
            elif not mx.issubdtype(w.dtype, mx.floating):
                continue
            w32 = w.astype(mx.float32)
            row = sums.setdefault(stem.rpartition(".")[2], {"weights": 0.0})
            row["weights"] += float(mx.square(w32).sum())
            for name, packed in (("fitted", fitted_quantize(w, group_size, bits)),
                                 ("nearest", mx.quantize(w, group_size, bits))):
                back = mx.dequantize(*packed, group_size=group_size, bits=bits)
                row[name] = row.get(name, 0.0) + float(mx.square(back.astype(mx.float32) - w32).sum())
    if not sums:
        raise ValueError(f"{src}: no stacked expert weights found (an mlx-lm checkpoint is needed)")
    total = {k: sum(r[k] for r in sums.values()) for k in ("weights", *ROUNDINGS)}
    return {name: {r: row[r] / row["weights"] for r in ROUNDINGS}
            for name, row in {**sums, "all": total}.items()}


@arguments.refuse_bad_input
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, type=arguments.model_dir,
                    help="an mlx-lm checkpoint (default: the bundled reference model)")
    ap.add_argument("--residencies", default="0.5,0.25", type=arguments.residencies)
    ap.add_argument("--configs", default="default,default-upgrade")
    ap.add_argument("--config", action="append", default=[],
                    help="NAME=JSON: an extra configuration, as forced_decode.py takes it")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--pieces", type=int, default=8)
    ap.add_argument("--low-bits", type=int, default=2)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--work", default=None, help="where the two conversions go (kept)")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--name", default=None)
    ap.add_argument("--no-decode", action="store_true", help="the weight errors only")
    args = ap.parse_args(argv)
    from hobbit_mlx.quantizable import mlx_quantizes

    if not mlx_quantizes(args.low_bits, args.group_size):
        ap.error(f"MLX does not quantize at {args.low_bits} bits in groups of {args.group_size}")
    for flag, value in (("--tokens", args.tokens), ("--prompt-tokens", args.prompt_tokens),
                        ("--pieces", args.pieces)):
        if value < 1:
            ap.error(f"{flag} must be at least 1, not {value}")
    out_dir = arguments.out_dir(ap, args.out)
    src = Path(args.model or REFERENCE_MODEL).expanduser()
    name = args.name or f"low-rounding-{'reference' if src.resolve() == REFERENCE_MODEL.resolve() else src.name}"

    errors = weight_errors(src, args.low_bits, args.group_size)
    lines = [f"# The low copies, fitted or rounded to the nearest level: {name}", "",
             f"Command: `{arguments.command(__file__, argv)}`", "",
             f"{args.low_bits}-bit copies of every expert weight (groups of {args.group_size}): "
             "squared error / squared weights.", "",
             "| projection | fitted | nearest (mx.quantize) | fitted / nearest |", "|---|---|---|---|"]
    lines += [f"| {p} | {e['fitted']:.4f} | {e['nearest']:.4f} | {e['fitted'] / e['nearest']:.2f} |"
              for p, e in errors.items()]
    print("\n".join(lines[6:]), file=sys.stderr)
    if not args.no_decode:
        lines += decode_rows(args, src, out_dir, name)
    text = "\n".join(lines) + "\n"
    tmp = out_dir / f"{name}.md.tmp"
    tmp.write_text(text)
    tmp.replace(out_dir / f"{name}.md")
    print(text)
    return 0


def decode_rows(args, src: Path, out_dir: Path, name: str) -> list[str]:
    """Each rounding's conversion decoded by forced_decode: its rows side by side."""
    from convert import convert

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="low-rounding-"))
    for rounding in ROUNDINGS:
        convert(src, work / rounding, low_bits=args.low_bits, group_size=args.group_size,
                force=True, progress=False, low_rounding=rounding)
    results = forced_decode.decode_models({r: work / r for r in ROUNDINGS}, args, out_dir, name)
    lines = ["", f"Teacher-forced decode, mac-like storage, {args.pieces} held-out pieces x "
             f"{args.tokens} tokens (`{name}-fitted.md`, `{name}-nearest.md`):", "",
             *forced_decode.side_by_side(results, "fitted", "nearest")]
    return lines


if __name__ == "__main__":
    sys.exit(main())
