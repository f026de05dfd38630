"""The sizes that decide a model's memory budget, from its config.json and safetensors headers only.

``python -m hobbit_mlx.plan`` answers "what budget does this model need, and what would this
machine give it?" before anything is downloaded or loaded: a local checkpoint is read through its
headers; a hub id through the Hugging Face cache when it holds the files, else through
``huggingface_hub``'s metadata calls (config.json and each file's safetensors header, no weights).
The model is built lazily from its config (nothing is materialised) and the checkpoint's tensors
become lazy placeholders of their shape and dtype, so mlx-lm's own ``sanitize`` and the
converter's own rules decide what is dense and what the 4-bit and 2-bit experts hold.
"""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

from .architectures import describe_moe, num_experts_of, switch_linear_paths
from .budget import KV_STEP
from .measure import CONTEXT_MARGIN, SMALLEST_CHUNK, chunk_ladder, kv_bytes_by_layer
from .store import (DTYPE_ITEMSIZE, FLOAT_DTYPES, StoreError, checkpoint_weight_files,
                    is_float, is_hobbit_model, read_config_json, read_safetensors_header)

_ST_TO_MX = {"U8": mx.uint8, "I8": mx.int8, "U16": mx.uint16, "I16": mx.int16, "F16": mx.float16,
             "BF16": mx.bfloat16, "U32": mx.uint32, "I32": mx.int32, "F32": mx.float32,
             "U64": mx.uint64, "I64": mx.int64, "BOOL": mx.bool_}
_MX_FLOATS = (mx.float16, mx.bfloat16, mx.float32)


class ModelNotFound(ValueError):
    """The model is neither a local checkpoint nor a hub id that can be read."""


@dataclass
class Checkpoint:
    """What the plan reads: the config and every tensor's (dtype, shape)."""

    where: str  # "local" or "hub metadata"
    config: dict
    tensors: dict[str, tuple[str, tuple[int, ...]]]


def read_local(path: Path) -> Checkpoint:
    """A local checkpoint's config and headers: its weight files are those its index names (each
    must exist) or mlx-lm's ``model*.safetensors``, as the converter reads them. A converted model
    that reads its source in place must still find it (load's message when it does not)."""
    cfg = path / "config.json"
    if not cfg.is_file():
        raise ModelNotFound(f"{cfg}: not found (MODEL must be a model directory or a hub id)")
    config = read_config_json(cfg, ModelNotFound)
    manifest = None
    if is_hobbit_model(path):
        from .store import check_references, load_manifest

        manifest = load_manifest(path, check_files=False)
        check_references(path, manifest)
    try:
        files = checkpoint_weight_files(path)
    except StoreError as e:
        raise ModelNotFound(str(e)) from None
    if not files:
        raise ModelNotFound(f"{path}: no model*.safetensors weight files found (mlx-lm reads "
                            "those, or the files model.safetensors.index.json names)")
    tensors = {}
    for f in files:
        try:
            _, meta = read_safetensors_header(f)
        except (StoreError, OSError) as e:
            raise ModelNotFound(str(e)) from None
        tensors.update({k: (v["dtype"], tuple(v["shape"])) for k, v in meta.items()})
    if manifest is not None:  # a converted model: its experts as its store holds them in 4-bit
        for layer in manifest.layers:
            for t in layer.precisions["high"].tensors:
                tensors[f"{layer.module_path}.{t.name}"] = (t.dtype, (layer.num_experts, *t.shape))
    return Checkpoint("local", config, tensors)


def read_hub(repo_id: str) -> Checkpoint:
    """From the cache when it holds the checkpoint, else config.json and the headers only."""
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download

    try:
        cached = Path(snapshot_download(repo_id, local_files_only=True))
        if (cached / "config.json").is_file() and any(cached.glob("*.safetensors")):
            return read_local(cached)
    except Exception:  # not in the cache (or only part of it): ask the hub
        pass
    try:
        # One request that is not retried first: offline, hf_hub_download retries for ~25 s.
        HfApi().model_info(repo_id)
        config = json.loads(Path(hf_hub_download(repo_id, "config.json")).read_text())
        meta = HfApi().get_safetensors_metadata(repo_id)
    except Exception as e:
        raise ModelNotFound(f"{repo_id}: not a local directory, and its config and safetensors "
                            f"headers could not be read from the Hugging Face hub or its cache "
                            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    tensors = {}
    for file_meta in meta.files_metadata.values():
        tensors.update({k: (t.dtype, tuple(t.shape)) for k, t in file_meta.tensors.items()})
    return Checkpoint("hub metadata", config, tensors)


def read_checkpoint(model: str | Path) -> Checkpoint:
    path = Path(model).expanduser()
    if path.exists():
        return read_local(path)
    if str(model).count("/") != 1 or str(model).startswith((".", "/", "~")):
        raise ModelNotFound(f"{model}: no such directory (and not a hub repo id like 'org/name')")
    return read_hub(str(model))


@dataclass
class ModelSizes:
    """Bytes as stored, and as resident on this machine (floats cast to ``compute_itemsize``)."""

    model_type: str
    num_moe_layers: int
    num_experts: int
    experts_per_token: int
    dense_bytes: int  # resident
    expert_bytes: dict[str, int]  # stored, every expert: {"high", "low"}
    expert_slot_bytes: dict[str, list[int]]  # resident bytes of one expert, per distinct layout
    expert_layers: dict[str, list[int]]  # MoE layers of each layout, in the same order
    kv_bytes_per_token: int
    kv_layer_bytes_per_token: int  # the largest layer's share
    activation_points: list[tuple[int, int]]  # estimated
    compute_dtype: str
    context_activation: tuple[float, float, float] = (0.0, 0.0, 0.0)  # estimated, as load() measures it
    # with kv_bits: (bytes per token quantized, the largest layer's, quantized_kv_start)
    kv_quantized: tuple = ()
    # the widths the experts are stored at, per precision (a mixed-bit source's own several)
    expert_widths: dict[str, list[int]] = field(default_factory=dict)

    def all_bytes(self, precision: str) -> int:
        """Every expert resident at one precision."""
        return sum(b * n * self.num_experts for b, n in
                   zip(self.expert_slot_bytes[precision], self.expert_layers[precision]))


def _placeholders(tensors: dict) -> dict[str, mx.array]:
    """Lazy arrays of the checkpoint's shapes (never evaluated, so they cost nothing)."""
    return {k: mx.zeros(shape, _ST_TO_MX.get(dtype, mx.uint8)) for k, (dtype, shape) in tensors.items()}


def _resident(a: mx.array, itemsize: int | None) -> int:
    return a.size * itemsize if itemsize and a.dtype in _MX_FLOATS else a.nbytes


def _float_dtype(weights: dict) -> mx.Dtype:
    """The checkpoint's float dtype: that of its quantization scales, else its largest floats."""
    scales = [v.dtype for k, v in weights.items() if k.endswith(".scales") and v.dtype in _MX_FLOATS]
    if scales:
        return scales[0]
    floats = [v for v in weights.values() if v.dtype in _MX_FLOATS]
    return max(floats, key=lambda v: v.size).dtype if floats else mx.float32


def _expert_copy_bytes(weights: dict, prefix: str, in_dim: int, want: dict, keep_source: bool,
                       itemsize: int | None, float_dtype: mx.Dtype) -> tuple[int, int, int]:
    """(stored, resident) bytes of one expert of one projection in the store's copy, and the
    width it is stored at."""
    from convert import _projection_quant, _source_quantization

    quant = _projection_quant(weights, prefix, in_dim, want, keep_source)
    w = weights[f"{prefix}.weight"]
    e, out = w.shape[0], w.shape[1]
    stored = resident = 0
    if is_float(quant):  # (a quantized source's float experts, kept so)
        stored, resident = w.nbytes // e, _resident(w, itemsize) // e
    elif quant == _source_quantization(weights, prefix, in_dim):  # the source's own bytes
        parts = [weights[f"{prefix}.{k}"] for k in ("weight", "scales", "biases")
                 if f"{prefix}.{k}" in weights]
        stored = sum(p.nbytes for p in parts) // e
        resident = sum(_resident(p, itemsize) for p in parts) // e
    else:
        groups = in_dim // quant["group_size"]
        stored = resident = out * in_dim * quant["bits"] // 8
        stored += 2 * out * groups * float_dtype.size
        resident += 2 * out * groups * (itemsize or float_dtype.size)
    if f"{prefix}.bias" in weights:
        b = weights[f"{prefix}.bias"]
        stored += b.nbytes // e
        resident += _resident(b, itemsize) // e
    return stored, resident, int(quant["bits"])


def estimate_activations(config: dict, k: int, moe_intermediate: int, itemsize: int,
                         prefill_step_size: int) -> list[tuple[int, int]]:
    """An estimate of what load() measures for each prefill chunk: per token, the logits and
    their softmax and a few hidden-size buffers and the experts' intermediates; per token pair,
    the attention scores of a quarter of the heads (within 5% of the measured points of the
    bundled reference model, and above them by the margin)."""
    from .architectures import text_config

    cfg = text_config(config)
    vocab, hidden = int(cfg.get("vocab_size", 0)), int(cfg.get("hidden_size", 0))
    heads = int(cfg.get("num_attention_heads", 1) or 1)
    per_token = 3 * vocab + 8 * hidden + 3 * k * moe_intermediate
    nope, rope, v = _latent_head_dims(cfg)  # MLA: queries, keys, values and output per head
    per_token += heads * (2 * (nope + rope) + 2 * v)
    per_token += 13 * _selective_scan_state(cfg)
    grain = 64 * 1024
    out = []
    for n in chunk_ladder(prefill_step_size):
        est = 1.1 * itemsize * (n * per_token + heads * n * n / 4)
        out.append((n, int((est + grain - 1) // grain * grain)))
    return out


def estimate_context_activation(config: dict, itemsize: int,
                                kv_layer_bytes_per_token: int) -> tuple[float, float, float]:
    """An estimate of the growth with the context that load() measures: per (call token, context
    token) pair, one attention score per head; for any context, the two step buffers of a layer's
    keys and values that an attending call copies (on the bundled reference model, before the
    margin: 33 bytes per pair, and 215 KB for a 16-token call, 440 KB for a 64-token one,
    measured; 32 bytes and 328 KB estimated)."""
    from .architectures import text_config

    cfg = text_config(config)
    heads = int(cfg.get("num_attention_heads", 1) or 1)
    # MLA caches a latent per token and expands every context token's keys and values per head
    # for each call, in about 2.5 copies (measured on the tiny deepseek_v3: 5.8 KB per context
    # token, against 2.3 KB of expanded keys and values); load() fits that growth per (call
    # token, context token) pair from a SMALLEST_CHUNK-token call, and the estimate spreads it
    # over those tokens the same way
    nope, rope, v = _latent_head_dims(cfg)
    if kv_layer_bytes_per_token >= heads * (nope + rope) * itemsize:
        nope = rope = v = 0  # (mlx-lm's deepseek_v2 caches them expanded already)
    expanded = 2.5 * heads * (nope + rope + v) / SMALLEST_CHUNK
    return (CONTEXT_MARGIN * (heads + expanded) * itemsize,
            CONTEXT_MARGIN * 2 * kv_layer_bytes_per_token * KV_STEP, 0.0)


def _selective_scan_state(cfg: dict) -> int:
    """Elements of one token's state in a Mamba-1 selective scan (Jamba's mamba layers), 0
    without one. mlx-lm's prefill materializes that state for every token of a call, in about
    12 copies (measured on the tiny jamba: 117 KB per token, against 8 KB of state in float32,
    where the other terms come to 10 KB): Jamba's activations are mostly this (the estimate
    without it was 0.11x the measured)."""
    if cfg.get("model_type") != "jamba":
        return 0  # (mlx-lm's Mamba-2 layers scan in chunks: the other terms cover them)
    return int(cfg["mamba_expand"]) * int(cfg.get("hidden_size", 0)) * int(cfg["mamba_d_state"])


def _latent_head_dims(cfg: dict) -> tuple[int, int, int]:
    """(qk_nope, qk_rope, v) head dimensions of multi-head latent attention (DeepSeek-V2/V3,
    Kimi, GLM-4 lite, Mistral 3/4 large), which expands its cached latent per head; zeros for
    attention that caches its keys and values as they are."""
    if not cfg.get("kv_lora_rank"):
        return 0, 0, 0
    return tuple(int(cfg.get(name) or 0) for name in ("qk_nope_head_dim", "qk_rope_head_dim",
                                                       "v_head_dim"))


def model_sizes(ckpt: Checkpoint, *, bits: int = 4, low_bits: int = 2, group_size: int = 64,
                compute_dtype: mx.Dtype | None = None, prefill_step_size: int = 512,
                kv_quant=None) -> ModelSizes:
    """Sizes of a checkpoint as hobbit_mlx would store and hold it (``compute_dtype``: the float
    dtype of resident weights on this machine; None keeps the checkpoint's; ``kv_quant``: a
    ``KVQuant`` the KV cache is quantized with)."""
    from convert import ConversionError, _dense_weights, check_dense_weights, sanitize_weights

    config = dict(ckpt.config)
    facts = describe_moe(config)
    model, switches = facts["model"], facts["switches"]
    weights = _placeholders(ckpt.tensors)
    try:  # (the converter's own checks: what it would refuse, plan refuses with its words)
        weights = sanitize_weights(model, weights, config)
        check_dense_weights(model, weights, [p for p, _ in switches], config)
    except ConversionError as e:
        raise StoreError(str(e)) from None
    float_dtype = _float_dtype(weights)
    itemsize = compute_dtype.size if compute_dtype is not None else None
    stored = {"high": 0, "low": 0}
    widths: dict[str, set[int]] = {"high": set(), "low": set()}
    layouts: dict[str, dict[int, int]] = {"high": {}, "low": {}}
    moe_i = 0
    for path, switch in switches:
        modules = dict(switch.named_modules())
        per = {"high": [0, 0], "low": [0, 0]}
        for p in switch_linear_paths(switch):
            in_dim = int(modules[p].weight.shape[-1])
            moe_i = max(moe_i, min(int(modules[p].weight.shape[1]), in_dim))
            if f"{path}.{p}.weight" not in weights:
                raise StoreError(f"the checkpoint has no weights for {path}.{p} (after mlx-lm's "
                                 "sanitize); is it the model its config.json names?")
            for name, b in (("high", bits), ("low", low_bits)):
                s, r, w = _expert_copy_bytes(weights, f"{path}.{p}", in_dim,
                                             {"bits": b, "group_size": group_size},
                                             name == "high" and "quantization" in config,
                                             itemsize, float_dtype)
                widths[name].add(w)
                per[name][0] += s
                per[name][1] += r
        n = num_experts_of(switch)
        for name in per:
            stored[name] += per[name][0] * n
            layouts[name][per[name][1]] = layouts[name].get(per[name][1], 0) + 1
    with contextlib.redirect_stdout(io.StringIO()):  # (mlx-lm's quantizer reports on stdout)
        dense, _ = _dense_weights(model, weights, [p for p, _ in switches], config, bits, group_size)
    dense_bytes = sum(_resident(v, itemsize) for v in dense.values())
    k = facts["experts_per_token"]
    dtype = compute_dtype or float_dtype
    facts["model"].set_dtype(dtype)
    kv = kv_bytes_by_layer(facts["model"])
    quantized = kv_bytes_by_layer(facts["model"], kv_quant) if kv_quant is not None else None
    return ModelSizes(
        model_type=config.get("model_type", "?"), num_moe_layers=len(switches),
        num_experts=num_experts_of(switches[0][1]), experts_per_token=k, dense_bytes=dense_bytes,
        expert_bytes=stored,
        expert_slot_bytes={p: list(layouts[p]) for p in layouts},
        expert_layers={p: list(layouts[p].values()) for p in layouts},
        kv_bytes_per_token=sum(kv), kv_layer_bytes_per_token=max(kv, default=0),
        activation_points=estimate_activations(config, k, moe_i, dtype.size, prefill_step_size),
        compute_dtype=str(dtype).replace("mlx.core.", ""),
        context_activation=estimate_context_activation(config, dtype.size, max(kv, default=0)),
        kv_quantized=(sum(quantized), max(quantized, default=0), kv_quant.start)
        if quantized is not None else (),
        expert_widths={p: sorted(w) for p, w in widths.items()})


__all__ = ["Checkpoint", "ModelNotFound", "ModelSizes", "read_checkpoint", "model_sizes",
           "is_hobbit_model", "DTYPE_ITEMSIZE", "FLOAT_DTYPES"]
