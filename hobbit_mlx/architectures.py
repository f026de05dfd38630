"""What hobbit_mlx needs to know about an mlx-lm architecture, found from the model itself.

Routed experts in mlx-lm are "switch" modules (``SwitchGLU``, ``SwitchMLP`` or an architecture's
own class) whose children are ``SwitchLinear`` / ``QuantizedSwitchLinear`` layers holding every
expert stacked on the first axis, called as ``switch(x, indices)``. We find them by that shape
rather than by a list of names, so every architecture built on them works without special cases.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchGLU, SwitchLinear, SwitchMLP
from mlx_lm.utils import _get_classes

SWITCH_LINEAR_TYPES = (SwitchLinear, QuantizedSwitchLinear)
_TOP_K_KEYS = ("num_experts_per_tok", "experts_per_token", "num_experts_per_token", "moe_top_k",
               "moe_topk", "moe_k", "top_k_experts", "n_activated_experts", "num_selected_experts",
               "top_k")


class UnsupportedModelError(ValueError):
    """The model is not an MoE that hobbit_mlx can offload; the message says why, by name."""


def _natural_key(path: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", path)]


def is_switch_module(module: nn.Module) -> bool:
    """Only switch layers carry its parameters (attention blocks may use a SwitchLinear too)."""
    children = [c for c in module.children().values() if isinstance(c, nn.Module)]
    holders = [c for c in children if tree_flatten(c.parameters())]
    own = [k for k, v in module.items() if isinstance(v, mx.array)]
    return bool(holders) and not own and all(isinstance(c, SWITCH_LINEAR_TYPES) for c in holders)


def find_switch_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """All routed-expert modules of the model, in layer order, as (dotted path, module)."""
    found = [(p, m) for p, m in model.named_modules() if p and is_switch_module(m)]
    return sorted(found, key=lambda pm: _natural_key(pm[0]))


def switch_linear_paths(switch: nn.Module) -> list[str]:
    """Names of the switch module's expert projections (e.g. ``gate_proj``), in a fixed order."""
    return sorted(name for name, mod in switch.named_modules()
                  if name and isinstance(mod, SWITCH_LINEAR_TYPES))


def expert_param_names(switch: nn.Module) -> list[str]:
    """Parameter paths of one switch module (each stacked over experts on axis 0)."""
    return sorted(k for k, _ in tree_flatten(switch.parameters()))


def num_experts_of(switch: nn.Module) -> int:
    first = switch_linear_paths(switch)[0]
    mod = dict(switch.named_modules())[first]
    return int(mod.weight.shape[0])


def text_config(config: dict) -> dict:
    """Models with a vision tower keep the language model's settings under ``text_config``."""
    merged = dict(config)
    nested = config.get("text_config")
    if nested is not None and not isinstance(nested, dict):
        nested = vars(nested)  # a model's args may hold it as a dataclass
    merged.update(nested or {})
    return merged


def vocab_size(model_dir: str | Path) -> int:
    """The vocabulary the model's embedding holds (its config's, which may exceed the
    tokenizer's); 0 when the config does not say."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return int(text_config(config).get("vocab_size") or 0)


_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length",
                 "max_sequence_length", "model_max_length")


def trained_context(config: dict) -> int | None:
    """The longest context the model was made for (None when its config does not say): the
    position limit, times the factor of a rope scaling that extends it (yarn and the like; the
    scalings that only reshape frequencies within the limit, llama3 and longrope, do not)."""
    cfg = text_config(config)
    limits = [cfg[k] for k in _CONTEXT_KEYS if isinstance(cfg.get(k), int) and cfg[k] > 0]
    if not limits:
        return None
    tokens = min(limits)
    scaling = cfg.get("rope_scaling")
    if isinstance(scaling, dict):
        kind = scaling.get("rope_type", scaling.get("type"))
        factor = scaling.get("factor")
        if kind not in ("llama3", "longrope", "su", "default", "mrope", None) \
                and isinstance(factor, (int, float)) and factor > 1:
            base = scaling.get("original_max_position_embeddings") if kind == "yarn" else None
            tokens = int((base if isinstance(base, int) and base > 0 else tokens) * factor)
    return tokens


def experts_per_token(config: dict, model: nn.Module | None = None) -> int:
    """Top-k of the router, from the config or (for defaults it leaves out) the model's args."""
    cfg = text_config(config)
    args = getattr(model, "args", None)
    if args is not None:
        cfg = {**text_config(vars(args)), **cfg}
    for key in _TOP_K_KEYS:
        if isinstance(cfg.get(key), int) and cfg[key] > 0:
            return int(cfg[key])
    raise UnsupportedModelError(
        f"cannot tell how many experts each token uses: config has none of {', '.join(_TOP_K_KEYS)}")


def build_model(config: dict) -> nn.Module:
    """Instantiate the mlx-lm model for a config without materialising any weights.

    mlx-lm initialises parameters lazily, so the random initial values are never computed as long
    as nothing evaluates them: building even a huge model here costs no memory.
    """
    if not config.get("model_type"):
        raise UnsupportedModelError("config.json has no model_type: it is not a model's "
                                    "configuration (mlx-lm picks the architecture by it)")
    try:
        model_class, args_class = _get_classes(config)
    except ValueError as e:
        raise UnsupportedModelError(f"model_type {config.get('model_type')!r}: {e}") from None
    return model_class(args_class.from_dict(config))


def describe_moe(config: dict) -> dict[str, Any]:
    """Check that a config is an MoE hobbit_mlx can offload and return its switch modules' facts."""
    model = build_model(config)
    switches = find_switch_modules(model)
    odd = [p for p, m in model.named_modules() if isinstance(m, (SwitchGLU, SwitchMLP))
           and p not in dict(switches)]
    if odd:
        raise UnsupportedModelError(
            f"model_type {config.get('model_type')!r} keeps non-expert weights inside its expert "
            f"module ({odd[0]}), which hobbit_mlx cannot offload yet")
    if not switches:
        raise UnsupportedModelError(
            f"model_type {config.get('model_type')!r} has no routed experts built from mlx-lm "
            "switch layers (SwitchGLU / SwitchMLP): it is a dense model or an MoE that hobbit_mlx "
            "does not support")
    return {"model": model, "switches": switches, "experts_per_token": experts_per_token(config, model)}
