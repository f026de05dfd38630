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

from hobbit_mlx.store import StoreError, file_stamp, read_safetensors_header

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapters.safetensors"


def adapter_files(adapter_path: str | Path, error: type[Exception]) -> list[Path]:
    """The adapter's config and weights (as ``mlx_lm.lora`` saves them), or ``error`` naming
    what is missing or unreadable (checked before any conversion starts)."""
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
    problem = _config_problem(config)
    if problem:
        raise error(f"{files[0]}: {problem}")
    try:
        start, header = read_safetensors_header(files[1])
        end = max((t["data_offsets"][1] for t in header.values()), default=0)
    except StoreError as e:
        raise error(str(e)) from None
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        raise error(f"{files[1]}: not a readable safetensors file ({e})") from None
    if start + end > files[1].stat().st_size:
        raise error(f"{files[1]}: cut short ({files[1].stat().st_size} bytes, its header "
                    f"describes {start + end}): copy or train it again")
    return files


def _config_problem(config) -> str | None:
    """What mlx-lm would fail on in an adapter config, in words; None when it reads it."""
    if not isinstance(config, dict):
        return "not a JSON object"
    kind = config.get("fine_tune_type", "lora")
    if kind not in ("lora", "dora", "full"):
        return f"fine_tune_type {kind!r} is not one mlx-lm writes (lora, dora or full)"
    if kind == "full":
        return None
    if not isinstance(config.get("num_layers"), int):
        return "num_layers (the layers the adapters were trained on) is missing or not a number"
    params = config.get("lora_parameters")
    if not isinstance(params, dict):
        return "lora_parameters (rank, scale, dropout) is missing"
    missing = [k for k in ("rank", "scale", "dropout") if k not in params]
    return f"lora_parameters lacks {', '.join(missing)}" if missing else None


def adapter_record(files: list[Path]) -> dict:
    """What a converted model keeps of the adapters fused into it: their folder, and each
    file's size and modification time (retrained adapters are other adapters); {} for none."""
    if not files:
        return {}
    return {"path": str(files[0].parent.resolve()),
            "files": {f.name: file_stamp(f) for f in files}}


def fused_weights(src_dir: Path, adapter_path: str | Path, error: type[Exception]) -> dict[str, mx.array]:
    """The weights of the modules the adapters change, fused as ``mlx_lm.fuse`` fuses them
    (quantized modules stay quantized at their width), lazily: nothing is computed yet."""
    from mlx_lm.tuner.utils import load_adapters
    from mlx_lm.utils import load_model

    model, _ = load_model(Path(src_dir), lazy=True)
    try:
        load_adapters(model, str(Path(adapter_path).expanduser()))
    except Exception as e:  # noqa: BLE001 - (adapters of another model or config)
        reason = " ".join(str(e).split())
        if len(reason) > 300:  # (mlx-lm lists every tensor that does not match)
            reason = reason[:300] + "..."
        raise error(f"--adapter-path {adapter_path}: cannot apply these adapters to "
                    f"{src_dir} ({type(e).__name__}: {reason})") from None
    fused = [(name, module.fuse()) for name, module in model.named_modules()
             if hasattr(module, "fuse")]
    if fused:  # lora / dora: the fused modules' weights
        model.update_modules(tree_unflatten(fused))
        prefixes = tuple(name + "." for name, _ in fused)
        return {k: v for k, v in tree_flatten(model.parameters()) if k.startswith(prefixes)}
    trained = set(mx.load(str(Path(adapter_path).expanduser() / ADAPTER_WEIGHTS)))  # full
    return {k: v for k, v in tree_flatten(model.parameters()) if k in trained}
