"""The low copies quantized against their inputs (convert/calibrated_quant.py): MLX's layout,
less output error than the fitted copy on inputs like the ones calibrated with, and the fitted
copy itself where there is nothing to calibrate with."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from convert import calibrated_quant
from convert.calibrated_quant import calibrated_quantize, inverse_factor
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
    calibrated = calibrated_quantize(w, inverse_factor(hessian), 64, bits)
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
    calibrated = calibrated_quantize(w, inverse_factor(hessian), 64, 2)
    fitted = fitted_quantize(w, 64, 2)
    for ours, theirs in zip(calibrated, fitted):
        assert np.array_equal(np.array(ours[1:]), np.array(theirs[1:]))
        assert not np.array_equal(np.array(ours[0]), np.array(theirs[0]))


def test_an_input_column_never_seen_leaves_no_nan():
    rng = np.random.default_rng(1)
    w = mx.array(rng.standard_normal((2, 8, 64)).astype(np.float32))
    x = _inputs(rng, 2, 50, 64)
    x[..., 5] = 0
    out = calibrated_quantize(w, inverse_factor(np.einsum("eri,erj->eij", x, x)), 64, 2)
    assert np.isfinite(np.array(mx.dequantize(*out, group_size=64, bits=2))).all()


def test_shapes_that_do_not_agree_are_refused():
    w = mx.zeros((2, 8, 128))
    with pytest.raises(ValueError, match="group size"):
        calibrated_quantize(mx.zeros((2, 8, 96)), np.zeros((2, 96, 96)), 64, 2)
    with pytest.raises(ValueError, match="factor shape"):
        calibrated_quantize(w, np.zeros((2, 64, 64)), 64, 2)


@pytest.mark.parametrize("n", [64, 330, 768])  # whole, by halves, by uneven halves
def test_the_factor_is_the_upper_cholesky_factor_of_the_damped_inverse(n, monkeypatch):
    rng = np.random.default_rng(n)
    x = _inputs(rng, 2, 3 * n, n)
    x[1, :, 3] = 0  # an input column never seen
    hessian = np.einsum("eri,erj->eij", x, x)
    damped = hessian.copy()
    for e in range(2):
        diag = np.diagonal(hessian[e])
        damped[e][np.diag_indices(n)] += calibrated_quant.DAMP * diag.mean() + (diag <= 0)
    monkeypatch.setattr(calibrated_quant, "FACTOR_BLOCK", 64)
    u = inverse_factor(hessian.astype(np.float32))
    assert u.dtype == np.float32 and np.array_equal(u, np.triu(u))
    u = u.astype(np.float64)
    for e in range(2):
        want = np.linalg.inv(damped[e])
        assert np.abs(u[e].T @ u[e] - want).max() < 1e-4 * np.abs(want).max()


def test_a_factor_float32_cannot_make_is_made_in_float64(monkeypatch):
    rng = np.random.default_rng(2)
    x = _inputs(rng, 2, 400, 128)
    hessian = np.einsum("eri,erj->eij", x, x)
    real = calibrated_quant._inverse_cholesky
    dtypes = []

    def fails_in_float32(a):
        dtypes.append(a.dtype)
        if a.dtype == np.float32:
            raise np.linalg.LinAlgError("Matrix is not positive definite")
        return real(a)

    monkeypatch.setattr(calibrated_quant, "_inverse_cholesky", fails_in_float32)
    u = inverse_factor(hessian)
    monkeypatch.setattr(calibrated_quant, "_inverse_cholesky", real)
    assert dtypes == [np.float32, np.float64] and u.dtype == np.float32
    assert np.allclose(u, inverse_factor(hessian), rtol=1e-3, atol=1e-6 * np.abs(u).max())
