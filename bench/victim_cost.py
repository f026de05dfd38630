#!/usr/bin/env python3
"""Host time the default cache policy (``seqfreq``) spends choosing a layer call's victims, at
resident-expert counts of real models, against scoring every resident expert again per victim.

    python bench/victim_cost.py [--resident 256,3072,6000] [--misses 1,3,8,32] [--calls 200]
    python bench/victim_cost.py --model DIR [--residency 0.25] [--exact] [--reps 3]

Both run in this process on the same statistics. A call: the next layer starts (priorities
change), then each of its misses evicts the policy's victim. Prints µs per call and the ratio.
With ``--model``, end to end instead: tokens/s of a 256-token prefill in 64-token chunks and of
40 decoded tokens fed random token ids (so routing changes every token), the two victim choices
alternated in one process, medians of ``--reps``.
"""

from __future__ import annotations

import argparse
import time

if __package__ in (None, ""):
    import _path  # noqa: F401  (repository root on sys.path, see bench/_path.py)

import numpy as np  # noqa: E402

from bench import arguments  # noqa: E402
from hobbit_mlx.policies.seqfreq import SequenceFrequencyPolicy  # noqa: E402


class RescoringEveryVictim(SequenceFrequencyPolicy):
    """``seqfreq`` as it was: every victim scores every resident expert again."""

    def victim(self, evictable):
        slots = self._keys.resident_slots()
        return self._keys.first_evictable(slots, self.values(slots), evictable)


def _warm(policy, layers: int, resident: list, rng) -> None:
    for key in resident:
        policy.on_insert(key)
    for _ in range(5):  # a few tokens of uses, so priorities differ
        for layer in range(layers):
            policy.on_layer(layer)
            policy.on_hits([resident[i] for i in rng.integers(0, len(resident), 8)])


def us_per_call(cls, layers: int, resident: int, misses: int, calls: int) -> float:
    """Mean µs per layer call of ``misses`` victims (each made resident again unscored, so the
    count stays)."""
    experts = -(-resident // layers) * 2
    keys = [(layer, e, "high") for layer in range(layers) for e in range(experts)][:resident]
    policy = cls(num_layers=layers)
    _warm(policy, layers, keys, np.random.default_rng(0))
    t0 = time.perf_counter()
    for i in range(calls):
        policy.on_layer(i % layers)
        for _ in range(misses):
            victim = policy.victim(lambda k: True)
            policy.on_evict(victim)
            policy._keys.set_resident(victim, True)
    return (time.perf_counter() - t0) / calls * 1e6


def end_to_end(model_dir: str, residency: float, exact: bool, reps: int) -> None:
    """What the choice saves where it counts: whole model calls, misses read, compute included.
    Random token ids, because a random-weight model's greedy text repeats and stops missing."""
    import statistics

    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    import hobbit_mlx
    from hobbit_mlx.loader import runtime_of

    model, _ = hobbit_mlx.load(model_dir, expert_residency=residency, exact=exact)
    rt = runtime_of(model)
    rng = np.random.default_rng(0)
    vocab = getattr(getattr(model, "args", None), "vocab_size", 256)

    def run(tokens: int, step: int) -> tuple[float, float]:
        """(tokens/s, misses per layer call) of ``tokens`` random ids in calls of ``step``."""
        cache, ids = make_prompt_cache(model), rng.integers(5, vocab, tokens)
        calls, misses = rt.stats.layer_calls, rt.stats.misses_high + rt.stats.misses_low
        t0 = time.perf_counter()
        for i in range(0, tokens, step):
            mx.eval(model(mx.array(ids[None, i:i + step]), cache=cache))
        rate = tokens / (time.perf_counter() - t0)
        return rate, (rt.stats.misses_high + rt.stats.misses_low - misses) / max(
            1, rt.stats.layer_calls - calls)

    new = SequenceFrequencyPolicy.victim
    print("| run | misses per layer call | rescoring every victim (tok/s) | once per call "
          "(tok/s) | x |")
    print("|---|---|---|---|---|")
    for name, tokens, step in (("prefill, 64-token chunks", 256, 64), ("decode", 40, 1)):
        run(tokens, step)  # (warm: the pools filled, MLX's kernels built)
        rates, missed = {"old": [], "new": []}, []
        try:
            for _ in range(reps):
                for which, victim in (("old", RescoringEveryVictim.victim), ("new", new)):
                    SequenceFrequencyPolicy.victim = victim
                    rate, m = run(tokens, step)
                    rates[which].append(rate)
                    missed.append(m)
        finally:
            SequenceFrequencyPolicy.victim = new
        old, now = statistics.median(rates["old"]), statistics.median(rates["new"])
        print(f"| {name} | {statistics.mean(missed):.2f} | {old:.1f} | {now:.1f} | "
              f"{now / old:.2f} |")


@arguments.refuse_bad_input
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--resident", type=arguments.counts, default=[256, 3072, 6000],
                    help="resident experts (the reference model at 50%%: 256; "
                    "Qwen3-30B-A3B: 3,072)")
    ap.add_argument("--misses", type=arguments.counts, default=[1, 3, 8, 32])
    ap.add_argument("--layers", type=arguments.count, default=48)
    ap.add_argument("--calls", type=arguments.count, default=200)
    ap.add_argument("--model", type=arguments.model_dir,
                    help="a hobbit model directory: measure end to end instead")
    ap.add_argument("--residency", type=arguments.residency, default=0.25)
    ap.add_argument("--exact", action="store_true")
    ap.add_argument("--reps", type=arguments.count, default=3)
    args = ap.parse_args(argv)
    if args.model:
        return end_to_end(args.model, args.residency, args.exact, args.reps)
    print("| resident experts | misses per call | rescoring every victim (µs) "
          "| once per call (µs) | x |")
    print("|---|---|---|---|---|")
    for resident in args.resident:
        layers = min(args.layers, resident)
        for misses in args.misses:
            old = us_per_call(RescoringEveryVictim, layers, resident, misses, args.calls)
            new = us_per_call(SequenceFrequencyPolicy, layers, resident, misses, args.calls)
            print(f"| {resident:,} | {misses} | {old:.0f} | {new:.0f} | {old / new:.1f} |")


if __name__ == "__main__":
    main()
