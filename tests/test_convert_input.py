"""What ``convert`` refuses before it writes anything (a DST that is or holds the source, widths
and group sizes MLX cannot quantize with, a DST that cannot be a directory), and what it writes
so that its manifest tells the truth (the experts' real widths)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

import convert as converter
from convert.__main__ import main as convert_main
from hobbit_mlx.store import load_manifest
from hobbit_mlx.testing.tiny_models import make_tiny_model


def _snapshot(d: Path) -> dict:
    return {f.name: hashlib.sha1(f.read_bytes()).hexdigest() for f in sorted(d.iterdir())}


def _one_line_error(capsys, argv, needle, code=2):
    assert convert_main(argv) == code
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert needle in err, err
    return err


def test_a_destination_that_is_or_holds_the_source_is_refused(tmp_path, capsys, monkeypatch):
    src = make_tiny_model("qwen3_moe", tmp_path / "models" / "src")
    before = _snapshot(src)
    (tmp_path / "link").symlink_to(src)
    monkeypatch.chdir(tmp_path / "models")
    for dst in (src, "src", "./src/../src", tmp_path / "link", "~/../" + str(src)):
        with pytest.raises(converter.ConversionError, match="is the source checkpoint itself"):
            converter.convert(src, dst, force=True, progress=False)
    for dst in (src.parent, tmp_path):  # --force would delete the directory the source is in
        with pytest.raises(converter.ConversionError, match="contains the source checkpoint"):
            converter.convert(src, dst, force=True, progress=False)
    _one_line_error(capsys, ["src", "src", "--force", "--quiet"], "is the source checkpoint itself")
    _one_line_error(capsys, ["src", "src"], "is the source checkpoint itself")  # not "pass --force"
    assert _snapshot(src) == before
    assert sorted(p.name for p in src.parent.iterdir()) == ["src"]


def test_a_destination_holding_a_file_the_source_links_to_is_refused(tmp_path):
    real = make_tiny_model("qwen3_moe", tmp_path / "real")
    src = tmp_path / "src"
    src.mkdir()
    for f in real.iterdir():  # a checkpoint whose weights are links into another directory
        (src / f.name).symlink_to(f)
    with pytest.raises(converter.ConversionError, match="a file of the source checkpoint"):
        converter.convert(src, real, force=True, progress=False)
    assert (real / "model.safetensors").is_file()


def test_force_over_a_file_leaves_no_stray_file(tmp_path):
    src = make_tiny_model("qwen3_moe", tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    (out / "model").write_text("hello\n")
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()  # a pid that has ended
    (out / f".model.old-{dead}").write_text("a file a killed run set aside\n")
    dst = converter.convert(src, out / "model", force=True, progress=False)
    assert load_manifest(dst).layers
    assert sorted(p.name for p in out.iterdir()) == ["model"]


@pytest.mark.parametrize("kwargs,needle", [
    ({"bits": 0}, "--bits 0: MLX quantizes experts at 1, 2, 3, 4"),
    ({"bits": 7}, "--bits 7: MLX quantizes"),
    ({"low_bits": 0}, "--low-bits 0: MLX quantizes"),
    ({"low_bits": 8}, "--low-bits 8 must be below --bits 4"),
    ({"low_bits": 4}, "--low-bits 4 must be below --bits 4"),
    ({"group_size": 33}, "--group-size 33: MLX quantizes with groups of 32, 64, 128"),
    ({"group_size": 0}, "--group-size 0: MLX quantizes"),
    ({"group_size": 128}, "--group-size 128 does not divide the input dimension 64 of "
                          "model.layers.0.mlp.switch_mlp."),
    # the high precision keeps a quantized source's own width, read in place or copied
    ({"bits": 3}, "--bits 3: the source is an mlx-lm checkpoint quantized at 4 bits"),
    ({"bits": 8, "copy": True}, "--bits 8: the source is an mlx-lm checkpoint quantized at 4 bits"),
])
def test_bad_widths_and_group_sizes_are_refused(tiny_factory, tmp_path, kwargs, needle):
    src, _ = tiny_factory("qwen3_moe")
    with pytest.raises(converter.ConversionError) as e:
        converter.convert(src, tmp_path / "out", progress=False, **kwargs)
    assert str(e.value).startswith(needle), str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_bad_flags_are_one_line_errors(tiny_factory, tmp_path, capsys):
    src, _ = tiny_factory("qwen3_moe")
    dst = str(tmp_path / "out")
    _one_line_error(capsys, [str(src), dst, "--bits", "0"], "--bits 0")
    _one_line_error(capsys, [str(src), dst, "--low-bits", "8"], "--low-bits 8")
    _one_line_error(capsys, [str(src), dst, "--group-size", "33"], "--group-size 33")
    assert list(tmp_path.iterdir()) == []


def test_a_float_source_takes_the_widths_asked_and_the_manifest_says_them(tiny_factory, tmp_path):
    src, _ = tiny_factory("qwen3_moe", quantize=False)
    dst = converter.convert(src, tmp_path / "out", bits=3, low_bits=1, progress=False)
    for layer in load_manifest(dst).layers:
        for name, want in (("high", 3), ("low", 1)):
            entry = layer.precisions[name]
            assert entry.bits == want
            assert {q["bits"] for q in entry.quant.values()} == {want}
    with pytest.raises(converter.ConversionError, match="--bits 7"):
        converter.convert(src, tmp_path / "other", bits=7, progress=False)


def test_a_quantized_source_keeps_its_width_and_the_manifest_says_it(tmp_path):
    """An 8-bit mlx-lm source: the high precision is its own 8-bit experts, read in place (the
    manifest used to call them 4-bit, the default --bits)."""
    src = make_tiny_model("qwen3_moe", tmp_path / "src8", bits=8)
    dst = converter.convert(src, tmp_path / "out", progress=False)
    manifest = load_manifest(dst)
    assert manifest.references  # by reference
    for layer in manifest.layers:
        assert layer.precisions["high"].bits == 8
        assert {q["bits"] for q in layer.precisions["high"].quant.values()} == {8}
        assert layer.precisions["low"].bits == 2
    assert converter.convert(src, tmp_path / "same-bits", bits=8, progress=False).is_dir()


def test_an_impossible_destination_is_one_line(tiny_factory, tmp_path, capsys):
    src, _ = tiny_factory("qwen3_moe")
    (tmp_path / "plainfile").write_text("x")
    _one_line_error(capsys, [str(src), str(tmp_path / "plainfile" / "sub"), "--quiet"],
                    f"cannot write {tmp_path / 'plainfile' / 'sub'}: {tmp_path / 'plainfile'} is a file")
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    blocked.chmod(0o500)
    try:
        if not os.access(blocked, os.W_OK):  # (root writes anywhere)
            _one_line_error(capsys, [str(src), str(blocked / "a" / "b"), "--quiet"],
                            f"cannot write {blocked / 'a' / 'b'}")
    finally:
        blocked.chmod(0o700)
    _one_line_error(capsys, [str(src), "/proc/hobbit-nope/x", "--quiet"],
                    "cannot write /proc/hobbit-nope/x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocked", "plainfile"]


def test_os_errors_and_interrupts_are_one_line(monkeypatch, capsys, tmp_path):
    import convert.__main__ as cli

    def no_space(*a, **k):
        raise OSError(28, "No space left on device", str(tmp_path / ".out.partial-1" / "x"))

    monkeypatch.setattr(cli, "convert", no_space)
    _one_line_error(capsys, ["src", str(tmp_path / "out")],
                    f"cannot write {tmp_path / 'out'}: No space left on device")

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "convert", interrupted)
    assert cli.main(["src", str(tmp_path / "out")]) == 130
    assert capsys.readouterr().err == "interrupted; nothing was written\n"


def test_the_stored_source_is_absolute_and_a_hub_id_stays(tmp_path, monkeypatch):
    make_tiny_model("qwen3_moe", tmp_path / "work" / "src")
    monkeypatch.chdir(tmp_path / "work")
    dst = converter.convert("src", "out", progress=False)
    assert load_manifest(dst).source == str((tmp_path / "work" / "src").resolve())
    raw = json.loads((dst / "experts" / "manifest.json").read_text())
    assert os.path.isabs(raw["source"])

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo, **kw: str(tmp_path / "work" / "src"))
    hub = converter.convert("tiny-org/qwen", tmp_path / "hub", progress=False)
    assert load_manifest(hub).source == "tiny-org/qwen"


@pytest.mark.parametrize("damage, needle", [
    ("drop_scales", "up_proj.scales is missing"),
    ("half_the_experts", "up_proj.weight has shape [4,"),
])
def test_a_damaged_expert_tensor_is_named(tmp_path, capsys, damage, needle):
    """A checkpoint whose expert tensor lost its scales, or holds fewer experts than the config,
    fails by the tensor's name before anything is written (it was a bare quantize or index error)."""
    import mlx.core as mx

    src = make_tiny_model("qwen3_moe", tmp_path / "src")
    f = src / "model.safetensors"
    weights = dict(mx.load(str(f)))
    key = next(k for k in weights if k.endswith("switch_mlp.up_proj.weight"))
    if damage == "drop_scales":
        del weights[key.replace(".weight", ".scales")]
    else:
        weights[key] = weights[key][:4]
    mx.save_safetensors(str(f), weights, metadata={"format": "mlx"})
    _one_line_error(capsys, [str(src), str(tmp_path / "dst")], needle)
    assert not (tmp_path / "dst").exists()


def test_an_unreachable_hub_id_fails_in_one_line_before_any_conversion_is_announced(
        monkeypatch, capsys, tmp_path):
    """A hub id that cannot be downloaded: the error is the hub's first line, and no
    "converting ... (once)" line comes before it (the conversion never started)."""
    import huggingface_hub

    from hobbit_mlx.loader import resolve_model

    def offline(*args, **kwargs):
        raise OSError("Cannot reach the hub.\nSee the logs above for the retries.\nMore detail")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    monkeypatch.setenv("HOBBIT_MLX_CACHE", str(tmp_path / "cache"))
    with pytest.raises(converter.ConversionError) as e:
        resolve_model("some-org/some-model", progress=True)
    assert str(e.value).count("\n") == 0 and "Cannot reach the hub." in str(e.value)
    assert "converting" not in capsys.readouterr().out


def test_the_source_guard_compares_files_not_spellings(tmp_path, monkeypatch):
    """On macOS's case-insensitive disk ``Models/src`` is ``models/src``: compared as strings it
    passed the guard, and ``--force`` would have replaced the source. (Simulated: this disk is
    case-sensitive, so ``samefile`` is made to fold case as APFS does.)"""
    import os

    src = make_tiny_model("qwen3_moe", tmp_path / "Models" / "src")
    real_samefile = os.path.samefile
    monkeypatch.setattr(os.path, "samefile", lambda a, b: real_samefile(
        str(a).replace("/models", "/Models"), str(b).replace("/models", "/Models")))
    for dst in (tmp_path / "models" / "src", tmp_path / "models"):
        with pytest.raises(converter.ConversionError, match="source checkpoint"):
            converter.convert(src, dst, force=True, progress=False)
