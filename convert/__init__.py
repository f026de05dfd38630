"""Convert an MoE checkpoint into a hobbit model directory (dense weights + two-precision expert store).

Sources: a local mlx-lm checkpoint (already quantized, e.g. an mlx-community 4-bit model), a local
Hugging Face checkpoint (float safetensors with per-expert or stacked expert tensors), or a hub
repo id. mlx-lm's own ``sanitize`` maps the source's names onto the mlx-lm model, so every
architecture mlx-lm knows converts the same way.

An mlx-lm quantized source (an mlx-community 4-bit model) is converted *by reference* unless
``copy=True``: the high-precision records point into its own safetensors files and its dense
weights are links to them, so only the 2-bit copies and the manifest are written
(``convert/reference.py``). Other sources, and ``copy=True``, write page-aligned copies.

Memory stays near one source tensor: weights are loaded lazily, experts are processed one
projection (and at most ``CHUNK_BYTES`` of float weights) at a time and written straight to their
page-aligned places in the store files. Everything is written into a temporary directory that is
renamed onto DST only when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import zlib
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.utils import load_config, make_shards, quantize_model

from hobbit_mlx.architectures import (UnsupportedModelError, describe_moe, expert_param_names,
                                      num_experts_of, switch_linear_paths)
from hobbit_mlx.store import (PAGE_SIZE, STORE_DIR, LayerEntry, Manifest, PrecisionEntry, Record,
                              StoreError, TensorLayout, align_up, is_hobbit_model,
                              record_alignment, safetensors_header)

from .reference import ReferenceBuilder, index_source, link_dense, unchanged_by_sanitize

CHUNK_BYTES = 512 * 2**20  # float weights materialised at once while requantizing experts
TENSOR_ALIGN = 64
_MX_TO_ST = {mx.uint8: "U8", mx.int8: "I8", mx.uint16: "U16", mx.int16: "I16", mx.float16: "F16",
             mx.bfloat16: "BF16", mx.uint32: "U32", mx.int32: "I32", mx.float32: "F32",
             mx.uint64: "U64", mx.int64: "I64"}
_SKIP_FILES = {"model.safetensors.index.json", "config.json"}


class ConversionError(RuntimeError):
    """The source cannot be converted; the message names the file or the reason."""


def resolve_source(src: str | Path) -> Path:
    """A local checkpoint directory, or a hub repo id downloaded with huggingface_hub."""
    path = Path(src).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ConversionError(f"{path / 'config.json'}: not found (SRC must be a model directory)")
        return path
    if str(src).count("/") != 1:
        raise ConversionError(f"{src}: no such directory (and not a hub repo id like 'org/name')")
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(str(src), allow_patterns=[
            "*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken", "*.py"]))
    except Exception as e:  # network, auth, missing repo: one clear line
        raise ConversionError(f"{src}: could not download from the hub ({type(e).__name__}: {e})") from None


def _source_files(src: Path) -> list[Path]:
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise ConversionError(f"{src}: no *.safetensors weight files found")
    return files


def _load_source_weights(src: Path) -> dict[str, mx.array]:
    files = _source_files(src)
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


class _LayerWriter:
    """Lays out and writes one layer's experts at one precision into one safetensors file."""

    def __init__(self, path: Path, num_experts: int, tensors: dict[str, tuple[str, tuple]],
                 compact: bool = False):
        """``compact``: records start on ``record_alignment`` of their size instead of a page
        (a store by reference, where disk is the point)."""
        self.path = path
        self.layout: list[TensorLayout] = []
        offset = 0
        for name, (dtype, shape) in tensors.items():
            self.layout.append(TensorLayout(name, dtype, shape, 0, offset))
            offset = align_up(offset + self.layout[-1].nbytes, TENSOR_ALIGN)
        self.record_len = self.layout[-1].offset + self.layout[-1].nbytes
        align = record_alignment(self.record_len) if compact else PAGE_SIZE
        self.stride = align_up(self.record_len, align)
        header_tensors, pos = {}, 0
        for e in range(num_experts):
            for t in self.layout:
                start = e * self.stride + t.offset
                if start > pos:
                    header_tensors[f"__pad__.{len(header_tensors)}"] = ("U8", (start - pos,), pos, start)
                header_tensors[f"{e}.{t.name}"] = (t.dtype, t.shape, start, start + t.nbytes)
                pos = start + t.nbytes
        header, self.data_start = safetensors_header(header_tensors, align)
        self.size = self.data_start + pos
        self.num_experts = num_experts
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.pwrite(self.fd, header, 0)
        os.ftruncate(self.fd, self.size)

    def write(self, expert: int, name: str, data: np.ndarray) -> None:
        t = next(t for t in self.layout if t.name == name)
        raw = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
        assert raw.nbytes == t.nbytes, (name, raw.nbytes, t.nbytes)
        os.pwrite(self.fd, raw, self.data_start + expert * self.stride + t.offset)

    def finish(self, file_index: int) -> list[Record]:
        records = []
        for e in range(self.num_experts):
            off = self.data_start + e * self.stride
            crc = zlib.crc32(os.pread(self.fd, self.record_len, off))
            records.append(Record(((file_index, off, self.record_len),), (crc,)))
        os.fsync(self.fd)
        os.close(self.fd)
        return records


def _to_numpy(a: mx.array) -> np.ndarray:
    if a.dtype == mx.bfloat16:
        a = a.view(mx.uint16)
    return np.array(a, copy=False)


def _projection_quant(weights: dict, key: str, in_dim: int, want: dict, keep_source: bool) -> dict:
    """The quantization of one projection's copy: the source's own (exact) or ``want`` (affine)."""
    src_q = _source_quantization(weights, key, in_dim)
    if keep_source and src_q is not None and src_q["bits"] >= want["bits"]:
        return src_q
    return dict(want, mode="affine")


def _expert_tensors(weights: dict, key: str, in_dim: int, quant: dict, e0: int, e1: int) -> dict:
    """The tensors of experts e0..e1 of one projection at one quantization (lazy)."""
    out = {}
    w = weights[f"{key}.weight"][e0:e1]
    src_q = _source_quantization(weights, key, in_dim)
    if src_q == quant:  # the source's own quantized bytes
        out["weight"] = w
        out["scales"] = weights[f"{key}.scales"][e0:e1]
        if f"{key}.biases" in weights:
            out["biases"] = weights[f"{key}.biases"][e0:e1]
    else:
        if src_q is not None:
            b = weights.get(f"{key}.biases")
            w = mx.dequantize(w, weights[f"{key}.scales"][e0:e1], None if b is None else b[e0:e1],
                              group_size=src_q["group_size"], bits=src_q["bits"], mode=src_q["mode"])
        q = mx.quantize(w, quant["group_size"], quant["bits"], mode="affine")
        out["weight"], out["scales"] = q[0], q[1]
        if len(q) > 2 and q[2] is not None:
            out["biases"] = q[2]
    if f"{key}.bias" in weights:
        out["bias"] = weights[f"{key}.bias"][e0:e1]
    return out


def _convert_layer(weights, li, path, switch, tmp: Path, files: list[str], precisions: dict,
                   progress, refs: ReferenceBuilder | None = None) -> LayerEntry:
    num_experts = num_experts_of(switch)
    proj_names = switch_linear_paths(switch)
    modules = dict(switch.named_modules())
    in_dims = {p: int(modules[p].weight.shape[-1]) for p in proj_names}
    for p in proj_names:
        if f"{path}.{p}.weight" not in weights:
            raise ConversionError(f"the checkpoint has no weights for {path}.{p} "
                                  "(after mlx-lm's sanitize); is it the model its config.json names?")
    entry = LayerEntry(li, path, num_experts)
    for pname, want in precisions.items():
        quant = {p: _projection_quant(weights, f"{path}.{p}", in_dims[p], want, pname == "high")
                 for p in proj_names}
        if refs is not None and pname == "high" and all(
                quant[p] == _source_quantization(weights, f"{path}.{p}", in_dims[p]) for p in proj_names):
            ref = refs.entry(path, proj_names, quant, num_experts, want["bits"])
            if ref is not None:  # the source's own bytes, in place
                entry.precisions[pname] = ref
                progress.update(len(proj_names))
                continue
        shapes = {}
        for p in proj_names:
            sample = _expert_tensors(weights, f"{path}.{p}", in_dims[p], quant[p], 0, 1)
            shapes.update({f"{p}.{k}": (_MX_TO_ST[v.dtype], tuple(v.shape[1:])) for k, v in sample.items()})
        rel = f"{STORE_DIR}/{pname}/layer_{li:03d}.safetensors"
        writer = _LayerWriter(tmp / rel, num_experts, dict(sorted(shapes.items())),
                              compact=refs is not None)
        for p in proj_names:
            out_dims, in_dim = modules[p].weight.shape[1:]
            step = max(1, CHUNK_BYTES // (out_dims * in_dim * 4))
            for e0 in range(0, num_experts, step):
                e1 = min(num_experts, e0 + step)
                chunk = _expert_tensors(weights, f"{path}.{p}", in_dims[p], quant[p], e0, e1)
                mx.eval(list(chunk.values()))
                for name, arr in chunk.items():
                    data = _to_numpy(arr)
                    for e in range(e0, e1):
                        writer.write(e, f"{p}.{name}", data[e - e0])
            progress.update(1)
        files.append(rel)
        entry.precisions[pname] = PrecisionEntry(want["bits"], quant, writer.layout,
                                                 writer.finish(len(files) - 1))
    return entry


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


def _remove_stale(dst: Path) -> None:
    """Remove what conversions into ``dst`` that were killed left behind (their temporary
    directories name their process, which no longer runs)."""
    for d in dst.parent.glob(f".{dst.name}.*-*"):
        kind, _, pid = d.name[len(dst.name) + 2:].rpartition("-")
        if kind not in ("partial", "old") or not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except OSError:  # alive, another user's
            pass


def convert(src: str | Path, dst: str | Path, *, bits: int = 4, low_bits: int = 2,
            group_size: int = 64, force: bool = False, progress: bool = True,
            copy: bool = False) -> Path:
    """Convert ``src`` into the hobbit model directory ``dst`` and return its path.

    An mlx-lm quantized source is read in place (by reference) unless ``copy``; the store then
    depends on the source files staying where and as they are (checked at every load)."""
    from tqdm import tqdm

    dst = Path(dst).expanduser()
    if dst.exists() and not force:
        what = "a converted hobbit model" if is_hobbit_model(dst) else "a file or directory"
        raise FileExistsError(f"{dst} already exists ({what}); pass --force to replace it")
    src_dir = resolve_source(src)
    raw_config = json.loads((src_dir / "config.json").read_text())
    config = load_config(src_dir)
    facts = describe_moe(config)
    model, switches = facts["model"], facts["switches"]
    weights = _load_source_weights(src_dir)
    loaded = dict(weights)
    if hasattr(model, "sanitize"):
        weights = model.sanitize(weights)
    unchanged = unchanged_by_sanitize(loaded, weights)
    del loaded  # (an evaluated source tensor is held while anything refers to it)
    by_reference = not copy and config.get("quantization") is not None

    dst.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(dst)
    tmp = dst.parent / f".{dst.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for pname in ("high", "low"):
            (tmp / STORE_DIR / pname).mkdir(parents=True)
        precisions = {"high": {"bits": bits, "group_size": group_size},
                      "low": {"bits": low_bits, "group_size": group_size}}
        total = sum(len(switch_linear_paths(s)) for _, s in switches) * len(precisions)
        files: list[str] = []
        references: dict[str, dict] = {}
        refs = (ReferenceBuilder(index_source(_source_files(src_dir)), unchanged, weights, files,
                                 references) if by_reference else None)
        layers = []
        try:
            with tqdm(total=total, desc="experts", unit="proj", disable=not progress) as bar:
                for li, (path, switch) in enumerate(switches):
                    layers.append(_convert_layer(weights, li, path, switch, tmp, files, precisions,
                                                 bar, refs))
                    for k in [k for k in weights if k.startswith(path + ".")]:
                        del weights[k]  # let the layer's source tensors go
        finally:
            if refs is not None:
                refs.close()
        switch_paths = [p for p, _ in switches]
        dense, new_config = _dense_weights(model, weights, switch_paths, config, bits, group_size)
        if by_reference:  # mlx-lm reads them from the source, as it would without hobbit_mlx
            if progress:
                print(f"[convert] linking the dense weights of {src_dir} (read in place)")
            link_dense(_source_files(src_dir), tmp, references)
        else:
            if progress:
                print(f"[convert] writing {sum(v.nbytes for v in dense.values()) / 2**20:.1f} MiB of dense weights")
            _write_dense(dense, tmp)
        for key in ("quantization", "quantization_config"):
            if key in new_config:
                raw_config[key] = new_config[key]
        (tmp / "config.json").write_text(json.dumps(raw_config, indent=2))
        for f in src_dir.iterdir():
            if f.is_file() and f.suffix != ".safetensors" and f.name not in _SKIP_FILES:
                shutil.copy2(f, tmp / f.name)
        Manifest(config["model_type"], layers[0].num_experts, facts["experts_per_token"], files,
                 layers, source=str(src), references=references).save(tmp)
        if dst.exists():
            old = dst.parent / f".{dst.name}.old-{os.getpid()}"
            os.rename(dst, old)
            os.rename(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


__all__ = ["convert", "ConversionError", "UnsupportedModelError", "StoreError"]
