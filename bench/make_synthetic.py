#!/usr/bin/env python3
"""Generate a larger synthetic MoE model with realistic expert sizes (random weights, not committed).

    python bench/make_synthetic.py [--out bench/results/tmp/synthetic] [--layers 4] [--experts 64]
        [--hidden 2048] [--moe-intermediate 768] [--top-k 8] [--vocab 512] [--seed 0] [--force]

Writes ``OUT/mlx`` (an mlx-lm 4-bit checkpoint, group 64, built with mlx-lm's own qwen3_moe classes
and ``quantize_model``, with the tiny byte-level BPE tokenizer of ``hobbit_mlx.testing``) and
``OUT/hobbit`` (its conversion by ``convert``). The defaults are the dimensions of a mid-size MoE
layer (Qwen3-30B-A3B-like: hidden 2048, 64 experts of intermediate 768, top-8); 4 layers give
256 experts of ~2.6 MB each in 4-bit, ~0.7 GB of experts (``--layers 8``: ~1.4 GB).

It exists for I/O and memory behaviour at realistic expert sizes. Its weights are random, so its
routing is random: hit rates measured on it are labelled "random routing" and say nothing about a
trained router (random routers are sticky and flatter every cache).

Memory: parameters are created lazily and quantized lazily, then materialised one decoder layer at
a time (the float weights of one stacked projection live briefly), so generation needs about the
4-bit model plus one projection's float experts (~0.4 GB), never the float model.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    import _path  # noqa: F401  (repository root on sys.path, see bench/_path.py)

from bench.workload import TMP, write_marker  # noqa: E402

DEFAULT_OUT = TMP / "synthetic"


def synthetic_config(*, layers: int = 4, experts: int = 64, hidden: int = 2048,
                     moe_intermediate: int = 768, top_k: int = 8, vocab: int = 512) -> dict:
    from hobbit_mlx.testing.tiny_models import BOS_ID, EOS_ID, PAD_ID

    heads = max(1, hidden // 128)
    return {
        "model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"],
        "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": 4 * hidden,
        "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": max(1, heads // 4), "head_dim": 128,
        "moe_intermediate_size": moe_intermediate, "num_experts": experts,
        "num_experts_per_tok": top_k, "decoder_sparse_step": 1, "mlp_only_layers": [],
        "norm_topk_prob": True, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "max_position_embeddings": 4096, "tie_word_embeddings": False,
        "bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID,
    }


def build_checkpoint(out: Path, config: dict, *, seed: int = 0, bits: int = 4,
                     group_size: int = 64, log=print) -> Path:
    """mlx-lm 4-bit checkpoint of a random model, materialised layer by layer."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes, quantize_model, save_config, save_model

    from hobbit_mlx.testing.tiny_models import make_tokenizer

    model_class, args_class = _get_classes(config)
    mx.random.seed(seed)
    model = model_class(args_class.from_dict(config))  # lazy: nothing is materialised yet
    model.eval()
    model.set_dtype(mx.bfloat16)  # scales/biases in bf16, like an mlx-community checkpoint
    with contextlib.redirect_stdout(io.StringIO()):
        model, qconfig = quantize_model(model, config, group_size=group_size, bits=bits)
    t0 = time.perf_counter()
    for i, layer in enumerate(model.model.layers):
        for _, arr in tree_flatten(layer.parameters()):  # one tensor (one float projection) at a time
            mx.eval(arr)
            mx.clear_cache()
        log(f"[synthetic] layer {i + 1}/{len(model.model.layers)} quantized "
            f"({time.perf_counter() - t0:.0f}s, MLX peak {mx.get_peak_memory() / 2**30:.2f} GiB)")
    mx.eval(model.parameters())
    nbytes = sum(a.nbytes for _, a in tree_flatten(model.parameters()))
    out.mkdir(parents=True, exist_ok=True)
    save_model(out, model, donate_model=True)
    del model
    mx.clear_cache()
    save_config(dict(qconfig), config_path=out / "config.json")
    make_tokenizer(out, config["vocab_size"])
    log(f"[synthetic] wrote {out} ({nbytes / 2**30:.2f} GiB of weights)")
    return out


def make_synthetic(out: str | Path = DEFAULT_OUT, *, force: bool = False, seed: int = 0,
                   log=print, **dims) -> tuple[Path, Path]:
    """Build (once) ``OUT/mlx`` and ``OUT/hobbit``; returns both paths."""
    from convert import convert
    from hobbit_mlx.store import is_hobbit_model

    out = Path(out)
    src, dst = out / "mlx", out / "hobbit"
    config = synthetic_config(**dims)
    stamp = {"routing": "random", "made_by": "bench/make_synthetic.py", "seed": seed,
             "dims": dims or "defaults", "config": config}
    marker = src / "bench_model.json"
    same = marker.is_file() and json.loads(marker.read_text()).get("config") == config \
        and json.loads(marker.read_text()).get("seed") == seed
    if force or not same:
        shutil.rmtree(out, ignore_errors=True)
        build_checkpoint(src, config, seed=seed, log=log)
        write_marker(src, **stamp)
    if force or not is_hobbit_model(dst):
        import mlx.core as mx
        mx.reset_peak_memory()
        t0 = time.perf_counter()
        convert(src, dst, force=True, progress=False)
        log(f"[synthetic] converted into {dst} in {time.perf_counter() - t0:.0f}s "
            f"(MLX peak {mx.get_peak_memory() / 2**30:.2f} GiB)")
    return src, dst


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--moe-intermediate", type=int, default=768)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="rebuild even if OUT holds this model")
    a = p.parse_args(argv)
    dims = dict(layers=a.layers, experts=a.experts, hidden=a.hidden,
                moe_intermediate=a.moe_intermediate, top_k=a.top_k, vocab=a.vocab)
    src, dst = make_synthetic(a.out, force=a.force, seed=a.seed, **dims)
    from hobbit_mlx.store import load_manifest
    m = load_manifest(dst)
    print(f"mlx-lm checkpoint: {src}\nhobbit model:      {dst}\nexperts: {len(m.layers)} layers x "
          f"{m.num_experts}, top-{m.experts_per_token}; 4-bit {m.expert_bytes('high') / 2**20:.0f} MiB "
          f"({m.layers[0].precisions['high'].expert_nbytes / 2**20:.2f} MiB each), 2-bit "
          f"{m.expert_bytes('low') / 2**20:.0f} MiB; routing: random")
    return 0


if __name__ == "__main__":
    sys.exit(main())
