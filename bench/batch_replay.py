#!/usr/bin/env python3
"""What decoding several sequences in one batch would read: a routing trace's sequences replayed
together, B at a time, through the same expert cache.

    python bench/trace.py --held-out 8 --prompt-tokens 64 --max-tokens 128 --out T.npz
    python bench/batch_replay.py T.npz [--batch 1,2,4,8] [--residency 0.5,0.25,0.125] \
        [--policies lru,runtime:seqfreq] [--json OUT]

A batched decode step (mlx_lm.server's ``--decode-concurrency``, mlx-lm's ``batch_generate``)
runs each MoE layer once on the B sequences' tokens, so it computes and must hold the union of
their experts. Under a storage-bound decode (a model larger than memory) what counts is what that
union misses: this replays the trace's decode calls with the calls of B sequences at the same step
merged into one, and reports per generated token the experts a step computes and the misses it
reads, against decoding the same sequences one after another (B = 1) with the same cache. "read
bound vs B=1" is the speed ratio when reads dominate (misses per token at B = 1 over at B): under a
12:1 read-to-compute ratio the reads are most of a step. Not counted, in favour of batching: the B
KV caches that come out of the same budget (fewer experts resident), and a sequence waiting for
the others' reads.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    import _path  # noqa: F401  (repository root on sys.path, see bench/_path.py)

from bench import arguments  # noqa: E402
from bench.replay import capacity_for_residency, replay  # noqa: E402
from bench.trace import Trace, load  # noqa: E402

DECODE = 1


def batched(trace: Trace, batch: int) -> Trace:
    """The trace's decode calls with the calls of ``batch`` sequences at the same step merged
    (their tokens' rows in one call), one merged sequence per group of ``batch`` sequences; the
    sequences left over when they do not divide into groups, and steps past the shortest
    sequence, are dropped (every B is then compared on the same tokens when B divides the
    sequence count). Prefill calls are left out: each request prefills on its own."""
    decode = np.nonzero(trace.phase == DECODE)[0]
    sequences = sorted(set(trace.sequence[decode].tolist()))
    calls = {s: decode[trace.sequence[decode] == s] for s in sequences}
    steps = min(len(c) for c in calls.values()) if calls else 0
    layer, offsets, rows, sequence = [], [0], [], []
    for g in range(0, len(sequences) // batch * batch, batch):
        group = [calls[s] for s in sequences[g:g + batch]]
        for j in range(steps):
            layers = {int(trace.layer[c[j]]) for c in group}
            if len(layers) != 1:
                raise ValueError(f"the sequences' decode calls {j} run different layers {layers}: "
                                 "not a trace of one model's decode steps")
            merged = np.concatenate([trace.call(c[j]) for c in group])
            layer.append(layers.pop())
            rows.append(merged)
            offsets.append(offsets[-1] + len(merged))
            sequence.append(g // batch)
    experts = np.concatenate(rows) if rows else np.zeros((0, trace.experts.shape[1]), np.int32)
    return Trace(np.array(layer, np.int32), np.array(offsets, np.int64), experts.astype(np.int32),
                 np.array(sequence, np.int32), np.full(len(layer), DECODE, np.uint8), None,
                 dict(trace.meta))


def measure(trace: Trace, batches: list[int], residencies: list[float],
            policies: list[str]) -> list[dict]:
    """One row per (residency, policy, B): experts computed and missed per generated token and
    per MoE layer, and the read-bound speed against B = 1 on the same cache."""
    out = []
    merged = {b: batched(trace, b) for b in sorted(set(batches) | {1})}
    for res in residencies:
        capacity = capacity_for_residency(trace, res)
        for policy in policies:
            alone = None
            for b in sorted(set(batches) | {1}):
                t = merged[b]
                layer_tokens = len(t.experts)  # (one row per token per layer call)
                if not layer_tokens:
                    raise ValueError("the trace has no decode steps to batch")
                computed = sum(len(np.unique(t.call(i))) for i in range(len(t)))
                misses = replay(t, policy, capacity)["misses"]
                row = {"residency": res, "capacity": capacity, "policy": policy, "batch": b,
                       "computed_per_token": computed / layer_tokens,
                       "misses_per_token": misses / layer_tokens}
                alone = row if b == 1 else alone
                row["read_bound_vs_1"] = (alone["misses_per_token"] / row["misses_per_token"]
                                          if row["misses_per_token"] else float("inf"))
                if b in batches:
                    out.append(row)
    return out


def format_table(rows: list[dict], k: int) -> str:
    lines = ["| residency | policy | B | experts computed per token per layer (top-k "
             f"{k}) | misses per token per layer | read bound vs B=1 |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {100 * r['residency']:g}% | {r['policy']} | {r['batch']} | "
                     f"{r['computed_per_token']:.2f} | {r['misses_per_token']:.2f} | "
                     f"{r['read_bound_vs_1']:.2f}× |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("trace", help="a .npz written by bench/trace.py")
    p.add_argument("--batch", default="1,2,4,8", type=arguments.counts,
                   help="sequences per batch, comma-separated")
    p.add_argument("--residency", default="0.5,0.25,0.125", type=arguments.residencies,
                   help="cache sizes as fractions of all experts")
    p.add_argument("--policies", default="lru,runtime:seqfreq",
                   help="as bench/replay.py takes them")
    p.add_argument("--json", default=None, help="also write the rows as JSON here")
    a = p.parse_args(argv)
    batches, residencies = a.batch, a.residency
    if not Path(a.trace).is_file():
        p.error(f"no trace file {a.trace} (bench/trace.py writes one)")
    try:
        trace = load(a.trace)
    except (OSError, ValueError, KeyError, EOFError):
        p.error(f"{a.trace} is not a routing trace (an .npz that bench/trace.py writes)")
    sequences = len(set(trace.sequence[trace.phase == DECODE].tolist()))
    if max(batches) > sequences:
        p.error(f"--batch {max(batches)}: the trace decodes {sequences} sequences")
    try:
        rows = measure(trace, batches, residencies, [x for x in a.policies.split(",") if x])
    except ValueError as e:  # an unknown policy, or a trace without decode steps
        p.error(str(e))
    print(f"trace {a.trace}: {sequences} sequences decoded; routing: "
          f"{trace.meta.get('routing', 'unknown')}")
    print(format_table(rows, trace.experts.shape[1]))
    if a.json:
        Path(a.json).write_text(json.dumps({"trace": str(a.trace), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
