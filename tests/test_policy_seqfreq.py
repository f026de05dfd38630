"""The seqfreq cache policy: what it evicts by hand, and that it beats LRU on a skewed trace."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import replay as rp  # noqa: E402
from bench import trace as tr  # noqa: E402
from bench.victim_cost import RescoringEveryVictim  # noqa: E402
from hobbit_mlx.policies.seqfreq import SequenceFrequencyPolicy  # noqa: E402


def _k(layer: int, expert: int) -> tuple:
    return (layer, expert, "high")


def _token(policy: SequenceFrequencyPolicy, layer: int, hits=(), inserts=()) -> None:
    policy.on_layer(layer)
    for e in hits:
        policy.on_hit(_k(layer, e))
    for e in inserts:
        policy.on_insert(_k(layer, e))


def test_evicts_the_rarely_used_expert_then_forgets_counts_on_a_new_sequence():
    p = SequenceFrequencyPolicy(num_layers=1, w_dist=0.0)
    _token(p, 0, inserts=[0, 1])
    for _ in range(4):
        _token(p, 0, hits=[0])
    _token(p, 0, hits=[1])  # 1 is the most recent, but 0 was used 5 times: LRU would evict 0
    assert p.victim(lambda k: True) == _k(0, 1)
    assert p.victim(lambda k: k != _k(0, 1)) == _k(0, 0)  # pinned keys are skipped
    p.reset()
    for _ in range(40):  # long enough for the burst term of 0 to decay
        _token(p, 0)
    _token(p, 0, hits=[1])
    assert p.victim(lambda k: True) == _k(0, 0)  # the old sequence's counts no longer protect 0


def test_evicts_from_the_layer_just_computed_when_frequencies_tie():
    p = SequenceFrequencyPolicy(num_layers=4)
    for layer in range(4):
        _token(p, layer, inserts=[0])
    p.on_layer(0)
    p.on_layer(1)  # layer 1 runs: layer 0's expert is needed again only after layers 2 and 3
    p.on_hit(_k(1, 0))
    assert p.victim(lambda k: k[0] != 1) == _k(0, 0)
    assert p.victim(lambda k: k[0] in (2, 3)) == _k(3, 0)


def _skewed_trace(seed: int = 0, layers: int = 4, experts: int = 16, k: int = 2,
                  tokens: int = 150, sequences: int = 2) -> tr.Trace:
    """Per-sequence Zipf popularity per layer (the prompt decides what is hot), decode only."""
    rng = np.random.default_rng(seed)
    calls, seq = [], []
    for s in range(sequences):
        pop = [rng.permutation(experts) for _ in range(layers)]
        w = 1.0 / np.arange(1, experts + 1) ** 1.2
        w /= w.sum()
        for _ in range(tokens):
            for layer in range(layers):
                chosen = rng.choice(experts, size=k, replace=False, p=w)
                calls.append((layer, np.array([pop[layer][chosen]])))
                seq.append(s)
    return tr.from_calls(calls, sequence=seq, meta={"num_layers": layers, "num_experts": experts})


@pytest.mark.parametrize("capacity", [16, 24])
def test_beats_lru_in_replay_on_a_skewed_trace(capacity):
    trace = _skewed_trace()
    ours = rp.replay(trace, SequenceFrequencyPolicy(num_layers=trace.num_layers), capacity)
    lru = rp.replay(trace, "lru", capacity)
    opt = rp.replay(trace, "belady", capacity)
    assert ours["requests"] == lru["requests"] == 2 * 150 * 4 * 2
    assert ours["hit_rate"] > lru["hit_rate"] + 0.05
    assert ours["hit_rate"] <= opt["hit_rate"]


def test_a_layer_calls_misses_evict_what_scoring_every_expert_again_would():
    """Victims after victims reuse the priorities scored for the first (nothing they depend on
    changed): each is the one a fresh scoring picks, through uses, prefetches, new layers and
    tokens, pinned experts and a new sequence."""
    rng = np.random.default_rng(7)
    policy = SequenceFrequencyPolicy(num_layers=6)
    resident: set = set()

    def fresh_victim(evictable):  # (the policy before the reuse: every victim scored afresh)
        return RescoringEveryVictim.victim(policy, evictable)

    reused = 0
    for _ in range(3000):
        op = rng.integers(0, 8)
        key = _k(int(rng.integers(0, 6)), int(rng.integers(0, 24)))
        if op == 0:
            policy.on_layer(key[0])
        elif op == 1 and key not in resident:
            policy.on_insert(key)
            resident.add(key)
        elif op == 2 and resident:  # (the next victim among them: its priority rises)
            hits = [k for k in resident if rng.random() < 0.1]
            policy.on_hits([fresh_victim(lambda k: True)] + hits)
        elif op == 3 and key not in resident:
            policy.on_prefetch(key)
            resident.add(key)
        elif op == 4 and rng.random() < 0.5:
            policy.reset()
        elif op >= 5 and resident:  # a call's misses: victims one after another
            pinned = {k for k in resident if rng.random() < 0.3}
            for _ in range(int(rng.integers(1, 5))):
                if not resident - pinned:
                    break
                expected = fresh_victim(lambda k: k not in pinned)
                reused += policy._ranked is not None
                assert policy.victim(lambda k: k not in pinned) == expected
                policy.on_evict(expected)
                resident.discard(expected)
    assert reused > 100  # (the reuse was exercised, not only the first scoring of each run)
    # A new sequence right after a victim: its counts are gone, so the next victim differs.
    p = SequenceFrequencyPolicy(num_layers=1, w_dist=0.0)
    _token(p, 0, inserts=[0, 1])
    for _ in range(9):
        _token(p, 0, hits=[0])  # 10 uses long ago
    for _ in range(40):
        _token(p, 0)
    _token(p, 0, hits=[1, 1])  # 3 uses just now
    assert p.victim(lambda k: True) == _k(0, 1)
    p.reset()
    assert p.victim(lambda k: True) == _k(0, 0)  # (0's burst term has decayed further than 1's)
