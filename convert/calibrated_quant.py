"""The low-precision copies quantized against the inputs each expert sees (GPTQ).

A fitted copy (``fitted_quant``) makes each group's weights close to the 4-bit ones; what the
model needs is each expert's *outputs* close, on the inputs it is routed. GPTQ (Frantar et al.,
2022) quantizes one input column at a time and spreads each column's rounding error over the
columns not yet quantized, weighted by how the inputs co-vary (the Hessian ``H = sum x x^T`` of
the projection's inputs, gathered by ``convert.calibrate``). Each group's scale and bias are the
fitted grid of its weights as they stand when the group starts. Same format and bytes as the
fitted copy. Reference model, every expert 2-bit, 16k calibration tokens from other files than
the ones scored: KL from the 4-bit model 0.163 (fitted) -> 0.086, perplexity +10.2% -> +7.0%.

The columns go in blocks (error spread inside a block column by column, then onto the rest of
the matrix in one matmul), and all experts of a projection go together: one pass of ``in``
column steps per projection, each over (experts, out) weights. The rounding runs in MLX (the
fitted grid's own functions); the one large product per block (each block's errors onto the
columns after it) runs in numpy, whose BLAS on a 2-core x86 ran it at 170 GFLOP/s against MLX's
CPU build's 4.4 (on a Mac, Accelerate).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from .fitted_quant import fit_grid, pack, round_onto

DAMP = 0.01  # added to H's diagonal, as a fraction of its mean: keeps the inverse stable
BLOCK_COLUMNS = 128  # columns whose errors are spread column by column before one matmul
FACTOR_BLOCK = 256  # inputs up to which a Cholesky factor is inverted whole


def calibrated_quantize(w: mx.array, factor: np.ndarray, group_size: int,
                        bits: int) -> tuple[mx.array, mx.array, mx.array]:
    """(packed weights, scales, biases) of experts ``w`` (experts, out, in) in ``mx.quantize``'s
    affine layout, quantized by GPTQ with ``factor`` = ``inverse_factor`` of each expert's sum of
    ``x x^T`` over the inputs it saw (one factor serves every projection of that input). An
    expert that saw none gets the fitted copy's rounding. Scales and biases come back in ``w``'s
    dtype."""
    experts, out, n = w.shape
    if n % group_size:
        raise ValueError(f"the last axis ({n}) is not a multiple of the group size ({group_size})")
    if tuple(factor.shape) != (experts, n, n):
        raise ValueError(f"factor shape {tuple(factor.shape)}: expected {(experts, n, n)}")
    levels = 2 ** bits - 1
    factor = np.asarray(factor, dtype=np.float32)
    u = mx.array(factor)
    weights = np.array(w.astype(mx.float32))  # (numpy: see the module's note on matmuls)
    block = max(group_size, BLOCK_COLUMNS // group_size * group_size)
    codes, scales, biases = [], [], []
    for b0 in range(0, n, block):
        b1 = min(n, b0 + block)
        part = mx.array(weights[..., b0:b1])
        ub = u[:, b0:b1, b0:b1]
        errors = []
        for j in range(b1 - b0):
            if j % group_size == 0:
                s, b = fit_grid(part[..., j:j + group_size].reshape(-1, group_size), bits, w.dtype)
                scales.append(s.reshape(experts, out))
                biases.append(b.reshape(experts, out))
                s32, b32 = scales[-1].astype(mx.float32), biases[-1].astype(mx.float32)
            q = round_onto(part[..., j], s32, b32, levels)
            err = (part[..., j] - (q * s32 + b32)) / ub[:, j, j][:, None]
            # (u is upper triangular: row j leaves the columns already quantized alone)
            part = part - err[..., None] * ub[:, j][:, None, :]
            codes.append(q.astype(mx.uint8))
            errors.append(err)
        spread = mx.stack(errors, axis=-1)
        mx.eval(spread, codes[b0:], scales, biases)
        if b1 < n:
            weights[..., b1:] -= np.array(spread) @ factor[:, b0:b1, b1:]
    packed = pack(mx.stack(codes, axis=-1), bits)
    out_arrays = (packed, mx.stack(scales, axis=-1), mx.stack(biases, axis=-1))
    mx.eval(out_arrays)
    return out_arrays


def inverse_factor(hessian: np.ndarray) -> np.ndarray:
    """Per expert, the upper Cholesky factor ``U`` of ``H^-1`` (``H^-1 = U^T U``), H damped,
    float32; an expert whose H is zero gets the identity (each column rounded, nothing spread).

    With ``P`` the reversal of rows and columns and ``P H P = L L^T``: ``U = P L^-1 P``. So one
    Cholesky factor's inverse, built by halves in matmuls (``_inverse_cholesky``), replaces
    inverting H and factoring the inverse: a third of the arithmetic, mostly at matmul speed
    (Qwen3-30B-A3B's 2048-wide inputs: 0.74 -> 0.19 s an expert on a 2-core x86)."""
    n = hessian.shape[-1]
    # (reversed as it is copied: the damping below touches only the diagonal, which reversal
    # keeps on the diagonal, so it is the same damping of P H P)
    reversed_h = np.ascontiguousarray(np.asarray(hessian, dtype=np.float32)[:, ::-1, ::-1])
    diag = np.diagonal(reversed_h, axis1=-2, axis2=-1)
    seen = diag.sum(axis=-1) > 0
    idx = np.arange(n)
    dead = diag <= 0  # an input never non-zero: its column is rounded on its own
    reversed_h[:, idx, idx] += DAMP * diag.mean(axis=-1, keepdims=True) + dead
    reversed_h[~seen] = np.eye(n, dtype=np.float32)
    try:
        inverse = _inverse_cholesky(reversed_h)
    except np.linalg.LinAlgError:  # (float32 lost definiteness: once more in float64)
        inverse = _inverse_cholesky(reversed_h.astype(np.float64)).astype(np.float32)
    return np.ascontiguousarray(inverse[:, ::-1, ::-1])


def _inverse_cholesky(a: np.ndarray) -> np.ndarray:
    """``L^-1`` for ``a = L L^T`` (L lower triangular), batched. By halves: with ``a`` split
    into ``[[A, B^T], [B, C]]``, ``L = [[L1, 0], [B L1^-T, L2]]`` where ``L2`` factors
    ``C - (B L1^-T)(B L1^-T)^T``, and the inverse's lower-left block is ``-L2^-1 (B L1^-T) L1^-1``."""
    n = a.shape[-1]
    if n <= FACTOR_BLOCK:
        return np.tril(np.linalg.inv(np.linalg.cholesky(a)))  # (inv leaves specks above)
    k = n // 2
    first = _inverse_cholesky(a[:, :k, :k])
    below = a[:, k:, :k] @ np.swapaxes(first, -1, -2)
    second = _inverse_cholesky(a[:, k:, k:] - below @ np.swapaxes(below, -1, -2))
    out = np.zeros_like(a)
    out[:, :k, :k] = first
    out[:, k:, k:] = second
    out[:, k:, :k] = -(second @ (below @ first))
    return out
