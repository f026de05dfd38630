"""The low copies quantized against their inputs (convert/calibrated_quant.py): MLX's layout,
less output error than the fitted copy on inputs like the ones calibrated with, and the fitted
copy itself where there is nothing to calibrate with."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from convert.calibrated_quant import calibrated_quantize
from convert.fitted_quant import fitted_quantize
from hobbit_mlx.quantizable import mlx_quantizes, supported_bits

WIDTHS = [b for b in supported_bits() if mlx_quantizes(b, 64) and b <= 4]


def _mixing(rng, n: int) -> np.ndarray:
    """Makes inputs whose columns co-vary and differ in scale, as hidden states do."""
    mix = rng.standard_normal((n, n)) * 0.3 + np.eye(n)
    mix[:, : n // 16] *= 8
    return mix


def _inputs(rng, experts: int, rows: int, n: int, mix: np.ndarray | None = None) -> np.ndarray:
    return rng.standard_normal((experts, rows, n)) @ (_mixing(rng, n) if mix is None else mix)


def _output_error(w: mx.array, quantized: tuple, bits: int, x: np.ndarray) -> np.ndarray:
    back = np.array(mx.dequantize(*quantized, group_size=64, bits=bits).astype(mx.float32))
    ref = np.array(w.astype(mx.float32))
    return np.array([np.linalg.norm(x[e] @ (ref[e] - back[e]).T) ** 2
                     / np.linalg.norm(x[e] @ ref[e].T) ** 2 for e in range(len(ref))])


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("bits", WIDTHS)
def test_outputs_on_unseen_inputs_are_closer_than_the_fitted_copys(bits, dtype):
    rng = np.random.default_rng(bits)
    w = mx.array(rng.standard_normal((3, 32, 256)).astype(np.float32) * 0.02).astype(dtype)
    mix = _mixing(rng, 256)
    seen = _inputs(rng, 3, 600, 256, mix)
    hessian = np.einsum("eri,erj->eij", seen, seen)
    calibrated = calibrated_quantize(w, hessian, 64, bits)
    fitted = fitted_quantize(w, 64, bits)
    assert all(a.dtype == b.dtype and a.shape == b.shape for a, b in zip(calibrated, fitted))
    unseen = _inputs(rng, 3, 600, 256, mix)  # (the same distribution, other draws)
    ours, theirs = (_output_error(w, q, bits, unseen) for q in (calibrated, fitted))
    assert (ours < 0.85 * theirs).all(), (ours, theirs)


def test_without_inputs_an_expert_gets_the_fitted_copy_bit_for_bit():
    rng = np.random.default_rng(0)
    w = mx.array(rng.standard_normal((3, 16, 128)).astype(np.float32))
    x = _inputs(rng, 3, 200, 128)
    hessian = np.einsum("eri,erj->eij", x, x)
    hessian[1] = 0  # expert 1 never routed
    hessian[2] = np.eye(128)  # inputs that do not co-vary: nothing to spread
    calibrated = calibrated_quantize(w, hessian, 64, 2)
    fitted = fitted_quantize(w, 64, 2)
    for ours, theirs in zip(calibrated, fitted):
        assert np.array_equal(np.array(ours[1:]), np.array(theirs[1:]))
        assert not np.array_equal(np.array(ours[0]), np.array(theirs[0]))


def test_an_input_column_never_seen_leaves_no_nan():
    rng = np.random.default_rng(1)
    w = mx.array(rng.standard_normal((2, 8, 64)).astype(np.float32))
    x = _inputs(rng, 2, 50, 64)
    x[..., 5] = 0
    out = calibrated_quantize(w, np.einsum("eri,erj->eij", x, x), 64, 2)
    assert np.isfinite(np.array(mx.dequantize(*out, group_size=64, bits=2))).all()


def test_shapes_that_do_not_agree_are_refused():
    w = mx.zeros((2, 8, 128))
    with pytest.raises(ValueError, match="group size"):
        calibrated_quantize(mx.zeros((2, 8, 96)), np.zeros((2, 96, 96)), 64, 2)
    with pytest.raises(ValueError, match="hessian shape"):
        calibrated_quantize(w, np.zeros((2, 64, 64)), 64, 2)
