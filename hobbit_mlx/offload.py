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
import threading
import time
import weakref
from dataclasses import dataclass, field, fields

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.switch_layers import QuantizedSwitchLinear

from .architectures import switch_linear_paths
from .cache import SlotCache
from .pools import SlotPool
from .precision import (DROP, HIGH, LOW, SKIP_IF_MISSING, ExpertHeat, PrecisionOptions,
                        demote_unpopular, plan_slots, renormalized)
from .read_cost import ReadCost
from .reader import RecordReader
from .routing import find_router, gate_weights, normalized, tap_router
from .store import LayerEntry, Manifest

# Splitting a call into a resident part that starts at once and a part that waits for reads costs
# a second expert run and a scatter; it pays only when the reads take longer than that (not on a
# warm page cache, where a 38 KB read takes microseconds).
OVERLAP_MIN_WAIT_S = 0.5e-3
INLINE_READ_S = 0.1e-3  # reads faster than this run on the model's thread (no hand-off)
ASYNC_MAX_TOKENS = 16  # calls up to this many tokens start computing as soon as built
# Calls up to this many tokens (decode, a speculative verify pass) start their resident experts
# before the router sync. The early run computes every choice of every token and the misses run
# again beside it: within the activations measured for the smallest prefill chunk (16 tokens) only
# for calls this short (a 16-token prefill chunk taking it went over a 12 MB budget by 1.6%).
EARLY_MAX_TOKENS = 8
_ALL = None  # a slot mask that keeps every (token, choice)


class PoolBudgetError(RuntimeError):
    """The pool cannot give a layer call even one slot (every slot pinned or in use)."""


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
    prefetch_cancelled: int = 0  # prefetch reads stopped because their layer ran without them
    prefetch_by_distance: dict = field(default_factory=dict)  # distance -> (issued, used)
    prediction_correct: int = 0  # predicted experts (one layer ahead) the router then chose
    prediction_total: int = 0  # experts the router chose where a prediction was made
    # distance -> (predicted experts chosen, experts chosen, experts predicted)
    prediction_by_distance: dict = field(default_factory=dict)
    little_tokens: int = 0
    routed_tokens: int = 0
    layer_calls: int = 0
    host_syncs: int = 0
    early_runs: int = 0  # decode calls whose resident experts started before the router sync
    early_unused: int = 0  # ... whose early output the plan could not use (it served them otherwise)
    pool_rebuilds: int = 0
    read_wait_s: float = 0.0

    def reset(self) -> None:
        for f in fields(self):
            setattr(self, f.name, type(getattr(self, f.name))())


class PoolProjection:
    """One expert projection over a pool, called with mlx-lm's own ``QuantizedSwitchLinear``
    code. Not an ``nn.Module``: the pool's arrays stay out of ``model.parameters()``."""

    def __init__(self, pool: SlotPool, name: str, quant: dict):
        self._pool = pool
        self._names = {t.name.rpartition(".")[2]: t.name for t in pool.tensors
                       if t.name.rpartition(".")[0] == name}
        self.group_size, self.bits, self.mode = quant["group_size"], quant["bits"], quant["mode"]

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
        return QuantizedSwitchLinear.__call__(self, x, indices, sorted_indices)


def _copy_switch(inner: nn.Module) -> nn.Module:
    """A copy of the switch module whose own and nested modules can be rebound independently."""
    out = copy.copy(inner)
    for name, child in list(inner.items()):
        if isinstance(child, nn.Module):
            out[name] = _copy_switch(child)
    return out


class OffloadRuntime:
    """What every offloaded layer of one model shares: store reader, cache, stats, options."""

    def __init__(self, manifest: Manifest, reader: RecordReader, cache: SlotCache, *,
                 precision: PrecisionOptions | None = None, scoring: str = "softmax",
                 overlap_io: bool = True, prefill_low_precision: float = 0.0,
                 adapt_to_storage: bool = True):
        self.manifest = manifest
        self.reader = reader
        self.cache = cache
        self.precision = precision or PrecisionOptions()
        self.scoring = scoring
        self.overlap_io = overlap_io
        self.prefill_low_precision = prefill_low_precision
        self.prefetcher = None  # a prefetch.Prefetcher when prefetch is on
        # the lossy techniques only while a layer's top-k reads cost more than its compute
        self.adapt_to_storage = adapt_to_storage
        high = [l.precisions["high"].expert_nbytes for l in manifest.layers]
        self.read_cost = ReadCost(reader, manifest.experts_per_token * sum(high) // len(high),
                                  manifest.experts_per_token)
        # how often each expert was chosen lately: 2-bit reads until an expert proves hot
        self.heat = ExpertHeat({l.layer: l.num_experts for l in manifest.layers},
                               self.precision.upgrade_after) if self.precision.upgrades else None
        self.stats = OffloadStats()
        self.stats_lock = threading.Lock()
        self.layers: list[OffloadedSwitch] = []
        self.trace: list | None = None  # when a list: (layer, indices [N, k], weights [N, k])
        self.measuring = False  # load() measuring activations: no reads, slot 0 for everything
        # speculative drafting (speculative.py): each token runs only its resident chosen experts
        # (gate weights renormalized over them), or its top-1 read when none is resident
        self.draft_only = False
        self.speculative = (0, True)  # (max draft tokens per pass, adaptive); 0: off
        self.speculative_stats = None  # the last speculative sequence's SpeculativeStats
        self._deferred: list[tuple[int, mx.array]] = []  # lazy calls: (layer, router indices)
        self._unsynced: list = []  # outputs built on the pools since the last sync
        self._finished: list = []  # (weak ref to a call's result, its outputs) since then
        self.context_tokens = 0  # tokens in the KV cache after the current call
        self.on_context = None  # (context, call tokens) when a call outgrows the reserves
        self.on_sequence = None  # (context, prompt tokens, max tokens) when a sequence starts
        self.context_limit = self.chunk_limit = 1 << 62
        # What load() decided, for stats and the generate wrappers (see describe()).
        self.plan = None
        self.model_dir = None
        self.kv_bytes_per_token = 0
        self.prefill_step_size = 512

    def describe(self, *, plan, model_dir, kv_bytes_per_token: int, prefill_step_size: int) -> None:
        """Record the budget plan and the model facts load() measured."""
        self.plan, self.model_dir = plan, model_dir
        self.kv_bytes_per_token, self.prefill_step_size = kv_bytes_per_token, prefill_step_size

    @property
    def prefetch_layers(self) -> int:
        return self.prefetcher.layers_ahead if self.prefetcher is not None else 0

    def new_sequence(self, context_tokens: int = 0, prompt_tokens: int = 0,
                     max_tokens: int = 0) -> None:
        """A sequence starts: per-sequence statistics (HOBBIT's frequency factors) start again,
        and the budget is planned for it. The KV cache holds ``context_tokens`` already (a
        continued chat); ``prompt_tokens`` come next, then up to ``max_tokens`` (0: unknown)."""
        self.cache.reset_policies()
        if self.heat is not None:
            self.heat.reset()
        self.context_tokens = context_tokens
        if self.on_sequence is not None:
            self.on_sequence(context_tokens, prompt_tokens, max_tokens)

    def see_call(self, context: int, tokens: int) -> None:
        """A model call of ``tokens`` tokens starts on a KV cache holding ``context``: grow the
        reserves first if the context or the call outgrow them."""
        if self._deferred and self.cache.all_high_resident:
            # the calls before (prompt chunks) are evaluated by now: count them, and let go of
            # the last layer's indices that mlx-lm never evaluates (they hold a chunk's input)
            self.count_deferred()
        self.context_tokens = context + tokens
        if (self.context_tokens > self.context_limit or tokens > self.chunk_limit) and \
                self.on_context is not None:
            self.on_context(self.context_tokens, tokens)

    # --- lazy calls and pending graphs ------------------------------------------------------
    def track(self, y: mx.array) -> None:
        """Hold an output built on the pools until the next sync evaluates it, so a graph the
        caller still holds (say, the logits of an earlier call not evaluated yet) never reads a
        slot after it was rewritten. Outputs that later calls depend on cost nothing extra there.
        With every expert resident no slot is ever rewritten, so nothing is held."""
        if self.cache.all_high_resident:
            return
        self._unsynced.append(y)
        if len(self._unsynced) > 4 * len(self.layers):
            del self._unsynced[0]

    def end_call(self, out) -> None:
        """A model call returned ``out``: its outputs stay held only while the caller holds
        ``out`` (mlx-lm drops a prefill chunk's logits, and with them the last layer's output,
        which must then not be computed at the next sync)."""
        if not self._unsynced:
            return
        try:
            ref = weakref.ref(out)
        except TypeError:  # not an array: hold the outputs as they are
            return
        self._finished.append((ref, self._unsynced))
        self._unsynced = []
        if len(self._finished) > 4:
            del self._finished[0]

    def pending_outputs(self) -> list[mx.array]:
        out = self._unsynced + [y for ref, ys in self._finished if ref() is not None for y in ys]
        self._unsynced, self._finished = [], []
        return out

    def settle(self) -> None:
        """Evaluate every graph built on the pools so far; slots used until now may be written."""
        mx.eval(self.pending_outputs())
        mx.synchronize()
        self.cache.synced()

    def defer(self, layer: int, indices: mx.array) -> None:
        """A lazy call's hits, counted without a host sync. With every expert resident nothing
        is ever evicted, so only the stats need them: one token's top-k are k distinct experts;
        a longer call's indices are kept and counted when the next call starts.
        Otherwise the policy needs the experts too: they are read at the next sync, when the
        call has been evaluated."""
        if self.cache.all_high_resident and indices.size == indices.shape[-1]:
            self.stats.expert_requests += indices.size
            self.stats.hits_high += indices.size
            return
        self._deferred.append((layer, indices))
        if len(self._deferred) > 16 * len(self.layers):  # no sync for long: count the oldest
            self.count_deferred(8 * len(self.layers))

    def count_deferred(self, n: int | None = None) -> None:
        """Count the hits of lazy calls and tell the policy (reads their router indices: call
        it where they are evaluated, at a sync or for the stats)."""
        todo = self._deferred[:n] if n is not None else list(self._deferred)
        del self._deferred[:len(todo)]
        tell_policy = not self.cache.all_high_resident
        for layer, indices in todo:
            experts = np.unique(np.array(indices))
            self.stats.expert_requests += len(experts)
            self.stats.hits_high += len(experts)
            if tell_policy:
                self.cache.record_hits(layer, experts)

    def _count(self, precision: str, hits: int, misses: int) -> None:
        if precision == "high":
            self.stats.hits_high += hits
            self.stats.misses_high += misses
        else:
            self.stats.hits_low += hits
            self.stats.misses_low += misses

    def lossy_now(self) -> bool:
        """Whether the lossy techniques (2-bit copies, skip, big-little) serve this call: always,
        unless ``adapt_to_storage`` and reads are cheap next to compute (read_cost.py)."""
        return not self.adapt_to_storage or self.read_cost.dear()

    def wants_low_pool(self, has_low: bool) -> bool:
        """Whether the next sequence's plan gives the 2-bit copies a pool (``has_low``: the plan
        now does): while reads are cheap the lossy techniques are off, and its memory caches
        4-bit experts instead."""
        if not self.adapt_to_storage:
            return has_low
        return not self.read_cost.cheap() if has_low else self.read_cost.dear()

    def has_or_reading(self, layer: int, expert: int, precision: str) -> bool:
        if self.prefetcher is not None:
            return self.prefetcher.has_or_reading(layer, expert, precision)
        return (layer, expert, precision) in self.cache


    def has_any_copy(self, layer: int, expert: int) -> bool:
        """A copy of the expert, 4-bit or 2-bit, is resident or being read: running it reads
        nothing more (what skip, big-little and drafting keep)."""
        return self.has_or_reading(layer, expert, "high") or \
            self.has_or_reading(layer, expert, "low")
    def wait_idle(self) -> None:
        if self.prefetcher is not None:
            self.prefetcher.wait_idle()

    # --- resizing -------------------------------------------------------------------------
    def resize_pools(self, slots: dict) -> None:
        """Give each pool ``slots[pool]`` slots (``pool`` as in ``cache.pools``), keeping the
        experts its policy ranks highest. The old arrays are freed before the new ones are made,
        and the kept experts are read again from the store, so memory never holds both."""
        self.wait_idle()
        if self.prefetcher is not None:
            self.prefetcher.forget()
        self.settle()
        keep = {}
        for ps in self.cache.pools:
            if slots[id(ps)] >= self.cache.experts_served_by(ps):
                keep[id(ps)] = []  # it will hold every expert: preload() reads them in order
                continue
            keep[id(ps)] = self.cache.shrink_to(
                ps, slots[id(ps)] - self.cache.scratch_fits(ps, slots[id(ps)]))
        self.cache.clear()
        for ps in self.cache.pools:
            ps.pool.release()
        mx.clear_cache()
        for ps in self.cache.pools:
            ps.pool.allocate(slots[id(ps)])
            self.cache.reset_pool(ps)
        self._read_all([key for ps in self.cache.pools for key in keep[id(ps)]])
        self.preload()  # a pool that holds all its experts is filled, as load() leaves it
        self.stats.pool_rebuilds += 1

    def preload(self) -> None:
        """Read every expert of every pool that can hold all of its layers' experts (as mlx-lm
        loads a model whole): such layers never miss, so their calls stay lazy from the start."""
        self._read_all([(layer.layer, e, "high") for layer in self.manifest.layers
                        if self.cache.capacity(layer.layer, "high")
                        >= self.cache.experts_served(layer.layer, "high")
                        for e in range(layer.num_experts)
                        if (layer.layer, e, "high") not in self.cache])

    def _read_all(self, keys: list) -> None:
        """Read ``keys`` into slots, in parallel, in order (no layer call is running)."""
        futures = []
        for key in keys:
            slot = self.cache.reserve(key)
            entry = self.manifest.layers[key[0]].precisions[key[2]]
            pool = self.cache.pool_for(key[0], key[2])
            futures.append((key, slot, self.reader.submit_into(entry, key[1], pool, slot)))
        for key, slot, fut in futures:
            fut.result()
            self.cache.commit(key, slot)

    def close(self) -> None:
        self.wait_idle()
        self.reader.close()
        self.cache.clear()
        for ps in self.cache.pools:
            ps.pool.release()


class Fetch:
    """One layer call's experts at one precision: resident ones at once, misses read into slots.

    Experts for which no slot can be had now (the pool is smaller than the chunk's need) are
    ``left`` for a later group."""

    def __init__(self, rt: OffloadRuntime, layer: LayerEntry, experts: np.ndarray, precision: str):
        self.rt, self.precision = rt, precision
        self.entry = layer.precisions[precision]
        self.pool = rt.cache.pool_for(layer.layer, precision)
        keys = [(layer.layer, e, precision) for e in experts.tolist()]
        slots = rt.cache.pin_and_lookup(keys)
        self.pending: list = []  # (position, future or None: read already, slot or None: prefetch)
        # Reads that take microseconds (a warm page cache) run here: handing them to a thread
        # costs more than the read.
        inline = rt.reader.read_seconds < INLINE_READ_S
        left = []
        for i, key in enumerate(keys):
            if slots[i] >= 0:
                continue
            fut = rt.prefetcher.inflight(key) if rt.prefetcher is not None else None
            if fut is not None:  # a prefetch is reading it already: wait for that read
                rt.prefetcher.promote(key)
                self.pending.append((i, fut, None))
                continue
            if rt.prefetcher is not None and key in rt.cache:
                # A prefetch landed since the lookup (it commits before it leaves the reads in
                # flight): a hit, not a second read.
                rt.cache.adopt(key)
                rt.cache.stamp([key])
                slots[i] = rt.cache.slot(key)
                continue
            slot = rt.cache.reserve(key) if not left else None
            if slot is None:
                left.append(i)
                continue
            slots[i] = slot
            if inline:
                try:
                    self._read_now(key, slot, commit=False)
                except BaseException:
                    self._settle(keys, self.pending)  # (the reads before it landed)
                    rt.cache.unpin(keys)
                    raise
                self.pending.append((i, None, slot))
            else:
                self.pending.append((i, rt.reader.submit_into(self.entry, key[1], self.pool, slot),
                                     slot))
        if left:
            taken = np.ones(len(keys), dtype=bool)
            taken[left] = False
            rt.cache.unpin([keys[i] for i in left])
            order = np.cumsum(taken) - 1  # position in the original list -> among the taken
            self.pending = [(int(order[i]), f, s) for i, f, s in self.pending]
            keys = [k for k, t in zip(keys, taken) if t]
            slots = [s for s, t in zip(slots, taken) if t]
            self.experts, self.left = experts[taken], experts[~taken]
        else:
            self.experts, self.left = experts, experts[:0]
        self.keys = keys
        self.slots = np.array(slots, dtype=np.int64)
        demand = sum(1 for p in self.pending if p[2] is not None)
        rt._count(precision, len(self.keys) - demand, demand)
        rt.stats.hits_in_flight += len(self.pending) - demand

    @property
    def waiting(self) -> np.ndarray:
        """Which experts taken were not resident when the fetch began (read, or being read)."""
        waiting = np.zeros(len(self.keys), dtype=bool)
        if self.pending:
            waiting[[p[0] for p in self.pending]] = True
        return waiting

    @property
    def reads_in_flight(self) -> int:
        """Reads of this fetch handed to threads (not read inline) and not waited for yet."""
        return sum(1 for p in self.pending if p[1] is not None)

    def finish(self) -> None:
        """Wait for the reads and make them resident; then the pins go (the slots stay stamped
        with this epoch, so nothing overwrites them before the graphs reading them ran)."""
        rt = self.rt
        if not self.pending:
            rt.cache.unpin(self.keys)
            return
        t0 = time.perf_counter()
        n = 0
        try:
            for n, (i, fut, slot) in enumerate(self.pending):
                key = self.keys[i]
                if slot is None:  # a prefetch read
                    fut.exception()
                    rt.prefetcher.wait_landed(key)  # (committed after the future completes)
                    slot = rt.cache.slot(key)
                    if slot is None:  # it failed (or was cancelled before the layer asked for
                        slot = rt.cache.reserve(key)  # it): read on demand, a miss after all
                        if slot is None:
                            raise PoolBudgetError(f"no slot for expert {key}")
                        self._read_now(key, slot)
                        rt._count(self.precision, -1, 1)
                        rt.stats.hits_in_flight -= 1
                    rt.cache.adopt(key)  # (a guess in a scratch slot joins the cache)
                    self.slots[i] = slot
                    rt.cache.stamp([key])
                    continue
                self._land(key, fut, slot)
        except BaseException:
            self._settle(self.keys, self.pending[n + 1:])
            raise
        finally:
            rt.stats.read_wait_s += time.perf_counter() - t0
            rt.cache.unpin(self.keys)

    def _land(self, key: tuple, fut, slot: int) -> None:
        """A demand read into ``slot`` lands: its bytes are counted and the slot made resident
        (``fut`` None: read already, on this thread). If it failed, the slot goes back and the
        error is raised."""
        if fut is not None:
            try:
                nbytes = fut.result()
            except BaseException:
                self.rt.cache.abandon(key, slot)
                raise
            with self.rt.stats_lock:
                self.rt.stats.bytes_read += nbytes
        self.rt.cache.commit(key, slot)

    def _settle(self, keys: list, pending: list) -> None:
        """After a read of this fetch failed: its other demand reads land or fail (their slots go
        back), so that no reserved slot is lost. A prefetch read's slot is the prefetcher's."""
        for i, fut, slot in pending:
            if slot is not None:
                try:
                    self._land(keys[i], fut, slot)
                except BaseException:
                    pass  # (the first error is the one raised)

    def _read_now(self, key: tuple, slot: int, commit: bool = True) -> None:
        try:
            nbytes = self.rt.reader.read_into(self.entry, key[1], self.pool, slot)
        except BaseException:
            self.rt.cache.abandon(key, slot)
            raise
        with self.rt.stats_lock:
            self.rt.stats.bytes_read += nbytes
        if commit:
            self.rt.cache.commit(key, slot)


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
        if opts.big_little and level is not None:
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
        if level is None:  # every slot 4-bit (one token's top-k are distinct already)
            experts = np.sort(flat[0]) if len(flat) == 1 else np.unique(flat)
            return [("high", experts, _ALL)]
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
        parent_path = layer.layer.module_path.rpartition(".")[0]
        router = find_router(modules[parent_path] if parent_path else model, layer.layer.num_experts)
        object.__setattr__(layer, "router", router if router is None else tap_router(router))
    model._hobbit = runtime
