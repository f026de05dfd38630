"""The store format on disk, and clear errors for every kind of bad input."""

from __future__ import annotations

import json
import os
import re
import shutil

import mlx.core as mx
import pytest
from safetensors.numpy import load_file

import convert as converter
import hobbit_mlx
from hobbit_mlx.budget import BudgetError, parse_size
from hobbit_mlx.loader import runtime_of
from hobbit_mlx.store import PAGE_SIZE, StoreError, is_hobbit_model, load_manifest
from hobbit_mlx.architectures import UnsupportedModelError


@pytest.fixture()
def model_copy(tiny_factory, tmp_path):
    """A private converted model (a copy, reading nothing in place) that a test may damage."""
    src, _ = tiny_factory("qwen3_moe")
    return converter.convert(src, tmp_path / "model", progress=False, copy=True)


def _forward(path, **kw):
    model, _ = hobbit_mlx.load(path, progress=False, **kw)
    mx.eval(model(mx.array([[1, 2, 3, 4, 5, 6, 7, 8]])))
    return model


def test_records_are_page_aligned_safetensors(tiny_factory, tmp_path):
    src, _ = tiny_factory("mixtral")
    dst = converter.convert(src, tmp_path / "copy", progress=False, copy=True)
    manifest = load_manifest(dst)
    assert len(manifest.files) == 2 * len(manifest.layers)
    for layer in manifest.layers:
        high, low = layer.precisions["high"], layer.precisions["low"]
        assert all(q["bits"] == 4 for q in high.quant.values())
        assert all(q["bits"] == 2 for q in low.quant.values())
        assert low.expert_nbytes < high.expert_nbytes
        for entry in (high, low):
            assert len(entry.records) == layer.num_experts
            for rec in entry.records:
                assert len(rec.spans) == 1 and rec.spans[0][1] % PAGE_SIZE == 0
    # each record file is a valid safetensors file, and its tensors are the bytes the manifest
    # says each expert's record holds
    for layer in manifest.layers[:1]:
        for entry in layer.precisions.values():
            file_idx = entry.records[0].spans[0][0]
            tensors = load_file(str(dst / manifest.files[file_idx]))
            raw = (dst / manifest.files[file_idx]).read_bytes()
            for expert, rec in enumerate(entry.records):
                f, off, n = rec.spans[0]
                assert f == file_idx
                for t in entry.tensors:
                    stored = tensors[f"{expert}.{t.name}"]
                    assert stored.shape == tuple(t.shape)
                    assert stored.tobytes() == raw[off + t.offset:off + t.offset + t.nbytes]
                    assert t.offset + t.nbytes <= n


def test_missing_store_file(model_copy):
    victim = model_copy / load_manifest(model_copy).files[1]
    victim.unlink()
    with pytest.raises(StoreError, match=f"{victim.name}.*missing"):
        hobbit_mlx.load(model_copy, progress=False)


def test_truncated_store_file(model_copy):
    victim = model_copy / load_manifest(model_copy).files[0]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    with pytest.raises(StoreError, match="truncated"):
        hobbit_mlx.load(model_copy, progress=False)


def test_checksum_mismatch_names_the_file(model_copy):
    manifest = load_manifest(model_copy)
    for layer in manifest.layers:  # damage every high record so the first forward hits one
        for rec in layer.precisions["high"].records:
            f, off, n = rec.spans[0]
            path = model_copy / manifest.files[f]
            with open(path, "r+b") as fh:
                fh.seek(off + n // 2)
                byte = fh.read(1)
                fh.seek(off + n // 2)
                fh.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(StoreError, match="checksum mismatch") as e:
        _forward(model_copy)
    # the error names the file and the damaged record's bytes (where to look, what to reconvert)
    damaged = {(str(model_copy / manifest.files[f]), off, off + n) for layer in manifest.layers
               for rec in layer.precisions["high"].records for f, off, n in rec.spans[:1]}
    m = re.match(r"(.+): checksum mismatch in bytes (\d+)\.\.(\d+) ", str(e.value))
    assert m and (m.group(1), int(m.group(2)), int(m.group(3))) in damaged, str(e.value)


def test_manifest_that_does_not_match_config(model_copy):
    path = model_copy / "experts" / "manifest.json"
    obj = json.loads(path.read_text())
    obj["layers"] = obj["layers"][:-1]
    path.write_text(json.dumps(obj))
    with pytest.raises(StoreError, match="does not match config.json"):
        hobbit_mlx.load(model_copy, progress=False)


def test_corrupt_manifest(model_copy):
    (model_copy / "experts" / "manifest.json").write_text("{not json")
    with pytest.raises(StoreError, match="not valid JSON"):
        hobbit_mlx.load(model_copy, progress=False)


def test_budget_too_small_says_the_minimum(model_copy):
    # (a process measures a model's activations once, so the loads below agree on the minimum)
    with pytest.raises(BudgetError, match=r"at least .*\((\d+) bytes\)") as info:
        hobbit_mlx.load(model_copy, memory_budget="1KB", progress=False)
    minimum = int(info.value.args[0].split("(")[1].split(" bytes")[0])
    model = _forward(model_copy, memory_budget=minimum)  # the stated minimum runs
    stats = hobbit_mlx.offload_stats(model)
    rt = runtime_of(model)
    k = rt.manifest.experts_per_token
    # at the minimum, each pool holds one layer's top-k experts: nothing beyond is cached
    assert stats["pool_slots"] == [k] * len(rt.cache.pools)
    assert stats["expert_cache_bytes"] == sum(ps.pool.nbytes for ps in rt.cache.pools)
    assert stats["budget_bytes"] == minimum
    assert stats["peak_memory_bytes"] <= stats["budget_bytes"]
    with pytest.raises(BudgetError, match="too small"):  # and a byte less does not
        hobbit_mlx.load(model_copy, memory_budget=minimum - 1, progress=False)


def test_unsupported_and_dense_models(tiny_factory, tmp_path):
    src, _ = tiny_factory("qwen3_moe")
    bad = shutil.copytree(src, tmp_path / "bad")
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(dict(cfg, model_type="not_a_model")))
    with pytest.raises(UnsupportedModelError, match="not_a_model"):
        converter.convert(bad, tmp_path / "out")
    dense = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 1, "intermediate_size": 64,
             "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": 32, "rms_norm_eps": 1e-5}
    (bad / "config.json").write_text(json.dumps(dense))
    with pytest.raises(UnsupportedModelError, match="'llama' has no routed experts"):
        converter.convert(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_interrupted_conversion_leaves_no_model(tiny_factory, tmp_path, monkeypatch):
    """Interrupted before its first layer is done: nothing is left; later: only the hidden
    partial directory with the layers done (for the same command to resume), no DST."""
    src, _ = tiny_factory("qwen3_moe")

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(converter, "_convert_layer", boom)
    with pytest.raises(KeyboardInterrupt):
        converter.convert(src, tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    monkeypatch.setattr(converter, "_dense_weights", boom)
    with pytest.raises(KeyboardInterrupt):
        converter.convert(src, tmp_path / "out", progress=False)
    assert [p.name[:-8] for p in tmp_path.iterdir()] == [f".out.partial-{os.getpid()}x"]


def test_existing_destination_is_not_overwritten(tiny_factory, tmp_path):
    src, dst = tiny_factory("qwen3_moe")
    with pytest.raises(FileExistsError, match="--force"):
        converter.convert(src, dst)


@pytest.mark.parametrize("src", ["/nonexistent/model/dir", "/nonexistent", "./nonexistent",
                                 "~/nonexistent"])
def test_missing_source(src):
    """A path, even one with a single slash as a hub id has ('/nope' was tried on the hub)."""
    with pytest.raises(converter.ConversionError, match="no such directory"):
        converter.convert(src, "/tmp/never")


@pytest.mark.parametrize("text,expected", [("6GB", 6 * 10**9), ("6GiB", 6 * 2**30), ("512 MiB", 512 * 2**20),
                                           ("1.5g", 1_500_000_000), (1234, 1234), ("77", 77)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


def test_parse_size_rejects_garbage():
    with pytest.raises(ValueError, match="cannot read"):
        parse_size("six gigs")


def test_footprint(tiny_factory):
    """Each size measured another way, and the minimum budgets are the smallest that load."""
    from mlx_lm.models.cache import make_prompt_cache

    _, dst = tiny_factory("qwen2_moe")
    fp = hobbit_mlx.footprint(dst)
    manifest = load_manifest(dst)
    assert fp["num_moe_layers"] == len(manifest.layers) == 2
    for precision in ("high", "low"):  # every record's bytes, as stored
        assert fp[f"expert_bytes_{precision}"] == sum(
            r.nbytes for layer in manifest.layers for r in layer.precisions[precision].records)
    assert fp["expert_bytes_low"] < fp["expert_bytes_high"]
    assert fp["experts_per_token"] == manifest.experts_per_token == 2
    model, _ = hobbit_mlx.load(dst, exact=True, prefetch_layers=0, progress=False)
    cache = make_prompt_cache(model)  # mlx-lm's KV cache holds 256 tokens after one
    mx.eval(model(mx.array([[1, 2, 3]]), cache=cache))
    kv = sum(c.keys.nbytes + c.values.nbytes for c in cache if getattr(c, "keys", None) is not None)
    assert fp["kv_bytes_per_token"] == kv // 256 > 0
    assert fp["dense_bytes"] < sum(f.stat().st_size for f in dst.glob("*.safetensors")) * 2
    for key, options in (("minimum_budget_bytes_exact", dict(exact=True, prefetch_layers=0)),
                         ("minimum_budget_bytes", {})):
        assert fp[key] > fp["dense_bytes"]
        _forward(dst, memory_budget=fp[key], **options)
        with pytest.raises(BudgetError, match="too small"):
            hobbit_mlx.load(dst, memory_budget=fp[key] - 1, progress=False, **options)
    assert fp["minimum_budget_bytes"] > fp["minimum_budget_bytes_exact"]


def test_durable_sync_asks_macos_for_a_full_flush(monkeypatch, tmp_path):
    """On macOS ``fsync`` leaves data in the drive's cache: a store must use F_FULLFSYNC there
    (and plain fsync elsewhere, or where the file system refuses it)."""
    import fcntl
    import os
    import sys

    from hobbit_mlx.store import durable_sync

    calls = []
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append("fsync"))
    monkeypatch.setattr(fcntl, "F_FULLFSYNC", 51, raising=False)
    monkeypatch.setattr(fcntl, "fcntl", lambda fd, op, *a: calls.append(("fcntl", op)))
    with open(tmp_path / "f", "w") as f:
        monkeypatch.setattr(sys, "platform", "darwin")
        durable_sync(f.fileno())
        monkeypatch.setattr(sys, "platform", "linux")
        durable_sync(f.fileno())
    assert calls == [("fcntl", 51), "fsync"]


def test_cached_float_conversion_follows_changed_weights(tmp_path, monkeypatch):
    """A float (Hugging Face) source's cached store is a copy, which no reference ties to its
    source: weights replaced under an unchanged config.json are converted again, not served
    stale; unchanged ones are not converted twice."""
    import os

    from hobbit_mlx.loader import resolve_model
    from hobbit_mlx.testing.tiny_models import make_tiny_model

    monkeypatch.setenv("HOBBIT_MLX_CACHE", str(tmp_path / "cache"))
    src = make_tiny_model("qwen3_moe", tmp_path / "src", seed=0, quantize=False)
    other = make_tiny_model("qwen3_moe", tmp_path / "other", seed=1, quantize=False)

    def crcs(target):
        return [r.crc32 for l in load_manifest(target).layers for r in l.precisions["high"].records]

    target = resolve_model(src, progress=False)
    first, made = crcs(target), (target / "experts" / "manifest.json").stat().st_mtime_ns
    assert resolve_model(src, progress=False) == target
    assert (target / "experts" / "manifest.json").stat().st_mtime_ns == made  # not converted again
    config = (src / "config.json").stat()
    shutil.copyfile(other / "model.safetensors", src / "model.safetensors")
    weights = (src / "model.safetensors").stat()
    os.utime(src / "model.safetensors", ns=(weights.st_atime_ns, weights.st_mtime_ns + 10**9))
    assert (src / "config.json").stat().st_mtime_ns == config.st_mtime_ns
    assert resolve_model(src, progress=False) == target
    assert crcs(target) != first
    assert crcs(target) == crcs(converter.convert(other, tmp_path / "fresh", progress=False))
    # a chat template written since (config and weights as they were): its copy follows
    (src / "chat_template.jinja").write_text("{{ messages[0]['content'] }}!")
    assert resolve_model(src, progress=False) == target
    assert (target / "chat_template.jinja").read_text() == "{{ messages[0]['content'] }}!"


def test_empty_cache_variable_is_unset(tmp_path, monkeypatch):
    from hobbit_mlx.loader import cache_root

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("HOBBIT_MLX_CACHE", "")
    monkeypatch.setattr("sys.platform", "linux")
    assert cache_root() == tmp_path / ".cache" / "hobbit_mlx"
    monkeypatch.setattr("sys.platform", "darwin")  # (where Time Machine leaves caches out)
    assert cache_root() == tmp_path / "Library" / "Caches" / "hobbit_mlx"


def test_cache_that_cannot_be_written_is_named(tiny_factory, tmp_path, monkeypatch):
    """A full disk while ``load`` converts: one line naming the file and the cache directory."""
    import errno

    from hobbit_mlx.loader import resolve_model

    src, _ = tiny_factory("qwen3_moe")
    monkeypatch.setenv("HOBBIT_MLX_CACHE", str(tmp_path / "cache"))

    def full(source, target, **kw):
        raise OSError(errno.ENOSPC, "No space left on device", str(target) + "/experts/x")

    monkeypatch.setattr(converter, "convert", full)
    cache = re.escape(str(tmp_path / "cache"))
    with pytest.raises(converter.ConversionError, match=rf"cannot write {cache}/\S+ "
                       r"\(\S+/experts/x\): No space left on device; free space there, or set "
                       rf"HOBBIT_MLX_CACHE to another directory \(now {cache}\)"):
        resolve_model(src, progress=False)

    def full_after_some_layers(source, target, **kw):  # (the layers done are kept: say where)
        e = OSError(errno.ENOSPC, "No space left on device")
        e.kept_partial = target.parent / f".{target.name}.partial-1"
        raise e

    monkeypatch.setattr(converter, "convert", full_after_some_layers)
    with pytest.raises(converter.ConversionError, match=r"free space there, .*; the layers "
                       r"converted so far are kept in \S+\.partial-1 \(loading again resumes"):
        resolve_model(src, progress=False)


def test_measurements_that_cannot_be_kept_are_warned_about_once(tmp_path, monkeypatch):
    from hobbit_mlx import measure

    monkeypatch.setattr(measure, "_WARNED_NOT_KEPT", set())
    (tmp_path / "measured").write_text("a file where the directory would go")
    path = tmp_path / "measured" / "key.json"
    with pytest.warns(UserWarning, match=rf"{re.escape(str(tmp_path))}/measured: cannot keep"):
        measure._write_measured(path, "ladder", [(16, 1)])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        measure._write_measured(path, "ladder", [(16, 1)])  # said once


def test_an_outdated_cached_conversion_is_removed_not_another_sources(tmp_path, monkeypatch,
                                                                      capsys):
    """A source whose config.json changed is converted into a new cache directory; the old one
    (GBs no load reads any more) stayed for good. Another source of the same name, and the same
    source with adapters fused, are other conversions and stay."""
    from hobbit_mlx.loader import resolve_model
    from hobbit_mlx.testing.tiny_models import make_tiny_model

    monkeypatch.setenv("HOBBIT_MLX_CACHE", str(tmp_path / "cache"))
    src = make_tiny_model("qwen3_moe", tmp_path / "a" / "model")
    other = make_tiny_model("qwen3_moe", tmp_path / "b" / "model", seed=1)
    old = resolve_model(src, progress=False)
    theirs = resolve_model(other, progress=False)
    config = src / "config.json"
    os.utime(config, ns=(config.stat().st_atime_ns, config.stat().st_mtime_ns + 10**9))
    capsys.readouterr()
    new = resolve_model(src, progress=False)
    assert new != old and not old.exists() and theirs.exists()
    assert f"removed {old} (" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "cache").iterdir() if p.name != "measured") == \
        sorted([new.name, theirs.name, f".{new.name}.lock", f".{theirs.name}.lock"])


def test_a_second_process_waits_for_a_cached_conversion_and_loads_it(tmp_path, monkeypatch,
                                                                     capsys):
    """Two processes loading one unconverted checkpoint at once (a pipeline's ranks on one Mac,
    a server and a CLI) each converted it and replaced the other's model under its load: the
    second waits for the first, then takes what it made."""
    import fcntl
    import subprocess
    import sys
    import time

    from hobbit_mlx.loader import resolve_model
    from hobbit_mlx.testing.tiny_models import make_tiny_model

    cache = tmp_path / "cache"
    monkeypatch.setenv("HOBBIT_MLX_CACHE", str(cache))
    src = make_tiny_model("qwen3_moe", tmp_path / "src")
    first = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nimport convert\n"
         "from hobbit_mlx.loader import resolve_model\n"
         "real = convert.convert\n"
         "def slow(*a, **k):\n    time.sleep(2)\n    return real(*a, **k)\n"
         "convert.convert = slow\n"
         f"print(resolve_model({str(src)!r}, progress=False))\n"],
        env={**os.environ, "HOBBIT_MLX_CACHE": str(cache)}, stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:  # until the first holds the conversion's lock
            locks = list(cache.glob(".*.lock")) if cache.exists() else []
            if locks:
                fd = os.open(locks[0], os.O_RDONLY)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    fcntl.flock(fd, fcntl.LOCK_UN)
                except BlockingIOError:
                    break
                finally:
                    os.close(fd)
            assert time.monotonic() < deadline and first.poll() is None
            time.sleep(0.05)

        def not_again(*a, **k):
            raise AssertionError("converted a second time")

        monkeypatch.setattr(converter, "convert", not_again)
        target = resolve_model(src, progress=False)
        assert "waiting for another process converting into" in capsys.readouterr().err
        assert first.communicate(timeout=120)[0].strip() == str(target)
        assert is_hobbit_model(target)
    finally:
        first.kill()
        first.wait()


def test_pruning_touches_only_the_caches_own_names(tmp_path, monkeypatch):
    """HOBBIT_MLX_CACHE pointed at a models folder: a conversion the user made there of the same
    checkpoint ("model-8bit") was removed as an outdated cached one."""
    from hobbit_mlx.loader import resolve_model
    from hobbit_mlx.testing.tiny_models import make_tiny_model

    models = tmp_path / "models"
    monkeypatch.setenv("HOBBIT_MLX_CACHE", str(models))
    src = make_tiny_model("qwen3_moe", tmp_path / "src" / "model")
    mine = converter.convert(src, models / "model-8bit", progress=False)
    resolve_model(src, progress=False)
    config = src / "config.json"
    os.utime(config, ns=(config.stat().st_atime_ns, config.stat().st_mtime_ns + 10**9))
    resolve_model(src, progress=False)
    assert is_hobbit_model(mine)


def test_pruning_leaves_a_conversion_another_process_is_making(tmp_path, monkeypatch):
    """An outdated conversion whose lock a process holds (converting into it) was removed, and
    its lock file with it (a later process then did not wait for the holder)."""
    import subprocess
    import sys

    from hobbit_mlx.loader import resolve_model
    from hobbit_mlx.testing.tiny_models import make_tiny_model

    monkeypatch.setenv("HOBBIT_MLX_CACHE", str(tmp_path / "cache"))
    src = make_tiny_model("qwen3_moe", tmp_path / "model")
    old = resolve_model(src, progress=False)
    lock = old.parent / f".{old.name}.lock"
    holder = subprocess.Popen([sys.executable, "-c",
                               "import fcntl, os, time\n"
                               f"fd = os.open({str(lock)!r}, os.O_RDWR)\n"
                               "fcntl.flock(fd, fcntl.LOCK_EX)\n"
                               "print('locked', flush=True)\ntime.sleep(120)\n"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        config = src / "config.json"
        os.utime(config, ns=(config.stat().st_atime_ns, config.stat().st_mtime_ns + 10**9))
        assert resolve_model(src, progress=False) != old
        assert is_hobbit_model(old) and lock.exists()
    finally:
        holder.kill()
        holder.wait()
