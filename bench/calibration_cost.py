#!/usr/bin/env python3
"""What calibrating a large model's 2-bit copies costs per layer, at its real shapes, without
the model: random weights and inputs of a layer's shapes go through the steps
``convert.calibrate`` runs after the text has been run (the input sums, the GPTQ factors, the
refit of each projection), on a few experts, in the chunks the refit takes; the time is scaled to
the layer's experts and the model's layers.

    python bench/calibration_cost.py [--shape qwen3-30b-a3b | NAME | LAYERS,EXPERTS,HIDDEN,INTER]
        [--experts 32] [--inputs 1024] [--out bench/results] [--name NAME]

``--inputs`` is the inputs each expert sees (16,384 tokens x top-k / experts: Qwen3-30B-A3B,
16,384 x 8 / 128 = 1,024). The run of the text itself is not timed here (a prefill of it).
"""

from __future__ import annotations

import argparse
import sys
import time

if __package__ in (None, ""):
    import _path  # noqa: F401  (repository root on sys.path, see bench/_path.py)

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from bench import arguments  # noqa: E402
from bench.workload import RESULTS  # noqa: E402
from convert.calibrate import experts_at_once  # noqa: E402
from convert.calibrated_quant import calibrated_quantize, inverse_factor  # noqa: E402

# (MoE layers, experts, hidden size, expert intermediate size): a GLU's gate and up take the
# hidden state, its down projection the intermediate
SHAPES = {
    "qwen3-30b-a3b": (48, 128, 2048, 768),
    "deepseek-v2-lite": (26, 64, 2048, 1408),
    "gpt-oss-20b": (24, 32, 2880, 2880),
    "mixtral-8x7b": (32, 8, 4096, 14336),
}


def shape_of(text: str) -> tuple[str, tuple[int, int, int, int]]:
    if text in SHAPES:
        return text, SHAPES[text]
    try:
        layers, experts, hidden, inter = (int(v) for v in text.split(","))
    except ValueError:
        raise arguments.Bad(f"{text!r}: one of {', '.join(SHAPES)}, or "
                            "LAYERS,EXPERTS,HIDDEN,INTER") from None
    if min(layers, experts, hidden, inter) < 1 or hidden % 64 or inter % 64:
        raise arguments.Bad(f"{text!r}: positive sizes, HIDDEN and INTER multiples of 64")
    return text, (layers, experts, hidden, inter)


def time_refit(experts: int, hidden: int, inter: int, inputs: int,
               seed: int = 0) -> tuple[dict, int]:
    """Seconds spent on ``experts`` experts (input sums, factors, and each projection's refit),
    and the experts refitted together."""
    rng = np.random.default_rng(seed)
    widths = {"gate": hidden, "up": hidden, "down": inter}
    outs = {"gate": inter, "up": inter, "down": hidden}
    spent = {"sums": 0.0, "factors": 0.0, **{p: 0.0 for p in widths}}
    step = experts_at_once(set(widths.values()))
    for e0 in range(0, experts, step):
        chunk = min(step, experts - e0)
        t = time.perf_counter()
        sums = {}
        for n in set(widths.values()):
            x = rng.standard_normal((chunk, inputs, n), dtype=np.float32)
            sums[n] = np.stack([xe.T @ xe for xe in x])
        spent["sums"] += time.perf_counter() - t
        t = time.perf_counter()
        factors = {n: inverse_factor(h) for n, h in sums.items()}
        spent["factors"] += time.perf_counter() - t
        for path, n in widths.items():
            w = mx.array(rng.standard_normal((chunk, outs[path], n), dtype=np.float32) * 0.02)
            w = w.astype(mx.bfloat16)
            mx.eval(w)
            t = time.perf_counter()
            calibrated_quantize(w, factors[n], 64, 2)
            spent[path] += time.perf_counter() - t
    return spent, min(step, experts)


@arguments.refuse_bad_input
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="qwen3-30b-a3b", type=shape_of)
    ap.add_argument("--experts", type=arguments.count, default=32,
                    help="experts refitted (the layer's count, scaled)")
    ap.add_argument("--inputs", type=arguments.count, default=1024,
                    help="inputs each expert saw")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--name", default=None)
    args = ap.parse_args(argv)
    out = arguments.out_dir(ap, args.out) if args.name else None
    name, (layers, experts, hidden, inter) = args.shape
    timed = min(args.experts, experts)
    spent, chunk = time_refit(timed, hidden, inter, args.inputs)
    scale = experts / timed
    layer = scale * sum(spent.values())
    rows = [f"| {step} | {seconds:.2f} | {scale * seconds:.1f} |" for step, seconds in spent.items()]
    report = "\n".join([
        f"# Calibration refit cost: {name}",
        "",
        f"Command: `{arguments.command(__file__, argv)}`",
        "",
        f"{layers} MoE layers x {experts} experts, hidden {hidden}, expert intermediate {inter}, "
        f"{args.inputs} inputs an expert; {timed} of its experts timed, in chunks of "
        f"{chunk}; random weights and inputs, 2-bit, group 64, "
        f"bf16 scales. MLX device: {mx.default_device()}.",
        "",
        "| step | s for the experts timed | s per layer |",
        "|---|---|---|",
        *rows,
        f"| **layer** | {sum(spent.values()):.2f} | **{layer:.1f}** |",
        "",
        f"The model's {layers} layers: {layer * layers / 60:.1f} min (besides the run of the text).",
        ""])
    print(report)
    if out is not None:
        (out / f"{args.name}.md").write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
