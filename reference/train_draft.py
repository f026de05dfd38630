#!/usr/bin/env python3
"""Train the small dense draft model of the bundled reference model (``hobbit_mlx/reference_draft``).

The reference model (``hobbit_mlx/reference_model``) is a 36M-parameter qwen3_moe. Its draft is a
tiny dense mlx-lm ``qwen3`` trained with MLX on this machine's CPU, on the same corpus and with
the same tokenizer (so the token ids agree, as speculative decoding needs). The draft is
trained as a plain language model (no distillation): sequences at random offsets of the train
stream, AdamW with a linear warmup and a cosine decay, with the loss on the dev split logged.
It is then quantized to 4 bits (group 64) with mlx-lm's ``quantize_model``, keeping float32
scales like the reference model (bf16 activations are ~8x slower on MLX's CPU backend), and
saved as an mlx-lm checkpoint with the reference model's tokenizer files.

Typical use::

    python reference/train.py --corpus-only                 # .corpus/ (tokens + tokenizer), ~20 s
    python reference/train_draft.py --minutes 22            # trains, quantizes, measures acceptance
    python reference/train_draft.py --steps 1828            # the shipped draft's exact schedule
    python reference/train_draft.py --measure-only          # acceptance of the shipped draft

``--minutes`` sets the number of steps from the pace of the first steps and logs it; ``--steps N``
reruns a schedule exactly (same seed, batches and step count: two 40-step runs gave
byte-identical checkpoints). The ``mlx[cpu]`` wheel links a reference BLAS (~5 GFLOP/s), which
makes training ~10x slower; preload OpenBLAS first (shared/RESEARCH.md), e.g.::

    apt-get download libopenblas0-pthread && dpkg -x libopenblas0-pthread_*.deb /tmp/ob
    W=$PWD/.venv/lib/python3.11/site-packages/mlx_cpu.libs; mkdir -p /tmp/oblib
    cp /tmp/ob/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblasp-r*.so /tmp/oblib/libopenblas.so.0
    ln -sf $W/libgfortran-*.so.5.0.0 /tmp/oblib/libgfortran.so.5
    export LD_LIBRARY_PATH=/tmp/oblib:$W LD_PRELOAD=/tmp/oblib/libopenblas.so.0

The log line "fp32 matmul N GFLOP/s" says which BLAS ran (~100-140 with OpenBLAS on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map_with_path

REPO = Path(__file__).resolve().parent.parent
REFERENCE_MODEL = REPO / "hobbit_mlx" / "reference_model"
DEFAULT_OUT = REPO / "hobbit_mlx" / "reference_draft"
DEFAULT_LOG = REPO / "reference" / "draft_train_log.txt"
STDLIB_VAL_FILES = REPO / "reference" / "val_files.txt"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")

SEED = 1234
# mlx-lm / transformers ``qwen3`` (dense), q/k RMSNorm, GQA, tied embeddings.
DRAFT_CONFIG = dict(
    model_type="qwen3",
    architectures=["Qwen3ForCausalLM"],
    vocab_size=4096,
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    hidden_act="silu",
    max_position_embeddings=2048,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    tie_word_embeddings=True,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=1,
)
GROUP_SIZE, BITS = 64, 4
PACE_FROM = 5  # the steps before (compilation, warm caches) do not count in the pace


class Log:
    """Prints progress lines and keeps them for ``--log``."""

    def __init__(self, path: Path | None):
        self.path, self.lines = path, []

    def __call__(self, *parts) -> None:
        line = " ".join(str(p) for p in parts)
        print(line, flush=True)
        self.lines.append(line)

    def save(self, append: bool = False) -> None:
        if self.path is not None:
            with self.path.open("a" if append else "w") as f:
                f.write("\n".join(self.lines) + "\n")


def matmul_gflops(n: int = 512) -> float:
    """fp32 matmul speed: the ``mlx[cpu]`` wheel links a reference BLAS (~5 GFLOP/s here); with
    OpenBLAS preloaded (shared/RESEARCH.md) training runs ~10x faster."""
    a = mx.random.normal((n, n))
    mx.eval(a @ a)
    t = time.perf_counter()
    for _ in range(4):
        mx.eval(a @ a)
    return 4 * 2 * n**3 / (time.perf_counter() - t) / 1e9


# --------------------------------------------------------------------------- data
def load_corpus(corpus_dir: Path) -> dict[str, np.ndarray]:
    """The packed uint16 token streams of ``reference/train.py --corpus-only`` (built if missing)."""
    if not (corpus_dir / "meta.json").exists():
        sys.path.insert(0, str(REPO / "reference"))
        import train as ref_train

        ref_train.build_corpus(ref_train.default_stdlib_dir(), corpus_dir)
    check_tokenizer(corpus_dir / "tokenizer")
    return {s: np.fromfile(corpus_dir / f"{s}.bin", dtype=np.uint16) for s in ("train", "dev")}


def check_tokenizer(tok_dir: Path) -> None:
    """The corpus must have been tokenized by the reference model's own tokenizer."""
    ours = json.loads((tok_dir / "tokenizer.json").read_text())["model"]["vocab"]
    ref = json.loads((REFERENCE_MODEL / "tokenizer.json").read_text())["model"]["vocab"]
    if ours != ref:
        raise SystemExit(f"{tok_dir} is not the reference model's tokenizer; rebuild the corpus")


def batch_at(stream: np.ndarray, starts: np.ndarray, seq_len: int) -> mx.array:
    """Windows of ``seq_len + 1`` tokens (inputs and shifted targets) starting at ``starts``."""
    idx = starts[:, None] + np.arange(seq_len + 1)[None, :]
    return mx.array(stream[idx].astype(np.int32))


def dev_windows(dev: np.ndarray, n: int, seq_len: int) -> np.ndarray:
    """Fixed dev windows, evenly spread over the whole dev stream (its files differ a lot)."""
    return np.linspace(0, dev.size - seq_len - 2, n).astype(np.int64)


# --------------------------------------------------------------------------- model
def build_model(config: dict, seed: int = SEED) -> nn.Module:
    """A freshly initialized float32 draft: normal(0, 0.02) matrices, unit norms (as train.py)."""
    from mlx_lm.models import qwen3

    mx.random.seed(seed)
    model = qwen3.Model(qwen3.ModelArgs.from_dict(config))

    def init(path: str, a: mx.array) -> mx.array:
        return mx.ones_like(a) if a.ndim == 1 else 0.02 * mx.random.normal(a.shape)

    model.update(tree_map_with_path(init, model.parameters()))
    mx.eval(model.parameters())
    return model


def count_params(model: nn.Module) -> int:
    """All parameters (the tied embedding counted once)."""
    return sum(a.size for _, a in tree_flatten(model.parameters()))


def loss_fn(model: nn.Module, batch: mx.array) -> mx.array:
    """Mean next-token cross-entropy (nats/token) of a batch of windows."""
    logits = model(batch[:, :-1])
    return nn.losses.cross_entropy(logits, batch[:, 1:], reduction="mean")


def lr_at(step: int, total: int, peak: float, floor: float, warmup: int) -> float:
    """Linear warmup to ``peak``, then a cosine decay to ``floor`` at step ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * t))


def make_step(model: nn.Module, opt: optim.Optimizer, clip: float):
    """One compiled AdamW step with gradient clipping; returns the batch loss."""
    state = [model.state, opt.state]
    grad_fn = nn.value_and_grad(model, loss_fn)

    @partial(mx.compile, inputs=state, outputs=state)
    def step(batch):
        loss, grads = grad_fn(model, batch)
        grads, _ = optim.clip_grad_norm(grads, clip)
        opt.update(model, grads)
        return loss

    return step


def dev_loss(model: nn.Module, dev: np.ndarray, starts: np.ndarray, seq_len: int, bs: int) -> float:
    """Mean loss over the fixed dev windows (nats/token), in batches of ``bs``."""
    tot = 0.0
    for i in range(0, len(starts), bs):
        b = batch_at(dev, starts[i:i + bs], seq_len)
        tot += loss_fn(model, b).item() * b.shape[0]
    return tot / len(starts)


# --------------------------------------------------------------------------- training
def train(args: argparse.Namespace, corpus: dict[str, np.ndarray], log: Log) -> tuple[nn.Module, dict]:
    """Trains for ``--steps`` or, with ``--minutes``, as many steps as the first ones' pace allows."""
    config = draft_config(args)
    model = build_model(config, args.seed)
    log(f"[draft] config {json.dumps({k: v for k, v in config.items() if k != 'architectures'})}")
    log(f"[draft] {count_params(model):,} parameters; train {corpus['train'].size:,} tokens, "
        f"dev {corpus['dev'].size:,} tokens; mlx {mx.__version__}, device {mx.default_device()}")
    gflops = matmul_gflops()
    log(f"[draft] fp32 matmul {gflops:.0f} GFLOP/s"
        + (" -- slow: preload OpenBLAS (see shared/RESEARCH.md / the docstring)" if gflops < 20 else ""))
    opt = optim.AdamW(learning_rate=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)
    step_fn = make_step(model, opt, args.grad_clip)
    rng = np.random.default_rng(args.seed)
    train_ids, T, B = corpus["train"], args.seq_len, args.batch_size
    dev_starts = dev_windows(corpus["dev"], args.dev_seqs, T)

    total = args.steps  # with --minutes: set by the pace of the first steps
    history, t0, t_train, t_pace, losses = [], time.time(), 0.0, 0.0, []
    step = 0
    while total is None or step < total:
        if step == PACE_FROM:
            t_pace = t_train
        if total is None and step == args.pace_steps:
            total = steps_in_budget(args.minutes * 60, t_train, t_pace, step)
            log(f"[draft] {(t_train - t_pace) / (step - PACE_FROM) * 1000:.0f} ms/step -> {total} "
                f"steps in {args.minutes} min (rerun exactly with --steps {total})")
        # (until the pace sets ``total``, the steps are warmup steps, which do not depend on it)
        opt.learning_rate = lr_at(step, total or args.warmup, args.lr, args.min_lr, args.warmup)
        batch = batch_at(train_ids, rng.integers(0, train_ids.size - T - 1, B), T)
        ts = time.time()
        loss = step_fn(batch)
        mx.eval(loss, model.state, opt.state)
        t_train += time.time() - ts
        losses.append(loss.item())
        step += 1
        if step % args.log_every == 0 or step == total:
            log(f"[draft] step {step}/{total or '?'} loss {np.mean(losses):.4f} "
                f"lr {float(opt.learning_rate):.2e} {step * B * T / t_train:,.0f} tok/s, {t_train:.0f}s")
            losses = []
        if step % args.eval_every == 0 or step == total:
            d = dev_loss(model, corpus["dev"], dev_starts, T, B)
            history.append({"step": step, "tokens": step * B * T, "dev_loss": round(d, 4),
                            "train_seconds": round(t_train, 1)})
            log(f"[draft] step {step} dev loss {d:.4f} ({step * B * T / train_ids.size:.2f} epochs)")
    info = {"steps": step, "tokens": step * B * T, "epochs": step * B * T / train_ids.size,
            "train_seconds": round(t_train, 1), "wall_seconds": round(time.time() - t0, 1),
            "dev_loss": history[-1]["dev_loss"], "history": history, "params": count_params(model),
            "seq_len": T, "batch_size": B, "lr": args.lr, "min_lr": args.min_lr,
            "warmup": args.warmup, "weight_decay": args.weight_decay, "seed": args.seed}
    return model, info


def steps_in_budget(budget_s: float, t_train: float, t_pace: float, step: int) -> int:
    """The step count that fills ``budget_s`` at the pace of the steps since ``PACE_FROM``."""
    per_step = (t_train - t_pace) / (step - PACE_FROM)
    return max(step + 1, step + int((budget_s - t_train) / per_step))


def draft_config(args: argparse.Namespace) -> dict:
    """``DRAFT_CONFIG`` with the shape flags given on the command line (for experiments)."""
    c = dict(DRAFT_CONFIG)
    for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim"):
        if getattr(args, k) is not None:
            c[k] = getattr(args, k)
    return c


# --------------------------------------------------------------------------- export
def quantize_and_save(model: nn.Module, config: dict, out: Path) -> int:
    """4-bit (group 64) with mlx-lm's ``quantize_model``; float32 scales since the model is float32."""
    from mlx_lm.utils import quantize_model, save_config, save_model

    model, qconfig = quantize_model(model, config, GROUP_SIZE, BITS)
    keep = {f.name: f.read_bytes() for f in (out / "README.md",) if f.exists()}
    if out.exists():
        shutil.rmtree(out)
    save_model(out, model)
    save_config(qconfig, config_path=out / "config.json")
    for name in TOKENIZER_FILES:
        shutil.copy(REFERENCE_MODEL / name, out / name)
    for name, data in keep.items():
        (out / name).write_bytes(data)
    return sum(f.stat().st_size for f in out.iterdir() if f.is_file() and f.name != "README.md")


# --------------------------------------------------------------------------- acceptance
def val_prompts(n: int, chars: int) -> list[tuple[str, str]]:
    """``n`` held-out prompts (validation files spread over the list): the complete lines of each
    file's first ``chars`` characters, without the last newline, so that the prompt ends mid-line
    and the model writes the newline and indentation (a prompt ending in a newline ends in a
    token seen only at the end of a file, see reference/README.md)."""
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = STDLIB_VAL_FILES.read_text().split()
    out = []
    for i in np.linspace(0, len(files) - 1, n):
        rel = files[int(i)]
        head = (stdlib / rel).read_bytes().decode("utf-8", errors="replace")[:chars]
        out.append((rel, head[:head.rfind("\n")].rstrip()))
    return out


def measure_acceptance(draft_dir: Path, prompts: list[tuple[str, str]], max_tokens: int,
                       ks: list[int], log: Log) -> dict:
    """Greedy speculative decoding with mlx-lm on the reference model: the share of drafted tokens
    accepted, tokens per verify pass, and whether the output equals plain greedy decoding."""
    import mlx_lm
    from mlx_lm.generate import generate_step, speculative_generate_step

    sys.path.insert(0, str(REPO))
    from hobbit_mlx.speculative import draft_passes

    target, tok = mlx_lm.load(str(REFERENCE_MODEL))
    target.set_dtype(mx.float32)
    draft = mlx_load(draft_dir)
    result = {"max_tokens": max_tokens, "prompts": [p[0] for p in prompts], "per_k": {}}
    plains = []
    for _, text in prompts:
        ids = mx.array(tok.encode(text))
        plains.append([int(t) for t, _ in generate_step(ids, target, max_tokens=max_tokens)])
    for k in ks:
        drafted = accepted = passes = tokens = 0
        identical = True
        for (_, text), plain in zip(prompts, plains):
            ids = mx.array(tok.encode(text))
            seq = list(speculative_generate_step(ids, target, draft, num_draft_tokens=k,
                                                 max_tokens=max_tokens))
            got = [int(t) for t, _, _ in seq]
            identical &= got == plain
            d, a, p = draft_passes([f for _, _, f in seq], k, max_tokens)
            accepted, drafted, passes, tokens = accepted + a, drafted + d, passes + p, tokens + len(got)
        r = {"acceptance": accepted / drafted, "tokens_per_pass": tokens / passes,
             "drafted": drafted, "accepted": accepted, "passes": passes, "tokens": tokens,
             "identical_to_greedy": identical}
        result["per_k"][k] = r
        log(f"[accept] K={k}: {accepted}/{drafted} drafted tokens accepted ({r['acceptance']:.3f}), "
            f"{r['tokens_per_pass']:.2f} tokens per verify pass, greedy-identical: {identical}")
    return result


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    """Train, quantize and save the draft, then measure its acceptance (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus-dir", default=str(REPO / ".corpus"))
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--log", default=str(DEFAULT_LOG),
                    help="the log ('' for none); --measure-only appends to it")
    ap.add_argument("--minutes", type=float, default=22.0, help="training budget (sets the steps)")
    ap.add_argument("--steps", type=int, default=None, help="exact number of steps (overrides --minutes)")
    ap.add_argument("--pace-steps", type=int, default=30, help="steps timed to turn --minutes into steps")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--min-lr", type=float, default=1e-4)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--dev-seqs", type=int, default=64)
    for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim"):
        ap.add_argument("--" + k.replace("_", "-"), dest=k, type=int, default=None)
    ap.add_argument("--measure-only", action="store_true", help="only measure the acceptance of --out")
    ap.add_argument("--no-measure", action="store_true")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-chars", type=int, default=600)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--ks", default="2,3,4")
    args = ap.parse_args(argv)
    if args.steps is None and not PACE_FROM < args.pace_steps <= args.warmup:
        ap.error(f"--pace-steps must be in ({PACE_FROM}, --warmup]: the schedule is set during the warmup")
    out = Path(args.out)
    log = Log(Path(args.log) if args.log else None)
    log(f"[draft] {' '.join(['python reference/train_draft.py'] + (argv or sys.argv[1:]))}")

    if not args.measure_only:
        corpus = load_corpus(Path(args.corpus_dir))
        model, info = train(args, corpus, log)
        size = quantize_and_save(model, draft_config(args), out)
        info["checkpoint_bytes"] = size
        log(f"[draft] 4-bit checkpoint {out}: {size / 1e6:.2f} MB")
        qdev = dev_loss(mlx_load(out), corpus["dev"], dev_windows(corpus["dev"], args.dev_seqs,
                                                                  args.seq_len),
                        args.seq_len, args.batch_size)
        info["dev_loss_4bit"] = round(qdev, 4)
        log(f"[draft] dev loss {info['dev_loss']:.4f} (float32) -> {qdev:.4f} (4-bit)")
        log(f"[draft] summary {json.dumps(info)}")
    if not args.no_measure:
        prompts = val_prompts(args.prompts, args.prompt_chars)
        acc = measure_acceptance(out, prompts, args.max_tokens, [int(k) for k in args.ks.split(",")], log)
        log(f"[accept] summary {json.dumps(acc)}")
    log.save(append=args.measure_only)  # (a measurement alone adds to the training's log)


def mlx_load(path: Path) -> nn.Module:
    """An mlx-lm checkpoint in float32 activations (the CPU backend's fast path)."""
    import mlx_lm

    model, _ = mlx_lm.load(str(path))
    model.set_dtype(mx.float32)
    return model


if __name__ == "__main__":
    main()
