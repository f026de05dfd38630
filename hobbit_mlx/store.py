"""The expert store format: one place that both the converter and the runtime import.

A hobbit model directory holds the dense (non-expert) weights in mlx-lm form, the config and
tokenizer files, and ``experts/``: a manifest plus safetensors files holding every routed expert of
every MoE layer twice, in a high (4-bit) and a low (2-bit) quantized form.

A *record* is one expert at one precision: a list of byte spans ``(file, offset, length)``. In a
store written by our converter each record is a single page-aligned span holding all of the
expert's tensors back to back, so it is read with one ``pread``. The tensor layout inside a
record is the same for every expert of a layer and precision, so the manifest stores it once per
(layer, precision).

A store converted *by reference* from an mlx-lm quantized checkpoint writes no high-precision
copy: its high records point into the source's own safetensors files (expert e of a stacked
tensor ``[E, ...]`` is one contiguous byte range, so a record is one span per tensor), and its
dense weights are links to those files. The manifest then lists those files by absolute path
under ``references`` with their size and modification time, so a source that was moved, changed
or deleted is caught before anything is read.
"""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMAT_NAME = "hobbit-expert-store"
# How the low copies' groups were quantized: least-squares fitted (convert/fitted_quant.py, the
# converter's default) or mx.quantize's nearest level (every store made before the fit).
LOW_ROUNDINGS = ("fitted", "nearest")
# ... and once quantized again against their experts' inputs (python -m convert.calibrate)
CALIBRATED_ROUNDING = "calibrated"
FORMAT_VERSION = 2  # 2: files outside the model directory, read in place (``references``)
READABLE_VERSIONS = (1, 2)
STORE_DIR = "experts"
MANIFEST_NAME = "manifest.json"
PAGE_SIZE = 16384  # Apple Silicon page size; also a multiple of x86's 4096.
PRECISIONS = ("high", "low")

# safetensors dtype names <-> numpy-compatible storage (bfloat16 is read as uint16 and viewed).
DTYPE_ITEMSIZE = {
    "U8": 1, "I8": 1, "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8,
}


FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}


class StoreError(RuntimeError):
    """A hobbit model directory is missing, corrupt, or does not match its config."""


@dataclass(frozen=True)
class TensorLayout:
    """Where one tensor of an expert lives inside its record."""

    name: str  # parameter path inside the switch module, e.g. "gate_proj.scales"
    dtype: str  # safetensors dtype name, e.g. "U32", "BF16"
    shape: tuple[int, ...]
    span: int  # index into the record's spans
    offset: int  # byte offset inside that span

    @property
    def nbytes(self) -> int:
        n = DTYPE_ITEMSIZE[self.dtype]
        for d in self.shape:
            n *= d
        return n

    def to_json(self) -> list:
        return [self.name, self.dtype, list(self.shape), self.span, self.offset]

    @classmethod
    def from_json(cls, row: list) -> "TensorLayout":
        name, dtype, shape, span, offset = row
        return cls(name, dtype, tuple(int(d) for d in shape), int(span), int(offset))


@dataclass(frozen=True)
class Record:
    """One expert at one precision: byte spans plus a CRC32 per span."""

    spans: tuple[tuple[int, int, int], ...]  # (file index, offset, length)
    crc32: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return sum(s[2] for s in self.spans)

    def to_json(self) -> dict:
        return {"spans": [list(s) for s in self.spans], "crc32": list(self.crc32)}

    @classmethod
    def from_json(cls, obj: dict) -> "Record":
        return cls(tuple(tuple(int(v) for v in s) for s in obj["spans"]),
                   tuple(int(c) for c in obj["crc32"]))


@dataclass
class PrecisionEntry:
    """All experts of one MoE layer at one precision.

    ``quant`` gives each projection's quantization ({"bits", "group_size", "mode"}): a quantized
    source keeps its own format in the high copy (mlx-lm recipes may hold some projections at 8
    bits), so exact mode reads the very bytes mlx-lm would use.
    """

    bits: int  # nominal bit width of this precision (4 for high, 2 for low)
    quant: dict[str, dict]
    tensors: list[TensorLayout]
    records: list[Record]

    @property
    def expert_nbytes(self) -> int:
        """Bytes of one expert as stored (sum of its tensors)."""
        return sum(t.nbytes for t in self.tensors)

    def resident_nbytes(self, float_itemsize: int | None = None) -> int:
        """Bytes one expert takes once read, its floating tensors cast to ``float_itemsize``."""
        if not float_itemsize:
            return self.expert_nbytes
        return sum(t.nbytes // DTYPE_ITEMSIZE[t.dtype] * float_itemsize if t.dtype in FLOAT_DTYPES
                   else t.nbytes for t in self.tensors)

    def to_json(self) -> dict:
        return {
            "bits": self.bits, "quant": self.quant,
            "tensors": [t.to_json() for t in self.tensors],
            "records": [r.to_json() for r in self.records],
        }

    @classmethod
    def from_json(cls, obj: dict) -> "PrecisionEntry":
        return cls(int(obj["bits"]), {k: dict(v) for k, v in obj["quant"].items()},
                   [TensorLayout.from_json(t) for t in obj["tensors"]],
                   [Record.from_json(r) for r in obj["records"]])


@dataclass
class LayerEntry:
    """One MoE layer: where its switch module sits in the mlx-lm model, and its experts."""

    layer: int  # index of this MoE layer among the model's MoE layers
    module_path: str  # e.g. "model.layers.3.mlp.switch_mlp"
    num_experts: int
    precisions: dict[str, PrecisionEntry] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"layer": self.layer, "module": self.module_path, "num_experts": self.num_experts,
                "precisions": {k: v.to_json() for k, v in self.precisions.items()}}

    @classmethod
    def from_json(cls, obj: dict) -> "LayerEntry":
        return cls(int(obj["layer"]), obj["module"], int(obj["num_experts"]),
                   {k: PrecisionEntry.from_json(v) for k, v in obj["precisions"].items()})


@dataclass
class Manifest:
    """The whole expert store: files, layers, and model facts the runtime checks against."""

    model_type: str
    num_experts: int
    experts_per_token: int
    files: list[str]  # paths relative to the model directory
    layers: list[LayerEntry]
    source: str = ""
    page_size: int = PAGE_SIZE
    # files outside the model directory this store reads in place: path -> {"size", "mtime_ns"}
    references: dict[str, dict] = field(default_factory=dict)
    # the adapters fused into it (``--adapter-path``): {"path", "files": {name: stamp}}, or {}
    adapter: dict = field(default_factory=dict)
    # one of LOW_ROUNDINGS or CALIBRATED_ROUNDING (absent from older manifests: nearest)
    low_rounding: str = "nearest"

    def expert_bytes(self, precision: str, float_itemsize: int | None = None) -> int:
        """All experts at one precision: as stored, or once read with floats cast."""
        return sum(l.precisions[precision].resident_nbytes(float_itemsize) * l.num_experts
                   for l in self.layers)

    def to_json(self) -> dict:
        # A self-contained store stays version 1, so an older hobbit_mlx still reads it; one that
        # reads its source in place is version 2, which an older one refuses by name.
        version = FORMAT_VERSION if self.references else 1
        return {"format": FORMAT_NAME, "version": version, "model_type": self.model_type,
                "num_experts": self.num_experts, "experts_per_token": self.experts_per_token,
                "page_size": self.page_size, "source": self.source, "files": self.files,
                "references": self.references, "layers": [l.to_json() for l in self.layers],
                "low_rounding": self.low_rounding,
                **({"adapter": self.adapter} if self.adapter else {})}

    @classmethod
    def from_json(cls, obj: dict) -> "Manifest":
        if obj.get("format") != FORMAT_NAME:
            raise StoreError(f"not a hobbit expert store manifest (format={obj.get('format')!r})")
        if int(obj.get("version", -1)) not in READABLE_VERSIONS:
            raise StoreError(f"expert store version {obj.get('version')} is not supported "
                             f"(this hobbit_mlx reads versions {READABLE_VERSIONS}); reconvert the model")
        manifest = cls(obj["model_type"], int(obj["num_experts"]), int(obj["experts_per_token"]),
                       list(obj["files"]), [LayerEntry.from_json(l) for l in obj["layers"]],
                       obj.get("source", ""), int(obj.get("page_size", PAGE_SIZE)),
                       {k: dict(v) for k, v in obj.get("references", {}).items()},
                       dict(obj.get("adapter") or {}), str(obj.get("low_rounding", "nearest")))
        check_layers(manifest)
        return manifest

    def save(self, model_dir: Path) -> None:
        path = Path(model_dir) / STORE_DIR / MANIFEST_NAME
        tmp = path.with_suffix(".json.tmp")
        with open(tmp, "w") as f:
            f.write(json.dumps(self.to_json()))
            f.flush()
            durable_sync(f.fileno())
        os.replace(tmp, path)


def durable_sync(fd: int) -> None:
    """Flush a file to the disk itself: on macOS ``fsync`` only hands the data to the drive,
    whose cache a power loss can drop (``F_FULLFSYNC`` waits for the medium); a store renamed
    into place must not come back with unwritten pages."""
    import sys

    if sys.platform == "darwin":
        import fcntl

        if hasattr(fcntl, "F_FULLFSYNC"):
            try:
                fcntl.fcntl(fd, fcntl.F_FULLFSYNC)
                return
            except OSError:  # (some file systems refuse it: the plain sync below)
                pass
    os.fsync(fd)


def manifest_path(model_dir: str | Path) -> Path:
    return Path(model_dir) / STORE_DIR / MANIFEST_NAME


def is_hobbit_model(model_dir: str | Path) -> bool:
    return manifest_path(model_dir).is_file()


def load_manifest(model_dir: str | Path, check_files: bool = True) -> Manifest:
    """Read and validate the manifest; with ``check_files`` every store file must be long enough."""
    path = manifest_path(model_dir)
    if not path.is_file():
        raise StoreError(f"{path}: expert store manifest not found (is {model_dir} a converted "
                         "hobbit model? convert it with `python -m convert SRC DST`)")
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StoreError(f"{path}: manifest is not valid JSON ({e})") from None
    try:
        manifest = Manifest.from_json(obj)
    except StoreError as e:
        raise StoreError(f"{path}: {e}") from None
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise StoreError(f"{path}: manifest is malformed ({type(e).__name__}: {e})") from None
    if check_files:
        check_store_files(Path(model_dir), manifest)
    return manifest


def check_layers(manifest: Manifest) -> None:
    """Catch records and tensor layouts the reader would misread (a wrong dtype or shape reads
    the right bytes as garbage, which the checksums cannot see) or index out of range mid-reply:
    one pass over the entries, reading no file. Raises StoreError naming the layer and precision."""
    for layer in manifest.layers:
        if "high" not in layer.precisions:
            raise StoreError(f"layer {layer.layer} has no 'high' records; reconvert the model")
        for precision, entry in layer.precisions.items():
            try:
                lengths = _span_lengths(entry)
                _check_records(entry.records, lengths, layer.num_experts, len(manifest.files))
            except StoreError as e:
                raise StoreError(f"layer {layer.layer} {precision}: {e}; reconvert the "
                                 "model") from None


QUANT_MODES = ("affine", "mxfp4", "mxfp8", "nvfp4")  # MLX's
FLOAT_MODE = "float"  # a projection kept unquantized (a quantized source's float experts)


def float_quant(itemsize: int) -> dict:
    """The ``quant`` of a projection kept as floats of ``itemsize`` bytes."""
    return {"bits": 8 * itemsize, "group_size": None, "mode": FLOAT_MODE}


def is_float(quant: dict) -> bool:
    return quant.get("mode") == FLOAT_MODE


def quant_parts(quant: dict) -> tuple[str, ...]:
    """The tensors one expert's projection cannot do without at ``quant``."""
    if is_float(quant):
        return ("weight",)
    if quant["mode"] not in QUANT_MODES:
        raise StoreError(f"unknown quantization mode {quant['mode']!r}")
    return ("weight", "scales") + (("biases",) if quant["mode"] == "affine" else ())


def _check_quant(proj: str, quant: dict, names: set[str]) -> None:
    missing = [k for k in ("bits", "group_size", "mode") if k not in quant]
    if missing:
        raise StoreError(f"quant of {proj} has no {', '.join(missing)}")
    for part in quant_parts(quant):
        if f"{proj}.{part}" not in names:
            raise StoreError(f"tensor {proj}.{part} is missing (its {quant['mode']} "
                             "quantization needs it)")


def _span_lengths(entry: PrecisionEntry) -> list[int]:
    """The length every record's spans must have: each span holds its tensors back to back
    (at most ``SMALL_ALIGN`` bytes of padding before each), so a tensor whose dtype or shape
    is wrong leaves a gap, an overlap or a span of another length."""
    names = set()
    for t in entry.tensors:
        if t.name in names:
            raise StoreError(f"tensor {t.name} is listed twice")
        names.add(t.name)
        if t.dtype not in DTYPE_ITEMSIZE:
            raise StoreError(f"tensor {t.name} has unknown dtype {t.dtype!r}")
        if min(t.shape, default=0) < 0 or t.span < 0 or t.offset < 0:
            raise StoreError(f"tensor {t.name} has a negative shape, span or offset")
        if t.name.rpartition(".")[0] not in entry.quant:
            raise StoreError(f"tensor {t.name} has no quantization under 'quant'")
    for proj, quant in entry.quant.items():
        _check_quant(proj, quant, names)
    if not entry.tensors:
        raise StoreError("no tensors")
    lengths = []
    for span in range(max(t.span for t in entry.tensors) + 1):
        end, before = 0, None
        for t in sorted((t for t in entry.tensors if t.span == span), key=lambda t: t.offset):
            if t.offset < end:
                raise StoreError(f"tensors {before} and {t.name} overlap in span {span}")
            if t.offset - end >= SMALL_ALIGN:
                raise StoreError(f"bytes {end}..{t.offset} of span {span} (before {t.name}) "
                                 "hold no tensor: a tensor's dtype or shape is wrong")
            end, before = t.offset + t.nbytes, t.name
        if before is None:
            raise StoreError(f"span {span} holds no tensor")
        lengths.append(end)
    return lengths


def _check_records(records: list[Record], lengths: list[int], num_experts: int,
                   num_files: int) -> None:
    """One record per expert, each span in a listed file, at a real offset, as long as the
    layout's tensors (``lengths``, from ``_span_lengths``)."""
    if len(records) != num_experts:
        raise StoreError(f"{len(records)} records, needs {num_experts} (one per expert)")
    for expert, rec in enumerate(records):
        if len(rec.spans) != len(lengths) or len(rec.crc32) != len(rec.spans):
            raise StoreError(f"record {expert} has {len(rec.spans)} spans and "
                             f"{len(rec.crc32)} checksums, the tensors need {len(lengths)}")
        for span, (f, offset, length) in enumerate(rec.spans):
            if not 0 <= f < num_files:
                raise StoreError(f"record {expert} names file {f}, the manifest lists "
                                 f"{num_files} (0..{num_files - 1})")
            if offset < 0:
                raise StoreError(f"record {expert} starts at byte {offset}")
            if not 0 <= length - lengths[span] < SMALL_ALIGN:
                raise StoreError(f"record {expert} span {span} is {length} bytes, its tensors "
                                 f"take {lengths[span]}: a tensor's dtype or shape is wrong")


WEIGHT_INDEX = "model.safetensors.index.json"


def read_config_json(path: Path, error: type[Exception]) -> dict:
    """A checkpoint's config.json as a dict; ``error`` (the caller's kind) names the file when
    it is not JSON, or not a JSON object."""
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise error(f"{path}: not a model configuration (a JSON {type(config).__name__}, not "
                    "an object)")
    return config


def checkpoint_weight_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files that hold a checkpoint's weights: those its
    ``model.safetensors.index.json`` names when it has one (a sharded hub checkpoint always
    does), each of which must exist; else mlx-lm's own rule, ``model*.safetensors``. Other
    safetensors files (``adapters.safetensors``, a Mistral-format ``consolidated.safetensors``)
    are not the model's. Raises StoreError naming the files an index names that are missing."""
    model_dir = Path(model_dir)
    index = model_dir / WEIGHT_INDEX
    if index.is_file():
        try:
            names = sorted({str(n) for n in json.loads(index.read_text())["weight_map"].values()})
        except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError,
                AttributeError) as e:
            raise StoreError(f"{index}: not a valid weight index ({type(e).__name__}: {e}); "
                             "download it again, or delete it to read model*.safetensors") from None
        if names:
            missing = [n for n in names if not (model_dir / n).is_file()]
            if missing:
                shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more"
                                                  if len(missing) > 3 else "")
                verb = "is" if len(missing) == 1 else "are"
                raise StoreError(f"{shown} named in {index} {verb} missing from {model_dir} "
                                 "(incomplete download?): download the checkpoint again")
            return [model_dir / n for n in names]
    return sorted(model_dir.glob("model*.safetensors"))


def file_stamp(path: str | Path) -> dict:
    """What a referenced file must still be at load: its size and modification time."""
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def reconvert_command(model_dir: Path, manifest: Manifest) -> str:
    """The command that rebuilds the store, its paths quoted for a shell."""
    src = shlex.quote(manifest.source) if manifest.source else "SRC"
    adapter = (f" --adapter-path {shlex.quote(manifest.adapter['path'])}" if manifest.adapter
               else "")
    return f"python -m convert {src} {shlex.quote(str(model_dir))}{adapter} --force"


def check_references(model_dir: Path, manifest: Manifest) -> None:
    """A store read in place is only as good as its source: fail, naming the file and the
    command that rebuilds the store, when a referenced file is gone or is not the one converted
    (the per-record checksums would catch changed bytes only once read, mid-generation)."""
    for path, want in manifest.references.items():
        how = f"reconvert with `{reconvert_command(model_dir, manifest)}`"
        if not os.path.isfile(path):
            raise StoreError(f"{path}: this model reads its source checkpoint in place and the "
                             f"file is missing (moved or deleted); {how}")
        have = file_stamp(path)
        if have != {"size": int(want["size"]), "mtime_ns": int(want["mtime_ns"])}:
            raise StoreError(f"{path}: this model reads its source checkpoint in place and the "
                             f"file has changed since it was converted (size {want['size']} -> "
                             f"{have['size']}, mtime_ns {want['mtime_ns']} -> {have['mtime_ns']}); "
                             f"{how}")


def checksum_error(model_dir: Path, manifest: Manifest, span: tuple[int, int, int]) -> StoreError:
    """A span whose bytes are not the ones converted: in a file read in place, the source
    checkpoint changed (keeping its size and time, which its stamp cannot see); in the
    store's own files, the store is corrupt. Either way the error says how to rebuild it."""
    file_idx, offset, length = span
    rel = manifest.files[file_idx]
    what = ("the source checkpoint this model reads in place has changed since it was converted"
            if rel in manifest.references else "the expert store is corrupt")
    return StoreError(f"{Path(model_dir) / rel}: checksum mismatch in bytes {offset}.."
                      f"{offset + length} ({what}; reconvert with "
                      f"`{reconvert_command(Path(model_dir), manifest)}`)")


def check_store_files(model_dir: Path, manifest: Manifest) -> None:
    """Catch missing or truncated store files up front, naming the file and the sizes."""
    check_references(model_dir, manifest)
    needed = [0] * len(manifest.files)
    for layer in manifest.layers:
        for entry in layer.precisions.values():
            for rec in entry.records:
                for f, off, n in rec.spans:
                    needed[f] = max(needed[f], off + n)
    for i, rel in enumerate(manifest.files):
        path = model_dir / rel
        if not path.is_file():
            raise StoreError(f"{path}: expert store file is missing")
        size = path.stat().st_size
        if size < needed[i]:
            raise StoreError(f"{path}: expert store file is truncated ({size} bytes, "
                             f"the manifest needs {needed[i]})")


def align_up(n: int, page: int = PAGE_SIZE) -> int:
    return (n + page - 1) // page * page


SMALL_ALIGN = 64  # tensor alignment inside a record (and between small records)


def record_alignment(nbytes: int) -> int:
    """Where records of ``nbytes`` start when disk matters (a store by reference): on a page when
    the padding costs at most 1/32 of a record, else on 4 KiB or 64 bytes (tiny models' records
    are a few KiB, and padding each to 16 KiB would more than double the store)."""
    for align in (PAGE_SIZE, 4096):
        if nbytes >= 32 * align:
            return align
    return SMALL_ALIGN


def read_safetensors_header(path: str | Path) -> tuple[int, dict[str, dict]]:
    """(data section start, {tensor name: {"dtype", "shape", "data_offsets"}}) of a safetensors
    file, reading only its header."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise StoreError(f"{path}: not a safetensors file (shorter than its length prefix)")
        n = int.from_bytes(head, "little")
        if n > 100 * 2**20:
            raise StoreError(f"{path}: not a safetensors file (header length {n})")
        try:
            meta = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise StoreError(f"{path}: safetensors header is not valid JSON ({e})") from None
    meta.pop("__metadata__", None)
    return 8 + n, meta


def safetensors_header(tensors: dict[str, tuple[str, tuple[int, ...], int, int]],
                       page: int = PAGE_SIZE) -> tuple[bytes, int]:
    """Build a safetensors header padded so the data section starts on a page boundary.

    ``tensors`` maps name -> (dtype, shape, begin, end) with offsets relative to the data section.
    Returns (header bytes including the 8-byte length prefix, data section start).
    """
    meta: dict[str, Any] = {"__metadata__": {"format": FORMAT_NAME}}
    for name, (dtype, shape, begin, end) in tensors.items():
        meta[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}
    body = json.dumps(meta, separators=(",", ":")).encode()
    data_start = align_up(8 + len(body), page)
    body = body + b" " * (data_start - 8 - len(body))
    return len(body).to_bytes(8, "little") + body, data_start
