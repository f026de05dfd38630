"""What the converter and the plan read from a source checkpoint, and what they refuse: the files
its index names (a missing one is an incomplete download), not stray safetensors; every dense
tensor the model needs (a missing one was filled with random values); packed weights only with
their quantization entry; a converted model is not a source. And how a conversion ends: what
``--force`` may replace, a DST that appeared meanwhile, SIGTERM, an interrupt once the new model
is in place, a stale partial directory."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import mlx.core as mx
import pytest

import convert as converter
from convert.__main__ import main as convert_main
from hobbit_mlx.plan import main as plan_main
from hobbit_mlx.plan import plan_model
from hobbit_mlx.store import StoreError, load_manifest
from hobbit_mlx.testing.tiny_models import make_tiny_model

INDEX = "model.safetensors.index.json"


def _one_line(capsys, main, argv, needle, code=2):
    assert main(argv) == code
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert needle in err, err
    return err


def _reshard(src: Path, second: set[str]) -> None:
    """Re-save ``src`` as two shards and an index: the tensors named in ``second`` in the
    second shard."""
    weights = dict(mx.load(str(src / "model.safetensors")))
    (src / "model.safetensors").unlink()
    names = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
    shards = ({k: v for k, v in weights.items() if k not in second},
              {k: v for k, v in weights.items() if k in second})
    for name, shard in zip(names, shards):
        mx.save_safetensors(str(src / name), shard, metadata={"format": "mlx"})
    (src / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": {
        k: names[k in second] for k in weights}}))


def _save_without(src: Path, drop) -> None:
    """``src``'s single weight file without the tensors ``drop`` selects (and no index)."""
    f = src / "model.safetensors"
    weights = {k: v for k, v in mx.load(str(f)).items() if not drop(k)}
    mx.save_safetensors(str(f), weights, metadata={"format": "mlx"})
    (src / INDEX).unlink(missing_ok=True)


def _dead_pid() -> str:
    return subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()


def test_a_shard_the_index_names_that_is_missing_is_named(tmp_path, capsys):
    """An interrupted download: the shard holding lm_head is absent. The conversion converted
    (an lm_head of random values, garbage output); plan read the shards there were."""
    src = make_tiny_model("qwen3_moe", tmp_path / "src", quantize=False)
    _reshard(src, {"lm_head.weight"})
    (src / "model-00002-of-00002.safetensors").unlink()
    needle = "model-00002-of-00002.safetensors named in"
    with pytest.raises(StoreError, match="incomplete download"):
        converter.convert(src, tmp_path / "out", progress=False)
    _one_line(capsys, convert_main, [str(src), str(tmp_path / "out")], needle)
    _one_line(capsys, plan_main, [str(src)], needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_a_missing_dense_tensor_is_named_not_filled_in(tmp_path, capsys):
    src = make_tiny_model("qwen3_moe", tmp_path / "src", quantize=False)
    _save_without(src, lambda k: k == "lm_head.weight")
    with pytest.raises(converter.ConversionError, match="has no lm_head.weight"):
        converter.convert(src, tmp_path / "out", progress=False)
    _one_line(capsys, plan_main, [str(src)], "has no lm_head.weight")
    q = make_tiny_model("qwen3_moe", tmp_path / "q")  # by reference: the store would not load
    _save_without(q, lambda k: k.startswith("model.norm."))
    with pytest.raises(converter.ConversionError, match="has no model.norm.weight"):
        converter.convert(q, tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q", "src"]


def test_a_tensor_mlx_lms_sanitize_needs_is_one_line(tmp_path, capsys):
    """A per-expert checkpoint without one expert's tensor: mlx-lm's sanitize raised a bare
    KeyError, a traceback out of convert and plan."""
    from hobbit_mlx.testing.tiny_models import save_hf_per_expert

    f32 = make_tiny_model("qwen3_moe", tmp_path / "f32", quantize=False)
    hf = save_hf_per_expert(f32, tmp_path / "hf")
    gone = "model.layers.0.mlp.experts.5.up_proj.weight"
    _save_without(hf, lambda k: k == gone)
    needle = f"has no tensor {gone}, which mlx-lm's qwen3_moe sanitize needs"
    _one_line(capsys, convert_main, [str(hf), str(tmp_path / "out")], needle)
    _one_line(capsys, plan_main, [str(hf)], needle)


def test_stray_files_are_neither_shards_nor_copied(tmp_path):
    """Only the index's files are the weights (not an adapters.safetensors or a Mistral-format
    consolidated.safetensors: the store linked them and failed to load), and only what the
    model needs is copied (not other formats' weights)."""
    src = make_tiny_model("qwen3_moe", tmp_path / "src")
    mx.save_safetensors(str(src / "adapters.safetensors"), {"lora.a": mx.zeros((4, 4))})
    mx.save_safetensors(str(src / "consolidated.safetensors"), {"tok_embeddings.weight": mx.zeros((4,))})
    for name in ("pytorch_model-00001-of-00001.bin", "model.gguf", ".gitattributes",
                 "pytorch_model.bin.index.json", "README.md"):
        (src / name).write_text("not needed\n")
    for name in ("generation_config.json", "tokenizer.model", "modeling_x.py", "vocab.tiktoken"):
        (src / name).write_text("{}\n")
    dst = converter.convert(src, tmp_path / "out", progress=False)
    links = sorted(p for p in dst.iterdir() if p.suffix == ".safetensors")
    assert [os.path.realpath(p) for p in links] == [str((src / "model.safetensors").resolve())]
    assert sorted(p.name for p in dst.iterdir() if p.is_file() and p.suffix != ".safetensors") == [
        "chat_template.jinja", "config.json", "generation_config.json", "modeling_x.py",
        "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.tiktoken"]
    import hobbit_mlx

    model, _ = hobbit_mlx.load(dst, progress=False)
    hobbit_mlx.runtime_of(model).close()
    assert plan_model(str(src), "1GB")["dense_bytes"] == plan_model(str(dst), "1GB")["dense_bytes"]


def test_packed_weights_without_a_quantization_entry_are_refused(tmp_path, capsys):
    src = make_tiny_model("qwen3_moe", tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    del config["quantization"], config["quantization_config"]
    (src / "config.json").write_text(json.dumps(config))
    needle = 'config.json has no "quantization" entry'
    _one_line(capsys, convert_main, [str(src), str(tmp_path / "out")], needle)
    _one_line(capsys, plan_main, [str(src)], needle)
    assert not (tmp_path / "out").exists()


def test_a_quantized_layer_without_its_scales_is_named(tmp_path, capsys):
    src = make_tiny_model("qwen3_moe", tmp_path / "src")
    _save_without(src, lambda k: k == "model.layers.0.self_attn.q_proj.scales")
    _one_line(capsys, convert_main, [str(src), str(tmp_path / "out")],
              "lack model.layers.0.self_attn.q_proj.scales")


def test_an_invalid_config_is_one_line(tmp_path, capsys):
    src = make_tiny_model("qwen3_moe", tmp_path / "src")
    (src / "config.json").write_text("{bad")
    _one_line(capsys, convert_main, [str(src), str(tmp_path / "out")],
              f"{src / 'config.json'}: not valid JSON")


def test_help_says_bits_is_the_dense_width_too(capsys):
    with pytest.raises(SystemExit):
        convert_main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "also the width of its dense weights" in out and "--q-bits" in out


def test_a_converted_model_is_not_a_source(tmp_path, capsys):
    src = make_tiny_model("qwen3_moe", tmp_path / "src", quantize=False)
    dst = converter.convert(src, tmp_path / "copy", progress=False)
    _one_line(capsys, convert_main, [str(dst), str(tmp_path / "again")],
              "is already a converted hobbit model: load it directly")
    q = make_tiny_model("qwen3_moe", tmp_path / "q")  # a store by reference links all of it
    ref = converter.convert(q, tmp_path / "ref", progress=False)
    assert load_manifest(converter.convert(ref, tmp_path / "ref2", progress=False)).layers


def test_force_replaces_only_a_model_an_empty_directory_or_a_file(tmp_path, capsys):
    src = make_tiny_model("qwen3_moe", tmp_path / "src")
    models = tmp_path / "models"  # the folder meant to hold the model
    (models / "other").mkdir(parents=True)
    (models / "other" / "weights.bin").write_text("precious\n")
    for force in ([], ["--force"]):
        err = _one_line(capsys, convert_main, [str(src), str(models), "--quiet", *force],
                        "not even with --force")
        assert "pass --force" not in err and str(models / "src") in err
    assert (models / "other" / "weights.bin").read_text() == "precious\n"
    (tmp_path / "empty").mkdir()
    _one_line(capsys, convert_main, [str(src), str(tmp_path / "empty"), "--quiet"],
              "(an empty directory); pass --force")
    assert convert_main([str(src), str(tmp_path / "empty"), "--quiet", "--force"]) == 0
    assert convert_main([str(src), str(tmp_path / "empty"), "--quiet", "--force"]) == 0


def test_a_destination_that_appears_meanwhile_is_not_replaced(tmp_path, capsys, monkeypatch):
    src = make_tiny_model("qwen3_moe", tmp_path / "src")
    dst = tmp_path / "out"
    real = converter._model_files

    def another_conversion_writes_dst(src_dir):
        (dst / "experts").mkdir(parents=True)
        (dst / "experts" / "manifest.json").write_text("{}")
        return real(src_dir)

    monkeypatch.setattr(converter, "_model_files", another_conversion_writes_dst)
    _one_line(capsys, convert_main, [str(src), str(dst), "--quiet"], "appeared while converting")
    assert (dst / "experts" / "manifest.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(),
                    reason="signals reach the main thread only")
def test_sigterm_interrupts_like_ctrl_c_and_a_stale_partial_is_named(tmp_path, capsys,
                                                                     monkeypatch):
    src = make_tiny_model("qwen3_moe", tmp_path / "src")
    out = tmp_path / "out"
    real = converter._model_files

    def terminated(src_dir):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(src_dir)

    monkeypatch.setattr(converter, "_model_files", terminated)
    assert convert_main([str(src), str(out / "model"), "--quiet"]) == 143
    err = capsys.readouterr().err
    kept, = out.glob(f".model.partial-{os.getpid()}x*")  # (its expert layers were all done)
    assert err.endswith("\ninterrupted (SIGTERM)\n") and "nothing was written" not in err
    assert f"kept 2 of 2 converted layers in {kept}: the same command resumes" in err
    assert [p.name for p in out.iterdir()] == [kept.name]
    monkeypatch.setattr(converter, "_model_files", real)
    dead = _dead_pid()
    stale = out / f".model.partial-{dead}"
    stale.mkdir()
    (stale / "layer.safetensors").write_bytes(b"\0" * 3 * 2**20)  # what kill -9 left
    assert convert_main([str(src), str(out / "model"), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and f"removed {stale} (3.0 MiB)" in err and f"(pid {dead})" in err
    assert "resuming an interrupted conversion" in err and "2 of 2 layers were done" in err
    assert sorted(p.name for p in out.iterdir()) == ["model"]


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(),
                    reason="signals reach the main thread only")
def test_an_interrupt_once_the_new_model_is_in_place_finishes(tmp_path, capsys, monkeypatch):
    """Ctrl-C while the replaced model is removed: DST holds the new model, so the removal
    finishes and the conversion reports it (it said "nothing was written", and a half-deleted
    hidden copy stayed); a library caller gets its KeyboardInterrupt once it is done."""
    a = make_tiny_model("qwen3_moe", tmp_path / "a", seed=0)
    b = make_tiny_model("qwen3_moe", tmp_path / "b", seed=1)
    out = tmp_path / "out"
    dst = converter.convert(a, out / "model", progress=False)
    real = converter.destination._remove

    def interrupted(path):
        if ".old-" in path.name:
            os.kill(os.getpid(), signal.SIGINT)
        return real(path)

    monkeypatch.setattr(converter.destination, "_remove", interrupted)
    assert convert_main([str(b), str(dst), "--force", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "wrote" in captured.out and "nothing was written" not in captured.err
    assert load_manifest(dst).source == str(b.resolve())
    assert sorted(p.name for p in out.iterdir()) == ["model"]
    # (a library caller's Ctrl-C is Python's own handler's; a test run started in the background
    # by a shell without job control inherits SIGINT ignored, and then nothing is delivered)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            converter.convert(a, dst, force=True, progress=False)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert load_manifest(dst).source == str(a.resolve())
    assert sorted(p.name for p in out.iterdir()) == ["model"]


def test_a_float_conversion_prints_no_mlx_lm_bits_per_weight(tmp_path, capsys):
    src = make_tiny_model("qwen3_moe", tmp_path / "src", quantize=False)
    converter.convert(src, tmp_path / "out", progress=True)
    assert "[INFO]" not in capsys.readouterr().out


def test_plan_of_a_store_whose_source_is_gone_gives_loads_message(tmp_path, capsys):
    src = make_tiny_model("qwen3_moe", tmp_path / "src")
    dst = converter.convert(src, tmp_path / "out", progress=False)
    (src / "model.safetensors").unlink()
    _one_line(capsys, plan_main, [str(dst)],
              "this model reads its source checkpoint in place and the file is missing")


def test_plan_of_a_mixed_bit_checkpoint_says_its_experts_widths(tmp_path):
    from mlx_lm.convert import mixed_quant_predicate_builder
    from mlx_lm.utils import quantize_model

    from hobbit_mlx.testing.tiny_models import _save, _vocab_size, build_model

    model, config = build_model("qwen3_moe")
    predicate = mixed_quant_predicate_builder("mixed_3_6", model)
    with contextlib.redirect_stdout(io.StringIO()):
        model, config = quantize_model(model, config, 64, 3, quant_predicate=predicate)
    src = tmp_path / "mq36"
    _save(model, config, src, _vocab_size(config))
    dst = converter.convert(src, tmp_path / "out", progress=False)
    planned, converted = plan_model(str(src), "1GB"), plan_model(str(dst), "1GB")
    assert converted["expert_bits_high"] == [3, 6]
    for key in ("expert_bits_high", "expert_bits_low", "expert_bytes_high", "expert_bytes_low"):
        assert planned[key] == converted[key], key
