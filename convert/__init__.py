"""Convert an MoE checkpoint into a hobbit model directory (dense weights + two-precision expert store).

Sources: a local mlx-lm checkpoint (already quantized, e.g. an mlx-community 4-bit model), a local
Hugging Face checkpoint (float safetensors with per-expert or stacked expert tensors), or a hub
repo id. mlx-lm's own ``sanitize`` maps the source's names onto the mlx-lm model, so every
architecture mlx-lm knows converts the same way. The weights are the files the checkpoint's
``model.safetensors.index.json`` names (each must be there), else mlx-lm's ``model*.safetensors``;
every dense tensor the model needs must be among them (as ``mlx_lm.load`` requires); only the
files a model needs besides (tokenizer, chat template, generation config, code) are copied.

An mlx-lm quantized source (an mlx-community 4-bit model) is converted *by reference* unless
``copy=True``: the high-precision records point into its own safetensors files and its dense
weights are links to them, so only the 2-bit copies and the manifest are written
(``convert/reference.py``). Other sources, and ``copy=True``, write page-aligned copies.

Memory stays near one source tensor: weights are loaded lazily, experts are processed one
projection (and at most ``CHUNK_BYTES`` of float weights) at a time and written straight to their
page-aligned places in the store files. Everything is written into a temporary directory that is
renamed onto DST only when complete (without ``force`` only if nothing is there by then); once
it is, an interrupt no longer stops the conversion (the replaced model's removal finishes). A
conversion interrupted before (Ctrl-C, SIGTERM, a full disk, a killed process) keeps the layers
it finished there, and the same command resumes from them (``convert/resume.py``).
"""

from __future__ import annotations

import contextlib
import fnmatch
import glob
import io
import json
import numbers
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.utils import load_config, make_shards, quantize_model

from hobbit_mlx.architectures import (UnsupportedModelError, describe_moe,
                                      num_experts_of, switch_linear_paths)
from hobbit_mlx.quantizable import mlx_quantizes, supported_bits, supported_group_sizes
from hobbit_mlx.store import (PAGE_SIZE, STORE_DIR, LayerEntry, Manifest, PrecisionEntry, Record,
                              StoreError, TensorLayout, align_up, check_references,
                              checkpoint_weight_files, durable_sync, float_quant, is_float,
                              is_hobbit_model, load_manifest,
                              read_config_json, record_alignment, safetensors_header)

from .adapters import adapter_files, adapter_record, fused_weights
from .reference import ReferenceBuilder, index_source, link_dense, unchanged_by_sanitize
from .resume import (RESUME_DIR, ConversionProgress, PartialClaim, conversion_stamp,
                     layers_kept, process_running, read_progress, try_lock)

CHUNK_BYTES = 512 * 2**20  # float weights materialised at once while requantizing experts
TENSOR_ALIGN = 64
_MX_TO_ST = {mx.uint8: "U8", mx.int8: "I8", mx.uint16: "U16", mx.int16: "I16", mx.float16: "F16",
             mx.bfloat16: "BF16", mx.uint32: "U32", mx.int32: "I32", mx.float32: "F32",
             mx.uint64: "U64", mx.int64: "I64"}
# The files of a checkpoint besides its weights that a model needs (tokenizer, chat template,
# generation config, custom code): what a hub download fetches and what DST gets a copy of.
MODEL_FILE_PATTERNS = ("*.json", "*.txt", "*.model", "*.jinja", "*.tiktoken", "*.py")


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
        durable_sync(self.fd)
        os.close(self.fd)
        return records


def _to_numpy(a: mx.array) -> np.ndarray:
    if a.dtype == mx.bfloat16:
        a = a.view(mx.uint16)
    return np.array(a, copy=False)


def _projection_quant(weights: dict, key: str, in_dim: int, want: dict, keep_source: bool) -> dict:
    """The quantization of one projection's copy: the source's own (exact, whatever its width:
    a mixed-bit source holds some experts below its nominal bits; ``keep_source``, the high copy
    of a quantized source), or ``want`` (affine); a low copy of a projection already at or below
    ``want``'s width keeps the source's too (requantizing it would lose precision and save
    nothing). A quantized source's float experts (a quant_predicate that skipped them, a group
    size that does not divide them: mlx-lm leaves those float) stay float in the high copy,
    which exact mode computes with as mlx-lm does."""
    src_q = _source_quantization(weights, key, in_dim)
    if src_q is None and keep_source:
        return float_quant(weights[f"{key}.weight"].dtype.size)
    if src_q is not None and (keep_source or src_q["bits"] <= want["bits"]):
        return src_q
    return dict(want, mode="affine")


def _expert_tensors(weights: dict, key: str, in_dim: int, quant: dict, e0: int, e1: int) -> dict:
    """The tensors of experts e0..e1 of one projection at one quantization (lazy)."""
    out = {}
    w = weights[f"{key}.weight"][e0:e1]
    src_q = _source_quantization(weights, key, in_dim)
    if is_float(quant):  # a quantized source's float experts, kept as they are
        out["weight"] = w
    elif src_q == quant:  # the source's own quantized bytes
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


def _check_expert_tensors(weights: dict, key: str, num_experts: int) -> None:
    """One projection's stacked expert tensors are whole: a weight for every expert, and the
    scales a packed (quantized) weight needs. A damaged checkpoint fails here by name, not
    deep inside a quantize or a slice."""
    w = weights.get(f"{key}.weight")
    if w is None:
        raise ConversionError(f"the checkpoint has no weights for {key} "
                              "(after mlx-lm's sanitize); is it the model its config.json names?")
    for name in ("weight", "scales", "biases", "bias"):
        t = weights.get(f"{key}.{name}")
        if t is not None and (t.ndim < 2 or t.shape[0] != num_experts):
            raise ConversionError(f"{key}.{name} has shape {list(t.shape)}: the model has "
                                  f"{num_experts} experts, stacked on the first axis")
    if not mx.issubdtype(w.dtype, mx.floating) and f"{key}.scales" not in weights:
        packed = str(w.dtype).rsplit(".", 1)[-1]
        raise ConversionError(f"{key}.weight is packed ({packed}) but {key}.scales is missing: a "
                              "quantized checkpoint needs both (is a file missing or damaged?)")


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


def _convert_layer(weights, li, path, switch, tmp: Path, files: list[str], precisions: dict,
                   progress, refs: ReferenceBuilder | None = None,
                   quantized_source: bool = False) -> LayerEntry:
    num_experts = num_experts_of(switch)
    proj_names = switch_linear_paths(switch)
    modules = dict(switch.named_modules())
    in_dims = {p: int(modules[p].weight.shape[-1]) for p in proj_names}
    entry = LayerEntry(li, path, num_experts)
    for pname, want in precisions.items():
        quant = {p: _projection_quant(weights, f"{path}.{p}", in_dims[p], want,
                                      pname == "high" and quantized_source)
                 for p in proj_names}
        if refs is not None and pname == "high" and all(
                quant[p] == _source_quantization(weights, f"{path}.{p}", in_dims[p]) for p in proj_names):
            ref = refs.entry(path, proj_names, quant, num_experts, _nominal_bits(quant, want["bits"]))
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
        try:
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
        except BaseException:
            os.close(writer.fd)  # (an interrupted layer: its file is written again on resume)
            raise
        files.append(rel)
        entry.precisions[pname] = PrecisionEntry(_nominal_bits(quant, want["bits"]), quant,
                                                 writer.layout, writer.finish(len(files) - 1))
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


def _remove(path: Path) -> None:
    """Remove a directory tree, a file or a symlink (not what a link points to); best effort."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        elif path.is_symlink() or path.exists():
            path.unlink()
    except OSError:
        pass


def _tree_bytes(path: Path) -> int:
    """Bytes of the files under ``path`` (links not followed); best effort."""
    total = 0
    for root, _, names in os.walk(path):
        for n in names:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, n)).st_size
    return total


_LEFT_BEHIND = re.compile(r"\.(partial|old)-(\d+)(x[^/]*)?$")
YOUNG_PARTIAL_S = 60  # a partial with no layer recorded yet may be one being made: left alone


def _partial_pid(d: Path, dst: Path) -> int | None:
    """The process a conversion's temporary directory (or replaced DST) names, or None."""
    m = _LEFT_BEHIND.fullmatch(d.name[len(dst.name) + 1:])
    return int(m.group(2)) if m else None


def _take_over_partials(dst: Path, stamp: dict, num_layers: int,
                        claim: PartialClaim) -> ConversionProgress | None:
    """What conversions into ``dst`` that no longer run left behind (partial directories no
    process holds locked; a replaced DST whose process ended): a partial of this very
    conversion (same source, options and code; see ``convert/resume.py``) is resumed in place
    (its progress; it and its lock go into ``claim`` at once); anything else is removed, saying
    so. A partial another process is converting into is left, saying so."""
    progress = None
    held = claim.locks
    for d in sorted(dst.parent.glob(f".{glob.escape(dst.name)}.*-*")):
        pid = _partial_pid(d, dst)
        if pid is None:
            continue
        if ".partial-" not in d.name:  # (a replaced DST, while its conversion swaps it in)
            if pid != os.getpid() and process_running(pid):
                continue
            lock = None
        else:
            try:
                lock = try_lock(d, pid)
            except OSError:  # (gone since the listing)
                continue
            if lock is None:
                print(f"[convert] left {d} alone: another conversion into {dst} is running "
                      f"(pid {pid}); this one starts afresh", file=sys.stderr)
                continue
            held.append(lock)
        if progress is None and lock is not None and (progress := read_progress(d, stamp)):
            claim.path = d
            for leftover in d.iterdir():  # what came after the layers is made again
                if leftover.name not in (STORE_DIR, RESUME_DIR):
                    _remove(leftover)
            print(f"[convert] resuming an interrupted conversion into {dst}: "
                  f"{len(progress.layers)} of {num_layers} layers were done ({d.name})",
                  file=sys.stderr)
            continue
        try:
            if lock is not None and not layers_kept(d) and _age_s(d) < YOUNG_PARTIAL_S and \
                    process_running(pid):
                continue  # (made a moment ago by a process that has not locked it yet)
            size = _tree_bytes(d) if d.is_dir() and not d.is_symlink() else 0
            _remove(d)
        finally:
            if lock is not None:
                held.remove(lock)
                os.close(lock)
        what = (f"the partial output of an interrupted conversion (pid {pid})"
                if ".partial-" in d.name else
                f"the old model an interrupted conversion (pid {pid}) was replacing")
        print(f"[convert] removed {d} ({size / 2**20:.1f} MiB), {what}", file=sys.stderr)
    return progress


def _age_s(path: Path) -> float:
    """Seconds since ``path`` last changed (infinite once it is gone)."""
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return float("inf")


def _new_partial(dst: Path, claim: PartialClaim) -> Path:
    """A new partial directory for this conversion, under a name no other process has (a pid
    can repeat across containers sharing a volume), locked (both into ``claim``)."""
    claim.path = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-{os.getpid()}x",
                                       dir=dst.parent))
    umask = os.umask(0o022)
    os.umask(umask)
    os.chmod(claim.path, 0o777 & ~umask)  # (mkdtemp's 0700: the model its owner's alone)
    lock = try_lock(claim.path)
    if lock is not None:
        claim.locks.append(lock)
    return claim.path


def _keep_for_resume(e: BaseException, tmp: Path, num_layers: int) -> bool:
    """Whether a conversion stopped by ``e`` keeps its finished layers for the next one: when
    it was interrupted (Ctrl-C, SIGTERM) or could not read or write (a full disk, say), and
    some layers are recorded done. Says where they are; ``e.kept_partial`` names the directory."""
    kept = layers_kept(tmp)
    if not isinstance(e, (KeyboardInterrupt, OSError)) or not kept:
        return False
    e.kept_partial = tmp
    print(f"[convert] kept {kept} of {num_layers} converted layers in {tmp}: the same command "
          "resumes from there (delete it to start over)", file=sys.stderr)
    return True


def interrupt_handler(signum, frame):
    """SIGINT's and SIGTERM's handler in ``python -m convert``: both interrupt a conversion
    (the layers it finished are kept for the next one) with KeyboardInterrupt. A signal that
    comes once the new model is in place does not: the conversion finishes (see
    ``_signals_held``)."""
    raise KeyboardInterrupt(signal.Signals(signum).name)


@contextlib.contextmanager
def _signals_held(note: str | None = None):
    """SIGINT and SIGTERM wait until the block ends (steps that must not stop halfway: swapping
    DST, removing a directory); yields the list of those that came. Only the main thread
    receives signals (elsewhere this holds nothing)."""
    pending: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield pending
        return

    def hold(signum, frame):
        if note and not pending:
            print(note, file=sys.stderr, flush=True)
        pending.append(signum)

    old = {}
    try:
        with contextlib.suppress(ValueError):  # (a subinterpreter: signals are not its own)
            for sig in (signal.SIGINT, signal.SIGTERM):
                old[sig] = signal.signal(sig, hold)
        yield pending
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def _deliver(pending: list[int]) -> None:
    """Signals held while DST was replaced, once it was: ``python -m convert``'s own handler
    (which would interrupt the conversion) is skipped, the conversion being complete; any other
    runs now (a library caller's Ctrl-C is a KeyboardInterrupt after all; SIGTERM at its default
    action ends the process, the new model complete)."""
    for sig in dict.fromkeys(pending):
        handler = signal.getsignal(sig)
        if handler is interrupt_handler or handler in (signal.SIG_IGN, None):
            continue
        if callable(handler):
            handler(sig, None)
        else:
            signal.raise_signal(sig)


def _what_is(dst: Path) -> str:
    if dst.is_symlink():
        return "a symbolic link"
    if not dst.is_dir():
        return "a file"
    if is_hobbit_model(dst):
        return "a converted hobbit model"
    return "an empty directory" if not any(dst.iterdir()) else "a directory"


def _replaceable(dst: Path) -> bool:
    """What ``force`` may replace: a converted hobbit model, an empty directory, a file or a
    link (not what it points to); never a directory of other things (the folder meant to hold
    the model, say, which replacing would delete)."""
    return _what_is(dst) != "a directory"


def _check_dst(dst: Path, force: bool, src: str | Path, late: bool = False) -> None:
    """Refuse a DST that exists (without ``force``), or that ``force`` must not replace;
    ``late``: it appeared while converting (another conversion into it, say)."""
    if not (dst.exists() or dst.is_symlink()):
        return
    what = _what_is(dst)
    if not _replaceable(dst):
        name = Path(str(src).rstrip("/")).name or "model"
        raise ConversionError(
            f"{dst} is a directory of other files, not a converted hobbit model: the converter "
            f"does not replace it (not even with --force); give a new directory for the model, "
            f"e.g. {dst / name}")
    if not force:
        if late:
            raise FileExistsError(f"{dst} appeared while converting ({what}; another conversion "
                                  "into it?): nothing was written; pass --force to replace it")
        raise FileExistsError(f"{dst} already exists ({what}); pass --force to replace it")


def _real(path: str | Path) -> Path:
    """``path`` absolute, with ``~`` and every symlink resolved (also when it does not exist)."""
    return Path(os.path.realpath(Path(path).expanduser()))


def _check_not_source(src_dir: Path, dst: Path, by_reference: bool | None = None) -> None:
    """Refuse a DST that is the source, contains it, or holds a file the source's files link to:
    replacing DST (``--force``) would delete the source (and a store by reference reads it)."""
    d, s = _real(dst), _real(src_dir)
    if _same(d, s):
        raise ConversionError(f"{dst} is the source checkpoint itself ({s}); converting into it "
                              "would replace the source: write the converted model to another directory")
    if any(_same(d, parent) for parent in s.parents):
        raise ConversionError(f"{dst} contains the source checkpoint {s}; replacing it would delete "
                              "the source: write the converted model to another directory")
    try:
        files = [f for f in Path(src_dir).iterdir()]
    except OSError:
        return
    for f in files:
        r = _real(f)
        if _same(r, d) or any(_same(d, parent) for parent in r.parents):
            reads = (" (and the converted model would read it in place)" if by_reference
                     else "")
            raise ConversionError(f"{dst} holds {r}, a file of the source checkpoint {src_dir} "
                                  f"({f.name} links to it); replacing {dst} would delete it{reads}: "
                                  "write the converted model to another directory")


def _same(a: Path, b: Path) -> bool:
    """One file or directory: the same path, or (on a case-insensitive disk, macOS's default,
    where ``~/Models`` is ``~/models``) the same inode."""
    if a == b:
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # (one of them does not exist)
        return False


def _check_parent(dst: Path) -> None:
    """A clear error when DST cannot be a directory: a file where one of its parents should be."""
    for anc in (dst.parent, *dst.parent.parents):
        if anc.is_dir():
            return
        if anc.exists() or anc.is_symlink():
            what = "a broken symlink" if not anc.exists() else "a file"
            raise ConversionError(f"cannot write {dst}: {anc} is {what}, not a directory")


def _check_flags(bits: int | None, low_bits: int | None, group_size: int) -> None:
    """The widths and group size MLX quantizes with (before anything is read or written)."""
    def ints(xs):
        return ", ".join(map(str, xs))

    for flag, b in (("--bits", bits), ("--low-bits", low_bits)):
        if b is not None and (not isinstance(b, numbers.Integral) or b not in supported_bits()):
            raise ConversionError(f"{flag} {b}: MLX quantizes experts at {ints(supported_bits())} "
                                  "bits, not this width")
    if not isinstance(group_size, numbers.Integral) or group_size not in supported_group_sizes():
        raise ConversionError(f"--group-size {group_size}: MLX quantizes with groups of "
                              f"{ints(supported_group_sizes())} weights, not this size")
    for flag, b in (("--bits", bits), ("--low-bits", low_bits)):
        if b is not None and not mlx_quantizes(b, group_size):
            raise ConversionError(f"{flag} {b} with --group-size {group_size}: MLX cannot "
                                  "quantize with this combination")


def default_bits(config: dict, bits: int | None = None, low_bits: int | None = None) -> tuple[int, int]:
    """The (high, low) expert widths a conversion of ``config``'s checkpoint uses: the high one
    is an mlx-lm quantized source's own width (its experts are kept as they are), else ``bits``
    or 4; the low one ``low_bits``, or 2 (1 below a 2-bit high one). Raises ConversionError when
    a requested high width cannot apply to a quantized source."""
    q = config.get("quantization")
    src_bits = int(q["bits"]) if isinstance(q, dict) and q.get("bits") is not None else None
    if bits is None:
        bits = src_bits or 4
    elif src_bits is not None and bits != src_bits:
        raise ConversionError(
            f"--bits {bits}: the source is an mlx-lm checkpoint quantized at {src_bits} bits, and "
            f"the high precision keeps its experts as they are (read in place, or copied with "
            f"--copy) so that exact mode computes what mlx-lm does; it cannot hold {bits}-bit "
            f"experts. Omit --bits (or pass --bits {src_bits}), or convert from the float "
            f"checkpoint to choose another width")
    if low_bits is None:
        low_bits = min(2, bits - 1)
    if low_bits < 1:
        raise ConversionError(f"--bits {bits} leaves no smaller width for the low-precision copy")
    if low_bits >= bits:
        own = ", the source's own width" if src_bits is not None else ""
        raise ConversionError(f"--low-bits {low_bits} must be below --bits {bits}{own} (the low "
                              "precision is the smaller, cheaper copy of each expert)")
    return bits, low_bits


def _check_group_size(switches, group_size: int) -> None:
    """Every expert projection is quantized with ``group_size`` (the low copy at least)."""
    for path, switch in switches:
        modules = dict(switch.named_modules())
        for p in switch_linear_paths(switch):
            shape = tuple(modules[p].weight.shape)
            if shape[-1] % group_size:
                raise ConversionError(
                    f"--group-size {group_size} does not divide the input dimension {shape[-1]} of "
                    f"{path}.{p} (expert weights {list(shape)}); pass a group size that does "
                    f"(of {', '.join(map(str, supported_group_sizes()))})")


def _nominal_bits(quant: dict[str, dict], want: int) -> int:
    """The manifest's ``bits`` of an entry: the width its projections hold (``want`` when some
    do; a quantized source's own width when it keeps those)."""
    widths = {int(q["bits"]) for q in quant.values()}
    return want if want in widths else min(widths)


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


def _install(tmp: Path, dst: Path, force: bool, src: str | Path) -> None:
    """Put the finished ``tmp`` at ``dst``: without ``force`` only where nothing is (also when
    something appeared there since the conversion began), with it replacing only what ``force``
    may replace. Runs with SIGINT and SIGTERM held: once the new model is in place, removing
    the old one finishes."""
    if dst.exists() or dst.is_symlink():
        _check_dst(dst, force, src, late=True)  # (it may have appeared meanwhile)
        old = dst.parent / f".{dst.name}.old-{os.getpid()}"
        _remove(old)
        os.rename(dst, old)
        try:
            os.rename(tmp, dst)
        except BaseException:
            os.rename(old, dst)  # put back what was there
            raise
        _remove(old)
        return
    try:
        os.mkdir(dst)  # claims DST, or fails if another conversion wrote it since the check above
    except FileExistsError:
        _check_dst(dst, force, src, late=True)  # (refuses; with force, replaces what it may)
        return _install(tmp, dst, force, src)
    try:
        os.rename(tmp, dst)  # (onto the empty directory just made)
    except BaseException:
        with contextlib.suppress(OSError):
            os.rmdir(dst)
        raise


def convert(src: str | Path, dst: str | Path, *, bits: int | None = None,
            low_bits: int | None = None, group_size: int = 64, force: bool = False,
            progress: bool = True, copy: bool = False,
            adapter_path: str | Path | None = None) -> Path:
    """Convert ``src`` into the hobbit model directory ``dst`` and return its path.

    ``bits``: the high-precision experts' width; an mlx-lm quantized source keeps its own (None
    takes it; another width is refused), a float source is quantized at ``bits`` (default 4),
    and so are its dense weights (attention, embeddings, lm_head), as ``mlx_lm.convert -q
    --q-bits`` quantizes them; an mlx-lm quantized source's dense weights stay as they are.
    ``low_bits``: the low-precision copies' width (default 2, and below ``bits``).

    An mlx-lm quantized source is read in place (by reference) unless ``copy``; the store then
    depends on the source files staying where and as they are (checked at every load). A DST
    that is the source, or that holds it, is refused; ``force`` replaces a converted model, an
    empty directory or a file at DST, never a directory of other files.

    ``adapter_path``: adapters ``mlx_lm.lora`` trained (LoRA, DoRA or full), fused into the
    converted model as ``mlx_lm.fuse`` fuses them, one layer at a time (``convert/adapters.py``);
    the modules they change are written, not read in place."""
    from tqdm import tqdm

    _check_flags(bits, low_bits, group_size)
    adapter_path = adapter_path or None  # ("": none, as mlx-lm reads it)
    adapters = [] if adapter_path is None else adapter_files(adapter_path, ConversionError)
    dst = Path(dst).expanduser()
    local = Path(src).expanduser()
    if local.is_dir():  # before anything else: "pass --force" must not be suggested here
        _check_not_source(local, dst)
        if is_hobbit_model(local):
            _check_not_converted(local)
    _check_dst(dst, force, src)
    _check_parent(dst)
    src_dir = resolve_source(src)
    raw_config = _read_config(src_dir)
    config = load_config(src_dir)
    facts = describe_moe(config)
    model, switches = facts["model"], facts["switches"]
    bits, low_bits = default_bits(config, bits, low_bits)
    _check_group_size(switches, group_size)
    by_reference = not copy and config.get("quantization") is not None
    _check_not_source(src_dir, dst, by_reference)
    # The stored source is what ``reconvert_command`` prints: absolute, or the hub id.
    source = str(_real(local)) if local.exists() else str(src)
    source_files = _source_files(src_dir)
    weights = _load_source_weights(source_files)
    loaded = dict(weights)
    weights = sanitize_weights(model, weights, config)
    unchanged = unchanged_by_sanitize(loaded, weights)
    del loaded  # (an evaluated source tensor is held while anything refers to it)
    switch_paths = [p for p, _ in switches]
    dense_fused = False
    if adapter_path is not None:
        fused = fused_weights(src_dir, adapter_path, ConversionError)
        weights.update(fused)
        unchanged -= fused.keys()  # (their bytes are not the source's: written, not referenced)
        dense_fused = any(not k.startswith(tuple(p + "." for p in switch_paths)) for k in fused)
        del fused  # (a layer's fused experts are freed with its source tensors, below)
    for path, switch in switches:  # (before anything is written or removed)
        for p in switch_linear_paths(switch):
            _check_expert_tensors(weights, f"{path}.{p}", num_experts_of(switch))
    check_dense_weights(model, weights, switch_paths, config)

    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConversionError(f"cannot write {dst}: cannot create {e.filename or dst.parent} "
                              f"({e.strerror or e})") from None
    claim = PartialClaim()  # the partial directory this conversion owns, and its locks
    adapter = adapter_record(adapters)
    stamp = conversion_stamp(source_files + adapters, json.dumps(raw_config, sort_keys=True),
                             {"source": source, "bits": bits, "low_bits": low_bits,
                              "group_size": group_size, "by_reference": by_reference,
                              "adapter": adapter.get("path", "")})
    try:
        state = _take_over_partials(dst, stamp, len(switches), claim)
        if state is None:
            state = ConversionProgress(stamp)
            _new_partial(dst, claim)
        tmp = claim.path
        for pname in ("high", "low"):
            (tmp / STORE_DIR / pname).mkdir(parents=True, exist_ok=True)
        precisions = {"high": {"bits": bits, "group_size": group_size},
                      "low": {"bits": low_bits, "group_size": group_size}}
        per_layer = [len(switch_linear_paths(s)) * len(precisions) for _, s in switches]
        files, references = state.files, state.references
        refs = (ReferenceBuilder(index_source(source_files), unchanged, weights, files,
                                 references) if by_reference else None)
        done = len(state.layers)
        try:
            with tqdm(total=sum(per_layer), initial=sum(per_layer[:done]), desc="experts",
                      unit="proj", disable=not progress) as bar:
                for li, (path, switch) in enumerate(switches):
                    if li >= done:
                        state.record(tmp, _convert_layer(
                            weights, li, path, switch, tmp, files, precisions, bar, refs,
                            config.get("quantization") is not None))
                    for k in [k for k in weights if k.startswith(path + ".")]:
                        del weights[k]  # let the layer's source tensors go
        finally:
            if refs is not None:
                refs.close()
        layers = state.layers
        # (mlx-lm's quantizer reports "[INFO] Quantized model with N bits per weight" on
        # stdout, counting the scratch model's float experts: not this model's figure)
        with contextlib.redirect_stdout(io.StringIO()):
            dense, new_config = _dense_weights(model, weights, switch_paths, config, bits, group_size)
        if by_reference and not dense_fused:  # mlx-lm reads them from the source, as it
            # would without hobbit_mlx
            if progress:
                print(f"[convert] linking the dense weights of {src_dir} (read in place)")
            link_dense(source_files, tmp, references)
        else:
            if progress:
                print(f"[convert] writing {sum(v.nbytes for v in dense.values()) / 2**20:.1f} MiB of dense weights")
            _write_dense(dense, tmp)
        for key in ("quantization", "quantization_config"):
            if key in new_config:
                raw_config[key] = new_config[key]
        (tmp / "config.json").write_text(json.dumps(raw_config, indent=2))
        for f in _model_files(src_dir):
            shutil.copy2(f, tmp / f.name)
        Manifest(config["model_type"], layers[0].num_experts, facts["experts_per_token"], files,
                 layers, source=source, references=references, adapter=adapter).save(tmp)
        ConversionProgress.discard(tmp)
        note = (f"[convert] interrupted while {dst} is being replaced: finishing that first "
                "(the new model is complete)")
        with _signals_held(note) as pending:
            _install(tmp, dst, force, src)
    except BaseException as e:
        with _signals_held():  # (a second Ctrl-C does not leave half of it behind)
            if claim.path is not None and not _keep_for_resume(e, claim.path, len(switches)):
                _remove(claim.path)  # (only its own: another's partial is never touched here)
        raise
    finally:
        claim.release()
    _deliver(pending)
    return dst


__all__ = ["convert", "ConversionError", "UnsupportedModelError", "StoreError", "default_bits",
           "check_dense_weights", "sanitize_weights", "MODEL_FILE_PATTERNS"]
