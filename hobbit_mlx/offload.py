"""Patching mlx-lm's MoE modules: each routed-expert switch module runs on slot pools.

``OffloadedSwitch`` keeps the original mlx-lm switch module (``SwitchGLU``, ``SwitchMLP``, ...)
but its projections read a pool (``pools.SlotPool``) instead of holding every expert: a layer
call remaps the router's expert ids to slots on the device and runs mlx-lm's own module code on
the pool. Exact mode is therefore bit-equal to mlx-lm with everything resident.

* **No host sync where nothing can miss.** When every expert of a layer has a slot (and no
  technique needs the gate weights on the host), the call stays lazy: mlx-lm's pipelining works
  as stock. Its hits are counted later, from the router indices kept meanwhile.
* **Otherwise one host sync per layer call**, on the router indices, the gate weights (mixed
  precision) and the next layers' predictions (prefetch) together. Misses are read straight into
  free or evicted slots. In a decode call the resident 4-bit experts start computing before that
  sync (the *early run*: the device remap sends every choice to a slot and masks the non-resident
  ones to zero), so they run while the host plans the call and reads its misses; after it only the
  misses and the 2-bit part run. In a prompt chunk, resident experts start while misses are read.
  A call served by a 4-bit and a 2-bit part sends both parts' reads before it waits for either.
* A prompt chunk is grouped by expert: every expert a chunk needs in a layer is read once. When a
  chunk needs more experts than the pool can give it, they run in groups whose partial outputs
  are evaluated (so the slots may be reused) and summed.
"""

from __future__ import annotations

import copy
import time

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

from .architectures import switch_linear_paths
from .cache import SlotCache
from .fetch import Fetch
from .pools import SlotPool
from .precision import (DROP, HIGH, LOW, SKIP_IF_MISSING, demote_unpopular, plan_slots,
                        renormalized)
from .routing import find_router, gate_weights, normalized, tap_router
from .runtime import OffloadRuntime, PoolBudgetError
from .store import LayerEntry, Manifest, is_float

# Splitting a call into a resident part that starts at once and a part that waits for reads costs
# a second expert run and a scatter; it pays only when the reads take longer than that (not on a
# warm page cache, where a 38 KB read takes microseconds).
OVERLAP_MIN_WAIT_S = 0.5e-3
ASYNC_MAX_TOKENS = 16  # calls up to this many tokens start computing as soon as built
# Calls up to this many tokens (decode, a speculative verify pass) start their resident experts
# before the router sync. The early run computes every choice of every token and the misses run
# again beside it: within the activations measured for the smallest prefill chunk (16 tokens) only
# for calls this short (a 16-token prefill chunk taking it went over a 12 MB budget by 1.6%).
EARLY_MAX_TOKENS = 8
_ALL = None  # a slot mask that keeps every (token, choice)


class PoolProjection:
    """One expert projection over a pool, called with mlx-lm's own ``QuantizedSwitchLinear``
    code. Not an ``nn.Module``: the pool's arrays stay out of ``model.parameters()``."""

    def __init__(self, pool: SlotPool, name: str, quant: dict):
        self._pool = pool
        self.path = name
        self.recorder = None  # convert.calibrate's: sees each call's input
        self._names = {t.name.rpartition(".")[2]: t.name for t in pool.tensors
                       if t.name.rpartition(".")[0] == name}
        self.group_size, self.bits, self.mode = quant["group_size"], quant["bits"], quant["mode"]
        self._call = SwitchLinear.__call__ if is_float(quant) else QuantizedSwitchLinear.__call__

    def __getitem__(self, name: str) -> mx.array:
        return self._pool.arrays[self._names[name]]

    def get(self, name: str, default=None):
        full = self._names.get(name)
        return default if full is None else self._pool.arrays[full]

    def __contains__(self, name: str) -> bool:
        return name in self._names

    @property
    def global_scale(self):
        return self.get("global_scale")

    def __call__(self, x, indices, sorted_indices=False):
        if self.recorder is not None:
            self.recorder.see(self.path, x, indices)
        return self._call(self, x, indices, sorted_indices)


def _copy_switch(inner: nn.Module) -> nn.Module:
    """A copy of the switch module whose own and nested modules can be rebound independently."""
    out = copy.copy(inner)
    for name, child in list(inner.items()):
        if isinstance(child, nn.Module):
            out[name] = _copy_switch(child)
    return out


class OffloadedSwitch(nn.Module):
    """Drop-in replacement for an mlx-lm switch module whose experts live in slot pools."""

    def __init__(self, inner: nn.Module, layer: LayerEntry, position: int):
        super().__init__()
        self._proj_paths = switch_linear_paths(inner)
        for path in self._proj_paths:  # the random initial experts are never materialised
            parent, _, name = path.rpartition(".")
            owner = inner if not parent else dict(inner.named_modules())[parent]
            owner[name] = nn.Module()
        self.inner = inner
        self.layer = layer
        self.position = position
        # The block's router: a reference, not a child (its weights stay where mlx-lm keeps them).
        object.__setattr__(self, "router", None)
        object.__setattr__(self, "_by_precision", {})
        object.__setattr__(self, "_direct", None)  # (layer view, module reading it)
        self._runtime: OffloadRuntime | None = None

    def bind_pools(self, cache: SlotCache) -> None:
        """Point the switch module's projections at the pools (a copy of it per precision)."""
        object.__setattr__(self, "_by_precision", {
            precision: self._module_over(cache.pool_for(self.layer.layer, precision), precision)
            for precision in self.layer.precisions
            if cache.pool_for(self.layer.layer, precision) is not None})

    def _direct_module(self, view) -> nn.Module:
        """The switch module reading this layer's slice of the pool (built once per slice)."""
        if self._direct is None or self._direct[0] is not view:
            object.__setattr__(self, "_direct", (view, self._module_over(view, "high")))
        return self._direct[1]

    def forget_view(self) -> None:
        """Drop the module over a slice of the pool: the pool is about to be reallocated, and a
        slice keeps the whole old buffer alive (outside the budget)."""
        object.__setattr__(self, "_direct", None)

    def _module_over(self, source, precision: str) -> nn.Module:
        """A copy of mlx-lm's switch module whose projections read ``source`` (a pool, or one
        layer's slice of it) with this precision's quantization."""
        module = _copy_switch(self.inner)
        quant = self.layer.precisions[precision].quant
        for path in self._proj_paths:
            parent, _, name = path.rpartition(".")
            owner = module if not parent else dict(module.named_modules())[parent]
            if name in owner:  # (the empty placeholder)
                del owner[name]
            object.__setattr__(owner, name, PoolProjection(source, path, quant[path]))
        return module

    def _router_state(self) -> tuple:
        """(router input, router output) of this layer's call, when the router is tapped. The
        tap lets go of them, so a chunk's router input is not held until the next call."""
        if self.router is None:
            return None, None
        state = getattr(self.router, "_hobbit_in", None), getattr(self.router, "_hobbit_out", None)
        object.__setattr__(self.router, "_hobbit_in", None)
        object.__setattr__(self.router, "_hobbit_out", None)
        return state

    def _measure_call(self, x: mx.array, indices: mx.array) -> mx.array:
        """What load() measures activations with: every expert on slot 0 (nothing is read), and
        the costlier shape of a call, two masked runs summed (a call served by a 4-bit and a
        2-bit part, or resident experts run while misses are read)."""
        flat = np.array(indices).reshape(-1, indices.shape[-1])
        if flat.size < 2:
            return self._by_precision["high"](x, mx.zeros_like(indices))
        half = np.zeros(flat.shape, dtype=bool)
        half.reshape(-1)[::2] = True
        experts, slots = np.unique(flat), np.zeros(len(np.unique(flat)), dtype=np.int64)
        shape = indices.shape
        return (self._masked_run(x, flat, half, experts, slots, "high", shape)
                + self._masked_run(x, flat, ~half, experts, slots, "high", shape))

    def _lazy_ok(self, rt: OffloadRuntime) -> bool:
        """Nothing can miss and nothing needs the host: every expert of this layer (and of the
        layers prefetch would predict) is resident in 4-bit, and no technique drops slots."""
        cache, lid = rt.cache, self.layer.layer
        if rt.trace is not None or (rt.precision.drops and rt.lossy_now()) or \
                (rt.prefetcher is not None and rt.prefetcher.expects(lid)):
            return False  # (a synced call scores and releases what was predicted for it)
        if cache.resident_in_layer(lid) < self.layer.num_experts:
            return False
        for d in range(1, rt.prefetch_layers + 1):
            nxt = self.position + d
            if nxt < len(rt.layers) and cache.resident_in_layer(rt.layers[nxt].layer.layer) < \
                    rt.layers[nxt].layer.num_experts:
                return False
        return True

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        rt = self._runtime
        if rt.measuring:
            self._router_state()
            return self._measure_call(x, indices)
        rt.stats.layer_calls += 1
        if rt.calibration is not None:
            self._router_state()
            return self._calibration_call(x, indices)
        if self._lazy_ok(rt):
            self._router_state()
            lid = self.layer.layer
            if not rt.cache.all_high_resident:  # (with every expert resident none is evicted)
                rt.cache.stamp_layer(lid)
            rt.defer(lid, indices)
            view = rt.cache.layer_view(lid)
            if view is not None:  # the layer's experts lie in order in the pool: no remap op
                y = self._direct_module(view)(x, indices)
            else:
                y = self._by_precision["high"](x, rt.cache.device_remap(lid)[indices])
            rt.track(y)
            return y
        return self._synced_call(x, indices)

    def _calibration_call(self, x: mx.array, indices: mx.array) -> mx.array:
        """The call run on the 4-bit copies (exact), its experts in groups the pool holds, with
        ``rt.calibration`` told which expert each slot holds, so that it can sort the inputs
        each projection sees by expert."""
        rt = self._runtime
        mx.eval(indices, rt.pending_outputs())
        rt.cache.synced()
        flat = np.array(indices).reshape(-1, indices.shape[-1])
        module = self._by_precision["high"]
        projections = [m for _, sub in module.named_modules() for m in vars(sub).values()
                       if isinstance(m, PoolProjection)]
        total, remaining = None, np.unique(flat)
        while len(remaining):
            fetch = Fetch(rt, self.layer, remaining, "high")
            fetch.finish()
            if not len(fetch.experts):
                raise PoolBudgetError("no slot of the 4-bit pool is free for calibration")
            rt.calibration.begin(self.position, fetch.experts, fetch.slots)
            for p in projections:
                p.recorder = rt.calibration
            try:
                out = self._masked_run(x, flat, _ALL, fetch.experts, fetch.slots, "high",
                                       indices.shape)
                total = out if total is None else total + out
                mx.eval(total)
            finally:
                for p in projections:
                    p.recorder = None
            rt.cache.synced()  # (the group's slots may go to the next group)
            remaining = fetch.left
        return total

    def _synced_call(self, x: mx.array, indices: mx.array) -> mx.array:
        rt = self._runtime
        opts = rt.precision
        pf = rt.prefetcher
        gate_in, gate_out = self._router_state()
        lossy_allowed = rt.lossy_now()
        lossy = opts.needs_weights and lossy_allowed
        want_weights = gate_out is not None and (lossy or rt.draft_only or rt.trace is not None)
        lazy_weights = gate_weights(gate_out, indices, rt.scoring) if want_weights else None
        predictions = pf.predictions_after(self.position, gate_in) if pf is not None \
            and self.router is not None and gate_in is not None else []
        tokens = indices.size // indices.shape[-1]
        decode = tokens <= ASYNC_MAX_TOKENS
        early = self._start_resident(x, indices) if tokens <= EARLY_MAX_TOKENS else None
        # The one host sync: which experts this call needs, their gate weights, the next layers'
        # predictions, and every graph built on the pools since the last sync, evaluated together
        # (while the early run, scheduled after them, goes on computing).
        routed = [[a for a in (indices, lazy_weights) if a is not None], [p[2] for p in predictions],
                  rt.pending_outputs()]
        if early is not None:
            mx.async_eval(routed)
            mx.async_eval(early[0])
        mx.eval(routed)
        rt.cache.synced()
        rt.stats.host_syncs += 1
        rt.read_cost.on_sync(time.perf_counter(), rt.stats.read_wait_s, self.position, decode)
        if rt._deferred:  # evaluated by this sync
            rt.count_deferred(len(rt._deferred))
        idx = np.array(indices)
        rt.cache.on_layer(self.layer.layer)
        k = idx.shape[-1]
        flat = idx.reshape(-1, k)
        if early is not None and pf is not None:  # a prefetch may evict before the fetch pins:
            ran = set(flat[early[1][flat]].tolist())  # the early run's slots stay unwritten
            rt.cache.stamp([(self.layer.layer, e, "high") for e in ran])
        weights = normalized(lazy_weights, flat.shape) if want_weights else None
        if rt.trace is not None:
            rt.trace.append((self.layer.layer, flat.copy(), None if weights is None else weights.copy()))
        level, scale = None, None  # None: every slot 4-bit
        if weights is not None and lossy:
            level, scale = plan_slots(weights, opts)
        if rt.prefill_low_precision and len(flat) > 1 and lossy_allowed:
            level = demote_unpopular(flat, np.zeros(flat.shape, np.int8) if level is None else level,
                                     rt.prefill_low_precision)
        little = None  # rows (tokens) that big-little runs on top-k/2 experts
        if opts.big_little and scale is not None:  # (not a level Fate's prefill set alone)
            little = (scale != 1).any(axis=-1)  # (its top half is scaled by 1 / its mass)
            rt.stats.routed_tokens += len(flat)
            rt.stats.little_tokens += int(little.sum())
        if opts.drops_misses and level is not None:
            level = self._skip_missing(flat, level)
            if little is not None and opts.little_keeps_resident and little.any():
                scale = renormalized(weights, level, scale, little)
        if rt.draft_only:
            level, scale = self._draft_levels(flat, weights, level)

        if rt.heat is not None and level is not None:
            rt.heat.see(self.layer.layer, flat[level != DROP])
        parts = self._serve(flat, level)  # [(precision, experts array, slot mask)]
        served = sum(len(p[1]) for p in parts)
        chosen = len(np.unique(flat)) if level is not None and (level == DROP).any() else served
        rt.stats.expert_requests += chosen
        rt.stats.skipped += chosen - served

        protected = []
        rt.cache.score_ghosts(self.layer.layer, flat, learn=decode)
        if pf is not None and self.router is not None:
            needed = set(np.concatenate([p[1] for p in parts]).tolist()) if parts else set()
            pf.observe_choice(self.position, flat)
            pf.score(self.position, needed, learn=decode)
            protected = pf.consume(self.layer.layer, needed)
        issue = (lambda: pf.issue(predictions)) if predictions else None
        try:
            y = self._compute(x, indices, flat, parts, idx.shape, early, issue)
        finally:  # the layer's fetches have pinned (and used) what they need by now
            rt.cache.release(protected)
            if pf is not None:
                pf.after_layer(self.layer.layer)
        if scale is not None and (scale != 1).any():
            y = y * mx.array(scale.reshape(idx.shape))[..., None].astype(y.dtype)
        rt.track(y)
        if decode:  # decode: this layer computes while the host builds the
            mx.async_eval(y)              # next one's graph (a prefill chunk is better whole)
        return y

    def _start_resident(self, x: mx.array, indices: mx.array) -> tuple | None:
        """A decode call's resident 4-bit experts, run before the host has seen the router's
        choice (through the device remap, every other choice masked to zero), so that they compute
        while the host plans the call and its misses are read: (output, experts held then).
        None where it cannot pay: overlap off, or nothing resident. (Only the model's thread
        evicts; with prefetch on, it stamps the slots this run reads right after the sync.)"""
        rt, lid = self._runtime, self.layer.layer
        if not rt.overlap_io or rt.cache.resident_in_layer(lid) == 0:
            return None
        remap, held_device, held = rt.cache.device_residency(lid)
        y = self._by_precision["high"](x, remap[indices])
        y = mx.where(held_device[indices][..., None], y, mx.zeros((), dtype=y.dtype))
        return y.astype(x.dtype), held

    @staticmethod
    def _early_serves(flat: np.ndarray, parts: list, held: np.ndarray) -> bool:
        """Whether the early run's output is what the plan wants for the (token, choice) pairs
        it computed: every pair whose expert was resident in 4-bit is served by the 4-bit part
        (none dropped, none given to a 2-bit copy)."""
        computed = held[flat]
        if not computed.any():
            return False
        for precision, experts, mask in parts:
            if precision == "high":
                return mask is _ALL or not (computed & ~mask).any()
        return False

    def _skip_missing(self, flat: np.ndarray, level: np.ndarray) -> np.ndarray:
        """Level with each SKIP_IF_MISSING slot turned DROP when no copy of its expert is resident
        or being read (HOBBIT skips misses only), else LOW (the resident copy serves it). An
        expert that other tokens of the call run anyway is read anyway: it serves these slots."""
        maybe = level == SKIP_IF_MISSING
        if not maybe.any():
            return level
        rt, lid = self._runtime, self.layer.layer
        level = level.copy()
        run = set(flat[(level == HIGH) | (level == LOW)].tolist()) if len(flat) > 1 else ()
        for e in np.unique(flat[maybe]).tolist():
            held = e in run or rt.has_any_copy(lid, e)
            level[maybe & (flat == e)] = LOW if held else DROP
        return level

    def _draft_levels(self, flat: np.ndarray, weights: np.ndarray | None,
                      level: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """A draft token's levels: its chosen experts that have a resident copy (any precision)
        are kept, the others dropped; a token left with none keeps its top-1, which is read (2-bit
        when a 2-bit pool exists). The kept slots' outputs are scaled so that their gate weights
        sum as all the token's chosen ones did."""
        rt, lid = self._runtime, self.layer.layer
        if weights is None:
            weights = normalized(None, flat.shape)
        out = np.full(flat.shape, HIGH, dtype=np.int8) if level is None else level.copy()
        held = np.zeros(self.layer.num_experts, dtype=bool)
        for e in np.unique(flat).tolist():
            held[e] = rt.has_any_copy(lid, e)
        kept = (out != DROP) & held[flat]
        out[~kept] = DROP
        empty = np.flatnonzero(~kept.any(axis=-1))
        if len(empty):
            top = np.argmax(np.where(level[empty] != DROP, weights[empty], -1.0), axis=-1) \
                if level is not None else np.argmax(weights[empty], axis=-1)
            low = "low" in self._by_precision and rt.cache.capacity(lid, "low") > 0 and \
                rt.lossy_now()
            out[empty, top] = LOW if low else HIGH
        every = np.ones(len(flat), dtype=bool)
        return out, renormalized(weights, out, np.ones(flat.shape, np.float32), every)

    def _serve(self, flat: np.ndarray, level: np.ndarray) -> list:
        """Decide, for each needed expert, which copy serves it: [(precision, experts, slot mask)]."""
        rt = self._runtime
        lid = self.layer.layer
        if level is None:  # every slot 4-bit; unique even for one token, whose top-k may
            # repeat an expert (longcat's zero experts all map to index 0)
            return [("high", np.unique(flat), _ALL)]
        kept = level != DROP
        if not ((level == LOW).any() or rt.heat is not None) or "low" not in self._by_precision \
                or rt.cache.capacity(lid, "low") == 0:  # (no 2-bit pool while 4-bit holds all)
            experts = np.unique(flat[kept])
            return [("high", experts, kept)] if len(experts) else []
        high = set(flat[level == HIGH].tolist())
        if rt.heat is not None:  # 2-bit first: a 4-bit miss only for an expert proven hot
            high = {e for e in high if rt.heat.hot(lid, e) or rt.has_or_reading(lid, e, "high")}
        # A low-importance slot is served by a resident 4-bit copy when there is one, or by the
        # 4-bit copy a prefetch is reading (no second read of the 2-bit copy).
        for e in set(flat[level == LOW].tolist()) - high:
            if rt.has_or_reading(lid, e, "high"):
                high.add(e)
        copy_of = np.ones(self.layer.num_experts, dtype=np.int8)  # 0: 4-bit, 1: 2-bit
        copy_of[list(high)] = 0
        parts = []
        for precision, code in (("high", 0), ("low", 1)):
            mask = kept & (copy_of[flat] == code)
            if mask.any():
                parts.append((precision, np.unique(flat[mask]), mask))
        return parts

    def _masked_run(self, x, flat, mask, experts, slots, precision, shape) -> mx.array:
        """Run ``experts`` (in ``slots``) over just the (token, choice) pairs in ``mask`` that chose
        one of them; zeros elsewhere. Each selected pair becomes a row of its own (k=1), so each
        expert computes only the tokens routed to it."""
        pos = np.searchsorted(experts, flat)
        inside = (pos < len(experts)) & (experts[np.minimum(pos, len(experts) - 1)] == flat)
        if mask is not _ALL:
            inside &= mask
        rows, ks = np.nonzero(inside)
        hidden = x.shape[-1]
        out = mx.zeros((flat.size, hidden), dtype=x.dtype)
        if len(rows):
            xs = x.reshape(-1, hidden)[mx.array(rows.astype(np.uint32))]
            local = mx.array(slots[pos[rows, ks]].astype(np.uint32))[:, None]
            y = self._by_precision[precision](xs, local)
            out[mx.array((rows * flat.shape[1] + ks).astype(np.uint32))] = \
                y.reshape(-1, hidden).astype(x.dtype)
        return out.reshape(*shape, hidden)

    def _compute(self, x: mx.array, indices: mx.array, flat: np.ndarray, parts: list,
                 shape: tuple, early: tuple | None = None, reads_out=None) -> mx.array:
        """The call's output: each part's experts fetched and run. ``early`` (output, experts held
        when it was built): the resident 4-bit experts already running; then only the 4-bit
        part's misses run here, unless the plan serves some of those pairs otherwise.
        ``reads_out``: called once every part's first reads are out (prefetch goes behind them)."""
        rt = self._runtime
        outputs = []
        early_held = None
        if early is not None:
            if self._early_serves(flat, parts, early[1]):
                outputs, early_held = [early[0]], early[1]
                rt.stats.early_runs += 1
            else:
                rt.stats.early_unused += 1
        # Every part's reads go out before any is waited for: the device reads the 2-bit part's
        # misses while the host waits for the 4-bit part's and builds its run.
        ahead = {}
        try:
            for precision, experts, _ in parts if len(parts) > 1 or reads_out else ():
                if len(experts):
                    ahead[precision] = Fetch(rt, self.layer, experts, precision)
            if reads_out is not None:
                reads_out()
            return self._run_parts(x, flat, parts, shape, outputs, early_held, ahead)
        except BaseException:
            for fetch in ahead.values():  # (not reached: its pins go, its reads land)
                try:
                    fetch.finish()
                except BaseException:
                    pass
            raise

    def _run_parts(self, x: mx.array, flat: np.ndarray, parts: list, shape: tuple, outputs: list,
                   early_held: np.ndarray | None, ahead: dict) -> mx.array:
        """Each part's fetches (``ahead``: each part's first, made already) finished and run, in
        groups where the pool cannot hold a part's experts at once."""
        rt = self._runtime
        lid = self.layer.layer
        whole = len(parts) == 1 and (parts[0][2] is _ALL or parts[0][2].all())
        for precision, experts, mask in parts:
            remaining = experts
            stuck = 0
            while len(remaining):
                fetch = ahead.pop(precision, None) or Fetch(rt, self.layer, remaining, precision)
                if not len(fetch.experts):  # no slot free: this call's graphs or reads hold them
                    stuck += 1
                    if stuck > 2:
                        raise PoolBudgetError(
                            f"the {precision} expert pool ({rt.cache.capacity(lid, precision)} "
                            "slots) cannot hold even one more expert of this layer call")
                    if outputs:
                        total = sum(outputs[1:], outputs[0])
                        mx.eval(total)
                        outputs = [total]
                    rt.wait_idle()  # prefetch reads in flight hold slots too
                    rt.cache.synced()
                    continue
                stuck = 0
                missed = fetch.waiting
                if early_held is not None and precision == "high":
                    ran = early_held[fetch.experts]  # (a prefetch may have landed others since)
                    if (ran & missed).any():
                        fetch.finish()
                        raise RuntimeError("an expert the early run read was evicted before the "
                                           "call's fetch")
                    fetch.finish()
                    rest = np.flatnonzero(~ran)
                    if len(rest):
                        outputs.append(self._masked_run(x, flat, mask, fetch.experts[rest],
                                                        fetch.slots[rest], precision, shape))
                elif rt.overlap_io and 0 < missed.sum() < len(missed) and \
                        rt.reader.read_seconds * fetch.reads_in_flight > OVERLAP_MIN_WAIT_S:
                    # Start the resident experts' compute while the misses are being read.
                    outputs.append(self._masked_run(x, flat, mask, fetch.experts[~missed],
                                                    fetch.slots[~missed], precision, shape))
                    mx.async_eval(outputs[-1])
                    fetch.finish()
                    outputs.append(self._masked_run(x, flat, mask, fetch.experts[missed],
                                                    fetch.slots[missed], precision, shape))
                else:
                    fetch.finish()
                    if whole and not outputs and not len(fetch.left):  # one run on the pool
                        # (the sync brought the indices to the host: remap them there)
                        slots = fetch.slots[np.searchsorted(fetch.experts, flat)]
                        return self._by_precision[precision](
                            x, mx.array(slots.astype(np.uint32).reshape(shape)))
                    outputs.append(self._masked_run(x, flat, mask, fetch.experts, fetch.slots,
                                                    precision, shape))
                remaining = fetch.left
                if len(remaining):  # free this group's slots before the next group is read
                    total = sum(outputs[1:], outputs[0])
                    mx.eval(total)
                    rt.cache.synced()
                    outputs = [total]
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


def router_block(model: nn.Module, modules: dict, layer: LayerEntry) -> tuple[str, nn.Module] | None:
    """(path of the MoE block, its router) for a switch module: the router is a child of the
    block that holds the switch (Mixtral, Qwen, ...), else of the block above it, where the
    switch sits in an experts module of its own beside the router (gemma4, deepseek_v41)."""
    path = layer.module_path
    for _ in range(2):
        path = path.rpartition(".")[0]
        router = find_router(modules[path] if path else model, layer.num_experts)
        if router is not None:
            return path, router
        if not path:
            break
    return None


def bind(model: nn.Module, runtime: OffloadRuntime) -> None:
    """Attach the runtime to every offloaded layer, point it at the pools, and tap each MoE
    block's router (after loading: mlx-lm's quantization replaces router modules) so its gate
    weights can be read."""
    modules = dict(model.named_modules())
    runtime.layers = sorted((m for m in modules.values() if isinstance(m, OffloadedSwitch)),
                            key=lambda m: m.position)
    for layer in runtime.layers:
        layer._runtime = runtime
        layer.bind_pools(runtime.cache)
        found = router_block(model, modules, layer.layer)
        object.__setattr__(layer, "router", None if found is None else tap_router(found[1]))
    model._hobbit = runtime
