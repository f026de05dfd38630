"""The expert store: the widths and group size the experts are quantized at (checked before
anything is read), and each layer's experts quantized at each precision and written straight
to their page-aligned records (or, for a source by reference, its own bytes in place)."""

from __future__ import annotations

import numbers
import os
import zlib
from functools import partial
from pathlib import Path

import mlx.core as mx
import numpy as np

from hobbit_mlx.architectures import num_experts_of, switch_linear_paths
from hobbit_mlx.quantizable import mlx_quantizes, supported_bits, supported_group_sizes
from hobbit_mlx.store import (PAGE_SIZE, STORE_DIR, LayerEntry, PrecisionEntry, Record,
                              TensorLayout, align_up, durable_sync, float_quant, is_float,
                              record_alignment, safetensors_header)

from .errors import ConversionError
from .fitted_quant import fitted_quantize
from .reference import ReferenceBuilder
from .source import _source_quantization

CHUNK_BYTES = 512 * 2**20  # float weights materialised at once while requantizing experts
TENSOR_ALIGN = 64
_MX_TO_ST = {mx.uint8: "U8", mx.int8: "I8", mx.uint16: "U16", mx.int16: "I16", mx.float16: "F16",
             mx.bfloat16: "BF16", mx.uint32: "U32", mx.int32: "I32", mx.float32: "F32",
             mx.uint64: "U64", mx.int64: "I64"}


class _LayerWriter:
    """Lays out and writes one layer's experts at one precision into one safetensors file."""

    def __init__(self, path: Path, num_experts: int, tensors: dict[str, tuple[str, tuple]],
                 compact: bool = False):
        """``compact``: records start on ``record_alignment`` of their size instead of a page
        (a store by reference, where disk is the point)."""
        self.path = path
        self.layout: list[TensorLayout] = []
        offset = 0
        for name, (dtype, shape) in tensors.items():
            self.layout.append(TensorLayout(name, dtype, shape, 0, offset))
            offset = align_up(offset + self.layout[-1].nbytes, TENSOR_ALIGN)
        self.record_len = self.layout[-1].offset + self.layout[-1].nbytes
        align = record_alignment(self.record_len) if compact else PAGE_SIZE
        self.stride = align_up(self.record_len, align)
        header_tensors, pos = {}, 0
        for e in range(num_experts):
            for t in self.layout:
                start = e * self.stride + t.offset
                if start > pos:
                    header_tensors[f"__pad__.{len(header_tensors)}"] = ("U8", (start - pos,), pos, start)
                header_tensors[f"{e}.{t.name}"] = (t.dtype, t.shape, start, start + t.nbytes)
                pos = start + t.nbytes
        header, self.data_start = safetensors_header(header_tensors, align)
        self.size = self.data_start + pos
        self.num_experts = num_experts
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.pwrite(self.fd, header, 0)
        os.ftruncate(self.fd, self.size)

    def write(self, expert: int, name: str, data: np.ndarray) -> None:
        t = next(t for t in self.layout if t.name == name)
        raw = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
        assert raw.nbytes == t.nbytes, (name, raw.nbytes, t.nbytes)
        os.pwrite(self.fd, raw, self.data_start + expert * self.stride + t.offset)

    def finish(self, file_index: int) -> list[Record]:
        records = []
        for e in range(self.num_experts):
            off = self.data_start + e * self.stride
            crc = zlib.crc32(os.pread(self.fd, self.record_len, off))
            records.append(Record(((file_index, off, self.record_len),), (crc,)))
        durable_sync(self.fd)
        os.close(self.fd)
        return records


def _to_numpy(a: mx.array) -> np.ndarray:
    if a.dtype == mx.bfloat16:
        a = a.view(mx.uint16)
    return np.array(a, copy=False)


def _projection_quant(weights: dict, key: str, in_dim: int, want: dict, keep_source: bool) -> dict:
    """The quantization of one projection's copy: the source's own (exact, whatever its width:
    a mixed-bit source holds some experts below its nominal bits; ``keep_source``, the high copy
    of a quantized source), or ``want`` (affine); a low copy of a projection already at or below
    ``want``'s width keeps the source's too (requantizing it would lose precision and save
    nothing). A quantized source's float experts (a quant_predicate that skipped them, a group
    size that does not divide them: mlx-lm leaves those float) stay float in the high copy,
    which exact mode computes with as mlx-lm does."""
    src_q = _source_quantization(weights, key, in_dim)
    if src_q is None and keep_source:
        return float_quant(weights[f"{key}.weight"].dtype.size)
    if src_q is not None and (keep_source or src_q["bits"] <= want["bits"]):
        return src_q
    return dict(want, mode="affine")


def _expert_tensors(weights: dict, key: str, in_dim: int, quant: dict, e0: int, e1: int,
                    fitted: bool = False) -> dict:
    """The tensors of experts e0..e1 of one projection at one quantization (lazy). ``fitted``:
    a requantized copy's groups fitted by least squares (``fitted_quant``), not mx.quantize's."""
    out = {}
    w = weights[f"{key}.weight"][e0:e1]
    src_q = _source_quantization(weights, key, in_dim)
    if is_float(quant):  # a quantized source's float experts, kept as they are
        out["weight"] = w
    elif src_q == quant:  # the source's own quantized bytes
        out["weight"] = w
        out["scales"] = weights[f"{key}.scales"][e0:e1]
        if f"{key}.biases" in weights:
            out["biases"] = weights[f"{key}.biases"][e0:e1]
    else:
        if src_q is not None:
            b = weights.get(f"{key}.biases")
            w = mx.dequantize(w, weights[f"{key}.scales"][e0:e1], None if b is None else b[e0:e1],
                              group_size=src_q["group_size"], bits=src_q["bits"], mode=src_q["mode"])
        q = (fitted_quantize if fitted else partial(mx.quantize, mode="affine"))(
            w, quant["group_size"], quant["bits"])
        out["weight"], out["scales"] = q[0], q[1]
        if len(q) > 2 and q[2] is not None:
            out["biases"] = q[2]
    if f"{key}.bias" in weights:
        out["bias"] = weights[f"{key}.bias"][e0:e1]
    return out


def _check_expert_tensors(weights: dict, key: str, num_experts: int) -> None:
    """One projection's stacked expert tensors are whole: a weight for every expert, and the
    scales a packed (quantized) weight needs. A damaged checkpoint fails here by name, not
    deep inside a quantize or a slice."""
    w = weights.get(f"{key}.weight")
    if w is None:
        raise ConversionError(f"the checkpoint has no weights for {key} "
                              "(after mlx-lm's sanitize); is it the model its config.json names?")
    for name in ("weight", "scales", "biases", "bias"):
        t = weights.get(f"{key}.{name}")
        if t is not None and (t.ndim < 2 or t.shape[0] != num_experts):
            raise ConversionError(f"{key}.{name} has shape {list(t.shape)}: the model has "
                                  f"{num_experts} experts, stacked on the first axis")
    if not mx.issubdtype(w.dtype, mx.floating) and f"{key}.scales" not in weights:
        packed = str(w.dtype).rsplit(".", 1)[-1]
        raise ConversionError(f"{key}.weight is packed ({packed}) but {key}.scales is missing: a "
                              "quantized checkpoint needs both (is a file missing or damaged?)")


def _convert_layer(weights, li, path, switch, tmp: Path, files: list[str], precisions: dict,
                   progress, refs: ReferenceBuilder | None = None,
                   quantized_source: bool = False, low_rounding: str = "fitted") -> LayerEntry:
    num_experts = num_experts_of(switch)
    proj_names = switch_linear_paths(switch)
    modules = dict(switch.named_modules())
    in_dims = {p: int(modules[p].weight.shape[-1]) for p in proj_names}
    entry = LayerEntry(li, path, num_experts)
    for pname, want in precisions.items():
        quant = {p: _projection_quant(weights, f"{path}.{p}", in_dims[p], want,
                                      pname == "high" and quantized_source)
                 for p in proj_names}
        if refs is not None and pname == "high" and all(
                quant[p] == _source_quantization(weights, f"{path}.{p}", in_dims[p]) for p in proj_names):
            ref = refs.entry(path, proj_names, quant, num_experts, _nominal_bits(quant, want["bits"]))
            if ref is not None:  # the source's own bytes, in place
                entry.precisions[pname] = ref
                progress.update(len(proj_names))
                continue
        shapes = {}
        for p in proj_names:
            sample = _expert_tensors(weights, f"{path}.{p}", in_dims[p], quant[p], 0, 1)
            shapes.update({f"{p}.{k}": (_MX_TO_ST[v.dtype], tuple(v.shape[1:])) for k, v in sample.items()})
        rel = f"{STORE_DIR}/{pname}/layer_{li:03d}.safetensors"
        writer = _LayerWriter(tmp / rel, num_experts, dict(sorted(shapes.items())),
                              compact=refs is not None)
        fitted = pname == "low" and low_rounding == "fitted"
        try:
            for p in proj_names:
                out_dims, in_dim = modules[p].weight.shape[1:]
                step = max(1, CHUNK_BYTES // (out_dims * in_dim * 4))
                for e0 in range(0, num_experts, step):
                    e1 = min(num_experts, e0 + step)
                    chunk = _expert_tensors(weights, f"{path}.{p}", in_dims[p], quant[p], e0, e1,
                                            fitted)
                    mx.eval(list(chunk.values()))
                    for name, arr in chunk.items():
                        data = _to_numpy(arr)
                        for e in range(e0, e1):
                            writer.write(e, f"{p}.{name}", data[e - e0])
                progress.update(1)
        except BaseException:
            os.close(writer.fd)  # (an interrupted layer: its file is written again on resume)
            raise
        files.append(rel)
        entry.precisions[pname] = PrecisionEntry(_nominal_bits(quant, want["bits"]), quant,
                                                 writer.layout, writer.finish(len(files) - 1))
    return entry


def _check_flags(bits: int | None, low_bits: int | None, group_size: int) -> None:
    """The widths and group size MLX quantizes with (before anything is read or written)."""
    def ints(xs):
        return ", ".join(map(str, xs))

    for flag, b in (("--bits", bits), ("--low-bits", low_bits)):
        if b is not None and (not isinstance(b, numbers.Integral) or b not in supported_bits()):
            raise ConversionError(f"{flag} {b}: MLX quantizes experts at {ints(supported_bits())} "
                                  "bits, not this width")
    if not isinstance(group_size, numbers.Integral) or group_size not in supported_group_sizes():
        raise ConversionError(f"--group-size {group_size}: MLX quantizes with groups of "
                              f"{ints(supported_group_sizes())} weights, not this size")
    for flag, b in (("--bits", bits), ("--low-bits", low_bits)):
        if b is not None and not mlx_quantizes(b, group_size):
            raise ConversionError(f"{flag} {b} with --group-size {group_size}: MLX cannot "
                                  "quantize with this combination")


def default_bits(config: dict, bits: int | None = None, low_bits: int | None = None) -> tuple[int, int]:
    """The (high, low) expert widths a conversion of ``config``'s checkpoint uses: the high one
    is an mlx-lm quantized source's own width (its experts are kept as they are), else ``bits``
    or 4; the low one ``low_bits``, or 2 (1 below a 2-bit high one). Raises ConversionError when
    a requested high width cannot apply to a quantized source."""
    q = config.get("quantization")
    src_bits = int(q["bits"]) if isinstance(q, dict) and q.get("bits") is not None else None
    if bits is None:
        bits = src_bits or 4
    elif src_bits is not None and bits != src_bits:
        raise ConversionError(
            f"--bits {bits}: the source is an mlx-lm checkpoint quantized at {src_bits} bits, and "
            f"the high precision keeps its experts as they are (read in place, or copied with "
            f"--copy) so that exact mode computes what mlx-lm does; it cannot hold {bits}-bit "
            f"experts. Omit --bits (or pass --bits {src_bits}), or convert from the float "
            f"checkpoint to choose another width")
    if low_bits is None:
        low_bits = min(2, bits - 1)
    if low_bits < 1:
        raise ConversionError(f"--bits {bits} leaves no smaller width for the low-precision copy")
    if low_bits >= bits:
        own = ", the source's own width" if src_bits is not None else ""
        raise ConversionError(f"--low-bits {low_bits} must be below --bits {bits}{own} (the low "
                              "precision is the smaller, cheaper copy of each expert)")
    return bits, low_bits


def _check_group_size(switches, group_size: int) -> None:
    """Every expert projection is quantized with ``group_size`` (the low copy at least)."""
    for path, switch in switches:
        modules = dict(switch.named_modules())
        for p in switch_linear_paths(switch):
            shape = tuple(modules[p].weight.shape)
            if shape[-1] % group_size:
                raise ConversionError(
                    f"--group-size {group_size} does not divide the input dimension {shape[-1]} of "
                    f"{path}.{p} (expert weights {list(shape)}); pass a group size that does "
                    f"(of {', '.join(map(str, supported_group_sizes()))})")


def _nominal_bits(quant: dict[str, dict], want: int) -> int:
    """The manifest's ``bits`` of an entry: the width its projections hold (``want`` when some
    do; a quantized source's own width when it keeps those)."""
    widths = {int(q["bits"]) for q in quant.values()}
    return want if want in widths else min(widths)
