#!/usr/bin/env python3
"""The benchmark harness: every offloading configuration x expert residency against mlx-lm.

    python bench/harness.py [--model PATH] [--quick] [--residencies 1,0.5,0.25,0.125]
        [--budgets 200MB,...] [--configs NAMES|all] [--cold] [--pairing each|once]
        [--out bench/results] [--name NAME]

For the workload of ``bench/workload.py`` (held-out prompts, prefill + greedy decode, deterministic)
it runs, in one process:

1. the baseline: mlx-lm with the whole 4-bit model resident (``mlx_lm.load``, float32 activations on
   the CPU backend like hobbit_mlx), recording its tokens/s, peak memory, greedy tokens and the
   teacher-forced log-likelihood / argmax of held-out text. It stays loaded: with ``--pairing each``
   (default) a baseline pass is timed right before every hobbit_mlx run and that run's speed ratios
   use it, so a shared machine's drift cancels out; hobbit_mlx peak memory excludes what was
   allocated before the run (the baseline's weights);
2. every configuration of ``CONFIGS`` at every residency (and every ``--budgets`` value), each a
   fresh ``hobbit_mlx.load``, warmed up, then measured from empty expert pools (``exact-resident``:
   from full ones, every expert preloaded as mlx-lm has them);
3. an untimed pass with the routing hook on (the ``lru`` configuration, exact), replayed offline
   by ``bench/replay.py`` at the cache sizes of the runs (LRU, LFU, FIFO, Belady and the runtime's
   own policies): every policy's distance from the optimum, and a check that the replay of each
   exact cache-only run's policy reproduces its measured hit rate.

Measured per run: requests served from memory split into high-precision hits, low-precision hits,
misses and skipped; bytes read from storage per generated token (all, and decode only); prefetch
precision (used / issued) and recall (used / (used + misses)), "n/a" while nothing is prefetched;
perplexity of held-out text and top-1 agreement with mlx-lm's 4-bit model (teacher-forced), and
whether greedy generations equal mlx-lm's; prompt and decode tokens/s and their ratio to the
baseline; host syncs per decoded token; the Python time of one MoE layer call in the decode
phase, next to mlx-lm's switch module call timed the same way; MLX peak memory after the warm-up
against the budget (``peak_vs_budget``).

Storage: warm by default (the store's pages may sit in the OS page cache); ``--cold`` loads with
``direct_io=True`` (O_DIRECT reads bypass the page cache; F_NOCACHE on macOS) and drops the
store's cached pages (``posix_fadvise(DONTNEED)``) before each run; macOS cannot drop one file's
pages, so there run ``sudo purge`` first (the report says whether pages were dropped).
Outputs: ``<out>/<name>.md`` (tables + the exact command), ``<name>.json``, ``<name>-speed.png``
(tokens/s ratio vs residency) and ``<name>-hit.png`` (hit rate vs residency), one line per
configuration.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    import _path  # noqa: F401  (repository root on sys.path, see bench/_path.py)

import mlx.core as mx  # noqa: E402

from bench import arguments  # noqa: E402
from bench import replay as rp  # noqa: E402
from bench import trace as tr  # noqa: E402
from bench.harness_report import (MB, _f, _jsonable, _machine, _res_label, markdown,  # noqa: E402
                                  plots, write_results)
from bench.harness_runs import (Baseline, _free, _warmup, empty_pools, generate_workload,  # noqa: E402
                                high_pools, low_pool_without_slots, record_trace_pass, summarize,
                                teacher_forced, topk_bytes_per_token, warn_if_cannot_drop)
from bench.workload import (DEFAULT_WORKLOAD, QUICK_WORKLOAD, RESULTS, Workload,  # noqa: E402
                            make_workload, resolve_model_paths)

# The matrix: named configurations, each a dict of hobbit_mlx.load() keyword arguments. A new
# technique joins with one line. A configuration that fixes ``expert_residency`` (or
# ``memory_budget``) runs once; the others run at every residency and every --budgets value.
# Configurations using an option (or a cache policy) that the installed hobbit_mlx.load() lacks
# are left out of the run and listed as unavailable.
EXACT = {"exact": True, "prefetch_layers": 0}  # 4-bit only, nothing skipped, no prefetch
# A lossy technique measured on its own: used on every call, however cheap reads are.
FIXED = {"adapt_to_storage": False}
CONFIGS: list[tuple[str, dict]] = [
    ("on-demand", {**EXACT, "expert_residency": 0.0}),  # no expert cache: read every expert needed
    # the whole model resident (every expert preloaded, as mlx-lm loads it): lazy layer calls, no
    # reads, no host sync per layer -- what the pools cost against mlx-lm when nothing can miss
    ("exact-resident", {**EXACT, "expert_residency": 1.0}),
    ("lru", {**EXACT, "policy": "lru"}),  # exact byte-budget LRU: what the MLX expert streamers do
    ("lfu", {**EXACT, "policy": "lfu"}),
    ("hobbit-cache", {**EXACT, "policy": "hobbit"}),  # HOBBIT's multidimensional eviction score
    ("seqfreq-cache", {**EXACT, "policy": "seqfreq"}),  # per-sequence frequency + burst + distance
    ("shallow-cache", {**EXACT, "policy": "shallow"}),  # Fate's shallow-favoring cache
    # cross-layer prefetch, step by step, with guesses taking pool slots (the design before scratch
    # slots): top-k of the next layer (HOBBIT/Fate), a wider guess, then the first layers kept
    # resident (what prefetch cannot predict)
    ("prefetch-topk", {"exact": True, "policy": "lru", "prefetch_layers": 1, "prefetch_width": 1.0,
                       "keep_shallow_layers": 0, "prefetch_scratch": 0}),
    ("prefetch-wide", {"exact": True, "policy": "lru", "prefetch_layers": 1, "keep_shallow_layers": 0,
                       "prefetch_scratch": 0}),
    ("prefetch", {"exact": True, "policy": "lru", "prefetch_layers": 1, "prefetch_scratch": 0}),
    ("prefetch-2", {"exact": True, "policy": "lru", "prefetch_layers": 2,  # two layers ahead
                    "prefetch_scratch": 0}),
    ("fate", {"exact": True, "policy": "shallow", "prefetch_layers": 1,  # shallow cache + prefetch
              "prefetch_scratch": 0}),
    ("mixed-precision", {**FIXED, "skip": False, "exact": False, "mixed_precision": True,
                         "prefetch_layers": 0, "policy": "lru", "big_little": False,
                         "upgrade_after": 0}),
    ("skip", {**FIXED, "exact": False, "mixed_precision": True, "skip": True, "prefetch_layers": 0,
              "big_little": False, "upgrade_after": 0,
              "policy": "lru"}),  # mixed precision, and the least important experts dropped
    ("big-little", {**FIXED, "skip": False, "exact": False, "mixed_precision": False,
                    "big_little": True, "prefetch_layers": 0, "policy": "lru"}),
    ("prefill-2bit", {**FIXED, "skip": False, "exact": False, "mixed_precision": False,
                      "big_little": False, "prefetch_layers": 0, "policy": "lru",
                      "prefill_low_precision": 0.25}),  # Fate: unpopular experts 2-bit in prefill
    # what pays under a Mac's storage cost: fewer bytes per miss and a better cache, no guessing
    ("seqfreq-mixed", {**FIXED, "skip": False, "mixed_precision": True, "prefetch_layers": 0,
                       "policy": "seqfreq", "big_little": False, "upgrade_after": 0}),
    ("seqfreq-mixed-bl", {**FIXED, "skip": False, "mixed_precision": True, "big_little": True,
                          "prefetch_layers": 0, "policy": "seqfreq", "upgrade_after": 0}),
    ("seqfreq-mixed-bl-up", {**FIXED, "skip": False, "mixed_precision": True, "big_little": True,
                             "prefetch_layers": 0, "policy": "seqfreq",
                             "upgrade_after": 1.5}),  # 2-bit until hot
    ("seqfreq-mixed-up", {**FIXED, "skip": False, "mixed_precision": True, "prefetch_layers": 0,
                          "policy": "seqfreq", "big_little": False, "upgrade_after": 1.5}),
    ("seqfreq-mixed-bl-up-pf", {**FIXED, "skip": False, "mixed_precision": True,
                                "big_little": True, "prefetch_layers": 1, "prefetch_width": 1.0,
                                "policy": "seqfreq", "upgrade_after": 1.5}),
    ("exact-seqfreq-pf", {"exact": True, "policy": "seqfreq", "prefetch_layers": 1,
                          "prefetch_width": 1.0}),  # exact, cost-aware prefetch of the top-k
    ("prefetch-lowprec", {"prefetch_width": 1.0, "prefetch_low_precision": True}),
    ("default", {}),  # hobbit_mlx.load's defaults: every technique that pays, combined
    ("default-always-lossy", FIXED),  # the defaults, lossy however cheap reads are
    # the defaults of the previous session: 2-bit reads until an expert proves hot, and big-little
    # dropping a little token's other experts even when they are resident
    ("default-previous", {"upgrade_after": 1.5, "little_keeps_resident": False, "skip": False,
                          "t1": 0.6, "t2": 0.9}),
    ("default-t-0.6-0.9", {"t1": 0.6, "t2": 0.9}),  # HOBBIT's thresholds as they were
    ("default-upgrade", {"upgrade_after": 1.5}),  # + 2-bit reads until an expert proves hot
    ("default-noskip", {"skip": False}),  # without HOBBIT's skip of unimportant misses
    ("default-skip", {"skip": True}),  # (the default since HOBBIT's skip drops misses only)
    ("default-skip-0.8", {"skip": True, "t2": 0.8}),
    ("default-skip-0.7", {"skip": True, "t2": 0.7}),
    # the defaults before issue 11: LRU + prefetch of 2x top-k, every guess read, none cancelled
    ("default-naive-prefetch", {**FIXED, "skip": False, "prefetch_layers": 1, "policy": "lru",
                                "big_little": False, "upgrade_after": 0,
                                "prefetch_cost_aware": False, "prefetch_scratch": 0}),
    ("exact-default", {"exact": True}),  # exact=True, everything else default
    ("default-lru", {"policy": "lru"}),
    ("default-hobbit", {"policy": "hobbit"}),
    # + cost-aware top-k guesses in scratch slots (read as their misses would be), or in pool slots
    ("default-prefetch", {"prefetch_layers": 1, "prefetch_width": 1.0}),
    ("default-prefetch-evicting", {"prefetch_layers": 1, "prefetch_width": 1.0,
                                   "prefetch_scratch": 0}),
    ("exact-prefetch", {"exact": True, "prefetch_layers": 1, "prefetch_width": 1.0}),
    ("default-w3", {"prefetch_layers": 1, "prefetch_width": 3.0}),  # a wider guess
    ("default-adaptive", {"prefetch_layers": 1, "prefetch_recall": 0.98}),  # width for 0.98 recall
    ("all", {"big_little": True, "skip": True}),
]
# What runs without --configs: each technique alone and the defaults combined, within a few
# minutes on 2 CPU cores. Cache policies alone are compared offline on the recorded trace (replay
# of the runtime's own policy objects), which costs seconds instead of a run each.
DEFAULT_CONFIGS = ["exact-resident", "on-demand", "lru", "prefetch", "mixed-precision", "default"]
TRACE_CONFIG = "lru"  # its run records the routing trace (exact: routing equals mlx-lm's)
# Configurations measured with their pools full (every expert read before the timed workload), as
# mlx-lm has every expert loaded; every other run starts from empty pools.
PRELOADED = {"exact-resident"}


def available(kwargs: dict) -> str | None:
    """None if the installed hobbit_mlx.load() takes these options, else why not."""
    import inspect

    import hobbit_mlx
    from hobbit_mlx import policies

    params = inspect.signature(hobbit_mlx.load).parameters
    known = set(params)
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):  # load(path, ..., **options)
        options = getattr(hobbit_mlx, "LoadOptions", None)
        known |= options.names() if hasattr(options, "names") else set(kwargs)
    missing = [k for k in kwargs if k not in known]
    if missing:
        return f"load() has no option {', '.join(missing)}"
    pol = kwargs.get("policy")
    if pol is not None and pol not in getattr(policies, "POLICIES", {"lru": None}):
        return f"no cache policy {pol!r}"
    return None


def _is_exact_cache_only(kwargs: dict) -> bool:
    """Runs whose hit rate offline replay must reproduce: exact, no prefetch, no big-little."""
    return (kwargs.get("exact") is True and not kwargs.get("prefetch_layers")
            and not kwargs.get("big_little") and not kwargs.get("mixed_precision"))


DEFAULT_RESIDENCIES = [1.0, 0.5, 0.25, 0.125]
QUICK_RESIDENCIES = [1.0, 0.25]
REPLAY_POLICIES = ["lru", "lfu", "fifo", "belady"]  # + runtime:<name> for each runtime policy


# --------------------------------------------------------------------------- one run
def run_offloaded(paths, workload: Workload, baseline: dict, name: str, kwargs: dict, *,
                  cold: bool, ppl: bool = True, paired: dict | None = None,
                  storage_model=None) -> dict:
    """One hobbit_mlx configuration: fresh load, warm-up, empty pools (full ones for the
    ``PRELOADED`` configurations), workload, then perplexity."""
    import hobbit_mlx
    from hobbit_mlx.loader import runtime_of

    load_kwargs = dict(kwargs)
    load_kwargs.setdefault("max_context", workload.max_context)
    if cold:
        load_kwargs["direct_io"] = True
    if storage_model is not None:
        load_kwargs["simulated_storage"] = storage_model
    run = {"config": name, "kwargs": {k: v for k, v in kwargs.items()},
           "residency": kwargs.get("expert_residency"), "budget": kwargs.get("memory_budget"),
           "storage": "cold" if cold else "simulated" if storage_model is not None else "warm",
           "storage_bandwidth": storage_model.bandwidth if storage_model is not None else None}
    _free()
    background = mx.get_active_memory()  # the baseline's weights, kept loaded for pairing
    t0 = time.perf_counter()
    try:
        model, _tok = hobbit_mlx.load(paths.hobbit, progress=False, **load_kwargs)
    except Exception as e:  # a budget too small, an option this build lacks: a row that says so
        return {**run, "error": f"{type(e).__name__}: {e}"}
    rt = runtime_of(model)
    run["load_s"] = time.perf_counter() - t0
    run["direct_io"] = rt.reader.bypass  # "O_DIRECT", "F_NOCACHE" or None
    pools = high_pools(rt)
    all_experts = sum(layer.num_experts for layer in rt.manifest.layers)
    run["resident_expert_nbytes"] = pools[0].slot_nbytes if pools else 0
    run["capacity_experts"] = sum(pool.slots for pool in pools)  # 4-bit slots
    run["effective_residency"] = run["capacity_experts"] / max(1, all_experts)
    run["preloaded"] = name in PRELOADED
    if not run["preloaded"] and low_pool_without_slots(rt):
        # Every expert fits in 4-bit, so the 2-bit pool got no slot; from empty pools the runtime
        # would then have no copy to serve a 2-bit choice with (PoolBudgetError). The run starts
        # as load() leaves it: every expert resident.
        run["preloaded"] = True
        run["preloaded_why"] = "no 2-bit slot: every expert fits in 4-bit"
    try:
        _warmup(model, rt.prefill_step_size)
        empty_pools(rt, preload=run["preloaded"])
        hobbit_mlx.reset_stats(model)
        if cold:
            run["page_cache_dropped"] = rt.reader.drop_page_cache()
        gen = generate_workload(model, workload, rt.prefill_step_size, offloaded=True)
        stats = hobbit_mlx.offload_stats(model)
        if rt.reader.device is not None:
            run["cancelled_prefetch_bytes"] = rt.reader.device.cancelled_bytes
        tf = None
        if ppl and workload.ppl_pieces:
            hobbit_mlx.reset_stats(model)
            tf = teacher_forced(model, workload.ppl_pieces)
            pst = hobbit_mlx.offload_stats(model)
            run["ppl_eval_hit_rate"] = pst["hit_rate"]
            run["ppl_eval_peak_memory_bytes"] = pst["peak_memory_bytes"]
        out = summarize(run, gen, stats, baseline, tf, paired, background)
    except Exception as e:  # one failing run is a row that says so, not the end of the matrix
        import traceback
        traceback.print_exc()
        out = {**run, "error": f"{type(e).__name__}: {e}"}
    finally:
        rt.close()
        del model
        _free()
    return out


# --------------------------------------------------------------------------- the matrix
def plan_runs(configs: list[tuple[str, dict]], residencies: list[float], budgets: list[str]):
    runs = []
    for name, kw in configs:
        if available(kw) is not None:
            continue
        if "expert_residency" in kw or "memory_budget" in kw:
            runs.append((name, dict(kw)))
            continue
        for r in residencies:
            runs.append((name, {**kw, "expert_residency": r}))
        for b in budgets:
            runs.append((name, {**kw, "memory_budget": b}))
    return runs


def replay_policies() -> list[str]:
    """The reference policies plus every cache policy the installed runtime has (``runtime:NAME``)."""
    try:
        from hobbit_mlx.policies import POLICIES
    except ImportError:
        POLICIES = {}
    return REPLAY_POLICIES + [f"runtime:{n}" for n in POLICIES if n != "lru"]


def replay_rows(trace: tr.Trace, runs: list[dict]) -> tuple[list[dict], list[dict]]:
    """Offline policies at the cache sizes the runs had (in experts of their resident size), and
    for every exact cache-only run, its measured hit rate next to the replay of its own policy."""
    caps = {}
    for r in runs:
        if "capacity_experts" in r and r.get("config") != "on-demand" and not r.get("preloaded") \
                and "hit_rate" in r:
            label = (f"{100 * r['residency']:g}%" if r.get("residency") is not None
                     else f"budget {r.get('budget')}")
            caps.setdefault(int(r["capacity_experts"]), label)
    if not caps:
        return [], []
    items = sorted(caps.items(), reverse=True)
    rows = rp.compare(trace, [c for c, _ in items], replay_policies(), labels=[l for _, l in items])
    steps = rp.steps_of(trace)
    checks = []
    for r in runs:
        if "capacity_experts" not in r or not _is_exact_cache_only(r.get("kwargs", {})):
            continue
        if r.get("config") == "on-demand" or r.get("preloaded") or "hit_rate" not in r:
            continue
        if r.get("pool_rebuilds"):  # the pools changed size during the run: no one capacity
            continue
        pol = r["kwargs"].get("policy", "lru")
        t0 = time.perf_counter()
        rep = rp.replay(trace, f"runtime:{pol}", r["capacity_experts"], steps=steps)
        checks.append({"config": r["config"], "label": _res_label(r), "policy": pol,
                       "capacity": int(r["capacity_experts"]), "replayed": rep["hit_rate"],
                       "measured": r["hit_rate"], "replay_s": time.perf_counter() - t0,
                       "belady": next((x["hit_rate"] for x in rows if x["policy"] == "belady"
                                       and x["capacity"] == int(r["capacity_experts"])), None)})
    return rows, checks


def run_matrix(paths, workload: Workload, runs_plan, *, cold: bool, ppl: bool = True,
               record_trace: bool = True, pairing: str = "each", log=print,
               read_ratio: float | None = None) -> dict:
    """Baseline, then every planned run; ``pairing="each"`` times a baseline pass right before
    every run (ratios against that pass), ``"once"`` uses the first baseline pass for all.
    ``read_ratio``: every run reads through a simulated device on which one token's top-k expert
    reads take this many times mlx-lm's measured resident time per decoded token (``mac-like``:
    12, see ``hobbit_mlx.storage``)."""
    t0 = time.perf_counter()
    log(f"[bench] baseline: mlx-lm on {paths.src}")
    base_model = Baseline(paths)
    baseline = base_model.full_pass(workload, ppl=ppl)
    log(f"[bench]   prompt {baseline['prompt_tps']:.1f} tok/s, decode {baseline['decode_tps']:.1f} tok/s, "
        f"{_f(baseline['python_ms_per_layer_call'], '{:.3f}')} ms/layer call, "
        f"peak {baseline['peak_memory_bytes'] / MB:.1f} MiB")
    storage_model = None
    if read_ratio:
        from hobbit_mlx.storage import mac_like
        topk = topk_bytes_per_token(paths.hobbit)
        storage_model = mac_like(topk, 1.0 / baseline["decode_tps"], ratio=read_ratio)
        baseline["storage"] = {"ratio": read_ratio, "topk_bytes_per_token": topk,
                               "bandwidth": storage_model.bandwidth,
                               "resident_s_per_token": 1.0 / baseline["decode_tps"]}
        log(f"[bench] simulated storage: {storage_model.describe()} (a token's top-k reads "
            f"{topk / MB:.2f} MiB = {read_ratio:g}x mlx-lm's {1000 / baseline['decode_tps']:.1f} ms/token)")
    runs = []
    try:
        for name, kw in runs_plan:
            t1 = time.perf_counter()
            paired = None
            if pairing == "each":
                g = base_model.timing_pass(workload)
                paired = {k: g[k] for k in ("prompt_tps", "decode_tps", "python_ms_per_layer_call")}
            r = run_offloaded(paths, workload, baseline, name, kw, cold=cold, ppl=ppl, paired=paired,
                              storage_model=storage_model)
            r["wall_s"] = time.perf_counter() - t1
            runs.append(r)
            if "error" in r:
                log(f"[bench] {name} {kw}: {r['error']}")
            else:
                log(f"[bench] {name:15s} {_res_label(r):>8s}: hit {r['hit_rate']:.3f}, decode "
                    f"{_f(r['decode_tps'], '{:.1f}')} tok/s (x{_f(r['decode_tps_ratio'], '{:.2f}')} of "
                    f"{_f(r['baseline_decode_tps'], '{:.1f}')}), prompt {_f(r['prompt_tps'], '{:.1f}')} tok/s "
                    f"(x{_f(r['prompt_tps_ratio'], '{:.2f}')}), {_f(r['host_syncs_per_token'], '{:.1f}')} "
                    f"syncs/token, {_f(r['python_ms_per_layer_call'], '{:.3f}')} ms/layer call "
                    f"(x{_f(r['python_ms_ratio'], '{:.2f}')}), peak {r['peak_memory_bytes'] / MB:.1f} MiB "
                    f"({_f(r['peak_vs_budget'], '{:.2f}')} of the budget), {r['wall_s']:.0f}s")
    finally:
        baseline["pairing"] = pairing
        baseline["pooled"] = base_model.pooled()
        baseline["timing_passes"] = base_model.passes
        base_model.close()
    result = {"baseline": baseline, "runs": runs}
    # Facts about the store, from a zero-residency load (cheap).
    import hobbit_mlx
    from hobbit_mlx.loader import runtime_of
    m, _ = hobbit_mlx.load(paths.hobbit, expert_residency=0.0, progress=False,
                           max_context=workload.max_context)
    rt = runtime_of(m)
    result["experts"] = {**tr.runtime_meta(rt), "dense_bytes": rt.plan.dense_bytes,
                         "expert_bytes_low": rt.manifest.expert_bytes("low")}
    rt.close()
    del m, rt
    _free()
    trace_kwargs = dict(CONFIGS).get(TRACE_CONFIG)
    if record_trace and trace_kwargs is not None and available(trace_kwargs) is None:
        t1 = time.perf_counter()
        trace = record_trace_pass(paths, workload, trace_kwargs)
        result["trace"] = trace
        result["trace_summary"] = trace.summary()
        result["replay"], result["replay_check"] = replay_rows(trace, runs)
        log(f"[bench] routing trace recorded and replayed in {time.perf_counter() - t1:.0f}s")
    result["wall_s"] = time.perf_counter() - t0
    return result


@arguments.refuse_bad_input
def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, type=arguments.model_dir,
                   help="mlx-lm checkpoint (or hobbit dir with its source); default: the bundled "
                        "reference model, else a tiny random model built under bench/results/tmp "
                        "($HOBBIT_BENCH_TMP)")
    p.add_argument("--quick", action="store_true",
                   help="smoke variant: 1 prompt of 32 tokens, 16 decoded, residencies 1 and 0.25")
    p.add_argument("--residencies", default=None, type=arguments.residencies,
                   help="expert residencies in [0, 1], e.g. 1,0.5,0.25,0.125")
    p.add_argument("--budgets", default=[], type=arguments.sizes,
                   help="absolute memory budgets, e.g. 200MB,1GB")
    p.add_argument("--configs", default=None,
                   help=f"configurations to run, or 'all' ({', '.join(n for n, _ in CONFIGS)}); "
                        f"default: {','.join(DEFAULT_CONFIGS)}")
    p.add_argument("--storage", choices=["warm", "cold", "mac-like"], default="warm",
                   help="warm: the OS page cache may hold the store; cold: O_DIRECT reads and the "
                        "store's page cache dropped before each run; mac-like: every read waits "
                        "for a simulated device calibrated to a Mac's storage/compute ratio "
                        "(--read-ratio, hobbit_mlx/storage.py)")
    p.add_argument("--cold", action="store_true", help="the same as --storage cold")
    p.add_argument("--read-ratio", type=arguments.positive, default=None,
                   help="mac-like: one token's top-k expert reads / mlx-lm's resident time per "
                        "token (default 12, a Mac SSD under Qwen3-30B-A3B)")
    p.add_argument("--prompts", type=int, default=None)
    p.add_argument("--prompt-tokens", type=int, default=None)
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--ppl-pieces", type=int, default=None)
    p.add_argument("--ppl-tokens", type=int, default=None)
    p.add_argument("--no-ppl", action="store_true", help="skip the teacher-forced perplexity pass")
    p.add_argument("--pairing", choices=["each", "once"], default="each",
                   help="'each' (default): time a baseline pass right before every run and use it "
                        "for that run's ratios; 'once': only the first baseline pass (faster)")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--name", default=None, help="output file stem (default: harness-<model>-<warm|cold>)")
    a = p.parse_args(argv)

    quick = a.quick
    wd = QUICK_WORKLOAD if quick else DEFAULT_WORKLOAD
    n_prompts = a.prompts or wd["n_prompts"]
    prompt_tokens = a.prompt_tokens or wd["prompt_tokens"]
    max_tokens = a.max_tokens or wd["max_tokens"]
    n_ppl = a.ppl_pieces if a.ppl_pieces is not None else wd["n_ppl"]
    ppl_tokens = a.ppl_tokens or wd["ppl_tokens"]
    residencies = a.residencies or (QUICK_RESIDENCIES if quick else DEFAULT_RESIDENCIES)
    budgets = a.budgets
    known = dict(CONFIGS)
    configs = [(c, known[c]) for c in DEFAULT_CONFIGS]
    if a.configs == "all":
        configs = list(CONFIGS)
    elif a.configs:
        want = [c.strip() for c in a.configs.split(",") if c.strip()]
        unknown = [c for c in want if c not in known]
        if unknown:
            p.error(f"unknown configuration(s) {unknown}; known: {list(known)}")
        configs = [(c, known[c]) for c in want]
    storage = "cold" if a.cold else a.storage
    if a.read_ratio is not None and storage != "mac-like":
        p.error("--read-ratio goes with --storage mac-like")
    out_dir = arguments.out_dir(p, a.out)

    paths = resolve_model_paths(a.model)
    import mlx_lm.utils
    tok = mlx_lm.utils.load_tokenizer(paths.src)
    workload = make_workload(tok, n_prompts=n_prompts, prompt_tokens=prompt_tokens,
                             max_tokens=max_tokens, n_ppl=n_ppl, ppl_tokens=ppl_tokens)
    warn_if_cannot_drop(storage == "cold", "harness")
    read_ratio = None
    if storage == "mac-like":
        from hobbit_mlx.storage import MAC_READ_RATIO
        read_ratio = MAC_READ_RATIO if a.read_ratio is None else a.read_ratio
    name = a.name or f"harness-{paths.name}-{storage}" + ("-quick" if quick else "")

    result = run_matrix(paths, workload, plan_runs(configs, residencies, budgets),
                        cold=storage == "cold", ppl=not a.no_ppl, pairing=a.pairing,
                        read_ratio=read_ratio)
    result["meta"] = {
        "command": arguments.command(__file__, argv),
        "model": paths.as_dict(), "storage": storage, "quick": quick, "ppl": not a.no_ppl,
        "workload": workload.as_dict(), "experts": result.pop("experts"),
        "configs": [{"name": n, "kwargs": kw, "unavailable": available(kw)} for n, kw in configs],
        "residencies": residencies,
        "budgets": budgets, "pairing": a.pairing, "machine": _machine(), "wall_s": result["wall_s"],
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    trace = result.pop("trace", None)
    if trace is not None:
        tpath = out_dir / "tmp" / f"{name}-trace.npz"
        tr.save(trace, tpath)
        result["meta"]["trace_file"] = str(tpath)
    result["plots"] = plots(result, out_dir, name)
    write_results(out_dir, name, _jsonable(result), markdown(result))
    print(markdown(result))
    print(f"[bench] wrote {out_dir / name}.md, .json, {', '.join(Path(x).name for x in result['plots'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
