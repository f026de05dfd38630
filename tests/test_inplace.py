"""Converting an mlx-lm quantized checkpoint by reference: no second copy of its 4-bit experts."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest

import convert as converter
import hobbit_mlx
from convert.__main__ import main as convert_main
from hobbit_mlx.loader import REFERENCE_MODEL
from hobbit_mlx.pools import SlotPool
from hobbit_mlx.reader import RecordReader, RunModeTrial
from hobbit_mlx.storage import StorageModel
from hobbit_mlx.store import (Manifest, PrecisionEntry, Record, StoreError, TensorLayout,
                              load_manifest)

PROMPT = [[(7 * i + 3) % 200 + 1 for i in range(40)]]


def disk_bytes(root: Path) -> int:
    """What a directory takes on disk, as ``du`` counts it (links count as links)."""
    total = 0
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            st = os.lstat(os.path.join(dirpath, name))
            total += max(st.st_blocks * 512, st.st_size if not os.path.isdir(
                os.path.join(dirpath, name)) else 0)
    return total


@pytest.fixture()
def source(tmp_path) -> Path:
    """A private mlx-lm 4-bit checkpoint (the bundled reference model) that a test may move."""
    return Path(shutil.copytree(REFERENCE_MODEL, tmp_path / "mlx-4bit"))


def test_by_reference_writes_only_the_low_copies(source, tmp_path):
    dst = converter.convert(source, tmp_path / "hobbit", progress=False)
    manifest = load_manifest(dst)
    blob = os.path.realpath(source / "model.safetensors")
    assert manifest.references.keys() == {blob}
    assert manifest.references[blob]["size"] == os.path.getsize(blob)
    for layer in manifest.layers:
        high = layer.precisions["high"]
        assert {manifest.files[f] for r in high.records for f, _, _ in r.spans} == {blob}
        assert len(high.records[0].spans) == len(high.tensors)  # one span per stacked tensor
    assert not any((dst / "experts" / "high").glob("*"))
    assert os.path.islink(dst / "model-00001-of-00001.safetensors")
    growth, low = disk_bytes(dst), manifest.expert_bytes("low")
    assert growth <= 1.15 * low, (growth, low)
    # --copy keeps today's store: page-aligned copies of both precisions and the dense weights
    copied = tmp_path / "copied"
    assert convert_main([str(source), str(copied), "--copy", "--quiet"]) == 0
    assert load_manifest(copied).references == {}
    assert disk_bytes(copied) > disk_bytes(source)


def test_by_reference_is_exact(source, tmp_path):
    dst = converter.convert(source, tmp_path / "hobbit", progress=False)
    ref, tokenizer = mlx_lm.load(str(source))
    ref.set_dtype(mx.float32)
    tokens = mx.array(PROMPT)
    expected = ref(tokens)
    model, _ = hobbit_mlx.load(dst, expert_residency=0.25, exact=True, progress=False)
    np.testing.assert_array_equal(np.array(model(tokens)), np.array(expected))
    assert hobbit_mlx.offload_stats(model)["misses_high"] > 0
    want = mlx_lm.generate(ref, tokenizer, "def fibonacci(n):", max_tokens=16)
    model, tokenizer = hobbit_mlx.load(dst, expert_residency=0.3, exact=True, progress=False)
    assert hobbit_mlx.generate(model, tokenizer, "def fibonacci(n):", max_tokens=16) == want


@pytest.mark.parametrize("damage", ["moved", "changed", "touched"])
def test_moved_or_changed_source_names_file_and_command(source, tmp_path, damage):
    dst = converter.convert(source, tmp_path / "hobbit", progress=False)
    weights = source / "model.safetensors"
    if damage == "moved":
        weights.rename(tmp_path / "elsewhere.safetensors")
    elif damage == "changed":
        with open(weights, "ab") as f:
            f.write(b"\0" * 16)
    else:
        st = weights.stat()
        os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    what = "missing" if damage == "moved" else "changed"
    with pytest.raises(StoreError, match=rf"{weights}: .*{what}.*python -m convert {source} {dst} --force"):
        hobbit_mlx.load(dst, progress=False)


def test_a_source_rewritten_under_a_running_model_is_named_with_the_command(source, tmp_path):
    """The source changes after load (its checks passed) and after its records were verified:
    the next read of a changed record says the source changed and how to rebuild, not that the
    store is corrupt (nor garbage: the record was verified once)."""
    from hobbit_mlx.loader import runtime_of

    dst = converter.convert(source, tmp_path / "hobbit", progress=False)
    model, _ = hobbit_mlx.load(dst, expert_residency=0.0, exact=True, progress=False)
    tokens = mx.array(PROMPT)
    mx.eval(model(tokens))
    manifest = runtime_of(model).manifest
    weights = source / "model.safetensors"
    with open(weights, "r+b") as f:  # every 4-bit record of layer 0, flipped in the middle
        for rec in manifest.layers[0].precisions["high"].records:
            _, off, n = rec.spans[0]
            f.seek(off + n // 2)
            b = f.read(1)
            f.seek(off + n // 2)
            f.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(StoreError, match=rf"source checkpoint .* has changed.*python -m convert {source} {dst} --force"):
        mx.eval(model(tokens))


def test_cached_conversion_follows_a_changed_source(source, tmp_path, monkeypatch):
    """load() of an unconverted directory owns its cached store: a stale one is converted again."""
    from hobbit_mlx.loader import resolve_model

    monkeypatch.setenv("HOBBIT_MLX_CACHE", str(tmp_path / "cache"))
    target = resolve_model(source, progress=False)
    assert resolve_model(source, progress=False) == target  # converted once
    weights = source / "model.safetensors"
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert resolve_model(source, progress=False) == target
    again = load_manifest(target)  # (checks the references)
    assert again.references[str(weights.resolve())]["mtime_ns"] == st.st_mtime_ns + 10**9


def test_hub_id_resolves_to_cache_blobs(tmp_path, monkeypatch):
    """A hub id's snapshot files are symlinks into blobs/: the store points at the blobs."""
    import huggingface_hub.constants

    repo = tmp_path / "hub" / "models--tiny-org--ref-4bit"
    revision = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / revision
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    for i, f in enumerate(sorted(REFERENCE_MODEL.iterdir())):
        blob = repo / "blobs" / f"{i:040x}"
        shutil.copy2(f, blob)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / f.name)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    dst = converter.convert("tiny-org/ref-4bit", tmp_path / "hobbit", progress=False)
    manifest = load_manifest(dst)
    blob = os.path.realpath(snapshot / "model.safetensors")
    assert Path(blob).parent == (repo / "blobs").resolve()
    assert list(manifest.references) == [blob]
    assert manifest.files[0] == blob
    assert os.readlink(dst / "model-00001-of-00001.safetensors") == blob
    assert manifest.source == "tiny-org/ref-4bit"


def test_a_hub_ids_newer_revision_in_the_cache_is_converted_again(tmp_path, monkeypatch):
    """mlx-lm (or huggingface-cli) downloaded a newer revision of a hub id: the cached
    conversion of the old one kept being loaded (its old blobs are still there, unchanged),
    where mlx_lm.load(id) loads the new one."""
    import huggingface_hub.constants

    from hobbit_mlx.loader import resolve_model

    repo = tmp_path / "hub" / "models--tiny-org--ref-4bit"
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()

    def revision(rev: str, weights: Path) -> Path:
        snapshot = repo / "snapshots" / rev
        snapshot.mkdir(parents=True)
        for f in sorted(REFERENCE_MODEL.iterdir()):
            blob = repo / "blobs" / f"{rev[:8]}-{f.name}"
            shutil.copy2(weights if f.name == "model.safetensors" else f, blob)
            os.symlink(os.path.relpath(blob, snapshot), snapshot / f.name)
        (repo / "refs" / "main").write_text(rev)
        return blob.parent / f"{rev[:8]}-model.safetensors"

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HOBBIT_MLX_CACHE", str(tmp_path / "cache"))
    old = revision("1" * 40, REFERENCE_MODEL / "model.safetensors")
    target = resolve_model("tiny-org/ref-4bit", progress=False)
    assert list(load_manifest(target).references) == [str(old.resolve())]
    assert resolve_model("tiny-org/ref-4bit", progress=False) == target  # converted once
    new = revision("2" * 40, REFERENCE_MODEL / "model.safetensors")
    assert resolve_model("tiny-org/ref-4bit", progress=False) == target
    assert list(load_manifest(target).references) == [str(new.resolve())]


def _two_tensor_store(tmp_path: Path):
    """A record of three spans: the first two back to back in one file, the third elsewhere."""
    rng = np.random.default_rng(0)
    data = rng.integers(0, 2**32, size=3 * 64, dtype=np.uint32)
    raw = data.tobytes()
    path = tmp_path / "experts.safetensors"
    # [a (256 B)][b (256 B)][gap 4000 B][c (256 B)]
    path.write_bytes(raw[:512] + b"\0" * 4000 + raw[512:])
    import zlib
    spans = ((0, 0, 256), (0, 256, 256), (0, 4512, 256))
    crcs = tuple(zlib.crc32(path.read_bytes()[o:o + n]) for _, o, n in spans)
    tensors = [TensorLayout(n, "U32", (64,), i, 0) for i, n in enumerate(("a", "b", "c"))]
    entry = PrecisionEntry(4, {}, tensors, [Record(spans, crcs)])
    manifest = Manifest("test", 1, 1, [str(path)], [])
    return manifest, entry, data


@pytest.mark.parametrize("direct", [False, True])
def test_adjacent_spans_are_read_with_one_preadv(tmp_path, monkeypatch, direct):
    manifest, entry, data = _two_tensor_store(tmp_path)
    try:
        reader = RecordReader(tmp_path, manifest, workers=1, direct=direct)
    except StoreError:
        pytest.skip("this file system refuses O_DIRECT")
    calls = []
    real = os.preadv

    def counting(fd, buffers, offset):
        calls.append((offset, sum(len(b) for b in buffers)))
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", counting)
    pool = SlotPool(entry, 1)
    assert reader.read_into(entry, 0, pool, 0) == 768
    reader.close()
    for i, name in enumerate(("a", "b", "c")):
        np.testing.assert_array_equal(np.array(pool.arrays[name][0]), data[64 * i:64 * (i + 1)])
    if not reader.direct:
        assert sorted(calls) == [(0, 512), (4512, 256)]
    else:  # aligned reads: the merged run from 0, the third span from its 4 KiB boundary
        assert sorted(c[0] for c in calls) == [0, 4096]


@pytest.mark.parametrize("parallel", [True, False])
def test_a_records_runs_are_read_together_when_reads_are_slow(tmp_path, monkeypatch, parallel):
    """Each run of a record read in place is one command to the device: where a read is slow
    (here: the simulated device's latency) its runs go out together, each on a thread of its own,
    and the slot gets the same bytes; ``parallel_runs`` off, or reads as fast as a warm page
    cache's, one after another on the reading thread."""
    manifest, entry, data = _two_tensor_store(tmp_path)
    reader = RecordReader(tmp_path, manifest, workers=2, parallel_runs=parallel,
                          storage=StorageModel(1e9, latency=2e-3))
    threads, transfers = [], []
    real_preadv, real_transfer = os.preadv, reader.device.transfer

    def noting_preadv(fd, buffers, offset):
        threads.append(threading.current_thread().name)
        return real_preadv(fd, buffers, offset)

    def noting_transfer(nbytes, **kw):
        transfers.append(nbytes)
        return real_transfer(nbytes, **kw)

    monkeypatch.setattr(os, "preadv", noting_preadv)
    reader.device.transfer = noting_transfer
    pool = SlotPool(entry, 2)
    for slot in (0, 1):  # (the second read knows how long the first took)
        threads.clear()
        assert reader.read_into(entry, 0, pool, slot) == 768
        for i, name in enumerate(("a", "b", "c")):
            np.testing.assert_array_equal(np.array(pool.arrays[name][slot]),
                                          data[64 * i:64 * (i + 1)])
        on_caller = sorted(t == threading.current_thread().name for t in threads)
        assert on_caller == sorted([True, not parallel])
    assert sorted(transfers) == [256, 256, 512, 512]  # one command per run
    reader.read_seconds = 1e-5  # reads as fast as a warm page cache's: no hand-off
    threads.clear()
    assert reader.read_into(entry, 0, pool, 0) == 768
    assert threads == [threading.current_thread().name] * 2
    reader.close()


def test_the_first_slow_reads_decide_whether_runs_go_out_together():
    """``RunModeTrial``: the first reads alternate between the two ways, then the one with the
    lower mean seconds per byte is kept, whatever later reads measure."""
    trial = RunModeTrial(trials=3)
    picks = [trial.pick() for _ in range(6)]
    assert picks == [True, False] * 3
    for together in picks:
        trial.record(together, 1e-9 if together else 3e-9)
    assert trial.choice is True and trial.pick() is True
    trial.record(True, 1.0)  # (decided: later reads change nothing)
    assert trial.choice is True and trial.measured()["in_turn"] == pytest.approx(3e-9)
    slower = RunModeTrial(trials=1)
    slower.record(True, 2e-9)
    assert slower.choice is None  # (one way measured only)
    slower.record(False, 1e-9)
    assert slower.choice is False


def test_auto_sends_runs_together_where_each_command_waits_out_a_latency(tmp_path):
    """On a device whose every command waits 20 ms, a 2-run record takes ~40 ms in turn and
    ~20 ms together: after its trial, "auto" keeps sending runs together. (At 2 ms a busy
    machine, its threads waiting their turn for a core, once timed the two within 4%.)"""
    manifest, entry, data = _two_tensor_store(tmp_path)
    reader = RecordReader(tmp_path, manifest, workers=2, storage=StorageModel(1e9, latency=20e-3))
    assert reader.parallel_runs == "auto"
    reader.run_mode_trial.trials = 4
    pool = SlotPool(entry, 1)
    for _ in range(8):
        assert reader.read_into(entry, 0, pool, 0) == 768
    measured = reader.run_mode_trial.measured()
    assert measured["choice"] is True, measured
    assert measured["together"] < measured["in_turn"]
    for i, name in enumerate(("a", "b", "c")):
        np.testing.assert_array_equal(np.array(pool.arrays[name][0]), data[64 * i:64 * (i + 1)])
    reader.close()


def test_a_cancelled_prefetch_read_sends_none_of_its_runs(tmp_path):
    """A prefetch read cancelled before it starts: whether its runs go out together or in turn,
    none is sent, the whole record counts as cancelled, and the reader says so."""
    from hobbit_mlx.storage import ReadCancelled, ReadTicket

    manifest, entry, _ = _two_tensor_store(tmp_path)
    for parallel in (True, False):
        reader = RecordReader(tmp_path, manifest, workers=2, parallel_runs=parallel,
                              storage=StorageModel(1e9, latency=2e-3))
        reader.read_seconds = 1.0  # (slow reads: the runs would go out together)
        ticket = ReadTicket()
        ticket.cancel()
        with pytest.raises(ReadCancelled):
            reader.read_into(entry, 0, SlotPool(entry, 1), 0, background=True, ticket=ticket)
        assert reader.device.cancelled_bytes == 768 and reader.device.prefetch_bytes == 0
        reader.close()


def test_read_bench_runs(tmp_path):
    """bench/inplace_read.py (one pass, one thread) on the reference model writes its tables."""
    from bench.inplace_read import main as bench_main

    out = tmp_path / "inplace-read"
    assert bench_main(["--model", str(REFERENCE_MODEL), "--passes", "1", "--workers", "1",
                       "--out", str(out)]) == 0
    md = out.with_suffix(".md").read_text()
    for row in ("| reference | 9 | in turn | cold | 1 |", "| reference | 9 | at once | warm | 1 |",
                "| copy | 1 | in turn | warm | 1 |"):
        assert row in md


def test_macos_reads_past_the_page_cache_with_f_nocache(tmp_path, monkeypatch):
    """macOS has no O_DIRECT: ``direct`` sets F_NOCACHE on each store file instead (no aligned
    reads needed), and a cold measurement learns that the cached pages could not be dropped."""
    import fcntl

    from hobbit_mlx import reader as reader_module

    manifest, entry, data = _two_tensor_store(tmp_path)
    array_equal = np.testing.assert_array_equal  # (imported now: its import reads sys.platform)
    monkeypatch.delattr(os, "O_DIRECT", raising=False)
    monkeypatch.delattr(os, "posix_fadvise", raising=False)
    monkeypatch.setattr(reader_module.sys, "platform", "darwin")
    calls = []
    monkeypatch.setattr(fcntl, "fcntl", lambda fd, cmd, arg: calls.append((fd, cmd, arg)) or 0)
    reader = RecordReader(tmp_path, manifest, workers=1, direct=True)
    try:
        assert reader.bypass == "F_NOCACHE" and not reader.direct
        assert [(cmd, arg) for _, cmd, arg in calls] == \
            [(getattr(fcntl, "F_NOCACHE", reader_module.F_NOCACHE), 1)] * len(manifest.files)
        pool = SlotPool(entry, 1)
        assert reader.read_into(entry, 0, pool, 0) == 768
        array_equal(np.array(pool.arrays["a"][0]), data[:64])
        assert reader.drop_page_cache() is False
    finally:
        reader.close()
    plain = RecordReader(tmp_path, manifest, workers=1)  # no bypass asked: no fcntl call
    plain.close()
    assert plain.bypass is None and len(calls) == len(manifest.files)
