#!/usr/bin/env python3
"""Record a routing trace: which experts every MoE layer call chose, for a workload.

    python bench/trace.py [--model PATH] [--out bench/results/tmp/trace.npz] \
        [--prompts 2 --prompt-tokens 96 --max-tokens 128] [--quick]

The runtime appends ``(layer, indices[tokens, k])`` -- later also gate weights as a third element --
to ``runtime_of(model).trace`` for every MoE layer call; this script runs the harness's workload
(the same held-out prompts, prefill + greedy decode) through the offloaded model with that hook on
and saves the calls as an ``.npz``:

* ``layer``   int32 [calls]          MoE layer index of each call, in execution order
* ``offsets`` int64 [calls + 1]      rows of ``experts`` belonging to each call
* ``experts`` int32 [tokens, k]      chosen experts, one row per token of the call
* ``weights`` float32 [tokens, k]    gate weights (only when the runtime records them)
* ``sequence`` int32 [calls]         which prompt the call belongs to
* ``phase``   uint8 [calls]          0 = prefill, 1 = decode
* ``meta``    JSON string            model, num_layers, num_experts, experts_per_token,
                                     expert_nbytes per layer, how the runtime splits a call
                                     into fetch groups ("slots"), ...

Routing does not depend on the cache in exact mode, so one trace serves every cache size;
``bench/replay.py`` evaluates cache policies on it offline.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    import _path  # noqa: F401  (repository root on sys.path, see bench/_path.py)

from bench.arguments import refuse_bad_input  # noqa: E402


@dataclass
class Trace:
    layer: np.ndarray
    offsets: np.ndarray
    experts: np.ndarray
    sequence: np.ndarray
    phase: np.ndarray
    weights: np.ndarray | None = None
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.layer)

    def call(self, i: int) -> np.ndarray:
        return self.experts[self.offsets[i]:self.offsets[i + 1]]

    @property
    def num_layers(self) -> int:
        return int(self.meta.get("num_layers", int(self.layer.max()) + 1 if len(self.layer) else 0))

    @property
    def num_experts(self) -> int:
        return int(self.meta.get("num_experts", int(self.experts.max()) + 1 if self.experts.size else 0))

    def summary(self) -> dict:
        return {"calls": len(self), "tokens_routed": int(self.experts.shape[0]),
                "sequences": int(len(np.unique(self.sequence))) if len(self) else 0,
                "prefill_calls": int((self.phase == 0).sum()), "decode_calls": int((self.phase == 1).sum()),
                "has_weights": self.weights is not None}


class TraceBuilder:
    """Collects the runtime's trace entries, tagging them with sequence and phase."""

    def __init__(self) -> None:
        self.layers: list[int] = []
        self.rows: list[np.ndarray] = []
        self.weights: list[np.ndarray | None] = []
        self.sequence: list[int] = []
        self.phase: list[int] = []

    def absorb(self, entries: list, sequence: int, phase: int) -> None:
        """Move the runtime's new entries (2- or 3-tuples) into the builder; empties ``entries``."""
        for entry in entries:
            layer, idx = entry[0], np.asarray(entry[1])
            w = np.asarray(entry[2], dtype=np.float32) if len(entry) > 2 and entry[2] is not None else None
            idx = idx.reshape(-1, idx.shape[-1])
            self.layers.append(int(layer))
            self.rows.append(idx.astype(np.int32))
            self.weights.append(None if w is None else w.reshape(idx.shape))
            self.sequence.append(sequence)
            self.phase.append(phase)
        entries.clear()

    def build(self, meta: dict) -> Trace:
        n = len(self.layers)
        offsets = np.zeros(n + 1, dtype=np.int64)
        if n:
            offsets[1:] = np.cumsum([len(r) for r in self.rows])
        k = self.rows[0].shape[1] if n else int(meta.get("experts_per_token", 1))
        experts = np.concatenate(self.rows) if n else np.zeros((0, k), np.int32)
        weights = None
        if n and all(w is not None for w in self.weights):
            weights = np.concatenate(self.weights).astype(np.float32)
        return Trace(np.asarray(self.layers, np.int32), offsets, experts,
                     np.asarray(self.sequence, np.int32), np.asarray(self.phase, np.uint8),
                     weights, dict(meta))


def runtime_meta(rt) -> dict:
    """Facts about the model's store that replay needs to map bytes onto expert counts."""
    m = rt.manifest
    high = [l.precisions["high"] for l in m.layers]
    nbytes = [e.expert_nbytes for e in high]
    # A call runs as one group unless its misses find no slot: the rest then continue in further
    # groups, each after the previous one was evaluated ("slots": replay.py splits calls so).
    group = "slots"
    return {"num_layers": len(m.layers), "num_experts": int(m.num_experts),
            "experts_per_layer": [int(l.num_experts) for l in m.layers],
            "experts_per_token": int(m.experts_per_token), "expert_nbytes": nbytes,
            "expert_bytes_high": int(m.expert_bytes("high")), "fetch_group": group,
            "model_type": m.model_type}


def save(trace: Trace, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = dict(layer=trace.layer, offsets=trace.offsets, experts=trace.experts,
                  sequence=trace.sequence, phase=trace.phase, meta=np.array(json.dumps(trace.meta)))
    if trace.weights is not None:
        arrays["weights"] = trace.weights
    np.savez_compressed(path, **arrays)
    return path


def load(path: str | Path) -> Trace:
    with np.load(path, allow_pickle=False) as z:
        weights = z["weights"] if "weights" in z.files else None
        return Trace(z["layer"], z["offsets"], z["experts"], z["sequence"], z["phase"], weights,
                     json.loads(str(z["meta"])))


def from_calls(calls: list, *, sequence: list[int] | None = None, meta: dict | None = None) -> Trace:
    """A trace from ``[(layer, experts[tokens, k]) ...]`` (hand-made traces, tests)."""
    b = TraceBuilder()
    for i, c in enumerate(calls):
        idx = np.asarray(c[1])
        if idx.ndim == 1:
            idx = idx[None]
        b.absorb([(c[0], idx) + tuple(c[2:])], sequence[i] if sequence else 0, 1 if len(idx) == 1 else 0)
    return b.build(meta or {})


def record(model, workload, meta: dict | None = None) -> Trace:
    """Run the workload's prompts (prefill + greedy decode) with the runtime's trace hook on."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    from hobbit_mlx.loader import runtime_of

    rt = runtime_of(model)
    builder = TraceBuilder()
    rt.trace = []
    try:
        for s, prompt in enumerate(workload.prompts):
            if hasattr(rt, "new_sequence"):
                rt.new_sequence()
            n = 0
            for _tok, _ in generate_step(mx.array(prompt), model, max_tokens=workload.max_tokens,
                                         prefill_step_size=rt.prefill_step_size):
                if n == 0:
                    builder.absorb(rt.trace, s, 0)  # prefill (and the first decode step's routing)
                n += 1
            builder.absorb(rt.trace, s, 1)
    finally:
        rt.trace = None
    return builder.build({**runtime_meta(rt), **(meta or {})})


def record_forced(model, pieces: list[list[int]], prompt_tokens: int,
                  meta: dict | None = None) -> Trace:
    """Teacher-forced routing on held-out text: prefill ``prompt_tokens`` of each piece, then feed
    its true tokens one at a time (what ``bench/forced_decode.py`` times). Held-out text routes
    less repetitively than the model's own greedy text, so its traces are the harder test."""
    from bench.forced_decode import forced_decode
    from hobbit_mlx.loader import runtime_of

    rt = runtime_of(model)
    builder = TraceBuilder()
    rt.trace = []
    try:
        for s, piece in enumerate(pieces):
            forced_decode(model, piece, prompt_tokens,
                          before_prompt=lambda n: rt.new_sequence(0, prompt_tokens, n - prompt_tokens))
            calls = rt.trace  # the prompt's calls route prompt_tokens rows per MoE layer
            rows = np.cumsum([len(c[1]) for c in calls])
            n_prefill = int(np.searchsorted(rows, prompt_tokens * len(rt.layers), side="right"))
            builder.absorb(calls[:n_prefill], s, 0)
            builder.absorb(calls[n_prefill:], s, 1)
            calls.clear()
    finally:
        rt.trace = None
    return builder.build({**runtime_meta(rt), **(meta or {})})


@refuse_bad_input
def main(argv=None) -> int:
    import hobbit_mlx
    from bench import arguments
    from bench.workload import DEFAULT_WORKLOAD, QUICK_WORKLOAD, TMP, make_workload, resolve_model_paths

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, type=arguments.model_dir,
                   help="mlx-lm checkpoint or hobbit dir (default: the reference model, else the "
                        "tiny default)")
    p.add_argument("--out", default=str(TMP / "trace.npz"),
                   help="the .npz to write (default: bench/results/tmp/trace.npz, or "
                        "$HOBBIT_BENCH_TMP/trace.npz)")
    p.add_argument("--prompts", type=int, default=DEFAULT_WORKLOAD["n_prompts"])
    p.add_argument("--prompt-tokens", type=int, default=DEFAULT_WORKLOAD["prompt_tokens"])
    p.add_argument("--max-tokens", type=int, default=DEFAULT_WORKLOAD["max_tokens"])
    p.add_argument("--quick", action="store_true", help="1 prompt of 32 tokens, 16 decoded")
    p.add_argument("--held-out", type=int, default=0, metavar="N",
                   help="teacher-forced decoding of N held-out pieces (--prompt-tokens, then "
                   "--max-tokens true tokens; as bench/forced_decode.py) instead of greedy decoding")
    p.add_argument("--skip", type=int, default=0,
                   help="with --held-out: leave out the first SKIP pieces (those the benchmark decodes)")
    a = p.parse_args(argv)
    for flag, value, least in (("--prompts", a.prompts, 1), ("--prompt-tokens", a.prompt_tokens, 1),
                               ("--max-tokens", a.max_tokens, 1), ("--held-out", a.held_out, 0),
                               ("--skip", a.skip, 0)):
        if value < least:
            p.error(f"{flag} must be at least {least}, not {value}")
    arguments.out_dir(p, a.out, file=True)
    if a.quick:
        q = QUICK_WORKLOAD
        a.prompts, a.prompt_tokens, a.max_tokens = q["n_prompts"], q["prompt_tokens"], q["max_tokens"]
    paths = resolve_model_paths(a.model)
    model, tok = hobbit_mlx.load(paths.hobbit, expert_residency=1.0, progress=False)
    t0 = time.perf_counter()
    meta = {"model": paths.name, "routing": paths.routing}
    if a.held_out:
        from bench.forced_decode import text_pieces
        pieces = text_pieces(tok, a.skip + a.held_out, a.prompt_tokens + a.max_tokens)[a.skip:]
        tr = record_forced(model, pieces, a.prompt_tokens, {**meta, "workload": {
            "held_out": a.held_out, "skip": a.skip, "prompt_tokens": a.prompt_tokens,
            "max_tokens": a.max_tokens}})
        how = "teacher-forced"
    else:
        wl = make_workload(tok, n_prompts=a.prompts, prompt_tokens=a.prompt_tokens,
                           max_tokens=a.max_tokens, n_ppl=0)
        tr = record(model, wl, {**meta, "workload": wl.as_dict()})
        how = "greedy"
    out = save(tr, a.out)
    print(f"{out}: {tr.summary()} in {time.perf_counter() - t0:.1f}s ({how}; routing: "
          f"{paths.routing})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
