"""hobbit_mlx: run Mixture-of-Experts models larger than memory on MLX.

The API mirrors mlx-lm: ``model, tokenizer = hobbit_mlx.load(path, memory_budget="6GB")``, then
``hobbit_mlx.generate`` / ``hobbit_mlx.stream_generate`` (or mlx-lm's own, which work too).
"""

from __future__ import annotations

from typing import Generator

import mlx_lm

from .budget import BudgetError, parse_size
from .loader import context_of, footprint, load, offload_stats, reset_stats, runtime_of
from .options import LoadOptions
from .pipeline import PipelineError, gather_stats as pipeline_stats
from .store import StoreError
from .architectures import UnsupportedModelError

__version__ = "0.1.0"


def _with_defaults(model, tokenizer, prompt, kwargs: dict) -> dict:
    """A new sequence starts: per-sequence cache statistics reset, the budget planned for its
    prompt and ``max_tokens``, and prefill chunks no longer than the plan reserved for."""
    runtime = runtime_of(model)
    if isinstance(prompt, str):
        n_prompt = len(tokenizer.encode(prompt))
    else:
        n_prompt = int(prompt.size) if hasattr(prompt, "size") else len(prompt)
    max_new = kwargs.get("max_tokens", 256)
    runtime.new_sequence(context_of(kwargs.get("prompt_cache")), n_prompt,
                         max_new if max_new and max_new > 0 else 0)
    step = kwargs.get("prefill_step_size") or runtime.prefill_step_size
    kwargs["prefill_step_size"] = max(1, min(step, runtime.plan.chunk_tokens))
    return kwargs


def stream_generate(model, tokenizer, prompt, max_tokens: int = 256, draft_model=None,
                    **kwargs) -> Generator["mlx_lm.generate.GenerationResponse", None, None]:
    """mlx-lm's ``stream_generate``, with the budget planned for this sequence first."""
    kwargs = _with_defaults(model, tokenizer, prompt, dict(kwargs, max_tokens=max_tokens))
    yield from mlx_lm.stream_generate(model, tokenizer, prompt, draft_model=draft_model, **kwargs)


def generate(model, tokenizer, prompt, verbose: bool = False, **kwargs) -> str:
    """mlx-lm's ``generate``, with the budget planned for this sequence first."""
    return mlx_lm.generate(model, tokenizer, prompt, verbose=verbose,
                           **_with_defaults(model, tokenizer, prompt, kwargs))


__all__ = ["load", "LoadOptions", "generate", "stream_generate", "offload_stats", "reset_stats", "footprint",
           "parse_size", "BudgetError", "StoreError", "UnsupportedModelError", "PipelineError",
           "pipeline_stats"]
