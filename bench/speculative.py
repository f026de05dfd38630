#!/usr/bin/env python3
"""Self-speculative decoding (issue 14): the premise, then tokens/s against plain decoding.

    python bench/speculative.py premise [--residencies 0.5,0.25,0.125] [--ks 1,2,4]
    python bench/speculative.py bench [--residencies 0.5,0.25,0.125] [--rounds 3] [--storage mac-like]

``premise`` answers, before speed: (a) how often a draft from the resident experts only equals the
exact greedy token, and (b) the bytes read per generated token when each pass verifies K + 1
tokens (each missing expert read once per pass) against plain decoding with the same cache. Bytes
and acceptance do not depend on the storage speed in exact mode, so it runs on the page cache. It
measures the live runtime and, as a cross-check, replays the exact routing trace with decode
tokens grouped K + 1 at a time (``bench/replay.py``).

``bench`` times decode tokens/s under simulated Mac-like storage (``hobbit_mlx/storage.py``:
a token's top-k reads take 12x mlx-lm's resident step, measured in this process): plain exact
decoding, the lossy defaults, and self-speculation (fixed K and adaptive K), each from empty
pools, in alternating rounds in one process; medians and ratios to the best plain configuration.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    import _path  # noqa: F401

import mlx.core as mx

from bench import arguments
from bench import replay as rp
from bench import trace as tr
from bench.harness_runs import empty_pools, topk_bytes_per_token, _warmup
from bench.workload import DEFAULT_WORKLOAD, RESULTS, make_workload, resolve_model_paths

MB = 1 << 20


def _load(paths, **kw):
    import hobbit_mlx
    from hobbit_mlx.loader import runtime_of

    model, tok = hobbit_mlx.load(paths.hobbit, progress=False, **kw)
    rt = runtime_of(model)
    _warmup(model, rt.prefill_step_size)
    return model, tok, rt


def decode_run(model, rt, workload, *, k: int | None, adaptive: bool = False) -> dict:
    """Every prompt from empty pools' state at call time: prefill, then decode with draft length
    ``k`` (None or 0: plain decoding through the same loop). Counts decode passes only."""
    from hobbit_mlx.speculative import AdaptiveK, SpeculativeStats, speculative_generate_step

    st = SpeculativeStats()
    tokens, decode_s = [], 0.0
    for prompt in workload.prompts:
        rt.new_sequence(0, len(prompt), workload.max_tokens + (k or 0) + 1)
        ctl = AdaptiveK(k or 0, adaptive=adaptive)
        out, t_first = [], None
        for tok, _lp, _d in speculative_generate_step(
                mx.array(prompt), model, num_draft_tokens=max(1, k or 1), max_tokens=workload.max_tokens,
                prefill_step_size=min(rt.prefill_step_size, rt.plan.chunk_tokens), stats=st,
                controller=ctl):
            if t_first is None:
                t_first = time.perf_counter()
            out.append(int(tok))
        decode_s += time.perf_counter() - t_first
        tokens.append(out)
    n = sum(len(t) for t in tokens)
    return {"tokens": tokens, "generated": n, "decode_s": decode_s,
            "decode_tps": (n - len(tokens)) / decode_s if decode_s else None, **st.summary()}


# ----------------------------------------------------------------------------- premise
def grouped_trace(trace, group: int, accept: float | None = None, k: int | None = None,
                  seed: int = 0):
    """The trace with each sequence's decode calls regrouped: one call per layer for ``group``
    consecutive tokens (a verify pass of group - 1 drafts). With ``accept``, each pass keeps
    a geometric number of its ``k`` drafts (plus one token) and the next pass starts after
    them, so tokens after a rejection are verified again (their routing taken as the true next
    tokens' routing: an approximation). Returns (trace, decode tokens, passes)."""
    rng = np.random.default_rng(seed)
    b = tr.TraceBuilder()
    L = trace.num_layers
    tokens = passes = 0
    for s in np.unique(trace.sequence):
        calls = np.flatnonzero(trace.sequence == s)
        pre = [i for i in calls if trace.phase[i] == 0]
        dec = [i for i in calls if trace.phase[i] == 1]
        for i in pre:
            b.absorb([(int(trace.layer[i]), trace.call(i))], int(s), 0)
        # decode: calls in token order, layers 0..L-1 per token
        rows = {}  # layer -> [token rows]
        for i in dec:
            rows.setdefault(int(trace.layer[i]), []).append(trace.call(i))
        n = min(len(v) for v in rows.values()) if rows else 0
        p = 0
        while p < n:
            end = min(n, p + group)
            for layer in range(L):
                b.absorb([(layer, np.concatenate(rows[layer][p:end]))], int(s), 1)
            passes += 1
            if accept is None:
                step = end - p
            else:
                kept = 0
                while kept < min(k, end - p - 1) and rng.random() < accept:
                    kept += 1
                step = kept + 1
            tokens += min(step, n - p)
            p += step
    return b.build(dict(trace.meta)), tokens, passes


def trace_sim(trace, residencies, ks, policies, accept_by_res: dict) -> list[dict]:
    rows = []
    nbytes = float(np.mean(trace.meta["expert_nbytes"]))
    for res in residencies:
        cap = rp.capacity_for_residency(trace, res)
        for pol in policies:
            base, n0, _ = grouped_trace(trace, 1)
            r0 = rp.replay(base, pol, cap, group="slots")
            plain_dec = r0["decode_requests"] * (1 - r0["decode_hit_rate"])
            row = {"residency": res, "policy": pol, "plain_kib_per_token": plain_dec * nbytes / n0 / 1024}
            for k in ks:
                g, n, _ = grouped_trace(trace, k + 1)
                r = rp.replay(g, pol, cap, group="slots")
                row[f"k{k}_all_accepted"] = r["decode_requests"] * (1 - r["decode_hit_rate"]) * nbytes / n / 1024
                a = accept_by_res.get((res, k))
                if a is not None:
                    g, n, _ = grouped_trace(trace, k + 1, accept=a, k=k)
                    r = rp.replay(g, pol, cap, group="slots")
                    row[f"k{k}_measured_accept"] = r["decode_requests"] * (1 - r["decode_hit_rate"]) * nbytes / n / 1024
            rows.append(row)
    return rows


def premise(a) -> int:
    paths = resolve_model_paths(a.model)
    import hobbit_mlx

    m, tok = hobbit_mlx.load(paths.hobbit, expert_residency=1.0, progress=False)
    wl = make_workload(tok, n_prompts=a.prompts, prompt_tokens=a.prompt_tokens,
                       max_tokens=a.max_tokens, n_ppl=0)
    trace = tr.record(m, wl, {"model": paths.name})
    del m
    live = []
    accept = {}
    for res in a.residencies:
        for pol in a.policies:
            ref = None
            model, _tok, rt = _load(paths, exact=True, expert_residency=res, policy=pol,
                                    max_context=wl.max_context)
            for k in [0] + a.ks:
                empty_pools(rt)
                hobbit_mlx.reset_stats(model)
                r = decode_run(model, rt, wl, k=k)
                if ref is None:
                    ref = r["tokens"]
                same = r["tokens"] == ref
                row = {"residency": res, "policy": pol, "k": k, "identical": same,
                       "acceptance": r["acceptance_rate"], "tokens_per_pass": r["tokens_per_pass"],
                       "kib_per_token": r["bytes_per_token"] / 1024,
                       "draft_kib_per_token": r["draft_bytes"] / max(1, r["emitted"]) / 1024,
                       "reads_per_token": r["reads_per_token"]}
                if k:
                    accept[(res, k)] = r["acceptance_rate"] if pol == a.policies[0] else accept.get((res, k))
                live.append(row)
                print(json.dumps(row), flush=True)
            rt.close()
            del model
    costs = [pass_costs(paths, res) for res in a.residencies]
    for row in costs:
        print(json.dumps(row), flush=True)
    sim = trace_sim(trace, a.residencies, a.ks, ["runtime:" + p for p in a.policies], accept)
    for row in sim:
        print(json.dumps(row), flush=True)
    out = Path(a.out) / "speculative-premise.json"
    out.write_text(json.dumps({"live": live, "trace_sim": sim, "pass_costs": costs, "workload": wl.as_dict(),
                               "command": arguments.command(__file__, a.argv)}, indent=1))
    print(f"wrote {out}")
    return 0


def pass_costs(paths, residency: float, widths=(1, 3, 5), reps: int = 7, n: int = 10) -> dict:
    """Milliseconds of one model call on a warm cache (the same token again, its KV trimmed):
    a plain 1-token step, a draft step, and exact passes of several tokens. Reads are hits after
    the first call, so this is compute + host work: what a verify pass costs besides reads."""
    from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache

    model, tok, rt = _load(paths, exact=True, expert_residency=residency)
    ids = tok.encode("import os\nimport sys\n\ndef main(argv):\n    parser = argparse.ArgumentParser(")
    cache = make_prompt_cache(model)
    mx.eval(model(mx.array(ids)[None], cache=cache))
    y = mx.array([ids[-1]])

    def run(width, draft=False):
        times = []
        while len(times) < reps:
            with PauseWatch() as w:
                t0 = time.perf_counter()
                for _ in range(n):
                    rt.draft_only = draft
                    mx.eval(model(mx.concatenate([y] * width)[None], cache=cache))
                    rt.draft_only = False
                    trim_prompt_cache(cache, width)
                dt = (time.perf_counter() - t0) / n * 1000
            if not w.paused:
                times.append(dt)
        return statistics.median(times)

    run(1)
    out = {"residency": residency, "draft_ms": run(1, True)}
    for width in widths:
        out[f"pass_{width}_ms"] = run(width)
    rt.close()
    return out


# ----------------------------------------------------------------------------- bench
REFERENCE_DRAFT = str(Path(__file__).resolve().parents[1] / "hobbit_mlx" / "reference_draft")
CONFIGS = {  # name -> (load options, speculative: K, "adaptive" K <= 4, or None: plain)
    "exact": (dict(exact=True), None),
    "default": (dict(), None),
    "exact-spec-k2": (dict(exact=True), 2),
    "exact-spec-adaptive": (dict(exact=True), "adaptive"),
    "default-spec-adaptive": (dict(), "adaptive"),
    # a separate resident draft, at the memory of the plain configuration: its weights and KV
    # come out of the budget the pools would have had; K fixed (as mlx-lm's loop drafts) or
    # adaptive (0..4: 0 is a plain pass)
    "exact-draft-k2": (dict(exact=True, draft_model=REFERENCE_DRAFT), 2),
    "exact-draft-k3": (dict(exact=True, draft_model=REFERENCE_DRAFT), 3),
    "exact-draft-adaptive": (dict(exact=True, draft_model=REFERENCE_DRAFT), "adaptive"),
}
PLAIN = ("exact", "default")


class PauseWatch:
    """Notices when the whole process was stopped (a shared machine's jobs may be paused while
    another one benchmarks): a thread that wakes every 10 ms records the longest gap between
    wake-ups. A timed run with a gap over ``limit`` seconds is run again."""

    def __init__(self, limit: float = 0.25):
        import threading

        self.limit, self.gap, self._stop = limit, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self):
        last = time.perf_counter()
        while not self._stop.wait(0.01):
            now = time.perf_counter()
            self.gap = max(self.gap, now - last)
            last = now

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def paused(self) -> bool:
        return self.gap > self.limit


def timed_run(model, tok, rt, workload, spec, tries: int = 4) -> dict:
    """``_timed_run``, again when the process was paused during it (``PauseWatch``)."""
    for attempt in range(tries):
        with PauseWatch() as w:
            r = _timed_run(model, tok, rt, workload, spec)
        r["paused_s"], r["attempts"] = w.gap, attempt + 1
        if not w.paused:
            break
    return r


def _timed_run(model, tok, rt, workload, spec) -> dict:
    """Every prompt from empty pools, through ``hobbit_mlx.stream_generate``; decode tokens/s is
    (tokens - 1) over the time from the first token to the last, summed over prompts."""
    import hobbit_mlx

    empty_pools(rt)
    hobbit_mlx.reset_stats(model)
    rt.speculative_controller = None  # each run learns its draft length from scratch
    tokens, decode_s, drafted, accepted, passes, kc = [], 0.0, 0, 0, 0, {}
    bytes0 = rt.stats.bytes_read
    extra = {} if spec is None else dict(speculative=4 if spec == "adaptive" else spec)
    for prompt in workload.prompts:
        if spec is not None:
            rt.speculative = (extra["speculative"], spec == "adaptive")
        out, t_first = [], None
        for r in hobbit_mlx.stream_generate(model, tok, prompt, max_tokens=workload.max_tokens,
                                            **({"speculative": False} if spec is None else {})):
            if t_first is None:
                t_first = time.perf_counter()
            out.append(r.token)
        decode_s += time.perf_counter() - t_first
        tokens.append(out)
        st = rt.speculative_stats if spec is not None else None
        if st is not None:
            drafted, accepted, passes = drafted + st.drafted, accepted + st.accepted, passes + st.passes
            for k, v in st.k_counts.items():
                kc[k] = kc.get(k, 0) + v
    n = sum(len(t) - 1 for t in tokens)
    return {"tokens": tokens, "decode_tps": n / decode_s, "decode_tokens": n,
            "kib_per_token": (rt.stats.bytes_read - bytes0) / 1024 / max(1, n + len(tokens)),
            "acceptance": accepted / drafted if drafted else None,
            "tokens_per_pass": (accepted + passes) / passes if passes else None, "k_counts": kc}


@functools.lru_cache(maxsize=None)
def _draft_share(model_dir: str, context: int) -> float:
    """The memory a separate draft model takes (its weights and its KV cache for ``context``
    tokens), as a share of the 4-bit experts: the pools give that up, so the draft runs at the
    memory of the plain configuration. Measured once per run."""
    import hobbit_mlx
    from hobbit_mlx.budget import kv_bytes_for
    from hobbit_mlx.loader import runtime_of
    from hobbit_mlx.measure import kv_bytes_by_layer
    from hobbit_mlx.speculative import load_draft

    draft, _, weights = load_draft(REFERENCE_DRAFT)
    kv = kv_bytes_by_layer(draft)
    model, _ = hobbit_mlx.load(model_dir, expert_residency=0.0, progress=False)
    all_high = runtime_of(model).plan.all_high_bytes
    runtime_of(model).close()
    return (weights + kv_bytes_for(context, sum(kv), max(kv))) / all_high


def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _summed(dicts):
    out = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return dict(sorted(out.items()))


def bench(a) -> int:
    import hobbit_mlx
    from bench.harness_runs import Baseline
    from hobbit_mlx.storage import mac_like

    paths = resolve_model_paths(a.model)
    base = Baseline(paths)
    _m, tok = hobbit_mlx.load(paths.hobbit, expert_residency=0.0, progress=False)
    wl = make_workload(tok, n_prompts=a.prompts, prompt_tokens=a.prompt_tokens,
                       max_tokens=a.max_tokens, n_ppl=0)
    del _m
    b = base.timing_pass(wl)
    storage = None
    if a.storage == "mac-like":
        topk = topk_bytes_per_token(paths.hobbit)
        storage = mac_like(topk, 1.0 / b["decode_tps"])
        print(f"[bench] mac-like storage: {storage.describe()}; mlx-lm {b['decode_tps']:.1f} tok/s",
              flush=True)
    base.close()
    configs = [c for c in a.configs]
    results = {}
    for res in a.residencies:
        models = {}
        for name in configs:
            kw, spec = CONFIGS[name]
            share = (max(0.0, res - _draft_share(str(paths.hobbit), wl.max_context))
                     if "draft_model" in kw else res)
            m, t, rt = _load(paths, expert_residency=share, max_context=wl.max_context,
                             simulated_storage=storage, **kw)
            models[name] = (m, t, rt, spec)
        for rnd in range(a.rounds):
            order = configs[rnd % len(configs):] + configs[:rnd % len(configs)]
            for name in order:
                m, t, rt, spec = models[name]
                r = timed_run(m, t, rt, wl, spec)
                results.setdefault((res, name), []).append(r)
                print(json.dumps({"residency": res, "config": name, "round": rnd,
                                  **{k: v for k, v in r.items() if k != "tokens"}}), flush=True)
        for name in configs:
            models[name][2].close()
        del models
    rows = []
    for res in a.residencies:
        med = {n: statistics.median(r["decode_tps"] for r in results[(res, n)]) for n in configs}
        best_plain = max((n for n in configs if n in PLAIN), key=med.get, default=None)
        exact_tokens = results.get((res, "exact"), [{}])[0].get("tokens")
        for n in configs:
            rs = results[(res, n)]
            rows.append({
                "residency": res, "config": n, "decode_tps_median": med[n],
                "decode_tps_runs": [r["decode_tps"] for r in rs],
                "x_best_plain": med[n] / med[best_plain] if best_plain else None,
                "best_plain": best_plain,
                "x_exact": med[n] / med["exact"] if "exact" in med else None,
                "acceptance": _median([r["acceptance"] for r in rs]),
                "tokens_per_pass": _median([r["tokens_per_pass"] for r in rs]),
                "kib_per_token": statistics.median(r["kib_per_token"] for r in rs),
                "k_counts": _summed([r["k_counts"] for r in rs]),
                "same_as_exact": None if exact_tokens is None else rs[0]["tokens"] == exact_tokens})
    name = a.name or f"speculative-{paths.name}-{a.storage}"
    out = Path(a.out)
    (out / f"{name}.json").write_text(json.dumps({"rows": rows, "mlx_lm_decode_tps": b["decode_tps"],
                                                  "storage": storage.describe() if storage else a.storage,
                                                  "workload": wl.as_dict(), "rounds": a.rounds,
                                                  "command": arguments.command(__file__, a.argv)}, indent=1))
    lines = [f"# Self-speculative decoding: {paths.name}, {a.storage} storage", "",
             "Command:", "", "```", arguments.command(__file__, a.argv), "```", "",
             f"- storage: {storage.describe() if storage else a.storage}; mlx-lm resident "
             f"{b['decode_tps']:.1f} tok/s in this process",
             f"- workload: {len(wl.prompts)} prompts x {wl.max_tokens} greedy tokens; "
             f"{a.rounds} rounds, configurations alternating, each run from empty pools; "
             "medians", "",
             "| residency | config | decode tok/s (median) | x best plain | x exact plain | "
             "acceptance | tokens/pass | KiB read/token (prefill included) | draft lengths used "
             "(passes, all rounds) | tokens = exact |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        f = lambda x, p="{:.2f}": "n/a" if x is None else p.format(x)  # noqa: E731
        lines.append(f"| {r['residency']:.1%} | {r['config']} | {r['decode_tps_median']:.1f} | "
                     f"{f(r['x_best_plain'])} ({r['best_plain']}) | {f(r['x_exact'])} | "
                     f"{f(r['acceptance'])} | {f(r['tokens_per_pass'])} | {r['kib_per_token']:.0f} | "
                     f"{r['k_counts'] or '-'} | {r['same_as_exact']} |")
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def _ints(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        out = []
    if not out or min(out) < 1:
        raise arguments.Bad(f"draft lengths of 1 or more, comma-separated, not {text!r}")
    return out


@arguments.refuse_bad_input
def main(argv=None) -> int:
    from hobbit_mlx.policies import POLICIES

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("mode", choices=["premise", "costs", "bench"])
    p.add_argument("--model", default=None, type=arguments.model_dir)
    p.add_argument("--residencies", type=arguments.residencies, default=[0.5, 0.25, 0.125])
    p.add_argument("--ks", type=_ints, default=[1, 2, 4],
                   help="draft lengths K, for `premise` only (`bench` takes its draft lengths "
                        "from --configs: exact-spec-k2 drafts 2, the adaptive ones 0..4, ...)")
    p.add_argument("--policies", type=lambda s: [x for x in s.split(",") if x],
                   default=["seqfreq", "lru"], help="cache policies, for `premise` only")
    p.add_argument("--prompts", type=int, default=DEFAULT_WORKLOAD["n_prompts"])
    p.add_argument("--prompt-tokens", type=int, default=DEFAULT_WORKLOAD["prompt_tokens"])
    p.add_argument("--max-tokens", type=int, default=DEFAULT_WORKLOAD["max_tokens"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--configs", type=lambda s: [x for x in s.split(",") if x], default=list(CONFIGS),
                   help=f"for `bench`: {', '.join(CONFIGS)} (default: all)")
    p.add_argument("--storage", choices=["mac-like", "warm"], default="mac-like")
    p.add_argument("--name", default=None)
    p.add_argument("--out", default=str(RESULTS))
    a = p.parse_args(argv)
    a.argv = argv
    unknown = [c for c in a.configs if c not in CONFIGS]
    if unknown or not a.configs:
        p.error(f"--configs: unknown configuration(s) {unknown}; known: {list(CONFIGS)}")
    unknown = [x for x in a.policies if x not in POLICIES]
    if unknown or not a.policies:
        p.error(f"--policies: unknown cache policies {unknown}; choose from {sorted(POLICIES)}")
    arguments.out_dir(p, a.out)  # (before the run, not after it)
    if a.mode == "premise":
        return premise(a)
    if a.mode == "costs":
        rows = []
        for res in a.residencies:
            rows.append(pass_costs(resolve_model_paths(a.model), res))
            print(json.dumps(rows[-1]), flush=True)
        (Path(a.out) / "speculative-pass-costs.json").write_text(json.dumps(
            {"rows": rows, "command": arguments.command(__file__, a.argv)}, indent=1))
        return 0
    return bench(a)


if __name__ == "__main__":
    sys.exit(main())
