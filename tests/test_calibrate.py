"""``python -m convert.calibrate``: a converted model's 2-bit copies quantized again against the
inputs its experts see, in place, the 4-bit copies and the format untouched."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import pytest

import convert.calibrate as calibration
from convert.calibrate import calibrate, main
from hobbit_mlx.reader import RecordReader
from hobbit_mlx.store import load_manifest, manifest_path

TEXT = "def double(x):\n    return x * 2\n\nclass Point:\n    x: int = 0\n" * 40


def _copy(tiny_factory, tmp_path, arch: str = "qwen3_moe"):
    _src, dst = tiny_factory(arch)
    return shutil.copytree(dst, tmp_path / "model", symlinks=True)  # (a shared fixture's copy)


def _expert_bytes(model_dir, precision: str) -> list[list[bytes]]:
    manifest = load_manifest(model_dir)
    reader = RecordReader(model_dir, manifest)
    try:
        return [[b"".join(bytes(s) for s in reader.read_bytes(r))
                 for r in layer.precisions[precision].records] for layer in manifest.layers]
    finally:
        reader.close()


def _greedy(model_dir, **options) -> list[int]:
    import hobbit_mlx
    from hobbit_mlx.loader import runtime_of

    model, tokenizer = hobbit_mlx.load(str(model_dir), progress=False, **options)
    try:
        out = hobbit_mlx.generate(model, tokenizer, "def f(x):", max_tokens=8, verbose=False)
    finally:
        runtime_of(model).close()
    return tokenizer.encode(out)


def test_the_low_copies_of_the_experts_that_saw_inputs_change_and_nothing_else(
        tiny_factory, tmp_path):
    model = _copy(tiny_factory, tmp_path)
    high, low = _expert_bytes(model, "high"), _expert_bytes(model, "low")
    before = load_manifest(model)
    exact = _greedy(model, exact=True)

    done = calibrate(model, texts=[TEXT], tokens=300, progress=False)

    after = load_manifest(model)
    assert after.low_rounding == "calibrated" and done["tokens"] == 300
    assert _expert_bytes(model, "high") == high  # (exact mode reads what it read)
    new_low = _expert_bytes(model, "low")
    changed = sum(a != b for old, new in zip(low, new_low) for a, b in zip(old, new))
    assert 0 < done["experts_seen"] <= done["experts"]
    assert changed == done["experts_seen"]  # (an expert no token chose keeps its fitted copy)
    gone = [f for f in before.files if f not in after.files]
    assert gone and all("/low/" in f and not (model / f).exists() for f in gone)
    assert all((model / f).exists() for f in after.files if "/low/" in f)
    assert [l.precisions["low"].tensors for l in after.layers] == \
        [l.precisions["low"].tensors for l in before.layers]
    assert _greedy(model, exact=True) == exact
    assert _greedy(model, expert_residency=0.5)  # (the 2-bit copies load and run)


@pytest.mark.parametrize("arch", ["gpt_oss", "mixtral"])
def test_other_architectures_calibrate_their_experts_that_saw_inputs(arch, tiny_factory,
                                                                     tmp_path):
    """gpt_oss (experts with biases, a clamped activation; not driven layer by layer) and
    mixtral (its own expert names) as qwen3_moe: the low copies of the experts that saw inputs
    change, the others and the 4-bit copies do not. (Every tiny architecture calibrates; these
    two stand for the others here.)"""
    model = _copy(tiny_factory, tmp_path, arch)
    high, low = _expert_bytes(model, "high"), _expert_bytes(model, "low")
    done = calibrate(model, texts=[TEXT], tokens=200, progress=False)
    new_low = _expert_bytes(model, "low")
    assert _expert_bytes(model, "high") == high
    changed = sum(a != b for old, new in zip(low, new_low) for a, b in zip(old, new))
    assert 0 < changed == done["experts_seen"]


def test_layer_by_layer_and_whole_model_passes_calibrate_alike(tiny_factory, tmp_path,
                                                                monkeypatch):
    """A decoder layer_major drives is calibrated in one run of the text, a layer at a time;
    another runs the whole model once per group of layers whose sums fit in
    ``statistics_memory``. Both see the same inputs and write the same copies (also when the
    refit takes its experts one at a time)."""
    import hobbit_mlx.layer_major as layer_major

    one = _copy(tiny_factory, tmp_path / "one")
    manifest = load_manifest(one)
    layers = len(manifest.layers)
    layer = calibration.statistics_bytes(manifest, 0)  # (every layer's, in this model)
    assert calibrate(one, texts=[TEXT], tokens=200, statistics_memory=layer,
                     progress=False)["passes"] == 1
    passes = _copy(tiny_factory, tmp_path / "passes")
    monkeypatch.setattr(layer_major, "decoder_of", lambda model: None)
    monkeypatch.setattr(calibration, "REFIT_BYTES", 1)
    assert calibrate(passes, texts=[TEXT], tokens=200, statistics_memory=layer,
                     progress=False)["passes"] == layers
    assert _expert_bytes(one, "low") == _expert_bytes(passes, "low")


def test_a_calibration_interrupted_leaves_the_model_as_it_was(tiny_factory, tmp_path,
                                                               monkeypatch):
    model = _copy(tiny_factory, tmp_path)
    manifest = manifest_path(model).read_bytes()
    files = sorted(p.name for p in (model / "experts" / "low").iterdir())
    real, calls = calibration.refit_layer, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(calibration, "refit_layer", failing)
    with pytest.raises(KeyboardInterrupt):
        calibrate(model, texts=[TEXT], tokens=64, progress=False)
    assert manifest_path(model).read_bytes() == manifest
    assert sorted(p.name for p in (model / "experts" / "low").iterdir()) == files


def test_each_experts_input_sum_is_over_the_rows_routed_to_it(tiny_factory, tmp_path):
    """Against mlx-lm's own model on the same tokens: layer 0's MoE input, split by the
    router's choice, gives each expert's sum of x x^T (its gate and up projections share it),
    and the rows counted per expert are the router's."""
    import numpy as np
    from mlx_lm import load as mlx_load
    from mlx_lm.models import qwen3_moe

    import hobbit_mlx

    src, _ = tiny_factory("qwen3_moe")
    model = _copy(tiny_factory, tmp_path)
    loaded, tokenizer = hobbit_mlx.load(str(model), exact=True, progress=False)
    seq = list(tokenizer.encode(TEXT))[:100]
    stats = calibration.gather(loaded, [seq], {0}, progress=False)

    reference, _ = mlx_load(str(src))
    seen = []
    block = reference.model.layers[0].mlp
    real = type(block).__call__

    def spy(self, x):
        if self is block:
            gates = mx.softmax(self.gate(x), axis=-1, precise=True)
            seen.append((x, mx.argpartition(gates, kth=-self.top_k, axis=-1)[..., -self.top_k:]))
        return real(self, x)

    qwen3_moe.Qwen3MoeSparseMoeBlock.__call__ = spy
    try:
        reference(mx.array(seq)[None])
    finally:
        qwen3_moe.Qwen3MoeSparseMoeBlock.__call__ = real
    x = np.array(seen[0][0].reshape(-1, seen[0][0].shape[-1]).astype(mx.float32))
    chosen = np.array(seen[0][1]).reshape(len(x), -1)
    paths = {p for (_, p, _) in stats.sums}
    assert len(paths) == 2 and len(stats.same_as) == 1  # (gate and up share; down its own)
    first = next(iter(stats.same_as.values()))  # (the gate and up projections' own input)
    for e in range(load_manifest(model).num_experts):
        mine = x[(chosen == e).any(axis=1)]
        assert stats.rows.get((0, e), 0) == len(mine)
        if len(mine):
            assert np.allclose(stats.sums[(0, first, e)], mine.T @ mine, rtol=1e-4, atol=1e-4)
    assert all(key[0] == 0 for key in stats.sums)


def test_the_cli_says_what_it_did_and_refuses_what_it_cannot_read(tiny_factory, tmp_path,
                                                                  capsys):
    model = _copy(tiny_factory, tmp_path)
    text = tmp_path / "text.py"
    text.write_text(TEXT)
    assert main([str(model), "--text", str(text), "--tokens", "64"]) == 0
    assert "2-bit copies fitted to 64 tokens" in capsys.readouterr().out
    assert json.loads(manifest_path(model).read_text())["low_rounding"] == "calibrated"
    assert main([str(tmp_path / "nowhere")]) == 2
    assert "error:" in capsys.readouterr().err
    assert main([str(model), "--text", str(tmp_path / "missing.txt")]) == 2
    assert "cannot read" in capsys.readouterr().err
    assert main([str(model), "--tokens", "1"]) == 2
    before = manifest_path(model).read_bytes()
    assert main([str(model), "--statistics-memory", "1KB"]) == 2  # (a layer's sums are more)
    err = capsys.readouterr().err
    assert "input sums take" in err and "--statistics-memory" in err
    assert manifest_path(model).read_bytes() == before


def test_a_cached_conversion_calibrated_stays_current(tmp_path, monkeypatch):
    """Given the checkpoint, the calibration goes to its conversion in the cache, which stays
    current (the cache makes again what an older converter rounded, not what was calibrated)."""
    from hobbit_mlx.conversion_cache import resolve_model, scan
    from hobbit_mlx.testing.tiny_models import make_tiny_model

    cache = tmp_path / "cache"
    monkeypatch.setenv("HOBBIT_MLX_CACHE", str(cache))
    src = make_tiny_model("qwen3_moe", tmp_path / "mlx")
    target = resolve_model(src, progress=False)
    assert calibrate(src, texts=[TEXT], tokens=64, progress=False)["model"] == target
    assert [e.state for e in scan(cache)] == ["current, 2-bit copies calibrated"]
    assert resolve_model(src, progress=False) == target
    assert load_manifest(target).low_rounding == "calibrated"


def test_the_default_text_is_many_modules_of_the_standard_library(monkeypatch, tmp_path):
    texts = calibration.default_texts(40000)
    assert len(texts) >= 5 and sum(map(len, texts)) >= 40000
    assert all(len(t) <= 8000 for t in texts)
    monkeypatch.setattr(calibration.sysconfig, "get_paths", lambda: {"stdlib": str(tmp_path)})
    with pytest.raises(calibration.ConversionError, match="pass --text"):
        calibration.default_texts(100)


def test_the_converter_calibrates_what_it_wrote_when_asked(tiny_factory, tmp_path, capsys):
    from convert.__main__ import main as convert_main

    src, _ = tiny_factory("qwen3_moe")
    text = tmp_path / "text.py"
    text.write_text(TEXT * 10)
    out = tmp_path / "out"
    assert convert_main([str(src), str(out), "--quiet", "--calibrate",
                         "--calibration-text", str(text)]) == 0
    printed = capsys.readouterr().out
    assert "[convert] wrote" in printed and "[calibrate]" in printed
    assert load_manifest(out).low_rounding == "calibrated"
    with pytest.raises(SystemExit):  # (a text without --calibrate is a mistake, said so)
        convert_main([str(src), str(tmp_path / "other"), "--calibration-text", str(text)])
    assert "goes with --calibrate" in capsys.readouterr().err
