#!/usr/bin/env python3
"""How far the eviction policy is from Belady's *with the same prefetches*.

    python bench/prefetch_replay.py [--residencies 0.5,0.25,0.125] [--out bench/results]

``bench/replay.py`` compares policies on a demand-only trace, where Belady is the optimum of a
cache that reads only what is asked for. With prefetch on, the cache also takes in guesses, so
that comparison says little about the eviction policy the defaults use. This script records, from
a live run of the ``prefetch`` configuration (exact, LRU, 2× top-k one layer ahead, leading
layers kept) on the harness's workload, every event the cache sees:

* a layer call's fetch groups (demand), and
* each prediction (the experts prefetch guessed for the next layer).

It then replays them through caches of the same size under the runtime's mechanics. Predicted
experts are held until their layer has run: a prediction never evicts a held expert, and a demand
miss takes a held slot only when nothing else is free. The eviction choice comes from

* the runtime's own policy (``lru`` with the leading layers kept, as the defaults use), and
* Belady: evict the expert whose next *demand* lies farthest ahead.

Prefetch reads land at once in the replay (no timing), so the replayed LRU rate is close to the
measured one but not equal.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter

if __package__ in (None, ""):
    import _path  # noqa: F401  (repository root on sys.path, see bench/_path.py)

import numpy as np  # noqa: E402

from bench import arguments  # noqa: E402
from bench.replay import Belady  # noqa: E402

HIGH = "high"


def record_events(model, workload) -> list[tuple]:
    """Run ``workload`` through ``model`` (loaded with prefetch on) and return its cache events:
    ("seq",), ("demand", layer, keys, phase) per fetch group, ("call_end", layer),
    ("predict", layer, keys).

    Spies: ``hobbit_mlx.offload.Fetch`` (one per fetch group of a synced layer call; the experts it
    took), the prefetcher's ``_issue`` (a prediction) and ``consume`` (the layer's predictions
    released), and the runtime's ``defer`` (a lazy call of a fully resident layer: all hits; its
    router indices are read once the run is over, so the spy adds no host sync)."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    from hobbit_mlx import offload
    from hobbit_mlx.loader import runtime_of

    rt = runtime_of(model)
    pf = rt.prefetcher
    if pf is None:
        raise ValueError("record_events needs a model loaded with prefetch on (prefetch_layers > 0)")
    events: list[tuple] = []
    fetch_init = offload.Fetch.__init__
    phase = [0]

    def spy_fetch(fetch, runtime, layer, experts, precision=HIGH):
        fetch_init(fetch, runtime, layer, experts, precision)
        if runtime is rt and len(fetch.experts):  # the experts this group took (the rest: later)
            events.append(("demand", layer.layer,
                           [(layer.layer, int(e), HIGH) for e in fetch.experts], phase[0]))

    def spy_defer(layer, indices):
        events.append(("lazy", layer, indices, phase[0]))  # resolved into a demand below
        return defer(layer, indices)

    def spy_consume(layer, needed):
        events.append(("call_end", layer))  # this layer's predictions are released after it runs
        return consume(layer, needed)

    def spy_issue(switch, distance, ind, weights):
        lid = switch.layer.layer
        events.append(("predict", lid, sorted({(lid, int(e), HIGH) for e in ind.ravel()})))
        return issue(switch, distance, ind, weights)

    # Instance attributes shadow the methods (the runtime calls pf.consume, self._issue, ...).
    issue, consume, defer = pf._issue, pf.consume, rt.defer
    offload.Fetch.__init__ = spy_fetch
    pf._issue, pf.consume, rt.defer = spy_issue, spy_consume, spy_defer
    try:
        for prompt in workload.prompts:
            rt.new_sequence()
            events.append(("seq",))
            phase[0] = 0
            for _ in generate_step(mx.array(prompt), model, max_tokens=workload.max_tokens,
                                   prefill_step_size=rt.prefill_step_size):
                phase[0] = 1
        rt.settle()
    finally:
        offload.Fetch.__init__ = fetch_init
        for obj, name in ((pf, "_issue"), (pf, "consume"), (rt, "defer")):
            obj.__dict__.pop(name, None)
    for i, ev in enumerate(events):
        if ev[0] == "lazy":
            experts = np.unique(np.array(ev[2]))
            events[i] = ("demand", ev[1], [(ev[1], int(e), HIGH) for e in experts], ev[3])
    return _in_runtime_order(events)


def _in_runtime_order(events: list[tuple]) -> list[tuple]:
    """The runtime releases a layer's holds once that layer's call is built: after its fetch and
    the predictions it issued behind its demand reads; the spy saw the release
    (``Prefetcher.consume``) before both. Move each release after its layer's demand groups and
    the predictions that follow them."""
    out, pending, fetched = [], None, False
    for ev in events:
        if pending is not None:
            if ev[0] == "demand" and ev[1] == pending[1]:
                fetched = True
            elif (fetched and ev[0] != "predict") or ev[0] in ("call_end", "seq"):
                out.append(pending)
                pending = None
        if ev[0] == "call_end":
            pending, fetched = ev, False
            continue
        out.append(ev)
    if pending is not None:
        out.append(pending)
    return out


def _demand_steps(events: list[tuple], uncovered_only: bool) -> list[tuple]:
    """One step per demand group, in the ``bench.replay`` step format. With ``uncovered_only``,
    a step keeps only the experts that the layer's latest prediction did not name: an expert
    that prefetch will bring back before its next use costs nothing to evict."""
    steps, predicted = [], {}
    for i, ev in enumerate(events):
        if ev[0] == "predict":
            predicted[ev[1]] = set(ev[2])
        elif ev[0] == "demand":
            keys = ev[2]
            if uncovered_only:
                keys = [k for k in keys if k not in predicted.get(ev[1], ())]
            steps.append((0, ev[1], ev[3], keys, i))
        elif ev[0] == "call_end":
            predicted.pop(ev[1], None)
    return steps


def replay_with_prefetch(events: list[tuple], policy, capacity: int) -> dict:
    """Hits and misses of the demand requests in ``events`` under ``policy`` in a cache of
    ``capacity`` experts: a runtime policy object, "belady" (evict the farthest next demand) or
    "belady-uncovered" (the farthest next demand that no prediction covers)."""
    belady = policy in ("belady", "belady-uncovered")
    pol = Belady(_demand_steps(events, policy == "belady-uncovered")) if belady else policy
    resident: set = set()
    held: Counter = Counter()
    held_by_layer: dict[int, list] = {}
    pinned: set = set()
    free = lambda k: k in resident and k not in pinned and not held[k]  # noqa: E731
    unpinned = lambda k: k in resident and k not in pinned  # noqa: E731
    stats = Counter()
    step = -1
    on_layer = getattr(pol, "on_layer", None)

    def insert(key, prefetched: bool) -> None:
        while len(resident) >= capacity:
            try:
                victim = pol.victim(free)
            except LookupError:
                if prefetched:
                    stats["prefetch_dropped"] += 1
                    return
                try:
                    victim = pol.victim(unpinned)
                except LookupError:
                    return
            resident.discard(victim)
            pol.on_evict(victim)
        resident.add(key)
        hook = getattr(pol, "on_prefetch", None) if prefetched else None
        (hook or pol.on_insert)(key)

    last_layer = None
    for ev in events:
        kind = ev[0]
        if kind == "seq":
            if not belady:
                pol.reset()
        elif kind == "demand":
            _, layer, keys, phase = ev
            step += 1
            if belady:
                pol.advance(step)
            elif on_layer is not None and layer != last_layer:
                on_layer(layer)
            last_layer = layer
            pinned = set(keys)
            for key in keys:
                if key in resident:
                    stats[f"hits{phase}"] += 1
                    pol.on_hit(key)
            for key in keys:
                if key not in resident:
                    stats[f"misses{phase}"] += 1
                    insert(key, prefetched=False)
            # (they stay pinned until the call ends: the predictions it issues behind its demand
            # reads may not evict what its graph reads)
        elif kind == "call_end":
            pinned = set()
            for key in held_by_layer.pop(ev[1], []):
                held[key] -= 1
        elif kind == "predict":
            _, layer, keys = ev
            for key in keys:
                if key not in resident:
                    stats["prefetch_reads"] += 1
                    insert(key, prefetched=True)
                held[key] += 1
                held_by_layer.setdefault(layer, []).append(key)
    hits = stats["hits0"] + stats["hits1"]
    misses = stats["misses0"] + stats["misses1"]
    return {"hits": hits, "misses": misses, "hit_rate": hits / max(1, hits + misses),
            "prefetch_reads": stats["prefetch_reads"],
            "prefetch_dropped": stats["prefetch_dropped"]}


@arguments.refuse_bad_input
def main(argv=None) -> int:
    import hobbit_mlx
    from bench.harness import CONFIGS
    from bench.harness_runs import _warmup, empty_pools, high_pools
    from bench.workload import DEFAULT_WORKLOAD, RESULTS, make_workload, resolve_model_paths
    from hobbit_mlx.loader import runtime_of
    from hobbit_mlx.policies import POLICIES, make_policy

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--residencies", default="0.5,0.25,0.125", type=arguments.residencies)
    ap.add_argument("--config", default="prefetch", help="harness configuration to record")
    ap.add_argument("--others", default="seqfreq,hobbit",
                    help="other runtime policies to replay on the same events (same kept layers)")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    if args.config not in dict(CONFIGS):
        ap.error(f"unknown configuration {args.config!r}; known: {[n for n, _ in CONFIGS]}")
    unknown = [n for n in args.others.split(",") if n and n not in POLICIES]
    if unknown:
        ap.error(f"--others: unknown cache policies {unknown}; choose from {sorted(POLICIES)}")
    out = arguments.out_dir(ap, args.out)
    paths = resolve_model_paths(None, progress=False)
    rows = []
    for residency in args.residencies:
        # every prediction read (cost-aware prefetch, on by default, leaves out guesses the
        # storage has no idle time for; the replay reads them all, so the run must too)
        kwargs = {**dict(CONFIGS)[args.config], "expert_residency": residency,
                  "prefetch_cost_aware": False}
        model, tok = hobbit_mlx.load(paths.hobbit, progress=False, **kwargs)
        rt = runtime_of(model)
        workload = make_workload(tok, **DEFAULT_WORKLOAD)
        _warmup(model, rt.prefill_step_size)
        empty_pools(rt)
        hobbit_mlx.reset_stats(model)
        events = record_events(model, workload)
        measured = hobbit_mlx.offload_stats(model)
        capacity = sum(pool.slots for pool in high_pools(rt))  # 4-bit slots
        shallow = int(getattr(rt.cache.policy, "layers", 0))
        inner = getattr(rt.cache.policy, "inner", rt.cache.policy)
        def replayed(name: str) -> dict:
            policy = make_policy(name, shallow_layers=shallow, num_layers=len(rt.manifest.layers))
            return replay_with_prefetch(events, policy, capacity)

        ours = replayed(inner.name)
        others = {name: replayed(name)["hit_rate"] for name in args.others.split(",") if name}
        oracles = {name: replay_with_prefetch(events, name, capacity)
                   for name in ("belady", "belady-uncovered")}
        best = max(oracles.values(), key=lambda r: r["hit_rate"])
        rows.append({"residency": residency, "capacity": int(capacity),
                     "policy": rt.cache.policy.name, "measured": measured["hit_rate"],
                     "replayed": ours["hit_rate"], "belady": oracles["belady"]["hit_rate"],
                     "belady_uncovered": oracles["belady-uncovered"]["hit_rate"],
                     "gap_points": 100 * (best["hit_rate"] - ours["hit_rate"]),
                     "others": others, "prefetch_reads": ours["prefetch_reads"],
                     "belady_prefetch_reads": best["prefetch_reads"]})
        rt.close()
        print(f"[prefetch_replay] {100 * residency:g}%: measured {measured['hit_rate']:.3f}, "
              f"replayed {ours['hit_rate']:.3f}, Belady {oracles['belady']['hit_rate']:.3f} / "
              f"{oracles['belady-uncovered']['hit_rate']:.3f}", file=sys.stderr)
    lines = [f"# Eviction policy vs Belady, same prefetches ({args.config})", "",
             f"Command: `{arguments.command(__file__, argv)}`", "",
             "Belady evicts the expert whose next demand is farthest; *uncovered* counts only the "
             "demands that no prediction names (prefetch brings the others back anyway). Neither "
             "is a proven optimum with prefetch; gap = the better of the two minus the replayed "
             "policy.", "",
             "| residency | capacity (experts) | policy | measured served | replayed | "
             "Belady | Belady, uncovered | gap | other policies, replayed |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {100 * r['residency']:g}% | {r['capacity']} | {r['policy']} | "
                     f"{r['measured']:.3f} | {r['replayed']:.3f} | {r['belady']:.3f} | "
                     f"{r['belady_uncovered']:.3f} | {r['gap_points']:+.1f} pp | "
                     + ", ".join(f"{n} {v:.3f}" for n, v in r["others"].items()) + " |")
    for suffix, text in (("md", "\n".join(lines) + "\n"), ("json", json.dumps(rows, indent=1))):
        path = out / f"prefetch-replay-{args.config}.{suffix}"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)  # never a half-written result
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
