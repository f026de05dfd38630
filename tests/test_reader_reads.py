"""How the reader moves bytes: reads the OS cuts short are continued where they stopped (also
across the buffers of one ``preadv``), a file that ends early is named with the byte it ended
at, records whose spans lie back to back are read with one call, and the whole store reads the
same through ``read_bytes`` as through the file."""

from __future__ import annotations

import os

import mlx.core as mx
import numpy as np
import pytest

import hobbit_mlx
import hobbit_mlx.reader as reader_module
from hobbit_mlx.reader import RecordReader, adjacent_runs
from hobbit_mlx.store import StoreError, load_manifest

TOKENS = mx.array([[(7 * i + 3) % 200 + 1 for i in range(24)]])


class ShortReads:
    """``os`` for the reader module whose ``preadv`` returns at most ``most`` bytes a call (as a
    signal or a network file system may) or, from ``end`` on, nothing (a file that ends)."""

    def __init__(self, most: int, end: int | None = None):
        self.most, self.end, self.calls = most, end, 0

    def __getattr__(self, name):
        return getattr(os, name)

    def preadv(self, fd, buffers, offset):
        self.calls += 1
        if self.end is not None and offset >= self.end:
            return 0
        left = self.most
        views = []
        for b in buffers:
            b = memoryview(b).cast("B")
            if left <= 0:
                break
            views.append(b[:left])
            left -= len(views[-1])
        return os.preadv(fd, views, offset)


def _logits(path, **options):
    model, _ = hobbit_mlx.load(path, expert_residency=0.0, exact=True, progress=False, **options)
    return model, np.array(model(TOKENS))


@pytest.mark.parametrize("most", [1000, 4097])  # cuts inside a buffer and across buffers
def test_reads_cut_short_are_continued_where_they_stopped(tiny_factory, monkeypatch, tmp_path,
                                                         most):
    from convert import convert

    src, _ = tiny_factory("qwen3_moe")
    # a store of its own: each record's tensors back to back (one preadv, several buffers)
    dst = convert(src, tmp_path / "model", copy=True, progress=False)
    _, want = _logits(dst)
    short = ShortReads(most)
    monkeypatch.setattr(reader_module, "os", short)
    model, got = _logits(dst)
    np.testing.assert_array_equal(got, want)
    stats = hobbit_mlx.offload_stats(model)
    assert stats["misses_high"] > 0
    assert short.calls > stats["misses_high"]  # several calls per record were needed


def test_a_file_that_ends_early_names_the_byte(tiny_factory, monkeypatch):
    _, dst = tiny_factory("qwen3_moe")
    manifest = load_manifest(dst)
    rec = manifest.layers[0].precisions["high"].records[0]
    f, off, n = rec.spans[0]
    assert n > 100
    reader = RecordReader(dst, manifest)
    try:  # the file ends 100 bytes into the record's first span, read 50 bytes a call
        monkeypatch.setattr(reader_module, "os", ShortReads(most=50, end=off + 100))
        with pytest.raises(StoreError, match=f"end of file at byte {off + 100} "
                                             f"\\(record needs {off}..{off + n}\\)") as e:
            reader.read_bytes(rec)
        assert str(e.value).startswith(str(dst / manifest.files[f]))
    finally:
        monkeypatch.undo()
        reader.close()


def test_read_bytes_gives_each_span_as_stored(tiny_factory):
    _, dst = tiny_factory("qwen3_moe")
    manifest = load_manifest(dst)
    reader = RecordReader(dst, manifest, verify="always")
    try:
        reader.drop_page_cache()  # (benchmarks read cold storage so; the bytes stay the same)
        total = 0
        for entry in manifest.layers[1].precisions.values():
            for rec in entry.records[:3]:
                pieces = reader.read_bytes(rec)
                assert len(pieces) == len(rec.spans)
                for (f, off, n), got in zip(rec.spans, pieces):
                    with open(dst / manifest.files[f], "rb") as fh:
                        fh.seek(off)
                        assert got.tobytes() == fh.read(n)
                total += rec.nbytes
        assert reader.bytes_read == total
    finally:
        reader.close()


def test_spans_back_to_back_in_one_file_form_one_run():
    spans = [(0, 0, 10), (0, 10, 5), (1, 15, 5), (1, 20, 1), (0, 15, 3), (0, 100, 4), (0, 104, 1)]
    assert adjacent_runs(spans) == [[0, 1], [2, 3], [4], [5, 6]]
    assert adjacent_runs([]) == []
    assert adjacent_runs([(2, 7, 3)]) == [[0]]
