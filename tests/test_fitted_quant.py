"""The low copies' fitted quantization (convert/fitted_quant.py): MLX's own layout, less error
than mx.quantize's grid, and the converter's switch between the two."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import convert as converter
from convert.__main__ import main as convert_main
from convert.fitted_quant import fitted_quantize, pack
from hobbit_mlx.quantizable import mlx_quantizes, supported_bits

REFERENCE = Path(__file__).resolve().parents[1] / "hobbit_mlx" / "reference_model"
WIDTHS = [b for b in supported_bits() if mlx_quantizes(b, 64)]


def _error(w: mx.array, quantized: tuple, bits: int) -> float:
    back = mx.dequantize(*quantized, group_size=64, bits=bits).astype(mx.float32)
    return float(mx.square(back - w.astype(mx.float32)).sum())


@pytest.mark.parametrize("bits", WIDTHS)
def test_levels_are_packed_as_mlx_unpacks_them(bits):
    rng = np.random.default_rng(bits)
    levels = rng.integers(0, 2 ** bits, size=(3, 5, 128)).astype(np.uint8)
    packed = pack(mx.array(levels), bits)
    ones, zeros = mx.ones((3, 5, 2)), mx.zeros((3, 5, 2))
    back = mx.dequantize(packed, ones, zeros, group_size=64, bits=bits)
    assert np.array_equal(np.array(back), levels.astype(np.float32))


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
@pytest.mark.parametrize("bits", WIDTHS)
def test_fitted_groups_are_closer_than_mx_quantize_in_its_format(bits, dtype):
    mx.random.seed(bits)
    w = (mx.random.normal((4, 48, 256)) * 0.02).astype(dtype)
    fitted, nearest = fitted_quantize(w, 64, bits), mx.quantize(w, 64, bits)
    for a, b in zip(fitted, nearest):
        assert a.shape == b.shape and a.dtype == b.dtype
    ratio = _error(w, fitted, bits) / _error(w, nearest, bits)
    assert ratio < (0.8 if bits <= 2 else 0.95)


@pytest.mark.parametrize("bits", [2, 3])
def test_blocks_of_groups_fit_as_the_whole_tensor_would(bits, monkeypatch):
    """The fit goes block by block (its temporaries bounded); blocks that split the tensor's rows
    (7 groups each here) give the same bytes as one block."""
    import convert.fitted_quant as fq

    mx.random.seed(bits)
    w = (mx.random.normal((3, 10, 256)) * 0.02).astype(mx.bfloat16)
    whole = fitted_quantize(w, 64, bits)
    monkeypatch.setattr(fq, "BLOCK_GROUPS", 7)
    for a, b in zip(fitted_quantize(w, 64, bits), whole):
        assert a.shape == b.shape and a.dtype == b.dtype and mx.array_equal(a, b)


def test_a_constant_group_comes_back_exactly():
    w = mx.concatenate([mx.zeros((2, 64)), mx.full((2, 64), 0.25), mx.random.normal((2, 64))])
    back = mx.dequantize(*fitted_quantize(w, 64, 2), group_size=64, bits=2)
    assert not mx.isnan(back).any()
    assert np.array_equal(np.array(back[:4]), np.array(w[:4]))


def test_a_last_axis_not_in_whole_groups_is_refused():
    with pytest.raises(ValueError, match="multiple of the group size"):
        fitted_quantize(mx.zeros((2, 96)), 64, 2)


def _layer(model: Path, precision: str) -> dict:
    return mx.load(str(model / "experts" / precision / "layer_000.safetensors"))


def _projection(tensors: dict, name: str, bits: int) -> mx.array:
    experts = sorted({int(k.split(".")[0]) for k in tensors if k.split(".")[0].isdigit()})
    return mx.stack([mx.dequantize(tensors[f"{e}.{name}.weight"], tensors[f"{e}.{name}.scales"],
                                   tensors[f"{e}.{name}.biases"], group_size=64, bits=bits)
                     for e in experts])


def test_the_converter_fits_the_low_copy_only_and_nearest_turns_it_off(tmp_path, capsys):
    fitted, nearest = tmp_path / "fitted", tmp_path / "nearest"
    converter.convert(REFERENCE, fitted, copy=True, progress=False)
    assert convert_main([str(REFERENCE), str(nearest), "--copy", "--quiet",
                         "--low-rounding", "nearest"]) == 0
    # The 4-bit copy is the same either way (here the source's own bytes; a float source's is
    # mlx-lm's quantization, which test_exact's float checkpoints check bit for bit).
    assert (fitted / "experts/high/layer_000.safetensors").read_bytes() == \
        (nearest / "experts/high/layer_000.safetensors").read_bytes()
    high = _projection(_layer(fitted, "high"), "gate_proj", 4)
    low_nearest = _layer(nearest, "low")
    again = mx.quantize(high[0], 64, 2)  # 'nearest' is mx.quantize of the 4-bit weights
    assert np.array_equal(np.array(low_nearest["0.gate_proj.weight"]), np.array(again[0]))
    errors = {}
    for name, model in (("fitted", fitted), ("nearest", nearest)):
        low = _projection(_layer(model, "low"), "gate_proj", 2)
        errors[name] = float(mx.square(low - high).sum())
    assert errors["fitted"] < 0.8 * errors["nearest"]
    from hobbit_mlx.store import load_manifest  # (the manifest says which: the cache reads it)

    assert [load_manifest(m).low_rounding for m in (fitted, nearest)] == ["fitted", "nearest"]


def test_an_unknown_low_rounding_is_refused(tmp_path):
    with pytest.raises(converter.ConversionError, match="low_rounding 'best'"):
        converter.convert(REFERENCE, tmp_path / "out", low_rounding="best", progress=False)
    assert not (tmp_path / "out").exists()
