"""hobbit_mlx: run Mixture-of-Experts models larger than memory on MLX.

The API mirrors mlx-lm: ``model, tokenizer = hobbit_mlx.load(path, memory_budget="6GB")``, then
``hobbit_mlx.generate`` / ``hobbit_mlx.stream_generate`` (or mlx-lm's own, which work too).
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Generator

import mlx_lm

from .budget import BudgetError, parse_size
from .loader import context_of, footprint, load, offload_stats, reset_stats, runtime_of
from .options import LoadOptions
from .pipeline import PipelineError, gather_stats as pipeline_stats
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


def _finish(model, failed: bool = False) -> None:
    """A generation ends: evaluate what it left lazy on the runtime (outputs held for the next
    sync, router indices counted later) in its own thread, since an MLX array built on one
    thread's stream cannot be evaluated in another (mlx-lm's generation stream is per thread).
    After a failure (or a generator closed early) this is best effort: the error stays the one
    raised."""
    runtime = runtime_of(model)
    try:
        runtime.settle()
        runtime.count_deferred()
    except Exception:
        if not failed:
            raise


def _draft_tokens(model, speculative) -> tuple[int, bool]:
    """(K, adaptive) for this call: ``speculative`` (an int K, False: off) or load()'s setting."""
    k, adaptive = getattr(runtime_of(model), "speculative", (0, True))
    if speculative is None:
        return k, adaptive
    if speculative is False:
        return 0, adaptive
    from .speculative import check_draft_tokens
    return check_draft_tokens(speculative), adaptive


def _with_defaults(model, tokenizer, prompt, kwargs: dict, extra_tokens: int = 0) -> dict:
    """A new sequence starts: per-sequence cache statistics reset, the budget planned for its
    prompt and ``max_tokens``, and prefill chunks no longer than the plan reserved for."""
    runtime = runtime_of(model)
    if isinstance(prompt, str):
        n_prompt = len(tokenizer.encode(prompt))
    else:
        n_prompt = int(prompt.size) if hasattr(prompt, "size") else len(prompt)
    max_new = kwargs.get("max_tokens", 256)
    runtime.new_sequence(context_of(kwargs.get("prompt_cache")), n_prompt,
                         max_new + extra_tokens if max_new and max_new > 0 else 0)
    step = kwargs.get("prefill_step_size") or runtime.prefill_step_size
    kwargs["prefill_step_size"] = max(1, min(step, runtime.plan.chunk_tokens))
    return kwargs


def stream_generate(model, tokenizer, prompt, max_tokens: int = 256, draft_model=None,
                    speculative=None,
                    **kwargs) -> Generator["mlx_lm.generate.GenerationResponse", None, None]:
    """mlx-lm's ``stream_generate``, with the budget planned for this sequence first.
    ``speculative``: draft up to K tokens per pass from the resident experts (an int; False:
    off; None: as loaded, ``load(..., speculative=K)``); ``draft_model`` takes mlx-lm's path.

    Generations on one model run one at a time: this one holds the model from its first
    response until the generator is exhausted, closed or garbage collected, or raises, so a
    ``generate``/``stream_generate`` on the same model in another thread waits until then (and
    one started in this thread while this generator is open raises ``RuntimeError``). Any thread
    may generate; different models generate in parallel."""
    with _generation_lock(model).held():
        try:
            yield from _stream(model, tokenizer, prompt, max_tokens, draft_model, speculative,
                               kwargs)
        except BaseException:  # an error, or the generator closed (GeneratorExit)
            _finish(model, failed=True)
            raise
        _finish(model)


def _stream(model, tokenizer, prompt, max_tokens, draft_model, speculative, kwargs):
    k, adaptive = _draft_tokens(model, speculative) if draft_model is None else (0, True)
    kwargs = _with_defaults(model, tokenizer, prompt, dict(kwargs, max_tokens=max_tokens), k + 1)
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
    else:
        yield from mlx_lm.stream_generate(model, tokenizer, prompt, draft_model=draft_model,
                                          **kwargs)


def generate(model, tokenizer, prompt, verbose: bool = False, speculative=None, **kwargs) -> str:
    """mlx-lm's ``generate``, with the budget planned for this sequence first (``speculative``:
    see ``stream_generate``).

    Thread-safe per model: generations on one model (this and ``stream_generate``) run one at a
    time, each with the text a lone generation gives; a second thread waits for the first."""
    if _draft_tokens(model, speculative)[0] and kwargs.get("draft_model") is None:
        text = ""  # (stream_generate holds the model)
        for r in stream_generate(model, tokenizer, prompt, speculative=speculative, **kwargs):
            if verbose:
                print(r.text, end="", flush=True)
            text += r.text
        if verbose:
            print()
        return text
    with _generation_lock(model).held():
        try:
            text = mlx_lm.generate(model, tokenizer, prompt, verbose=verbose,
                                   **_with_defaults(model, tokenizer, prompt, kwargs))
        except BaseException:
            _finish(model, failed=True)
            raise
        _finish(model)
        return text


__all__ = ["load", "LoadOptions", "generate", "stream_generate", "offload_stats", "reset_stats", "footprint",
           "parse_size", "BudgetError", "StoreError", "UnsupportedModelError", "PipelineError",
           "pipeline_stats"]
