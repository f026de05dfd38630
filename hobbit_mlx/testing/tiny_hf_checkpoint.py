"""Unquantized Hugging Face-style checkpoints with per-expert keys, from tiny models.

Its own module because it is a separate job from building tiny models: it
unstacks the routed experts of an mlx-lm model (and undoes MLA's split of
``kv_b_proj``) so that mlx-lm's ``sanitize`` path can be tested.  The
per-architecture weight names are in
:data:`hobbit_mlx.testing.tiny_configs.HF_PER_EXPERT_ARCHS`.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Dict, Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .tiny_configs import HF_PER_EXPERT_ARCHS, _vocab_size
from .tiny_tokenizer import _copy_tokenizer


def _switch_containers(model: nn.Module):
    """(path, module) of every SwitchGLU/SwitchMLP (routed experts) in model."""
    from mlx_lm.models.switch_layers import SwitchGLU, SwitchMLP

    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, (SwitchGLU, SwitchMLP))
    ]


def expert_module_paths(model: nn.Module) -> list:
    """Dotted paths of the routed-expert linears (SwitchLinear or
    QuantizedSwitchLinear inside a SwitchGLU/SwitchMLP) of an mlx-lm model.

    With the saved weights ``w`` of a quantized model, every
    ``f"{path}.scales"`` is in ``w``.
    """
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

    out = []
    for name, m in _switch_containers(model):
        for child, c in m.children().items():
            if isinstance(c, (SwitchLinear, QuantizedSwitchLinear)):
                out.append(f"{name}.{child}")
    return sorted(out)


def _arch_module(model: nn.Module) -> str:
    return type(model).__module__.rsplit(".", 1)[-1]


def save_hf_per_expert(
    model_dir_or_model,
    out_dir: Union[str, Path],
    *,
    config: Optional[dict] = None,
    dtype: mx.Dtype = mx.float32,
) -> Path:
    """Write an unquantized Hugging Face-style checkpoint with per-expert keys.

    ``model_dir_or_model`` is either a directory written by
    :func:`make_tiny_model` (a quantized one is dequantized first) or an
    mlx-lm model, in which case ``config`` (the hub-style config dict, e.g.
    from :func:`build_model`) is required.

    The routed experts are unstacked, e.g. for mixtral
    ``model.layers.{l}.block_sparse_moe.experts.{e}.w1/w2/w3.weight`` and for
    qwen3_moe ``model.layers.{l}.mlp.experts.{e}.gate_proj/up_proj/down_proj.weight``;
    MLA attention gets its ``kv_b_proj`` back.  mlx-lm's ``Model.sanitize``
    turns the checkpoint back into the stacked form, so ``mlx_lm.load(out_dir)``
    gives the same model.  Supported archs: ``HF_PER_EXPERT_ARCHS``.
    """
    from mlx_lm.utils import dequantize_model, load_model, save_config

    src_dir = None
    if isinstance(model_dir_or_model, (str, Path)):
        src_dir = Path(model_dir_or_model)
        model, config = load_model(src_dir)
        config = copy.deepcopy(config)
        model = dequantize_model(model)
    else:
        model = model_dir_or_model
        if config is None:
            raise ValueError("config is required when passing a model")
        config = copy.deepcopy(config)
    config.pop("quantization", None)
    config.pop("quantization_config", None)

    arch = _arch_module(model)
    if arch not in HF_PER_EXPERT_ARCHS:
        raise NotImplementedError(
            f"save_hf_per_expert does not support {arch!r}; "
            f"supported: {sorted(HF_PER_EXPERT_ARCHS)}"
        )
    spec = HF_PER_EXPERT_ARCHS[arch]
    names = spec.get("names", {})
    experts = spec.get("experts", "experts")

    weights = dict(tree_flatten(model.parameters()))
    out: Dict[str, mx.array] = {}

    # Routed experts: unstack.
    for path, m in _switch_containers(model):
        parent = path.rsplit(".", 1)[0]
        for child in m.children():
            for kind in ("weight", "bias"):
                key = f"{path}.{child}.{kind}"
                if key not in weights:
                    continue
                w = weights.pop(key)
                hf_child = names.get(child, child)
                for e in range(w.shape[0]):
                    out[f"{parent}.{experts}.{e}.{hf_child}.{kind}"] = w[e]

    # MLA: mlx-lm splits kv_b_proj into embed_q / unembed_out; undo it.
    for name, m in model.named_modules():
        if not spec.get("mla", True):
            break
        if not (hasattr(m, "embed_q") and hasattr(m, "unembed_out")):
            continue
        wk = weights.pop(f"{name}.embed_q.weight")  # (H, kv_lora, nope)
        wv = weights.pop(f"{name}.unembed_out.weight")  # (H, v_head, kv_lora)
        kv_b = mx.concatenate([wk.swapaxes(-1, -2), wv], axis=1)
        out[f"{name}.kv_b_proj.weight"] = kv_b.reshape(-1, kv_b.shape[-1])

    out.update(weights)
    if "fixup" in spec:
        spec["fixup"](out)
    out = {
        k: (v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v)
        for k, v in out.items()
    }

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out_dir / "model.safetensors"), out, metadata={"format": "pt"})
    config["torch_dtype"] = {mx.float32: "float32", mx.bfloat16: "bfloat16", mx.float16: "float16"}.get(dtype, str(dtype))
    save_config(config, config_path=out_dir / "config.json")
    _copy_tokenizer(src_dir, out_dir, _vocab_size(config))
    return out_dir

