"""Adapters ``mlx_lm.lora`` trained are fused while converting (``--adapter-path``): the converted
model computes what ``mlx_lm.fuse``'s fused model computes, experts and dense modules alike,
whether the source is float or quantized (read in place where the adapters change nothing)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.tuner.utils import linear_to_lora_layers
from mlx_lm.utils import load_model

import convert as converter
import hobbit_mlx
from convert.__main__ import main as convert_main
from hobbit_mlx.store import load_manifest, reconvert_command
from hobbit_mlx.testing.tiny_models import make_tiny_model

TOKENS = mx.array([[3, 17, 42, 9, 77, 5, 31, 64]])


def make_adapters(src: Path, out: Path, num_layers: int = 1, keys: list[str] | None = None,
                  seed: int = 0) -> Path:
    """Adapters as ``mlx_lm.lora`` saves them, with non-zero ``lora_b`` (trained ones are: a
    fresh LoRA's ``lora_b`` is zero and would change nothing)."""
    model, _ = load_model(src)
    params = {"rank": 4, "scale": 8.0, "dropout": 0.0, **({"keys": keys} if keys else {})}
    linear_to_lora_layers(model, num_layers, params)
    mx.random.seed(seed)
    lora = {k: (mx.random.normal(v.shape) * 0.02 if k.endswith("lora_b") else v)
            for k, v in tree_flatten(model.parameters()) if k.rsplit(".", 1)[-1] in ("lora_a", "lora_b")}
    out.mkdir(parents=True)
    mx.save_safetensors(str(out / "adapters.safetensors"), lora)
    (out / "adapter_config.json").write_text(json.dumps(
        {"fine_tune_type": "lora", "num_layers": num_layers, "lora_parameters": params}))
    return out


def _fused_reference(src: Path, adapters: Path) -> np.ndarray:
    """What ``mlx_lm.fuse`` writes, run by mlx-lm: the logits to match."""
    from mlx_lm.tuner.utils import load_adapters

    model, _ = load_model(src)
    load_adapters(model, str(adapters))
    model.update_modules(tree_unflatten([(n, m.fuse()) for n, m in model.named_modules()
                                         if hasattr(m, "fuse")]))
    model.set_dtype(mx.float32)
    return np.array(model(TOKENS))


def _logits(dst: Path) -> np.ndarray:
    model, _ = hobbit_mlx.load(dst, expert_residency=0.5, exact=True, progress=False)
    return np.array(model(TOKENS))


@pytest.mark.parametrize("quantize", [True, False], ids=["quantized-in-place", "float"])
def test_adapters_are_fused_as_mlx_lm_fuses_them(tmp_path, quantize):
    src = make_tiny_model("qwen3_moe", tmp_path / "src", quantize=quantize)
    adapters = make_adapters(src, tmp_path / "adapters")  # (experts, router, attention)
    if quantize:
        fused = _fused_reference(src, adapters)
    else:  # a float source is quantized by the converter: as mlx_lm.fuse's output converted
        from mlx_lm.utils import save
        from mlx_lm.tokenizer_utils import load as load_tokenizer

        model, config = load_model(src)
        from mlx_lm.tuner.utils import load_adapters
        load_adapters(model, str(adapters))
        model.update_modules(tree_unflatten([(n, m.fuse()) for n, m in model.named_modules()
                                             if hasattr(m, "fuse")]))
        save(tmp_path / "fused-src", src, model, load_tokenizer(src), config, donate_model=False)
        fused = _logits(converter.convert(tmp_path / "fused-src", tmp_path / "ref", progress=False))
    dst = converter.convert(src, tmp_path / "out", adapter_path=adapters, progress=False)
    np.testing.assert_allclose(_logits(dst), fused, rtol=0, atol=1e-5)
    base = _logits(converter.convert(src, tmp_path / "base", progress=False))
    assert np.abs(base - fused).max() > 1e-2  # (the adapters change the output)
    manifest = load_manifest(dst)
    assert manifest.adapter["path"] == str(adapters.resolve())
    assert f"--adapter-path {adapters.resolve()}" in reconvert_command(dst, manifest)
    if quantize:  # the last layer's experts changed (written), the first's did not (in place)
        def in_place(layer):
            record = manifest.layers[layer].precisions["high"].records[0]
            return Path(manifest.files[record.spans[0][0]]).is_absolute()
        assert [in_place(0), in_place(len(manifest.layers) - 1)] == [True, False]

def test_bad_adapters_are_one_line_errors(tmp_path, capsys):
    src = make_tiny_model("qwen3_moe", tmp_path / "src")
    other = make_tiny_model("qwen3_moe", tmp_path / "other",
                            config_overrides={"hidden_size": 96})
    for path, needle in ((tmp_path / "none", "not a directory"),
                         (make_adapters(other, tmp_path / "wrong"), "cannot apply these adapters")):
        assert convert_main([str(src), str(tmp_path / "out"), "--adapter-path", str(path),
                             "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and needle in err, err
    (tmp_path / "empty").mkdir()
    assert convert_main([str(src), str(tmp_path / "out"), "--adapter-path",
                         str(tmp_path / "empty"), "--quiet"]) == 2
    assert "no adapter_config.json there" in capsys.readouterr().err
    # a config mlx-lm cannot read, weights cut short: one line naming the file (were tracebacks)
    good = make_adapters(src, tmp_path / "good")
    config = json.loads((good / "adapter_config.json").read_text())
    weights = (good / "adapters.safetensors").read_bytes()
    for name, data, needle in (
            ("adapter_config.json", json.dumps({**config, "lora_parameters": None}),
             "lora_parameters (rank, scale, dropout) is missing"),
            ("adapter_config.json", json.dumps({k: v for k, v in config.items() if k != "num_layers"}),
             "num_layers"),
            ("adapters.safetensors", weights[:len(weights) // 2], "cut short"),
            ("adapters.safetensors", b"\x00" * 4, "not a safetensors file")):
        bad = tmp_path / f"bad-{needle[:4]}"
        if not bad.exists():
            bad.mkdir()
            for f in good.iterdir():
                (bad / f.name).write_bytes(f.read_bytes())
        (bad / name).write_bytes(data if isinstance(data, bytes) else data.encode())
        assert convert_main([str(src), str(tmp_path / "out"), "--adapter-path", str(bad),
                             "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {bad / name}: ") and err.count("\n") == 1, err
        assert needle in err, err
    assert not (tmp_path / "out").exists()


def test_a_model_with_adapters_fused_is_no_source_and_takes_only_its_own(tmp_path, capsys):
    """Converting it again dropped its adapters without a word (its links are the checkpoint
    without them); loading it with retrained adapters in the same folder used the old ones."""
    src = make_tiny_model("qwen3_moe", tmp_path / "src")
    adapters = make_adapters(src, tmp_path / "adapters")
    dst = converter.convert(src, tmp_path / "fused", adapter_path=adapters, progress=False)
    assert convert_main([str(dst), str(tmp_path / "again"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "converting it again would drop them" in err and f"--adapter-path {adapters.resolve()}" in err
    hobbit_mlx.load(dst, adapter_path=adapters, expert_residency=0.5, progress=False)
    make_adapters(src, tmp_path / "retrained", seed=1)
    os.replace(tmp_path / "retrained" / "adapters.safetensors", adapters / "adapters.safetensors")
    with pytest.raises(converter.ConversionError, match="changed since .* was converted with them"):
        hobbit_mlx.load(dst, adapter_path=adapters, expert_residency=0.5, progress=False)
    model, _ = hobbit_mlx.load(dst, adapter_path="", expert_residency=0.5, progress=False)  # none


def test_load_and_generate_take_adapter_path(tmp_path, monkeypatch, capsys):
    """``--adapter-path`` as in mlx-lm: an unconverted checkpoint is converted once into the
    cache with the adapters fused (their own cached conversion, beside the plain one); new
    adapters in the same folder convert it again; a converted model takes only the adapters it
    was converted with."""
    from hobbit_mlx import cli_common
    from hobbit_mlx.generate import main as generate_main

    monkeypatch.setenv("HOBBIT_MLX_CACHE", str(tmp_path / "cache"))
    src = make_tiny_model("qwen3_moe", tmp_path / "src")
    adapters = make_adapters(src, tmp_path / "adapters")
    expected = _fused_reference(src, adapters)
    model, _ = hobbit_mlx.load(src, adapter_path=adapters, expert_residency=0.5, exact=True,
                               progress=False)
    np.testing.assert_allclose(np.array(model(TOKENS)), expected, rtol=0, atol=1e-5)
    fused_dir = next((tmp_path / "cache").glob("src+adapters-*"))
    monkeypatch.chdir(adapters)  # the same adapters by another spelling: the same conversion
    hobbit_mlx.load(src, adapter_path=".", expert_residency=0.5, progress=False)
    assert [p.name for p in (tmp_path / "cache").glob("src*")] == [fused_dir.name]
    base, _ = hobbit_mlx.load(src, expert_residency=0.5, exact=True, progress=False)
    assert np.abs(np.array(base(TOKENS)) - expected).max() > 1e-2
    assert len(list((tmp_path / "cache").glob("src*"))) == 2
    stamp = (fused_dir / "experts" / "manifest.json").stat().st_mtime_ns
    hobbit_mlx.load(src, adapter_path=adapters, expert_residency=0.5, progress=False)
    assert (fused_dir / "experts" / "manifest.json").stat().st_mtime_ns == stamp  # (cached)

    argv = ["--model", str(src), "--adapter-path", str(adapters), "--prompt", "hi",
            "--max-tokens", "4", "--exact", "--expert-residency", "0.5", "--quiet-report"]
    assert cli_common.run(generate_main, argv) == 0
    first = capsys.readouterr().out
    make_adapters(src, tmp_path / "retrained", seed=1)  # trained again into the same folder
    for f in ("adapters.safetensors", "adapter_config.json"):
        os.replace(tmp_path / "retrained" / f, adapters / f)
    model, _ = hobbit_mlx.load(src, adapter_path=adapters, expert_residency=0.5, exact=True,
                               progress=False)
    np.testing.assert_allclose(np.array(model(TOKENS)), _fused_reference(src, adapters),
                               rtol=0, atol=1e-5)
    assert first.strip()

    hobbit_mlx.load(fused_dir, adapter_path=adapters, expert_residency=0.5, progress=False)
    plain = converter.convert(src, tmp_path / "plain", progress=False)
    argv[1] = str(plain)
    assert cli_common.run(generate_main, argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert f"load the checkpoint it was converted from ({src.resolve()})" in err


def test_fusing_holds_one_layer_at_a_time(tmp_path):
    """The point of fusing while converting: memory stays near one layer's experts (a fused
    layer kept until the end held the whole model: 8 layers, 8x the peak)."""
    src = make_tiny_model("qwen3_moe", tmp_path / "src", quantize=False, config_overrides={
        "hidden_size": 256, "moe_intermediate_size": 256, "num_experts": 16,
        "num_hidden_layers": 8, "intermediate_size": 512})
    adapters = make_adapters(src, tmp_path / "adapters", num_layers=8)
    source_bytes = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    mx.synchronize()
    mx.clear_cache()
    mx.reset_peak_memory()
    converter.convert(src, tmp_path / "out", adapter_path=adapters, progress=False)
    assert mx.get_peak_memory() < 0.4 * source_bytes, (mx.get_peak_memory(), source_bytes)
