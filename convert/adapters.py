"""Fine-tuned adapters (``mlx_lm.lora``'s output) fused into the converted model.

``mlx_lm.fuse`` loads the whole model to fuse adapters into it, which a model larger than memory
does not allow. Here the fused weights are built lazily with mlx-lm's own LoRA modules (their
``fuse``: the same arithmetic, so the result equals ``mlx_lm.fuse``'s) over lazily loaded source
weights, and the converter evaluates them one layer at a time as it writes the store. Only the
modules the adapters touch change; the rest of a checkpoint read in place stays in place.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapters.safetensors"


def adapter_files(adapter_path: str | Path, error: type[Exception]) -> list[Path]:
    """The adapter's config and weights (as ``mlx_lm.lora`` saves them), or ``error`` naming
    what is missing or unreadable."""
    folder = Path(adapter_path).expanduser()
    if not folder.is_dir():
        raise error(f"--adapter-path {adapter_path}: not a directory (mlx_lm.lora's --adapter-path "
                    f"output holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    files = [folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS]
    for f in files:
        if not f.is_file():
            raise error(f"--adapter-path {adapter_path}: no {f.name} there")
    try:
        config = json.loads(files[0].read_text())
    except (OSError, ValueError) as e:
        raise error(f"{files[0]}: not valid JSON ({e})") from None
    kind = config.get("fine_tune_type", "lora") if isinstance(config, dict) else None
    if kind not in ("lora", "dora", "full"):
        raise error(f"{files[0]}: fine_tune_type {kind!r} is not one mlx-lm writes "
                    "(lora, dora or full)")
    return files


def fused_weights(src_dir: Path, adapter_path: str | Path, error: type[Exception]) -> dict[str, mx.array]:
    """The weights of the modules the adapters change, fused as ``mlx_lm.fuse`` fuses them
    (quantized modules stay quantized at their width), lazily: nothing is computed yet."""
    from mlx_lm.tuner.utils import load_adapters
    from mlx_lm.utils import load_model

    model, _ = load_model(Path(src_dir), lazy=True)
    try:
        load_adapters(model, str(Path(adapter_path).expanduser()))
    except (ValueError, KeyError, TypeError) as e:  # (adapters of another model or config)
        raise error(f"--adapter-path {adapter_path}: cannot apply these adapters to "
                    f"{src_dir} ({' '.join(str(e).split())})") from None
    fused = [(name, module.fuse()) for name, module in model.named_modules()
             if hasattr(module, "fuse")]
    if fused:  # lora / dora: the fused modules' weights
        model.update_modules(tree_unflatten(fused))
        prefixes = tuple(name + "." for name, _ in fused)
        return {k: v for k, v in tree_flatten(model.parameters()) if k.startswith(prefixes)}
    trained = set(mx.load(str(Path(adapter_path).expanduser() / ADAPTER_WEIGHTS)))  # full
    return {k: v for k, v in tree_flatten(model.parameters()) if k in trained}
