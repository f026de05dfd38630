"""Tiny random MoE models of mlx-lm architectures: build, load, run, round-trip."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import mlx.core as mx  # noqa: E402
import mlx_lm  # noqa: E402
import pytest  # noqa: E402
from mlx_lm.models import switch_layers  # noqa: E402

from hobbit_mlx.testing import tiny_models as tm  # noqa: E402

PROMPT = "def hello(x):\n    return x + 1  # hi"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def routing_recorder(monkeypatch):
    """Records the expert indices every SwitchGLU/SwitchMLP call receives."""
    calls = []
    for cls in (switch_layers.SwitchGLU, switch_layers.SwitchMLP):
        orig = cls.__call__

        def wrapped(self, x, indices, _orig=orig):
            calls.append(indices)
            return _orig(self, x, indices)

        monkeypatch.setattr(cls, "__call__", wrapped)
    return calls


def _check_model_dir(path: Path, calls: list, quantized: bool = True):
    model, tokenizer = mlx_lm.load(str(path))
    ids = tokenizer.encode(PROMPT)
    assert len(ids) > 4
    calls.clear()
    logits = model(mx.array(ids)[None])
    mx.eval(logits)

    assert logits.shape == (1, len(ids), tm.VOCAB_SIZE)
    assert mx.all(mx.isfinite(logits)).item()
    # Logits differ across positions.
    assert mx.std(logits[0], axis=0).mean().item() > 1e-2
    assert mx.abs(logits[0, 0] - logits[0, -1]).max().item() > 1e-3

    # Routing is not degenerate: some layer sends tokens to several experts.
    assert calls, "no SwitchGLU/SwitchMLP was called"
    assert max(len(set(c.flatten().tolist())) for c in calls) > 2

    weights = mx.load(str(path / "model.safetensors"))
    paths = tm.expert_module_paths(model)
    assert paths, "no routed experts found"
    config = json.loads((path / "config.json").read_text())
    if quantized:
        assert config["quantization"]["bits"] == 4
        assert config["quantization"]["group_size"] == 64
        assert config["quantization_config"] == config["quantization"]
        for p in paths:
            assert f"{p}.scales" in weights and f"{p}.biases" in weights, p
            assert weights[f"{p}.weight"].dtype == mx.uint32, p
    else:
        assert "quantization" not in config
        assert not any(k.endswith(".scales") for k in weights)
        for p in paths:
            assert weights[f"{p}.weight"].dtype == mx.float32
            assert weights[f"{p}.weight"].ndim == 3  # stacked experts
    return model, tokenizer, logits


@pytest.mark.parametrize("arch", tm.REQUIRED_ARCHS)
def test_required_arch_quantized(tmp_path, routing_recorder, arch):
    path = tm.make_tiny_model(arch, tmp_path / arch)
    _check_model_dir(path, routing_recorder)


@pytest.mark.parametrize(
    "arch", sorted(set(tm.TINY_ARCHS) - set(tm.REQUIRED_ARCHS))
)
def test_extra_arch_quantized(tmp_path, routing_recorder, arch):
    path = tm.make_tiny_model(arch, tmp_path / arch)
    _check_model_dir(path, routing_recorder)


def test_registry():
    assert set(tm.REQUIRED_ARCHS) <= set(tm.TINY_ARCHS)
    assert not set(tm.SKIPPED_ARCHS) & set(tm.TINY_ARCHS)
    assert set(tm.UNVERIFIED_ARCHS) <= set(tm.SKIPPED_ARCHS)
    ds3 = tm.TINY_ARCHS["deepseek_v3"]
    assert ds3["first_k_dense_replace"] == 1 and ds3["n_shared_experts"] >= 1
    assert ds3["topk_method"] == "noaux_tc" and ds3["scoring_func"] == "sigmoid"
    assert tm.TINY_ARCHS["qwen2_moe"]["shared_expert_intermediate_size"] > 0
    assert "text_config" in tm.TINY_ARCHS["llama4"]


def test_reexports():
    """tiny_models re-exports the tables of tiny_configs (the same objects) and the
    helpers of tiny_tokenizer/tiny_hf_checkpoint, so callers import from one place."""
    from hobbit_mlx.testing import tiny_configs as tc

    for name in tm.__all__:
        assert hasattr(tm, name), name
    for name in ("TINY_ARCHS", "SKIPPED_ARCHS", "REQUIRED_ARCHS", "UNVERIFIED_ARCHS",
                 "HF_PER_EXPERT_ARCHS", "tiny_config"):
        assert getattr(tm, name) is getattr(tc, name), name


def test_unquantized_and_deterministic(tmp_path, routing_recorder):
    a = tm.make_tiny_model("deepseek_v3", tmp_path / "a", quantize=False)
    model, _, logits = _check_model_dir(a, routing_recorder, quantized=False)
    # layer 0 is dense, the other layers are MoE with noaux_tc routing
    assert not tm.expert_module_paths(model.model.layers[0])
    assert tm.expert_module_paths(model.model.layers[1])
    bias = model.model.layers[1].mlp.gate.e_score_correction_bias
    assert mx.abs(bias).max().item() > 0

    b = tm.make_tiny_model("deepseek_v3", tmp_path / "b", quantize=False)
    wa, wb = mx.load(str(a / "model.safetensors")), mx.load(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    assert all(mx.array_equal(wa[k], wb[k]).item() for k in wa)
    c = tm.make_tiny_model("deepseek_v3", tmp_path / "c", quantize=False, seed=1)
    wc = mx.load(str(c / "model.safetensors"))
    assert not mx.array_equal(wa["lm_head.weight"], wc["lm_head.weight"]).item()


def test_config_overrides_and_bits(tmp_path):
    path = tm.make_tiny_model(
        "qwen3_moe",
        tmp_path / "m",
        bits=8,
        config_overrides={"num_hidden_layers": 3, "num_experts": 4},
    )
    config = json.loads((path / "config.json").read_text())
    assert config["num_hidden_layers"] == 3 and config["num_experts"] == 4
    assert config["quantization"]["bits"] == 8
    model, _ = mlx_lm.load(str(path))
    assert len(model.layers) == 3
    assert model.layers[0].mlp.switch_mlp.up_proj.bits == 8


def test_tokenizer(tmp_path):
    tok = tm.make_tokenizer(tmp_path / "tok")
    assert len(tok) == tm.VOCAB_SIZE
    tok2 = tm.make_tokenizer(tmp_path / "tok2")  # cached: same vocabulary
    assert tok.get_vocab() == tok2.get_vocab()
    assert tok.bos_token_id == tm.BOS_ID and tok.eos_token_id == tm.EOS_ID
    assert tok.pad_token_id == tm.PAD_ID
    assert tok.decode(tok.encode(PROMPT, add_special_tokens=False)) == PROMPT


def test_chat_and_generate(tmp_path):
    path = tm.make_tiny_model("qwen3_moe", tmp_path / "m")
    model, tokenizer = mlx_lm.load(str(path))
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True
    )
    text = prompt if isinstance(prompt, str) else tokenizer.decode(prompt)
    assert "<|im_start|>assistant\n" in text
    out = mlx_lm.generate(model, tokenizer, prompt=prompt, max_tokens=4)
    assert isinstance(out, str)


@pytest.mark.parametrize(
    "arch, expert_key",
    [
        ("mixtral", "model.layers.1.block_sparse_moe.experts.7.w2.weight"),
        ("qwen3_moe", "model.layers.1.mlp.experts.7.down_proj.weight"),
        ("deepseek_v3", "model.layers.2.mlp.experts.7.down_proj.weight"),
    ],
)
def test_hf_per_expert_round_trip(tmp_path, arch, expert_key):
    src = tm.make_tiny_model(arch, tmp_path / "mlx", quantize=False)
    hf = tm.save_hf_per_expert(src, tmp_path / "hf")
    weights = mx.load(str(hf / "model.safetensors"))
    assert expert_key in weights
    assert not any("switch_mlp" in k for k in weights)
    assert not any(k.endswith(".scales") for k in weights)
    assert "quantization" not in json.loads((hf / "config.json").read_text())
    if arch == "deepseek_v3":
        assert "model.layers.0.self_attn.kv_b_proj.weight" in weights

    ids = mx.array([[5, 100, 200, 300, 17, 400, 50, 60]])
    ref, _ = mlx_lm.load(str(src))
    got, _ = mlx_lm.load(str(hf))
    assert mx.allclose(ref(ids), got(ids), rtol=0, atol=1e-5).item()


def test_hf_per_expert_from_model_and_quantized_dir(tmp_path):
    model, config = tm.build_model("mixtral")
    hf = tm.save_hf_per_expert(model, tmp_path / "hf", config=config, dtype=mx.bfloat16)
    w = mx.load(str(hf / "model.safetensors"))
    assert w["model.layers.0.block_sparse_moe.experts.0.w1.weight"].dtype == mx.bfloat16
    ids = mx.array([[5, 100, 200, 300]])
    loaded, _ = mlx_lm.load(str(hf))
    loaded.set_dtype(mx.float32)  # CPU gather_mm only supports float32
    assert mx.allclose(model(ids), loaded(ids), atol=0.1).item()

    # From a quantized checkpoint: the HF checkpoint holds the dequantized experts.
    q = tm.make_tiny_model("qwen3_moe", tmp_path / "q")
    hf_q = tm.save_hf_per_expert(q, tmp_path / "hf_q")
    ref, _ = mlx_lm.load(str(q))
    got, _ = mlx_lm.load(str(hf_q))
    assert mx.allclose(ref(ids), got(ids), atol=1e-3).item()

    with pytest.raises(NotImplementedError):
        tm.save_hf_per_expert(tm.build_model("gpt_oss")[0], tmp_path / "x", config={})


def test_cli(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = tmp_path / "cli"
    subprocess.run(
        [sys.executable, "-m", "hobbit_mlx.testing.tiny_models", "olmoe", str(out), "--no-quantize"],
        check=True,
        env=env,
        capture_output=True,
    )
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "olmoe" and "quantization" not in config
    assert (out / "tokenizer.json").exists()
