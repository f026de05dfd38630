"""Every option of ``hobbit_mlx.load`` in one dataclass, shared by the API, the CLIs and bench.

``LoadOptions()`` holds the defaults; ``load(path, memory_budget="6GB", exact=True)`` and
``load(path, options=LoadOptions(exact=True), memory_budget="6GB")`` are the same call. Each
technique is a switch here, so a benchmark configuration is a dict of these fields.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
import numbers
import os
from typing import Any, get_args, get_type_hints

import mlx.core as mx

from .budget import INITIAL_CONTEXT
from .kv_quant import KVQuant
from .precision import PrecisionOptions
from .storage import parse_storage

DEFAULT_PREFILL_STEP = 512
# Experts predicted per token for each layer ahead, as a multiple of top-k: a later layer's router
# applied to an earlier layer's input drifts from what it will choose, and a wider guess catches
# most of the drift (reference model, one layer ahead: recall 0.79 at 1x top-k, 0.91 at 1.5x,
# 0.95 at 2x; bench/README.md has what each width reads and serves).
DEFAULT_PREFETCH_WIDTH = 2.0
# Chosen by decode tokens/s under mac-like storage (bench/results/storage-*.md): with a Mac's
# ratio of read time to compute, guesses that miss cost more than the hits they buy, even read
# only in free storage time; fewer bytes per miss (2-bit copies, big-little) pay most.
DEFAULT_PREFETCH_LAYERS = 0
# Off: reading important experts in 2-bit until they prove hot reads 5-10% fewer bytes, but it
# costs +2-4% decode perplexity (teacher-forced decoding, bench/results/forced-reference-*.md),
# above the quality bound at 50% residency; the tok/s it buys at 25% is within the noise.
DEFAULT_UPGRADE_AFTER = 0.0
DEFAULT_PREFETCH_RECALL = None
# Scratch slots per layer ahead: about one or two guesses fit in the storage time one layer's
# compute leaves free; 4 or 8 were no faster (reference model, bench/forced_decode.py), and the
# slots come out of the cache.
DEFAULT_PREFETCH_SCRATCH = 2
MAX_PREFETCH_WIDTH = 4.0  # an adaptive width never guesses more than this many x top-k


# what a field's type accepts beside itself
_ACCEPTED = {int: (numbers.Integral,), float: (numbers.Real,), str: (str, os.PathLike),
             tuple: (tuple, list)}


@dataclass(frozen=True)
class LoadOptions:
    """Memory, techniques and I/O of an offloaded model (see ``hobbit_mlx.load``)."""

    # memory
    memory_budget: int | float | str | None = None  # bytes or "6GB"; None: 60% of RAM or the whole model
    expert_residency: float | None = None  # instead: pools of this share of the 4-bit experts
    max_context: int = INITIAL_CONTEXT  # KV reserved when a sequence starts (it grows from there)
    prefill_step_size: int = DEFAULT_PREFILL_STEP
    # a quantized KV cache (mlx-lm's kv_bits, kv_group_size, quantized_kv_start; here the budget
    # plans for it, so every generation uses it): a longer context, or more experts resident
    kv_bits: int | None = None
    kv_group_size: int = 64
    quantized_kv_start: int = 0
    # a prompt longer than one chunk passes the model layer by layer (every chunk through a layer
    # before the next), so each layer's experts are read once per prompt, not once per chunk
    layer_major_prefill: bool = True
    # techniques
    exact: bool = False  # 4-bit only, nothing skipped: outputs equal mlx-lm's
    mixed_precision: bool | None = None  # HOBBIT; None: on unless exact
    # HOBBIT's thresholds on a slot's unimportance (the gate mass ranked above it): a miss above
    # t1 reads 2-bit, one above t2 is skipped. Chosen by teacher-forced decode under mac-like
    # storage (bench/results/forced-*.md): against 0.6 / 0.9, 25-30% fewer bytes per token for
    # perplexity within the measurement noise
    t1: float = 0.4
    t2: float = 0.8
    # HOBBIT's skip of the least important misses (unimportance > t2); None: on unless exact.
    # Chosen by teacher-forced decode under mac-like storage: 1.07-1.11x the tok/s without it,
    # 10-13% fewer bytes read, for perplexity within the noise (bench/results/forced-*.md)
    skip: bool | None = None
    # mixed precision (so not in exact mode): a miss reads 4-bit only for an expert chosen this
    # often lately (each use counts 1, fading by 0.9 per call of its layer), else 2-bit; 0: off
    upgrade_after: float = DEFAULT_UPGRADE_AFTER
    # MoBiLE; None: off. Measured on teacher-forced decode under mac-like storage: at the default
    # t2 = little_threshold and with little_keeps_resident, a little token's dropped experts are
    # those skip drops anyway (the same bytes), and renormalizing the rest over what runs cost
    # quality (KL from mlx-lm +5%, bench/results/big-little-defaults.md)
    big_little: bool | None = None
    little_threshold: float = 0.8
    little_keeps_resident: bool = True  # big-little drops only experts that would be read
    prefetch_layers: int = DEFAULT_PREFETCH_LAYERS
    prefetch_width: float = DEFAULT_PREFETCH_WIDTH
    prefetch_recall: float | None = DEFAULT_PREFETCH_RECALL
    prefetch_low_precision: bool = False
    prefetch_cost_aware: bool = True  # read a guess only when worth its victim and bandwidth
    # slots of each pool set aside for guesses (scratch slots: a guess evicts nothing, a used one
    # joins the cache as its miss would have); None: DEFAULT_PREFETCH_SCRATCH per layer ahead; 0:
    # guesses take pool slots like demand reads, and predicted resident experts are held until
    # their layer runs
    prefetch_scratch: int | None = None
    prefill_low_precision: float = 0.0  # Fate
    # the lossy techniques only while a layer's top-k reads cost more than its compute (measured)
    adapt_to_storage: bool = True
    overlap_io: bool = True
    policy: str | None = None  # None: lru with prefetch, seqfreq without
    policy_options: dict | None = None
    keep_shallow_layers: int | None = None
    # I/O and compute
    io_workers: int = 8
    verify: str = "first"
    direct_io: bool = False  # reads bypass the page cache: O_DIRECT, or F_NOCACHE on macOS
    # a slow record read in place (one span per stacked tensor) sends its spans to the device at
    # once (True), one after another, each waiting out the latency in turn (False), or whichever
    # the first reads measure faster on this device ("auto")
    parallel_runs: bool | str = "auto"
    # a simulated storage device every read waits for (benchmarks): a storage.StorageModel,
    # "mac-ssd" or "50MB/s,latency=100us,depth=8"; None reads at the real device's speed
    simulated_storage: Any = None
    dtype: Any = None
    tokenizer_config: dict | None = None
    # adapters mlx_lm.lora trained for the model's checkpoint: fused into its conversion (once,
    # into the cache, as mlx_lm.fuse fuses them; convert/adapters.py)
    adapter_path: str | None = None
    progress: bool = True
    # several machines: an mx.distributed group (or True / a backend name: mx.distributed.init);
    # each rank holds a block of layers (hobbit_mlx.pipeline)
    pipeline: Any = None
    pipeline_split: tuple | None = None  # layers per rank, in rank order; None: by budget
    # self-speculative decoding (speculative.py): draft up to this many tokens per pass from the
    # resident experts, verify them in one exact pass; True: the default K; None/False: off
    speculative: int | bool | None = None
    speculative_adaptive: bool = True  # the draft length follows acceptance and read time (0..K)
    # a small resident draft model (mlx-lm checkpoint, same tokenizer) drafts instead, through
    # the same loop (its draft length adapts too); its weights and KV cache count inside
    # memory_budget
    draft_model: str | None = None

    @classmethod
    def names(cls) -> set[str]:
        return {f.name for f in fields(cls)}

    # what each rank of a pipeline sets for itself (its memory, its storage); every other
    # option decides what the model computes, so the ranks must agree on it
    PER_RANK = frozenset({"memory_budget", "expert_residency", "io_workers", "verify", "direct_io",
                          "parallel_runs", "simulated_storage", "progress", "pipeline",
                          "tokenizer_config"})

    def shared_by_ranks(self) -> dict:
        """The options every rank of a pipeline must share (see ``PER_RANK``)."""
        return {n: getattr(self, n) for n in sorted(self.names() - self.PER_RANK)}

    def with_overrides(self, **overrides) -> "LoadOptions":
        """A copy with ``overrides`` applied; an unknown name is a TypeError, as for a function."""
        unknown = set(overrides) - self.names()
        if unknown:
            raise TypeError(f"load() got unexpected option(s): {', '.join(sorted(unknown))}")
        return replace(self, **overrides)

    def _check_types(self) -> None:
        """Each option of the type its field says (a wrong one failed later as a bare TypeError,
        or, as a string "no" for a bool, turned the option on). A bool is no number here, an int
        is a float, a list is a tuple and a path a string."""
        hints = get_type_hints(LoadOptions)
        for f in fields(self):
            value, hint = getattr(self, f.name), hints[f.name]
            kinds = get_args(hint) or (hint,)
            if Any in kinds or (value is None and type(None) in kinds):
                continue
            accepted = tuple(k for kind in kinds for k in _ACCEPTED.get(kind, (kind,)))
            if isinstance(value, bool) and bool not in kinds or not isinstance(value, accepted):
                names = " or ".join(getattr(k, "__name__", str(k)).replace("NoneType", "None")
                                    for k in kinds)
                raise ValueError(f"{f.name} must be {names}, not {type(value).__name__} "
                                 f"{value!r}")

    def kv_quant(self) -> KVQuant | None:
        """The KV cache's quantization, None when it keeps the model's dtype."""
        if self.kv_bits is None:
            return None
        return KVQuant(self.kv_bits, self.kv_group_size, self.quantized_kv_start)

    def precision(self) -> PrecisionOptions:
        mixed = (not self.exact) if self.mixed_precision is None else bool(self.mixed_precision)
        skip = (not self.exact) if self.skip is None else bool(self.skip)
        return PrecisionOptions(mixed_precision=mixed, t1=self.t1, t2=self.t2, skip=skip,
                                big_little=bool(self.big_little),
                                little_threshold=self.little_threshold,
                                little_keeps_resident=self.little_keeps_resident,
                upgrade_after=self.upgrade_after if mixed else 0.0)

    def validate(self) -> None:
        """Raise ValueError naming the first option that cannot work."""
        self._check_types()
        if isinstance(self.memory_budget, (int, float)) and self.memory_budget < 1:
            raise ValueError(f"memory_budget is a size in bytes above 0 (got {self.memory_budget})")
        if self.exact and (self.mixed_precision or self.big_little or self.skip):
            raise ValueError("exact=True cannot be combined with mixed_precision, big_little or skip")
        if self.upgrade_after < 0:
            raise ValueError(f"upgrade_after must be 0 (off) or more (got {self.upgrade_after})")
        if self.exact and self.prefill_low_precision:
            raise ValueError("exact=True cannot be combined with prefill_low_precision")
        if self.memory_budget is not None and self.expert_residency is not None:
            raise ValueError("give memory_budget or expert_residency, not both")
        if self.prefetch_layers < 0:
            raise ValueError(f"prefetch_layers must be 0 or more (got {self.prefetch_layers})")
        if self.prefetch_scratch is not None and self.prefetch_scratch < 0:
            raise ValueError(f"prefetch_scratch is a slot count, 0 or more (got {self.prefetch_scratch})")
        if self.prefetch_width <= 0:
            raise ValueError(f"prefetch_width is a multiple of top-k above 0 (got {self.prefetch_width})")
        if self.prefetch_recall is not None and not 0 <= self.prefetch_recall <= 1:
            raise ValueError(f"prefetch_recall is a share in (0, 1], or 0/None for the fixed width "
                             f"(got {self.prefetch_recall})")
        if not 0 <= self.prefill_low_precision <= 1:
            raise ValueError(f"prefill_low_precision is a share of tokens in [0, 1] "
                             f"(got {self.prefill_low_precision})")
        if not 0 <= self.little_threshold <= 1:
            raise ValueError(f"little_threshold is a share of the gate mass in [0, 1] "
                             f"(got {self.little_threshold})")
        if self.keep_shallow_layers is not None and self.keep_shallow_layers < 0:
            raise ValueError(f"keep_shallow_layers is a layer count, 0 or more "
                             f"(got {self.keep_shallow_layers})")
        dtype = getattr(mx, self.dtype, None) if isinstance(self.dtype, str) else self.dtype
        if self.dtype is not None and (not isinstance(dtype, mx.Dtype) or dtype not in (
                mx.float32, mx.float16, mx.bfloat16)):
            raise ValueError(f"dtype {self.dtype!r} is not an MLX float type (float32, float16, "
                             "bfloat16)")
        if not 0 <= self.t1 <= self.t2 <= 1:
            raise ValueError(f"thresholds must satisfy 0 <= t1 <= t2 <= 1 (got t1={self.t1}, t2={self.t2})")
        parse_storage(self.simulated_storage)  # (names what is wrong with it)
        if self.pipeline_split is not None and (self.pipeline is None or any(
                int(n) < 1 for n in self.pipeline_split)):
            raise ValueError(f"pipeline_split needs a pipeline and a positive layer count per "
                             f"rank (got {self.pipeline_split})")
        if self.speculative not in (None, False, True, 0) and self.speculative < 1:
            raise ValueError(f"speculative decoding drafts K >= 1 tokens per pass, or 0/False: "
                             f"off (got speculative={self.speculative!r})")
        if self.kv_bits is not None:
            self.kv_quant().check()
            if self.speculative or self.draft_model is not None:
                raise ValueError("kv_bits does not run with speculative decoding (mlx-lm's "
                                 "speculative loop does not quantize the KV cache either)")
        if self.draft_model is not None and self.pipeline is not None:
            raise ValueError("a draft model does not run with a pipeline")
        for name in ("max_context", "prefill_step_size", "io_workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1 (got {getattr(self, name)})")
