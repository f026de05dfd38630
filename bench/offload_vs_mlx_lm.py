#!/usr/bin/env python3
"""Issue 2's benchmark: hobbit_mlx at 100/50/25% expert residency against mlx-lm fully resident.

    python bench/offload_vs_mlx_lm.py [--model PATH] [--residencies 1,0.5,0.25] [--prompts 2]
        [--prompt-tokens 64] [--max-tokens 32] [--cold] [--out bench/results] [--name NAME]

Default model: the synthetic model of ``bench/make_synthetic.py`` (hidden 2048, 64 experts of
intermediate 768 per layer, top-8, 4 layers: ~0.7 GB of 4-bit experts), built on first use under
``bench/results/tmp/synthetic`` (git-ignored). In one process: mlx-lm with the whole 4-bit model
resident, then hobbit_mlx in exact mode with an LRU expert cache and no prefetch (the plain
offloader) at each residency, on the same prompts (greedy). Printed as a table -- prompt and decode
tokens/s, their ratio to mlx-lm, MLX peak memory against mlx-lm's and against the budget, hit rate
(random routing on the synthetic model), bytes read per token, host syncs per decoded token, the
Python time of one MoE layer call in decode (against mlx-lm's), and whether the greedy tokens equal
mlx-lm's -- and
saved as ``<out>/<name>.md`` / ``.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

if __package__ in (None, ""):
    import _path  # noqa: F401  (repository root on sys.path, see bench/_path.py)

from bench import arguments, harness, harness_report, harness_runs  # noqa: E402
from bench.workload import RESULTS, make_workload, resolve_model_paths  # noqa: E402

MB = 2**20
PLAIN = {"exact": True, "prefetch_layers": 0, "policy": "lru"}


def table(result: dict) -> str:
    base, runs = result["baseline"], result["runs"]
    routing = result["meta"]["model"]["routing"]
    hit = "hit rate" + harness_report.routing_note(routing)
    head = ["run", "expert cache MiB", "prompt tok/s", "decode tok/s", "mlx-lm prompt/decode tok/s (paired)",
            "prompt x mlx-lm", "decode x mlx-lm", "peak MiB", "peak x mlx-lm", "peak / budget", hit,
            "MiB read/token", "syncs/token", "py ms/layer call (x mlx-lm)", "tokens = mlx-lm"]
    L = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    pooled = base.get("pooled") or base
    L.append(f"| mlx-lm, all resident ({pooled.get('passes', 1)} passes) | - | {pooled['prompt_tps']:.1f} | "
             f"{pooled['decode_tps']:.1f} | - | 1.00 | 1.00 | {base['peak_memory_bytes'] / MB:.0f} | 1.00 | - | - | - | "
             f"0 | {harness_report._f(pooled.get('python_ms_per_layer_call'), '{:.3f}')} | - |")
    for r in runs:
        if "error" in r:
            L.append(f"| hobbit_mlx {harness_report._res_label(r)} | error: {r['error']} |" + " |" * (len(head) - 2))
            continue
        L.append(
            f"| hobbit_mlx {harness_report._res_label(r)} | {r['expert_cache_bytes'] / MB:.0f} | "
            f"{harness_report._f(r['prompt_tps'], '{:.1f}')} | {harness_report._f(r['decode_tps'], '{:.1f}')} | "
            f"{harness_report._f(r['baseline_prompt_tps'], '{:.1f}')} / {harness_report._f(r['baseline_decode_tps'], '{:.1f}')} | "
            f"{harness_report._f(r['prompt_tps_ratio'], '{:.2f}')} | {harness_report._f(r['decode_tps_ratio'], '{:.2f}')} | "
            f"{r['peak_memory_bytes'] / MB:.0f} | {harness_report._f(r['peak_vs_baseline'], '{:.2f}')} | "
            f"{harness_report._f(r['peak_vs_budget'], '{:.2f}')} | "
            f"{r['hit_rate']:.3f} | {harness_report._f(r['bytes_per_token'] / MB if r['bytes_per_token'] is not None else None, '{:.1f}')} | "
            f"{harness_report._f(r['host_syncs_per_token'], '{:.1f}')} | "
            f"{harness_report._f(r['python_ms_per_layer_call'], '{:.3f}')} "
            f"(x{harness_report._f(r['python_ms_ratio'], '{:.1f}')}) | "
            f"{'yes' if r['generation_identical'] else 'no'} |")
    return "\n".join(L)


@arguments.refuse_bad_input
def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, type=arguments.model_dir,
                   help="mlx-lm checkpoint (default: the synthetic model)")
    p.add_argument("--residencies", default="1,0.5,0.25", type=arguments.residencies)
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--cold", action="store_true",
                   help="reads bypass the page cache (O_DIRECT; F_NOCACHE on macOS) and the store's "
                        "cached pages are dropped before each run where the OS can (not on macOS)")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--name", default=None)
    a = p.parse_args(argv)
    for flag, value, least in (("--prompts", a.prompts, 1), ("--prompt-tokens", a.prompt_tokens, 1),
                               ("--max-tokens", a.max_tokens, 2)):
        if value < least:
            p.error(f"{flag} must be at least {least}, not {value}")
    out = arguments.out_dir(p, a.out)
    t0 = time.perf_counter()
    if a.model is None:
        from bench.make_synthetic import make_synthetic
        src, _ = make_synthetic()
        model = src
    else:
        model = a.model
    paths = resolve_model_paths(model)
    import mlx_lm.utils
    tok = mlx_lm.utils.load_tokenizer(paths.src)
    wl = make_workload(tok, n_prompts=a.prompts, prompt_tokens=a.prompt_tokens,
                       max_tokens=a.max_tokens, n_ppl=0)
    plan = [("lru", {**PLAIN, "expert_residency": r}) for r in a.residencies]
    harness_runs.warn_if_cannot_drop(a.cold, "benchmark")
    res = harness.run_matrix(paths, wl, plan, cold=a.cold, ppl=False, record_trace=False)
    storage = "cold" if a.cold else "warm"
    name = a.name or f"offload_vs_mlx_lm-{paths.name}-{storage}"
    res["meta"] = {"command": arguments.command(__file__, argv),
                   "model": paths.as_dict(), "storage": storage, "workload": wl.as_dict(),
                   "experts": res.pop("experts"), "machine": harness_report._machine(),
                   "compute": harness_report.compute_note(),
                   "wall_s": time.perf_counter() - t0, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    ex = res["meta"]["experts"]
    text = "\n".join([
        f"# hobbit_mlx vs mlx-lm: {paths.name} ({storage} storage)", "",
        "Command:", "", "```", res["meta"]["command"], "```", "",
        f"- model: `{paths.src}`: {ex['num_layers']} MoE layers x {ex['num_experts']} experts, "
        f"top-{ex['experts_per_token']}, {ex['expert_bytes_high'] / MB:.0f} MiB of 4-bit experts "
        f"({ex['expert_nbytes'][0] / MB:.2f} MiB each), dense {ex['dense_bytes'] / MB:.0f} MiB; routing: "
        f"**{paths.routing}**" + (" (random weights: hit rates say nothing about trained routers)"
                                  if paths.routing == "random" else
                                  " (no marker says whether its router is trained or random)"
                                  if paths.routing != "trained" else ""),
        f"- hobbit_mlx: exact mode (4-bit experts, outputs equal mlx-lm's), LRU expert cache, no prefetch; "
        f"storage {storage}: " + (harness_report.cold_note(res["runs"]) if a.cold else "page cache allowed"),
        f"- workload: {len(wl.prompts)} prompts of {a.prompt_tokens} tokens + {a.max_tokens} greedy "
        f"tokens each ({wl.source[:120]}); both sides {res['meta']['compute']}",
        f"- machine: {res['meta']['machine']}; measured in one process, wall {res['meta']['wall_s']:.0f}s; "
        "each hobbit_mlx run is compared with an mlx-lm pass timed right before it (paired); peak memory "
        "of a hobbit_mlx run excludes the mlx-lm weights still loaded for the pairing", "",
        table(res), ""])
    (out / f"{name}.md").write_text(text)
    (out / f"{name}.json").write_text(json.dumps(harness_report._jsonable(res), indent=1))
    print(text)
    print(f"[bench] wrote {out / name}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
