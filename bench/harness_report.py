"""The reporting side of ``bench/harness.py``: the markdown tables, the plots and the result files.

Its own module because it only formats and writes what the runs measured (the result dict of
``harness.run_matrix``): the markdown report (``markdown``, ``headline`` and the notes on storage,
routing and compute), the speed and hit-rate plots, and ``NAME.json`` / ``NAME.md`` written whole.
The other bench scripts take their formatting helpers and ``write_results`` from here.
"""

from __future__ import annotations

import json
import math
import os
import platform
from pathlib import Path

import numpy as np

import mlx.core as mx

from bench import replay as rp
from bench.harness_runs import _rate

MB = 2**20



# --------------------------------------------------------------------------- output
def _f(x, fmt="{:.3f}", na="n/a"):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return na
    return fmt.format(x)


def _mb(x):
    return _f(x / MB if x is not None else None, "{:.1f}")


def _res_label(r: dict) -> str:
    pre = " (preloaded)" if r.get("preloaded") else ""
    if r.get("residency") is not None:
        return f"{100 * r['residency']:g}%{pre}"
    if r.get("budget") is not None:
        eff = r.get("effective_residency")
        return f"{r['budget']}" + (f" (={100 * eff:.1f}%)" if eff is not None else "") + pre
    return "-"


def routing_note(routing: str) -> str:
    """What a hit rate's label says of the model's routing: random only when its marker says
    so (``workload.MARKER``), unknown for a checkpoint nothing says anything about."""
    return {"trained": "", "random": " (random routing)"}.get(routing, " (routing unknown)")


def markdown(result: dict) -> str:
    meta, base, runs = result["meta"], result["baseline"], result["runs"]
    random_routing = meta["model"]["routing"] == "random"
    hit_note = routing_note(meta["model"]["routing"])
    L = [f"# hobbit_mlx harness: {meta['model']['name']} -- {meta['storage']} storage", ""]
    L += ["Command:", "", "```", meta["command"], "```", ""]
    L += [f"- model: `{meta['model']['src']}` (hobbit store `{meta['model']['hobbit']}`); routing: "
          f"**{meta['model']['routing']}**" + (" -- hit rates of random-weight routers say nothing "
                                              "about trained ones" if random_routing else
                                              " -- no marker says whether its router is trained "
                                              "or random" if meta["model"]["routing"] != "trained"
                                              else ""),
          f"- experts: {meta['experts']['num_layers']} MoE layers x {meta['experts']['num_experts']}"
          f" experts, top-{meta['experts']['experts_per_token']}; 4-bit expert bytes "
          f"{_mb(meta['experts']['expert_bytes_high'])} MiB; dense {_mb(meta['experts'].get('dense_bytes'))} MiB",
          f"- storage: **{meta['storage']}** -- " + (
              cold_note(runs) if meta["storage"] == "cold" else _simulated_note(base.get("storage"))
              if meta["storage"] == "mac-like" else "page cache allowed (the store may be cached by the OS)"),
          f"- workload: {meta['workload']['n_prompts']} prompt(s) of {meta['workload']['prompt_tokens']} "
          f"tokens, {meta['workload']['max_tokens']} greedy tokens each; "
          + (f"perplexity on {len(meta['workload']['ppl_tokens'])} held-out piece(s) of "
             f"{meta['workload']['ppl_tokens']} tokens" if meta.get("ppl", True) and
             meta['workload']['ppl_tokens'] else "no perplexity pass (--no-ppl)")
          + f"; text: {meta['workload']['source'][:300]}",
          f"- machine: {meta['machine']}; wall time {meta['wall_s']:.0f}s", ""]
    pooled = base.get("pooled") or {}
    L += ["## Baseline: mlx-lm, whole model resident", "",
          "| pass | prompt tok/s | decode tok/s | py ms/layer call | peak MiB | weights MiB | ppl |",
          "|---|---|---|---|---|---|---|",
          f"| first | {_f(base['prompt_tps'], '{:.1f}')} | {_f(base['decode_tps'], '{:.1f}')} | "
          f"{_f(base.get('python_ms_per_layer_call'), '{:.3f}')} | "
          f"{_mb(base['peak_memory_bytes'])} | {_mb(base['weight_bytes'])} | {_f(base.get('ppl'), '{:.3f}')} |"]
    if pooled.get("passes", 0) > 1:
        L.append(f"| all {pooled['passes']} passes (min-max decode {_f(pooled['decode_tps_min'], '{:.1f}')}-"
                 f"{_f(pooled['decode_tps_max'], '{:.1f}')}) | {_f(pooled['prompt_tps'], '{:.1f}')} | "
                 f"{_f(pooled['decode_tps'], '{:.1f}')} | "
                 f"{_f(pooled.get('python_ms_per_layer_call'), '{:.3f}')} | | | |")
    L += ["", "Speed ratios: " + ("each run against the baseline pass timed right before it (column "
          "'base decode tok/s'), so drift of a shared machine cancels out"
          if base.get("pairing") == "each" else "against the first baseline pass") + ".", ""]
    L += headline(runs, meta["storage"])
    L += ["## Configurations (`hobbit_mlx.load` options)", ""]
    for c in meta["configs"]:
        kw = ", ".join(f"{k}={v!r}" for k, v in c["kwargs"].items())
        L.append(f"- **{c['name']}**: `{kw}`" + (f" -- not run: {c['unavailable']}" if c.get("unavailable") else ""))
    L += ["", "## hobbit_mlx runs", "",
          "Hit rates are shares of expert requests (one request = one expert one layer call needs); "
          "hit = served from memory (no read on demand; includes experts whose prefetch read was "
          "still finishing, which the layer waited for), resident at request = already in memory. "
          "Bytes/token = bytes read from storage per generated token (decode: decode steps only). "
          "Prefetch P/R = used/issued and used/(used+misses). ppl and top-1 agree are teacher-forced "
          "on held-out text against mlx-lm's 4-bit model; gen = greedy generations identical to mlx-lm's. "
          "Speed ratios are against mlx-lm measured in the same process (see above). "
          "Syncs/token = host syncs per decode step (one per layer call that can miss; 0 when every "
          "layer is resident and its calls stay lazy). Py ms/call = Python time of one MoE layer call "
          "in the decode phase (graph building; a synced call also waits for its router and reads), "
          "py x = against mlx-lm's switch module call timed the same way. Peak/budget = MLX peak "
          "memory after the warm-up over the memory budget. Runs start from empty pools, except "
          "those marked (preloaded): every expert resident when the workload starts (`exact-resident`, "
          "and runs whose 2-bit pool got no slot because every expert fits in 4-bit).", ""]
    head = ["config", "residency", "cache MiB", f"hit{hit_note}", "resident at request", "high hit", "low hit", "miss",
            "skip", "decode hit", "KiB/token", "decode KiB/token", "prefetch P/R", "ppl",
            "top-1 agree", "gen", "prompt tok/s", "decode tok/s", "base decode tok/s", "prompt x",
            "decode x", "syncs/token", "py ms/call", "py x", "peak MiB", "budget MiB", "peak/budget"]
    L += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ok = [r for r in runs if "error" not in r]
    for r in runs:
        if "error" in r:
            L.append(f"| {r['config']} | {_res_label(r)} | " + f"error: {r['error']}".replace("|", "/")
                     + " |" * (len(head) - 2))
            continue
        pref = ("n/a" if r["prefetch_precision"] is None
                else f"{r['prefetch_precision']:.2f}/{r['prefetch_recall']:.2f}")
        kib = lambda x: _f(x / 1024 if x is not None else None, "{:.0f}")  # noqa: E731
        cells = [r["config"], _res_label(r), _mb(r["expert_cache_bytes"]), _f(r["hit_rate"]),
                 _f(r.get("resident_hit_rate")), _f(r["high_hit_rate"]), _f(r["low_hit_rate"]), _f(r["miss_rate"]), _f(r["skip_rate"]),
                 _f(r["decode_hit_rate"]), kib(r["bytes_per_token"]), kib(r["decode_bytes_per_token"]),
                 pref, _f(r["ppl"], "{:.3f}"), _f(r["argmax_agreement"]),
                 "same" if r["generation_identical"] else f"{_f(r['generation_token_match'], '{:.2f}')} match",
                 _f(r["prompt_tps"], "{:.1f}"), _f(r["decode_tps"], "{:.1f}"),
                 _f(r.get("baseline_decode_tps"), "{:.1f}"),
                 _f(r["prompt_tps_ratio"], "{:.2f}"), _f(r["decode_tps_ratio"], "{:.2f}"),
                 _f(r.get("host_syncs_per_token"), "{:.1f}"),
                 _f(r.get("python_ms_per_layer_call"), "{:.3f}"), _f(r.get("python_ms_ratio"), "{:.2f}"),
                 _mb(r["peak_memory_bytes"]), _mb(r["budget_bytes"]), _f(r.get("peak_vs_budget"), "{:.2f}")]
        L.append("| " + " | ".join(cells) + " |")
    L.append("")
    if ok:
        L += ["Details: prefetch reads, next-layer prediction accuracy (share of the experts a layer "
              "chose that the previous layer predicted); by distance d (layers ahead): prediction "
              "recall / precision (chosen experts predicted / predicted experts chosen) and prefetch "
              "precision (reads used / issued); share of tokens run as 'little' (top-k/2), time "
              "spent waiting for reads, host syncs per generated token (prefill included), share of "
              "the decode layer calls that stayed lazy, slots of each expert pool, pool "
              "rebuilds during the workload (the KV reserve growing), KV and activation reserves, "
              "load time, perplexity-pass hit rate.", "",
              "| config | residency | prefetch issued | prefetch used | prefetch MiB | prediction acc | "
              "by distance: recall / precision / prefetch precision | "
              "little tokens | read wait s | syncs/token | lazy decode calls | pool slots | pool rebuilds | "
              "KV reserve MiB (tokens) | activation reserve MiB | load s | ppl-pass hit |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in ok:
            rec, prec, pf = (r.get(k) or {} for k in ("prediction_recall_by_distance",
                                                       "prediction_precision_by_distance",
                                                       "prefetch_precision_by_distance"))
            f2 = lambda x: _f(x, "{:.2f}")  # noqa: E731
            by_d = "; ".join(f"{d}: {f2(rec.get(d))} / {f2(prec.get(d))} / {f2(pf.get(d))}"
                             for d in sorted(rec)) or "n/a"
            L.append(f"| {r['config']} | {_res_label(r)} | {r['prefetch_issued']} | {r['prefetch_used']} | "
                     f"{_mb(r['prefetch_bytes'])} | {_f(r['prediction_accuracy'])} | {by_d} | "
                     f"{_f(r['little_token_share'])} | {r['read_wait_s']:.2f} | "
                     f"{_f(_rate(r['host_syncs'], r['generated_tokens']), '{:.1f}')} | "
                     f"{_f(r.get('decode_lazy_call_share'), '{:.2f}')} | "
                     f"{'/'.join(str(x) for x in r.get('pool_slots') or []) or 'n/a'} | "
                     f"{r.get('pool_rebuilds', 'n/a')} | {_mb(r.get('kv_reserve_bytes'))} "
                     f"({r.get('kv_reserve_tokens', 'n/a')}) | {_mb(r.get('activation_reserve_bytes'))} | "
                     f"{r['load_s']:.2f} | {_f(r.get('ppl_eval_hit_rate'))} |")
        L.append("")
    if result.get("replay"):
        L += ["## Offline replay of the recorded routing trace", "",
              f"The routing of the generation workload ({result['trace_summary']['calls']} layer calls), "
              "replayed through a cache of the same size in experts (`bench/replay.py`). "
              "Gap = Belady's hit rate minus the policy's." + (" Random routing." if random_routing else ""), "",
              rp.format_table(result["replay"]), ""]
        chk = result.get("replay_check")
        if chk:
            L += ["Each exact cache-only run (no prefetch, no lossy technique) against the offline replay "
                  "of the runtime's own policy (`runtime:NAME`) on the same trace and cache size:", "",
                  "| config | residency | capacity (experts) | measured hit | replayed hit | Belady | "
                  "gap to Belady |", "|---|---|---|---|---|---|---|"]
            for c in chk:
                L.append(f"| {c['config']} | {c['label']} | {c['capacity']} | {c['measured']:.4f} | "
                         f"{c['replayed']:.4f} | {_f(c['belady'], '{:.4f}')} | "
                         + (f"{100 * (c['belady'] - c['measured']):+.1f} pp" if c['belady'] is not None else "n/a")
                         + " |")
            L.append("")
    if result.get("plots"):
        L += ["## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in result["plots"]] + [""]
    return "\n".join(L)


def compute_note() -> str:
    """The dtype both sides compute in (``compute_dtype``) and the backend, for a report."""
    from hobbit_mlx.loader import compute_dtype

    dtype = compute_dtype()
    name = str(dtype).removeprefix("mlx.core.") if dtype is not None else "the checkpoint's own dtype"
    return f"{name} activations on the {'GPU' if mx.default_device() == mx.gpu else 'CPU'} backend"


def cold_note(runs: list[dict]) -> str:
    """How cold the cold runs were: which bypass the reads had (O_DIRECT, F_NOCACHE or none),
    and whether cached pages went."""
    done = [r for r in runs if "error" not in r]
    if not done:
        return "cold (no run finished)"
    bypass = sorted({r.get("direct_io") or "none" for r in done})
    dropped = {r.get("page_cache_dropped", True) for r in done}
    return (f"reads past the page cache ({', '.join(bypass)}), " +
            ("store pages dropped (posix_fadvise DONTNEED) before each run" if dropped == {True}
             else "**store pages not dropped** (this OS has no posix_fadvise: pages cached "
                  "before the benchmark read warm unless `sudo purge` ran first)"))


def _simulated_note(st: dict | None) -> str:
    if not st:
        return "simulated device"
    return (f"every read waits for one simulated device (hobbit_mlx/storage.py) of "
            f"{st['bandwidth'] / 1e6:.2f} MB/s: one token's top-k 4-bit experts "
            f"({st['topk_bytes_per_token'] / MB:.2f} MiB) take {st['ratio']:g}x mlx-lm's resident "
            f"{1000 * st['resident_s_per_token']:.1f} ms/token, the ratio of a Mac SSD under "
            f"Qwen3-30B-A3B; demand reads go ahead of prefetch reads")


def headline(runs: list[dict], storage: str) -> list[str]:
    """Decode tokens/s of every run, against mlx-lm and against exact LRU without prefetch at
    the same residency, beside what each read and served, its quality and its storage bound."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return []
    lru = {r["residency"]: r["decode_tps"] for r in ok if r["config"] == "lru"}
    L = [f"## Headline: decode tokens/s, {storage} storage", "",
         "x lru = against exact LRU without prefetch (what the exact MLX expert streamers do) at the "
         "same residency. Demand / prefetch KiB = bytes read per decoded token on demand (the step "
         "waits) and by prefetch. Bound = the storage-time model 1 / max(mlx-lm's resident time + "
         "demand bytes / bandwidth, all bytes / bandwidth) (simulated storage only); of bound = "
         "measured / bound. Decode hit rate = the decode steps' expert requests served from "
         "memory (the runs table's hit rate counts the prefill's too).", "",
         "| config | residency | decode tok/s | x mlx-lm | x lru | decode hit rate | demand KiB/token | "
         "prefetch KiB/token | ppl x | bound tok/s | of bound |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    kib = lambda x: _f(x / 1024 if x is not None else None, "{:.0f}")  # noqa: E731
    for r in sorted(ok, key=lambda r: (-(r["residency"] or 0), r["config"])):
        L.append(f"| {r['config']} | {_res_label(r)} | {_f(r['decode_tps'], '{:.1f}')} | "
                 f"{_f(r['decode_tps_ratio'], '{:.2f}')} | "
                 f"{_f(_rate(r['decode_tps'], lru.get(r['residency'])), '{:.2f}')} | "
                 f"{_f(r['decode_hit_rate'])} | {kib(r.get('decode_demand_bytes_per_token'))} | "
                 f"{kib(r.get('decode_prefetch_bytes_per_token'))} | {_f(r.get('ppl_ratio'), '{:.3f}')} | "
                 f"{_f(r.get('bound_decode_tps'), '{:.1f}')} | {_f(r.get('of_bound'), '{:.2f}')} |")
    return L + [""]


def plots(result: dict, out_dir: Path, name: str) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in result["runs"] if "error" not in r and r.get("residency") is not None]
    configs = list(dict.fromkeys(r["config"] for r in runs))
    routing = result["meta"]["model"]["routing"]
    tag = f"{result['meta']['model']['name']}, {result['meta']['storage']}"
    files = []

    wide = 3.5 if len(configs) > 6 else 0  # room for a legend beside the axes
    colors = plt.get_cmap("tab20").colors  # distinct colours for up to 20 configurations
    fig, axes = plt.subplots(1, 2, figsize=(11 + 2 * wide, 4.2))
    for key, ax, title in (("prompt_tps_ratio", axes[0], "prompt tokens/s"),
                           ("decode_tps_ratio", axes[1], "decode tokens/s")):
        for c in configs:
            pts = sorted((r["residency"], r[key]) for r in runs if r["config"] == c and r[key] is not None)
            if pts:
                ax.plot([100 * x for x, _ in pts], [y for _, y in pts], marker="o", label=c,
                        color=colors[configs.index(c) % len(colors)])
        ax.axhline(1.0, color="gray", ls="--", lw=1, label="mlx-lm, all resident")
        _finish_axes(ax, "ratio to mlx-lm", f"{title} ({tag})")
    files.append(_save(plt, fig, out_dir / f"{name}-speed.png"))

    fig, ax = plt.subplots(figsize=(6.5 + wide, 4.2 + wide / 2))
    for c in configs:
        pts = sorted((r["residency"], r["hit_rate"]) for r in runs if r["config"] == c)
        ax.plot([100 * x for x, _ in pts], [y for _, y in pts], marker="o", label=c,
                color=colors[configs.index(c) % len(colors)])
    rows = result.get("replay") or []
    by_res = {}
    for r in runs:
        if r["config"] != "on-demand" and "capacity_experts" in r:
            by_res.setdefault(int(r["capacity_experts"]), r["residency"])
    for pol in ["belady"] + [p for p in dict.fromkeys(x["policy"] for x in rows) if p.startswith("runtime:")]:
        pts = sorted((by_res[x["capacity"]], x["hit_rate"]) for x in rows
                     if x["policy"] == pol and x["capacity"] in by_res)
        if pts:
            ax.plot([100 * x for x, _ in pts], [y for _, y in pts], ls="--", marker=".",
                    label=f"replay: {pol}", color="black" if pol == "belady" else None)
    ax.set_ylim(-0.02, 1.02)
    _finish_axes(ax, "hit rate" + routing_note(routing),
                 f"served from memory ({tag})")
    files.append(_save(plt, fig, out_dir / f"{name}-hit.png"))
    return files


def _finish_axes(ax, ylabel: str, title: str) -> None:
    ax.set_xlabel("expert residency (% of 4-bit expert bytes)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(ax.get_lines()) > 8:  # many lines: the legend goes beside the axes
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax.legend(fontsize=8)


def _save(plt, fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


def _machine() -> str:
    return (f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, MLX {mx.__version__} "
            f"({'GPU' if mx.default_device() == mx.gpu else 'CPU'} backend)")


def write_results(out_dir: Path, name: str, result: dict, text: str) -> None:
    """``NAME.json`` and ``NAME.md`` in ``out_dir``, each written whole (a temporary file
    renamed), so that a run cut short leaves the previous results, not half of new ones."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for suffix, data in ((".json", json.dumps(result, indent=1)), (".md", text)):
        path = out_dir / f"{name}{suffix}"
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(data)
        os.replace(tmp, path)


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items() if k != "teacher_forced"}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return x
