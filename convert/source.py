"""Reading the source checkpoint: where it is (a local directory or a hub download), its
config, its weight files and the other files a model needs, its weights (lazily), and the
quantization of a quantized source's projections; a converted hobbit model as the source is
refused here (or, one by reference, taken for its checkpoint)."""

from __future__ import annotations

import fnmatch
from pathlib import Path

import mlx.core as mx

from hobbit_mlx.store import (StoreError, check_references, checkpoint_weight_files, load_manifest,
                              read_config_json)

from .errors import ConversionError

# The files of a checkpoint besides its weights that a model needs (tokenizer, chat template,
# generation config, custom code): what a hub download fetches and what DST gets a copy of.
MODEL_FILE_PATTERNS = ("*.json", "*.txt", "*.model", "*.jinja", "*.tiktoken", "*.py")


def resolve_source(src: str | Path) -> Path:
    """A local checkpoint directory, or a hub repo id downloaded with huggingface_hub."""
    path = Path(src).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ConversionError(f"{path / 'config.json'}: not found (SRC must be a model directory)")
        return path
    if str(src).count("/") != 1 or str(src).startswith(("/", ".", "~")):
        # (a hub id is 'org/name': "/nope" or "./model" is a directory that is not there)
        raise ConversionError(f"{src}: no such directory (and not a hub repo id like 'org/name')")
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(str(src), allow_patterns=[*MODEL_FILE_PATTERNS,
                                                                 "*.safetensors"]))
    except Exception as e:  # network, auth, missing repo: one clear line (the hub's first one)
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
        raise ConversionError(f"{src}: could not download from the hub ({type(e).__name__}: "
                              f"{first})") from None


def _source_files(src: Path) -> list[Path]:
    """The weight files: those the index names, else mlx-lm's ``model*.safetensors``."""
    files = checkpoint_weight_files(src)
    if not files:
        raise ConversionError(f"{src}: no model*.safetensors weight files found (mlx-lm reads "
                              "those, or the files model.safetensors.index.json names)")
    return files


def _model_files(src: Path) -> list[Path]:
    """The files besides the weights that DST gets a copy of: tokenizer, chat template,
    generation config, custom code (``MODEL_FILE_PATTERNS``); not config.json (rewritten), not
    a weight index, not other formats' weights (``*.bin``, ``*.pt``, ``*.gguf``)."""
    return sorted(f for f in src.iterdir()
                  if f.is_file() and f.name != "config.json" and not f.name.endswith(".index.json")
                  and any(fnmatch.fnmatch(f.name, pat) for pat in MODEL_FILE_PATTERNS))


def _load_source_weights(files: list[Path]) -> dict[str, mx.array]:
    weights = {}
    for f in files:
        try:
            weights.update(mx.load(str(f)))  # lazy: nothing is read until evaluated
        except Exception as e:
            raise ConversionError(f"{f}: cannot read safetensors ({e})") from None
    return weights


def _source_quantization(weights: dict, prefix: str, in_dims: int) -> dict | None:
    """group_size/bits/mode of a quantized source projection, or None for float weights."""
    scales = weights.get(f"{prefix}.scales")
    if scales is None:
        return None
    group_size = in_dims // scales.shape[-1]
    bits = weights[f"{prefix}.weight"].shape[-1] * 32 // in_dims
    if scales.dtype != mx.uint8:
        mode = "affine"
    else:
        mode = {(4, 16): "nvfp4", (4, 32): "mxfp4", (8, 32): "mxfp8"}.get((bits, group_size))
        if mode is None:
            raise ConversionError(f"{prefix}: cannot tell the quantization of {bits} bits, group {group_size}")
    return {"bits": bits, "group_size": group_size, "mode": mode}


def _check_not_converted(src: Path) -> None:
    """A hobbit model as the source: one that reads its source checkpoint in place links all of
    it (it converts again, as long as that checkpoint is as it was); one with its own copies
    holds its experts only in its store, which the converter does not read."""
    try:
        manifest = load_manifest(src, check_files=False)
    except StoreError:
        manifest = None
    if manifest is not None and manifest.adapter:  # (its links are the checkpoint without them)
        raise ConversionError(
            f"{src} is a converted model with the adapters of {manifest.adapter['path']} fused in: "
            "converting it again would drop them; convert the checkpoint it was made from "
            f"({manifest.source or 'its source'}) with --adapter-path {manifest.adapter['path']}")
    if manifest is not None and manifest.references:
        check_references(src, manifest)  # (the message load gives, naming the file)
        return
    raise ConversionError(f"{src} is already a converted hobbit model: load it directly "
                          "(hobbit_mlx.load, or --model with the command-line tools); to convert "
                          "it at other widths, convert the checkpoint it was made from"
                          + (f" ({manifest.source})" if manifest is not None and manifest.source
                             else ""))


def _read_config(src_dir: Path) -> dict:
    return read_config_json(src_dir / "config.json", ConversionError)
