"""hobbit_mlx: run Mixture-of-Experts models larger than memory on MLX.

The API mirrors mlx-lm: ``model, tokenizer = hobbit_mlx.load(path, memory_budget="6GB")``, then
``hobbit_mlx.generate`` / ``hobbit_mlx.stream_generate`` (or mlx-lm's own, which work too).
"""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from dataclasses import replace
from typing import Generator

from .versions import check_installed

check_installed()  # before mlx-lm's modules are imported: an old one fails there, unnamed

import mlx.core as mx
import mlx_lm

from . import layer_major
from .budget import BudgetError, ContextBudgetError, parse_size
from .loader import context_of, footprint, load, offload_stats, reset_stats, runtime_of
from .options import LoadOptions
from .pipeline import PipelineError, gather_stats as pipeline_stats, pipeline_of
from .store import StoreError
from .architectures import UnsupportedModelError

__version__ = "0.1.0"


class _GenerationLock:
    """One generation at a time on a model: held from a generation's start to its end, across
    ``stream_generate``'s yields. A plain lock (not re-entrant), so that a generator closed by
    the garbage collector in another thread still releases it; the owner is kept to refuse a
    second generation started in the thread that holds it (it would wait for itself)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.owner: int | None = None

    @contextmanager
    def held(self):
        if self.owner == threading.get_ident():
            raise RuntimeError("a generation on this model is still running in this thread: "
                               "finish or close() its stream_generate first")
        with self._lock:
            self.owner = threading.get_ident()
            try:
                yield
            finally:
                self.owner = None


_locks_lock = threading.Lock()


def _generation_lock(model) -> _GenerationLock:
    runtime = runtime_of(model)
    with _locks_lock:
        lock = getattr(runtime, "generation_lock", None)
        if lock is None:
            lock = runtime.generation_lock = _GenerationLock()
    return lock


def _finish(model, error: BaseException | None = None) -> None:
    """A generation ends: evaluate what it left lazy on the runtime (outputs held for the next
    sync, router indices counted later) in its own thread, since an MLX array built on one
    thread's stream cannot be evaluated in another (mlx-lm's generation stream is per thread).
    After a failure (or a generator closed early) this is best effort: the error stays the one
    raised. A pipeline that failed evaluates nothing more: what it left lazy waits on its peers,
    and a lost peer never answers (a generator closed early is not a failure: every rank
    settles alike)."""
    runtime = runtime_of(model)
    if error is not None and not isinstance(error, GeneratorExit) \
            and pipeline_of(model) is not None:
        runtime.abandon_lazy()
        return
    try:
        runtime.settle()
        runtime.count_deferred()
    except Exception:
        if error is None:
            raise


def _draft_tokens(model, speculative, kwargs: dict) -> tuple[int, bool]:
    """(K, adaptive) for this call: ``speculative`` (an int K, False or 0: off) or load()'s
    setting; with speculation on, mlx-lm's ``num_draft_tokens`` keyword sets K too."""
    from .speculative import check_draft_tokens

    k, adaptive = getattr(runtime_of(model), "speculative", (0, True))
    if speculative is False or speculative == 0:
        return 0, adaptive
    if speculative is not None:
        k = check_draft_tokens(speculative)
    if k and kwargs.get("num_draft_tokens") is not None:
        k = check_draft_tokens(kwargs.pop("num_draft_tokens"))
    return k, adaptive


def _kv_quant_kwargs(runtime, kwargs: dict) -> dict:
    """mlx-lm's KV quantization keywords as ``load`` set them (the budget planned for that). A
    call that asks for other ones is refused: its KV cache and attention would not be what the
    budget holds."""
    kq = runtime.kv_quant
    want = kq.generate_kwargs() if kq is not None else {"kv_bits": None}
    asked = {k: kwargs[k] for k in ("kv_bits", "kv_group_size", "quantized_kv_start")
             if k in kwargs and (kq is not None or k == "kv_bits")}
    if any(want.get(k) != v for k, v in asked.items()):
        raise TypeError(f"{', '.join(f'{k}={v!r}' for k, v in asked.items())}: the KV cache's "
                        "quantization is a load option here (load(..., kv_bits=, kv_group_size=, "
                        "quantized_kv_start=)), so that the memory budget plans for it"
                        + (f"; this model was loaded with {want}" if kq is not None else ""))
    return want if kq is not None else {}


def _with_defaults(model, tokenizer, prompt, kwargs: dict, extra_tokens: int = 0,
                   held_tokens: int = 0) -> dict:
    """A new sequence starts: per-sequence cache statistics reset, the budget planned for its
    prompt and ``max_tokens``, and prefill chunks no longer than the plan reserved for.
    ``held_tokens``: memory the prefill holds beside the KV, in KV tokens."""
    runtime = runtime_of(model)
    kwargs.update(_kv_quant_kwargs(runtime, kwargs))
    n_prompt = _prompt_tokens(tokenizer, prompt).size + held_tokens
    max_new = kwargs.get("max_tokens", 256)
    max_new = max_new + extra_tokens if max_new and max_new > 0 else 0
    context = context_of(kwargs.get("prompt_cache"))
    step = kwargs.get("prefill_step_size") or runtime.prefill_step_size
    window = _kv_window(model, kwargs)
    if window is not None:  # a rotating cache holds at most its window and a call's tokens
        room = window + max(1, min(step, runtime.plan.chunk_tokens))
        n_prompt = min(n_prompt, room - context)
        max_new = min(max_new, max(1, room - context - n_prompt)) if max_new else 0
    runtime.new_sequence(context, n_prompt, max_new)
    kwargs["prefill_step_size"] = max(1, min(step, runtime.plan.chunk_tokens))
    return kwargs


ROTATING_KEEP = 4  # tokens mlx-lm's make_prompt_cache(max_kv_size=) keeps at the start


def _kv_window(model, kwargs: dict) -> int | None:
    """The tokens every layer's KV cache holds at most: a rotating cache's (mlx-lm's
    ``max_kv_size``), None when some layer keeps the whole context."""
    cache = kwargs.get("prompt_cache")
    if cache is None:
        size = kwargs.get("max_kv_size")  # (mlx-lm makes rotating caches of it, unless the
        if size is not None and size <= ROTATING_KEEP:  # model makes its own)
            raise ValueError(f"max_kv_size must be more than the {ROTATING_KEEP} first tokens "
                             f"mlx-lm's rotating cache always keeps (got {size}): a call of "
                             "several tokens fails in it")
        return size if size and not hasattr(model, "make_cache") else None
    sizes = [getattr(c, "max_size", None) for c in cache]
    return max(sizes) if sizes and all(isinstance(n, int) for n in sizes) else None


def stream_generate(model, tokenizer, prompt, max_tokens: int = 256, draft_model=None,
                    speculative=None,
                    **kwargs) -> Generator["mlx_lm.generate.GenerationResponse", None, None]:
    """mlx-lm's ``stream_generate``, with the budget planned for this sequence first.
    ``speculative``: draft up to K tokens per pass from the resident experts (an int; False:
    off; None: as loaded, ``load(..., speculative=K)``); ``draft_model``: a loaded mlx-lm model
    drafting through mlx-lm's own speculative loop, outside the budget (``load``'s
    ``draft_model`` counts one inside it).

    Generations on one model run one at a time: this one holds the model from its first
    response until the generator is exhausted, closed or garbage collected, or raises, so a
    ``generate``/``stream_generate`` on the same model in another thread waits until then (and
    one started in this thread while this generator is open raises ``RuntimeError``). Any thread
    may generate; different models generate in parallel.

    ``max_tokens=0`` (which mlx-lm refuses) prefills the prompt into ``prompt_cache`` and yields
    nothing: a long document read once, its cache saved (``python -m hobbit_mlx.cache_prompt``)."""
    if isinstance(draft_model, (str, os.PathLike)):
        raise TypeError("draft_model here is a loaded mlx-lm model (as mlx-lm's stream_generate "
                        "takes it); to draft with a checkpoint by path, pass it to "
                        "load(..., draft_model=PATH), which counts it inside the memory budget")
    with _generation_lock(model).held():
        try:
            yield from _stream(model, tokenizer, prompt, max_tokens, draft_model, speculative,
                               kwargs)
        except BaseException as e:  # an error, or the generator closed (GeneratorExit)
            _finish(model, e)
            raise
        _finish(model)


def _stream(model, tokenizer, prompt, max_tokens, draft_model, speculative, kwargs):
    if max_tokens == 0 and draft_model is not None:
        raise ValueError("max_tokens=0 prefills the prompt cache of the model alone; without "
                         "draft_model")
    k, adaptive = _draft_tokens(model, speculative, kwargs) if draft_model is None else (0, True)
    if max_tokens >= 0:  # no more drafts than tokens to come (a K of 100,000 planned for as
        k = min(k, max_tokens)  # many, and shrank the pools 8x); max_tokens=0: nothing to draft
    if draft_model is not None:  # (mlx-lm's own speculative loop)
        from mlx_lm.models.cache import make_prompt_cache

        from .speculative import check_rollback
        check_rollback(kwargs.get("prompt_cache") or make_prompt_cache(model), rotating=False)
    kwargs = dict(kwargs, max_tokens=max_tokens)
    by_layer = not k and draft_model is None and _layer_major_candidate(model, kwargs)
    if by_layer:  # (the prompt's hidden states are held between layers)
        tokens = _prompt_tokens(tokenizer, prompt)
        held = layer_major.extra_context_tokens(model, tokens.size,
                                                runtime_of(model).kv_bytes_per_token)
        try:
            kwargs = _with_defaults(model, tokenizer, tokens, kwargs, k + 1, held)
        except ContextBudgetError:  # the budget holds the prompt, not its hidden states too:
            by_layer = False        # chunk by chunk it still runs
    if not by_layer:
        kwargs = _with_defaults(model, tokenizer, prompt, kwargs, k + 1)
    # a pass runs K drafts and a token in one call, which must fit the call the budget holds (an
    # adaptive K grew past it and failed mid-reply, blaming the prefill step)
    k = min(k, kwargs["prefill_step_size"] - 1)
    rt = runtime_of(model)
    loaded_draft = getattr(rt, "draft_model", None)
    if k and loaded_draft is not None and rt.cache.all_high_resident:
        # (a loaded draft model cannot pay where nothing is read)
        yield from mlx_lm.stream_generate(model, tokenizer, prompt, **kwargs)
    elif k:  # self-speculation, or the loaded draft model drafting (its draft length adapts)
        from . import speculative as spec
        if loaded_draft is not None:
            kwargs["draft_model"] = loaded_draft
        yield from spec.stream_generate(model, tokenizer, prompt, num_draft_tokens=k,
                                        adaptive=adaptive, **kwargs)
    elif by_layer:
        yield from _prefilled_by_layer(model, tokenizer, tokens, kwargs)
    elif max_tokens == 0:
        yield from _prefill_only(model, tokenizer, prompt, **kwargs)
    else:
        yield from mlx_lm.stream_generate(model, tokenizer, prompt, draft_model=draft_model,
                                          **kwargs)


def _prefill_only(model, tokenizer, prompt, **kwargs):
    """mlx-lm's loop with ``max_tokens=0``: the whole prompt runs into ``prompt_cache`` (its
    last token too), nothing is sampled or yielded (a generator, as its callers yield from)."""
    from mlx_lm.generate import generate_step

    yield from generate_step(_prompt_tokens(tokenizer, prompt), model, **kwargs)


def _prompt_tokens(tokenizer, prompt) -> mx.array:
    """The prompt's tokens, encoded as mlx-lm's ``stream_generate`` encodes them."""
    if isinstance(prompt, mx.array):
        return prompt
    if isinstance(prompt, str):
        bos = getattr(tokenizer, "bos_token", None)
        prompt = tokenizer.encode(prompt, add_special_tokens=bos is None or not prompt.startswith(bos))
    return mx.array(prompt)


def _layer_major_candidate(model, kwargs: dict) -> bool:
    """Whether this generation may prefill layer by layer (``layer_major.py``): the option is
    on, some expert is not resident (with all of them resident nothing is read), no prefetch
    (it guesses the next layer of the same tokens, which this order does not run next), and
    nothing in ``kwargs`` needs mlx-lm to see the whole prompt (a logits processor not marked
    with how far it looks back, a windowed or quantized KV cache, embeddings)."""
    rt = runtime_of(model)
    return rt.layer_major_prefill and not rt.cache.all_high_resident and \
        rt.prefetcher is None and layer_major.decoder_of(model) is not None and \
        layer_major.prompt_tail(kwargs.get("logits_processors")) is not None and \
        not any(kwargs.get(k) is not None for k in ("max_kv_size", "kv_bits", "input_embeddings"))


def _prefilled_by_layer(model, tokenizer, tokens: mx.array, kwargs: dict):
    """The prompt prefilled layer by layer but for its tail (its last token, or as many as the
    logits processors look back), then mlx-lm's ``stream_generate`` from that tail on, its
    responses counting the whole prompt."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = kwargs.get("prompt_cache") or make_prompt_cache(model)
    step = kwargs["prefill_step_size"]
    head = tokens.size - layer_major.prompt_tail(kwargs.get("logits_processors"))
    if not layer_major.applies(model, cache, head, step):
        yield from (_prefill_only if kwargs["max_tokens"] == 0 else mlx_lm.stream_generate)(
            model, tokenizer, tokens, **kwargs)
        return
    rt = runtime_of(model)
    rt.see_call(context_of(cache) + head - step, step)  # (the reserves it ends at)
    start = time.perf_counter()
    from mlx_lm.generate import wired_limit

    progress = kwargs.get("prompt_progress_callback")
    if progress is not None:  # one count over the whole prompt, as mlx-lm's loop gives it
        kwargs = dict(kwargs, prompt_progress_callback=lambda done, _: progress(head + done,
                                                                                tokens.size))
    with wired_limit(model, [mx.default_stream(mx.default_device())]):  # (as mlx-lm's loop)
        layer_major.prefill(model, tokens[:head], cache, step, rt,
                            progress and (lambda done, _: progress(done, tokens.size)))
    # The hidden states are gone: the rest of the sequence plans without them (the pools grow).
    rt.plan_rest(context_of(cache), tokens.size - head, kwargs.get("max_tokens", 256) + 1)
    seconds = time.perf_counter() - start
    kwargs = dict(kwargs, prompt_cache=cache)
    if kwargs["max_tokens"] == 0:
        yield from _prefill_only(model, tokenizer, tokens[head:], **kwargs)
        return
    for r in mlx_lm.stream_generate(model, tokenizer, tokens[head:], **kwargs):
        yield replace(r, prompt_tokens=tokens.size,
                      prompt_tps=tokens.size / (seconds + r.prompt_tokens / r.prompt_tps))


def generate(model, tokenizer, prompt, verbose: bool = False, speculative=None, **kwargs) -> str:
    """mlx-lm's ``generate`` over this package's ``stream_generate`` (the budget planned for the
    sequence first, long prompts prefilled layer by layer; ``speculative``: see there).

    Thread-safe per model: generations on one model (this and ``stream_generate``) run one at a
    time, each with the text a lone generation gives; a second thread waits for the first.

    A context that outgrows the budget part way raises ``ContextBudgetError`` with the text
    generated until then in its ``text``."""
    if verbose:
        print("=" * 10)
    text, r = "", None
    try:
        for r in stream_generate(model, tokenizer, prompt, speculative=speculative, **kwargs):
            if verbose:
                print(r.text, end="", flush=True)
            text += r.text
    except ContextBudgetError as e:
        e.text = text
        raise
    if verbose:
        print()
        print("=" * 10)
        if not text:
            print("No text generated for this prompt")
        else:
            print(f"Prompt: {r.prompt_tokens} tokens, {r.prompt_tps:.3f} tokens-per-sec")
            print(f"Generation: {r.generation_tokens} tokens, {r.generation_tps:.3f} tokens-per-sec")
            print(f"Peak memory: {r.peak_memory:.3f} GB")
    return text


__all__ = ["load", "LoadOptions", "generate", "stream_generate", "offload_stats", "reset_stats",
           "footprint", "parse_size", "BudgetError", "ContextBudgetError", "StoreError",
           "UnsupportedModelError", "PipelineError", "pipeline_stats"]
