"""One memory budget for the whole process, split into its parts.

``memory_budget`` is the ceiling for MLX's memory while generating: the resident dense weights;
the activations of the longest model call the sequence makes (a prefill chunk: measured at load
for a ladder of chunk sizes, and their growth with the context the call attends to; MLX's own
freed-buffer cache is capped with ``mx.set_cache_limit`` at the same size and shares that
reserve); the KV cache of the context (with the largest layer's growth); and the expert pools,
which take everything that is left. The KV and activation reserves follow the sequence
(``BudgetPlan.fit``): a sequence is planned when it starts (its prompt and ``max_tokens``), a
context that outgrows its reserve doubles it while the pools give slots back, and a new sequence
gives them back to the pools. The smallest budget that runs is dense + the smallest chunk's
activations + one KV step + one layer's top-k experts in each pool.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, replace

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}

KV_STEP = 256  # mlx-lm's KV caches grow in steps of this many tokens
INITIAL_CONTEXT = 1024  # tokens of KV reserved before a sequence shows it needs more
# With mixed precision, the share of the expert bytes kept for 2-bit copies (at least one layer's
# top-k). Teacher-forced decode, mac-like storage, 50 / 25% residency: 0.4 read 368 / 712 KiB per
# token, 0.25 304 / 655, 0.125 266 / 623, 0.0625 253 / 613 (a 4-bit slot keeps more worth)
LOW_SHARE = 0.0625
CHUNK_SHARE = 0.25  # a prefill chunk's activations take at most this share of the budget left


class BudgetError(ValueError):
    """The memory budget cannot run this model; the message gives the minimum."""


class ContextBudgetError(BudgetError):
    """The context outgrew what the budget can hold; the message says how far it got."""

    text = ""  # what ``hobbit_mlx.generate`` had generated until then


def parse_size(value: int | float | str) -> int:
    """Bytes from 6442450944, "6GB", "6 GiB", "512MiB", "1.5g"."""
    if isinstance(value, (int, float)):
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read {value!r} as a size (examples: 6GB, 6GiB, 512MiB, 123456789)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def format_size(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def system_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 16 * 2**30


def device_info() -> dict:
    """MLX's description of the default device; {} where it gives none (``mx.device_info`` is
    recent: older MLX has ``mx.metal.device_info`` only)."""
    import mlx.core as mx

    for get in (getattr(mx, "device_info", None),
                getattr(getattr(mx, "metal", None), "device_info", None)):
        if get is None:
            continue
        try:
            return dict(get())
        except Exception:  # noqa: BLE001 - no such device
            continue
    return {}


def gpu_working_set_bytes() -> int | None:
    """The GPU's recommended working set on Apple silicon (Metal's ``recommendedMaxWorkingSetSize``:
    about 2/3 of the memory up to 32 GB, 3/4 from 64 GB): past it MLX still allocates, but the
    GPU pages and decoding slows badly. None where the device does not say (the CPU backend)."""
    size = device_info().get("max_recommended_working_set_size")
    return int(size) if size else None


def allocation_page() -> int:
    """The page MLX's allocator rounds a buffer up to and counts whole: on Metal every buffer
    larger than a VM page (16 KiB on Apple silicon) takes whole pages; 0 where buffers count
    their exact bytes (the CPU backend). Small arrays add up: the reference model's 159 dense
    arrays and 18 pool arrays round up by 560 KB, 8% of its minimum budget."""
    import mlx.core as mx

    try:
        on_metal = mx.default_device().type == mx.gpu and mx.metal.is_available()
    except Exception:  # noqa: BLE001 - (no Metal in this MLX)
        on_metal = False
    return os.sysconf("SC_PAGE_SIZE") if on_metal else 0


def allocated_bytes(nbytes: int, page: int) -> int:
    """What an array of ``nbytes`` holds of the budget where buffers round up to ``page``."""
    return -(-nbytes // page) * page if page and nbytes > page else nbytes


def kv_tokens_for(tokens: int) -> int:
    """Tokens of KV memory mlx-lm holds for ``tokens`` (whole steps, plus the step a growing
    cache allocates before it copies the old one over): the rule where the largest layer's
    share of the KV is not known (``kv_bytes_for``)."""
    return (max(tokens, 1) + KV_STEP - 1) // KV_STEP * KV_STEP + KV_STEP


def kv_bytes_for(tokens: int, per_token: int, layer_per_token: int = 0) -> int:
    """KV bytes at the peak of holding ``tokens``: every layer's cache in whole steps, and, while
    a layer's cache grows, its old buffer beside the new one (mlx-lm's KVCache concatenates the
    old buffer with the new step, one layer at a time): one layer's whole size more, measured
    at up to 3072 tokens on the reference model. ``layer_per_token``: the largest layer's KV
    bytes per token; 0 (not known) reserves one step of every layer instead (``kv_tokens_for``),
    which is short of the growth peak once one layer's cache exceeds a step of all of them."""
    if not layer_per_token:
        return per_token * kv_tokens_for(tokens)
    whole = (max(tokens, 1) + KV_STEP - 1) // KV_STEP * KV_STEP
    return (per_token + layer_per_token) * whole


@dataclass(frozen=True)
class BudgetPlan:
    """How one budget is split now. The KV reserve and the activation reserve follow what the
    sequence needs (``fit``); the expert pools take what is left, up to every expert."""

    budget_bytes: int
    dense_bytes: int
    kv_bytes_per_token: int
    activation_points: tuple  # ((chunk tokens, measured peak bytes above the weights), ...)
    kv_tokens: int  # context the KV reserve holds now
    chunk_tokens: int  # the longest model call (prefill chunk) the activation reserve holds now
    high_expert_bytes: int  # the 4-bit pools
    low_expert_bytes: int  # the 2-bit pools
    all_high_bytes: int  # every expert in 4-bit
    min_expert_bytes: int  # one layer's top-k in each pool
    min_low_bytes: int  # one layer's top-k in the 2-bit pool (mixed precision, else 0)
    mixed_precision: bool
    expert_cap_bytes: int  # the pools never take more (all experts, or a residency's share)
    initial_context: int = INITIAL_CONTEXT  # KV reserved for a sequence of unknown length
    kv_layer_bytes_per_token: int = 0  # the largest layer's share (0: not known)
    # activations grow with the context a call attends to: (bytes per chunk token per context
    # token, bytes added by any context, and by any context per chunk token), measured at load
    context_activation: tuple = (0.0, 0.0, 0.0)
    # a quantized KV cache (kv_quant.py): (bytes per token, the largest layer's, the context at
    # which mlx-lm quantizes it); () for a cache kept in the model's dtype
    kv_quantized: tuple = ()

    def kv_bytes(self, tokens: int, chunk: int | None = None) -> int:
        """KV bytes at the peak of holding ``tokens``. A quantized cache: below its start, as
        unquantized; from there on, the quantized cache, but never less than the switch, when
        the call that reaches the start holds its unquantized cache (up to a ``chunk`` past the
        start; None: the longest measured) beside the quantized copy being made."""
        full = kv_bytes_for(tokens, self.kv_bytes_per_token, self.kv_layer_bytes_per_token)
        if not self.kv_quantized:
            return full
        per_token, layer_per_token, start = self.kv_quantized
        if tokens < start:
            return full
        # (a call shorter than the smallest measured chunk is reserved as that chunk, as its
        # activations are)
        switch = start + max(chunk or self.max_chunk, self.activation_points[0][0])
        return max(kv_bytes_for(tokens, per_token, layer_per_token),
                   kv_bytes_for(switch, self.kv_bytes_per_token, self.kv_layer_bytes_per_token)
                   + kv_bytes_for(switch, per_token, layer_per_token))

    def activation_for(self, tokens: int, context: int = 0) -> int:
        """Measured activations of the smallest measured chunk that holds ``tokens``, attending
        to a ``context`` of that many tokens."""
        per_pair, constant, per_token = self.context_activation
        for n, nbytes in self.activation_points:
            if n >= tokens:
                return nbytes + (int(constant + n * (per_token + context * per_pair))
                                 if context else 0)
        raise self.call_too_long(tokens)

    def call_too_long(self, tokens: int, context: int | None = None) -> BudgetError:
        """The error for a call longer than any measured chunk; given the ``context`` it takes
        the cache to, it names the chunk this budget holds there (the measured maximum may
        not fit either)."""
        fits = [n for n, _ in self.activation_points if self.max_context(n) >= context] \
            if context is not None else []
        size = f"{fits[-1]} tokens (what this budget holds at this context)" if fits else \
            "that many tokens"
        return BudgetError(f"a model call of {tokens} tokens is longer than the prefill chunk "
                           f"({self.max_chunk} tokens) whose activations were measured; prefill "
                           f"in chunks of at most {size}")

    @property
    def max_chunk(self) -> int:
        return self.activation_points[-1][0]

    @property
    def activation_reserve_bytes(self) -> int:
        return self.activation_for(self.chunk_tokens, self.kv_tokens)

    @property
    def mlx_cache_limit_bytes(self) -> int:
        """MLX's freed-buffer cache keeps what a chunk freed for the next one to reuse: it shares
        the activation reserve (the activations and the buffers they free never coexist)."""
        return self.activation_reserve_bytes

    @property
    def kv_reserve_bytes(self) -> int:
        return self.kv_bytes(self.kv_tokens, self.chunk_tokens)

    @property
    def expert_cache_bytes(self) -> int:
        return self.high_expert_bytes + self.low_expert_bytes

    @property
    def minimum_bytes(self) -> int:
        """The smallest budget that runs a first KV step of context (mlx-lm's cache grows by
        one): the smallest chunk attending to that context, its KV, one top-k per pool. (Less
        than a step's context would stop a reply after a few tokens.)"""
        return self.need_bytes(KV_STEP, self.activation_points[0][0])

    def max_context(self, chunk: int = 1) -> int:
        """The longest context the budget holds beside a ``chunk``-token call, pools at minimum."""
        return self._context_within(self.budget_bytes - self.dense_bytes - self.min_expert_bytes,
                                    chunk)

    @property
    def longest_context(self) -> int:
        """The longest context a sequence can reach: prompt and reply, decoded (and prefilled
        at the end) in calls of the smallest measured chunk. A longer one fails part way."""
        return self.max_context(self.activation_points[0][0])

    def _context_within(self, room: int, chunk: int) -> int:
        """The longest context whose KV, beside a ``chunk``-token call attending to it, fits in
        ``room`` bytes (in tokens: within a KV step the activations still grow)."""
        def fits(tokens: int) -> bool:  # (KV and activations both grow with the context)
            return self.kv_bytes(tokens, chunk) + self.activation_for(chunk, tokens) <= room

        per_token = min([self.kv_bytes_per_token] + list(self.kv_quantized[:1]))
        lo, hi = 0, (max(0, room) // max(1, per_token) // KV_STEP + 1) * KV_STEP
        while lo + 1 < hi:  # fits(lo) holds (or lo is 0), fits(hi) does not
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        return lo

    def largest_chunk(self, tokens: int) -> int:
        """The longest measured chunk the budget affords beside a ``tokens`` context, its
        activations taking at most ``CHUNK_SHARE`` of what dense weights and KV leave (prefill
        in shorter chunks is a little slower; smaller pools make every decoded token slower).
        Pools that hold every expert they may beside some chunk are never cut for a longer one:
        the longest such chunk (each sequence cut them, and decode grew them back, reading the
        experts again). (Such a chunk must also hold the context beside the pools' minimum,
        which is more than their cap where one layer's top-k in 4 and 2 bits outweighs every
        expert in 4 bits.)"""
        whole = [n for n, _ in self.activation_points if self.budget_bytes - self.dense_bytes
                 - self.activation_for(n, tokens) - self.kv_bytes(tokens, n)
                 >= self.expert_cap_bytes and self.max_context(n) >= tokens]
        if whole:
            return whole[-1]
        room = self.budget_bytes - self.dense_bytes - self.kv_bytes(tokens)
        fits = [n for n, _ in self.activation_points if self.max_context(n) >= tokens
                and self.activation_for(n, tokens) <= CHUNK_SHARE * room]
        return fits[-1] if fits else (self.activation_points[0][0]
                                      if self.max_context(1) >= tokens else 0)

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(kv_reserve_bytes=self.kv_reserve_bytes, expert_cache_bytes=self.expert_cache_bytes,
                 activation_reserve_bytes=self.activation_reserve_bytes,
                 mlx_cache_limit_bytes=self.mlx_cache_limit_bytes, minimum_bytes=self.minimum_bytes)
        return d

    def _split(self, expert_bytes: int) -> tuple[int, int]:
        """(high, low) pool bytes for ``expert_bytes`` of pools."""
        if expert_bytes >= self.all_high_bytes or not self.mixed_precision:
            return min(expert_bytes, self.all_high_bytes), 0
        low = max(int(LOW_SHARE * expert_bytes), self.min_low_bytes)
        return expert_bytes - low, low

    def need_bytes(self, tokens: int, chunk: int) -> int:
        """The smallest budget that holds a ``tokens`` context beside calls of ``chunk`` tokens."""
        chunk = max(1, min(chunk, self.max_chunk))
        return (self.dense_bytes + self.activation_for(chunk, tokens) + self.min_expert_bytes
                + self.kv_bytes(tokens, chunk))

    def fit(self, tokens: int, chunk: int, goal: int = 0, starting: bool = False) -> "BudgetPlan":
        """The plan for a context of ``tokens`` and calls of up to ``chunk`` tokens: KV and
        activations reserved, the pools take the rest up to their cap; when the pools are at
        their cap, what is left raises the chunk (up to the measured maximum), then the context.
        Raises ContextBudgetError when even the smallest pools leave too little; its budget is
        the one that runs the sequence to ``goal`` tokens (its prompt and ``max_tokens``), so
        that a retry at that budget does not stop one token later. ``starting``: a sequence's
        prompt is refused before it runs (its message says so, not that the context reached)."""
        chunk = max(1, min(chunk, self.max_chunk))
        if tokens > self.max_context(chunk):
            shorter = [n for n, _ in self.activation_points if n < chunk
                       and self.max_context(n) >= tokens]
            if shorter and chunk <= tokens:  # the call is too long, not the context
                whole = [n for n in shorter if self.max_context(n) >= goal]  # (to the end)
                raise ContextBudgetError(
                    f"a model call of {chunk} tokens that takes the context to {tokens} tokens "
                    f"does not fit the memory budget {format_size(self.budget_bytes)} (its "
                    f"activations); calls of at most {(whole or shorter)[-1]} tokens do: prefill "
                    f"in chunks of at most that many tokens (prefill_step_size)")
            end = max(tokens, goal)
            need = self.need_bytes(end, chunk)
            what = f"{tokens} tokens need" if end == tokens else \
                f"this sequence may reach {end} tokens, which need"
            reached = (f"the prompt takes the context to {tokens} tokens" if starting
                       else f"the context reached {tokens} tokens")
            raise ContextBudgetError(
                f"{reached}, more than the memory budget "
                f"{format_size(self.budget_bytes)} can hold ({self.max_context(chunk)} tokens with "
                f"the expert pools at their minimum); {what} a budget of at least "
                f"{format_size(need)} ({need} bytes)")
        chunk = next(n for n, _ in self.activation_points if n >= chunk)
        kv = self.kv_bytes(tokens, chunk)
        room = self.budget_bytes - self.dense_bytes - self.activation_for(chunk, tokens) - kv
        if room >= self.expert_cap_bytes:  # the pools hold all they may: spare to chunk, then KV
            spare = self.budget_bytes - self.dense_bytes - self.expert_cap_bytes
            chunk = max([n for n, _ in self.activation_points
                         if self.activation_for(n, tokens) + self.kv_bytes(tokens, n) <= spare]
                        + [chunk])
            left = self.budget_bytes - self.dense_bytes - self.expert_cap_bytes
            tokens = max(tokens, self._context_within(left, chunk))
            room = self.expert_cap_bytes
        high, low = self._split(room)
        return replace(self, kv_tokens=tokens, chunk_tokens=chunk, high_expert_bytes=high,
                       low_expert_bytes=low)


def plan_budget(*, dense_bytes: int, activation_points: list[tuple[int, int]],
                kv_bytes_per_token: int, all_high_bytes: int, min_high_bytes: int,
                min_low_bytes: int, mixed_precision: bool, memory_budget: int | str | None = None,
                expert_residency: float | None = None,
                initial_context: int = INITIAL_CONTEXT,
                kv_layer_bytes_per_token: int = 0,
                context_activation: tuple = (0.0, 0.0, 0.0),
                kv_quantized: tuple = (), activations_measured: bool = True) -> BudgetPlan:
    """Split a budget (or derive one from a residency fraction of the 4-bit expert bytes) for a
    sequence of ``initial_context`` tokens prefilled in the longest measured chunks."""
    if memory_budget is not None and expert_residency is not None:
        raise ValueError("give memory_budget or expert_residency, not both")
    points = tuple(sorted(activation_points))
    min_low = min_low_bytes if mixed_precision else 0
    plan = BudgetPlan(0, dense_bytes, kv_bytes_per_token, points, initial_context, points[-1][0],
                      0, 0, all_high_bytes, min_high_bytes + min_low, min_low, mixed_precision,
                      all_high_bytes, initial_context, kv_layer_bytes_per_token,
                      tuple(context_activation), tuple(kv_quantized))
    kv = plan.kv_bytes(initial_context)
    full_chunk = dense_bytes + plan.activation_for(points[-1][0], initial_context) + kv
    if expert_residency is not None:
        if not 0.0 <= expert_residency <= 1.0:
            raise ValueError(f"expert_residency must be between 0 and 1, not {expert_residency}")
        experts = max(int(expert_residency * all_high_bytes), plan.min_expert_bytes)
        plan = replace(plan, budget_bytes=full_chunk + experts, expert_cap_bytes=experts)
        return plan.fit(initial_context, plan.max_chunk)
    if memory_budget is None:
        # Default: everything if it fits in 60% of the machine, else as much of it as fits there
        # (and within the GPU's working set, where there is one).
        room = int(0.6 * system_memory_bytes())
        if (working_set := gpu_working_set_bytes()) is not None:
            room = min(room, int(0.9 * working_set))
        memory_budget = min(room, full_chunk + all_high_bytes)
    plan = replace(plan, budget_bytes=parse_size(memory_budget))
    if plan.budget_bytes < plan.minimum_bytes:
        minimum = plan.minimum_bytes
        n = points[0][0]
        act = plan.activation_for(n, KV_STEP)
        raise BudgetError(
            f"memory budget {format_size(plan.budget_bytes)} is too small for this model: it needs "
            f"at least {format_size(minimum)} ({minimum} bytes) = dense weights "
            f"{format_size(dense_bytes)} + activations of a {n}-token prefill chunk attending "
            f"to {KV_STEP} tokens ({'measured' if activations_measured else 'estimated'}; "
            f"MLX's buffer cache shares them) {format_size(act)} "
            f"+ KV cache of a first {KV_STEP}-token step, while it grows "
            f"{format_size(plan.kv_bytes(KV_STEP, n))} + "
            f"one layer's top-k experts {format_size(plan.min_expert_bytes)}; anything above "
            "that caches experts, prefills in longer chunks or holds a longer context")
    tokens = min(initial_context, plan.max_context())
    return plan.fit(tokens, plan.largest_chunk(tokens))
