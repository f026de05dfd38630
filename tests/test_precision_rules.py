"""The precision rules against a direct reading of their definitions, on random gate weights
(hypothesis; one-token rows often, as decode runs them through a path of their own): HOBBIT's thresholds, MoBiLE's big-little, and the heat that earns a 4-bit read."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from hobbit_mlx.precision import (DROP, HIGH, LOW, SKIP_IF_MISSING, ExpertHeat, PrecisionOptions,
                                  demote_unpopular, plan_slots, renormalized)

weights = st.integers(1, 8).flatmap(lambda k: arrays(
    np.float32, st.tuples(st.sampled_from([1, 1, 2, 6]), st.just(k)),
    elements=st.floats(0.015625, 1.0, width=32))).map(lambda w: w / w.sum(axis=-1, keepdims=True))
thresholds = st.tuples(st.floats(0, 1), st.floats(0, 1)).map(sorted)


def _unimportance(row):
    order = sorted(range(len(row)), key=lambda j: -row[j])
    out, above = np.zeros(len(row)), 0.0
    for j in order:
        out[j], above = above, above + row[j]
    return out, order


@settings(max_examples=150, deadline=None)
@given(w=weights, t=thresholds, skip=st.booleans(), big_little=st.booleans(),
       little=st.floats(0.05, 1.0), mixed=st.booleans(), keeps_resident=st.booleans())
def test_levels_follow_the_definitions(w, t, skip, big_little, little, mixed, keeps_resident):
    t1, t2 = t
    opts = PrecisionOptions(mixed_precision=mixed, t1=t1, t2=t2, skip=skip,
                            big_little=big_little, little_threshold=little,
                            little_keeps_resident=keeps_resident)
    level, scale = plan_slots(w, opts)
    k = w.shape[-1]
    for row, lv, sc in zip(w, level, scale):
        u, order = _unimportance(row)
        want = np.full(k, HIGH)
        if mixed:
            want[u > t1 + 1e-6] = LOW
            if skip:  # (the layer call drops such a slot only when its expert is not resident)
                want[u > t2 + 1e-6] = SKIP_IF_MISSING
        ambiguous = mixed & (np.isclose(u, t1, atol=1e-5) | np.isclose(u, t2, atol=1e-5))
        want_scale = np.ones(k)
        if big_little and k > 1:
            top = order[:k // 2]
            mass = row[top].sum()
            if np.isclose(mass, little, atol=1e-5):
                continue  # (float rounding decides)
            if mass >= little:
                want[[j for j in range(k) if j not in top]] = \
                    SKIP_IF_MISSING if keeps_resident else DROP
                want_scale[top] = 1 / mass
        assert (lv == want)[~ambiguous].all(), (row, lv, want)
        np.testing.assert_allclose(sc, want_scale, rtol=1e-5)


@settings(max_examples=150, deadline=None)
@given(w=weights)
def test_at_the_default_thresholds_big_little_drops_only_what_skip_drops(w):
    """Why big-little is off by default: with t2 = little_threshold (both 0.8) and little tokens
    keeping their resident experts, every slot it may drop is one skip may drop already (a
    little token's bottom half sits below its top half's mass); all it adds is the rescaling."""
    import hobbit_mlx

    opts = hobbit_mlx.LoadOptions().precision()
    assert not opts.big_little and opts.skip and opts.t2 == opts.little_threshold
    skip_only, _ = plan_slots(w, opts)
    opts.big_little = True
    with_little, scale = plan_slots(w, opts)
    mass = np.sort(w, axis=-1)[:, ::-1][:, :w.shape[-1] // 2].sum(axis=-1)
    near_tie = np.isclose(mass, opts.t2, atol=1e-5)[:, None]  # (float sums either side of 0.8)
    assert ((with_little == skip_only) | near_tie).all()
    if w.shape[-1] > 1:
        assert ((scale != 1).any(axis=-1) == (mass >= opts.little_threshold)).all()


def test_renormalized_rescales_little_tokens_over_what_runs():
    w = np.array([[0.5, 0.3, 0.15, 0.05], [0.5, 0.3, 0.15, 0.05], [0.4, 0.3, 0.2, 0.1]],
                 dtype=np.float32)
    plan = np.array([[1 / 0.8] * 2 + [1.0] * 2] * 2 + [[1.0] * 4], dtype=np.float32)
    # row 0: its third expert was resident and ran; row 1: neither ran; row 2 is not little
    # (its dropped slot is a HOBBIT skip, which keeps its factors)
    level = np.array([[HIGH, HIGH, LOW, DROP], [HIGH, HIGH, DROP, DROP],
                      [HIGH, HIGH, HIGH, DROP]], dtype=np.int8)
    little = np.array([True, True, False])
    got = renormalized(w, level, plan, little)
    np.testing.assert_allclose(got[0], [1 / 0.95] * 3 + [1.0], rtol=1e-6)
    np.testing.assert_allclose(got[1], [1 / 0.8] * 2 + [1.0] * 2, rtol=1e-6)
    np.testing.assert_array_equal(got[2], plan[2])
    # every expert resident: the little token runs whole, unscaled
    np.testing.assert_array_equal(
        renormalized(w[:1], np.array([[HIGH, HIGH, LOW, LOW]], np.int8), plan[:1], little[:1]),
        np.ones((1, 4), np.float32))
    assert got.dtype == np.float32


def test_heat_counts_uses_fading_per_call_and_a_chunk_once():
    heat = ExpertHeat({0: 4, 1: 4}, threshold=1.5, decay=0.5)
    heat.see(0, np.array([[1, 1], [1, 2]]))  # a chunk: expert 1 counts once
    assert not heat.hot(0, 1)  # 1.0
    heat.see(0, np.array([[1, 3]]))  # 0.5 + 1
    assert heat.hot(0, 1) and not heat.hot(0, 3) and not heat.hot(1, 1)
    heat.see(0, np.array([[3, 0]]))  # expert 1 fades: 0.75
    assert not heat.hot(0, 1) and heat.hot(0, 3)  # 0.5 + 1
    heat.reset()
    assert not any(heat.hot(0, e) for e in range(4))
    # a new sequence counts from zero: one choice is 1.0 (not hot), a second makes it 1.5
    heat.see(0, np.array([[1, 2]]))
    assert not heat.hot(0, 1)
    heat.see(0, np.array([[1, 2]]))
    assert heat.hot(0, 1) and heat.hot(0, 2)


def test_heat_fades_with_the_default_decay():
    """As the runtime builds it (default decay): an expert chosen once is hot for a while, then
    its count fades with every call of its layer that does not choose it, until it is cold."""
    heat = ExpertHeat({0: 4}, threshold=0.5)
    heat.see(0, np.array([[1, 2]]))
    assert heat.hot(0, 1)
    calls = 0
    while heat.hot(0, 1) and calls < 100:
        heat.see(0, np.array([[2, 3]]))
        calls += 1
    assert 1 < calls < 100  # it faded: neither at once nor never
    assert heat.hot(0, 2) and heat.hot(0, 3)


def test_demote_unpopular_demotes_only_experts_chosen_by_fewer_than_the_share():
    indices = np.array([[0, 1], [0, 2], [0, 1], [3, 2]])  # 0: 3 rows, 1 and 2: 2 rows, 3: 1 row
    level = np.full(indices.shape, HIGH, dtype=np.int8)
    out = demote_unpopular(indices, level, 0.5)  # fewer than 2 of 4 rows: expert 3 only
    assert out.tolist() == [[HIGH, HIGH], [HIGH, HIGH], [HIGH, HIGH], [LOW, HIGH]]
    out = demote_unpopular(indices, level, 0.75)  # fewer than 3 rows: 1, 2 and 3
    assert out.tolist() == [[HIGH, LOW], [HIGH, LOW], [HIGH, LOW], [LOW, LOW]]
    # dropped slots are not counted as choices, and stay dropped
    level[2, 1] = DROP
    out = demote_unpopular(indices, level, 0.5)
    assert out.tolist() == [[HIGH, LOW], [HIGH, HIGH], [HIGH, DROP], [LOW, HIGH]]


def test_options_say_what_needs_the_gate_weights():
    assert not PrecisionOptions().needs_weights and not PrecisionOptions().drops
    assert PrecisionOptions(mixed_precision=True).needs_weights
    # big-little drops whatever is resident only when it may not keep resident experts
    assert PrecisionOptions(big_little=True).needs_weights
    assert not PrecisionOptions(big_little=True).drops
    assert PrecisionOptions(big_little=True).drops_misses
    assert PrecisionOptions(big_little=True, little_keeps_resident=False).drops
    assert not PrecisionOptions(big_little=True, little_keeps_resident=False).drops_misses
    assert not PrecisionOptions(skip=True).drops  # a skip drops a miss, never a resident expert
    assert PrecisionOptions(skip=True).drops_misses and not PrecisionOptions().drops_misses
    assert PrecisionOptions(mixed_precision=True, upgrade_after=1.5).upgrades
    assert not PrecisionOptions(mixed_precision=False, upgrade_after=1.5).upgrades
    assert not PrecisionOptions(mixed_precision=True, upgrade_after=0).upgrades


@pytest.mark.parametrize("row, opts, want_level, want_scale", [
    # unimportance exactly t1 stays 4-bit; exactly t2 is 2-bit, not skipped (u > t is the rule)
    ([0.5, 0.25, 0.25], PrecisionOptions(mixed_precision=True, t1=0.5, t2=0.75, skip=True),
     [HIGH, HIGH, LOW], [1.0, 1.0, 1.0]),
    # the top half's mass exactly at the threshold runs the token little
    ([0.75, 0.25], PrecisionOptions(big_little=True, little_threshold=0.75,
                                    little_keeps_resident=False), [HIGH, DROP], [1 / 0.75, 1.0]),
    ([0.75, 0.25], PrecisionOptions(big_little=True, little_threshold=0.75),
     [HIGH, SKIP_IF_MISSING], [1 / 0.75, 1.0]),
    # one expert per token has no little half, whatever the threshold
    ([1.0], PrecisionOptions(big_little=True, little_threshold=0.0), [HIGH], [1.0]),
])
def test_levels_at_the_thresholds_one_token_and_batched(row, opts, want_level, want_scale):
    """Decode's one-token path and the batched path agree, values and dtypes, exactly at the
    thresholds (weights that are exact in binary)."""
    w = np.array([row], dtype=np.float32)
    one, batch = plan_slots(w, opts), plan_slots(np.concatenate([w, w]), opts)
    for got in (one, (batch[0][:1], batch[1][:1])):
        np.testing.assert_array_equal(got[0], [want_level])
        np.testing.assert_allclose(got[1], [want_scale], rtol=1e-6)
    assert [a.dtype for a in one] == [a.dtype for a in batch] == [np.int8, np.float32]
