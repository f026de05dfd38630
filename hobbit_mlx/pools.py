"""Slot pools: resident experts live in preallocated arrays that ``gather_qmm`` indexes directly.

A pool holds ``S`` experts of one layout (one precision of every MoE layer whose expert tensors
have the same names, dtypes and shapes): for each tensor an MLX array ``[S, *shape]``, allocated
and evaluated once. A layer call remaps the router's expert ids to slots on the device
(``remap[indices]``) and runs mlx-lm's own switch module on the pool, so there is no per-call
stacking and exact mode computes on the very bytes mlx-lm would.

Misses are read with ``preadv`` straight into a slot's memory through numpy views of the pool
buffers (taken once, after the arrays are evaluated). The pool arrays are never assigned to by
MLX (``pool[s] = x`` would copy the whole pool and leave the views pointing at freed memory), so
the views stay valid until the pool is rebuilt. Writing a slot is safe only when no pending graph
reads it: ``cache.SlotCache`` decides that with use epochs.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from .store import FLOAT_DTYPES, PrecisionEntry, TensorLayout

_MX_DTYPES = {
    "U8": mx.uint8, "I8": mx.int8, "U16": mx.uint16, "I16": mx.int16, "F16": mx.float16,
    "BF16": mx.bfloat16, "U32": mx.uint32, "I32": mx.int32, "F32": mx.float32,
    "U64": mx.uint64, "I64": mx.int64,
}


def pool_signature(entry: PrecisionEntry) -> tuple:
    """Layers whose experts have this signature can share one pool (a pool's read plan maps
    each span's bytes onto its tensors, so the spans' layout is part of it)."""
    return (tuple((t.name, t.dtype, t.shape, t.span, t.offset) for t in entry.tensors),
            tuple(sorted((k, tuple(sorted(v.items()))) for k, v in entry.quant.items())))


def resident_dtype(t: TensorLayout, float_dtype: mx.Dtype | None) -> mx.Dtype:
    """The dtype a tensor has once resident: floats take the compute dtype, if one is set."""
    if float_dtype is not None and t.dtype in FLOAT_DTYPES:
        return float_dtype
    return _MX_DTYPES[t.dtype]


def byte_view(a: mx.array) -> np.ndarray:
    """A writable uint8 view ``[S, bytes per slot]`` of an evaluated MLX array (no copy)."""
    if a.dtype == mx.bfloat16:  # numpy has no bfloat16: view the buffer as uint16
        flat = np.frombuffer(memoryview(a), dtype=np.uint16)
    else:
        flat = np.asarray(a).reshape(-1)
    view = flat.view(np.uint8).reshape(a.shape[0], -1)
    if not view.flags.writeable:  # the buffer is MLX's; numpy marks frombuffer views read-only
        view.flags.writeable = True
    return view


@dataclass(frozen=True)
class Destination:
    """Where one stored tensor's bytes go: a slot's bytes, converted when the dtype differs."""

    tensor: TensorLayout
    convert: str | None  # None: stored bytes are the resident bytes; else e.g. "BF16->F32"


class SlotPool:
    """``slots`` resident experts of one layout, as one MLX array per tensor."""

    def __init__(self, entry: PrecisionEntry, slots: int, float_dtype: mx.Dtype | None = None):
        self.slots = int(slots)
        self.tensors = list(entry.tensors)
        self.quant = entry.quant
        self.float_dtype = float_dtype
        self.dtypes = {t.name: resident_dtype(t, float_dtype) for t in self.tensors}
        self.destinations = []
        for t in self.tensors:
            stored = _MX_DTYPES[t.dtype]
            conv = None if stored == self.dtypes[t.name] else f"{t.dtype}->{_dtype_name(self.dtypes[t.name])}"
            if conv is not None and conv not in _CONVERTERS:
                raise ValueError(f"cannot hold {t.name} stored as {t.dtype} in {self.dtypes[t.name]}")
            self.destinations.append(Destination(t, conv))
        self.slot_nbytes = sum(self.tensor_slot_nbytes().values())
        self.arrays: dict[str, mx.array] = {}
        self._views: dict[str, np.ndarray] = {}
        self._read_plans: dict[tuple, list] = {}
        self.allocate(self.slots)

    @property
    def nbytes(self) -> int:
        return self.slots * self.slot_nbytes

    def tensor_slot_nbytes(self) -> dict[str, int]:
        """Resident bytes of each tensor in one slot (each tensor is one array across slots)."""
        return {t.name: int(np.prod(t.shape)) * self.dtypes[t.name].size for t in self.tensors}

    def allocate(self, slots: int) -> None:
        """(Re)allocate every array for ``slots`` slots; earlier contents and views are dropped."""
        self.arrays, self._views = {}, {}
        self.slots = int(slots)
        if self.slots == 0:
            return
        self.arrays = {t.name: mx.zeros((self.slots, *t.shape), dtype=self.dtypes[t.name])
                       for t in self.tensors}
        mx.eval(list(self.arrays.values()))  # evaluated before any view is taken
        self._views = {name: byte_view(a) for name, a in self.arrays.items()}

    def release(self) -> None:
        self.arrays, self._views, self.slots = {}, {}, 0

    def read_plan(self, span: int, length: int) -> list[tuple]:
        """How one record span's bytes map onto a slot: [(tensor name or None for a gap, bytes,
        conversion or None)], in file order (the same for every expert of the pool)."""
        key = (span, length)
        plan = self._read_plans.get(key)
        if plan is None:
            plan, pos = [], 0
            for d in sorted((d for d in self.destinations if d.tensor.span == span),
                            key=lambda d: d.tensor.offset):
                if d.tensor.offset > pos:
                    plan.append((None, d.tensor.offset - pos, None))
                plan.append((d.tensor.name, d.tensor.nbytes, d.convert))
                pos = d.tensor.offset + d.tensor.nbytes
            if pos < length:
                plan.append((None, length - pos, None))
            self._read_plans[key] = plan
        return plan

    def slot_bytes(self, name: str, slot: int) -> np.ndarray:
        """The writable bytes of one tensor in one slot."""
        return self._views[name][slot]


def _dtype_name(d: mx.Dtype) -> str:
    return {v: k for k, v in _MX_DTYPES.items()}[d]


def _bf16_to_f32(src: np.ndarray, dst: np.ndarray) -> None:
    dst.view(np.uint32)[:] = src.view(np.uint16).astype(np.uint32) << 16


def _f16_to_f32(src: np.ndarray, dst: np.ndarray) -> None:
    dst.view(np.float32)[:] = src.view(np.float16)


def _f32_to_f16(src: np.ndarray, dst: np.ndarray) -> None:
    dst.view(np.float16)[:] = src.view(np.float32)


def _to_bf16(src32: np.ndarray, dst: np.ndarray) -> None:
    """float32 -> bfloat16, rounding to nearest even (as MLX's astype does)."""
    u = src32.view(np.uint32).astype(np.uint64)
    dst.view(np.uint16)[:] = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


_CONVERTERS = {
    "BF16->F32": _bf16_to_f32,
    "F16->F32": _f16_to_f32,
    "F32->F16": _f32_to_f16,
    "F32->BF16": _to_bf16,
    "F16->BF16": lambda src, dst: _to_bf16(src.view(np.float16).astype(np.float32), dst),
    # (bf16 scales, as mlx-community checkpoints store them, held in float16: an M1 / M2 GPU
    # has no native bfloat16)
    "BF16->F16": lambda src, dst: _f32_to_f16(
        (src.view(np.uint16).astype(np.uint32) << 16).view(np.float32), dst),
}


def convert_into(conv: str, src: np.ndarray, dst: np.ndarray) -> None:
    """Write stored bytes ``src`` into resident bytes ``dst`` converting floats (numpy only)."""
    _CONVERTERS[conv](src, dst)
