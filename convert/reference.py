"""Convert by reference: high-precision records that point into the source's safetensors files.

An mlx-lm quantized checkpoint (an mlx-community 4-bit model, say) already holds every expert at
the store's high precision, stacked ``[E, ...]`` per tensor, so expert e of a tensor is one
contiguous byte range of its file. Pointing the records there instead of copying them is what
keeps a 17-200 GB download from needing a second copy on disk. Only tensors that mlx-lm's
``sanitize`` leaves exactly as loaded are referenced (anything it rebuilt has no bytes on disk).
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from pathlib import Path

from hobbit_mlx.store import (DTYPE_ITEMSIZE, PrecisionEntry, Record, TensorLayout, file_stamp,
                              read_safetensors_header)


@dataclass(frozen=True)
class SourceTensor:
    """Where one tensor of the source lies on disk (the real file, not a symlink to it)."""

    path: str
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the tensor's data in ``path``
    nbytes: int


def index_source(files: list[Path]) -> dict[str, SourceTensor]:
    """Every tensor of the source files, by name. Paths are resolved through symlinks, so a hub
    snapshot's links point the store at the cache's blobs, which stay when snapshots change."""
    out = {}
    for f in files:
        real = os.path.realpath(f)
        start, meta = read_safetensors_header(real)
        for name, t in meta.items():
            begin, end = t["data_offsets"]
            out[name] = SourceTensor(real, t["dtype"], tuple(t["shape"]), start + begin, end - begin)
    return out


def unchanged_by_sanitize(loaded: dict, sanitized: dict) -> set[str]:
    """Names whose sanitized array is the very array loaded from the file (so its bytes on disk
    are the bytes mlx-lm computes with)."""
    return {k for k, v in sanitized.items() if loaded.get(k) is v}


class ReferenceBuilder:
    """Builds high-precision entries that point into source files, and keeps the list of files
    they reference (for the manifest's ``files`` and ``references``)."""

    def __init__(self, index: dict[str, SourceTensor], unchanged: set[str], weights: dict,
                 files: list[str], references: dict[str, dict]):
        """``weights``: after mlx-lm's sanitize; ``unchanged``: the names it left as loaded."""
        self.index = index
        self.weights = weights
        self.unchanged = unchanged
        self.files = files
        self.references = references
        self._fds: dict[str, int] = {}

    def entry(self, module_path: str, proj_names: list[str], quant: dict, num_experts: int,
              bits: int) -> PrecisionEntry | None:
        """The layer's high entry by reference, or None when a tensor cannot be referenced."""
        keys = {}
        for p in proj_names:
            for kind in ("weight", "scales", "biases", "bias"):
                key = f"{module_path}.{p}.{kind}"
                if key in self.weights:
                    keys[f"{p}.{kind}"] = key
        for name, key in keys.items():
            t = self.index.get(key)
            if (key not in self.unchanged or t is None or not t.shape or t.shape[0] != num_experts
                    or t.dtype not in DTYPE_ITEMSIZE or t.nbytes % num_experts):
                return None
        # Spans in name order: every layer then has the same layout and shares a pool.
        order = sorted(keys)
        layout = [TensorLayout(n, self.index[keys[n]].dtype, self.index[keys[n]].shape[1:], i, 0)
                  for i, n in enumerate(order)]
        records = []
        for e in range(num_experts):
            spans, crcs = [], []
            for n in order:
                t = self.index[keys[n]]
                per = t.nbytes // num_experts
                span = (self._file_index(t.path), t.offset + e * per, per)
                spans.append(span)
                crcs.append(zlib.crc32(os.pread(self._fd(t.path), per, span[1])))
            records.append(Record(tuple(spans), tuple(crcs)))
        return PrecisionEntry(bits, quant, layout, records)

    def _file_index(self, path: str) -> int:
        if path not in self.files:
            self.files.append(path)
            self.references[path] = file_stamp(path)
        return self.files.index(path)

    def _fd(self, path: str) -> int:
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY)
        return self._fds[path]

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}


def link_dense(files: list[Path], out: Path, references: dict[str, dict]) -> list[str]:
    """Link the source's weight files into ``out`` under names mlx-lm's loader picks up, so the
    dense weights are read from the source (the loader drops the expert tensors, unread)."""
    names = []
    for i, f in enumerate(sorted(files)):
        real = os.path.realpath(f)
        name = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        os.symlink(real, out / name)
        references[real] = file_stamp(real)
        names.append(name)
    return names
