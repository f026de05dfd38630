"""Self-speculative decoding: draft from what is resident, verify with one read per expert.

When storage is the bottleneck, every decoded token pays for the experts it misses. Here the same
model drafts ``k`` tokens with only the experts already resident (``OffloadRuntime.draft_only``:
no storage reads, except a token's top-1 when none of its experts is resident), then one exact
pass runs the real model on the last token and the ``k`` drafts. That pass is a ``k + 1``-token
call, grouped by expert like a prompt chunk, so each missing expert is read once for all of them.

Acceptance: the target's token at each position is chosen from the exact logits (greedy: the
argmax) and a draft is kept while it equals that token. Every token emitted is therefore the
target's own choice given the tokens before it: greedy output is the output of exact
non-speculative decoding, and under sampling each token is drawn from the target's distribution
(the standard speculative-sampling rule with a deterministic draft). The KV cache is written by
the drafts and trimmed back before the verify pass, then trimmed over the rejected drafts.

``AdaptiveK`` picks the draft length from what it measures: the acceptance rate and the seconds
a pass of each length takes (drafting is compute, verifying is compute plus reads). A draft
length of 0 is plain decoding, taken when drafting does not pay (always when every expert is
resident: there is nothing to read).

A separate draft model (``load(..., draft_model=...)``: small, resident, same tokenizer) drafts
through the same loop instead of the model itself, so its draft length adapts the same way
(mlx-lm's own speculative loop drafts a fixed number every pass).
"""

from __future__ import annotations

import os
import statistics
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Callable, Generator, Sequence

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache

DEFAULT_DRAFT_TOKENS = 4


def _layers(cache: list):
    for c in cache:
        yield from _layers(c.caches) if hasattr(c, "caches") else (c,)


def check_rollback(cache: list, rotating: bool = True) -> None:
    """Speculation rolls the KV cache back past the drafts it rejects: every layer's cache must
    allow it. A rotating cache (a sliding-window layer's) allows it only until its window is
    full (``draft_room``); ``rotating=False`` refuses it (mlx-lm's own speculative loop, which
    trims nothing then and keeps the rejected drafts: wrong text)."""
    from mlx_lm.models.cache import RotatingKVCache

    kinds = sorted({type(c).__name__ for c in _layers(cache)
                    if not c.is_trimmable() or (not rotating and isinstance(c, RotatingKVCache))})
    if kinds:
        raise ValueError(f"speculative decoding rolls back the KV cache, which this model's "
                         f"{', '.join(kinds)} cannot do (once past its window, for a rotating "
                         "one): decode without it (speculative=False, no --speculative)")


def draft_room(cache: list) -> int:
    """The most drafts a pass may write and still roll back: a rotating cache trims only while
    it holds less than its window (past it mlx-lm's trim trims nothing, and the rejected drafts
    stayed: the text went wrong on every sliding-window model once its window was full)."""
    from mlx_lm.models.cache import RotatingKVCache

    rooms = [c.max_size - c.offset - 2 for c in _layers(cache) if isinstance(c, RotatingKVCache)]
    return max(0, min(rooms)) if rooms else 1 << 30


def check_draft_tokens(k) -> int:
    """The draft length asked for, as an int >= 1 (``True``: the default), or a ValueError."""
    if k is True:
        return DEFAULT_DRAFT_TOKENS
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"speculative decoding drafts K >= 1 tokens per pass (got K={k!r})")
    return k


@dataclass
class SpeculativeStats:
    """What speculation did since the last reset: tokens drafted and accepted, passes, the time
    spent drafting and verifying (read waits counted apart), and bytes read in each phase."""

    passes: int = 0  # verify passes (a plain decode step counts as a pass with 0 drafts)
    plain_passes: int = 0
    drafted: int = 0
    accepted: int = 0
    emitted: int = 0  # tokens generated (accepted drafts + one token per pass)
    draft_s: float = 0.0
    verify_s: float = 0.0
    read_s: float = 0.0  # time the model waited for reads (within draft_s + verify_s)
    draft_bytes: int = 0
    verify_bytes: int = 0
    draft_misses: int = 0  # experts read while drafting (tokens with no resident expert)
    verify_misses: int = 0
    k_counts: dict = field(default_factory=dict)  # draft length -> passes

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None

    def summary(self) -> dict:
        out = asdict(self)
        n = max(self.emitted, 1)
        out.update(acceptance_rate=self.acceptance_rate,
                   tokens_per_pass=self.emitted / self.passes if self.passes else None,
                   bytes_per_token=(self.draft_bytes + self.verify_bytes) / n,
                   reads_per_token=(self.draft_misses + self.verify_misses) / n,
                   k_counts={str(k): v for k, v in sorted(self.k_counts.items())})
        return out


class AdaptiveK:
    """Chooses each pass's draft length in 0..``max_k`` by expected tokens per second.

    A pass with ``k`` drafts yields ``(1 - a^(k+1)) / (1 - a)`` tokens on average when each draft
    is accepted with chance ``a`` (measured over all drafts, fading). Its seconds (drafting is
    compute; verifying is compute plus the reads of its misses) are the median of the last few
    passes of that length, so one pass slowed by the machine does not decide; a length not
    measured yet is estimated from the nearest measured one plus or minus the measured draft step
    time. After ``probe_every`` passes the length measured longest ago is tried again, so every
    estimate follows the cache and the text; while probes do not change the choice, the gap
    between them doubles (up to ``max_probe_every``): a probe costs a pass at a worse length."""

    def __init__(self, max_k: int, *, adaptive: bool = True, fade: float = 0.8,
                 probe_every: int = 8, max_probe_every: int = 64, window: int = 5,
                 drafter: int | None = None):
        self.max_k, self.adaptive = max_k, adaptive
        self.drafter = drafter  # id() of the separate draft model it measured (None: self-drafts)
        self.fade, self.probe_every, self.max_probe_every = fade, probe_every, max_probe_every
        self._gap, self._last_probe, self._probed_from = probe_every, 0, None
        self.accept = 0.5  # prior: a draft is accepted half the time
        self._seconds: dict[int, deque] = {}
        self._draft_steps: deque = deque(maxlen=window)
        self._window = window
        self._seen_at: dict[int, int] = {}
        self.k = max_k if not adaptive else min(max_k, 2)
        self._passes = 0

    @property
    def seconds(self) -> dict[int, float]:
        return {k: statistics.median(v) for k, v in self._seconds.items()}

    def observe(self, k: int, accepted: int, seconds: float, draft_seconds: float) -> None:
        """A pass with ``k`` drafts, ``accepted`` of them kept, took ``seconds`` in all."""
        self._passes += 1
        self._seen_at[k] = self._passes
        if k:
            # a pass stops at the first rejection: the drafts after it say nothing
            seen = min(k, accepted + 1)
            w = self.fade ** seen
            self.accept = w * self.accept + (1 - w) * accepted / seen
            self._draft_steps.append(draft_seconds / k)
        self._seconds.setdefault(k, deque(maxlen=self._window)).append(seconds)

    def expected_tokens(self, k: int) -> float:
        a = min(self.accept, 0.999)
        return (1 - a ** (k + 1)) / (1 - a)

    def estimated_seconds(self, k: int) -> float | None:
        seconds = self.seconds
        if k in seconds:
            return seconds[k]
        if not seconds:
            return None
        near = min(seconds, key=lambda m: abs(m - k))
        step = statistics.median(self._draft_steps) if self._draft_steps else seconds[near]
        return max(1e-9, seconds[near] + (k - near) * step)

    def rate(self, k: int) -> float:
        s = self.estimated_seconds(k)
        return self.expected_tokens(k) / s if s else 0.0

    def next_k(self, limit: int) -> int:
        """The draft length for the next pass, at most ``limit``."""
        if not self.adaptive:
            return min(self.k, limit)
        if self._seconds:
            self.k = max(range(self.max_k + 1), key=self.rate)
        if self._probed_from is not None:  # the pass after a probe: did it change the choice?
            same = self.k == self._probed_from
            self._gap = min(2 * self._gap, self.max_probe_every) if same else self.probe_every
            self._probed_from = None
        k = self.k
        if self._passes - self._last_probe >= self._gap:  # refresh the stalest length
            self._last_probe, self._probed_from = self._passes, self.k
            k = min((m for m in range(self.max_k + 1) if m != self.k),
                    key=lambda m: self._seen_at.get(m, -1), default=self.k)
        return max(0, min(k, limit))


def speculative_generate_step(
        prompt: mx.array, model, *, num_draft_tokens: int = DEFAULT_DRAFT_TOKENS,
        adaptive: bool = True, max_tokens: int = 256,
        sampler: Callable[[mx.array], mx.array] | None = None,
        logits_processors: Sequence[Callable] | None = None, prompt_cache=None,
        prefill_step_size: int = 512, stats: SpeculativeStats | None = None,
        controller: AdaptiveK | None = None, draft_model=None,
        prompt_progress_callback: Callable[[int, int], None] | None = None,
) -> Generator[tuple[int, mx.array, bool], None, None]:
    """Yields ``(token, logprobs, from_draft)`` like mlx-lm's ``speculative_generate_step``, with
    the model itself drafting from its resident experts (see the module docstring), or with
    ``draft_model`` (a small resident mlx-lm model, same tokenizer) drafting; either way the
    draft length follows ``controller`` (0: a plain pass)."""
    from .loader import runtime_of

    k_max = check_draft_tokens(num_draft_tokens)
    rt = runtime_of(model)  # (a ValueError for a model hobbit_mlx.load did not load)
    cache = prompt_cache if prompt_cache is not None else make_prompt_cache(model)
    drafter = None if draft_model is None else _DraftModel(
        draft_model, min(prefill_step_size, rt.plan.chunk_tokens))
    for c in [cache] + ([drafter.cache] if drafter is not None else []):
        check_rollback(c)
    stats = stats if stats is not None else SpeculativeStats()
    ctl = controller or AdaptiveK(k_max, adaptive=adaptive)
    history = prompt[:-1].astype(mx.uint32) if logits_processors else None

    def choose(logits: mx.array, tokens: mx.array | None, draw: bool):
        """Token and log-probabilities of one position's logits [V]."""
        if logits_processors:
            for proc in logits_processors:
                logits = proc(tokens, logits[None])[0]
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        if draw and sampler is not None:
            return sampler(logprobs[None])[0], logprobs
        return mx.argmax(logprobs, axis=-1), logprobs

    y = prompt.astype(mx.uint32)
    progress = prompt_progress_callback or (lambda *_: None)
    progress(0, prompt.size)
    while y.size > 1:  # prefill, exact, in chunks (the last token goes with the first pass)
        n = min(prefill_step_size, y.size - 1)
        model(y[:n][None], cache=cache)
        mx.eval([c.state for c in cache])
        if drafter is not None:
            drafter.feed(y[:n])
        y = y[n:]
        progress(prompt.size - y.size, prompt.size)
        mx.clear_cache()
    progress(prompt.size, prompt.size)  # (the last token runs with the first pass, as mlx-lm's)

    ntoks = 0
    while max_tokens < 0 or ntoks < max_tokens:
        left = max_tokens - ntoks if max_tokens >= 0 else 1 << 30
        resident = rt.cache.all_high_resident  # nothing to read: drafting cannot pay
        k = 0 if resident else min(ctl.next_k(left - 1), draft_room(cache), draft_room(
            drafter.cache) if drafter is not None else 1 << 30)
        t0 = time.perf_counter()
        wait0, bytes0 = rt.stats.read_wait_s, rt.stats.bytes_read
        miss0 = rt.stats.misses_high + rt.stats.misses_low
        drafts = []
        if k and drafter is not None:
            drafts = drafter.draft(y, k, history, choose)
        elif k:
            rt.draft_only = True
            try:
                drafts = greedy_drafts(model, cache, y, k, history, choose)
            finally:
                rt.draft_only = False
            trim_prompt_cache(cache, k)
        t1 = time.perf_counter()
        bytes1 = rt.stats.bytes_read
        miss1 = rt.stats.misses_high + rt.stats.misses_low
        inputs = mx.concatenate([y] + drafts) if drafts else y
        logits = model(inputs[None], cache=cache)[0]
        tokens, logprobs = [], []
        hist = history
        for i in range(k + 1):
            if hist is not None:
                hist = mx.concatenate([hist, inputs[i:i + 1]])
            tok, lp = choose(logits[i], hist, draw=True)
            tokens.append(tok)
            logprobs.append(lp)
        mx.eval(tokens)
        target = [int(t.item()) for t in tokens]
        drafted = [int(d.item()) for d in drafts]
        n = 0
        while n < k and drafted[n] == target[n]:
            n += 1
        trim_prompt_cache(cache, k - n)
        if drafter is not None:
            drafter.accepted(y, drafts, n)
        t2 = time.perf_counter()

        stats.passes += 1
        stats.plain_passes += k == 0
        stats.k_counts[k] = stats.k_counts.get(k, 0) + 1
        stats.drafted += k
        stats.accepted += n
        stats.draft_s += t1 - t0
        stats.verify_s += t2 - t1
        stats.read_s += rt.stats.read_wait_s - wait0
        stats.draft_bytes += bytes1 - bytes0
        stats.verify_bytes += rt.stats.bytes_read - bytes1
        stats.draft_misses += miss1 - miss0
        stats.verify_misses += rt.stats.misses_high + rt.stats.misses_low - miss1
        if not resident:
            ctl.observe(k, n, t2 - t0, t1 - t0)

        if history is not None:
            history = mx.concatenate([history, inputs[:n + 1]])
        for i in range(n + 1):
            if max_tokens >= 0 and ntoks >= max_tokens:
                return
            ntoks += 1
            stats.emitted += 1
            try:
                yield target[i], logprobs[i], i < n
            except GeneratorExit:  # the caller stops here (end of sequence, max_tokens)
                _hold_yielded(model, cache, target, n, i)
                raise
        y = mx.array([target[n]], dtype=mx.uint32)
    _hold_yielded(model, cache, [int(y.item())], 0, 0)  # (max_tokens reached)


def _hold_yielded(model, cache, target: list[int], n: int, i: int) -> None:
    """Leave the KV cache holding exactly the tokens yielded, the last (``target[i]``) included,
    as mlx-lm's own loop leaves it (it has always fed the token it yields), so that a caller who
    reuses ``prompt_cache`` for the next turn continues the same sequence. The cache holds the
    pass's accepted ``target[:n]``: drop those past ``i``, or feed ``target[n]``."""
    if i < n:
        trim_prompt_cache(cache, n - 1 - i)
    else:
        model(mx.array([target[n]], dtype=mx.uint32)[None], cache=cache)
        mx.eval([c.state for c in cache])


def greedy_drafts(model, cache, first: mx.array, k: int, history, choose) -> list[mx.array]:
    """``k`` tokens drafted greedily by ``model`` on ``cache`` after the tokens ``first`` (with the
    caller's logits processors, through ``choose``); the cache keeps ``first`` and all drafts but
    the last."""
    drafts, t, hist = [], first, history
    for _ in range(k):
        logits = model(t[None], cache=cache)[0, -1]
        if hist is not None:
            hist = mx.concatenate([hist, t[-1:]])
        t, _ = choose(logits, hist, draw=False)
        t = t.reshape(1).astype(mx.uint32)
        mx.eval(t)
        drafts.append(t)
    return drafts


class _DraftModel:
    """A separate draft model and its KV cache, which trails the target's: tokens the target has
    seen and the draft not yet wait in ``lag`` and go with the draft's next call (a pass that
    drafts nothing costs the draft nothing). No draft call is longer than ``max_call`` tokens,
    the target's planned prefill chunk: the budget reserves activations for that many tokens, and
    a run of plain passes catching up at once went over it."""

    def __init__(self, model, max_call: int) -> None:
        self.model = model
        self.cache = make_prompt_cache(model)
        self.lag: list[mx.array] = []
        self.max_call = max(1, max_call)

    def _catch_up(self, last: mx.array | None = None) -> mx.array:
        """Feed the lag (then ``last``) to the draft's cache in calls of at most ``max_call``
        tokens, all but the last ``max_call`` or fewer, which are returned for the next call."""
        tokens = mx.concatenate(self.lag + ([last] if last is not None else []))
        self.lag = []
        while tokens.size > self.max_call:
            self.model(tokens[:self.max_call][None], cache=self.cache)  # (logits never evaluated)
            mx.eval([c.state for c in self.cache])
            tokens = tokens[self.max_call:]
        return tokens

    def feed(self, tokens: mx.array) -> None:
        """The target has seen ``tokens`` (the prompt, or a plain pass's token)."""
        self.lag.append(tokens)
        if sum(t.size for t in self.lag) > self.max_call:
            self.lag = [self._catch_up()]

    def draft(self, y: mx.array, k: int, history, choose) -> list[mx.array]:
        """``k`` draft tokens after ``y`` (the tokens waiting in the lag go first)."""
        return greedy_drafts(self.model, self.cache, self._catch_up(y), k, history, choose)

    def accepted(self, y: mx.array, drafts: list[mx.array], n: int) -> None:
        """The pass kept ``y`` and the first ``n`` drafts: the draft's cache keeps as much (it
        has seen ``y`` and all drafts but the last)."""
        if not drafts:
            self.feed(y)
        elif n < len(drafts):
            trim_prompt_cache(self.cache, len(drafts) - 1 - n)
        else:
            self.lag = [drafts[-1]]


def stream_generate(model, tokenizer, prompt, *, max_tokens: int = 256,
                    num_draft_tokens: int = DEFAULT_DRAFT_TOKENS, adaptive: bool = True,
                    stats: SpeculativeStats | None = None, **kwargs):
    """``mlx_lm.stream_generate`` with self-speculation: yields mlx-lm ``GenerationResponse``s
    (``from_draft`` marks accepted drafts). ``kwargs`` go to ``speculative_generate_step``
    (``sampler``, ``logits_processors``, ``prompt_cache``, ``prefill_step_size``); the
    statistics of the call are left in ``stats`` and in ``runtime.speculative_stats``."""
    from mlx_lm.generate import GenerationResponse
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    if max_tokens == 0:
        raise ValueError("max_tokens must be non-zero (-1 for no limit)")
    # (``stream``: the caller's thread's default stream, which every op here runs on anyway)
    for name in ("num_draft_tokens", "stream"):
        kwargs.pop(name, None)
    for name in ("input_embeddings", "kv_bits", "max_kv_size"):
        if kwargs.pop(name, None) is not None:
            raise ValueError(f"speculative decoding does not support {name}; pass "
                             "speculative=False for this call")
    if not isinstance(tokenizer, TokenizerWrapper):
        tokenizer = TokenizerWrapper(tokenizer)
    if not isinstance(prompt, mx.array):
        if isinstance(prompt, str):
            bos = tokenizer.bos_token
            prompt = tokenizer.encode(prompt, add_special_tokens=bos is None or not prompt.startswith(bos))
        prompt = mx.array(prompt)
    stats = stats if stats is not None else SpeculativeStats()
    from .loader import runtime_of

    rt = runtime_of(model)
    rt.speculative_stats = stats
    # what the draft length learned carries over to the next sequence of this model (and drafter)
    ctl = getattr(rt, "speculative_controller", None)
    k = check_draft_tokens(num_draft_tokens)
    drafter = None if kwargs.get("draft_model") is None else id(kwargs["draft_model"])
    if ctl is None or (ctl.max_k, ctl.adaptive, ctl.drafter) != (k, adaptive, drafter):
        ctl = rt.speculative_controller = AdaptiveK(k, adaptive=adaptive, drafter=drafter)
    kwargs.setdefault("controller", ctl)
    detokenizer = tokenizer.detokenizer
    detokenizer.reset()
    steps = speculative_generate_step(prompt, model, num_draft_tokens=num_draft_tokens,
                                      adaptive=adaptive, max_tokens=max_tokens, stats=stats,
                                      **kwargs)
    tic = time.perf_counter()
    prompt_tps, n, token, logprobs, from_draft = 0.0, -1, None, None, False

    def response(text, finish):
        return GenerationResponse(
            text=text, token=token, logprobs=logprobs, from_draft=from_draft,
            prompt_tokens=prompt.size, prompt_tps=prompt_tps, generation_tokens=n + 1,
            generation_tps=(n + 1) / max(time.perf_counter() - tic, 1e-9),
            peak_memory=mx.get_peak_memory() / 1e9, finish_reason=finish)

    from mlx_lm.generate import wired_limit

    # (the wired limit as mlx-lm's own loop sets it on a Mac)
    with wired_limit(model, [mx.default_stream(mx.default_device())]):
        try:
            for n, (token, logprobs, from_draft) in enumerate(steps):
                if n == 0:
                    prompt_tps = prompt.size / max(time.perf_counter() - tic, 1e-9)
                    tic = time.perf_counter()
                if token in tokenizer.eos_token_ids:
                    break
                detokenizer.add_token(token)
                if n + 1 == max_tokens:
                    break
                yield response(detokenizer.last_segment, None)
        finally:  # here, in this thread: the cache is left holding what was yielded
            steps.close()
    if token is None:
        return
    detokenizer.finalize()
    yield response(detokenizer.last_segment,
                   "stop" if token in tokenizer.eos_token_ids else "length")


# --- a separate draft model (mlx-lm's own speculative path) ------------------------------------
def draft_passes(from_draft: Sequence[bool], k: int, max_tokens: int) -> tuple[int, int, int]:
    """(drafted, accepted, verify passes) of one generation by mlx-lm's speculative loop (a
    separate draft model), from its responses' ``from_draft`` flags: a pass drafts
    min(``k``, tokens left), yields the drafts it accepted, then one token of the model's own
    unless the accepted drafts reached ``max_tokens``."""
    drafted = accepted = passes = i = 0
    while i < len(from_draft):
        d, run = min(k, max_tokens - i), 0
        while run < d and i + run < len(from_draft) and from_draft[i + run]:
            run += 1
        drafted, accepted, passes = drafted + d, accepted + run, passes + 1
        i += run + (1 if i + run < len(from_draft) else 0)
    return drafted, accepted, passes


class DraftModelError(ValueError):
    """The draft model cannot serve: it does not load, or tokenizes differently."""


def load_draft(path, dtype=None):
    """A small resident draft model for mlx-lm's speculative decoding: (model, tokenizer, bytes
    of its weights, which count inside the memory budget)."""
    import mlx_lm
    from mlx.utils import tree_flatten

    from .loader import compute_dtype

    try:
        model, tokenizer = mlx_lm.load(str(path))
    except Exception as e:  # (a missing directory reaches mlx-lm's hub lookup first)
        reason = "no such directory" if _local_path(str(path)) and not os.path.exists(
            os.path.expanduser(str(path))) else f"{type(e).__name__}: {e}"
        raise DraftModelError(f"cannot load the draft model {path}: {reason}") from e
    cdtype = compute_dtype(dtype)
    if cdtype is not None:
        model.set_dtype(cdtype)
    mx.eval(model.parameters())
    return model, tokenizer, sum(a.nbytes for _, a in tree_flatten(model.parameters()))


def _local_path(name: str) -> bool:
    """A name that can only be a directory, not a hub id ("org/name")."""
    return name.startswith(("/", ".", "~")) or name.count("/") != 1


def check_same_tokenizer(target, draft, draft_path="the draft model") -> None:
    """A draft must tokenize as the target does: the same vocabulary, id for id."""
    a, b = target.get_vocab(), draft.get_vocab()
    if a != b:
        differ = sum(1 for t, i in a.items() if b.get(t) != i) + len(set(b) - set(a))
        raise DraftModelError(f"{draft_path}'s tokenizer differs from the model's ({len(b)} vs "
                         f"{len(a)} tokens, {differ} differ): a draft model must share the "
                         "model's tokenizer")


def with_draft_minimum(err: Exception, draft_bytes: int, budget_bytes: int) -> Exception:
    """The budget error of the model loaded beside a draft, with the minimum stated draft
    included."""
    import re

    from .budget import BudgetError, format_size

    m = re.search(r"\((\d+) bytes\)", str(err))
    if m is None:
        return err
    minimum = int(m.group(1)) + draft_bytes
    return BudgetError(
        f"memory budget {format_size(budget_bytes)} is too small for this model with its draft "
        f"model: it needs at least {format_size(minimum)} ({minimum} bytes) = the draft model's "
        f"weights {format_size(draft_bytes)} + the model's own minimum: {err}")
