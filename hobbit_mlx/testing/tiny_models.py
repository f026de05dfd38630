"""Tiny random-weight MoE models of mlx-lm architectures, built fully offline.

The models are meant for tests and benchmarks: every architecture in
``TINY_ARCHS`` is instantiated with mlx-lm's own model classes, given random
(non-degenerate) weights, optionally quantized with mlx-lm's own
``quantize_model`` and saved with mlx-lm's ``save_model``/``save_config`` next
to a small byte-level BPE tokenizer, so that ``mlx_lm.load(out_dir)`` works
without any network access.

Usage::

    from hobbit_mlx.testing.tiny_models import make_tiny_model
    path = make_tiny_model("qwen3_moe", tmp_path / "qwen3_moe")
    model, tokenizer = mlx_lm.load(str(path))

CLI::

    python -m hobbit_mlx.testing.tiny_models ARCH OUT_DIR [--no-quantize]
        [--bits 4] [--group-size 64] [--seed 0] [--hf-per-expert]

Quirks found while building the models (mlx-lm 0.32):

* Several routers/biases are zero-initialised by mlx-lm (deepseek-style
  ``gate.weight``, ``e_score_correction_bias``, sinks, biases); they are given
  random values here so that routing differs across tokens.
* On CPU, ``gather_mm`` only supports float32: a bfloat16 checkpoint must be
  ``model.set_dtype(mx.float32)``-ed before running its experts.

The per-architecture configs and their quirks are in
:mod:`hobbit_mlx.testing.tiny_configs`, the tokenizer in
:mod:`hobbit_mlx.testing.tiny_tokenizer` and the HF per-expert writer in
:mod:`hobbit_mlx.testing.tiny_hf_checkpoint`; their public names are
re-exported here, so callers import everything from this module.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import math
from pathlib import Path
from typing import Optional, Tuple, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from .tiny_configs import (
    HF_PER_EXPERT_ARCHS,
    REQUIRED_ARCHS,
    SKIPPED_ARCHS,
    TINY_ARCHS,
    UNVERIFIED_ARCHS,
    _vocab_size,
    tiny_config,
)
from .tiny_hf_checkpoint import expert_module_paths, save_hf_per_expert
from .tiny_tokenizer import VOCAB_SIZE, make_tokenizer
# Not in __all__, re-exported for bench/make_synthetic.py.
from .tiny_tokenizer import BOS_ID, EOS_ID, PAD_ID  # noqa: F401

__all__ = [
    "TINY_ARCHS",
    "SKIPPED_ARCHS",
    "REQUIRED_ARCHS",
    "UNVERIFIED_ARCHS",
    "HF_PER_EXPERT_ARCHS",
    "VOCAB_SIZE",
    "tiny_config",
    "build_model",
    "make_tokenizer",
    "make_tiny_model",
    "save_hf_per_expert",
    "expert_module_paths",
    "check_tiny_model",
]

# ---------------------------------------------------------------------------
# Model building
# ---------------------------------------------------------------------------


def _get_classes(config: dict):
    from mlx_lm.utils import _get_classes as get_classes

    return get_classes(config)


def _reinit_parameters(model: nn.Module, seed: int) -> None:
    """Cast to float32 and replace all-zero parameters by small random values.

    mlx-lm constructors initialise some parameters to zeros (biases, MoE gate
    weights of deepseek-style routers, e_score_correction_bias, attention
    sinks, ...).  Zeros would make routing identical for every token, so give
    them random values.  2D+ "weight" tensors get a Linear-like uniform init,
    everything else small normal noise.
    """
    params = tree_flatten(model.parameters())
    new = []
    for i, (name, v) in enumerate(params):
        if not mx.issubdtype(v.dtype, mx.floating):
            continue
        v = v.astype(mx.float32)
        if v.size > 0 and not mx.any(v != 0).item():
            k = mx.random.split(mx.random.key(seed * 100003 + i + 1))[1]
            if name.endswith("weight") and v.ndim >= 2:
                scale = 1.0 / math.sqrt(v.shape[-1])
                v = mx.random.uniform(-scale, scale, v.shape, key=k)
            else:
                v = 0.02 * mx.random.normal(v.shape, key=k)
        new.append((name, v))
    model.update(tree_unflatten(new))


def build_model(
    arch: str,
    *,
    seed: int = 0,
    config_overrides: Optional[dict] = None,
) -> Tuple[nn.Module, dict]:
    """Instantiate a random-weight float32 mlx-lm model for ``arch``.

    Returns ``(model, config)`` where ``config`` is the hub-style config dict.
    """
    config = tiny_config(arch, config_overrides)
    model_class, args_class = _get_classes(config)
    mx.random.seed(seed)
    # Some ModelArgs mutate nested dicts; keep config as written.
    model = model_class(args_class.from_dict(copy.deepcopy(config)))
    _reinit_parameters(model, seed)
    model.eval()
    mx.eval(model.parameters())
    return model, config


def _quantize(model, config, bits, group_size):
    from mlx_lm.utils import quantize_model

    with contextlib.redirect_stdout(io.StringIO()):
        return quantize_model(model, config, group_size=group_size, bits=bits)


def _save(model, config, out_dir: Path, vocab_size: int) -> None:
    from mlx_lm.utils import save_config, save_model

    out_dir.mkdir(parents=True, exist_ok=True)
    save_model(out_dir, model)
    save_config(dict(config), config_path=out_dir / "config.json")
    make_tokenizer(out_dir, vocab_size)


def make_tiny_model(
    arch: str,
    out_dir: Union[str, Path],
    *,
    quantize: bool = True,
    bits: int = 4,
    group_size: int = 64,
    seed: int = 0,
    config_overrides: Optional[dict] = None,
) -> Path:
    """Build a tiny random model of ``arch`` and save it (mlx-lm format) to out_dir.

    With ``quantize=True`` mlx-lm's ``quantize_model`` is applied (affine,
    ``bits``/``group_size``); config.json then holds the ``quantization`` entry
    the way ``mlx_lm.convert`` writes it.  With ``quantize=False`` float32
    weights are saved in mlx-lm form (experts stacked).
    """
    out_dir = Path(out_dir)
    model, config = build_model(arch, seed=seed, config_overrides=config_overrides)
    if quantize:
        model, config = _quantize(model, config, bits, group_size)
    _save(model, config, out_dir, _vocab_size(config))
    return out_dir


# ---------------------------------------------------------------------------
# Checking
# ---------------------------------------------------------------------------


def check_tiny_model(path: Union[str, Path], prompt: str = "def hello(x):\n    return x") -> mx.array:
    """Load with mlx_lm.load, run one forward pass, return the logits (1, L, V)."""
    import mlx_lm

    model, tokenizer = mlx_lm.load(str(path))
    ids = tokenizer.encode(prompt)
    logits = model(mx.array(ids)[None])
    mx.eval(logits)
    return logits


def _main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("arch", choices=sorted(TINY_ARCHS) + sorted(UNVERIFIED_ARCHS))
    p.add_argument("out_dir")
    p.add_argument("--no-quantize", action="store_true")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--hf-per-expert",
        action="store_true",
        help="write an unquantized HF-style per-expert checkpoint instead",
    )
    a = p.parse_args(argv)
    if a.hf_per_expert:
        model, config = build_model(a.arch, seed=a.seed)
        path = save_hf_per_expert(model, a.out_dir, config=config)
    else:
        path = make_tiny_model(
            a.arch,
            a.out_dir,
            quantize=not a.no_quantize,
            bits=a.bits,
            group_size=a.group_size,
            seed=a.seed,
        )
    print(path)


if __name__ == "__main__":
    _main()
