"""Patching mlx-lm's MoE modules: each routed-expert switch module becomes an offloaded one.

``OffloadedSwitch`` keeps the original mlx-lm switch module (``SwitchGLU``, ``SwitchMLP``, ...) but
empties its projections: for each call it learns which experts the router chose (one host sync
on the indices), makes them resident through the cache (misses are read by the I/O pool in
parallel), stacks just those experts and runs the original module on them with the indices
renumbered. Running mlx-lm's own code on the same quantized bytes is what keeps exact mode
bit-equal to mlx-lm with everything resident.

Prefetch: the same host sync also brings the gate weights (mixed precision) and the next layers'
routers applied to this layer's gate input; the predicted experts that are not resident are read
in the background (their own queue) and held (see ``cache``) from the read until their layer has
run; so are the predicted experts that are resident already.

A prompt chunk is grouped by expert: every expert the chunk needs in a layer is read once, and
``gather_qmm`` runs each expert over all tokens routed to it. When a chunk needs more experts than
the working set allows, they are processed in groups whose partial outputs are summed.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field, fields

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.switch_layers import QuantizedSwitchLinear

from .architectures import SWITCH_LINEAR_TYPES, switch_linear_paths
from .cache import ExpertCache
from .precision import DROP, HIGH, LOW, PrecisionOptions, demote_unpopular, plan_slots
from .reader import RecordReader
from .routing import (StackedGates, find_router, gate_weights, normalized, predictions_from,
                      router_logits, tap_router, top_predictions, untapped_call)
from .store import LayerEntry, Manifest, PrecisionEntry
from .widths import AdaptiveWidth


@dataclass
class OffloadStats:
    """Counters since the last reset. A request is one (layer, expert) a layer call needs."""

    expert_requests: int = 0
    hits_high: int = 0
    hits_low: int = 0
    misses_high: int = 0
    misses_low: int = 0
    skipped: int = 0
    hits_in_flight: int = 0  # hits whose prefetch read was still running: served, but waited for
    bytes_read: int = 0
    prefetch_issued: int = 0
    prefetch_used: int = 0
    prefetch_bytes: int = 0
    prefetch_by_distance: dict = field(default_factory=dict)  # distance -> (issued, used)
    prediction_correct: int = 0  # predicted experts (one layer ahead) the router then chose
    prediction_total: int = 0  # experts the router chose where a prediction was made
    # distance -> (predicted experts chosen, experts chosen, experts predicted)
    prediction_by_distance: dict = field(default_factory=dict)
    little_tokens: int = 0
    routed_tokens: int = 0
    layer_calls: int = 0
    host_syncs: int = 0
    read_wait_s: float = 0.0

    def reset(self) -> None:
        for f in fields(self):
            setattr(self, f.name, type(getattr(self, f.name))())


def _empty_projection() -> QuantizedSwitchLinear:
    """A QuantizedSwitchLinear with no arrays: each call lends it the stacked experts it needs."""
    proj = QuantizedSwitchLinear.__new__(QuantizedSwitchLinear)
    nn.Module.__init__(proj)
    proj.group_size, proj.bits, proj.mode, proj.global_scale = 64, 4, "affine", None
    return proj


class OffloadRuntime:
    """What every offloaded layer of one model shares: store reader, cache, stats, options."""

    def __init__(self, manifest: Manifest, reader: RecordReader, cache: ExpertCache, *,
                 dtype: mx.Dtype | None, working_set_bytes: int,
                 precision: PrecisionOptions | None = None, prefetch_layers: int = 0,
                 scoring: str = "softmax", overlap_io: bool = True,
                 float_itemsize: int | None = None, prefetch_low_precision: bool = False,
                 prefetch_width: int | None = None, gate_stacks: dict | None = None,
                 prefill_low_precision: float = 0.0, widths: AdaptiveWidth | None = None):
        self.manifest = manifest
        self.reader = reader
        self.cache = cache
        self.dtype = dtype
        self.working_set_bytes = working_set_bytes
        self.precision = precision or PrecisionOptions()
        self.prefetch_layers = prefetch_layers
        self.scoring = scoring
        self.overlap_io = overlap_io
        self.float_itemsize = float_itemsize
        self.prefetch_low_precision = prefetch_low_precision
        self.prefetch_width = prefetch_width or manifest.experts_per_token
        self.widths = widths  # per-layer widths that reach a target recall (else the fixed one)
        self.gate_stacks: dict[int, StackedGates] = gate_stacks or {}
        self.prefill_low_precision = prefill_low_precision
        self.stats = OffloadStats()
        self.layers: list[OffloadedSwitch] = []
        self.trace: list | None = None  # when a list: (layer, indices [N, k], weights [N, k])
        self._inflight: dict[tuple, Future] = {}
        # layer -> {key: distance}: prefetches issued for the layer's next call, held until it runs
        self._issued: dict[int, dict] = {}
        self._predicted: dict[int, dict[int, set]] = {}  # layer -> {distance: predicted experts}
        # layer -> resident experts predicted for its next call, held until it runs
        self._held: dict[int, list] = {}
        self._logits: dict[int, dict[int, np.ndarray]] = {}  # layer -> {distance: logits}
        self._lock = threading.Lock()
        self.on_layer = getattr(cache.policy, "on_layer", None)
        # What load() decided, for stats and the generate wrappers (see describe()).
        self.plan = None
        self.model_dir = None
        self.kv_bytes_per_token = 0
        self.prefill_step_size = 512

    def describe(self, *, plan, model_dir, kv_bytes_per_token: int, prefill_step_size: int) -> None:
        """Record the budget plan and the model facts load() measured."""
        self.plan, self.model_dir = plan, model_dir
        self.kv_bytes_per_token, self.prefill_step_size = kv_bytes_per_token, prefill_step_size

    def new_sequence(self) -> None:
        """Per-sequence statistics (HOBBIT's frequency factors) start again."""
        with self.cache.lock:
            self.cache.policy.reset()

    def _count(self, precision: str, hits: int, misses: int) -> None:
        if precision == "high":
            self.stats.hits_high += hits
            self.stats.misses_high += misses
        else:
            self.stats.hits_low += hits
            self.stats.misses_low += misses

    def begin_fetch(self, layer: LayerEntry, experts, precision: str = "high") -> "Fetch":
        """Pin the experts, take the resident ones, and start reading the rest (in parallel)."""
        return Fetch(self, layer, experts, precision)

    def has_or_reading(self, layer: int, expert: int, precision: str) -> bool:
        """Resident, or a prefetch is reading it now."""
        key = (layer, expert, precision)
        if key in self.cache:
            return True
        with self._lock:
            return key in self._inflight

    # --- prefetch -------------------------------------------------------------------------
    def predictions_after(self, layer_pos: int, gate_input: mx.array) -> list[tuple]:
        """The next layers' routers applied to this layer's gate input, lazily (the caller
        evaluates them with its own indices): [(distance, layer, router output)], skipping
        layers that are fully resident (they cannot miss)."""
        targets = []
        for distance in range(1, self.prefetch_layers + 1):
            target = layer_pos + distance
            if target >= len(self.layers) or self.layers[target].router is None:
                break
            switch = self.layers[target]
            if self.cache.resident_in_layer(switch.layer.layer) < switch.layer.num_experts:
                targets.append((distance, switch))
        if not targets:
            return []
        stack = self.gate_stacks.get(layer_pos)
        stacked = stack(gate_input) if stack is not None else None  # one matmul for all of them
        return [(d, s, stacked[d - 1] if stacked is not None else untapped_call(s.router, gate_input))
                for d, s in targets]

    def prefetch(self, predictions: list[tuple]) -> None:
        """Start reading the predicted experts that are not resident, nearest layer first."""
        for distance, switch, out in predictions:
            logits = router_logits(out) if self.widths is not None else None
            if logits is None:
                ind, weights = predictions_from(out, self.prefetch_width)
            else:  # the width this layer needs; its router's choice will say how well it did
                self._logits.setdefault(switch.position, {})[distance] = logits
                ind, weights = top_predictions(logits, self.widths.width(switch.position, distance))
            self._issue_prefetch(switch, distance, ind, weights)

    def observe_choice(self, position: int, chosen: np.ndarray) -> None:
        """A layer's router chose: score the predictions made for it (widths learn from it)."""
        for distance, logits in self._logits.pop(position, {}).items():
            if len(logits) == len(chosen):
                self.widths.observe(position, distance, logits, chosen)

    def _issue_prefetch(self, switch: "OffloadedSwitch", distance: int, ind: np.ndarray,
                        weights: np.ndarray) -> None:
        experts, precisions = self._prefetch_plan(ind, weights)
        lid = switch.layer.layer
        self._predicted.setdefault(switch.position, {})[distance] = set(experts.tolist())
        for e, precision in zip(*self._hold_resident(lid, experts, precisions)):
            key = (lid, e, precision)
            entry = switch.layer.precisions[precision]
            with self._lock:
                if key in self._inflight:
                    continue
                issued = self._issued.setdefault(lid, {})
                if key not in issued:  # (issued before from farther away, but it found no room)
                    # Held from now until its layer runs (a hold may precede residency), so a
                    # read that lands after that call leaves no stale hold behind.
                    self.cache.hold([key])
                    issued[key] = distance
                fut = self.reader.submit(entry, e, self.dtype, background=True)
                self._inflight[key] = fut
            self.stats.prefetch_issued += 1
            fut.add_done_callback(lambda f, key=key, n=entry.records[e].nbytes:
                                  self._prefetch_done(key, f, n))

    def _hold_resident(self, lid: int, experts: np.ndarray, precisions: list) -> tuple[list, list]:
        """Hold the predicted experts that are resident (the 4-bit copy, or the copy planned)
        until layer ``lid`` runs, so bringing in other predictions (LRU evicts the layer that
        comes next) cannot evict one only to read it again. Returns those still to read."""
        to_read, to_read_precisions, held = [], [], []
        with self.cache.lock:  # one lock for the whole prediction
            for e, precision in zip(experts.tolist(), precisions):
                high = (lid, e, "high")
                key = high if high in self.cache else (lid, e, precision)
                if key in self.cache:
                    held.append(key)
                else:
                    to_read.append(e)
                    to_read_precisions.append(precision)
            self.cache.hold(held)
        self._held.setdefault(lid, []).extend(held)
        return to_read, to_read_precisions

    def _prefetch_plan(self, ind: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, list[str]]:
        """Predicted experts, and the copy to prefetch. With ``prefetch_low_precision`` (and mixed
        precision on) an uncertain or unimportant prediction is read in 2-bit: one that no token
        predicts among its top-k with HOBBIT importance (unimportance <= t1). That bounds the
        cost of a wrong or low-value guess."""
        experts = np.unique(ind)
        if not (self.precision.mixed_precision and self.prefetch_low_precision):
            return experts, ["high"] * len(experts)
        k = min(self.manifest.experts_per_token, ind.shape[-1])
        top_w = weights[:, :k] / weights[:, :k].sum(axis=-1, keepdims=True)
        level, _ = plan_slots(top_w, self.precision)
        important = set(int(e) for e in ind[:, :k][level == HIGH])
        return experts, ["high" if int(e) in important else "low" for e in experts]

    def _prefetch_done(self, key: tuple, fut: Future, nbytes: int) -> None:
        try:
            arrays = fut.result()
        except Exception:  # the demand path will read it again and report the error
            arrays = None
        if arrays is not None:
            with self._lock:  # this runs on an I/O thread
                self.stats.bytes_read += nbytes
                self.stats.prefetch_bytes += nbytes
            self.cache.put(key, arrays, prefetched=True)
        with self._lock:
            self._inflight.pop(key, None)

    def consume_prefetch(self, layer: int, needed: set) -> list:
        """A layer is about to run: count which of its prefetches are used. Returns the keys
        whose protection the caller releases once the layer's experts are pinned by its fetch."""
        with self._lock:
            issued = self._issued.pop(layer, {})
            available = {key for key in issued if key in self._inflight or key in self.cache}
        per_distance = self.stats.prefetch_by_distance
        for key, distance in issued.items():
            used = int(key[1] in needed and key in available)
            self.stats.prefetch_used += used
            n_issued, n_used = per_distance.get(distance, (0, 0))
            per_distance[distance] = (n_issued + 1, n_used + used)
        return list(issued) + self._held.pop(layer, [])

    def wait_idle(self) -> None:
        """Let outstanding prefetch reads finish (tests and benchmarks read stable counters)."""
        while True:
            with self._lock:
                futs = list(self._inflight.values())
            if not futs:
                return
            for f in futs:
                f.exception()
            time.sleep(0.001)

    def close(self) -> None:
        self.wait_idle()
        self.reader.close()
        self.cache.clear()


class Fetch:
    """One layer call's experts at one precision: hits at once, misses as reads in flight."""

    def __init__(self, rt: OffloadRuntime, layer: LayerEntry, experts, precision: str):
        self.rt, self.precision = rt, precision
        self.entry = layer.precisions[precision]
        self.keys = [(layer.layer, int(e), precision) for e in experts]
        self.pending: list = []  # (position, future, read on demand?)
        self.arrays = rt.cache.pin_and_get(self.keys)
        for i, key in enumerate(self.keys):
            if self.arrays[i] is not None:
                continue
            with rt._lock:
                fut = rt._inflight.get(key)
            if fut is not None:  # a prefetch is reading it already: wait for that read
                self.pending.append((i, fut, False))
            else:
                self.pending.append((i, rt.reader.submit(self.entry, key[1], rt.dtype), True))
        demand = sum(1 for p in self.pending if p[2])
        rt._count(precision, len(self.keys) - demand, demand)
        rt.stats.hits_in_flight += len(self.pending) - demand

    @property
    def resident(self) -> np.ndarray:
        """Positions of the experts that were resident when the fetch began."""
        return np.array([i for i, a in enumerate(self.arrays) if a is not None], dtype=np.int64)

    def finish(self) -> list[dict]:
        rt = self.rt
        if not self.pending:  # every expert was resident
            rt.cache.unpin(self.keys)
            return self.arrays
        t0 = time.perf_counter()
        try:
            for i, fut, is_demand in self.pending:
                self.arrays[i] = fut.result()
                if is_demand:
                    with rt._lock:  # prefetch threads add to the same counter
                        rt.stats.bytes_read += self.entry.records[self.keys[i][1]].nbytes
                    rt.cache.put(self.keys[i], self.arrays[i])
        finally:
            rt.stats.read_wait_s += time.perf_counter() - t0
            rt.cache.unpin(self.keys)
        return self.arrays


class OffloadedSwitch(nn.Module):
    """Drop-in replacement for an mlx-lm switch module whose experts live in the store."""

    def __init__(self, inner: nn.Module, layer: LayerEntry, position: int):
        super().__init__()
        for path in switch_linear_paths(inner):
            parent, _, name = path.rpartition(".")
            owner = inner if not parent else dict(inner.named_modules())[parent]
            setattr(owner, name, _empty_projection())
        self.inner = inner
        self._proj = {p: m for p, m in inner.named_modules() if isinstance(m, SWITCH_LINEAR_TYPES)}
        self.layer = layer
        self.position = position
        # The block's router: a reference, not a child (its weights stay where mlx-lm keeps them).
        object.__setattr__(self, "router", None)
        self._runtime: OffloadRuntime | None = None

    def _run(self, x: mx.array, local_indices: np.ndarray, experts: list[dict],
             entry: PrecisionEntry) -> mx.array:
        for t in entry.tensors:
            proj, _, attr = t.name.rpartition(".")
            self._proj[proj][attr] = mx.stack([e[t.name] for e in experts])
        for name, proj in self._proj.items():
            q = entry.quant[name]
            proj.bits, proj.group_size, proj.mode = q["bits"], q["group_size"], q["mode"]
        try:
            return self.inner(x, mx.array(local_indices.astype(np.uint32)))
        finally:
            for proj in self._proj.values():
                proj.clear()

    def _router_state(self) -> tuple:
        """(router input, router output) of this layer's call, when the router is tapped."""
        if self.router is None:
            return None, None
        return getattr(self.router, "_hobbit_in", None), getattr(self.router, "_hobbit_out", None)

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        rt = self._runtime
        opts = rt.precision
        gate_in, gate_out = self._router_state()
        want_weights = gate_out is not None and (opts.needs_weights or rt.trace is not None)
        lazy_weights = gate_weights(gate_out, indices, rt.scoring) if want_weights else None
        predictions = (rt.predictions_after(self.position, gate_in)
                       if rt.prefetch_layers and gate_in is not None else [])
        # The one host sync: which experts this call needs, their gate weights and the next
        # layers' predictions, all evaluated together.
        mx.eval([a for a in (indices, lazy_weights) if a is not None], [p[2] for p in predictions])
        idx = np.array(indices)
        rt.stats.host_syncs += 1
        rt.stats.layer_calls += 1
        if rt.on_layer is not None:
            rt.on_layer(self.layer.layer)
        k = idx.shape[-1]
        flat = idx.reshape(-1, k)
        weights = normalized(lazy_weights, flat.shape) if want_weights else None
        if rt.trace is not None:
            rt.trace.append((self.layer.layer, flat.copy(), None if weights is None else weights.copy()))
        if weights is not None and opts.needs_weights:
            level, scale = plan_slots(weights, opts)
        else:
            level, scale = np.zeros(flat.shape, np.int8), None
        if rt.prefill_low_precision and len(flat) > 1:
            level = demote_unpopular(flat, level, rt.prefill_low_precision)
        if opts.big_little:
            rt.stats.routed_tokens += len(flat)
            rt.stats.little_tokens += int((level == DROP).any(axis=-1).sum())

        parts = self._serve(flat, level)  # [(precision, experts array, slot mask)]
        needed = set(np.concatenate([p[1] for p in parts]).tolist()) if parts else set()
        if rt.widths is not None:
            rt.observe_choice(self.position, flat)
        for distance, predicted in rt._predicted.pop(self.position, {}).items():
            correct, total, guessed = rt.stats.prediction_by_distance.get(distance, (0, 0, 0))
            rt.stats.prediction_by_distance[distance] = (
                correct + len(needed & predicted), total + len(needed), guessed + len(predicted))
            if distance == 1:
                rt.stats.prediction_total += len(needed)
                rt.stats.prediction_correct += len(needed & predicted)
        chosen = len(np.unique(flat))
        rt.stats.expert_requests += chosen
        rt.stats.skipped += chosen - len(needed)

        protected = []
        if rt.prefetch_layers and self.router is not None:
            protected = rt.consume_prefetch(self.layer.layer, needed)
            rt.prefetch(predictions)
        try:
            y = self._compute(x, flat, parts, idx.shape)
        finally:  # the layer's fetches have pinned (and used) what they need by now
            rt.cache.release(protected)
        if scale is not None and (scale != 1).any():
            y = y * mx.array(scale.reshape(idx.shape))[..., None].astype(y.dtype)
        return y

    def _serve(self, flat: np.ndarray, level: np.ndarray) -> list:
        """Decide, for each needed expert, which copy serves it: [(precision, experts, slot mask)]."""
        rt = self._runtime
        lid = self.layer.layer
        kept = level != DROP
        if not (level == LOW).any():  # the common case (exact mode, or every slot important)
            experts = np.unique(flat[kept])
            return [("high", experts, kept)] if len(experts) else []
        high = set(flat[level == HIGH].tolist())
        # A low-importance slot is served by a resident 4-bit copy when there is one, or by the
        # 4-bit copy a prefetch is reading (no second read of the 2-bit copy).
        for e in set(flat[level == LOW].tolist()) - high:
            if rt.has_or_reading(lid, e, "high"):
                high.add(e)
        copy = np.ones(self.layer.num_experts, dtype=np.int8)  # 0: 4-bit, 1: 2-bit
        copy[list(high)] = 0
        parts = []
        for precision, code in (("high", 0), ("low", 1)):
            mask = kept & (copy[flat] == code)
            if mask.any():
                parts.append((precision, np.unique(flat[mask]), mask))
        return parts

    def _masked_run(self, x, flat, mask, experts, arrays, entry, shape) -> mx.array:
        """Run ``experts`` over just the slots in ``mask`` that chose one of them; zeros elsewhere.

        The selected (token, slot) pairs are gathered into rows of their own (k=1), so each expert
        computes only the tokens routed to it, and the results are scattered back into place.
        """
        pos = np.searchsorted(experts, flat)
        inside = mask & (pos < len(experts)) & (experts[np.minimum(pos, len(experts) - 1)] == flat)
        rows, slots = np.nonzero(inside)
        hidden = x.shape[-1]
        out = mx.zeros((flat.size, hidden), dtype=x.dtype)
        if len(rows):
            xs = x.reshape(-1, hidden)[mx.array(rows.astype(np.uint32))]
            y = self._run(xs, pos[rows, slots][:, None], arrays, entry)
            out[mx.array((rows * flat.shape[1] + slots).astype(np.uint32))] = y.reshape(-1, hidden).astype(x.dtype)
        return out.reshape(*shape, hidden)

    def _compute(self, x: mx.array, flat: np.ndarray, parts: list, shape: tuple) -> mx.array:
        rt = self._runtime
        outputs = []
        single = len(parts) == 1 and parts[0][2].all()
        for precision, experts, mask in parts:
            entry = self.layer.precisions[precision]
            per_expert = entry.resident_nbytes(rt.float_itemsize)
            group = max(1, rt.working_set_bytes // (2 * per_expert))  # experts per stacked run
            for start in range(0, len(experts), group):
                chunk = experts[start:start + group]
                fetch = rt.begin_fetch(self.layer, chunk, precision)
                hit = fetch.resident
                if rt.overlap_io and 0 < len(hit) < len(chunk):
                    # Start the resident experts' compute while the misses are being read.
                    outputs.append(self._masked_run(x, flat, mask, chunk[hit],
                                                    [fetch.arrays[i] for i in hit], entry, shape))
                    mx.async_eval(outputs[-1])
                    arrays = fetch.finish()
                    miss = np.setdiff1d(np.arange(len(chunk)), hit)
                    outputs.append(self._masked_run(x, flat, mask, chunk[miss],
                                                    [arrays[i] for i in miss], entry, shape))
                else:
                    arrays = fetch.finish()
                    if single and len(chunk) == len(experts):  # one stacked run, no mask needed
                        return self._run(x, np.searchsorted(chunk, flat).reshape(shape), arrays, entry)
                    outputs.append(self._masked_run(x, flat, mask, chunk, arrays, entry, shape))
                if len(experts) > group:
                    total = sum(outputs[1:], outputs[0])
                    mx.eval(total)  # free this group's experts before the next group is read
                    outputs = [total]
                del arrays
        if not outputs:  # every slot dropped
            return mx.zeros((*shape, x.shape[-1]), dtype=x.dtype)
        return sum(outputs[1:], outputs[0])


def install(model: nn.Module, manifest: Manifest) -> list[OffloadedSwitch]:
    """Replace the model's switch modules named in the manifest with offloaded (empty) ones."""
    modules = dict(model.named_modules())
    installed = []
    for pos, layer in enumerate(manifest.layers):
        parent_path, _, name = layer.module_path.rpartition(".")
        parent = modules[parent_path] if parent_path else model
        installed.append(OffloadedSwitch(modules[layer.module_path], layer, pos))
        setattr(parent, name, installed[-1])
    return installed


def bind(model: nn.Module, runtime: OffloadRuntime) -> None:
    """Attach the runtime to every offloaded layer, and tap each MoE block's router (after
    loading: mlx-lm's quantization replaces router modules) so its gate weights can be read."""
    modules = dict(model.named_modules())
    runtime.layers = sorted((m for m in modules.values() if isinstance(m, OffloadedSwitch)),
                            key=lambda m: m.position)
    for layer in runtime.layers:
        layer._runtime = runtime
        parent_path = layer.layer.module_path.rpartition(".")[0]
        router = find_router(modules[parent_path] if parent_path else model, layer.layer.num_experts)
        object.__setattr__(layer, "router", router if router is None else tap_router(router))
    model._hobbit = runtime
