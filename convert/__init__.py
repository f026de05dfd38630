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

``convert()`` is here; the parts it runs are modules of their own: ``convert/source.py`` reads
the source checkpoint, ``convert/dense.py`` checks, quantizes and writes the dense weights,
``convert/experts.py`` checks the widths and writes the expert store (``CHUNK_BYTES`` is
there), ``convert/destination.py`` checks DST, keeps the partial directories and installs the
result (signals held), and ``convert/errors.py`` holds ``ConversionError``.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

from mlx_lm.utils import load_config

from hobbit_mlx.architectures import (UnsupportedModelError, describe_moe,
                                      num_experts_of, switch_linear_paths)
from hobbit_mlx.store import LOW_ROUNDINGS, STORE_DIR, Manifest, StoreError, is_hobbit_model

from .adapters import adapter_files, adapter_record, fused_weights
from .dense import _dense_weights, _write_dense, check_dense_weights, sanitize_weights
from .destination import (_check_dst, _check_not_source, _check_parent, _deliver, _install,
                          _keep_for_resume, _new_partial, _real, _remove, _signals_held,
                          _take_over_partials)
from .errors import ConversionError
from .experts import (_check_expert_tensors, _check_flags, _check_group_size, _convert_layer,
                      default_bits)
from .reference import ReferenceBuilder, index_source, link_dense, unchanged_by_sanitize
from .resume import ConversionProgress, PartialClaim, conversion_stamp
from .source import (MODEL_FILE_PATTERNS, _check_not_converted, _load_source_weights, _model_files,
                     _read_config, _source_files, resolve_source)

# Names other code imports from ``convert`` (hobbit_mlx, bench, the tests), kept there.
from .destination import YOUNG_PARTIAL_S as YOUNG_PARTIAL_S
from .destination import _age_s as _age_s
from .destination import _tree_bytes as _tree_bytes
from .destination import interrupt_handler as interrupt_handler
from .experts import _projection_quant as _projection_quant
from .source import _source_quantization as _source_quantization


def convert(src: str | Path, dst: str | Path, *, bits: int | None = None,
            low_bits: int | None = None, group_size: int = 64, force: bool = False,
            progress: bool = True, copy: bool = False,
            adapter_path: str | Path | None = None, low_rounding: str = "fitted") -> Path:
    """Convert ``src`` into the hobbit model directory ``dst`` and return its path.

    ``bits``: the high-precision experts' width; an mlx-lm quantized source keeps its own (None
    takes it; another width is refused), a float source is quantized at ``bits`` (default 4),
    and so are its dense weights (attention, embeddings, lm_head), as ``mlx_lm.convert -q
    --q-bits`` quantizes them; an mlx-lm quantized source's dense weights stay as they are.
    ``low_bits``: the low-precision copies' width (default 2, and below ``bits``).
    ``low_rounding``: how the low copies' groups are quantized: ``"fitted"`` (each group's scale
    and bias fitted by least squares: ``fitted_quant.py``; a third less error at 2 bits) or
    ``"nearest"`` (``mx.quantize``'s grid from each group's minimum and maximum). The high copy
    is always mlx-lm's own quantization.

    An mlx-lm quantized source is read in place (by reference) unless ``copy``; the store then
    depends on the source files staying where and as they are (checked at every load). A DST
    that is the source, or that holds it, is refused; ``force`` replaces a converted model, an
    empty directory or a file at DST, never a directory of other files.

    ``adapter_path``: adapters ``mlx_lm.lora`` trained (LoRA, DoRA or full), fused into the
    converted model as ``mlx_lm.fuse`` fuses them, one layer at a time (``convert/adapters.py``);
    the modules they change are written, not read in place."""
    from tqdm import tqdm

    _check_flags(bits, low_bits, group_size)
    if low_rounding not in LOW_ROUNDINGS:
        raise ConversionError(f"low_rounding {low_rounding!r}: one of {', '.join(LOW_ROUNDINGS)}")
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
                              "adapter": adapter.get("path", ""), "low_rounding": low_rounding})
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
                            config.get("quantization") is not None, low_rounding))
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
                 layers, source=source, references=references, adapter=adapter,
                 low_rounding=low_rounding).save(tmp)
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
