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


def _gappy_store(tmp_path, truncate_at: int | None = None):
    """A record of two spans back to back in one file (one ``preadv`` of several buffers):
    span 0 = [a: 64 x U32][gap 64 B][b: 64 x F16][gap 32 B], span 1 = [c: 16 x U32]. Read into a
    float32 pool, ``b`` is converted; the gaps are skipped. ``truncate_at``: the file ends there."""
    from hobbit_mlx.store import Manifest, PrecisionEntry, Record, TensorLayout

    rng = np.random.default_rng(7)
    a = rng.integers(0, 2**32, size=64, dtype=np.uint32)
    b = rng.standard_normal(64).astype(np.float16)
    c = rng.integers(0, 2**32, size=16, dtype=np.uint32)
    raw = a.tobytes() + b"\xaa" * 64 + b.tobytes() + b"\xbb" * 32 + c.tobytes()
    path = tmp_path / "experts.bin"
    path.write_bytes(raw if truncate_at is None else raw[:truncate_at])
    import zlib
    spans = ((0, 0, 480), (0, 480, 64))
    crcs = tuple(zlib.crc32(raw[o:o + n]) for _, o, n in spans)
    tensors = [TensorLayout("a", "U32", (64,), 0, 0), TensorLayout("b", "F16", (64,), 0, 320),
               TensorLayout("c", "U32", (16,), 1, 0)]
    entry = PrecisionEntry(4, {}, tensors, [Record(spans, crcs)])
    return Manifest("test", 1, 1, [str(path)], []), entry, dict(a=a, b=b, c=c)


@pytest.mark.parametrize("direct", [False, True])
def test_a_record_with_gaps_and_converted_floats_lands_as_stored(tmp_path, direct):
    """Bytes between tensors are skipped and a float tensor stored in float16 lands converted in
    a float32 pool; the tensors around them land byte for byte (a record read in place from a
    checkpoint whose dtypes or layout differ from the pool's)."""
    from hobbit_mlx.pools import SlotPool

    manifest, entry, data = _gappy_store(tmp_path)
    try:
        reader = RecordReader(tmp_path, manifest, workers=1, direct=direct)
    except StoreError:
        pytest.skip("this file system refuses O_DIRECT")
    pool = SlotPool(entry, 2, float_dtype=mx.float32)
    try:
        assert reader.read_into(entry, 0, pool, 1) == 544
    finally:
        reader.close()
    np.testing.assert_array_equal(np.array(pool.arrays["a"][1]), data["a"])
    assert pool.arrays["b"].dtype == mx.float32
    np.testing.assert_array_equal(np.array(pool.arrays["b"][1]), data["b"].astype(np.float32))
    np.testing.assert_array_equal(np.array(pool.arrays["c"][1]), data["c"])


def test_a_file_that_ends_inside_a_read_of_several_buffers_names_the_byte(tmp_path):
    from hobbit_mlx.pools import SlotPool

    manifest, entry, _ = _gappy_store(tmp_path, truncate_at=400)  # inside b, after a and a gap
    reader = RecordReader(tmp_path, manifest, workers=1)
    try:
        with pytest.raises(StoreError,
                           match=r"end of file at byte 400 \(record needs 0\.\.544\)") as e:
            reader.read_into(entry, 0, SlotPool(entry, 1, float_dtype=mx.float32), 0)
    finally:
        reader.close()
    assert str(e.value).startswith(manifest.files[0])


def test_io_workers_bound_the_reads_at_once_and_prefetch_reads_take_half(tmp_path):
    """``io_workers=2``: two reads at once, prefetch reads on one thread of their own (so a read
    the model waits for never queues behind them); the threads are named for shutdown checks.
    Prefetch reads in flight make the storage backlog that prefetch admission looks at; it is
    0 before any and once they are done."""
    import threading

    manifest, entry, _ = _gappy_store(tmp_path)
    before = set(threading.enumerate())
    reader = RecordReader(tmp_path, manifest, workers=2)
    go, cond, started = threading.Event(), threading.Condition(), []

    def blocking_read(entry, expert, pool, slot, background=False, ticket=None):
        with cond:
            started.append(background)
            cond.notify_all()
        assert go.wait(30)
        return 7

    reader.read_into = blocking_read
    futures = []
    try:
        assert reader.backlog_seconds() == 0.0
        futures += [reader.submit_into(entry, 0, None, 0) for _ in range(3)]
        futures += [reader.submit_into(entry, 0, None, 0, background=True) for _ in range(3)]
        names = sorted(t.name.split("_")[0] for t in set(threading.enumerate()) - before
                       if "hobbit" in t.name)
        assert names == ["hobbit-io", "hobbit-io", "hobbit-prefetch"]
        with cond:
            assert cond.wait_for(lambda: len(started) >= 3, 30)
        assert sorted(started) == [False, False, True]
        assert reader.backlog_seconds() > 0.0
    finally:
        go.set()
        reader.close()
    assert [f.result() for f in futures] == [7] * 6
    assert reader.backlog_seconds() == 0.0


def test_read_time_estimates_follow_the_reads_timed(tmp_path, monkeypatch):
    """The reader's estimates of one read's time and of a byte's cost (whether the model waits
    on a read inline; what a prefetch guess costs) follow the reads it times: on a clock where
    every read takes 2 ms, after 40 reads they are 2 ms and 2 ms / the record's bytes."""
    import time

    from hobbit_mlx.pools import SlotPool

    class Clock:  # ``time`` for the reader module: every reading moves 2 ms on
        now = 0.0

        def __getattr__(self, name):
            return getattr(time, name)

        def perf_counter(self):
            self.now += 2e-3
            return self.now

    manifest, entry, _ = _gappy_store(tmp_path)
    reader = RecordReader(tmp_path, manifest, workers=1)
    pool = SlotPool(entry, 1, float_dtype=mx.float32)
    monkeypatch.setattr(reader_module, "time", Clock())
    try:
        for _ in range(40):
            reader.read_into(entry, 0, pool, 0)
    finally:
        monkeypatch.undo()
        reader.close()
    assert reader.read_seconds == pytest.approx(2e-3, rel=0.02)
    assert reader.seconds_per_byte() == pytest.approx(2e-3 / 544, rel=0.05)


def test_reads_in_parallel_share_the_time_storage_was_busy(tmp_path, monkeypatch):
    """Two reads in flight together for 1 s moved two records' bytes in 1 s: a byte costs
    1 s / (2 records), not 1 s / (1 record) as each read's own wait would say. (A prompt's
    parallel reads once made a warm page cache look dearer than compute, and the lossy techniques
    served some of its calls.)"""
    import threading
    import time

    from hobbit_mlx.pools import SlotPool

    class Clock:  # ``time`` for the reader module, moved by the test
        now = 0.0

        def __getattr__(self, name):
            return getattr(time, name)

        def perf_counter(self):
            return self.now

    manifest, entry, _ = _gappy_store(tmp_path)
    reader = RecordReader(tmp_path, manifest, workers=2)
    pool = SlotPool(entry, 2, float_dtype=mx.float32)
    clock, inside, go = Clock(), threading.Semaphore(0), threading.Event()
    real = reader._read_record

    def held(*args):
        inside.release()
        go.wait(10)
        real(*args)

    monkeypatch.setattr(reader_module, "time", clock)
    monkeypatch.setattr(reader, "_read_record", held)
    try:
        futures = [reader.submit_into(entry, 0, pool, s) for s in (0, 1)]
        assert inside.acquire(timeout=10) and inside.acquire(timeout=10)  # both in flight
        clock.now = 1.0
        go.set()
        nbytes = [f.result(timeout=10) for f in futures]
    finally:
        go.set()
        monkeypatch.undo()
        reader.close()
    start = 1e-9  # the estimate before any read
    assert reader._byte_seconds == pytest.approx(start + 0.1 * (1.0 / sum(nbytes) - start))
    one_read = 1e-3  # each read's own time (whether a read is waited for inline) counts in full
    for _ in nbytes:
        one_read += 0.1 * (1.0 - one_read)
    assert reader.read_seconds == pytest.approx(one_read)


def test_a_python_without_preadv_reads_the_same(tiny_factory, monkeypatch):
    """Some Python builds lack ``os.preadv``: the reader then reads buffer by buffer, and the
    model computes the same."""
    src, dst = tiny_factory("qwen3_moe")
    _, want = _logits(dst)

    class NoPreadv:
        def __getattr__(self, name):
            if name == "preadv":
                raise AttributeError(name)
            return getattr(os, name)

    monkeypatch.setattr(reader_module, "os", NoPreadv())
    model, got = _logits(dst)
    np.testing.assert_array_equal(got, want)
    assert hobbit_mlx.offload_stats(model)["misses_high"] > 0


def test_a_dropped_model_closes_its_store_files(tiny_factory):
    """A model dropped without ``close()`` lets its store files go with it: they stayed open, 9
    per load, and a process loading model after model ran out of descriptors (~200 loads)."""
    import gc

    _, dst = tiny_factory("qwen3_moe")

    def open_files() -> int:
        return len(os.listdir("/dev/fd"))  # (Linux and macOS)

    model, _ = hobbit_mlx.load(dst, expert_residency=0.5, progress=False)
    model(TOKENS)
    del model
    gc.collect()
    before = open_files()
    for _ in range(3):
        model, _ = hobbit_mlx.load(dst, expert_residency=0.5, progress=False)
        assert open_files() > before  # (it holds them while it lives)
        model(TOKENS)
        del model
        gc.collect()
    assert open_files() == before
    reader = RecordReader(dst, load_manifest(dst))
    reader.close()
    del reader
    gc.collect()  # (closed once: the finalizer has nothing left to close)
    assert open_files() == before
