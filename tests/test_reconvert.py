"""Converting again: ``force=True`` replaces a converted model whole, and what a killed
conversion left behind neither confuses a new one nor stays forever."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
from mlx_lm.utils import load_model

import convert as converter
import hobbit_mlx
from hobbit_mlx.testing.tiny_models import make_tiny_model

TOKENS = mx.array([[5, 9, 33, 60, 100, 7, 8, 2, 11]])


def _logits_of_source(src) -> np.ndarray:
    model, _ = load_model(src)
    model.set_dtype(mx.float32)
    return np.array(model(TOKENS))


def _logits(dst) -> np.ndarray:
    model, _ = hobbit_mlx.load(dst, expert_residency=0.5, exact=True, progress=False)
    return np.array(model(TOKENS))


def test_force_replaces_a_converted_model_whole(tmp_path):
    a = make_tiny_model("qwen3_moe", tmp_path / "a", seed=0)
    b = make_tiny_model("qwen3_moe", tmp_path / "b", seed=1)
    dst = converter.convert(a, tmp_path / "out" / "model", progress=False)
    np.testing.assert_allclose(_logits(dst), _logits_of_source(a), rtol=0, atol=1e-5)
    converter.convert(b, dst, force=True, progress=False)
    np.testing.assert_allclose(_logits(dst), _logits_of_source(b), rtol=0, atol=1e-5)
    assert sorted(p.name for p in dst.parent.iterdir()) == ["model"]  # no temporary left


def test_a_killed_conversion_leaves_nothing_that_lasts(tmp_path):
    import subprocess
    import sys

    src = make_tiny_model("qwen3_moe", tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()  # a pid that has ended
    for kind in ("partial", "old"):  # what a conversion killed mid-way (or mid-swap) leaves
        stale = out / f".model.{kind}-{dead}"
        (stale / "experts").mkdir(parents=True)
        (stale / "experts" / "manifest.json").write_text("{half written")
    dst = converter.convert(src, out / "model", progress=False)
    np.testing.assert_allclose(_logits(dst), _logits_of_source(src), rtol=0, atol=1e-5)
    assert sorted(p.name for p in out.iterdir()) == ["model"]


def test_the_reconvert_hint_works_from_another_directory(tmp_path, monkeypatch):
    """The manifest keeps the source as an absolute path, so the command a changed source's
    error suggests runs from anywhere (it used to repeat the relative path typed)."""
    import os
    import shlex

    import pytest

    from convert.__main__ import main as convert_main
    from hobbit_mlx.store import StoreError

    make_tiny_model("qwen3_moe", tmp_path / "work" / "s2")
    monkeypatch.chdir(tmp_path / "work")
    dst = converter.convert("s2", "s2-h", progress=False)
    weights = tmp_path / "work" / "s2" / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    with pytest.raises(StoreError, match="reconvert with `python -m convert ") as e:
        hobbit_mlx.load(tmp_path / "work" / dst, progress=False)
    command = str(e.value).split("`")[1]
    argv = shlex.split(command)[3:]
    assert argv[0] == str((tmp_path / "work" / "s2").resolve())
    assert convert_main([*argv, "--quiet"]) == 0
    np.testing.assert_allclose(_logits(tmp_path / "work" / dst),
                               _logits_of_source(tmp_path / "work" / "s2"), rtol=0, atol=1e-5)
