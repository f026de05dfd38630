"""``load``: an mlx-lm model whose routed experts stream from the expert store under one budget."""

from __future__ import annotations

import contextlib
import functools
import gc
import warnings
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models.switch_layers import QuantizedSwitchLinear
from mlx_lm.utils import _get_classes, load_model, load_tokenizer

from .architectures import (find_switch_modules, num_experts_of, switch_linear_paths, text_config,
                            trained_context)
from .budget import (BudgetPlan, allocated_bytes, allocation_page, format_size,
                     gpu_working_set_bytes, plan_budget, system_memory_bytes)
from .cache import SlotCache
from .conversion_cache import MEASURED_DIR, cache_root, resolve_model
from .measure import kv_bytes_by_layer, measured_activations, model_structure
from .offload import bind, install, router_block
from .runtime import OffloadRuntime, OffloadStats
from .options import DEFAULT_PREFETCH_SCRATCH, MAX_PREFETCH_WIDTH, LoadOptions
from .policies import check_policy_options, make_policy
from .pool_plan import apply_plan, follow_sequence, make_pools
from .prefetch import Prefetcher
from .reader import RecordReader
from .storage import parse_storage
from .routing import StackedGates
from .scoring import declared_scoring, probe_scoring
from .speculative import check_draft_tokens
from .store import (FLOAT_DTYPES, MANIFEST_NAME, Manifest, PrecisionEntry,
                    StoreError, check_store_files, is_float, load_manifest, manifest_path,
                    quant_parts)
from .widths import AdaptiveWidth

REFERENCE_MODEL = Path(__file__).parent / "reference_model"
DRAFT_MODEL_TOKENS = 3  # tokens a separate draft model drafts per pass unless told (as mlx-lm)


def default_policy(guesses_evict: bool) -> str:
    """The cache policy the harness supports (README): where prefetch guesses take pool slots,
    LRU (the cache is a staging area for predicted experts; the frequency scores serve within
    noise of it there and their eviction ranking costs decode time); otherwise (no prefetch, or
    guesses in scratch slots) per-sequence frequency (``seqfreq``, 4-15 points over LRU)."""
    return "lru" if guesses_evict else "seqfreq"


def default_shallow_layers(num_layers: int, cache_experts: int, num_experts: int) -> int:
    """How many leading layers' experts are evicted last while prefetching: as many whole layers as
    the cache holds, at least the first (no earlier layer predicts it), at most a quarter of the
    layers (Fate). Deeper layers are then served mostly by prefetch, which predicts them well."""
    return max(1, min(cache_experts // max(1, num_experts), round(0.25 * num_layers)))


def _offloaded_classes(manifest: Manifest, pipe=None, where: Path = Path(MANIFEST_NAME)):
    """mlx-lm's model classes, with the switch modules replaced as soon as the model is built.

    Replacing them inside ``__init__`` means mlx-lm's own loader then loads (strictly) exactly
    the dense weights, and the random initial expert weights are never materialised. With a
    pipeline (``pipe``), the model keeps only this rank's layers first, and drops the other
    ranks' weights as it loads them. ``where``: the manifest's path, for its errors.
    """

    def get_classes(config: dict):
        model_class, args_class = _get_classes(config)

        class OffloadedModel(model_class):
            def __init__(self, args):
                super().__init__(args)
                local = manifest
                if pipe is not None:
                    pipe.split_model(self)
                    local = pipe.local_manifest(manifest)
                _check_manifest(self, local, config, where)
                install(self, local)

            def sanitize(self, weights):
                # A store read in place links the source's weight files: their expert tensors
                # stay on disk (lazy, never evaluated); the store serves them. A pipeline rank
                # then keeps only its own layers' weights.
                if hasattr(super(), "sanitize"):
                    try:
                        weights = super().sanitize(weights)
                    except AttributeError as e:
                        if pipe is None or "PassThrough" not in str(e):
                            raise
                        from .pipeline import PipelineError
                        arch = getattr(self, "model_type", None) or type(self).__name__
                        raise PipelineError(f"cannot pipeline {arch}: mlx-lm reads its weights "
                                            f"through the modules of every layer ({e})") from None
                prefixes = tuple(l.module_path + "." for l in manifest.layers)
                weights = {k: v for k, v in weights.items() if not k.startswith(prefixes)}
                return weights if pipe is None else pipe.keep_local(weights)

            # (the signature is the model's own: mlx-lm inspects it for input_embeddings)
            @functools.wraps(model_class.__call__)
            def __call__(self, *args, **kwargs):
                rt = getattr(self, "_hobbit", None)
                if rt is None:
                    return super().__call__(*args, **kwargs)
                inputs = args[0] if args else kwargs.get("inputs")
                cache = args[1] if len(args) > 1 else kwargs.get("cache")
                with rt.one_caller(cache):
                    # the KV cache says how long the context is
                    if inputs is not None and inputs.ndim > 1 and inputs.shape[0] > 1:
                        raise ValueError(
                            f"a call of {inputs.shape[0]} sequences at once: the memory budget "
                            "plans the KV cache and activations of one sequence (mlx-lm's "
                            "batch_generate is not supported); generate them one by one")
                    if rt.kv_quant is not None:
                        rt.kv_quant.check_applied(cache)
                    rt.see_call(context_of(cache), int(inputs.shape[-1]) if inputs is not None else 1)
                    out = super().__call__(*args, **kwargs)
                    rt.end_call(out)
                return out

        OffloadedModel.__name__ = model_class.__name__
        OffloadedModel.__qualname__ = model_class.__qualname__
        return OffloadedModel, args_class

    return get_classes


def context_of(cache) -> int:
    """Tokens a prompt cache holds already, beside which a call's tokens go (0 for none or a
    new one). A rotating cache (mlx-lm's ``max_kv_size``) keeps at most its window less one
    before a call's tokens join, whatever its offset has counted: a full window of 256 then
    held 257 by this count, and a generation whose window was the context the budget holds
    stopped at its 257th token."""
    held = [min(c.offset, c.max_size - 1) if isinstance(getattr(c, "max_size", None), int)
            else c.offset for c in cache or [] if isinstance(getattr(c, "offset", None), int)]
    return max(held + [0])


def _check_manifest(model: nn.Module, manifest: Manifest, config: dict,
                    where: Path = Path(MANIFEST_NAME)) -> None:
    """The manifest at ``where`` must hold the experts of the model config.json builds: its MoE
    layers, their experts, and each expert tensor in the shape and dtype the module reads
    (before mlx-lm quantizes the model: its switch modules hold their float shapes)."""
    switches = find_switch_modules(model)
    found = [(p, num_experts_of(m)) for p, m in switches]
    want = [(l.module_path, l.num_experts) for l in manifest.layers]
    if found != want:
        raise StoreError(
            f"{where}: the expert store manifest does not match config.json: "
            f"{_first_difference(found, want)} (the config builds {len(found)} MoE layers, the "
            f"manifest lists {len(want)}); was the store converted from another model?")
    if manifest.model_type != config.get("model_type"):
        raise StoreError(f"{where}: the expert store was made for model_type "
                         f"{manifest.model_type!r}, config.json says {config.get('model_type')!r}")
    for (_, switch), layer in zip(switches, manifest.layers):
        for precision, entry in layer.precisions.items():
            problem = _layout_problem(switch, entry)
            if problem is not None:
                raise StoreError(f"{where}: layer {layer.layer} {precision}: {problem} (as "
                                 "config.json builds it); the store is damaged or from another "
                                 "model: reconvert it")


def _first_difference(found: list[tuple[str, int]], want: list[tuple[str, int]]) -> str:
    """The first MoE layer where the config's model and the manifest differ, in words."""
    def said(layer):
        return "none" if layer is None else f"{layer[0]} with {layer[1]} experts"

    i = next(i for i in range(max(len(found), len(want)))
             if i >= len(found) or i >= len(want) or found[i] != want[i])
    return (f"MoE layer {i} is {said(found[i] if i < len(found) else None)} in the config, "
            f"{said(want[i] if i < len(want) else None)} in the manifest")


def _layout_problem(switch: nn.Module, entry: PrecisionEntry) -> str | None:
    """What one (layer, precision)'s tensors lack that the switch module's projections read,
    or None: a dtype or shape that reads the right bytes wrongly, which no checksum sees."""
    tensors = {t.name: t for t in entry.tensors}
    modules = dict(switch.named_modules())
    for proj in switch_linear_paths(switch):
        if proj not in entry.quant:
            return f"no quantization of {proj}"
        for part, (dtype, shape) in _expected_tensors(modules[proj], entry.quant[proj]).items():
            t = tensors.get(f"{proj}.{part}")
            if t is None:
                return f"tensor {proj}.{part} is missing"
            if t.shape != shape:
                return f"tensor {t.name} has shape {list(t.shape)}, the model reads {list(shape)}"
            if t.dtype != dtype and not (dtype == "float" and t.dtype in FLOAT_DTYPES):
                return (f"tensor {t.name} has dtype {t.dtype}, the model reads "
                        f"{'a float' if dtype == 'float' else dtype}")
    return None


def _expected_tensors(linear: nn.Module, quant: dict) -> dict[str, tuple[str, tuple[int, ...]]]:
    """One expert's tensors of a switch projection quantized as ``quant``: part -> (dtype or
    "float", shape), from the module's stacked weight ``[E, out, in]`` (packed if quantized)."""
    out, cols = linear.weight.shape[1:]
    in_dims = cols * 32 // linear.bits if isinstance(linear, QuantizedSwitchLinear) else cols
    parts = quant_parts(quant)
    if is_float(quant):
        want = {"weight": ("float", (out, in_dims))}
    else:
        groups, affine = in_dims // quant["group_size"], "biases" in parts
        want = {"weight": ("U32", (out, in_dims * quant["bits"] // 32)),
                "scales": ("float" if affine else "U8", (out, groups))}
        if affine:
            want["biases"] = ("float", (out, groups))
    if "bias" in linear:
        want["bias"] = ("float", (out,))
    return want


def warn_past_working_set(budget_bytes: int) -> None:
    """A budget past the GPU's recommended working set (or, without one, past the machine's
    memory) runs, paging: say so once, at load."""
    limit = gpu_working_set_bytes()
    if limit is None and budget_bytes > system_memory_bytes():
        warnings.warn(f"memory budget {format_size(budget_bytes)} is more than this machine's "
                      f"memory ({format_size(system_memory_bytes())}): the budget cannot hold "
                      "memory there is not; the system will swap first", stacklevel=3)
    if limit is not None and budget_bytes > limit:
        warnings.warn(f"memory budget {format_size(budget_bytes)} is more than this GPU's "
                      f"recommended working set ({format_size(limit)}): past it the GPU pages "
                      "and decoding slows down; give a budget within it (or raise the limit "
                      "with sudo sysctl iogpu.wired_limit_mb)", stacklevel=3)


def compute_dtype(dtype: Any = None) -> mx.Dtype | None:
    """float32 on the CPU backend (bf16 activations are ~8x slower there), else the model's own."""
    if dtype is not None:
        return getattr(mx, dtype) if isinstance(dtype, str) else dtype
    return mx.float32 if mx.default_device() == mx.cpu else None


def _say_what_needs_a_router(runtime: OffloadRuntime, config: dict, prefetch_layers: int) -> None:
    """The lossy techniques read the router's gate weights and prefetch applies later routers:
    where no router was found (longcat_flash's chooses among its zero experts too), those
    layers run as in exact mode; said, not left for a benchmark to find."""
    blind = [layer.position for layer in runtime.layers if layer.router is None]
    wants = [name for name, on in (("mixed precision, skip and big-little",
                                    runtime.precision.needs_weights),
                                   ("prefetch", prefetch_layers > 0)) if on]
    if blind and wants:
        warnings.warn(f"{text_config(config).get('model_type', 'this model')}: no router found "
                      f"beside the experts of {len(blind)} of {len(runtime.layers)} MoE layers, so "
                      f"{' and '.join(wants)} do not apply there (those layers run as in exact "
                      "mode)", stacklevel=3)


def gate_scoring(model: nn.Module, runtime: OffloadRuntime, config: dict) -> str:
    """What the model's MoE blocks apply to their routers' logits: probed on the first layer
    with a router (``scoring.py``); where the probe cannot tell (or the router gives its own
    weights, which need none), what the config or the model's arguments name."""
    named = declared_scoring(text_config(config), model)
    modules = dict(model.named_modules())
    for layer in runtime.layers:
        found = router_block(model, modules, layer.layer)
        if found is not None:
            block_path, router = found
            parent_path, _, inside = layer.layer.module_path.rpartition(".")
            if block_path != parent_path:  # (not the MoE block: a decoder layer, say a pipeline
                return named               # stage's, which would wait for another rank)
            return probe_scoring(modules[block_path] if block_path else model, inside,
                                 router) or named
    return named


def load(path: str | Path | None = None, memory_budget: int | float | str | None = None,
         expert_residency: float | None = None, *, options: LoadOptions | None = None,
         **overrides):
    """Load an MoE model with its experts offloaded; returns ``(model, tokenizer)`` like mlx-lm.

    ``path``: a hobbit model directory, or anything ``python -m convert`` accepts (converted once
    into ``$HOBBIT_MLX_CACHE``), or None for the bundled reference model. ``memory_budget`` (bytes
    or "6GB"/"6GiB") caps MLX's memory while generating; ``expert_residency`` instead sizes the
    expert pools as a fraction of the 4-bit expert bytes. Every other option is a field of
    ``LoadOptions`` (``options``), each of which may also be given as a keyword:

    * ``mixed_precision`` (HOBBIT): a miss on a low-importance expert loads its 2-bit copy;
      thresholds ``t1``/``t2``; ``skip`` drops the least important.
    * ``big_little`` (MoBiLE, off by default): confident tokens run top-k/2 experts
      (``little_threshold``).
    * ``prefetch_layers``: predict and read the next layers' experts in the background (0 turns it
      off); ``prefetch_width``: experts predicted per token and layer ahead, as a multiple of
      top-k; ``prefetch_recall``: instead, each layer's width adapts (from ``prefetch_width``,
      between 1 and 4x top-k) so that its predictions hold this share of the experts its router
      chooses (0 or None: the fixed width); ``prefetch_low_precision``: uncertain or unimportant
      predictions are read in 2-bit; ``prefetch_scratch``: slots of each pool set aside for
      guesses, which then evict nothing (None: ``DEFAULT_PREFETCH_SCRATCH`` per layer ahead; 0:
      guesses take pool slots).
    * ``prefill_low_precision`` (Fate): during prefill, an expert chosen by less than this share
      of a chunk's tokens is served from its 2-bit copy.
    * ``overlap_io``: resident experts start computing before the router sync (decode) or while
      the misses are read (prompt chunks).
    * ``adapt_to_storage``: the lossy techniques (2-bit copies, skip, big-little, Fate's prefill
      rule) serve a call only while reading a layer's top-k experts would take longer than the
      layer computes, both measured as the model runs (off: always).
    * ``policy``: cache eviction (``hobbit_mlx.policies.POLICIES``), default
      ``default_policy``; ``keep_shallow_layers``: the experts of that many leading layers are
      evicted last (default ``default_shallow_layers`` where guesses take pool slots, else 0).
    * ``max_context``: the KV reserved when a sequence starts; a longer context takes its KV
      from the expert pools.

    ``exact=True`` turns every lossy technique off: 4-bit experts only, nothing skipped, outputs
    equal to mlx-lm's.
    """
    if memory_budget is not None:
        overrides["memory_budget"] = memory_budget
    if expert_residency is not None:
        overrides["expert_residency"] = expert_residency
    o = (options or LoadOptions()).with_overrides(**overrides)
    o.validate()
    try:
        model_dir = resolve_model(REFERENCE_MODEL if path is None else path, progress=o.progress, adapter_path=o.adapter_path)
    except Exception as e:
        if o.pipeline is not None:
            _tell_ranks(o.pipeline, e)
        raise
    if o.draft_model is not None:
        return _load_with_draft(model_dir, o)
    if o.pipeline is None:
        return _load(model_dir, o)
    from .pipeline import Pipeline, pipeline_budget

    pipe = Pipeline.start(o.pipeline, model_dir, pipeline_budget(o), o.pipeline_split,
                          options=o.shared_by_ranks())
    try:
        model, tokenizer = pipe.agreed(lambda: _load(model_dir, o, pipe))
    finally:
        pipe.loaded()
    model._hobbit_pipeline = pipe
    return model, tokenizer


def _tell_ranks(group, error: Exception) -> None:
    """A rank that cannot find its model tells the other ranks, which wait for it where the
    ranks compare their models ("rank N failed to load"); they saw a lost connection. (The CLIs
    joined the group before and tell them themselves, with the line they print.)"""
    from . import pipeline

    if pipeline.waiting_group() is None:
        with contextlib.suppress(Exception):  # (no group to join: nobody waits either)
            pipeline.fail_start(f"{type(error).__name__}: {error}",
                                pipeline.resolve_group(group))


def _load_with_draft(model_dir: Path, o: LoadOptions):
    """``load`` with a resident draft model beside the offloaded one: the draft's weights come
    out of the budget first, and its tokenizer must be the model's."""
    from .budget import BudgetError, parse_size
    from .speculative import check_same_tokenizer, load_draft, with_draft_minimum

    draft, draft_tok, draft_bytes = load_draft(o.draft_model, o.dtype)
    check_same_tokenizer(load_tokenizer(model_dir), draft_tok, str(o.draft_model))
    own = o
    if o.memory_budget is not None:
        own = o.with_overrides(memory_budget=max(1, parse_size(o.memory_budget) - draft_bytes))
    try:  # the draft's KV cache grows with the model's: its bytes per token join the KV reserve
        model, tokenizer = _load(model_dir, own, extra_kv_layers=kv_bytes_by_layer(draft))
    except BudgetError as e:
        raise with_draft_minimum(e, draft_bytes, parse_size(o.memory_budget)) from None
    rt = runtime_of(model)
    rt.draft_model, rt.draft_bytes = draft, draft_bytes
    rt.budget_given_to_draft = draft_bytes if o.memory_budget is not None else 0
    if not rt.speculative[0]:  # a draft model given: speculation is on (mlx-lm's default K)
        rt.speculative = (DRAFT_MODEL_TOKENS, o.speculative_adaptive)
    return model, tokenizer


def _load(model_dir: Path, o: LoadOptions, pipe=None, extra_kv_layers: list[int] = ()):
    """``load`` once the options are checked and the model directory found; with ``pipe``,
    this rank's layers only (its dense weights, expert records and budget). The KV reserve
    counts ``extra_kv_layers`` too (a draft model's KV bytes per token, per layer)."""
    precision = o.precision()
    prefill_step_size, prefetch_layers = o.prefill_step_size, o.prefetch_layers
    manifest = load_manifest(model_dir, check_files=pipe is None)
    uses_low = precision.mixed_precision or o.prefill_low_precision > 0
    if uses_low:
        _check_low_records(manifest, manifest_path(model_dir))
    model, config = load_model(model_dir, lazy=True, get_model_classes=_offloaded_classes(
        manifest, pipe, manifest_path(model_dir)))
    tokenizer = load_tokenizer(model_dir, tokenizer_config_extra=o.tokenizer_config or {},
                               eos_token_ids=config.get("eos_token_id"))
    check_tokenizer(tokenizer, model_dir, config)  # (before the weights are read)
    if pipe is not None:
        manifest = pipe.manifest
        check_store_files(Path(model_dir), manifest)
    cdtype = compute_dtype(o.dtype)
    if cdtype is not None:
        model.set_dtype(cdtype)
    mx.eval(model.parameters())
    page = allocation_page()  # (0 where buffers count their exact bytes)
    dense_arrays = tree_flatten(model.parameters())
    dense_bytes = sum(allocated_bytes(a.nbytes, page) for _, a in dense_arrays)
    structure = model_structure(config, dense_arrays, manifest)
    del dense_arrays

    reader = RecordReader(model_dir, manifest, workers=o.io_workers, verify=o.verify,
                          direct=o.direct_io, storage=parse_storage(o.simulated_storage),
                          parallel_runs=o.parallel_runs)
    if o.direct_io and reader.bypass is None:
        warnings.warn("direct_io: this OS offers no way to read past its page cache (neither "
                      "O_DIRECT nor F_NOCACHE); experts are read through it", stacklevel=2)
    groups = make_pools(manifest, ("high", "low") if uses_low else ("high",), cdtype)
    pools = {(lid, g.precision): g.pool for g in groups for lid in g.layers}
    num_experts = {l.layer: l.num_experts for l in manifest.layers}
    k = manifest.experts_per_token
    scratch = (DEFAULT_PREFETCH_SCRATCH * prefetch_layers if o.prefetch_scratch is None
               else o.prefetch_scratch) if prefetch_layers else 0
    guesses_evict = bool(prefetch_layers) and not scratch
    policy = o.policy or default_policy(guesses_evict)
    policy_kwargs = {"num_layers": len(manifest.layers), **(o.policy_options or {})}
    check_policy_options(policy, o.policy_options or {})
    make_policy(policy, **policy_kwargs)  # an unknown name fails here, before anything is measured
    # (the shallow layers it protects are decided once the pools' size is known)
    cache = SlotCache(pools, num_experts, lambda: make_policy(policy, **policy_kwargs))
    runtime = OffloadRuntime(manifest, reader, cache, precision=precision,
                             overlap_io=o.overlap_io,
                             prefill_low_precision=o.prefill_low_precision,
                             adapt_to_storage=o.adapt_to_storage)
    bind(model, runtime)
    _say_what_needs_a_router(runtime, config, prefetch_layers)
    runtime.scoring = gate_scoring(model, runtime, config)
    # Measured with the runtime reading nothing (every expert call computes on slot 0).
    runtime.measuring = True
    with pipe.local_only() if pipe is not None else contextlib.nullcontext():
        kv_layers = kv_bytes_by_layer(model) + list(extra_kv_layers)
        kv_per_token = sum(kv_layers)
        kv_quant = o.kv_quant()
        quantized_kv = kv_bytes_by_layer(model, kv_quant) if kv_quant is not None else []
        measured_key = (structure, str(cdtype), pipe and (pipe.start, pipe.end))
        activation_points, context_activation = measured_activations(
            model, prefill_step_size, measured_key, store=cache_root() / MEASURED_DIR,
            kv_quant=kv_quant, announce=_announce_measuring if o.progress else None)
    runtime.measuring = False
    # Gates of the layers ahead stacked per layer (one matmul per prediction): resident, counted.
    routers = [m.router for m in runtime.layers]
    gate_stacks = {pos: stack for pos in range(len(routers)) if
                   (stack := StackedGates.of(routers[pos + 1:pos + 1 + prefetch_layers])) is not None}
    dense_bytes += sum(allocated_bytes(a.nbytes, page) for s in gate_stacks.values()
                       for a in s.arrays.values())
    # Pools and KV caches are few large arrays, counted by their bytes; where buffers round up
    # to pages, up to a page more each (a KV cache's keys, values and their scales and biases)
    dense_bytes += page * (sum(len(g.pool.tensors) for g in groups) + 6 * len(kv_layers))
    plan = plan_budget(
        dense_bytes=dense_bytes, activation_points=activation_points,
        kv_bytes_per_token=kv_per_token,
        all_high_bytes=sum(g.all_bytes for g in groups if g.precision == "high"),
        min_high_bytes=sum(k * g.pool.slot_nbytes for g in groups if g.precision == "high"),
        min_low_bytes=sum(k * g.pool.slot_nbytes for g in groups if g.precision == "low"),
        mixed_precision=uses_low, memory_budget=o.memory_budget,
        expert_residency=o.expert_residency, initial_context=o.max_context,
        kv_layer_bytes_per_token=max(kv_layers, default=0), context_activation=context_activation,
        kv_quantized=(sum(quantized_kv), max(quantized_kv, default=0), kv_quant.start)
        if kv_quant is not None else ())
    warn_past_working_set(plan.budget_bytes)
    high_slot = max(g.pool.slot_nbytes for g in groups if g.precision == "high")
    cache_experts = plan.high_expert_bytes // high_slot
    keep_shallow_layers = o.keep_shallow_layers
    if keep_shallow_layers is None:
        keep_shallow_layers = default_shallow_layers(
            len(manifest.layers), cache_experts, manifest.num_experts) if guesses_evict else 0
    for ps in cache.pools:
        ps.policy = make_policy(policy, shallow_layers=keep_shallow_layers, **policy_kwargs)
    cache.set_scratch(scratch, min_regular=k)
    apply_plan(runtime, groups, plan)
    follow_sequence(runtime, groups, prefill_step_size)
    if prefetch_layers:
        width = max(1, round(o.prefetch_width * k))
        # An adaptive width may grow to 4x top-k, but one layer's guesses never take more than a
        # quarter of the pool (at 12.5% residency wider guesses crowded out the kept first layer).
        widths = None if not o.prefetch_recall else AdaptiveWidth(
            k, manifest.num_experts, start=width, target=o.prefetch_recall,
            max_width=min(round(MAX_PREFETCH_WIDTH * k), max(width, cache_experts // 4)))
        runtime.prefetcher = Prefetcher(runtime, prefetch_layers, width, widths, gate_stacks,
                                        low_precision=o.prefetch_low_precision,
                                        cost_aware=o.prefetch_cost_aware,
                                        scratch=bool(scratch))
    runtime.describe(plan=plan, model_dir=model_dir, kv_bytes_per_token=kv_per_token,
                     prefill_step_size=prefill_step_size, trained_context=trained_context(config))
    runtime.kv_quant = kv_quant  # (its keywords go to every generation: _with_defaults)
    # (a layer-major prefill holds the prompt's whole KV unquantized, which the plan does not)
    runtime.layer_major_prefill = o.layer_major_prefill and pipe is None and kv_quant is None
    runtime.speculative = (check_draft_tokens(o.speculative) if o.speculative else 0,
                           o.speculative_adaptive)  # (max draft tokens, adaptive); 0: off
    if o.speculative or o.draft_model is not None:  # (refused here, not at the first reply)
        from mlx_lm.models.cache import make_prompt_cache

        from .speculative import check_rollback
        try:
            check_rollback(make_prompt_cache(model))
        except ValueError:
            runtime.close()
            raise
    runtime.preload()
    reader.bytes_read = 0
    runtime.stats.reset()
    runtime.context_tokens = 0
    gc.collect()  # models dropped earlier hold memory until their reference cycles are collected
    mx.clear_cache()
    mx.reset_peak_memory()
    return model, tokenizer


def _check_low_records(manifest: Manifest, where: Path) -> None:
    """Mixed precision and Fate's prefill rule read 2-bit copies: every layer must have them."""
    missing = [l.layer for l in manifest.layers if "low" not in l.precisions]
    if missing:
        raise StoreError(f"{where}: layer {missing[0]} has no 'low' (2-bit) records, which mixed "
                         "precision and prefill_low_precision read; reconvert the model, or load "
                         "it exact (exact=True, --exact)")


def check_tokenizer(tokenizer, model_dir: Path, config: dict) -> None:
    """Without its files transformers gives a tokenizer of a token or two, which turns every
    prompt into nothing: say so at load instead."""
    n = len(tokenizer.get_vocab())
    if n < min(256, config.get("vocab_size") or 256):
        raise StoreError(f"{model_dir}: the tokenizer has {n} token(s); its files "
                         "(tokenizer.json, tokenizer_config.json, ...) are missing or incomplete "
                         "(copy them from the original checkpoint)")


def runtime_of(model: nn.Module) -> OffloadRuntime:
    rt = getattr(model, "_hobbit", None)
    if rt is None:
        raise ValueError("this model was not loaded by hobbit_mlx.load")
    return rt


def offload_stats(model: nn.Module, counters: OffloadStats | None = None) -> dict:
    """Counters since the last reset (or ``counters``: a chat session's totals), and the rates
    drawn from them, plus the cache's and MLX's memory right now."""
    rt = runtime_of(model)
    plan: BudgetPlan = rt.plan
    rt.wait_idle()
    rt.count_deferred()
    s = dict(vars(counters if counters is not None else rt.stats))
    s.update(policy=rt.cache.policy.name, resident_expert_bytes=rt.cache.resident_bytes,
             resident_experts=len(rt.cache),
             expert_cache_bytes=plan.expert_cache_bytes, peak_memory_bytes=mx.get_peak_memory(),
             active_memory_bytes=mx.get_active_memory(),
             # (a draft model's weights came out of the budget before the plan was made)
             budget_bytes=plan.budget_bytes + getattr(rt, "budget_given_to_draft", 0),
             dense_bytes=plan.dense_bytes, kv_reserve_bytes=plan.kv_reserve_bytes,
             kv_reserve_tokens=plan.kv_tokens, context_tokens=rt.context_tokens,
             chunk_reserve_tokens=plan.chunk_tokens,
             activation_reserve_bytes=plan.activation_reserve_bytes,
             pool_slots=[ps.pool.slots for ps in rt.cache.pools])
    served = s["hits_high"] + s["hits_low"]
    demand = served + s["misses_high"] + s["misses_low"]
    s["hit_rate"] = served / demand if demand else 0.0
    s["resident_hit_rate"] = (served - s["hits_in_flight"]) / demand if demand else 0.0
    s["prefetch_precision"] = s["prefetch_used"] / s["prefetch_issued"] if s["prefetch_issued"] else None
    s["prediction_recall"] = (s["prediction_correct"] / s["prediction_total"]
                              if s["prediction_total"] else None)
    by_distance = sorted(s.pop("prediction_by_distance").items())
    s["prediction_recall_by_distance"] = {d: c / t for d, (c, t, _) in by_distance if t}
    s["prediction_precision_by_distance"] = {d: c / g for d, (c, _, g) in by_distance if g}
    # the width each layer predicted with last (one layer ahead): adaptive, or the fixed one
    pf = rt.prefetcher
    s["prefetch_widths"] = (None if pf is None else pf.width if pf.widths is None else
                            {rt.layers[pos].layer.layer: w for (pos, d), w in
                             sorted(pf.widths.widths().items()) if d == 1})
    s["prefetch_precision_by_distance"] = {d: u / i for d, (i, u) in
                                           sorted(s.pop("prefetch_by_distance").items()) if i}
    s["little_token_share"] = s["little_tokens"] / s["routed_tokens"] if s["routed_tokens"] else None
    s["span_reads"] = _span_reads(rt.reader)
    return s


def _span_reads(reader) -> str | None:
    """How slow records read in place send their runs: "together", "in turn", "trying" (auto,
    still measuring); None where no record has several runs or none was slow."""
    if reader.runs_per_record < 2:
        return None
    mode = reader.runs_together()
    if mode is not None:
        return "together" if mode else "in turn"
    trial = reader.run_mode_trial.measured()
    return "trying" if trial["together"] is not None or trial["in_turn"] is not None else None


def reset_stats(model: nn.Module) -> None:
    """Zero the counters and MLX's peak-memory mark (the cache's contents stay)."""
    rt = runtime_of(model)
    rt.wait_idle()
    rt.count_deferred()
    rt.stats.reset()
    mx.reset_peak_memory()


def _announce_measuring() -> None:
    print("[hobbit_mlx] measuring the memory this model's calls take (once per model, prefill "
          "step and dtype on this machine)", flush=True)


def footprint(path: str | Path | None = None) -> dict:
    """Sizes that decide what budget a model needs, read from its store and measured runs.
    ``minimum_budget_bytes`` is the smallest budget that runs with the default techniques (a
    2-bit pool and the stacked prefetch gates included); ``minimum_budget_bytes_exact`` with
    ``exact=True, prefetch_layers=0``."""
    out = {}
    for key, options in (("minimum_budget_bytes_exact", {"exact": True, "prefetch_layers": 0}),
                         ("minimum_budget_bytes", {})):
        model, _ = load(path, expert_residency=0.0, progress=False, **options)
        rt = runtime_of(model)
        out[key] = rt.plan.minimum_bytes
        rt.close()
    m = rt.manifest
    out.update({"dense_bytes": rt.plan.dense_bytes, "expert_bytes_high": m.expert_bytes("high"),
                "expert_bytes_low": m.expert_bytes("low"), "num_moe_layers": len(m.layers),
                "num_experts": m.num_experts, "experts_per_token": m.experts_per_token,
                "kv_bytes_per_token": rt.kv_bytes_per_token,
                "activation_bytes": rt.plan.activation_for(rt.prefill_step_size),
                "activation_points": list(rt.plan.activation_points),
                "prefill_step_size": rt.prefill_step_size})
    return out
