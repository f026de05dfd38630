#!/usr/bin/env python3
"""The expert hot path against mlx-lm, same checkpoint and dtype, one process, alternating runs.

    python bench/hot_path.py [--model PATH] [--residencies 1,0.5] [--reps 7]
        [--prompt-tokens 192] [--max-tokens 96] [--out bench/results] [--name NAME]

For each residency: hobbit_mlx exact, no prefetch (``exact=True, prefetch_layers=0``), against
mlx-lm with the whole model resident. Each repetition runs mlx-lm and every hobbit model once, in
turn, so drift on a shared machine hits all alike; the medians are reported. Measured per run:

* prefill and decode tokens/s (mlx-lm's ``generate_step``; decode from the first token out);
* host syncs per decoded token, and misses per decoded token;
* main-thread CPU time per decoded token (``time.thread_time``): what the host spends building
  and dispatching graphs, planning calls and reading misses, whether or not the device waits;
* Python time per MoE layer call while decoding: ``OffloadedSwitch.__call__`` for hobbit_mlx
  (with the mlx-lm switch module it runs inside it), mlx-lm's ``SwitchGLU``/``SwitchMLP`` call
  for the baseline; with everything resident the call only builds the graph, so this is the
  host cost a layer adds.

Writes ``OUT/hot-path-NAME.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    import _path  # noqa: F401  (repository root on sys.path, see bench/_path.py)

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from bench import arguments, harness_report, harness_runs  # noqa: E402

RESULTS = Path(__file__).parent / "results"


class CallTimer:
    """Host time spent in ``cls.__call__`` while ``active`` (the outermost call only)."""

    def __init__(self, *classes):
        self.seconds, self.calls, self.active, self._depth = 0.0, 0, False, 0
        self._restore = []
        for cls in classes:
            orig = cls.__call__

            def timed(obj, *a, _orig=orig, **k):
                if not self.active:
                    return _orig(obj, *a, **k)
                self._depth += 1
                t0 = time.perf_counter()
                try:
                    return _orig(obj, *a, **k)
                finally:
                    self._depth -= 1
                    if self._depth == 0:
                        self.seconds += time.perf_counter() - t0
                        self.calls += 1

            cls.__call__ = timed
            self._restore.append((cls, orig))

    def reset(self) -> None:
        self.seconds, self.calls = 0.0, 0

    def us_per_call(self) -> float | None:
        return 1e6 * self.seconds / self.calls if self.calls else None


def run_once(model, prompt: mx.array, max_tokens: int, prefill_step: int, timer: CallTimer,
             runtime=None) -> dict:
    from mlx_lm.generate import generate_step

    if runtime is not None:
        runtime.new_sequence(0, int(prompt.size), max_tokens)
        prefill_step = min(prefill_step, runtime.plan.chunk_tokens)
        before = dict(vars(runtime.stats))
    t0 = time.perf_counter()
    gen = generate_step(prompt, model, max_tokens=max_tokens, prefill_step_size=prefill_step)
    next(gen)
    t1 = time.perf_counter()
    if runtime is not None:
        mid = dict(vars(runtime.stats))
    timer.reset()
    timer.active = True
    n = 1
    c1 = time.thread_time()
    for _ in gen:
        n += 1
    t2 = time.perf_counter()
    c2 = time.thread_time()
    timer.active = False
    out = {"prefill_tps": prompt.size / (t1 - t0), "decode_tps": (n - 1) / (t2 - t1),
           "python_us_per_layer_call": timer.us_per_call(),
           "host_cpu_ms_per_token": 1e3 * (c2 - c1) / (n - 1)}
    if runtime is not None:
        runtime.count_deferred()
        after = vars(runtime.stats)
        out["host_syncs_per_token"] = (after["host_syncs"] - mid["host_syncs"]) / (n - 1)
        out["misses_per_token"] = (after["misses_high"] - mid["misses_high"]) / (n - 1)
        out["prefill_misses"] = mid["misses_high"] - before["misses_high"]
    return out


@arguments.refuse_bad_input
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, type=arguments.model_dir,
                   help="an mlx-lm checkpoint (default: the reference model)")
    p.add_argument("--residencies", default="1,0.5", type=arguments.residencies)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--prompt-tokens", type=int, default=192)
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--prefill-step", type=int, default=512)
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--name", default=None)
    args = p.parse_args(argv)
    for flag, value, least in (("--reps", args.reps, 1), ("--prompt-tokens", args.prompt_tokens, 1),
                               ("--max-tokens", args.max_tokens, 2),
                               ("--prefill-step", args.prefill_step, 1)):
        if value < least:
            p.error(f"{flag} must be at least {least}, not {value}")
    out = arguments.out_dir(p, args.out)

    from mlx_lm.generate import generate_step
    from mlx_lm.models.switch_layers import SwitchGLU, SwitchMLP

    import hobbit_mlx
    from hobbit_mlx.loader import REFERENCE_MODEL, runtime_of
    from hobbit_mlx.offload import OffloadedSwitch

    src = Path(args.model) if args.model else REFERENCE_MODEL
    hobbit_src = src.parent / "hobbit" if (src.parent / "hobbit").is_dir() else src
    name = args.name or ("reference" if args.model is None else src.parent.name)
    ref, tok = harness_runs.load_baseline(src)
    text = Path(np.__file__).read_text() * 4
    prompt = mx.array(tok.encode(text)[:args.prompt_tokens])
    residencies = args.residencies
    models = {r: hobbit_mlx.load(hobbit_src, expert_residency=r, exact=True, prefetch_layers=0,
                                 prefill_step_size=args.prefill_step, progress=False)[0]
              for r in residencies}
    base_timer = CallTimer(SwitchGLU, SwitchMLP)
    hob_timer = CallTimer(OffloadedSwitch)
    runs = {"mlx-lm": []} | {r: [] for r in residencies}
    tokens = {}
    for rep in range(args.reps):
        runs["mlx-lm"].append(run_once(ref, prompt, args.max_tokens, args.prefill_step, base_timer))
        for r, model in models.items():
            runs[r].append(run_once(model, prompt, args.max_tokens, args.prefill_step, hob_timer,
                                    runtime_of(model)))
        print(f"rep {rep + 1}/{args.reps}: mlx-lm decode {runs['mlx-lm'][-1]['decode_tps']:.1f} tok/s; "
              + ", ".join(f"{r:.0%} {runs[r][-1]['decode_tps']:.1f}" for r in residencies), flush=True)
    for label, model in [("mlx-lm", ref)] + list(models.items()):
        if label != "mlx-lm":
            runtime_of(model).new_sequence(0, int(prompt.size), 32)
        tokens[label] = [int(t) for t, _ in generate_step(prompt, model, max_tokens=32)]

    def med(label, key):
        vals = [r[key] for r in runs[label] if r.get(key) is not None]
        return statistics.median(vals) if vals else None

    base = {k: med("mlx-lm", k) for k in ("prefill_tps", "decode_tps", "python_us_per_layer_call",
                                          "host_cpu_ms_per_token")}
    rows = []
    for r in residencies:
        row = {"residency": r, **{k: med(r, k) for k in runs[r][0]},
               "same_tokens": tokens[r] == tokens["mlx-lm"],
               "pool_slots": [ps.pool.slots for ps in runtime_of(models[r]).cache.pools]}
        row["prefill_ratio"] = row["prefill_tps"] / base["prefill_tps"]
        row["decode_ratio"] = row["decode_tps"] / base["decode_tps"]
        rows.append(row)
    result = {"model": str(src), "reps": args.reps, "prompt_tokens": int(prompt.size),
              "max_tokens": args.max_tokens, "compute": harness_report.compute_note(), "baseline": base, "rows": rows,
              "command": arguments.command(__file__, argv)}
    lines = [f"# Hot path: hobbit_mlx exact, no prefetch, vs mlx-lm whole model resident ({name})", "",
             f"`{result['command']}` — median of {args.reps} alternating runs; prompt "
             f"{prompt.size} tokens, {args.max_tokens} decoded; {result['compute']}.", "",
             f"mlx-lm: prefill {base['prefill_tps']:.1f} tok/s, decode {base['decode_tps']:.1f} "
             f"tok/s, {base['python_us_per_layer_call']:.1f} µs of Python per MoE layer call, "
             f"{base['host_cpu_ms_per_token']:.2f} ms of host CPU per decoded token.", "",
             "| residency | prefill tok/s | x mlx-lm | decode tok/s | x mlx-lm | host syncs / token "
             "| misses / token | Python µs / layer call | host CPU ms / token | same tokens |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['residency']:.0%} | {row['prefill_tps']:.1f} | {row['prefill_ratio']:.2f} | "
                     f"{row['decode_tps']:.1f} | {row['decode_ratio']:.2f} | "
                     f"{row['host_syncs_per_token']:.1f} | {row['misses_per_token']:.2f} | "
                     f"{row['python_us_per_layer_call']:.1f} | {row['host_cpu_ms_per_token']:.2f} | "
                     f"{row['same_tokens']} |")
    print("\n".join(lines))
    for suffix, text in ((".json", json.dumps(result, indent=1)), (".md", "\n".join(lines) + "\n")):
        path = out / f"hot-path-{name}{suffix}"
        tmp = path.with_suffix(suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
