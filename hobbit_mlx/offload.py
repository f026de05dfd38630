"""Patching mlx-lm's MoE modules: each routed-expert switch module becomes an offloaded one.

``OffloadedSwitch`` keeps the original mlx-lm switch module (``SwitchGLU``, ``SwitchMLP``, ...) but
empties its projections: for each call it learns which experts the router chose (one host sync
on the indices), makes them resident through the cache (misses are read by the I/O pool in
parallel), stacks just those experts and runs the original module on them with the indices
renumbered. Running mlx-lm's own code on the same quantized bytes is what keeps exact mode
bit-equal to mlx-lm with everything resident.

A prompt chunk is grouped by expert: every expert the chunk needs in a layer is read once, and
``gather_qmm`` runs each expert over all tokens routed to it. When a chunk needs more experts than
the working set allows, they are processed in groups whose partial outputs are summed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, fields

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.switch_layers import QuantizedSwitchLinear

from .architectures import SWITCH_LINEAR_TYPES, switch_linear_paths
from .cache import ExpertCache
from .reader import RecordReader
from .store import LayerEntry, Manifest, PrecisionEntry


@dataclass
class OffloadStats:
    """Counters since the last reset. A request is one (layer, expert) a layer call needs."""

    expert_requests: int = 0
    hits_high: int = 0
    hits_low: int = 0
    misses_high: int = 0
    misses_low: int = 0
    skipped: int = 0
    bytes_read: int = 0
    prefetch_issued: int = 0
    prefetch_used: int = 0
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
                 dtype: mx.Dtype | None, working_set_bytes: int, exact: bool = True):
        self.manifest = manifest
        self.reader = reader
        self.cache = cache
        self.dtype = dtype
        self.working_set_bytes = working_set_bytes
        self.exact = exact
        self.stats = OffloadStats()
        self.layers: list[OffloadedSwitch] = []
        self.trace: list | None = None  # routing trace when recording (layer, experts, weights)

    def fetch(self, layer: LayerEntry, experts: np.ndarray, precision: str = "high") -> list[dict]:
        """Arrays of the given experts of one layer, reading misses in parallel; cached if they fit."""
        entry = layer.precisions[precision]
        keys = [(layer.layer, int(e), precision) for e in experts]
        out: list = [None] * len(keys)
        pending = []
        self.cache.pin(keys)
        try:
            for i, key in enumerate(keys):
                arrays = self.cache.get(key)
                if arrays is not None:
                    out[i] = arrays
                else:
                    pending.append((i, self.reader.submit(entry, key[1], self.dtype)))
            hits = len(keys) - len(pending)
            if precision == "high":
                self.stats.hits_high += hits
                self.stats.misses_high += len(pending)
            else:
                self.stats.hits_low += hits
                self.stats.misses_low += len(pending)
            t0 = time.perf_counter()
            for i, fut in pending:
                out[i] = fut.result()
                self.stats.bytes_read += entry.records[keys[i][1]].nbytes
                self.cache.put(keys[i], out[i])
            self.stats.read_wait_s += time.perf_counter() - t0
        finally:
            self.cache.unpin(keys)
        return out

    def close(self) -> None:
        self.reader.close()
        self.cache.clear()


class OffloadedSwitch(nn.Module):
    """Drop-in replacement for an mlx-lm switch module whose experts live in the store."""

    def __init__(self, inner: nn.Module, layer: LayerEntry, runtime: OffloadRuntime | None = None):
        super().__init__()
        for path in switch_linear_paths(inner):
            parent, _, name = path.rpartition(".")
            owner = inner if not parent else dict(inner.named_modules())[parent]
            setattr(owner, name, _empty_projection())
        self.inner = inner
        self._proj = {p: m for p, m in inner.named_modules() if isinstance(m, SWITCH_LINEAR_TYPES)}
        self._layer = layer
        self._runtime = runtime

    def _run(self, x: mx.array, local_indices: mx.array, experts: list[dict],
             entry: PrecisionEntry) -> mx.array:
        for t in entry.tensors:
            proj, _, attr = t.name.rpartition(".")
            self._proj[proj][attr] = mx.stack([e[t.name] for e in experts])
        for name, proj in self._proj.items():
            q = entry.quant[name]
            proj.bits, proj.group_size, proj.mode = q["bits"], q["group_size"], q["mode"]
        try:
            return self.inner(x, local_indices)
        finally:
            for proj in self._proj.values():
                proj.clear()

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        rt = self._runtime
        idx = np.array(indices)  # the one host sync: which experts does this call need?
        rt.stats.host_syncs += 1
        rt.stats.layer_calls += 1
        uniq, inverse = np.unique(idx.reshape(-1), return_inverse=True)
        inverse = inverse.reshape(idx.shape).astype(np.uint32)
        rt.stats.expert_requests += len(uniq)
        if rt.trace is not None:
            rt.trace.append((self._layer.layer, idx.reshape(-1, idx.shape[-1]).copy()))
        entry = self._layer.precisions["high"]
        group = max(1, rt.working_set_bytes // (2 * entry.expert_nbytes))
        if len(uniq) <= group:
            experts = rt.fetch(self._layer, uniq)
            return self._run(x, mx.array(inverse), experts, entry)
        # More experts than one working set: run them in groups and sum the masked partial outputs.
        total = None
        for start in range(0, len(uniq), group):
            stop = min(start + group, len(uniq))
            experts = rt.fetch(self._layer, uniq[start:stop])
            inside = (inverse >= start) & (inverse < stop)
            local = np.where(inside, inverse - start, 0).astype(np.uint32)
            y = self._run(x, mx.array(local), experts, entry)
            y = mx.where(mx.array(inside)[..., None], y, mx.zeros((), dtype=y.dtype))
            total = y if total is None else total + y
            mx.eval(total)  # free this group's experts before the next group is read
            del experts
        return total


def install(model: nn.Module, manifest: Manifest) -> list[OffloadedSwitch]:
    """Replace the model's switch modules named in the manifest with offloaded (empty) ones."""
    modules = dict(model.named_modules())
    installed = []
    for layer in manifest.layers:
        parent_path, _, name = layer.module_path.rpartition(".")
        parent = modules[parent_path] if parent_path else model
        installed.append(OffloadedSwitch(modules[layer.module_path], layer))
        setattr(parent, name, installed[-1])
    return installed


def bind(model: nn.Module, runtime: OffloadRuntime) -> None:
    """Attach the runtime (reader, cache, stats) to every offloaded layer of the model."""
    runtime.layers = [m for _, m in model.named_modules() if isinstance(m, OffloadedSwitch)]
    for layer in runtime.layers:
        layer._runtime = runtime
    model._hobbit = runtime
