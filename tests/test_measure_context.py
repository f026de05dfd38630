"""Measuring how a call's activations grow with its context holds that context without running
it (``measure._hold_context``): a cache is filled with zero keys of the shapes a run gives it.
Where it cannot be, the tokens run through the model in 256-token calls, which on a pipeline
rank made a tiny model's first load take 13 s instead of 1 s."""

from __future__ import annotations

import mlx.core as mx
from mlx_lm import load as mlx_lm_load
from mlx_lm.models.cache import KVCache, make_prompt_cache

from hobbit_mlx import measure
from hobbit_mlx.testing.tiny_models import make_tiny_model

CONTEXT = 600


class Counted:
    """A model whose calls are counted; ``extra`` caches belong to layers it does not run (as a
    pipeline rank's model makes a cache for every layer and runs its own)."""

    def __init__(self, model, extra: int = 0):
        self.model, self.extra, self.calls = model, extra, 0

    @property
    def layers(self):
        return self.model.layers

    def make_cache(self):
        return make_prompt_cache(self.model) + [KVCache() for _ in range(self.extra)]

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.model(*args, **kwargs)


def _shapes(cache) -> list:
    return [(type(c).__name__, c.offset, getattr(c, "start_position", 0),
             None if c.keys is None else tuple(c.keys.shape)) for c in cache]


def _held_and_run(model) -> tuple[list, list]:
    """The caches ``_hold_context`` leaves and those a run of the same tokens leaves."""
    tokens = mx.array([[(5 * i + 1) % 50 + 1 for i in range(CONTEXT)]])
    held = model.make_cache()
    measure._hold_context(model, held, tokens)
    run = model.make_cache()
    for start in range(0, CONTEXT, 256):
        model(tokens[:, start:start + 256], cache=run)
    return _shapes(held), _shapes(run)


def test_caches_of_layers_that_do_not_run_stay_empty_and_nothing_runs(tmp_path):
    model, _ = mlx_lm_load(str(make_tiny_model("olmoe", tmp_path / "olmoe")))
    counted = Counted(model, extra=2)
    held, run = _held_and_run(counted)
    assert held == run
    assert held[-1][1:] == (0, 0, None) and held[0][1] == CONTEXT
    assert counted.calls == 1 + len(range(0, CONTEXT, 256))  # the probe, then the run's calls


def test_a_chunked_cache_is_left_as_calls_of_the_tokens_leave_it(tmp_path):
    """llama4's chunked attention layers (the tiny model's chunk, 16 tokens, is far shorter than
    the context: the model trims those caches before each call)."""
    model, _ = mlx_lm_load(str(make_tiny_model("llama4", tmp_path / "llama4")))
    counted = Counted(model)
    held, run = _held_and_run(counted)
    assert held == run
    assert any(kind == "ChunkedKVCache" and start > 0 for kind, _, start, _ in held)
    assert counted.calls == 1 + len(range(0, CONTEXT, 256))
