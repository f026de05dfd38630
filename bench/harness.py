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
import gc
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    import _path  # noqa: F401  (repository root on sys.path, see bench/_path.py)

import mlx.core as mx  # noqa: E402

from bench import arguments  # noqa: E402
from bench import replay as rp  # noqa: E402
from bench import trace as tr  # noqa: E402
from bench.workload import (DEFAULT_WORKLOAD, QUICK_WORKLOAD, RESULTS, Workload,  # noqa: E402
                            make_workload, resolve_model_paths)
from hobbit_mlx.reader import can_drop_page_cache  # noqa: E402

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
MB = 2**20


# --------------------------------------------------------------------------- measurement
def _np(a) -> np.ndarray:
    return np.array(a.astype(mx.float32) if a.dtype == mx.bfloat16 else a)


def teacher_forced(model, pieces: list[list[int]]) -> dict:
    """Log-likelihood of each next token and the model's argmax, over held-out pieces."""
    nll, top1 = [], []
    for toks in pieces:
        x = mx.array(toks)[None]
        logits = model(x[:, :-1])[0].astype(mx.float32)
        logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        target = mx.array(toks[1:])
        ll = mx.take_along_axis(logp, target[:, None], axis=-1)[:, 0]
        am = mx.argmax(logits, axis=-1)
        mx.eval(ll, am)
        nll.append(-_np(ll))
        top1.append(np.array(am))
    nll_all = np.concatenate(nll) if nll else np.zeros(0)
    return {"nll": nll_all, "argmax": np.concatenate(top1) if top1 else np.zeros(0, np.int64),
            "ppl": float(math.exp(nll_all.mean())) if nll_all.size else None}


def _stats(model):
    import hobbit_mlx
    return hobbit_mlx.offload_stats(model) if model is not None else None


_COUNTERS = ["expert_requests", "hits_high", "hits_low", "misses_high", "misses_low", "skipped",
             "bytes_read", "prefetch_issued", "prefetch_used", "prefetch_bytes", "prediction_correct",
             "prediction_total", "little_tokens", "routed_tokens", "layer_calls", "host_syncs",
             "read_wait_s", "hits_in_flight", "pool_rebuilds", "prefetch_cancelled"]


def _diff(a: dict, b: dict) -> dict:
    return {k: b.get(k, 0) - a.get(k, 0) for k in _COUNTERS}


def _add(acc: dict, d: dict) -> None:
    for k, v in d.items():
        acc[k] = acc.get(k, 0) + v


class LayerCallTimer:
    """Host (Python) time spent in the MoE layer calls: ``classes``' ``__call__`` wrapped with a
    ``time.perf_counter()`` timer while the ``with`` block runs; calls count only while ``active``
    (the harness turns it on for the decode phase).

    A layer call that cannot miss is lazy (it only builds the graph), so this is mostly graph
    building; a synced call also waits for its router indices and reads. The same timer on mlx-lm's
    switch modules (``switch_classes``) makes the ratio meaningful."""

    def __init__(self, classes) -> None:
        self.classes = list(dict.fromkeys(classes))
        self.active = False
        self.seconds = 0.0
        self.calls = 0
        self._saved: list = []

    def __enter__(self) -> "LayerCallTimer":
        for cls in self.classes:
            own = cls.__dict__.get("__call__")  # None: inherited (restored by deleting ours)
            orig = cls.__call__

            def timed(module, *args, _orig=orig, **kwargs):
                if not self.active:
                    return _orig(module, *args, **kwargs)
                t0 = time.perf_counter()
                try:
                    return _orig(module, *args, **kwargs)
                finally:
                    self.seconds += time.perf_counter() - t0
                    self.calls += 1

            self._saved.append((cls, own))
            cls.__call__ = timed
        return self

    def __exit__(self, *exc) -> None:
        for cls, own in reversed(self._saved):
            if own is None:
                del cls.__call__
            else:
                cls.__call__ = own
        self._saved.clear()
        self.active = False

    @property
    def ms_per_call(self) -> float | None:
        return 1000 * self.seconds / self.calls if self.calls else None


def switch_classes(model) -> list[type]:
    """The classes of the model's MoE switch modules: hobbit_mlx's ``OffloadedSwitch`` for an
    offloaded model, else mlx-lm's ``SwitchGLU`` / ``SwitchMLP`` (subclasses included)."""
    from mlx_lm.models.switch_layers import SwitchGLU, SwitchMLP

    from hobbit_mlx.offload import OffloadedSwitch

    if getattr(model, "_hobbit", None) is not None:
        return [OffloadedSwitch]
    found = [type(m) for _, m in model.named_modules() if isinstance(m, (SwitchGLU, SwitchMLP))]
    return list(dict.fromkeys(found)) or [SwitchGLU, SwitchMLP]


def generate_workload(model, workload: Workload, prefill_step: int, *, offloaded: bool) -> dict:
    """Prefill + greedy decode of every prompt; timings as mlx-lm's stream_generate takes them.

    Prompt time: until the first token is out (prefill; like mlx-lm's ``prompt_tps``). Decode
    tokens/s: (N - 1) tokens over the time from the first token to the last. EOS does not stop
    decoding, so every run decodes the same number of tokens. The MoE layer calls' Python time is
    taken in the decode phase only (``LayerCallTimer``; mlx-lm builds the first decode step's
    graph before the first token is out, so that step is not in it).
    """
    with LayerCallTimer(switch_classes(model)) as timer:
        out = _generate_workload(model, workload, prefill_step, offloaded=offloaded, timer=timer)
    out.update(python_s=timer.seconds, python_layer_calls=timer.calls,
               python_ms_per_layer_call=timer.ms_per_call)
    return out


def _generate_workload(model, workload: Workload, prefill_step: int, *, offloaded: bool,
                       timer: LayerCallTimer) -> dict:
    from mlx_lm.generate import generate_step

    from hobbit_mlx.loader import runtime_of

    rt = runtime_of(model) if offloaded else None
    tokens, prompt_s, decode_s, n_prompt, n_gen = [], 0.0, 0.0, 0, 0
    prefill, decode = {}, {}
    for s, prompt in enumerate(workload.prompts):
        step = prefill_step
        if offloaded:  # what hobbit_mlx.stream_generate does: per-sequence statistics, a budget
            rt.new_sequence(0, len(prompt), workload.max_tokens)  # planned for this sequence
            step = min(prefill_step, rt.plan.chunk_tokens)
        before = _stats(model) if offloaded else None
        out = []
        tic = time.perf_counter()
        t_first = None
        mid = None
        for tok, _ in generate_step(mx.array(prompt), model, max_tokens=workload.max_tokens,
                                    prefill_step_size=step):
            if t_first is None:
                t_first = time.perf_counter()
                if offloaded:
                    mid = _stats(model)
                timer.active = True
            out.append(int(tok))
        t_end = time.perf_counter()
        timer.active = False
        if offloaded:
            after = _stats(model)
            _add(prefill, _diff(before, mid))
            _add(decode, _diff(mid, after))
        prompt_s += t_first - tic
        decode_s += t_end - t_first
        n_prompt += len(prompt)
        n_gen += len(out)
        tokens.append(out)
    n_decode = n_gen - len(workload.prompts)
    return {"tokens": tokens, "prompt_tokens": n_prompt, "generated_tokens": n_gen,
            "decode_tokens": n_decode, "prompt_s": prompt_s, "decode_s": decode_s,
            "prompt_tps": n_prompt / prompt_s if prompt_s else None,
            "decode_tps": n_decode / decode_s if decode_s and n_decode > 0 else None,
            "prefill_counters": prefill, "decode_counters": decode}


def _warmup(model, prefill_step: int) -> None:
    from mlx_lm.generate import generate_step

    for _ in generate_step(mx.array([1, 2, 3, 4, 5, 6, 7, 8]), model, max_tokens=4,
                           prefill_step_size=prefill_step):
        pass


def _free() -> None:
    gc.collect()
    mx.clear_cache()


_TIMING_KEYS = ("prompt_tokens", "decode_tokens", "prompt_s", "decode_s", "prompt_tps", "decode_tps",
                "python_s", "python_layer_calls", "python_ms_per_layer_call")


class Baseline:
    """mlx-lm with the whole 4-bit model resident, kept loaded for the whole matrix so that each
    hobbit_mlx run is timed next to a baseline pass on the same prompts (paired ratios stay
    meaningful when the machine's speed drifts). Its weights stay allocated during the hobbit runs;
    those runs subtract the memory that was already allocated before they loaded."""

    def __init__(self, paths) -> None:
        from mlx.utils import tree_flatten

        t0 = time.perf_counter()
        self.model, _tok = load_baseline(paths.src)
        mx.eval(self.model.parameters())
        self.load_s = time.perf_counter() - t0
        self.weight_bytes = sum(a.nbytes for _, a in tree_flatten(self.model.parameters()))
        self.cache_limit = mx.set_cache_limit(0)  # MLX's own default; hobbit_mlx.load changes it
        mx.set_cache_limit(self.cache_limit)
        _warmup(self.model, 2048)
        self.passes: list[dict] = []

    def timing_pass(self, workload: Workload) -> dict:
        mx.set_cache_limit(self.cache_limit)
        gen = generate_workload(self.model, workload, 2048, offloaded=False)
        _free()
        self.passes.append({k: gen[k] for k in _TIMING_KEYS})
        return gen

    def full_pass(self, workload: Workload, *, ppl: bool = True) -> dict:
        """The reference tokens, peak memory and held-out likelihoods (first pass)."""
        _free()
        mx.reset_peak_memory()
        gen = self.timing_pass(workload)
        peak = mx.get_peak_memory()
        tf = teacher_forced(self.model, workload.ppl_pieces) if ppl and workload.ppl_pieces else None
        _free()
        return {"name": "mlx-lm (all resident)", "load_s": self.load_s, "peak_memory_bytes": peak,
                "weight_bytes": self.weight_bytes, **gen, "teacher_forced": tf,
                "ppl": tf["ppl"] if tf else None}

    def pooled(self) -> dict:
        """Tokens/s over every baseline pass, and the spread between passes."""
        tot = {k: sum(p[k] for p in self.passes) for k in ("prompt_tokens", "decode_tokens",
                                                           "prompt_s", "decode_s")}
        dec = [p["decode_tps"] for p in self.passes if p["decode_tps"]]
        pre = [p["prompt_tps"] for p in self.passes if p["prompt_tps"]]
        py_s = sum(p["python_s"] for p in self.passes)
        py_calls = sum(p["python_layer_calls"] for p in self.passes)
        return {"prompt_tps": _rate(tot["prompt_tokens"], tot["prompt_s"]),
                "decode_tps": _rate(tot["decode_tokens"], tot["decode_s"]),
                "python_ms_per_layer_call": _rate(1000 * py_s, py_calls),
                "passes": len(self.passes), "decode_tps_min": min(dec, default=None),
                "decode_tps_max": max(dec, default=None), "prompt_tps_min": min(pre, default=None),
                "prompt_tps_max": max(pre, default=None)}

    def close(self) -> None:
        del self.model
        _free()


def _rate(n, d):
    return n / d if d else None


def summarize(run: dict, gen: dict, stats: dict, baseline: dict, tf: dict | None,
              paired: dict | None = None, background: int = 0) -> dict:
    """The reported metrics of one run (counters over the generation workload only).

    ``paired``: the baseline pass timed right before this run (else the first baseline pass);
    ``background``: bytes MLX already held before the run loaded (the baseline's weights)."""
    timing = paired or baseline
    peak = stats["peak_memory_bytes"] - background
    c = {k: stats.get(k, 0) for k in _COUNTERS}
    req = c["expert_requests"]
    misses = c["misses_high"] + c["misses_low"]
    dec = gen["decode_counters"]
    dec_req = dec.get("expert_requests", 0)
    budget = stats["budget_bytes"]
    dec_hits = dec.get("hits_high", 0) + dec.get("hits_low", 0)
    pre = gen["prefill_counters"]
    pre_req = pre.get("expert_requests", 0)
    m = {
        **run,
        "requests": req,
        "hit_rate": _rate(c["hits_high"] + c["hits_low"], req),
        "resident_hit_rate": _rate(c["hits_high"] + c["hits_low"] - c["hits_in_flight"], req),
        "high_hit_rate": _rate(c["hits_high"], req),
        "low_hit_rate": _rate(c["hits_low"], req),
        "miss_rate": _rate(misses, req),
        "skip_rate": _rate(c["skipped"], req),
        "decode_hit_rate": _rate(dec_hits, dec_req),
        "prefill_hit_rate": _rate(pre.get("hits_high", 0) + pre.get("hits_low", 0), pre_req),
        "bytes_read": c["bytes_read"],
        "bytes_per_token": _rate(c["bytes_read"], gen["generated_tokens"]),
        "decode_bytes_per_token": _rate(dec.get("bytes_read", 0), gen["decode_tokens"]),
        "prefetch_issued": c["prefetch_issued"],
        "prefetch_used": c["prefetch_used"],
        "prefetch_precision": _rate(c["prefetch_used"], c["prefetch_issued"]) if c["prefetch_issued"] else None,
        "prefetch_recall": (_rate(c["prefetch_used"], c["prefetch_used"] + misses)
                            if c["prefetch_issued"] else None),
        "prefetch_bytes": c["prefetch_bytes"],
        "prefetch_cancelled": c["prefetch_cancelled"],
        **storage_bound(run, gen, timing),
        "prediction_accuracy": _rate(c["prediction_correct"], c["prediction_total"]),
        **{key: {int(d): v for d, v in (stats.get(key) or {}).items()} for key in (
            "prediction_recall_by_distance", "prediction_precision_by_distance",
            "prefetch_precision_by_distance")},
        "little_token_share": _rate(c["little_tokens"], c["routed_tokens"]),
        "read_wait_s": c["read_wait_s"],
        "host_syncs": c["host_syncs"],
        "host_syncs_per_token": _rate(dec.get("host_syncs", 0), gen["decode_tokens"]),
        "decode_lazy_call_share": (1 - _rate(dec.get("host_syncs", 0), dec.get("layer_calls", 0))
                                   if dec.get("layer_calls") else None),
        "pool_rebuilds": c["pool_rebuilds"],
        "python_ms_per_layer_call": gen.get("python_ms_per_layer_call"),
        "python_layer_calls": gen.get("python_layer_calls"),
        "baseline_python_ms_per_layer_call": timing.get("python_ms_per_layer_call"),
        "python_ms_ratio": _rate(gen.get("python_ms_per_layer_call"),
                                 timing.get("python_ms_per_layer_call")),
        "prompt_tps": gen["prompt_tps"],
        "decode_tps": gen["decode_tps"],
        "baseline_prompt_tps": timing["prompt_tps"],
        "baseline_decode_tps": timing["decode_tps"],
        "prompt_tps_ratio": _rate(gen["prompt_tps"], timing["prompt_tps"]),
        "decode_tps_ratio": _rate(gen["decode_tps"], timing["decode_tps"]),
        "generated_tokens": gen["generated_tokens"],
        "peak_memory_bytes": peak,
        "background_memory_bytes": background,
        "budget_bytes": budget,
        "peak_vs_budget": _rate(peak, budget),
        "expert_cache_bytes": stats["expert_cache_bytes"],
        "dense_bytes": stats.get("dense_bytes"),
        "kv_reserve_bytes": stats.get("kv_reserve_bytes"),
        "kv_reserve_tokens": stats.get("kv_reserve_tokens"),
        "activation_reserve_bytes": stats.get("activation_reserve_bytes"),
        "pool_slots": stats.get("pool_slots"),
        "within_budget": peak <= budget,
        "peak_vs_baseline": _rate(peak, baseline["peak_memory_bytes"]),
    }
    same = [a == b for a, b in zip(gen["tokens"], baseline["tokens"])]
    pos = [x == y for a, b in zip(gen["tokens"], baseline["tokens"]) for x, y in zip(a, b)]
    m["generation_identical"] = all(same) and len(same) == len(baseline["tokens"])
    m["generation_token_match"] = float(np.mean(pos)) if pos else None
    base_tf = baseline.get("teacher_forced")
    if tf is not None and base_tf is not None:
        m["ppl"] = tf["ppl"]
        m["ppl_baseline"] = base_tf["ppl"]
        m["ppl_ratio"] = tf["ppl"] / base_tf["ppl"] if base_tf["ppl"] else None
        m["argmax_agreement"] = float(np.mean(tf["argmax"] == base_tf["argmax"]))
        m["max_abs_nll_diff"] = float(np.max(np.abs(tf["nll"] - base_tf["nll"])))
    else:
        m.update(ppl=None, ppl_baseline=None, ppl_ratio=None, argmax_agreement=None)
    return m


def storage_bound(run: dict, gen: dict, timing: dict) -> dict:
    """The storage-time model of a decode step on the simulated device: tokens/s <= 1 /
    max(compute + demand-miss bytes / bandwidth, all bytes / bandwidth), with compute = mlx-lm's
    resident time per token. Demand misses stall the step; prefetch reads can hide behind compute
    but still take the device. A run's share of its bound shows what overheads (and stalls that
    prefetch should have hidden) cost it."""
    bw = run.get("storage_bandwidth")
    dec = gen["decode_counters"]
    n = gen["decode_tokens"]
    demand = (dec.get("bytes_read", 0) - dec.get("prefetch_bytes", 0)) / n if n else None
    out = {"decode_demand_bytes_per_token": demand, "decode_prefetch_bytes_per_token":
           dec.get("prefetch_bytes", 0) / n if n else None, "bound_decode_tps": None,
           "of_bound": None}
    if bw and demand is not None and timing.get("decode_tps"):
        compute = 1.0 / timing["decode_tps"]
        seconds = max(compute + demand / bw, dec.get("bytes_read", 0) / n / bw)
        out["bound_decode_tps"] = 1.0 / seconds
        out["of_bound"] = _rate(gen["decode_tps"], out["bound_decode_tps"])
    return out


def high_pools(rt) -> list:
    """The distinct pools that serve the 4-bit experts (layers of one layout share one)."""
    pools = {}
    for layer in rt.manifest.layers:
        pool = rt.cache.pool_for(layer.layer, "high")
        if pool is not None:
            pools.setdefault(id(pool), pool)
    return list(pools.values())


def low_pool_without_slots(rt) -> bool:
    """A 2-bit pool exists (mixed precision, or 2-bit prefill) but has no slot."""
    return any(rt.cache.pool_for(layer.layer, "low") is not None
               and rt.cache.capacity(layer.layer, "low") == 0 for layer in rt.manifest.layers)


def empty_pools(rt, *, preload: bool = False) -> None:
    """Forget what the warm-up left: pending graphs evaluated, prefetch holds dropped, every slot
    freed and the policies reset. With ``preload``, every expert is read back (the pools that can
    hold all of their layers' experts, as ``load`` does)."""
    rt.wait_idle()
    if rt.prefetcher is not None:
        rt.prefetcher.forget()
    rt.settle()
    rt.count_deferred()
    rt.cache.clear()
    rt.cache.reset_policies()
    if preload:
        rt.preload()


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


def load_baseline(src):
    """mlx-lm's model and tokenizer for ``src``, computing in the dtype hobbit_mlx computes in
    (``compute_dtype``: float32 on the CPU backend, the checkpoint's own on the GPU), so that both
    sides produce the same tokens and the speed ratios compare like with like."""
    import mlx_lm

    from hobbit_mlx.loader import compute_dtype

    model, tokenizer = mlx_lm.load(str(src))
    if compute_dtype() is not None:
        model.set_dtype(compute_dtype())
    return model, tokenizer


def compute_note() -> str:
    """The dtype both sides compute in (``compute_dtype``) and the backend, for a report."""
    from hobbit_mlx.loader import compute_dtype

    dtype = compute_dtype()
    name = str(dtype).removeprefix("mlx.core.") if dtype is not None else "the checkpoint's own dtype"
    return f"{name} activations on the {'GPU' if mx.default_device() == mx.gpu else 'CPU'} backend"


def warn_if_cannot_drop(cold: bool, what: str) -> None:
    """Cold runs on an OS that cannot drop one file's cached pages (macOS) start warm."""
    if cold and not can_drop_page_cache():
        print(f"warning: this OS cannot drop one file's cached pages; run `sudo purge` before the "
              f"{what}, or pages cached earlier read warm (reads bypass the cache from then on)",
              file=sys.stderr)


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


def record_trace_pass(paths, workload: Workload, kwargs: dict) -> tr.Trace:
    """An extra, untimed pass that records the routing (the hook costs time, so no measured run
    carries it). Exact mode: the routing is mlx-lm's, whatever the cache size."""
    import hobbit_mlx
    from hobbit_mlx.loader import runtime_of

    kw = {**kwargs, "expert_residency": 1.0, "max_context": workload.max_context}
    model, _ = hobbit_mlx.load(paths.hobbit, progress=False, **kw)
    try:
        return tr.record(model, workload, {"model": paths.name, "routing": paths.routing,
                                           "workload": workload.as_dict()})
    finally:
        runtime_of(model).close()
        del model
        _free()


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


def topk_bytes_per_token(hobbit_dir) -> int:
    """Bytes of one token's top-k 4-bit experts over every MoE layer (mean expert size)."""
    from hobbit_mlx.store import load_manifest

    m = load_manifest(hobbit_dir)
    total = 0
    for layer in m.layers:
        records = layer.precisions["high"].records
        total += m.experts_per_token * sum(r.nbytes for r in records) / len(records)
    return int(total)


def resident_seconds_per_token(src: Path, prompt: list[int], tokens: int = 32,
                               reps: int = 3) -> float:
    """mlx-lm's decode time per token with the whole model resident (float32 activations on
    the CPU backend, as hobbit_mlx computes there): the median of ``reps`` greedy runs, after a
    warm-up. What ``mac-like`` storage is calibrated against."""
    import statistics

    import mlx_lm

    model, tokenizer = load_baseline(src)
    tps = []
    for i in range(reps + 1):
        last = None
        for last in mlx_lm.stream_generate(model, tokenizer, prompt,
                                           max_tokens=8 if i == 0 else tokens):
            pass
        if i and last is not None and last.generation_tps > 0:
            tps.append(last.generation_tps)
    del model
    gc.collect()
    mx.clear_cache()
    if not tps:
        raise SystemExit("could not time mlx-lm's decoding (no tokens generated)")
    return 1.0 / statistics.median(tps)


def mac_like_storage(paths, prompt: list[int], read_ratio: float | None = None):
    """The ``mac-like`` simulated device for ``paths``' model: one token's top-k 4-bit expert
    reads take ``read_ratio`` (default ``MAC_READ_RATIO``) x mlx-lm's resident decode time per
    token, measured here on ``prompt``. Returns (storage, calibration dict, one-line detail)."""
    from hobbit_mlx.storage import MAC_READ_RATIO, mac_like

    ratio = MAC_READ_RATIO if read_ratio is None else read_ratio
    if not ratio > 0:
        raise ValueError(f"read ratio must be above 0, not {ratio:g}")
    resident = resident_seconds_per_token(paths.src, prompt)
    topk = topk_bytes_per_token(paths.hobbit)
    storage = mac_like(topk, resident, ratio=ratio)
    calibration = {"ratio": ratio, "resident_s_per_token": resident,
                   "topk_bytes_per_token": topk, "bandwidth": storage.bandwidth}
    detail = (f"mac-like: {storage.describe()}; one token's top-k 4-bit experts "
              f"({topk / 2 ** 20:.2f} MiB) take {ratio:g} x mlx-lm's measured "
              f"{resident * 1000:.1f} ms per resident decoded token")
    return storage, calibration, detail


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
