"""Reading expert records from the store: a pool of ``pread`` workers and bytes -> mx.array.

Reads run in threads (``os.preadv`` releases the GIL), so several experts of one layer are read in
parallel and a background prefetcher can read while the model computes. Each record's CRC32 is
checked the first time it is read in this process (``verify="first"``), so a corrupt store fails
with a clear error instead of producing garbage.
"""

from __future__ import annotations

import os
import threading
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import mlx.core as mx
import numpy as np

from .store import Manifest, PrecisionEntry, Record, StoreError

_NP_DTYPES = {
    "U8": np.uint8, "I8": np.int8, "U16": np.uint16, "I16": np.int16, "F16": np.float16,
    "BF16": np.uint16, "U32": np.uint32, "I32": np.int32, "F32": np.float32,
    "U64": np.uint64, "I64": np.int64, "F64": np.float64,
}


class RecordReader:
    """Reads records of one hobbit model's expert store; thread-safe."""

    def __init__(self, model_dir: str | Path, manifest: Manifest, *, workers: int = 8,
                 verify: str = "first", direct: bool = False):
        if verify not in ("first", "always", "never"):
            raise ValueError(f"verify must be 'first', 'always' or 'never', not {verify!r}")
        self.model_dir = Path(model_dir)
        self.manifest = manifest
        self.verify = verify
        self._verified: set[tuple[int, int, int]] = set()
        self._lock = threading.Lock()
        self._fds = []
        flags = os.O_RDONLY
        if direct and hasattr(os, "O_DIRECT"):
            flags |= os.O_DIRECT
        self.direct = bool(flags & getattr(os, "O_DIRECT", 0))
        for rel in manifest.files:
            path = self.model_dir / rel
            try:
                self._fds.append(os.open(path, flags))
            except OSError as e:
                self.close()
                raise StoreError(f"{path}: cannot open expert store file ({e.strerror})") from None
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="hobbit-io")
        # Prefetch reads queue apart, so a read the compute waits for never waits behind them.
        self.background_pool = ThreadPoolExecutor(max_workers=max(1, workers // 2),
                                                  thread_name_prefix="hobbit-prefetch")
        self.bytes_read = 0

    def close(self) -> None:
        for name in ("background_pool", "pool"):
            if getattr(self, name, None) is not None:
                getattr(self, name).shutdown(wait=True)
                setattr(self, name, None)
        for fd in self._fds:
            os.close(fd)
        self._fds = []

    def drop_page_cache(self) -> None:
        """Ask the OS to forget the store's cached pages, for cold-storage measurements."""
        if hasattr(os, "posix_fadvise"):
            for fd in self._fds:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def _read_span(self, file_idx: int, offset: int, length: int) -> np.ndarray:
        # O_DIRECT needs an aligned buffer and length; records start page-aligned.
        want = (length + 4095) // 4096 * 4096 if self.direct else length
        buf = _aligned_empty(want) if self.direct else np.empty(length, dtype=np.uint8)
        view = memoryview(buf)
        fd = self._fds[file_idx]
        got = 0
        while got < length:
            n = os.preadv(fd, [view[got:want]], offset + got)
            if n <= 0:
                path = self.model_dir / self.manifest.files[file_idx]
                raise StoreError(f"{path}: unexpected end of file at byte {offset + got} "
                                 f"(record needs {offset}..{offset + length}); the store is truncated")
            got += n
        return buf[:length]

    def read_bytes(self, record: Record) -> list[np.ndarray]:
        """Read every span of a record, checking CRCs as configured."""
        out = []
        for span, crc in zip(record.spans, record.crc32):
            buf = self._read_span(*span)
            if self.verify == "always" or (self.verify == "first" and span not in self._verified):
                if zlib.crc32(buf) != crc:
                    path = self.model_dir / self.manifest.files[span[0]]
                    raise StoreError(f"{path}: checksum mismatch in bytes {span[1]}..{span[1] + span[2]}"
                                     " (the expert store is corrupt; reconvert the model)")
                with self._lock:
                    self._verified.add(span)
            out.append(buf)
        with self._lock:
            self.bytes_read += record.nbytes
        return out

    def read(self, entry: PrecisionEntry, expert: int, dtype: mx.Dtype | None = None) -> dict[str, mx.array]:
        """Read one expert at one precision into MLX arrays (floating tensors cast to ``dtype``)."""
        spans = self.read_bytes(entry.records[expert])
        arrays = {}
        for t in entry.tensors:
            raw = spans[t.span][t.offset:t.offset + t.nbytes].view(_NP_DTYPES[t.dtype]).reshape(t.shape)
            a = mx.array(raw)
            if t.dtype == "BF16":
                a = a.view(mx.bfloat16)
            if dtype is not None and mx.issubdtype(a.dtype, mx.floating) and a.dtype != dtype:
                a = a.astype(dtype)
            arrays[t.name] = a
        mx.eval(list(arrays.values()))
        return arrays

    def submit(self, entry: PrecisionEntry, expert: int, dtype: mx.Dtype | None = None,
               background: bool = False) -> Future:
        """Read in a worker thread; ``background`` (prefetch) reads use their own queue."""
        return (self.background_pool if background else self.pool).submit(self.read, entry, expert, dtype)


def _aligned_empty(length: int, align: int = 4096) -> np.ndarray:
    """A uint8 buffer whose address is a multiple of ``align`` (for O_DIRECT)."""
    raw = np.empty(length + align, dtype=np.uint8)
    start = (-raw.ctypes.data) % align
    return raw[start:start + length]
