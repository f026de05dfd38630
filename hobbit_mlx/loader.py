"""``load``: an mlx-lm model whose routed experts stream from the expert store under one budget."""

from __future__ import annotations

import gc
import hashlib
import os
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import _get_classes, load_config, load_model, load_tokenizer

from .architectures import find_switch_modules, num_experts_of, text_config
from .budget import BudgetPlan, plan_budget, working_set_experts
from .cache import ExpertCache
from .offload import OffloadRuntime, bind, install
from .policies import make_policy
from .precision import PrecisionOptions
from .reader import RecordReader
from .routing import StackedGates
from .store import Manifest, StoreError, is_hobbit_model, load_manifest
from .widths import AdaptiveWidth

REFERENCE_MODEL = Path(__file__).parent / "reference_model"
DEFAULT_MAX_CONTEXT = 4096
DEFAULT_PREFILL_STEP = 512

# Experts predicted per token for each layer ahead, as a multiple of top-k: a later layer's router
# applied to an earlier layer's input drifts from what it will choose, and a wider guess catches
# most of the drift (reference model, one layer ahead: recall 0.79 at 1x top-k, 0.91 at 1.5x,
# 0.95 at 2x; bench/README.md has what each width reads and serves).
DEFAULT_PREFETCH_WIDTH = 2.0
DEFAULT_PREFETCH_RECALL = None
MAX_PREFETCH_WIDTH = 4.0  # an adaptive width never guesses more than this many × top-k


def default_policy(prefetch_layers: int) -> str:
    """The cache policy the harness supports (README): with prefetch on, LRU (the cache is a
    staging area for predicted experts; the frequency scores serve within noise of it there and
    their eviction ranking costs decode time); without prefetch, per-sequence frequency
    (``seqfreq``, 4-15 points over LRU)."""
    return "lru" if prefetch_layers else "seqfreq"


def default_shallow_layers(num_layers: int, cache_experts: int, num_experts: int) -> int:
    """How many leading layers' experts are evicted last while prefetching: as many whole layers as
    the cache holds, at least the first (no earlier layer predicts it), at most a quarter of the
    layers (Fate). Deeper layers are then served mostly by prefetch, which predicts them well."""
    return max(1, min(cache_experts // max(1, num_experts), round(0.25 * num_layers)))


def cache_root() -> Path:
    return Path(os.environ.get("HOBBIT_MLX_CACHE", Path.home() / ".cache" / "hobbit_mlx"))


def resolve_model(path: str | Path | None, progress: bool = True) -> Path:
    """A hobbit model directory for ``path``: as is, or converted once into the cache directory."""
    if path is None:
        path = REFERENCE_MODEL
    local = Path(path).expanduser()
    if local.exists() and is_hobbit_model(local):
        return local
    from convert import convert  # the converter is only needed for unconverted sources

    if local.exists():
        cfg = local / "config.json"
        stamp = f"{local.resolve()}:{cfg.stat().st_mtime_ns if cfg.exists() else 0}"
        name = local.name
    else:
        stamp, name = str(path), str(path).replace("/", "--")
    target = cache_root() / f"{name}-{hashlib.sha1(stamp.encode()).hexdigest()[:12]}"
    if not is_hobbit_model(target):
        if progress:
            print(f"[hobbit_mlx] converting {path} into {target} (once)")
        convert(path, target, force=True, progress=progress)
    return target


def _offloaded_classes(manifest: Manifest):
    """mlx-lm's model classes, with the switch modules replaced as soon as the model is built.

    Replacing them inside ``__init__`` means mlx-lm's own loader then loads (strictly) exactly
    the dense weights, and the random initial expert weights are never materialised.
    """

    def get_classes(config: dict):
        model_class, args_class = _get_classes(config)

        class OffloadedModel(model_class):
            def __init__(self, args):
                super().__init__(args)
                _check_manifest(self, manifest, config)
                install(self, manifest)

        OffloadedModel.__name__ = model_class.__name__
        OffloadedModel.__qualname__ = model_class.__qualname__
        return OffloadedModel, args_class

    return get_classes


def _check_manifest(model: nn.Module, manifest: Manifest, config: dict) -> None:
    switches = find_switch_modules(model)
    found = [(p, num_experts_of(m)) for p, m in switches]
    want = [(l.module_path, l.num_experts) for l in manifest.layers]
    if found != want:
        raise StoreError(
            f"the expert store manifest does not match config.json: the config builds "
            f"{len(found)} MoE layers ({found[:2]}...) but the manifest lists {len(want)} "
            f"({want[:2]}...); was the store converted from another model?")
    if manifest.model_type != config.get("model_type"):
        raise StoreError(f"the expert store was made for model_type {manifest.model_type!r}, "
                         f"config.json says {config.get('model_type')!r}")


def compute_dtype(dtype: Any = None) -> mx.Dtype | None:
    """float32 on the CPU backend (bf16 activations are ~8x slower there), else the model's own."""
    if dtype is not None:
        return getattr(mx, dtype) if isinstance(dtype, str) else dtype
    return mx.float32 if mx.default_device() == mx.cpu else None


def _kv_bytes_per_token(model: nn.Module) -> int:
    """Measured: run one token through the model and size the KV cache arrays it made.

    mlx-lm caches allocate in steps along the sequence axis (-2), so each array's bytes are
    divided by its length there; state without a sequence axis (recurrent layers) is constant.
    """
    cache = make_prompt_cache(model)
    model(mx.array([[0]]), cache=cache)
    states = [a for c in cache or [] for _, a in tree_flatten(c.state) if isinstance(a, mx.array)]
    mx.eval(states)
    return int(sum(a.nbytes // a.shape[-2] for a in states if a.ndim >= 3 and a.shape[-2] > 0))


def _activation_bytes(config: dict, manifest: Manifest, itemsize: int, chunk: int) -> int:
    """An upper estimate of one prefill chunk's live activations (attention scores included)."""
    cfg = text_config(config)
    hidden = int(cfg.get("hidden_size", 1024))
    heads = int(cfg.get("num_attention_heads", 16))
    vocab = int(cfg.get("vocab_size", 32000))
    entry = manifest.layers[0].precisions["high"]
    inter = max(t.shape[0] for t in entry.tensors if t.name.endswith("weight"))
    k = manifest.experts_per_token
    return itemsize * chunk * (8 * hidden + 3 * k * inter + vocab + heads * chunk)


def load(path: str | Path | None = None, memory_budget: int | str | None = None,
         expert_residency: float | None = None, *, exact: bool = False,
         mixed_precision: bool | None = None, t1: float = 0.6, t2: float = 0.9, skip: bool = False,
         big_little: bool = False, little_threshold: float = 0.8, prefetch_layers: int = 1,
         prefetch_width: float = DEFAULT_PREFETCH_WIDTH,
         prefetch_recall: float | None = DEFAULT_PREFETCH_RECALL, prefetch_low_precision: bool = False,
         prefill_low_precision: float = 0.0, overlap_io: bool = True,
         policy: str | None = None, policy_options: dict | None = None,
         keep_shallow_layers: int | None = None,
         max_context: int = DEFAULT_MAX_CONTEXT, prefill_step_size: int = DEFAULT_PREFILL_STEP,
         io_workers: int = 8, verify: str = "first", direct_io: bool = False, dtype: Any = None,
         tokenizer_config: dict | None = None, progress: bool = True):
    """Load an MoE model with its experts offloaded; returns ``(model, tokenizer)`` like mlx-lm.

    ``path``: a hobbit model directory, or anything ``python -m convert`` accepts (converted once
    into ``$HOBBIT_MLX_CACHE``), or None for the bundled reference model. ``memory_budget`` (bytes
    or "6GB"/"6GiB") caps MLX's peak memory while generating; ``expert_residency`` instead sizes
    the expert cache as a fraction of the 4-bit expert bytes.

    Techniques, each a switch:

    * ``mixed_precision`` (HOBBIT): a miss on a low-importance expert loads its 2-bit copy;
      thresholds ``t1``/``t2``; ``skip`` drops the least important.
    * ``big_little`` (MoBiLE): confident tokens run top-k/2 experts (``little_threshold``).
    * ``prefetch_layers``: predict and read the next layers' experts in the background (0 turns it
      off); ``prefetch_width``: experts predicted per token and layer ahead, as a multiple of
      top-k; ``prefetch_recall``: instead, each layer's width adapts (from ``prefetch_width``,
      between 1 and 4× top-k) so that its predictions hold this share of the experts its router
      chooses (0 or None: the fixed width); ``prefetch_low_precision``: uncertain or unimportant
      predictions are read in 2-bit.
    * ``prefill_low_precision`` (Fate): during prefill, an expert chosen by less than this share
      of a chunk's tokens is served from its 2-bit copy.
    * ``overlap_io``: resident experts start computing while the misses are read.
    * ``policy``: cache eviction (``hobbit_mlx.policies.POLICIES``), default
      ``default_policy(prefetch_layers)``; ``keep_shallow_layers``: the experts of that many
      leading layers are evicted last (default ``default_shallow_layers`` with prefetch on, else 0).

    ``exact=True`` turns every lossy technique off: 4-bit experts only, nothing skipped, outputs
    equal to mlx-lm's.
    """
    if exact and (mixed_precision or big_little or skip):
        raise ValueError("exact=True cannot be combined with mixed_precision, big_little or skip")
    options = PrecisionOptions(
        mixed_precision=(not exact) if mixed_precision is None else bool(mixed_precision),
        t1=t1, t2=t2, skip=skip, big_little=big_little, little_threshold=little_threshold)
    if prefetch_width <= 0:
        raise ValueError(f"prefetch_width is a multiple of top-k above 0 (got {prefetch_width})")
    if prefetch_recall is not None and not 0 <= prefetch_recall <= 1:
        raise ValueError(f"prefetch_recall is a share in (0, 1], or 0/None for the fixed width "
                         f"(got {prefetch_recall})")
    if not 0 <= prefill_low_precision <= 1:
        raise ValueError(f"prefill_low_precision is a share of tokens in [0, 1] "
                         f"(got {prefill_low_precision})")
    if exact and prefill_low_precision:
        raise ValueError("exact=True cannot be combined with prefill_low_precision")
    if not 0 <= t1 <= t2 <= 1:
        raise ValueError(f"thresholds must satisfy 0 <= t1 <= t2 <= 1 (got t1={t1}, t2={t2})")
    model_dir = resolve_model(path, progress=progress)
    manifest = load_manifest(model_dir)
    config = load_config(model_dir)
    model, config = load_model(model_dir, lazy=True, get_model_classes=_offloaded_classes(manifest))
    cdtype = compute_dtype(dtype)
    if cdtype is not None:
        model.set_dtype(cdtype)
    mx.eval(model.parameters())
    dense_bytes = sum(a.nbytes for _, a in tree_flatten(model.parameters()))

    reader = RecordReader(model_dir, manifest, workers=io_workers, verify=verify, direct=direct_io)
    itemsize = (cdtype or mx.bfloat16).size
    float_size = cdtype.size if cdtype is not None else None  # experts' floats are cast on read
    expert_max = max(l.precisions["high"].resident_nbytes(float_size) for l in manifest.layers)
    # A throw-away runtime with no cache measures the KV bytes one token adds.
    bind(model, OffloadRuntime(manifest, reader, ExpertCache(0, make_policy("lru")), dtype=cdtype,
                               working_set_bytes=2 * working_set_experts(
                                   manifest.experts_per_token, manifest.num_experts) * expert_max))
    kv_per_token = _kv_bytes_per_token(model)
    # Gates of the layers ahead stacked per layer (one matmul per prediction): resident, counted.
    routers = [m.router for m in model._hobbit.layers]
    gate_stacks = {pos: stack for pos in range(len(routers)) if
                   (stack := StackedGates.of(routers[pos + 1:pos + 1 + prefetch_layers])) is not None}
    dense_bytes += sum(s.nbytes for s in gate_stacks.values())
    plan = plan_budget(
        dense_bytes=dense_bytes, expert_bytes_high=manifest.expert_bytes("high", float_size),
        expert_nbytes_max=expert_max, experts_per_token=manifest.experts_per_token,
        num_experts=manifest.num_experts,
        kv_bytes_per_token=kv_per_token,
        activation_bytes=_activation_bytes(config, manifest, itemsize, prefill_step_size),
        max_context=max_context, memory_budget=memory_budget, expert_residency=expert_residency)
    mx.set_cache_limit(plan.mlx_cache_limit_bytes)
    scoring = "sigmoid" if text_config(config).get("scoring_func") == "sigmoid" else "softmax"
    policy = policy or default_policy(prefetch_layers)
    cache_experts = plan.expert_cache_bytes // max(1, expert_max)
    if keep_shallow_layers is None:
        keep_shallow_layers = default_shallow_layers(
            len(manifest.layers), cache_experts, manifest.num_experts) if prefetch_layers else 0
    policy_kwargs = {"num_layers": len(manifest.layers), "shallow_layers": keep_shallow_layers,
                     **(policy_options or {})}
    cache = ExpertCache(plan.expert_cache_bytes, make_policy(policy, **policy_kwargs))
    k = manifest.experts_per_token
    width = max(1, round(prefetch_width * k))
    # An adaptive width may grow to 4× top-k, but one layer's guesses never take more than a
    # quarter of the cache (at 12.5% residency wider guesses crowded out the kept first layer).
    widths = None if not prefetch_recall else AdaptiveWidth(
        k, manifest.num_experts, start=width, target=prefetch_recall,
        max_width=min(round(MAX_PREFETCH_WIDTH * k), max(width, cache_experts // 4)))
    runtime = OffloadRuntime(manifest, reader, cache, dtype=cdtype,
                             working_set_bytes=plan.working_set_bytes, precision=options,
                             prefetch_layers=prefetch_layers, scoring=scoring, overlap_io=overlap_io,
                             float_itemsize=float_size, prefetch_low_precision=prefetch_low_precision,
                             prefetch_width=width, widths=widths,
                             prefill_low_precision=prefill_low_precision, gate_stacks=gate_stacks)
    runtime.describe(plan=plan, model_dir=model_dir, kv_bytes_per_token=kv_per_token,
                     prefill_step_size=prefill_step_size)
    bind(model, runtime)
    reader.bytes_read = 0
    gc.collect()  # models dropped earlier hold memory until their reference cycles are collected
    mx.clear_cache()
    mx.reset_peak_memory()
    tokenizer = load_tokenizer(model_dir, tokenizer_config_extra=tokenizer_config or {},
                               eos_token_ids=config.get("eos_token_id"))
    return model, tokenizer


def runtime_of(model: nn.Module) -> OffloadRuntime:
    rt = getattr(model, "_hobbit", None)
    if rt is None:
        raise ValueError("this model was not loaded by hobbit_mlx.load")
    return rt


def offload_stats(model: nn.Module) -> dict:
    """Counters since the last reset, plus the cache's and MLX's memory right now."""
    rt = runtime_of(model)
    plan: BudgetPlan = rt.plan
    rt.wait_idle()
    s = dict(vars(rt.stats))
    s.update(policy=rt.cache.policy.name, resident_expert_bytes=rt.cache.resident_bytes,
             resident_experts=len(rt.cache),
             expert_cache_bytes=plan.expert_cache_bytes, peak_memory_bytes=mx.get_peak_memory(),
             active_memory_bytes=mx.get_active_memory(), budget_bytes=plan.budget_bytes,
             dense_bytes=plan.dense_bytes)
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
    s["prefetch_widths"] = ({rt.layers[pos].layer.layer: w for (pos, d), w in
                             sorted(rt.widths.widths().items()) if d == 1}
                            if rt.widths is not None else rt.prefetch_width)
    s["prefetch_precision_by_distance"] = {d: u / i for d, (i, u) in
                                           sorted(s.pop("prefetch_by_distance").items()) if i}
    s["little_token_share"] = s["little_tokens"] / s["routed_tokens"] if s["routed_tokens"] else None
    return s


def reset_stats(model: nn.Module) -> None:
    """Zero the counters and MLX's peak-memory mark (the cache's contents stay)."""
    rt = runtime_of(model)
    rt.wait_idle()
    rt.stats.reset()
    mx.reset_peak_memory()


def footprint(path: str | Path | None = None) -> dict:
    """Sizes that decide what budget a model needs, read from its store and a one-token run."""
    model, _ = load(path, expert_residency=0.0, exact=True, prefetch_layers=0, progress=False)
    rt = runtime_of(model)
    m = rt.manifest
    out = {"dense_bytes": rt.plan.dense_bytes, "expert_bytes_high": m.expert_bytes("high"),
           "expert_bytes_low": m.expert_bytes("low"), "num_moe_layers": len(m.layers),
           "num_experts": m.num_experts, "experts_per_token": m.experts_per_token,
           "kv_bytes_per_token": rt.kv_bytes_per_token,
           "minimum_budget_bytes": rt.plan.minimum_bytes}
    rt.close()
    return out
