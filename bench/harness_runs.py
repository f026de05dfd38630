"""The measuring side of ``bench/harness.py``: what one pass of the workload measures and how.

Its own module because these helpers only measure -- mlx-lm's baseline kept loaded
(``Baseline``, ``load_baseline``), the timed prefill + greedy decode (``generate_workload``,
``LayerCallTimer``), teacher-forced likelihoods, the counters of one run turned into its metrics
(``summarize``, ``storage_bound``), the expert pools emptied between runs, the untimed routing
trace pass and the ``mac-like`` storage calibration -- apart from which configurations run
(``harness.py``) and how the results are written (``harness_report.py``). The other bench scripts
take their measuring helpers from here.
"""

from __future__ import annotations

import gc
import math
import sys
import time
from pathlib import Path

import numpy as np

import mlx.core as mx

from bench import trace as tr
from bench.workload import Workload
from hobbit_mlx.reader import can_drop_page_cache



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


def warn_if_cannot_drop(cold: bool, what: str) -> None:
    """Cold runs on an OS that cannot drop one file's cached pages (macOS) start warm."""
    if cold and not can_drop_page_cache():
        print(f"warning: this OS cannot drop one file's cached pages; run `sudo purge` before the "
              f"{what}, or pages cached earlier read warm (reads bypass the cache from then on)",
              file=sys.stderr)


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
