"""The dense (non-expert) weights: mlx-lm's sanitize of the checkpoint, the check that every
dense tensor the model needs is there as ``mlx_lm.load`` would take it, their quantization
(a float source's, as ``mlx_lm.convert`` quantizes) and the copies written into DST."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.utils import make_shards, quantize_model

from .errors import ConversionError
from .source import _source_quantization


def sanitize_weights(model: nn.Module, weights: dict, config: dict) -> dict:
    """mlx-lm's own ``sanitize`` of the model (names mapped onto mlx-lm's, experts stacked);
    a tensor it needs that the checkpoint lacks is a ConversionError naming it (it was a bare
    KeyError out of mlx-lm)."""
    if not hasattr(model, "sanitize"):
        return weights
    try:
        return model.sanitize(weights)
    except KeyError as e:
        name = e.args[0] if e.args else "?"
        raise ConversionError(
            f"the checkpoint has no tensor {name}, which mlx-lm's {config.get('model_type')} "
            "sanitize needs: is a weight file missing or damaged (incomplete download?), or is "
            "it not the model its config.json names?") from None


def _names(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


def check_dense_weights(model: nn.Module, weights: dict, switch_paths: list[str],
                        config: dict) -> None:
    """The checkpoint's non-expert weights (after sanitize) are the ones ``mlx_lm.load`` would
    take for ``model`` (freshly built, unquantized): every parameter it needs is there (a missing
    one used to be quantized from its random initial value, and the model gave garbage), a float
    source's with the shape the model has; packed weights come with config.json's
    ``quantization`` entry; a quantized source (whose tensors the store keeps as they are) has
    none the model cannot take."""
    prefixes = tuple(p + "." for p in switch_paths)
    params = {k: v for k, v in tree_flatten(model.parameters()) if not k.startswith(prefixes)}
    quantized = config.get("quantization") is not None
    if not quantized:
        for k in sorted(weights):
            if not k.endswith(".scales") or k.startswith(prefixes):
                continue
            base = k[:-len(".scales")]
            w = weights.get(base + ".weight")
            if w is None or mx.issubdtype(w.dtype, mx.floating):
                continue
            like = ""
            if base + ".weight" in params:
                with contextlib.suppress(Exception):
                    q = _source_quantization(weights, base, int(params[base + ".weight"].shape[-1]))
                    like = (f' (these look like "quantization": {{"group_size": {q["group_size"]}, '
                            f'"bits": {q["bits"]}, "mode": "{q["mode"]}"}})')
            packed = str(w.dtype).rsplit(".", 1)[-1]
            raise ConversionError(
                f"the weights are quantized ({base}.weight is packed {packed}, with "
                f"{base}.scales) but config.json has no \"quantization\" entry: restore the one "
                f"the checkpoint was saved with{like}")
    missing = sorted(k for k in params if k not in weights)
    if missing:
        how = ""
        qc = config.get("quantization_config")
        if not quantized and isinstance(qc, dict) and qc.get("quant_method"):
            how = (f" (or its quantization, quantization_config's quant_method "
                   f"{qc['quant_method']!r}, is not one the converter reads)")
        raise ConversionError(
            f"the checkpoint has no {_names(missing)} (after mlx-lm's sanitize), which the model "
            "needs (mlx-lm refuses to load it too): is a weight file missing (incomplete "
            f"download?), or is it not the model its config.json names{how}?")
    if not quantized:
        for k, v in params.items():
            if tuple(weights[k].shape) != tuple(v.shape):
                raise ConversionError(
                    f"{k} has shape {list(weights[k].shape)} but the model its config.json "
                    f"describes needs {list(v.shape)}: is it the model its config.json names?")
    else:
        suffixes = ("scales", "biases", "global_scale")
        extra = sorted(k for k in weights if not k.startswith(prefixes) and k not in params
                       and not (k.rsplit(".", 1)[-1] in suffixes
                                and k.rsplit(".", 1)[0] + ".weight" in params))
        if extra:
            raise ConversionError(
                f"the checkpoint has tensors the model has no place for: {_names(extra)} "
                "(after mlx-lm's sanitize; mlx-lm refuses to load it too): is it the model its "
                "config.json names?")
        q = config["quantization"]
        lacking = []
        for k in sorted(params):
            w = weights.get(k)
            if not k.endswith(".weight") or w is None or mx.issubdtype(w.dtype, mx.floating):
                continue  # (packed: its scales, and an affine layer's biases, must be there)
            base = k[:-len(".weight")]
            mode = (q.get(base) if isinstance(q.get(base), dict) else q).get("mode", "affine")
            lacking += [f"{base}.{part}" for part in ("scales", "biases")
                        if f"{base}.{part}" not in weights and (part == "scales" or mode == "affine")]
        if lacking:
            raise ConversionError(
                f"the checkpoint's quantized weights lack {_names(lacking)} (mlx-lm refuses to "
                "load it too): is a weight file damaged or incomplete?")


def _dense_weights(model: nn.Module, weights: dict, switch_paths: list[str], config: dict,
                   bits: int, group_size: int) -> tuple[dict, dict]:
    """Non-expert weights in mlx-lm form; quantized like ``mlx_lm.convert`` when the source is float."""
    prefixes = tuple(p + "." for p in switch_paths)
    dense = {k: v for k, v in weights.items() if not k.startswith(prefixes)}
    if config.get("quantization") is not None:
        return dense, config
    model.load_weights(list(dense.items()), strict=False)
    own = getattr(model, "quant_predicate", None)

    def predicate(path, module):
        if path.startswith(prefixes) or path in switch_paths:
            return False
        return own(path, module) if own is not None else True

    model, config = quantize_model(model, config, group_size, bits, quant_predicate=predicate)
    dense = {k: v for k, v in tree_flatten(model.parameters()) if not k.startswith(prefixes)}
    return dense, config


def _write_dense(dense: dict, out: Path) -> None:
    shards = make_shards(dense)
    name = "model-{:05d}-of-{:05d}.safetensors" if len(shards) > 1 else "model.safetensors"
    index = {"metadata": {"total_size": sum(v.nbytes for v in dense.values())}, "weight_map": {}}
    for i, shard in enumerate(shards):
        fname = name.format(i + 1, len(shards))
        mx.save_safetensors(str(out / fname), shard, metadata={"format": "mlx"})
        index["weight_map"].update({k: fname for k in shard})
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
