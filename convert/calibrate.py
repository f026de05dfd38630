"""A converted model's 2-bit copies quantized again against the inputs its experts see.

    python -m convert.calibrate MODEL_DIR [--text FILE ...] [--tokens 16384] [--memory-budget 8GB]

The model runs text (the files given, else Python's own standard library) in exact mode under
the memory budget, and each projection's inputs are summed into ``H = sum x x^T`` per expert
(``InputStatistics``; the layer calls tell it which expert each pool slot holds). Then each
layer's low copies are quantized by GPTQ against those sums (``calibrated_quant``) from the 4-bit
copies, written into new files, and the manifest is switched to them in one rename
(``low_rounding: "calibrated"``); the old files go after. Same format and bytes per expert: the
runtime reads them as before.

The sums take ``experts x in^2`` floats per projection input and layer (Qwen3-30B-A3B: 2.4 GB a
layer; Mixtral-8x7B: 7.1 GB), within ``--statistics-memory`` (a layer's that do not fit are
refused before anything runs). A decoder ``layer_major`` drives runs the text a layer at a time,
each layer refitted before the next starts; another runs whole, once per group of layers whose
sums fit.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import sysconfig
from pathlib import Path

import mlx.core as mx
import numpy as np
from tqdm import tqdm

from hobbit_mlx.pools import resident_dtype
from hobbit_mlx.reader import RecordReader
from hobbit_mlx.store import (CALIBRATED_ROUNDING, DTYPE_ITEMSIZE, STORE_DIR, PrecisionEntry,
                              StoreError, is_float, load_manifest)

from .calibrated_quant import calibrated_quantize, inverse_factor
from .errors import ConversionError
from .experts import _LayerWriter, _to_numpy

DEFAULT_TOKENS = 16384
SEQUENCE_TOKENS = 512  # tokens per calibration sequence (each a prompt of its own)
STATISTICS_MEMORY = 4 << 30  # bytes of input sums held at once (layers gathered per pass)
REFIT_BYTES = 512 << 20  # the GPTQ factors (float32) of the experts refitted at once


class InputStatistics:
    """Each projection's ``sum x x^T`` per expert, over the inputs a layer call's run hands
    over (``see``) after ``begin`` said which expert each pool slot holds; projections fed the
    very same input array (a GLU's gate and up) share one sum."""

    def __init__(self, positions: set[int]):
        self.positions = positions
        self.position = -1
        self._expert_of: np.ndarray = np.zeros(0, dtype=np.int64)  # slot -> expert
        self.sums: dict[tuple[int, str, int], np.ndarray] = {}  # float32, (in, in)
        self.rows: dict[tuple[int, int], int] = {}  # (position, expert) -> inputs seen
        self.same_as: dict[tuple[int, str], str] = {}
        self._first: dict[int, str] = {}  # each position's first projection (counts the rows)
        self._last: tuple | None = None  # (input array, position, path) last summed

    def begin(self, position: int, experts: np.ndarray, slots: np.ndarray) -> None:
        """A run of layer ``position`` starts, expert ``experts[i]`` in slot ``slots[i]``."""
        self.position = position
        self._expert_of = np.full(int(slots.max()) + 1, -1, dtype=np.int64)
        self._expert_of[slots] = experts

    def see(self, path: str, x: mx.array, slots: mx.array) -> None:
        """A projection's input ``x``, one row per entry of ``slots`` (the pool slot it runs)."""
        position = self.position
        if position not in self.positions or (position, path) in self.same_as:
            return
        if self._last is not None and self._last[0] is x and self._last[1] == position:
            self.same_as[(position, path)] = self._last[2]
            return
        experts = self._expert_of[np.array(slots).reshape(-1)]
        rows = np.array(x.reshape(-1, x.shape[-1]).astype(mx.float32))
        if rows.shape[0] != len(experts) or (experts < 0).any():
            raise RuntimeError(f"calibration: {rows.shape[0]} inputs for {len(experts)} slots "
                               f"of layer {position} ({path})")
        first = self._first.setdefault(position, path) == path
        order = np.argsort(experts, kind="stable")
        ids, starts = np.unique(experts[order], return_index=True)
        for e, part in zip(ids.tolist(), np.split(order, starts[1:])):
            mine = rows[part]
            key = (position, path, e)
            add = mine.T @ mine
            if key in self.sums:
                self.sums[key] += add
            else:
                self.sums[key] = add
            if first:
                self.rows[(position, e)] = self.rows.get((position, e), 0) + len(part)
        self._last = (x, position, path)

    def input_of(self, position: int, path: str) -> str:
        """The projection whose sum ``path``'s input shares (itself if none)."""
        return self.same_as.get((position, path), path)

    def hessian(self, position: int, path: str, e0: int, e1: int, n: int) -> np.ndarray:
        """Experts e0..e1's sums, (e1 - e0, n, n) float32: zero for an expert that saw no
        input."""
        path = self.input_of(position, path)
        out = np.zeros((e1 - e0, n, n), dtype=np.float32)
        for e in range(e0, e1):
            s = self.sums.get((position, path, e))
            if s is not None:
                out[e - e0] = s
        return out


def default_texts(chars: int, per_file: int = 8000) -> list[str]:
    """About ``chars`` characters of Python's own standard library (code and its docstrings),
    which every machine running this has: the first ``per_file`` of each module in sorted
    order, so that many modules take part."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts, total = [], 0
    for path in sorted(root.glob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        texts.append(text[:per_file])
        total += len(texts[-1])
        if total >= chars:
            break
    if not texts:
        raise ConversionError(f"no calibration text: {root} holds no Python files; pass --text")
    return texts


def calibration_sequences(tokenizer, texts: list[str], tokens: int, length: int) -> list[list[int]]:
    """Sequences of up to ``length`` tokens cut from the texts in turn, ``tokens`` in all."""
    out, total = [], 0
    for text in texts:
        ids = list(tokenizer.encode(text))
        for i in range(0, len(ids), length):
            piece = ids[i:i + length][:tokens - total]
            if len(piece) >= 2:
                out.append(piece)
                total += len(piece)
            if total >= tokens:
                return out
    return out


def statistics_bytes(manifest, position: int) -> int:
    """What one layer's input sums take: experts x in^2 float32 per distinct projection input
    width (a GLU's gate and up share one input)."""
    layer = manifest.layers[position]
    widths = {_in_dim(layer.precisions["low"], path) for path in _paths(layer.precisions["low"])}
    return layer.num_experts * sum(n * n for n in widths) * 4


def gather(model, sequences: list[list[int]], positions: set[int], *,
           progress: bool = True) -> InputStatistics:
    """Run the sequences through a model ``hobbit_mlx.load`` made in exact mode, summing the
    inputs of the layers at ``positions``."""
    from hobbit_mlx.loader import runtime_of
    from mlx_lm.models.cache import make_prompt_cache

    rt = runtime_of(model)
    stats = InputStatistics(positions)
    try:
        rt.calibration = stats
        for seq in tqdm(sequences, desc="calibration text", unit="seq", disable=not progress):
            rt.new_sequence(0, len(seq), 0)
            mx.eval(model(mx.array(seq)[None], cache=make_prompt_cache(model)))
    finally:
        rt.calibration = None
    return stats


def gather_layer_by_layer(model, sequences: list[list[int]], positions: set[int], *,
                          progress: bool = True):
    """The sums one decoder layer at a time (``layer_major``'s drive: every sequence passes a
    layer before any enters the next, their hidden states held between layers): yields each
    layer's ``InputStatistics`` (empty for a layer without routed experts), so the text is run
    once and only one layer's sums are held."""
    from hobbit_mlx.layer_major import decoder_of, one_layer_at_a_time
    from hobbit_mlx.loader import runtime_of
    from mlx_lm.models.cache import KVCache

    rt = runtime_of(model)
    inner = decoder_of(model)
    tokens = [mx.array(seq)[None] for seq in sequences]
    hidden = [inner.embed_tokens(t) for t in tokens]
    mx.eval(hidden)
    with one_layer_at_a_time(model) as run:
        for layer in tqdm(list(inner.layers), desc="calibration", unit="layer",
                          disable=not progress):
            stats = InputStatistics(positions)
            rt.calibration = stats
            try:
                for i, t in enumerate(tokens):
                    hidden[i] = run(layer, hidden[i], t, KVCache())
                    mx.eval(hidden[i])
            finally:
                rt.calibration = None
            yield stats


def experts_at_once(input_widths) -> int:
    """How many experts' refits go together: their GPTQ factors (one per distinct projection
    input width, float32) within ``REFIT_BYTES``; more at once means fewer rounding steps."""
    return max(1, REFIT_BYTES // (4 * sum(n * n for n in input_widths)))


def refit_layer(model_dir: Path, manifest, position: int, stats: InputStatistics, reader,
                rel: str, file_index: int) -> list:
    """One layer's low copies quantized against ``stats`` from its 4-bit copies, written to
    ``rel``; returns the new records."""
    layer = manifest.layers[position]
    high, low = layer.precisions["high"], layer.precisions["low"]
    experts = layer.num_experts
    highs = [_stored_tensors(reader, high, e) for e in range(experts)]
    fitted = [path for path in _paths(low) if not is_float(low.quant[path])
              and low.quant[path].get("mode", "affine") == "affine"]  # (others kept as they are)
    source = {path: stats.input_of(position, path) for path in fitted}  # a GLU's gate and up: one
    widths = {source[path]: _in_dim(low, path) for path in fitted}
    dtypes = {path: resident_dtype(next(t for t in low.tensors if t.name == f"{path}.scales"),
                                   None) for path in fitted}  # (the scales' dtype: the weights')
    step = experts_at_once(widths.values())
    parts = {path: [] for path in fitted}
    for e0 in range(0, experts, step):
        e1 = min(experts, e0 + step)
        factors = {name: inverse_factor(stats.hessian(position, name, e0, e1, n))
                   for name, n in widths.items()}
        for path in fitted:
            quant = low.quant[path]
            w = mx.stack([_weights(h, high, path) for h in highs[e0:e1]]).astype(dtypes[path])
            parts[path].append(calibrated_quantize(w, factors[source[path]], quant["group_size"],
                                                   quant["bits"]))
    new = {}
    for path in fitted:
        for name, *chunks in zip(("weight", "scales", "biases"), *parts[path]):
            new[f"{path}.{name}"] = mx.concatenate(chunks)
    layout = {t.name: (t.dtype, t.shape) for t in low.tensors}
    writer = _LayerWriter(model_dir / rel, experts, layout, compact=bool(manifest.references))
    if [(t.name, t.dtype, t.shape) for t in writer.layout] != \
            [(t.name, t.dtype, t.shape) for t in low.tensors]:
        os.close(writer.fd)
        raise ConversionError(f"layer {layer.layer}: the low copies' layout cannot be rewritten")
    kept = [t for t in low.tensors if t.name not in new]  # (a bias, a float projection)
    try:
        for e in range(experts):
            old = _stored_tensors(reader, low, e) if kept else {}
            for t in low.tensors:
                writer.write(e, t.name, old[t.name] if t in kept else _to_numpy(new[t.name][e]))
    except BaseException:
        os.close(writer.fd)
        raise
    return writer.finish(file_index)


def calibrate(model_dir: str | Path, *, texts: list[str] | None = None,
              tokens: int = DEFAULT_TOKENS, memory_budget=None,
              statistics_memory: int = STATISTICS_MEMORY, progress: bool = True) -> dict:
    """Quantize a hobbit model's low copies against its experts' inputs on ``texts``, in
    place: a hobbit model directory, or what ``load`` takes (a checkpoint, a hub id), whose
    conversion in the cache is then calibrated (made first if need be). Returns {"model" (the
    directory calibrated), "tokens", "passes", "experts_seen", "experts"}."""
    import hobbit_mlx
    from hobbit_mlx.conversion_cache import resolve_model
    from hobbit_mlx.loader import runtime_of

    try:
        model_dir = resolve_model(model_dir, progress=progress)
        manifest = load_manifest(model_dir)
    except StoreError as e:
        raise ConversionError(str(e)) from None
    if any("low" not in l.precisions for l in manifest.layers):
        raise ConversionError(f"{model_dir}: its experts have no low-precision copy to calibrate")
    held = max(statistics_bytes(manifest, p) for p in range(len(manifest.layers)))
    if held > statistics_memory:  # (before the model is loaded and the text run)
        from hobbit_mlx.budget import format_size

        raise ConversionError(f"a layer's input sums take {format_size(held)}, more than the "
                              f"{format_size(statistics_memory)} allowed for them: allow more "
                              "(--statistics-memory) if this machine has the memory")
    model, tokenizer = hobbit_mlx.load(str(model_dir), exact=True, memory_budget=memory_budget,
                                       progress=False)
    try:
        return _calibrate(model, tokenizer, model_dir, manifest, texts, tokens,
                          statistics_memory, progress)
    finally:
        runtime_of(model).close()


def _calibrate(model, tokenizer, model_dir: Path, manifest, texts, tokens: int,
               statistics_memory: int, progress: bool) -> dict:
    from hobbit_mlx.layer_major import decoder_of
    from hobbit_mlx.loader import runtime_of

    if texts is None:
        texts = default_texts(tokens * 6)
    rt = runtime_of(model)  # (sequences no longer than the prompt chunks the budget planned)
    sequences = calibration_sequences(tokenizer, texts, tokens,
                                      min(SEQUENCE_TOKENS, rt.prefill_step_size))
    if not sequences:
        raise ConversionError("the calibration text holds no tokens")
    positions = set(range(len(manifest.layers)))
    if decoder_of(model) is not None:  # one run of the text, a layer at a time
        rt.new_sequence(0, max(map(len, sequences)), 0)
        runs = gather_layer_by_layer(model, sequences, positions, progress=progress)
        passes = 1
    else:  # a run of the text per group of layers whose sums fit in statistics_memory
        groups = _layer_groups(manifest, statistics_memory)
        runs = (gather(model, sequences, set(g), progress=progress) for g in groups)
        passes = len(groups)

    tag = secrets.token_hex(4)
    files = list(manifest.files)
    written = []
    seen = 0
    reader = RecordReader(model_dir, manifest)
    try:
        for stats in runs:
            for position in sorted({p for p, _ in stats.rows}):
                layer = manifest.layers[position]
                low = layer.precisions["low"]
                index = low.records[0].spans[0][0]
                if any(span[0] != index for r in low.records for span in r.spans):
                    raise ConversionError(f"layer {layer.layer}: its 2-bit copies are not in one "
                                          "file of this store (made by another converter?)")
                rel = f"{STORE_DIR}/low/layer_{layer.layer:03d}.{tag}.safetensors"
                written.append(model_dir / rel)
                low.records = refit_layer(model_dir, manifest, position, stats, reader, rel,
                                          index)
                files[index] = rel
                seen += sum(1 for e in range(layer.num_experts) if stats.rows.get((position, e)))
    except BaseException:
        reader.close()
        for path in written:
            path.unlink(missing_ok=True)
        raise
    reader.close()
    old = [model_dir / f for f, g in zip(manifest.files, files) if f != g]
    manifest.files = files
    manifest.low_rounding = CALIBRATED_ROUNDING
    manifest.save(model_dir)  # (one rename: the old files or the new, never a mix)
    for path in old:
        path.unlink(missing_ok=True)
    return {"model": model_dir, "tokens": sum(map(len, sequences)), "passes": passes,
            "experts_seen": seen, "experts": sum(l.num_experts for l in manifest.layers)}


def _layer_groups(manifest, statistics_memory: int) -> list[list[int]]:
    """Layer positions in groups whose input sums fit in ``statistics_memory`` (one at least)."""
    groups, group, held = [], [], 0
    for position in range(len(manifest.layers)):
        size = statistics_bytes(manifest, position)
        if group and held + size > statistics_memory:
            groups.append(group)
            group, held = [], 0
        group.append(position)
        held += size
    return groups + [group]


def _paths(entry: PrecisionEntry) -> list[str]:
    return sorted(entry.quant)


def _in_dim(entry: PrecisionEntry, path: str) -> int:
    t = next(t for t in entry.tensors if t.name == f"{path}.weight")
    quant = entry.quant[path]
    if is_float(quant):
        return t.shape[-1]
    return t.shape[-1] * DTYPE_ITEMSIZE[t.dtype] * 8 // quant["bits"]


def _stored_tensors(reader, entry: PrecisionEntry, expert: int) -> dict[str, np.ndarray]:
    """One expert's tensors at one precision: their bytes as stored."""
    spans = reader.read_bytes(entry.records[expert])
    return {t.name: spans[t.span][t.offset:t.offset + t.nbytes] for t in entry.tensors}


def _weights(stored: dict[str, np.ndarray], entry: PrecisionEntry, path: str) -> mx.array:
    """One expert's float weights of one projection (its 4-bit copy dequantized)."""
    arrays = {t.name.rpartition(".")[2]: mx.array(stored[t.name]).view(resident_dtype(t, None))
              .reshape(t.shape) for t in entry.tensors if t.name.rpartition(".")[0] == path}
    quant = entry.quant[path]
    if is_float(quant):
        return arrays["weight"].astype(mx.float32)
    return mx.dequantize(arrays["weight"], arrays["scales"], arrays.get("biases"),
                         group_size=quant["group_size"], bits=quant["bits"],
                         mode=quant.get("mode", "affine")).astype(mx.float32)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m convert.calibrate",
        description="Quantize a hobbit model's 2-bit expert copies again, against the inputs its "
                    "experts see on some text (GPTQ): less error where it counts, same bytes.")
    parser.add_argument("model", help="a hobbit model directory (python -m convert's output), or "
                                      "a checkpoint or hub id as load takes it: its conversion "
                                      "in the cache is calibrated")
    parser.add_argument("--text", action="append", default=None, metavar="FILE",
                        help="calibration text, like what the model will run (repeatable; "
                             "default: Python's standard library sources)")
    parser.add_argument("--tokens", type=int, default=DEFAULT_TOKENS,
                        help=f"calibration tokens (default {DEFAULT_TOKENS})")
    parser.add_argument("--memory-budget", default=None,
                        help="memory budget for running the model (as load's; default: load's)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--statistics-memory", default="4GB",
                        help="memory for the input sums (experts x in^2 floats per projection "
                             "input and layer): one layer's must fit; where the model runs whole "
                             "(not a layer at a time), layers beyond it take another pass over "
                             "the text (default 4GB)")
    args = parser.parse_args(argv)
    from hobbit_mlx.budget import parse_size

    try:
        if args.tokens < 2:
            raise ConversionError(f"--tokens {args.tokens}: at least 2")
        texts = None
        if args.text:
            texts = []
            for f in args.text:
                try:
                    texts.append(Path(f).expanduser().read_text(encoding="utf-8", errors="replace"))
                except OSError as e:
                    raise ConversionError(f"cannot read {f}: {e.strerror}") from None
        done = calibrate(args.model, texts=texts, tokens=args.tokens,
                         memory_budget=args.memory_budget,
                         statistics_memory=parse_size(args.statistics_memory),
                         progress=not args.quiet)
    except (ConversionError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"[calibrate] {done['model']}: 2-bit copies fitted to {done['tokens']} tokens of text "
          f"({done['experts_seen']} of {done['experts']} experts saw some; the others keep "
          f"the fitted rounding), {done['passes']} pass(es)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
