"""The bundled reference model: the default of load(), exact against mlx-lm, genuinely trained."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest

import hobbit_mlx
from hobbit_mlx.loader import REFERENCE_MODEL, runtime_of

pytestmark = pytest.mark.skipif(not (REFERENCE_MODEL / "config.json").is_file(),
                                reason="reference model not bundled")

CODE = "import os\nimport sys\n\n\ndef main(argv=None):\n    parser = argparse.ArgumentParser()\n"


def test_default_model_is_the_reference_model_and_exact(tmp_path, monkeypatch):
    monkeypatch.setenv("HOBBIT_MLX_CACHE", str(tmp_path))
    model, tokenizer = hobbit_mlx.load(expert_residency=0.25, exact=True, progress=False)
    assert runtime_of(model).manifest.num_experts == 64
    ref, _ = mlx_lm.load(str(REFERENCE_MODEL))
    ref.set_dtype(mx.float32)
    tokens = mx.array([tokenizer.encode(CODE)])
    np.testing.assert_allclose(np.array(model(tokens)), np.array(ref(tokens)), rtol=0, atol=1e-4)
    expected = mlx_lm.generate(ref, tokenizer, CODE, max_tokens=20)
    assert hobbit_mlx.generate(model, tokenizer, CODE, max_tokens=20) == expected


def test_reference_model_predicts_python_far_better_than_chance(tmp_path, monkeypatch):
    monkeypatch.setenv("HOBBIT_MLX_CACHE", str(tmp_path))
    model, tokenizer = hobbit_mlx.load(expert_residency=0.5, progress=False)
    text = open(__import__("json").__file__.replace("__init__", "decoder")).read()[:2000]
    ids = tokenizer.encode(text)[:400]
    logits = model(mx.array([ids[:-1]])).astype(mx.float32)
    nll = float(mx.mean(mx.logsumexp(logits, axis=-1) - mx.take_along_axis(
        logits, mx.array([ids[1:]])[..., None], axis=-1)[..., 0]))
    assert nll < 0.5 * math.log(len(tokenizer.vocab))  # a uniform guess scores log(V)
