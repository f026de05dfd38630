"""Small host data exchanged between the ranks: bytes and JSON, checked; a store's digest.

Its own module because every collective on host data (meeting in ``Pipeline.start``, agreeing on
a load, lockstep, every rank's statistics) goes through ``gather_bytes``, whose header and
checksum make a dead rank's row read as a lost connection, never as data; ``_GATHERS`` counts
this process's gathers here, once.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from ..store import manifest_path
from .errors import PipelineError


def settle() -> None:
    """Wait for the model's pending work: mlx-lm evaluates the next token ahead, and its
    collectives must finish before any other collective starts, or ranks pair them differently."""
    from mlx_lm.generate import generation_stream

    mx.synchronize(generation_stream)
    mx.synchronize()


# Each rank's row of ``gather_bytes`` starts with this header: a peer that died (or failed and
# left) leaves its row holding whatever the buffer held, stale bytes or garbage, which must read
# as a lost connection, never as data (it was decoded as JSON, and the user sent after a JSON file).
_MAGIC = 0x686F6262  # "hobb"
_GATHERS = [0]  # gathers this process ran: every rank runs the same ones, so counts match


def _lost(rank: int) -> PipelineError:
    return PipelineError(f"lost the connection to pipeline rank {rank} (what it sent did not "
                         "arrive intact); did it exit or fail?")


def gather_bytes(group: mx.distributed.Group, data: bytes) -> list[bytes]:
    """Every rank's ``data``, in rank order (two all_gathers: a header with the length, then the
    padded bytes). A row that does not carry this gather's header, or whose bytes do not match
    their checksum, raises a ``PipelineError`` naming the lost rank."""
    settle()
    _GATHERS[0] += 1
    seq = _GATHERS[0] % (1 << 31)
    crc = zlib.crc32(data) & 0x7FFFFFFF
    heads = np.array(mx.distributed.all_gather(
        mx.array([[_MAGIC, seq, group.rank(), len(data), crc]], dtype=mx.int32), group=group,
        stream=mx.cpu)).reshape(group.size(), 5)
    for r, (magic, s, rank, n, _) in enumerate(heads.tolist()):
        if (magic, s, rank) != (_MAGIC, seq, r) or not 0 <= n < (1 << 30):
            raise _lost(r)
    lengths = [int(n) for n in heads[:, 3]]
    buf = np.zeros((1, max(lengths + [1])), dtype=np.int32)
    buf[0, :len(data)] = np.frombuffer(data, dtype=np.uint8)
    rows = np.array(mx.distributed.all_gather(mx.array(buf), group=group, stream=mx.cpu))
    out = [bytes(rows[r, :n].astype(np.uint8)) for r, n in enumerate(lengths)]
    for r, b in enumerate(out):
        if zlib.crc32(b) & 0x7FFFFFFF != int(heads[r, 4]):
            raise _lost(r)
    return out


def gather_json(group: mx.distributed.Group, obj: Any) -> list[Any]:
    """Every rank's ``obj`` (JSON), in rank order; a lost rank raises a ``PipelineError``."""
    rows = gather_bytes(group, json.dumps(obj, default=str).encode())
    out = []
    for r, b in enumerate(rows):
        try:
            out.append(json.loads(b))
        except ValueError:  # (UnicodeDecodeError too) intact by its checksum, yet no JSON
            raise _lost(r) from None
    return out


def store_digest(model_dir: str | Path) -> str:
    """What identifies a store across machines: its manifest and config, hashed."""
    h = hashlib.sha256(manifest_path(model_dir).read_bytes())
    cfg = Path(model_dir) / "config.json"
    if cfg.is_file():
        h.update(cfg.read_bytes())
    return h.hexdigest()
