"""What every offloaded layer of one model shares: the store reader, the slot cache, the
precision options, the counters, and the graphs built on the pools since the last host sync.

``OffloadRuntime`` is the layer calls' common state (``offload.OffloadedSwitch`` is the patched
module; ``fetch.Fetch`` makes one call's experts resident). It keeps what a lazy call (one that
needs no host sync) leaves to count later, and the outputs built on the pools that must be
evaluated before their slots may be rewritten.
"""

from __future__ import annotations

import threading
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Iterator

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .cache import SlotCache
from .precision import ExpertHeat, PrecisionOptions
from .read_cost import ReadCost
from .reader import RecordReader
from .store import Manifest

if TYPE_CHECKING:
    from .offload import OffloadedSwitch


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

    def add(self, other: "OffloadStats") -> None:
        """Add ``other``'s counters to these (a session's totals over its turns)."""
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if isinstance(mine, dict):  # distance -> a tuple of counts
                for key, counts in theirs.items():
                    mine[key] = tuple(a + b for a, b in zip(mine.get(key, (0,) * len(counts)),
                                                            counts))
            else:
                setattr(self, f.name, mine + theirs)


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
        # convert.calibrate gathering each expert's inputs: layer calls run on the 4-bit copies
        # (exact) and hand it their projections' inputs, with the expert each slot holds
        self.calibration = None
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
        self._caller_lock = threading.Lock()  # (one_caller)
        self._caller: threading.Thread | None = None
        self._caller_depth = 0
        self._last_sequence: tuple = (None, None)  # weak refs: (thread, its last KV cache)
        self.context_limit = self.chunk_limit = 1 << 62
        # What load() decided, for stats and the generate wrappers (see describe()).
        self.plan = None
        self.model_dir = None
        self.trained_context = None  # the model's own context limit (config.json), if it has one
        self.kv_bytes_per_token = 0
        self.prefill_step_size = 512
        self.layer_major_prefill = False  # long prompts prefilled layer by layer (layer_major.py)
        self.kv_quant = None  # a quantized KV cache (kv_quant.KVQuant), planned for by the budget

    def describe(self, *, plan, model_dir, kv_bytes_per_token: int, prefill_step_size: int,
                 trained_context: int | None = None) -> None:
        """Record the budget plan and the model facts load() measured."""
        self.plan, self.model_dir, self.trained_context = plan, model_dir, trained_context
        self.kv_bytes_per_token, self.prefill_step_size = kv_bytes_per_token, prefill_step_size

    @property
    def prefetch_layers(self) -> int:
        return self.prefetcher.layers_ahead if self.prefetcher is not None else 0

    @contextmanager
    def one_caller(self, cache=None) -> Iterator[None]:
        """A model call on ``cache`` runs if no other thread's sequence holds the model: the
        pools, the reserves and the graphs held for the next sync are one sequence's, and MLX's
        streams are per thread (two threads in mlx-lm's own generate on one model crashed the
        process). Another thread holds it while it is in a call, while it runs a
        ``hobbit_mlx`` generation, or while the KV cache of its last call lives (mlx-lm's own
        loop between two steps); a thread that holds none of these hands the model on."""
        me = threading.current_thread()
        with self._caller_lock:
            if self._held_elsewhere(me, cache):
                raise RuntimeError(
                    "this model is running another thread's sequence: a hobbit_mlx model runs "
                    "one sequence at a time; generate from one thread, or with hobbit_mlx."
                    "generate / stream_generate, which queue generations on a model")
            self._caller, self._caller_depth = me, self._caller_depth + 1
            if cache and self._sequence != (me, cache[0]):  # (a call without a cache leaves
                self._last_sequence = (weakref.ref(me), weakref.ref(cache[0]))  # nothing)
        try:
            yield
        finally:
            with self._caller_lock:
                self._caller_depth -= 1
                if not self._caller_depth:
                    self._caller = None

    @property
    def _sequence(self) -> tuple:
        """(thread, KV cache) of the last call that had a cache, while both live."""
        thread, cache = (ref() if ref is not None else None for ref in self._last_sequence)
        return (thread, cache) if thread is not None and thread.is_alive() and \
            cache is not None else (None, None)

    def _held_elsewhere(self, me: threading.Thread, cache) -> bool:
        if self._caller not in (None, me):
            return True  # (in a call)
        generation = getattr(getattr(self, "generation_lock", None), "owner", None)
        if generation is not None:
            return generation != me.ident  # (in a hobbit_mlx generation)
        thread, its_cache = self._sequence
        return thread not in (None, me) and not (cache and cache[0] is its_cache)

    def new_sequence(self, context_tokens: int = 0, prompt_tokens: int = 0,
                     max_tokens: int = 0) -> None:
        """A sequence starts: per-sequence statistics (HOBBIT's frequency factors) start again,
        and the budget is planned for it. The KV cache holds ``context_tokens`` already (a
        continued chat); ``prompt_tokens`` come next, then up to ``max_tokens`` (0: unknown)."""
        self.cache.reset_policies()
        if self.heat is not None:
            self.heat.reset()
        self.plan_rest(context_tokens, prompt_tokens, max_tokens)

    def plan_rest(self, context_tokens: int, prompt_tokens: int, max_tokens: int) -> None:
        """Plan the budget for the rest of the current sequence, its statistics going on (a new
        sequence starts here too; later, a reserve held for a while, as a layer-major prefill's
        hidden states, goes back to the pools)."""
        self.context_tokens = context_tokens
        if self.on_sequence is not None:
            self.on_sequence(context_tokens, prompt_tokens, max_tokens)

    @contextmanager
    def experts_held(self, module: nn.Module):
        """The experts of the offloaded layers inside ``module`` are held (``SlotCache.hold``)
        while the block runs: other layers' misses evict them last."""
        mine = {id(s): s for s in self.layers}
        keys = [(s.layer.layer, e, p) for _, m in module.named_modules() if id(m) in mine
                for s in (mine[id(m)],) for p in s.layer.precisions
                for e in range(s.layer.num_experts)]
        self.cache.hold(keys)
        try:
            yield
        finally:
            self.cache.release(keys)

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

    def abandon_lazy(self) -> None:
        """Forget the graphs left lazy, unevaluated: a pipeline that failed cannot evaluate them
        (their sends and receives wait on a peer that is gone, forever). Their hits go
        uncounted."""
        self._unsynced, self._finished, self._deferred = [], [], []

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
        for layer in self.layers:  # their modules over a layer's slice keep the old buffers alive
            layer.forget_view()
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
        for layer in self.layers:  # their modules over a layer's slice keep the old buffers alive
            layer.forget_view()
        for ps in self.cache.pools:
            ps.pool.release()
