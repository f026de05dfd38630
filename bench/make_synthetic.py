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

    python bench/make_synthetic.py --widen-reference 70 [--out bench/results/tmp/reference-wide70]

builds the other kind: the bundled reference model (trained routing) with every expert widened
from 64 to 64 x 70 intermediate units, ~2.7 MB per 4-bit expert like Qwen3-30B-A3B's. The added
units have random gate and up rows and an all-zero down projection, so every expert computes what
it computed before, in 4-bit and in 2-bit (the original groups are kept bit for bit): the wide
model's tokens, routing and perplexity are the reference model's, while each expert read and each
expert matmul costs what a realistic expert's does.

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

from bench.arguments import refuse_bad_input  # noqa: E402
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


def widen_reference(out: Path, factor: int, *, seed: int = 0, log=print) -> Path:
    """The reference checkpoint with each expert's intermediate size x ``factor`` (see the module
    docstring): new gate/up rows random, new down-projection columns zero, old groups untouched.
    ``factor`` >= 1 (``make_wide_reference`` checks it before replacing anything)."""
    import mlx.core as mx

    from bench.workload import REFERENCE_MODEL

    config = json.loads((REFERENCE_MODEL / "config.json").read_text())
    q = config["quantization"]
    group, bits = q["group_size"], q["bits"]
    inter = config["moe_intermediate_size"]
    if inter % group:
        raise SystemExit(f"the reference's expert width {inter} is not a multiple of group {group}")
    extra = inter * (factor - 1)
    weights = {}
    for f in sorted(REFERENCE_MODEL.glob("*.safetensors")):
        weights.update(mx.load(str(f)))
    mx.random.seed(seed)
    for i in range(config["num_hidden_layers"]):
        pre = f"model.layers.{i}.mlp.switch_mlp."
        for proj in ("gate_proj", "up_proj"):  # [E, I, H]: new rows, quantized like the old ones
            w = weights[pre + proj + ".weight"]
            n_exp, hidden = w.shape[0], w.shape[2] * 32 // bits
            old = mx.dequantize(w, weights[pre + proj + ".scales"], weights[pre + proj + ".biases"],
                                group_size=group, bits=bits)
            std = mx.std(old).item()
            new = mx.random.normal((n_exp, extra, hidden)) * std
            nw, ns, nb = mx.quantize(new, group_size=group, bits=bits)
            for part, add in ((".weight", nw), (".scales", ns), (".biases", nb)):
                weights[pre + proj + part] = mx.concatenate(
                    [weights[pre + proj + part], add.astype(weights[pre + proj + part].dtype)], axis=1)
        for part in (".weight", ".scales", ".biases"):  # [E, H, I]: new columns all zero
            a = weights[pre + "down_proj" + part]
            cols = extra * bits // 32 if part == ".weight" else extra // group
            weights[pre + "down_proj" + part] = mx.concatenate(
                [a, mx.zeros((*a.shape[:2], cols), dtype=a.dtype)], axis=2)
        mx.eval({k: v for k, v in weights.items() if k.startswith(pre)})
        log(f"[wide] layer {i + 1}/{config['num_hidden_layers']} widened x{factor}")
    config["moe_intermediate_size"] = inter * factor
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "model.safetensors.tmp.safetensors"
    mx.save_safetensors(str(tmp), weights, metadata={"format": "mlx"})
    tmp.rename(out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(config, indent=4))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (REFERENCE_MODEL / name).is_file():
            shutil.copy2(REFERENCE_MODEL / name, out / name)
    return out


def build_once(out: str | Path, stamp: dict, build, *, same_keys: tuple, force: bool = False,
               log=print) -> tuple[Path, Path]:
    """``OUT/mlx`` made by ``build(src)`` and stamped, and ``OUT/hobbit`` its conversion, each
    made only when missing, when the stamp's ``same_keys`` differ, or with ``force``."""
    import mlx.core as mx

    from convert import convert
    from hobbit_mlx.store import is_hobbit_model

    out = Path(out)
    src, dst = out / "mlx", out / "hobbit"
    marker = src / "bench_model.json"
    old = json.loads(marker.read_text()) if marker.is_file() else {}
    if force or any(old.get(k) != stamp[k] for k in same_keys):
        shutil.rmtree(out, ignore_errors=True)
        build(src)
        write_marker(src, **stamp)
    if force or not is_hobbit_model(dst):
        mx.reset_peak_memory()
        t0 = time.perf_counter()
        convert(src, dst, force=True, progress=False)
        log(f"[bench model] converted into {dst} in {time.perf_counter() - t0:.0f}s "
            f"(MLX peak {mx.get_peak_memory() / 2**30:.2f} GiB)")
    return src, dst


def make_wide_reference(out: str | Path, factor: int, *, force: bool = False, seed: int = 0,
                        log=print) -> tuple[Path, Path]:
    """Build (once) ``OUT/mlx`` (the widened reference) and ``OUT/hobbit``; returns both paths."""
    if factor < 1:  # before anything in OUT is replaced
        raise SystemExit(f"--widen-reference must be >= 1, not {factor}")
    stamp = {"routing": "trained", "made_by": "bench/make_synthetic.py --widen-reference",
             "widen": factor, "seed": seed}
    return build_once(out, stamp, lambda src: widen_reference(src, factor, seed=seed, log=log),
                      same_keys=("made_by", "widen", "seed"), force=force, log=log)


def make_synthetic(out: str | Path = DEFAULT_OUT, *, force: bool = False, seed: int = 0,
                   log=print, **dims) -> tuple[Path, Path]:
    """Build (once) ``OUT/mlx`` and ``OUT/hobbit``; returns both paths."""
    config = synthetic_config(**dims)
    stamp = {"routing": "random", "made_by": "bench/make_synthetic.py", "seed": seed,
             "dims": dims or "defaults", "config": config}
    return build_once(out, stamp, lambda src: build_checkpoint(src, config, seed=seed, log=log),
                      same_keys=("config", "seed"), force=force, log=log)


@refuse_bad_input
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(DEFAULT_OUT),
                   help="default: bench/results/tmp/synthetic ($HOBBIT_BENCH_TMP/synthetic)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--moe-intermediate", type=int, default=768)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="rebuild even if OUT holds this model")
    p.add_argument("--widen-reference", type=int, default=None, metavar="FACTOR",
                   help="instead: the bundled reference model (trained routing) with experts "
                        "FACTOR x wider, computing what they computed (default out: "
                        "bench/results/tmp/reference-wideFACTOR)")
    a = p.parse_args(argv)
    if a.widen_reference is not None and a.widen_reference < 1:
        p.error(f"--widen-reference must be >= 1, not {a.widen_reference}")
    for flag in ("layers", "experts", "hidden", "moe_intermediate", "top_k", "vocab"):
        if getattr(a, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1, not {getattr(a, flag)}")
    if a.top_k > a.experts:
        p.error(f"--top-k {a.top_k} is more than the {a.experts} experts")
    routing = "random"
    if a.widen_reference is not None:
        out = a.out if a.out != str(DEFAULT_OUT) else str(TMP / f"reference-wide{a.widen_reference}")
        src, dst = make_wide_reference(out, a.widen_reference, force=a.force, seed=a.seed)
        routing = "trained (the reference model's)"
    else:
        dims = dict(layers=a.layers, experts=a.experts, hidden=a.hidden,
                    moe_intermediate=a.moe_intermediate, top_k=a.top_k, vocab=a.vocab)
        src, dst = make_synthetic(a.out, force=a.force, seed=a.seed, **dims)
    from hobbit_mlx.store import load_manifest
    m = load_manifest(dst)
    print(f"mlx-lm checkpoint: {src}\nhobbit model:      {dst}\nexperts: {len(m.layers)} layers x "
          f"{m.num_experts}, top-{m.experts_per_token}; 4-bit {m.expert_bytes('high') / 2**20:.0f} MiB "
          f"({m.layers[0].precisions['high'].expert_nbytes / 2**20:.2f} MiB each), 2-bit "
          f"{m.expert_bytes('low') / 2**20:.0f} MiB; routing: {routing}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
