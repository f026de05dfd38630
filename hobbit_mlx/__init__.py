"""hobbit_mlx: run Mixture-of-Experts models larger than memory on MLX.

The API mirrors mlx-lm: ``model, tokenizer = hobbit_mlx.load(path, memory_budget="6GB")``, then
``hobbit_mlx.generate`` / ``hobbit_mlx.stream_generate`` (or mlx-lm's own, which work too).
"""

from __future__ import annotations

from typing import Generator

import mlx_lm

from .budget import BudgetError, parse_size
from .loader import footprint, load, offload_stats, reset_stats, runtime_of
from .options import LoadOptions
from .store import StoreError
from .architectures import UnsupportedModelError

__version__ = "0.1.0"


def _with_defaults(model, kwargs: dict) -> dict:
    """A new sequence starts: reset per-sequence cache statistics; use our prefill chunk size."""
    runtime = runtime_of(model)
    runtime.new_sequence()
    kwargs.setdefault("prefill_step_size", runtime.prefill_step_size)
    return kwargs


def stream_generate(model, tokenizer, prompt, max_tokens: int = 256, draft_model=None,
                    **kwargs) -> Generator["mlx_lm.generate.GenerationResponse", None, None]:
    """mlx-lm's ``stream_generate`` with the offloaded model's prefill chunk size."""
    yield from mlx_lm.stream_generate(model, tokenizer, prompt, max_tokens=max_tokens,
                                      draft_model=draft_model, **_with_defaults(model, kwargs))


def generate(model, tokenizer, prompt, verbose: bool = False, **kwargs) -> str:
    """mlx-lm's ``generate`` with the offloaded model's prefill chunk size."""
    return mlx_lm.generate(model, tokenizer, prompt, verbose=verbose, **_with_defaults(model, kwargs))


__all__ = ["load", "LoadOptions", "generate", "stream_generate", "offload_stats", "reset_stats", "footprint",
           "parse_size", "BudgetError", "StoreError", "UnsupportedModelError"]
