"""Reader modes the defaults do not take: O_DIRECT reads, CRC checks on every read or none, a
store damaged after load, and records made of several byte spans (the store format allows them;
our converter writes one span per record)."""

from __future__ import annotations

import os
import zlib
from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest

import hobbit_mlx
from hobbit_mlx.store import StoreError, load_manifest

TOKENS = mx.array([[(7 * i + 3) % 200 + 1 for i in range(24)]])


@pytest.fixture()
def store(tiny_factory, tmp_path):
    """A store of its own, copied out of the source (tests here damage its files)."""
    from convert import convert

    src, _ = tiny_factory("qwen3_moe")
    return convert(src, tmp_path / "model", copy=True, progress=False)


def _logits(path, **options):
    model, _ = hobbit_mlx.load(path, expert_residency=0.0, exact=True, progress=False, **options)
    return model, np.array(model(TOKENS))


def _damage(path, layer: int = 0) -> None:
    """Flip a byte in the middle of every 4-bit record of ``layer``."""
    manifest = load_manifest(path)
    for rec in manifest.layers[layer].precisions["high"].records:
        f, off, n = rec.spans[0]
        with open(path / manifest.files[f], "r+b") as fh:
            fh.seek(off + n // 2)
            b = fh.read(1)
            fh.seek(off + n // 2)
            fh.write(bytes([b[0] ^ 0xFF]))


def test_direct_io_reads_the_same_bytes(store, tmp_path):
    try:
        fd = os.open(store / load_manifest(store).files[0], os.O_RDONLY | getattr(os, "O_DIRECT", 0))
        os.close(fd)
    except OSError:
        pytest.skip("this filesystem refuses O_DIRECT")
    _, want = _logits(store)
    model, got = _logits(store, direct_io=True)
    assert model._hobbit.reader.direct == hasattr(os, "O_DIRECT")
    np.testing.assert_array_equal(got, want)
    assert hobbit_mlx.offload_stats(model)["misses_high"] > 0


def test_damage_after_load_is_found_by_the_first_read_of_a_record(store):
    model, _ = hobbit_mlx.load(store, expert_residency=0.0, exact=True, progress=False)
    _damage(store)  # after load: no record of layer 0 has been read yet
    with pytest.raises(StoreError, match="checksum mismatch"):
        mx.eval(model(TOKENS))


def test_verify_always_checks_every_read_and_never_checks_none(store):
    model_first, want = _logits(store)
    model_always, got = _logits(store, verify="always")
    model_never, never = _logits(store, verify="never")
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(never, want)
    files = list((store / "experts").rglob("*.safetensors"))
    stamps = {f: (os.stat(f).st_atime_ns, os.stat(f).st_mtime_ns) for f in files}
    _damage(store)  # every record was read (and checked) once already
    for f, ns in stamps.items():  # (a change its file's size and mtime do not show)
        os.utime(f, ns=ns)
    mx.eval(model_first(TOKENS))  # "first": a record verified before is not checked again
    with pytest.raises(StoreError, match="checksum mismatch"):
        mx.eval(model_always(TOKENS))
    damaged = np.array(model_never(TOKENS))  # "never": the damaged bytes are computed with
    assert not np.array_equal(damaged, want)
    with pytest.raises(ValueError, match="verify"):
        hobbit_mlx.load(store, verify="sometimes", progress=False)


def test_a_file_written_after_its_records_were_verified_is_checked_again(store):
    """A store copied over in place under a running process (or an in-place source rewritten):
    its records were verified once, and their new bytes gave garbage without a word."""
    model, _ = _logits(store)
    _damage(store)
    with pytest.raises(StoreError, match="checksum mismatch"):
        mx.eval(model(TOKENS))


def test_records_of_several_spans_read_like_one(store):
    """Rewrite the manifest so that each record is two spans (split between two tensors), each
    with its own CRC: the reads land every tensor where one span would."""
    _, want = _logits(store)
    manifest = load_manifest(store)
    for layer in manifest.layers:
        for entry in layer.precisions.values():
            cut_at = sorted(t.offset for t in entry.tensors)[len(entry.tensors) // 2]
            entry.tensors = [t if t.offset < cut_at else replace(t, span=1, offset=t.offset - cut_at)
                             for t in entry.tensors]
            records = []
            for rec in entry.records:
                f, off, n = rec.spans[0]
                data = (store / manifest.files[f]).read_bytes()[off:off + n]
                spans = ((f, off, cut_at), (f, off + cut_at, n - cut_at))
                records.append(replace(rec, spans=spans, crc32=(
                    zlib.crc32(data[:cut_at]), zlib.crc32(data[cut_at:]))))
            entry.records = records
    manifest.save(store)
    reloaded = load_manifest(store)
    assert all(len(r.spans) == 2 for r in reloaded.layers[0].precisions["high"].records)
    model, got = _logits(store)
    np.testing.assert_array_equal(got, want)
    _, got_always = _logits(store, verify="always")
    np.testing.assert_array_equal(got_always, want)
